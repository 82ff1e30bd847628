"""Simulation vs reality: one pipelined set-up run as real processes on loopback and in the
simulator, side by side (issue 4: agree "within 25%"; this script reports the ratio).

    .venv/bin/python simulations/sim_vs_real.py [--steps 30] [--peers 2] [--batch 256]
        [--microbatches 4] [--hidden 2048,2048,2048] [--warmup 5] [--out out]

1. REAL: a `LocalSwarm` (bootstrap + `--peers` real `p2ptrain join --threads 1` processes,
   TLS on loopback). Memory caps are the smallest that hold the model with one peer per
   stage, plus 5% slack, so the plan is a `--peers`-stage pipeline. LocalSwarm pins each
   peer to its own core; with more peers than cores they share cores, which the simulation
   does not model. A 784-hidden-10 MLP trains for --steps steps; we
   keep the driver's per-step times (`TrainResult.step_times_s`: wall time, snapshot
   fetches excluded), the plan, each peer's announcement (`p2ptrain status --json`), each
   peer's CPU time per step, and the CPU that other processes on the machine used meanwhile.
2. SIM: the same bootstrap, peer and driver code over `SimNetwork` under `run_deterministic`
   (virtual time), with the same peer ids, memory caps and announced FLOP/s (so the planner
   sees the same peers and makes the same plan), links set to loopback TLS numbers measured
   in this run (`link_bench.measure` throughput of activation-sized frames; half the round
   trip of a small frame), and compute modelled by `ComputeModel` (each task sleeps its
   share of stage flops / rate). Two rates are tried:
   - announced: the FLOP/s each peer measured at `join` (a 512x512 matmul);
   - calibrated: per stage, the rate its own exported programs achieve (forward+backward,
     or last, for every micro-batch, plus the update, run by a `StageRunner`) in a process
     pinned to the peer's core like a peer: stage flops x batch / seconds per step. The
     simulator charges compute as flops / rate, so the achieved rate is its right input.
3. Prints the set-up, the real and simulated median step times (steps from --warmup on), the
   cost model's `planner.step_time` of the plan (bottleneck stage only, no pipeline
   fill/drain, so it sits below both), the ratios, and whether |sim/real - 1| <= 25%.
   Writes OUT/sim_vs_real.png (per-step times) and OUT/sim_vs_real.json.

Left out of the simulation by design: CPU time a peer spends outside its stage programs
(frame coding, TLS, thread hops, gradient copies); in virtual time it is free, in the real
swarm it shares the peer's core. The table shows it as peer CPU per step minus stage time.
The machine is shared: when other processes use CPU during the real run, the real times
grow; the line "other processes" says how much they used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "simulations"))

CORES = sorted(os.sched_getaffinity(0))
if "--time-stage" in sys.argv:
    # The calibration child: confine it like `join --threads 1` before jax is imported
    # (XLA sizes its thread pools from the cores it may use; the flags alone do not stop
    # it from using two).
    from p2ptrain.hardware import limit_threads

    limit_threads(1)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import trio  # noqa: E402
from link_bench import measure as measure_link  # noqa: E402

import p2ptrain  # noqa: E402
from p2ptrain import planner  # noqa: E402
from p2ptrain.compute import StageRunner, export_stage, flatten_params, profile_layers  # noqa: E402
from p2ptrain.node.bootstrap import serve_bootstrap  # noqa: E402
from p2ptrain.node.driver import DriverConfig, TrainSpec, as_batch, run_training  # noqa: E402
from p2ptrain.node.link import Link, LinkClosed  # noqa: E402
from p2ptrain.node.peer import PeerConfig, serve_peer  # noqa: E402
from p2ptrain.sim.compute import ComputeModel  # noqa: E402
from p2ptrain.sim.determinism import run_deterministic  # noqa: E402
from p2ptrain.swarm import LocalSwarm  # noqa: E402
from p2ptrain.transport.identity import Identity  # noqa: E402
from p2ptrain.transport.sim import LinkSpec, SimNetwork, SimTransport  # noqa: E402
from p2ptrain.transport.tcp_tls import TlsTransport  # noqa: E402
from p2ptrain.wire.codec import Frame  # noqa: E402

TOLERANCE = 0.25
MEMORY_SLACK = 1.05
IN_FEATURES = 784
LOSS = p2ptrain.losses.softmax_cross_entropy


@dataclass
class Setup:
    """The model, data and optimizer, shared by the real run, the simulation and the
    calibration child (all built deterministically from the command line)."""

    hidden: tuple[int, ...]
    batch: int
    microbatches: int

    def __post_init__(self) -> None:
        layers: list = []
        for width in self.hidden:
            layers += [nn.Dense(width), jax.nn.relu]
        self.model = p2ptrain.Sequential([*layers, nn.Dense(10)])
        self.params = self.model.init(jax.random.PRNGKey(0), self.batches(0)[0][: self.microbatch_size])

    def batches(self, step: int):
        rng = np.random.default_rng(step)
        x = rng.normal(size=(self.batch, IN_FEATURES)).astype(np.float32)
        return x, rng.integers(0, 10, self.batch).astype(np.int32)

    @property
    def microbatch_size(self) -> int:
        return self.batch // self.microbatches

    @staticmethod
    def optimizer():
        return optax.sgd(0.01, momentum=0.9)

    def sizes(self) -> dict:
        return dict(in_bytes=IN_FEATURES * 4, batch_size=self.batch, microbatch_size=self.microbatch_size)

    def name(self) -> str:
        return "-".join(map(str, (IN_FEATURES, *self.hidden, 10)))


def memory_cap_bytes(costs, setup: Setup, peers: int) -> int:
    """The smallest per-peer memory that holds the model on `peers` equal peers (bisection;
    feasibility is monotone in memory), times MEMORY_SLACK. Exits unless that cap gives
    `peers` stages of one peer each."""
    def fits(memory_bytes: int) -> planner.Plan | None:
        specs = [planner.PeerSpec(f"p{i}", memory_bytes, 1e10, 1e9) for i in range(peers)]
        try:
            return planner.plan(costs, specs, **setup.sizes())
        except planner.Infeasible:
            return None

    low, high = 0, 8 * sum(c.param_bytes for c in costs) + 10**9
    while high - low > 10_000:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    cap = int(high * MEMORY_SLACK)
    stages = fits(cap).stages
    if len(stages) != peers or any(len(s.peers) != 1 for s in stages):
        raise SystemExit(f"with {cap} B per peer the plan is {stages}, not {peers} single-peer stages")
    return cap


def spawn_on_core(core: int, start):
    """`start()` (which forks a process) with the calling thread pinned to `core`, so the
    child inherits that affinity; the thread's affinity is restored afterwards."""
    os.sched_setaffinity(0, {core})
    try:
        return start()
    finally:
        os.sched_setaffinity(0, CORES)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (not idle or iowait), all cores."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


