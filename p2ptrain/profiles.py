"""Hardware-class peer profiles (peers/*.toml) and seeded draws of peers from them.

Loading reads files (tomllib); drawing is pure and takes a seed or an np.random.Generator,
so the same seed gives the same peers. The file format is described in peers/README.md.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .planner.costs import PeerSpec

PROFILE_DIR = Path(__file__).resolve().parent.parent / "peers"
QUANTITIES = ("memory_bytes", "flops_per_s", "upload_bytes_per_s", "download_bytes_per_s", "latency_s")
SESSION_DISTRIBUTIONS = {"lognormal": ("median_s", "sigma"), "weibull": ("shape", "scale_s"), "exponential": ("mean_s",)}

# A volunteer mix for benchmarks and simulations when nothing better is known: mostly
# laptops and phones, few GPUs (BOINC-like host populations are dominated by ordinary PCs).
# An assumption, not a measurement.
DEFAULT_MIX = {"phone": 0.25, "raspberry_pi": 0.10, "old_laptop": 0.30, "desktop_cpu": 0.25, "desktop_gpu": 0.10}


class ProfileError(ValueError):
    """A profile file is missing a field or has a nonsensical value."""


@dataclass(frozen=True)
class Quantity:
    """Lognormal(median, sigma) clipped to [min, max]."""

    median: float
    sigma: float
    min: float
    max: float
    note: str

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.clip(self.median * np.exp(self.sigma * rng.standard_normal(size)), self.min, self.max)


@dataclass(frozen=True)
class Availability:
    """Session-length distribution in seconds."""

    distribution: str
    params: Mapping[str, float]
    note: str

    def draw_s(self, rng: np.random.Generator, size: int) -> np.ndarray:
        p = self.params
        if self.distribution == "lognormal":
            return p["median_s"] * np.exp(p["sigma"] * rng.standard_normal(size))
        if self.distribution == "weibull":
            return p["scale_s"] * rng.weibull(p["shape"], size)
        return rng.exponential(p["mean_s"], size)

    def mean_s(self) -> float:
        p = self.params
        if self.distribution == "lognormal":
            return p["median_s"] * math.exp(p["sigma"] ** 2 / 2)
        if self.distribution == "weibull":
            return p["scale_s"] * math.gamma(1 + 1 / p["shape"])
        return p["mean_s"]


@dataclass(frozen=True)
class PeerSample:
    """One drawn peer with everything the simulation needs; `spec` is the planner's view."""

    spec: PeerSpec
    profile: str
    upload_bytes_per_s: float
    download_bytes_per_s: float
    latency_s: float
    session_s: float


@dataclass(frozen=True)
class PeerProfile:
    name: str
    description: str
    quantities: Mapping[str, Quantity]
    availability: Availability

    def draw(self, count: int, seed: int | np.random.Generator, *, id_prefix: str | None = None) -> list[PeerSample]:
        """`count` peers with ids '<prefix>-0000', ...; the same seed gives the same peers."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        prefix = self.name if id_prefix is None else id_prefix
        q = {name: self.quantities[name].draw(rng, count) for name in QUANTITIES}
        sessions = self.availability.draw_s(rng, count)
        out = []
        for i in range(count):
            up, down = float(q["upload_bytes_per_s"][i]), float(q["download_bytes_per_s"][i])
            spec = PeerSpec(
                peer_id=f"{prefix}-{i:04d}",
                memory_bytes=int(q["memory_bytes"][i]),
                flops_per_s=float(q["flops_per_s"][i]),
                # one bandwidth per peer in the cost model: the narrower direction
                bandwidth_bytes_per_s=min(up, down),
            )
            out.append(PeerSample(spec, self.name, up, down, float(q["latency_s"][i]), float(sessions[i])))
        return out

    def draw_specs(self, count: int, seed: int | np.random.Generator, *, id_prefix: str | None = None) -> list[PeerSpec]:
        return [s.spec for s in self.draw(count, seed, id_prefix=id_prefix)]


def _number(table: Mapping, key: str, where: str) -> float:
    value = table.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProfileError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def _note(table: Mapping, where: str) -> str:
    note = table.get("note")
    if not isinstance(note, str) or not note.strip():
        raise ProfileError(f"{where}: every quantity needs a 'note' saying where the number comes from")
    return note


def parse_profile(data: Mapping, source: str = "<profile>") -> PeerProfile:
    """Validate a parsed TOML document and build the profile."""
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{source}: missing 'name'")
    quantities = {}
    for key in QUANTITIES:
        table = data.get(key)
        where = f"{source} [{key}]"
        if not isinstance(table, Mapping):
            raise ProfileError(f"{where}: missing table")
        q = Quantity(
            median=_number(table, "median", where),
            sigma=_number(table, "sigma", where),
            min=_number(table, "min", where),
            max=_number(table, "max", where),
            note=_note(table, where),
        )
        if not (0 < q.min <= q.median <= q.max) or q.sigma < 0:
            raise ProfileError(f"{where}: need 0 < min <= median <= max and sigma >= 0")
        quantities[key] = q
    table = data.get("availability")
    where = f"{source} [availability]"
    if not isinstance(table, Mapping):
        raise ProfileError(f"{where}: missing table")
    dist = table.get("distribution")
    if dist not in SESSION_DISTRIBUTIONS:
        raise ProfileError(f"{where}: distribution must be one of {sorted(SESSION_DISTRIBUTIONS)}, got {dist!r}")
    params = {k: _number(table, k, where) for k in SESSION_DISTRIBUTIONS[dist]}
    if any(v <= 0 for v in params.values()):
        raise ProfileError(f"{where}: parameters must be positive")
    availability = Availability(dist, params, _note(table, where))
    return PeerProfile(name, str(data.get("description", "")), quantities, availability)


def load_profile(path: str | Path) -> PeerProfile:
    path = Path(path)
    with path.open("rb") as f:
        data = tomllib.load(f)
    profile = parse_profile(data, str(path))
    if profile.name != path.stem:
        raise ProfileError(f"{path}: name {profile.name!r} does not match the file name")
    return profile


def load_profiles(directory: str | Path = PROFILE_DIR) -> dict[str, PeerProfile]:
    """Every peers/*.toml, by name, in sorted order."""
    return {p.stem: load_profile(p) for p in sorted(Path(directory).glob("*.toml"))}


def mix_counts(total: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split `total` peers by the weights in `mix` (largest remainders, ties by name)."""
    weight = sum(mix.values())
    exact = {k: total * v / weight for k, v in mix.items()}
    counts = {k: int(math.floor(x)) for k, x in exact.items()}
    left = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), k))[:left]:
        counts[k] += 1
    return counts


def draw_pool(
    total: int,
    seed: int | np.random.Generator,
    *,
    mix: Mapping[str, float] = DEFAULT_MIX,
    profiles: Mapping[str, PeerProfile] | None = None,
) -> list[PeerSample]:
    """A pool of `total` peers split over profiles by `mix`; deterministic in `seed`."""
    profiles = load_profiles() if profiles is None else profiles
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out: list[PeerSample] = []
    for name, count in sorted(mix_counts(total, mix).items()):
        if name not in profiles:
            raise ProfileError(f"mix names unknown profile {name!r}")
        out.extend(profiles[name].draw(count, rng))
    return out
