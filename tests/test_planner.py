"""plan(): contract behaviour on hand-made instances (issue 3, item 1)."""

import random

import pytest

from p2ptrain.planner import (
    Infeasible,
    LayerCost,
    PeerSpec,
    Plan,
    Stage,
    memory_violations,
    plan,
    step_time,
)
from p2ptrain.planner.baselines import BASELINES

GB = 10**9


def uniform_layers(n, param_bytes=1000, out_bytes=10, flops=1e6):
    return [LayerCost(param_bytes, out_bytes, flops) for _ in range(n)]


def test_exports_the_contract():
    import p2ptrain.planner as planner

    for name in ("LayerCost", "PeerSpec", "Stage", "Plan", "Infeasible", "plan", "step_time", "replan"):
        assert name in planner.__all__


def test_stages_are_contiguous_cover_all_layers_and_fit_memory():
    layers = uniform_layers(10, param_bytes=10_000)
    peers = [PeerSpec(f"p{i}", 90_000 + 5_000 * i, 1e9 * (1 + i % 3), 1e8) for i in range(7)]
    kw = dict(in_bytes=10, batch_size=16, microbatch_size=4)
    p = plan(layers, peers, **kw)
    assert p.stages[0].start == 0 and p.stages[-1].stop == 10
    assert all(a.stop == b.start for a, b in zip(p.stages, p.stages[1:]))
    assert len(p.stages) > 1  # 10 layers x 40 kB of state cannot sit on one peer
    assert memory_violations(p, layers, peers, **kw) == []
    used = [x for st in p.stages for x in st.peers]
    assert len(used) == len(set(used))
    assert sorted(used + list(p.unused)) == sorted(q.peer_id for q in peers)


def test_replicas_share_a_stage_when_that_is_faster():
    # One layer, compute-bound, tiny parameters: every peer should serve it.
    layers = [LayerCost(param_bytes=100, out_bytes=10, flops=1e9)]
    peers = [PeerSpec(f"p{i}", GB, 1e9, 1e8) for i in range(4)]
    kw = dict(in_bytes=10, batch_size=64, microbatch_size=8)
    p = plan(layers, peers, **kw)
    assert len(p.stages) == 1 and len(p.stages[0].peers) == 4
    # 64 samples over 4 peers at 1 s each = 16 s, plus a 1.5 * 100 B / 1e8 B/s all-reduce
    assert step_time(p, layers, peers, **kw) == pytest.approx(16.0 + 1.5e-6)


def test_slow_link_peer_is_left_unused_when_it_would_slow_the_swarm():
    # Big parameters, cheap compute: a second replica halves compute but its all-reduce over
    # a slow link costs far more.
    layers = [LayerCost(param_bytes=10**8, out_bytes=10, flops=1e6)]
    peers = [PeerSpec("fast", GB, 1e9, 1e9), PeerSpec("slowlink", GB, 1e9, 1e5)]
    kw = dict(in_bytes=10, batch_size=8, microbatch_size=8)
    p = plan(layers, peers, **kw)
    assert p.stages == [Stage(0, 1, ("fast",))]
    assert p.unused == ("slowlink",)


def test_stage_peers_fastest_first_then_by_id():
    layers = [LayerCost(param_bytes=10, out_bytes=10, flops=1e9)]
    peers = [PeerSpec(i, GB, f, 1e9) for i, f in [("d", 1e9), ("b", 2e9), ("a", 1e9), ("c", 2e9)]]
    p = plan(layers, peers, in_bytes=10, batch_size=64, microbatch_size=8)
    assert p.stages[0].peers == ("b", "c", "a", "d")


def test_result_does_not_depend_on_peer_order():
    layers = [LayerCost(1000 * (1 + i % 3), 50 + 10 * i, 1e6 * (1 + i)) for i in range(9)]
    peers = [PeerSpec(f"p{i:02d}", 30_000 + 5_000 * (i % 5), 1e8 * (1 + i % 4), 1e5 * (1 + i % 3)) for i in range(20)]
    kw = dict(in_bytes=40, batch_size=32, microbatch_size=4)
    first = plan(layers, peers, **kw)
    shuffled = list(peers)
    random.Random(5).shuffle(shuffled)
    assert plan(layers, shuffled, **kw) == first


def test_infeasible_names_the_largest_layer_and_peer():
    layers = [LayerCost(300_000_000, 10, 1.0), LayerCost(10, 10, 1.0)]  # 1.2 GB of state
    peers = [PeerSpec("a", 800_000_000, 1e9, 1e8), PeerSpec("b", 500_000_000, 1e9, 1e8)]
    with pytest.raises(Infeasible, match=r"layer 0 needs 1\.2 GB.*largest peer offers 0\.8 GB"):
        plan(layers, peers, in_bytes=10, batch_size=4, microbatch_size=1)


