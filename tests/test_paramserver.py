"""The parameter-server training mode: exact against the single-process reference over the
in-memory and simulated networks (virtual time), its value accounting, and refusals."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import trio

import p2ptrain
from p2ptrain.compute import ProgramLimits
from p2ptrain.paramserver import (ParameterServerError, WorkerConfig, serve_worker,
                                  train_parameter_server_async)
from p2ptrain.paramserver.messages import ProtocolError, message, validate
from p2ptrain.paramserver.program import export_grad_program
from p2ptrain.transport.memory import MemoryNetwork, MemoryTransport
from p2ptrain.transport.sim import LinkSpec, SimNetwork, SimTransport
from p2ptrain.wire.codec import Frame
from reference import max_abs_difference, reference_train

INLINE = WorkerConfig(compute_in_thread=False)   # MockClock: no threads


def batches(step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    return x, (x.sum(axis=1) > 0).astype(np.int32)


def small_model():
    return p2ptrain.Sequential([nn.Dense(8), jax.nn.relu, nn.Dense(2)])


async def train(network, transport, workers=3, steps=4, optimizer=None, **kwargs):
    model = small_model()
    params = model.init(jax.random.PRNGKey(1), batches(0)[0][:4])
    optimizer = optimizer or optax.adam(0.05)
    result = await train_parameter_server_async(
        model, batches, loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optimizer, steps=steps,
        workers=workers, params=params, transport_factory=lambda name: transport(network, name),
        worker_config=INLINE, **kwargs)
    expected = reference_train(model, batches, p2ptrain.losses.softmax_cross_entropy, optimizer,
                               steps=steps, microbatches=workers, params=params)
    return model, params, result, expected


@pytest.mark.parametrize("workers", [1, 3])
async def test_equals_single_process_training_with_microbatches_equal_workers(autojump_clock, workers):
    _, _, result, (expected_params, expected_losses) = await train(MemoryNetwork(), MemoryTransport, workers)
    assert max_abs_difference(result.params, expected_params) <= 1e-5
    np.testing.assert_allclose(result.losses, expected_losses, atol=1e-5)
    assert result.workers == workers and len(result.step_times_s) == 4


async def test_counts_the_values_it_communicates(autojump_clock):
    model, params, result, _ = await train(MemoryNetwork(), MemoryTransport, workers=3, optimizer=optax.sgd(0.1))
    n_params = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))   # 5*8+8 + 8*2+2 = 66
    assert n_params == 66
    for counts in result.values_per_step:
        assert counts.params_down == 3 * n_params and counts.grads_up == 3 * n_params
        assert counts.inputs == 12 * 5 and counts.targets == 12 and counts.losses == 3
    assert result.values.total == 4 * (2 * 3 * 66 + 60 + 12 + 3)
    first, second = result.values_per_epoch(2)
    assert first.total == second.total == result.values.total // 2


def test_ringtmp_analytic_counts_match_the_thesis_for_mnist():
    """784-50-50-10 on 60,000 samples: the thesis's parameter server (5.08e9 values per epoch)
    is ours with one sample per worker per step; its ring (1.32e7) is our 3-stage pipeline's
    cut traffic (1.2e7) plus 10-wide outputs and one-hot targets."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "simulations"))
    import ringtmp

    widths = (784, 50, 50, 10)
    ps = ringtmp.ps_values_per_epoch(widths, 60_000, batch_size=3, workers=3)
    assert ps["params"] + ps["gradients"] == pytest.approx(5.08e9, rel=1e-3)
    pipe = ringtmp.pipeline_values_per_epoch(widths, 60_000, microbatches_per_epoch=15_000)
    assert pipe["activations"] + pipe["gradients"] + 20 * 60_000 == pytest.approx(1.32e7, rel=1e-3)


async def test_over_the_simulated_network_time_follows_the_links(autojump_clock):
    """Latency and bandwidth change the timing, never the numbers."""
    network = SimNetwork(seed=5, default_link=LinkSpec(latency_s=0.01, bandwidth_bytes_per_s=1e5))
    _, _, result, (expected_params, expected_losses) = await train(network, SimTransport, workers=3)
    assert max_abs_difference(result.params, expected_params) <= 1e-5
    np.testing.assert_allclose(result.losses, expected_losses, atol=1e-5)
    # Every step is a round trip (2 x 10 ms) plus the params each way at 100 kB/s.
    for step_s in result.step_times_s:
        assert step_s >= 2 * 0.01 + 2 * 66 * 4 / 1e5


async def test_a_worker_refuses_a_program_outside_its_allow_list(autojump_clock):
    network = MemoryNetwork()
    strict = WorkerConfig(compute_in_thread=False, limits=ProgramLimits(max_program_bytes=100))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_worker, MemoryTransport(network, "w"), "w:0", strict)
        model = small_model()
        with pytest.raises(ParameterServerError, match="max_program_bytes"):
            await train_parameter_server_async(
                model, batches, loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optax.sgd(0.1),
                steps=1, workers=[address], transport_factory=lambda name: MemoryTransport(network, name))
        nursery.cancel_scope.cancel()


