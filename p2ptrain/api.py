"""The researcher's entry points: `train` and `train_async` (DESIGN.md section 3)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import jax
import trio

from .compute import Sequential
from .node.driver import DriverConfig, StageAssignment, TrainResult, TrainSpec, as_batch, run_training
from .transport.base import Transport


async def train_async(
    model: Sequential,
    batches: Callable[[int], tuple[Any, Any]],
    *,
    loss: Callable,
    optimizer,
    steps: int,
    microbatches: int = 1,
    params: list | None = None,
    bootstrap: str,
    seed: int = 0,
    progress: bool = True,
    state_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    transport: Transport | None = None,
    config: DriverConfig = DriverConfig(),
) -> TrainResult:
    """Train `model` on the swarm behind `bootstrap` ("host:port"); see `train`."""
    if not isinstance(model, Sequential):
        raise TypeError("model must be a p2ptrain.Sequential")
    if steps < 1 or microbatches < 1:
        raise ValueError("steps and microbatches must be at least 1")
    if params is None:
        x0, _ = as_batch(*batches(0))
        params = model.init(jax.random.PRNGKey(seed), x0[: len(x0) // microbatches])
    if transport is None:
        from .transport.identity import Identity
        from .transport.tcp_tls import TlsTransport

        transport = TlsTransport(Identity.load_or_create(None))
    spec = TrainSpec(model, batches, loss, optimizer, steps, microbatches, list(params),
                     state_dir=Path(state_dir) if state_dir is not None else None, resume=resume)
    with _progress(steps, enabled=progress) as (on_plan, show_step):
        def step_done(step: int, loss_value: float, samples_per_s: float) -> None:
            if show_step is not None:
                show_step(step, loss_value, samples_per_s)
            if on_step is not None:
                on_step(step, loss_value)

        return await run_training(transport, bootstrap, spec, config, on_step=step_done, on_plan=on_plan)


def train(model: Sequential, batches, **kwargs) -> TrainResult:
    """Train `model` on a swarm and return a `TrainResult` (`.params`, `.losses`, ...).

    At step t, `(x, y) = batches(t)`; x and y are split along axis 0 into `microbatches`
    equal chunks; the step loss is the mean over chunks of `loss(model(x_i), y_i)` and its
    gradient is applied once per step with `optimizer`. The result equals single-process
    JAX training with the same data, to float32 rounding, also when peers leave mid-run:
    the driver snapshots the state every few steps (to `state_dir` too, if given), re-plans
    on the peers left and replays the steps since the snapshot. `resume=True` continues from
    the checkpoint in `state_dir` after a driver crash. `on_step(step, loss)` is called after
    each committed step (replayed steps are reported again).
    """
    return trio.run(lambda: train_async(model, batches, **kwargs))


@contextmanager
def _progress(steps: int, *, enabled: bool):
    """A rich progress bar (step, loss, samples/s) and the stage -> peer map, or nothing."""
    if not enabled:
        yield None, None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} samples/s"),
                   TimeElapsedColumn(), console=console)
    task = bar.add_task("train", total=steps, loss=float("nan"), rate=0.0)

    def on_plan(stages: list[StageAssignment], epoch: int) -> None:
        if epoch:
            console.print(f"re-planned after a failure or a join (epoch {epoch}):")
        for index, s in enumerate(stages):
            peers = ", ".join(f"{p[:12]} at {a}" for p, a in zip(s.peer_ids, s.addresses))
            console.print(f"stage {index}: layers {s.start}-{s.stop - 1} -> {peers}")

    def on_step(step: int, loss: float, samples_per_s: float) -> None:
        bar.update(task, completed=step + 1, loss=loss, rate=samples_per_s)

    with bar:
        yield on_plan, on_step
