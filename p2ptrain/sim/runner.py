"""Run a scenario: the real bootstrap, peer and driver code over SimTransport, deterministically.

`simulate(scenario, seed)` draws peers from the hardware profiles (their bandwidth and latency
go into `SimNetwork.set_peer`, their FLOP/s into `PeerConfig` and the modelled compute), applies
the seeded churn schedule (a crash = `network.kill(peer)` + cancelling the peer's tasks, as a
dead process) and the scenario's scripted faults, trains the scenario's model for the virtual
duration, and returns a `SimReport`. Everything runs under `run_deterministic(seed)`: the same
seed and code give the same event trace (network events and the events recorded here), whose
hash is `SimReport.trace_hash`. Wall time is read only to report it, never fed to the run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import flax.linen as nn
import jax
import numpy as np
import optax
import trio

from .. import losses, planner
from ..compute import Sequential, profile_layers
from ..node.bootstrap import BootstrapConfig, serve_bootstrap
from ..node.driver import DriverConfig, TrainingError, TrainSpec, _Driver
from ..node.link import Link
from ..node.peer import PeerConfig, serve_peer
from ..profiles import PeerSample, draw_pool, load_profiles
from ..transport.sim import LinkSpec, SimNetwork, SimTransport
from .churn import ChurnEvent, SessionModel, churn_schedule
from .compute import ComputeModel
from .determinism import run_deterministic
from .report import SimReport, samples_per_s, summarise
from .scenario import Fault, Scenario
from .trace import Trace

log = logging.getLogger("p2ptrain.sim")

BOOTSTRAP = "bootstrap"
DRIVER = "driver"
MAX_SIM_EVENTS = 1_000_000   # rows kept for the CSV (the trace hash covers everything)
BASELINE_HOURS = 0.05   # the churn-free reference run is at most this long (steady state)
OPTIMIZER_LR = 1e-3


def build_model(scenario: Scenario, seed: int):
    """(model, batches, params): Dense layers with relu between, and a fixed seeded
    classification task (labels from a random linear map), deterministic per step. With
    shape-only compute the params are zeros of the right shapes."""
    m = scenario.model
    layers: list = []
    for i, width in enumerate(m.widths):
        layers.append(nn.Dense(width))
        if i + 1 < len(m.widths):
            layers.append(jax.nn.relu)
    model = Sequential(layers)
    projection = np.random.default_rng(seed + 1).normal(size=(m.inputs, m.widths[-1])).astype(np.float32)

    def batches(step: int):
        rng = np.random.default_rng([seed, step])
        x = rng.normal(size=(m.batch_size, m.inputs)).astype(np.float32)
        return x, np.argmax(x @ projection, axis=1).astype(np.int32)

    x_mb = batches(0)[0][: m.batch_size // m.microbatches]
    if m.compute == "shape_only":   # only shapes matter: trace the init, run nothing
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), x_mb)
        return model, batches, jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    return model, batches, model.init(jax.random.PRNGKey(seed), x_mb)


def draw_peers(scenario: Scenario, rng: np.random.Generator):
    """The initial pool and a function drawing the i-th arriving peer, both scaled by the
    scenario's flops/memory/bandwidth scales. Deterministic in `rng`."""
    profiles = load_profiles()
    pool = [_scaled(s, scenario) for s in draw_pool(scenario.peers, rng, mix=scenario.mix, profiles=profiles)]
    names = sorted(scenario.mix)
    weights = np.array([scenario.mix[n] for n in names], dtype=float)
    weights /= weights.sum()

    def arrival(i: int) -> PeerSample:
        name = names[int(rng.choice(len(names), p=weights))]
        return _scaled(profiles[name].draw(1, rng, id_prefix=f"arrival{i:05d}-{name}")[0], scenario)

    return pool, profiles, arrival


def _scaled(s: PeerSample, sc: Scenario) -> PeerSample:
    spec = type(s.spec)(s.spec.peer_id, int(s.spec.memory_bytes / sc.memory_scale),
                        s.spec.flops_per_s / sc.flops_scale, s.spec.bandwidth_bytes_per_s / sc.bandwidth_scale)
    return PeerSample(spec, s.profile, s.upload_bytes_per_s / sc.bandwidth_scale,
                      s.download_bytes_per_s / sc.bandwidth_scale, s.latency_s, s.session_s)


