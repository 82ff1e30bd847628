"""Peers leave, nothing is lost: real peer processes over TLS are killed (SIGKILL, as
`kill -9`) mid-step, and training must end with the parameters and losses of a run
without churn, every step applied exactly once."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import p2ptrain
from p2ptrain.demo import batch_stream, digits_split
from p2ptrain.node.driver import DriverConfig
from p2ptrain.swarm import LocalSwarm
from reference import PIPELINE_PEER_MEMORY, max_abs_difference, pipelined_mlp, reference_train

STEPS = 12
OPTIMIZER = optax.adam(1e-2)
LOSS = p2ptrain.losses.softmax_cross_entropy


@pytest.fixture(scope="module")
def digits():
    (x, y), _ = digits_split()
    return batch_stream(x, y, batch_size=32)


@pytest.fixture(scope="module")
def expected(digits):
    model = pipelined_mlp()
    params = model.init(jax.random.PRNGKey(0), digits(0)[0][:8])
    return params, *reference_train(model, digits, LOSS, OPTIMIZER, steps=STEPS, microbatches=4, params=params)


def train(swarm, digits, params, **kwargs):
    config = kwargs.pop("config", DriverConfig(snapshot_every_steps=4, wait_for_peers_s=60))
    return p2ptrain.train(pipelined_mlp(), digits, loss=LOSS, optimizer=OPTIMIZER, steps=STEPS, microbatches=4,
                          params=params, bootstrap=swarm.address, progress=False, config=config, **kwargs)


def assert_as_without_churn(result, expected):
    _, expected_params, expected_losses = expected
    assert len(result.losses) == STEPS
    assert max_abs_difference(result.params, expected_params) <= 1e-5
    np.testing.assert_allclose(result.losses, expected_losses, atol=1e-5, rtol=0)


def crash_flags(spec: str, token: Path) -> tuple[str, ...]:
    return ("--crash-at", spec, "--crash-token", str(token))


@pytest.mark.parametrize("spec", ["forward:6:1", "backward:6:2", "update:6"],
                         ids=["during-forward", "during-backward", "during-update"])
def test_a_peer_killed_mid_step_costs_nothing(digits, expected, tmp_path, spec):
    """Every peer carries the same crash spec; the first to reach it dies (the token file
    keeps the replayed step from killing its replacement). A spare peer takes over."""
    with LocalSwarm() as swarm:
        nodes = [swarm.join(memory=PIPELINE_PEER_MEMORY, extra=crash_flags(spec, tmp_path / "token"))
                 for _ in range(4)]
        result = train(swarm, digits, expected[0])
        dead = [n for n in nodes if n.process.poll() is not None]
    assert len(dead) == 1 and dead[0].process.returncode == -signal.SIGKILL
    assert [r.peer_id for r in result.recoveries] == [dead[0].peer_id]
    assert result.recoveries[0].resumed_from_step == 4   # the last snapshot before step 6
    assert dead[0].peer_id not in {p for s in result.stages for p in s.peer_ids}
    assert_as_without_churn(result, expected)


def stage_peers(swarm) -> list[str]:
    """The first peer of every stage of the running job, as `p2ptrain status` shows it."""
    status = subprocess.run([sys.executable, "-m", "p2ptrain", "status", "--bootstrap", swarm.address, "--json"],
                            capture_output=True, text=True, check=True)
    (job,) = [j for j in json.loads(status.stdout)["jobs"] if j["state"] == "training"]
    return [peers[0] for _, _, peers in job["stages"]]


def test_two_peers_killed_at_once(digits, expected):
    """At step 6 the test kills the peers of stages 0 and 1 together."""
    with LocalSwarm() as swarm:
        nodes = {n.peer_id: n for n in (swarm.join(memory=PIPELINE_PEER_MEMORY) for _ in range(5))}
        killed = []

        def kill_two(step, loss):
            if step == 6 and not killed:
                for peer_id in stage_peers(swarm)[:2]:
                    os.kill(nodes[peer_id].process.pid, signal.SIGKILL)
                    killed.append(peer_id)

        result = train(swarm, digits, expected[0], on_step=kill_two)
    assert len(killed) == 2
    assert {r.peer_id for r in result.recoveries} <= set(killed) and result.recoveries
    assert not set(killed) & {p for s in result.stages for p in s.peer_ids}
    assert_as_without_churn(result, expected)


@pytest.mark.parametrize("pause_s, recovers", [(2.0, False), (8.0, True)], ids=["2s-tolerated", "8s-suspected"])
def test_a_paused_peer(digits, expected, pause_s, recovers):
    """SIGSTOP a stage's peer mid-run: a 2-second pause is waited out (no false suspicion);
    a long one makes the detector suspect it, and the job moves on without it. Either way
    nothing is lost."""
    with LocalSwarm() as swarm:
        nodes = {n.peer_id: n for n in (swarm.join(memory=PIPELINE_PEER_MEMORY) for _ in range(4))}
        paused = []

        def pause(step, loss):
            if step == 4 and not paused:
                paused.append(nodes[stage_peers(swarm)[1]].process)
                paused[0].send_signal(signal.SIGSTOP)
                threading.Timer(pause_s, paused[0].send_signal, [signal.SIGCONT]).start()

        result = train(swarm, digits, expected[0], on_step=pause)
        assert paused and paused[0].poll() is None   # stopped, not killed
    assert len(result.recoveries) == (1 if recovers else 0)
    assert_as_without_churn(result, expected)


def test_training_waits_for_a_replacement_peer(digits, expected, tmp_path):
    """Three peers, all needed: after one dies the model no longer fits, so the driver waits
    until a replacement joins, then finishes exactly."""
    with LocalSwarm() as swarm:
        nodes = [swarm.join(memory=PIPELINE_PEER_MEMORY, extra=crash_flags("update:5", tmp_path / "token"))
                 for _ in range(3)]

        finished = threading.Event()

        def replace_when_dead():
            while all(n.process.poll() is None for n in nodes) and not finished.is_set():
                finished.wait(0.05)
            if not finished.is_set():
                swarm.join(memory=PIPELINE_PEER_MEMORY)
            # The parent-death signal follows the thread that started a process: stay alive.
            finished.wait()

        joiner = threading.Thread(target=replace_when_dead)
        joiner.start()
        try:
            result = train(swarm, digits, expected[0])
        finally:
            finished.set()
            joiner.join()
    assert len(result.recoveries) == 1 and result.epochs == 2
    assert_as_without_churn(result, expected)


def test_no_replacement_fails_clearly_then_resume_finishes_exactly(digits, expected, tmp_path):
    state_dir = tmp_path / "driver"
    with LocalSwarm() as swarm:
        for _ in range(3):
            swarm.join(memory=PIPELINE_PEER_MEMORY, extra=crash_flags("forward:7:0", tmp_path / "token"))
        config = DriverConfig(snapshot_every_steps=3, wait_for_peers_s=3)
        with pytest.raises(p2ptrain.TrainingError, match=f"no longer hold the model.*{state_dir}"):
            train(swarm, digits, expected[0], config=config, state_dir=state_dir)
        assert (state_dir / "checkpoint.npz").exists()
        swarm.join(memory=PIPELINE_PEER_MEMORY)
        result = train(swarm, digits, expected[0], config=config, state_dir=state_dir, resume=True)
    assert_as_without_churn(result, expected)


def test_driver_killed_mid_run_resumes_to_the_same_params(digits, expected, tmp_path):
    state_dir = tmp_path / "driver"
    with LocalSwarm() as swarm:
        for _ in range(3):
            swarm.join(memory=PIPELINE_PEER_MEMORY)
        driver = subprocess.Popen([sys.executable, str(Path(__file__).with_name("churn_driver.py")), swarm.address,
                                   str(state_dir), str(STEPS)], stdout=subprocess.PIPE, text=True,
                                  cwd=Path(__file__).parent, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent)))
        for line in driver.stdout:
            if line.strip() == "step 6":
                driver.kill()
                break
        driver.wait()
        assert driver.returncode == -signal.SIGKILL
        result = train(swarm, digits, expected[0], state_dir=state_dir, resume=True)
    assert_as_without_churn(result, expected)
