"""GGUF control vectors (llama.cpp / repeng layout) <-> icv-vllm vector files.

Files here are written with the ``gguf`` library directly, as llama.cpp's
cvector-generator (INT32 layer_count, direction.1..L-1 in order) and repeng's
``ControlVector.export_gguf`` (UINT32 layer_count, directions in its dict
order, highest first) write them."""

from __future__ import annotations

import json
import time

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from icv_vllm.vectors.file_format import ICVFileError, load_icv, write_icv
from icv_vllm.vectors.gguf_format import (LAYOUT_KEY, LayerZeroError, gguf_to_icv_bytes, gguf_to_safetensors,
                                          parse_gguf, read_gguf, safetensors_bytes, safetensors_to_gguf,
                                          write_gguf)
from icv_vllm.vectors.vector import ICVector

from ..gguf_files import write_control_vector

HIDDEN = 16


def _directions(layers, seed=0):
    rng = np.random.default_rng(seed)
    return {layer: rng.standard_normal(HIDDEN).astype(np.float32) for layer in layers}


def _gguf_contents(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: (f.types, f.contents()) for k, f in r.fields.items()}
    tensors = [(t.name, t.tensor_type, [int(d) for d in t.shape], np.array(t.data).tobytes()) for t in r.tensors]
    return fields, tensors


@pytest.mark.parametrize("producer", ["cvector-generator", "repeng"])
def test_llama_cpp_file_round_trips_bit_exactly(tmp_path, producer):
    if producer == "cvector-generator":  # direction.1..n_layer-1, INT32 count
        directions, count_type, hint = _directions(range(1, 6)), "int32", "llama"
    else:  # repeng: hidden_layers = range(-1, -n, -1) -> n-1 .. 1, UINT32 count, HF model_type
        directions, count_type, hint = _directions(range(5, 0, -1)), "uint32", "mistral"
    src = write_control_vector(tmp_path / "cv.gguf", directions, hint=hint, count_type=count_type)
    mid, back = tmp_path / "cv.safetensors", tmp_path / "back.gguf"

    vector = gguf_to_safetensors(src, mid)
    tensor, header = load_icv(mid)
    assert (header.num_layers, header.hidden_size, header.method, header.num_pairs, header.default_mode,
            header.model) == (6, HIDDEN, "gguf", None, "add", hint)
    assert not tensor[0].any()  # no direction for layer 0: a zero row, no change in add mode
    for layer, values in directions.items():  # direction.N is row N, bit for bit
        assert tensor[layer].numpy().tobytes() == values.tobytes()
    assert vector.layout.directions == tuple(directions)

    safetensors_to_gguf(mid, back)
    assert _gguf_contents(back) == _gguf_contents(src)
    assert back.read_bytes() == src.read_bytes()  # GGUFWriter is deterministic: the same file


def test_padding_to_the_model_and_back(tmp_path):
    directions = _directions([2, 4])
    src = write_control_vector(tmp_path / "cv.gguf", directions, layer_count=30)  # layer_count is not read
    vector = read_gguf(src, num_layers=8)
    assert vector.tensor.shape == (8, HIDDEN)
    assert [int(r) for r in torch.nonzero(vector.tensor.abs().sum(1)).flatten()] == [2, 4]
    assert vector.layout.layer_count == 30
    gguf_to_safetensors(src, tmp_path / "cv.safetensors", num_layers=8)
    safetensors_to_gguf(tmp_path / "cv.safetensors", tmp_path / "back.gguf")
    assert (tmp_path / "back.gguf").read_bytes() == src.read_bytes()


def test_served_bytes_are_deterministic_and_valid(tmp_path):
    """The same GGUF always gives the same vector-file bytes (one pinned copy)."""
    data = write_control_vector(tmp_path / "cv.gguf", _directions([1, 2, 3])).read_bytes()
    first, vector = gguf_to_icv_bytes(data, "cv.gguf", num_layers=5)
    assert all(gguf_to_icv_bytes(data, "cv.gguf", num_layers=5)[0] == first for _ in range(5))
    (tmp_path / "x.safetensors").write_bytes(first)
    tensor, header = load_icv(tmp_path / "x.safetensors")
    assert torch.equal(tensor, vector.tensor) and header.num_layers == 5
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[LAYOUT_KEY])["directions"] == [1, 2, 3]
    gguf_to_safetensors(tmp_path / "cv.gguf", tmp_path / "cli.safetensors", num_layers=5)
    assert (tmp_path / "cli.safetensors").read_bytes() == first  # the CLI writes the served bytes


