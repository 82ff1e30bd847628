"""Modelled compute: what a stage's work costs in virtual time (DESIGN.md sections 5 and 6).

The planner's cost model charges a replica sum(flops[a:b]) / flops_per_s per sample, where a
layer's flops are forward + backward. The peer hook (`PeerConfig.compute_delay_s`) asks after
each task how long it took; we split the per-sample cost as forward 1/3, backward 2/3 (the
usual 1:2 ratio), the last stage's fused forward+backward taking all of it, and charge it per
micro-batch of `microbatch_size` samples. Gradient exchange and the optimizer update are not
in the cost model and cost nothing here. So a micro-batch crossing every stage costs exactly
what the cost model says, and measured step times can be compared with `planner.step_time`.

Pure bookkeeping: no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..planner.costs import LayerCost

# Share of a layer's (forward + backward) FLOPs spent in each task kind.
TASK_SHARE = {"forward": 1.0 / 3.0, "backward": 2.0 / 3.0, "last": 1.0, "grads": 0.0, "update": 0.0}


class ComputeModel:
    """Per-epoch stage spans and per-peer speeds; gives each peer its delay function.

    costs: the model's layers (from `profile_layers`), per sample.
    microbatch_size: samples per micro-batch.
    """

    def __init__(self, costs: Sequence[LayerCost], microbatch_size: int, *, max_epochs: int = 100_000) -> None:
        self.costs = list(costs)
        self.microbatch_size = microbatch_size
        self.max_epochs = max_epochs
        self._epoch_spans: dict[str, list[tuple[int, int]]] = {}   # job-id suffix "-eN" -> spans
        self.slowdown: dict[str, float] = {}   # peer id -> factor (a straggler fault)

    def set_plan(self, epoch: int, spans: Sequence[tuple[int, int]]) -> None:
        """The stages [start, stop) of `epoch` (job ids end in f"-e{epoch}")."""
        if len(self._epoch_spans) >= self.max_epochs:
            raise RuntimeError(f"more than {self.max_epochs} epochs in one simulation")
        self._epoch_spans[f"-e{epoch}"] = list(spans)

    def stage_flops(self, job_id: str, stage: int) -> float:
        """Forward + backward FLOPs per sample of `stage` of the job, 0 if unknown."""
        spans = self._epoch_spans.get(job_id[job_id.rfind("-e"):]) if "-e" in job_id else None
        if spans is None or stage >= len(spans):
            return 0.0
        start, stop = spans[stage]
        return sum(c.flops for c in self.costs[start:stop])

    def delay_s(self, peer_id: str, flops_per_s: float, kind: str, job_id: str, stage: int) -> float:
        share = TASK_SHARE.get(kind, 0.0)
        if share == 0.0:
            return 0.0
        flops = share * self.stage_flops(job_id, stage) * self.microbatch_size
        return flops / flops_per_s * self.slowdown.get(peer_id, 1.0)

    def for_peer(self, peer_id: str, flops_per_s: float):
        """The `PeerConfig.compute_delay_s` of one peer."""
        def compute_delay_s(kind: str, job_id: str, stage: int) -> float:
            return self.delay_s(peer_id, flops_per_s, kind, job_id, stage)
        return compute_delay_s
