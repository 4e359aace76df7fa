"""Device-resident vector slots with LRU replacement (as vLLM's LoRA manager
keeps adapters): one preallocated [slots, layers, hidden] fp32 tensor,
filled from the contents the engine core shipped (``StepVectors``) — a
worker never reads a file.

Vectors are addressed by the small integer ids ``RequestTables`` gives
them, so a step finds all its slots with numpy (``slots_for``): a Python
loop runs only over vectors not yet in the bank. Recency is a per-slot
"last step used" stamp; the least recently used slot not needed by the
current step is replaced.

Fixed bank (CUDA, or an explicit ``max_slots`` on any device): its address
never changes, so captured CUDA graphs keep reading it; the scheduler keeps
the distinct vectors of running requests within its size, so a step always
fits (if one ever did not, that is a bug and the step fails loudly).
Growable bank (CPU without an explicit ``max_slots``): doubles when a step
needs more distinct vectors than it holds.
"""

from __future__ import annotations

import logging

import numpy as np
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
        # vector id -> slot; its last entry stays -1, so indexing it with -1 (no vector) gives -1
        self._slot_of_id = np.full(64, -1, dtype=np.int32)
        self._id_in_slot = np.full(max_slots, -1, dtype=np.int32)  # slot -> vector id
        self._last_used = np.zeros(max_slots, dtype=np.int64)     # slot -> step stamp
        self._step = 0

    @property
    def capacity(self) -> int:
        return self.tensor.shape[0]

    def loaded(self) -> list[int]:
        """Vector ids held, least recently used first."""
        held = np.flatnonzero(self._id_in_slot >= 0)
        return self._id_in_slot[held[np.argsort(self._last_used[held], kind="stable")]].tolist()

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

    def release(self, vector_ids) -> None:
        """Ids no longer in use (``RequestTables.forget_vectors``): free their slots."""
        for vid in vector_ids:
            if vid < len(self._slot_of_id) and self._slot_of_id[vid] >= 0:
                self._id_in_slot[self._slot_of_id[vid]] = -1
                self._slot_of_id[vid] = -1

    # -- per step ------------------------------------------------------------------
    def slots_for(self, vector_ids: np.ndarray, digest_of_id: list) -> np.ndarray:
        """Slots of the step's distinct ``vector_ids`` (int array), loading the
        missing ones; returns the id -> slot table (index it with any id of
        this step, or -1 for "no vector", which maps to -1)."""
        self._step += 1
        if len(vector_ids) and vector_ids.max() >= len(self._slot_of_id) - 1:
            grown = np.full(2 * int(vector_ids.max()) + 2, -1, dtype=np.int32)
            grown[: len(self._slot_of_id)] = self._slot_of_id
            self._slot_of_id = grown
        slots = self._slot_of_id[vector_ids]
        missing = vector_ids[slots < 0]
        if len(missing):
            in_use = np.zeros(self.capacity, dtype=bool)
            in_use[slots[slots >= 0]] = True
            for vid in missing.tolist():
                digest = digest_of_id[vid]
                content = self.contents.get(digest) if digest is not None else None
                if content is None:
                    raise RuntimeError(f"icv: vector {str(digest)[:12]} was never shipped to this worker "
                                       "(engine core and worker disagree)")
                slot = self._take_slot(in_use)
                in_use = np.resize(in_use, self.capacity) if len(in_use) < self.capacity else in_use
                in_use[slot] = True
                self.tensor[slot].copy_(content)
                self._id_in_slot[slot] = vid
                self._slot_of_id[vid] = slot
            slots = self._slot_of_id[vector_ids]
        self._last_used[slots] = self._step
        return self._slot_of_id

    def _take_slot(self, in_use: np.ndarray) -> int:
        free = np.flatnonzero(self._id_in_slot < 0)
        if len(free):
            return int(free[0])
        stamps = np.where(in_use[: self.capacity], np.iinfo(np.int64).max, self._last_used)
        victim = int(np.argmin(stamps))
        if not in_use[victim]:
            self._slot_of_id[self._id_in_slot[victim]] = -1
            self._id_in_slot[victim] = -1
            return victim
        if not self.growable:
            raise BankFullError(f"icv: one step needs more than {self.capacity} distinct vectors; the "
                                "scheduler should have kept it within max_slots")
        old = self.capacity
        grown = torch.zeros((2 * old, *self.tensor.shape[1:]), dtype=self.tensor.dtype, device=self.tensor.device)
        grown[:old].copy_(self.tensor)
        self.tensor = grown
        self._id_in_slot = np.concatenate([self._id_in_slot, np.full(old, -1, dtype=np.int32)])
        self._last_used = np.concatenate([self._last_used, np.zeros(old, dtype=np.int64)])
        logger.info("icv: one step uses more than %d distinct vectors; bank grown to %d slots", old, 2 * old)
        return old
