"""Framework overhead: the step time of a 1-peer swarm (a real peer process over TLS on
loopback) against a plain jitted JAX + optax step of the same model, side by side.

    python simulations/overhead_bench.py [--steps 60] [--batch 128]

Model: the 784-512-512-10 MLP, batch 128, one micro-batch per step (so the swarm does the
same arithmetic as the plain step: forward, backward, optimizer update).
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
import optax

import p2ptrain
from p2ptrain.swarm import LocalSwarm


def mlp():
    return p2ptrain.Sequential([nn.Dense(512), jax.nn.relu, nn.Dense(512), jax.nn.relu, nn.Dense(10)])


def make_batches(batch: int):
    def batches(step):
        rng = np.random.default_rng(step)
        return rng.normal(size=(batch, 784)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int32)
    return batches


def plain_step_times(model, params, batches, optimizer, steps: int) -> list[float]:
    loss = p2ptrain.losses.softmax_cross_entropy

    @jax.jit
    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(lambda p: loss(model.apply(p, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = optimizer.init(params)
    times = []
    for t in range(steps):
        x, y = batches(t)
        start = time.perf_counter()
        params, opt_state, value = step(params, opt_state, x, y)
        value.block_until_ready()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    model, batches, optimizer = mlp(), make_batches(args.batch), optax.sgd(0.01, momentum=0.9)
    params = model.init(jax.random.PRNGKey(0), batches(0)[0])
    warmup = min(10, args.steps // 3)
    with LocalSwarm() as swarm:
        swarm.join(threads=None)
        swarm_result = p2ptrain.train(model, batches, loss=p2ptrain.losses.softmax_cross_entropy,
                                      optimizer=optimizer, steps=args.steps, microbatches=1, params=params,
                                      bootstrap=swarm.address, progress=False)
    plain = plain_step_times(model, params, batches, optimizer, args.steps)
    swarm_ms = statistics.median(swarm_result.step_times_s[warmup:]) * 1e3
    plain_ms = statistics.median(plain[warmup:]) * 1e3
    print(f"{'setup':<34} {'median step ms':>15} {'samples/s':>10}")
    print(f"{'plain jitted JAX step':<34} {plain_ms:>15.2f} {args.batch / plain_ms * 1e3:>10.0f}")
    print(f"{'1-peer swarm (TLS, loopback)':<34} {swarm_ms:>15.2f} {args.batch / swarm_ms * 1e3:>10.0f}")
    print(f"overhead ratio swarm/plain: {swarm_ms / plain_ms:.2f}x  (784-512-512-10 MLP, batch {args.batch}, "
          f"median of steps {warmup}..{args.steps - 1})")


if __name__ == "__main__":
    main()
