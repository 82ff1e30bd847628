"""Re-planning after peers leave or join: stay close to the previous plan.

A peer that keeps serving the layers it already holds needs nothing; any other layer it is
given must be fetched (parameters and optimizer state, but we count parameter bytes: the
state follows the same path and scales with it). `moved_param_bytes` measures that.

`replan` builds a few candidates that keep as much of `previous` as possible:
1. the previous cuts and surviving replicas, empty stages refilled by the stage-driven
   greedy, then local search with the cuts fixed; also with those groups re-cut exactly
   (only the layers next to moved cuts change hands);
2. the surviving groups re-cut exactly (stages that lost everyone are absorbed by their
   neighbours, or replaced by one to three spare peers), then the same local search;
3. from those, short sequences of structural moves (drop, merge, split, insert or replace a
   stage's peer), a small beam keeping the fastest and the most time-per-byte moves;
4. all of these fully polished (re-cutting, group swaps, stage-count changes);
and a fresh `search`. It returns the candidate that moves the fewest bytes among those whose
step time is within `tolerance` of the fresh plan's, so churn costs little transfer unless
staying put would slow training by more than that. (A polished candidate can beat the
fresh search; it is still chosen only if it also moves the fewest bytes.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .assign import Layout, bottleneck_layout
from .costs import LayerCost, PeerSpec
from .local_search import improve
from .plans import Infeasible, Plan
from .search import _cut, _layout_for, _polish, _recut, infeasible_reason, layout_to_plan, restructure_candidates, search
from .tables import Problem


@dataclass(frozen=True)
class Replan:
    """The new plan, the parameter bytes peers must fetch to adopt it, and the step time of
    a fresh plan for the same peers (what staying close to `previous` is compared with)."""

    plan: Plan
    moved_bytes: int
    step_time_s: float
    fresh_step_time_s: float


def moved_param_bytes(previous: Plan | None, new: Plan, layers: Sequence[LayerCost]) -> int:
    """Parameter bytes the replicas of `new` must fetch: for each replica, the parameters of
    its stage's layers that it did not serve in `previous` (all of them for a new peer)."""
    cum = np.concatenate([[0], np.cumsum([x.param_bytes for x in layers])])
    held = {}
    if previous is not None:
        for st in previous.stages:
            for p in st.peers:
                held[p] = (st.start, st.stop)
    total = 0
    for st in new.stages:
        need = int(cum[st.stop] - cum[st.start])
        for p in st.peers:
            a, b = held.get(p, (0, 0))
            lo, hi = max(a, st.start), min(b, st.stop)
            total += need - (int(cum[hi] - cum[lo]) if hi > lo else 0)
    return total


def _surviving(problem: Problem, previous: Plan) -> tuple[list[int], np.ndarray]:
    """Previous cuts and the previous stage of every peer still present (-1 otherwise)."""
    index = {pid: i for i, pid in enumerate(problem.peer_ids)}
    bounds = [st.start for st in previous.stages] + [previous.stages[-1].stop]
    stage_of = np.full(problem.num_peers, -1, dtype=int)
    for s, st in enumerate(previous.stages):
        for p in st.peers:
            if p in index:
                stage_of[index[p]] = s
    return bounds, stage_of


def _check_previous(previous: Plan, num_layers: int) -> None:
    if not previous.stages or previous.stages[0].start != 0 or previous.stages[-1].stop != num_layers:
        raise ValueError("previous plan does not cover this model's layers")
    for x, y in zip(previous.stages, previous.stages[1:]):
        if x.stop != y.start:
            raise ValueError("previous plan's stages are not contiguous")


def _fits(lay: Layout) -> bool:
    return lay.fits() and bool(np.all(np.bincount(lay.stage_of[lay.stage_of >= 0], minlength=lay.num_stages) > 0))


class _Held:
    """What each peer (by index in the problem) held in the previous plan, to price
    candidate groupings in moved bytes without building plans."""

    def __init__(self, problem: Problem, previous: Plan) -> None:
        index = {pid: i for i, pid in enumerate(problem.peer_ids)}
        self.start = np.zeros(problem.num_peers, dtype=int)
        self.stop = np.zeros(problem.num_peers, dtype=int)  # [0, 0): nothing held
        for st in previous.stages:
            for p in st.peers:
                if p in index:
                    self.start[index[p]], self.stop[index[p]] = st.start, st.stop
        self.cum = problem.params_cum

    def moved_bytes(self, groups: list[np.ndarray], bounds: list[int]) -> float:
        total = 0.0
        for s, g in enumerate(groups):
            a, b = bounds[s], bounds[s + 1]
            lo = np.maximum(self.start[g], a)
            hi = np.minimum(self.stop[g], b)
            kept = np.where(hi > lo, self.cum[np.maximum(hi, lo)] - self.cum[lo], 0.0)
            total += len(g) * (self.cum[b] - self.cum[a]) - kept.sum()
        return float(total)


