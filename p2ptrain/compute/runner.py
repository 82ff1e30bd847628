"""Peer side: run one stage from a ``StageBundle`` and flat arrays.

Imports no code of the submitter: only jax, numpy and the deserialized programs, each checked
by ``limits.check_program`` and against the signatures in ``programs`` before anything runs.

Per-step protocol (M = bundle.microbatches, micro-batch indices 0..M-1):
- non-last stage: ``forward(mb, x)`` then, later, ``backward(mb, gy)`` for every mb;
- last stage: ``last(mb, x, y)`` for every mb;
- then ``apply_update()`` once: the M micro-batch gradients summed in index order, one
  optimizer update.
Gradients are folded into a running sum as soon as every lower index has arrived, so arrival
order does not change the numbers and in-order arrival stores one gradient, not M.
Calling ``forward(mb, ...)`` again before ``backward(mb)`` replaces the stored input (replay).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from p2ptrain.compute.bundle import StageBundle
from p2ptrain.compute.limits import ProgramLimits, ProgramRejected, check_program
from p2ptrain.compute.programs import required_programs, split_groups

__all__ = ["StageRunner", "StageStateError"]


class StageStateError(RuntimeError):
    """A call out of protocol order: backward without forward, a duplicate or missing
    micro-batch gradient at ``apply_update``."""


# Compiled programs by content, shared by runners in this process: a peer reloading the same
# stage after a re-plan, or the many simulated peers of one process running the same stage,
# compile each program once. Keyed by the SHA-256 of the serialized bytes (and the device),
# so a different program can never hit; every load still runs check_program first.
_COMPILED_CACHE_ENTRIES = 64
_compiled: OrderedDict[tuple[bytes, str], Any] = OrderedDict()


def _compile(blob: bytes, exp: Any, device: jax.Device) -> Any:
    """Ahead-of-time compile ``exp`` for ``device``: load pays the compile time (seconds on a
    slow peer), so no micro-batch ever does, and a program XLA cannot compile fails at load."""
    key = (hashlib.sha256(blob).digest(), str(device))
    fn = _compiled.pop(key, None)
    if fn is None:
        sharding = jax.sharding.SingleDeviceSharding(device)
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                 for a in exp.in_avals]
        args, kwargs = jax.tree_util.tree_unflatten(exp.in_tree, specs)
        try:
            fn = jax.jit(exp.call).lower(*args, **kwargs).compile()
        except Exception as e:
            raise ProgramRejected(f"program does not compile here ({type(e).__name__}: {e})") \
                from e
    _compiled[key] = fn  # most recently used last
    while len(_compiled) > _COMPILED_CACHE_ENTRIES:
        _compiled.popitem(last=False)
    return fn


@jax.jit
def _add_trees(a: list, b: list) -> list:
    return [x + y for x, y in zip(a, b)]


def _zeros_program(exp: Any) -> Any:
    """Shape-only mode: a stand-in for ``exp`` that returns zeros of its output avals and does
    no arithmetic (the simulator charges compute as modelled time instead)."""
    outputs = jax.tree_util.tree_unflatten(
        exp.out_tree, [np.zeros(a.shape, np.dtype(a.dtype)) for a in exp.out_avals])
    return lambda *args: outputs


def _aval_str(a: Any) -> str:
    return f"{np.dtype(a.dtype).name}{list(a.shape)}"


def _same_avals(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(
        tuple(x.shape) == tuple(y.shape) and np.dtype(x.dtype) == np.dtype(y.dtype)
        for x, y in zip(a, b)
    )


def _check_leaves(what: str, leaves: Sequence[Any], avals: Sequence[Any]) -> list[np.ndarray]:
    """Check arrays against expected avals exactly (count, shape, dtype; no casting)."""
    if not isinstance(leaves, (list, tuple)):
        raise ValueError(f"{what}: expected a list of arrays, got {type(leaves).__name__}")
    if len(leaves) != len(avals):
        raise ValueError(f"{what}: expected {len(avals)} leaves, got {len(leaves)}")
    out = []
    for i, (leaf, aval) in enumerate(zip(leaves, avals)):
        arr = np.asarray(leaf)
        if tuple(arr.shape) != tuple(aval.shape) or arr.dtype != np.dtype(aval.dtype):
            raise ValueError(
                f"{what} leaf {i}: expected {_aval_str(aval)}, got {_aval_str(arr)}"
            )
        out.append(arr)
    return out


def _put(a: np.ndarray, device: jax.Device | None) -> Any:
    """``a`` on ``device``; as it is in shape-only mode (no device)."""
    return a if device is None else jax.device_put(a, device)


def _pick_device(platforms: Sequence[str]) -> jax.Device:
    for platform in platforms:
        try:
            return jax.devices(platform)[0]
        except RuntimeError:
            continue
    raise ProgramRejected(f"programs were exported for {list(platforms)}, none available here")


class StageRunner:
    """Runs one pipeline stage. Build with ``StageRunner.load``."""

    def __init__(self, *, bundle: StageBundle, fns: dict, device: jax.Device | None,
                 params: list, opt_state: list, sig: dict):
        self._bundle = bundle
        self._fns = fns
        self._device = device
        self._params = params
        self._opt_state = opt_state
        self._sig = sig
        self.reset_step()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        bundle: StageBundle,
        params_leaves: list[np.ndarray],
        opt_state_leaves: list[np.ndarray] | None = None,
        limits: ProgramLimits = ProgramLimits(),
        *,
        shape_only: bool = False,
    ) -> "StageRunner":
        """Check everything, then build the runner.

        With ``shape_only`` (simulation at scale) every check still runs, but nothing is
        compiled or computed: each program returns zeros of its output shapes, so the runner
        sends and checks arrays of the true shapes and dtypes at no arithmetic cost.

        Raises ``ProgramRejected`` for a bad bundle or program (allow-list, sizes, signature,
        inconsistent programs) and ``ValueError`` for params/opt-state leaves that do not
        match the programs (count, shape, dtype). Runs nothing before all checks pass; then
        compiles every program ahead of time (cached by content, see ``_compile``) and, with
        ``opt_state_leaves=None``, runs the exported ``init_opt``.
        """
        if not isinstance(bundle, StageBundle):
            raise ProgramRejected(f"expected a StageBundle, got {type(bundle).__name__}")
        # Re-validate the plain fields even for a locally built bundle: same checks, one path.
        bundle = StageBundle.from_wire(bundle.to_wire())
        if set(bundle.programs) != required_programs(bundle.is_last):
            raise ProgramRejected(f"unexpected program set {sorted(bundle.programs)}")
        exps = {name: check_program(name, blob, limits)
                for name, blob in sorted(bundle.programs.items())}
        sig = cls._check_signatures(exps, bundle)

        params = _check_leaves("params", params_leaves, sig["params"])
        opt = None if opt_state_leaves is None else \
            _check_leaves("opt_state", opt_state_leaves, sig["opt_state"])
        if shape_only:
            device = None
            fns = {name: _zeros_program(exp) for name, exp in exps.items()}
        else:
            device = _pick_device(exps["update"].platforms)
            fns = {name: _compile(bundle.programs[name], exp, device)
                   for name, exp in sorted(exps.items())}
        params_dev = [_put(p, device) for p in params]
        opt_dev = list(fns["init_opt"](params_dev)) if opt is None else [_put(o, device) for o in opt]
        return cls(bundle=bundle, fns=fns, device=device, params=params_dev,
                   opt_state=opt_dev, sig=sig)

    @staticmethod
    def _check_signatures(exps: dict, bundle: StageBundle) -> dict:
        """Check each program's in/out trees against its template and the programs against
        each other; return the avals the runner validates arrays with."""
        kr = bundle.keep_residuals
        g = {name: split_groups(name, exp, kr) for name, exp in exps.items()}
        platforms = {tuple(exp.platforms) for exp in exps.values()}
        if len(platforms) != 1:
            raise ProgramRejected(f"programs disagree on platforms: {sorted(platforms)}")

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ProgramRejected(f"inconsistent stage programs: {what}")

        (p_init,), o_init = g["init_opt"]
        (p_upd, o_upd, g_upd), (p_new, o_new) = g["update"]
        params = p_upd
        need(_same_avals(p_init, params), "init_opt params != update params")
        need(_same_avals(g_upd, params), "update grads != update params")
        need(_same_avals(p_new, params), "update output params != input params")
        need(_same_avals(o_init, o_upd) and _same_avals(o_new, o_upd),
             "optimizer state avals differ between init_opt and update")
        sig: dict[str, Any] = {"params": params, "opt_state": o_upd}
        if bundle.is_last:
            (p_l, x, y), (loss, g_l, gx) = g["last"]
            need(_same_avals(p_l, params), "last params != update params")
            need(tuple(loss.shape) == () and np.issubdtype(np.dtype(loss.dtype), np.floating),
                 "last must return a float scalar loss")
            need(_same_avals(g_l, params), "last param grads != params")
            sig.update(x=x, y=y, out=None)
        else:
            (p_f, x), f_out = g["forward"]
            need(_same_avals(p_f, params), "forward params != update params")
            (p_b, x_or_r, gy), (g_b, gx) = g["backward"]
            need(_same_avals(p_b, params), "backward params != update params")
            need(_same_avals(g_b, params), "backward param grads != params")
            if kr:
                out, r = f_out
                need(_same_avals(x_or_r, r), "backward residuals != forward residuals")
            else:
                out = f_out
                need(_same_avals([x_or_r], [x]), "backward x != forward x")
            need(_same_avals([gy], [out]), "backward gy != forward output")
            sig.update(x=x, y=None, out=out)
        need(len(gx) == 0 or _same_avals(gx, [sig["x"]]), "input grad aval != input aval")
        need(len(tuple(sig["x"].shape)) >= 1, "stage input needs a micro-batch axis")
        sig["returns_input_grad"] = len(gx) == 1
        return sig

    # ------------------------------------------------------------------ shapes

    @property
    def microbatches(self) -> int:
        return self._bundle.microbatches

    @property
    def is_last(self) -> bool:
        return self._bundle.is_last

    @property
    def keep_residuals(self) -> bool:
        return self._bundle.keep_residuals

    @property
    def returns_input_grad(self) -> bool:
        """False for a first stage exported without the (unused) input gradient: then
        ``backward``/``last`` return None in its place."""
        return self._sig["returns_input_grad"]

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one micro-batch of stage input (x; also of the returned input grad)."""
        return tuple(self._sig["x"].shape)

    @property
    def in_dtype(self) -> np.dtype:
        return np.dtype(self._sig["x"].dtype)

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        """Shape of forward's output and of backward's gy; None for the last stage."""
        out = self._sig["out"]
        return None if out is None else tuple(out.shape)

    @property
    def out_dtype(self) -> np.dtype | None:
        out = self._sig["out"]
        return None if out is None else np.dtype(out.dtype)

    @property
    def target_shape(self) -> tuple[int, ...] | None:
        """Shape of one micro-batch of targets y (last stage only, else None)."""
        y = self._sig["y"]
        return None if y is None else tuple(y.shape)

    @property
    def target_dtype(self) -> np.dtype | None:
        y = self._sig["y"]
        return None if y is None else np.dtype(y.dtype)

    # ------------------------------------------------------------------ per-step state

    def reset_step(self) -> None:
        """Drop all per-step state (stored inputs/residuals and gradients) without updating."""
        self._stash: dict[int, Any] = {}
        self._pending: dict[int, list] = {}  # gradients that arrived ahead of their turn
        self._acc: list | None = None  # sum of gradients 0..next_mb-1, in index order
        self._next_mb = 0
        self._shared: dict[int, list] = {}  # this step's own gradients, for replicas (share_grads)

    @property
    def completed_microbatches(self) -> tuple[int, ...]:
        """Micro-batch indices whose parameter gradients this step holds."""
        return tuple(range(self._next_mb)) + tuple(sorted(self._pending))

    def _check_mb(self, mb: Any) -> int:
        if isinstance(mb, bool) or not isinstance(mb, (int, np.integer)):
            raise ValueError(f"micro-batch index must be an int, got {type(mb).__name__}")
        mb = int(mb)
        if not (0 <= mb < self.microbatches):
            raise ValueError(f"micro-batch index {mb} not in [0, {self.microbatches})")
        return mb

    def _check_no_grad(self, mb: int) -> None:
        if mb < self._next_mb or mb in self._pending:
            raise StageStateError(f"duplicate gradient for micro-batch {mb} in this step")

    def _store_grad(self, mb: int, grads: list, *, own: bool = True) -> None:
        self._check_no_grad(mb)
        if own and self.share_grads:
            self._shared[mb] = grads
        self._pending[mb] = grads
        while self._next_mb in self._pending:
            g = self._pending.pop(self._next_mb)
            if self._acc is None:
                self._acc = g
            elif self._device is not None:   # shape-only: zeros stay zeros
                self._acc = _add_trees(self._acc, g)
            self._next_mb += 1

    def _array(self, what: str, a: Any, aval: Any) -> jax.Array:
        arr = np.asarray(a)
        if tuple(arr.shape) != tuple(aval.shape) or arr.dtype != np.dtype(aval.dtype):
            raise ValueError(f"{what}: expected {_aval_str(aval)}, got {_aval_str(arr)}")
        return _put(arr, self._device)

    # ------------------------------------------------------------------ compute

    def forward(self, mb: int, x: np.ndarray) -> np.ndarray:
        """Non-last stages: the stage output for micro-batch ``mb``; keeps what
        ``backward(mb)`` needs (x, or the residuals with keep_residuals)."""
        if self.is_last:
            raise StageStateError("the last stage runs last(mb, x, y), not forward")
        mb = self._check_mb(mb)
        x_dev = self._array("forward x", x, self._sig["x"])
        if self.keep_residuals:
            y, residuals = self._fns["forward"](self._params, x_dev)
            self._stash[mb] = list(residuals)
        else:
            y = self._fns["forward"](self._params, x_dev)
            self._stash[mb] = x_dev
        return np.asarray(y)

    def backward(self, mb: int, gy: np.ndarray) -> np.ndarray | None:
        """Non-last stages: gradient wrt the stage input for ``mb`` (None when the stage
        was exported without it, see ``returns_input_grad``); stores the param grads."""
        if self.is_last:
            raise StageStateError("the last stage runs last(mb, x, y), not backward")
        mb = self._check_mb(mb)
        gy_dev = self._array("backward gy", gy, self._sig["out"])
        self._check_no_grad(mb)
        if mb not in self._stash:
            raise StageStateError(f"backward({mb}) without a preceding forward({mb})")
        saved = self._stash.pop(mb)
        grads, gx = self._fns["backward"](self._params, saved, gy_dev)
        self._store_grad(mb, list(grads))
        return np.asarray(gx[0]) if gx else None

    def last(self, mb: int, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        """Last stage: (loss of micro-batch ``mb``, gradient wrt x or None); stores the param
        grads (of loss / M)."""
        if not self.is_last:
            raise StageStateError("only the last stage runs last(); use forward/backward")
        mb = self._check_mb(mb)
        x_dev = self._array("last x", x, self._sig["x"])
        y_dev = self._array("last y", y, self._sig["y"])
        self._check_no_grad(mb)
        loss, grads, gx = self._fns["last"](self._params, x_dev, y_dev)
        self._store_grad(mb, list(grads))
        return float(loss), (np.asarray(gx[0]) if gx else None)

    # ------------------------------------------------------------------ replicas

    # A stage served by several replica peers: each computes its share of the micro-batches,
    # sends those gradients to the others (`take_shared_grads`) and stores theirs
    # (`add_grads`); every replica then sums all M in index order and applies the same
    # update, so their parameters stay bit-identical.
    share_grads: bool = False

    def take_shared_grads(self) -> dict[int, list[np.ndarray]]:
        """Param grads of the micro-batches computed here since the last call, by index
        (empty unless ``share_grads``)."""
        taken = {mb: [np.asarray(g) for g in grads] for mb, grads in sorted(self._shared.items())}
        self._shared.clear()
        return taken

    def add_grads(self, mb: int, leaves: Sequence[np.ndarray]) -> None:
        """Store another replica's param grads of micro-batch ``mb`` (checked like params)."""
        mb = self._check_mb(mb)
        arrays = _check_leaves("grads", leaves, self._sig["params"])
        self._store_grad(mb, [_put(a, self._device) for a in arrays], own=False)

    def apply_update(self) -> None:
        """Apply the step: the micro-batch gradients summed in index order 0..M-1, then one
        optimizer update; clears per-step state. Raises ``StageStateError`` if any
        micro-batch gradient is missing (state is kept, so the missing ones can still come)."""
        if self._next_mb != self.microbatches:
            missing = [i for i in range(self._next_mb, self.microbatches)
                       if i not in self._pending]
            raise StageStateError(
                f"apply_update: missing gradients of micro-batches {missing} "
                f"(have {list(self.completed_microbatches)} of {self.microbatches})"
            )
        params, opt_state = self._fns["update"](self._params, self._opt_state, self._acc)
        self._params, self._opt_state = list(params), list(opt_state)
        self.reset_step()

    # ------------------------------------------------------------------ state out

    @property
    def param_leaf_count(self) -> int:
        return len(self._params)

    def params_leaves(self) -> list[np.ndarray]:
        return [np.asarray(p) for p in self._params]

    def opt_state_leaves(self) -> list[np.ndarray]:
        return [np.asarray(o) for o in self._opt_state]

