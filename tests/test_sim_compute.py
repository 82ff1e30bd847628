"""Modelled compute: a micro-batch through a stage costs the cost model's FLOPs / FLOP/s."""

import pytest

from p2ptrain.planner.costs import LayerCost
from p2ptrain.sim.compute import ComputeModel

COSTS = [LayerCost(100, 10, 3e6), LayerCost(0, 10, 0.0), LayerCost(100, 4, 6e6)]


def test_forward_plus_backward_is_the_stage_cost_per_microbatch():
    m = ComputeModel(COSTS, microbatch_size=8)
    m.set_plan(0, [(0, 2), (2, 3)])
    delay = m.for_peer("p", 1e6)
    assert delay("forward", "job-driver-e0", 0) + delay("backward", "job-driver-e0", 0) == pytest.approx(3e6 * 8 / 1e6)
    assert delay("last", "job-driver-e0", 1) == pytest.approx(6e6 * 8 / 1e6)
    assert delay("update", "job-driver-e0", 1) == delay("grads", "job-driver-e0", 1) == 0.0


def test_each_epoch_keeps_its_own_spans_and_slowdown_applies_per_peer():
    m = ComputeModel(COSTS, microbatch_size=1)
    m.set_plan(0, [(0, 3)])
    m.set_plan(1, [(0, 1), (1, 3)])
    assert m.stage_flops("job-x-e0", 0) == 9e6 and m.stage_flops("job-x-e1", 1) == 6e6
    assert m.stage_flops("job-x-e7", 0) == 0.0   # unknown epoch: no modelled time
    m.slowdown["slow"] = 10.0
    assert m.for_peer("slow", 1e6)("last", "job-x-e0", 0) == pytest.approx(10 * m.for_peer("fast", 1e6)("last", "job-x-e0", 0))
