"""Local search over peer placement for fixed cuts.

Each step looks at the bottleneck stage b (largest batch / X + sync) and evaluates, all at
once with numpy, every move that changes b:
- add a peer to b (an unused one, or one taken from another stage that keeps a replica),
- drop a replica of b (helps when its slow link dominates the all-reduce),
- move a replica of b to another stage,
- swap a replica of b with a peer outside b (limited to b's weakest few replicas).
The best move by the key (max stage time, sum of (t_s / t_max)^8) is taken if it lowers the
key; the second term lets the search leave a tie at the maximum one stage at a time. The key
strictly decreases, so the search ends; `max_steps` bounds it anyway.
"""

from __future__ import annotations

import numpy as np

from .assign import Layout

_POWER = 8
_SWAP_CANDIDATES = 4


class _StageSums:
    """Per-stage rate sum, replica count, two smallest link bandwidths (and who has the
    smallest) and time: what a move needs to be priced in O(1). Updated per move."""

    def __init__(self, lay: Layout) -> None:
        S = lay.num_stages
        self.lay = lay
        self.rate_sum = np.zeros(S)
        self.count = np.zeros(S, dtype=int)
        self.min1 = np.full(S, np.inf)
        self.min2 = np.full(S, np.inf)
        self.argmin1 = np.full(S, -1)
        self.times = np.full(S, np.inf)
        for s in range(S):
            self.refresh(s)

    def refresh(self, s: int) -> None:
        lay = self.lay
        g = np.flatnonzero(lay.stage_of == s)
        self.rate_sum[s] = lay.rates[s, g].sum()
        self.count[s] = len(g)
        self.min1[s] = self.min2[s] = np.inf
        self.argmin1[s] = -1
        if len(g):
            bws = lay.problem.bw[g]
            order = np.argsort(bws, kind="stable")
            self.min1[s] = bws[order[0]]
            self.argmin1[s] = g[order[0]]
            if len(g) > 1:
                self.min2[s] = bws[order[1]]
        self.times[s] = _time(lay, np.array([s]), self.rate_sum[s : s + 1], self.count[s : s + 1], self.min1[s : s + 1])[0]


def _time(lay: Layout, stages: np.ndarray, rate_sum: np.ndarray, count: np.ndarray, min_bw: np.ndarray) -> np.ndarray:
    """Vectorised stage time for hypothetical (rate_sum, count, min_bw) of `stages`."""
    p = lay.problem
    with np.errstate(divide="ignore", invalid="ignore"):
        sync = np.where(count > 1, 2.0 * (count - 1) / np.maximum(count, 1) * lay.param_bytes[stages] / min_bw, 0.0)
        compute = np.where(count > 0, p.batch_size / rate_sum, np.inf)
    return compute + sync


def _min_without(sums: _StageSums, stages: np.ndarray, peers: np.ndarray) -> np.ndarray:
    """Smallest bandwidth left in `stages` once `peers` leave them."""
    return np.where(sums.argmin1[stages] == peers, sums.min2[stages], sums.min1[stages])


