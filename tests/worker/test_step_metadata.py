import numpy as np
import pytest
import torch

from icv_vllm.worker.step_metadata import StepMetadata


def entries(*rows):
    """Tables for rows of (slot, scale) ICV entries; add columns empty, all layers."""
    slots = np.full((len(rows), 8), -1, np.int32)
    scales = np.zeros((len(rows), 8), np.float32)
    for i, row in enumerate(rows):
        for j, (slot, scale) in enumerate(row):
            slots[i, j], scales[i, j] = slot, scale
    return slots[None], scales[None], np.full((1, len(rows), 8, 1), -1, np.int32)  # prompt part only


def test_fill_writes_rows_and_resets_the_tail():
    m = StepMetadata(max_num_tokens=8, max_num_reqs=3, num_layers=30, device=torch.device("cpu"))
    assert m.entry_slots.shape == (6, 8) and m.entry_layer_bits.shape == (6, 8, 1)  # 2 rows per request
    address = m.token_rows.data_ptr()
    m.fill(np.array([0, 0, -1, 1, 1, 1], np.int32), *entries([(2, 0.5)], [(0, 1.0), (1, -2.0)]))
    assert m.token_rows.tolist() == [0, 0, -1, 1, 1, 1, -1, -1]
    assert m.entry_slots[:2, :4].tolist() == [[2, -1, -1, -1], [0, 1, -1, -1]]
    slots, scales, bits = entries([(1, 0.3)])
    bits[0, 0, 0, 0] = 5
    m.fill(np.array([0, 0], np.int32), slots, scales, bits)
    assert m.token_rows.tolist() == [0, 0, -1, -1, -1, -1, -1, -1]
    assert m.entry_layer_bits[0, 0, 0] == 5
    assert m.token_rows.data_ptr() == address  # persistent: compiled graphs keep reading it


def test_overflow_is_a_clear_error():
    m = StepMetadata(max_num_tokens=2, max_num_reqs=1, num_layers=4, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="step has 3 tokens"):
        m.fill(np.zeros(3, np.int32), *entries([]))


def test_generated_rows_follow_the_prompt_rows():
    m = StepMetadata(max_num_tokens=4, max_num_reqs=3, num_layers=30, device=torch.device("cpu"))
    slots, scales, bits = entries([(2, 0.5)], [(1, 0.25)])
    both = (np.concatenate([slots, slots + 1]), np.concatenate([scales, scales]), np.concatenate([bits, bits]))
    m.fill(np.array([0, 3, 4], np.int32), *both)
    assert m.entry_slots[:5, 0].tolist() == [2, 1, -1, 3, 2]  # request i: rows i and 3 + i
