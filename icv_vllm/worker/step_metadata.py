"""Per-step token -> (vector slots, scales, layer bits) map in persistent buffers.

Like the LoRA punica metadata: buffers are allocated once at their maximum
size and refilled in place every step, so a compiled graph (or a captured CUDA
graph) that reads them sees each step's batch, never the batch it was traced
with. Rows beyond the step's tokens are kept at -1 (untouched), which makes
padded tokens safe. Each request has two table rows (prompt and generated
tokens; ``RequestTables``): the tables are [2, max_num_reqs, ...], and the
kernels read them flattened (request i: row i, or max_num_reqs + i).
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels import layer_bit_words
from ..protocol import ENTRY_COLUMNS


class StepMetadata:
    def __init__(self, max_num_tokens: int, max_num_reqs: int, num_layers: int, device: torch.device):
        self.max_num_reqs = max_num_reqs
        parts = (2, max_num_reqs, ENTRY_COLUMNS)
        self.token_rows = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device)
        self._slots = torch.full(parts, -1, dtype=torch.int32, device=device)
        self._scales = torch.zeros(parts, dtype=torch.float32, device=device)
        self._bits = torch.full((*parts, layer_bit_words(num_layers)), -1, dtype=torch.int32, device=device)
        # what the kernels read: the same memory, [2 R, ...]
        self.entry_slots = self._slots.view(2 * max_num_reqs, ENTRY_COLUMNS)
        self.entry_scales = self._scales.view(2 * max_num_reqs, ENTRY_COLUMNS)
        self.entry_layer_bits = self._bits.view(2 * max_num_reqs, ENTRY_COLUMNS, -1)
        self._num_filled_tokens = 0
        self._pinned = device.type == "cuda"
        # On the CPU, write through numpy views of the same memory: no torch
        # dispatch per step (the kernels read these very tensors).
        self._views = ((self.token_rows.numpy(), self._slots.numpy(), self._scales.numpy(), self._bits.numpy())
                       if device.type == "cpu" else None)

    @property
    def tables(self) -> tuple[torch.Tensor, ...]:
        """(token_rows, entry_slots, entry_scales, entry_layer_bits): the kernels' arguments."""
        return self.token_rows, self.entry_slots, self.entry_scales, self.entry_layer_bits

    def fill(self, token_rows: np.ndarray, entry_slots: np.ndarray, entry_scales: np.ndarray,
             entry_layer_bits: np.ndarray) -> None:
        """Write one step's map. ``token_rows`` [T] int32; tables [P, R, 8]
        (and [P, R, 8, W]) for the first P parts (1: prompt rows only, when
        no token names a generated row) of the first R requests."""
        n, p, r = len(token_rows), entry_slots.shape[0], entry_slots.shape[1]
        if n > self.token_rows.shape[0] or r > self.max_num_reqs:
            raise RuntimeError(
                f"step has {n} tokens / {r} requests, icv buffers hold "
                f"{self.token_rows.shape[0]} / {self.max_num_reqs}"
            )
        if self._views is not None:
            rows_view, slots_view, scales_view, bits_view = self._views
            rows_view[:n] = token_rows
            if self._num_filled_tokens > n:
                rows_view[n:self._num_filled_tokens] = -1
            self._num_filled_tokens = n
            slots_view[:p, :r] = entry_slots
            scales_view[:p, :r] = entry_scales
            bits_view[:p, :r] = entry_layer_bits
            return
        nb = self._pinned
        self.token_rows[:n].copy_(torch.from_numpy(token_rows), non_blocking=nb)
        if self._num_filled_tokens > n:
            self.token_rows[n:self._num_filled_tokens].fill_(-1)
        self._num_filled_tokens = n
        if r:
            self._slots[:p, :r].copy_(torch.from_numpy(entry_slots), non_blocking=nb)
            self._scales[:p, :r].copy_(torch.from_numpy(entry_scales), non_blocking=nb)
            self._bits[:p, :r].copy_(torch.from_numpy(entry_layer_bits), non_blocking=nb)
