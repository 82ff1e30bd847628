"""Pipeline schedule: which micro-batch a stage works on next, and how many the driver
lets into the pipeline at once. Pure state machines: no I/O, no clock.

The pipeline is the asynchronous form of 1F1B: the driver admits at most `window`
micro-batches into stage 0 (warm-up), then one more each time one finishes its backward
pass; every stage prefers a ready backward over a forward. With `window` equal to the number
of stages this gives 1F1B's steady state (one forward, one backward) and bounds the saved
activations on stage s to at most `window` micro-batches, as the cost model assumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ScheduleError(Exception):
    """A message that the schedule cannot accept (duplicate, out of range, over capacity)."""


@dataclass(frozen=True)
class Task:
    """One unit of stage work. kind: "forward", "backward", "last" (forward+loss+backward)
    or "grads" (another replica's parameter gradients, in `grad`)."""

    kind: str
    step: int
    mb: int
    x: Any = None       # forward input (forward, last)
    y: Any = None       # targets (last)
    grad: Any = None    # gradient wrt this stage's output (backward)


@dataclass
class StageInbox:
    """Work waiting on one stage for the current step. Items are keyed by (kind, step,
    micro-batch) within a job epoch; a duplicate is dropped (and counted), never run twice.

    `is_last`: forwards wait for their targets and become "last" tasks. `capacity` bounds how
    many items may wait (the driver's window keeps honest senders far below it).
    """

    microbatches: int
    is_last: bool
    capacity: int
    replica: int = 0       # this stage is served by `replicas` peers; micro-batch mb is
    replicas: int = 1      # computed by replica mb % replicas, the others send its gradients
    step: int = 0
    duplicates_dropped: int = 0
    _grads: dict[int, Any] = field(default_factory=dict)
    _forwards: dict[int, Any] = field(default_factory=dict)
    _targets: dict[int, Any] = field(default_factory=dict)
    _backwards: dict[int, Any] = field(default_factory=dict)
    _seen: set[tuple[str, int]] = field(default_factory=set)

    def _admit(self, kind: str, step: int, mb: int) -> bool:
        """Whether to keep the item: False for a duplicate (dropped, counted), ScheduleError
        for anything that cannot come from an honest peer of this step."""
        if step != self.step:
            raise ScheduleError(f"{kind} for step {step} while the stage is at step {self.step}")
        if not 0 <= mb < self.microbatches:
            raise ScheduleError(f"{kind} for micro-batch {mb} of {self.microbatches}")
        if (self.owns(mb)) == (kind == "grads"):
            owner = "this replica" if kind == "grads" else f"replica {mb % self.replicas}"
            raise ScheduleError(f"{kind} for micro-batch {mb}, which {owner} computes")
        if (kind, mb) in self._seen:
            self.duplicates_dropped += 1
            return False
        if self.pending() >= self.capacity:
            raise ScheduleError(f"more than {self.capacity} items waiting on the stage")
        self._seen.add((kind, mb))
        return True

    def add_forward(self, step: int, mb: int, x: Any) -> None:
        if self._admit("forward", step, mb):
            self._forwards[mb] = x

    def add_target(self, step: int, mb: int, y: Any) -> None:
        if not self.is_last:
            raise ScheduleError("targets go to the last stage only")
        if self._admit("target", step, mb):
            self._targets[mb] = y

    def add_backward(self, step: int, mb: int, grad: Any) -> None:
        if self.is_last:
            raise ScheduleError("the last stage computes its own gradients")
        if self._admit("backward", step, mb):
            self._backwards[mb] = grad

    def add_grads(self, step: int, mb: int, leaves: Any) -> None:
        """Another replica's parameter gradients of micro-batch `mb`."""
        if self._admit("grads", step, mb):
            self._grads[mb] = leaves

    def owns(self, mb: int) -> bool:
        return mb % self.replicas == self.replica

    def owned(self) -> list[int]:
        return [mb for mb in range(self.microbatches) if self.owns(mb)]

    def pending(self) -> int:
        return len(self._forwards) + len(self._targets) + len(self._backwards) + len(self._grads)

    def next_task(self) -> Task | None:
        """The next task, or None if nothing is ready. Backward first (frees memory soonest),
        lowest micro-batch index first within a kind; other replicas' gradients last."""
        if self._backwards:
            mb = min(self._backwards)
            return Task("backward", self.step, mb, grad=self._backwards.pop(mb))
        if self.is_last:
            ready = sorted(set(self._forwards) & set(self._targets))
            if ready:
                mb = ready[0]
                return Task("last", self.step, mb, x=self._forwards.pop(mb), y=self._targets.pop(mb))
        elif self._forwards:
            mb = min(self._forwards)
            return Task("forward", self.step, mb, x=self._forwards.pop(mb))
        if self._grads:
            mb = min(self._grads)
            return Task("grads", self.step, mb, grad=self._grads.pop(mb))
        return None

    def next_step(self) -> None:
        """Move to the next step; everything of this step must have been consumed."""
        if self.pending():
            raise ScheduleError(f"{self.pending()} items of step {self.step} still waiting")
        self.step += 1
        self._seen.clear()


@dataclass
class MicrobatchWindow:
    """The driver's admission control for one step: at most `window` micro-batches between
    entering stage 0 and finishing their backward pass there."""

    microbatches: int
    window: int
    _next: int = 0
    _done: set[int] = field(default_factory=set)

    def admit(self) -> list[int]:
        """Micro-batches that may enter the pipeline now (in index order)."""
        in_flight = self._next - len(self._done)
        count = max(0, min(self.window - in_flight, self.microbatches - self._next))
        admitted = list(range(self._next, self._next + count))
        self._next += count
        return admitted

    def finish(self, mb: int) -> None:
        if not 0 <= mb < self._next or mb in self._done:
            raise ScheduleError(f"micro-batch {mb} finished but was not in flight")
        self._done.add(mb)

    @property
    def complete(self) -> bool:
        return len(self._done) == self.microbatches


def split_microbatches(array: np.ndarray, microbatches: int) -> list[np.ndarray]:
    """Split along axis 0 into `microbatches` equal, contiguous chunks (DESIGN.md section 3)."""
    if array.shape[0] % microbatches:
        raise ValueError(
            f"batch of {array.shape[0]} samples does not split into {microbatches} equal micro-batches")
    return [np.ascontiguousarray(c) for c in np.split(array, microbatches)]
