"""What a peer refuses to load: allow-list, sizes, signatures, bad params, bad bundles."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest

from p2ptrain import losses
from p2ptrain.compute import (
    ProgramLimits,
    ProgramRejected,
    Sequential,
    StageBundle,
    StageRunner,
    export_stage,
    flatten_params,
)
from p2ptrain.compute.limits import custom_call_targets

MB, IN, HID = 2, 3, 4


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def whiten(h):
    """A plain function layer that uses jnp.linalg: on CPU it lowers to LAPACK custom calls
    (lapack_sgetrf_ffi, lapack_strsm_ffi), which jax itself happily exports."""
    gram = h.T @ h / h.shape[0] + jnp.eye(h.shape[1], dtype=h.dtype)
    return h @ jnp.linalg.inv(gram)


@functools.lru_cache(maxsize=None)
def middle_bundle(layers_key: str = "dense"):
    """A non-last stage [0, 2) of a 3-layer model, exported for 2 micro-batches."""
    layers = {"dense": [nn.Dense(HID), nn.relu], "linalg": [nn.Dense(HID), whiten]}[layers_key]
    model = Sequential(layers + [nn.Dense(2)])
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((MB, IN)))
    bundle = export_stage(model, 0, 2, params[:2], x_spec=spec((MB, IN)), y_spec=None,
                          loss=None, optimizer=optax.sgd(0.1), microbatches=2, is_last=False,
                          keep_residuals=False)
    return bundle, params


def test_ordinary_dense_stage_loads_and_runs():
    bundle, params = middle_bundle()
    r = StageRunner.load(bundle, flatten_params(params[:2]))
    assert r.forward(0, np.ones((MB, IN), np.float32)).shape == (MB, HID)


def test_foreign_custom_call_is_rejected_before_running():
    bundle, params = middle_bundle("linalg")
    with pytest.raises(ProgramRejected) as err:
        StageRunner.load(bundle, flatten_params(params[:2]))
    msg = str(err.value)
    assert "custom_call" in msg and "lapack_" in msg and "allow-list" in msg
    # The same bundle is fine for a peer that allows those targets: the rejection is the
    # allow-list's doing, not a broken program.
    wide = ProgramLimits(allowed_custom_calls=frozenset(
        {"shape_assertion", "lapack_sgetrf_ffi", "lapack_strsm_ffi"}))
    r = StageRunner.load(bundle, flatten_params(params[:2]), limits=wide)
    assert np.all(np.isfinite(r.forward(0, np.ones((MB, IN), np.float32))))


def test_oversize_program_rejected():
    bundle, params = middle_bundle()
    biggest = max(len(b) for b in bundle.programs.values())
    with pytest.raises(ProgramRejected, match="exceeds max_program_bytes=1000"):
        StageRunner.load(bundle, flatten_params(params[:2]),
                         limits=ProgramLimits(max_program_bytes=min(1000, biggest - 1)))


def test_too_many_args_rejected():
    bundle, params = middle_bundle()
    with pytest.raises(ProgramRejected, match="exceeds max_args=2"):
        StageRunner.load(bundle, flatten_params(params[:2]), limits=ProgramLimits(max_args=2))


def test_garbage_program_rejected():
    bundle, params = middle_bundle()
    programs = dict(bundle.programs, forward=b"\x00not a program" * 10)
    bad = StageBundle(programs=programs, is_last=False, keep_residuals=False, microbatches=2)
    with pytest.raises(ProgramRejected, match="'forward': does not deserialize"):
        StageRunner.load(bad, flatten_params(params[:2]))


def test_program_in_the_wrong_role_rejected():
    bundle, params = middle_bundle()
    programs = dict(bundle.programs, forward=bundle.programs["backward"])
    bad = StageBundle(programs=programs, is_last=False, keep_residuals=False, microbatches=2)
    with pytest.raises(ProgramRejected, match="program 'forward'"):
        StageRunner.load(bad, flatten_params(params[:2]))
    # Claiming residual mode for recompute-mode programs does not pass either.
    lie = StageBundle(programs=bundle.programs, is_last=False, keep_residuals=True,
                      microbatches=2)
    with pytest.raises(ProgramRejected):
        StageRunner.load(lie, flatten_params(params[:2]))


def test_wrong_params_leaves_rejected_with_clear_message():
    bundle, params = middle_bundle()
    leaves = flatten_params(params[:2])  # [bias f32[4], kernel f32[3, 4]]
    with pytest.raises(ValueError, match="params: expected 2 leaves, got 1"):
        StageRunner.load(bundle, leaves[:1])
    with pytest.raises(ValueError, match=r"params leaf 1: expected float32\[3, 4\], "
                                         r"got float32\[4, 3\]"):
        StageRunner.load(bundle, [leaves[0], leaves[1].T])
    with pytest.raises(ValueError, match=r"params leaf 0: expected float32\[4\], got int32\[4\]"):
        StageRunner.load(bundle, [leaves[0].astype(np.int32), leaves[1]])
    with pytest.raises(ValueError, match="opt_state: expected 0 leaves, got 1"):
        StageRunner.load(bundle, leaves, opt_state_leaves=[np.zeros(4, np.float32)])


def test_bundle_wire_roundtrip_and_strictness():
    bundle, _ = middle_bundle()
    wire = msgpack.unpackb(msgpack.packb(bundle.to_wire(), use_bin_type=True), raw=False)
    assert StageBundle.from_wire(wire) == bundle
    cases = [
        ({k: v for k, v in wire.items() if k != "microbatches"}, "keys"),
        (dict(wire, extra=1), "keys"),
        (dict(wire, is_last=1), "is_last must be a bool"),
        (dict(wire, microbatches=0), "microbatches"),
        (dict(wire, microbatches=True), "microbatches"),
        (dict(wire, format="other/9"), "unknown format"),
        (dict(wire, programs=dict(wire["programs"], last=b"x")), "programs"),
        (dict(wire, programs=dict(wire["programs"], forward="text")), "not bytes"),
        (dict(wire, is_last=True), "expected"),  # middle programs under a last-stage flag
        ([1, 2], "expected a dict"),
    ]
    for d, match in cases:
        with pytest.raises(ProgramRejected, match=match):
            StageBundle.from_wire(d)


def test_custom_call_scan_is_fail_closed():
    ok = 'func.func @main() { %0 = stablehlo.custom_call @shape_assertion(%a) loc("custom_call")}'
    assert custom_call_targets(ok) == ["shape_assertion"]
    quoted = '%0 = stablehlo.custom_call @"odd name"(%a) : tensor<f32>'
    assert custom_call_targets(quoted) == ["odd name"]
    with pytest.raises(ProgramRejected, match="generic-form"):
        custom_call_targets('%0 = "stablehlo.custom_call"(%a) {call_target_name = "x"}')
    with pytest.raises(ProgramRejected, match="recognisable"):
        custom_call_targets("%0 = mhlo.custom_call @x(%a)\n%1 = stablehlo.custom_call @y(%b)")


def test_single_layer_last_stage_with_mse_learns():
    model = Sequential([nn.Dense(2)])
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((MB, IN)))
    bundle = export_stage(model, 0, 1, params, x_spec=spec((MB, IN)),
                          y_spec=spec((MB, 2)), loss=losses.mean_squared_error,
                          optimizer=optax.sgd(0.1), microbatches=1, is_last=True,
                          keep_residuals=True)
    r = StageRunner.load(bundle, flatten_params(params))
    x = np.ones((MB, IN), np.float32)
    y = np.zeros((MB, 2), np.float32)
    first, gx = r.last(0, x, y)
    assert gx is None  # first stage: no input gradient computed
    r.apply_update()
    second, _ = r.last(0, x, y)
    assert second < first
