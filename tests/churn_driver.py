"""A driver process for the driver-crash test: trains the pipelined MLP with checkpoints in
STATE_DIR and prints "step N" after each committed step.

    python churn_driver.py BOOTSTRAP STATE_DIR STEPS
"""

import sys

import optax

import p2ptrain
from p2ptrain.demo import batch_stream, digits_split
from p2ptrain.node.driver import DriverConfig
from reference import pipelined_mlp


def main() -> None:
    bootstrap, state_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    (x, y), _ = digits_split()
    p2ptrain.train(pipelined_mlp(), batch_stream(x, y, batch_size=32), loss=p2ptrain.losses.softmax_cross_entropy,
                   optimizer=optax.adam(1e-2), steps=steps, microbatches=4, bootstrap=bootstrap, progress=False,
                   state_dir=state_dir, config=DriverConfig(snapshot_every_steps=2),
                   on_step=lambda step, loss: print(f"step {step}", flush=True))


if __name__ == "__main__":
    main()
