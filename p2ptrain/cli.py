"""The `p2ptrain` command (DESIGN.md section 4). Parses arguments and calls into the
package; bad input and unreachable hosts end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Get SIGTERM when the parent dies (set by LocalSwarm for the processes it starts), so
    that a killed demo or test leaves no peers behind. Done here rather than in a
    preexec_fn: forking a process that runs JAX's threads and calling into libc there can
    deadlock."""
    parent = int(os.environ["P2PTRAIN_DIE_WITH_PARENT"])
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:   # the parent died before the request took effect
        raise SystemExit(1)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line, no usage dump
        print(f"p2ptrain: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _size(text: str) -> int:
    from .hardware import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2ptrain", description="Train neural networks on volunteered machines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the node does")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("bootstrap", help="run the swarm's directory node")
    p.add_argument("--listen", type=_address, default="127.0.0.1:7070")
    p.add_argument("--state-dir", help="where the identity key is kept (default: a fresh identity)")

    p = sub.add_parser("join", help="donate this machine to a swarm")
    p.add_argument("--bootstrap", type=_address, required=True)
    p.add_argument("--listen", type=_address, default="127.0.0.1:0")
    p.add_argument("--memory", type=_size, help="memory to donate, e.g. 2GB (default: what is free)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads to donate (default: all)")
    p.add_argument("--state-dir", help="where the identity key is kept (default: a fresh identity)")
    # Fault injection for churn tests and demos: SIGKILL this peer as it starts PHASE
    # (forward, backward, last, grads, update) of STEP[, micro-batch MB], but only if it is
    # the first to create the token file (so a replayed step does not kill the replacement).
    # Which allowed core --threads starts from (LocalSwarm spreads its peers over the cores).
    p.add_argument("--first-cpu", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--crash-at", help=argparse.SUPPRESS)
    p.add_argument("--crash-token", help=argparse.SUPPRESS)

    p = sub.add_parser("status", help="show the swarm's peers and jobs")
    p.add_argument("--bootstrap", type=_address, required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("demo", help="start a local swarm and train an MLP on the digits data set")
    p.add_argument("--churn", action="store_true", help="kill -9 a peer mid-run and show the recovery")

    p = sub.add_parser("simulate", help="run a scenario on a simulated swarm (deterministic per seed)")
    p.add_argument("scenario", help="scenario TOML file, e.g. simulations/scenarios/churn_weibull.toml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", type=_positive_int, help="override the scenario's peer count")
    p.add_argument("--hours", type=float, help="override the scenario's virtual duration")
    p.add_argument("--compute", choices=("real", "shape_only"),
                   help="override the scenario's compute mode (shape_only: no arithmetic, for scale)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default="out", help="directory for the events CSV and the plot (default out/)")
    p.add_argument("--no-baseline", action="store_true", help="skip the churn-free run (no goodput)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("P2PTRAIN_DIE_WITH_PARENT"):
        _die_with_parent()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.command == "join" and args.threads:
        from .hardware import limit_threads

        limit_threads(args.threads, args.first_cpu)   # before jax is imported anywhere
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(churn=args.churn)
    if args.command == "simulate":
        from .sim.cli import run_simulate

        return run_simulate(args)
    import trio

    from .transport.base import TransportError
    from .wire.messages import ProtocolError

    from .node.groups import sole_error

    command = {"bootstrap": _bootstrap, "join": _join, "status": _status}[args.command]
    try:
        try:
            return trio.run(command, args)
        except BaseExceptionGroup as group:
            raise sole_error(group) from None
    except (TransportError, ProtocolError, OSError, trio.TooSlowError) as exc:
        print(f"p2ptrain {args.command}: {exc or 'timed out'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _transport(state_dir):
    from pathlib import Path

    from .transport.identity import Identity
    from .transport.tcp_tls import TlsTransport

    return TlsTransport(Identity.load_or_create(Path(state_dir) if state_dir else None))


async def _until_signalled(run, *args) -> None:
    """Run `run(*args, task_status=...)` until SIGINT/SIGTERM, then cancel it (a peer's
    cancellation announces its leave) and return normally."""
    import trio

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            ready = await nursery.start(run, *args)
            print(ready, flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def _bootstrap(args) -> int:
    import trio

    from .node.bootstrap import serve_bootstrap

    transport = _transport(args.state_dir)

    async def run(*, task_status=trio.TASK_STATUS_IGNORED):
        await serve_bootstrap(transport, args.listen, task_status=_Relabel(
            task_status, lambda address: f"bootstrap {transport.peer_id} listening on {address}"))

    await _until_signalled(run)
    return 0


async def _join(args) -> int:
    from .hardware import available_memory_bytes, measure_flops_per_s
    from .node.peer import PeerConfig, serve_peer

    free_bytes = available_memory_bytes()
    memory_bytes = min(args.memory, free_bytes) if args.memory else free_bytes
    threads = args.threads or len(os.sched_getaffinity(0))
    config = PeerConfig(bootstrap=args.bootstrap, listen=args.listen, memory_bytes=memory_bytes,
                        flops_per_s=measure_flops_per_s(), threads=threads,
                        crash_at=args.crash_at, crash_token=args.crash_token)
    transport = _transport(args.state_dir)

    async def run(*, task_status):
        await serve_peer(transport, config, task_status=_Relabel(
            task_status, lambda info: f"peer {info.peer_id} listening on {info.address} "
                                      f"(memory {memory_bytes / 1e6:.0f} MB, {config.flops_per_s / 1e9:.1f} GFLOP/s, "
                                      f"{threads} threads)"))

    await _until_signalled(run)
    return 0


async def _status(args) -> int:
    import trio

    from .node.link import Link
    from .node.session import request
    from .wire.messages import message

    with trio.fail_after(30):
        link = Link(await _transport(None).connect(args.bootstrap))
        reply = await request(link, message("status_request"), "status")
        await link.aclose()
    status = {"peers": reply.fields["peers"], "jobs": reply.fields["jobs"]}
    if args.json:
        print(json.dumps(status))
        return 0
    print(f"{len(status['peers'])} peers")
    for p in status["peers"]:
        print(f"  {p['peer_id'][:16]}  {p['address']:<22} {p['state']:<9} "
              f"{p['memory_bytes'] / 1e6:>9.1f} MB {p['flops_per_s'] / 1e9:>7.2f} GFLOP/s "
              f"{p['bandwidth_bytes_per_s'] / 1e6:>9.1f} MB/s")
    print(f"{len(status['jobs'])} jobs")
    for j in status["jobs"]:
        stages = ", ".join(f"{a}-{b - 1}@{'+'.join(p[:8] for p in peers)}" for a, b, peers in j["stages"])
        print(f"  {j['job_id']}  {j['state']:<9} epoch {j['epoch']}  step {j['step']}/{j['steps']}  stages {stages}")
    return 0


class _Relabel:
    """A task_status that reports a human-readable ready line instead of the raw value."""

    def __init__(self, task_status, label):
        self._task_status, self._label = task_status, label

    def started(self, value=None):
        self._task_status.started(self._label(value))
