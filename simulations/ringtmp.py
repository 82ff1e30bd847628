"""RingTMP comparison: values communicated by a pipeline, a parameter server and one node.

Reproduces the comparison of the thesis "RingTMP: A Communication Optimised Distributed
Neural Network" on scikit-learn's iris (a 4-8-8-3 network) and digits (64-50-50-10), trained
(a) by p2ptrain's pipeline on 3 simulated peers: the real bootstrap, peer and driver code
    over `SimTransport`, under `run_deterministic` (virtual time, seeded scheduler); peer
    memories are set so that the planner must give each peer one Dense layer (3 stages);
(b) by the parameter-server baseline (`p2ptrain.paramserver`) with 3 workers over the same
    simulated network;
(c) on a single node: a plain jitted JAX loop.
All three see the same batches (batch B, split in 3 micro-batches / shards) from the same
initial params, so (a) and (b) compute what (c) computes; the table shows it.

Counting: "values" are array elements sent over links while training (float32 activations,
gradients, params, inputs; int32 targets; one loss scalar per micro-batch or shard). They are
measured by wrapping `Link.send` (every frame of every link, by message kind) and checked
against the analytic count. Shipping the stages / program once, and fetching the final params,
are listed apart ("setup"). "wire bytes" is what the simulated network delivered between the
driver/server and the peers/workers (frame headers and control messages included), per epoch.
Time per epoch is virtual: the simulated links' latency and bandwidth (LINK below); neither
peers nor workers model compute time in the simulation, so it is communication time.

Then the analytic counts for MNIST 784-50-50-10 (60,000 training samples), next to the
thesis's 1.32e7 (ring) and 5.08e9 (parameter server) values per epoch.

    .venv/bin/python simulations/ringtmp.py [--epochs-scale 1.0] [--out out/ringtmp.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402
import trio  # noqa: E402

import p2ptrain  # noqa: E402
from p2ptrain import planner  # noqa: E402
from p2ptrain.compute import profile_layers  # noqa: E402
from p2ptrain.demo import batch_stream, digits_split  # noqa: E402
from p2ptrain.node.bootstrap import serve_bootstrap  # noqa: E402
from p2ptrain.node.driver import DriverConfig  # noqa: E402
from p2ptrain.node.link import Link  # noqa: E402
from p2ptrain.node.peer import PeerConfig, serve_peer  # noqa: E402
from p2ptrain.paramserver import WorkerConfig, train_parameter_server_async  # noqa: E402
from p2ptrain.sim.determinism import run_deterministic  # noqa: E402
from p2ptrain.transport.sim import LinkSpec, SimNetwork, SimTransport  # noqa: E402

WORKERS = 3          # pipeline peers, parameter-server workers, micro-batches per batch
# A 100 Mbit/s LAN with 0.5 ms one-way latency between any two machines.
LINK = LinkSpec(latency_s=0.0005, bandwidth_bytes_per_s=12.5e6)
SEED = 0
LOSS = p2ptrain.losses.softmax_cross_entropy
# Cuts of a 3-Dense MLP [Dense, relu, Dense, relu, Dense] into one Dense layer per peer.
STAGES = ((0, 2), (2, 4), (4, 5))
# Memory slack over what the cost model needs for a stage: enough to fit it, too little to
# fit any other stage of two Dense layers (checked by `forced_memories`).
MEMORY_SLACK = 1.01
# The FLOP/s the fastest peer declares. Low, so that the planner's choice is compute-bound: for models
# this small on fast peers, link traffic dominates and the planner rightly puts the whole
# model on fewer peers. Compute is not simulated (it takes no virtual time) either way.
PEER_FLOPS_PER_S = 1e6
MNIST_TRAIN_SAMPLES = 60_000
THESIS_RING_VALUES, THESIS_PS_VALUES = 1.32e7, 5.08e9


@dataclass(frozen=True)
class Experiment:
    name: str
    widths: tuple[int, ...]      # input width, hidden widths, classes
    batch_size: int
    epochs: int
    learning_rate: float


EXPERIMENTS = (
    Experiment("iris 4-8-8-3", (4, 8, 8, 3), batch_size=24, epochs=60, learning_rate=0.02),
    Experiment("digits 64-50-50-10", (64, 50, 50, 10), batch_size=48, epochs=10, learning_rate=0.003),
)


def iris_split(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's iris, standardised with the training split's statistics."""
    from sklearn.datasets import load_iris

    data = load_iris()
    x, y = data.data.astype(np.float32), data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


