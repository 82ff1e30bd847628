"""Layer-assignment planner (DESIGN.md section 5). Pure: no I/O, no clock, no global RNG.

Public contract: LayerCost, PeerSpec, Stage, Plan, Infeasible, plan, step_time; plus
replan / Replan / moved_param_bytes for churn, cap_replicas / shortlist for large swarms, and stage_memory_bytes / memory_violations
to check a plan against memory. How `plan` searches is explained in search.py.
"""

from .cap import cap_replicas, shortlist
from .cost_model import memory_violations, stage_memory_bytes, step_time
from .costs import LayerCost, PeerSpec
from .plans import Infeasible, Plan, Stage
from .replan import Replan, moved_param_bytes, replan
from .search import plan

__all__ = [
    "LayerCost",
    "PeerSpec",
    "Stage",
    "Plan",
    "Infeasible",
    "plan",
    "step_time",
    "replan",
    "Replan",
    "moved_param_bytes",
    "stage_memory_bytes",
    "memory_violations",
    "cap_replicas",
    "shortlist",
]
