"""Device-resident vector slots with LRU replacement (as vLLM's LoRA manager
keeps adapters): one preallocated [slots, layers, hidden] fp32 tensor,
filled from the contents the engine core shipped (``StepVectors``) — a
worker never reads a file.

Fixed bank (CUDA, or an explicit ``max_slots`` on any device): its address
never changes, so captured CUDA graphs keep reading it; the scheduler keeps
the distinct vectors of running requests within its size, so a step always
fits (if one ever did not, that is a bug and the step fails loudly).
Growable bank (CPU without an explicit ``max_slots``): doubles when a step
needs more distinct vectors than it holds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

logger = logging.getLogger("vllm.icv_vllm")


class BankFullError(RuntimeError):
    pass


class VectorBank:
    def __init__(self, max_slots: int, num_layers: int, hidden_size: int, device: torch.device,
                 growable: bool = False):
        self.growable = growable
        self.tensor = torch.zeros(max_slots, num_layers, hidden_size, dtype=torch.float32, device=device)
        self.contents: dict[str, torch.Tensor] = {}   # digest -> host fp32 tensor (shipped)
        self._slots: OrderedDict[str, int] = OrderedDict()  # digest -> slot, LRU order (oldest first)
        self._free = list(range(max_slots - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.tensor.shape[0]

    def loaded(self) -> list[str]:
        return list(self._slots)

    # -- contents shipped by the engine core ---------------------------------------
    def add_contents(self, added: dict) -> None:
        for digest, tensor in added.items():
            if tuple(tensor.shape) != tuple(self.tensor.shape[1:]):
                raise ValueError(f"vector {digest[:12]} has shape {tuple(tensor.shape)}, "
                                 f"the bank holds {tuple(self.tensor.shape[1:])}")
            self.contents[digest] = tensor

    def drop_contents(self, digests) -> None:
        for digest in digests:
            self.contents.pop(digest, None)
            slot = self._slots.pop(digest, None)
            if slot is not None:
                self._free.append(slot)

    # -- per step ------------------------------------------------------------------
    def slot_of(self, digest: str, pinned: set[int]) -> int:
        """The slot holding ``digest`` (loaded now if needed). ``pinned``: slots
        the current step already uses; never evicted."""
        slot = self._slots.get(digest)
        if slot is None:
            content = self.contents.get(digest)
            if content is None:
                raise RuntimeError(f"icv: vector {digest[:12]} was never shipped to this worker "
                                   "(engine core and worker disagree)")
            slot = self._take_slot(pinned)
            self.tensor[slot].copy_(content, non_blocking=False)
            self._slots[digest] = slot
        else:
            self._slots.move_to_end(digest)
        pinned.add(slot)
        return slot

    def _take_slot(self, pinned: set[int]) -> int:
        if self._free:
            return self._free.pop()
        for digest, slot in self._slots.items():
            if slot not in pinned:
                del self._slots[digest]
                return slot
        if not self.growable:
            raise BankFullError(f"icv: one step needs more than {self.capacity} distinct vectors; the "
                                "scheduler should have kept it within max_slots")
        old = self.capacity
        grown = torch.zeros((2 * old, *self.tensor.shape[1:]), dtype=self.tensor.dtype, device=self.tensor.device)
        grown[:old].copy_(self.tensor)
        self.tensor = grown
        self._free = list(range(2 * old - 1, old, -1))
        logger.info("icv: one step uses more than %d distinct vectors; bank grown to %d slots", old, 2 * old)
        return old
