"""Link: whole frames over an authenticated byte stream (a transport `Connection`).

A Link owns its stream. `send` may be called from many tasks at once (frames never
interleave, and small frames overtake queued large ones). `receive` returns one frame at
a time and survives cancellation (a `move_on_after` around it loses nothing: a partly
received frame is resumed by the next call). A broken stream is `LinkClosed`; a malformed
frame is `FrameError`, after which the link is out of sync and the caller must close it.
"""

from __future__ import annotations

import math

import trio

from ..transport.base import Connection
from ..wire.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    PREFIX_BYTES,
    SMALL_FRAME_BYTES,
    Frame,
    FrameError,
    decode_frame_body,
    encode_frame,
    read_length_prefix,
)

# Most body bytes asked of one receive_some. Asking for all that remains lets a stream hand
# over big chunks at once (one copy per chunk into the body buffer); the bound keeps single
# reads, and the chunk they allocate, moderate.
MAX_RECEIVE_CHUNK_BYTES = 4 * 2**20

# Bytes read beyond the current frame's end. Small frames (control messages) then arrive
# several per receive_some instead of costing two calls each (prefix, then body); a
# receive_some through trio's SSLStream costs tens of microseconds.
READ_AHEAD_BYTES = 64 * 2**10

# Bound on a graceful close (TLS close_notify) before the stream is closed forcefully.
CLOSE_TIMEOUT_S = 2.0


class LinkClosed(Exception):
    """The other side closed the link, or the stream under it broke."""


