"""Training state the driver keeps to survive failures: a snapshot of every layer's
parameters and optimizer state after some step, in memory and optionally on disk.

The on-disk form is one `.npz` file (no pickle) written atomically: a temporary file in the
same directory, fsync, then rename, so a crash leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

CHECKPOINT_NAME = "checkpoint.npz"


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt, or belongs to another model or optimizer."""


@dataclass(frozen=True)
class Snapshot:
    """State after `step` steps: per-layer params pytrees, per-layer optimizer-state leaves
    (None before the first snapshot: peers then initialise it), and the losses so far."""

    step: int
    params: list
    opt_state: list[list[np.ndarray]] | None
    losses: tuple[float, ...]


def fingerprint(params: list, opt_leaf_counts: list[int], steps_per_batch: int) -> str:
    """What a checkpoint must match to be resumed: the params' structure, shapes and dtypes,
    the optimizer state's layout, and the micro-batch count."""
    shapes = [(str(jax.tree_util.tree_structure(p)),
               [(list(np.shape(a)), str(np.asarray(a).dtype)) for a in jax.tree_util.tree_leaves(p)])
              for p in params]
    return json.dumps({"params": shapes, "opt": opt_leaf_counts, "microbatches": steps_per_batch},
                      sort_keys=True)


def save(state_dir: Path, snapshot: Snapshot, model_fingerprint: str) -> Path:
    """Write `snapshot` to `state_dir`/checkpoint.npz atomically; returns the path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for layer, params in enumerate(snapshot.params):
        for i, leaf in enumerate(jax.tree_util.tree_leaves(params)):
            arrays[f"p{layer}_{i}"] = np.asarray(leaf)
    for layer, leaves in enumerate(snapshot.opt_state or []):
        for i, leaf in enumerate(leaves):
            arrays[f"o{layer}_{i}"] = np.asarray(leaf)
    meta = {"step": snapshot.step, "losses": list(snapshot.losses), "fingerprint": model_fingerprint,
            "has_opt_state": snapshot.opt_state is not None}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = state_dir / CHECKPOINT_NAME
    tmp = state_dir / f".{CHECKPOINT_NAME}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(state_dir: Path, like_params: list, opt_leaf_counts: list[int], model_fingerprint: str) -> Snapshot:
    """The checkpoint in `state_dir`, checked against `model_fingerprint` (see `fingerprint`)."""
    path = state_dir / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint to resume from in {state_dir}")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta["fingerprint"] != model_fingerprint:
                raise CheckpointError(f"{path} belongs to a different model, optimizer or micro-batching")
            params = []
            for layer, like in enumerate(like_params):
                treedef = jax.tree_util.tree_structure(like)
                count = treedef.num_leaves
                params.append(jax.tree_util.tree_unflatten(
                    treedef, [data[f"p{layer}_{i}"] for i in range(count)]))
            opt_state = None
            if meta["has_opt_state"]:
                opt_state = [[data[f"o{layer}_{i}"] for i in range(count)]
                             for layer, count in enumerate(opt_leaf_counts)]
    except (KeyError, ValueError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return Snapshot(meta["step"], params, opt_state, tuple(meta["losses"]))
