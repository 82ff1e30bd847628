"""Vectorised form of the cost model, shared by the planner's search routines.

`Problem` holds prefix sums over layers and per-peer arrays so that span quantities are O(1)
and a whole matrix of spans (a, b) is one numpy expression. It must agree with cost_model.py
(tests check it against `step_time`). Peers are held sorted by peer id so that every result
is independent of the order the caller listed them in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .costs import LayerCost, PeerSpec


def ring_factor(k: np.ndarray | int) -> np.ndarray:
    """2 (k - 1) / k: bytes a ring all-reduce sends per parameter byte; 0 for one replica."""
    k = np.asarray(k, dtype=float)
    return np.where(k > 1, 2.0 * (k - 1.0) / np.maximum(k, 1.0), 0.0)


class Problem:
    """One planning instance: layers, peers (sorted by id) and the step's batch geometry."""

    def __init__(
        self,
        layers: Sequence[LayerCost],
        peers: Sequence[PeerSpec],
        *,
        in_bytes: int,
        batch_size: int,
        microbatch_size: int,
        state_factor: float = 4.0,
    ) -> None:
        if not layers:
            raise ValueError("a model needs at least one layer")
        if batch_size <= 0 or microbatch_size <= 0:
            raise ValueError("batch_size and microbatch_size must be positive")
        ids = [p.peer_id for p in peers]
        if len(set(ids)) != len(ids):
            raise ValueError("peer ids must be unique")
        self.layers = list(layers)
        self.peers = sorted(peers, key=lambda p: p.peer_id)
        self.peer_ids = [p.peer_id for p in self.peers]
        self.in_bytes = in_bytes
        self.batch_size = batch_size
        self.microbatch_size = microbatch_size
        self.state_factor = state_factor
        self.num_layers = L = len(layers)
        self.num_peers = len(self.peers)

        flops = np.array([x.flops for x in layers], dtype=float)
        params = np.array([x.param_bytes for x in layers], dtype=float)
        outs = np.array([x.out_bytes for x in layers], dtype=float)
        self.out_bytes = outs
        self.flops_cum = np.concatenate([[0.0], np.cumsum(flops)])
        self.params_cum = np.concatenate([[0.0], np.cumsum(params)])
        self.outs_cum = np.concatenate([[0.0], np.cumsum(outs)])
        # in(a): what the stage starting at layer a receives per sample
        self.stage_in_bytes = np.concatenate([[float(in_bytes)], outs[:-1]])
        # traffic halves: what crosses the start boundary and the stop boundary
        self.start_traffic = np.concatenate([[float(in_bytes)], 2.0 * outs[:-1]])  # index a in [0, L)
        self.stop_traffic = np.concatenate([[0.0], 2.0 * outs[:-1], [0.0]])  # index b in [0, L]

        self.mem = np.array([p.memory_bytes for p in self.peers], dtype=float)
        self.fps = np.array([p.flops_per_s for p in self.peers], dtype=float)
        self.bw = np.array([p.bandwidth_bytes_per_s for p in self.peers], dtype=float)

        # Span matrices over (a, b), a in [0, L), b in [0, L]; only a < b is meaningful.
        a = np.arange(L)[:, None]
        b = np.arange(L + 1)[None, :]
        self.valid = b > a
        self.span_flops = self.flops_cum[b] - self.flops_cum[a]
        self.span_params = self.params_cum[b] - self.params_cum[a]
        self.span_traffic = self.start_traffic[a] + self.stop_traffic[b]
        self.span_acts = self.stage_in_bytes[a] + (self.outs_cum[b] - self.outs_cum[a])
        # Memo tables for the search (one plan() call owns one Problem, so this stays pure).
        self._memory_cache: dict[tuple[float, int], np.ndarray] = {}
        self._group_cache: dict[bytes, np.ndarray] = {}
        self._stage_cache: dict[tuple[bytes, float], np.ndarray] = {}
        self._dp_cache: dict[tuple[int, bytes, float], tuple[int, np.ndarray, np.ndarray]] = {}
        self._rates_cache: dict[tuple[int, int], np.ndarray] = {}

    # -- memory ---------------------------------------------------------------------------
    def in_flight(self, stage_index: int, num_stages: int) -> float:
        """Micro-batches of activations stage s of S holds: min(S - s, batch / microbatch)."""
        return min(num_stages - stage_index, self.batch_size / self.microbatch_size)

    def memory(self, a: int, b: int, stage_index: int, num_stages: int) -> float:
        """memory(s, p) for span [a, b) at position s of S (the same for every replica)."""
        acts = self.stage_in_bytes[a] + self.outs_cum[b] - self.outs_cum[a]
        return float(
            self.state_factor * (self.params_cum[b] - self.params_cum[a])
            + self.in_flight(stage_index, num_stages) * self.microbatch_size * acts
        )

    def memory_matrix(self, stage_index: int, num_stages: int) -> np.ndarray:
        """memory over all spans (a, b) at position s of S; +inf where a >= b. Cached."""
        key = (self.in_flight(stage_index, num_stages), 0)
        hit = self._memory_cache.get(key)
        if hit is not None:
            return hit
        m = self.state_factor * self.span_params + self.in_flight(stage_index, num_stages) * self.microbatch_size * self.span_acts
        m = np.where(self.valid, m, np.inf)
        m.setflags(write=False)
        self._memory_cache[key] = m
        return m

    # -- time -----------------------------------------------------------------------------
    def span_rates(self, a: int, b: int) -> np.ndarray:
        """1 / t(s, p) for every peer on span [a, b): samples per second per replica. Cached."""
        hit = self._rates_cache.get((a, b))
        if hit is not None:
            return hit
        flops = self.flops_cum[b] - self.flops_cum[a]
        traffic = self.start_traffic[a] + self.stop_traffic[b]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.maximum(flops / self.fps, traffic / self.bw)
            rates = np.where(t > 0, 1.0 / t, np.inf)
        rates.setflags(write=False)
        self._rates_cache[(a, b)] = rates
        return rates

    def span_param_bytes(self, a: int, b: int) -> float:
        return float(self.params_cum[b] - self.params_cum[a])

    def stage_time(self, rate_sum: float, k: int, min_bw: float, param_bytes: float) -> float:
        """batch / X + sync for a stage with k replicas whose slowest link is min_bw."""
        if k == 0:
            return np.inf
        sync = 2.0 * (k - 1) / k * param_bytes / min_bw if k > 1 else 0.0
        return self.batch_size / rate_sum + sync