# -- REAL -------------------------------------------------------------------------------


def run_real(setup: Setup, peers: int, cap_bytes: int, steps: int, warmup: int) -> dict:
    """Train on real processes. Returns the step times, plan, losses, the peers'
    announcements and cores, and over the steady steps (from `warmup` on): their number,
    wall seconds, each peer's CPU seconds and the CPU seconds of other processes."""
    cores: dict[str, int] = {}
    with LocalSwarm() as swarm:
        for i in range(peers):
            # LocalSwarm puts peer i on the i-th allowed core (mod the count).
            cores[swarm.join(memory=str(cap_bytes), threads=1).peer_id] = CORES[i % len(CORES)]
        status = subprocess.run([sys.executable, "-m", "p2ptrain", "status", "--bootstrap", swarm.address,
                                 "--json"], capture_output=True, text=True, check=True)
        announced = {p["peer_id"]: p for p in json.loads(status.stdout)["peers"]}
        pids = {n.peer_id: n.process.pid for n in swarm.peers}
        ours = [*pids.values(), swarm.bootstrap.process.pid, os.getpid()]
        marks = []   # (wall s, {peer: CPU s}, CPU s of our processes, machine busy s) after a step

        def on_step(step: int, _loss: float) -> None:
            if step in (warmup - 1, steps - 1):
                marks.append((time.perf_counter(), {p: process_cpu_s(pid) for p, pid in pids.items()},
                              sum(map(process_cpu_s, ours)), machine_busy_s()))

        result = p2ptrain.train(setup.model, setup.batches, loss=LOSS, optimizer=setup.optimizer(), steps=steps,
                                microbatches=setup.microbatches, params=setup.params, bootstrap=swarm.address,
                                progress=False, on_step=on_step)
    if result.epochs != 1 or len(marks) != 2:
        raise SystemExit(f"the real run re-planned ({result.epochs} epochs): timings are not comparable")
    (wall0, peers0, ours0, busy0), (wall1, peers1, ours1, busy1) = marks
    return dict(step_times_s=list(result.step_times_s), plan=result.plan, losses=list(result.losses),
                peers=announced, cores=cores, steady_steps=steps - warmup, steady_wall_s=wall1 - wall0,
                peer_cpu_s={p: peers1[p] - peers0[p] for p in pids}, other_cpu_s=(busy1 - busy0) - (ours1 - ours0))


