"""Failure-detector benchmark: crash detection time and false suspicions. Seeded, no sleeping.

Heartbeat arrival times are simulated with numpy and fed to p2ptrain.core.detector's
FailureDetector with `now` = the simulated arrival time. The sender emits a heartbeat every
`heartbeat_interval_s` (plus up to a few ms of timer lateness); the link is FIFO, like TCP, so a
message delayed in a queue holds back the ones behind it (arrival_k = max(arrival_{k-1},
send_k + delay_k)). Scenarios:

- steady: delay 1 ms + Exp(2 ms).
- loaded: delay 5 ms + (80%: lognormal, median 20 ms, sigma 0.7; 20%: Exp(100 ms)), and 2% of
  messages wait U(0, 1 s) behind a big frame (the messages after them bunch up behind).
- pauses: steady link; the sender stalls (SIGSTOP-like) for 2 s, once per 5 minutes on average
  (stall starts at least 10 s apart, so that two stalls never merge into one 4 s stall);
  heartbeats due during a stall all go out when it ends (a burst).
- loaded+pauses: both.

Measurements:
- crash detection: after a 60 s warm-up, heartbeats stop at a uniformly random time T (messages
  already in flight still arrive); the receiver polls every 0.1 s; detection time = first
  poll time at which the state is not "alive", minus T. p50/p99 over `--trials` crashes.
- false suspicions per 100 peer-hours: `--peer-hours` of heartbeats from live peers; every
  silence during which the detector would have said "suspected" (checked at the end of each
  gap, i.e. in continuous time, which counts at least as many as any poll interval would) is
  one false suspicion. The 95% upper bound (Poisson) is printed next to the count.
- a sweep of acceptable_pause_s: crash p50/p99 against the chance that one 2 s stall is
  suspected, the trade-off that sets the default.

Targets (from the issue): crash detection p50 <= 2 s, p99 <= 5 s; <= 1 false suspicion per 100
peer-hours. A 2 s stall and a crash look identical for the first 2 s after they begin, so a
detector that tolerates 2 s stalls cannot detect a crash in under 2 s; the p50 target and the
stall tolerance are in conflict, and the sweep shows by how much.

    .venv/bin/python simulations/detector_bench.py [--seed 0] [--trials 5000] [--peer-hours 1000]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2ptrain.core.detector import ALIVE, DEAD, DetectorConfig, FailureDetector  # noqa: E402

POLL_S = 0.1
WARMUP_S = 60.0
STALL_S = 2.0
STALLS_PER_S = 1 / 300.0
MIN_STALL_SEPARATION_S = 10.0
TARGET_P50_S, TARGET_P99_S, TARGET_FP_PER_100H = 2.0, 5.0, 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    loaded: bool
    stalls_per_s: float


SCENARIOS = [
    Scenario("steady", False, 0.0),
    Scenario("loaded", True, 0.0),
    Scenario("pauses", False, STALLS_PER_S),
    Scenario("loaded+pauses", True, STALLS_PER_S),
]


# --- heartbeat arrivals ---------------------------------------------------------------------

def send_times(rng: np.random.Generator, duration_s: float, interval_s: float,
               stalls_per_s: float, stall_starts: np.ndarray | None = None) -> np.ndarray:
    """Heartbeat send times in [0, duration_s): a fixed grid plus timer lateness, shifted to the
    end of any stall they fall in. `stall_starts` replaces the random stalls."""
    n = int(duration_s / interval_s)
    sends = np.arange(n) * interval_s + rng.exponential(0.001, n)
    if stall_starts is None:
        stall_starts = np.empty(0)
        if stalls_per_s > 0:
            # A renewal process: separation + exponential, with mean 1 / stalls_per_s.
            mean_gap_s = 1.0 / stalls_per_s - MIN_STALL_SEPARATION_S
            count = int(duration_s * stalls_per_s * 1.5) + 10
            starts = np.cumsum(MIN_STALL_SEPARATION_S + rng.exponential(mean_gap_s, count))
            starts -= MIN_STALL_SEPARATION_S * rng.random()
            assert starts[-1] >= duration_s
            stall_starts = starts[starts < duration_s]
    for start in stall_starts:
        inside = (sends >= start) & (sends < start + STALL_S)
        sends[inside] = start + STALL_S
    return sends


def link_delays(rng: np.random.Generator, n: int, loaded: bool) -> np.ndarray:
    if not loaded:
        return 0.001 + rng.exponential(0.002, n)
    base = np.where(rng.random(n) < 0.8, rng.lognormal(math.log(0.02), 0.7, n), rng.exponential(0.1, n))
    queued = np.where(rng.random(n) < 0.02, rng.uniform(0.0, 1.0, n), 0.0)
    return 0.005 + base + queued


def arrivals(rng: np.random.Generator, sends: np.ndarray, loaded: bool) -> np.ndarray:
    # FIFO link: no message overtakes the one sent before it.
    return np.maximum.accumulate(sends + link_delays(rng, len(sends), loaded))


# --- measurements -----------------------------------------------------------------------------

def crash_detection_s(cfg: DetectorConfig, scenario: Scenario, trials: int, seed: int) -> np.ndarray:
    """Detection times (s) of `trials` crashes, each on a fresh detector."""
    rng = np.random.default_rng(seed)
    out = np.empty(trials)
    for trial in range(trials):
        crash_s = WARMUP_S + rng.uniform(0.0, 10.0)
        sends = send_times(rng, crash_s + 1.0, cfg.heartbeat_interval_s, scenario.stalls_per_s)
        sends = sends[sends < crash_s]
        arr = arrivals(rng, sends, scenario.loaded).tolist()
        det = FailureDetector(cfg)
        det.watch("p", 0.0)
        k = 0
        while k < len(arr) and arr[k] <= crash_s:
            det.heartbeat("p", arr[k])
            k += 1
        poll_s = math.ceil(crash_s / POLL_S) * POLL_S
        while True:
            while k < len(arr) and arr[k] <= poll_s:   # messages still in flight at the crash
                det.heartbeat("p", arr[k])
                k += 1
            if det.poll(poll_s):
                break
            poll_s += POLL_S
        out[trial] = poll_s - crash_s
    return out


def false_suspicions(cfg: DetectorConfig, scenario: Scenario, peer_hours: float, seed: int,
                     hours_per_peer: float = 10.0) -> tuple[int, int, float]:
    """(suspicions, deaths, peer-hours) of live peers over `peer_hours` of heartbeats."""
    peers = max(1, round(peer_hours / hours_per_peer))
    suspicions = deaths = 0
    # With phi_suspect >= 1 the detector cannot suspect before mean + pause >= interval +
    # pause of silence, so only longer gaps need a state check (a pure speed-up).
    assert cfg.phi_suspect >= 1.0
    floor_s = cfg.heartbeat_interval_s + cfg.acceptable_pause_s
    for peer, peer_seed in enumerate(np.random.SeedSequence(seed).spawn(peers)):
        rng = np.random.default_rng(peer_seed)
        arr = arrivals(rng, send_times(rng, hours_per_peer * 3600.0, cfg.heartbeat_interval_s,
                                       scenario.stalls_per_s), scenario.loaded)
        check = np.concatenate([[False], np.diff(arr) > floor_s]).tolist()
        arr = arr.tolist()
        det = FailureDetector(cfg)
        det.watch("p", arr[0])
        heartbeat, state = det.heartbeat, det.state
        for a, must_check in zip(arr, check):
            if must_check:
                s = state("p", a)
                if s != ALIVE:
                    suspicions += 1
                    if s == DEAD:
                        deaths += 1
                        det.watch("p", a)   # the peer rejoins; keep counting
                        continue
            heartbeat("p", a)
    return suspicions, deaths, peers * hours_per_peer


def stall_suspected_fraction(cfg: DetectorConfig, loaded: bool, trials: int, seed: int) -> float:
    """Chance that one 2 s stall, starting at a random phase after a 60 s warm-up, is suspected."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        start = WARMUP_S + rng.uniform(0.0, cfg.heartbeat_interval_s * 4)
        sends = send_times(rng, start + 5.0, cfg.heartbeat_interval_s, 0.0, np.array([start]))
        arr = arrivals(rng, sends, loaded).tolist()
        det = FailureDetector(cfg)
        det.watch("p", 0.0)
        for a in arr:
            if det.state("p", a) != ALIVE:
                hits += 1
                break
            det.heartbeat("p", a)
    return hits / trials


