"""`p2ptrain demo`: a real swarm on loopback trains an MLP on scikit-learn's digits.

Starts a bootstrap and four peers with different memory caps as separate processes, so the
planner has to cut the model into several stages; trains over mutual TLS; reports held-out
accuracy; stops every process it started.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np

PEER_MEMORY = ("1.2MB", "1.4MB", "1.6MB", "1.8MB")   # no peer holds two 256x256 layers: a pipeline is needed
STEPS = 300
BATCH_SIZE = 128
MICROBATCHES = 4
TARGET_ACCURACY = 0.95
CHURN_AT_STEP = 100


def digits_split(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], split into train and test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def batch_stream(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0):
    """`batches(step)`: deterministic shuffled mini-batches, a new permutation per epoch."""
    per_epoch = len(x) // batch_size

    def batches(step: int):
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        chosen = order[index * batch_size:(index + 1) * batch_size]
        return x[chosen], y[chosen]

    return batches


def digits_mlp():
    import flax.linen as nn
    import jax

    import p2ptrain

    return p2ptrain.Sequential([nn.Dense(256), jax.nn.relu, nn.Dense(256), jax.nn.relu,
                                nn.Dense(256), jax.nn.relu, nn.Dense(10)])


def accuracy(model, params, x, y) -> float:
    return float(np.mean(np.argmax(np.asarray(model.apply(params, x)), axis=-1) == y))


def _stage_peer(bootstrap: str, stage: int) -> str:
    """The first peer of `stage` of the running job, as `p2ptrain status --json` shows it."""
    status = subprocess.run([sys.executable, "-m", "p2ptrain", "status", "--bootstrap", bootstrap, "--json"],
                            capture_output=True, text=True, check=True)
    (job,) = [j for j in json.loads(status.stdout)["jobs"] if j["state"] == "training"]
    return job["stages"][min(stage, len(job["stages"]) - 1)][2][0]


def run_demo(churn: bool = False) -> int:
    import optax

    import p2ptrain
    from p2ptrain.swarm import LocalSwarm, SwarmError

    started = time.monotonic()
    (x_train, y_train), (x_test, y_test) = digits_split()
    model = digits_mlp()
    print(f"digits: {len(x_train)} training and {len(x_test)} held-out images; model {len(model)} layers")
    try:
        with LocalSwarm() as swarm:
            print(f"bootstrap {swarm.bootstrap.peer_id[:12]} at {swarm.address}")
            for memory in PEER_MEMORY:
                node = swarm.join(memory=memory, threads=1)
                print(f"peer {node.peer_id[:12]} at {node.address} donates {memory}")
            by_id = {node.peer_id: node for node in swarm.peers}

            def kill_a_peer(step: int, loss: float) -> None:
                if churn and step == CHURN_AT_STEP and all(n.process.poll() is None for n in swarm.peers):
                    victim = by_id[_stage_peer(swarm.address, 1)]
                    print(f"step {step}: kill -9 peer {victim.peer_id[:12]} (stage 1)", flush=True)
                    victim.process.send_signal(signal.SIGKILL)

            result = p2ptrain.train(
                model, batch_stream(x_train, y_train, BATCH_SIZE),
                loss=p2ptrain.losses.softmax_cross_entropy, optimizer=optax.adam(1e-3),
                steps=STEPS, microbatches=MICROBATCHES, bootstrap=swarm.address, seed=0, on_step=kill_a_peer)
    except (SwarmError, p2ptrain.TrainingError, p2ptrain.Infeasible) as exc:
        print(f"p2ptrain demo: {exc}", file=sys.stderr)
        return 1
    for r in result.recoveries:
        print(f"recovered from losing peer {r.peer_id[:12]} at step {r.failed_at_step}: re-planned, replayed "
              f"from the snapshot at step {r.resumed_from_step}, next step committed {r.seconds:.2f} s later")
    held_out = accuracy(model, result.params, x_test, y_test)
    print(f"final loss {result.losses[-1]:.4f}; {result.samples_per_s:.0f} samples/s; "
          f"held-out accuracy {held_out:.1%} (target {TARGET_ACCURACY:.0%}); "
          f"{time.monotonic() - started:.0f} s in all; all processes stopped")
    return 0 if held_out >= TARGET_ACCURACY else 1
