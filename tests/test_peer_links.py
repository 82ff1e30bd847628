"""A peer's cached links to its neighbours: a stream broken by a send cancelled mid-frame
(an ended job's send) is replaced, not taken as the neighbour's failure."""

import numpy as np
import trio

from p2ptrain.node.link import Link, LinkClosed
from p2ptrain.node.peer import Peer, PeerConfig, _Neighbour
from p2ptrain.transport.sim import LinkSpec, SimNetwork, SimTransport
from p2ptrain.wire.messages import message


async def test_a_link_broken_mid_frame_is_replaced_and_the_message_still_arrives(autojump_clock):
    network = SimNetwork(seed=0, default_link=LinkSpec(latency_s=0.01, bandwidth_bytes_per_s=1e6))
    received: list[tuple[int, str]] = []   # (connection number, kind)
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

    async with trio.open_nursery() as nursery:
        address = await nursery.start(SimTransport(network, "b").serve, "b:1", neighbour)
        peer = Peer(SimTransport(network, "a"), PeerConfig(bootstrap="unused:1"), nursery)
        first = await peer.link_to("b", address)
        with trio.move_on_after(0.1):   # a 4 MB frame takes 4 s: cut off part-way
            await first.send(message("forward", [np.zeros(2**20, np.float32)], job_id="j-e0", step=0, mb=0))
        assert not first.can_send
        await peer._send_to(_Neighbour("b", address), message("heartbeat"))
        await trio.sleep(1)
        assert peer.links["b"] is not first and peer.links["b"].can_send
        nursery.cancel_scope.cancel()
    assert (2, "heartbeat") in received and (1, "closed") in received   # new stream; old one ended
