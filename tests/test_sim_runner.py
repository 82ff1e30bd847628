"""The simulation runner: real node code over the simulated network, deterministic per seed,
and its churn-free step times agree with the planner's cost model (DESIGN.md sections 5, 6)."""

import json
import subprocess
import sys
from pathlib import Path

from p2ptrain.sim import simulate
from p2ptrain.sim.scenario import parse_scenario

ROOT = Path(__file__).resolve().parent.parent

# Five desktops with short sessions: several crashes and arrivals in two virtual minutes.
TINY_CHURN = {
    "name": "tiny_churn", "hours": 45 / 3600, "warmup_s": 5.0,
    "swarm": {"peers": 5, "mix": {"desktop_cpu": 1.0}, "flops_scale": 3e7, "memory_scale": 1e5,
              "bandwidth_scale": 10.0},
    "model": {"inputs": 8, "widths": [16, 16, 4], "batch_size": 16, "microbatches": 4},
    "churn": {"distribution": "exponential", "mean_session_s": 60.0},
}

# Two desktops that each hold about half the model; compute-bound (a micro-batch computes
# for much longer than a message travels), 16 micro-batches per step.
CALM = {
    "name": "calm", "hours": 180 / 3600, "warmup_s": 5.0,
    "swarm": {"peers": 2, "mix": {"desktop_cpu": 1.0}, "flops_scale": 1e6, "memory_scale": 7e4,
              "bandwidth_scale": 1.0},
    "model": {"inputs": 32, "widths": [64, 64, 64, 4], "batch_size": 64, "microbatches": 16},
}

_RUN = """
import json, sys
from p2ptrain.sim import simulate
from p2ptrain.sim.scenario import parse_scenario
r = simulate(parse_scenario(json.loads(sys.argv[1])), int(sys.argv[2]), baseline=False)
print(json.dumps({"hash": r.trace_hash, "kills": r.kills, "failures": r.failures, "steps": r.steps}))
"""


def test_one_seed_gives_one_trace_in_separate_processes_and_another_seed_another():
    procs = [subprocess.Popen([sys.executable, "-c", _RUN, json.dumps(TINY_CHURN), "1"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert outs[0] == outs[1]
    assert outs[0]["kills"] >= 1 and outs[0]["failures"] >= 1 and outs[0]["steps"] > 5   # churn happened
    other = simulate(parse_scenario(TINY_CHURN), 2, baseline=False)
    assert other.trace_hash != outs[0]["hash"]


def test_churn_free_step_time_agrees_with_the_cost_model():
    report = simulate(parse_scenario(CALM), 1, baseline=False)
    plans = [row for row in report.rows if row[1] == "plan"]
    assert len(plans) == 1 and "," in plans[0][2]   # one plan, at least two stages
    assert report.failures == 0 and report.steps >= 10
    assert abs(report.measured_step_s / report.predicted_step_s - 1) < 0.10


def test_simulate_command_prints_json_and_writes_csv_and_plot(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        'name = "tiny"\nhours = 0.012\n[swarm]\npeers = 2\nmix = { desktop_cpu = 1.0 }\n'
        'flops_scale = 1e6\nmemory_scale = 7e4\n'
        '[model]\ninputs = 32\nwidths = [64, 64, 64, 4]\nbatch_size = 64\nmicrobatches = 16\n')
    out = subprocess.run([sys.executable, "-m", "p2ptrain", "simulate", str(scenario), "--seed", "3", "--json",
                          "--no-baseline", "--out", str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["trace_hash"]) == 64 and report["steps"] >= 1 and report["failures"] == 0
    assert (tmp_path / "out" / "tiny-seed3.csv").read_text().startswith("time_s,kind,peer")
    assert (tmp_path / "out" / "tiny-seed3.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "p2ptrain", "simulate", str(tmp_path / "missing.toml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "p2ptrain", "simulate", str(scenario), "--compute", "abacus"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "shape_only" in bad.stderr


def test_goodput_is_the_ratio_to_a_given_churn_free_rate():
    report = simulate(parse_scenario(CALM), 1, hours=60 / 3600, baseline=2.0)
    assert report.baseline_samples_per_s == 2.0
    assert report.goodput == report.samples_per_s / 2.0


def test_shape_only_compute_takes_the_same_virtual_time_as_real_compute():
    """DESIGN.md section 6: virtual time means the same in both compute modes, so every step
    and plan lands at the same virtual instant; only the numbers differ (zeros)."""
    scenario = parse_scenario(CALM)
    real, shape = (simulate(scenario, 1, hours=60 / 3600, compute=mode, baseline=False)
                   for mode in ("real", "shape_only"))
    timeline = [[(t, kind, peer, step) for t, kind, peer, step, *_ in r.rows if kind in ("step", "plan")]
                for r in (real, shape)]
    assert real.steps >= 3 and timeline[0] == timeline[1]
    assert any(row[4] > 0 for row in real.rows if row[1] == "step")            # real losses
    assert all(row[4] == 0 for row in shape.rows if row[1] == "step")          # no arithmetic


def test_a_partitioned_stage_is_suspected_within_seconds_not_when_it_heals():
    """The driver's detector must end the epoch during a 30 s partition (nothing the driver
    sends towards the cut-off stage may hold it up), and training resumes on the others."""
    scenario = parse_scenario({**CALM, "hours": 100 / 3600, "swarm": {**CALM["swarm"], "peers": 4},
                               "model": {**CALM["model"], "compute": "shape_only"},
                               "faults": [{"at_s": 40.0, "kind": "partition_stage", "stage": 0, "duration_s": 30.0}]})
    report = simulate(scenario, 1, baseline=False)
    plans = [row[0] for row in report.rows if row[1] == "plan"]
    assert len(plans) == 2 and 40.0 < plans[1] < 40.0 + 10.0, plans
    assert report.failures == 1 and report.false_suspicions == 0
    assert any(row[1] == "step" and 40.0 < row[0] < 70.0 for row in report.rows)   # trained meanwhile
