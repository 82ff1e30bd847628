"""Layer-assignment planner (DESIGN.md section 5). Pure: no I/O, no clock, no global RNG."""

from .cost_model import memory_violations, stage_memory_bytes, step_time
from .costs import LayerCost, PeerSpec
from .plans import Infeasible, Plan, Stage
from .search import plan

__all__ = [
    "LayerCost",
    "PeerSpec",
    "Stage",
    "Plan",
    "Infeasible",
    "plan",
    "step_time",
    "stage_memory_bytes",
    "memory_violations",
]
