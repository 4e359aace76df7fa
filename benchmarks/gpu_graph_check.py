"""CUDA-graph safety of the steering op, and the kernel's bandwidth (torch + triton only).

A small stack of "decoder layers" (a linear feed-forward block whose output
goes through ``torch.ops.icv_vllm.steer_``, then the residual add) runs on
the worker's real state: ``SteeringRuntime`` with a fixed bank, the
per-request rows (``RequestTables``) and ``prepare_step`` filling the
persistent step tables, as in an engine. The stack is captured once in a
CUDA graph; then, for several steps, the tables change (other requests,
vectors, scales, layers, positions, modes) and the bank's contents change
(vectors shipped into slots, others dropped), and each replay must equal an
eager run of the same step bit for bit, in bf16, fp16 and fp32. Then the
kernel's time at T = 8192, D = 4096 (bf16, every token steered) is compared
with a device copy of the same tensor (both read and write T x D once).

Without CUDA (e.g. on the CPU machine) the same steps run eagerly on the CPU
and are checked against the torch reference path; graph and bandwidth parts
are skipped and say so.

    python benchmarks/gpu_graph_check.py [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from icv_vllm.kernels import ENTRY_COLUMNS, icv_shift_torch, icv_shift_triton
from icv_vllm.protocol import STEP_VECTORS_ATTR, ResolvedChoice, StepVectors, format_resolved
from icv_vllm.worker import steering_op  # noqa: F401  (registers torch.ops.icv_vllm.steer_)
from icv_vllm.worker.captures import CaptureRecorder
from icv_vllm.worker.request_tables import RequestTables
from icv_vllm.worker.runtime import RUNTIME
from icv_vllm.worker.step_metadata import StepMetadata
from icv_vllm.worker.vector_bank import VectorBank

LAYERS, HIDDEN, MAX_REQS, MAX_TOKENS, SLOTS = 6, 256, 8, 64, 4
DIGESTS = [f"{i:064x}" for i in range(6)]

# Each step: (request selections, prompt lengths, computed tokens, scheduled tokens, vectors to ship, to drop)
STEPS = [
    ([[("a", 0, 0.8, None, "all", "icv")], None, [("b", 1, -0.5, (1, 3), "all", "icv")]],
     [12, 10, 9], [0, 0, 0], [12, 10, 9], [0, 1], []),
    ([[("a", 0, 0.8, None, "generated", "icv"), ("b", 1, 0.3, None, "all", "add")],
      [("c", 2, 1.5, (0, 5), "prompt", "icv")], None, [("b", 1, -0.2, None, "all", "add")]],
     [12, 7, 9, 4], [12, 3, 9, 0], [1, 4, 1, 4], [2], []),
    ([[("c", 2, 0.4, None, "all", "icv"), ("d", 3, 0.9, (2,), "all", "icv"), ("e", 4, 0.05, None, "all", "add")],
      [("d", 3, -1.0, None, "generated", "add")]],
     [5, 6], [5, 2], [1, 5], [3, 4], [0]),
]


def _runtime(device: torch.device, dtype: torch.dtype) -> None:
    """RUNTIME as ``setup`` builds it, with a fixed bank (as on CUDA)."""
    RUNTIME.build(VectorBank(SLOTS, LAYERS, HIDDEN, device, growable=False),
                  StepMetadata(MAX_TOKENS, MAX_REQS, LAYERS, device), dtype,
                  CaptureRecorder(LAYERS, lambda ids: None, device))


def _prepare(step, tables: RequestTables, contents: dict) -> int:
    """Rows of this step's requests, shipped/dropped contents, then ``prepare_step``; returns T."""
    selections, prompts, computed, scheduled, ship, drop = step
    for row in range(MAX_REQS):
        tables.remove(row, f"r{row}")
    for row, selection in enumerate(selections):
        extra = None
        if selection:
            extra = {"icv_resolved": format_resolved(tuple(
                ResolvedChoice(name, DIGESTS[d], scale, layers, positions, mode)
                for name, d, scale, layers, positions, mode in selection))}
        tables.add(row, f"r{row}", SimpleNamespace(extra_args=extra))
    n = len(selections)
    batch = SimpleNamespace(_icv_tables=tables, req_ids=[f"r{i}" for i in range(n)],
                            num_prompt_tokens=np.array(prompts + [0] * (MAX_REQS - n), np.int32),
                            num_computed_tokens_cpu=np.array(computed + [0] * (MAX_REQS - n), np.int32))
    output = SimpleNamespace(**{STEP_VECTORS_ATTR: StepVectors(
        added={DIGESTS[d]: contents[DIGESTS[d]] for d in ship}, dropped=[DIGESTS[d] for d in drop])})
    RUNTIME.prepare_step(SimpleNamespace(input_batch=batch, requests={}), output,
                         np.array(scheduled, np.int32))
    return int(sum(scheduled))


