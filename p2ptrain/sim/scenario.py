"""Simulation scenarios: TOML files (simulations/scenarios/*.toml) parsed into a `Scenario`.

Format (every key optional except where said):

    name = "churn_exponential"
    hours = 0.25                     # virtual duration of the run
    warmup_s = 30.0                  # peers register before the driver plans
    [swarm]
    peers = 16                       # initial (and mean, under churn) peer count
    mix = { old_laptop = 0.5, desktop_cpu = 0.5 }   # default: profiles.DEFAULT_MIX
    flops_scale = 1e3                # profile FLOP/s divided by this ...
    memory_scale = 3e4               # ... memory by this, bandwidth by bandwidth_scale:
    bandwidth_scale = 10.0           # the small model that really runs stands for a larger one
    max_replicas = 2                 # most peers per stage (default: the micro-batch count)
    heartbeat_interval_s = 1.0       # peers -> bootstrap; suspect after 3x, dead after 10x
    [model]
    inputs = 32                      # features per sample
    widths = [64, 64, 64, 10]        # Dense layers, relu between; the last is the classes
    batch_size = 64
    microbatches = 8
    compute = "real"                 # real (the math runs) | shape_only (zeros, for scale)
    [churn]
    distribution = "exponential"     # exponential | weibull | profile | none
    mean_session_s = 1800.0
    shape = 0.7                      # weibull only
    [[faults]]                       # scripted faults, applied to the plan in force then
    at_s = 120.0
    kind = "kill_stage"              # kill_stage | partition_stage | pause | slow
    stage = 0
    duration_s = 30.0                # partition_stage, pause, slow
    factor = 10.0                    # slow: compute takes factor x longer

Parsing is pure (`parse_scenario` takes the decoded dict); `load_scenario` reads the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..profiles import DEFAULT_MIX
from .churn import SessionModel

FAULT_KINDS = ("kill_stage", "partition_stage", "pause", "slow")
COMPUTE_MODES = ("real", "shape_only")
MAX_FAULTS = 1000


class ScenarioError(ValueError):
    """A scenario file is malformed; the message says where."""


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    stage: int = 0
    duration_s: float = 30.0
    factor: float = 10.0


@dataclass(frozen=True)
class ModelSpec:
    inputs: int = 32
    widths: tuple[int, ...] = (64, 64, 64, 10)
    batch_size: int = 64
    microbatches: int = 8
    # "real": stages run their math (exactness, small models); "shape_only": every result
    # is zeros of its true shape, no arithmetic (scale). Virtual time is the same in both.
    compute: str = "real"


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    hours: float = 0.1
    warmup_s: float = 30.0
    peers: int = 8
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    flops_scale: float = 1e3
    memory_scale: float = 3e4
    bandwidth_scale: float = 10.0
    max_replicas: int | None = None
    heartbeat_interval_s: float = 1.0
    model: ModelSpec = ModelSpec()
    sessions: SessionModel = SessionModel()
    faults: tuple[Fault, ...] = ()

    def with_overrides(self, *, peers: int | None = None, hours: float | None = None,
                       compute: str | None = None) -> "Scenario":
        if compute not in (None, *COMPUTE_MODES):
            raise ScenarioError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
        return replace(self, peers=self.peers if peers is None else peers,
                       hours=self.hours if hours is None else hours,
                       model=self.model if compute is None else replace(self.model, compute=compute))


def _num(table: Mapping, key: str, default: float, where: str, *, positive: bool = True) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0):
        raise ScenarioError(f"{where}: {key!r} must be a positive number, got {value!r}")
    return float(value)


def _int(table: Mapping, key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScenarioError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def parse_scenario(data: Mapping[str, Any], source: str = "<scenario>") -> Scenario:
    """Validate a decoded TOML document; raises ScenarioError naming the bad key."""
    d = Scenario()
    swarm, model, churn = (data.get(k, {}) for k in ("swarm", "model", "churn"))
    for key, table in (("swarm", swarm), ("model", model), ("churn", churn)):
        if not isinstance(table, Mapping):
            raise ScenarioError(f"{source}: [{key}] must be a table")
    mix = swarm.get("mix", d.mix)
    if not isinstance(mix, Mapping) or not mix or not all(
            isinstance(v, (int, float)) and v >= 0 for v in mix.values()):
        raise ScenarioError(f"{source} [swarm]: mix must map profile names to weights")
    widths = model.get("widths", list(d.model.widths))
    if not isinstance(widths, list) or not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ScenarioError(f"{source} [model]: widths must be a list of positive integers")
    spec = ModelSpec(
        inputs=_int(model, "inputs", d.model.inputs, f"{source} [model]"), widths=tuple(widths),
        batch_size=_int(model, "batch_size", d.model.batch_size, f"{source} [model]"),
        microbatches=_int(model, "microbatches", d.model.microbatches, f"{source} [model]"),
        compute=model.get("compute", d.model.compute))
    if spec.compute not in COMPUTE_MODES:
        raise ScenarioError(f"{source} [model]: compute must be one of {COMPUTE_MODES}")
    if spec.batch_size % spec.microbatches:
        raise ScenarioError(f"{source} [model]: batch_size must be a multiple of microbatches")
    try:
        sessions = SessionModel(str(churn.get("distribution", "none")),
                                _num(churn, "mean_session_s", 3600.0, f"{source} [churn]"),
                                _num(churn, "shape", 0.7, f"{source} [churn]"))
    except ValueError as exc:
        raise ScenarioError(f"{source} [churn]: {exc}") from None
    faults_data = data.get("faults", [])
    if not isinstance(faults_data, list) or len(faults_data) > MAX_FAULTS:
        raise ScenarioError(f"{source}: [[faults]] must be a list of at most {MAX_FAULTS} tables")
    faults = []
    for i, f in enumerate(faults_data):
        where = f"{source} [[faults]] #{i}"
        if not isinstance(f, Mapping) or f.get("kind") not in FAULT_KINDS:
            raise ScenarioError(f"{where}: kind must be one of {FAULT_KINDS}")
        stage = f.get("stage", 0)
        if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
            raise ScenarioError(f"{where}: stage must be an integer >= 0")
        faults.append(Fault(_num(f, "at_s", 0.0, where, positive=False), f["kind"], stage,
                            _num(f, "duration_s", 30.0, where), _num(f, "factor", 10.0, where)))
    return Scenario(
        name=str(data.get("name", Path(source).stem)),
        hours=_num(data, "hours", d.hours, source),
        warmup_s=_num(data, "warmup_s", d.warmup_s, source),
        peers=_int(swarm, "peers", d.peers, f"{source} [swarm]"),
        mix=dict(mix),
        flops_scale=_num(swarm, "flops_scale", d.flops_scale, f"{source} [swarm]"),
        memory_scale=_num(swarm, "memory_scale", d.memory_scale, f"{source} [swarm]"),
        bandwidth_scale=_num(swarm, "bandwidth_scale", d.bandwidth_scale, f"{source} [swarm]"),
        max_replicas=_int(swarm, "max_replicas", 1, f"{source} [swarm]") if "max_replicas" in swarm else None,
        heartbeat_interval_s=_num(swarm, "heartbeat_interval_s", d.heartbeat_interval_s, f"{source} [swarm]"),
        model=spec, sessions=sessions, faults=tuple(sorted(faults, key=lambda f: f.at_s)))


def load_scenario(path: str | Path) -> Scenario:
    """Read and parse a scenario TOML file (ScenarioError on bad content, OSError if unreadable)."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"{path}: {exc}") from None
    return parse_scenario(data, str(path))
