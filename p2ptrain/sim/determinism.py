"""Run a trio program deterministically: virtual time and a seeded scheduler.

trio shuffles each batch of runnable tasks with a private `random.Random` (`trio._core._run._r`).
With `_ALLOW_DETERMINISTIC_SCHEDULING` set, trio first sorts the batch by task creation order
and then shuffles it with that generator, so seeding it makes the interleaving a function of
the seed (DESIGN.md section 6; checked for trio 0.35.0 by tests/test_determinism.py in
separate processes). Together with virtual time (`VirtualClock`), an in-memory network whose randomness comes
from the seed, and code that iterates in sorted order, a run is then reproducible.

These are private trio attributes: `check_trio_hooks()` fails loudly if an upgrade moves them
(trio is pinned in pyproject.toml for this reason).
"""

from __future__ import annotations

import math
import random
from typing import Any, Awaitable, Callable, TypeVar

import trio
import trio._core._run as _trio_run

T = TypeVar("T")

TRIO_VERSION = "0.35.0"  # the version whose scheduler hooks were checked


def check_trio_hooks() -> None:
    """Raise RuntimeError unless this trio has the scheduler hooks this module relies on."""
    if trio.__version__ != TRIO_VERSION:
        raise RuntimeError(
            f"deterministic scheduling was checked with trio {TRIO_VERSION}, this is trio {trio.__version__}: "
            "re-check trio._core._run._r and _ALLOW_DETERMINISTIC_SCHEDULING before trusting simulations"
        )
    if not isinstance(getattr(_trio_run, "_r", None), random.Random) or not hasattr(
        _trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING"
    ):
        raise RuntimeError("trio._core._run no longer has _r / _ALLOW_DETERMINISTIC_SCHEDULING")


class VirtualClock(trio.abc.Clock):
    """Virtual time alone: it never reads a real clock, and when no task can run it jumps to
    the next deadline (what `MockClock(autojump_threshold=0)` does, minus the real-clock read
    on every `current_time()` and the extra scheduler pass per jump: a simulation reads the
    time millions of times and jumps hundreds of thousands).

    trio asks `deadline_to_sleep_time` only when its run queue is empty; with no real I/O
    in a simulation, nothing can then happen before the next deadline, so time moves there.
    Not for programs that wait on real I/O or threads, nor with `wait_all_tasks_blocked`.
    """

    def __init__(self) -> None:
        self._now_s = 0.0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now_s

    def deadline_to_sleep_time(self, deadline: float) -> float:
        if math.isinf(deadline):
            return 86400.0   # every task waits on something that is not a deadline
        self._now_s = max(self._now_s, deadline)
        return 0.0


def run_deterministic(
    async_fn: Callable[..., Awaitable[T]],
    *args: Any,
    seed: int,
    clock: trio.abc.Clock | None = None,
) -> T:
    """`trio.run(async_fn, *args)` with trio's scheduler seeded by `seed` and, unless `clock`
    is given, a `VirtualClock` (virtual time that jumps to the next deadline whenever every
    task is blocked). Returns what `async_fn` returns.

    The scheduler's generator state and flag are restored afterwards, so other trio runs in
    this process are unaffected. Not reentrant: do not call it from inside a trio run.
    Same seed, same code, same inputs -> same task interleaving, in any process.
    """
    check_trio_hooks()
    saved_state = _trio_run._r.getstate()
    saved_allow = _trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    _trio_run._r.seed(seed)
    _trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]  # Final in trio
    try:
        return trio.run(async_fn, *args, clock=clock if clock is not None else VirtualClock())
    finally:
        _trio_run._r.setstate(saved_state)
        _trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved_allow  # type: ignore[misc]
