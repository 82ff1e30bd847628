"""Frame codec: round trips and rejection of every kind of malformed body."""

import struct

import msgpack
import numpy as np
import pytest

from p2ptrain.wire.codec import (
    ALLOWED_DTYPES,
    MAX_NDIM,
    SMALL_FRAME_BYTES,
    Frame,
    FrameError,
    decode_frame_body,
    encode_frame,
    read_length_prefix,
)


def roundtrip(frame: Frame, **kw) -> Frame:
    wire = b"".join(bytes(b) for b in encode_frame(frame, **kw))
    body_length = read_length_prefix(wire[:8], max_frame_bytes=kw.get("max_frame_bytes", 2**40))
    assert body_length == len(wire) - 8
    return decode_frame_body(bytearray(wire[8:]))


def body(header, data: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + data


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)])
def test_roundtrip_dtypes_and_shapes(dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    out = roundtrip(Frame("forward", {"step": 1}, (array,)))
    assert out.kind == "forward" and out.fields == {"step": 1}
    (got,) = out.arrays
    assert got.dtype == np.dtype(dtype) and got.shape == shape
    np.testing.assert_array_equal(got, array)


def test_roundtrip_fields_and_several_arrays():
    fields = {"job_id": "j1", "mb": 3, "value": 0.25, "blob": b"\x00\xff", "nested": {"a": [1, None, True]}}
    arrays = (np.arange(6, dtype=np.int64).reshape(2, 3), np.array([True, False]), np.float32(1.5) * np.ones(0, np.float32))
    out = roundtrip(Frame("params", fields, arrays))
    assert out.fields == fields
    assert len(out.arrays) == 3
    for a, b in zip(arrays, out.arrays):
        np.testing.assert_array_equal(a, b)
    assert roundtrip(Frame("heartbeat", {})).arrays == ()


def test_non_native_layouts_are_normalised():
    big_endian = np.arange(5, dtype=">i4")
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    strided = np.arange(10, dtype=np.float64)[::2]
    out = roundtrip(Frame("x", {}, [big_endian, fortran, strided]))
    for a, b in zip((big_endian, fortran, strided), out.arrays):
        np.testing.assert_array_equal(a, b)


def test_small_frames_are_one_buffer_large_arrays_are_not_copied():
    small = encode_frame(Frame("x", {"a": 1}, (np.ones(100, np.float32),)))
    assert len(small) == 1 and isinstance(small[0], bytes)

    big = np.ones(SMALL_FRAME_BYTES, np.uint8)
    buffers = encode_frame(Frame("x", {}, (np.ones(3, np.uint8), big, np.ones(2, np.uint8))))
    assert [type(b) for b in buffers] == [bytes, memoryview, bytes]
    assert np.shares_memory(np.frombuffer(buffers[1], np.uint8), big)


def test_decoded_arrays_are_views_into_the_body():
    wire = b"".join(encode_frame(Frame("x", {}, (np.arange(4, dtype=np.int32),))))
    received = bytearray(wire[8:])
    (array,) = decode_frame_body(received).arrays
    assert np.shares_memory(array, np.frombuffer(received, np.uint8))


def test_encode_rejects_bad_frames():
    with pytest.raises(FrameError, match="dtype complex64"):
        encode_frame(Frame("x", {}, (np.zeros(2, np.complex64),)))
    with pytest.raises(FrameError, match="msgpack"):
        encode_frame(Frame("x", {"v": np.int64(3)}))
    with pytest.raises(FrameError, match="str keys"):
        encode_frame(Frame("x", {1: 2}))
    with pytest.raises(FrameError, match="kind"):
        encode_frame(Frame("", {}))
    with pytest.raises(FrameError, match="exceeds the cap of 1000"):
        encode_frame(Frame("x", {}, (np.zeros(1000, np.uint8),)), max_frame_bytes=1000)


def test_length_prefix_limits():
    assert read_length_prefix(struct.pack("<Q", 100), max_frame_bytes=100) == 100
    with pytest.raises(FrameError, match="exceeds the cap"):
        read_length_prefix(struct.pack("<Q", 101), max_frame_bytes=100)
    with pytest.raises(FrameError, match="too short"):
        read_length_prefix(struct.pack("<Q", 0), max_frame_bytes=100)
    with pytest.raises(FrameError, match="8 bytes"):
        read_length_prefix(b"\x01\x00", max_frame_bytes=100)


GOOD_HEADER = {"k": "x", "f": {}, "a": [["float32", [2]]]}
GOOD_DATA = np.ones(2, np.float32).tobytes()


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "too short"),
        (b"\x01\x00", "too short"),
        (struct.pack("<I", 50) + b"\x80", "runs past"),
        (struct.pack("<I", 2) + b"\xc1\xc1", "not valid msgpack"),  # 0xc1 is never used
        (struct.pack("<I", 1) + b"\x92", "not valid msgpack"),  # truncated array
        (body(GOOD_HEADER, GOOD_DATA)[:-1], "needs 8 bytes, only 7"),  # truncated data
        (body(GOOD_HEADER, GOOD_DATA + b"\x00"), "1 unexplained bytes"),
        (body([1, 2, 3]), "map with keys"),
        (body({"k": "x", "f": {}}), "map with keys"),
        (body({"k": "x", "f": {}, "a": [], "extra": 1}), "map with keys"),
        (body({"k": 7, "f": {}, "a": []}), "kind"),
        (body({"k": "", "f": {}, "a": []}), "kind"),
        (body({"k": "x" * 65, "f": {}, "a": []}), "kind"),
        (body({"k": "x", "f": [], "a": []}), "fields"),
        (body({"k": "x", "f": {b"key": 1}, "a": []}), "fields"),
        (body({"k": "x", "f": {}, "a": {}}), "array list"),
        (body({"k": "x", "f": {}, "a": [["float32"]]}), r"\[dtype, shape\]"),
        (body({"k": "x", "f": {}, "a": ["float32"]}), r"\[dtype, shape\]"),
        (body({"k": "x", "f": {}, "a": [["complex64", [1]]]}, b"\x00" * 8), "dtype 'complex64'"),
        (body({"k": "x", "f": {}, "a": [["object", [1]]]}, b"\x00" * 8), "dtype 'object'"),
        (body({"k": "x", "f": {}, "a": [[5, [1]]]}), "dtype 5"),
        (body({"k": "x", "f": {}, "a": [["uint8", [-1]]]}), "shape"),
        (body({"k": "x", "f": {}, "a": [["uint8", [1.0]]]}), "shape"),
        (body({"k": "x", "f": {}, "a": [["uint8", [True]]]}), "shape"),
        (body({"k": "x", "f": {}, "a": [["uint8", 4]]}), "shape"),
        (body({"k": "x", "f": {}, "a": [["uint8", [1] * (MAX_NDIM + 1)]]}, b"\x00"), "shape"),
        (body({"k": "x", "f": {}, "a": [["float64", [2**40, 2**40]]]}), "needs"),
        (body({"k": "x", "f": {}, "a": [["bool", [2]]]}, b"\x01\x07"), "bool"),
    ],
)
def test_malformed_bodies_raise_frame_error(raw, message):
    with pytest.raises(FrameError, match=message):
        decode_frame_body(raw)


def test_malformed_body_fuzz_never_escapes_as_another_error():
    # Flip and truncate bytes of a valid frame: the result decodes or raises FrameError.
    rng = np.random.default_rng(1)
    good = body({"k": "forward", "f": {"mb": 1}, "a": [["float32", [2, 2]], ["int64", [1]]]},
                np.zeros(4, np.float32).tobytes() + np.zeros(1, np.int64).tobytes())
    for _ in range(2000):
        raw = bytearray(good)
        for i in rng.integers(0, len(raw), size=rng.integers(1, 4)):
            raw[i] = rng.integers(0, 256)
        raw = raw[: rng.integers(0, len(raw) + 1)] if rng.random() < 0.3 else raw
        try:
            decode_frame_body(raw)
        except FrameError:
            pass
