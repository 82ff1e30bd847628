"""Phi-accrual failure detector (Hayashibara et al. 2004, as in Akka and Cassandra). Pure.

The driver and the peers use one `FailureDetector` each to watch their pipeline neighbours.
It is a state machine fed with events and the time (`now`, seconds, any monotonic origin): no
trio, no clock reads, no randomness, so the same events give the same answers in a test, in
the deterministic simulation and on a real network.

Model. For each peer it keeps the last `window` inter-arrival times of messages from that peer
(any message is evidence of life, not only heartbeats) and models the next inter-arrival time
as normal with

    mean = max(sample mean, heartbeat_interval_s) + acceptable_pause_s
    std  = max(sample std, min_std_s)

Then phi(elapsed) = -log10(P(X > elapsed)), the confidence (in decimal digits) that a message
should already have arrived: phi = 1 means a 10% chance that a live peer is this late,
phi = 8 one in 10^8. Phi only grows while the peer is silent, so "phi > phi_suspect" is
the same as "silent for longer than suspect_after_s(peer)", a threshold that moves with the
link's observed jitter.

Why normal and not exponential (Cassandra's simplification, phi = elapsed / mean * log10 e):
heartbeats are periodic, so inter-arrival times cluster around the period and their spread is
what tells a regular link from a jittery one. The exponential model ignores the spread: with a
0.5 s period it reaches phi = 8 only after 18.4 periods (9.2 s), and after 55 s once the 2.5 s
acceptable pause is added to the mean, on a quiet LAN link as on a congested one. The normal
model suspects a regular link soon after the tolerated pause and gives a jittery one more
room. Its thin tail would make it hair-triggered on very regular links, which is what
`min_std_s` and `acceptable_pause_s` are for.

Why the mean is floored at `heartbeat_interval_s`: a peer promises only one message per
heartbeat interval; data frames, when there are any, come on top. Bursts of data frames (milliseconds apart) or the burst
of queued messages after a stall would otherwise shrink the expected silence and make the
detector suspect a peer that merely went back to sending heartbeats.

States: "alive" -> "suspected" (phi > phi_suspect) -> "dead" (still silent `dead_after_s`
after suspicion began). A heartbeat takes a suspected peer back to alive. "dead" (by timeout
or `link_lost`) and "left" (`left`) are terminal: later events for the peer are ignored until
it is watched again, so a zombie peer cannot flip the state back after the driver acted on it.

Detection time and pauses: a peer that crashes and one that stalls (GC, SIGSTOP, a big frame
ahead of the heartbeat in the TCP queue) look the same until the stall ends. With a 0.5 s
heartbeat, a 2 s stall can leave up to ~2.5 s between arrivals, so a detector that tolerates
it cannot suspect a crash sooner than ~2.5 s after the last heartbeat (2-2.5 s after the
crash), whatever the model. The defaults suspect a crash on a steady link after 3.28 s of
silence (2.8-3.3 s after the crash; later on jittery links) and declare it dead `dead_after_s`
(5 s) later. simulations/detector_bench.py measures detection times and false suspicions.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

ALIVE, SUSPECTED, DEAD, LEFT = "alive", "suspected", "dead", "left"

_LOG10_E = math.log10(math.e)
_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class DetectorConfig:
    """Detector parameters. Times in seconds.

    Tuned with simulations/detector_bench.py. A steady link is suspected after
    max(mean, heartbeat_interval_s) + acceptable_pause_s + 5.61 * min_std_s = 0.5 + 2.5 + 0.28
    = 3.28 s of silence; a jittery one later (5.61 * its measured std instead of 0.28).
    acceptable_pause_s is set by the worst case the benchmark must tolerate: a 2 s stall
    (up to 2.5 s between arrivals with 0.5 s heartbeats) followed by a heartbeat held up to 1 s
    behind a big frame on a loaded link. In 1,000 peer-hour runs of that scenario (a stall
    every 5 min), 2.0 s gave 4.1 false suspicions per 100 peer-hours, 2.25 s 1.4, 2.5 s 0-0.2
    (the target is <= 1). min_std_s = 0.05 rather than 0.1: with the pause already added, a
    steady link keeps 0.8 s of margin over a 2 s stall, and the lower floor detects crashes on steady links 0.3 s sooner; loaded links have a measured std above
    either floor, so it does not change their false-suspicion rate.
    """

    heartbeat_interval_s: float = 0.5
    phi_suspect: float = 8.0           # suspect when phi exceeds this
    dead_after_s: float = 5.0          # declare dead after this much silence while suspected (hard bound)
    min_std_s: float = 0.05            # floor on the inter-arrival std (avoids hair-trigger on very regular links)
    acceptable_pause_s: float = 2.5    # added to the mean: a 2 s stall (GC, SIGSTOP, a big frame ahead in the TCP queue) is tolerated
    window: int = 100                  # inter-arrival samples kept per peer
    max_peers: int = 10_000            # watched peers at most (a limit on everything)

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval_s", "phi_suspect", "min_std_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("dead_after_s", "acceptable_pause_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.window < 1 or self.max_peers < 1:
            raise ValueError("window and max_peers must be >= 1")


def _phi_of_z(z: float) -> float:
    """-log10 of the standard normal upper tail Q(z), finite for every finite z."""
    if z < 30.0:
        q = 0.5 * math.erfc(z / _SQRT2)
        return -math.log10(q) if q > 0.0 else math.inf
    # erfc underflows near z = 38; the asymptotic series is exact to ~1e-10 this far out.
    zz = z * z
    log_q = -0.5 * zz - math.log(z) - _LOG_SQRT_2PI + math.log1p(-1 / zz + 3 / (zz * zz))
    return -log_q * _LOG10_E


def _z_for_phi(phi: float) -> float:
    """The z at which _phi_of_z(z) == phi (bisection: _phi_of_z is increasing)."""
    lo, hi = -40.0, 40.0
    while _phi_of_z(hi) < phi:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _phi_of_z(mid) < phi:
            lo = mid
        else:
            hi = mid
    return hi


class _Peer:
    """What is known about one watched peer."""

    __slots__ = ("last_s", "samples", "total", "total_sq", "since_resync", "ended", "reported")

    def __init__(self, now: float, window: int, reported: str) -> None:
        self.last_s = now                       # arrival time of the latest message
        self.samples: deque[float] = deque(maxlen=window)
        self.total = 0.0                        # running sum and sum of squares of samples
        self.total_sq = 0.0
        self.since_resync = 0
        self.ended: str | None = None           # None, DEAD or LEFT once terminal
        self.reported = reported                # the state the last poll reported

    def add(self, sample: float) -> None:
        if len(self.samples) == self.samples.maxlen:
            old = self.samples[0]
            self.total -= old
            self.total_sq -= old * old
        self.samples.append(sample)
        self.total += sample
        self.total_sq += sample * sample
        # Running sums drift with subtractions; recomputing them once per window keeps the
        # error at one window's worth of rounding while the cost stays O(1) per message.
        self.since_resync += 1
        if self.since_resync >= len(self.samples):
            self.total = math.fsum(self.samples)
            self.total_sq = math.fsum(s * s for s in self.samples)
            self.since_resync = 0


class FailureDetector:
    """Watches peers and says which are alive, suspected, dead or left. Pure; `now` is an input.

    Contracts:
    - `now` must not decrease across calls for the same peer (a smaller `now` is treated as
      no time elapsed).
    - Events (`heartbeat`, `link_lost`, `left`) for a peer that is not watched are ignored:
      messages may still arrive after `unwatch`.
    - `phi` and `state` raise KeyError for a peer that is not watched.
    - Memory is O(window) per watched peer, and at most `max_peers` peers are watched.
    - Iteration (poll) is in peer-id order.
    """

    def __init__(self, config: DetectorConfig = DetectorConfig()) -> None:
        self.config = config
        self._z_suspect = _z_for_phi(config.phi_suspect)
        self._peers: dict[str, _Peer] = {}

    # --- events -----------------------------------------------------------------------------

    def watch(self, peer_id: str, now: float) -> None:
        """Start watching `peer_id`; counts as a first heartbeat at `now`.

        Watching a peer that is already watched and not ended is a heartbeat. Watching one that
        is dead or left starts afresh (a peer that came back), and the next poll reports it
        alive. Raises ValueError when `max_peers` peers are already watched.
        """
        peer = self._peers.get(peer_id)
        if peer is not None and peer.ended is None and self.state(peer_id, now) != DEAD:
            self.heartbeat(peer_id, now)
            return
        if peer is None and len(self._peers) >= self.config.max_peers:
            raise ValueError(f"already watching {self.config.max_peers} peers")
        # A new peer starts as reported alive (nothing to announce); a restarted one keeps
        # what the last poll said so the next poll reports the change back to alive.
        self._peers[peer_id] = _Peer(now, self.config.window, ALIVE if peer is None else peer.reported)

    def unwatch(self, peer_id: str) -> None:
        """Forget `peer_id` entirely (history and unreported transitions). No-op if unknown."""
        self._peers.pop(peer_id, None)

    def heartbeat(self, peer_id: str, now: float) -> None:
        """Any message from the peer at `now`: evidence that it was alive when it sent it.

        Takes a suspected peer back to alive. Ignored for a peer that is unwatched, left, or
        dead (including one whose silence had already made it dead by `now`: that verdict
        stands, so the peer must be watched again to count as alive).
        """
        peer = self._peers.get(peer_id)
        if peer is None or peer.ended is not None:
            return
        if self._timed_state(peer, now) == DEAD:
            peer.ended = DEAD
            return
        if now > peer.last_s:
            peer.add(now - peer.last_s)
            peer.last_s = now
        # A message timestamped before the latest one (now < last_s) carries no new
        # information about the silence and must not add a negative sample.

    def link_lost(self, peer_id: str, now: float) -> None:
        """The connection to the peer broke without an announced leave: dead at once.

        A peer that already left stays "left": its connection closing is expected.
        """
        peer = self._peers.get(peer_id)
        if peer is not None and peer.ended is None:
            peer.ended = DEAD

    def left(self, peer_id: str, now: float) -> None:
        """The peer announced its leave: "left" at once, which is not a failure.

        A peer already dead stays dead (the first terminal verdict wins).
        """
        peer = self._peers.get(peer_id)
        if peer is None or peer.ended is not None:
            return
        peer.ended = DEAD if self._timed_state(peer, now) == DEAD else LEFT

    # --- queries ----------------------------------------------------------------------------

    def phi(self, peer_id: str, now: float) -> float:
        """Suspicion level at `now`: -log10 P(a live peer is silent this long). 0 just after
        a message, growing without bound while the peer is silent; inf once it ended."""
        peer = self._peers[peer_id]
        if peer.ended is not None:
            return math.inf
        mean, std = self._model(peer)
        return _phi_of_z((max(0.0, now - peer.last_s) - mean) / std)

    def suspect_after_s(self, peer_id: str) -> float:
        """Silence after the latest message beyond which the peer is suspected (phi >
        phi_suspect), given its history so far."""
        mean, std = self._model(self._peers[peer_id])
        return mean + self._z_suspect * std

    def state(self, peer_id: str, now: float) -> str:
        """"alive" | "suspected" | "dead" | "left" at `now`. No side effects."""
        peer = self._peers[peer_id]
        return peer.ended if peer.ended is not None else self._timed_state(peer, now)

    def poll(self, now: float) -> list[tuple[str, str]]:
        """(peer_id, new_state) for each watched peer whose state at `now` differs from the
        one the previous poll reported (new peers count as reported alive), sorted by peer id.

        Each transition is reported once. Only the state at `now` is reported: a peer that
        went alive -> suspected -> alive between two polls is not reported, one that went
        alive -> suspected -> dead is reported once, as dead.
        """
        changes = []
        for peer_id in sorted(self._peers):
            peer = self._peers[peer_id]
            current = self.state(peer_id, now)
            if current != peer.reported:
                peer.reported = current
                changes.append((peer_id, current))
        return changes

    def watched(self) -> list[str]:
        """Watched peer ids, sorted."""
        return sorted(self._peers)

    # --- internals ----------------------------------------------------------------------------

    def _model(self, peer: _Peer) -> tuple[float, float]:
        """(mean, std) of the normal model of the next inter-arrival time."""
        cfg = self.config
        n = len(peer.samples)
        if n == 0:
            # No history yet: assume the promised heartbeat period.
            return cfg.heartbeat_interval_s + cfg.acceptable_pause_s, cfg.min_std_s
        mean = peer.total / n
        var = max(0.0, peer.total_sq / n - mean * mean)
        return (max(mean, cfg.heartbeat_interval_s) + cfg.acceptable_pause_s,
                max(math.sqrt(var), cfg.min_std_s))

    def _timed_state(self, peer: _Peer, now: float) -> str:
        """State from silence alone (the peer has not ended)."""
        mean, std = self._model(peer)
        suspect_after = mean + self._z_suspect * std
        silent = now - peer.last_s
        if silent <= suspect_after:
            return ALIVE
        return DEAD if silent >= suspect_after + self.config.dead_after_s else SUSPECTED
