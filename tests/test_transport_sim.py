"""SimTransport / SimNetwork: timing, sharing, faults and Link compatibility, in virtual time."""

import numpy as np
import pytest
import trio

from p2ptrain.node.link import Link, LinkClosed
from p2ptrain.sim.trace import Trace
from p2ptrain.transport.base import Connection, TransportError
from p2ptrain.transport.sim import LinkSpec, SimNetwork, SimStream, SimTransport
from p2ptrain.wire.codec import Frame

MB = 1e6


class Sink:
    """A handler that reads everything a connection sends and notes when each piece came."""

    def __init__(self) -> None:
        self.pieces: list[tuple[float, bytes]] = []
        self.error: Exception | None = None
        self.done = trio.Event()

    def data(self) -> bytes:
        return b"".join(p for _, p in self.pieces)

    async def __call__(self, connection: Connection) -> None:
        try:
            while data := await connection.stream.receive_some():
                self.pieces.append((trio.current_time(), data))
        except trio.BrokenResourceError as exc:
            self.error = exc
        finally:
            self.done.set()


def network(**link) -> SimNetwork:
    return SimNetwork(0, default_link=LinkSpec(**link))


async def test_bytes_arrive_intact_in_order_after_latency_plus_size_over_bandwidth(autojump_clock):
    net = network(latency_s=0.05, bandwidth_bytes_per_s=1 * MB)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    sink = Sink()
    payload = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(b.serve, "sim:0", sink)
        start = trio.current_time()
        connection = await a.connect(address, "b")
        assert connection.remote_peer_id == "b"
        assert trio.current_time() - start == pytest.approx(0.1)  # one round trip
        start = trio.current_time()
        await connection.stream.send_all(payload[:100_000])
        assert trio.current_time() - start == pytest.approx(0.1)  # left the uplink: n / bandwidth
        await connection.stream.send_all(memoryview(payload)[100_000:])  # any buffer works
        assert trio.current_time() - start == pytest.approx(0.3)
        await connection.stream.aclose()
        await sink.done.wait()
        nursery.cancel_scope.cancel()
    assert sink.data() == payload and sink.error is None
    # Each message arrives whole, one latency after its last byte left.
    assert [round(t - start, 6) for t, _ in sink.pieces] == [0.15, 0.35]


async def test_peer_access_links_and_latency_feed_the_link(autojump_clock):
    net = network(latency_s=0.01)
    net.set_peer("a", upload_bytes_per_s=2 * MB, download_bytes_per_s=10 * MB, latency_s=0.04)
    net.set_peer("b", upload_bytes_per_s=10 * MB, download_bytes_per_s=0.5 * MB, latency_s=0.02)
    assert net.latency_s("a", "b") == pytest.approx(0.01 + 0.03)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    sink = Sink()
    async with trio.open_nursery() as nursery:
        connection = await a.connect(await nursery.start(b.serve, "sim:0", sink))
        start = trio.current_time()
        await connection.stream.send_all(bytes(500_000))  # b's download is the bottleneck
        assert trio.current_time() - start == pytest.approx(1.0)
        await trio.sleep(1)
        assert sink.pieces[0][0] - start == pytest.approx(1.04)
        nursery.cancel_scope.cancel()


async def test_two_transfers_on_one_uplink_each_take_twice_as_long(autojump_clock):
    net = network(latency_s=0.0)
    net.set_peer("a", upload_bytes_per_s=1 * MB)
    a, b, c = (SimTransport(net, name) for name in "abc")
    finished: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        to_b = await a.connect(await nursery.start(b.serve, "sim:0", Sink()))
        to_c = await a.connect(await nursery.start(c.serve, "sim:0", Sink()))

        start = trio.current_time()
        await to_b.stream.send_all(bytes(1_000_000))
        assert trio.current_time() - start == pytest.approx(1.0)  # alone

        async def send(name: str, connection: Connection, size: int) -> None:
            await connection.stream.send_all(bytes(size))
            finished[name] = trio.current_time() - start

        start = trio.current_time()
        async with trio.open_nursery() as senders:
            senders.start_soon(send, "b", to_b, 1_000_000)
            senders.start_soon(send, "c", to_c, 1_000_000)
        assert finished == {"b": pytest.approx(2.0), "c": pytest.approx(2.0)}

        # Unequal sizes: both at 0.5 MB/s until the small one ends at 1 s, then 1 MB/s.
        start = trio.current_time()
        async with trio.open_nursery() as senders:
            senders.start_soon(send, "b", to_b, 500_000)
            senders.start_soon(send, "c", to_c, 1_500_000)
        assert finished == {"b": pytest.approx(1.0), "c": pytest.approx(2.0)}
        nursery.cancel_scope.cancel()


