"""Device-resident vector slots with LRU replacement (as vLLM's LoRA manager
keeps adapters): one preallocated [slots, layers, hidden] fp32 tensor.

On CUDA its address never changes, so captured CUDA graphs keep reading it; a
step that needs more distinct vectors than slots cannot be served in full.
Elsewhere (CPU) the op looks the tensor up on every call, so the bank doubles
instead: every request of a step is always steered."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch

from .resolved_spec import ResolvedChoice
from .vector_directory import file_digest, vector_path

logger = logging.getLogger("vllm.icv_vllm")


class BankFullError(RuntimeError):
    pass


class VectorBank:
    def __init__(self, directory: Path | None, max_slots: int, num_layers: int,
                 hidden_size: int, device: torch.device, growable: bool = False):
        self.directory = directory
        self.growable = growable
        self.tensor = torch.zeros(max_slots, num_layers, hidden_size, dtype=torch.float32, device=device)
        self._slots: OrderedDict[tuple[str, str], int] = OrderedDict()  # LRU order, oldest first
        self._free = list(range(max_slots - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.tensor.shape[0]

    def loaded(self) -> list[tuple[str, str]]:
        return list(self._slots)

    def slots_for(self, choices: tuple[ResolvedChoice, ...], pinned: set[int]) -> list[int]:
        """Slots holding ``choices`` (loading them if needed). ``pinned`` are
        slots the current step already uses; they are never evicted."""
        out = []
        for choice in choices:
            slot = self._slots.get(choice.key)
            if slot is None:
                slot = self._load(choice, pinned)
            else:
                self._slots.move_to_end(choice.key)
            pinned.add(slot)
            out.append(slot)
        return out

    def _take_slot(self, pinned: set[int]) -> int:
        if self._free:
            return self._free.pop()
        for key, slot in self._slots.items():
            if slot not in pinned:
                del self._slots[key]
                return slot
        if self.growable:
            old = self.capacity
            grown = torch.zeros((2 * old, *self.tensor.shape[1:]), dtype=self.tensor.dtype,
                                device=self.tensor.device)
            grown[:old].copy_(self.tensor)
            self.tensor = grown
            self._free = list(range(2 * old - 1, old, -1))
            logger.info("icv: one step uses more than %d distinct vectors; bank grown to %d slots",
                        old, 2 * old)
            return old
        raise BankFullError(
            f"one step needs more than {self.capacity} distinct vectors; raise max_slots "
            "(--additional-config '{\"icv_vllm\": {\"max_slots\": N}}' or ICV_VLLM_MAX_SLOTS)"
        )

    def _load(self, choice: ResolvedChoice, pinned: set[int]) -> int:
        from ..vectors.vector import ICVector

        if self.directory is None:
            raise FileNotFoundError("no vector directory configured in this worker")
        path = vector_path(self.directory, choice.name)
        vector = ICVector.load(path)
        if file_digest(path) != choice.digest:
            logger.warning("vector %r changed on disk after the request was admitted; "
                           "using the current file", choice.name)
        if tuple(vector.tensor.shape) != tuple(self.tensor.shape[1:]):
            raise ValueError(f"vector {choice.name!r} has shape {tuple(vector.tensor.shape)}, "
                             f"model needs {tuple(self.tensor.shape[1:])}")
        slot = self._take_slot(pinned)
        self.tensor[slot].copy_(vector.tensor)
        self._slots[choice.key] = slot
        logger.info("icv: loaded vector %r into slot %d", choice.name, slot)
        return slot
