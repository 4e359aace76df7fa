"""Whether a process a test left behind has ended."""

from __future__ import annotations

import time

import psutil


def ends_soon(pid: int, within_s: float = 10.0) -> bool:
    """Waits up to within_s for the process to be gone or a zombie (killed, not yet reaped)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
