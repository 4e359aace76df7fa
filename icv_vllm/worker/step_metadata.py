"""Per-step token -> (vector slots, scales) map in persistent buffers.

Like the LoRA punica metadata: buffers are allocated once at their maximum
size and refilled in place every step, so a compiled graph (or a captured CUDA
graph) that reads them sees each step's batch, never the batch it was traced
with. Rows beyond the step's tokens are kept at -1 (untouched), which makes
padded tokens safe.
"""

from __future__ import annotations

import numpy as np
import torch

from ..protocol import MAX_VECTORS_PER_REQUEST as ENTRIES_PER_REQUEST  # the kernels' table width


class StepMetadata:
    def __init__(self, max_num_tokens: int, max_num_reqs: int, device: torch.device):
        self.token_rows = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device)
        self.entry_slots = torch.full((max_num_reqs, ENTRIES_PER_REQUEST), -1, dtype=torch.int32, device=device)
        self.entry_scales = torch.zeros((max_num_reqs, ENTRIES_PER_REQUEST), dtype=torch.float32, device=device)
        self._num_filled_tokens = 0
        self._pinned = device.type == "cuda"
        # On the CPU, write through numpy views of the same memory: no torch
        # dispatch per step (the kernels read these very tensors).
        self._views = ((self.token_rows.numpy(), self.entry_slots.numpy(), self.entry_scales.numpy())
                       if device.type == "cpu" else None)

    def fill(self, token_rows: np.ndarray, entry_slots: np.ndarray, entry_scales: np.ndarray) -> None:
        """Write one step's map. ``token_rows`` [T] int32, tables [R, 4]."""
        n, r = len(token_rows), len(entry_slots)
        if n > self.token_rows.shape[0] or r > self.entry_slots.shape[0]:
            raise RuntimeError(
                f"step has {n} tokens / {r} requests, icv buffers hold "
                f"{self.token_rows.shape[0]} / {self.entry_slots.shape[0]}"
            )
        if self._views is not None:
            rows_view, slots_view, scales_view = self._views
            rows_view[:n] = token_rows
            if self._num_filled_tokens > n:
                rows_view[n:self._num_filled_tokens] = -1
            self._num_filled_tokens = n
            slots_view[:r] = entry_slots
            scales_view[:r] = entry_scales
            return
        nb = self._pinned
        self.token_rows[:n].copy_(torch.from_numpy(token_rows), non_blocking=nb)
        if self._num_filled_tokens > n:
            self.token_rows[n:self._num_filled_tokens].fill_(-1)
        self._num_filled_tokens = n
        if r:
            self.entry_slots[:r].copy_(torch.from_numpy(entry_slots), non_blocking=nb)
            self.entry_scales[:r].copy_(torch.from_numpy(entry_scales), non_blocking=nb)
