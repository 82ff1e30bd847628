"""Re-planning after peers leave or join: stay close to the previous plan.

A peer that keeps serving the layers it already holds needs nothing; any other layer it is
given must be fetched (parameters and optimizer state, but we count parameter bytes: the
state follows the same path and scales with it). `moved_param_bytes` measures that.

`replan` builds a few candidates that keep as much of `previous` as possible:
1. the previous cuts and surviving replicas, empty stages refilled by the stage-driven
   greedy, then local search with the cuts fixed; also with those groups re-cut exactly
   (only the layers next to moved cuts change hands);
2. the surviving groups re-cut exactly (stages that lost everyone are absorbed by their
   neighbours), then the same local search;
3. from 1 and 2, structural moves (drop, merge, split, insert or replace a stage's peer),
   the fastest while still too slow, then the one moving the fewest bytes;
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


def _frugal_moves(problem: Problem, previous: Plan, lay: Layout, limit_s: float, max_rounds: int = 4) -> list[Layout]:
    """Structural moves (search.restructure_candidates) from `lay`: while slower than
    `limit_s` take the fastest move; once a move reaches `limit_s`, take the one among those
    that moves the fewest bytes and stop. Returns the layouts visited."""
    out = []
    for _ in range(max_rounds):
        if lay.step_time() <= limit_s:
            break
        scored = []
        for groups in restructure_candidates(problem, lay):
            found = _cut(problem, groups, reorder=True)
            if found is not None and found[0] < lay.step_time() * (1 - 1e-12):
                scored.append(found)
        if not scored:
            break
        fast = [f for f in scored if f[0] <= limit_s]
        if fast:
            best = min(fast, key=lambda f: (moved_param_bytes(previous, layout_to_plan(problem, _layout_for(problem, f[1], f[2])), problem.layers), f[0]))
        else:
            best = min(scored, key=lambda f: f[0])
        lay = improve(_layout_for(problem, best[1], best[2]))
        out.append(lay)
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
    # 2. surviving groups re-cut (empty stages dropped)
    groups = [g for g in kept.groups() if len(g)]
    if groups:
        recut = _recut(problem, groups)
        if recut is not None:
            candidates.append(improve(recut))
    fresh = search(problem)
    fresh_s = fresh.step_time()
    limit_s = fresh_s * (1 + tolerance)
    # 3. from each, structural moves chosen for fewest bytes once fast enough
    for lay in list(candidates):
        candidates.extend(_frugal_moves(problem, previous, lay, limit_s))
    # 4. the above, fully polished
    for lay in list(candidates):
        candidates.append(_polish(problem, Layout(problem, lay.bounds, lay.stage_of)))
    candidates.append(fresh)

    plans = [(lay.step_time(), layout_to_plan(problem, lay)) for lay in candidates if _fits(lay)]
    within = [(moved_param_bytes(previous, p, layers), t, i) for i, (t, p) in enumerate(plans) if t <= limit_s]
    moved, t, i = min(within)
    return Replan(plan=plans[i][1], moved_bytes=moved, step_time_s=t, fresh_step_time_s=fresh_s)
