"""Frame codec: one message (kind, header fields, arrays) <-> bytes on a link. Pure.

Wire layout of one frame (all integers little-endian):

    u64 body_length                      -- checked against max_frame_bytes before reading
    body:
      u32 header_length
      header: msgpack map {"k": kind, "f": fields, "a": [[dtype, shape], ...]}
      array bytes: each array's raw C-contiguous little-endian bytes, back to back, in order

The body length must be exactly 4 + header_length + sum of the arrays' byte sizes, so a
frame has one valid reading and nothing can hide after the arrays. Arrays are not padded,
so a decoded array may be unaligned; numpy handles that, and anything that needs aligned
memory (e.g. a device transfer) copies anyway.

Only stdlib, numpy and msgpack: no I/O, no clock. `node.link.Link` moves frames over streams.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

DEFAULT_MAX_FRAME_BYTES = 256 * 2**20

# Element types a frame may carry, as numpy names; on the wire always little-endian.
# bfloat16 is left out: numpy has no such dtype without ml_dtypes, and this module stays
# numpy-only (send bfloat16 as its uint16 bit pattern, or as float32).
ALLOWED_DTYPES = ("float32", "float16", "float64", "int32", "int64", "uint8", "bool")
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES}
# dtype -> wire name for either byte order (a dict lookup: dtype.name costs microseconds).
_NAME_OF_DTYPE = {
    np.dtype(name).newbyteorder(order): name for name in ALLOWED_DTYPES for order in "<>"
}

PREFIX_BYTES = 8
_PREFIX = struct.Struct("<Q")
_HEADER_LENGTH = struct.Struct("<I")

# Limits on what a header may describe; each is far above any real use.
MAX_KIND_CHARS = 64
MAX_ARRAYS = 1024
MAX_NDIM = 32

# Frames smaller than this are sent as one bytes object: two send_all calls per small frame
# halved 64 KiB throughput over TLS (DESIGN.md section 7). Above it, arrays go out as
# zero-copy memoryviews because copying MiBs costs more than the extra call.
SMALL_FRAME_BYTES = 256 * 2**10


class FrameError(Exception):
    """A frame that is malformed or over the size cap; the message says what is wrong.

    A link that produced one is out of sync or misbehaving and must be closed.
    """


@dataclass(frozen=True, eq=False)
class Frame:
    """One message on a link.

    kind: message type, e.g. "forward" (non-empty, at most MAX_KIND_CHARS characters).
    fields: msgpack-able header fields with str keys. After a round trip, tuples come back
        as lists and numpy scalars are not allowed (convert with int()/float()).
    arrays: numpy arrays with a dtype in ALLOWED_DTYPES. Decoded arrays are zero-copy views
        into the received body (read-only if the body was immutable bytes).

    Compared by identity (eq=False): element-wise array equality has no single truth value.
    """

    kind: str
    fields: dict = field(default_factory=dict)
    arrays: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.arrays, tuple):
            object.__setattr__(self, "arrays", tuple(self.arrays))


def encode_frame(frame: Frame, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> list[bytes | memoryview]:
    """The buffers to send, in order, for `frame` (length prefix included).

    A frame under SMALL_FRAME_BYTES is one bytes object. In a larger one, each array of at
    least SMALL_FRAME_BYTES is a memoryview of the array's own memory (no copy: do not
    modify the arrays until the buffers are sent) and the pieces between them are joined.
    Raises FrameError if the frame is invalid or its body exceeds `max_frame_bytes`.
    """
    kind = frame.kind
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
        raise FrameError(f"frame kind must be a str of 1..{MAX_KIND_CHARS} characters, got {kind!r:.80}")
    if not isinstance(frame.fields, dict) or not all(isinstance(k, str) for k in frame.fields):
        raise FrameError(f"fields of a {kind!r} frame must be a dict with str keys")
    if len(frame.arrays) > MAX_ARRAYS:
        raise FrameError(f"a {kind!r} frame has {len(frame.arrays)} arrays, more than {MAX_ARRAYS}")

    arrays = []
    descriptors = []
    for i, array in enumerate(frame.arrays):
        array = np.asarray(array)
        name = _NAME_OF_DTYPE.get(array.dtype)
        if name is None:
            raise FrameError(f"array {i} of a {kind!r} frame has dtype {array.dtype}, not one of {ALLOWED_DTYPES}")
        if array.ndim > MAX_NDIM:
            raise FrameError(f"array {i} of a {kind!r} frame has {array.ndim} dimensions, more than {MAX_NDIM}")
        # No copy when the array is already little-endian and C-contiguous (the usual case).
        # (np.ascontiguousarray would turn a 0-d array into 1-d.)
        array = np.asarray(array, dtype=_WIRE_DTYPES[name], order="C")
        arrays.append(array)
        descriptors.append([name, list(array.shape)])

    try:
        header = msgpack.packb({"k": kind, "f": frame.fields, "a": descriptors}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"fields of a {kind!r} frame are not msgpack-able: {exc}") from None

    body_length = _HEADER_LENGTH.size + len(header) + sum(a.nbytes for a in arrays)
    if body_length > max_frame_bytes:
        raise FrameError(f"a {kind!r} frame of {body_length} bytes exceeds the cap of {max_frame_bytes} bytes")

    head = _PREFIX.pack(body_length) + _HEADER_LENGTH.pack(len(header)) + header
    if body_length < SMALL_FRAME_BYTES:
        return [b"".join([head, *(a.data for a in arrays)])]
    # Large arrays go out as views; runs of small pieces are joined so that each send_all
    # call carries a worthwhile amount of data.
    buffers: list[bytes | memoryview] = []
    pending: list[bytes | memoryview] = [head]
    for a in arrays:
        if a.nbytes < SMALL_FRAME_BYTES:
            pending.append(a.data)
            continue
        buffers.append(b"".join(pending))
        pending = []
        # reshape(-1) of a C-contiguous array is a view; uint8 makes the memoryview flat bytes.
        buffers.append(memoryview(a.reshape(-1).view(np.uint8)))
    if pending:
        buffers.append(b"".join(pending))
    return buffers


def read_length_prefix(prefix8: bytes | bytearray | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> int:
    """The body length announced by an 8-byte prefix.

    Raises FrameError if it is too short to hold a header or over `max_frame_bytes`, so the
    caller never allocates for a frame it will refuse.
    """
    if len(prefix8) != PREFIX_BYTES:
        raise FrameError(f"length prefix must be {PREFIX_BYTES} bytes, got {len(prefix8)}")
    (body_length,) = _PREFIX.unpack(prefix8)
    if body_length > max_frame_bytes:
        raise FrameError(f"frame of {body_length} bytes exceeds the cap of {max_frame_bytes} bytes")
    if body_length <= _HEADER_LENGTH.size:
        raise FrameError(f"frame body of {body_length} bytes is too short to hold a header")
    return body_length


def decode_frame_body(body: bytes | bytearray | memoryview) -> Frame:
    """The frame in `body` (everything after the length prefix).

    Arrays are zero-copy views into `body` (read-only if `body` is bytes), so `body` must
    not be reused while they live.
    Raises FrameError, naming the problem, unless the header is a map with exactly the keys
    "k" (str), "f" (map with str keys) and "a" (list of [dtype, shape]), every dtype is in
    ALLOWED_DTYPES, every shape is a list of at most MAX_NDIM non-negative ints, and the
    array bytes fill the rest of the body exactly.
    """
    view = memoryview(body).cast("B")
    if len(view) < _HEADER_LENGTH.size:
        raise FrameError(f"frame body of {len(view)} bytes is too short to hold a header length")
    (header_length,) = _HEADER_LENGTH.unpack_from(view)
    data_start = _HEADER_LENGTH.size + header_length
    if data_start > len(view):
        raise FrameError(f"header length {header_length} runs past the {len(view)}-byte frame body")
    try:
        header = msgpack.unpackb(view[_HEADER_LENGTH.size:data_start], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise FrameError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    kind, fields, descriptors = _check_header(header)

    arrays = []
    offset = data_start
    for i, (name, shape) in enumerate(descriptors):
        dtype = _WIRE_DTYPES[name]
        count = 1
        for dim in shape:
            count *= dim  # Python ints: a huge shape cannot overflow, it just fails below
        nbytes = count * dtype.itemsize
        if nbytes > len(view) - offset:
            raise FrameError(
                f"array {i} of a {kind!r} frame ({name} {shape}) needs {nbytes} bytes, "
                f"only {len(view) - offset} left in the body"
            )
        array = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))
        if name == "bool" and count and array.view(np.uint8).max() > 1:
            raise FrameError(f"array {i} of a {kind!r} frame is bool but holds bytes other than 0 and 1")
        arrays.append(array)
        offset += nbytes
    if offset != len(view):
        raise FrameError(f"{len(view) - offset} unexplained bytes after the arrays of a {kind!r} frame")
    return Frame(kind, fields, tuple(arrays))


def _check_header(header: Any) -> tuple[str, dict, list[tuple[str, list[int]]]]:
    if not isinstance(header, dict) or set(header) != {"k", "f", "a"}:
        raise FrameError(f"header must be a map with keys k, f, a; got {_describe(header)}")
    kind, fields, descriptors = header["k"], header["f"], header["a"]
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
        raise FrameError(f"header kind must be a str of 1..{MAX_KIND_CHARS} characters, got {_describe(kind)}")
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise FrameError(f"fields of a {kind!r} frame must be a map with str keys, got {_describe(fields)}")
    if not isinstance(descriptors, list) or len(descriptors) > MAX_ARRAYS:
        raise FrameError(f"array list of a {kind!r} frame must be a list of at most {MAX_ARRAYS}, got {_describe(descriptors)}")
    checked = []
    for i, descriptor in enumerate(descriptors):
        if not (isinstance(descriptor, list) and len(descriptor) == 2):
            raise FrameError(f"array {i} of a {kind!r} frame must be [dtype, shape], got {_describe(descriptor)}")
        name, shape = descriptor
        if not isinstance(name, str) or name not in _WIRE_DTYPES:
            raise FrameError(f"array {i} of a {kind!r} frame has dtype {name!r:.40}, not one of {ALLOWED_DTYPES}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            # bool is an int subclass; msgpack decodes true/false as bool
            or not all(type(dim) is int and dim >= 0 for dim in shape)
        ):
            raise FrameError(
                f"array {i} of a {kind!r} frame has shape {_describe(shape)}, "
                f"not a list of at most {MAX_NDIM} non-negative ints"
            )
        checked.append((name, shape))
    return kind, fields, checked


def _describe(value: Any) -> str:
    """A short, safe rendering of untrusted input for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
