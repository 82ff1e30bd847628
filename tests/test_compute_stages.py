"""Stage programs against a single-process jax/optax reference (DESIGN.md section 3).

The reference is written here, independently of p2ptrain.compute: per step, the gradient of
the mean micro-batch loss of the whole model, one optax update on the whole params list.
The pipeline chains StageRunners over the exported programs, feeding backwards in reverse
micro-batch order so gradients arrive out of order.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p2ptrain import losses
from p2ptrain.compute import (
    Sequential,
    StageBundle,
    StageRunner,
    StageStateError,
    export_stage,
    flatten_params,
    opt_state_leaf_counts,
    residual_bytes_per_sample,
    unflatten_params,
)

M = 4
BATCH = 16
STEPS = 5
IN, CLASSES = 8, 5
TOL = 1e-5


def scaled_tanh(x):
    """A plain jax function layer (no params)."""
    return jnp.tanh(x) * 1.5


def make_model() -> Sequential:
    return Sequential([
        nn.Dense(24), nn.relu,            # 0, 1
        nn.Dense(24), scaled_tanh,        # 2, 3
        nn.Dense(16), nn.relu,            # 4, 5
        nn.Dense(CLASSES),                # 6
    ])


def batches(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((BATCH, IN)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
    return x, y


@functools.lru_cache(maxsize=None)
def initial_params():
    # jit: one compile instead of eager flax init op by op (3 s -> 0.3 s here).
    return jax.jit(make_model().init)(jax.random.PRNGKey(0), jnp.zeros((BATCH, IN), jnp.float32))


OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
}


@functools.lru_cache(maxsize=None)
def reference_run(opt_name: str):
    """Single-process jax/optax: grad of the mean micro-batch loss, one update per step."""
    model, opt = make_model(), OPTIMIZERS[opt_name]()
    params = initial_params()

    def step_loss(params, x, y):
        xs, ys = jnp.split(x, M), jnp.split(y, M)
        return jnp.mean(jnp.stack([
            losses.softmax_cross_entropy(model.apply(params, xi), yi) for xi, yi in zip(xs, ys)
        ]))

    @jax.jit
    def train_step(params, state, x, y):
        value, grads = jax.value_and_grad(step_loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    step_losses = []
    for t in range(STEPS):
        params, state, value = train_step(params, state, *batches(t))
        step_losses.append(float(value))
    return step_losses, params


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@functools.lru_cache(maxsize=None)
def export_pipeline(cuts, opt_name, keep_residuals) -> tuple[StageBundle, ...]:
    """One bundle per stage; cuts like (0, 2, 5, 7). Cached: a given configuration is exported
    once, so its programs are byte-identical across tests and hit the runner's compile cache
    (debug locations in the programs record the exporting call stack)."""
    model, params, opt = make_model(), initial_params(), OPTIMIZERS[opt_name]()
    mb = BATCH // M
    x = jnp.zeros((mb, IN), jnp.float32)
    bundles = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        is_last = b == len(model)
        bundle = export_stage(
            model, a, b, params[a:b],
            x_spec=spec(x.shape, x.dtype),
            y_spec=spec((mb,), jnp.int32) if is_last else None,
            loss=losses.softmax_cross_entropy if is_last else None,
            optimizer=opt, microbatches=M, is_last=is_last, keep_residuals=keep_residuals,
        )
        bundles.append(bundle)
        x = model.apply_range(params[a:b], x, a, b)
    return tuple(bundles)


def build_pipeline(cuts, opt_name, keep_residuals):
    """Load one StageRunner per stage from the initial params."""
    params = initial_params()
    runners = []
    for bundle, a, b in zip(export_pipeline(tuple(cuts), opt_name, keep_residuals),
                            cuts[:-1], cuts[1:]):
        # Everything crosses the "wire" as plain values.
        bundle = StageBundle.from_wire(bundle.to_wire())
        runners.append(StageRunner.load(bundle, flatten_params(params[a:b])))
    return runners


def run_step(runners, x, y):
    """One pipeline step: all forwards in order, backwards in reverse micro-batch order."""
    xs, ys = np.split(x, M), np.split(y, M)
    mb_losses = [None] * M
    acts = {}
    for mb in range(M):
        h = xs[mb]
        for r in runners[:-1]:
            h = r.forward(mb, h)
        acts[mb] = h
    for mb in reversed(range(M)):
        loss, g = runners[-1].last(mb, acts[mb], ys[mb])
        mb_losses[mb] = loss
        for r in reversed(runners[:-1]):
            g = r.backward(mb, g)
    for r in runners:
        r.apply_update()
    return float(np.mean(mb_losses))


def gather_params(runners, cuts):
    params = initial_params()
    out = []
    for r, (a, b) in zip(runners, zip(cuts[:-1], cuts[1:])):
        out.extend(unflatten_params(params[a:b], r.params_leaves()))
    return out


def max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda u, v: float(np.max(np.abs(np.asarray(u) - v))), a, b)
    return max(jax.tree_util.tree_leaves(diffs), default=0.0)


def train_pipeline(cuts, opt_name, keep_residuals):
    runners = build_pipeline(cuts, opt_name, keep_residuals)
    step_losses = [run_step(runners, *batches(t)) for t in range(STEPS)]
    return step_losses, gather_params(runners, cuts), runners


@functools.lru_cache(maxsize=None)
def pipeline_result(cuts, opt_name, keep_residuals):
    step_losses, params, _ = train_pipeline(list(cuts), opt_name, keep_residuals)
    return step_losses, params


# (optimizer, keep_residuals, stage cuts); (0, 4, 7) cuts right after the plain-function layer,
# whose params entry is {}.
CASES = [
    ("sgd_momentum", False, (0, 2, 5, 7)),
    ("sgd_momentum", True, (0, 4, 7)),
    ("adam", False, (0, 2, 5, 7)),
    ("adam", True, (0, 2, 5, 7)),
]


@pytest.mark.parametrize("opt_name,keep_residuals,cuts", CASES)
def test_pipeline_matches_reference(opt_name, keep_residuals, cuts):
    ref_losses, ref_params = reference_run(opt_name)
    step_losses, params = pipeline_result(cuts, opt_name, keep_residuals)
    assert np.max(np.abs(np.array(step_losses) - ref_losses)) <= TOL
    assert max_abs_diff(params, ref_params) <= TOL
    # Training moved the params (the comparison is not trivially of the initial values).
    assert max_abs_diff(params, initial_params()) > 1e-3


def test_residual_modes_give_identical_numbers():
    a_losses, a_params = pipeline_result((0, 2, 5, 7), "adam", False)
    b_losses, b_params = pipeline_result((0, 2, 5, 7), "adam", True)
    assert a_losses == b_losses
    assert max_abs_diff(a_params, b_params) == 0.0


def test_single_stage_first_and_last():
    ref_losses, ref_params = reference_run("adam")
    step_losses, params, runners = train_pipeline([0, 7], "adam", False)
    (runner,) = runners
    assert runner.is_last and not runner.returns_input_grad
    assert runner.out_shape is None and runner.target_shape == (BATCH // M,)
    assert np.max(np.abs(np.array(step_losses) - ref_losses)) <= TOL
    assert max_abs_diff(params, ref_params) <= TOL


def test_resume_from_leaves_matches_uninterrupted_run():
    """A stage moved to another peer mid-run (params + opt state leaves) continues exactly."""
    cuts = [0, 7]
    (r,) = build_pipeline(cuts, "adam", False)
    for t in range(2):
        run_step([r], *batches(t))
    (bundle,) = export_pipeline(tuple(cuts), "adam", False)
    moved = StageRunner.load(bundle, r.params_leaves(), r.opt_state_leaves())
    for t in range(2, STEPS):
        run_step([moved], *batches(t))
    _, ref_params = reference_run("adam")
    assert max_abs_diff(gather_params([moved], cuts), ref_params) <= TOL
    # Optimizer state is per layer, so the driver can split a stage's leaves by layer.
    counts = opt_state_leaf_counts(OPTIMIZERS["adam"](), initial_params())
    assert sum(counts) == len(moved.opt_state_leaves())


def test_first_stage_skips_input_grad_and_middle_returns_it():
    # Same programs as a CASES pipeline: the runner's compiled-program cache makes this cheap.
    r0, r1, r2 = build_pipeline([0, 2, 5, 7], "adam", True)
    assert not r0.returns_input_grad and r1.returns_input_grad and r2.returns_input_grad
    assert r0.in_shape == (BATCH // M, IN) and r0.out_shape == (BATCH // M, 24)
    assert r0.keep_residuals and r0.microbatches == M
    assert r1.in_dtype == np.float32 and r2.target_dtype == np.int32
    x, y = batches(0)
    h0 = r0.forward(0, x[:4])
    h1 = r1.forward(0, h0)
    _, g2 = r2.last(0, h1, y[:4])
    g1 = r1.backward(0, g2)
    assert g1.shape == r1.in_shape
    assert r0.backward(0, g1) is None


def test_protocol_errors():
    (r0, r1) = build_pipeline([0, 4, 7], "sgd_momentum", True)
    x, y = batches(0)
    xs, ys = np.split(x, M), np.split(y, M)
    with pytest.raises(StageStateError, match="without a preceding forward"):
        r0.backward(0, np.zeros(r0.out_shape, np.float32))
    with pytest.raises(ValueError, match=r"not in \[0, 4\)"):
        r0.forward(M, xs[0])
    with pytest.raises(ValueError, match="expected float32"):
        r0.forward(0, xs[0].astype(np.float64))
    with pytest.raises(ValueError, match="expected int32"):
        r1.last(0, r0.forward(0, xs[0]), ys[0].astype(np.int64))
    for mb in (0, 1, 3):  # micro-batch 2 never arrives
        _, g = r1.last(mb, r0.forward(mb, xs[mb]), ys[mb])
        r0.backward(mb, g)
    with pytest.raises(StageStateError, match="duplicate gradient for micro-batch 1"):
        r1.last(1, r0.forward(1, xs[1]), ys[1])
    before = r1.params_leaves()
    with pytest.raises(StageStateError, match=r"missing gradients of micro-batches \[2\]"):
        r1.apply_update()
    with pytest.raises(StageStateError, match=r"\[2\]"):
        r0.apply_update()
    # Nothing was applied, and the step can still be completed.
    assert all(np.array_equal(a, b) for a, b in zip(before, r1.params_leaves()))
    _, g = r1.last(2, r0.forward(2, xs[2]), ys[2])
    r0.backward(2, g)
    r0.apply_update()
    r1.apply_update()
    assert r1.completed_microbatches == ()


def test_residual_bytes_per_sample():
    model, params = make_model(), initial_params()
    mb = BATCH // M
    # Stage [2, 4): Dense(24) then scaled tanh, not first, so it needs its input for the
    # kernel grad (24 floats/sample) and tanh's derivative terms; never the weights.
    kept = residual_bytes_per_sample(model, 2, 4, params[2:4], spec((mb, 24)))
    x_bytes = 24 * 4
    assert x_bytes <= kept <= 8 * x_bytes
    kernel_bytes = 24 * 24 * 4
    assert kept * mb < kernel_bytes + x_bytes * mb


def test_x_independent_residuals_are_not_stored():
    # First stage [0, 2): Dense(24) + relu. Storing x (kernel grad) and relu's mask is
    # enough; jax's vjp also carries a broadcast zeros array per relu, which is recomputed.
    kept = residual_bytes_per_sample(make_model(), 0, 2, initial_params()[0:2],
                                     spec((BATCH // M, IN)))
    assert IN * 4 <= kept < IN * 4 + 24 * 4


def test_replicas_exchange_gradients_and_stay_identical():
    """Two replicas of one (first and last) stage split the micro-batches, swap their
    gradients, and end bit-identical to each other and equal to the reference."""
    ref_losses, ref_params = reference_run("adam")
    replicas = build_pipeline([0, 7], "adam", False) + build_pipeline([0, 7], "adam", False)
    for r in replicas:
        r.share_grads = True
    for step in range(STEPS):
        x, y = batches(step)
        xs, ys = np.split(x, M), np.split(y, M)
        for mb in reversed(range(M)):
            replicas[mb % 2].last(mb, xs[mb], ys[mb])
        shared = [r.take_shared_grads() for r in replicas]
        assert sorted(shared[0]) == [0, 2] and sorted(shared[1]) == [1, 3]
        for mine, theirs in ((replicas[0], shared[1]), (replicas[1], shared[0])):
            for mb, leaves in theirs.items():
                mine.add_grads(mb, leaves)
        for r in replicas:
            r.apply_update()
    a, b = (gather_params([r], [0, 7]) for r in replicas)
    assert max_abs_diff(a, b) == 0.0
    assert max_abs_diff(a, ref_params) <= TOL
    with pytest.raises(ValueError, match="grads leaf 0"):
        replicas[0].add_grads(0, [np.zeros((1, 1), np.float32)] * len(replicas[0].params_leaves()))


def test_shape_only_runner_checks_and_shapes_like_the_real_one_but_computes_nothing():
    """Shape-only (simulation at scale): the same programs are loaded and checked, results
    are zeros of the real results' shapes and dtypes, and the step bookkeeping is the same."""
    params = initial_params()
    cuts = (0, 4, 7)
    real, shape = ([StageRunner.load(b, flatten_params(params[a:c]), shape_only=so)
                    for b, a, c in zip(export_pipeline(cuts, "adam", False), cuts[:-1], cuts[1:])]
                   for so in (False, True))
    x, y = batches(0)
    xs, ys = np.split(x, M), np.split(y, M)
    for mb in range(M):
        h_real, h_shape = real[0].forward(mb, xs[mb]), shape[0].forward(mb, xs[mb])
        assert h_shape.shape == h_real.shape and h_shape.dtype == h_real.dtype and not h_shape.any()
        loss, g = shape[1].last(mb, h_shape, ys[mb])
        assert loss == 0.0 and g.shape == h_real.shape
        assert shape[0].backward(mb, g) is None   # the first stage has no input grad, as real
    with pytest.raises(ValueError, match="expected float32"):
        shape[0].forward(0, xs[0].astype(np.float64))
    for r_shape, r_real in zip(shape, real):
        r_shape.apply_update()
        assert r_shape.completed_microbatches == ()
        assert [(a.shape, a.dtype) for a in r_shape.params_leaves()] == \
            [(a.shape, a.dtype) for a in r_real.params_leaves()]
        assert [(a.shape, a.dtype) for a in r_shape.opt_state_leaves()] == \
            [(a.shape, a.dtype) for a in r_real.opt_state_leaves()]
