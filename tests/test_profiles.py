"""peers/*.toml and the loader in p2ptrain.profiles."""

import numpy as np
import pytest

from p2ptrain.planner import PeerSpec
from p2ptrain.profiles import (
    DEFAULT_MIX,
    QUANTITIES,
    ProfileError,
    draw_pool,
    load_profiles,
    mix_counts,
    parse_profile,
)

REQUIRED = {"phone", "raspberry_pi", "old_laptop", "desktop_cpu", "desktop_gpu"}


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def test_required_classes_exist_with_sourced_numbers(profiles):
    assert REQUIRED <= set(profiles)
    assert set(DEFAULT_MIX) <= set(profiles)
    for prof in profiles.values():
        for key in QUANTITIES:
            assert len(prof.quantities[key].note) > 20, (prof.name, key)
        assert len(prof.availability.note) > 20


def test_classes_are_ordered_as_hardware_is(profiles):
    flops = {k: p.quantities["flops_per_s"].median for k, p in profiles.items()}
    assert flops["desktop_gpu"] > 10 * flops["desktop_cpu"] > 10 * flops["phone"]
    mem = {k: p.quantities["memory_bytes"].median for k, p in profiles.items()}
    assert mem["phone"] < mem["old_laptop"] < mem["desktop_cpu"]


def test_draws_are_seeded_and_within_bounds(profiles):
    prof = profiles["old_laptop"]
    a = prof.draw(500, seed=7)
    assert a == prof.draw(500, seed=7)
    assert a != prof.draw(500, seed=8)
    for key, attr in [("upload_bytes_per_s", "upload_bytes_per_s"), ("latency_s", "latency_s")]:
        q = prof.quantities[key]
        vals = np.array([getattr(s, attr) for s in a])
        assert vals.min() >= q.min and vals.max() <= q.max
    fl = np.array([s.spec.flops_per_s for s in a])
    assert np.median(fl) == pytest.approx(prof.quantities["flops_per_s"].median, rel=0.15)
    for s in a:
        assert isinstance(s.spec, PeerSpec)
        assert s.spec.bandwidth_bytes_per_s == min(s.upload_bytes_per_s, s.download_bytes_per_s)
        assert s.session_s > 0
    assert len({s.spec.peer_id for s in a}) == 500


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_session_draws_match_their_distribution(profiles, name):
    av = profiles[name].availability
    draws = av.draw_s(np.random.default_rng(0), 200_000)
    assert draws.mean() == pytest.approx(av.mean_s(), rel=0.05)


def test_pool_follows_the_mix_and_is_deterministic(profiles):
    pool = draw_pool(64, seed=3, profiles=profiles)
    assert [s.spec for s in pool] == [s.spec for s in draw_pool(64, seed=3, profiles=profiles)]
    counts = mix_counts(64, DEFAULT_MIX)
    assert sum(counts.values()) == 64
    for name, c in counts.items():
        assert sum(s.profile == name for s in pool) == c
    assert len({s.spec.peer_id for s in pool}) == 64


def test_mix_counts_largest_remainder():
    assert mix_counts(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert mix_counts(7, {"x": 0.5, "y": 0.5}) == {"x": 4, "y": 3}


def _valid_doc():
    q = {"median": 2.0, "sigma": 0.1, "min": 1.0, "max": 3.0, "note": "a source for this number"}
    doc = {"name": "t", **{k: dict(q) for k in QUANTITIES}}
    doc["availability"] = {"distribution": "exponential", "mean_s": 10.0, "note": "a source for this"}
    return doc


def test_parse_accepts_valid_and_rejects_bad_documents():
    assert parse_profile(_valid_doc()).name == "t"
    doc = _valid_doc()
    del doc["flops_per_s"]["note"]
    with pytest.raises(ProfileError, match="note"):
        parse_profile(doc)
    doc = _valid_doc()
    doc["memory_bytes"]["min"] = 5.0  # above the median
    with pytest.raises(ProfileError, match="min"):
        parse_profile(doc)
    doc = _valid_doc()
    doc["availability"] = {"distribution": "pareto", "note": "a source for this"}
    with pytest.raises(ProfileError, match="distribution"):
        parse_profile(doc)
    doc = _valid_doc()
    doc["latency_s"]["median"] = "fast"
    with pytest.raises(ProfileError, match="median"):
        parse_profile(doc)