# -- calibration and links ---------------------------------------------------------------


def stage_step_time_s(setup: Setup, start: int, stop: int, repeats: int = 8) -> float:
    """Median seconds of one training step of stage [start, stop) alone, in this process:
    its exported programs (residuals kept) run by a `StageRunner` for every micro-batch,
    plus the update. Run it in a process confined like a peer (see `calibrated_step_time_s`)."""
    x, y = as_batch(*setup.batches(0))
    x_mb, y_mb = x[: setup.microbatch_size], y[: setup.microbatch_size]
    h = np.asarray(setup.model.apply_range(setup.params[:start], x_mb, 0, start)) if start else x_mb
    is_last = stop == len(setup.model)
    bundle = export_stage(setup.model, start, stop, setup.params[start:stop],
                          x_spec=jax.ShapeDtypeStruct(h.shape, h.dtype),
                          y_spec=jax.ShapeDtypeStruct(y_mb.shape, y_mb.dtype) if is_last else None,
                          loss=LOSS, optimizer=setup.optimizer(), microbatches=setup.microbatches,
                          is_last=is_last, keep_residuals=True)
    runner = StageRunner.load(bundle, flatten_params(setup.params[start:stop]))
    gy = None if is_last else np.ones(runner.out_shape, runner.out_dtype)

    def one_step() -> None:
        for mb in range(setup.microbatches):
            if is_last:
                runner.last(mb, h, y_mb)
            else:
                runner.forward(mb, h)
                runner.backward(mb, gy)
        runner.apply_update()

    one_step(), one_step()   # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def calibrated_step_time_s(setup: Setup, start: int, stop: int, core: int) -> float:
    """`stage_step_time_s` in a child process pinned to `core` with XLA confined as by
    `join --threads 1` (this file run with --time-stage)."""
    command = [sys.executable, __file__, "--time-stage", f"{start}:{stop}", "--batch", str(setup.batch),
               "--microbatches", str(setup.microbatches), "--hidden", ",".join(map(str, setup.hidden))]
    child = spawn_on_core(core, lambda: subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    out, _ = child.communicate()
    if child.returncode:
        raise SystemExit(f"calibrating stage {start}:{stop} failed (exit {child.returncode})")
    return float(out.split()[-1])


async def loopback_latency_s(pings: int = 300) -> float:
    """Half the median round trip of a small frame over a TLS `Link` on loopback (both ends
    in this trio thread: framing, TLS and scheduling of each side included)."""
    server, client = TlsTransport(Identity.generate()), TlsTransport(Identity.generate())

    async def echo(connection) -> None:
        link = Link(connection)
        try:
            while True:
                await link.send(await link.receive())
        except LinkClosed:
            pass

    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1:0", echo)
        link = Link(await client.connect(address, server.peer_id))
        rtts = []
        for _ in range(pings):
            started = time.perf_counter()
            await link.send(Frame("ping", {}))
            await link.receive()
            rtts.append(time.perf_counter() - started)
        await link.aclose()
        nursery.cancel_scope.cancel()
    return statistics.median(rtts[10:]) / 2


def loopback_bytes_per_s(payload_bytes: int, seconds: float = 0.5) -> float:
    """TLS throughput of `payload_bytes` frames through a `Link` on loopback
    (simulations/link_bench.py: sender and receiver share one core, as a real transfer's
    encryption and decryption each take CPU from a peer's core)."""
    frames, elapsed_s = trio.run(measure_link, "tls", payload_bytes, seconds)
    return frames * payload_bytes / elapsed_s


# -- SIM --------------------------------------------------------------------------------


def run_sim(setup: Setup, costs, real: dict, flops_per_s: dict[str, float], link: dict, steps: int) -> dict:
    """The real run's set-up in virtual time; `flops_per_s`: peer id -> the rate its modelled
    compute is charged at (the planner still sees each peer's announced FLOP/s)."""
    async def main() -> dict:
        network = SimNetwork(0, default_link=LinkSpec(latency_s=0.0))
        compute = ComputeModel(costs, setup.microbatch_size)

        def on_plan(stages, epoch: int) -> None:
            compute.set_plan(epoch, [(s.start, s.stop) for s in stages])

        # A peer's latency_s is its access round trip; a link a -> b gets (a + b) / 2.
        for name in ["bootstrap", "driver", *real["peers"]]:
            network.set_peer(name, link["bytes_per_s"], link["bytes_per_s"], link["latency_s"])
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_bootstrap, SimTransport(network, "bootstrap"), "bootstrap:7070")
            for peer_id, peer in sorted(real["peers"].items()):
                config = PeerConfig(bootstrap=address, listen=f"{peer_id}:1", memory_bytes=peer["memory_bytes"],
                                    flops_per_s=peer["flops_per_s"], threads=1, compute_in_thread=False,
                                    compute_delay_s=compute.for_peer(peer_id, flops_per_s[peer_id]))
                nursery.start_soon(serve_peer, SimTransport(network, peer_id), config)
            await trio.sleep(5)   # virtual: registration and bandwidth probes
            spec = TrainSpec(setup.model, setup.batches, LOSS, setup.optimizer(), steps, setup.microbatches,
                             list(setup.params))
            # run_training, not train_async: train_async has no on_plan for the caller.
            result = await run_training(SimTransport(network, "driver"), address, spec, DriverConfig(),
                                        on_plan=on_plan)
            nursery.cancel_scope.cancel()
        return dict(step_times_s=list(result.step_times_s), losses=list(result.losses), plan=result.plan)

    return run_deterministic(main, seed=0)


