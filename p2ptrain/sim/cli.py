"""`p2ptrain simulate`: run a scenario, print the summary (or JSON), write the events CSV
and the plot to --out. Argument parsing lives in p2ptrain/cli.py."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .report import summary_table, write_csv, write_png
from .runner import simulate
from .scenario import ScenarioError, load_scenario


def run_simulate(args) -> int:
    if args.seed < 0 or (args.hours is not None and not args.hours > 0):
        print("p2ptrain simulate: --seed must be >= 0 and --hours > 0", file=sys.stderr)
        return 2
    try:
        scenario = load_scenario(args.scenario)
    except (OSError, ScenarioError) as exc:
        print(f"p2ptrain simulate: {exc}", file=sys.stderr)
        return 2
    report = simulate(scenario, args.seed, peers=args.peers, hours=args.hours, compute=args.compute,
                      baseline=not args.no_baseline,
                      log_level=logging.INFO if args.verbose else logging.CRITICAL)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report.scenario}-seed{report.seed}"
    write_csv(report, out / f"{stem}.csv")
    write_png(report, out / f"{stem}.png")
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(summary_table(report))
        print(f"events: {out / (stem + '.csv')}, plot: {out / (stem + '.png')}")
    return 0