def mlp(widths: tuple[int, ...]) -> p2ptrain.Sequential:
    layers = []
    for width in widths[1:-1]:
        layers += [nn.Dense(width), jax.nn.relu]
    return p2ptrain.Sequential([*layers, nn.Dense(widths[-1])])


def accuracy(model, params, x, y) -> float:
    return float(np.mean(np.argmax(np.asarray(model.apply(params, x)), axis=-1) == y))


# ---------------------------------------------------------------------------------------
# Counting what crosses links


class SendCounter:
    """Wraps `Link.send` while active: values (array elements, plus a loss frame's scalar)
    and frames sent, by message kind and destination peer."""

    def __init__(self) -> None:
        self.values: Counter = Counter()
        self.frames: Counter = Counter()

    def __enter__(self) -> "SendCounter":
        self._original = Link.send
        counter = self

        async def send(link, frame):
            size = sum(int(np.size(a)) for a in frame.arrays) + (1 if frame.kind in ("loss", "ps_grads") else 0)
            counter.values[frame.kind, link.remote_peer_id] += size
            counter.frames[frame.kind, link.remote_peer_id] += 1
            return await counter._original(link, frame)

        Link.send = send
        return self

    def __exit__(self, *exc) -> None:
        Link.send = self._original

    def by_kind(self, *kinds: str, to: str | None = None) -> int:
        return sum(v for (k, peer), v in self.values.items() if k in kinds and (to is None or peer == to))


class WireBytes:
    """A duck-typed `Trace` for SimNetwork: sums delivered bytes between `members` only
    (not the bootstrap's directory traffic), from `start()` on."""

    def __init__(self, members: set[str]) -> None:
        self.members = members
        self.bytes = 0
        self.counting = False

    def record(self, time_s, kind, *fields) -> None:
        if kind == "deliver" and self.counting:
            _conn, src, dst, size, _arrival = fields
            if src in self.members and dst in self.members:
                self.bytes += size


# ---------------------------------------------------------------------------------------
# (a) the pipeline on 3 simulated peers


def forced_peers(model, params, x_mb, batch_size: int) -> list[tuple[int, float]]:
    """(memory_bytes, flops_per_s) for each peer such that the planner chooses exactly STAGES
    (one Dense layer per peer). Memory: the stage's cost-model memory plus MEMORY_SLACK, so
    no peer holds two Dense layers at the first or middle position. Speed: in proportion to
    the stage's FLOPs (the fastest at PEER_FLOPS_PER_S), so the ring is balanced and moving a
    layer onto a neighbour (a last stage holds fewer micro-batches, so memory alone cannot
    forbid it) makes that peer the bottleneck. Raises if the planner would still choose
    another plan, so the experiment is what it says."""
    costs = profile_layers(model, params, x_mb)
    sizes = dict(in_bytes=x_mb[0].nbytes, batch_size=batch_size, microbatch_size=len(x_mb))
    memories = [int(MEMORY_SLACK * planner.stage_memory_bytes(costs, a, b, i, len(STAGES), **sizes))
                for i, (a, b) in enumerate(STAGES)]
    flops = [sum(c.flops for c in costs[a:b]) for a, b in STAGES]
    speeds = [PEER_FLOPS_PER_S * f / max(flops) for f in flops]
    peers = [planner.PeerSpec(f"peer-{i}", m, v, LINK.bandwidth_bytes_per_s)
             for i, (m, v) in enumerate(zip(memories, speeds))]
    chosen = planner.plan(costs, peers, **sizes)
    if [(s.start, s.stop) for s in chosen.stages] != list(STAGES):
        raise RuntimeError(f"peers {peers} let the planner choose {chosen.stages}, not {STAGES}")
    return list(zip(memories, speeds))


async def _pipeline(model, params, batches, steps, optimizer, peers, counter_members):
    wire = WireBytes(counter_members)
    network = SimNetwork(seed=SEED, default_link=LINK, trace=wire)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_bootstrap, SimTransport(network, "bootstrap"), "bootstrap:7070")
        for i, (memory, speed) in enumerate(peers):
            config = PeerConfig(bootstrap=address, listen=f"peer-{i}:1", memory_bytes=memory,
                                flops_per_s=speed, compute_in_thread=False)
            nursery.start_soon(serve_peer, SimTransport(network, f"peer-{i}"), config)
        await trio.sleep(5)   # virtual: registration and bandwidth probes
        wire.counting = True
        with SendCounter() as counter:
            result = await p2ptrain.train_async(
                model, batches, loss=LOSS, optimizer=optimizer, steps=steps, microbatches=WORKERS,
                params=params, bootstrap=address, progress=False, transport=SimTransport(network, "driver"),
                # One snapshot, at the end (the final params): no periodic state traffic.
                config=DriverConfig(snapshot_every_steps=steps))
        nursery.cancel_scope.cancel()
    return result, counter, wire.bytes


