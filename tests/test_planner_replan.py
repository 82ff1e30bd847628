"""replan() and moved_param_bytes (issue 3, item 4)."""

import numpy as np
import pytest

from p2ptrain.planner import (
    Infeasible,
    LayerCost,
    PeerSpec,
    Plan,
    Stage,
    memory_violations,
    moved_param_bytes,
    plan,
    replan,
    step_time,
)

LAYERS = [LayerCost(100, 1, 1.0), LayerCost(200, 1, 1.0), LayerCost(400, 1, 1.0)]


def test_moved_bytes_by_hand():
    old = Plan([Stage(0, 2, ("a", "b")), Stage(2, 3, ("c",))])
    assert moved_param_bytes(old, old, LAYERS) == 0
    # a keeps [0,2); c moves from [2,3) to [1,3): fetches layer 1 (200); new peer d fetches all 700
    new = Plan([Stage(0, 1, ("a",)), Stage(1, 3, ("c", "d"))])
    assert moved_param_bytes(old, new, LAYERS) == 200 + 600
    assert moved_param_bytes(None, new, LAYERS) == 100 + 600 + 600


def pipeline_instance():
    # 6 layers of 1 MB params; every peer holds at most 2 layers' state -> 3 stages.
    layers = [LayerCost(10**6, 1000, 1e8) for _ in range(6)]
    peers = [PeerSpec(f"p{i}", 9 * 10**6, 1e9 * (1 + i % 3), 1e8) for i in range(8)]
    peers.append(PeerSpec("modem", 9 * 10**6, 1e9, 1e3))  # its link would stall any stage
    return layers, peers, dict(in_bytes=1000, batch_size=8, microbatch_size=2)


def test_nothing_changed_means_nothing_moves():
    layers, peers, kw = pipeline_instance()
    p = plan(layers, peers, **kw)
    r = replan(p, layers, peers, **kw)
    assert r.plan.stages == p.stages and r.moved_bytes == 0


def test_unused_peer_leaving_changes_nothing():
    layers, peers, kw = pipeline_instance()
    p = plan(layers, peers, **kw)
    assert p.unused, "instance should leave some peer unused"
    rest = [q for q in peers if q.peer_id != p.unused[0]]
    r = replan(p, layers, rest, **kw)
    assert r.plan.stages == p.stages and r.moved_bytes == 0


def test_lost_stage_is_refilled_without_disturbing_the_others():
    layers = [LayerCost(10**6, 1000, 1e8) for _ in range(6)]
    # three equal pipeline peers and two equal spares; links slow enough that a second
    # replica's all-reduce (2 MB at 1 MB/s) costs more than it saves (0.8 s)
    peers = [PeerSpec(f"p{i}", 9 * 10**6, 1e9, 1e6) for i in range(5)]
    kw = dict(in_bytes=1000, batch_size=8, microbatch_size=2)
    prev = Plan([Stage(0, 2, ("p0",)), Stage(2, 4, ("p1",)), Stage(4, 6, ("p2",))])
    rest = [q for q in peers if q.peer_id != "p1"]
    r = replan(prev, layers, rest, **kw)
    assert [(s.start, s.stop) for s in r.plan.stages] == [(0, 2), (2, 4), (4, 6)]
    assert r.plan.stages[0].peers == ("p0",) and r.plan.stages[2].peers == ("p2",)
    assert r.plan.stages[1].peers in (("p3",), ("p4",))
    assert r.moved_bytes == 2 * 10**6
    assert r.step_time_s <= r.fresh_step_time_s * 1.05


@pytest.mark.parametrize("seed", range(8))
def test_churn_stays_near_fresh_and_never_moves_more(seed):
    rng = np.random.default_rng(seed)
    L, n = 12, 30
    layers = [LayerCost(int(rng.integers(1, 5)) * 10**6, int(rng.integers(1, 50)) * 1000, float(rng.uniform(1e8, 1e9))) for _ in range(L)]
    peers = [
        PeerSpec(f"q{i:02d}", int(rng.uniform(6e6, 3e7)), float(rng.lognormal(np.log(1e10), 1.0)), float(rng.lognormal(np.log(1e7), 1.0)))
        for i in range(n)
    ]
    kw = dict(in_bytes=4000, batch_size=64, microbatch_size=8)
    prev = plan(layers, peers, **kw)
    gone = set(rng.choice([q.peer_id for q in peers], size=3, replace=False))
    rest = [q for q in peers if q.peer_id not in gone]
    fresh = plan(layers, rest, **kw)
    r = replan(prev, layers, rest, **kw)
    assert memory_violations(r.plan, layers, rest, **kw) == []
    assert step_time(r.plan, layers, rest, **kw) == pytest.approx(r.step_time_s)
    assert r.step_time_s <= step_time(fresh, layers, rest, **kw) * 1.05 + 1e-12
    assert r.moved_bytes <= moved_param_bytes(prev, fresh, layers)


def test_joining_peer_is_used_when_it_helps():
    layers = [LayerCost(100, 10, 1e9)]  # compute-bound, tiny all-reduce
    kw = dict(in_bytes=10, batch_size=64, microbatch_size=8)
    one = [PeerSpec("a", 10**9, 1e9, 1e8)]
    prev = plan(layers, one, **kw)
    r = replan(prev, layers, one + [PeerSpec("b", 10**9, 1e9, 1e8)], **kw)
    assert sorted(r.plan.stages[0].peers) == ["a", "b"]
    assert r.moved_bytes == 100  # only the newcomer fetches the layer


def test_replan_raises_when_survivors_cannot_hold_the_model():
    layers, peers, kw = pipeline_instance()
    p = plan(layers, peers, **kw)
    with pytest.raises(Infeasible):
        replan(p, layers, peers[:2], **kw)


def test_replan_rejects_a_plan_for_another_model():
    layers, peers, kw = pipeline_instance()
    with pytest.raises(ValueError):
        replan(Plan([Stage(0, 3, ("p0",))]), layers, peers, **kw)
