"""TlsTransport and Identity over real sockets on 127.0.0.1 (port 0 only)."""

import logging
import os
import socket
import stat
import struct

import pytest
import trio

from p2ptrain.transport.base import Connection, TransportError
from p2ptrain.transport.identity import (
    CERT_FILE,
    KEY_FILE,
    Identity,
    IdentityError,
    peer_id_from_cert_der,
)
from p2ptrain.transport.tcp_tls import MAGIC, TlsTransport

# -- identity ---------------------------------------------------------------------------


def test_identity_persists_in_state_dir(tmp_path):
    first = Identity.load_or_create(tmp_path / "state")
    second = Identity.load_or_create(tmp_path / "state")
    assert first.peer_id == second.peer_id and first.cert_der == second.cert_der
    assert len(first.peer_id) == 32 and int(first.peer_id, 16) >= 0
    key_mode = stat.S_IMODE(os.stat(tmp_path / "state" / KEY_FILE).st_mode)
    assert key_mode == 0o600
    assert (tmp_path / "state" / CERT_FILE).read_bytes() == first.cert_pem
    assert peer_id_from_cert_der(first.cert_der) == first.peer_id
    assert "PRIVATE" not in repr(first)


def test_identity_recovers_cert_and_tightens_key_mode(tmp_path):
    first = Identity.load_or_create(tmp_path)
    (tmp_path / CERT_FILE).unlink()
    os.chmod(tmp_path / KEY_FILE, 0o644)
    again = Identity.load_or_create(tmp_path)
    assert again.peer_id == first.peer_id and (tmp_path / CERT_FILE).exists()
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600


def test_ephemeral_identities_differ_and_bad_inputs_are_refused(tmp_path):
    assert Identity.load_or_create(None).peer_id != Identity.load_or_create(None).peer_id
    (tmp_path / KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="cannot load identity key"):
        Identity.load_or_create(tmp_path)
    with pytest.raises(IdentityError, match="not a valid certificate"):
        peer_id_from_cert_der(b"\x30\x03garbage")


# -- helpers ----------------------------------------------------------------------------


class Server:
    """A TlsTransport serving on 127.0.0.1:0 that records who connected."""

    def __init__(self, **kw):
        self.transport = TlsTransport(Identity.generate(), **kw)
        self.seen: list[str] = []

    async def handler(self, connection: Connection) -> None:
        self.seen.append(connection.remote_peer_id)
        await connection.stream.send_all(b"hi " + connection.remote_peer_id.encode())
        await connection.stream.receive_some(1)  # until the client closes

    async def start(self, nursery) -> str:
        return await nursery.start(self.transport.serve, "127.0.0.1:0", self.handler)


async def talk(client: TlsTransport, address: str, expected: str | None) -> Connection:
    connection = await client.connect(address, expected)
    greeting = await connection.stream.receive_some(100)
    assert greeting == b"hi " + client.peer_id.encode()
    return connection


async def raw_client(address: str, payload: bytes, *, wait_for_close: bool = True) -> bytes:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        await stream.send_all(payload)
        if not wait_for_close:
            return b""
        with trio.fail_after(5):
            try:
                return await stream.receive_some(100)
            except trio.BrokenResourceError:
                return b""
    finally:
        await stream.aclose()


# -- connections ------------------------------------------------------------------------


async def test_pinned_connect_both_sides_see_correct_peer_ids():
    server, client = Server(), TlsTransport(Identity.generate())
    async with trio.open_nursery() as nursery:
        address = await server.start(nursery)
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        connection = await talk(client, address, server.transport.peer_id)
        assert connection.remote_peer_id == server.transport.peer_id
        await connection.stream.aclose()
        # trust on first use: no pin, the server's id is reported
        connection = await talk(client, address, None)
        assert connection.remote_peer_id == server.transport.peer_id
        await connection.stream.aclose()
        nursery.cancel_scope.cancel()
    assert server.seen == [client.peer_id, client.peer_id]


async def test_wrong_pin_is_a_transport_error_and_server_carries_on():
    server, client = Server(), TlsTransport(Identity.generate())
    wrong = Identity.generate().peer_id
    async with trio.open_nursery() as nursery:
        address = await server.start(nursery)
        with pytest.raises(TransportError, match=f"is {server.transport.peer_id}, expected {wrong} .pinning failed"):
            await client.connect(address, wrong)
        connection = await talk(client, address, server.transport.peer_id)
        await connection.stream.aclose()
        nursery.cancel_scope.cancel()
    assert server.seen == [client.peer_id]  # the handler never saw the rejecting client


