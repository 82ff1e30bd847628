"""`p2ptrain demo` as a user runs it: two at once, each must succeed and leave nothing behind."""

import os
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


def test_two_demos_at_once_both_reach_the_target_and_clean_up():
    demos = [subprocess.Popen([sys.executable, "-m", "p2ptrain", "demo"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for _ in range(2)]
    outputs = [demo.communicate(timeout=400) for demo in demos]
    for demo, (out, err) in zip(demos, outputs):
        assert demo.returncode == 0, err[-2000:]
        assert "held-out accuracy" in out and "all processes stopped" in out
        assert "stage 0: layers" in err   # the stage -> peer map is shown
        assert children_of(demo.pid) == [], "the demo left processes behind"
