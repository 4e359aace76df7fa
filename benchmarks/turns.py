"""Timing engines that take turns: the way benchmarks here compare two vLLM engines on a
shared, noisy machine.

Each engine is a child process (its own process group, so its engine core stops with it)
that reads one command per line on stdin and answers one JSON line on stdout. Between
commands it is stopped (SIGSTOP). A timed run gives every engine its command and lets them
run in turns of a fraction of a second, only one at a time, until each has answered; an
engine's speed is the work it reports over the time it ran. Turns that short let the engines
share every slow or fast spell of the machine, which whole runs one after another (seconds
each) do not: on the 2-core machine this was written on, adjacent generates of one engine
differed by up to 40 %, the engines' ratio within one run of turns mostly by under 4 %.
Only the time both are still running is paired: when one engine's work is much shorter, the
other runs the rest alone, and a ratio far from 1 spreads more.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


class Engine:
    """An engine process and its log file (its stderr)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True, start_new_session=True)

    def pause(self) -> None:
        """Stops the engine and its engine-core process (its whole process group)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def _answer(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-4000:]
            sys.exit(f"engine {self.name} stopped (exit {self.proc.wait()}), log {self.log}:\n{tail}")
        return line

    def wait_ready(self) -> None:
        """Waits for the engine's first line, READY, and stops it."""
        assert self._answer().strip() == "READY"
        self.pause()

    def send(self, command: str) -> None:
        """Queues one command; a stopped engine reads it when resumed."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str) -> dict:
        """Runs the engine alone for one command, stopped again afterwards."""
        self.send(command)
        self.resume()
        try:
            return json.loads(self._answer())
        finally:
            self.pause()

    def run_for(self, seconds: float) -> tuple[float, dict | None]:
        """Lets the engine run for up to `seconds` or until it answers, then stops
        it. Returns the time it ran and its answer (None if it has not answered)."""
        start = time.perf_counter()
        self.resume()
        try:
            answered, _, _ = select.select([self.proc.stdout], [], [], seconds)
        finally:
            self.pause()
        ran = time.perf_counter() - start
        # the answer is one small line written at once; an engine that died answers EOF
        return ran, (json.loads(self._answer()) if answered else None)

    def close(self) -> None:
        """Ends the engine (stdin closed), then whatever of its process group is
        left: vLLM's engine-core process outlives an engine that exits without
        vLLM's teardown and without killing it first (quality.leave_now does)."""
        self.resume()
        self.proc.stdin.close()
        self.proc.wait()
        self.kill()

    def kill(self) -> None:
        """Kills the engine's process group (cleanup: an engine left stopped would never exit)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone already
            pass
        self.proc.wait()


def timed_run(commands: list[tuple[Engine, str]], slice_s: float) -> dict[str, float]:
    """Gives each engine its command, then lets them take turns of slice_s, in the
    given order, until each has answered. Each answer holds "tokens"; returns each
    engine's tokens per second of the time it ran."""
    for engine, command in commands:
        engine.send(command)
    ran = {engine.name: 0.0 for engine, _ in commands}
    tokens_per_s: dict[str, float] = {}
    while len(tokens_per_s) < len(commands):
        for engine, _ in commands:
            if engine.name in tokens_per_s:
                continue
            seconds, answer = engine.run_for(slice_s)
            ran[engine.name] += seconds
            if answer is not None:
                tokens_per_s[engine.name] = answer["tokens"] / ran[engine.name]
    return tokens_per_s


def serve_commands(handle, results) -> None:
    """The engine side: READY, then one JSON answer per command line on stdin
    (``handle(command) -> dict``) written to ``results``."""
    print("READY", file=results, flush=True)
    for line in sys.stdin:
        print(json.dumps(handle(line.strip())), file=results, flush=True)
