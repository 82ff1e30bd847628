"""cap_replicas(): a plan with at most `max_replicas` peers per stage; shortlist(): the
peers such a plan is likely to use, so that planning a large swarm stays cheap.

Why a cap. The runtime gives micro-batch i to replica i mod R, so replicas beyond the
step's micro-batch count sit idle (the cost model, which lets replicas share samples
continuously, does not see that). And under churn every peer in a plan is a way for the
running epoch to fail: a smaller plan fails less often (see simulations/goodput_vs_session.py).

How. Each stage keeps its fastest `max_replicas` peers (the plan lists them fastest first),
and the cuts are re-chosen exactly for those groups (partition.cut_groups). Trimming never
breaks memory (a replica's memory does not depend on how many replicas its stage has), so
the original cuts stay feasible and the re-cut is at least as fast.

A capped plan uses at most (layers x max_replicas) peers; `shortlist` keeps that many of
the fastest, of the best-connected and of the largest peers (a peer can matter for any of
the three), plus the previous plan's peers, so a re-plan of 256 peers prices ~50.
A heuristic: a peer in none of the three top lists is not considered. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .costs import LayerCost, PeerSpec
from .partition import cut_groups
from .plans import Plan, Stage
from .tables import Problem


def cap_replicas(
    plan: Plan,
    layers: Sequence[LayerCost],
    peers: Sequence[PeerSpec],
    *,
    max_replicas: int,
    in_bytes: int,
    batch_size: int,
    microbatch_size: int,
    state_factor: float = 4.0,
) -> Plan:
    """`plan` with each stage trimmed to its first `max_replicas` peers and re-cut; the
    trimmed peers join `unused`. Returns `plan` itself when no stage is over the cap."""
    if max_replicas < 1:
        raise ValueError("max_replicas must be at least 1")
    if all(len(s.peers) <= max_replicas for s in plan.stages):
        return plan
    kept = [s.peers[:max_replicas] for s in plan.stages]
    problem = Problem(layers, peers, in_bytes=in_bytes, batch_size=batch_size,
                      microbatch_size=microbatch_size, state_factor=state_factor)
    index = {p: i for i, p in enumerate(problem.peer_ids)}
    found = cut_groups(problem, [np.array([index[p] for p in g]) for g in kept])
    bounds = [s.start for s in plan.stages] + [plan.stages[-1].stop] if found is None else found[0]
    dropped = {p for s in plan.stages for p in s.peers[max_replicas:]}
    return Plan(stages=[Stage(a, b, g) for a, b, g in zip(bounds[:-1], bounds[1:], kept)],
                unused=tuple(sorted(set(plan.unused) | dropped)))


def shortlist(peers: Sequence[PeerSpec], previous: Plan | None, *, max_peers: int) -> list[PeerSpec]:
    """The peers among the `max_peers` fastest, best-connected or largest (ties by id),
    plus every peer of `previous`, in the order given; all of them if there are no more
    than `max_peers`."""
    if len(peers) <= max_peers:
        return list(peers)
    keep = set(previous.peer_ids()) if previous is not None else set()
    for measure in (lambda p: p.flops_per_s, lambda p: p.bandwidth_bytes_per_s, lambda p: p.memory_bytes):
        ranked = sorted(peers, key=lambda p: (-measure(p), p.peer_id))
        keep.update(p.peer_id for p in ranked[:max_peers])
    return [p for p in peers if p.peer_id in keep]