@dataclass
class _State:
    """What the run's tasks share (one trio run, so no locks are needed)."""

    trace: Trace
    network: SimNetwork
    compute: ComputeModel
    shape_only: bool = False
    heartbeat_interval_s: float = 1.0
    bootstrap_address: str = ""
    samples: dict[str, PeerSample] = field(default_factory=dict)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)
    killed: set[str] = field(default_factory=set)
    faulted: set[str] = field(default_factory=set)
    stages: list = field(default_factory=list)   # the plan in force: StageAssignments
    rows: list[tuple] = field(default_factory=list)   # (time_s, kind, peer, step, value)

    def event(self, kind: str, peer: str = "", step: int = -1, value: float = 0.0) -> None:
        now = trio.current_time()
        self.trace.record(now, kind, peer, step, float(value))
        if len(self.rows) < MAX_SIM_EVENTS:
            self.rows.append((now, kind, peer, step, float(value), len(self.live)))


def simulate(scenario: Scenario, seed: int, *, peers: int | None = None, hours: float | None = None,
             compute: str | None = None, baseline: bool | float = True,
             log_level: int = logging.CRITICAL) -> SimReport:
    """Run `scenario` with `seed` (optionally overriding its peer count, duration and compute
    mode, "real" or "shape_only") and return its report. With `baseline=True`, also runs `churn_free_samples_per_s` for the
    goodput; a float is taken as that rate (experiments reuse one); False skips it."""
    scenario = scenario.with_overrides(peers=peers, hours=hours, compute=compute)
    started = time.perf_counter()
    with _log_level(log_level), memoised_stage_exports(), memoised_program_checks():
        outcome = run_deterministic(_run, scenario, seed, seed=seed)
        wall_s = time.perf_counter() - started
    if baseline is True:
        baseline = churn_free_samples_per_s(scenario, seed, log_level=log_level)
    return summarise(scenario, seed, outcome, baseline if baseline is not False else None, wall_s)


def churn_free_samples_per_s(scenario: Scenario, seed: int, *, log_level: int = logging.CRITICAL) -> float:
    """samples/s of the scenario without churn or faults: the same initial peers (same seed,
    so the same draws; under churn the mean live count is held at that number by the
    arrival rate), for at most BASELINE_HOURS of steady state."""
    calm = Scenario(**{**scenario.__dict__, "sessions": SessionModel("none"), "faults": (),
                       "hours": min(scenario.hours, BASELINE_HOURS)})
    with _log_level(log_level), memoised_stage_exports(), memoised_program_checks():
        base = run_deterministic(_run, calm, seed, seed=seed)
    return samples_per_s(base, calm.hours * 3600.0)


@contextlib.contextmanager
def _log_level(level: int):
    """The node code's log level within the block (churn makes it log every crash it sees);
    restored on exit so that the caller's logging is unchanged."""
    logger = logging.getLogger("p2ptrain")
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def memoised_program_checks(max_entries: int = 4096):
    """Within the block, `StageRunner.load`'s allow-list check is memoised by the program's
    name, SHA-256 and limits. Why: every simulated peer shares this one process, and each
    load re-parses the same MLIR text (most of the start-up wall time with hundreds of
    replicas); a real peer does this once on its own CPU. The check is a pure function of
    those inputs, so a hit returns what a fresh check would. Restored on exit."""
    import hashlib

    from ..compute import runner as runner_module

    original = runner_module.check_program
    checked: dict = {}

    def check_program(name, blob, limits):
        key = (name, hashlib.sha256(bytes(blob)).digest(), limits)
        if key not in checked:
            if len(checked) >= max_entries:
                checked.clear()
            checked[key] = original(name, blob, limits)
        return checked[key]

    runner_module.check_program = check_program
    try:
        yield
    finally:
        runner_module.check_program = original


@contextlib.contextmanager
def memoised_stage_exports(max_entries: int = 4096):
    """Within the block, the driver's `export_stage` and `residual_bytes_per_sample` are
    memoised by what determines their result: the layer span, the micro-batch specs and the
    flags (one model, loss and optimizer per simulation, and exports depend only on param
    shapes). Why: a churn simulation re-plans hundreds of times, mostly onto spans it has
    exported before, and exporting is most of its wall time; the bundles are identical bytes,
    so the simulated run is unchanged. Restored on exit."""
    from ..node import driver as driver_module

    original_export, original_residual = driver_module.export_stage, driver_module.residual_bytes_per_sample
    exports: dict = {}
    residuals: dict = {}

    def spec_key(spec):
        return None if spec is None else (tuple(spec.shape), str(spec.dtype))

    def export_stage(model, start, stop, stage_params, **kw):
        key = (id(model), start, stop, spec_key(kw.get("x_spec")), spec_key(kw.get("y_spec")),
               kw.get("microbatches"), kw.get("is_last"), kw.get("keep_residuals"), id(kw.get("loss")),
               id(kw.get("optimizer")))
        if key not in exports:
            if len(exports) >= max_entries:
                exports.clear()
            exports[key] = original_export(model, start, stop, stage_params, **kw)
        return exports[key]

    def residual_bytes_per_sample(model, start, stop, stage_params, x_spec):
        key = (id(model), start, stop, spec_key(x_spec))
        if key not in residuals:
            residuals[key] = original_residual(model, start, stop, stage_params, x_spec)
        return residuals[key]

    driver_module.export_stage, driver_module.residual_bytes_per_sample = export_stage, residual_bytes_per_sample
    try:
        yield
    finally:
        driver_module.export_stage, driver_module.residual_bytes_per_sample = original_export, original_residual


