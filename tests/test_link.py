"""Link: whole frames over streams (in-memory streams, and real TLS for the bulk case)."""

import struct

import msgpack
import numpy as np
import pytest
import trio
import trio.testing

from p2ptrain.node.link import Link, LinkClosed
from p2ptrain.transport.base import Connection
from p2ptrain.transport.identity import Identity
from p2ptrain.transport.tcp_tls import TlsTransport
from p2ptrain.wire.codec import Frame, FrameError, encode_frame


def memory_links(**kw) -> tuple[Link, Link]:
    a, b = trio.testing.memory_stream_pair()
    return Link(Connection(a, "B"), **kw), Link(Connection(b, "A"), **kw)


def wire(frame: Frame) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(frame))


async def test_bulk_and_small_frames_concurrently_over_tls():
    server, client = TlsTransport(Identity.generate()), TlsTransport(Identity.generate())
    bulk = np.random.default_rng(0).standard_normal(2**20).astype(np.float32)  # 4 MiB
    received: list[Frame] = []
    all_received = trio.Event()

    async def handler(connection: Connection) -> None:
        link = Link(connection)
        assert link.remote_peer_id == client.peer_id
        while len(received) < 3 + 100:
            received.append(await link.receive())
        await link.send(Frame("thanks", {}))
        all_received.set()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1:0", handler)
        link = Link(await client.connect(address, server.peer_id))
        assert link.remote_peer_id == server.peer_id

        async def send_bulk() -> None:
            for i in range(3):
                await link.send(Frame("forward", {"mb": i}, (bulk + i,)))

        async def send_small() -> None:
            for i in range(100):
                await link.send(Frame("heartbeat", {"i": i}, (np.array([i], np.int64),)))
                await trio.sleep(0)

        async with trio.open_nursery() as senders:
            senders.start_soon(send_bulk)
            senders.start_soon(send_small)
        assert (await link.receive()).kind == "thanks"
        await all_received.wait()
        await link.aclose()
        nursery.cancel_scope.cancel()

    bulks = [f for f in received if f.kind == "forward"]
    smalls = [f for f in received if f.kind == "heartbeat"]
    assert [f.fields["mb"] for f in bulks] == [0, 1, 2]
    for i, frame in enumerate(bulks):
        assert frame.arrays[0].dtype == np.float32 and frame.arrays[0].shape == bulk.shape
        np.testing.assert_array_equal(frame.arrays[0], bulk + i)
    assert [f.fields["i"] for f in smalls] == list(range(100))
    assert [int(f.arrays[0][0]) for f in smalls] == list(range(100))


async def test_concurrent_senders_never_interleave():
    a, b = memory_links()
    arrays = {name: np.full(100_000 + k, k, np.int32) for k, name in enumerate("xyz")}

    async def sender(name: str) -> None:
        for i in range(5):
            await a.send(Frame(name, {"i": i}, (arrays[name],)))

    async with trio.open_nursery() as nursery:
        for name in arrays:
            nursery.start_soon(sender, name)
        seen = {name: [] for name in arrays}
        for _ in range(15):
            frame = await b.receive()
            seen[frame.kind].append(frame.fields["i"])
            np.testing.assert_array_equal(frame.arrays[0], arrays[frame.kind])
    assert seen == {name: list(range(5)) for name in arrays}


async def test_many_small_frames_in_one_chunk():
    a, b = trio.testing.memory_stream_pair()
    link = Link(Connection(b, "A"))
    await a.send_all(b"".join(wire(Frame("hb", {"i": i})) for i in range(50)))
    assert [(await link.receive()).fields["i"] for _ in range(50)] == list(range(50))


async def test_frame_above_the_cap_raises_frame_error_then_link_is_unusable():
    sender, receiver = memory_links()
    receiver.max_frame_bytes = 2**20
    await sender.send(Frame("forward", {}, (np.zeros(2**20, np.float32),)))  # 4 MiB > 1 MiB
    with pytest.raises(FrameError, match="exceeds the cap of 1048576"):
        await receiver.receive()
    with pytest.raises(LinkClosed, match="out of sync"):
        await receiver.receive()


async def test_send_above_own_cap_raises_before_sending():
    sender, receiver = memory_links(max_frame_bytes=1000)
    with pytest.raises(FrameError, match="exceeds the cap"):
        await sender.send(Frame("x", {}, (np.zeros(1000, np.uint8),)))
    await sender.send(Frame("ok", {}))  # the link is still in sync
    assert (await receiver.receive()).kind == "ok"