def improve(lay: Layout, max_steps: int | None = None) -> Layout:
    """Hill-climb `lay` in place (cuts fixed) and return it. Every stage must have a replica."""
    p = lay.problem
    n, S = p.num_peers, lay.num_stages
    if max_steps is None:
        max_steps = 50 + 10 * n
    all_peers = np.arange(n)
    sums = _StageSums(lay)
    for _ in range(max_steps):
        times = sums.times
        t_max = float(times.max())
        if not np.isfinite(t_max) or t_max <= 0.0:
            break
        powered = (times / t_max) ** _POWER
        cur_key = (t_max, float(powered.sum()))
        b = int(np.argmax(times))
        where = lay.stage_of
        in_b = np.flatnonzero(where == b)

        moves: list[tuple[np.ndarray, ...]] = []  # (peer_out_of_b, peer_into_b, dest_of_out, src_of_in)
        # Candidates are encoded as arrays: x = replica leaving b (-1 none), y = peer joining b
        # (-1 none), dx = stage x goes to (-1 unused), sy = stage y comes from (-1 unused).
        # add y to b
        ys = all_peers[(where != b) & lay.eligible[b]]
        ys = ys[(where[ys] < 0) | (sums.count[np.maximum(where[ys], 0)] > 1)]
        moves.append((np.full(len(ys), -1), ys, np.full(len(ys), -1), where[ys]))
        if len(in_b) > 1:
            # drop x from b, or move it to another stage that it fits
            moves.append((in_b, np.full(len(in_b), -1), np.full(len(in_b), -1), np.full(len(in_b), -1)))
            xs, ds = np.nonzero(lay.eligible[:, in_b].T)
            xs = in_b[xs]
            keep = ds != b
            moves.append((xs[keep], np.full(keep.sum(), -1), ds[keep], np.full(keep.sum(), -1)))
        # swap a weak replica of b with an outside peer (which then takes its place elsewhere)
        weak = in_b[np.argsort(lay.rates[b, in_b], kind="stable")[:_SWAP_CANDIDATES]]
        if sums.argmin1[b] >= 0 and sums.argmin1[b] not in weak:
            weak = np.append(weak, sums.argmin1[b])
        outside = all_peers[(where != b) & lay.eligible[b]]
        if len(weak) and len(outside):
            xs = np.repeat(weak, len(outside))
            ys = np.tile(outside, len(weak))
            src = where[ys]
            ok = (src < 0) | lay.eligible[np.maximum(src, 0), xs]
            moves.append((xs[ok], ys[ok], src[ok], src[ok]))
        x = np.concatenate([m[0] for m in moves])
        y = np.concatenate([m[1] for m in moves])
        dx = np.concatenate([m[2] for m in moves])
        sy = np.concatenate([m[3] for m in moves])
        if len(x) == 0:
            break

        # new state of b
        has_x, has_y = x >= 0, y >= 0
        xi, yi = np.maximum(x, 0), np.maximum(y, 0)
        rb = sums.rate_sum[b] - np.where(has_x, lay.rates[b, xi], 0.0) + np.where(has_y, lay.rates[b, yi], 0.0)
        cb = sums.count[b] - has_x + has_y
        bw_b = np.where(has_x, _min_without(sums, np.full(len(x), b), x), sums.min1[b])
        bw_b = np.where(has_y, np.minimum(bw_b, p.bw[yi]), bw_b)
        tb = _time(lay, np.full(len(x), b), rb, cb, bw_b)
        # the other stage touched: where y came from and/or where x went (the same for a swap)
        other = np.where(sy >= 0, sy, dx)
        oi = np.maximum(other, 0)
        to = np.where(other >= 0, 0.0, -np.inf)
        ro = sums.rate_sum[oi] - np.where(has_y & (sy >= 0), lay.rates[oi, yi], 0.0) + np.where(has_x & (dx >= 0), lay.rates[oi, xi], 0.0)
        co = sums.count[oi] - (has_y & (sy >= 0)) + (has_x & (dx >= 0))
        bw_o = np.where(has_y & (sy >= 0), _min_without(sums, oi, y), sums.min1[oi])
        bw_o = np.where(has_x & (dx >= 0), np.minimum(bw_o, p.bw[xi]), bw_o)
        to = np.where(other >= 0, _time(lay, oi, ro, co, bw_o), to)

        # max over untouched stages: the largest time not at b or `other`
        order = np.argsort(-times, kind="stable")[:3]
        rest = np.full(len(x), -np.inf)
        for s in order[::-1]:
            rest = np.where((s != b) & (s != other), times[s], rest)
        new_max = np.maximum(np.maximum(tb, to), rest)
        with np.errstate(over="ignore", invalid="ignore"):
            new_pow = powered.sum() - powered[b] + (tb / t_max) ** _POWER
            new_pow = new_pow + np.where(other >= 0, (np.maximum(to, 0) / t_max) ** _POWER - powered[oi], 0.0)
        better = (new_max < cur_key[0] * (1 - 1e-12)) | ((new_max <= cur_key[0] * (1 + 1e-12)) & (new_pow < cur_key[1] - 1e-9))
        if not better.any():
            break
        idx = np.flatnonzero(better)
        best = idx[np.lexsort((new_pow[idx], new_max[idx]))[0]]
        if x[best] >= 0:
            where[x[best]] = dx[best]
        if y[best] >= 0:
            where[y[best]] = b
        sums.refresh(b)
        if other[best] >= 0:
            sums.refresh(int(other[best]))
    return lay
