"""ICV shift kernels (installed as ``icv_vllm.kernels``; imports nothing else
from icv_vllm, so it also runs from a bare checkout with torch + triton).

``apply_icv_shift`` is the one entry point the plugin calls, once per decoder
layer: the Triton kernel on CUDA (one launch, CUDA-graph safe), the C kernel
on the CPU (one call), the torch version where neither applies (Triton
missing or failing to compile, the C extension not built, another device).
"""

from __future__ import annotations

import logging

import torch

from . import icv_shift_cpu as cpu_kernel
from .icv_shift_cpu import icv_shift_cpu
from .icv_shift_torch import EPS, ShiftPlan, icv_shift_planned, icv_shift_torch, plan_icv_shift

try:
    from .icv_shift_triton import icv_shift_triton
except Exception:  # no triton (CPU builds); the torch path serves
    icv_shift_triton = None

logger = logging.getLogger(__name__)
_triton_broken = False

__all__ = ["EPS", "ShiftPlan", "apply_icv_shift", "cpu_kernel", "icv_shift_cpu", "icv_shift_planned",
           "icv_shift_torch",
           "icv_shift_triton", "plan_icv_shift"]


def apply_icv_shift(hidden: torch.Tensor, token_rows: torch.Tensor, entry_slots: torch.Tensor,
                    entry_scales: torch.Tensor, bank: torch.Tensor, layer: int) -> None:
    """Apply ICV_METHOD.md §2 in place to the tokens of ``hidden`` [T, D].

    token_rows int32 [>= T] (first T read; -1: untouched), entry_slots int32
    [R, 4] (-1: empty), entry_scales fp32 [R, 4] (lambda), bank fp32 [S, L, D].
    Per steered token, with its K non-empty entries (K = 0: untouched):
    x' = ||x|| normalize(x/||x|| + 1/K sum_k lam_k (1 + max(0, cos(x, -v_k))) v_k/||v_k||),
    in fp32, every norm clamped to >= EPS, cast back to hidden's dtype.
    """
    global _triton_broken
    if hidden.is_cuda and icv_shift_triton is not None and not _triton_broken:
        try:
            return icv_shift_triton(hidden, token_rows, entry_slots, entry_scales, bank, layer)
        except Exception as e:  # e.g. a GPU Triton cannot compile for: fall back, loudly, once
            _triton_broken = True
            logger.warning("icv: Triton kernel failed (%s); using the torch version", e)
    if cpu_kernel.supports(hidden):
        return icv_shift_cpu(hidden, token_rows, entry_slots, entry_scales, bank, layer)
    icv_shift_torch(hidden, token_rows, entry_slots, entry_scales, bank, layer)
