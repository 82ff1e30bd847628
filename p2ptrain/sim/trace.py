"""Event traces of a simulation, with a running hash that says whether two runs were the same.

A `Trace` takes events `(time_s, kind, *fields)` in the order they happen. Each event is
encoded canonically (msgpack of: time as integer nanoseconds, kind, fields with floats rounded
to 9 decimals, tuples as lists, dicts as sorted key/value pairs) and fed to a running SHA-256,
so `hash()` covers every event ever recorded while memory stays bounded: only the last
`keep_events` events are kept for inspection, and a `sink` (a binary file) may receive the
whole encoded stream. Two runs with byte-identical traces have equal hashes; the hash is the
one number a deterministic simulation prints at the end (DESIGN.md section 6).

Pure: no clock, no trio. The caller passes the (virtual) time of each event.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from typing import Any, BinaryIO

import msgpack

# Rounding for float fields. Far finer than anything a simulation means (a nanosecond, a
# nano-byte), coarse enough to hide the last-bit noise of a different summation order.
FLOAT_DECIMALS = 9

DEFAULT_KEEP_EVENTS = 10_000


class Trace:
    """A bounded, hashed record of simulation events.

    keep_events: how many of the latest events `events()` returns (0 keeps none).
    sink: optional binary file; every event's canonical encoding is written to it, back to
        back (a stream of msgpack arrays: `msgpack.Unpacker(file)` reads it back).
    """

    def __init__(self, *, keep_events: int = DEFAULT_KEEP_EVENTS, sink: BinaryIO | None = None) -> None:
        if keep_events < 0:
            raise ValueError(f"keep_events must be >= 0, got {keep_events}")
        self._hasher = hashlib.sha256()
        self._recent: deque[tuple] = deque(maxlen=keep_events)
        self._sink = sink
        self.count = 0  # events recorded so far

    def record(self, time_s: float, kind: str, *fields: Any) -> None:
        """Append one event. Fields may be None, bool, int, float, str, bytes, and lists,
        tuples or str-keyed dicts of those; anything else is a TypeError."""
        encoded = encode_event(time_s, kind, fields)
        self._hasher.update(encoded)
        if self._sink is not None:
            self._sink.write(encoded)
        self._recent.append((time_s, kind, *fields))
        self.count += 1

    def hash(self) -> str:
        """Hex SHA-256 over the canonical encodings of every event recorded so far."""
        return self._hasher.hexdigest()

    def events(self) -> list[tuple]:
        """The latest events as recorded, `(time_s, kind, *fields)`, oldest first."""
        return list(self._recent)


def encode_event(time_s: float, kind: str, fields: tuple | list) -> bytes:
    """The canonical bytes of one event (what the hash covers)."""
    if not isinstance(kind, str):
        raise TypeError(f"event kind must be a str, got {type(kind).__name__}")
    return msgpack.packb([time_ns(time_s), kind, _canonical(list(fields))], use_bin_type=True)


def time_ns(time_s: float) -> int:
    """Virtual seconds as integer nanoseconds; infinity as -1 (msgpack has no infinite int)."""
    if math.isinf(time_s):
        return -1
    return round(time_s * 1e9)


def _canonical(value: Any) -> Any:
    # bool before int: bool is an int subclass and must keep its own msgpack type.
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return value
    if isinstance(value, float):
        return float(round(value, FLOAT_DECIMALS)) if math.isfinite(value) else float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("trace dict fields need str keys")
        return [[k, _canonical(value[k])] for k in sorted(value)]
    raise TypeError(f"cannot record a {type(value).__name__} in a trace (numpy scalars: convert with int()/float())")
