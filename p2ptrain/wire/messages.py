"""Message kinds of the p2ptrain protocol and their schemas. Pure: no I/O.

Every frame on a link is a `codec.Frame(kind, fields, arrays)`. `validate` checks a received
frame against the schema of its kind: known kind, exactly the required fields with the right
types, and the right number of arrays. Anything else is a `ProtocolError`, which closes only
the link it came from (DESIGN.md section 7).

Conversations:
  peer -> bootstrap:   bandwidth_probe* -> register -> (heartbeat)* -> leave
  anyone -> bootstrap: status_request -> status;  directory_request -> directory
  driver -> bootstrap: job_update (shown by `p2ptrain status`)
  driver -> peer:      load_stage -> stage_ready | job_error;  forward (stage 0), target (last stage);
                       fetch_params -> params;  end_job
  peer -> peer:        forward (stage s to s+1), backward (stage s to s-1),
                       grads (between replicas of one stage)
  peer -> driver:      loss (last stage), backward_done (stage 0), step_done (every stage), job_error
"""

from __future__ import annotations

from .codec import Frame


class ProtocolError(Exception):
    """A frame that is well formed but not a valid message here."""


_NUM = (int, float)

# kind -> (required fields with their accepted types, number of arrays; None = any number)
SCHEMAS: dict[str, tuple[dict[str, type | tuple[type, ...]], int | None]] = {
    "bandwidth_probe": ({}, 1),
    "bandwidth_ack": ({}, 0),
    "register": ({"address": str, "memory_bytes": int, "flops_per_s": _NUM,
                  "bandwidth_bytes_per_s": _NUM, "threads": int}, 0),
    "registered": ({"peer_id": str}, 0),
    "heartbeat": ({}, 0),
    "leave": ({}, 0),
    "status_request": ({}, 0),
    "status": ({"peers": list, "jobs": list}, 0),
    "directory_request": ({}, 0),
    "directory": ({"peers": list}, 0),
    "job_update": ({"job_id": str, "state": str, "epoch": int, "step": int, "steps": int,
                    "stages": list}, 0),
    "error": ({"reason": str}, 0),
    "load_stage": ({"job_id": str, "stage": int, "bundle": dict, "prev": list, "next": list,
                    "replicas": list, "replica": int, "n_params": int, "step": int}, None),
    "stage_ready": ({"job_id": str, "stage": int}, 0),
    "job_error": ({"job_id": str, "reason": str}, 0),
    "forward": ({"job_id": str, "step": int, "mb": int}, 1),
    "target": ({"job_id": str, "step": int, "mb": int}, 1),
    "backward": ({"job_id": str, "step": int, "mb": int}, 1),
    "loss": ({"job_id": str, "step": int, "mb": int, "value": float}, 0),
    "backward_done": ({"job_id": str, "step": int, "mb": int}, 0),
    "step_done": ({"job_id": str, "step": int}, 0),
    # One replica's parameter gradients of its micro-batches `mbs` (ascending), each
    # micro-batch's leaves in turn: len(arrays) = len(mbs) x the stage's param leaves.
    "grads": ({"job_id": str, "step": int, "mbs": list}, None),
    "fetch_params": ({"job_id": str}, 0),
    "params": ({"job_id": str, "stage": int, "n_params": int}, None),
    "end_job": ({"job_id": str}, 0),
}


def validate(frame: Frame) -> Frame:
    """Return `frame` if it is a valid message, else raise ProtocolError saying why."""
    schema = SCHEMAS.get(frame.kind)
    if schema is None:
        raise ProtocolError(f"unknown message type {frame.kind!r}")
    fields, n_arrays = schema
    if set(frame.fields) != set(fields):
        missing = sorted(set(fields) - set(frame.fields))
        extra = sorted(set(frame.fields) - set(fields))
        raise ProtocolError(f"{frame.kind}: missing fields {missing}, unexpected fields {extra}")
    for name, expected in fields.items():
        value = frame.fields[name]
        # bool is an int subclass; a bool where a number belongs is a malformed message.
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ProtocolError(f"{frame.kind}: field {name!r} has type {type(value).__name__}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0 and name != "value":
            raise ProtocolError(f"{frame.kind}: field {name!r} is negative")
    if n_arrays is not None and len(frame.arrays) != n_arrays:
        raise ProtocolError(f"{frame.kind}: expected {n_arrays} arrays, got {len(frame.arrays)}")
    return frame


def message(kind: str, arrays=(), **fields) -> Frame:
    """Build a frame for `kind`, checked against its schema (catches our own bugs early)."""
    return validate(Frame(kind, fields, tuple(arrays)))
