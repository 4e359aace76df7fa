"""Per-request vector rows, kept in step with vLLM's InputBatch rows.

As vLLM's ``InputBatch`` keeps each request's sampling state in row-indexed
arrays, updated when a request joins, leaves or moves (``add_request``,
``remove_request``, ``swap_states``, ``condense``), this keeps each request's
vectors: a row is parsed once, when its request joins; a step then reads the
first ``num_reqs`` rows with numpy, with no Python loop over requests (only
over the step's distinct vectors, to find their bank slots).

Each request has two kernel-table rows (docs/method.md §7), one per part:
``[0, i]`` holds the entries that apply to its prompt tokens, ``[1, i]``
those for generated tokens (the kernels see the [2, R] rows flattened: row
``i`` or ``R + i``); a token names one of them. Within a row, ICV entries
fill columns from 0 and add entries from ``ICV_COLUMNS``; each entry
carries its layer bits (``layer_mask``).
"""

from __future__ import annotations

import numpy as np

from ..kernels import layer_bit_words, layer_mask
from ..protocol import (CAPTURE_EXTRA_ARGS_KEY, ENTRY_COLUMNS, ICV_COLUMNS, parse_resolved,
                        resolved_of)

_PER_REQUEST = ("steered", "splits_positions", "capturing")


class RequestTables:
    def __init__(self, max_num_reqs: int, num_layers: int):
        self.num_layers = num_layers
        self.vector_ids = np.full((2, max_num_reqs, ENTRY_COLUMNS), -1, dtype=np.int32)  # [part, row, column]
        self.scales = np.zeros((2, max_num_reqs, ENTRY_COLUMNS), dtype=np.float32)
        self.layer_bits = np.full((2, max_num_reqs, ENTRY_COLUMNS, layer_bit_words(num_layers)), -1,
                                  dtype=np.int32)
        self.steered = np.zeros(max_num_reqs, dtype=bool)
        self.splits_positions = np.zeros(max_num_reqs, dtype=bool)  # prompt and generated rows differ
        self.capturing = np.zeros(max_num_reqs, dtype=bool)
        self.capture_ids: dict[int, str] = {}          # row -> capture id (rare)
        self.row_of: dict[str, int] = {}               # request id -> row
        self.req_at: list[str | None] = [None] * max_num_reqs
        self._id_of_digest: dict[str, int] = {}        # vector digest -> small int id
        self.digest_of_id: list[str | None] = []
        self._free_ids: list[int] = []
        self._id_refs = np.zeros(16, dtype=np.int32)   # vector id -> entries naming it in the rows

    # -- vector ids -------------------------------------------------------------
    def _vector_id(self, digest: str) -> int:
        vid = self._id_of_digest.get(digest)
        if vid is None:
            if self._free_ids:
                vid = self._free_ids.pop()
                self.digest_of_id[vid] = digest
            else:
                vid = len(self.digest_of_id)
                self.digest_of_id.append(digest)
                if vid == len(self._id_refs):
                    self._id_refs = np.concatenate([self._id_refs, np.zeros_like(self._id_refs)])
            self._id_of_digest[digest] = vid
        return vid

    def ids_in_use(self) -> np.ndarray:
        """Vector ids some row names (the step's distinct vectors: vLLM's
        batch holds exactly the scheduled requests), without scanning rows."""
        return np.flatnonzero(self._id_refs[: len(self.digest_of_id)])

    def forget_vectors(self, digests) -> list[int]:
        """Digests no unfinished request uses any more (the engine core said
        so); returns their freed ids."""
        freed = []
        for digest in digests:
            vid = self._id_of_digest.pop(digest, None)
            if vid is not None:
                self.digest_of_id[vid] = None
                self._free_ids.append(vid)
                freed.append(vid)
        return freed

    # -- rows, as InputBatch moves them ----------------------------------------------
    def add(self, row: int, req_id: str, sampling_params) -> None:
        self.clear(row)
        self.row_of[req_id] = row
        self.req_at[row] = req_id
        extra = sampling_params.extra_args if sampling_params is not None else None
        if not extra:
            return
        resolved = resolved_of(extra)
        if resolved is not None:
            choices = parse_resolved(resolved)
            for part, applies in ((0, "affects_prompt"), (1, "affects_generated")):
                columns = [0, ICV_COLUMNS]  # next free ICV / add column
                for c in choices:
                    if getattr(c, applies):
                        group = c.mode == "add"
                        col = columns[group]
                        columns[group] += 1
                        self.vector_ids[part, row, col] = self._vector_id(c.digest)
                        self.scales[part, row, col] = c.scale
                        self.layer_bits[part, row, col] = layer_mask(c.layers, self.num_layers)
            self._count(row, 1)
            self.steered[row] = True
            self.splits_positions[row] = any(c.positions != "all" for c in choices)
        capture_id = extra.get(CAPTURE_EXTRA_ARGS_KEY)
        if capture_id is not None:
            self.capturing[row] = True
            self.capture_ids[row] = str(capture_id)

    def remove(self, row: int | None, req_id: str) -> None:
        self.row_of.pop(req_id, None)
        if row is not None:
            self.clear(row)
            self.req_at[row] = None

    def _count(self, row: int, sign: int) -> None:
        """Add ``sign`` to the reference count of each vector id ``row`` names."""
        named = self.vector_ids[:, row]
        named = named[named >= 0]
        if len(named):
            np.add.at(self._id_refs, named, sign)

    def clear(self, row: int) -> None:
        self._count(row, -1)
        self.vector_ids[:, row] = -1
        self.scales[:, row] = 0.0
        self.layer_bits[:, row] = -1
        for name in _PER_REQUEST:
            getattr(self, name)[row] = False
        self.capture_ids.pop(row, None)

    def _by_row(self):
        """Views with the request row first, of everything indexed by row."""
        return [self.vector_ids.swapaxes(0, 1), self.scales.swapaxes(0, 1), self.layer_bits.swapaxes(0, 1),
                *(getattr(self, name) for name in _PER_REQUEST)]

    def swap(self, i1: int, i2: int) -> None:
        for array in self._by_row():
            array[[i1, i2]] = array[[i2, i1]]
        c1, c2 = self.capture_ids.pop(i1, None), self.capture_ids.pop(i2, None)
        if c1 is not None:
            self.capture_ids[i2] = c1
        if c2 is not None:
            self.capture_ids[i1] = c2
        r1, r2 = self.req_at[i1], self.req_at[i2]
        self.req_at[i1], self.req_at[i2] = r2, r1
        if r1 is not None:
            self.row_of[r1] = i2
        if r2 is not None:
            self.row_of[r2] = i1

    def move(self, req_id: str, to_row: int) -> None:
        """``req_id`` now lives in ``to_row`` (condense filled a hole with it)."""
        src = self.row_of.get(req_id)
        if src is None or src == to_row:
            return
        self.clear(to_row)
        for array in self._by_row():
            array[to_row] = array[src]
        self._count(to_row, 1)
        capture = self.capture_ids.pop(src, None)
        self.clear(src)
        if capture is not None:
            self.capture_ids[to_row] = capture
        self.req_at[src] = None
        self.req_at[to_row] = req_id
        self.row_of[req_id] = to_row
