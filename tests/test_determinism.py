"""Determinism (DESIGN.md section 6): same seed, same trace hash, in separate processes.

Each scenario runs in fresh interpreters (`subprocess`), because what breaks determinism
across processes (hash randomisation, addresses, an unseeded scheduler) does not show
within one. The scenarios are functions of this module, imported by the child.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import trio
import trio._core._run as trio_run

from p2ptrain.sim.determinism import check_trio_hooks, run_deterministic
from p2ptrain.sim.trace import Trace, encode_event
from p2ptrain.transport.base import Connection, TransportError
from p2ptrain.transport.sim import LinkSpec, SimNetwork, SimTransport

TESTS_DIR = Path(__file__).parent


def hashes_in_subprocesses(scenario: str, seeds: list[int]) -> list[str]:
    """Run `scenario(seed)` of this module in one fresh interpreter per seed, in parallel."""
    code = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_determinism as t; print(t.{scenario}(int(sys.argv[1])))"
    children = [
        subprocess.Popen([sys.executable, "-c", code, str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in seeds
    ]
    out = []
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr
        out.append(stdout.strip())
    return out


# ---- scenario 1: the DESIGN claim about trio's scheduler alone ----


async def racing_tasks() -> str:
    """20 tasks racing through memory channels; the hash of the order things happened in."""
    order: list[str] = []
    send, receive = trio.open_memory_channel[str](5)

    async def producer(i: int, out: trio.MemorySendChannel[str]) -> None:
        async with out:
            for j in range(10):
                await out.send(f"{i}.{j}")
                await trio.lowlevel.checkpoint()

    async def consumer(i: int, inp: trio.MemoryReceiveChannel[str]) -> None:
        async with inp:
            async for item in inp:
                order.append(f"{i}<-{item}")

    async with trio.open_nursery() as nursery:
        async with send, receive:
            for i in range(10):
                nursery.start_soon(producer, i, send.clone())
                nursery.start_soon(consumer, i, receive.clone())
    return hashlib.sha256("\n".join(order).encode()).hexdigest()


def race_hash(seed: int) -> str:
    return run_deterministic(racing_tasks, seed=seed)


def test_seeded_trio_scheduler_is_reproducible_across_processes():
    first, second, other = hashes_in_subprocesses("race_hash", [1, 1, 2])
    assert first == second
    assert first != other


# ---- scenario 2: a simulated network with jitter, resets, a partition, a pause and a kill ----


async def network_scenario(seed: int) -> str:
    trace = Trace(keep_events=0)
    net = SimNetwork(
        seed,
        default_link=LinkSpec(latency_s=0.02, jitter_s=0.03, bandwidth_bytes_per_s=2e6, reset_probability_per_s=0.2),
        trace=trace,
    )
    rng = np.random.default_rng(seed)
    names = [f"p{i}" for i in range(6)]
    for name in names:
        net.set_peer(name, upload_bytes_per_s=float(rng.uniform(0.5e6, 4e6)), latency_s=float(rng.uniform(0, 0.05)))
    transports = {name: SimTransport(net, name) for name in names}
    received: dict[str, int] = {name: 0 for name in names}

    async def handler(connection: Connection) -> None:
        me = connection.remote_peer_id
        try:
            while data := await connection.stream.receive_some():
                received[me] += len(data)
        except trio.BrokenResourceError:
            pass

    async def talker(name: str, addresses: dict[str, str], sizes: list[int]) -> None:
        targets = [n for n in names if n != name][:3]
        for k, size in enumerate(sizes):
            target = targets[k % len(targets)]
            try:
                connection = await transports[name].connect(addresses[target], target)
                await connection.stream.send_all(bytes(size))
                await connection.stream.aclose()
            except (TransportError, trio.BrokenResourceError):
                await trio.sleep(0.1)

    async def chaos() -> None:
        await trio.sleep(1.0)
        net.partition(names[:3], names[3:])
        await trio.sleep(0.5)
        net.heal()
        net.pause("p4")
        await trio.sleep(0.7)
        net.resume("p4")
        net.kill("p5")

    async with trio.open_nursery() as nursery:
        addresses = {name: await nursery.start(transports[name].serve, "sim:0", handler) for name in names}
        async with trio.open_nursery() as talkers:
            talkers.start_soon(chaos)
            for name in names:
                sizes = [int(s) for s in rng.integers(1_000, 200_000, 15)]
                talkers.start_soon(talker, name, addresses, sizes)
        nursery.cancel_scope.cancel()
    trace.record(trio.current_time(), "received", [received[n] for n in names])
    return f"{trace.hash()} {trace.count}"


def network_hash(seed: int) -> str:
    return run_deterministic(network_scenario, seed, seed=seed)


def test_network_scenario_trace_is_reproducible_across_processes():
    first, second, other = hashes_in_subprocesses("network_hash", [7, 7, 8])
    assert first == second
    assert first != other
    events = int(first.split()[1])
    assert events > 100  # the scenario did something: connects, deliveries, faults


def test_network_scenario_hits_resets_and_faults():
    """The scenario above exercises what it claims to (checked in-process)."""
    kinds: list[str] = []
    original = Trace.record

    def spy(self, time_s, kind, *fields):
        kinds.append(kind)
        original(self, time_s, kind, *fields)

    Trace.record = spy
    try:
        run_deterministic(network_scenario, 7, seed=7)
    finally:
        Trace.record = original
    for kind in ("connect", "deliver", "reset", "partition", "heal", "pause", "resume", "kill", "close"):
        assert kind in kinds, kind


# ---- run_deterministic itself ----


def test_run_deterministic_restores_trio_scheduler_state():
    check_trio_hooks()
    before = trio_run._r.getstate()
    assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING is False

    async def now() -> float:
        await trio.sleep(12.5)
        return trio.current_time()

    assert run_deterministic(now, seed=3) == 12.5  # virtual time: no real waiting
    assert trio_run._r.getstate() == before
    assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING is False


def test_same_seed_same_hash_in_process():
    assert race_hash(5) == race_hash(5)


def test_trace_encoding_is_canonical():
    assert encode_event(1.0000000001, "x", (0.1 + 0.2, {"b": 1, "a": (1, 2)})) == encode_event(
        1.0, "x", [0.3, {"a": [1, 2], "b": 1}]
    )
    a, b = Trace(keep_events=2), Trace(keep_events=0)
    for t in range(5):
        a.record(t, "tick", t)
        b.record(t, "tick", t)
    assert a.hash() == b.hash() and a.count == 5 and a.events() == [(3, "tick", 3), (4, "tick", 4)]
    assert b.events() == []


def test_virtual_clock_jumps_to_each_deadline_in_order():
    """run_deterministic's VirtualClock: time moves only to deadlines, exactly, and tasks
    wake in deadline order (an hour of sleeps runs at once)."""
    woke = []

    async def sleeper(name, delay_s):
        await trio.sleep(delay_s)
        woke.append((name, trio.current_time()))

    async def main():
        assert trio.current_time() == 0.0
        async with trio.open_nursery() as nursery:
            for name, delay_s in (("c", 3600.0), ("a", 0.25), ("b", 1.5)):
                nursery.start_soon(sleeper, name, delay_s)
        with trio.move_on_after(2.0):
            await trio.sleep_forever()
        return trio.current_time()

    assert run_deterministic(main, seed=0) == 3602.0
    assert woke == [("a", 0.25), ("b", 1.5), ("c", 3600.0)]
