"""Per-layer costs for the planner (DESIGN.md section 5), measured with XLA's cost analysis.

For each layer i, on the activation that reaches it from ``x_example``:
- param_bytes: bytes of its params (exact, not per sample);
- out_bytes: bytes of its output for one sample (output bytes / batch, exact for equal rows);
- flops: forward + backward per sample, from ``cost_analysis()`` of the jitted program
  ``(p, x, gy) -> (y, vjp(gy))``, i.e. one forward and one backward pass with every op
  counted once (what a stage with kept residuals runs), divided by the batch size.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from p2ptrain.compute.model import Sequential, is_param_layer
from p2ptrain.planner.costs import LayerCost

__all__ = ["profile_layers", "xla_flops"]


def xla_flops(fn, *args) -> float | None:
    """FLOPs XLA's cost analysis reports for ``jax.jit(fn)(*args)``; None if it reports none."""
    try:
        analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    except Exception:  # some backends do not implement cost analysis
        return None
    # Older jax returned a list with one dict per computation; 0.10 returns a dict.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops >= 0 else None


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(tree))


def _fwd_bwd(apply, wrt_x: bool):
    def fwd_bwd(p, x, gy):
        if wrt_x:
            y, vjp_fn = jax.vjp(apply, p, x)
        else:  # integer input (e.g. token ids): only the params have a gradient
            y, vjp_fn = jax.vjp(lambda p_: apply(p_, x), p)
        return y, vjp_fn(gy)

    return fwd_bwd


def profile_layers(model: Sequential, params: list, x_example: Any) -> list[LayerCost]:
    """One ``LayerCost`` per layer of ``model``, per sample of ``x_example``'s batch (axis 0)."""
    if len(params) != len(model):
        raise ValueError(f"{len(model)} layers but {len(params)} params entries")
    x = jax.numpy.asarray(x_example)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError("x_example needs a non-empty batch axis")
    batch = x.shape[0]
    costs = []
    for i, layer_params in enumerate(params):
        def apply(p, h, i=i):
            return model.apply_layer(i, p, h)

        y = apply(layer_params, x)
        out_bytes = _nbytes(y) // batch
        param_bytes = _nbytes(layer_params)
        flops = None
        if jax.numpy.issubdtype(y.dtype, jax.numpy.inexact):
            wrt_x = bool(jax.numpy.issubdtype(x.dtype, jax.numpy.inexact))
            flops = xla_flops(_fwd_bwd(apply, wrt_x), layer_params, x, jax.numpy.ones_like(y))
        if flops is None:
            # XLA reported nothing (or the output is not differentiable): fall back to 3x the
            # forward, the usual fwd:bwd ratio of 1:2. Forward from XLA if it reports it, else
            # an analytic estimate: one multiply-add per parameter per sample plus one op per
            # output element.
            fwd = xla_flops(apply, layer_params, x)
            if fwd is None:
                n_params = sum(int(np.prod(np.shape(leaf)))
                               for leaf in jax.tree_util.tree_leaves(layer_params))
                fwd = batch * (2.0 * n_params if is_param_layer(model.layers[i]) else 0.0) \
                    + float(np.prod(y.shape))
            flops = 3.0 * fwd
        costs.append(LayerCost(param_bytes=param_bytes, out_bytes=out_bytes,
                               flops=flops / batch))
        x = y
    return costs
