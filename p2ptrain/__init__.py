"""p2ptrain: train neural networks on volunteered, heterogeneous, unreliable machines."""

from . import losses
from .api import train, train_async
from .compute import Sequential
from .node.driver import TrainingError, TrainResult
from .planner import Infeasible

__all__ = ["Sequential", "train", "train_async", "losses", "TrainResult", "TrainingError", "Infeasible"]
