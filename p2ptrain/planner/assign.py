"""Which peers serve which stage, for fixed cuts: stage state and a greedy placement.

`Layout` is the mutable search state (cuts plus peer -> stage), with the per-stage sums the
cost model needs kept up to date so that a move is evaluated in O(1) per stage touched.
`greedy_layout` places peers one at a time, fastest first, each on the eligible stage that
is currently slowest where it helps (longest-processing-time style). A stage with no peers
counts as infinitely slow, and ties go to the stage needing the most memory, so every stage
gets a replica whenever the peers can cover them at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tables import Problem


class Layout:
    """Cuts and a peer -> stage map (-1: unused), with derived per-stage arrays.

    rates[s, p]: samples/s of peer p on stage s; eligible[s, p]: p's memory fits stage s.
    """

    def __init__(self, problem: Problem, bounds: Sequence[int], stage_of: np.ndarray | None = None) -> None:
        self.problem = problem
        self.bounds = list(bounds)
        S = self.num_stages = len(bounds) - 1
        self.need_bytes = np.array([problem.memory(bounds[s], bounds[s + 1], s, S) for s in range(S)])
        self.param_bytes = np.array([problem.span_param_bytes(bounds[s], bounds[s + 1]) for s in range(S)])
        self.rates = np.stack([problem.span_rates(bounds[s], bounds[s + 1]) for s in range(S)])
        self.eligible = problem.mem[None, :] >= self.need_bytes[:, None]
        self.stage_of = np.full(problem.num_peers, -1, dtype=int) if stage_of is None else stage_of.copy()

    def groups(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.stage_of == s) for s in range(self.num_stages)]

    def stage_times(self) -> np.ndarray:
        """Per-stage batch / X + sync; +inf for a stage without replicas."""
        p = self.problem
        out = np.full(self.num_stages, np.inf)
        for s, g in enumerate(self.groups()):
            if len(g):
                out[s] = p.stage_time(float(self.rates[s, g].sum()), len(g), float(p.bw[g].min()), self.param_bytes[s])
        return out

    def step_time(self) -> float:
        return float(self.stage_times().max())

    def fits(self) -> bool:
        used = self.stage_of >= 0
        return bool(np.all(self.eligible[self.stage_of[used], np.flatnonzero(used)]))



def _stage_totals(problem, lay):
    """Per stage of `lay`: summed replica rates, replica count, slowest link, stage time."""
    S = lay.num_stages
    rate_sum = np.zeros(S)
    count = np.zeros(S, dtype=int)
    min_bw = np.full(S, np.inf)
    for s, g in enumerate(lay.groups()):
        rate_sum[s] = lay.rates[s, g].sum()
        count[s] = len(g)
        min_bw[s] = problem.bw[g].min() if len(g) else np.inf
    times = np.array([problem.stage_time(rate_sum[s], count[s], min_bw[s], lay.param_bytes[s]) for s in range(S)])
    return rate_sum, count, min_bw, times

def greedy_layout(
    problem: Problem, bounds: Sequence[int], initial: np.ndarray | None = None, allowed: np.ndarray | None = None
) -> Layout | None:
    """Place peers fastest first on the slowest eligible stage they improve.

    `initial` (peer -> stage, -1 free) fixes some placements first; `allowed` (bool per peer)
    restricts which free peers may be used. Returns None if some stage ends up without a
    replica.
    """
    lay = Layout(problem, bounds, initial)
    S = lay.num_stages
    rate_sum, count, min_bw, times = _stage_totals(problem, lay)
    # Speed on the model as a whole: decides who is placed first.
    whole = problem.span_rates(0, problem.num_layers)
    order = sorted(range(problem.num_peers), key=lambda i: (-whole[i], -problem.bw[i], problem.peer_ids[i]))
    # Tie-break among equally slow stages: most memory needed first (fewest peers fit it).
    stage_rank = np.argsort(np.argsort(-lay.need_bytes, kind="stable"), kind="stable")
    for i in order:
        if lay.stage_of[i] >= 0 or (allowed is not None and not allowed[i]):
            continue
        cand = np.flatnonzero(lay.eligible[:, i])
        if len(cand) == 0:
            continue
        new_k = count[cand] + 1
        new_bw = np.minimum(min_bw[cand], problem.bw[i])
        sync = np.where(new_k > 1, 2.0 * (new_k - 1) / new_k * lay.param_bytes[cand] / new_bw, 0.0)
        new_t = problem.batch_size / (rate_sum[cand] + lay.rates[cand, i]) + sync
        helps = new_t < times[cand]
        if not helps.any():
            continue
        cand, new_t = cand[helps], new_t[helps]
        # slowest stage first; among equals the most memory-hungry one
        pick = min(range(len(cand)), key=lambda j: (-times[cand[j]], stage_rank[cand[j]]))
        s = int(cand[pick])
        lay.stage_of[i] = s
        rate_sum[s] += lay.rates[s, i]
        count[s] += 1
        min_bw[s] = min(min_bw[s], problem.bw[i])
        times[s] = new_t[pick]
    if np.any(count == 0):
        return None
    return lay


def bottleneck_layout(problem: Problem, bounds: Sequence[int], initial: np.ndarray | None = None) -> Layout | None:
    """Stage-driven greedy: the slowest stage takes the free peer that speeds it up most.

    Unlike `greedy_layout` the choice is made per stage, so a stage with heavy boundary
    traffic picks fast links and a compute-heavy one picks fast processors. Empty stages are
    filled first, most memory-hungry first (every peer that fits it fits the others, so this
    order never strands a stage while the peers could cover all of them). Stops when the
    slowest stage cannot be improved. Returns None if some stage cannot get a replica.
    """
    lay = Layout(problem, bounds, initial)
    S = lay.num_stages
    rate_sum, count, min_bw, times = _stage_totals(problem, lay)
    free = lay.stage_of < 0
    # Empty stages first, most memory first.
    for s in sorted(np.flatnonzero(count == 0), key=lambda s: (-lay.need_bytes[s], s)):
        cand = np.flatnonzero(free & lay.eligible[s])
        if len(cand) == 0:
            return None
        i = int(cand[np.argmax(lay.rates[s, cand])])
        lay.stage_of[i], free[i] = s, False
        rate_sum[s], count[s], min_bw[s] = lay.rates[s, i], 1, problem.bw[i]
        times[s] = problem.stage_time(rate_sum[s], 1, min_bw[s], lay.param_bytes[s])
    while free.any():
        s = int(np.argmax(times))
        cand = np.flatnonzero(free & lay.eligible[s])
        if len(cand) == 0:
            break
        k = count[s] + 1
        new_t = problem.batch_size / (rate_sum[s] + lay.rates[s, cand]) + 2.0 * (k - 1) / k * lay.param_bytes[s] / np.minimum(
            min_bw[s], problem.bw[cand]
        )
        j = int(np.argmin(new_t))
        if not new_t[j] < times[s]:
            break
        i = int(cand[j])
        lay.stage_of[i], free[i] = s, False
        rate_sum[s] += lay.rates[s, i]
        count[s] = k
        min_bw[s] = min(min_bw[s], problem.bw[i])
        times[s] = new_t[j]
    return lay
