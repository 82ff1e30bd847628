"""Cost-model inputs (DESIGN.md section 5). Pure: no I/O, no clock, no randomness.

All quantities are per sample unless said otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    """What one layer costs, per sample.

    param_bytes: bytes of the layer's parameters (not per sample).
    out_bytes: bytes of the layer's output activation for one sample.
    flops: forward plus backward floating-point operations for one sample.
    """

    param_bytes: int
    out_bytes: int
    flops: float


@dataclass(frozen=True)
class PeerSpec:
    """What one peer donates: memory, measured compute speed and link bandwidth."""

    peer_id: str
    memory_bytes: int
    flops_per_s: float
    bandwidth_bytes_per_s: float
