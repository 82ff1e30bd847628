"""The cost model of DESIGN.md section 5 on hand-computed cases, and the planner's
vectorised tables against the literal formula."""

import math

import numpy as np
import pytest

from p2ptrain.planner import LayerCost, PeerSpec, Plan, Stage, memory_violations, stage_memory_bytes, step_time
from p2ptrain.planner.partition import group_time_matrix
from p2ptrain.planner.tables import Problem

LAYERS = [LayerCost(100, 10, 1000.0), LayerCost(200, 20, 3000.0), LayerCost(50, 5, 500.0)]
PEERS = [
    PeerSpec("A", 10_000, 1000.0, 100.0),
    PeerSpec("B", 10_000, 500.0, 50.0),
    PeerSpec("C", 10_000, 100.0, 5.0),
]
KW = dict(in_bytes=8, batch_size=6, microbatch_size=2)


def test_two_stage_time_by_hand():
    # stage 0 [0,2) on A,B: flops 4000, traffic 8 + 2*20 = 48
    #   t(A) = max(4000/1000, 48/100) = 4; t(B) = max(8, 0.96) = 8; X = 3/8 -> 6 / X = 16
    #   sync = 2 * 1/2 * 300 / min(100, 50) = 6 -> 22
    # stage 1 [2,3) on C: flops 500, traffic 2*20 = 40; t(C) = max(5, 40/5 = 8) = 8 -> 48
    p = Plan([Stage(0, 2, ("A", "B")), Stage(2, 3, ("C",))])
    assert step_time(p, LAYERS, PEERS, **KW) == pytest.approx(48.0)
    p = Plan([Stage(0, 2, ("C",)), Stage(2, 3, ("A", "B"))])
    # stage 0 on C: t = max(40, 48/5) = 40 -> 240; stage 1 on A,B: t(A)=max(.5,.4), t(B)=max(1,.8)
    # X = 2 + 1 = 3 -> 2; sync = 1 * 50 / 50 = 1 -> 3
    assert step_time(p, LAYERS, PEERS, **KW) == pytest.approx(240.0)


def test_single_stage_all_replicas_by_hand():
    # flops 4500, traffic = in_bytes only = 8: t = 4.5, 9, 45 -> X = 16/45 -> 6 / X = 16.875
    # sync = 2 * 2/3 * 350 / 5 = 93.333...
    p = Plan([Stage(0, 3, ("A", "B", "C"))])
    assert step_time(p, LAYERS, PEERS, **KW) == pytest.approx(16.875 + 280.0 / 3)


def test_memory_by_hand():
    kw = dict(in_bytes=8, batch_size=8, microbatch_size=2)  # 4 micro-batches per step
    # S=2, stage 0 [0,2): 4*300 + min(2, 4) * 2 * (8 + 30) = 1352
    assert stage_memory_bytes(LAYERS, 0, 2, 0, 2, **kw) == pytest.approx(1352)
    # stage 1 [2,3): 4*50 + min(1, 4) * 2 * (20 + 5) = 250
    assert stage_memory_bytes(LAYERS, 2, 3, 1, 2, **kw) == pytest.approx(250)
    # batch 4 / micro 2 caps in-flight at 2 although S - s = 3: 400 + 2 * 2 * (8 + 10) = 472
    assert stage_memory_bytes(LAYERS, 0, 1, 0, 3, in_bytes=8, batch_size=4, microbatch_size=2) == pytest.approx(472)
    assert stage_memory_bytes(LAYERS, 0, 1, 0, 3, in_bytes=8, batch_size=4, microbatch_size=2, state_factor=1.0) == pytest.approx(172)


def test_memory_violations_names_the_replica():
    small = [PeerSpec("A", 1000, 1.0, 1.0), PeerSpec("B", 300, 1.0, 1.0)]
    p = Plan([Stage(0, 2, ("A",)), Stage(2, 3, ("B",))])
    kw = dict(in_bytes=8, batch_size=8, microbatch_size=2)
    out = memory_violations(p, LAYERS, small, **kw)
    assert len(out) == 1 and "stage 0" in out[0] and "A" in out[0]


@pytest.mark.parametrize(
    "bad",
    [
        Plan([Stage(0, 2, ("A",))]),  # does not cover layer 2
        Plan([Stage(0, 2, ("A",)), Stage(1, 3, ("B",))]),  # overlap
        Plan([Stage(0, 2, ("A",)), Stage(2, 3, ("A",))]),  # peer twice
        Plan([Stage(0, 2, ("A",)), Stage(2, 3, ())]),  # empty stage
        Plan([Stage(0, 3, ("Z",))]),  # unknown peer
    ],
)
def test_malformed_plans_are_rejected(bad):
    with pytest.raises(ValueError):
        step_time(bad, LAYERS, PEERS, **KW)


def test_vectorised_tables_agree_with_formula():
    rng = np.random.default_rng(1)
    layers = [LayerCost(int(rng.integers(0, 1000)), int(rng.integers(1, 100)), float(rng.uniform(0, 1e4))) for _ in range(6)]
    peers = [PeerSpec(f"p{i}", 10**9, float(rng.uniform(1e2, 1e4)), float(rng.uniform(1, 1e3))) for i in range(5)]
    kw = dict(in_bytes=17, batch_size=12, microbatch_size=3)
    prob = Problem(layers, peers, **kw)
    members = np.array([0, 2, 3])
    ids = tuple(prob.peer_ids[i] for i in members)
    for s, S in [(0, 1), (0, 3), (1, 3), (2, 3)]:
        times = group_time_matrix(prob, members, s, S)
        for a in range(6):
            for b in range(a + 1, 7):
                stages = ([Stage(0, a, ("x",))] if a else []) + [Stage(a, b, ids)] + ([Stage(b, 6, ("y",))] if b < 6 else [])
                ref = Plan(stages)
                extra = [PeerSpec("x", 1, 1e30, 1e30), PeerSpec("y", 1, 1e30, 1e30)]
                want = step_time(ref, layers, peers + extra, **kw)
                assert times[a, b] == pytest.approx(want, rel=1e-9)
                assert prob.memory(a, b, s, S) == pytest.approx(stage_memory_bytes(layers, a, b, s, S, **kw))