def test_infeasible_when_total_memory_is_short():
    layers = uniform_layers(6, param_bytes=1000)  # 24 kB of state, each layer 4 kB
    peers = [PeerSpec(f"p{i}", 5_000, 1e9, 1e8) for i in range(3)]  # room for 3 layers
    with pytest.raises(Infeasible, match="in total"):
        plan(layers, peers, in_bytes=10, batch_size=4, microbatch_size=4)


def test_infeasible_without_peers():
    with pytest.raises(Infeasible, match="no peers"):
        plan(uniform_layers(2), [], in_bytes=1, batch_size=1, microbatch_size=1)


def test_pipeline_depth_counts_against_activation_memory():
    # Each layer alone fits a peer only at the last position (1 micro-batch in flight); a
    # 2-stage pipeline puts 2 micro-batches on stage 0, which then does not fit. With
    # batch / microbatch = 1 only one is ever in flight and the 2-stage plan fits.
    layers = [LayerCost(0, 1000, 1.0), LayerCost(0, 1000, 1.0)]
    peers = [PeerSpec("a", 2_100, 1e9, 1e9), PeerSpec("b", 2_100, 1e9, 1e9)]
    with pytest.raises(Infeasible):
        plan(layers, peers, in_bytes=1000, batch_size=2, microbatch_size=1)
    p = plan(layers, peers, in_bytes=1000, batch_size=1, microbatch_size=1)
    assert len(p.stages) == 2


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_are_feasible_and_never_beat_the_planner_here(name):
    layers = [LayerCost(2000 + 100 * i, 40, 1e7 * (1 + i % 4)) for i in range(12)]
    peers = [PeerSpec(f"p{i:02d}", 40_000 + 10_000 * (i % 4), 1e9 * (1 + i % 5), 1e6 * (1 + i % 3)) for i in range(16)]
    kw = dict(in_bytes=40, batch_size=32, microbatch_size=4)
    b = BASELINES[name](layers, peers, **kw)
    assert b is not None
    assert memory_violations(b, layers, peers, **kw) == []
    assert step_time(plan(layers, peers, **kw), layers, peers, **kw) <= step_time(b, layers, peers, **kw)


def test_plan_is_a_plain_value():
    p = plan(uniform_layers(2), [PeerSpec("a", GB, 1e9, 1e9)], in_bytes=1, batch_size=1, microbatch_size=1)
    assert isinstance(p, Plan) and p.stages == [Stage(0, 2, ("a",))]


@pytest.mark.parametrize("seed", range(5))
def test_cap_replicas_trims_each_stage_and_recuts_without_breaking_memory(seed):
    from p2ptrain.planner import cap_replicas

    rng = random.Random(seed)
    layers = [LayerCost(rng.randint(1_000, 20_000), rng.randint(10, 200), rng.uniform(1e6, 1e8))
              for _ in range(8)]
    peers = [PeerSpec(f"p{i:02d}", rng.randint(60_000, 200_000), rng.uniform(1e8, 2e9), rng.uniform(1e7, 1e9))
             for i in range(24)]
    kw = dict(in_bytes=40, batch_size=64, microbatch_size=8)
    full = plan(layers, peers, **kw)
    assert max(len(s.peers) for s in full.stages) > 2   # this pool is worth replicating
    for cap in (1, 2):
        capped = cap_replicas(full, layers, peers, max_replicas=cap, **kw)
        assert all(len(s.peers) <= cap for s in capped.stages)
        assert [s.peers for s in capped.stages] == [s.peers[:cap] for s in full.stages]
        assert memory_violations(capped, layers, peers, **kw) == []
        used = [p for s in capped.stages for p in s.peers]
        assert sorted(used + list(capped.unused)) == sorted(p.peer_id for p in peers)
        trimmed_only = Plan([Stage(s.start, s.stop, s.peers[:cap]) for s in full.stages])
        assert step_time(capped, layers, peers, **kw) <= step_time(trimmed_only, layers, peers, **kw) + 1e-12
    assert cap_replicas(full, layers, peers, max_replicas=64, **kw) is full
    with pytest.raises(ValueError):
        cap_replicas(full, layers, peers, max_replicas=0, **kw)


def test_shortlist_keeps_the_top_peers_by_speed_link_and_memory_and_the_previous_plan():
    from p2ptrain.planner import shortlist

    peers = [PeerSpec(f"p{i:02d}", 1000 + (i * 7) % 20, 1e9 + (i * 11) % 20, 1e6 + (i * 13) % 20) for i in range(20)]
    previous = Plan([Stage(0, 1, ("p00",))])
    short = shortlist(peers, previous, max_peers=2)
    top = {key: sorted(peers, key=lambda p: (-key(p), p.peer_id))[:2]
           for key in (lambda p: p.flops_per_s, lambda p: p.bandwidth_bytes_per_s, lambda p: p.memory_bytes)}
    expected = {"p00"} | {p.peer_id for ranked in top.values() for p in ranked}
    assert {p.peer_id for p in short} == expected and len(short) < len(peers)
    assert shortlist(peers, None, max_peers=20) == peers
