"""Recovery from a lost peer, with real peer processes over TLS on loopback.

    python simulations/recovery_bench.py [--steps 200] [--kills 3]

Reports, for the digits MLP of the demo (64-256-256-256-10, batch 128, 4 micro-batches):
- the throughput cost of the state protection (snapshots of every stage's params and
  optimizer state to the driver every k steps, k chosen automatically) against no
  snapshots, measured side by side in alternating runs on the same swarm;
- for each `kill -9` of a stage's peer mid-run: time from the failure being noticed to the
  next committed step, the steps replayed, and the micro-batch-stage computations redone.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import json

import trio

import optax

import p2ptrain
from p2ptrain.demo import BATCH_SIZE, MICROBATCHES, PEER_MEMORY, batch_stream, digits_mlp, digits_split
from p2ptrain.node.driver import DriverConfig
from p2ptrain.swarm import LocalSwarm


def stage_peers(bootstrap: str) -> list[str]:
    status = subprocess.run([sys.executable, "-m", "p2ptrain", "status", "--bootstrap", bootstrap, "--json"],
                            capture_output=True, text=True, check=True)
    (job,) = [j for j in json.loads(status.stdout)["jobs"] if j["state"] == "training"]
    return [peers[0] for _, _, peers in job["stages"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    (x, y), _ = digits_split()
    batches = batch_stream(x, y, BATCH_SIZE)

    def train(swarm, config, on_step=None):
        return p2ptrain.train(digits_mlp(), batches, loss=p2ptrain.losses.softmax_cross_entropy,
                              optimizer=optax.adam(1e-3), steps=args.steps, microbatches=MICROBATCHES,
                              bootstrap=swarm.address, progress=False, config=config, on_step=on_step)

    with LocalSwarm() as swarm:
        for memory in PEER_MEMORY + PEER_MEMORY[-1:]:
            swarm.join(memory=memory, threads=1)
        protected, unprotected = [], []
        train(swarm, DriverConfig())   # warm-up: peers compile the stages once (cached after)
        # Alternate in the order P U U P, so drift on a shared machine hits both alike.
        for runs in (protected, unprotected, unprotected, protected):
            snapshots = None if runs is protected else args.steps
            runs.append(train(swarm, DriverConfig(snapshot_every_steps=snapshots)))
        with_rate = statistics.median(r.samples_per_s for r in protected)
        without_rate = statistics.median(r.samples_per_s for r in unprotected)

        kills = []
        for _ in range(args.kills):
            by_id = {n.peer_id: n for n in swarm.peers if n.process.poll() is None}
            done = []

            def kill(step, loss):
                if step == args.steps // 2 and not done:
                    victim = by_id[stage_peers(swarm.address)[-1]]
                    victim.process.send_signal(signal.SIGKILL)
                    done.append(trio.current_time())   # the driver's clock, as Recovery uses

            result = train(swarm, DriverConfig(), on_step=kill)
            kills.append((result, done[0]))
            swarm.join(memory=PEER_MEMORY[-1], threads=1)   # a replacement for the next round

    print(f"{'state protection':<28} {'samples/s':>10}")
    print(f"{'none (final snapshot only)':<28} {without_rate:>10.0f}")
    print(f"{'snapshots every k steps':<28} {with_rate:>10.0f}")
    print(f"throughput overhead: {1 - with_rate / without_rate:+.1%} (target <= 5%), median of 2 runs each, order P U U P after a warm-up run")
    share = [sum(r.snapshot_times_s) / (sum(r.step_times_s) + sum(r.snapshot_times_s)) for r in protected]
    print(f"time spent fetching snapshots, measured inside the protected runs: {statistics.median(share):.1%} "
          f"({len(protected[0].snapshot_times_s)} snapshots of ~{statistics.median(protected[0].snapshot_times_s) * 1e3:.0f} ms "
          f"in {args.steps} steps)\n")
    print(f"{'kill':>4} {'failed at':>9} {'resumed':>8} {'replayed':>8} {'mb-stages redone':>16} "
          f"{'detect s':>8} {'recovery s':>10} {'median step s':>13}")
    for i, (result, killed_at) in enumerate(kills):
        for r in result.recoveries:
            replayed = r.failed_at_step - r.resumed_from_step
            stages = len(result.stages)
            print(f"{i:>4} {r.failed_at_step:>9} {r.resumed_from_step:>8} {replayed:>8} "
                  f"{(replayed + 1) * MICROBATCHES * stages:>16} {r.noticed_at_s - killed_at:>8.3f} "
                  f"{r.seconds:>10.2f} {statistics.median(result.step_times_s):>13.4f}")
    print("detect s: from sending SIGKILL to the driver noticing (the kernel closes the dead process's TCP "
          "links). recovery s: from noticing to the next committed step: re-planning, exporting and loading "
          "the stages, and replaying the steps since the last snapshot.")


if __name__ == "__main__":
    main()
