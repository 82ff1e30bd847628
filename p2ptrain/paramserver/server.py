"""The parameter server: holds the params and optimizer state, farms gradient work out.

Step protocol (synchronous: one optimizer update per step, as in single-process training):
  1. split batch t into W equal shards (shard i for worker i, like micro-batches);
  2. send every worker the current params and its shard (`ps_step`), concurrently;
  3. each worker returns its shard's mean loss and gradient (`ps_grads`);
  4. sum the gradients in worker order, divide by W, apply the optimizer once.
The step loss is the mean of the shard losses. This is exactly single-process training with
microbatches = W (DESIGN.md section 3), whatever order the replies arrive in.

Every value that crosses a link is counted by what it is (`ValueCounts`), at the server,
which is one end of every link.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import optax
import trio

from ..compute import Sequential, flatten_params, unflatten_params
from ..node.driver import as_batch
from ..node.groups import sole_error
from ..node.link import Link, LinkClosed
from ..transport.base import Transport, TransportError
from ..wire.codec import DEFAULT_MAX_FRAME_BYTES, FrameError
from .messages import ProtocolError, message, validate
from .program import export_grad_program, shard_specs


# Bound on telling a worker the job ended before closing its link anyway.
END_TIMEOUT_S = 1.0


class ParameterServerError(Exception):
    """Training could not start or go on (a worker unreachable, failing, or too slow)."""


@dataclass(frozen=True)
class ServerConfig:
    connect_timeout_s: float = 30.0
    ready_timeout_s: float = 120.0     # a worker checks and compiles the program
    step_timeout_s: float = 120.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES


@dataclass
class ValueCounts:
    """Values (array elements, whatever their dtype) sent over links, by what they carry."""

    params_down: int = 0   # server -> workers: the current params, every step, to every worker
    grads_up: int = 0      # workers -> server: one gradient per worker per step
    inputs: int = 0        # server -> workers: x shards
    targets: int = 0       # server -> workers: y shards
    losses: int = 0        # workers -> server: one scalar per worker per step

    @property
    def total(self) -> int:
        return self.params_down + self.grads_up + self.inputs + self.targets + self.losses

    def __add__(self, other: "ValueCounts") -> "ValueCounts":
        return ValueCounts(*(a + b for a, b in zip(_fields(self), _fields(other))))


def _fields(c: ValueCounts) -> tuple[int, ...]:
    return (c.params_down, c.grads_up, c.inputs, c.targets, c.losses)


@dataclass(frozen=True)
class PSSpec:
    model: Sequential
    batches: Callable[[int], tuple[Any, Any]]
    loss: Callable
    optimizer: optax.GradientTransformation
    steps: int
    params: list


@dataclass
class PSResult:
    params: list                    # final params, one pytree per layer, numpy arrays
    losses: list[float]             # mean of the shard losses, per step
    workers: int
    samples_per_step: int
    step_times_s: list[float] = field(default_factory=list)   # trio time (virtual under MockClock)
    values_per_step: list[ValueCounts] = field(default_factory=list)

    @property
    def values(self) -> ValueCounts:
        """All values communicated during the run."""
        return _total(self.values_per_step)

    def values_per_epoch(self, steps_per_epoch: int) -> list[ValueCounts]:
        """Values communicated in each epoch of `steps_per_epoch` steps (the last may be partial)."""
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be at least 1")
        per_step = self.values_per_step
        return [_total(per_step[i:i + steps_per_epoch]) for i in range(0, len(per_step), steps_per_epoch)]


def _total(counts: list[ValueCounts]) -> ValueCounts:
    total = ValueCounts()
    for c in counts:
        total = total + c
    return total


async def run_parameter_server(transport: Transport, workers: Sequence[str], spec: PSSpec,
                               config: ServerConfig = ServerConfig(),
                               on_step: Callable[[int, float], None] | None = None) -> PSResult:
    """Train `spec` with the workers at `workers`, in shard order: "HOST:PORT", or
    "PEER_ID@HOST:PORT" to accept only the worker holding that identity.

    Raises ParameterServerError with a one-line reason if a worker cannot be reached,
    refuses the program, fails a step, or does not answer within the timeouts.
    """
    if not workers:
        raise ValueError("a parameter server needs at least one worker")
    x0, y0 = as_batch(*spec.batches(0))
    x_spec, y_spec = shard_specs(x0, y0, len(workers))
    blob = export_grad_program(spec.model, spec.loss, spec.params, x_spec=x_spec, y_spec=y_spec)
    # Deterministic (no global randomness in node code): a job is one link per worker, so
    # the id only has to tell this job's messages from another's on a reused worker.
    job_id = f"ps-{transport.peer_id[:12]}-{hashlib.sha256(blob).hexdigest()[:16]}"
    links: list[Link] = []
    try:
        try:
            for entry in workers:
                # "PEER_ID@HOST:PORT" pins the worker's identity; a bare address trusts on first use.
                expected, _, address = entry.rpartition("@")
                with trio.fail_after(config.connect_timeout_s):
                    connection = await transport.connect(address, expected or None)
                links.append(Link(connection, max_frame_bytes=config.max_frame_bytes))
        except (TransportError, trio.TooSlowError) as exc:
            raise ParameterServerError(f"cannot reach worker {len(links)} at {workers[len(links)]}: {exc}") from None
        server = _Server(job_id, links, spec, config)
        try:
            await server.load(blob)
            return await server.train(on_step)
        except BaseExceptionGroup as group:
            raise sole_error(group) from None
    finally:
        # Shielded: a cancelled run still says goodbye (bounded) and closes every link.
        with trio.CancelScope(shield=True):
            for link in links:
                with trio.move_on_after(END_TIMEOUT_S):
                    try:
                        await link.send(message("ps_end", job_id=job_id))
                    except (LinkClosed, FrameError):
                        pass
                await link.aclose()


class _Server:
    def __init__(self, job_id: str, links: list[Link], spec: PSSpec, config: ServerConfig) -> None:
        self.job_id = job_id
        self.links = links
        self.spec = spec
        self.config = config
        self.leaves = flatten_params(spec.params)
        self.treedef = jax.tree_util.tree_structure(list(spec.params))

    async def _send(self, index: int, frame) -> None:
        link = self.links[index]
        try:
            await link.send(frame)
        except LinkClosed as exc:
            raise ParameterServerError(f"worker {index} ({link.remote_peer_id[:12]}): {exc}") from None

    async def _reply(self, index: int, kind: str):
        """The next message from worker `index`, which must be `kind` of this job."""
        link = self.links[index]
        try:
            frame = validate(await link.receive())
        except (LinkClosed, FrameError, ProtocolError) as exc:
            raise ParameterServerError(f"worker {index} ({link.remote_peer_id[:12]}): {exc}") from None
        if frame.kind == "ps_error":
            raise ParameterServerError(f"worker {index} ({link.remote_peer_id[:12]}): {frame.fields['reason']}")
        if frame.kind != kind or frame.fields["job_id"] != self.job_id:
            raise ParameterServerError(f"worker {index}: expected {kind}, got {frame.kind}")
        return frame

    async def load(self, blob: bytes) -> None:
        async def load_one(index: int) -> None:
            await self._send(index, message("ps_load", job_id=self.job_id, worker=index, workers=len(self.links),
                                            n_params=len(self.leaves), program=blob))
            await self._reply(index, "ps_ready")

        with _deadline(self.config.ready_timeout_s, "to load the gradient program"):
            async with trio.open_nursery() as nursery:
                for index in range(len(self.links)):
                    nursery.start_soon(load_one, index)

    async def train(self, on_step) -> PSResult:
        spec, workers = self.spec, len(self.links)
        params = [jax.numpy.asarray(a) for a in self.leaves]
        # One optimizer over the whole params tree, as a single process applies it.
        tree = lambda leaves: jax.tree_util.tree_unflatten(self.treedef, leaves)
        opt_state = spec.optimizer.init(tree(params))

        @jax.jit
        def update(leaves, grads, state):
            updates, state = spec.optimizer.update(tree(grads), state, tree(leaves))
            return jax.tree_util.tree_leaves(optax.apply_updates(tree(leaves), updates)), state

        result = PSResult(params=[], losses=[], workers=workers, samples_per_step=0)
        for step in range(spec.steps):
            started_s = trio.current_time()
            x, y = as_batch(*spec.batches(step))
            if len(x) % workers:
                raise ValueError(f"batch {step} of {len(x)} samples does not split into {workers} equal shards")
            result.samples_per_step = len(x)
            leaves = [np.asarray(p) for p in params]
            counts = ValueCounts()
            replies: list[Any] = [None] * workers

            async def work(index: int, x_shard: np.ndarray, y_shard: np.ndarray) -> None:
                await self._send(index, message("ps_step", [*leaves, x_shard, y_shard], job_id=self.job_id, step=step))
                reply = await self._reply(index, "ps_grads")
                grads = reply.arrays
                if reply.fields["step"] != step or [(g.shape, g.dtype) for g in grads] != [
                        (p.shape, p.dtype) for p in leaves]:
                    raise ParameterServerError(f"worker {index}: gradients of the wrong step or shapes")
                replies[index] = reply

            with _deadline(self.config.step_timeout_s, f"to answer step {step}"):
                async with trio.open_nursery() as nursery:
                    for index, (xs, ys) in enumerate(zip(np.split(x, workers), np.split(y, workers))):
                        counts.params_down += sum(p.size for p in leaves)
                        counts.inputs += xs.size
                        counts.targets += ys.size
                        nursery.start_soon(work, index, xs, ys)
            # Worker (shard) order, whatever order the replies came in: sum(g) / W, as the
            # reference loop does.
            summed = [sum(r.arrays[k] for r in replies) / workers for k in range(len(leaves))]
            counts.grads_up = sum(g.size for r in replies for g in r.arrays)
            counts.losses = workers
            params, opt_state = update(params, summed, opt_state)
            loss = float(np.mean([r.fields["loss"] for r in replies]))
            result.losses.append(loss)
            result.values_per_step.append(counts)
            result.step_times_s.append(trio.current_time() - started_s)
            if on_step is not None:
                on_step(step, loss)
        result.params = unflatten_params(self.treedef, [np.asarray(p) for p in params])
        return result


@contextmanager
def _deadline(seconds: float, what: str):
    """trio.fail_after whose timeout is a ParameterServerError saying what was too slow."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise ParameterServerError(f"the workers took more than {seconds:g} s {what}") from None
