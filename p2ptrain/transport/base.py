"""The Transport interface: the only way node code reaches the network.

Two implementations: `tcp_tls.TlsTransport` (real TCP + mutual TLS 1.3 with pinned
peer ids) and `memory.MemoryTransport` (in-process, for tests and simulation). Node
code must not know which one it runs on.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio


class TransportError(Exception):
    """A connection could not be made or authenticated.

    The message is one clear line meant for a user, e.g.
    "cannot reach 127.0.0.1:7070: connection refused" or
    "peer at 127.0.0.1:7071 is 3fa1..., expected 9bc2... (pinning failed)".
    """


@dataclass(frozen=True)
class Connection:
    """An authenticated byte stream to a peer whose identity has been checked."""

    stream: trio.abc.Stream
    remote_peer_id: str


Handler = Callable[[Connection], Awaitable[None]]


class Transport(abc.ABC):
    """Opens authenticated connections and serves incoming ones."""

    @property
    @abc.abstractmethod
    def peer_id(self) -> str:
        """This side's own peer id."""

    @abc.abstractmethod
    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        """Connect to `address` ("host:port").

        With `expected_peer_id`, the remote side must prove it holds that id's key, else
        TransportError. With None (first contact with a bootstrap), any identity is
        accepted and reported in `Connection.remote_peer_id` (trust on first use).
        Raises TransportError with a one-line reason on any failure.
        """

    @abc.abstractmethod
    async def serve(
        self,
        listen: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on `listen` ("host:port"; port 0 picks a free one) until
        cancelled. Calls `task_status.started(bound_address)` once listening, with the
        real "host:port". Each accepted, authenticated connection is handed to `handler`
        in its own task; the handler owns the stream. A failing handshake or a handler
        that raises is logged and closes only that connection, never the server.
        """