async def test_unreachable_and_bad_addresses():
    client = TlsTransport(Identity.generate())
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        with pytest.raises(TransportError, match=f"cannot reach 127.0.0.1:{port}: connection refused"):
            await client.connect(f"127.0.0.1:{port}")
    with pytest.raises(TransportError, match="bad address"):
        await client.connect("no-port-here")
    with pytest.raises(TransportError, match="bad address"):
        await client.connect("127.0.0.1:99999")


async def test_silent_server_is_a_handshake_timeout():
    client = TlsTransport(Identity.generate(), handshake_timeout_s=0.3)

    async def silent(stream):
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(TransportError, match="handshake with .* timed out after 0.3 s"):
            await client.connect(f"127.0.0.1:{port}")
        nursery.cancel_scope.cancel()


async def test_bad_clients_do_not_stop_the_server(caplog):
    caplog.set_level(logging.INFO, logger="p2ptrain.transport")
    server = Server(handshake_timeout_s=0.5)
    client = TlsTransport(Identity.generate())
    head = struct.Struct("<4sI")
    async with trio.open_nursery() as nursery:
        address = await server.start(nursery)
        # garbage instead of a hello
        assert await raw_client(address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        # a hello announcing a huge certificate
        assert await raw_client(address, head.pack(MAGIC, 2**31)) == b""
        # a hello whose certificate is garbage
        assert await raw_client(address, head.pack(MAGIC, 5) + b"\x30\x03abc") == b""
        # drops mid-hello
        await raw_client(address, head.pack(MAGIC, 300) + b"\x30\x82", wait_for_close=False)
        # silent after half a hello: the server's handshake timeout closes it
        assert await raw_client(address, head.pack(MAGIC, 300)) == b""
        # a valid hello, then garbage instead of a TLS ClientHello
        cert = client.identity.cert_der
        assert await raw_client(address, head.pack(MAGIC, len(cert)) + cert + b"\x00" * 64) == b""
        # a client whose TLS certificate is not the one in its hello
        impostor = TlsTransport(Identity.generate())
        impostor._client_context = client._get_client_context()  # hello and TLS key disagree
        with pytest.raises(TransportError, match="handshake with .* failed"):
            await impostor.connect(address, server.transport.peer_id)

        # a handler that raises is logged and only closes its own connection
        connection = await talk(client, address, server.transport.peer_id)
        await connection.stream.aclose()
        nursery.cancel_scope.cancel()
    assert server.seen == [client.peer_id]
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused connection")]
    assert len(refusals) == 7, refusals
    assert any("not a p2ptrain client" in r for r in refusals)
    assert any("hello certificate of 2147483648 bytes" in r for r in refusals)
    assert any("timed out" in r for r in refusals)
    assert any("certificate verify failed" in r for r in refusals)  # the impostor


async def test_failing_handler_is_logged_and_server_carries_on(caplog):
    transport, client = TlsTransport(Identity.generate()), TlsTransport(Identity.generate())
    calls = []

    async def handler(connection: Connection) -> None:
        calls.append(connection.remote_peer_id)
        if len(calls) == 1:
            raise RuntimeError("handler bug")
        await connection.stream.send_all(b"ok")

    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, "127.0.0.1:0", handler)
        first = await client.connect(address, transport.peer_id)
        try:
            data = await first.stream.receive_some(10)
        except trio.BrokenResourceError:
            data = b""
        assert data == b""  # closed by the server
        second = await client.connect(address, transport.peer_id)
        assert await second.stream.receive_some(10) == b"ok"
        for c in (first, second):
            await c.stream.aclose()
        nursery.cancel_scope.cancel()
    assert any(r.exc_info and "handler bug" in str(r.exc_info[1]) for r in caplog.records)


async def test_pending_handshakes_are_bounded(caplog):
    server = Server(max_pending_handshakes=1, handshake_timeout_s=0.5)
    client = TlsTransport(Identity.generate())
    async with trio.open_nursery() as nursery:
        address = await server.start(nursery)
        host, port = address.rsplit(":", 1)
        silent = await trio.open_tcp_stream(host, int(port))  # holds the only slot
        await trio.sleep(0.05)
        with pytest.raises(TransportError):
            await client.connect(address, server.transport.peer_id)
        await trio.sleep(0.6)  # the silent one times out and frees its slot
        connection = await talk(client, address, server.transport.peer_id)
        await connection.stream.aclose()
        await silent.aclose()
        nursery.cancel_scope.cancel()
    assert any("handshakes already pending" in r.getMessage() for r in caplog.records)


async def test_listen_on_a_busy_port_is_a_transport_error():
    transport = TlsTransport(Identity.generate())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TransportError, match=f"cannot listen on 127.0.0.1:{port}: address already in use"):
            await transport.serve(f"127.0.0.1:{port}", lambda c: None)
