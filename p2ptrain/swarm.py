"""A swarm of real `p2ptrain` processes on this machine (loopback), for the demo, the
end-to-end tests and the benchmarks. Every port is chosen by the OS; every process is
stopped on exit, and dies with its parent even if the parent is killed (see cli._die_with_parent).
Linux sends that signal when the *thread* that started the process ends: call `join` from a
thread that outlives the swarm.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

class SwarmError(RuntimeError):
    """A swarm process failed to start; the message carries the end of its log."""


@dataclass
class Node:
    process: subprocess.Popen
    ready_line: str
    log_path: Path

    @property
    def peer_id(self) -> str:
        return self.ready_line.split()[1]

    @property
    def address(self) -> str:
        return self.ready_line.split()[4]


@dataclass
class LocalSwarm:
    """`with LocalSwarm() as swarm: swarm.join(memory="64MB")` -> real processes on loopback."""

    start_timeout_s: float = 60.0
    stop_timeout_s: float = 10.0
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="p2ptrain-swarm-")))
    bootstrap: Node | None = None
    peers: list[Node] = field(default_factory=list)

    def __enter__(self) -> "LocalSwarm":
        self.bootstrap = self._start(["bootstrap", "--listen", "127.0.0.1:0"], "bootstrap")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return self.bootstrap.address

    def join(self, *, memory: str | None = None, threads: int | None = 1, extra: tuple = ()) -> Node:
        """Start one `p2ptrain join` process and wait until it has registered."""
        args = ["join", "--bootstrap", self.address, "--listen", "127.0.0.1:0", *extra]
        if memory:
            args += ["--memory", memory]
        if threads:   # each peer on its own cores while there are enough
            args += ["--threads", str(threads), "--first-cpu", str(threads * len(self.peers))]
        node = self._start(args, f"peer{len(self.peers)}")
        self.peers.append(node)
        return node

    def _start(self, args: list[str], name: str) -> Node:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "p2ptrain", *args], stdout=subprocess.PIPE, stderr=log,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1", P2PTRAIN_DIE_WITH_PARENT=str(os.getpid())))
        line = _read_line(process, self.start_timeout_s)
        if not line:
            process.kill()
            process.wait()
            raise SwarmError(f"{name} did not start: {log_path.read_text()[-2000:]}")
        return Node(process, line.strip(), log_path)

    def stop(self) -> list[int]:
        """SIGTERM every process (peers first, so their leaves reach the bootstrap), wait,
        kill what is left. Returns the exit codes."""
        nodes = [*self.peers, *([self.bootstrap] if self.bootstrap else [])]
        for node in nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        codes = []
        deadline = time.monotonic() + self.stop_timeout_s
        for node in nodes:
            try:
                codes.append(node.process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                node.process.kill()
                codes.append(node.process.wait())
            node.process.stdout.close()
        return codes


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    """The first stdout line of `process`, or "" if it exits or times out first."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return process.stdout.readline().decode()