async def test_an_unreachable_worker_is_one_clear_error(autojump_clock):
    network = MemoryNetwork()
    with pytest.raises(ParameterServerError, match="cannot reach worker 0 at nowhere:1"):
        await train_parameter_server_async(
            small_model(), batches, loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optax.sgd(0.1),
            steps=1, workers=["nowhere:1"], transport_factory=lambda name: MemoryTransport(network, name))


def test_messages_are_validated():
    validate(message("ps_ready", job_id="j"))
    with pytest.raises(ProtocolError, match="unknown"):
        validate(Frame("forward", {"job_id": "j", "step": 0, "mb": 0}))
    with pytest.raises(ProtocolError, match="worker 3"):
        validate(Frame("ps_load", {"job_id": "j", "worker": 3, "workers": 3, "n_params": 1, "program": b""}))
    with pytest.raises(ProtocolError, match="type bool"):
        validate(Frame("ps_step", {"job_id": "j", "step": True}))


def test_public_names():
    assert p2ptrain.train_parameter_server.__module__ == "p2ptrain.paramserver.api"
    assert p2ptrain.PSResult.__name__ == "PSResult"


async def test_over_real_tls_on_loopback():
    """Default transport: mutual TLS with a fresh identity per worker, compute in threads."""
    model = small_model()
    params = model.init(jax.random.PRNGKey(1), batches(0)[0][:4])
    optimizer = optax.sgd(0.1, momentum=0.9)
    with trio.fail_after(60):
        result = await train_parameter_server_async(
            model, batches, loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optimizer, steps=3,
            workers=2, params=params)
    expected_params, expected_losses = reference_train(model, batches, p2ptrain.losses.softmax_cross_entropy,
                                                       optimizer, steps=3, microbatches=2, params=params)
    assert max_abs_difference(result.params, expected_params) <= 1e-5
    np.testing.assert_allclose(result.losses, expected_losses, atol=1e-5)


async def test_a_worker_lost_mid_run_stops_the_job_with_a_clear_error(autojump_clock):
    network = SimNetwork(seed=1)

    def kill_worker_1(step, loss):
        if step == 1:
            network.kill("ps-worker-1")

    with pytest.raises(ParameterServerError, match="worker 1"):
        await train(network, SimTransport, workers=3, on_step=kill_worker_1)


async def test_worker_processes_over_tls_pinned_by_peer_id():
    """`python -m p2ptrain.paramserver` prints its id and address; the server pins it; SIGTERM
    stops it with exit 0. A wrong pinned id is refused."""
    import signal
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "p2ptrain.paramserver", "--listen", "127.0.0.1:0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = await trio.to_thread.run_sync(process.stdout.readline)
        _, peer_id, _, _, address = line.split()
        model = small_model()
        params = model.init(jax.random.PRNGKey(1), batches(0)[0][:4])
        common = dict(loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optax.sgd(0.1), steps=2, params=params)
        with trio.fail_after(60):
            result = await train_parameter_server_async(model, batches, workers=[f"{peer_id}@{address}"], **common)
            with pytest.raises(ParameterServerError, match="cannot reach worker 0"):
                await train_parameter_server_async(model, batches, workers=[f"{'0' * len(peer_id)}@{address}"], **common)
        expected_params, _ = reference_train(model, batches, p2ptrain.losses.softmax_cross_entropy, optax.sgd(0.1),
                                             steps=2, microbatches=1, params=params)
        assert max_abs_difference(result.params, expected_params) <= 1e-5
    finally:
        process.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(process.wait, 30) == 0


def test_same_seed_same_trace_over_a_jittery_simulated_network():
    from p2ptrain.sim.determinism import run_deterministic
    from p2ptrain.sim.trace import Trace

    def run(seed):
        trace = Trace(keep_events=0)
        network = SimNetwork(seed=seed, default_link=LinkSpec(latency_s=0.01, jitter_s=0.01), trace=trace)
        run_deterministic(train, network, SimTransport, 3, 2, seed=seed)
        return trace.hash()

    assert run(4) == run(4) != run(5)


async def test_a_silent_worker_times_out_with_a_clear_error(autojump_clock):
    from p2ptrain.paramserver import ServerConfig

    network = SimNetwork(seed=2)

    def pause_worker_2(step, loss):
        if step == 0:
            network.pause("ps-worker-2")

    with pytest.raises(ParameterServerError, match="more than 5 s to answer step 1"):
        await train(network, SimTransport, workers=3, on_step=pause_worker_2, config=ServerConfig(step_timeout_s=5))


def test_a_program_with_another_signature_is_refused():
    from p2ptrain.compute import ProgramRejected
    from p2ptrain.paramserver.program import GradProgram, shard_specs

    model = small_model()
    x, y = batches(0)
    params = model.init(jax.random.PRNGKey(1), x[:4])
    blob = export_grad_program(model, p2ptrain.losses.softmax_cross_entropy, params,
                               x_spec=shard_specs(x, y, 3)[0], y_spec=shard_specs(x, y, 3)[1])
    program = GradProgram.load(blob, 4, ProgramLimits())
    leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(params)]
    loss, grads = program([*leaves, x[:4], y[:4]])
    assert np.isfinite(loss) and [g.shape for g in grads] == [a.shape for a in leaves]
    with pytest.raises(ProgramRejected, match="inputs are"):
        GradProgram.load(blob, 3, ProgramLimits())
    with pytest.raises(ValueError, match="array 4"):
        program([*leaves, x[:5], y[:5]])
