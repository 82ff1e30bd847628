"""Churn as a seeded, pure schedule of (time, peer, join/kill) events.

A simulation starts with `initial` peers; each stays for a session drawn from a session-length
distribution and then crashes (a kill, not a graceful leave). New peers arrive as a Poisson
process whose rate keeps the expected peer count at `initial` in steady state (Little's law:
rate = initial / mean session), each with its own session. Everything comes from one
`np.random.Generator`, so the same seed gives the same schedule; there is no clock and no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

Distribution = Literal["exponential", "weibull", "profile", "none"]


@dataclass(frozen=True)
class SessionModel:
    """Session lengths in seconds.

    distribution: "exponential" (mean_s), "weibull" (shape, mean_s; the scale follows from
        the mean), "profile" (each peer's own hardware-profile distribution, drawn by the
        caller) or "none" (peers never leave).
    """

    distribution: Distribution = "none"
    mean_s: float = 3600.0
    shape: float = 0.7

    def __post_init__(self) -> None:
        if self.distribution not in ("exponential", "weibull", "profile", "none"):
            raise ValueError(f"unknown session distribution {self.distribution!r}")
        if not (self.mean_s > 0 and self.shape > 0):
            raise ValueError("session mean_s and shape must be positive")

    def draw_s(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`size` session lengths; infinite for "none". Not for "profile" (caller draws)."""
        if self.distribution == "exponential":
            return rng.exponential(self.mean_s, size)
        if self.distribution == "weibull":
            scale_s = self.mean_s / math.gamma(1.0 + 1.0 / self.shape)
            return scale_s * rng.weibull(self.shape, size)
        if self.distribution == "none":
            return np.full(size, math.inf)
        raise ValueError("profile sessions are drawn per peer by the caller")


@dataclass(frozen=True, order=True)
class ChurnEvent:
    """At `time_s`, peer `peer_id` joins or is killed. Ordered by time, then kind ("join"
    sorts before "kill"), then id: a total order, so sorting is deterministic."""

    time_s: float
    kind: Literal["join", "kill"]
    peer_id: str


@dataclass(frozen=True)
class ChurnSchedule:
    """The events up to `horizon_s`, sorted; `arrivals` names the peers that join later
    (index i of `arrivals` is the i-th arriving peer) in arrival order."""

    events: tuple[ChurnEvent, ...]
    arrivals: tuple[str, ...]


def churn_schedule(
    initial_ids: list[str],
    sessions: SessionModel,
    horizon_s: float,
    rng: np.random.Generator,
    *,
    start_s: float = 0.0,
    arrival_id: Callable[[int], str] = lambda i: f"arrival-{i:05d}",
    profile_session_s: Callable[[str, np.random.Generator], float] | None = None,
    max_events: int = 1_000_000,
) -> ChurnSchedule:
    """The churn of one run: initial peers join at `start_s` and are killed when their
    session ends; arrivals come at Poisson rate len(initial_ids) / mean session from
    `start_s` on. With distribution "profile", `profile_session_s(peer_id, rng)` draws each
    peer's session (and the arrival rate uses `sessions.mean_s` as the mean). Events after
    `horizon_s` are left out. Raises ValueError beyond `max_events` (a limit on memory)."""
    events: list[ChurnEvent] = []

    def session_s(peer_id: str) -> float:
        if sessions.distribution == "profile":
            if profile_session_s is None:
                raise ValueError("profile sessions need profile_session_s")
            return float(profile_session_s(peer_id, rng))
        return float(sessions.draw_s(rng, 1)[0])

    def add(peer_id: str, joined_s: float) -> None:
        events.append(ChurnEvent(joined_s, "join", peer_id))
        end_s = joined_s + session_s(peer_id)
        if end_s <= horizon_s:
            events.append(ChurnEvent(end_s, "kill", peer_id))
        if len(events) > max_events:
            raise ValueError(f"churn schedule exceeds {max_events} events")

    for peer_id in initial_ids:
        add(peer_id, start_s)
    arrivals: list[str] = []
    if sessions.distribution != "none" and initial_ids:
        rate_per_s = len(initial_ids) / sessions.mean_s
        t = start_s
        while True:
            t += float(rng.exponential(1.0 / rate_per_s))
            if t > horizon_s:
                break
            peer_id = arrival_id(len(arrivals))
            arrivals.append(peer_id)
            add(peer_id, t)
    return ChurnSchedule(tuple(sorted(events)), tuple(arrivals))


def live_count(events: tuple[ChurnEvent, ...] | list[ChurnEvent], at_s: float) -> int:
    """How many peers are live just after `at_s` according to the schedule."""
    n = 0
    for e in events:
        if e.time_s > at_s:
            break
        n += 1 if e.kind == "join" else -1
    return n
