"""Planner benchmark: step time against baselines, planning time, and re-planning after churn.

Pools of 8, 64 and 1,000 peers are drawn from peers/*.toml (p2ptrain.profiles.DEFAULT_MIX,
one pool per seed); models are built analytically (no JAX):
- digits MLP 64-128-128-10 (3 dense+ReLU layers), batch 256, micro-batch 32;
- transformer, 24 blocks, d_model 512, sequence 128, vocabulary 32,000 (embedding, blocks,
  LM head: 26 layers), batch 64 sequences, micro-batch 4;
- deep MLP, 96 dense layers of width 4096, batch 1,024, micro-batch 64.

For every pool and model it prints the step time of `plan` and of each baseline (their best
stage count), the planner's throughput over the best baseline's, the wall time `plan` took,
and, after removing 10% of the peers at random, how `replan` compares with a fresh plan in
step time and in parameter bytes moved. A PNG (matplotlib, Agg) shows the speed-ups and the
planning times. `--scale` adds planning-time runs at 1,000 and 10,000 peers.

    .venv/bin/python simulations/planner_bench.py [--seeds 5] [--scale] [--out out/planner_bench.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2ptrain.planner import Infeasible, LayerCost, moved_param_bytes, plan, replan, step_time  # noqa: E402
from p2ptrain.planner.baselines import BASELINES  # noqa: E402
from p2ptrain.profiles import draw_pool, load_profiles  # noqa: E402

F32_BYTES = 4


def dense(fan_in: int, fan_out: int) -> LayerCost:
    """Dense layer (+ elementwise activation): fwd 2*in*out FLOPs per sample, bwd twice that."""
    return LayerCost((fan_in * fan_out + fan_out) * F32_BYTES, fan_out * F32_BYTES, 6.0 * fan_in * fan_out)


def digits_mlp() -> tuple[list[LayerCost], int]:
    return [dense(64, 128), dense(128, 128), dense(128, 10)], 64 * F32_BYTES


def transformer(blocks: int = 24, d_model: int = 512, seq: int = 128, vocab: int = 32_000) -> tuple[list[LayerCost], int]:
    """Per sample = one sequence. A block: attention (4 d^2) + MLP (8 d^2) weights; FLOPs
    3 * (2 * params * seq + 4 * seq^2 * d) for fwd+bwd including attention scores."""
    block_params = 12 * d_model * d_model + 13 * d_model
    act = seq * d_model * F32_BYTES
    embed = LayerCost(vocab * d_model * F32_BYTES, act, 6.0 * seq * d_model)  # a gather: cheap
    block = LayerCost(block_params * F32_BYTES, act, 3.0 * (2.0 * block_params * seq + 4.0 * seq * seq * d_model))
    head = LayerCost((vocab * d_model + vocab) * F32_BYTES, seq * vocab * F32_BYTES, 6.0 * seq * d_model * vocab)
    return [embed] + [block] * blocks + [head], seq * 4  # int32 token ids in


def deep_mlp(width: int = 4096, depth: int = 96) -> tuple[list[LayerCost], int]:
    return [dense(width, width) for _ in range(depth)], width * F32_BYTES


MODELS = {
    "digits-mlp": (digits_mlp, dict(batch_size=256, microbatch_size=32)),
    "transformer-24x512": (transformer, dict(batch_size=64, microbatch_size=4)),
    "deep-mlp-96": (deep_mlp, dict(batch_size=1024, microbatch_size=64)),
}


def run_case(layers, in_bytes, geometry, samples, seed):
    """One pool and model: planner, baselines, churn. Returns a dict of numbers (None where
    a planner found nothing)."""
    peers = [s.spec for s in samples]
    kw = dict(in_bytes=in_bytes, **geometry)
    out = {}
    t0 = time.perf_counter()
    try:
        p = plan(layers, peers, **kw)
    except Infeasible:
        return None
    out["plan_s"] = time.perf_counter() - t0
    out["planner"] = step_time(p, layers, peers, **kw)
    out["stages"] = len(p.stages)
    out["peers_used"] = sum(len(s.peers) for s in p.stages)
    rng = np.random.default_rng(seed)
    join_order = [peers[i].peer_id for i in rng.permutation(len(peers))]
    for name, fn in BASELINES.items():
        extra = {"join_order": join_order} if name == "petals_greedy" else {}
        b = fn(layers, peers, **kw, **extra)
        out[name] = None if b is None else step_time(b, layers, peers, **kw)
    base = [out[n] for n in BASELINES if out[n] is not None]
    out["speedup"] = (min(base) / out["planner"]) if base else None  # None: no baseline fits

    # churn: 10% of the peers (at least one) leave at random
    gone = max(1, len(peers) // 10)
    keep = sorted(rng.choice(len(peers), size=len(peers) - gone, replace=False))
    rest = [peers[i] for i in keep]
    try:
        fresh = plan(layers, rest, **kw)
    except Infeasible:
        return out
    fresh_s = step_time(fresh, layers, rest, **kw)
    fresh_bytes = moved_param_bytes(p, fresh, layers)
    t0 = time.perf_counter()
    r = replan(p, layers, rest, **kw)
    out["replan_s"] = time.perf_counter() - t0
    out["replan_time_ratio"] = step_time(r.plan, layers, rest, **kw) / fresh_s
    out["fresh_bytes"] = fresh_bytes
    out["replan_bytes"] = r.moved_bytes
    return out


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="pools drawn per size (default 5)")
    ap.add_argument("--pools", default="8,64,1000", help="pool sizes, comma-separated")
    ap.add_argument("--scale", action="store_true", help="also time plan() at 1,000 and 10,000 peers")
    ap.add_argument("--out", default="out/planner_bench.png", help="PNG path (default out/planner_bench.png)")
    args = ap.parse_args(argv)
    profiles = load_profiles()
    sizes = [int(x) for x in args.pools.split(",")]

    rows = []
    header = (
        f"{'pool':>5} {'model':<19} {'planner_s':>9} {'equal_s':>9} {'prop_s':>9} {'petals_s':>9} "
        f"{'speedup':>8} {'bl_ok':>5} {'stages':>6} {'used':>5} {'plan_s':>7} {'re/fresh':>8} {'re_MB':>8} {'fresh_MB':>8}"
    )
    print(f"step times in seconds, medians over {args.seeds} pools (a baseline's over the pools where it finds a plan;")
    print("'-': none); speedup = best baseline step / planner step, median over pools where some baseline fits")
    print("(bl_ok of them); re/fresh, re_MB, fresh_MB: replan vs a fresh plan after 10% of the peers leave")
    print(header)
    print("-" * len(header))
    for n in sizes:
        for model, (build, geometry) in MODELS.items():
            layers, in_bytes = build()
            results = []
            for seed in range(args.seeds):
                samples = draw_pool(n, seed=1000 * n + seed, profiles=profiles)
                r = run_case(layers, in_bytes, geometry, samples, seed)
                if r is not None:
                    results.append(r)
            if not results:
                print(f"{n:>5} {model:<19} infeasible on every pool")
                continue

            def med(key):
                vals = [r[key] for r in results if r.get(key) is not None]
                return statistics.median(vals) if vals else None

            row = {k: med(k) for k in ("planner", *BASELINES, "speedup", "stages", "peers_used", "plan_s",
                                       "replan_time_ratio", "replan_bytes", "fresh_bytes")}
            row.update(pool=n, model=model, all=results)
            bl_ok = f"{sum(r['speedup'] is not None for r in results)}/{len(results)}"
            rows.append(row)
            mb = lambda x: None if x is None else x / 1e6  # noqa: E731
            print(
                f"{n:>5} {model:<19} {fmt(row['planner'], '9.4g')} {fmt(row['equal_pipeline'], '9.4g')} "
                f"{fmt(row['proportional_pipeline'], '9.4g')} {fmt(row['petals_greedy'], '9.4g')} "
                f"{fmt(row['speedup'], '8.2f')} {bl_ok:>5} {fmt(row['stages'], '6.0f')} {fmt(row['peers_used'], '5.0f')} "
                f"{fmt(row['plan_s'], '7.2f')} {fmt(row['replan_time_ratio'], '8.3f')} "
                f"{fmt(mb(row['replan_bytes']), '8.1f')} {fmt(mb(row['fresh_bytes']), '8.1f')}"
            )
    speedups = [r["speedup"] for row in rows for r in row["all"] if r["speedup"] is not None]
    ratios = [r["replan_time_ratio"] for row in rows for r in row["all"] if "replan_time_ratio" in r]
    re_bytes = sum(r.get("replan_bytes", 0) for row in rows for r in row["all"])
    fr_bytes = sum(r.get("fresh_bytes", 0) for row in rows for r in row["all"])
    print()
    print(f"median speedup over the best baseline: {statistics.median(speedups):.2f}x "
          f"(min {min(speedups):.2f}x, {len(speedups)} pool/model cases)")
    if ratios:
        print(f"replan after 10% churn: step time / fresh: median {statistics.median(ratios):.3f}, max {max(ratios):.3f}; "
              f"bytes moved {re_bytes / 1e9:.2f} GB vs fresh {fr_bytes / 1e9:.2f} GB "
              f"({(re_bytes / fr_bytes if fr_bytes else 0):.2f} of fresh)")

    scale = []
    if args.scale:
        layers, in_bytes = deep_mlp()
        geometry = MODELS["deep-mlp-96"][1]
        for n in (1000, 10_000):
            peers = [s.spec for s in draw_pool(n, seed=n, profiles=profiles)]
            t0 = time.perf_counter()
            plan(layers, peers, in_bytes=in_bytes, **geometry)
            dt = time.perf_counter() - t0
            scale.append((n, dt))
            print(f"plan(): {n} peers x {len(layers)} layers in {dt:.2f} s")

    _plot(rows, scale, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def _plot(rows, scale, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    labels = [f"{r['model']}\n{r['pool']} peers" for r in rows]
    x = np.arange(len(rows))
    width = 0.2
    names = [("planner", "plan()"), ("equal_pipeline", "equal pipeline"),
             ("proportional_pipeline", "proportional"), ("petals_greedy", "Petals-style")]
    for k, (key, label) in enumerate(names):
        thr = [(1.0 / r[key]) if r[key] else 0.0 for r in rows]
        ax.bar(x + (k - 1.5) * width, thr, width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("steps per second (median over pools)")
    ax.set_xticks(x, labels, fontsize=6, rotation=45, ha="right")
    ax.legend(fontsize=7)
    ax.set_title("throughput: planner vs baselines")
    ax = axes[1]
    sizes = sorted({r["pool"] for r in rows})
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = [(r["pool"], r["plan_s"]) for r in rows if r["model"] == model]
        ax.plot([p for p, _ in pts], [t for _, t in pts], marker="o", label=model)
    if scale:
        ax.plot([n for n, _ in scale], [t for _, t in scale], marker="s", ls="--", label="deep-mlp-96 (--scale)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peers")
    ax.set_ylabel("plan() wall time, s")
    ax.set_xticks(sizes + [n for n, _ in scale if n not in sizes])
    ax.legend(fontsize=7)
    ax.set_title("planning time")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
