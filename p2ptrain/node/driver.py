"""The driver: the process that called `train`. It plans, ships stages to peers, feeds the
pipeline, gathers the final parameters, and recovers from peers that vanish. Data never
leaves it except as micro-batch inputs to stage 0 and targets to the last stage
(DESIGN.md section 3).

Step protocol (a synchronous pipeline flush per step, so every step applies exactly one
optimizer update computed from all its micro-batches):
  1. admit up to `window` micro-batches: `forward` to stage 0 and `target` to the last stage;
  2. each `backward_done` from stage 0 frees a slot for the next micro-batch;
  3. the step ends when every replica of every stage has sent `step_done` (it applied its
     update) and the last stage has sent one `loss` per micro-batch.

Recovery (nothing is lost): every `snapshot_every_steps` steps the driver fetches each
stage's parameters and optimizer state (a `Snapshot`, also written to `state_dir`). When a
peer is lost, the job's epoch ends: the survivors drop it, the driver re-plans on the live
peers (`planner.replan`), loads the stages from the last snapshot and replays the steps
since. Training is a deterministic function of the snapshot and `batches(step)`, so the
replayed steps recompute exactly what was lost, and the final parameters equal those of a
run without failures. Messages of an ended epoch carry its job id and are dropped.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import trio

from .. import planner
from ..compute import (Sequential, export_stage, opt_state_leaf_counts, profile_layers,
                       residual_bytes_per_sample)
from ..core.detector import DetectorConfig, FailureDetector
from ..core.schedule import MicrobatchWindow, split_microbatches
from ..transport.base import Transport, TransportError
from ..wire.codec import Frame
from ..wire.messages import ProtocolError, message
from . import checkpoint
from .checkpoint import Snapshot
from .groups import sole_error
from .link import Link, LinkClosed
from .session import next_message, request

log = logging.getLogger("p2ptrain.driver")


class TrainingError(Exception):
    """Training could not start or could not go on; the message says why in one line."""


class PeerLost(Exception):
    """A peer of the running job vanished or failed its stage: the epoch must end."""

    def __init__(self, peer_id: str, why: str):
        super().__init__(f"peer {peer_id[:12]}: {why}")
        self.peer_id = peer_id


@dataclass(frozen=True)
class TrainSpec:
    """Everything `train` was asked to do, resolved (params initialised)."""

    model: Sequential
    batches: Callable[[int], tuple[Any, Any]]
    loss: Callable
    optimizer: Any
    steps: int
    microbatches: int
    params: list
    state_factor: float = 4.0
    state_dir: Path | None = None   # where checkpoints go; None keeps them in memory only
    resume: bool = False            # start from the checkpoint in state_dir


@dataclass(frozen=True)
class DriverConfig:
    stage_ready_timeout_s: float = 120.0
    step_timeout_s: float = 120.0
    max_event_backlog: int = 1024
    max_in_flight: int | None = None   # None: one micro-batch per stage replica (1F1B)
    # Most peers serving one stage; None: the micro-batch count (replicas beyond it idle).
    # Fewer replicas make a plan slower but less likely to lose a peer under churn.
    max_replicas: int | None = None
    # Snapshot period in steps; None picks it so that fetching the state costs at most
    # `snapshot_overhead` of the training time (see `_snapshot_period`).
    snapshot_every_steps: int | None = None
    snapshot_overhead: float = 0.05
    wait_for_peers_s: float = 60.0     # after a failure, how long to wait for enough peers
    exclude_lost_peer_s: float = 120.0  # how long a lost (or suspected) peer is left out
    max_recoveries: int = 100
    # A peer that joins is taken in at the next snapshot if a fresh plan is this much faster.
    rebalance_gain: float = 0.2
    # ... checked at most this often: each check runs the planner over the whole directory,
    # which under steady arrivals into a large swarm would otherwise happen at every snapshot.
    # Each check that finds no gain doubles the wait, up to 16x (a gain resets it).
    rebalance_interval_s: float = 30.0
    # How often the bootstrap hears the job's progress (`p2ptrain status`; informational).
    status_interval_s: float = 1.0
    # Silent peers (stopped, partitioned) are found by a phi-accrual detector over the
    # peers' job heartbeats; a broken connection is noticed at once without it.
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    detector_poll_interval_s: float = 0.1

    def __post_init__(self) -> None:
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ValueError(f"max_replicas must be at least 1 (or None), got {self.max_replicas}")


@dataclass(frozen=True)
class StageAssignment:
    """One stage of a running job: layers [start, stop) on replica peers `peer_ids` (at
    `addresses`); micro-batch mb runs on replica mb % len(peer_ids)."""

    start: int
    stop: int
    peer_ids: tuple[str, ...]
    addresses: tuple[str, ...]

    @property
    def peer_id(self) -> str:
        """The first (fastest) replica."""
        return self.peer_ids[0]

    def replicas(self) -> list[list[str]]:
        """[[peer_id, address], ...] as load_stage carries them."""
        return [[p, a] for p, a in zip(self.peer_ids, self.addresses)]


@dataclass(frozen=True)
class Recovery:
    """One failure and what it cost."""

    epoch: int            # the epoch that ended
    peer_id: str          # the peer lost
    reason: str
    failed_at_step: int   # the step in progress
    resumed_from_step: int
    seconds: float        # from the failure being noticed to the next committed step
    noticed_at_s: float   # trio.current_time() when the driver noticed it


@dataclass
class TrainResult:
    params: list
    losses: list[float]
    stages: list[StageAssignment]   # the final epoch's stages
    plan: planner.Plan
    step_times_s: list[float] = field(default_factory=list)
    samples_per_step: int = 0
    recoveries: list[Recovery] = field(default_factory=list)
    epochs: int = 1
    snapshot_times_s: list[float] = field(default_factory=list)   # fetching each snapshot

    @property
    def samples_per_s(self) -> float:
        total_s = sum(self.step_times_s)
        return self.samples_per_step * len(self.step_times_s) / total_s if total_s else 0.0


StepCallback = Callable[[int, float, float], None]   # (step, loss, samples_per_s)
PlanCallback = Callable[[list[StageAssignment], int], None]   # (stages, epoch)


def as_batch(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Inputs as float32; integer targets as int32, real ones as float32 (jax's defaults)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    y = y.astype(np.int32 if np.issubdtype(y.dtype, np.integer) else np.float32)
    return x, y


async def run_training(
    transport: Transport,
    bootstrap: str,
    spec: TrainSpec,
    config: DriverConfig = DriverConfig(),
    on_step: StepCallback | None = None,
    on_plan: PlanCallback | None = None,
) -> TrainResult:
    """Train `spec` on the swarm behind `bootstrap`. Raises planner.Infeasible when the
    swarm cannot hold the model at the start, TrainingError when it cannot go on (peers
    refuse the stage, or too few peers are left for longer than `wait_for_peers_s`)."""
    directory = Link(await transport.connect(bootstrap))
    try:
        driver = _Driver(transport, directory, spec, config, on_step, on_plan)
        return await driver.run()
    finally:
        with trio.CancelScope(shield=True):
            await directory.aclose()


class _Driver:
    """The epochs of one training run: plan, load from a snapshot, train, and on a lost
    peer, start the next epoch."""

    def __init__(self, transport, directory: Link, spec: TrainSpec, config: DriverConfig,
                 on_step: StepCallback | None, on_plan: PlanCallback | None):
        self.transport, self.directory, self.spec, self.config = transport, directory, spec, config
        self.on_step, self.on_plan = on_step, on_plan
        self.job_base = f"job-{transport.peer_id[:12]}"
        self.opt_counts = [n for layer in spec.params
                           for n in opt_state_leaf_counts(spec.optimizer, [layer])]
        self.fingerprint = checkpoint.fingerprint(spec.params, self.opt_counts, spec.microbatches)
        self.excluded: dict[str, float] = {}   # peer id -> until when (trio time) it is left out
        self.step_times: list[float] = []
        self.snapshot_times: list[float] = []
        self.exported: dict = {}
        self.recoveries: list[Recovery] = []
        self.rebalance_wait_s = config.rebalance_interval_s
        self.shapes = _shapes(spec)
        self.samples_per_step = self.shapes.batch_size
        self.costs = profile_layers(spec.model, spec.params, self.shapes.x_mb)

    async def run(self) -> TrainResult:
        spec = self.spec
        snapshot = Snapshot(0, list(spec.params), None, ())
        if spec.resume:
            if spec.state_dir is None:
                raise ValueError("resume=True needs a state_dir")
            snapshot = checkpoint.load(spec.state_dir, spec.params, self.opt_counts, self.fingerprint)
            log.info("resuming from the checkpoint at step %d", snapshot.step)
        self.snapshot, self.step = snapshot, snapshot.step
        epoch, previous, pending = 0, None, None
        while True:
            peers, (stages, the_plan, bundles) = await self._plan_on_live_peers(previous, wait=epoch > 0)
            in_use = {p for s in stages for p in s.peer_ids}
            self.planned_with = {p["peer_id"] for p in peers}
            self.rebalance_checked_at = trio.current_time()
            self.min_bandwidth = min(p["bandwidth_bytes_per_s"] for p in peers if p["peer_id"] in in_use)
            if self.on_plan is not None:
                self.on_plan(stages, epoch)
            try:
                done = await self._run_epoch(epoch, stages, the_plan, bundles, pending)
            except PeerLost as lost:
                if len(self.recoveries) >= self.config.max_recoveries:
                    raise TrainingError(f"giving up after {len(self.recoveries)} recoveries: {lost}") from None
                log.warning("epoch %d ended at step %d: %s; resuming from step %d",
                            epoch, self.step, lost, self.snapshot.step)
                # Left out for a while, not forever: a suspicion may have been false (a long
                # stall, a partition that healed), and the peer is welcome back once the
                # bootstrap lists it alive again after that.
                self.excluded[lost.peer_id] = trio.current_time() + self.config.exclude_lost_peer_s
                pending = (epoch, lost, self.step, trio.current_time())
            else:
                pending = None
                if done:
                    snapshot = self.snapshot
                    return TrainResult(snapshot.params, list(snapshot.losses), stages, the_plan,
                                       self.step_times, self.samples_per_step, self.recoveries, epoch + 1,
                                       self.snapshot_times)
            epoch, previous = epoch + 1, the_plan

    async def _plan_on_live_peers(self, previous: planner.Plan | None, *, wait: bool):
        """(peers, planned job) over the directory's live peers, less those this run saw
        fail. After a failure (`wait`), waits up to `wait_for_peers_s` for enough peers to
        hold the model; otherwise Infeasible goes to the caller."""
        deadline = trio.current_time() + self.config.wait_for_peers_s
        while True:
            reply = await request(self.directory, message("directory_request"), "directory")
            peers = self._usable(reply.fields["peers"])
            try:
                return peers, self._plan(peers, previous)
            except (planner.Infeasible, TrainingError) as exc:
                if not wait:
                    raise
                if trio.current_time() >= deadline:
                    where = f"; the last checkpoint is in {self.spec.state_dir}" if self.spec.state_dir else ""
                    raise TrainingError(
                        f"the swarm can no longer hold the model and no peers came in "
                        f"{self.config.wait_for_peers_s:.0f} s: {exc}{where}") from None
            await trio.sleep(1.0)

    def _usable(self, peers: list[dict]) -> list[dict]:
        """The directory's live peers, less those recently lost by this run."""
        now = trio.current_time()
        return [p for p in peers if self.excluded.get(p["peer_id"], now) <= now]

    def _plan(self, peers: list[dict], previous: planner.Plan | None):
        return _plan_job(self.spec, self.costs, self.shapes, peers, previous, self.exported, self.max_replicas)

    @property
    def max_replicas(self) -> int:
        return self.config.max_replicas or self.spec.microbatches

    async def _run_epoch(self, epoch, stages, the_plan, bundles, pending) -> bool:
        """Train from the latest snapshot until done (True), a rebalance (False), or a lost
        peer (PeerLost). `self.snapshot` is the latest snapshot throughout."""
        spec, config = self.spec, self.config
        try:
            async with trio.open_nursery() as nursery:
                job = _Job(f"{self.job_base}-e{epoch}", stages, the_plan, bundles, spec, config,
                           self.transport, nursery)
                try:
                    result = await self._train(job, epoch, pending)
                except BaseException as exc:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await job.end()
                        state = "re-planned" if isinstance(exc, PeerLost) else "failed"
                        await _report(self.directory, job, epoch, state, self.step)
                    raise
                nursery.cancel_scope.cancel()
                return result
        except BaseExceptionGroup as group:
            raise sole_error(group) from None

    async def _train(self, job: "_Job", epoch: int, pending) -> bool:
        spec = self.spec
        snapshot = self.snapshot
        await _report(self.directory, job, epoch, "loading", snapshot.step)
        await job.load(snapshot)
        losses = list(snapshot.losses[:snapshot.step])
        period = self.config.snapshot_every_steps
        step = self.step = snapshot.step
        reported_at = -math.inf
        while step < spec.steps:
            start = trio.current_time()
            losses.append(await job.run_step(step))
            step = self.step = step + 1
            self.step_times.append(trio.current_time() - start)
            if pending is not None:
                failed_epoch, lost, failed_at, noticed_at = pending
                self.recoveries.append(Recovery(failed_epoch, lost.peer_id, str(lost), failed_at, snapshot.step,
                                                trio.current_time() - noticed_at, noticed_at))
                pending = None
            if self.on_step is not None:
                self.on_step(step - 1, losses[-1], _samples_per_s(self.samples_per_step, self.step_times))
            if trio.current_time() >= reported_at + self.config.status_interval_s:
                reported_at = trio.current_time()
                await _report(self.directory, job, epoch, "training", step)
            if self.config.snapshot_every_steps is None and len(self.step_times) >= _PERIOD_SAMPLES:
                # Past the first steps, which include compilation and warm-up; re-chosen
                # after each snapshot from what fetching one really cost.
                period = self._snapshot_period(statistics.median(self.step_times[-_PERIOD_SAMPLES:]))
            if (period is not None and step - self.snapshot.step >= period) or step == spec.steps:
                started = trio.current_time()
                self.snapshot = await job.snapshot(step, losses, self.opt_counts)
                self.snapshot_times.append(trio.current_time() - started)
                if spec.state_dir is not None:
                    checkpoint.save(spec.state_dir, self.snapshot, self.fingerprint)
                if step < spec.steps and await self._should_rebalance(job):
                    await job.end()
                    await _report(self.directory, job, epoch, "re-planned", step)
                    return False
        await job.end()
        await _report(self.directory, job, epoch, "finished", step)
        return True

    def _snapshot_period(self, step_time_s: float) -> int:
        """Steps between snapshots so that fetching the state costs about
        `snapshot_overhead` of the training time. The state (params plus optimizer state,
        taken as 3x the params: Adam's two moments) crosses the slowest link in use once per
        period; a shorter period means fewer steps to replay after a failure."""
        if self.snapshot_times:
            fetch_s = statistics.median(self.snapshot_times[-_PERIOD_SAMPLES:])
        else:   # before the first snapshot: estimate from the state's size
            fetch_s = 3 * sum(c.param_bytes for c in self.costs) / max(self.min_bandwidth, 1.0)
        return max(1, math.ceil(fetch_s / max(self.config.snapshot_overhead * step_time_s, 1e-9)))

    async def _should_rebalance(self, job: "_Job") -> bool:
        """Whether peers that joined since the plan (or the last check) would make steps
        `rebalance_gain` faster. Checked at most every `rebalance_interval_s`."""
        if trio.current_time() < self.rebalance_checked_at + self.rebalance_wait_s:
            return False
        self.rebalance_checked_at = trio.current_time()
        reply = await request(self.directory, message("directory_request"), "directory")
        peers = self._usable(reply.fields["peers"])
        ids = {p["peer_id"] for p in peers}
        if ids <= self.planned_with:
            return False   # nobody new: peers the plan left out stay out (that was its choice)
        if not set(job.plan.peer_ids()) <= ids:
            return False   # a peer of the plan is leaving: its loss re-plans anyway
        self.planned_with |= ids   # a peer found no help now is not re-examined at every check
        self.rebalance_wait_s = min(2 * self.rebalance_wait_s, 16 * self.config.rebalance_interval_s)
        specs, sizes = _peer_specs(peers), self.shapes.sizes
        current = planner.step_time(job.plan, self.costs, specs, **sizes)
        fresh = _capped_plan(self.spec, self.costs, sizes, specs, None, self.max_replicas)
        if planner.step_time(fresh, self.costs, specs, **sizes) >= (1 - self.config.rebalance_gain) * current:
            return False
        self.rebalance_wait_s = self.config.rebalance_interval_s
        return True


