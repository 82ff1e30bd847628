"""Driver side: turn a slice of a ``Sequential`` into serialized stage programs.

``export_stage`` builds the programs listed in ``p2ptrain.compute.programs``, exports them
with ``jax.export`` for CPU and packs them in a ``StageBundle``. The peer sees only flat lists
of arrays; the driver keeps the pytree structure (``params_treedef``/``unflatten_params``).

Residuals, the memory/compute trade-off (choose per stage, by memory):
- ``keep_residuals=False``: forward keeps only the stage input x per in-flight micro-batch;
  backward re-runs the forward inside the vjp. Least memory (``x`` bytes per sample), but
  each backward pays a second forward (a transformer block's fwd+bwd went 139 -> 227 ms).
- ``keep_residuals=True``: forward also returns the vjp residuals (the leaves of the pytree
  ``jax.vjp`` returns), which the peer keeps until backward; backward is the pure backward
  pass. Costs ``residual_bytes_per_sample`` per in-flight sample instead.
Both compute the same numbers (same ops, same order); only what is stored differs.
Only residuals that depend on x are stored: those that are parameters come from the params
backward receives anyway, and x-independent ones (e.g. the broadcast zeros in relu's
derivative) are recomputed in backward at no per-sample cost. A Dense(16)+relu first stage
kept 104 bytes/sample of residuals before this pruning and 40 after.

Optimizer: the exported update applies ``optimizer`` to each layer's params separately, with
one optimizer state per layer. For elementwise optimizers (sgd, momentum, adam, adamw, rmsprop,
...) this is exactly the update of the whole model; and it makes the state independent of how
the model is cut into stages, so re-planning can move layers with their state, and a plan
change never changes the numbers. Optimizers coupling parameters across layers (global-norm
clipping) would see one layer at a time; they cannot be exact in a pipeline without an extra
all-stage reduction anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
from jax import export as jax_export

from p2ptrain.compute.bundle import MAX_MICROBATCHES, StageBundle
from p2ptrain.compute.model import Sequential

__all__ = [
    "export_stage",
    "flatten_params",
    "params_treedef",
    "unflatten_params",
    "param_leaf_counts",
    "opt_state_leaf_counts",
    "residual_bytes_per_sample",
]


# ---------------------------------------------------------------------------------------
# Params <-> flat leaves


def _canonical_dtype(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        dtype = np.asarray(leaf).dtype
    # x64 stays disabled: jax would run float64 params as float32, so ship them as such.
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def flatten_params(stage_params: Any) -> list[np.ndarray]:
    """Leaves of a params pytree (e.g. a stage's list of per-layer params), as numpy arrays.

    Order is ``jax.tree_util`` order (dict keys sorted), the order every stage program uses.
    """
    return [
        np.asarray(leaf, dtype=_canonical_dtype(leaf))
        for leaf in jax.tree_util.tree_leaves(stage_params)
    ]


def params_treedef(stage_params: Any) -> jax.tree_util.PyTreeDef:
    """The structure ``unflatten_params`` needs; the driver keeps it, peers never see it."""
    return jax.tree_util.tree_structure(stage_params)


def unflatten_params(like: Any, leaves: Sequence[Any]) -> Any:
    """Inverse of ``flatten_params``. ``like``: a params pytree of the same structure, or its
    treedef (``params_treedef``)."""
    treedef = like if isinstance(like, jax.tree_util.PyTreeDef) else params_treedef(like)
    leaves = list(leaves)
    if len(leaves) != treedef.num_leaves:
        raise ValueError(f"expected {treedef.num_leaves} leaves, got {len(leaves)}")
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])


def param_leaf_counts(stage_params: Sequence[Any]) -> list[int]:
    """Number of flat leaves of each layer's params: split a stage's leaves by layer."""
    return [len(jax.tree_util.tree_leaves(p)) for p in stage_params]


def opt_state_leaf_counts(
    optimizer: optax.GradientTransformation, stage_params: Sequence[Any]
) -> list[int]:
    """Number of flat optimizer-state leaves of each layer (state is per layer, see module
    docstring), so the driver can split a stage's ``opt_state_leaves`` by layer."""
    specs = _specs(list(stage_params))
    return [
        len(jax.tree_util.tree_leaves(jax.eval_shape(optimizer.init, p))) for p in specs
    ]


def _spec(leaf: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(np.shape(leaf)), _canonical_dtype(leaf))


def _specs(tree: Any) -> Any:
    return jax.tree_util.tree_map(_spec, tree)


# ---------------------------------------------------------------------------------------
# Building blocks of the stage programs


def _stage_fn(model: Sequential, start: int, stop: int, treedef) -> Callable:
    def f(P: list, x):
        return model.apply_range(jax.tree_util.tree_unflatten(treedef, P), x, start, stop)

    return f


def _vjp(f: Callable, P: list, x, need_gx: bool):
    """``jax.vjp`` of the stage wrt params (and x when ``need_gx``); returns (y, vjp_fn)."""
    if need_gx:
        return jax.vjp(f, P, x)
    # First stage: no input gradient needed, so do not differentiate wrt x at all.
    return jax.vjp(lambda P_: f(P_, x), P)


def _grads(cts: tuple, need_gx: bool) -> tuple[list, list]:
    if need_gx:
        g_params, gx = cts
        return list(g_params), [gx]
    (g_params,) = cts
    return list(g_params), []


class _ResidualLayout:
    """How to rebuild the vjp pytree from (params, residual outputs).

    Filled while tracing the residual-mode forward: the vjp's leaves that *are* parameter
    tracers are taken from the params input in backward; the others (deduplicated by
    identity) become forward outputs.
    """

    def __init__(self):
        self.treedef = None
        self.slots: list[tuple[str, int]] = []

    def split(self, P: list, vjp_fn) -> list:
        leaves, treedef = jax.tree_util.tree_flatten(vjp_fn)
        slots: list[tuple[str, int]] = []
        residuals: list = []
        for leaf in leaves:
            k = next((i for i, p in enumerate(P) if leaf is p), None)
            if k is not None:
                slots.append(("p", k))
                continue
            j = next((i for i, r in enumerate(residuals) if leaf is r), None)
            if j is None:
                residuals.append(leaf)
                j = len(residuals) - 1
            slots.append(("r", j))
        self.treedef, self.slots = treedef, slots
        return residuals

    def join(self, P: list, R: list):
        leaves = [P[k] if kind == "p" else R[k] for kind, k in self.slots]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _x_dependent_outputs(fn: Callable, p_specs: list, x_spec) -> list[bool]:
    """For each flat output of ``fn(P, x)``: whether it depends on ``x``.

    Conservative (an equation's outputs all depend on x if any of its inputs does), so a
    False is certain: that output is a function of the params and constants only.
    """
    jaxpr = jax.make_jaxpr(fn)(p_specs, x_spec).jaxpr
    dep = set(jaxpr.invars[len(p_specs):])
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, jax.extend.core.Literal) and v in dep for v in eqn.invars):
            dep.update(eqn.outvars)
    return [not isinstance(v, jax.extend.core.Literal) and v in dep for v in jaxpr.outvars]


