"""Message kinds of the parameter-server protocol and their schemas. Pure: no I/O.

Kept apart from `wire.messages` (the pipeline protocol): a parameter-server link carries only
these kinds, and `validate` refuses everything else, so a pipeline frame arriving on a
parameter-server link (or the reverse) is a protocol error that closes that link.

Conversation on one server -> worker link (one job per link):
  server -> worker: ps_load (the gradient program) -> worker: ps_ready | ps_error
  then per step:    ps_step (params, x shard, y shard) -> worker: ps_grads (loss, grads) | ps_error
  finally:          ps_end (the worker closes the link)
"""

from __future__ import annotations

from ..wire.codec import Frame


class ProtocolError(Exception):
    """A frame that is well formed but not a valid parameter-server message."""


# kind -> (required fields with their accepted types, number of arrays; None = any number)
SCHEMAS: dict[str, tuple[dict[str, type | tuple[type, ...]], int | None]] = {
    # program: a serialized jax.export program (params leaves, x, y) -> (loss, grads leaves)
    "ps_load": ({"job_id": str, "worker": int, "workers": int, "n_params": int, "program": bytes}, 0),
    "ps_ready": ({"job_id": str}, 0),
    # arrays: n_params param leaves, then the worker's x shard, then its y shard
    "ps_step": ({"job_id": str, "step": int}, None),
    # arrays: n_params gradient leaves (of the shard's mean loss)
    "ps_grads": ({"job_id": str, "step": int, "loss": float}, None),
    "ps_error": ({"job_id": str, "reason": str}, 0),
    "ps_end": ({"job_id": str}, 0),
}


def validate(frame: Frame) -> Frame:
    """Return `frame` if it is a valid parameter-server message, else raise ProtocolError."""
    schema = SCHEMAS.get(frame.kind)
    if schema is None:
        raise ProtocolError(f"unknown parameter-server message type {frame.kind!r}")
    fields, n_arrays = schema
    if set(frame.fields) != set(fields):
        missing = sorted(set(fields) - set(frame.fields))
        extra = sorted(set(frame.fields) - set(fields))
        raise ProtocolError(f"{frame.kind}: missing fields {missing}, unexpected fields {extra}")
    for name, expected in fields.items():
        value = frame.fields[name]
        # bool is an int subclass; a bool where a number belongs is a malformed message.
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ProtocolError(f"{frame.kind}: field {name!r} has type {type(value).__name__}")
        if isinstance(value, int) and value < 0:
            raise ProtocolError(f"{frame.kind}: field {name!r} is negative")
    if n_arrays is not None and len(frame.arrays) != n_arrays:
        raise ProtocolError(f"{frame.kind}: expected {n_arrays} arrays, got {len(frame.arrays)}")
    if frame.kind == "ps_load" and not 0 <= frame.fields["worker"] < frame.fields["workers"]:
        raise ProtocolError(f"ps_load: worker {frame.fields['worker']} not in [0, {frame.fields['workers']})")
    return frame


def message(kind: str, arrays=(), **fields) -> Frame:
    """Build a frame for `kind`, checked against its schema (catches our own bugs early)."""
    return validate(Frame(kind, fields, tuple(arrays)))
