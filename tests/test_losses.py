"""Losses against optax references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p2ptrain import losses


def test_softmax_cross_entropy_integer_and_one_hot_agree_with_optax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=6).astype(np.int32)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    got_int = losses.softmax_cross_entropy(logits, labels)
    got_hot = losses.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 4))
    assert got_int.shape == ()
    np.testing.assert_allclose(got_int, ref, rtol=1e-6)
    np.testing.assert_allclose(got_hot, ref, rtol=1e-6)
    probs = jax.nn.softmax(rng.standard_normal((6, 4)).astype(np.float32))
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, probs),
                               optax.softmax_cross_entropy(logits, probs).mean(), rtol=1e-6)


def test_mean_of_equal_chunks_is_the_batch_loss():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=8)
    whole = losses.softmax_cross_entropy(logits, labels)
    chunks = [losses.softmax_cross_entropy(a, b)
              for a, b in zip(np.split(logits, 4), np.split(labels, 4))]
    np.testing.assert_allclose(np.mean(chunks), whole, rtol=1e-6)


def test_mean_squared_error():
    out = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    y = jnp.array([[1.0, 0.0], [0.0, 4.0]])
    assert float(losses.mean_squared_error(out, y)) == pytest.approx((4.0 + 9.0) / 4)
    g = jax.grad(losses.mean_squared_error)(out, y)
    np.testing.assert_allclose(g, 2 * (out - y) / 4)


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match="shape"):
        losses.mean_squared_error(jnp.ones((4,)), jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="integer labels"):
        losses.softmax_cross_entropy(jnp.ones((4, 3)), jnp.ones((4, 1), jnp.int32))
    with pytest.raises(ValueError, match="probability targets"):
        losses.softmax_cross_entropy(jnp.ones((4, 3)), jnp.ones((4, 2)))
