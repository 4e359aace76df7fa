"""benchmarks/quality.py's helpers that need no engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .processes import ends_soon

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
    assert ends_soon(left_behind)
