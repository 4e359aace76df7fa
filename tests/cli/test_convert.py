"""``icv-vllm convert``: both directions through the console script, and its
errors (exit code 2, one line naming the problem)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from icv_vllm.cli import main
from icv_vllm.vectors.file_format import load_icv, write_icv

CLI = Path(sys.executable).with_name("icv-vllm")
HIDDEN = 8


def _cvec(path, layers=(1, 2, 3), extra=None):
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", len(layers))
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for layer in layers:
        w.add_tensor(f"direction.{layer}", np.full(HIDDEN, layer / 3, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_console_script_both_ways(tmp_path):
    src = _cvec(tmp_path / "happy.gguf")
    mid, back = tmp_path / "vectors" / "happy.safetensors", tmp_path / "back.gguf"
    proc = subprocess.run([str(CLI), "convert", str(src), str(mid), "--num-layers", "6"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"wrote {mid}: 6 layers x {HIDDEN}, 3 steered (layers 1-3), default mode add, "
                           f"model hint 'llama'\n")
    tensor, header = load_icv(mid)
    assert header.num_layers == 6 and header.default_mode == "add" and header.method == "gguf"
    proc = subprocess.run([str(CLI), "convert", str(mid), str(back)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {back}: 3 directions (layers 1-3) x {HIDDEN}, model hint 'llama'\n"
    assert back.read_bytes() == src.read_bytes()


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_layer_0_needs_the_flag(tmp_path, capsys):
    src = tmp_path / "v.safetensors"
    write_icv(src, torch.randn(4, HIDDEN), model="org/m", method="pca", num_pairs=5)
    code, out, err = _run(["convert", str(src), str(tmp_path / "v.gguf")], capsys)
    assert code == 2 and not (tmp_path / "v.gguf").exists()
    assert err.startswith("icv-vllm convert: error: ") and "row 0 (decoder layer 0) is nonzero" in err
    assert err.rstrip().endswith("pass --drop-layer-0") and err.count("\n") == 1
    code, out, err = _run(["convert", str(src), str(tmp_path / "v.gguf"), "--drop-layer-0", "--model-hint", "llama"],
                          capsys)
    assert code == 0, err
    assert "(nonzero layer 0 dropped)" in out and "model hint 'llama'" in out
    assert "ICV-mode vector" in err  # adding an ICV is not the ICV transform: said, not hidden


@pytest.mark.parametrize("argv, words", [
    (["a.gguf", "b.gguf"], "IN and OUT must be one .gguf and one .safetensors file"),
    (["a.txt", "b.safetensors"], "IN and OUT must be one .gguf and one .safetensors file"),
    (["missing.gguf", "b.safetensors"], "missing.gguf: no such file"),
    (["cv.gguf", "exists.safetensors"], "exists.safetensors exists; pass --force to overwrite it"),
    (["cv.gguf", "b.safetensors", "--drop-layer-0"], "apply to safetensors -> gguf only"),
    (["v.safetensors", "b.gguf", "--num-layers", "4"], "--num-layers applies to gguf -> safetensors only"),
    (["cv.gguf", "b.safetensors", "--num-layers", "2"], "steers layer 3, but the model has 2 layers"),
    (["junk.gguf", "b.safetensors"], "junk.gguf: not a GGUF file"),
    (["junk.safetensors", "b.gguf"], "junk.safetensors: not a readable safetensors file"),
    (["adir.gguf", "b.safetensors"], "adir.gguf: not a regular file"),
])
def test_bad_input_exit_2(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    _cvec(tmp_path / "cv.gguf")
    write_icv(tmp_path / "v.safetensors", torch.zeros(3, HIDDEN), model="m", method="mean", num_pairs=1)
    (tmp_path / "exists.safetensors").write_bytes(b"keep")
    (tmp_path / "junk.gguf").write_bytes(b"junk")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    (tmp_path / "adir.gguf").mkdir()
    code, out, err = _run(["convert", *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("icv-vllm convert: error: ") and words in err and err.count("\n") == 1, err
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep"
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "b.gguf").exists()


def test_force_and_ignored_keys(tmp_path, capsys):
    src = _cvec(tmp_path / "cv.gguf", extra={"controlvector.normalize": "no"})
    dst = tmp_path / "cv.safetensors"
    dst.write_bytes(b"old")
    code, out, err = _run(["convert", str(src), str(dst), "--force"], capsys)
    assert code == 0 and load_icv(dst)[1].num_layers == 4
    assert err == "note: ignored GGUF metadata (llama.cpp ignores it too): controlvector.normalize\n"