def _frugal_moves(
    problem: Problem, held: _Held, start: Layout, limit_s: float, max_rounds: int = 4, beam: int = 4
) -> list[Layout]:
    """Short sequences of structural moves (search.restructure_candidates) from `start`,
    looking for plans within `limit_s` that move few bytes. From each state still too slow
    it keeps the fastest move and the move with the most time saved per byte moved (a
    small beam); a move reaching `limit_s` with the fewest bytes ends its branch. Returns
    the layouts visited."""
    out: list[Layout] = []
    frontier = [start]
    for _ in range(max_rounds):
        nxt: list[tuple[float, list[np.ndarray], list[int]]] = []
        for lay in frontier:
            t_now = lay.step_time()
            if t_now <= limit_s:
                continue
            bytes_now = held.moved_bytes(lay.groups(), lay.bounds)
            scored = []
            for groups in restructure_candidates(problem, lay):
                found = _cut(problem, groups, reorder=True)
                if found is not None and found[0] < t_now * (1 - 1e-12):
                    scored.append((found, held.moved_bytes(found[1], found[2])))
            if not scored:
                continue
            done = [x for x in scored if x[0][0] <= limit_s]
            if done:
                (t, g, b), _ = min(done, key=lambda x: (x[1], x[0][0]))
                out.append(improve(_layout_for(problem, g, b)))
            fastest = min(scored, key=lambda x: x[0][0])[0]
            thrifty = max(scored, key=lambda x: (t_now - x[0][0]) / (max(x[1] - bytes_now, 0.0) + 1.0))[0]
            nxt.extend([fastest, thrifty])
        seen: set[tuple] = set()
        frontier = []
        for t, g, b in sorted(nxt, key=lambda f: f[0]):
            key = (tuple(b), tuple(x.tobytes() for x in g))
            if key not in seen and len(frontier) < beam:
                seen.add(key)
                frontier.append(improve(_layout_for(problem, g, b)))
        out.extend(frontier)
        if not frontier:
            break
    return out


def _hole_starts(problem: Problem, kept: Layout) -> list[Layout]:
    """Survivors in place, with the best-memory unused peers inserted as new one-peer
    stages where stages were emptied, re-cut: a start for when no single spare peer can
    take over an emptied stage and the survivors cannot absorb it either."""
    groups = kept.groups()
    holes = [s for s, g in enumerate(groups) if len(g) == 0]
    if not holes:
        return []
    free = np.flatnonzero(kept.stage_of < 0)
    free = free[np.lexsort((free, -problem.mem[free]))]
    out = []
    for k in (1, 2, 3):
        if len(free) < k * len(holes):
            break
        new_groups, used = [], 0
        for s, g in enumerate(groups):
            if len(g):
                new_groups.append(g)
            else:
                new_groups.extend(np.array([i]) for i in free[used : used + k])
                used += k
        lay = _recut(problem, new_groups, reorder=True)
        if lay is not None:
            out.append(improve(lay))
    return out


def replan(
    previous: Plan,
    layers: Sequence[LayerCost],
    peers: Sequence[PeerSpec],
    *,
    in_bytes: int,
    batch_size: int,
    microbatch_size: int,
    state_factor: float = 4.0,
    tolerance: float = 0.05,
) -> Replan:
    """Plan for the current `peers`, keeping stages and peers of `previous` in place where
    the step time stays within `tolerance` (relative) of a fresh plan's. Raises Infeasible
    like `plan`."""
    problem = Problem(
        layers, peers, in_bytes=in_bytes, batch_size=batch_size, microbatch_size=microbatch_size, state_factor=state_factor
    )
    if problem.num_peers == 0:
        raise Infeasible(infeasible_reason(problem))
    _check_previous(previous, problem.num_layers)
    bounds, survivors = _surviving(problem, previous)

    candidates: list[Layout] = []
    # 1. same cuts, survivors in place, holes refilled; then the same groups re-cut
    kept = Layout(problem, bounds, survivors)
    if kept.fits():  # memory depends only on the cuts, which did not change
        filled = bottleneck_layout(problem, bounds, survivors)
        if filled is not None:
            candidates.append(improve(filled))
            shifted = _recut(problem, filled.groups())
            if shifted is not None:
                candidates.append(improve(shifted))
    # 2. surviving groups re-cut (empty stages dropped), or with spares inserted where
    #    stages were emptied
    groups = [g for g in kept.groups() if len(g)]
    if groups:
        recut = _recut(problem, groups)
        if recut is not None:
            candidates.append(improve(recut))
    candidates.extend(_hole_starts(problem, kept))
    fresh = search(problem)
    fresh_s = fresh.step_time()
    limit_s = fresh_s * (1 + tolerance)
    # 3. from each, short sequences of structural moves looking for few bytes moved
    held = _Held(problem, previous)
    for lay in list(candidates):
        candidates.extend(_frugal_moves(problem, held, lay, limit_s))
    # 4. the above, fully polished
    for lay in list(candidates):
        candidates.append(_polish(problem, Layout(problem, lay.bounds, lay.stage_of)))
    candidates.append(fresh)

    plans = [(lay.step_time(), layout_to_plan(problem, lay)) for lay in candidates if _fits(lay)]
    within = [(moved_param_bytes(previous, p, layers), t, i) for i, (t, p) in enumerate(plans) if t <= limit_s]
    moved, t, i = min(within)
    return Replan(plan=plans[i][1], moved_bytes=moved, step_time_s=t, fresh_step_time_s=fresh_s)
