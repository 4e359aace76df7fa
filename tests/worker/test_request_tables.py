"""The per-request rows follow vLLM's InputBatch: join, leave, swap, condense."""

from types import SimpleNamespace

import numpy as np

from icv_vllm.protocol import ResolvedChoice, format_resolved
from icv_vllm.worker.request_tables import RequestTables

A, B = "a" * 64, "b" * 64


def params(*choices, capture=None):
    extra = {}
    if choices:
        extra["icv_resolved"] = format_resolved(tuple(ResolvedChoice("n", d, s) for d, s in choices))
    if capture:
        extra["icv_capture"] = capture
    return SimpleNamespace(extra_args=extra or None)


def test_rows_are_parsed_once_and_follow_moves():
    t = RequestTables(8)
    t.add(0, "r0", params((A, 0.5)))
    t.add(1, "r1", params())
    t.add(2, "r2", params((A, 1.0), (B, -2.0)))
    a, b = t.digest_of_id.index(A), t.digest_of_id.index(B)
    assert t.steered[:3].tolist() == [True, False, True]
    assert t.vector_ids[2].tolist() == [a, b, -1, -1]
    assert t.scales[2].tolist() == [1.0, -2.0, 0.0, 0.0]
    t.swap(0, 2)
    assert t.vector_ids[0].tolist() == [a, b, -1, -1] and t.scales[2, 0] == 0.5
    assert t.row_of == {"r2": 0, "r1": 1, "r0": 2}
    t.remove(1, "r1")
    t.move("r0", 1)  # condense filled the hole with the last row
    assert t.row_of == {"r2": 0, "r0": 1} and t.scales[1, 0] == 0.5
    assert not t.steered[2] and t.vector_ids[2].tolist() == [-1] * 4


def test_capture_rows_and_forgotten_vectors():
    t = RequestTables(4)
    t.add(0, "c", params(capture="cap-1"))
    t.add(1, "s", params((A, 0.1)))
    assert t.capturing[:2].tolist() == [True, False] and t.capture_ids == {0: "cap-1"}
    t.swap(0, 1)
    assert t.capture_ids == {1: "cap-1"}
    t.remove(0, "s")
    freed = t.forget_vectors([A])
    assert freed == [0] and t.digest_of_id[0] is None
    t.add(0, "s2", params((B, 0.1)))
    assert t.vector_ids[0, 0] == 0  # the freed id is reused
    assert np.all(t.vector_ids[2:] == -1)