async def test_malformed_frame_raises_frame_error():
    a, b = trio.testing.memory_stream_pair()
    link = Link(Connection(b, "A"))
    header = msgpack.packb({"k": "x", "f": {}, "a": [["complex128", [1]]]})
    body = struct.pack("<I", len(header)) + header + b"\x00" * 16
    await a.send_all(struct.pack("<Q", len(body)) + body)
    with pytest.raises(FrameError, match="complex128"):
        await link.receive()


async def test_eof_between_frames_and_mid_frame_are_link_closed():
    a, b = trio.testing.memory_stream_pair()
    link = Link(Connection(b, "A"))
    await a.send_all(wire(Frame("one", {})))
    await a.aclose()
    assert (await link.receive()).kind == "one"
    with pytest.raises(LinkClosed, match="closed by the other side"):
        await link.receive()

    a, b = trio.testing.memory_stream_pair()
    link = Link(Connection(b, "A"))
    await a.send_all(wire(Frame("two", {}, (np.ones(100, np.float32),)))[:-10])
    await a.aclose()
    with pytest.raises(LinkClosed, match="mid-frame"):
        await link.receive()


async def test_receive_survives_cancellation_mid_frame():
    a, b = trio.testing.memory_stream_pair()
    link = Link(Connection(b, "A"))
    data = wire(Frame("forward", {"mb": 7}, (np.arange(50_000, dtype=np.float32),)))
    for cut in (3, 30, 70_000, len(data)):  # inside the prefix, the header, the array
        await a.send_all(data[: cut])
        data = data[cut:]
        if data:
            with trio.move_on_after(0.01) as scope:
                await link.receive()
            assert scope.cancelled_caught
    frame = await link.receive()
    assert frame.fields == {"mb": 7}
    np.testing.assert_array_equal(frame.arrays[0], np.arange(50_000, dtype=np.float32))


async def test_send_and_receive_after_close_raise_link_closed():
    a, b = memory_links()
    await a.aclose()
    await a.aclose()  # idempotent
    with pytest.raises(LinkClosed):
        await a.send(Frame("x", {}))
    with pytest.raises(LinkClosed):
        await a.receive()
    with pytest.raises(LinkClosed):
        await b.receive()


async def test_send_to_a_closed_peer_raises_link_closed():
    a, b = memory_links()
    await b.aclose()
    with pytest.raises(LinkClosed):
        await a.send(Frame("x", {}))
    with pytest.raises(LinkClosed):  # and stays closed
        await a.send(Frame("x", {}))


async def test_small_frames_overtake_queued_bulk_frames():
    # lockstep streams: a send_all blocks until the receiver has read it all, so bulk
    # frames queue up behind the one on the wire.
    a, b = trio.testing.lockstep_stream_pair()
    sender, receiver = Link(Connection(a, "B")), Link(Connection(b, "A"))
    bulk = np.zeros(2**18, np.float32)  # 1 MiB

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, Frame("bulk", {"i": 0}, (bulk,)))
        await trio.testing.wait_all_tasks_blocked()  # bulk 0 is on the wire
        for i in (1, 2):
            nursery.start_soon(sender.send, Frame("bulk", {"i": i}, (bulk,)))
            await trio.testing.wait_all_tasks_blocked()
        for i in (0, 1):
            nursery.start_soon(sender.send, Frame("heartbeat", {"i": i}))
            await trio.testing.wait_all_tasks_blocked()
        order = [(f.kind, f.fields["i"]) for f in [await receiver.receive() for _ in range(5)]]
    assert order == [("bulk", 0), ("heartbeat", 0), ("heartbeat", 1), ("bulk", 1), ("bulk", 2)]


async def test_cancelled_waiting_sender_does_not_break_the_link():
    a, b = trio.testing.lockstep_stream_pair()
    sender, receiver = Link(Connection(a, "B")), Link(Connection(b, "A"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, Frame("first", {}, (np.zeros(2**18, np.float32),)))
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.01):  # waits for the lock, never writes
            await sender.send(Frame("dropped", {}))
        nursery.start_soon(sender.send, Frame("second", {}))
        assert [(await receiver.receive()).kind for _ in range(2)] == ["first", "second"]
