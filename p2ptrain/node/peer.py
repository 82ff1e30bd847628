"""The peer service: registers with the bootstrap, heartbeats, and serves pipeline stages.

A peer runs no code of the submitter: a stage arrives as serialised jax.export programs plus
arrays (`load_stage`), is checked against the allow-list by `StageRunner.load`, and then
consumes forward/backward/target messages. Activations go straight to the next stage's
peer and gradients straight to the previous one; the driver only feeds stage 0, sends
targets to the last stage and collects losses and acknowledgements. A stage may be served
by several replica peers, each computing micro-batches mb with mb % replicas == its index and
exchanging parameter gradients with the others before the update (see StageRunner).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import trio

from ..compute import ProgramRejected, StageBundle, StageRunner, ProgramLimits
from ..core.schedule import ScheduleError, StageInbox, Task
from ..transport.base import Connection, Transport, TransportError
from ..wire.codec import Frame
from ..wire.messages import ProtocolError, message
from .groups import sole_error
from .link import Link, LinkClosed
from .session import next_message, request

log = logging.getLogger("p2ptrain.peer")


@dataclass(frozen=True)
class PeerConfig:
    bootstrap: str
    listen: str = "127.0.0.1:0"
    memory_bytes: int = 2 * 2**30
    flops_per_s: float = 1e9
    threads: int = 1
    heartbeat_interval_s: float = 1.0       # to the bootstrap
    job_heartbeat_interval_s: float = 0.5   # to the driver of a job (its failure detector)
    leave_timeout_s: float = 2.0
    bandwidth_probe_bytes: int = 2**20
    # Compute runs in a worker thread so that heartbeats and links keep flowing during a long
    # XLA call. Under MockClock (tests, simulation) it must run inline instead: a thread lets
    # virtual time jump ahead while the computation is still running.
    compute_in_thread: bool = True
    max_inbox_items: int = 256
    crash_at: str | None = None      # fault injection for tests, see Peer._maybe_crash
    crash_token: str | None = None
    limits: ProgramLimits = field(default_factory=ProgramLimits)
    # Modelled compute for simulation (DESIGN.md section 6): after each task's computation
    # the peer sleeps `compute_delay_s(task_kind, job_id, stage)` seconds of (virtual) time,
    # so a simulated stage costs what its FLOPs would cost on the simulated hardware. Task
    # kinds: "forward", "backward", "last", "grads", "update". None: no extra time (real runs).
    compute_delay_s: Callable[[str, str, int], float] | None = None
    # Shape-only compute (simulation at scale): programs are checked but not run; every
    # result is zeros of its true shape (see StageRunner.load). Training learns nothing.
    shape_only: bool = False


@dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    address: str


@dataclass(frozen=True)
class _Neighbour:
    """Another peer of the job: the previous or next stage's replica, or a sibling replica."""

    peer_id: str
    address: str


def _neighbours(entries: list) -> list[_Neighbour]:
    if not all(isinstance(e, list) and len(e) == 2 and all(isinstance(v, str) for v in e) for e in entries):
        raise ValueError("neighbours must be [peer_id, address] pairs")
    return [_Neighbour(*e) for e in entries]


@dataclass
class _StageJob:
    """One stage of one job on this peer. `prev`, `next` and `replicas` list the replicas of
    the previous stage, the next stage and this stage; micro-batch mb flows through replica
    mb % len(...) of every stage."""

    job_id: str
    stage: int
    runner: StageRunner
    inbox: StageInbox
    driver_id: str
    driver_link: Link   # the link the job was loaded over: everything for the driver goes here
    prev: list[_Neighbour]
    next: list[_Neighbour]
    replicas: list[_Neighbour]
    wakeup: trio.Event = field(default_factory=trio.Event)
    own_done: int = 0
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @staticmethod
    def route(neighbours: list[_Neighbour], mb: int) -> _Neighbour:
        return neighbours[mb % len(neighbours)]


# Most gradient bytes in one "grads" frame (several micro-batches share a frame up to this;
# a single micro-batch's gradients always go, alone if need be). Well under the frame cap.
GRADS_FRAME_BYTES = 32 * 2**20


