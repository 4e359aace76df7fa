"""ICV shift kernels (installed as ``icv_vllm.kernels``; imports nothing else
from icv_vllm, so it also runs from a bare checkout with torch + triton).

Three implementations of one operation (docs/method.md §2 and §7), each pure (it
knows nothing of requests or vLLM) and tested against a naive transcription:
the Triton kernel (CUDA, one launch, CUDA-graph safe), the C kernel (CPU, one
call) and the torch version (anywhere). Which one a worker uses is chosen
once at setup by ``icv_vllm.worker.shift``.
"""

from __future__ import annotations

from . import icv_shift_cpu as cpu_kernel
from .icv_shift_cpu import icv_shift_cpu
from .icv_shift_torch import (ALL_LAYERS, ENTRY_COLUMNS, EPS, ICV_COLUMNS, ShiftPlan, icv_shift_planned,
                              icv_shift_torch, layer_bit_words, layer_mask, plan_icv_shift)

try:
    from .icv_shift_triton import icv_shift_triton
except Exception:  # no triton (CPU builds); the torch path serves
    icv_shift_triton = None


__all__ = ["ALL_LAYERS", "ENTRY_COLUMNS", "EPS", "ICV_COLUMNS", "ShiftPlan", "cpu_kernel", "icv_shift_cpu",
           "icv_shift_planned", "icv_shift_torch", "icv_shift_triton", "layer_bit_words", "layer_mask",
           "plan_icv_shift"]
