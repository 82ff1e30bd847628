"""Simulated network: a seeded in-memory transport with latency, bandwidth, loss and churn.

`SimNetwork` holds the peers, links and listening addresses of one simulated network;
`SimTransport(network, peer_id)` is one peer on it and implements `base.Transport`, so the
same peer, bootstrap and driver code that runs over TCP+TLS runs here. Everything happens in
trio's (virtual) time: run it under a virtual clock (`p2ptrain.sim.determinism.VirtualClock`, or
`trio.testing.MockClock` in tests).
Addresses are any strings; one ending in ":0" gets the network's next free number.

Model (the contract tests rely on):

- A connection is two pipes, one per direction. A pipe delivers bytes in order and intact;
  one `send_all` is one message. Its bytes leave the sender's uplink at the pipe's rate, and
  `send_all` returns when the last byte has left (there is no socket send buffer, so Link's
  priority for small frames holds). The message reaches the receiver `latency` (+ jitter)
  later, all at once: one timer event per message for the sender and one for the receiver,
  never per byte or per chunk.
- Latency of the directed link a -> b: `link.latency_s + (latency_s(a) + latency_s(b)) / 2`,
  where `link` is `set_link(a, b, ...)`'s spec or the network's default and the peers'
  `latency_s` (from `set_peer`, default 0) are round trips to their access network. Each
  message gets extra delay drawn uniformly from [0, link.jitter_s); arrivals never overtake.
- Bandwidth, processor sharing: every pipe with a message in transmission is a flow. A flow
  a -> b gets min(link bandwidth, upload(a) / flows leaving a, download(b) / flows entering b).
  Two flows leaving one peer therefore each take twice as long as one alone. Capacity a flow
  cannot use because it is limited elsewhere is not handed to the others (a conservative
  approximation of max-min fairness, exact whenever one bottleneck limits all its flows);
  in exchange a flow starting or ending only recomputes the flows sharing its two ends.
- Flow control: a pipe holds at most about `receive_window_bytes` of unread data (arrived or
  in flight); a message is admitted when the unread bytes are below it, so a sender to a
  reader that stopped reading blocks instead of growing memory.
- Loss is a connection reset, as over TCP (bytes are never lost silently): a connection
  opened on link a -> b resets after an exponentially distributed lifetime with rate
  `reset_probability_per_s`. The receiver still reads what arrived before the reset, then
  gets trio.BrokenResourceError, as does any send.
- `partition(group_a, group_b)`: nothing crosses between the groups (both directions) until
  `heal()`; streams stall, data in flight waits, connects wait up to `connect_timeout_s`.
- `pause(peer)`: nothing goes in or out of the peer until `resume(peer)`; data already in
  flight to it waits, senders to it stall. The peer's own tasks keep running.
- `kill(peer)`: every connection of the peer breaks now (the other side reads what had
  arrived, then BrokenResourceError), its addresses are unbound, and connects to or from it
  and new `serve` calls raise TransportError. The peer's tasks are not touched: cancel them
  in the scenario, as a dead process would stop them.
- `connect` takes one round trip of virtual time (the handshake).

Randomness comes only from the seed: each unordered pair of peers has its own generator,
derived from (seed, SHA-256 of the sorted pair of ids), used for its resets and jitter.
Peers and connections are iterated in creation order (deterministic under a seeded
scheduler), never in hash order. With a `Trace`, the network records its own events.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import trio

from ..sim.trace import Trace
from .base import Connection, Handler, Transport, TransportError

log = logging.getLogger("p2ptrain.transport")

INF = math.inf
# Tolerance when comparing a wake-up time with a computed completion time: MockClock's jumps
# land within a few ulps of the deadline.
_TIME_EPS_S = 1e-9


@dataclass(frozen=True)
class LinkSpec:
    """What the network path between two peers adds, per direction.

    latency_s: one-way delay of the path (peers' own access latency is added on top).
    jitter_s: each message is delayed by an extra uniform [0, jitter_s).
    bandwidth_bytes_per_s: cap of the path itself (peers' upload/download cap too).
    reset_probability_per_s: rate at which a connection opened on this link resets.
    """

    latency_s: float = 0.010
    jitter_s: float = 0.0
    bandwidth_bytes_per_s: float = INF
    reset_probability_per_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and self.jitter_s >= 0 and self.reset_probability_per_s >= 0):
            raise ValueError(f"link latency, jitter and reset probability must be >= 0: {self}")
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"link bandwidth must be > 0: {self}")


class _Peer:
    """One peer's network side: its access link, state, and the flows and connections on it."""

    __slots__ = ("peer_id", "upload_bytes_per_s", "download_bytes_per_s", "latency_s", "paused", "killed",
                 "uplink", "downlink", "conns")

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.upload_bytes_per_s = INF
        self.download_bytes_per_s = INF
        self.latency_s = 0.0
        self.paused = False
        self.killed = False
        # Pipes transmitting now (insertion-ordered dicts used as sets: deterministic order).
        self.uplink: dict[_Pipe, None] = {}
        self.downlink: dict[_Pipe, None] = {}
        self.conns: dict[int, _Conn] = {}


class _Transfer:
    """One send_all in progress: how much of it is still to leave the uplink, at what rate."""

    __slots__ = ("view", "size", "remaining", "rate", "last_s", "finish_s")

    def __init__(self, view: memoryview, now: float) -> None:
        self.view = view
        self.size = view.nbytes
        self.remaining = float(self.size)
        self.rate = 0.0
        self.last_s = now
        self.finish_s = INF

    def settle(self, now: float) -> None:
        """Account for the bytes sent at the current rate since the last change."""
        if self.rate == INF:
            self.remaining = 0.0
        elif self.rate > 0 and now > self.last_s:
            self.remaining = max(0.0, self.remaining - self.rate * (now - self.last_s))
        self.last_s = now


class _Pipe:
    """One direction of a connection: a message in transmission, then messages in flight or
    arrived but unread, in order. `arrivals` holds [arrival_s, bytes, offset read]."""

    __slots__ = ("conn", "src", "dst", "latency_s", "jitter_s", "bandwidth_bytes_per_s", "cut", "transfer",
                 "active", "arrivals", "unread_bytes", "last_arrival_s", "eof_s", "reader_closed",
                 "send_scope", "receive_scope")

    def __init__(self, conn: _Conn, src: _Peer, dst: _Peer) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.latency_s = 0.0
        self.jitter_s = 0.0
        self.bandwidth_bytes_per_s = INF
        self.cut = False  # a partition separates src and dst
        self.transfer: _Transfer | None = None
        self.active = False  # the transfer is a flow on src.uplink and dst.downlink
        self.arrivals: deque[list] = deque()
        self.unread_bytes = 0
        self.last_arrival_s = -INF
        self.eof_s = INF  # when the sender's close reaches the receiver
        self.reader_closed = False
        # Cancel scopes of the task waiting in send_all / receive_some on this pipe. Other
        # tasks move their deadlines when the answer changes, so waiting costs no extra events.
        self.send_scope: trio.CancelScope | None = None
        self.receive_scope: trio.CancelScope | None = None

    def delivery_blocked(self) -> bool:
        return self.cut or self.dst.paused

    def send_deadline(self) -> float:
        t = self.transfer
        if t is None or self.reader_closed:
            return -INF
        return min(t.finish_s if self.active else INF, self.conn.broken_s)

    def receive_deadline(self) -> float:
        if self.delivery_blocked():
            return INF
        if self.arrivals:
            return min(self.arrivals[0][0], self.conn.broken_s)
        return min(self.eof_s, self.conn.broken_s)

    def refresh_sender(self) -> None:
        scope = self.send_scope
        if scope is not None:
            deadline = self.send_deadline()
            if deadline != scope.deadline:
                scope.deadline = deadline

    def refresh_receiver(self) -> None:
        scope = self.receive_scope
        if scope is not None:
            deadline = self.receive_deadline()
            if deadline != scope.deadline:
                scope.deadline = deadline


class _Conn:
    __slots__ = ("conn_id", "forward", "backward", "broken_s", "break_seen", "open_sides")

    def __init__(self, conn_id: int, a: _Peer, b: _Peer) -> None:
        self.conn_id = conn_id
        self.forward = _Pipe(self, a, b)  # connector -> listener
        self.backward = _Pipe(self, b, a)
        self.broken_s = INF  # reset or kill time
        self.break_seen = False
        self.open_sides = 2


@dataclass(frozen=True)
class _Listener:
    peer_id: str
    incoming: trio.MemorySendChannel[Connection]


class SimNetwork:
    """A simulated network; see the module docstring for the model.

    seed: the only source of randomness (resets, jitter).
    default_link: the LinkSpec of every directed pair without a `set_link`.
    trace: where the network records its events, or None: connect, deliver (one per message,
        with its size and arrival time), close, reset (also one per connection a kill
        breaks), partition, heal, pause, resume, kill, refused.
    backlog: connections waiting for a server's handler; beyond it a connect is refused.
    receive_window_bytes: unread bytes a pipe admits before its sender blocks.
    connect_timeout_s: how long a connect waits for a partition or pause to end.
    """

    def __init__(
        self,
        seed: int,
        *,
        default_link: LinkSpec = LinkSpec(),
        trace: Trace | None = None,
        backlog: int = 64,
        receive_window_bytes: int = 4 * 2**20,
        connect_timeout_s: float = 3.0,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        self.default_link = default_link
        self.trace = trace
        self.backlog = backlog
        self.receive_window_bytes = receive_window_bytes
        self.connect_timeout_s = connect_timeout_s
        self._peers: dict[str, _Peer] = {}
        self._links: dict[tuple[str, str], LinkSpec] = {}
        self._rngs: dict[tuple[str, str], np.random.Generator] = {}
        self._listeners: dict[str, _Listener] = {}
        self._next_number = 1
        self._next_conn_id = 1
        self._conns: dict[int, _Conn] = {}
        self._partitions: list[tuple[frozenset[str], frozenset[str]]] = []
        self._changed = trio.Event()  # set and replaced whenever reachability changes

    # ---- configuration ----

    def set_peer(
        self,
        peer_id: str,
        upload_bytes_per_s: float = INF,
        download_bytes_per_s: float = INF,
        latency_s: float = 0.0,
    ) -> None:
        """A peer's access link (e.g. from `profiles.PeerSample`); applies to open connections too."""
        if not (upload_bytes_per_s > 0 and download_bytes_per_s > 0 and latency_s >= 0):
            raise ValueError(f"peer {peer_id}: need upload, download > 0 and latency >= 0")
        peer = self._peer(peer_id)
        peer.upload_bytes_per_s = float(upload_bytes_per_s)
        peer.download_bytes_per_s = float(download_bytes_per_s)
        peer.latency_s = float(latency_s)
        self._reconfigure(list(peer.conns.values()))

    def set_link(self, src: str, dst: str, spec: LinkSpec) -> None:
        """The path from `src` to `dst` (one direction); applies to open connections too."""
        self._links[src, dst] = spec
        self._reconfigure([c for c in self._conns.values() if {c.forward.src.peer_id, c.forward.dst.peer_id} == {src, dst}])

    def link(self, src: str, dst: str) -> LinkSpec:
        return self._links.get((src, dst), self.default_link)

    def latency_s(self, src: str, dst: str) -> float:
        """One-way latency from src to dst, without jitter."""
        a, b = self._peer(src), self._peer(dst)
        return self.link(src, dst).latency_s + (a.latency_s + b.latency_s) / 2

    def addresses(self) -> list[str]:
        """Addresses being served now, sorted."""
        return sorted(self._listeners)

    # ---- faults ----

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Cut every path between a peer of group_a and one of group_b, both ways, until heal()."""
        a, b = frozenset(group_a), frozenset(group_b)
        if a & b:
            raise ValueError(f"partition groups overlap: {sorted(a & b)}")
        self._partitions.append((a, b))
        self._record("partition", sorted(a), sorted(b))
        self._recut()

    def heal(self) -> None:
        """Remove every partition."""
        self._partitions.clear()
        self._record("heal")
        self._recut()

    def pause(self, peer_id: str) -> None:
        """Nothing in or out of `peer_id` until resume(); data waits."""
        peer = self._peer(peer_id)
        if not peer.paused:
            peer.paused = True
            self._record("pause", peer_id)
            self._reblock(list(peer.conns.values()))

    def resume(self, peer_id: str) -> None:
        peer = self._peer(peer_id)
        if peer.paused:
            peer.paused = False
            self._record("resume", peer_id)
            self._reblock(list(peer.conns.values()))

    def kill(self, peer_id: str) -> None:
        """Break all of the peer's connections now, unbind its addresses, refuse it from now on."""
        peer = self._peer(peer_id)
        if peer.killed:
            return
        peer.killed = True
        now = trio.current_time()
        self._record("kill", peer_id, len(peer.conns))
        for conn in list(peer.conns.values()):
            self._break(conn, now)
        for address in [a for a, l in self._listeners.items() if l.peer_id == peer_id]:
            # The serve task notices the closed channel, closes unhandled connections and
            # then waits to be cancelled.
            self._listeners.pop(address).incoming.close()
        self._notify_change()

    def is_killed(self, peer_id: str) -> bool:
        return self._peer(peer_id).killed

    # ---- internals: peers, randomness, trace ----

    def _peer(self, peer_id: str) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._peers[peer_id] = _Peer(peer_id)
        return peer

    def _pair_rng(self, a: str, b: str) -> np.random.Generator:
        key = (a, b) if a <= b else (b, a)
        rng = self._rngs.get(key)
        if rng is None:
            digest = hashlib.sha256(f"{key[0]}\0{key[1]}".encode()).digest()
            words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
            rng = self._rngs[key] = np.random.default_rng(np.random.SeedSequence([self.seed, *words]))
        return rng

    def _record(self, kind: str, *fields) -> None:
        if self.trace is not None:
            self.trace.record(trio.current_time(), kind, *fields)

    def _notify_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _is_cut(self, a: str, b: str) -> bool:
        for x, y in self._partitions:
            if (a in x and b in y) or (a in y and b in x):
                return True
        return False

    def _unreachable(self, a: _Peer, b: _Peer) -> bool:
        return a.paused or b.paused or self._is_cut(a.peer_id, b.peer_id)

    # ---- internals: flows ----

    def _configure_pipe(self, pipe: _Pipe) -> None:
        spec = self.link(pipe.src.peer_id, pipe.dst.peer_id)
        pipe.latency_s = spec.latency_s + (pipe.src.latency_s + pipe.dst.latency_s) / 2
        pipe.jitter_s = spec.jitter_s
        pipe.bandwidth_bytes_per_s = spec.bandwidth_bytes_per_s
        pipe.cut = self._is_cut(pipe.src.peer_id, pipe.dst.peer_id)

    def _reconfigure(self, conns: list[_Conn]) -> None:
        for conn in conns:
            for pipe in (conn.forward, conn.backward):
                self._configure_pipe(pipe)
                if pipe.active:
                    self._reflow(pipe.src, pipe.dst, trio.current_time())

    def _recut(self) -> None:
        for conn in list(self._conns.values()):
            for pipe in (conn.forward, conn.backward):
                pipe.cut = self._is_cut(pipe.src.peer_id, pipe.dst.peer_id)
        self._reblock(list(self._conns.values()))

    def _reblock(self, conns: list[_Conn]) -> None:
        """After a pause/resume/partition/heal: start or stop flows, move receivers' deadlines."""
        for conn in conns:
            for pipe in (conn.forward, conn.backward):
                self._update_flow(pipe)
                pipe.refresh_receiver()
        self._notify_change()

    def _update_flow(self, pipe: _Pipe, now: float | None = None) -> None:
        """Make the pipe a flow iff it has a transfer that nothing blocks; rebalance its ends."""
        t = pipe.transfer
        should = (
            t is not None
            and not (pipe.cut or pipe.src.paused or pipe.dst.paused)
            and pipe.unread_bytes < self.receive_window_bytes
        )
        if should == pipe.active:
            return
        if now is None:
            now = trio.current_time()
        if should:
            assert t is not None
            t.last_s = now
            pipe.src.uplink[pipe] = None
            pipe.dst.downlink[pipe] = None
        else:
            if t is not None:
                t.settle(now)
                t.rate, t.finish_s = 0.0, INF
            del pipe.src.uplink[pipe]
            del pipe.dst.downlink[pipe]
        pipe.active = should
        self._reflow(pipe.src, pipe.dst, now)
        pipe.refresh_sender()

    def _reflow(self, src: _Peer, dst: _Peer, now: float) -> None:
        """Recompute the rates of the flows leaving `src` and entering `dst` (the only ones a
        flow src -> dst starting or ending changes) and move their senders' deadlines."""
        for pipe in src.uplink:
            self._rerate(pipe, now)
        for pipe in dst.downlink:
            if pipe.src is not src:  # those were done above
                self._rerate(pipe, now)

    @staticmethod
    def _rerate(pipe: _Pipe, now: float) -> None:
        t = pipe.transfer
        assert t is not None
        t.settle(now)
        src, dst = pipe.src, pipe.dst
        rate = min(
            pipe.bandwidth_bytes_per_s,
            src.upload_bytes_per_s / len(src.uplink),
            dst.download_bytes_per_s / len(dst.downlink),
        )
        t.rate = rate
        t.finish_s = now if t.remaining <= 0 or rate == INF else now + t.remaining / rate
        pipe.refresh_sender()

    def _end_transfer(self, pipe: _Pipe, now: float | None = None) -> None:
        pipe.transfer = None
        self._update_flow(pipe, now)

    def _deliver(self, pipe: _Pipe, data: bytes, now: float) -> None:
        """Put a transmitted message in flight to the receiver."""
        conn = pipe.conn
        if pipe.reader_closed or now >= conn.broken_s:
            return
        arrival_s = now + pipe.latency_s
        if pipe.jitter_s > 0:
            arrival_s += pipe.jitter_s * float(self._pair_rng(pipe.src.peer_id, pipe.dst.peer_id).random())
        if arrival_s < pipe.last_arrival_s:  # in order: no overtaking
            arrival_s = pipe.last_arrival_s
        pipe.last_arrival_s = arrival_s
        pipe.arrivals.append([arrival_s, data, 0])
        pipe.unread_bytes += len(data)
        if self.trace is not None:
            self.trace.record(now, "deliver", conn.conn_id, pipe.src.peer_id, pipe.dst.peer_id, len(data), arrival_s)
        pipe.refresh_receiver()

    # ---- internals: connections ----

    def _open(self, a: _Peer, b: _Peer, address: str, now: float) -> _Conn:
        conn = _Conn(self._next_conn_id, a, b)
        self._next_conn_id += 1
        self._configure_pipe(conn.forward)
        self._configure_pipe(conn.backward)
        rate = self.link(a.peer_id, b.peer_id).reset_probability_per_s
        if rate > 0:
            conn.broken_s = now + float(self._pair_rng(a.peer_id, b.peer_id).exponential(1.0 / rate))
        self._conns[conn.conn_id] = conn
        a.conns[conn.conn_id] = conn
        b.conns[conn.conn_id] = conn
        self._record("connect", conn.conn_id, a.peer_id, b.peer_id, address)
        return conn

    def _retire(self, conn: _Conn) -> None:
        self._conns.pop(conn.conn_id, None)
        conn.forward.src.conns.pop(conn.conn_id, None)
        conn.forward.dst.conns.pop(conn.conn_id, None)

    def _break(self, conn: _Conn, now: float) -> None:
        """The connection breaks at `now` (kill): stop its flows, wake its waiters."""
        conn.broken_s = min(conn.broken_s, now)
        self._observe_break(conn)

    def _observe_break(self, conn: _Conn) -> None:
        """First notice of a break (a reset is noticed by whoever reaches its time first)."""
        if conn.break_seen:
            return
        conn.break_seen = True
        if self.trace is not None:
            a, b = conn.forward.src.peer_id, conn.forward.dst.peer_id
            self.trace.record(conn.broken_s, "reset", conn.conn_id, a, b)
        for pipe in (conn.forward, conn.backward):
            if pipe.transfer is not None:
                self._end_transfer(pipe)
            pipe.refresh_sender()
            pipe.refresh_receiver()
        self._retire(conn)

    def _close_side(self, stream: SimStream) -> None:
        """One side closes: a FIN follows its data out; it reads and accepts nothing more."""
        out, inn, conn = stream._out, stream._in, stream._conn
        now = trio.current_time()
        if out.transfer is not None:  # a send_all in another task: it raises ClosedResourceError
            self._end_transfer(out)
        out.eof_s = max(out.last_arrival_s, now + out.latency_s)
        out.refresh_receiver()
        out.refresh_sender()
        inn.reader_closed = True
        inn.arrivals.clear()
        inn.unread_bytes = 0
        if inn.transfer is not None:  # the other side's send_all: it raises BrokenResourceError
            self._end_transfer(inn)
        inn.refresh_sender()
        if inn.receive_scope is not None:  # a receive_some in another task
            inn.receive_scope.cancel()
        self._record("close", conn.conn_id, out.src.peer_id)
        conn.open_sides -= 1
        if conn.open_sides == 0:
            self._retire(conn)

    def _bind(self, listen: str, listener: _Listener) -> str:
        if listen.endswith(":0"):
            while True:
                address = f"{listen[:-2]}:{self._next_number}"
                self._next_number += 1
                if address not in self._listeners:
                    break
        else:
            address = listen
            if address in self._listeners:
                raise TransportError(f"cannot listen on {listen}: address already in use")
        self._listeners[address] = listener
        return address

    def _unbind(self, address: str, listener: _Listener) -> None:
        if self._listeners.get(address) is listener:
            del self._listeners[address]


class SimStream(trio.abc.Stream):
    """One side of a simulated connection (see the module docstring for its timing).

    Follows trio's Stream contract: send_all and receive_some each refuse a concurrent call
    of themselves (trio.BusyResourceError); after aclose() this side's calls raise
    trio.ClosedResourceError; a reset, a kill or the other side's close make sends raise
    trio.BrokenResourceError; receive_some returns b"" at a clean end of stream.
    """

    def __init__(self, network: SimNetwork, conn: _Conn, out: _Pipe, inn: _Pipe) -> None:
        self._network = network
        self._conn = conn
        self._out = out
        self._in = inn
        self._closed = False
        self._sending = False
        self._receiving = False

    def _check_send(self, now: float) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        conn = self._conn
        if now >= conn.broken_s:
            self._network._observe_break(conn)
            raise trio.BrokenResourceError("connection reset")
        if self._out.reader_closed:
            raise trio.BrokenResourceError("the other side closed the connection")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            network, pipe = self._network, self._out
            now = trio.current_time()
            self._check_send(now)
            view = memoryview(data)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            if view.nbytes == 0:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            transfer = pipe.transfer = _Transfer(view, now)
            network._update_flow(pipe, now)
            waited = False
            try:
                while True:
                    if waited:
                        now = trio.current_time()
                        self._check_send(now)
                    if pipe.active and now >= transfer.finish_s - _TIME_EPS_S:
                        break
                    with trio.CancelScope(deadline=pipe.send_deadline()) as scope:
                        pipe.send_scope = scope
                        try:
                            await trio.sleep_forever()
                        finally:
                            pipe.send_scope = None
                    waited = True
            except BaseException:
                # Cancelled mid-message, or the stream broke: what had left the uplink is
                # on its way (a TCP send interrupted part-way leaves a prefix on the wire).
                if pipe.transfer is transfer:
                    now = trio.current_time()
                    transfer.settle(now)
                    sent = min(transfer.size, int(transfer.size - transfer.remaining))
                    network._end_transfer(pipe)
                    if sent > 0:
                        network._deliver(pipe, bytes(view[:sent]), now)
                raise
            network._end_transfer(pipe, now)
            network._deliver(pipe, bytes(view), now)
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Returns at once: send_all itself waits for bandwidth and the receive window."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await trio.lowlevel.checkpoint()
        self._check_send(trio.current_time())

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            pipe = self._in
            waited = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                data = self._take(trio.current_time(), max_bytes)
                if data is not None:
                    break
                with trio.CancelScope(deadline=pipe.receive_deadline()) as scope:
                    pipe.receive_scope = scope
                    try:
                        await trio.sleep_forever()
                    finally:
                        pipe.receive_scope = None
                waited = True
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def _take(self, now: float, max_bytes: int | None) -> bytes | None:
        """Arrived bytes (several messages' worth if they fit), b"" at EOF, None to wait.
        Raises BrokenResourceError once what arrived before a reset has been read."""
        pipe, conn = self._in, self._conn
        if pipe.delivery_blocked():
            return None
        arrivals = pipe.arrivals
        limit = max_bytes if max_bytes is not None else INF
        pieces: list[bytes] = []
        taken = 0
        cutoff = min(now, conn.broken_s)
        while arrivals and arrivals[0][0] <= cutoff and taken < limit:
            head = arrivals[0]
            data, offset = head[1], head[2]
            left = len(data) - offset
            if left <= limit - taken:
                pieces.append(data if offset == 0 else data[offset:])
                taken += left
                arrivals.popleft()
            else:
                n = int(limit - taken)
                pieces.append(data[offset : offset + n])
                head[2] = offset + n
                taken += n
        if taken:
            window_was_full = pipe.unread_bytes >= self._network.receive_window_bytes
            pipe.unread_bytes -= taken
            if window_was_full and pipe.transfer is not None:
                self._network._update_flow(pipe)
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if now >= conn.broken_s:
            self._network._observe_break(conn)
            raise trio.BrokenResourceError("connection reset")
        if not arrivals and now >= pipe.eof_s:
            return b""
        return None

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close without a checkpoint (safe in a cancelled scope). Idempotent."""
        if not self._closed:
            self._closed = True
            self._network._close_side(self)


class SimTransport(Transport):
    """One peer on a SimNetwork; implements base.Transport."""

    def __init__(self, network: SimNetwork, peer_id: str) -> None:
        self.network = network
        self._peer_id = peer_id
        self._peer = network._peer(peer_id)

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        network, me = self.network, self._peer
        await trio.lowlevel.checkpoint()
        listener = self._find(address, expected_peer_id)
        remote = network._peer(listener.peer_id)
        # The handshake's packets need a path: wait out a partition or pause, up to the timeout.
        deadline = trio.current_time() + network.connect_timeout_s
        while True:
            with trio.move_on_at(deadline):
                while network._unreachable(me, remote):
                    await network._changed.wait()
            if network._unreachable(me, remote):
                network._record("refused", me.peer_id, address, "timeout")
                raise TransportError(f"cannot reach {address}: connection timed out")
            await trio.sleep(network.latency_s(me.peer_id, remote.peer_id) + network.latency_s(remote.peer_id, me.peer_id))
            if self._find(address, expected_peer_id) is not listener:  # things change in a round trip
                network._record("refused", me.peer_id, address, "rebound")
                raise TransportError(f"cannot reach {address}: connection refused")
            if not network._unreachable(me, remote):
                return self._accept(listener, remote, address)
            # A partition or pause began during the handshake: wait again.

    def _find(self, address: str, expected_peer_id: str | None) -> _Listener:
        if self._peer.killed:
            raise TransportError(f"cannot reach {address}: this peer ({self._peer_id}) was killed")
        listener = self.network._listeners.get(address)
        if listener is None:
            raise TransportError(f"cannot reach {address}: no such address")
        if expected_peer_id is not None and listener.peer_id != expected_peer_id:
            raise TransportError(
                f"peer at {address} is {listener.peer_id}, expected {expected_peer_id} (pinning failed)"
            )
        return listener

    def _accept(self, listener: _Listener, remote: _Peer, address: str) -> Connection:
        network = self.network
        conn = network._open(self._peer, remote, address, trio.current_time())
        ours = SimStream(network, conn, conn.forward, conn.backward)
        theirs = SimStream(network, conn, conn.backward, conn.forward)
        try:
            listener.incoming.send_nowait(Connection(theirs, self._peer_id))
        except trio.WouldBlock:
            reason = "connection refused (backlog full)"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "connection refused"
        else:
            return Connection(ours, remote.peer_id)
        ours.close()
        theirs.close()
        network._record("refused", self._peer_id, address, reason)
        raise TransportError(f"cannot reach {address}: {reason}")

    async def serve(
        self,
        listen: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """As base.Transport.serve. If this peer is killed, the address is unbound and this
        waits, serving nothing, until cancelled."""
        if self._peer.killed:
            raise TransportError(f"cannot listen on {listen}: this peer ({self._peer_id}) was killed")
        send, receive = trio.open_memory_channel[Connection](self.network.backlog)
        listener = _Listener(self._peer_id, send)
        address = self.network._bind(listen, listener)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(address)
                async for connection in receive:
                    nursery.start_soon(_run_handler, handler, connection, address)
                await trio.sleep_forever()  # killed: handlers end as their streams break
        finally:
            self.network._unbind(address, listener)
            send.close()
            # Connections nobody will handle: close them so their clients see EOF.
            while True:
                try:
                    stream = receive.receive_nowait().stream
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                assert isinstance(stream, SimStream)
                stream.close()
            receive.close()


async def _run_handler(handler: Handler, connection: Connection, address: str) -> None:
    try:
        await handler(connection)
    except Exception:
        log.exception("handler on %s for %s failed", address, connection.remote_peer_id)
    finally:
        stream = connection.stream
        assert isinstance(stream, SimStream)
        stream.close()
