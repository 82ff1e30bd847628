"""The bootstrap's view of the swarm: who registered, who is alive. Pure: time is an input.

A peer is "alive" while its heartbeats keep coming, "suspected" once it has been silent for
`suspect_after_s`, "dead" once silent for `dead_after_s` or when its connection was lost
without a leave, and "left" when it announced its leave. Dead and left peers stay listed for
`forget_after_s` so that `p2ptrain status` can show what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

ALIVE, SUSPECTED, DEAD, LEFT = "alive", "suspected", "dead", "left"


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    address: str
    memory_bytes: int
    flops_per_s: float
    bandwidth_bytes_per_s: float
    threads: int
    last_seen: float
    ended: str | None = None   # None, DEAD (connection lost) or LEFT (announced)


@dataclass
class Membership:
    suspect_after_s: float = 3.0
    dead_after_s: float = 10.0
    forget_after_s: float = 300.0
    max_peers: int = 10_000
    _records: dict[str, PeerRecord] = field(default_factory=dict)

    def register(self, record: PeerRecord) -> None:
        """Add or refresh a peer (re-registering after a reconnect revives it)."""
        if record.peer_id not in self._records and len(self._records) >= self.max_peers:
            raise ValueError(f"the swarm is full ({self.max_peers} peers)")
        self._records[record.peer_id] = record

    def heartbeat(self, peer_id: str, now: float) -> None:
        record = self._records.get(peer_id)
        if record is not None and record.ended is None:
            self._records[peer_id] = replace(record, last_seen=now)

    def leave(self, peer_id: str, now: float) -> None:
        self._end(peer_id, LEFT, now)

    def connection_lost(self, peer_id: str, now: float) -> None:
        self._end(peer_id, DEAD, now)

    def _end(self, peer_id: str, how: str, now: float) -> None:
        record = self._records.get(peer_id)
        if record is not None and record.ended is None:
            self._records[peer_id] = replace(record, ended=how, last_seen=now)

    def state(self, record: PeerRecord, now: float) -> str:
        if record.ended is not None:
            return record.ended
        silent_s = now - record.last_seen
        if silent_s >= self.dead_after_s:
            return DEAD
        return SUSPECTED if silent_s >= self.suspect_after_s else ALIVE

    def view(self, now: float) -> list[dict]:
        """All remembered peers sorted by id, each as the dict `p2ptrain status --json` prints.
        Forgets peers that ended long ago."""
        for peer_id in [p for p, r in self._records.items()
                        if self.state(r, now) in (DEAD, LEFT) and now - r.last_seen > self.forget_after_s]:
            del self._records[peer_id]
        return [
            {"peer_id": r.peer_id, "address": r.address, "memory_bytes": r.memory_bytes,
             "flops_per_s": r.flops_per_s, "bandwidth_bytes_per_s": r.bandwidth_bytes_per_s,
             "threads": r.threads, "state": self.state(r, now)}
            for r in sorted(self._records.values(), key=lambda r: r.peer_id)
        ]

    def alive(self, now: float) -> list[dict]:
        return [p for p in self.view(now) if p["state"] == ALIVE]
