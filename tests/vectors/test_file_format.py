"""The vector file: round trip, and every kind of bad file refused with a
message that names the file and the problem."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from icv_vllm.vectors.file_format import FORMAT, ICVFileError, ICVHeader, load_icv, read_icv_header, write_icv
from icv_vllm.vectors.vector import ICVector

GOOD_META = {
    "format": FORMAT, "model": "org/some-model", "hidden_size": "8", "num_layers": "3",
    "method": "pca", "num_pairs": "5",
}


def _tensor(rows=3, cols=8, dtype=torch.float32):
    return torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols).div(7).to(dtype)


def _write(path, tensors=None, metadata=GOOD_META):
    save_file({"icv": _tensor()} if tensors is None else tensors, str(path), metadata=metadata)
    return path


def test_round_trip(tmp_path):
    tensor = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "sub" / "v.safetensors"
    write_icv(path, tensor, model="org/some-model", method="pca", num_pairs=5)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == GOOD_META
        assert list(f.keys()) == ["icv"]
    assert read_icv_header(path) == ICVHeader(str(path), "org/some-model", 3, 8, "pca", 5)
    loaded, header = load_icv(path)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, tensor)
    assert header.method == "pca"
    assert os.listdir(path.parent) == ["v.safetensors"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_writer_converts_to_float32_and_refuses_what_readers_refuse(tmp_path):
    write_icv(tmp_path / "a.safetensors", _tensor(dtype=torch.float64), model="m", method="mean", num_pairs=1)
    assert load_icv(tmp_path / "a.safetensors")[0].dtype == torch.float32
    bad = _tensor()
    bad[1, 2] = float("nan")
    with pytest.raises(ICVFileError, match="refusing to write non-finite"):
        write_icv(tmp_path / "b.safetensors", bad, model="m", method="mean", num_pairs=1)
    with pytest.raises(ICVFileError, match="method 'svd' is not one of"):
        write_icv(tmp_path / "c.safetensors", _tensor(), model="m", method="svd", num_pairs=1)
    with pytest.raises(ValueError, match="2-D"):
        write_icv(tmp_path / "d.safetensors", torch.zeros(4), model="m", method="mean", num_pairs=1)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_arithmetic_method_is_a_valid_file(tmp_path):
    path = _write(tmp_path / "v.safetensors", metadata={**GOOD_META, "method": "arithmetic"})
    assert read_icv_header(path).method == "arithmetic"


def test_extra_metadata_is_ignored(tmp_path):
    path = _write(tmp_path / "v.safetensors", metadata={**GOOD_META, "created_by": "someone"})
    assert read_icv_header(path).num_pairs == 5


def _meta(**changes):
    meta = {**GOOD_META, **changes}
    return {k: v for k, v in meta.items() if v is not None}


BAD_HEADERS = {
    "wrong format": (None, _meta(format="icv-vllm/0"), "format is 'icv-vllm/0'; this version reads 'icv-vllm/1'"),
    "no metadata": (None, None, "no metadata"),
    "missing model": (None, _meta(model=None), "metadata is missing 'model'"),
    "missing two keys": (None, _meta(num_pairs=None, method=None), "metadata is missing 'method', 'num_pairs'"),
    "missing format": (None, _meta(format=None), "metadata is missing 'format'"),
    "empty model": (None, _meta(model=" "), "metadata 'model' is empty"),
    "unknown method": (None, _meta(method="svd"), "method 'svd' is not one of pca, mean, arithmetic"),
    "zero layers": (None, _meta(num_layers="0"), "'num_layers' must be a positive integer, got '0'"),
    "negative pairs": (None, _meta(num_pairs="-2"), "'num_pairs' must be a positive integer, got '-2'"),
    "float hidden": (None, _meta(hidden_size="8.0"), "'hidden_size' must be a positive integer, got '8.0'"),
    "text pairs": (None, _meta(num_pairs="five"), "'num_pairs' must be a positive integer"),
    "padded int": (None, _meta(num_pairs=" 5"), "'num_pairs' must be a positive integer"),
    "shape mismatch layers": (None, _meta(num_layers="4"),
                              "tensor shape [3, 8] does not match metadata num_layers=4, hidden_size=8"),
    "shape mismatch hidden": (None, _meta(hidden_size="16"), "does not match metadata num_layers=3, hidden_size=16"),
    "one-dimensional": ({"icv": torch.zeros(24)}, GOOD_META, "must be 2-D [num_layers, hidden_size], got shape [24]"),
    "three-dimensional": ({"icv": torch.zeros(3, 8, 1)}, GOOD_META, "must be 2-D"),
    "float16": ({"icv": _tensor(dtype=torch.float16)}, GOOD_META, "dtype F16; it must be float32"),
    "bfloat16": ({"icv": _tensor(dtype=torch.bfloat16)}, GOOD_META, "dtype BF16"),
    "float64": ({"icv": _tensor(dtype=torch.float64)}, GOOD_META, "dtype F64"),
    "extra tensor": ({"icv": _tensor(), "bias": torch.zeros(8)}, GOOD_META,
                     "must hold exactly one tensor named 'icv', found ['bias', 'icv']"),
    "wrong name": ({"vector": _tensor()}, GOOD_META, "found ['vector']"),
    "no tensor": ({}, GOOD_META, "found []"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header_refused_by_header_and_load(tmp_path, case):
    tensors, metadata, message = BAD_HEADERS[case]
    path = _write(tmp_path / "bad.safetensors", tensors, metadata)
    for reader in (read_icv_header, load_icv, ICVector.load):
        with pytest.raises(ICVFileError) as err:
            reader(path)
        assert str(err.value).startswith(f"{path}: ")
        assert message in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_refused_on_load(tmp_path, value):
    tensor = _tensor()
    tensor[2, 5] = value
    tensor[0, 0] = value
    path = _write(tmp_path / "v.safetensors", {"icv": tensor})
    assert read_icv_header(path).num_layers == 3  # the header check does not read values
    for reader in (load_icv, ICVector.load):
        with pytest.raises(ICVFileError, match=r"has 2 non-finite values \(NaN or inf\)") as err:
            reader(path)
        assert str(path) in str(err.value)


def _header_bytes(metadata) -> bytes:
    header = json.dumps({"__metadata__": metadata, "icv": {"dtype": "F32", "shape": [3, 8], "data_offsets": [0, 96]}})
    return struct.pack("<Q", len(header)) + header.encode()


NOT_SAFETENSORS = {
    "text file": b"hello, this is not a tensor file at all\n",
    "empty file": b"",
    "json": b'{"icv": [1, 2, 3]}',
    "truncated data": _header_bytes(GOOD_META) + b"\0" * 50,
    "header length beyond file": struct.pack("<Q", 10_000) + b"{}",
}


@pytest.mark.parametrize("case", sorted(NOT_SAFETENSORS))
def test_not_a_safetensors_file(tmp_path, case):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(NOT_SAFETENSORS[case])
    for reader in (read_icv_header, load_icv, ICVector.load):
        with pytest.raises(ICVFileError, match="not a readable safetensors file") as err:
            reader(path)
        assert str(err.value).startswith(f"{path}: ")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ICVFileError, match=f"^{tmp_path}/nope.safetensors: no such file$"):
        read_icv_header(tmp_path / "nope.safetensors")
    with pytest.raises(ICVFileError, match="not a readable safetensors file"):
        load_icv(tmp_path)


def test_header_check_is_cheap(tmp_path):
    """The server runs it per request: it must not read the tensor data."""
    path = tmp_path / "big.safetensors"
    write_icv(path, torch.ones(80, 8192), model="m", method="mean", num_pairs=1)  # 2.6 MB
    start = time.perf_counter()
    for _ in range(200):
        read_icv_header(path)
    per_call = (time.perf_counter() - start) / 200
    assert per_call < 0.005, f"read_icv_header took {per_call * 1e3:.2f} ms"


def test_optional_metadata_default_mode_and_recommended_scale(tmp_path):
    path = tmp_path / "v.safetensors"
    write_icv(path, _tensor(), model="m", method="mean", num_pairs=2)
    header = read_icv_header(path)
    assert (header.default_mode, header.recommended_scale) == ("icv", None)
    write_icv(path, _tensor(), model="m", method="mean", num_pairs=2, default_mode="add", recommended_scale=0.025)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["default_mode"] == "add" and f.metadata()["recommended_scale"] == "0.025"
    header = read_icv_header(path)
    assert (header.default_mode, header.recommended_scale) == ("add", 0.025)
    for key, value, message in [("default_mode", "mul", "default_mode 'mul' is not one of icv, add"),
                                ("recommended_scale", "abc", "recommended_scale.*not a number"),
                                ("recommended_scale", "1e9", "recommended_scale.*between"),
                                ("recommended_scale", "0", "must not be 0")]:
        _write(path, metadata={**GOOD_META, key: value})
        with pytest.raises(ICVFileError, match=message):
            read_icv_header(path)
