"""What a simulation measured: `SimReport`, its summary table, JSON, CSV and plot.

`summarise` is pure (it turns the runner's raw outcome into numbers); the writers do the I/O.

Definitions:
- steps: distinct training steps committed (a replayed step counts once).
- samples_per_s: (steps committed after the first) x batch / (end - first commit); the same
  formula for the churn-free baseline, so start-up (planning, compiling) cancels out.
- goodput: samples_per_s under churn / baseline samples_per_s, the baseline being the same
  scenario and seed without churn or faults: the same initial peers (arrivals hold the mean
  live count at that number; `mean_live_peers` says how close it stayed). Using the run's
  rounded mean count instead drew a different pool whenever it was off by one, and the
  pool's luck (18.9 vs 23.3 samples/s for 15 vs 17 peers) swamped the churn effect.
- failures: epochs the driver ended because a peer was lost (each becomes a recovery).
- recovery time: from the loss being noticed to the next committed step (driver's Recovery).
- lost micro-batches: steps replayed after failures x micro-batches per step.
- false suspicions: recoveries blaming a peer that was never killed nor faulted.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .scenario import Scenario


@dataclass(frozen=True)
class SimReport:
    scenario: str
    seed: int
    peers: int
    hours: float
    trace_hash: str
    events: int
    wall_s: float
    virtual_s: float
    steps: int
    samples_per_s: float
    baseline_samples_per_s: float | None
    goodput: float | None
    failures: int
    recovery_p50_s: float | None
    recovery_p99_s: float | None
    replayed_steps: int
    lost_microbatches: int
    false_suspicions: int
    kills: int
    mean_live_peers: float
    error: str
    predicted_step_s: float | None = None   # cost model (planner.step_time) of the last plan
    measured_step_s: float | None = None    # median step time under the last plan
    rows: tuple = ()     # (time_s, kind, peer, step, value, live_peers) events for CSV/plot

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("rows")
        d["events_per_s"] = self.events_per_s
        return d


def samples_per_s(outcome: dict, end_s: float) -> float:
    """(distinct steps committed after the first) x batch / (end_s - first commit)."""
    steps = outcome["steps"]
    if len(steps) < 2:
        return 0.0
    unique = len({s for _, s, _ in steps})
    return (unique - 1) * outcome["samples_per_step"] / max(end_s - steps[0][0], 1e-9)


def summarise(scenario: Scenario, seed: int, outcome: dict, base_rate: float | None, wall_s: float) -> SimReport:
    """The report of one run; `base_rate` is the churn-free samples/s (None: no goodput)."""
    horizon_s = scenario.hours * 3600.0
    rate = samples_per_s(outcome, horizon_s)
    recoveries = outcome["recoveries"]
    seconds = [r.seconds for r in recoveries]
    replayed = sum(max(0, r.failed_at_step - r.resumed_from_step) for r in recoveries)
    innocent = set(outcome["killed"]) | set(outcome["faulted"])
    return SimReport(
        scenario=scenario.name, seed=seed, peers=scenario.peers, hours=scenario.hours,
        trace_hash=outcome["trace_hash"], events=outcome["events"], wall_s=wall_s,
        virtual_s=outcome["virtual_s"], steps=len({s for _, s, _ in outcome["steps"]}),
        samples_per_s=rate, baseline_samples_per_s=base_rate,
        goodput=rate / base_rate if base_rate else None,
        failures=len(recoveries),
        recovery_p50_s=float(np.percentile(seconds, 50)) if seconds else None,
        recovery_p99_s=float(np.percentile(seconds, 99)) if seconds else None,
        replayed_steps=replayed, lost_microbatches=replayed * outcome["microbatches"],
        false_suspicions=sum(1 for r in recoveries if r.peer_id not in innocent),
        kills=len(outcome["killed"]), mean_live_peers=outcome["mean_live_peers"], error=outcome["error"],
        predicted_step_s=outcome["plans"][-1][1] if outcome["plans"] else None,
        measured_step_s=_last_plan_step_s(outcome),
        rows=tuple(outcome["rows"]))


def _last_plan_step_s(outcome: dict) -> float | None:
    """Median time between consecutive committed steps under the last plan, leaving out the
    first step after it (loading)."""
    if not outcome["plans"]:
        return None
    since = outcome["plans"][-1][0]
    times = [t for t, _, _ in outcome["steps"] if t > since]
    gaps = np.diff(times[1:]) if len(times) > 2 else []
    return float(np.median(gaps)) if len(gaps) else None


def summary_table(r: SimReport) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)
    lines = [
        ("scenario", r.scenario), ("seed", r.seed), ("peers (initial / mean live)", f"{r.peers} / {r.mean_live_peers:.1f}"),
        ("virtual time", f"{r.virtual_s:.0f} s"), ("wall time", f"{r.wall_s:.1f} s ({r.events_per_s:.0f} events/s)"),
        ("steps", r.steps), ("samples/s", f(r.samples_per_s)), ("churn-free samples/s", f(r.baseline_samples_per_s)),
        ("goodput", f(r.goodput, "{:.3f}")), ("peer kills", r.kills), ("failures (recoveries)", r.failures),
        ("recovery p50 / p99", f"{f(r.recovery_p50_s, '{:.1f}')} / {f(r.recovery_p99_s, '{:.1f}')} s"),
        ("lost micro-batches", f"{r.lost_microbatches} ({r.replayed_steps} steps replayed)"),
        ("false suspicions", r.false_suspicions),
        ("step time: measured / cost model", f"{f(r.measured_step_s, '{:.3f}')} / {f(r.predicted_step_s, '{:.3f}')} s"),
        ("trace hash", r.trace_hash),
    ]
    if r.error:
        lines.append(("stopped", r.error))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def write_csv(r: SimReport, path: Path) -> None:
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time_s", "kind", "peer", "step", "value", "live_peers"])
        for row in r.rows:
            w.writerow([f"{row[0]:.6f}", *row[1:]])


def write_png(r: SimReport, path: Path, *, bucket_s: float | None = None) -> None:
    """Throughput (samples/s per time bucket, committed steps) and live peers over time,
    failures marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end_s = max(r.virtual_s, 1.0)
    bucket_s = bucket_s or max(end_s / 60, 1.0)
    edges = np.arange(0.0, end_s + bucket_s, bucket_s)
    step_times = [row[0] for row in r.rows if row[1] == "step"]
    counts, _ = np.histogram(step_times, bins=edges)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.step(edges[:-1], counts / bucket_s, where="post", label="steps/s (committed, incl. replays)")
    ax1.set_ylabel("steps / s")
    for t in [row[0] for row in r.rows if row[1] == "kill"]:
        ax1.axvline(t, color="red", alpha=0.25, lw=0.8)
    for t in [row[0] for row in r.rows if row[1].startswith("fault_") and not row[1].endswith("_end")]:
        ax1.axvline(t, color="orange", alpha=0.8, lw=1.2, ls="--")
    ax1.set_title(f"{r.scenario}, seed {r.seed}: goodput {r.goodput if r.goodput is not None else float('nan'):.3f}")
    times = [row[0] for row in r.rows]
    live = [row[5] for row in r.rows]
    ax2.step(times, live, where="post")
    ax2.set_ylabel("live peers")
    ax2.set_xlabel("virtual time (s); red: peer kills, orange dashed: scripted faults")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
