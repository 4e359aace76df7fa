"""ICVector: construction checks, arithmetic, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icv_vllm.vectors.file_format import read_icv_header
from icv_vllm.vectors.vector import ICVector


def _vec(seed=0, shape=(3, 8), model="m", method="pca", num_pairs=4):
    tensor = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return ICVector(tensor, model=model, method=method, num_pairs=num_pairs)


def test_properties_and_conversion():
    v = ICVector(torch.ones(3, 8, dtype=torch.float64), model="m", method="mean", num_pairs=2)
    assert (v.num_layers, v.hidden_size) == (3, 8)
    assert v.tensor.dtype == torch.float32 and v.tensor.is_contiguous()
    assert repr(v) == "ICVector(model='m', method='mean', num_pairs=2, shape=[3, 8])"


def test_arithmetic_values_and_metadata():
    a, b = _vec(0, num_pairs=4), _vec(1, num_pairs=5)
    cases = {
        "a+b": (a + b, a.tensor + b.tensor, 9),
        "a-b": (a - b, a.tensor - b.tensor, 9),
        "-a": (-a, -a.tensor, 4),
        "a*2.5": (a * 2.5, a.tensor * 2.5, 4),
        "0.5*a": (0.5 * a, a.tensor * 0.5, 4),
        "3*a": (3 * a, a.tensor * 3, 4),
        "np*a": (np.float64(0.25) * a, a.tensor * 0.25, 4),
        "a/4": (a / 4, a.tensor / 4, 4),
        "mix": (0.7 * a - b / 2, 0.7 * a.tensor - b.tensor / 2, 9),
    }
    for name, (got, expected, pairs) in cases.items():
        assert isinstance(got, ICVector), name
        torch.testing.assert_close(got.tensor, expected, msg=name)
        assert (got.method, got.model, got.num_pairs) == ("arithmetic", "m", pairs), name
    assert torch.equal(a.tensor, _vec(0).tensor)  # operands untouched


def test_arithmetic_refusals():
    a = _vec(0)
    with pytest.raises(ValueError, match=r"cannot add ICVs of shapes \[3, 8\] and \[4, 8\]"):
        a + _vec(1, shape=(4, 8))
    with pytest.raises(ValueError, match=r"cannot subtract ICVs of shapes \[3, 8\] and \[3, 16\]"):
        a - _vec(1, shape=(3, 16))
    with pytest.raises(ValueError, match="cannot add ICVs of different models: 'm' and 'other'"):
        a + _vec(1, model="other")
    with pytest.raises(ValueError, match="cannot subtract ICVs of different models"):
        a - _vec(1, model="other")
    with pytest.raises(ValueError, match="cannot scale an ICV by nan"):
        a * float("nan")
    with pytest.raises(ValueError, match="cannot scale an ICV by inf"):
        a / float("inf")
    with pytest.raises(ZeroDivisionError):
        a / 0
    for bad in (True, "2", a, torch.tensor(2.0)):
        with pytest.raises(TypeError):
            a * bad
    with pytest.raises(TypeError):
        a + 1.0
    with pytest.raises(TypeError):
        1.0 / a


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensor": torch.zeros(8)}, r"non-empty 2-D tensor .* got \(8,\)"),
        ({"tensor": torch.zeros(0, 8)}, r"got \(0, 8\)"),
        ({"tensor": [[1.0]]}, "got list"),
        ({"tensor": torch.tensor([[1.0, float("nan")]])}, "finite values"),
        ({"method": "svd"}, "method 'svd' is not one of pca, mean, arithmetic"),
        ({"num_pairs": 0}, "num_pairs must be a positive int, got 0"),
        ({"num_pairs": 2.0}, "num_pairs must be a positive int"),
        ({"num_pairs": True}, "num_pairs must be a positive int"),
        ({"model": ""}, "model must be a non-empty string"),
    ],
)
def test_constructor_refusals(kwargs, message):
    args = {"tensor": torch.zeros(2, 4), "model": "m", "method": "pca", "num_pairs": 1, **kwargs}
    tensor = args.pop("tensor")
    with pytest.raises(ValueError, match=message):
        ICVector(tensor, **args)


def test_save_load_round_trip(tmp_path):
    v = 0.5 * _vec(3) + _vec(4)
    v.save(tmp_path / "mix.safetensors")
    back = ICVector.load(tmp_path / "mix.safetensors")
    assert torch.equal(back.tensor, v.tensor)
    assert (back.model, back.method, back.num_pairs) == ("m", "arithmetic", 8)
    header = read_icv_header(tmp_path / "mix.safetensors")
    assert (header.num_layers, header.hidden_size, header.method) == (3, 8, "arithmetic")
    assert back.recommended_scale is None and header.recommended_scale is None


def test_recommended_scale_survives_load_and_save_but_not_arithmetic(tmp_path):
    tuned = ICVector(_vec(5).tensor, model="m", method="pca", num_pairs=4, recommended_scale=0.0224)
    tuned.save(tmp_path / "a.safetensors")
    back = ICVector.load(tmp_path / "a.safetensors")
    assert back.recommended_scale == 0.0224
    back.save(tmp_path / "b.safetensors")  # re-saving a tuned vector keeps its recommendation
    assert read_icv_header(tmp_path / "b.safetensors").recommended_scale == 0.0224
    assert (back + _vec(6)).recommended_scale is None and (2 * back).recommended_scale is None
    with pytest.raises(ValueError, match="recommended_scale"):
        ICVector(_vec(5).tensor, model="m", method="pca", num_pairs=4, recommended_scale=0)
