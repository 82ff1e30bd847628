"""Where to cut the layers: dynamic programmes over contiguous spans.

Two exact DPs, each O(S * L^2) with the inner minimum vectorised:
- `balanced_bounds`: minimise the largest stage's flops subject to a memory cap per stage
  position. Used to seed the search before any peers are placed.
- `bounds_for_groups`: given which peers serve stage 0, 1, ..., S-1, the cuts that minimise
  the true step time (cost model, memory included). Exact for fixed groups.

Bounds are a list [0 = b_0 < b_1 < ... < b_S = L]; stage s holds layers [b_s, b_{s+1}).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tables import Problem, ring_factor

_CACHE_LIMIT = 20_000  # matrices per memo table: bounds memory at (L+1)^2 * 8 B each


def _bottleneck_dp(costs: Sequence[np.ndarray], num_layers: int) -> tuple[list[int], float] | None:
    """(cuts, value) minimising max_s costs[s][a, b]; None if every cut has an infinite stage.

    costs[s] has shape (L, L + 1) and is +inf where a >= b or the span is not allowed.
    """
    L = num_layers
    best = np.full(L + 1, np.inf)
    best[0] = 0.0
    choices = []
    for cost in costs:
        cand = np.maximum(best[:L, None], cost)  # (a, b)
        arg = np.argmin(cand, axis=0)
        best = cand[arg, np.arange(L + 1)]
        choices.append(arg)
    if not np.isfinite(best[L]):
        return None
    bounds = [L]
    for arg in reversed(choices):
        bounds.append(int(arg[bounds[-1]]))
    bounds.reverse()
    return bounds, float(best[L])


def balanced_bounds(problem: Problem, num_stages: int, caps_bytes: Sequence[float]) -> list[int] | None:
    """Cuts into `num_stages` stages minimising the largest stage's flops, with stage s's
    memory at most caps_bytes[s]. None if no cut fits the caps."""
    costs = []
    for s in range(num_stages):
        mem = problem.memory_matrix(s, num_stages)
        # Flops plus a sliver of params so that ties (e.g. zero-flop layers) still spread out.
        c = problem.span_flops + 1e-9 * problem.span_params
        costs.append(np.where(problem.valid & (mem <= caps_bytes[s]), c, np.inf))
    found = _bottleneck_dp(costs, problem.num_layers)
    return None if found is None else found[0]


def group_time_matrix(problem: Problem, members: np.ndarray, stage_index: int, num_stages: int) -> np.ndarray:
    """Stage time over all spans (a, b) if exactly the peers `members` serve position s;
    +inf where the span does not fit the group's smallest memory. Cached per (group,
    micro-batches in flight), which is all the position changes."""
    key = np.sort(members).tobytes()
    in_flight = problem.in_flight(stage_index, num_stages)
    hit = problem._stage_cache.get((key, in_flight))
    if hit is not None:
        return hit
    mem = problem.memory_matrix(stage_index, num_stages)
    ok = mem <= problem.mem[members].min()
    out = np.where(ok, _group_time_no_memory(problem, members, key), np.inf)
    if len(problem._stage_cache) < _CACHE_LIMIT:
        problem._stage_cache[(key, in_flight)] = out
    return out


def _group_time_no_memory(problem: Problem, members: np.ndarray, key: bytes) -> np.ndarray:
    """Stage time over all spans for the group `members`, memory ignored. Cached per group.

    Sum of rates uses the split into compute-bound and link-bound replicas: a replica is
    compute-bound on a span iff flops_per_s / bandwidth <= span_flops / span_traffic, so with
    the replicas sorted by that ratio the rate sum is two prefix sums: O(L^2 log k).
    """
    hit = problem._group_cache.get(key)
    if hit is not None:
        return hit
    fps = problem.fps[members]
    bw = problem.bw[members]
    k = len(members)
    order = np.argsort(fps / bw, kind="stable")
    ratio = (fps / bw)[order]
    cum_f = np.concatenate([[0.0], np.cumsum(fps[order])])
    cum_bw = np.concatenate([[0.0], np.cumsum(bw[order])])
    F = problem.span_flops
    T = problem.span_traffic
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(T > 0, F / T, np.inf)
        idx = np.searchsorted(ratio, phi, side="right")
        rate = np.where(F > 0, cum_f[idx] / F, np.where(idx > 0, np.inf, 0.0))
        rate = rate + np.where(T > 0, (cum_bw[k] - cum_bw[idx]) / T, np.where(idx < k, np.inf, 0.0))
        time = problem.batch_size / rate
    sync = ring_factor(k) * problem.span_params / bw.min()
    out = np.where(problem.valid, time + sync, np.inf)
    if len(problem._group_cache) < _CACHE_LIMIT:
        problem._group_cache[key] = out
    return out


def cut_groups(problem: Problem, groups: Sequence[np.ndarray]) -> tuple[list[int], float] | None:
    """Exact best cuts for fixed, ordered, non-empty peer groups and the step time they
    give; None if no cut fits memory (or there are more groups than layers).

    The DP runs stage by stage from the front, and its state after stage s depends only on
    the groups up to s and their micro-batches in flight; that state is memoised, so the
    many candidate groupings the search prices, which share long prefixes, cost only the
    stages after their first difference.
    """
    S = len(groups)
    L = problem.num_layers
    if S > L:
        return None
    cache = problem._dp_cache
    cols = np.arange(L + 1)
    prefix = 0  # id of the empty prefix
    best = np.full(L + 1, np.inf)
    best[0] = 0.0
    chain = []  # (best, arg) per stage
    for s, g in enumerate(groups):
        key = (prefix, np.sort(g).tobytes(), problem.in_flight(s, S))
        hit = cache.get(key)
        if hit is None:
            cost = group_time_matrix(problem, g, s, S)
            cand = np.maximum(best[:L, None], cost)
            arg = np.argmin(cand, axis=0)
            best = cand[arg, cols]
            hit = (len(cache) + 1, best, arg)
            if len(cache) < _CACHE_LIMIT:
                cache[key] = hit
        prefix, best, arg = hit
        chain.append(arg)
    if not np.isfinite(best[L]):
        return None
    bounds = [L]
    for arg in reversed(chain):
        bounds.append(int(arg[bounds[-1]]))
    bounds.reverse()
    return bounds, float(best[L])


def bounds_for_groups(problem: Problem, groups: Sequence[np.ndarray]) -> list[int] | None:
    """Exact best cuts for fixed, ordered, non-empty peer groups; None if none fits memory."""
    found = cut_groups(problem, groups)
    return None if found is None else found[0]