_PERIOD_SAMPLES = 5   # steps timed before the automatic snapshot period is chosen


def _samples_per_s(samples_per_step: int, step_times: list[float]) -> float:
    recent = step_times[-10:]
    return samples_per_step * len(recent) / sum(recent) if sum(recent) > 0 else 0.0


async def _report(directory: Link, job: "_Job", epoch: int, state: str, step: int) -> None:
    """Tell the bootstrap how the job stands (best effort: `status` is informational)."""
    stages = [[s.start, s.stop, list(s.peer_ids)] for s in job.stages]
    try:
        await directory.send(message("job_update", job_id=job.job_id, state=state, epoch=epoch,
                                     step=step, steps=job.spec.steps, stages=stages))
    except LinkClosed:
        pass


@dataclass(frozen=True)
class _Shapes:
    """The per-step sizes the planner and the stage export need, from batches(0)."""

    x_mb: np.ndarray
    y_mb: np.ndarray
    batch_size: int

    @property
    def sizes(self) -> dict:
        return dict(in_bytes=self.x_mb[0].nbytes, batch_size=self.batch_size,
                    microbatch_size=len(self.x_mb))


def _shapes(spec: TrainSpec) -> _Shapes:
    x0, y0 = as_batch(*spec.batches(0))
    if len(x0) % spec.microbatches:
        raise ValueError(f"batch size {len(x0)} is not divisible by microbatches={spec.microbatches}")
    mb_size = len(x0) // spec.microbatches
    return _Shapes(x0[:mb_size], y0[:mb_size], len(x0))