class Stack(torch.nn.Module):
    def __init__(self, dtype, device):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weights = [(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5).to(device, dtype)
                        for _ in range(LAYERS)]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer, w in enumerate(self.weights):
            ff = h @ w
            torch.ops.icv_vllm.steer_(ff, layer)
            h = h + ff
        return h


def _reference(stack: Stack, h: torch.Tensor) -> torch.Tensor:
    """The same stack with the torch reference path reading the same tables."""
    m, bank = RUNTIME.metadata, RUNTIME.bank.tensor
    for layer, w in enumerate(stack.weights):
        ff = h @ w
        icv_shift_torch(ff, *m.tables, bank, layer)
        h = h + ff
    return h


def check_dtype(dtype: torch.dtype, device: torch.device) -> list[str]:
    _runtime(device, dtype)
    g = torch.Generator().manual_seed(1)
    contents = {d: torch.randn(LAYERS, HIDDEN, generator=g) for d in DIGESTS}
    tables = RequestTables(MAX_REQS, LAYERS)
    stack = Stack(dtype, device)
    static_in = torch.zeros(MAX_TOKENS, HIDDEN, dtype=dtype, device=device)
    inputs = torch.randn(MAX_TOKENS, HIDDEN, generator=g).to(device, dtype)
    graph = static_out = None
    lines = []
    for i, step in enumerate(STEPS):
        T = _prepare(step, tables, contents)
        static_in.copy_(inputs)
        eager = stack(static_in.clone())
        reference = _reference(stack, static_in.clone())
        ref_err = float((eager.float() - reference.float()).abs().max())
        if device.type == "cuda":
            if graph is None:  # captured once, at the first step's tables
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    stack(static_in.clone())  # warm up (Triton compiles) outside the capture
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = stack(static_in)
            static_in.copy_(inputs)
            graph.replay()
            torch.cuda.synchronize()
            same = torch.equal(static_out, eager)
            lines.append(f"| {str(dtype)[6:]} | {i} | {T} | {'yes' if same else 'NO'} | "
                         f"{float((static_out.float() - eager.float()).abs().max()):.3g} | {ref_err:.3g} |")
            if not same:
                raise SystemExit(f"graph replay differs from eager at step {i} ({dtype})")
        else:
            lines.append(f"| {str(dtype)[6:]} | {i} | {T} | (no CUDA) | - | {ref_err:.3g} |")
        steered = eager[:T].float() - _unsteered(stack, static_in)[:T].float()
        if not bool(steered.abs().max() > 0):
            raise SystemExit(f"step {i}: no token was steered; the check would prove nothing")
        tol = {torch.float32: 1e-4, torch.float16: 0.1, torch.bfloat16: 0.5}[dtype]
        if ref_err > tol * max(1.0, float(reference.float().abs().max())):
            raise SystemExit(f"step {i} ({dtype}): kernel and torch reference differ by {ref_err}")
    return lines


def _unsteered(stack: Stack, h: torch.Tensor) -> torch.Tensor:
    for w in stack.weights:
        h = h + h @ w
    return h


def bandwidth() -> str:
    """Kernel time vs a device copy at T = 8192, D = 4096, bf16, every token steered by one vector."""
    T, D = 8192, 4096
    h = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    rows = torch.zeros(T, dtype=torch.int32, device="cuda")
    slots = torch.full((1, ENTRY_COLUMNS), -1, dtype=torch.int32, device="cuda")
    slots[0, 0] = 0
    scales = torch.zeros(1, ENTRY_COLUMNS, device="cuda")
    scales[0, 0] = 1e-3
    bits = torch.full((1, ENTRY_COLUMNS, 1), -1, dtype=torch.int32, device="cuda")
    bank = torch.randn(1, 1, D, device="cuda")

    def timed(fn, n=50):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n

    dst = torch.empty_like(h)
    t_copy = timed(lambda: dst.copy_(h))
    t_kernel = timed(lambda: icv_shift_triton(h, rows, slots, scales, bits, bank, 0))
    gbs = 2 * T * D * 2 / (t_kernel * 1e-3) / 1e9
    return (f"T = {T}, D = {D}, bf16: kernel {t_kernel * 1e3:.1f} µs ({gbs:.0f} GB/s), device copy "
            f"{t_copy * 1e3:.1f} µs: the kernel runs at **{t_copy / t_kernel:.2f}** of a copy's bandwidth")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and icv_shift_triton is None:
        print("triton is missing: the CUDA path cannot run", file=sys.stderr)
        return 1
    lines = ["## Steering op under a CUDA graph", "",
             "| dtype | step | tokens | replay == eager | max |replay - eager| | max |eager - torch reference| |",
             "|---|---:|---:|---|---:|---:|"]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        lines += check_dtype(dtype, device)
    lines += ["", "## Bandwidth", "",
              bandwidth() if device.type == "cuda" else "skipped: no CUDA device"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
