"""The worker's shift is chosen once at setup and never switches path."""

import pytest
import torch

from icv_vllm.kernels import cpu_kernel, icv_shift_torch
from icv_vllm.worker.shift import CShift, ShiftError, TorchShift, choose_shift
from icv_vllm.worker.step_metadata import StepMetadata


def filled(T=6, R=3, D=16):
    m = StepMetadata(32, 8, 2, torch.device("cpu"))
    import numpy as np

    rows = np.array([0, 0, -1, 1, 2, 2], dtype=np.int32)[:T]
    slots = np.array([[0, -1, -1, -1, -1, -1, -1, -1], [1, 0, -1, -1, 2, -1, -1, -1],
                      [2, -1, -1, -1, -1, -1, -1, -1]], dtype=np.int32)[:R]
    scales = np.array([[0.5, 0, 0, 0, 0, 0, 0, 0], [1.0, -0.3, 0, 0, 0.2, 0, 0, 0],
                       [2.0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)[:R]
    bits = np.full((R, 8, 1), -1, dtype=np.int32)
    bits[2, 0, 0] = 1  # row 2's entry: layer 0 only
    m.fill(rows, slots[None], scales[None], bits[None])
    return m


def test_cpu_choice_follows_the_build_and_the_dtype():
    m = filled()
    expected = CShift if cpu_kernel.AVAILABLE else TorchShift
    assert isinstance(choose_shift(torch.device("cpu"), torch.bfloat16, m), expected)
    assert isinstance(choose_shift(torch.device("cpu"), torch.float64, m), TorchShift)


@pytest.mark.skipif(not cpu_kernel.AVAILABLE, reason="C kernel not built")
def test_c_and_torch_shifts_agree_and_c_never_falls_back_silently():
    m = filled()
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(3, 2, 16, generator=g)
    hidden = torch.randn(6, 16, generator=g)
    a, b = hidden.clone(), hidden.clone()
    CShift(m)(a, bank, 1)
    torch_shift = TorchShift(m)
    torch_shift.new_step()
    torch_shift(b, bank, 1)
    c = hidden.clone()
    icv_shift_torch(c, *m.tables, bank, 1)
    torch.testing.assert_close(a, b)
    assert torch.equal(b, c) and not torch.equal(a, hidden)
    strided = hidden.t().contiguous().t()
    with pytest.raises(ShiftError, match="cannot take"):
        CShift(m)(strided, bank, 1)