def _peer_specs(peers: list[dict]) -> list[planner.PeerSpec]:
    if not peers:
        raise TrainingError("no live peers in the swarm: start some with `p2ptrain join`")
    return [planner.PeerSpec(p["peer_id"], p["memory_bytes"], p["flops_per_s"], p["bandwidth_bytes_per_s"])
            for p in peers]


def _capped_plan(spec: TrainSpec, costs, sizes: dict, specs: list, previous: planner.Plan | None,
                 max_replicas: int) -> planner.Plan:
    """A plan (a re-plan from `previous` after churn, which keeps stages in place where it
    can) over the shortlist of `specs`, at most `max_replicas` peers per stage."""
    specs = planner.shortlist(specs, previous, max_peers=len(costs) * max_replicas)
    kw = dict(state_factor=spec.state_factor, **sizes)
    the_plan = planner.plan(costs, specs, **kw) if previous is None else planner.replan(previous, costs, specs, **kw).plan
    return planner.cap_replicas(the_plan, costs, specs, max_replicas=max_replicas, **kw)


def _plan_job(spec: TrainSpec, costs, shapes: _Shapes, peers: list[dict], previous: planner.Plan | None,
              exported: dict, max_replicas: int):
    """Plan the model onto `peers` (see `_capped_plan`) and export each stage. Pure
    compute, no I/O.

    `exported` caches bundles by (start, stop, keep_residuals): a stage that survives a
    re-plan is not exported again, and its byte-identical programs hit the peers' compile
    cache, which keeps recovery short."""
    the_plan = _capped_plan(spec, costs, shapes.sizes, _peer_specs(peers), previous, max_replicas)
    by_id = {p["peer_id"]: p for p in peers}
    stages = [StageAssignment(s.start, s.stop, tuple(s.peers), tuple(by_id[p]["address"] for p in s.peers))
              for s in the_plan.stages]
    bundles = []
    x_spec = jax.ShapeDtypeStruct(shapes.x_mb.shape, shapes.x_mb.dtype)
    for index, stage in enumerate(stages):
        is_last = index == len(stages) - 1
        stage_params = spec.params[stage.start:stage.stop]
        memory_bytes = min(by_id[p]["memory_bytes"] for p in stage.peer_ids)
        keep_residuals = _residuals_fit(spec, costs, stages, index, x_spec, memory_bytes, shapes.sizes)
        key = (stage.start, stage.stop, keep_residuals)
        if key not in exported:
            exported[key] = export_stage(
                spec.model, stage.start, stage.stop, stage_params, x_spec=x_spec,
                y_spec=jax.ShapeDtypeStruct(shapes.y_mb.shape, shapes.y_mb.dtype) if is_last else None,
                loss=spec.loss, optimizer=spec.optimizer, microbatches=spec.microbatches, is_last=is_last,
                keep_residuals=keep_residuals)
        bundles.append(exported[key])
        out = jax.eval_shape(lambda p, x: spec.model.apply_range(p, x, stage.start, stage.stop),
                             stage_params, x_spec)
        x_spec = jax.ShapeDtypeStruct(out.shape, out.dtype)
    return stages, the_plan, bundles