async def _run(scenario: Scenario, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    model, batches, params = build_model(scenario, seed)
    m = scenario.model
    mb_size = m.batch_size // m.microbatches
    costs = profile_layers(model, params, batches(0)[0][:mb_size])
    trace = Trace(keep_events=0)
    network = SimNetwork(seed, default_link=LinkSpec(latency_s=0.0), trace=trace)
    state = _State(trace, network, ComputeModel(costs, mb_size), shape_only=m.compute == "shape_only",
                   heartbeat_interval_s=scenario.heartbeat_interval_s)
    pool, profiles, arrival = draw_peers(scenario, rng)
    state.samples.update({s.spec.peer_id: s for s in pool})

    def next_arrival(i: int) -> str:
        sample = arrival(i)
        state.samples[sample.spec.peer_id] = sample
        return sample.spec.peer_id

    def profile_session_s(peer_id: str, r: np.random.Generator) -> float:
        return float(profiles[state.samples[peer_id].profile].availability.draw_s(r, 1)[0])

    horizon_s = scenario.hours * 3600.0
    schedule = churn_schedule([s.spec.peer_id for s in pool], scenario.sessions, horizon_s, rng,
                              arrival_id=next_arrival, profile_session_s=profile_session_s)
    # The bootstrap and the driver sit on a well-connected machine: not a bottleneck.
    for node in (BOOTSTRAP, DRIVER):
        network.set_peer(node, latency_s=0.01)
    result: dict = {}
    async with trio.open_nursery() as nursery:
        state.bootstrap_address = await nursery.start(
            serve_bootstrap, SimTransport(network, BOOTSTRAP), f"{BOOTSTRAP}:7070", BootstrapConfig(
                heartbeat_interval_s=scenario.heartbeat_interval_s, suspect_after_s=3 * scenario.heartbeat_interval_s,
                dead_after_s=10 * scenario.heartbeat_interval_s))
        nursery.start_soon(_apply_churn, state, schedule.events, nursery)
        for fault in scenario.faults:
            nursery.start_soon(_apply_fault, state, fault, nursery)
        # Virtual seconds for the initial peers to register (a slow peer's 1 MiB bandwidth probe).
        await trio.sleep(scenario.warmup_s)
        result = await _drive(state, scenario, model, batches, params, horizon_s)
        nursery.cancel_scope.cancel()
    live_s = _live_peer_seconds(state.rows, horizon_s)
    result.update(trace_hash=trace.hash(), events=trace.count, rows=state.rows, killed=sorted(state.killed),
                  faulted=sorted(state.faulted), mean_live_peers=live_s / horizon_s if horizon_s else 0.0,
                  virtual_s=trio.current_time())
    return result


async def _drive(state: _State, scenario: Scenario, model, batches, params, horizon_s: float) -> dict:
    m = scenario.model
    spec = TrainSpec(model, batches, losses.softmax_cross_entropy, optax.adam(OPTIMIZER_LR), steps=10**9,
                     microbatches=m.microbatches, params=list(params))
    config = DriverConfig(wait_for_peers_s=max(600.0, horizon_s), max_recoveries=10**6,
                          max_replicas=scenario.max_replicas)
    steps: list[tuple[float, int, float]] = []
    plans: list[tuple[float, float]] = []   # (time planned, cost-model step time)
    sizes = dict(in_bytes=batches(0)[0][0].nbytes, batch_size=m.batch_size,
                 microbatch_size=m.batch_size // m.microbatches)

    def on_plan(stages, epoch: int) -> None:
        state.stages = list(stages)
        state.compute.set_plan(epoch, [(s.start, s.stop) for s in stages])
        # The cost model's step time for this plan on the peers' true (scaled) hardware.
        the_plan = planner.Plan([planner.Stage(s.start, s.stop, tuple(s.peer_ids)) for s in stages])
        specs = [state.samples[p].spec for s in stages for p in s.peer_ids]
        predicted_s = planner.step_time(the_plan, state.compute.costs, specs, **sizes)
        plans.append((trio.current_time(), predicted_s))
        state.event("plan", ",".join("+".join(s.peer_ids) for s in stages), epoch, predicted_s)

    def on_step(step: int, loss: float, _samples_per_s: float) -> None:
        steps.append((trio.current_time(), step, loss))
        state.event("step", "", step, loss)

    transport = SimTransport(state.network, DRIVER)
    directory = Link(await transport.connect(state.bootstrap_address))
    # run_training's body, so that the driver's recoveries can be read after the run is cut
    # off at the horizon (training runs "forever": steps = 10**9). Keep in step with it.
    driver = _Driver(transport, directory, spec, config, on_step, on_plan)
    error = ""
    with trio.move_on_at(horizon_s):
        try:
            await driver.run()
        except TrainingError as exc:
            error = str(exc)
            state.event("training_error")
    await directory.aclose()
    for r in driver.recoveries:
        state.event("recovery", r.peer_id, r.resumed_from_step, r.seconds)
    return dict(steps=steps, plans=plans, recoveries=list(driver.recoveries), error=error,
                samples_per_step=m.batch_size, microbatches=m.microbatches)


def _live_peer_seconds(rows: list[tuple], horizon_s: float) -> float:
    total, last_t, live = 0.0, 0.0, 0
    for row in rows:
        t = min(row[0], horizon_s)
        total += live * (t - last_t)
        last_t, live = t, row[5]
    return total + live * max(0.0, horizon_s - last_t)


async def _run_peer(state: _State, peer_id: str, config: PeerConfig, scope: trio.CancelScope) -> None:
    with scope:
        try:
            await serve_peer(SimTransport(state.network, peer_id), config)
        except Exception as exc:   # noqa: BLE001 - a peer that cannot start is a churn fact
            state.event("peer_error", peer_id, -1, 0.0)
            log.info("peer %s stopped: %s", peer_id, exc)


def _start_peer(state: _State, peer_id: str, nursery: trio.Nursery) -> None:
    s = state.samples[peer_id]
    state.network.set_peer(peer_id, s.upload_bytes_per_s, s.download_bytes_per_s, s.latency_s)
    config = PeerConfig(bootstrap=state.bootstrap_address, listen=f"{peer_id}:1",
                        memory_bytes=max(1, s.spec.memory_bytes), flops_per_s=s.spec.flops_per_s,
                        compute_in_thread=False, shape_only=state.shape_only,
                        heartbeat_interval_s=state.heartbeat_interval_s,
                        compute_delay_s=state.compute.for_peer(peer_id, s.spec.flops_per_s))
    scope = state.scopes[peer_id] = trio.CancelScope()
    state.live.add(peer_id)
    state.event("join", peer_id)
    nursery.start_soon(_run_peer, state, peer_id, config, scope)


def _kill_peer(state: _State, peer_id: str) -> None:
    """A crash: connections break now (no leave is announced), then the tasks stop."""
    if peer_id not in state.live:
        return
    state.network.kill(peer_id)
    state.scopes.pop(peer_id).cancel()
    state.live.discard(peer_id)
    state.killed.add(peer_id)
    state.event("kill", peer_id)


async def _apply_churn(state: _State, events: tuple[ChurnEvent, ...], nursery: trio.Nursery) -> None:
    for e in events:
        await trio.sleep_until(e.time_s)
        if e.kind == "join":
            _start_peer(state, e.peer_id, nursery)
        else:
            _kill_peer(state, e.peer_id)


async def _apply_fault(state: _State, fault: Fault, nursery: trio.Nursery) -> None:
    await trio.sleep_until(fault.at_s)
    if fault.stage >= len(state.stages):
        state.event("fault_skipped", fault.kind, fault.stage)
        return
    targets = [p for p in state.stages[fault.stage].peer_ids if p in state.live]
    if not targets:
        state.event("fault_skipped", fault.kind, fault.stage)
        return
    state.event(f"fault_{fault.kind}", "+".join(targets), fault.stage, fault.duration_s)
    if fault.kind == "kill_stage":
        for peer_id in targets:
            _kill_peer(state, peer_id)
        return
    state.faulted.update(targets)
    if fault.kind == "partition_stage":
        others = sorted((set(state.samples) | {BOOTSTRAP, DRIVER}) - set(targets))
        state.network.partition(targets, others)
        await trio.sleep(fault.duration_s)
        state.network.heal()
    elif fault.kind == "pause":
        state.network.pause(targets[0])
        await trio.sleep(fault.duration_s)
        state.network.resume(targets[0])
    elif fault.kind == "slow":
        for peer_id in targets:
            state.compute.slowdown[peer_id] = fault.factor
        await trio.sleep(fault.duration_s)
        for peer_id in targets:
            state.compute.slowdown.pop(peer_id, None)
    state.event(f"fault_{fault.kind}_end", "+".join(targets), fault.stage)


