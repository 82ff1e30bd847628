"""The cost model of DESIGN.md section 5, written out literally.

This module is the reference: the planner's vectorised internals (tables.py) must agree with
it, and the simulator's measured step times are compared with `step_time`. Pure: no I/O,
no clock, no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .costs import LayerCost, PeerSpec
from .plans import Plan


def stage_traffic_bytes(layers: Sequence[LayerCost], start: int, stop: int, in_bytes: int) -> float:
    """Bytes per sample a replica of stage [start, stop) sends plus receives.

    The first stage receives the input (no gradient goes back to the driver); every internal
    boundary carries a forward activation and a backward gradient.
    """
    n = len(layers)
    inbound = in_bytes if start == 0 else 2 * layers[start - 1].out_bytes
    outbound = 0 if stop == n else 2 * layers[stop - 1].out_bytes
    return float(inbound + outbound)


def replica_time_s(layers: Sequence[LayerCost], start: int, stop: int, peer: PeerSpec, in_bytes: int) -> float:
    """t(s, p): seconds per sample on one replica; links overlap with compute."""
    flops = sum(layer.flops for layer in layers[start:stop])
    compute_s = flops / peer.flops_per_s
    link_s = stage_traffic_bytes(layers, start, stop, in_bytes) / peer.bandwidth_bytes_per_s
    return max(compute_s, link_s)


def sync_time_s(layers: Sequence[LayerCost], start: int, stop: int, replicas: Sequence[PeerSpec]) -> float:
    """Ring all-reduce of the stage's gradients once per step; zero for a single replica."""
    k = len(replicas)
    if k <= 1:
        return 0.0
    param_bytes = sum(layer.param_bytes for layer in layers[start:stop])
    slowest_bps = min(p.bandwidth_bytes_per_s for p in replicas)
    return 2.0 * (k - 1) / k * param_bytes / slowest_bps


def stage_time_s(
    layers: Sequence[LayerCost], start: int, stop: int, replicas: Sequence[PeerSpec], *, in_bytes: int, batch_size: int
) -> float:
    """batch_size / X(s) + sync(s): seconds the stage needs per step."""
    if not replicas:
        return math.inf
    rate = 0.0
    for peer in replicas:
        t = replica_time_s(layers, start, stop, peer, in_bytes)
        rate += math.inf if t == 0.0 else 1.0 / t
    return batch_size / rate + sync_time_s(layers, start, stop, replicas)


def stage_memory_bytes(
    layers: Sequence[LayerCost],
    start: int,
    stop: int,
    stage_index: int,
    num_stages: int,
    *,
    in_bytes: int,
    batch_size: int,
    microbatch_size: int,
    state_factor: float = 4.0,
) -> float:
    """memory(s, p): parameters and optimizer state, plus the activations of the micro-batches
    in flight (a stage s of S holds at most S - s of them, and never more than a batch's worth).

    The same for every replica of the stage, so it is a property of (span, position, S).
    """
    params = sum(layer.param_bytes for layer in layers[start:stop])
    acts = sum(layer.out_bytes for layer in layers[start:stop])
    stage_in = in_bytes if start == 0 else layers[start - 1].out_bytes
    in_flight = min(num_stages - stage_index, batch_size / microbatch_size)
    return state_factor * params + in_flight * microbatch_size * (stage_in + acts)


def check_structure(plan: Plan, num_layers: int, peer_ids: set[str] | Mapping[str, PeerSpec]) -> None:
    """Raise ValueError unless the stages are contiguous, non-empty, cover [0, num_layers),
    each has at least one replica, and no peer is unknown or serves two stages."""
    if not plan.stages:
        raise ValueError("plan has no stages")
    expected_start = 0
    seen: set[str] = set()
    for i, st in enumerate(plan.stages):
        if st.start != expected_start or st.stop <= st.start:
            raise ValueError(f"stage {i} spans [{st.start}, {st.stop}); expected to start at {expected_start}")
        if not st.peers:
            raise ValueError(f"stage {i} has no peers")
        for p in st.peers:
            if p not in peer_ids:
                raise ValueError(f"stage {i} uses unknown peer {p!r}")
            if p in seen:
                raise ValueError(f"peer {p!r} serves more than one stage")
            seen.add(p)
        expected_start = st.stop
    if expected_start != num_layers:
        raise ValueError(f"stages cover [0, {expected_start}) but the model has {num_layers} layers")


def step_time(
    plan: Plan,
    layers: Sequence[LayerCost],
    peers: Sequence[PeerSpec],
    *,
    in_bytes: int,
    batch_size: int,
    microbatch_size: int,
    state_factor: float = 4.0,
) -> float:
    """Seconds per training step of `plan`: max over stages of batch_size / X(s) + sync(s).

    Memory is not part of the time; use `memory_violations` to check feasibility. Raises
    ValueError for a structurally malformed plan. `microbatch_size` and `state_factor` are
    accepted so that every cost-model entry point takes the same arguments.
    """
    del microbatch_size, state_factor  # they only affect memory
    by_id = {p.peer_id: p for p in peers}
    check_structure(plan, len(layers), by_id)
    return max(
        stage_time_s(layers, st.start, st.stop, [by_id[p] for p in st.peers], in_bytes=in_bytes, batch_size=batch_size)
        for st in plan.stages
    )


def memory_violations(
    plan: Plan,
    layers: Sequence[LayerCost],
    peers: Sequence[PeerSpec],
    *,
    in_bytes: int,
    batch_size: int,
    microbatch_size: int,
    state_factor: float = 4.0,
) -> list[str]:
    """One line per replica whose stage does not fit its memory; empty when the plan is feasible."""
    by_id = {p.peer_id: p for p in peers}
    check_structure(plan, len(layers), by_id)
    out = []
    num_stages = len(plan.stages)
    for i, st in enumerate(plan.stages):
        need = stage_memory_bytes(
            layers, st.start, st.stop, i, num_stages,
            in_bytes=in_bytes, batch_size=batch_size, microbatch_size=microbatch_size, state_factor=state_factor,
        )
        for p in st.peers:
            if need > by_id[p].memory_bytes:
                out.append(f"stage {i} [{st.start}, {st.stop}) needs {need:.0f} B; peer {p} has {by_id[p].memory_bytes} B")
    return out
