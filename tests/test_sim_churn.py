"""The churn schedule (pure) and scenario parsing."""

import math

import numpy as np
import pytest

from p2ptrain.sim.churn import ChurnEvent, SessionModel, churn_schedule, live_count
from p2ptrain.sim.scenario import ScenarioError, load_scenario, parse_scenario
from pathlib import Path

SCENARIOS = Path(__file__).resolve().parent.parent / "simulations" / "scenarios"


def schedule(seed, model=SessionModel("exponential", 600.0), n=50, horizon_s=36_000.0):
    return churn_schedule([f"p{i:03d}" for i in range(n)], model, horizon_s, np.random.default_rng(seed))


def test_same_seed_same_schedule_and_other_seed_differs():
    assert schedule(1) == schedule(1)
    assert schedule(1) != schedule(2)


def test_events_are_sorted_and_every_kill_follows_its_join():
    s = schedule(3)
    assert list(s.events) == sorted(s.events)
    joined = {}
    for e in s.events:
        if e.kind == "join":
            assert e.peer_id not in joined
            joined[e.peer_id] = e.time_s
        else:
            assert joined[e.peer_id] <= e.time_s


@pytest.mark.parametrize("model", [SessionModel("exponential", 600.0), SessionModel("weibull", 600.0, 0.7)])
def test_arrivals_keep_the_mean_peer_count(model):
    """Poisson arrivals at rate n / mean session hold the live count near n (Little's law)."""
    s = schedule(4, model, n=50, horizon_s=60_000.0)
    counts = [live_count(s.events, t) for t in np.arange(6_000.0, 60_000.0, 500.0)]
    assert abs(np.mean(counts) - 50) < 7
    assert len(s.arrivals) > 50


def test_weibull_sessions_have_the_requested_mean():
    draws = SessionModel("weibull", 1800.0, 0.7).draw_s(np.random.default_rng(0), 200_000)
    assert abs(draws.mean() / 1800.0 - 1) < 0.02


def test_no_churn_means_joins_only():
    s = schedule(5, SessionModel("none"))
    assert [e.kind for e in s.events] == ["join"] * 50 and s.arrivals == ()


def test_event_order_is_total():
    a, b = ChurnEvent(1.0, "kill", "x"), ChurnEvent(1.0, "join", "y")
    assert sorted([a, b]) == [b, a]
    assert live_count([b, a], 1.0) == 0 and math.isfinite(a.time_s)


def test_every_scenario_file_parses():
    names = sorted(p.stem for p in SCENARIOS.glob("*.toml"))
    assert {"steady", "churn_exponential", "churn_weibull", "faults"} <= set(names)
    for path in SCENARIOS.glob("*.toml"):
        sc = load_scenario(path)
        assert sc.name == path.stem and sc.model.batch_size % sc.model.microbatches == 0
    faults = load_scenario(SCENARIOS / "faults.toml").faults
    assert [f.kind for f in faults] == ["kill_stage", "partition_stage", "pause", "slow"]


@pytest.mark.parametrize("bad", [
    {"swarm": {"peers": 0}}, {"model": {"widths": []}}, {"model": {"batch_size": 10, "microbatches": 4}},
    {"churn": {"distribution": "gamma"}}, {"faults": [{"kind": "meteor"}]}, {"hours": -1},
    {"model": {"compute": "abacus"}}, {"swarm": {"max_replicas": 0}}, {"swarm": {"heartbeat_interval_s": 0}},
])
def test_bad_scenarios_are_refused_with_a_clear_error(bad):
    with pytest.raises(ScenarioError):
        parse_scenario(bad)
