"""p2ptrain: train neural networks on volunteered, heterogeneous, unreliable machines.

Public names load lazily (PEP 562): `p2ptrain join --threads N` must limit XLA's threads
before jax is first imported, and the pure core must import without jax at all.
"""

from importlib import import_module

_PUBLIC = {
    "Sequential": "p2ptrain.compute",
    "train": "p2ptrain.api",
    "train_async": "p2ptrain.api",
    "TrainResult": "p2ptrain.node.driver",
    "TrainingError": "p2ptrain.node.driver",
    "Infeasible": "p2ptrain.planner",
    "train_parameter_server": "p2ptrain.paramserver",
    "train_parameter_server_async": "p2ptrain.paramserver",
    "PSResult": "p2ptrain.paramserver",
    "ParameterServerError": "p2ptrain.paramserver",
}

__all__ = ["losses", *_PUBLIC]


def __getattr__(name: str):
    if name == "losses":
        return import_module("p2ptrain.losses")
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'p2ptrain' has no attribute {name!r}")
