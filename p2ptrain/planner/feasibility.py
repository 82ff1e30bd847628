"""Does any cut into S stages fit the peers' memory? Exact for small S.

With S stages it is enough to look at the S peers with the most memory (any feasible plan's
one-replica-per-stage core can be swapped onto them). The question is then which of those
peers serves which position, because a stage's memory depends on its position s (earlier
stages hold more micro-batches in flight) and on where its span starts (the input it keeps).

`exact_seed` answers it exactly with a DP over subsets of those S peers: reach[mask] is the
set of layer indices b such that the peers in `mask`, at positions 0..|mask|-1, can cover
layers [0, b). That is O(2^S * S * L^2) and used for S <= EXACT_MAX_STAGES; beyond that the
planner relies on caps-based seeds (partition.balanced_bounds), which may miss a fit that
only an unusual position order allows.
"""

from __future__ import annotations

import numpy as np

from .tables import Problem

EXACT_MAX_STAGES = 10
_EXACT_MAX_WORK = 4_000_000  # 2^S * S * L^2 above this: too slow to be worth it


def exact_seed(problem: Problem, num_stages: int) -> tuple[list[int], np.ndarray] | None:
    """(bounds, stage_of) with one replica per stage, or None if no cut into `num_stages`
    stages fits. Returns None also when the instance is too large for the exact DP
    (callers check `exact_applies` first)."""
    S, L = num_stages, problem.num_layers
    if not exact_applies(problem, S):
        return None
    top = np.argsort(-problem.mem, kind="stable")[:S]
    # allowed[s][j]: (L, L+1) bool, peer top[j] fits span (a, b) at position s
    mats = [problem.memory_matrix(s, S) for s in range(S)]
    full = (1 << S) - 1
    reach = np.zeros((full + 1, L + 1), dtype=bool)
    reach[0, 0] = True
    popcount = [bin(m).count("1") for m in range(full + 1)]
    for mask in sorted(range(full), key=lambda m: popcount[m]):
        starts = reach[mask, :L]
        if not starts.any():
            continue
        s = popcount[mask]
        for j in range(S):
            if mask >> j & 1:
                continue
            ok = mats[s][starts] <= problem.mem[top[j]]
            reach[mask | 1 << j] |= ok.any(axis=0)
    if not reach[full, L]:
        return None
    # walk back from (full, L)
    bounds = [L]
    stage_of = np.full(problem.num_peers, -1, dtype=int)
    mask, b = full, L
    while mask:
        s = popcount[mask] - 1
        for j in range(S):
            if not mask >> j & 1:
                continue
            prev = mask ^ (1 << j)
            cand = np.flatnonzero(reach[prev, :b] & (mats[s][:b, b] <= problem.mem[top[j]]))
            if len(cand):
                stage_of[top[j]] = s
                mask, b = prev, int(cand[-1])
                bounds.append(b)
                break
        else:  # pragma: no cover - reach[] guarantees a predecessor
            raise AssertionError("feasibility DP lost its path")
    bounds.reverse()
    return bounds, stage_of


def exact_applies(problem: Problem, num_stages: int) -> bool:
    """Whether `exact_seed` runs for this many stages."""
    work = (1 << num_stages) * num_stages * problem.num_layers ** 2
    return num_stages <= EXACT_MAX_STAGES and work <= _EXACT_MAX_WORK