async def test_flows_into_one_downlink_share_it(autojump_clock):
    net = network(latency_s=0.0)
    net.set_peer("sink", download_bytes_per_s=1 * MB)
    net.set_peer("slow", upload_bytes_per_s=0.25 * MB)
    sink, fast, slow = (SimTransport(net, name) for name in ("sink", "fast", "slow"))
    finished: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve, "sim:0", Sink())
        connections = {"fast": await fast.connect(address), "slow": await slow.connect(address)}

        async def send(name: str) -> None:
            await connections[name].stream.send_all(bytes(500_000))
            finished[name] = trio.current_time() - start

        start = trio.current_time()
        async with trio.open_nursery() as senders:
            senders.start_soon(send, "fast")
            senders.start_soon(send, "slow")
        # Each gets half the downlink (0.5 MB/s), the slow one its own uplink (0.25 MB/s);
        # after the fast one ends at 1 s the slow one is still held by its uplink.
        assert finished == {"fast": pytest.approx(1.0), "slow": pytest.approx(2.0)}
        nursery.cancel_scope.cancel()


async def test_partition_blocks_and_heal_restores(autojump_clock):
    net = SimNetwork(0, default_link=LinkSpec(latency_s=0.01), connect_timeout_s=2.0)
    a, b, c = (SimTransport(net, name) for name in "abc")
    sinks: dict[str, Sink] = {}

    async def handler(connection: Connection) -> None:
        sinks[connection.remote_peer_id] = sink = Sink()
        await sink(connection)

    async with trio.open_nursery() as nursery:
        address = await nursery.start(b.serve, "sim:0", handler)
        connection = await a.connect(address)
        net.partition(["a", "c"], ["b"])
        with trio.move_on_after(5) as stalled:
            await connection.stream.send_all(b"x" * 1000)
        assert stalled.cancelled_caught and sinks["a"].pieces == []  # nothing crossed

        start = trio.current_time()
        with pytest.raises(TransportError, match="cannot reach sim:1: connection timed out"):
            await c.connect(address)
        assert trio.current_time() - start == pytest.approx(2.0)

        async def heal_later() -> None:
            await trio.sleep(1.0)
            net.heal()

        nursery.start_soon(heal_later)
        start = trio.current_time()
        late = await c.connect(address)  # waits for the heal, then one round trip
        assert trio.current_time() - start == pytest.approx(1.02)
        await connection.stream.send_all(b"after heal")
        await late.stream.send_all(b"from c")
        await trio.sleep(1)
        assert sinks["a"].data() == b"after heal" and sinks["c"].data() == b"from c"
        nursery.cancel_scope.cancel()


async def test_data_in_flight_waits_out_a_partition(autojump_clock):
    net = network(latency_s=0.5)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    sink = Sink()
    async with trio.open_nursery() as nursery:
        connection = await a.connect(await nursery.start(b.serve, "sim:0", sink))
        await connection.stream.send_all(b"in flight")
        net.partition(["a"], ["b"])
        await trio.sleep(3)
        assert sink.pieces == []
        net.heal()
        await trio.sleep(0)
        await trio.sleep(0.001)
        assert sink.data() == b"in flight"
        nursery.cancel_scope.cancel()


async def test_pause_queues_and_resume_delivers(autojump_clock):
    net = network(latency_s=0.1, bandwidth_bytes_per_s=1 * MB)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    sink = Sink()
    async with trio.open_nursery() as nursery:
        connection = await a.connect(await nursery.start(b.serve, "sim:0", sink))
        await connection.stream.send_all(b"1" * 100_000)  # 0.1 s on the uplink, then in flight
        net.pause("b")
        start = trio.current_time()

        async def resume_later() -> None:
            await trio.sleep(5)
            net.resume("b")

        nursery.start_soon(resume_later)
        await connection.stream.send_all(b"2" * 100_000)  # stalls: b takes nothing in
        assert trio.current_time() - start == pytest.approx(5.1)
        await trio.sleep(1)
        assert sink.data() == b"1" * 100_000 + b"2" * 100_000
        times = [t - start for t, _ in sink.pieces]
        assert times[0] == pytest.approx(5.0)  # held while paused, delivered on resume
        assert times[-1] == pytest.approx(5.2)
        nursery.cancel_scope.cancel()


