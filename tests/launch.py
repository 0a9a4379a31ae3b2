"""lopt in child processes, started as a user starts it: the launcher command lines (torchrun, `accelerate launch`
with a shipped config, plain Python), running one to its end within a deadline, and starting one to signal or kill.

Every multi-process and fault test starts its runs here, so each states only its flags and what it checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD = 2  # processes in a multi-process test: all that CI's 2 cores run side by side
TIMEOUT_S = 300  # one launch of a tiny run; far above what it takes, and below pytest's per-test timeout
PYTHON = [sys.executable]  # one process, no launcher


def torchrun(processes: int = WORLD) -> list[str]:
    """`torchrun --standalone --nproc_per_node PROCESSES`, through this Python."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def accelerate(config: str, processes: int = WORLD) -> list[str]:
    """`accelerate launch --config_file CONFIG --num_processes PROCESSES`; CONFIG relative to the repository."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    return [*launch, "--config_file", str(REPO / config), "--num_processes", str(processes)]


def run_lopt(
    launcher: list[str], *arguments: str, check: bool = True, cpu_only: bool = False
) -> subprocess.CompletedProcess[str]:
    """`LAUNCHER -m lopt.cli ARGUMENTS` from the repository root, one thread per process, to its end within
    TIMEOUT_S. With `check`, a failure fails the test with the end of the run's stderr. `cpu_only` hides any GPU,
    so processes share the CPU (gloo) also next to one. Returns the completed process, its output as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CUDA_VISIBLE_DEVICES": ""} if cpu_only else {})}
    command = [*launcher, "-m", "lopt.cli", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, env=env)
    if check:
        assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def start_lopt(arguments: list[str]) -> subprocess.Popen:
    """`python -m lopt.cli ARGUMENTS` left running (unbuffered, output piped), for a test to signal or kill."""
    return subprocess.Popen(
        [*PYTHON, "-m", "lopt.cli", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_until(done: Callable[[], object], what: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `done()` until it holds; fail, naming `what` was awaited, if `process` ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not done():
        assert process.poll() is None, f"the run ended while waiting for {what}:\n{process.communicate()[1]}"
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.05)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` exists (see wait_until)."""
    wait_until(path.exists, f"{path} to appear", process, timeout)
