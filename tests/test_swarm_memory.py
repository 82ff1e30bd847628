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


async def test_bootstrap_two_peers_and_a_driver_train_exactly_under_mock_clock(autojump_clock):
    network = MemoryNetwork()
    model = p2ptrain.Sequential([nn.Dense(8), jax.nn.relu, nn.Dense(2)])
    params = model.init(jax.random.PRNGKey(1), batches(0)[0][:4])
    optimizer = optax.adam(0.05)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_bootstrap, MemoryTransport(network, "bootstrap"), "bootstrap:7070")
        peers = []
        for name in ("peer-a", "peer-b"):
            # Each peer can hold about half the model, so both are needed.
            config = PeerConfig(bootstrap=address, listen=f"{name}:1", memory_bytes=1_500,
                                flops_per_s=1e9, compute_in_thread=False)
            peers.append(await nursery.start(serve_peer, MemoryTransport(network, name), config))
        result = await p2ptrain.train_async(
            model, batches, loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optimizer, steps=5,
            microbatches=4, params=params, bootstrap=address, progress=False,
            transport=MemoryTransport(network, "driver"))
        nursery.cancel_scope.cancel()
    expected_params, expected_losses = reference_train(
        model, batches, p2ptrain.losses.softmax_cross_entropy, optimizer, steps=5, microbatches=4, params=params)
    assert sorted(s.peer_id for s in result.stages) == ["peer-a", "peer-b"]
    assert max_abs_difference(result.params, expected_params) <= 1e-5
    np.testing.assert_allclose(result.losses, expected_losses, atol=1e-5)
    assert trio.current_time() < 1e6   # virtual time: no wall-clock waits happened