async def test_paused_peer_sends_nothing(autojump_clock):
    net = network(latency_s=0.1)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    sink = Sink()
    async with trio.open_nursery() as nursery:
        connection = await a.connect(await nursery.start(b.serve, "sim:0", sink))
        net.pause("a")
        with trio.move_on_after(2):
            await connection.stream.send_all(b"stuck")
        assert sink.pieces == []
        nursery.cancel_scope.cancel()


async def test_kill_breaks_streams_promptly_and_refuses_connects(autojump_clock):
    net = network(latency_s=0.05)
    a, b, c = (SimTransport(net, name) for name in "abc")
    sink = Sink()
    async with trio.open_nursery() as nursery:
        b_address = await nursery.start(b.serve, "sim:0", sink)
        a_address = await nursery.start(a.serve, "sim:0", Sink())
        connection = await a.connect(b_address)
        from_c = await c.connect(a_address)
        await connection.stream.send_all(b"last words")
        await trio.sleep(1)
        killed_at = trio.current_time()
        net.kill("a")
        await sink.done.wait()
        assert trio.current_time() == killed_at  # promptly: at once in virtual time
        assert isinstance(sink.error, trio.BrokenResourceError) and sink.data() == b"last words"
        with pytest.raises(trio.BrokenResourceError):
            await from_c.stream.send_all(b"anyone?")
        with pytest.raises(trio.BrokenResourceError):
            await from_c.stream.receive_some()
        with pytest.raises(trio.BrokenResourceError):  # the dead side's own stream too
            await connection.stream.send_all(b"x")
        assert net.addresses() == [b_address]  # a's listener vanished
        with pytest.raises(TransportError, match="no such address"):
            await c.connect(a_address)
        with pytest.raises(TransportError, match="this peer .a. was killed"):
            await a.connect(b_address)
        with pytest.raises(TransportError, match="was killed"):
            await a.serve("sim:0", Sink())
        nursery.cancel_scope.cancel()


async def test_close_gives_eof_after_the_data(autojump_clock):
    net = network(latency_s=0.2)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    sink = Sink()
    async with trio.open_nursery() as nursery:
        connection = await a.connect(await nursery.start(b.serve, "sim:0", sink))
        await connection.stream.send_all(b"bye")
        start = trio.current_time()
        await connection.stream.aclose()
        await sink.done.wait()
        assert trio.current_time() - start == pytest.approx(0.2) and sink.data() == b"bye"
        with pytest.raises(trio.ClosedResourceError):
            await connection.stream.send_all(b"more")
        nursery.cancel_scope.cancel()


