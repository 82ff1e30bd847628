"""A parameter-server worker: runs one gradient program on the shards a server sends it.

`serve_worker` accepts connections from servers (any number, one job per connection). Per
connection: a `ps_load` whose program must pass the allow-list (`GradProgram.load`), then
`ps_step`s answered one at a time with `ps_grads`, until `ps_end` or the link closes. A bad
program or bad arrays get a `ps_error` and end that connection only; the worker keeps serving.
The worker keeps no state between steps: the params come with every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from ..compute import ProgramLimits, ProgramRejected
from ..transport.base import Connection, Transport
from ..wire.codec import DEFAULT_MAX_FRAME_BYTES, FrameError
from ..node.link import Link, LinkClosed
from .messages import ProtocolError, message, validate
from .program import GradProgram

log = logging.getLogger("p2ptrain.paramserver")


@dataclass(frozen=True)
class WorkerConfig:
    # Compute in a worker thread keeps the link responsive during a long XLA call. Under
    # MockClock (tests, simulation) it must run inline: a thread lets virtual time jump
    # ahead while the computation is still running.
    compute_in_thread: bool = True
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_n_params: int = 10_000
    limits: ProgramLimits = field(default_factory=ProgramLimits)


async def serve_worker(transport: Transport, listen: str, config: WorkerConfig = WorkerConfig(), *,
                       task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve gradient work on `listen` until cancelled; `task_status.started(address)`."""
    async def handle(connection: Connection) -> None:
        link = Link(connection, max_frame_bytes=config.max_frame_bytes)
        try:
            await _serve_job(link, config)
        finally:
            await link.aclose()

    await transport.serve(listen, handle, task_status=task_status)


async def _next(link: Link):
    """The next valid message, or None when the link ended or sent something invalid."""
    try:
        return validate(await link.receive())
    except LinkClosed:
        return None
    except (FrameError, ProtocolError) as exc:
        log.warning("closing link to %s: %s", link.remote_peer_id[:12], exc)
        return None


async def _serve_job(link: Link, config: WorkerConfig) -> None:
    load = await _next(link)
    if load is None:
        return
    if load.kind != "ps_load":
        log.warning("closing link to %s: expected ps_load, got %s", link.remote_peer_id[:12], load.kind)
        return
    job_id, n_params = load.fields["job_id"], load.fields["n_params"]
    try:
        if n_params > config.max_n_params:
            raise ProgramRejected(f"{n_params} parameter arrays exceed max_n_params={config.max_n_params}")
        program = await _compute(config, GradProgram.load, load.fields["program"], n_params, config.limits)
    except ProgramRejected as exc:
        await link.send(message("ps_error", job_id=job_id, reason=str(exc)))
        return
    await link.send(message("ps_ready", job_id=job_id))
    while True:
        frame = await _next(link)
        if frame is None or frame.kind == "ps_end":
            return
        if frame.kind != "ps_step" or frame.fields["job_id"] != job_id:
            await link.send(message("ps_error", job_id=job_id, reason=f"unexpected {frame.kind} during job"))
            return
        try:
            loss, grads = await _compute(config, program, frame.arrays)
        except ValueError as exc:
            await link.send(message("ps_error", job_id=job_id, reason=f"step {frame.fields['step']}: {exc}"))
            return
        await link.send(message("ps_grads", grads, job_id=job_id, step=frame.fields["step"], loss=loss))


async def _compute(config: WorkerConfig, fn, *args):
    if config.compute_in_thread:
        return await trio.to_thread.run_sync(fn, *args)
    await trio.lowlevel.checkpoint()
    return fn(*args)