class _SendLock:
    """A lock with two FIFO queues: a waiting small frame gets the lock before any waiting
    bulk frame. A control message (heartbeat) then waits for at most the one bulk frame
    already on the wire, not for every bulk frame queued behind it (DESIGN.md section 7).
    Same handoff discipline as trio.Lock: release() passes ownership to the next waiter."""

    def __init__(self) -> None:
        self._held = False
        self._urgent = trio.lowlevel.ParkingLot()
        self._bulk = trio.lowlevel.ParkingLot()

    async def acquire(self, *, urgent: bool) -> None:
        """Not a schedule point when the lock is free: the caller writes to its stream next,
        which is one (a pass through the scheduler per frame adds up in a simulation)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._held:
            self._held = True
            return
        # A cancelled waiter leaves its queue; one that was unparked owns the lock.
        await (self._urgent if urgent else self._bulk).park()

    def release(self) -> None:
        if self._urgent:
            self._urgent.unpark()
        elif self._bulk:
            self._bulk.unpark()
        else:
            self._held = False


class Link:
    """Frames over `connection.stream`; see the module docstring for the contract."""

    def __init__(self, connection: Connection, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._stream = connection.stream
        self.remote_peer_id: str = connection.remote_peer_id
        self.max_frame_bytes = max_frame_bytes
        self._send_lock = _SendLock()
        self._receive_lock = trio.Lock()
        self._send_broken: str | None = None  # why sending is impossible, once it is
        self._receive_broken: str | None = None
        self._closed = False
        self.last_sent_s = -math.inf   # trio time when the last whole frame was sent
        # Receive state, kept across calls so that receive() can be cancelled and resumed
        # without losing bytes: bytes read ahead of the current frame, and the body being
        # filled (with how much of it is filled) once its length is known.
        self._buffer = bytearray()
        self._body: bytearray | None = None
        self._body_filled = 0

    def __repr__(self) -> str:
        return f"<Link to {self.remote_peer_id}>"

    @property
    def can_send(self) -> bool:
        """False once a send failed, broke off mid-frame, or the link was closed."""
        return self._send_broken is None

    async def send(self, frame: Frame) -> None:
        """Send one whole frame. Raises LinkClosed if the link is closed or broken,
        FrameError if the frame cannot be encoded or exceeds max_frame_bytes (nothing is sent).

        Frames from concurrent callers are sent whole, one after another: first the waiting
        small ones (under SMALL_FRAME_BYTES, e.g. heartbeats), then the waiting large ones,
        each class in arrival order. Frames sent by one task keep their order.
        If a send is cancelled after it started writing, part of a frame may be on the wire,
        so the link is marked broken: later sends raise LinkClosed (a peer then opens a
        fresh link, see Peer.link_to).
        """
        buffers = encode_frame(frame, max_frame_bytes=self.max_frame_bytes)
        await self._send_lock.acquire(urgent=sum(memoryview(b).nbytes for b in buffers) < SMALL_FRAME_BYTES)
        try:
            if self._send_broken is not None:
                raise LinkClosed(self._send_broken)
            try:
                for buffer in buffers:
                    await self._stream.send_all(buffer)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._send_broken = f"link to {self.remote_peer_id} is broken: {exc or type(exc).__name__}"
                raise LinkClosed(self._send_broken) from exc
            except BaseException:
                self._send_broken = f"link to {self.remote_peer_id} broke: a send was interrupted mid-frame"
                raise
            self.last_sent_s = trio.current_time()
        finally:
            self._send_lock.release()

    async def receive(self) -> Frame:
        """The next frame. Raises LinkClosed on a clean EOF between frames, on EOF inside
        a frame, and on a broken or closed stream; FrameError on a frame over
        max_frame_bytes or a malformed one (the link is then unusable)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:   # as in _SendLock: no extra schedule point when free, the read is one
            self._receive_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._receive_lock.acquire()
        try:
            if self._receive_broken is not None:
                raise LinkClosed(self._receive_broken)
            try:
                return await self._receive_frame()
            except FrameError as exc:
                self._receive_broken = f"link to {self.remote_peer_id} is out of sync after a bad frame: {exc}"
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._receive_broken = f"link to {self.remote_peer_id} is broken: {exc or type(exc).__name__}"
                raise LinkClosed(self._receive_broken) from exc
        finally:
            self._receive_lock.release()

    async def _receive_frame(self) -> Frame:
        stream = self._stream
        buffer = self._buffer
        while True:
            body = self._body
            if body is None:
                if len(buffer) < PREFIX_BYTES:
                    data = await stream.receive_some(READ_AHEAD_BYTES)
                    if not data:
                        self._eof(len(buffer), PREFIX_BYTES)
                    buffer += data
                    continue
                body_length = read_length_prefix(buffer[:PREFIX_BYTES], max_frame_bytes=self.max_frame_bytes)
                del buffer[:PREFIX_BYTES]  # cheap: CPython trims a bytearray's front in place
                if len(buffer) >= body_length:  # small frames: often already here, several at once
                    body = buffer[:body_length]
                    del buffer[:body_length]
                    return decode_frame_body(body)
                # Preallocate the whole body: each received chunk is copied once, into place.
                body = bytearray(body_length)
                body[: len(buffer)] = buffer
                self._body, self._body_filled = body, len(buffer)
                buffer.clear()
                continue

            remaining = len(body) - self._body_filled
            if remaining == 0:
                self._body = None
                return decode_frame_body(body)
            # Ask for all that remains (big chunks arrive at once) plus a little more, so the
            # next frame's prefix usually comes with this read instead of a call of its own.
            data = await stream.receive_some(min(remaining, MAX_RECEIVE_CHUNK_BYTES) + READ_AHEAD_BYTES)
            if not data:
                self._eof(PREFIX_BYTES + self._body_filled, PREFIX_BYTES + len(body))
            taken = min(len(data), remaining)
            body[self._body_filled : self._body_filled + taken] = memoryview(data)[:taken]
            self._body_filled += taken
            if taken < len(data):
                buffer += memoryview(data)[taken:]

    def _eof(self, got: int, wanted: int) -> None:
        if got == 0:
            self._receive_broken = f"link to {self.remote_peer_id} was closed by the other side"
        else:
            self._receive_broken = (
                f"link to {self.remote_peer_id} was closed mid-frame ({got} of {wanted} bytes received)"
            )
        raise LinkClosed(self._receive_broken)

    async def aclose(self) -> None:
        """Close the stream: gracefully if that takes less than CLOSE_TIMEOUT_S, else
        abruptly. Idempotent; pending and later send/receive calls raise LinkClosed."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._send_broken = self._send_broken or f"link to {self.remote_peer_id} was closed"
        self._receive_broken = self._receive_broken or f"link to {self.remote_peer_id} was closed"
        # trio streams release their resource even when aclose is cancelled, so the timeout
        # only cuts short the goodbye (e.g. TLS close_notify to a peer that stopped reading).
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # already broken: nothing left to say to the other side