async def test_reset_receiver_reads_an_intact_prefix_then_error(autojump_clock):
    net = network(latency_s=0.01, jitter_s=0.05, bandwidth_bytes_per_s=1 * MB, reset_probability_per_s=0.5)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    sinks: list[Sink] = []

    async def handler(connection: Connection) -> None:
        sinks.append(Sink())
        await sinks[-1](connection)

    async with trio.open_nursery() as nursery:
        address = await nursery.start(b.serve, "sim:0", handler)
        for _ in range(3):
            connection = await a.connect(address)
            with pytest.raises(trio.BrokenResourceError):
                for i in range(1000):
                    await connection.stream.send_all(i.to_bytes(4, "little") * 2500)
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    for sink in sinks:
        assert isinstance(sink.error, trio.BrokenResourceError)
        data = sink.data()
        assert len(data) % 10_000 == 0  # whole messages only: they arrive whole or not at all
        expected = b"".join(i.to_bytes(4, "little") * 2500 for i in range(len(data) // 10_000))
        assert data == expected


async def test_receive_window_blocks_a_sender_whose_reader_stopped(autojump_clock):
    net = SimNetwork(0, default_link=LinkSpec(latency_s=0.0), receive_window_bytes=1_000_000)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    reading = trio.Event()
    got: list[int] = []

    async def slow_reader(connection: Connection) -> None:
        await reading.wait()
        while data := await connection.stream.receive_some():
            got.append(len(data))

    async with trio.open_nursery() as nursery:
        connection = await a.connect(await nursery.start(b.serve, "sim:0", slow_reader))
        sent = 0
        with trio.move_on_after(10):
            while True:
                await connection.stream.send_all(bytes(300_000))
                sent += 300_000
        assert sent == 1_200_000  # admitted while below the window, then blocked
        reading.set()
        await connection.stream.send_all(bytes(300_000))
        await connection.stream.aclose()
        await trio.sleep(1)
        assert sum(got) == 1_500_000
        nursery.cancel_scope.cancel()


async def test_cancelled_send_leaves_a_prefix_and_the_stream_usable(autojump_clock):
    net = network(latency_s=0.0, bandwidth_bytes_per_s=1 * MB)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    sink = Sink()
    async with trio.open_nursery() as nursery:
        connection = await a.connect(await nursery.start(b.serve, "sim:0", sink))
        with trio.move_on_after(0.25):
            await connection.stream.send_all(b"a" * 1_000_000)
        await connection.stream.send_all(b"b" * 10)
        await trio.sleep(1)
        assert sink.data() == b"a" * 250_000 + b"b" * 10
        nursery.cancel_scope.cancel()


async def test_concurrent_send_all_is_refused(autojump_clock):
    net = network(bandwidth_bytes_per_s=1 * MB)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    async with trio.open_nursery() as nursery:
        connection = await a.connect(await nursery.start(b.serve, "sim:0", Sink()))
        nursery.start_soon(connection.stream.send_all, bytes(1_000_000))
        await trio.sleep(0.1)
        with pytest.raises(trio.BusyResourceError):
            await connection.stream.send_all(b"x")
        nursery.cancel_scope.cancel()


async def test_addresses_pinning_and_backlog(autojump_clock):
    net = SimNetwork(0, backlog=1)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    with pytest.raises(TransportError, match="cannot reach sim:nobody: no such address"):
        await a.connect("sim:nobody")
    blocked = trio.Event()

    async def stuck_handler(connection: Connection) -> None:
        await blocked.wait()

    async with trio.open_nursery() as nursery:
        assert await nursery.start(b.serve, "10.0.0.2:0", stuck_handler) == "10.0.0.2:1"
        with pytest.raises(TransportError, match="is b, expected x .pinning failed"):
            await a.connect("10.0.0.2:1", "x")
        with pytest.raises(TransportError, match="address already in use"):
            await a.serve("10.0.0.2:1", stuck_handler)
        nursery.cancel_scope.cancel()
    assert net.addresses() == []


async def test_link_sends_numpy_frames_over_a_sim_connection(autojump_clock):
    net = network(latency_s=0.02, bandwidth_bytes_per_s=10 * MB)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    bulk = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB

    async def echo(connection: Connection) -> None:
        link = Link(connection)
        try:
            while True:
                frame = await link.receive()
                await link.send(Frame("echo", frame.fields, frame.arrays))
        except LinkClosed:
            pass

    async with trio.open_nursery() as nursery:
        link = Link(await a.connect(await nursery.start(b.serve, "sim:0", echo), "b"))
        start = trio.current_time()
        await link.send(Frame("bulk", {"n": 1}, (bulk, np.arange(3, dtype=np.int64))))
        await link.send(Frame("ping", {"n": 2}))
        first, second = await link.receive(), await link.receive()
        elapsed = trio.current_time() - start
        assert (first.kind, first.fields, second.fields) == ("echo", {"n": 1}, {"n": 2})
        np.testing.assert_array_equal(first.arrays[0], bulk)
        np.testing.assert_array_equal(first.arrays[1], np.arange(3))
        # There and back: 2 x (2 MiB / 10 MB/s + 20 ms), plus the small frame's bit.
        assert elapsed == pytest.approx(2 * (bulk.nbytes / 10e6 + 0.02), rel=0.01)
        await link.aclose()
        nursery.cancel_scope.cancel()


async def test_network_records_its_events_in_a_trace(autojump_clock):
    trace = Trace()
    net = SimNetwork(3, default_link=LinkSpec(latency_s=0.01), trace=trace)
    a, b = SimTransport(net, "a"), SimTransport(net, "b")
    async with trio.open_nursery() as nursery:
        connection = await a.connect(await nursery.start(b.serve, "sim:0", Sink()))
        await connection.stream.send_all(b"12345")
        net.pause("b")
        net.resume("b")
        net.partition(["a"], ["b"])
        net.heal()
        net.kill("b")
        nursery.cancel_scope.cancel()
    kinds = [e[1] for e in trace.events()]
    # The handler's stream breaks with the kill; closing it is an event too.
    assert kinds == ["connect", "deliver", "pause", "resume", "partition", "heal", "kill", "reset", "close"]
    assert trace.events()[1][2:5] == (1, "a", "b") and trace.events()[1][5] == 5
    assert len(trace.hash()) == 64


def test_link_spec_and_peer_settings_are_checked():
    with pytest.raises(ValueError):
        LinkSpec(latency_s=-1)
    with pytest.raises(ValueError):
        LinkSpec(bandwidth_bytes_per_s=0)
    with pytest.raises(ValueError):
        SimNetwork(0).set_peer("a", upload_bytes_per_s=0)
    with pytest.raises(ValueError, match="overlap"):
        SimNetwork(0).partition(["a"], ["a", "b"])
    assert isinstance(SimStream, type)
