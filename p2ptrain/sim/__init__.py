"""Deterministic simulation: scenarios, churn, modelled compute, the runner and its report.

`p2ptrain.sim.simulate(scenario, seed, peers=None, hours=None, compute=None) -> SimReport` and
`p2ptrain.sim.load_scenario(path)` are loaded lazily: the transports import
`p2ptrain.sim.trace`, and importing the runner (node code, jax) here would be circular.
"""

_LAZY = {"simulate": "runner", "churn_free_samples_per_s": "runner", "SimReport": "report",
         "summary_table": "report", "load_scenario": "scenario", "parse_scenario": "scenario",
         "Scenario": "scenario"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
