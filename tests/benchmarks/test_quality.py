"""benchmarks/quality.py's helpers that need no engine."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_leave_now_takes_the_engine_core_with_it():
    """A child phase that leaves without vLLM's teardown must not leave its
    engine-core process (here: any process it started) running."""
    script = (f"import subprocess, sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import quality\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
              "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
              "print(child.pid, flush=True)\n"
              "quality.leave_now()\n")
    phase = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert phase.returncode == 0, phase.stderr
    left_behind = int(phase.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _running(left_behind) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(left_behind)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
