"""In-process transport for tests and the deterministic simulation.

A `MemoryNetwork` is a registry of listening addresses within one trio run; each
`MemoryTransport` is one peer on it with a given peer id (no cryptography: identities are
taken as declared). Streams are `trio.testing.memory_stream_pair()`s, so nothing touches
the OS or the wall clock and everything runs under `trio.testing.MockClock`.

Addresses are any strings ("mem:NAME", "10.0.0.1:7070"); one ending in ":0" is given the
network's next free number in place of the 0 (a counter, so runs are reproducible).

Streams deliver instantly with unbounded buffering for now; latency, bandwidth, loss and
partitions belong to the simulated network that builds on this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
import trio.testing

from .base import Connection, Handler, Transport, TransportError

log = logging.getLogger("p2ptrain.transport")


@dataclass(frozen=True)
class _Listener:
    peer_id: str
    incoming: trio.MemorySendChannel[Connection]


class MemoryNetwork:
    """Where MemoryTransports find each other. `backlog` bounds connections waiting to be
    handed to a server's handler; a connect beyond it is refused."""

    def __init__(self, *, backlog: int = 64) -> None:
        self.backlog = backlog
        self._listeners: dict[str, _Listener] = {}
        self._next_number = 1

    def addresses(self) -> list[str]:
        """Addresses being served now, sorted."""
        return sorted(self._listeners)

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

    def _unbind(self, address: str) -> None:
        del self._listeners[address]


class MemoryTransport(Transport):
    """One peer on a MemoryNetwork; implements base.Transport."""

    def __init__(self, network: MemoryNetwork, peer_id: str) -> None:
        self.network = network
        self._peer_id = peer_id

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        await trio.lowlevel.checkpoint()
        listener = self.network._listeners.get(address)
        if listener is None:
            raise TransportError(f"cannot reach {address}: no such address")
        if expected_peer_id is not None and listener.peer_id != expected_peer_id:
            raise TransportError(
                f"peer at {address} is {listener.peer_id}, expected {expected_peer_id} (pinning failed)"
            )
        ours, theirs = trio.testing.memory_stream_pair()
        try:
            listener.incoming.send_nowait(Connection(theirs, self._peer_id))
        except trio.WouldBlock:
            raise TransportError(f"cannot reach {address}: connection refused (backlog full)") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportError(f"cannot reach {address}: connection refused") from None
        return Connection(ours, listener.peer_id)

    async def serve(
        self,
        listen: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        send, receive = trio.open_memory_channel[Connection](self.network.backlog)
        address = self.network._bind(listen, _Listener(self._peer_id, send))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(address)
                async for connection in receive:
                    nursery.start_soon(_run_handler, handler, connection, address)
        finally:
            self.network._unbind(address)
            send.close()
            # Connections nobody will handle: close them so their clients see EOF.
            while True:
                try:
                    _close_now(receive.receive_nowait().stream)
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            receive.close()


async def _run_handler(handler: Handler, connection: Connection, address: str) -> None:
    try:
        await handler(connection)
    except Exception:
        log.exception("handler on %s for %s failed", address, connection.remote_peer_id)
    finally:
        _close_now(connection.stream)


def _close_now(stream: trio.abc.Stream) -> None:
    """Close a memory_stream_pair stream without a checkpoint (safe in a cancelled scope)."""
    assert isinstance(stream, trio.StapledStream)
    stream.send_stream.close()
    stream.receive_stream.close()