def poisson_upper_95(k: int) -> float:
    """Exact one-sided 95% upper confidence bound on a Poisson mean after observing k."""
    def cdf(lam: float) -> float:
        term = total = math.exp(-lam)
        for i in range(1, k + 1):
            term *= lam / i
            total += term
        return total
    lo, hi = 0.0, 10.0 + 10.0 * k
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) > 0.05 else (lo, mid)
    return hi


SWEEP = [(1.5, 0.1), (2.0, 0.1), (2.0, 0.05), (2.25, 0.05), (2.5, 0.1), (2.5, 0.05), (3.0, 0.05)]


def sweep(cfg: DetectorConfig, args: argparse.Namespace) -> None:
    """Crash detection against false suspicions for other (acceptable_pause_s, min_std_s),
    on the scenario that binds: loaded+pauses."""
    hours = args.peer_hours / 5
    print(f"\nsweep ({args.sweep_trials} crashes and stalls, {hours:g} peer-hours per point); "
          f"P(stall susp.): chance that one 2 s stall on a loaded link is suspected")
    header = (f"{'pause s':>7} {'min std s':>9} {'steady p50 s':>12} {'p99 s':>5} {'l+p p50 s':>9} "
              f"{'p99 s':>5} {'P(stall susp.)':>14} {'l+p FP/100ph':>12}")
    print(header)
    print("-" * len(header))
    seed = args.seed * 1000 + 200
    for pause_s, min_std_s in SWEEP:
        c = replace(cfg, acceptable_pause_s=pause_s, min_std_s=min_std_s)
        st = crash_detection_s(c, SCENARIOS[0], args.sweep_trials, seed)
        lp = crash_detection_s(c, SCENARIOS[3], args.sweep_trials, seed + 1)
        stall = stall_suspected_fraction(c, True, args.sweep_trials, seed + 2)
        fp = 100.0 * false_suspicions(c, SCENARIOS[3], hours, seed + 3)[0] / hours
        mark = "  <- default" if (pause_s, min_std_s) == (cfg.acceptable_pause_s, cfg.min_std_s) else ""
        print(f"{pause_s:>7.2f} {min_std_s:>9.2f} {np.percentile(st, 50):>12.2f} {np.percentile(st, 99):>5.2f} "
              f"{np.percentile(lp, 50):>9.2f} {np.percentile(lp, 99):>5.2f} {stall:>14.4f} {fp:>12.2f}{mark}")


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=5000, help="crashes per scenario")
    ap.add_argument("--peer-hours", type=float, default=1000.0, help="live peer-hours per scenario")
    ap.add_argument("--sweep-trials", type=int, default=2000, help="trials per sweep point (0: no sweep)")
    args = ap.parse_args(argv)
    cfg = DetectorConfig()
    started = time.perf_counter()
    print(f"defaults: {cfg}")
    print(f"crash trials per scenario: {args.trials}, live peer-hours per scenario: {args.peer_hours:g}, "
          f"poll {POLL_S} s, seed {args.seed}\n")
    header = (f"{'scenario':<14} {'detect p50 s':>12} {'p99 s':>7} {'max s':>7} {'dead p50 s':>10} "
              f"{'false susp.':>11} {'per 100 ph':>10} {'95% ub':>7} {'false dead':>10}")
    print(header)
    print("-" * len(header))
    worst_p50 = worst_p99 = worst_ub = 0.0
    for i, sc in enumerate(SCENARIOS):
        det_s = crash_detection_s(cfg, sc, args.trials, args.seed * 1000 + i)
        susp, deaths, hours = false_suspicions(cfg, sc, args.peer_hours, args.seed * 1000 + 100 + i)
        p50, p99 = np.percentile(det_s, 50), np.percentile(det_s, 99)
        rate, ub = 100.0 * susp / hours, 100.0 * poisson_upper_95(susp) / hours
        worst_p50, worst_p99, worst_ub = max(worst_p50, p50), max(worst_p99, p99), max(worst_ub, ub)
        print(f"{sc.name:<14} {p50:>12.2f} {p99:>7.2f} {det_s.max():>7.2f} {p50 + cfg.dead_after_s:>10.2f} "
              f"{susp:>11d} {rate:>10.3f} {ub:>7.3f} {deaths:>10d}")
    print()
    print(f"target crash detection p50 <= {TARGET_P50_S} s: {verdict(worst_p50 <= TARGET_P50_S)} "
          f"(worst scenario {worst_p50:.2f} s)")
    if worst_p50 > TARGET_P50_S:
        print("  (unreachable while 2 s stalls are tolerated: a stall and a crash look alike for 2 s)")
    print(f"target crash detection p99 <= {TARGET_P99_S} s: {verdict(worst_p99 <= TARGET_P99_S)} "
          f"(worst scenario {worst_p99:.2f} s)")
    print(f"target <= {TARGET_FP_PER_100H} false suspicion per 100 peer-hours: "
          f"{verdict(worst_ub <= TARGET_FP_PER_100H)} (worst 95% upper bound {worst_ub:.3f})")

    if args.sweep_trials:
        sweep(cfg, args)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
