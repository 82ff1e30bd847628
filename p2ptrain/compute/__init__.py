"""Compute layer: everything JAX (DESIGN.md section 2). No trio, no sockets, no clocks.

- model: ``Sequential`` (the layer contract)
- profile: ``profile_layers`` (per-layer costs for the planner, from XLA cost analysis)
- export: driver side, ``export_stage`` and params flattening
- bundle: ``StageBundle``, the plain-values form that travels to peers
- limits: ``ProgramLimits``/``ProgramRejected``, the allow-list checked before running
- runner: peer side, ``StageRunner``
"""

from p2ptrain.compute.bundle import StageBundle
from p2ptrain.compute.export import (
    export_stage,
    flatten_params,
    opt_state_leaf_counts,
    param_leaf_counts,
    params_treedef,
    residual_bytes_per_sample,
    unflatten_params,
)
from p2ptrain.compute.limits import ProgramLimits, ProgramRejected, check_program
from p2ptrain.compute.model import Sequential
from p2ptrain.compute.profile import profile_layers
from p2ptrain.compute.runner import StageRunner, StageStateError

__all__ = [
    "ProgramLimits",
    "ProgramRejected",
    "Sequential",
    "StageBundle",
    "StageRunner",
    "StageStateError",
    "check_program",
    "export_stage",
    "flatten_params",
    "opt_state_leaf_counts",
    "param_leaf_counts",
    "params_treedef",
    "profile_layers",
    "residual_bytes_per_sample",
    "unflatten_params",
]