def _residual_programs(f: Callable, need_gx: bool, p_specs: list, x_spec):
    """The keep_residuals forward/backward pair.

    forward(P, x) -> (y, R): R are the vjp residuals that depend on x, the only ones worth
    storing per micro-batch. Residuals that are parameters come from P in backward; the rest
    (x-independent: broadcast zeros in relu's derivative, transformed weights) are recomputed
    in backward by evaluating the residual forward on a zero x, of which XLA keeps only the
    x-independent part (dead-code elimination), so nothing per-sample is recomputed.
    backward(P, R, gy) -> (G, GX).
    """
    layout = _ResidualLayout()

    def forward_all(P: list, x):
        y, vjp_fn = _vjp(f, P, x, need_gx)
        return y, layout.split(P, vjp_fn)

    keep = _x_dependent_outputs(forward_all, p_specs, x_spec)[1:]  # outputs: y, then R

    def forward(P: list, x):
        y, residuals = forward_all(P, x)
        return y, [r for r, k in zip(residuals, keep) if k]

    def backward(P: list, R: list, gy):
        # Re-tracing forward_all also refreshes `layout` for this trace (same structure).
        _, recomputed = forward_all(P, jnp.zeros(x_spec.shape, x_spec.dtype))
        kept = iter(R)
        residuals = [next(kept) if k else r for r, k in zip(recomputed, keep)]
        return _grads(layout.join(P, residuals)(gy), need_gx)

    return forward, backward


