"""The same bootstrap, peer and driver code, over the in-memory transport under trio's
MockClock: keeps node code free of wall clocks and sockets (the simulator relies on it)."""

import flax.linen as nn
import jax
import numpy as np
import optax
import trio

import p2ptrain
from p2ptrain.node.bootstrap import serve_bootstrap
from p2ptrain.node.peer import PeerConfig, serve_peer
from p2ptrain.transport.memory import MemoryNetwork, MemoryTransport
from reference import max_abs_difference, reference_train


def batches(step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    return x, (x.sum(axis=1) > 0).astype(np.int32)


async def train_in_memory(peer_specs: dict[str, tuple[int, float]], steps: int = 5):
    """Bootstrap, one peer per entry (name -> (memory_bytes, flops_per_s)) and a driver, all
    over the in-memory transport; returns (result, expected params, expected losses)."""
    network = MemoryNetwork()
    model = p2ptrain.Sequential([nn.Dense(8), jax.nn.relu, nn.Dense(2)])
    params = model.init(jax.random.PRNGKey(1), batches(0)[0][:4])
    optimizer = optax.adam(0.05)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_bootstrap, MemoryTransport(network, "bootstrap"), "bootstrap:7070")
        for name, (memory_bytes, flops_per_s) in peer_specs.items():
            config = PeerConfig(bootstrap=address, listen=f"{name}:1", memory_bytes=memory_bytes,
                                flops_per_s=flops_per_s, compute_in_thread=False)
            await nursery.start(serve_peer, MemoryTransport(network, name), config)
        result = await p2ptrain.train_async(
            model, batches, loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optimizer, steps=steps,
            microbatches=4, params=params, bootstrap=address, progress=False,
            transport=MemoryTransport(network, "driver"))
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
