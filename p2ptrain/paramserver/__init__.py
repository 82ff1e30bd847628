"""Parameter-server training (issue 4, item 7b): a baseline and a mode for small models.

One server holds the params and the optimizer state; each of W workers computes the gradient
of its shard of every batch with an exported program (workers never run the submitter's
Python) and sends it back; the server sums them in worker order and applies one update.
Exactly single-process training with microbatches = W.

- api: `train_parameter_server`, `train_parameter_server_async`
- server: `run_parameter_server`, `PSResult`, `ValueCounts`, `ServerConfig`
- worker: `serve_worker`, `WorkerConfig`
- program: the exported gradient program and its checks
- messages: the protocol's message kinds
"""

from .api import train_parameter_server, train_parameter_server_async
from .server import ParameterServerError, PSResult, ServerConfig, ValueCounts, run_parameter_server
from .worker import WorkerConfig, serve_worker

__all__ = [
    "PSResult",
    "ParameterServerError",
    "ServerConfig",
    "ValueCounts",
    "WorkerConfig",
    "run_parameter_server",
    "serve_worker",
    "train_parameter_server",
    "train_parameter_server_async",
]
