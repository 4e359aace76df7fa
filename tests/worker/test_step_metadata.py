import numpy as np
import pytest
import torch

from icv_vllm.worker.step_metadata import StepMetadata


def test_fill_writes_rows_and_resets_the_tail():
    m = StepMetadata(max_num_tokens=8, max_num_reqs=3, device=torch.device("cpu"))
    address = m.token_rows.data_ptr()
    m.fill(np.array([0, 0, -1, 1, 1, 1], np.int32), np.array([[2, -1, -1, -1], [0, 1, -1, -1]], np.int32),
           np.array([[0.5, 0, 0, 0], [1.0, -2.0, 0, 0]], np.float32))
    assert m.token_rows.tolist() == [0, 0, -1, 1, 1, 1, -1, -1]
    assert m.entry_slots[:2].tolist() == [[2, -1, -1, -1], [0, 1, -1, -1]]
    m.fill(np.array([0, 0], np.int32), np.array([[1, -1, -1, -1]], np.int32), np.array([[0.3, 0, 0, 0]], np.float32))
    assert m.token_rows.tolist() == [0, 0, -1, -1, -1, -1, -1, -1]
    assert m.token_rows.data_ptr() == address  # persistent: compiled graphs keep reading it


def test_overflow_is_a_clear_error():
    m = StepMetadata(max_num_tokens=2, max_num_reqs=1, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="step has 3 tokens"):
        m.fill(np.zeros(3, np.int32), np.zeros((1, 4), np.int32), np.zeros((1, 4), np.float32))
