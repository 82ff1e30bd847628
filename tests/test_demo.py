"""`p2ptrain demo` as a user runs it: two at once (one of them with --churn), each must
succeed, leave nothing behind, and the churned one must end exactly where the calm one does."""

import subprocess
import sys
from pathlib import Path


def children_of(pid: int) -> list[int]:
    """Live processes started for `pid` by LocalSwarm (they carry its pid in their environment)."""
    marker = f"P2PTRAIN_DIE_WITH_PARENT={pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def final_result(stdout: str) -> tuple[str, str]:
    """("final loss 0.0048", "98.3%") from the demo's last line."""
    line = next(line for line in stdout.splitlines() if line.startswith("final loss"))
    return line.split(";")[0], line.split("held-out accuracy ")[1].split(" ")[0]


def test_two_demos_at_once_one_churned_both_exact_and_clean():
    demos = [subprocess.Popen([sys.executable, "-m", "p2ptrain", "demo", *flags], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
             for flags in ([], ["--churn"])]
    (calm_out, calm_err), (churn_out, churn_err) = [demo.communicate(timeout=400) for demo in demos]
    for demo, err in zip(demos, (calm_err, churn_err)):
        assert demo.returncode == 0, err[-2000:]   # exit 0 means held-out accuracy >= 95%
        assert "stage 0: layers" in err            # the stage -> peer map is shown
        assert children_of(demo.pid) == [], "the demo left processes behind"
    assert "all processes stopped" in calm_out
    assert "kill -9 peer" in churn_out and "recovered from losing peer" in churn_out
    assert "re-planned after a failure" in churn_err
    assert final_result(churn_out) == final_result(calm_out)