def _residuals_fit(spec: TrainSpec, costs, stages, index: int, x_spec, peer_memory_bytes: int, memory: dict) -> bool:
    """Whether stage `index` keeps its forward residuals for the backward pass.

    Keeping them makes the backward cost about 2x the forward instead of 3x (recomputing
    the forward); recomputing keeps only the stage input per micro-batch. The cost model
    already budgets every layer output of the in-flight micro-batches; residuals are kept
    when what they need beyond that still fits in the peer's donated memory.
    """
    stage = stages[index]
    budgeted = planner.stage_memory_bytes(costs, stage.start, stage.stop, index, len(stages),
                                          state_factor=spec.state_factor, **memory)
    stage_in = memory["in_bytes"] if stage.start == 0 else costs[stage.start - 1].out_bytes
    per_sample_budget = stage_in + sum(c.out_bytes for c in costs[stage.start:stage.stop])
    residual = residual_bytes_per_sample(spec.model, stage.start, stage.stop,
                                         spec.params[stage.start:stage.stop], x_spec)
    in_flight = min(len(stages) - index, spec.microbatches) * memory["microbatch_size"]
    return budgeted + in_flight * max(0, residual - per_sample_budget) <= peer_memory_bytes


# An event no peer can send (it is not a wire message kind): the detector's verdict.
_SUSPECTED = Frame("suspected", {})


