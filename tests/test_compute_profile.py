"""profile_layers: per-sample costs from XLA's cost analysis."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from p2ptrain.compute import Sequential, profile_layers
from p2ptrain.planner.costs import LayerCost

BATCH, IN, OUT = 8, 32, 64


def test_dense_costs():
    model = Sequential([nn.Dense(OUT), nn.relu, jnp.tanh, nn.Dense(10)])
    x = jnp.ones((BATCH, IN), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    dense, relu, tanh, head = profile_layers(model, params, x)
    assert all(isinstance(c, LayerCost) for c in (dense, relu, tanh, head))
    assert dense.param_bytes == (IN * OUT + OUT) * 4
    assert dense.out_bytes == OUT * 4
    assert 0.5 * 6 * IN * OUT <= dense.flops <= 2 * 6 * IN * OUT
    assert head.param_bytes == (OUT * 10 + 10) * 4 and head.out_bytes == 10 * 4
    assert 0.5 * 6 * OUT * 10 <= head.flops <= 2 * 6 * OUT * 10
    assert relu.param_bytes == 0 and relu.out_bytes == OUT * 4
    # Elementwise layers: a few flops per element, far below the dense layer.
    assert 0 < relu.flops <= 10 * OUT and 0 < tanh.flops < dense.flops


def test_integer_input_layer_is_profiled():
    model = Sequential([nn.Embed(50, 16), nn.Dense(4)])
    x = jnp.zeros((BATCH, 5), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), x)
    embed, dense = profile_layers(model, params, x)
    assert embed.param_bytes == 50 * 16 * 4 and embed.out_bytes == 5 * 16 * 4
    assert embed.flops >= 0
    assert dense.flops == pytest.approx(6 * 5 * 16 * 4, rel=1.0)
