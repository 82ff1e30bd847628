"""Loss functions: ``(outputs, y) -> scalar`` mean over the batch (DESIGN.md section 3).

Pure jax functions, safe to trace and export. They return the mean over every leading
(batch) element, so the mean over equal micro-batches equals the loss of the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["softmax_cross_entropy", "mean_squared_error"]


def softmax_cross_entropy(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy between ``softmax(outputs)`` and ``y``.

    outputs: logits, shape ``(..., classes)``.
    y: either integer class labels of shape ``outputs.shape[:-1]``, or one-hot / probability
       targets of the same shape as ``outputs``.
    Returns a float scalar (mean over all leading elements).
    """
    logits = jnp.asarray(outputs)
    y = jnp.asarray(y)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if jnp.issubdtype(y.dtype, jnp.integer):
        if y.shape != logits.shape[:-1]:
            raise ValueError(
                f"integer labels must have shape {logits.shape[:-1]} for logits "
                f"{logits.shape}, got {y.shape}"
            )
        picked = jnp.take_along_axis(log_probs, y[..., None].astype(jnp.int32), axis=-1)
        return -jnp.mean(picked[..., 0])
    if y.shape != logits.shape:
        raise ValueError(
            f"probability targets must have the logits' shape {logits.shape}, got {y.shape}"
        )
    return -jnp.mean(jnp.sum(y.astype(log_probs.dtype) * log_probs, axis=-1))


def mean_squared_error(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over all elements of ``(outputs - y) ** 2``; shapes must match exactly."""
    outputs = jnp.asarray(outputs)
    y = jnp.asarray(y)
    if outputs.shape != y.shape:
        # Broadcasting (N,) against (N, 1) silently gives an (N, N) loss: refuse it.
        raise ValueError(f"outputs shape {outputs.shape} != targets shape {y.shape}")
    diff = outputs - y.astype(outputs.dtype)
    return jnp.mean(diff * diff)
