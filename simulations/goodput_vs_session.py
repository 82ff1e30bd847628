"""Goodput vs mean session length, exponential and Weibull churn (issue 4, experiment 1).

For each session distribution and mean session length, runs the churn scenario (the real
bootstrap, peer and driver code over the simulated network, `p2ptrain.sim.simulate`) and
divides its samples/s by a churn-free run at the same mean live peer count and seed. Prints a
table and writes out/goodput_vs_session.png and .json.

    .venv/bin/python simulations/goodput_vs_session.py [--peers 64] [--hours 1] [--seed 0]
        [--sessions-min 10,30,60,180] [--scenario simulations/scenarios/goodput.toml]
        [--max-replicas N|none]

Each run costs wall time roughly in proportion to peers x virtual hours (every heartbeat and
micro-batch is simulated); see sim_scale.py for the rate on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2ptrain.sim.churn import SessionModel  # noqa: E402
from p2ptrain.sim.runner import churn_free_samples_per_s, simulate  # noqa: E402
from p2ptrain.sim.scenario import load_scenario  # noqa: E402

WEIBULL_SHAPE = 0.7   # volunteer-host availability fits shape < 1 (see peers/*.toml notes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=64)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sessions-min", default="10,30,60,180")
    ap.add_argument("--distributions", default="exponential,weibull")
    ap.add_argument("--scenario", default=str(ROOT / "simulations/scenarios/goodput.toml"))
    ap.add_argument("--max-replicas", help="override the scenario's replica cap (a number, or 'none')")
    ap.add_argument("--out", default=str(ROOT / "out"))
    args = ap.parse_args(argv)
    base = load_scenario(args.scenario)
    if args.max_replicas is not None:
        base = replace(base, max_replicas=None if args.max_replicas == "none" else int(args.max_replicas))
    sessions_min = [float(s) for s in args.sessions_min.split(",")]
    rows = []
    # One churn-free reference for every row: same initial peers and seed.
    base_rate = churn_free_samples_per_s(base.with_overrides(peers=args.peers, hours=args.hours), args.seed)
    print(f"{'distribution':<12} {'session':>8} {'goodput':>8} {'samples/s':>10} {'churn-free':>10} "
          f"{'kills':>6} {'failures':>8} {'rec p50 s':>9} {'rec p99 s':>9} {'lost mb':>8} {'false susp':>10} {'wall s':>7}")
    for dist in args.distributions.split(","):
        for minutes in sessions_min:
            sc = replace(base, name=f"{dist}_{minutes:g}min",
                         sessions=SessionModel(dist, minutes * 60.0, WEIBULL_SHAPE))
            r = simulate(sc, args.seed, peers=args.peers, hours=args.hours, baseline=base_rate)
            rows.append(dict(distribution=dist, session_min=minutes, **r.to_json()))
            print(f"{dist:<12} {minutes:>6g} m {r.goodput or 0:>8.3f} {r.samples_per_s:>10.1f} "
                  f"{r.baseline_samples_per_s or 0:>10.1f} {r.kills:>6} {r.failures:>8} "
                  f"{r.recovery_p50_s or 0:>9.1f} {r.recovery_p99_s or 0:>9.1f} {r.lost_microbatches:>8} "
                  f"{r.false_suspicions:>10} {r.wall_s:>7.0f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "goodput_vs_session.json").write_text(json.dumps(rows, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for dist in args.distributions.split(","):
        pts = [(r["session_min"], r["goodput"] or 0.0) for r in rows if r["distribution"] == dist]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=dist)
    ax.set_xscale("log")
    ax.set_xlabel("mean session length (min)")
    ax.set_ylabel("goodput (samples/s ÷ churn-free)")
    ax.set_title(f"{args.peers} peers, {args.hours:g} virtual h, seed {args.seed}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "goodput_vs_session.png", dpi=100)
    print(f"wrote {out / 'goodput_vs_session.png'} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
