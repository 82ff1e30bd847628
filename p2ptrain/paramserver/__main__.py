"""`python -m p2ptrain.paramserver --listen HOST:PORT [--state-dir DIR]`: a worker process.

Serves gradient work (`serve_worker`) over mutual TLS until SIGINT/SIGTERM, then exits 0.
Prints one line once ready: "ps-worker PEER_ID listening on HOST:PORT"; a server pins it by
passing "PEER_ID@HOST:PORT" in `workers`. Bad arguments: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2ptrain.paramserver", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept servers on (port 0: any)")
    parser.add_argument("--state-dir", default=None, help="where the identity key is kept (default: a fresh one)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"python -m p2ptrain.paramserver: --listen must be HOST:PORT, got {args.listen!r}", file=sys.stderr)
        return 2

    import trio

    from ..transport.base import TransportError
    from ..transport.identity import Identity
    from ..transport.tcp_tls import TlsTransport
    from .worker import serve_worker

    transport = TlsTransport(Identity.load_or_create(Path(args.state_dir) if args.state_dir else None))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                address = await nursery.start(serve_worker, transport, args.listen)
                print(f"ps-worker {transport.peer_id} listening on {address}", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except TransportError as exc:
        print(f"python -m p2ptrain.paramserver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
