"""Simple planners to compare `plan` with (benchmarks only; not used by the system).

Each returns a feasible Plan under the same cost model, or None when its rule finds none.
To be fair to them, each tries every number of stages S from 1 to min(peers, layers) and
keeps its best S by `step_time`, which is more than the systems they stand for do.

- equal_pipeline: one pipeline, equal numbers of layers per stage, the fastest peers first
  (stage s gets the fastest remaining peer whose memory fits it).
- proportional_pipeline: one pipeline of the S fastest peers (fastest first), layers split so
  that each stage's flops are proportional to its peer's speed.
- petals_greedy: S stages of equal layer counts; every peer in turn (join order) serves the
  stage with the least throughput so far among those it fits, as Petals servers choose the
  blocks with the least throughput (Borzunov et al. 2023).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .assign import Layout
from .costs import LayerCost, PeerSpec
from .plans import Plan
from .search import layout_to_plan
from .tables import Problem


def _problem(layers, peers, kw) -> Problem:
    return Problem(layers, peers, **kw)


def _equal_bounds(L: int, S: int) -> list[int]:
    """S contiguous chunks whose sizes differ by at most one, larger ones first."""
    q, r = divmod(L, S)
    bounds = [0]
    for s in range(S):
        bounds.append(bounds[-1] + q + (1 if s < r else 0))
    return bounds


def _best(problem: Problem, layouts) -> Plan | None:
    best, best_t = None, np.inf
    for lay in layouts:
        if lay is None:
            continue
        t = lay.step_time()
        if t < best_t:
            best, best_t = lay, t
    return None if best is None else layout_to_plan(problem, best)


def _fastest_first(problem: Problem) -> np.ndarray:
    return np.lexsort((np.arange(problem.num_peers), -problem.fps))


def equal_pipeline(layers: Sequence[LayerCost], peers: Sequence[PeerSpec], **kw) -> Plan | None:
    problem = _problem(layers, peers, kw)
    order = _fastest_first(problem)

    def build(S: int) -> Layout | None:
        lay = Layout(problem, _equal_bounds(problem.num_layers, S))
        free = np.ones(problem.num_peers, dtype=bool)
        for s in range(S):
            fits = order[free[order] & lay.eligible[s, order]]
            if len(fits) == 0:
                return None
            lay.stage_of[fits[0]] = s
            free[fits[0]] = False
        return lay

    return _best(problem, (build(S) for S in range(1, min(problem.num_layers, problem.num_peers) + 1)))


def proportional_pipeline(layers: Sequence[LayerCost], peers: Sequence[PeerSpec], **kw) -> Plan | None:
    problem = _problem(layers, peers, kw)
    order = _fastest_first(problem)
    L = problem.num_layers
    flops_cum = problem.flops_cum

    def build(S: int) -> Layout | None:
        chosen = order[:S]
        share = np.cumsum(problem.fps[chosen]) / problem.fps[chosen].sum()
        bounds = [0]
        for s in range(S - 1):
            target = share[s] * flops_cum[-1]
            b = int(np.searchsorted(flops_cum, target, side="left"))
            # keep every stage non-empty and leave room for the ones after it
            b = min(max(b, bounds[-1] + 1), L - (S - 1 - s))
            bounds.append(b)
        bounds.append(L)
        lay = Layout(problem, bounds)
        lay.stage_of[chosen] = np.arange(S)
        return lay if lay.fits() else None

    return _best(problem, (build(S) for S in range(1, min(L, problem.num_peers) + 1)))


def petals_greedy(
    layers: Sequence[LayerCost], peers: Sequence[PeerSpec], *, join_order: Sequence[str] | None = None, **kw
) -> Plan | None:
    """`join_order` lists peer ids in the order they join (default: as given in `peers`)."""
    problem = _problem(layers, peers, kw)
    index = {pid: i for i, pid in enumerate(problem.peer_ids)}
    order = [index[p.peer_id] for p in peers] if join_order is None else [index[p] for p in join_order]

    def build(S: int) -> Layout | None:
        lay = Layout(problem, _equal_bounds(problem.num_layers, S))
        throughput = np.zeros(S)
        for i in order:
            ok = np.flatnonzero(lay.eligible[:, i])
            if len(ok) == 0:
                continue
            s = int(ok[np.argmin(throughput[ok])])
            lay.stage_of[i] = s
            throughput[s] += lay.rates[s, i]
        if np.any(throughput == 0):
            return None
        return lay

    return _best(problem, (build(S) for S in range(1, min(problem.num_layers, problem.num_peers) + 1)))


BASELINES = {
    "equal_pipeline": equal_pipeline,
    "proportional_pipeline": proportional_pipeline,
    "petals_greedy": petals_greedy,
}