def test_repeng_direction_0_is_row_0(tmp_path):
    """repeng writes direction.0 for a vector trained on block 0 (llama.cpp refuses such a file)."""
    directions = _directions([0, 1, 2])
    vector = read_gguf(write_control_vector(tmp_path / "cv.gguf", directions))
    assert vector.tensor[0].numpy().tobytes() == directions[0].tobytes()
    gguf_to_safetensors(tmp_path / "cv.gguf", tmp_path / "cv.safetensors")
    with pytest.raises(LayerZeroError, match="row 0 .* is nonzero"):
        safetensors_to_gguf(tmp_path / "cv.safetensors", tmp_path / "back.gguf")
    assert not (tmp_path / "back.gguf").exists()
    safetensors_to_gguf(tmp_path / "cv.safetensors", tmp_path / "back.gguf", drop_layer_0=True)
    back = read_gguf(tmp_path / "back.gguf")
    assert back.layout.directions == (1, 2) and not back.tensor[0].any()


def test_native_vector_needs_drop_layer_0(tmp_path):
    """An extracted ICV steers every layer, 0 included: never dropped silently."""
    t = torch.randn(4, HIDDEN)
    write_icv(tmp_path / "v.safetensors", t, model="org/model", method="pca", num_pairs=5)
    with pytest.raises(LayerZeroError, match="drop it explicitly"):
        safetensors_to_gguf(tmp_path / "v.safetensors", tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
    layout, header, dropped = safetensors_to_gguf(tmp_path / "v.safetensors", tmp_path / "v.gguf",
                                                  model_hint="llama", drop_layer_0=True)
    assert dropped and layout.directions == (1, 2, 3) and layout.layer_count == 3
    fields, tensors = _gguf_contents(tmp_path / "v.gguf")
    assert fields["general.architecture"][1] == "controlvector"
    assert fields["controlvector.model_hint"][1] == "llama"
    assert fields["controlvector.layer_count"] == ([gguf.GGUFValueType.INT32], 3)
    assert [name for name, *_ in tensors] == ["direction.1", "direction.2", "direction.3"]
    for (name, ttype, shape, raw), row in zip(tensors, t[1:]):
        assert ttype == gguf.GGMLQuantizationType.F32 and shape == [HIDDEN]
        assert raw == row.numpy().tobytes()
    # a vector whose row 0 is zero needs no flag; default hint is the vector's model
    t[0] = 0
    write_icv(tmp_path / "z.safetensors", t, model="org/model", method="pca", num_pairs=5)
    _, _, dropped = safetensors_to_gguf(tmp_path / "z.safetensors", tmp_path / "z.gguf")
    assert not dropped and _gguf_contents(tmp_path / "z.gguf")[0]["controlvector.model_hint"][1] == "org/model"


def test_edited_import_falls_back_to_the_full_layout(tmp_path):
    """A stored layout that no longer describes the tensor is not used: no row is lost."""
    src = write_control_vector(tmp_path / "cv.gguf", _directions([2]))
    vector = read_gguf(src, num_layers=4)
    edited = vector.tensor.clone()
    edited[3] = 1.0
    from icv_vllm.vectors.gguf_format import icv_metadata

    (tmp_path / "e.safetensors").write_bytes(safetensors_bytes(edited, icv_metadata(vector)))
    layout, _, _ = safetensors_to_gguf(tmp_path / "e.safetensors", tmp_path / "e.gguf")
    assert layout.directions == (1, 2, 3)
    assert torch.equal(read_gguf(tmp_path / "e.gguf").tensor, edited)


def test_imported_vector_in_python(tmp_path):
    src = write_control_vector(tmp_path / "cv.gguf", _directions([1, 2]))
    gguf_to_safetensors(src, tmp_path / "cv.safetensors")
    v = ICVector.load(tmp_path / "cv.safetensors")
    assert (v.method, v.num_pairs, v.default_mode) == ("gguf", None, "add")
    doubled = v * 2
    assert (doubled.method, doubled.num_pairs, doubled.default_mode) == ("arithmetic", None, "add")
    doubled.save(tmp_path / "d.safetensors")
    assert load_icv(tmp_path / "d.safetensors")[1].default_mode == "add"
    assert (v + v).num_pairs is None
    icv = ICVector(torch.ones(3, HIDDEN), model="llama", method="mean", num_pairs=2)
    with pytest.raises(ValueError, match="different default modes"):
        v + icv
    with pytest.raises(ValueError, match="num_pairs is required"):
        ICVector(torch.ones(3, HIDDEN), model="m", method="pca", num_pairs=None)


# -- malformed files ------------------------------------------------------------------------------

def _good(tmp_path, **kw):
    return write_control_vector(tmp_path / "cv.gguf", _directions([1, 2]), **kw)


def _raw(tmp_path, name, tensors, arch="controlvector"):
    """Tensors of any type and shape (GGUFWriter is given numpy arrays as they are)."""
    w = gguf.GGUFWriter(str(tmp_path / name), arch)
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", len(tensors))
    for tname, values in tensors.items():
        w.add_tensor(tname, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / name


def _f32(n=HIDDEN):
    return np.ones(n, dtype=np.float32)


@pytest.mark.parametrize("case, words", [
    ("not gguf", "not a GGUF file"),
    ("truncated", "truncated"),
    ("model gguf", "architecture 'llama', not a control vector"),
    ("no hint", "missing 'controlvector.model_hint'"),
    ("int hint", "'controlvector.model_hint' must be a string"),
    ("string count", "'controlvector.layer_count' must be an integer"),
    ("no tensors", "holds no direction tensors"),
    ("other tensor", "tensor 'blk.0.attn_q.weight' is not a control vector direction"),
    ("leading zero", "tensor 'direction.03' is not a control vector direction"),
    ("negative", "tensor 'direction.-1' is not a control vector direction"),
    ("f16", "tensor 'direction.1' has type F16; directions must be F32"),
    ("f64", "tensor 'direction.1' has type F64; directions must be F32"),
    ("2-D", "tensor 'direction.1' has shape [16, 2]; directions must be 1-D"),
    ("sizes", "tensor 'direction.2' has 8 values but direction.1 has 16"),
    ("nan", "tensor 'direction.2' has 1 non-finite values"),
    ("inf", "tensor 'direction.1' has 2 non-finite values"),
    ("duplicate", "duplicated tensor with name direction.1"),
    ("big array", "metadata arrays of more than 4096 elements"),
    ("beyond", "tensor direction.5 steers layer 5, but the model has 4 layers (0..3)"),
])
def test_malformed_files_are_refused_with_reasons(tmp_path, case, words):
    path = tmp_path / "cv.gguf"
    num_layers = None
    if case == "not gguf":
        path.write_bytes(b"GGML" + b"\0" * 40)
    elif case == "truncated":
        path.write_bytes(_good(tmp_path).read_bytes()[:60])
    elif case == "model gguf":
        path = _raw(tmp_path, "m.gguf", {"blk.0.attn_q.weight": _f32()}, arch="llama")
    elif case == "no hint":
        write_control_vector(path, _directions([1]), hint=None)
    elif case == "int hint":
        w = gguf.GGUFWriter(str(path), "controlvector")
        w.add_uint32("controlvector.model_hint", 3)
        w.add_tensor("direction.1", _f32())
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    elif case == "string count":
        write_control_vector(path, _directions([1]), count_type="string", layer_count="1")
    elif case == "no tensors":
        write_control_vector(path, {})
    elif case == "other tensor":
        path = _raw(tmp_path, "x.gguf", {"direction.1": _f32(), "blk.0.attn_q.weight": _f32()})
    elif case == "leading zero":
        path = _raw(tmp_path, "x.gguf", {"direction.03": _f32()})
    elif case == "negative":
        path = _raw(tmp_path, "x.gguf", {"direction.-1": _f32()})
    elif case == "f16":
        path = _raw(tmp_path, "x.gguf", {"direction.1": _f32().astype(np.float16)})
    elif case == "f64":
        path = _raw(tmp_path, "x.gguf", {"direction.1": _f32().astype(np.float64)})
    elif case == "2-D":
        path = _raw(tmp_path, "x.gguf", {"direction.1": np.ones((2, HIDDEN), dtype=np.float32)})
    elif case == "sizes":
        path = _raw(tmp_path, "x.gguf", {"direction.1": _f32(), "direction.2": _f32(8)})
    elif case == "nan":
        bad = _f32()
        bad[3] = np.nan
        path = _raw(tmp_path, "x.gguf", {"direction.1": _f32(), "direction.2": bad})
    elif case == "inf":
        bad = _f32()
        bad[:2] = [np.inf, -np.inf]
        path = _raw(tmp_path, "x.gguf", {"direction.1": bad})
    elif case == "duplicate":  # GGUFWriter refuses duplicate names: rename direction.2 in the bytes
        data = _raw(tmp_path, "x.gguf", {"direction.1": _f32(), "direction.2": _f32()}).read_bytes()
        assert data.count(b"direction.2") == 1
        path.write_bytes(data.replace(b"direction.2", b"direction.1"))
    elif case == "big array":
        w = gguf.GGUFWriter(str(path), "controlvector")
        w.add_string("controlvector.model_hint", "llama")
        w.add_array("controlvector.junk", list(range(100_000)))
        w.add_tensor("direction.1", _f32())
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    elif case == "beyond":
        write_control_vector(path, _directions([1, 5]))
        num_layers = 4
    start = time.monotonic()
    with pytest.raises(ICVFileError) as info:
        read_gguf(path, num_layers=num_layers)
    assert time.monotonic() - start < 2  # refused from the header, not after parsing 100k elements
    assert str(info.value).startswith(f"{path}: ") and words in str(info.value), str(info.value)


def test_unknown_keys_are_reported_not_refused(tmp_path):
    path = write_control_vector(tmp_path / "cv.gguf", _directions([1]), extra={"controlvector.method": "pca"})
    assert read_gguf(path).ignored_keys == ("controlvector.method",)


def test_no_layer_count_round_trips(tmp_path):
    """llama.cpp does not read layer_count; a file without it is read, and written back without it."""
    src = write_control_vector(tmp_path / "cv.gguf", _directions([1, 3]), count_type=None)
    gguf_to_safetensors(src, tmp_path / "cv.safetensors")
    safetensors_to_gguf(tmp_path / "cv.safetensors", tmp_path / "back.gguf")
    assert (tmp_path / "back.gguf").read_bytes() == src.read_bytes()


def test_big_endian_is_refused(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector", endianess=gguf.GGUFEndian.BIG)
    w.add_string("controlvector.model_hint", "llama")
    w.add_tensor("direction.1", _f32())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ICVFileError, match="big-endian"):
        read_gguf(path)


def test_parse_refuses_bytes_without_touching_a_path():
    with pytest.raises(ICVFileError, match=r"^name\.gguf: not a GGUF file"):
        parse_gguf(b"", "name.gguf")


def test_write_refuses_bad_tensors(tmp_path):
    with pytest.raises(ICVFileError, match="non-finite"):
        write_gguf(tmp_path / "x.gguf", torch.tensor([[0.0], [float("nan")]]), model_hint="llama")
    with pytest.raises(ICVFileError, match="no layer to write"):
        write_gguf(tmp_path / "x.gguf", torch.zeros(1, 4), model_hint="llama")
    assert not list(tmp_path.iterdir())


def test_without_the_gguf_package_the_error_says_so(tmp_path, monkeypatch):
    data = write_control_vector(tmp_path / "cv.gguf", _directions([1])).read_bytes()
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ICVFileError, match=r"cv\.gguf: GGUF control vectors need the 'gguf' package"):
        parse_gguf(data, "cv.gguf")
