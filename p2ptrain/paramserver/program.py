"""The one program a parameter-server worker runs: (params leaves, x, y) -> (loss, grads leaves).

The server (the submitter's process) exports it with `jax.export`; a worker never runs the
submitter's Python, only this serialized program, after `compute.limits.check_program` has
checked it against the allow-list and its signature against what the job announced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import export as jax_export

from ..compute import ProgramLimits, ProgramRejected, Sequential, check_program, flatten_params, params_treedef


def export_grad_program(model: Sequential, loss: Callable, params: list, *,
                        x_spec: jax.ShapeDtypeStruct, y_spec: jax.ShapeDtypeStruct) -> bytes:
    """Serialize `(P, x, y) -> (loss(model(params), y), d loss / d P)` for CPU.

    P: the flat leaves of `params` (`compute.flatten_params` order); x, y: one worker's
    shard (shapes of x_spec / y_spec). The gradient is of the shard's mean loss, unscaled:
    the server sums the workers' gradients in worker order and divides by their number,
    exactly what a single process does with microbatches = workers.
    """
    treedef = params_treedef(list(params))
    p_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in flatten_params(list(params))]

    def grad_fn(P: list, x, y):
        def shard_loss(P_):
            return loss(model.apply(jax.tree_util.tree_unflatten(treedef, P_), x), y)

        value, grads = jax.value_and_grad(shard_loss)(P)
        return value, list(grads)

    exp = jax_export.export(jax.jit(grad_fn), platforms=("cpu",))(p_specs, x_spec, y_spec)
    return bytes(exp.serialize())


class GradProgram:
    """A checked, compiled gradient program on a worker.

    `load` raises ProgramRejected unless the blob passes `check_program` and has exactly the
    signature ([n_params arrays], x, y) -> (scalar loss, [n_params arrays shaped like the
    params]). `__call__` checks each input's shape and dtype before running.
    """

    def __init__(self, exp: jax_export.Exported, n_params: int) -> None:
        self._n_params = n_params
        self._in_avals = list(exp.in_avals)
        compiled_args = jax.tree_util.tree_unflatten(
            exp.in_tree, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exp.in_avals])[0]
        try:
            self._fn = jax.jit(exp.call).lower(*compiled_args).compile()
        except Exception as exc:
            raise ProgramRejected(f"gradient program does not compile here ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def load(cls, blob: bytes, n_params: int, limits: ProgramLimits) -> "GradProgram":
        exp = check_program("ps_grad", blob, limits)
        expected_in = ([object()] * n_params, object(), object())
        expected_tree = jax.tree_util.tree_structure(((expected_in), {}))
        if exp.in_tree != expected_tree:
            raise ProgramRejected(f"program 'ps_grad': inputs are {exp.in_tree}, expected {expected_tree}")
        expected_out = jax.tree_util.tree_structure((object(), [object()] * n_params))
        if exp.out_tree != expected_out:
            raise ProgramRejected(f"program 'ps_grad': outputs are {exp.out_tree}, expected {expected_out}")
        params_in, grads_out = exp.in_avals[:n_params], exp.out_avals[1:]
        if exp.out_avals[0].shape != () or [(a.shape, a.dtype) for a in params_in] != [
                (a.shape, a.dtype) for a in grads_out]:
            raise ProgramRejected("program 'ps_grad': must return a scalar loss and one gradient per parameter")
        return cls(exp, n_params)

    def __call__(self, arrays: Sequence[np.ndarray]) -> tuple[float, list[np.ndarray]]:
        """arrays: n_params param leaves, x, y (a ps_step's arrays). Returns (loss, grads)."""
        if len(arrays) != self._n_params + 2:
            raise ValueError(f"expected {self._n_params + 2} arrays, got {len(arrays)}")
        for i, (a, aval) in enumerate(zip(arrays, self._in_avals)):
            if tuple(a.shape) != tuple(aval.shape) or a.dtype != np.dtype(aval.dtype):
                raise ValueError(f"array {i}: expected {aval.dtype}{list(aval.shape)}, got {a.dtype}{list(a.shape)}")
        params = list(arrays[: self._n_params])
        value, grads = self._fn(params, arrays[-2], arrays[-1])
        return float(value), [np.asarray(g) for g in grads]


def shard_specs(x: np.ndarray, y: np.ndarray, workers: int) -> tuple[Any, Any]:
    """The ShapeDtypeStructs of one worker's shard of a batch (x, y)."""
    if len(x) % workers or len(y) != len(x):
        raise ValueError(f"batch of {len(x)} samples does not split into {workers} equal shards")
    n = len(x) // workers
    return (jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype), jax.ShapeDtypeStruct((n, *y.shape[1:]), y.dtype))