def _export(fn: Callable, args: tuple, platforms: Sequence[str]) -> bytes:
    exp = jax_export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
    return exp.serialize()


def _check_spec(name: str, spec: Any) -> jax.ShapeDtypeStruct:
    if spec is None or not hasattr(spec, "shape") or not hasattr(spec, "dtype"):
        raise TypeError(f"{name} must be a jax.ShapeDtypeStruct, got {spec!r:.80}")
    if len(spec.shape) == 0:
        raise ValueError(f"{name} must have a leading micro-batch axis, got shape ()")
    return jax.ShapeDtypeStruct(tuple(int(d) for d in spec.shape),
                                np.dtype(jax.dtypes.canonicalize_dtype(spec.dtype)))


# ---------------------------------------------------------------------------------------
# export_stage


def export_stage(
    model: Sequential,
    start: int,
    stop: int,
    stage_params: list,
    *,
    x_spec: jax.ShapeDtypeStruct,
    y_spec: jax.ShapeDtypeStruct | None,
    loss: Callable | None,
    optimizer: optax.GradientTransformation,
    microbatches: int,
    is_last: bool,
    keep_residuals: bool,
    need_input_grad: bool | None = None,
    platforms: Sequence[str] = ("cpu",),
) -> StageBundle:
    """Export layers ``[start, stop)`` of ``model`` as a ``StageBundle``.

    stage_params: ``params[start:stop]`` (one pytree per layer); only shapes/dtypes are used.
    x_spec: the stage input of ONE micro-batch. y_spec: targets of one micro-batch (last
        stage only). loss: ``(outputs, y) -> scalar mean`` (last stage only).
    microbatches: M; the last stage seeds its vjp with 1/M, so the sum of the M micro-batch
        gradients is the gradient of the step loss (mean of micro-batch losses).
    is_last: must equal ``stop == len(model)``.
    need_input_grad: whether backward/last return the gradient wrt x; default
        ``start != 0`` (the first stage's input gradient is never used, so skip computing it).
    platforms: jax.export lowering platforms.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a Sequential, got {type(model).__name__}")
    if not (0 <= start < stop <= len(model)):
        raise ValueError(f"bad stage range [{start}, {stop}) for {len(model)} layers")
    if bool(is_last) != (stop == len(model)):
        raise ValueError(
            f"is_last={is_last} but stage [{start}, {stop}) of {len(model)} layers "
            f"{'ends' if stop == len(model) else 'does not end'} the model"
        )
    if len(stage_params) != stop - start:
        raise ValueError(f"stage [{start}, {stop}) needs {stop - start} params entries, "
                         f"got {len(stage_params)}")
    if type(microbatches) is not int or not (1 <= microbatches <= MAX_MICROBATCHES):
        raise ValueError(f"microbatches must be an int in [1, {MAX_MICROBATCHES}]")
    x_spec = _check_spec("x_spec", x_spec)
    need_gx = (start != 0) if need_input_grad is None else bool(need_input_grad)
    if need_gx and not jnp.issubdtype(x_spec.dtype, jnp.inexact):
        raise ValueError(f"an input gradient needs a float stage input, x_spec is {x_spec.dtype}")
    if is_last:
        y_spec = _check_spec("y_spec", y_spec)
        if not callable(loss):
            raise TypeError("the last stage needs a loss function (outputs, y) -> scalar")

    stage_params = list(stage_params)
    treedef = params_treedef(stage_params)
    p_specs = [_spec(leaf) for leaf in jax.tree_util.tree_leaves(stage_params)]
    layer_specs = jax.tree_util.tree_unflatten(treedef, p_specs)
    f = _stage_fn(model, start, stop, treedef)
    programs: dict[str, bytes] = {}

    # Optimizer: one state per layer (see module docstring).
    opt_specs = [jax.eval_shape(optimizer.init, p) for p in layer_specs]
    opt_treedef = jax.tree_util.tree_structure(opt_specs)
    o_specs = jax.tree_util.tree_leaves(opt_specs)

    def init_opt(P: list) -> list:
        layers = jax.tree_util.tree_unflatten(treedef, P)
        return jax.tree_util.tree_leaves([optimizer.init(p) for p in layers])

    def update(P: list, O: list, G: list) -> tuple[list, list]:
        layers = jax.tree_util.tree_unflatten(treedef, P)
        grads = jax.tree_util.tree_unflatten(treedef, G)
        states = jax.tree_util.tree_unflatten(opt_treedef, O)
        new_layers, new_states = [], []
        for p, g, s in zip(layers, grads, states):
            upd, s = optimizer.update(g, s, p)
            new_layers.append(optax.apply_updates(p, upd))
            new_states.append(s)
        if jax.tree_util.tree_structure(new_states) != opt_treedef:
            raise ValueError("optimizer.update changed the structure of its state")
        return jax.tree_util.tree_leaves(new_layers), jax.tree_util.tree_leaves(new_states)

    programs["init_opt"] = _export(init_opt, (p_specs,), platforms)
    programs["update"] = _export(update, (p_specs, o_specs, p_specs), platforms)

    if is_last:
        seed = 1.0 / microbatches

        def last(P: list, x, y):
            def stage_loss(P_, x_):
                return loss(f(P_, x_), y)

            value, vjp_fn = _vjp(stage_loss, P, x, need_gx)
            if value.shape != ():
                raise ValueError(f"loss must return a scalar mean, got shape {value.shape}")
            g_params, gx = _grads(vjp_fn(jnp.asarray(seed, value.dtype)), need_gx)
            return value, g_params, gx

        programs["last"] = _export(last, (p_specs, x_spec, y_spec), platforms)
    else:
        y_out = jax.eval_shape(f, p_specs, x_spec)
        if not hasattr(y_out, "shape"):
            raise TypeError("a non-last stage must output a single array")
        gy_spec = jax.ShapeDtypeStruct(y_out.shape, y_out.dtype)
        if keep_residuals:
            forward, backward_res = _residual_programs(f, need_gx, p_specs, x_spec)
            exp_fwd = jax_export.export(jax.jit(forward), platforms=tuple(platforms))(
                p_specs, x_spec)
            programs["forward"] = exp_fwd.serialize()
            _, r_avals = jax.tree_util.tree_unflatten(exp_fwd.out_tree, exp_fwd.out_avals)
            r_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in r_avals]
            programs["backward"] = _export(backward_res, (p_specs, r_specs, gy_spec),
                                           platforms)
        else:
            programs["forward"] = _export(f, (p_specs, x_spec), platforms)

            def backward(P: list, x, gy):
                _, vjp_fn = _vjp(f, P, x, need_gx)
                return _grads(vjp_fn(gy), need_gx)

            programs["backward"] = _export(backward, (p_specs, x_spec, gy_spec), platforms)

    return StageBundle(programs=programs, is_last=bool(is_last),
                       keep_residuals=bool(keep_residuals), microbatches=microbatches)


def residual_bytes_per_sample(
    model: Sequential,
    start: int,
    stop: int,
    stage_params: list,
    x_spec: jax.ShapeDtypeStruct,
    *,
    need_input_grad: bool | None = None,
) -> int:
    """Bytes a peer keeps per in-flight sample between forward and backward when
    ``keep_residuals=True`` (parameters excluded: they are not copied per micro-batch).

    With ``keep_residuals=False`` it keeps only x: ``x_spec`` bytes / batch. Compare the two
    against the peer's memory to choose the mode per stage. Measured on ``x_spec``'s batch and
    divided by its size (rounded up).
    """
    x_spec = _check_spec("x_spec", x_spec)
    need_gx = (start != 0) if need_input_grad is None else bool(need_input_grad)
    treedef = params_treedef(list(stage_params))
    p_specs = [_spec(leaf) for leaf in jax.tree_util.tree_leaves(list(stage_params))]
    forward, _ = _residual_programs(_stage_fn(model, start, stop, treedef), need_gx,
                                    p_specs, x_spec)
    _, r_specs = jax.eval_shape(forward, p_specs, x_spec)
    total_bytes = sum(int(np.prod(r.shape)) * np.dtype(r.dtype).itemsize for r in r_specs)
    batch = x_spec.shape[0]
    return -(-total_bytes // batch)
