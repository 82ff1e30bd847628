"""Entry points of the parameter-server training mode (for small models).

`train_parameter_server(model, batches, loss=..., optimizer=..., steps=..., workers=3)` trains
with one server (this process: it holds the params and optimizer state, and the data) and
`workers` gradient workers; the result equals single-process training with
microbatches = workers. A pipeline (`p2ptrain.train`) sends activations, which for a small
model are far fewer values than the params a parameter server sends every step: compare both
with `simulations/ringtmp.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import trio

from ..compute import Sequential
from ..node.driver import as_batch
from ..node.groups import sole_error
from ..transport.base import Transport
from .server import PSResult, PSSpec, ServerConfig, run_parameter_server
from .worker import WorkerConfig, serve_worker

# Ceiling on in-process workers: each is a task with a program compiled for it.
MAX_LOCAL_WORKERS = 256


async def train_parameter_server_async(
    model: Sequential,
    batches: Callable[[int], tuple[Any, Any]],
    *,
    loss: Callable,
    optimizer,
    steps: int,
    workers: int | Sequence[str],
    transport_factory: Callable[[str], Transport] | None = None,
    params: list | None = None,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    config: ServerConfig = ServerConfig(),
    worker_config: WorkerConfig = WorkerConfig(),
    worker_listen: str = "127.0.0.1:0",
) -> PSResult:
    """Train with a parameter server; returns a `PSResult` (.params, .losses, .values, ...).

    workers: addresses of running workers (`python -m p2ptrain.paramserver`, or
        `paramserver.serve_worker`), in shard order, each "HOST:PORT" or "PEER_ID@HOST:PORT"
        (pinned); or a number, to start that many workers in this trio run (named
        "ps-worker-<i>", each on its own transport listening on `worker_listen`) for the
        length of the job.
    transport_factory: peer name -> Transport; called with "ps-server" for the server and
        with each local worker's name. Default: TLS with a fresh identity for each.
    Semantics: at step t, `batches(t)` is split into len(workers) equal shards; the step loss
    is the mean of the shard losses and its gradient is applied once with `optimizer`.
    """
    if not isinstance(model, Sequential):
        raise TypeError("model must be a p2ptrain.Sequential")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    count = workers if isinstance(workers, int) else len(workers)
    if not 1 <= count <= MAX_LOCAL_WORKERS:
        raise ValueError(f"workers must be between 1 and {MAX_LOCAL_WORKERS}, got {count}")
    if transport_factory is None:
        transport_factory = _tls_transport
    if params is None:
        x0, _ = as_batch(*batches(0))
        params = model.init(jax.random.PRNGKey(seed), x0[: len(x0) // count])
    spec = PSSpec(model, batches, loss, optimizer, steps, list(params))
    server = transport_factory("ps-server")
    if not isinstance(workers, int):
        return await run_parameter_server(server, list(workers), spec, config, on_step)
    try:
        async with trio.open_nursery() as nursery:
            addresses = [await nursery.start(serve_worker, transport_factory(f"ps-worker-{i}"), worker_listen,
                                             worker_config) for i in range(workers)]
            result = await run_parameter_server(server, addresses, spec, config, on_step)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:   # the workers never raise: show the server's error
        raise sole_error(group) from None
    return result


def train_parameter_server(model: Sequential, batches, **kwargs) -> PSResult:
    """`train_parameter_server_async` in its own trio run; see there."""
    return trio.run(lambda: train_parameter_server_async(model, batches, **kwargs))


def _tls_transport(name: str) -> Transport:
    from ..transport.identity import Identity
    from ..transport.tcp_tls import TlsTransport

    return TlsTransport(Identity.load_or_create(None))
