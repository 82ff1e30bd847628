"""End to end: real `p2ptrain` processes on loopback, mutual TLS, the real CLI."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import p2ptrain
from p2ptrain.demo import batch_stream, digits_split
from p2ptrain.swarm import LocalSwarm
from reference import PIPELINE_PEER_MEMORY, max_abs_difference, pipelined_mlp, reference_train

@pytest.fixture(scope="module")
def swarm():
    with LocalSwarm() as swarm:
        for _ in range(3):
            swarm.join(memory=PIPELINE_PEER_MEMORY, threads=1)
        yield swarm


@pytest.fixture(scope="module")
def digits():
    (x, y), _ = digits_split()
    return batch_stream(x, y, batch_size=32)


def cli(*args, timeout_s=60):
    return subprocess.run([sys.executable, "-m", "p2ptrain", *args], capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)


async def test_hostile_frames_close_only_their_link(swarm):
    """Unknown message types, malformed frames and messages for unknown jobs each close
    that link; the peer keeps serving (the training test after this one uses it)."""
    from p2ptrain.node.link import Link, LinkClosed
    from p2ptrain.transport.identity import Identity
    from p2ptrain.transport.tcp_tls import TlsTransport
    from p2ptrain.wire.codec import Frame

    target = swarm.peers[0]
    transport = TlsTransport(Identity.load_or_create(None))
    hostile = [Frame("launch_missiles", {}),
               Frame("forward", {"job_id": "nope", "step": 0, "mb": 0}, (np.zeros(3, np.float32),)),
               Frame("forward", {"job_id": 7}, ())]
    for frame in hostile:
        link = Link(await transport.connect(target.address, target.peer_id))
        await link.send(frame)
        with pytest.raises(LinkClosed):
            await link.receive()
    connection = await transport.connect(target.address, target.peer_id)
    await connection.stream.send_all(b"\xff" * 64)   # a length prefix far above the frame cap
    with pytest.raises(Exception):
        await Link(connection).receive()
    assert "closing link" in target.log_path.read_text()
    status = json.loads(cli("status", "--bootstrap", swarm.address, "--json").stdout)
    assert {p["peer_id"]: p["state"] for p in status["peers"]}[target.peer_id] == "alive"


def test_pipelined_training_equals_single_process_jax(swarm, digits):
    model = pipelined_mlp()
    x0, _ = digits(0)
    params = model.init(jax.random.PRNGKey(0), x0[:8])
    optimizer = optax.sgd(0.1, momentum=0.9)
    result = p2ptrain.train(model, digits, loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optimizer,
                            steps=20, microbatches=4, params=params, bootstrap=swarm.address, progress=False)
    expected_params, expected_losses = reference_train(
        model, digits, p2ptrain.losses.softmax_cross_entropy, optimizer, steps=20, microbatches=4, params=params)
    assert max_abs_difference(result.params, expected_params) <= 1e-5
    np.testing.assert_allclose(result.losses, expected_losses, atol=1e-5, rtol=0)
    assert len(result.stages) == 3, "the model should be pipelined over all three peers"
    assert len({s.peer_id for s in result.stages}) == 3
    assert result.losses[-1] < result.losses[0]


def test_model_too_big_for_the_swarm_is_a_clear_error(swarm, digits):
    model = p2ptrain.Sequential([nn.Dense(4096), jax.nn.relu, nn.Dense(10)])
    with pytest.raises(p2ptrain.Infeasible, match="peer"):
        p2ptrain.train(model, digits, loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optax.sgd(0.1),
                       steps=2, microbatches=4, bootstrap=swarm.address, progress=False)


def test_status_json_lists_the_live_peers(swarm):
    done = cli("status", "--bootstrap", swarm.address, "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    peers = {p["peer_id"]: p for p in status["peers"]}
    for node in swarm.peers:
        peer = peers[node.peer_id]
        assert peer["state"] == "alive" and peer["address"] == node.address
        assert peer["memory_bytes"] == 70_000
        assert peer["flops_per_s"] > 1e6 and peer["bandwidth_bytes_per_s"] > 1e5
    assert isinstance(status["jobs"], list)


def test_threads_cap_pins_each_peer_process_to_its_own_core(swarm):
    def allowed(node):
        with open(f"/proc/{node.process.pid}/status") as f:
            return next(line for line in f if line.startswith("Cpus_allowed_list")).split()[1]

    cores = [allowed(node) for node in swarm.peers]
    assert all("," not in c and "-" not in c for c in cores), f"--threads 1 but allowed CPUs are {cores}"
    # LocalSwarm spreads its peers over the cores (they all sat on the first one before).
    assert len(set(cores)) == min(len(cores), len(os.sched_getaffinity(0)))


def test_sigterm_announces_the_leave_and_exits_zero():
    with LocalSwarm() as swarm:
        node = swarm.join(threads=1)
        node.process.terminate()
        assert node.process.wait(timeout=20) == 0
        status = json.loads(cli("status", "--bootstrap", swarm.address, "--json").stdout)
        assert [p["state"] for p in status["peers"] if p["peer_id"] == node.peer_id] == ["left"]
        assert swarm.stop() == [0, 0]


@pytest.mark.parametrize("args, message", [
    (["join", "--bootstrap", "127.0.0.1:1"], "cannot reach 127.0.0.1:1"),
    (["status", "--bootstrap", "127.0.0.1:1"], "cannot reach 127.0.0.1:1"),
    (["join"], "--bootstrap"),
    (["join", "--bootstrap", "nohost"], "HOST:PORT"),
    (["join", "--bootstrap", "127.0.0.1:1", "--memory", "lots"], "size"),
    (["join", "--bootstrap", "127.0.0.1:1", "--threads", "0"], "positive"),
])
def test_bad_input_is_one_clear_line(args, message):
    done = cli(*args)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
