"""Sequential: the layer contract (DESIGN.md section 3)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2ptrain.compute import Sequential


def double(x):
    return 2.0 * x


def test_init_apply_and_function_layers():
    model = Sequential([nn.Dense(5), nn.relu, double, nn.Dense(3)])
    x = jnp.ones((4, 2))
    params = model.init(jax.random.PRNGKey(0), x)
    assert isinstance(params, list) and len(params) == len(model) == 4
    assert params[1] == {} and params[2] == {}
    assert params[0]["params"]["kernel"].shape == (2, 5)
    y = model.apply(params, x)
    manual = nn.Dense(3).apply(params[3], 2.0 * nn.relu(nn.Dense(5).apply(params[0], x)))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(manual))
    # apply_range over a split gives the same result.
    h = model.apply_range(params[:2], x, 0, 2)
    np.testing.assert_array_equal(np.asarray(model.apply_range(params[2:], h, 2, 4)),
                                  np.asarray(y))
    assert model.layers[2] is double


def test_init_is_deterministic_and_keys_differ_per_layer():
    model = Sequential([nn.Dense(3), nn.Dense(3)])
    x = jnp.ones((1, 3))
    a = model.init(jax.random.PRNGKey(7), x)
    b = model.init(jax.random.PRNGKey(7), x)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # Same-shaped layers get different keys, hence different kernels.
    assert not np.array_equal(a[0]["params"]["kernel"], a[1]["params"]["kernel"])


def test_bad_layers_rejected_with_index():
    with pytest.raises(TypeError, match="layer 1 .*neither"):
        Sequential([nn.Dense(2), 3])
    with pytest.raises(TypeError, match="layer 0 is the class Dense.*instantiate"):
        Sequential([nn.Dense])
    with pytest.raises(ValueError, match="at least one layer"):
        Sequential([])
    with pytest.raises(TypeError, match="list of layers"):
        Sequential(nn.Dense(2))


def test_apply_range_validates():
    model = Sequential([double, double])
    with pytest.raises(ValueError, match="bad layer range"):
        model.apply_range([{}], jnp.ones(1), 1, 3)
    with pytest.raises(ValueError, match="need 2 params entries, got 1"):
        model.apply_range([{}], jnp.ones(1), 0, 2)
