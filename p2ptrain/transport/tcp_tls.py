"""TlsTransport: TCP + mutual TLS 1.3 between self-signed identities, pinned by peer id.

Connection setup (client -> server), all under timeouts:

1. TCP connect (connect_timeout_s).
2. Plaintext hello from the client: MAGIC, u32 little-endian length, the client's DER
   certificate (at most max_hello_bytes). Python's ssl cannot accept an unknown self-signed
   client certificate, so the server builds a per-connection SSLContext that trusts exactly
   this certificate (CERT_REQUIRED).
3. TLS 1.3 handshake (handshake_timeout_s covers steps 2-4). The client presents the same
   certificate and its CertificateVerify proves it holds the key; the server checks that
   the certificate is byte-identical to the hello's and derives the client's peer id from
   it. The client accepts any server certificate in the handshake (CERT_NONE: there is no
   CA), and the server's CertificateVerify proves it holds that certificate's key; the
   client then compares its peer id with the pinned one (or trusts it on first use).
4. Each side sends ACCEPT_BYTE once it is satisfied and waits for the other's. In TLS 1.3
   a client the server rejects would otherwise find out only at its first read, and a
   server would otherwise hand its handler a client that had just rejected the server.

Every failure is a TransportError with a one-line reason. A bad incoming connection is
logged on "p2ptrain.transport" and closed; the server and other connections carry on.

Throughput: trio's SSLStream reads at most 64 KiB from the socket at a time and returns
one 16 KiB TLS record per receive_some. `_TlsStream` (the stream handed to handlers and
returned by connect) reads up to READ_CHUNK_BYTES from the socket and drains all the
whole records already received in one receive_some; see simulations/link_bench.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import ssl
import struct
import tempfile
from functools import partial
from typing import Iterator

import trio

from .base import Connection, Handler, Transport, TransportError
from .identity import Identity, IdentityError, peer_id_from_cert_der

log = logging.getLogger("p2ptrain.transport")

MAGIC = b"p2pT"  # first bytes of the hello; lets garbage be refused before any parsing
_HELLO_HEAD = struct.Struct("<4sI")
ACCEPT_BYTE = b"\x01"

# Bytes asked of the socket per read under TLS. trio's default of 64 KiB meant 4 records per
# read; a larger read lets one receive_some decrypt many records back to back.
READ_CHUNK_BYTES = 256 * 2**10


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"; TransportError if malformed."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise TransportError(f"bad address {address!r}: expected HOST:PORT")
    return host, int(port_text)


def format_address(sockaddr: tuple) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TlsTransport(Transport):
    """Transport over TCP and mutual TLS 1.3 (see the module docstring).

    connect_timeout_s bounds the TCP connect; handshake_timeout_s bounds hello, TLS
    handshake and accept exchange, on both sides. max_hello_bytes bounds the certificate a
    client may send. At most max_pending_handshakes incoming connections are in setup at
    once per serve(); more are closed at once (so slow or silent clients cannot pile up).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        connect_timeout_s: float = 10.0,
        handshake_timeout_s: float = 10.0,
        max_hello_bytes: int = 8192,
        max_pending_handshakes: int = 64,
    ) -> None:
        self.identity = identity
        self.connect_timeout_s = connect_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.max_hello_bytes = max_hello_bytes
        self.max_pending_handshakes = max_pending_handshakes
        self._client_context: ssl.SSLContext | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    # -- client ---------------------------------------------------------------------------

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        host, port = parse_address(address)
        try:
            with trio.fail_after(self.connect_timeout_s):
                raw = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise TransportError(f"cannot reach {address}: no answer within {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise TransportError(f"cannot reach {address}: {_os_reason(exc)}") from None

        stream: _TlsStream | None = None
        try:
            with trio.fail_after(self.handshake_timeout_s):
                stream = _TlsStream(raw, self._get_client_context(), server_side=False)
                hello = _HELLO_HEAD.pack(MAGIC, len(self.identity.cert_der)) + self.identity.cert_der
                await raw.send_all(hello)
                await stream.ssl_stream.do_handshake()
                remote_peer_id = peer_id_from_cert_der(stream.ssl_stream.getpeercert(binary_form=True))
                if expected_peer_id is not None and remote_peer_id != expected_peer_id:
                    raise TransportError(
                        f"peer at {address} is {remote_peer_id}, expected {expected_peer_id} (pinning failed)"
                    )
                await stream.send_all(ACCEPT_BYTE)
                if await stream.receive_some(1) != ACCEPT_BYTE:
                    raise TransportError(f"peer at {address} refused the connection")
        except BaseException as exc:
            await trio.aclose_forcefully(stream if stream is not None else raw)
            if isinstance(exc, trio.TooSlowError):
                raise TransportError(
                    f"handshake with {address} timed out after {self.handshake_timeout_s:g} s"
                ) from None
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                raise TransportError(f"handshake with {address} failed: {_tls_reason(exc)}") from None
            if isinstance(exc, IdentityError):
                raise TransportError(f"peer at {address} sent a bad certificate: {exc}") from None
            raise
        return Connection(stream=stream, remote_peer_id=remote_peer_id)

    def _get_client_context(self) -> ssl.SSLContext:
        if self._client_context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            # No CA and no host names: the server's key is checked against the pinned peer
            # id after the handshake, whose CertificateVerify proves possession of the key.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with _identity_file(self.identity) as path:
                context.load_cert_chain(path)
            self._client_context = context
        return self._client_context

    # -- server ---------------------------------------------------------------------------

    async def serve(
        self,
        listen: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        host, port = parse_address(listen)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
        except OSError as exc:
            raise TransportError(f"cannot listen on {listen}: {_os_reason(exc)}") from None
        bound = format_address(listeners[0].socket.getsockname())
        slots = trio.CapacityLimiter(self.max_pending_handshakes)
        # Every accepted connection needs a fresh SSLContext holding our key, and ssl loads
        # keys only from files: keep one private file for as long as we serve.
        with _identity_file(self.identity) as identity_path:
            async with trio.open_nursery() as nursery:
                serve_one = partial(self._serve_connection, handler, slots, identity_path)
                await nursery.start(trio.serve_listeners, serve_one, listeners)
                log.info("listening on %s as %s", bound, self.peer_id)
                task_status.started(bound)

    async def _serve_connection(
        self, handler: Handler, slots: trio.CapacityLimiter, identity_path: str, raw: trio.SocketStream
    ) -> None:
        """Runs in its own task per accepted socket; never raises (that would stop serve)."""
        try:
            where = format_address(raw.socket.getpeername())
        except OSError:  # already disconnected
            await trio.aclose_forcefully(raw)
            return
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            log.warning("refused connection from %s: %d handshakes already pending", where, slots.total_tokens)
            await trio.aclose_forcefully(raw)
            return
        try:
            connection = await self._accept(raw, where, identity_path)
        except TransportError as exc:
            log.warning("refused connection from %s: %s", where, exc)
            return
        finally:
            slots.release()

        try:
            await handler(connection)
        except Exception:
            log.exception("handler for %s (%s) failed", connection.remote_peer_id, where)
        finally:
            with trio.move_on_after(2.0):  # bound the TLS goodbye to a peer that stopped reading
                await connection.stream.aclose()

    async def _accept(self, raw: trio.SocketStream, where: str, identity_path: str) -> Connection:
        """Hello, handshake and accept exchange; TransportError (stream closed) on failure."""
        stream: _TlsStream | None = None
        try:
            with trio.fail_after(self.handshake_timeout_s):
                magic, length = _HELLO_HEAD.unpack(await _receive_exactly(raw, _HELLO_HEAD.size))
                if magic != MAGIC:
                    raise TransportError(f"not a p2ptrain client (hello starts with {magic!r})")
                if not 0 < length <= self.max_hello_bytes:
                    raise TransportError(f"hello certificate of {length} bytes (limit {self.max_hello_bytes})")
                client_cert = await _receive_exactly(raw, length)
                remote_peer_id = peer_id_from_cert_der(client_cert)

                context = self._server_context(client_cert, identity_path)
                stream = _TlsStream(raw, context, server_side=True)
                await stream.ssl_stream.do_handshake()
                if stream.ssl_stream.getpeercert(binary_form=True) != client_cert:
                    raise TransportError("TLS certificate differs from the one in the hello")
                await stream.send_all(ACCEPT_BYTE)
                if await stream.receive_some(1) != ACCEPT_BYTE:
                    raise TransportError(f"client {remote_peer_id} closed the connection after the handshake")
        except BaseException as exc:
            await trio.aclose_forcefully(stream if stream is not None else raw)
            if isinstance(exc, TransportError):
                raise
            if isinstance(exc, trio.TooSlowError):
                raise TransportError(f"handshake timed out after {self.handshake_timeout_s:g} s") from None
            if isinstance(exc, IdentityError):
                raise TransportError(f"bad hello certificate: {exc}") from None
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)):
                raise TransportError(f"handshake failed: {_tls_reason(exc)}") from None
            raise
        log.info("accepted connection from %s (%s)", remote_peer_id, where)
        return Connection(stream=stream, remote_peer_id=remote_peer_id)

    def _server_context(self, client_cert_der: bytes, identity_path: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.num_tickets = 0  # no session resumption, so don't send tickets
        try:
            context.load_verify_locations(cadata=client_cert_der)
        except ssl.SSLError as exc:
            raise TransportError(f"hello certificate rejected by TLS: {exc.reason or exc}") from None
        context.load_cert_chain(identity_path)
        return context


class _TlsStream(trio.abc.Stream):
    """A trio SSLStream whose receive_some returns up to max_bytes of plaintext at once.

    trio's SSLStream returns one 16 KiB record per call; here, after one normal call, the
    records already read from the socket are decrypted too, without yielding (see the
    module docstring for why). Everything else is delegated to `ssl_stream`.
    """

    def __init__(self, raw: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool) -> None:
        # trio already sets TCP_NODELAY on TCP SocketStreams; say so explicitly, because
        # small control frames must not wait for Nagle's algorithm.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.raw_stream = raw
        self.ssl_stream = trio.SSLStream(_LargeReads(raw), context, server_side=server_side)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.ssl_stream.receive_some(max_bytes)
        if max_bytes is None or len(data) >= max_bytes or not data:
            return data
        # Private attribute of trio 0.35's SSLStream (the version is pinned). Reading here is
        # safe: it only consumes bytes already in the incoming buffer, and we are inside no
        # other SSLStream call. An SSLWantReadError means the buffer holds no whole record.
        ssl_object = self.ssl_stream._ssl_object
        chunks = [data]
        wanted = max_bytes - len(data)
        while wanted > 0:
            try:
                more = ssl_object.read(wanted)
            except ssl.SSLError:
                break  # no whole record buffered, or an error the next call will report
            if not more:
                break
            chunks.append(more)
            wanted -= len(more)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.ssl_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.ssl_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.ssl_stream.aclose()


class _LargeReads(trio.abc.Stream):
    """The socket stream under SSLStream, reading READ_CHUNK_BYTES when asked for "some"."""

    def __init__(self, raw: trio.SocketStream) -> None:
        self.raw = raw

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.raw.receive_some(READ_CHUNK_BYTES if max_bytes is None else max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.raw.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.raw.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.raw.aclose()


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """Exactly n bytes, asking for no more (the TLS handshake follows on the same socket)."""
    buffer = bytearray()
    while len(buffer) < n:
        data = await stream.receive_some(n - len(buffer))
        if not data:
            raise TransportError(f"connection closed during the hello ({len(buffer)} of {n} bytes)")
        buffer += data
    return bytes(buffer)


@contextlib.contextmanager
def _identity_file(identity: Identity) -> Iterator[str]:
    """A PEM file with the identity's key and certificate, for SSLContext.load_cert_chain
    (ssl loads them from files only). It lives in a private (0700) temporary directory
    that is removed on exit."""
    directory = tempfile.mkdtemp(prefix="p2ptrain-tls-")
    try:
        path = os.path.join(directory, "identity.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(identity.key_pem + identity.cert_pem)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _os_reason(exc: BaseException) -> str:
    """A short reason such as "connection refused", from an OSError or what caused it
    (trio.open_tcp_stream wraps per-address errors in a group)."""
    seen = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, socket.gaierror) and current.strerror:
            return current.strerror[0].lower() + current.strerror[1:]
        if isinstance(current, OSError) and current.errno:
            # os.strerror, not .strerror: trio puts the whole "error connecting to ..." there
            text = os.strerror(current.errno)
            return text[0].lower() + text[1:]
        todo.extend(getattr(current, "exceptions", ()))
        if current.__cause__ is not None:
            todo.append(current.__cause__)
        if current.__context__ is not None:
            todo.append(current.__context__)
    return str(exc) or type(exc).__name__


def _tls_reason(exc: BaseException) -> str:
    """A short reason for a failed TLS exchange (trio wraps ssl errors in BrokenResourceError)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return cause.reason.lower().replace("_", " ")
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    if isinstance(exc, trio.ClosedResourceError):
        return "connection closed"
    text = str(cause)
    return text if text else "connection closed by the peer"
