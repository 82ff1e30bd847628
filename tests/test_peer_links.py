"""A peer's cached links to its neighbours: a link whose send was cut off mid-frame (an
ended job's send) is replaced for sending, and still delivers what the neighbour sends on it."""

import numpy as np
import trio

from p2ptrain.node.link import Link, LinkClosed
from p2ptrain.node.peer import Peer, PeerConfig, _Neighbour
from p2ptrain.transport.sim import LinkSpec, SimNetwork, SimTransport
from p2ptrain.wire.messages import message


async def test_a_link_broken_mid_frame_is_replaced_and_still_delivers_what_comes_back(autojump_clock):
    network = SimNetwork(seed=0, default_link=LinkSpec(latency_s=0.01, bandwidth_bytes_per_s=1e6))
    received: list[tuple[int, str]] = []   # (connection number, kind) as the neighbour got them
    connections: list[Link] = []

    async def neighbour(connection):
        link = Link(connection)
        connections.append(link)
        number = len(connections)
        try:
            while True:
                received.append((number, (await link.receive()).kind))
        except LinkClosed:
            received.append((number, "closed"))

    got_back: list[str] = []
    async with trio.open_nursery() as nursery:
        address = await nursery.start(SimTransport(network, "b").serve, "b:1", neighbour)
        peer = Peer(SimTransport(network, "a"), PeerConfig(bootstrap="unused:1"), nursery)

        async def record(link, msg):
            got_back.append(msg.kind)

        peer.dispatch = record
        first = await peer.link_to("b", address)
        with trio.move_on_after(0.1):   # a 4 MB frame takes 4 s: cut off part-way
            await first.send(message("forward", [np.zeros(2**20, np.float32)], job_id="j-e0", step=0, mb=0))
        assert not first.can_send
        await peer._send_to(_Neighbour("b", address), message("heartbeat"))
        await connections[0].send(message("heartbeat"))   # the neighbour still uses the old link
        await trio.sleep(1)
        assert peer.links["b"] is not first and peer.links["b"].can_send
        nursery.cancel_scope.cancel()
    assert (2, "heartbeat") in received and (1, "closed") not in received
    assert got_back == ["heartbeat"]


def test_gradients_are_batched_into_frames_within_a_byte_budget():
    from p2ptrain.node.peer import _batches_within

    shared = {mb: [np.zeros(250, np.float32)] for mb in (6, 0, 2, 4)}   # 1000 bytes each
    assert _batches_within(shared, 2000) == [[0, 2], [4, 6]]
    assert _batches_within(shared, 500) == [[0], [2], [4], [6]]   # one alone if it must
    assert _batches_within(shared, 10**6) == [[0, 2, 4, 6]]
    assert _batches_within({}, 1000) == []