class _Job:
    """A job's links to its stage replicas and the events they send back. Replicas are
    numbered in `members` order: (stage, replica) for every replica of every stage."""

    def __init__(self, job_id, stages, the_plan, bundles, spec: TrainSpec, config: DriverConfig, transport, nursery):
        self.job_id, self.stages, self.plan, self.bundles = job_id, stages, the_plan, bundles
        self.spec, self.config = spec, config
        self.transport, self.nursery = transport, nursery
        self.members = [(index, replica) for index, stage in enumerate(stages)
                        for replica in range(len(stage.peer_ids))]
        self.links: dict[tuple[int, int], Link] = {}
        self.events_send, self.events = trio.open_memory_channel[tuple[tuple[int, int], Frame | None]](
            config.max_event_backlog)
        self.treedefs = [jax.tree_util.tree_structure(spec.params[s.start:s.stop]) for s in stages]
        self.detector = FailureDetector(config.detector)

    def link_for(self, stage: int, mb: int) -> tuple[tuple[int, int], Link]:
        """The replica of `stage` that computes micro-batch `mb`, and the link to it."""
        member = (stage, mb % len(self.stages[stage].peer_ids))
        return member, self.links[member]

    def peer_of(self, member: tuple[int, int]) -> str:
        return self.stages[member[0]].peer_ids[member[1]]

    async def send(self, member: tuple[int, int], frame: Frame) -> None:
        try:
            await self.links[member].send(frame)
        except LinkClosed:
            raise PeerLost(self.peer_of(member), "link closed") from None

    async def load(self, snapshot: Snapshot) -> None:
        """Connect to every replica's peer, ship its stage with the state of `snapshot`,
        wait until all are ready."""
        with trio.fail_after(self.config.stage_ready_timeout_s):
            for member in self.members:
                stage = self.stages[member[0]]
                try:
                    self.links[member] = Link(await self.transport.connect(
                        stage.addresses[member[1]], stage.peer_ids[member[1]]))
                except TransportError as exc:
                    raise PeerLost(self.peer_of(member), str(exc)) from None
            for member in self.members:
                index, replica = member
                stage = self.stages[index]
                prev = self.stages[index - 1].replicas() if index > 0 else []
                nxt = self.stages[index + 1].replicas() if index + 1 < len(self.stages) else []
                params = [np.asarray(a) for a in jax.tree_util.tree_leaves(snapshot.params[stage.start:stage.stop])]
                opt_state = [a for layer in (snapshot.opt_state or [])[stage.start:stage.stop] for a in layer]
                await self.send(member, message(
                    "load_stage", params + opt_state, job_id=self.job_id, stage=index,
                    bundle=self.bundles[index].to_wire(), prev=prev, next=nxt, replicas=stage.replicas(),
                    replica=replica, n_params=len(params), step=snapshot.step))
            for member, link in self.links.items():
                self.nursery.start_soon(self._receive, member, link)
            ready = set()
            while len(ready) < len(self.members):
                try:
                    member, msg = await self._next_event()
                except PeerLost as lost:
                    if "stage rejected" in str(lost):
                        raise TrainingError(str(lost)) from None   # would be rejected again
                    raise
                if msg.kind != "stage_ready":
                    raise TrainingError(f"stage {member[0]}: unexpected {msg.kind} while loading")
                ready.add(member)
        # Watch only once every stage is loaded: a peer compiles its programs before it
        # starts heartbeating the job.
        for member in self.members:
            self.detector.watch(self.peer_of(member), trio.current_time())
        self.nursery.start_soon(self._watch)

    async def _receive(self, member: tuple[int, int], link: Link) -> None:
        while (msg := await next_message(link)) is not None:
            self.detector.heartbeat(self.peer_of(member), trio.current_time())
            if msg.kind != "heartbeat":
                await self.events_send.send((member, msg))
        await self.events_send.send((member, None))

    async def _watch(self) -> None:
        """Report the first member the detector suspects as an event (ends the epoch)."""
        by_peer = {self.peer_of(m): m for m in self.members}
        while True:
            await trio.sleep(self.config.detector_poll_interval_s)
            for peer_id, state in self.detector.poll(trio.current_time()):
                if state != "alive":
                    await self.events_send.send((by_peer[peer_id], _SUSPECTED))
                    return

    async def _next_event(self) -> tuple[tuple[int, int], Frame]:
        member, msg = await self.events.receive()
        stage = self.stages[member[0]]
        where = f"stage {member[0]}, layers {stage.start}-{stage.stop - 1}"
        if msg is None:
            raise PeerLost(self.peer_of(member), f"connection lost ({where})")
        if msg is _SUSPECTED:
            silent_s = self.config.detector.acceptable_pause_s
            raise PeerLost(self.peer_of(member), f"silent for over {silent_s:.1f} s, suspected ({where})")
        if msg.kind == "job_error":
            raise PeerLost(self.peer_of(member), f"{msg.fields['reason']} ({where})")
        return member, msg

    async def run_step(self, step: int) -> float:
        spec = self.spec
        x, y = as_batch(*spec.batches(step))
        xs, ys = split_microbatches(x, spec.microbatches), split_microbatches(y, spec.microbatches)
        widest = max(len(s.peer_ids) for s in self.stages)
        window = MicrobatchWindow(spec.microbatches, self.config.max_in_flight or len(self.stages) * widest)
        last_stage = len(self.stages) - 1
        losses: dict[int, float] = {}
        steps_done: set[tuple[int, int]] = set()
        with trio.fail_after(self.config.step_timeout_s):
            while True:
                for mb in window.admit():
                    ids = dict(job_id=self.job_id, step=step, mb=mb)
                    await self.send(self.link_for(last_stage, mb)[0], message("target", [ys[mb]], **ids))
                    await self.send(self.link_for(0, mb)[0], message("forward", [xs[mb]], **ids))
                if window.complete and len(steps_done) == len(self.members) and len(losses) == spec.microbatches:
                    # Mean over micro-batches in index order (DESIGN.md section 3).
                    return float(np.mean([losses[mb] for mb in range(spec.microbatches)]))
                member, msg = await self._next_event()
                index, f = member[0], msg.fields
                if f.get("step") != step:
                    raise ProtocolError(f"stage {index} sent {msg.kind} for step {f.get('step')} during {step}")
                if msg.kind == "loss" and index == last_stage:
                    losses[f["mb"]] = f["value"]
                elif msg.kind == "backward_done" and index == 0:
                    window.finish(f["mb"])
                elif msg.kind == "step_done":
                    steps_done.add(member)
                else:
                    raise ProtocolError(f"stage {index} sent unexpected {msg.kind}")

    async def snapshot(self, step: int, losses: list[float], opt_counts: list[int]) -> Snapshot:
        """Every layer's params and optimizer state after `step` steps, from each stage's
        first replica (all replicas apply identical updates)."""
        for index in range(len(self.stages)):
            await self.send((index, 0), message("fetch_params", job_id=self.job_id))
        params: list = [None] * len(self.spec.params)
        opt_state: list = [None] * len(self.spec.params)
        fetched = 0
        with trio.fail_after(self.config.step_timeout_s):
            while fetched < len(self.stages):
                (index, _), msg = await self._next_event()
                if msg.kind != "params":
                    raise ProtocolError(f"stage {index} sent {msg.kind} instead of params")
                stage = self.stages[index]
                arrays = [np.array(a) for a in msg.arrays]   # copy out of the frame buffer
                n = msg.fields["n_params"]
                stage_params = jax.tree_util.tree_unflatten(self.treedefs[index], arrays[:n])
                params[stage.start:stage.stop] = stage_params
                rest = arrays[n:]
                for layer in range(stage.start, stage.stop):
                    opt_state[layer], rest = rest[:opt_counts[layer]], rest[opt_counts[layer]:]
                fetched += 1
        return Snapshot(step, params, opt_state, tuple(losses))

    async def end(self) -> None:
        """End this epoch's job on every peer (best effort, at most 1 s each) and close every
        link, also when cancelled part-way: a link left open would stay a peer's way to this
        driver for a job the driver no longer hears."""
        try:
            for link in self.links.values():
                with trio.move_on_after(1):
                    try:
                        await link.send(message("end_job", job_id=self.job_id))
                    except LinkClosed:
                        pass
        finally:
            with trio.CancelScope(shield=True):
                for link in self.links.values():
                    await link.aclose()
            self.links.clear()
