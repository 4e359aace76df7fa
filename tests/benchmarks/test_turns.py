"""benchmarks/turns.py without vLLM: fake engines that burn CPU take turns, each counted only
for the time it ran."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from .processes import ends_soon

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
turns = importlib.import_module("turns")

# Answers "time K" after `WORK_S` seconds of its own CPU time, logging a timestamp every few ms.
FAKE_ENGINE = """
import json, sys, time
stamps = open(sys.argv[1], "w")
for line in sys.stdin:
    what, k = line.split()
    start = time.process_time()
    while time.process_time() - start < {work_s}:
        until = time.process_time() + 0.002
        while time.process_time() < until:
            pass
        stamps.write(f"{{time.monotonic()}}\\n")
    stamps.flush()
    print(json.dumps({{"k": int(k), "tokens": 100}}), flush=True)
"""
WORK_S = 0.4
SLICE_S = 0.1


def _blocks(labelled: list[tuple[float, str]]) -> list[int]:
    """Lengths of the runs of consecutive stamps from one engine, in time order."""
    lengths: list[int] = []
    previous = None
    for _, name in sorted(labelled):
        if name == previous:
            lengths[-1] += 1
        else:
            lengths.append(1)
        previous = name
    return lengths


def test_timed_run_lets_engines_take_turns_and_counts_only_their_own_time(tmp_path):
    engines = []
    try:
        for name in ("plain", "plugin"):
            cmd = [sys.executable, "-c", FAKE_ENGINE.format(work_s=WORK_S), str(tmp_path / f"{name}.stamps")]
            engine = turns.Engine(name, cmd, {}, tmp_path / f"{name}.log")
            engine.pause()
            engines.append(engine)
        start = time.perf_counter()
        tokens_per_s = turns.timed_run([(engine, "time 8") for engine in engines], SLICE_S)
        whole = time.perf_counter() - start
    finally:
        for engine in engines:
            engine.close()

    assert set(tokens_per_s) == {"plain", "plugin"}
    ran = {name: 100 / value for name, value in tokens_per_s.items()}
    # each engine's time holds its CPU time, and the two times do not overlap
    assert min(ran.values()) >= WORK_S, ran
    assert sum(ran.values()) <= whole, (ran, whole)
    stamps = [(float(line), name) for name in ("plain", "plugin")
              for line in (tmp_path / f"{name}.stamps").read_text().split()]
    blocks = _blocks(stamps)
    # each engine computed in several turns (WORK_S is 4 turns' worth), never both at once:
    # both running together on the 2 cores would interleave their stamps one by one
    assert len(blocks) >= 4, blocks
    assert sum(blocks) / len(blocks) >= 8, blocks


def test_close_ends_what_the_engine_left_behind(tmp_path):
    """An engine that exits without vLLM's teardown leaves its engine core running;
    close() ends its whole process group."""
    leaver = ("import subprocess, sys, os\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(child.pid, flush=True)\n"
              "sys.stdin.read()\n"
              "os._exit(0)\n")
    engine = turns.Engine("leaver", [sys.executable, "-c", leaver], {}, tmp_path / "leaver.log")
    left_behind = int(engine.proc.stdout.readline())
    engine.close()
    assert ends_soon(left_behind)
