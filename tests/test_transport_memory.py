"""MemoryTransport: in-process connections, under a MockClock."""

import numpy as np
import pytest
import trio

from p2ptrain.node.link import Link, LinkClosed
from p2ptrain.transport.base import Connection, TransportError
from p2ptrain.transport.memory import MemoryNetwork, MemoryTransport
from p2ptrain.wire.codec import Frame


async def echo(connection: Connection) -> None:
    link = Link(connection)
    try:
        while True:
            frame = await link.receive()
            await trio.sleep(1.0)  # virtual time under the MockClock
            await link.send(Frame("echo", {"from": connection.remote_peer_id, **frame.fields}, frame.arrays))
    except LinkClosed:
        pass


async def test_connect_send_receive_under_mock_clock(autojump_clock):
    network = MemoryNetwork()
    a, b = MemoryTransport(network, "peer-a"), MemoryTransport(network, "peer-b")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(b.serve, "mem:0", echo)
        assert address == "mem:1" and network.addresses() == ["mem:1"]
        connection = await a.connect(address, "peer-b")
        assert connection.remote_peer_id == "peer-b"
        link = Link(connection)
        start = trio.current_time()
        await link.send(Frame("ping", {"n": 1}, (np.arange(10, dtype=np.float32),)))
        reply = await link.receive()
        assert trio.current_time() - start == pytest.approx(1.0)
        assert reply.fields == {"from": "peer-a", "n": 1}
        np.testing.assert_array_equal(reply.arrays[0], np.arange(10, dtype=np.float32))
        await link.aclose()
        nursery.cancel_scope.cancel()
    assert network.addresses() == []  # unbound when serve ends


async def test_addresses_are_deterministic_and_unique(autojump_clock):
    network = MemoryNetwork()
    transports = [MemoryTransport(network, f"p{i}") for i in range(3)]
    async with trio.open_nursery() as nursery:
        addresses = [await nursery.start(t.serve, "10.0.0.1:0", echo) for t in transports]
        assert addresses == ["10.0.0.1:1", "10.0.0.1:2", "10.0.0.1:3"]
        assert await nursery.start(transports[0].serve, "mem:bootstrap", echo) == "mem:bootstrap"
        with pytest.raises(TransportError, match="cannot listen on mem:bootstrap: address already in use"):
            await transports[1].serve("mem:bootstrap", echo)
        nursery.cancel_scope.cancel()


async def test_unknown_address_and_wrong_pin(autojump_clock):
    network = MemoryNetwork()
    a, b = MemoryTransport(network, "peer-a"), MemoryTransport(network, "peer-b")
    with pytest.raises(TransportError, match="cannot reach mem:nobody: no such address"):
        await a.connect("mem:nobody")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(b.serve, "mem:0", echo)
        with pytest.raises(TransportError, match="is peer-b, expected peer-x .pinning failed"):
            await a.connect(address, "peer-x")
        assert (await a.connect(address)).remote_peer_id == "peer-b"  # trust on first use
        nursery.cancel_scope.cancel()
    with pytest.raises(TransportError, match="no such address"):
        await a.connect(address)


async def test_failing_handler_closes_only_its_connection(autojump_clock):
    network = MemoryNetwork()
    a, b = MemoryTransport(network, "peer-a"), MemoryTransport(network, "peer-b")
    calls = []

    async def handler(connection: Connection) -> None:
        calls.append(connection.remote_peer_id)
        if len(calls) == 1:
            raise RuntimeError("handler bug")
        await echo(connection)

    async with trio.open_nursery() as nursery:
        address = await nursery.start(b.serve, "mem:0", handler)
        first = Link(await a.connect(address))
        with pytest.raises(LinkClosed):
            await first.receive()
        second = Link(await a.connect(address))
        await second.send(Frame("ping", {}))
        assert (await second.receive()).kind == "echo"
        nursery.cancel_scope.cancel()


async def test_server_shutdown_closes_its_connections(autojump_clock):
    network = MemoryNetwork()
    a, b = MemoryTransport(network, "peer-a"), MemoryTransport(network, "peer-b")
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            with server_scope:
                await b.serve("mem:0", echo, task_status=task_status)

        address = await nursery.start(serve)
        link = Link(await a.connect(address))
        await trio.sleep(5)
        server_scope.cancel()
        with pytest.raises(LinkClosed):
            await link.receive()
