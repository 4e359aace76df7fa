"""Host work of the plugin per step (worker side), in microseconds, at 16, 64
and 256 running requests: ``SteeringRuntime.prepare_step`` (shipped vectors,
per-request rows -> step tables, copies into the persistent buffers), on a
decode step (one token per request), every request steered, K distinct
vectors; and the same with every vector on generated tokens only
(``positions=generated``: each token's position is checked). No engine: the runtime is built as ``setup`` builds it, and the
per-request rows are added as vLLM's InputBatch would add them.

    .venv/bin/python benchmarks/host_step.py [--distinct 8] [--repeats 2000] [--out benchmarks/results/host_step.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from icv_vllm.protocol import ResolvedChoice, format_resolved
from icv_vllm.worker.captures import CaptureRecorder
from icv_vllm.worker.request_tables import RequestTables
from icv_vllm.worker.runtime import SteeringRuntime
from icv_vllm.worker.step_metadata import StepMetadata
from icv_vllm.worker.vector_bank import VectorBank

LAYERS, HIDDEN, MAX_REQS = 30, 576, 256


def measure(num_reqs: int, distinct: int, repeats: int, positions: str = "all") -> float:
    runtime = SteeringRuntime()
    bank = VectorBank(64, LAYERS, HIDDEN, torch.device("cpu"), growable=True)
    digests = [f"{i:064x}" for i in range(distinct)]
    bank.add_contents({d: torch.randn(LAYERS, HIDDEN) for d in digests})
    runtime.build(bank, StepMetadata(8192, MAX_REQS, LAYERS, torch.device("cpu")), torch.bfloat16,
                  CaptureRecorder(LAYERS, lambda ids: None, torch.device("cpu")))
    tables = RequestTables(MAX_REQS, LAYERS)
    for row in range(num_reqs):
        resolved = format_resolved((ResolvedChoice("v", digests[row % distinct], 0.02, positions=positions),))
        tables.add(row, f"r{row}", SimpleNamespace(extra_args={"icv_resolved": resolved}))
    batch = SimpleNamespace(_icv_tables=tables, req_ids=[f"r{i}" for i in range(num_reqs)],
                            num_prompt_tokens=np.full(MAX_REQS, 100, np.int32),  # decode: past the prompt
                            num_computed_tokens_cpu=np.full(MAX_REQS, 120, np.int32))
    runner = SimpleNamespace(input_batch=batch, requests={})
    output = SimpleNamespace()
    tokens = np.ones(num_reqs, dtype=np.int32)
    for _ in range(50):
        runtime.prepare_step(runner, output, tokens)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runtime.prepare_step(runner, output, tokens)
        times.append(time.perf_counter() - t0)
    assert runtime.active and int((runtime.metadata.token_rows[:num_reqs] >= 0).sum()) == num_reqs
    return float(np.median(times)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results/host_step.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["| running requests | distinct vectors | µs per step (median) | with positions=generated |",
             "|---:|---:|---:|---:|"]
    for n in (16, 64, 256):
        k = min(args.distinct, n)
        lines.append(f"| {n} | {k} | {measure(n, k, args.repeats):.1f} | "
                     f"{measure(n, k, args.repeats, 'generated'):.1f} |")
    report = "\n".join(lines)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
