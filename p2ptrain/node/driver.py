"""The driver: the process that called `train`. It plans, ships stages to peers, feeds the
pipeline, and gathers the final parameters. Data never leaves it except as micro-batch
inputs to stage 0 and targets to the last stage (DESIGN.md section 3).

Step protocol (a synchronous pipeline flush per step, so every step applies exactly one
optimizer update computed from all its micro-batches):
  1. admit up to `window` micro-batches: `forward` to stage 0 and `target` to the last stage;
  2. each `backward_done` from stage 0 frees a slot for the next micro-batch;
  3. the step ends when every stage has sent `step_done` (it applied its update) and the
     last stage has sent one `loss` per micro-batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
import trio

from .. import planner
from ..compute import Sequential, export_stage, profile_layers, residual_bytes_per_sample
from ..core.schedule import MicrobatchWindow, split_microbatches
from ..transport.base import Transport
from ..wire.codec import Frame
from ..wire.messages import ProtocolError, message
from .groups import sole_error
from .link import Link, LinkClosed
from .session import next_message, request

log = logging.getLogger("p2ptrain.driver")


class TrainingError(Exception):
    """Training could not start or could not go on; the message says why in one line."""


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


@dataclass(frozen=True)
class DriverConfig:
    stage_ready_timeout_s: float = 120.0
    step_timeout_s: float = 120.0
    max_event_backlog: int = 1024
    max_in_flight: int | None = None   # None: one micro-batch per stage (1F1B)


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


@dataclass
class TrainResult:
    params: list
    losses: list[float]
    stages: list[StageAssignment]
    plan: planner.Plan
    step_times_s: list[float] = field(default_factory=list)
    samples_per_step: int = 0

    @property
    def samples_per_s(self) -> float:
        total_s = sum(self.step_times_s)
        return self.samples_per_step * len(self.step_times_s) / total_s if total_s else 0.0


StepCallback = Callable[[int, float, float], None]   # (step, loss, samples_per_s)


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
    on_plan: Callable[[list[StageAssignment]], None] | None = None,
) -> TrainResult:
    """Train `spec` on the swarm behind `bootstrap`. Raises planner.Infeasible when the
    swarm cannot hold the model, TrainingError when a peer refuses or vanishes."""
    directory = Link(await transport.connect(bootstrap))
    try:
        peers = (await request(directory, message("directory_request"), "directory")).fields["peers"]
        stages, the_plan, bundles = _plan_job(spec, peers)
        if on_plan is not None:
            on_plan(stages)
        try:
            async with trio.open_nursery() as nursery:
                job = _Job(f"job-{transport.peer_id[:12]}", stages, bundles, spec, config, transport, nursery)
                try:
                    params, losses, step_times = await _run_job(job, directory, on_step)
                except BaseException:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await _report(directory, job, "failed", 0)
                    raise
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise sole_error(group) from None
    finally:
        with trio.CancelScope(shield=True):
            await directory.aclose()
    x0, _ = spec.batches(0)
    return TrainResult(params, losses, stages, the_plan, step_times, samples_per_step=len(x0))


async def _run_job(job: "_Job", directory: Link, on_step: StepCallback | None):
    spec = job.spec
    await _report(directory, job, "loading", 0)
    await job.load()
    await _report(directory, job, "training", 0)
    losses, step_times = [], []
    for step in range(spec.steps):
        start = trio.current_time()
        losses.append(await job.run_step(step))
        step_times.append(trio.current_time() - start)
        if on_step is not None:
            on_step(step, losses[-1], _samples_per_s(spec, step_times))
        await _report(directory, job, "training", step + 1)
    params = await job.fetch_params()
    await job.end()
    await _report(directory, job, "finished", spec.steps)
    return params, losses, step_times


def _samples_per_s(spec: TrainSpec, step_times: list[float]) -> float:
    recent = step_times[-10:]
    x0, _ = spec.batches(0)
    return len(x0) * len(recent) / sum(recent) if sum(recent) > 0 else 0.0


async def _report(directory: Link, job: "_Job", state: str, step: int) -> None:
    """Tell the bootstrap how the job stands (best effort: `status` is informational)."""
    stages = [[s.start, s.stop, list(s.peer_ids)] for s in job.stages]
    try:
        await directory.send(message("job_update", job_id=job.job_id, state=state,
                                     step=step, steps=job.spec.steps, stages=stages))
    except LinkClosed:
        pass


def _plan_job(spec: TrainSpec, peers: list[dict]):
    """Profile the model, plan it onto `peers`, export each stage. Pure compute, no I/O."""
    if not peers:
        raise TrainingError("no live peers in the swarm: start some with `p2ptrain join`")
    x0, y0 = as_batch(*spec.batches(0))
    batch_size = x0.shape[0]
    if batch_size % spec.microbatches:
        raise ValueError(f"batch size {batch_size} is not divisible by microbatches={spec.microbatches}")
    mb_size = batch_size // spec.microbatches
    x_mb, y_mb = x0[:mb_size], y0[:mb_size]
    costs = profile_layers(spec.model, spec.params, x_mb)
    specs = [planner.PeerSpec(p["peer_id"], p["memory_bytes"], p["flops_per_s"], p["bandwidth_bytes_per_s"])
             for p in peers]
    the_plan = planner.plan(costs, specs, in_bytes=x0[0].nbytes, batch_size=batch_size,
                            microbatch_size=mb_size, state_factor=spec.state_factor)
    by_id = {p["peer_id"]: p for p in peers}
    stages = [StageAssignment(s.start, s.stop, tuple(s.peers), tuple(by_id[p]["address"] for p in s.peers))
              for s in the_plan.stages]
    bundles = []
    x_spec = jax.ShapeDtypeStruct(x_mb.shape, x_mb.dtype)
    for index, stage in enumerate(stages):
        is_last = index == len(stages) - 1
        stage_params = spec.params[stage.start:stage.stop]
        memory = dict(in_bytes=x0[0].nbytes, batch_size=batch_size, microbatch_size=mb_size)
        keep_residuals = _residuals_fit(spec, costs, stages, index, x_spec, min(by_id[p]["memory_bytes"] for p in stage.peer_ids), memory)
        bundles.append(export_stage(
            spec.model, stage.start, stage.stop, stage_params, x_spec=x_spec,
            y_spec=jax.ShapeDtypeStruct(y_mb.shape, y_mb.dtype) if is_last else None,
            loss=spec.loss, optimizer=spec.optimizer, microbatches=spec.microbatches,
            is_last=is_last, keep_residuals=keep_residuals))
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


class _Job:
    """A job's links to its stage replicas and the events they send back. Replicas are
    numbered in `members` order: (stage, replica) for every replica of every stage."""

    def __init__(self, job_id, stages, bundles, spec: TrainSpec, config: DriverConfig, transport, nursery):
        self.job_id, self.stages, self.bundles, self.spec, self.config = job_id, stages, bundles, spec, config
        self.transport, self.nursery = transport, nursery
        self.members = [(index, replica) for index, stage in enumerate(stages)
                        for replica in range(len(stage.peer_ids))]
        self.links: dict[tuple[int, int], Link] = {}
        self.events_send, self.events = trio.open_memory_channel[tuple[tuple[int, int], Frame | None]](
            config.max_event_backlog)
        self.treedefs = [jax.tree_util.tree_structure(spec.params[s.start:s.stop]) for s in stages]

    def link_for(self, stage: int, mb: int) -> Link:
        """The link to the replica of `stage` that computes micro-batch `mb`."""
        return self.links[stage, mb % len(self.stages[stage].peer_ids)]

    async def load(self) -> None:
        """Connect to every replica's peer, ship its stage, wait until all are ready."""
        with trio.fail_after(self.config.stage_ready_timeout_s):
            for index, replica in self.members:
                stage = self.stages[index]
                self.links[index, replica] = Link(await self.transport.connect(
                    stage.addresses[replica], stage.peer_ids[replica]))
            for (index, replica), link in self.links.items():
                stage = self.stages[index]
                prev = self.stages[index - 1].replicas() if index > 0 else []
                nxt = self.stages[index + 1].replicas() if index + 1 < len(self.stages) else []
                leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(self.spec.params[stage.start:stage.stop])]
                await link.send(message("load_stage", leaves, job_id=self.job_id, stage=index,
                                        bundle=self.bundles[index].to_wire(), prev=prev, next=nxt,
                                        replicas=stage.replicas(), replica=replica))
            for member, link in self.links.items():
                self.nursery.start_soon(self._receive, member, link)
            ready = set()
            while len(ready) < len(self.members):
                member, msg = await self._next_event()
                if msg.kind != "stage_ready":
                    raise TrainingError(f"stage {member[0]}: unexpected {msg.kind} while loading")
                ready.add(member)

    async def _receive(self, member: tuple[int, int], link: Link) -> None:
        while (msg := await next_message(link)) is not None:
            await self.events_send.send((member, msg))
        await self.events_send.send((member, None))

    async def _next_event(self) -> tuple[tuple[int, int], Frame]:
        member, msg = await self.events.receive()
        index, replica = member
        stage = self.stages[index]
        peer = stage.peer_ids[replica][:12]
        if msg is None:
            raise TrainingError(
                f"lost peer {peer} (stage {index}, layers {stage.start}-{stage.stop}); "
                "recovery from churn is not implemented yet")
        if msg.kind == "job_error":
            raise TrainingError(f"peer {peer} (stage {index}): {msg.fields['reason']}")
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
                    await self.link_for(last_stage, mb).send(message("target", [ys[mb]], **ids))
                    await self.link_for(0, mb).send(message("forward", [xs[mb]], **ids))
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

    async def fetch_params(self) -> list:
        """The final parameters of every stage (from its first replica; all replicas apply
        identical updates), as one list of per-layer pytrees of numpy arrays."""
        for index in range(len(self.stages)):
            await self.links[index, 0].send(message("fetch_params", job_id=self.job_id))
        by_stage: dict[int, list] = {}
        with trio.fail_after(self.config.step_timeout_s):
            while len(by_stage) < len(self.stages):
                (index, _), msg = await self._next_event()
                if msg.kind != "params":
                    raise ProtocolError(f"stage {index} sent {msg.kind} instead of params")
                leaves = [np.array(a) for a in msg.arrays]   # copy out of the frame buffer
                by_stage[index] = jax.tree_util.tree_unflatten(self.treedefs[index], leaves)
        return [layer for index in range(len(self.stages)) for layer in by_stage[index]]

    async def end(self) -> None:
        for link in self.links.values():
            try:
                await link.send(message("end_job", job_id=self.job_id))
            except LinkClosed:
                pass
            await link.aclose()
