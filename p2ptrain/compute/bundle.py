"""``StageBundle``: what travels to a peer for one stage, as plain values.

``to_wire()`` gives a dict of str/bytes/int/bool/dict values only (msgpack-able with
``use_bin_type=True``); ``from_wire()`` accepts exactly that shape back and raises
``ProgramRejected`` on anything else. Program *contents* are checked later, by
``StageRunner.load`` (limits.check_program), before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2ptrain.compute.limits import ProgramRejected
from p2ptrain.compute.programs import required_programs

__all__ = ["StageBundle", "WIRE_FORMAT", "MAX_MICROBATCHES"]

WIRE_FORMAT = "p2ptrain.stage/1"
# Micro-batch indices are kept per step on the peer; bound them like everything else.
MAX_MICROBATCHES = 65_536

_WIRE_KEYS = frozenset({"format", "programs", "is_last", "keep_residuals", "microbatches"})


@dataclass(frozen=True)
class StageBundle:
    """Everything a peer needs to run one stage, except the arrays (params, opt state).

    programs: serialized jax.export programs by name: {"forward", "backward", "update",
        "init_opt"} for a non-last stage, {"last", "update", "init_opt"} for the last one
        (signatures in p2ptrain.compute.programs).
    is_last: the stage computes the loss (and then also takes targets).
    keep_residuals: forward returns the vjp residuals and backward consumes them (faster,
        more memory); otherwise forward keeps only x and backward recomputes.
    microbatches: M, baked into the last stage's 1/M gradient seed; also the number of
        micro-batch gradients ``apply_update`` expects per step.
    """

    programs: dict[str, bytes]
    is_last: bool
    keep_residuals: bool
    microbatches: int

    def to_wire(self) -> dict:
        return {
            "format": WIRE_FORMAT,
            "programs": {k: bytes(v) for k, v in sorted(self.programs.items())},
            "is_last": bool(self.is_last),
            "keep_residuals": bool(self.keep_residuals),
            "microbatches": int(self.microbatches),
        }

    @classmethod
    def from_wire(cls, d: Any) -> "StageBundle":
        """Rebuild from ``to_wire()``'s dict; strict about keys and types."""
        if not isinstance(d, dict):
            raise ProgramRejected(f"stage bundle: expected a dict, got {type(d).__name__}")
        keys = set(d.keys())
        if keys != _WIRE_KEYS:
            raise ProgramRejected(
                f"stage bundle: keys {sorted(map(str, keys))} != expected {sorted(_WIRE_KEYS)}"
            )
        if d["format"] != WIRE_FORMAT:
            raise ProgramRejected(f"stage bundle: unknown format {d['format']!r:.60}")
        for k in ("is_last", "keep_residuals"):
            if type(d[k]) is not bool:
                raise ProgramRejected(f"stage bundle: {k} must be a bool")
        m = d["microbatches"]
        if type(m) is not int or not (1 <= m <= MAX_MICROBATCHES):
            raise ProgramRejected(
                f"stage bundle: microbatches must be an int in [1, {MAX_MICROBATCHES}]"
            )
        programs = d["programs"]
        if not isinstance(programs, dict):
            raise ProgramRejected("stage bundle: programs must be a dict")
        expected = required_programs(d["is_last"])
        names = set(programs.keys())
        if names != expected:
            raise ProgramRejected(
                f"stage bundle: programs {sorted(map(str, names))} != expected "
                f"{sorted(expected)} for is_last={d['is_last']}"
            )
        clean: dict[str, bytes] = {}
        for name, blob in programs.items():
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                raise ProgramRejected(f"stage bundle: program {name!r} is not bytes")
            clean[name] = bytes(blob)
        return cls(
            programs=clean,
            is_last=d["is_last"],
            keep_residuals=d["keep_residuals"],
            microbatches=m,
        )