# -- report -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peers", type=int, default=2, help="pipeline stages, one peer each")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--hidden", default="2048,2048,2048", help="hidden layer widths")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--out", default=str(ROOT / "out"))
    parser.add_argument("--time-stage", help=argparse.SUPPRESS)   # START:STOP, the calibration child
    args = parser.parse_args()
    setup = Setup(tuple(int(w) for w in args.hidden.split(",")), args.batch, args.microbatches)
    if args.time_stage:
        start, stop = map(int, args.time_stage.split(":"))
        print(stage_step_time_s(setup, start, stop))
        return
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps")

    costs = profile_layers(setup.model, setup.params, setup.batches(0)[0][: setup.microbatch_size])
    cap_bytes = memory_cap_bytes(costs, setup, args.peers)
    real = run_real(setup, args.peers, cap_bytes, args.steps, args.warmup)
    the_plan: planner.Plan = real["plan"]

    announced = {p: d["flops_per_s"] for p, d in real["peers"].items()}
    calibrated = dict(announced)   # a peer outside the plan (none here) keeps its announced rate
    stage_s = {}
    for stage in the_plan.stages:
        peer = stage.peers[0]
        stage_s[peer] = calibrated_step_time_s(setup, stage.start, stage.stop, real["cores"][peer])
        calibrated[peer] = sum(c.flops for c in costs[stage.start:stage.stop]) * setup.batch / stage_s[peer]
    frame_bytes = max(setup.hidden) * 4 * setup.microbatch_size   # one activation frame
    link = dict(latency_s=trio.run(loopback_latency_s), bytes_per_s=loopback_bytes_per_s(frame_bytes))
    sims = {name: run_sim(setup, costs, real, rates, link, args.steps)
            for name, rates in (("announced", announced), ("calibrated", calibrated))}

    def median_s(times: list[float]) -> float:
        return statistics.median(times[args.warmup:])

    def cost_model_s(rates: dict[str, float]) -> float:
        specs = [planner.PeerSpec(p, d["memory_bytes"], rates[p], d["bandwidth_bytes_per_s"])
                 for p, d in real["peers"].items()]
        return planner.step_time(the_plan, costs, specs, **setup.sizes())

    real_s = median_s(real["step_times_s"])
    spans = [(s.start, s.stop) for s in the_plan.stages]
    rows = []
    for name, rates in (("announced", announced), ("calibrated", calibrated)):
        sim = sims[name]
        sim_s, model_s = median_s(sim["step_times_s"]), cost_model_s(rates)
        rows.append(dict(flops=name, real_s=real_s, sim_s=sim_s, cost_model_s=model_s, sim_over_real=sim_s / real_s,
                         cost_model_over_real=model_s / real_s, within=abs(sim_s / real_s - 1) <= TOLERANCE,
                         same_plan=[(s.start, s.stop) for s in sim["plan"].stages] == spans,
                         same_losses=bool(np.allclose(sim["losses"], real["losses"], atol=1e-5))))

    print(f"model {setup.name()} MLP, batch {setup.batch} = {setup.microbatches} micro-batches of "
          f"{setup.microbatch_size}, sgd+momentum, {args.steps} steps, medians of steps {args.warmup}.."
          f"{args.steps - 1}; {args.peers} peers `join --threads 1 --memory {cap_bytes / 1e6:.1f}MB`, "
          f"one core each ({len(CORES)} cores here)")
    print(f"links (loopback TLS, measured now): {link['bytes_per_s'] / 1e9:.2f} GB/s for "
          f"{frame_bytes / 2**10:.0f} KiB frames, one-way latency {link['latency_s'] * 1e6:.0f} us")
    print(f"other processes on this machine used {real['other_cpu_s'] / real['steady_wall_s']:.2f} cores on average "
          f"during the real run's steady steps")
    print(f"{'stage':>5} {'layers':>7} {'peer':>12} {'core':>4} {'GFLOP/step':>10} {'announced GFLOP/s':>17} "
          f"{'calibrated GFLOP/s':>18} {'stage ms/step':>13} {'peer CPU ms/step':>16}")
    for index, stage in enumerate(the_plan.stages):
        peer = stage.peers[0]
        gflop = sum(c.flops for c in costs[stage.start:stage.stop]) * setup.batch / 1e9
        print(f"{index:>5} {stage.start:>3}-{stage.stop - 1:<3} {peer[:12]:>12} {real['cores'][peer]:>4} "
              f"{gflop:>10.2f} {announced[peer] / 1e9:>17.1f} {calibrated[peer] / 1e9:>18.1f} "
              f"{stage_s[peer] * 1e3:>13.1f} {real['peer_cpu_s'][peer] / real['steady_steps'] * 1e3:>16.1f}")
    print("stage ms/step: its programs alone, timed on its core (the calibration); peer CPU ms/step: "
          "the real peer's CPU per steady step")
    print()
    print(f"{'FLOP/s in sim':<14} {'real ms':>8} {'sim ms':>8} {'cost-model ms':>13} {'sim/real':>8} "
          f"{'model/real':>10}  {'|sim/real-1|<=25%':>17}  same plan, same losses")
    for r in rows:
        print(f"{r['flops']:<14} {r['real_s'] * 1e3:>8.1f} {r['sim_s'] * 1e3:>8.1f} {r['cost_model_s'] * 1e3:>13.1f} "
              f"{r['sim_over_real']:>8.3f} {r['cost_model_over_real']:>10.3f}  {'yes' if r['within'] else 'NO':>17}  "
              f"{'yes' if r['same_plan'] else 'NO'}, {'yes' if r['same_losses'] else 'NO'}")
    print("cost model = planner.step_time of the plan: the bottleneck stage's compute, no pipeline fill/drain")
    if args.peers > len(CORES):
        print(f"caveat: {args.peers} peers on {len(CORES)} cores share cores; the simulation gives each its own")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_vs_real.json").write_text(json.dumps(dict(
        setup=dict(model=setup.name(), batch=setup.batch, microbatches=setup.microbatches, steps=args.steps,
                   warmup=args.warmup, peers=args.peers, memory_cap_bytes=cap_bytes, link=link,
                   other_processes_cores=real["other_cpu_s"] / real["steady_wall_s"]),
        stages=[dict(start=s.start, stop=s.stop, peer=s.peers[0], announced_flops_per_s=announced[s.peers[0]],
                     calibrated_flops_per_s=calibrated[s.peers[0]], stage_step_s=stage_s[s.peers[0]],
                     peer_cpu_per_step_s=real["peer_cpu_s"][s.peers[0]] / real["steady_steps"]) for s in the_plan.stages],
        real_step_times_s=real["step_times_s"], sim_step_times_s={k: v["step_times_s"] for k, v in sims.items()},
        rows=rows), indent=1))
    plot(out / "sim_vs_real.png", real["step_times_s"], sims, rows, args.warmup, setup.name())
    print(f"wrote {out / 'sim_vs_real.png'} and {out / 'sim_vs_real.json'}")


def plot(path: Path, real_times_s: list[float], sims: dict, rows: list[dict], warmup: int, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(np.array(real_times_s) * 1e3, "o-", color="black", label="real (loopback TLS, wall time)")
    colors = ("tab:blue", "tab:orange")
    for (name, sim), row, color in zip(sims.items(), rows, colors):
        ax.plot(np.array(sim["step_times_s"]) * 1e3, "s-", ms=3, color=color,
                label=f"sim, {name} FLOP/s (virtual time)")
        ax.axhline(row["cost_model_s"] * 1e3, ls="--", lw=1, color=color, label=f"cost model, {name} FLOP/s")
    ax.axvspan(-0.5, warmup - 0.5, color="grey", alpha=0.15, label="warm-up (not in the medians)")
    ax.set_xlabel("step")
    ax.set_ylabel("step time (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Real swarm vs simulation of the same set-up ({model} MLP)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
