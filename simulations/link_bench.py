"""Link throughput over TLS against the same framing over plain trio TCP, on loopback.

    python simulations/link_bench.py [--seconds 2] [--payloads 4MiB,64KiB]

For each payload (one float32 array per frame) and transport, a sender pushes frames for
--seconds through a `Link`; the receiver counts them and reports its own elapsed time from
the first byte to the last frame. GB/s counts array bytes (10^9 bytes per second). Sender
and receiver run in one process and one trio thread, so each case uses a single core for
both ends (encryption and decryption share it): a real link splits them across machines.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import trio  # noqa: E402

from p2ptrain.node.link import Link, LinkClosed  # noqa: E402
from p2ptrain.transport.base import Connection  # noqa: E402
from p2ptrain.transport.identity import Identity  # noqa: E402
from p2ptrain.transport.tcp_tls import TlsTransport  # noqa: E402
from p2ptrain.wire.codec import Frame  # noqa: E402

SIZES = {"4MiB": 4 * 2**20, "64KiB": 64 * 2**10, "1MiB": 2**20, "16KiB": 16 * 2**10, "1KiB": 2**10}


async def measure(transport: str, payload_bytes: int, seconds: float) -> tuple[int, float]:
    """(frames received, receiver seconds) for one case."""
    result: dict[str, float] = {}
    done = trio.Event()

    async def receive_all(link: Link) -> None:
        frames = 0
        start = None
        try:
            while True:
                frame = await link.receive()
                if start is None:
                    start = time.perf_counter()
                if frame.kind == "stop":
                    break
                frames += 1
        except LinkClosed:
            pass
        result.update(frames=frames, seconds=time.perf_counter() - start)
        done.set()

    array = np.random.default_rng(0).standard_normal(payload_bytes // 4).astype(np.float32)
    async with trio.open_nursery() as nursery:
        if transport == "tls":
            server, client = TlsTransport(Identity.generate()), TlsTransport(Identity.generate())
            address = await nursery.start(server.serve, "127.0.0.1:0", lambda c: receive_all(Link(c)))
            link = Link(await client.connect(address, server.peer_id))
        else:
            async def raw_handler(stream: trio.SocketStream) -> None:
                await receive_all(Link(Connection(stream, "raw")))

            listeners = await nursery.start(partial(trio.serve_tcp, raw_handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            link = Link(Connection(await trio.open_tcp_stream("127.0.0.1", port), "raw"))

        deadline = time.perf_counter() + seconds
        frame = Frame("forward", {"job_id": "bench", "step": 0, "mb": 0}, (array,))
        while time.perf_counter() < deadline:
            await link.send(frame)
        await link.send(Frame("stop", {}))
        await done.wait()
        await link.aclose()
        nursery.cancel_scope.cancel()
    return int(result["frames"]), result["seconds"]


async def main(seconds: float, payloads: list[str]) -> None:
    rows = []
    for name in payloads:
        rates = {}
        for transport in ("raw", "tls"):
            frames, elapsed = await measure(transport, SIZES[name], seconds)
            rates[transport] = frames * SIZES[name] / elapsed / 1e9
            ratio = f"{rates['tls'] / rates['raw']:.2f}" if transport == "tls" else ""
            rows.append((name, transport, str(frames), f"{elapsed:.2f}", f"{rates[transport]:.3f}", ratio))
    header = ("payload", "transport", "frames", "seconds", "GB/s", "ratio TLS/raw")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="sending time per case")
    parser.add_argument("--payloads", default="4MiB,64KiB", help=f"comma-separated, from {', '.join(SIZES)}")
    args = parser.parse_args()
    trio.run(main, args.seconds, args.payloads.split(","))