def run_pipeline(model, params, batches, steps, optimizer, batch_size):
    x0, _ = batches(0)
    peers = forced_peers(model, params, x0[: batch_size // WORKERS], batch_size)
    members = {"driver", *(f"peer-{i}" for i in range(len(peers)))}
    result, counter, wire_bytes = run_deterministic(
        _pipeline, model, params, batches, steps, optimizer, peers, members, seed=SEED)
    stage_peers = [s.peer_id for s in result.stages]
    assert len(stage_peers) == len(STAGES), result.stages
    training = dict(
        inputs=counter.by_kind("forward", to=stage_peers[0]),
        activations=counter.by_kind("forward") - counter.by_kind("forward", to=stage_peers[0]),
        gradients=counter.by_kind("backward"),
        targets=counter.by_kind("target"),
        losses=counter.by_kind("loss"),
    )
    setup = counter.by_kind("load_stage", "params")
    return result, training, setup, wire_bytes


# ---------------------------------------------------------------------------------------
# (b) the parameter server with 3 workers


async def _parameter_server(model, params, batches, steps, optimizer, members):
    wire = WireBytes(members)
    network = SimNetwork(seed=SEED, default_link=LINK, trace=wire)
    wire.counting = True
    with SendCounter() as counter:
        result = await train_parameter_server_async(
            model, batches, loss=LOSS, optimizer=optimizer, steps=steps, workers=WORKERS, params=params,
            transport_factory=lambda name: SimTransport(network, name),
            worker_config=WorkerConfig(compute_in_thread=False))
    return result, counter, wire.bytes


def run_parameter_server(model, params, batches, steps, optimizer):
    members = {"ps-server", *(f"ps-worker-{i}" for i in range(WORKERS))}
    result, counter, wire_bytes = run_deterministic(
        _parameter_server, model, params, batches, steps, optimizer, members, seed=SEED)
    v = result.values
    training = dict(params=v.params_down, gradients=v.grads_up, inputs=v.inputs, targets=v.targets, losses=v.losses)
    # Cross-check the server's own accounting against every frame sent.
    assert counter.by_kind("ps_step") == v.params_down + v.inputs + v.targets
    assert counter.by_kind("ps_grads") == v.grads_up + v.losses
    return result, training, wire_bytes


# ---------------------------------------------------------------------------------------
# (c) one node


def run_single(model, params, batches, steps, optimizer):
    """A plain jitted JAX loop over the whole batch (the mean loss over 3 equal micro-batches
    is the mean over the batch, so this is the same training up to float rounding).
    Returns the final params and the wall-clock seconds per step after compilation."""
    @jax.jit
    def step_fn(params, opt_state, x, y):
        loss_value, grads = jax.value_and_grad(lambda p: LOSS(model.apply(p, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss_value

    opt_state = optimizer.init(params)
    params, opt_state, _ = step_fn(params, opt_state, *batches(0))   # compiles: not timed
    jax.block_until_ready(params)
    started = time.perf_counter()
    for step in range(1, steps):
        x, y = batches(step)
        params, opt_state, _ = step_fn(params, opt_state, x, y)
    jax.block_until_ready(params)
    return params, (time.perf_counter() - started) / max(1, steps - 1)


# ---------------------------------------------------------------------------------------
# Analytic counts


def n_params(widths: tuple[int, ...]) -> int:
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def pipeline_values_per_epoch(widths, samples: int, microbatches_per_epoch: int) -> dict:
    """Per sample: the input to stage 0, one int target to the last stage, and at each cut
    (one per hidden layer here: one Dense layer per stage) its activation forward and its
    gradient backward; one loss per micro-batch."""
    cuts = widths[1:-1]
    return dict(inputs=samples * widths[0], activations=samples * sum(cuts), gradients=samples * sum(cuts),
                targets=samples, losses=microbatches_per_epoch)


def ps_values_per_epoch(widths, samples: int, batch_size: int, workers: int) -> dict:
    """Per step (samples / batch_size of them), to and from each worker: the params down and
    a gradient up; plus each sample's input and target, and one loss per worker."""
    steps = samples // batch_size
    return dict(params=steps * workers * n_params(widths), gradients=steps * workers * n_params(widths),
                inputs=samples * widths[0], targets=samples, losses=steps * workers)


# ---------------------------------------------------------------------------------------


def run_experiment(exp: Experiment, epochs_scale: float) -> list[dict]:
    split = iris_split() if exp.name.startswith("iris") else digits_split()
    (x_train, y_train), (x_test, y_test) = split
    batches = batch_stream(x_train, y_train, exp.batch_size)
    steps_per_epoch = len(x_train) // exp.batch_size
    epochs = max(1, round(exp.epochs * epochs_scale))
    steps = epochs * steps_per_epoch
    samples_per_epoch = steps_per_epoch * exp.batch_size
    model = mlp(exp.widths)
    params = model.init(jax.random.PRNGKey(SEED), x_train[: exp.batch_size // WORKERS])
    optimizer = optax.adam(exp.learning_rate)
    rows = []

    single_params, single_step_s = run_single(model, params, batches, steps, optimizer)
    single_accuracy = accuracy(model, single_params, x_test, y_test)

    result, training, setup, wire_bytes = run_pipeline(model, params, batches, steps, optimizer, exp.batch_size)
    expected = pipeline_values_per_epoch(exp.widths, samples_per_epoch, steps_per_epoch * WORKERS)
    measured = {k: v / epochs for k, v in training.items()}
    assert measured == expected, (measured, expected)
    rows.append(dict(experiment=exp.name, method=f"pipeline, {WORKERS} peers", values=sum(measured.values()),
                     breakdown=measured,
                     data=measured["inputs"] + measured["targets"], setup=setup, wire_bytes=wire_bytes / epochs,
                     time_s=sum(result.step_times_s) / epochs, accuracy=accuracy(model, result.params, x_test, y_test),
                     diff=_max_diff(result.params, single_params)))

    result, training, wire_bytes = run_parameter_server(model, params, batches, steps, optimizer)
    expected = ps_values_per_epoch(exp.widths, samples_per_epoch, exp.batch_size, WORKERS)
    measured = {k: v / epochs for k, v in training.items()}
    assert measured == expected, (measured, expected)
    rows.append(dict(experiment=exp.name, method=f"parameter server, {WORKERS} workers",
                     values=sum(measured.values()), breakdown=measured, data=measured["inputs"] + measured["targets"], setup=0,
                     wire_bytes=wire_bytes / epochs, time_s=sum(result.step_times_s) / epochs,
                     accuracy=accuracy(model, result.params, x_test, y_test),
                     diff=_max_diff(result.params, single_params)))

    rows.append(dict(experiment=exp.name, method="single node", values=0, data=0, setup=0, wire_bytes=0,
                     time_s=0.0, accuracy=single_accuracy, diff=0.0, wall_s=single_step_s * steps_per_epoch))
    for row in rows:
        row.update(epochs=epochs, batch_size=exp.batch_size, samples_per_epoch=samples_per_epoch)
    return rows


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def print_table(rows: list[dict]) -> None:
    print(f"\nlinks: {LINK.latency_s * 1e3:.1f} ms one way, {LINK.bandwidth_bytes_per_s * 8 / 1e6:.0f} Mbit/s; "
          f"{WORKERS} micro-batches / shards per batch; Adam; time is virtual (communication only)")
    header = (f"{'experiment':20} {'method':28} {'values/epoch':>13} {'of which data':>13} {'wire B/epoch':>13} "
              f"{'s/epoch':>9} {'accuracy':>9} {'|params - single|':>18}")
    print(header)
    print("-" * len(header))
    for r in rows:
        time_text = f"{r['time_s']:9.4f}" if "wall_s" not in r else f"{r['wall_s']:8.4f}w"
        print(f"{r['experiment']:20} {r['method']:28} {r['values']:13.4g} {r['data']:13.4g} {r['wire_bytes']:13.4g} "
              f"{time_text} {r['accuracy']:9.1%} {r['diff']:18.2e}")
    print("values per epoch by kind (measured at every Link.send, equal to the analytic count):")
    for r in rows:
        if r.get("breakdown"):
            parts = ", ".join(f"{k} {v:.4g}" for k, v in r["breakdown"].items())
            print(f"  {r['experiment']:20} {r['method']:28} {parts}")
    print("(single node: 'w' = wall-clock seconds of the jitted loop on this machine; "
          "pipeline setup values (stage params shipped, final params fetched) are not per epoch: "
          + ", ".join(f"{r['experiment']}: {r['setup']:.0f}" for r in rows if r["setup"]) + ")")


def mnist_table(batch_sizes=(3, 30, 300, 3000)) -> list[tuple]:
    """Analytic values per epoch for MNIST 784-50-50-10, 60,000 samples."""
    widths = (784, 50, 50, 10)
    print(f"\nMNIST 784-50-50-10 ({n_params(widths):,} params), {MNIST_TRAIN_SAMPLES:,} samples per epoch, analytic:")
    out = []
    pipe = pipeline_values_per_epoch(widths, MNIST_TRAIN_SAMPLES, MNIST_TRAIN_SAMPLES // 4)
    cut_only = pipe["activations"] + pipe["gradients"]
    print("  pipeline, 3 stages (one Dense layer each; cuts after each hidden layer), any batch size;"
          " losses assume micro-batches of 4 samples:")
    print(f"    activations + gradients at the 2 cuts: {cut_only:.3g}   (thesis ring: {THESIS_RING_VALUES:.3g}; "
          f"it adds 10-wide outputs and one-hot targets: {cut_only + 20 * MNIST_TRAIN_SAMPLES:.3g})")
    print(f"    + inputs and int targets from the driver + 1 loss per micro-batch: {sum(pipe.values()):.3g}")
    out.append(("pipeline (cuts only)", cut_only))
    out.append(("pipeline (+ inputs, targets)", sum(pipe.values())))
    print(f"  parameter server, {WORKERS} workers (params down + grads up per worker per step; + data):")
    for b in batch_sizes:
        ps = ps_values_per_epoch(widths, MNIST_TRAIN_SAMPLES, b, WORKERS)
        model_values = ps["params"] + ps["gradients"]
        print(f"    batch {b:5d} ({b // WORKERS} per worker): params + grads {model_values:.3g}, "
              f"with data {sum(ps.values()):.3g}")
        out.append((f"PS batch {b} (params+grads)", model_values))
    print(f"  (thesis parameter server: {THESIS_PS_VALUES:.3g} = 60,000 x 2 x {n_params(widths):,}: "
          f"params and grads once per sample, i.e. our batch of {WORKERS} with 1 sample per worker)")
    return out


def plot(rows: list[dict], mnist: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "single node"]
    width = 0.35
    for j, method in enumerate(methods):
        values = [next(r["values"] for r in rows if r["experiment"] == e and r["method"] == method) for e in experiments]
        axes[0].bar(np.arange(len(experiments)) + j * width, values, width, label=method)
    axes[0].set_yscale("log")
    axes[0].set_xticks(np.arange(len(experiments)) + width / 2, experiments)
    axes[0].set_ylabel("values communicated per epoch")
    axes[0].legend()
    axes[0].set_title("iris and digits (measured)")
    methods_all = list(dict.fromkeys(r["method"] for r in rows))
    for j, method in enumerate(methods_all):
        acc = [next(r["accuracy"] for r in rows if r["experiment"] == e and r["method"] == method) for e in experiments]
        axes[1].bar(np.arange(len(experiments)) + j * 0.27, acc, 0.27, label=method)
    axes[1].set_xticks(np.arange(len(experiments)) + 0.27, experiments)
    axes[1].set_ylim(0, 1.05)
    axes[1].set_ylabel("held-out accuracy")
    axes[1].legend(loc="lower right")
    axes[1].set_title("accuracy: the pipeline and the PS are exact")
    labels, values = zip(*mnist)
    labels = [*labels, "thesis ring", "thesis PS"]
    values = [*values, THESIS_RING_VALUES, THESIS_PS_VALUES]
    colors = ["tab:blue"] * 2 + ["tab:orange"] * (len(mnist) - 2) + ["tab:gray"] * 2
    axes[2].barh(labels, values, color=colors)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("values per epoch")
    axes[2].set_title("MNIST 784-50-50-10, 60k samples (analytic)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="scale every experiment's epochs")
    parser.add_argument("--out", type=Path, default=Path("out/ringtmp.png"))
    args = parser.parse_args()
    rows = []
    for exp in EXPERIMENTS:
        started = time.perf_counter()
        rows += run_experiment(exp, args.epochs_scale)
        print(f"{exp.name}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print_table(rows)
    mnist = mnist_table()
    plot(rows, mnist, args.out)
    for exp in experiments_of(rows):
        pipe, single = (next(r for r in rows if r["experiment"] == exp and r["method"].startswith(m))
                        for m in ("pipeline", "single"))
        if pipe["accuracy"] < single["accuracy"]:
            print(f"{exp}: pipeline accuracy {pipe['accuracy']:.1%} below single node {single['accuracy']:.1%}")
            return 1
    return 0


def experiments_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["experiment"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
