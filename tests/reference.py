"""Single-process JAX + optax training with p2ptrain's semantics (DESIGN.md section 3),
written independently of the package: the yardstick for exactness tests."""

import jax
import numpy as np
import optax


def reference_train(model, batches, loss, optimizer, *, steps, microbatches, params):
    def microbatch_loss(params, x, y):
        return loss(model.apply(params, x), y)

    value_and_grad = jax.jit(jax.value_and_grad(microbatch_loss))
    opt_state = optimizer.init(params)
    losses = []
    for step in range(steps):
        x, y = batches(step)
        pieces = zip(np.split(np.asarray(x, np.float32), microbatches), np.split(np.asarray(y), microbatches))
        values, grads = zip(*(value_and_grad(params, xi, yi) for xi, yi in pieces))
        mean_grads = jax.tree_util.tree_map(lambda *g: sum(g) / microbatches, *grads)
        updates, opt_state = optimizer.update(mean_grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(np.mean(values)))
    return params, losses


def max_abs_difference(a, b) -> float:
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(leaves_a, leaves_b))


# A model and peer memory for real-process swarms: each 48-wide Dense layer with its
# optimizer state needs 38-50 KB; at 70 KB a peer holds one of them but never two, so every
# plan is a 3-stage pipeline (and extra peers can only be replicas).
PIPELINE_PEER_MEMORY = "70KB"


def pipelined_mlp():
    import flax.linen as nn

    import p2ptrain

    return p2ptrain.Sequential([nn.Dense(48), jax.nn.relu, nn.Dense(48), jax.nn.relu,
                                nn.Dense(48), jax.nn.relu, nn.Dense(10)])
