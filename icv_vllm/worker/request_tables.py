"""Per-request vector rows, kept in step with vLLM's InputBatch rows.

As vLLM's ``InputBatch`` keeps each request's sampling state in row-indexed
arrays, updated when a request joins, leaves or moves (``add_request``,
``remove_request``, ``swap_states``, ``condense``), this keeps each request's
vectors: a row is parsed once, when its request joins; a step then reads the
first ``num_reqs`` rows with numpy, with no Python loop over requests (only
over the step's distinct vectors, to find their bank slots).
"""

from __future__ import annotations

import numpy as np

from ..protocol import CAPTURE_EXTRA_ARGS_KEY, MAX_VECTORS_PER_REQUEST, parse_resolved, resolved_of


class RequestTables:
    def __init__(self, max_num_reqs: int):
        self.vector_ids = np.full((max_num_reqs, MAX_VECTORS_PER_REQUEST), -1, dtype=np.int32)
        self.scales = np.zeros((max_num_reqs, MAX_VECTORS_PER_REQUEST), dtype=np.float32)
        self.steered = np.zeros(max_num_reqs, dtype=bool)
        self.capturing = np.zeros(max_num_reqs, dtype=bool)
        self.capture_ids: dict[int, str] = {}          # row -> capture id (rare)
        self.row_of: dict[str, int] = {}               # request id -> row
        self.req_at: list[str | None] = [None] * max_num_reqs
        self._id_of_digest: dict[str, int] = {}        # vector digest -> small int id
        self.digest_of_id: list[str | None] = []
        self._free_ids: list[int] = []

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
            self._id_of_digest[digest] = vid
        return vid

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
            self.vector_ids[row, : len(choices)] = [self._vector_id(c.digest) for c in choices]
            self.scales[row, : len(choices)] = [c.scale for c in choices]
            self.steered[row] = True
        capture_id = extra.get(CAPTURE_EXTRA_ARGS_KEY)
        if capture_id is not None:
            self.capturing[row] = True
            self.capture_ids[row] = str(capture_id)

    def remove(self, row: int | None, req_id: str) -> None:
        self.row_of.pop(req_id, None)
        if row is not None:
            self.clear(row)
            self.req_at[row] = None

    def clear(self, row: int) -> None:
        self.vector_ids[row] = -1
        self.scales[row] = 0.0
        self.steered[row] = False
        self.capturing[row] = False
        self.capture_ids.pop(row, None)

    def swap(self, i1: int, i2: int) -> None:
        for array in (self.vector_ids, self.scales, self.steered, self.capturing):
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
        for array in (self.vector_ids, self.scales, self.steered, self.capturing):
            array[to_row] = array[src]
        capture = self.capture_ids.pop(src, None)
        self.clear(src)
        if capture is not None:
            self.capture_ids[to_row] = capture
        self.req_at[src] = None
        self.req_at[to_row] = req_id
        self.row_of[req_id] = to_row