def _batches_within(shared: dict[int, list[np.ndarray]], budget_bytes: int) -> list[list[int]]:
    """The micro-batch indices of `shared`, ascending, in runs whose arrays total at most
    `budget_bytes` (a run has at least one index)."""
    runs: list[list[int]] = []
    size = 0
    for mb in sorted(shared):
        nbytes = sum(a.nbytes for a in shared[mb])
        if not runs or size + nbytes > budget_bytes:
            runs.append([])
            size = 0
        runs[-1].append(mb)
        size += nbytes
    return runs


class Peer:
    """One peer's state. Use `serve_peer`; this class holds what its tasks share."""

    def __init__(self, transport: Transport, config: PeerConfig, nursery: trio.Nursery):
        self.transport = transport
        self.config = config
        self.nursery = nursery
        self.links: dict[str, Link] = {}
        self._connecting: dict[str, trio.Lock] = {}
        self.jobs: dict[str, _StageJob] = {}
        self.ended_jobs: collections.deque[str] = collections.deque(maxlen=64)
        self.compute_limiter = trio.CapacityLimiter(1)

    # -- links ---------------------------------------------------------------------------

    async def handle_connection(self, connection: Connection) -> None:
        """Serve one accepted connection until it ends."""
        await self._receive_loop(Link(connection))

    async def link_to(self, peer_id: str, address: str) -> Link:
        """The link to `peer_id`, opened (with its id pinned) if there is none yet or the
        cached one can no longer send: its stream broke, or a send of an ended job was cut
        off mid-frame, which leaves it out of sync for sending for good although both peers
        are healthy. Such a link is only forgotten here, not closed: the neighbour may still
        be sending on it, and its receive loop keeps reading until the neighbour closes it."""
        lock = self._connecting.setdefault(peer_id, trio.Lock())
        async with lock:
            link = self.links.get(peer_id)
            if link is not None and not link.can_send:
                del self.links[peer_id]
                link = None
            if link is None:
                link = Link(await self.transport.connect(address, expected_peer_id=peer_id))
                self.links[peer_id] = link
                self.nursery.start_soon(self._receive_loop, link)
            return link

    async def _receive_loop(self, link: Link) -> None:
        peer_id = link.remote_peer_id
        self.links.setdefault(peer_id, link)
        try:
            while (msg := await next_message(link)) is not None:
                try:
                    await self.dispatch(link, msg)
                except (ProtocolError, ScheduleError) as exc:
                    log.warning("closing link to %s: %s", peer_id[:12], exc)
                    break
                except LinkClosed:   # a reply could not go out: this link is done, the peer is not
                    break
        finally:
            if self.links.get(peer_id) is link:   # not when link_to replaced it
                del self.links[peer_id]
            with trio.CancelScope(shield=True):
                await link.aclose()
            for job in list(self.jobs.values()):
                if job.driver_link is link:
                    self.drop_job(job.job_id, "the driver disconnected")

    # -- messages ------------------------------------------------------------------------

    async def dispatch(self, link: Link, msg: Frame) -> None:
        kind, f = msg.kind, msg.fields
        if kind == "load_stage":
            await self.load_stage(link, msg)
            return
        job = self.jobs.get(f.get("job_id", ""))
        if job is None:
            if f.get("job_id") in self.ended_jobs:
                # In flight when the job ended (e.g. the driver re-planned after a failure):
                # expected after churn, so dropped quietly rather than closing a healthy link.
                log.debug("dropping %s for ended job %s", kind, f["job_id"])
                return
            raise ProtocolError(f"{kind} for unknown job {f.get('job_id')!r}")
        if kind == "forward":
            sender = job.route(job.prev, f["mb"]).peer_id if job.prev else job.driver_id
            self._expect_sender(job, link, sender)
            job.inbox.add_forward(f["step"], f["mb"], self._checked(msg, job.runner.in_shape, job.runner.in_dtype, "forward"))
        elif kind == "target":
            self._expect_sender(job, link, job.driver_id)
            job.inbox.add_target(f["step"], f["mb"], self._checked(
                msg, job.runner.target_shape, job.runner.target_dtype, "target"))
        elif kind == "backward":
            self._expect_sender(job, link, job.route(job.next, f["mb"]).peer_id if job.next else None)
            job.inbox.add_backward(f["step"], f["mb"], self._checked(msg, job.runner.out_shape, job.runner.out_dtype, "backward"))
        elif kind == "grads":
            mbs, per_mb = f["mbs"], job.runner.param_leaf_count
            if not mbs or not all(type(mb) is int and 0 <= mb < job.inbox.microbatches for mb in mbs) \
                    or len(set(mbs)) != len(mbs) or len(msg.arrays) != len(mbs) * per_mb:
                raise ProtocolError(f"grads: {len(msg.arrays)} arrays for micro-batches {mbs!r:.80}")
            for mb in mbs:   # every sender checked before anything is taken in
                self._expect_sender(job, link, job.route(job.replicas, mb).peer_id)
            for i, mb in enumerate(mbs):
                job.inbox.add_grads(f["step"], mb, list(msg.arrays[i * per_mb:(i + 1) * per_mb]))
        elif kind == "fetch_params":
            self._expect_sender(job, link, job.driver_id)
            params, opt_state = await self._compute(
                lambda: (job.runner.params_leaves(), job.runner.opt_state_leaves()))
            await link.send(message("params", params + opt_state, job_id=job.job_id, stage=job.stage,
                                    n_params=len(params)))
        elif kind == "end_job":
            self._expect_sender(job, link, job.driver_id)
            self.drop_job(job.job_id, "finished")
            return
        else:
            raise ProtocolError(f"a peer does not serve {kind!r}")
        job.wakeup.set()

    @staticmethod
    def _expect_sender(job: _StageJob, link: Link, expected: str | None) -> None:
        if link.remote_peer_id != expected:
            raise ProtocolError(f"job {job.job_id}: unexpected sender {link.remote_peer_id[:12]}")

    @staticmethod
    def _checked(msg: Frame, shape: tuple | None, dtype, what: str) -> np.ndarray:
        """The message's array if it has the shape and dtype the stage's programs take."""
        array = msg.arrays[0]
        if shape is None or tuple(array.shape) != tuple(shape) or array.dtype != dtype:
            raise ProtocolError(f"{what}: got {array.dtype}{list(array.shape)}, expected {dtype}{list(shape or [])}")
        return array

    async def load_stage(self, link: Link, msg: Frame) -> None:
        f = msg.fields
        job_id = f["job_id"]
        for old in [j for j in self.jobs.values() if j.driver_id == link.remote_peer_id]:
            # A driver's new epoch supersedes its old one (whose end_job may still be in
            # flight on another link).
            self.drop_job(old.job_id, "superseded by a new epoch")
        if self.jobs:
            await link.send(message("job_error", job_id=job_id, reason="this peer already serves a stage"))
            return
        try:
            bundle = StageBundle.from_wire(f["bundle"])
            # arrays: the stage's params leaves, then its optimizer state leaves if it has any
            # yet (a stage rebuilt after a failure); none means the peer initialises it.
            params, opt_state = list(msg.arrays[:f["n_params"]]), list(msg.arrays[f["n_params"]:])
            runner = await self._compute(lambda: StageRunner.load(
                bundle, params, opt_state or None, limits=self.config.limits, shape_only=self.config.shape_only))
            prev, nxt, replicas = (_neighbours(f[k]) for k in ("prev", "next", "replicas"))
            if not 0 <= f["replica"] < len(replicas) or replicas[f["replica"]].peer_id != self.transport.peer_id:
                raise ValueError("this peer is not the replica it was assigned")
            runner.share_grads = len(replicas) > 1
        except Exception as exc:  # noqa: BLE001 - hostile or broken programs are rejected, never fatal
            log.warning("rejected stage %d of job %s: %s", f["stage"], job_id, exc)
            await link.send(message("job_error", job_id=job_id, reason=f"stage rejected: {exc}"))
            return
        inbox = StageInbox(bundle.microbatches, bundle.is_last, capacity=self.config.max_inbox_items,
                           replica=f["replica"], replicas=len(replicas), step=f["step"])
        job = _StageJob(job_id, f["stage"], runner, inbox, link.remote_peer_id, link, prev, nxt, replicas)
        self.jobs[job_id] = job
        self.nursery.start_soon(self._run_job, job)
        log.info("serving stage %d of job %s", job.stage, job_id)
        await link.send(message("stage_ready", job_id=job_id, stage=job.stage))

    def drop_job(self, job_id: str, why: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.ended_jobs.append(job_id)
            log.info("job %s ended: %s", job_id, why)
            job.cancel_scope.cancel()

    # -- compute -------------------------------------------------------------------------

    async def _compute(self, fn):
        if self.config.compute_in_thread:
            return await trio.to_thread.run_sync(fn, limiter=self.compute_limiter)
        return fn()

    async def _run_job(self, job: _StageJob) -> None:
        with job.cancel_scope:
            try:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._heartbeat_driver, job)
                        await self._work(job)
                except BaseExceptionGroup as group:
                    # The nursery wraps the one real error; classify that error, not the group
                    # (a wrapped LinkClosed must not read as this peer's own failure).
                    raise sole_error(group) from None
            except (LinkClosed, TransportError) as exc:
                # A neighbour vanished: the driver notices the stall and the lost peer; this
                # peer stays healthy and drops the job (re-sharding is the driver's call).
                log.warning("job %s: neighbour unreachable (%s)", job.job_id, exc)
                self.drop_job(job.job_id, "a neighbour is unreachable")
            except Exception as exc:  # noqa: BLE001 - a bad job must never take the peer down
                log.exception("job %s failed", job.job_id)
                with trio.move_on_after(self.config.leave_timeout_s):
                    try:
                        await job.driver_link.send(message("job_error", job_id=job.job_id,
                                                           reason=f"stage {job.stage}: {type(exc).__name__}: {exc}"))
                    except LinkClosed:
                        pass
                self.drop_job(job.job_id, f"failed: {exc}")

    async def _work(self, job: _StageJob) -> None:
        while True:
            task = job.inbox.next_task()
            if task is None:
                job.wakeup = trio.Event()
                await job.wakeup.wait()
                continue
            await self._run_task(job, task)

    async def _heartbeat_driver(self, job: _StageJob) -> None:
        """Tell the driver this peer is alive while it serves the job, also during a long
        computation (compute runs in a thread; small frames overtake bulk ones on a link):
        a frame at least every `job_heartbeat_interval_s`. Any frame counts (the driver's
        detector hears them all), so a heartbeat goes only after that long without one.
        Ends quietly if the driver's link is closed (the job is dropped then)."""
        interval_s, link = self.config.job_heartbeat_interval_s, job.driver_link
        while True:
            due_s = link.last_sent_s + interval_s
            if trio.current_time() >= due_s:
                try:
                    await link.send(message("heartbeat"))
                except LinkClosed:
                    return
                due_s = trio.current_time() + interval_s
            await trio.sleep_until(due_s)

    def _maybe_crash(self, phase: str, step: int, mb: int | None = None) -> None:
        """Fault injection for churn tests: `PeerConfig.crash_at` = "PHASE:STEP[:MB]" makes
        this process SIGKILL itself (exactly what `kill -9` does) as it starts that work, if
        it is the first to create the file `crash_token` (when one is given)."""
        if self.config.crash_at is None:
            return
        want = self.config.crash_at.split(":")
        if want[0] != phase or int(want[1]) != step or (len(want) > 2 and int(want[2]) != mb):
            return
        if self.config.crash_token is not None:
            try:
                os.close(os.open(self.config.crash_token, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        log.warning("crash_at %s: killing this process", self.config.crash_at)
        os.kill(os.getpid(), signal.SIGKILL)

    async def _modelled_compute(self, job: _StageJob, kind: str) -> None:
        if self.config.compute_delay_s is not None:
            await trio.sleep(self.config.compute_delay_s(kind, job.job_id, job.stage))

    async def _run_task(self, job: _StageJob, task: Task) -> None:
        ids = dict(job_id=job.job_id, step=task.step, mb=task.mb)
        runner = job.runner
        self._maybe_crash(task.kind, task.step, task.mb)
        if task.kind == "forward":
            y = await self._compute(lambda: runner.forward(task.mb, task.x))
            await self._modelled_compute(job, "forward")
            await self._send_to(job.route(job.next, task.mb), message("forward", [y], **ids))
            return
        if task.kind == "grads":
            await self._compute(lambda: runner.add_grads(task.mb, task.grad))
            await self._modelled_compute(job, "grads")
        else:
            if task.kind == "last":
                loss, grad_in = await self._compute(lambda: runner.last(task.mb, task.x, task.y))
                await self._modelled_compute(job, "last")
                await job.driver_link.send(message("loss", value=float(loss), **ids))
            else:
                grad_in = await self._compute(lambda: runner.backward(task.mb, task.grad))
                await self._modelled_compute(job, "backward")
            if job.prev:
                await self._send_to(job.route(job.prev, task.mb), message("backward", [grad_in], **ids))
            else:
                await job.driver_link.send(message("backward_done", **ids))
            job.own_done += 1
            if job.own_done == len(job.inbox.owned()):
                await self._share_grads(job, task.step)
        if len(runner.completed_microbatches) == job.inbox.microbatches:
            self._maybe_crash("update", task.step)
            await self._compute(runner.apply_update)
            await self._modelled_compute(job, "update")
            job.own_done = 0
            job.inbox.next_step()
            await job.driver_link.send(
                message("step_done", job_id=job.job_id, step=task.step))

    async def _share_grads(self, job: _StageJob, step: int) -> None:
        """Send this replica's micro-batch gradients to the stage's other replicas."""
        shared = job.runner.take_shared_grads()
        for mbs in _batches_within(shared, GRADS_FRAME_BYTES):
            frame = message("grads", [a for mb in mbs for a in shared[mb]], job_id=job.job_id, step=step, mbs=mbs)
            for sibling in job.replicas:
                if sibling.peer_id != self.transport.peer_id:
                    await self._send_to(sibling, frame)

    async def _send_to(self, neighbour: _Neighbour, msg: Frame) -> None:
        """Send to a stage neighbour, once more over a fresh link if the cached one fails
        (its stream may have broken, or the other side closed it while idle).
        Safe: the receiving inbox drops a duplicate. A second failure is the neighbour's."""
        try:
            await (await self.link_to(neighbour.peer_id, neighbour.address)).send(msg)
        except LinkClosed:
            await (await self.link_to(neighbour.peer_id, neighbour.address)).send(msg)



async def serve_peer(
    transport: Transport,
    config: PeerConfig,
    *,
    task_status: trio.TaskStatus[PeerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a peer until cancelled: listen, register with the bootstrap, heartbeat, serve
    stages. `task_status.started(PeerInfo)` once registered. On cancellation the leave is
    announced to the bootstrap (bounded by `leave_timeout_s`) before returning.

    Raises TransportError if the bootstrap cannot be reached, ProtocolError if it refuses
    the registration.
    """
    async with trio.open_nursery() as nursery:
        peer = Peer(transport, config, nursery)
        address = await nursery.start(transport.serve, config.listen, peer.handle_connection)
        bootstrap = Link(await transport.connect(config.bootstrap))
        try:
            bandwidth = await _measure_upload(bootstrap, config.bandwidth_probe_bytes)
            await request(bootstrap, message(
                "register", address=address, memory_bytes=config.memory_bytes,
                flops_per_s=float(config.flops_per_s), bandwidth_bytes_per_s=bandwidth,
                threads=config.threads), "registered")
            task_status.started(PeerInfo(transport.peer_id, address))
            log.info("peer %s registered (upload %.1f MB/s)", transport.peer_id[:12], bandwidth / 1e6)
            await _heartbeat(bootstrap, config.heartbeat_interval_s)
            await trio.sleep_forever()   # the bootstrap is gone; keep serving current jobs
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(config.leave_timeout_s):
                try:
                    await bootstrap.send(message("leave"))
                except LinkClosed:
                    pass
                await bootstrap.aclose()
            nursery.cancel_scope.cancel()


async def _measure_upload(bootstrap: Link, probe_bytes: int) -> float:
    """Upload bandwidth to the bootstrap in bytes/s, from one timed probe round trip."""
    probe = np.zeros(probe_bytes, dtype=np.uint8)
    start = trio.current_time()
    await request(bootstrap, message("bandwidth_probe", [probe]), "bandwidth_ack")
    # Under a virtual clock the probe takes no time: floor it at a microsecond.
    elapsed_s = max(trio.current_time() - start, 1e-6)
    return probe_bytes / elapsed_s


async def _heartbeat(bootstrap: Link, interval_s: float) -> None:
    """Heartbeat until the bootstrap link breaks (then return: the peer keeps serving
    its current jobs, it just cannot be found by new drivers)."""
    async with trio.open_nursery() as nursery:
        async def drain():   # notice a closed link promptly; the bootstrap sends nothing here
            while await next_message(bootstrap) is not None:
                pass
            nursery.cancel_scope.cancel()
        nursery.start_soon(drain)
        try:
            while True:
                await bootstrap.send(message("heartbeat"))
                await trio.sleep(interval_s)
        except LinkClosed:
            log.warning("lost the bootstrap; still serving current jobs")
            nursery.cancel_scope.cancel()
