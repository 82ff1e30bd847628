"""What a volunteer's machine can donate: compute speed, memory, and thread limits.

`limit_threads` must run before jax is imported: XLA sizes its thread pools at start-up.
"""

from __future__ import annotations

import os
import re
import time

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """"2GB" -> 2_000_000_000, "512MiB" -> 536_870_912, "1000" -> 1000. ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size (examples: 2GB, 512MiB, 1000000)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def limit_threads(threads: int, first: int = 0) -> None:
    """Confine this process to `threads` CPU cores and XLA to as many threads.

    Pinning the process (sched_setaffinity) is what really bounds the CPU used; the XLA flags
    keep its thread pools from oversubscribing the pinned cores. The cores are taken from the
    allowed ones in order, starting at index `first` (wrapping): peers started together on
    one machine pass different `first`s, or they would all share the first core.
    """
    if threads < 1:
        raise ValueError("--threads must be at least 1")
    allowed = sorted(os.sched_getaffinity(0))
    start = first % len(allowed)
    cpus = (allowed[start:] + allowed[:start])[:threads]
    os.sched_setaffinity(0, cpus)
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                               f"intra_op_parallelism_threads={threads}").strip()


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def measure_flops_per_s(duration_s: float = 0.5, size: int = 512) -> float:
    """Sustained float32 matmul FLOP/s of this process, measured with JAX (median of runs).

    This is a measurement, so it reads the wall clock; it runs once, before a peer serves.
    """
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()   # compile outside the timing
    rates = []
    deadline = time.perf_counter() + duration_s
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        matmul(a).block_until_ready()
        rates.append(2 * size**3 / (time.perf_counter() - start))
    return float(sorted(rates)[len(rates) // 2])
