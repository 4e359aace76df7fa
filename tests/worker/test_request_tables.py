"""The per-request rows follow vLLM's InputBatch: join, leave, swap, condense;
each request's entries land in its prompt / generated rows, ICV or add
columns, with their layer bits (docs/method.md §7)."""

from types import SimpleNamespace

import numpy as np

from icv_vllm.kernels import layer_mask
from icv_vllm.protocol import ResolvedChoice, format_resolved
from icv_vllm.worker.request_tables import RequestTables

A, B = "a" * 64, "b" * 64
EMPTY = [-1] * 8


def params(*choices, capture=None):
    extra = {}
    if choices:
        extra["icv_resolved"] = format_resolved(tuple(
            c if isinstance(c, ResolvedChoice) else ResolvedChoice("n", *c) for c in choices))
    if capture:
        extra["icv_capture"] = capture
    return SimpleNamespace(extra_args=extra or None)


def test_rows_are_parsed_once_and_follow_moves():
    t = RequestTables(8, num_layers=30)
    t.add(0, "r0", params((A, 0.5)))
    t.add(1, "r1", params())
    t.add(2, "r2", params((A, 1.0), (B, -2.0)))
    a, b = t.digest_of_id.index(A), t.digest_of_id.index(B)
    assert t.steered[:3].tolist() == [True, False, True] and not t.splits_positions.any()
    assert t.vector_ids[0, 2].tolist() == t.vector_ids[1, 2].tolist() == [a, b] + [-1] * 6  # prompt, generated
    assert t.scales[0, 2].tolist() == [1.0, -2.0] + [0.0] * 6
    t.swap(0, 2)
    assert t.vector_ids[1, 0].tolist() == [a, b] + [-1] * 6 and t.scales[0, 2, 0] == t.scales[1, 2, 0] == 0.5
    assert t.row_of == {"r2": 0, "r1": 1, "r0": 2}
    t.remove(1, "r1")
    t.move("r0", 1)  # condense filled the hole with the last row
    assert t.row_of == {"r2": 0, "r0": 1} and t.scales[0, 1, 0] == t.scales[1, 1, 0] == 0.5
    assert not t.steered[2] and t.vector_ids[0, 2].tolist() == t.vector_ids[1, 2].tolist() == EMPTY
    assert t.ids_in_use().tolist() == [a, b]  # counted, not scanned: still right after the moves
    t.remove(0, "r2")
    assert t.ids_in_use().tolist() == [a]
    t.remove(1, "r0")
    assert t.ids_in_use().tolist() == []


def test_options_place_entries_by_positions_mode_and_layers():
    t = RequestTables(4, num_layers=40)
    t.add(1, "r", params(ResolvedChoice("p", A, 0.1, positions="prompt"),
                         ResolvedChoice("g", B, 0.2, layers=(3, 35), positions="generated", mode="add"),
                         ResolvedChoice("all", B, -0.3, mode="add")))
    a, b = t.digest_of_id.index(A), t.digest_of_id.index(B)
    prompt, generated = (0, 1), (1, 1)
    assert t.vector_ids[prompt].tolist() == [a, -1, -1, -1, b, -1, -1, -1]
    assert t.scales[prompt][4] == np.float32(-0.3)
    assert t.vector_ids[generated].tolist() == [-1, -1, -1, -1, b, b, -1, -1]
    assert t.layer_bits[1, 1, 4].tolist() == layer_mask((3, 35), 40)
    assert t.layer_bits[1, 1, 5].tolist() == [-1, -1]
    assert t.splits_positions.tolist() == [False, True, False, False]
    t.swap(1, 3)
    assert t.vector_ids[1, 3].tolist() == [-1, -1, -1, -1, b, b, -1, -1] and t.splits_positions[3]
    assert t.layer_bits[1, 3, 4].tolist() == layer_mask((3, 35), 40) and t.layer_bits[1, 1, 4].tolist() == [-1, -1]


def test_capture_rows_and_forgotten_vectors():
    t = RequestTables(4, num_layers=30)
    t.add(0, "c", params(capture="cap-1"))
    t.add(1, "s", params((A, 0.1)))
    assert t.capturing[:2].tolist() == [True, False] and t.capture_ids == {0: "cap-1"}
    t.swap(0, 1)
    assert t.capture_ids == {1: "cap-1"}
    t.remove(0, "s")
    freed = t.forget_vectors([A])
    assert freed == [0] and t.digest_of_id[0] is None
    t.add(0, "s2", params((B, 0.1)))
    assert t.vector_ids[0, 0, 0] == 0  # the freed id is reused
    assert np.all(t.vector_ids[:, 2:] == -1)
