"""A start for bandwidth-starved pools: one peer per stage, chosen by layer capacity.

On consumer links replicas rarely pay (the all-reduce of a stage's parameters over a few
MB/s costs more than the replica saves), so good plans are often plain pipelines, and the
question is which peers to chain. For a target step time T a peer can serve a stage of
c_p(T) = min(memory / per-layer memory, T * flops_per_s / (batch * per-layer flops)) layers,
or none if its link cannot move a stage's boundary traffic within T. The smallest T whose
best capacities add up to the model (binary search over T) picks the peers; the exact cut DP
then places the cuts, trying the peers in capacity order and with the weakest links at the
ends (end stages carry about half the traffic of inner ones).

Per-layer figures are averages, so the capacities are estimates; the exact DP and the local
search that follow deal with uneven layers.
"""

from __future__ import annotations

import numpy as np

from .partition import bounds_for_groups
from .tables import Problem


def pipeline_seeds(problem: Problem, max_stages: int | None = None) -> list[tuple[list[int], np.ndarray]]:
    """(bounds, stage_of) for the capacity-chosen pipeline, in a few peer orders; [] if the
    estimate finds none that fits."""
    L = problem.num_layers
    n = problem.num_peers
    S_max = min(L, n) if max_stages is None else min(L, n, max_stages)
    B = problem.batch_size
    flops_layer = problem.flops_cum[-1] / L
    in_flight = min(2.0, B / problem.microbatch_size)  # a typical stage holds ~2 micro-batches
    mem_layer = (
        problem.state_factor * problem.params_cum[-1] / L
        + in_flight * problem.microbatch_size * 2.0 * problem.outs_cum[-1] / L
    )
    traffic = 4.0 * float(np.mean(problem.out_bytes))  # inner stage: activation + gradient, both sides
    ids = np.arange(n)

    def chosen_for(T: float) -> np.ndarray | None:
        with np.errstate(divide="ignore", invalid="ignore"):
            by_mem = np.floor(problem.mem / mem_layer) if mem_layer > 0 else np.full(n, float(L))
            by_flops = np.floor(T * problem.fps / (B * flops_layer)) if flops_layer > 0 else np.full(n, float(L))
        cap = np.minimum(np.minimum(by_mem, by_flops), L)
        cap = np.where(problem.bw * T >= B * traffic, cap, 0.0)
        order = np.lexsort((ids, -problem.bw, -cap))
        total = np.cumsum(cap[order])
        k = int(np.searchsorted(total, L)) + 1  # peers needed to reach L layers
        if k > S_max or total[-1] < L:
            return None
        return order[:k]

    # bracket T: from one layer's compute on the fastest peer to the slowest useful plan
    lo = B * flops_layer / max(float(problem.fps.max()), 1e-300) if flops_layer > 0 else 0.0
    lo = max(lo, B * traffic / float(problem.bw.max()), 1e-12)
    hi = lo
    for _ in range(80):
        if chosen_for(hi) is not None:
            break
        hi *= 2.0
    else:
        return []
    for _ in range(40):
        mid = np.sqrt(lo * hi)
        if chosen_for(mid) is None:
            lo = mid
        else:
            hi = mid
    out = []
    for relax in (1.0, 1.25, 1.6):
        chosen = chosen_for(hi * relax)
        if chosen is None:
            continue
        weak_at_ends = _weak_links_at_ends(problem, chosen)
        by_memory = chosen[np.lexsort((chosen, -problem.mem[chosen]))]
        for order in (chosen, weak_at_ends, by_memory):
            bounds = bounds_for_groups(problem, [np.array([i]) for i in order])
            if bounds is not None:
                stage_of = np.full(n, -1, dtype=int)
                stage_of[order] = np.arange(len(order))
                out.append((bounds, stage_of))
        if out:
            break
    return out


def _weak_links_at_ends(problem: Problem, chosen: np.ndarray) -> np.ndarray:
    if len(chosen) <= 2:
        return chosen
    by_bw = chosen[np.lexsort((chosen, problem.bw[chosen]))]
    inner = [i for i in chosen if i not in by_bw[:2]]
    return np.array([by_bw[1], *inner, by_bw[0]])
