"""Simulator scale: 256 peers for one virtual hour (issue 4, experiment 2).

Runs simulations/scenarios/scale.toml (256 profile-drawn volunteer peers, Weibull sessions
with a 30-minute mean and Poisson arrivals, shape-only compute, at most 2 replicas per stage,
bootstrap heartbeats every 10 s; every frame of the real bootstrap, peer and driver code is
simulated) for `--hours` virtual hours without a churn-free baseline, and reports wall time,
trace events and events per wall second, and with --profile the top functions (cProfile,
which about doubles the wall time). Target: 256 peers x 1 h in under 2 minutes here.

    .venv/bin/python simulations/sim_scale.py [--peers 256] [--hours 1] [--seed 0] [--profile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2ptrain.sim.report import summary_table  # noqa: E402
from p2ptrain.sim.runner import simulate  # noqa: E402
from p2ptrain.sim.scenario import load_scenario  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=256)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenario", default=str(ROOT / "simulations/scenarios/scale.toml"))
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    sc = load_scenario(args.scenario)
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
    r = simulate(sc, args.seed, peers=args.peers, hours=args.hours, baseline=False)
    if args.profile:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    print(summary_table(r))
    per_peer_hour = r.wall_s / (args.peers * args.hours)
    print(f"\n{args.peers} peers x {args.hours:g} virtual h: wall {r.wall_s:.1f} s, {r.events} events, "
          f"{r.events_per_s:.0f} events/s, {per_peer_hour:.2f} wall s per peer-hour; "
          f"target 256 x 1 h < 120 s: {'met' if r.wall_s < 120 and args.peers >= 256 and args.hours >= 1 else 'not met/not run at full size'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
