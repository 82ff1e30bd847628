"""plan(): the search that ties partition, assignment and local search together."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .assign import Layout, greedy_layout
from .costs import LayerCost, PeerSpec
from .partition import balanced_bounds
from .plans import Infeasible, Plan, Stage
from .tables import Problem


def stage_counts(problem: Problem) -> list[int]:
    """Numbers of stages worth trying: all of them for small instances, a geometric grid
    (about 4 per octave) otherwise."""
    top = min(problem.num_layers, problem.num_peers)
    if top <= 16:
        return list(range(1, top + 1))
    grid = {1, top}
    x = 1.0
    while x < top:
        grid.add(int(round(x)))
        x *= 2 ** 0.25
    return sorted(s for s in grid if 1 <= s <= top)


def layout_to_plan(problem: Problem, lay: Layout) -> Plan:
    """Stages with replicas fastest first (ties by peer id); unused peers sorted by id."""
    stages = []
    for s, g in enumerate(lay.groups()):
        order = sorted(g, key=lambda i: (-lay.rates[s, i], problem.peer_ids[i]))
        stages.append(Stage(lay.bounds[s], lay.bounds[s + 1], tuple(problem.peer_ids[i] for i in order)))
    unused = tuple(sorted(problem.peer_ids[i] for i in np.flatnonzero(lay.stage_of < 0)))
    return Plan(stages=stages, unused=unused)


def infeasible_reason(problem: Problem) -> str:
    """Say what is short when no plan fits."""
    if problem.num_peers == 0:
        return "no peers to place the model on"
    biggest_peer = float(problem.mem.max())
    # A layer alone as the last stage is the least any stage holding it can need.
    single = [problem.memory(a, a + 1, 0, 1) for a in range(problem.num_layers)]
    worst = int(np.argmax(single))
    if single[worst] > biggest_peer:
        return (
            f"layer {worst} needs {single[worst] / 1e9:.3g} GB on its own; "
            f"the largest peer offers {biggest_peer / 1e9:.3g} GB"
        )
    state = problem.state_factor * problem.params_cum[-1]
    total = float(problem.mem.sum())
    if state > total:
        return (
            f"parameters and optimizer state need {state / 1e9:.3g} GB in total; "
            f"all {problem.num_peers} peers together offer {total / 1e9:.3g} GB"
        )
    return (
        f"no split of the {problem.num_layers} layers into stages fits {problem.num_peers} peers "
        f"(largest peer {biggest_peer / 1e9:.3g} GB, total {total / 1e9:.3g} GB, "
        f"parameters and state {state / 1e9:.3g} GB, activations in flight add to every stage)"
    )


def plan(
    layers: Sequence[LayerCost],
    peers: Sequence[PeerSpec],
    *,
    in_bytes: int,
    batch_size: int,
    microbatch_size: int,
    state_factor: float = 4.0,
) -> Plan:
    """Cut `layers` into contiguous stages and place `peers` on them (DESIGN.md section 5).

    Returns a feasible plan that minimises `step_time` as far as the search finds; raises
    Infeasible, saying what is short, when no plan fits the peers' memory.
    """
    problem = Problem(
        layers, peers, in_bytes=in_bytes, batch_size=batch_size, microbatch_size=microbatch_size, state_factor=state_factor
    )
    if problem.num_peers == 0:
        raise Infeasible(infeasible_reason(problem))
    mem_desc = np.sort(problem.mem)[::-1]
    best: Layout | None = None
    best_t = np.inf
    for S in stage_counts(problem):
        for cap in {float(mem_desc[0]), float(mem_desc[S - 1])}:
            bounds = balanced_bounds(problem, S, [cap] * S)
            if bounds is None:
                continue
            lay = greedy_layout(problem, bounds)
            if lay is None:
                continue
            t = lay.step_time()
            if t < best_t:
                best, best_t = lay, t
    if best is None:
        raise Infeasible(infeasible_reason(problem))
    return layout_to_plan(problem, best)
