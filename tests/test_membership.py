from p2ptrain.core.membership import Membership, PeerRecord


def record(peer_id, now=0.0):
    return PeerRecord(peer_id, "127.0.0.1:1", 10, 1.0, 1.0, 1, last_seen=now)


def states(m, now):
    return {p["peer_id"]: p["state"] for p in m.view(now)}


def test_states_follow_heartbeats_leaves_and_losses():
    m = Membership(suspect_after_s=3, dead_after_s=10, forget_after_s=100)
    for peer in ("b", "a", "c", "d"):
        m.register(record(peer))
    m.heartbeat("a", 5.0)
    m.leave("c", 1.0)
    m.connection_lost("d", 2.0)
    assert states(m, 6.0) == {"a": "alive", "b": "suspected", "c": "left", "d": "dead"}
    assert [p["peer_id"] for p in m.view(6.0)] == ["a", "b", "c", "d"]   # sorted by id
    assert states(m, 12.0)["b"] == "dead"
    assert [p["peer_id"] for p in m.alive(6.0)] == ["a"]
    m.heartbeat("c", 7.0)   # a heartbeat after the leave does not revive it
    assert states(m, 7.0)["c"] == "left"
    assert "c" not in states(m, 200.0)   # forgotten eventually


def test_reregistering_revives_and_the_swarm_has_a_size_limit():
    m = Membership(max_peers=1)
    m.register(record("a"))
    m.connection_lost("a", 1.0)
    m.register(record("a", now=2.0))
    assert states(m, 2.0) == {"a": "alive"}
    try:
        m.register(record("b"))
    except ValueError as exc:
        assert "full" in str(exc)
    else:
        raise AssertionError("a second peer was accepted")
