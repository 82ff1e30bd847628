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


def greedy_layout(problem: Problem, bounds: Sequence[int], allowed: np.ndarray | None = None) -> Layout | None:
    """Place peers fastest first on the slowest eligible stage they improve.

    `allowed` (bool per peer) restricts which peers may be used. Returns None if some stage
    ends up without a replica.
    """
    lay = Layout(problem, bounds)
    S = lay.num_stages
    rate_sum = np.zeros(S)
    count = np.zeros(S, dtype=int)
    min_bw = np.full(S, np.inf)
    times = np.full(S, np.inf)
    # Speed on the model as a whole: decides who is placed first.
    whole = problem.span_rates(0, problem.num_layers)
    order = sorted(range(problem.num_peers), key=lambda i: (-whole[i], -problem.bw[i], problem.peer_ids[i]))
    # Tie-break among equally slow stages: most memory needed first (fewest peers fit it).
    stage_rank = np.argsort(np.argsort(-lay.need_bytes, kind="stable"), kind="stable")
    for i in order:
        if allowed is not None and not allowed[i]:
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
