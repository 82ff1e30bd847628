"""Links between peers: a frame cancelled part-way still goes out whole (the stream stays in
sync for both healthy peers); a link that cannot finish a frame in time is broken, and the
peer's next send to that neighbour goes over a fresh link instead of failing the job."""

import numpy as np
import trio

from p2ptrain.node.link import FRAME_GRACE_S, SLOWEST_LINK_BYTES_PER_S, Link, LinkClosed
from p2ptrain.node.peer import Peer, PeerConfig, _Neighbour
from p2ptrain.transport.sim import LinkSpec, SimNetwork, SimTransport
from p2ptrain.wire.messages import message

FOUR_MB = np.zeros(2**20, np.float32)


async def _neighbour_and_peer(nursery, bandwidth_bytes_per_s):
    """A neighbour "b" that records (connection number, kind) of what it receives, and a
    Peer "a" to drive, over a simulated network."""
    network = SimNetwork(seed=0, default_link=LinkSpec(latency_s=0.01, bandwidth_bytes_per_s=bandwidth_bytes_per_s))
    received: list[tuple[int, str]] = []
    connections = 0

    async def neighbour(connection):
        nonlocal connections
        connections += 1
        number, link = connections, Link(connection)
        try:
            while True:
                received.append((number, (await link.receive()).kind))
        except LinkClosed:
            received.append((number, "closed"))

    address = await nursery.start(SimTransport(network, "b").serve, "b:1", neighbour)
    return Peer(SimTransport(network, "a"), PeerConfig(bootstrap="unused:1"), nursery), address, received


async def test_a_frame_cancelled_part_way_still_goes_out_whole(autojump_clock):
    async with trio.open_nursery() as nursery:
        peer, address, received = await _neighbour_and_peer(nursery, 1e6)
        link = await peer.link_to("b", address)
        with trio.move_on_after(0.1) as scope:   # the 4 MB frame takes 4 s
            await link.send(message("forward", [FOUR_MB], job_id="j-e0", step=0, mb=0))
            await trio.sleep(1)   # the cancellation lands here, after the frame
        assert scope.cancelled_caught and trio.current_time() > 4
        await link.send(message("heartbeat"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert received == [(1, "forward"), (1, "heartbeat")]


async def test_a_link_that_cannot_finish_a_frame_is_replaced(autojump_clock):
    bandwidth = SLOWEST_LINK_BYTES_PER_S / 4   # slower than the slowest link a frame waits for
    async with trio.open_nursery() as nursery:
        peer, address, received = await _neighbour_and_peer(nursery, bandwidth)
        first = await peer.link_to("b", address)
        started = trio.current_time()
        try:
            await first.send(message("forward", [FOUR_MB], job_id="j-e0", step=0, mb=0))
        except LinkClosed as exc:
            assert "was not out in" in str(exc)
        assert not first.can_send
        assert trio.current_time() - started <= FRAME_GRACE_S + FOUR_MB.nbytes / SLOWEST_LINK_BYTES_PER_S + 1
        await peer._send_to(_Neighbour("b", address), message("heartbeat"))
        await trio.sleep(1)
        assert peer.links["b"] is not first and peer.links["b"].can_send
        nursery.cancel_scope.cancel()
    assert (2, "heartbeat") in received and (1, "closed") in received


def test_gradients_are_batched_into_frames_within_a_byte_budget():
    from p2ptrain.node.peer import _batches_within

    shared = {mb: [np.zeros(250, np.float32)] for mb in (6, 0, 2, 4)}   # 1000 bytes each
    assert _batches_within(shared, 2000) == [[0, 2], [4, 6]]
    assert _batches_within(shared, 500) == [[0], [2], [4], [6]]   # one alone if it must
    assert _batches_within(shared, 10**6) == [[0, 2, 4, 6]]
    assert _batches_within({}, 1000) == []
