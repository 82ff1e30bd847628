"""The same bootstrap, peer and driver code, over the in-memory transport under trio's
MockClock: keeps node code free of wall clocks and sockets (the simulator relies on it)."""

import flax.linen as nn
import jax
import numpy as np
import optax
import trio

import p2ptrain
from p2ptrain.node.bootstrap import serve_bootstrap
from p2ptrain.node.driver import DriverConfig
from p2ptrain.node.peer import PeerConfig, serve_peer
from p2ptrain.transport.memory import MemoryNetwork, MemoryTransport
from p2ptrain.transport.sim import LinkSpec, SimNetwork, SimTransport
from reference import max_abs_difference, reference_train


def batches(step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    return x, (x.sum(axis=1) > 0).astype(np.int32)


async def train_in_memory(peer_specs: dict[str, tuple[int, float]], steps: int = 5, late_peers=None,
                          network=None, transport=MemoryTransport, **kwargs):
    """Bootstrap, one peer per entry (name -> (memory_bytes, flops_per_s)) and a driver, all
    over the in-memory transport; `late_peers` (same form) join after the first step.
    Returns (result, expected params, expected losses)."""
    network = network or MemoryNetwork()
    model = p2ptrain.Sequential([nn.Dense(8), jax.nn.relu, nn.Dense(2)])
    params = model.init(jax.random.PRNGKey(1), batches(0)[0][:4])
    optimizer = optax.adam(0.05)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_bootstrap, transport(network, "bootstrap"), "bootstrap:7070")
        def start_peers(specs):
            for name, (memory_bytes, flops_per_s) in specs.items():
                config = PeerConfig(bootstrap=address, listen=f"{name}:1", memory_bytes=memory_bytes,
                                    flops_per_s=flops_per_s, compute_in_thread=False)
                nursery.start_soon(serve_peer, transport(network, name), config)

        start_peers(peer_specs)
        await trio.sleep(5)   # virtual time: let them register (a 1 MiB bandwidth probe each)

        def on_step(step, loss):
            if step == 0 and late_peers:
                start_peers(late_peers)

        result = await p2ptrain.train_async(
            model, batches, loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optimizer, steps=steps,
            microbatches=4, params=params, bootstrap=address, progress=False, on_step=on_step,
            transport=transport(network, "driver"), **kwargs)
        nursery.cancel_scope.cancel()
    expected_params, expected_losses = reference_train(
        model, batches, p2ptrain.losses.softmax_cross_entropy, optimizer, steps=steps, microbatches=4,
        params=params)
    return result, expected_params, expected_losses


def assert_exact(result, expected_params, expected_losses):
    assert max_abs_difference(result.params, expected_params) <= 1e-5
    np.testing.assert_allclose(result.losses, expected_losses, atol=1e-5)


async def test_bootstrap_two_peers_and_a_driver_train_exactly_under_mock_clock(autojump_clock):
    # Each peer can hold about half the model, so both are needed.
    result, *expected = await train_in_memory({"peer-a": (1_500, 1e9), "peer-b": (1_500, 1e9)})
    assert sorted(s.peer_id for s in result.stages) == ["peer-a", "peer-b"]
    assert_exact(result, *expected)
    assert trio.current_time() < 1e6   # virtual time: no wall-clock waits happened


async def test_replicated_stages_train_exactly(autojump_clock):
    """The planner gives one stage two replica peers: they split its micro-batches, exchange
    gradients and must still match single-process training. First the first stage is
    replicated, then (a faster peer takes stage 0) the last."""
    equal = {"peer-a": (1_500, 1e9), "peer-b": (1_500, 1e9), "peer-c": (1_500, 1e9)}
    result, *expected = await train_in_memory(equal)
    assert [len(s.peer_ids) for s in result.stages] == [2, 1]
    assert_exact(result, *expected)
    fast_c = dict(equal, **{"peer-c": (1_500, 3e9)})
    result, *expected = await train_in_memory(fast_c)
    assert [s.peer_ids for s in result.stages] == [("peer-c",), ("peer-a", "peer-b")]
    assert_exact(result, *expected)


async def test_a_peer_joining_mid_run_gets_work_when_it_helps(autojump_clock):
    """A fast peer joins after step 0; at the next snapshot (every 2 steps) the driver finds
    a plan using it 4x faster under the cost model, re-plans, and training stays exact."""
    result, *expected = await train_in_memory(
        {"peer-a": (1_500, 1e9), "peer-b": (1_500, 1e9)}, steps=6, late_peers={"peer-c": (1_500, 4e9)},
        config=DriverConfig(snapshot_every_steps=2, rebalance_interval_s=0.0))
    assert result.epochs == 2 and not result.recoveries
    assert [s.peer_ids for s in result.stages] == [("peer-c",), ("peer-a", "peer-b")]
    assert_exact(result, *expected)


async def test_the_same_swarm_over_the_simulated_network(autojump_clock):
    """Latency, jitter and limited bandwidth change the timing, never the numbers."""
    network = SimNetwork(seed=3, default_link=LinkSpec(latency_s=0.02, jitter_s=0.01, bandwidth_bytes_per_s=1e6))
    result, *expected = await train_in_memory({"peer-a": (1_500, 1e9), "peer-b": (1_500, 1e9)},
                                              network=network, transport=SimTransport)
    assert sorted(s.peer_id for s in result.stages) == ["peer-a", "peer-b"]
    assert_exact(result, *expected)
    assert sum(result.step_times_s) > 5 * 4 * 0.02   # every step crossed the links several times
