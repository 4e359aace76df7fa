"""A ``.gguf`` control vector in the vector directory, served by name:
``read_vector`` finds ``name.safetensors`` or ``name.gguf``, with the same
protections as before (links kept inside the directory, special and oversize
files refused without blocking), and returns the bytes of an ``icv-vllm/1``
file that pinning accepts."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from icv_vllm import pinned_store
from icv_vllm.frontend.vector_files import known_names, max_file_bytes, read_vector
from icv_vllm.spec import ICVSpecError
from icv_vllm.vectors.file_format import ICVFileError
from icv_vllm.vectors.vector import ICVector

from ..gguf_files import layer_numbered

LAYERS, HIDDEN = 5, 8
MAX = max_file_bytes(LAYERS, HIDDEN)


def _cvec(path, layers=(1, 2), hidden=HIDDEN):
    return layer_numbered(path, layers, hidden)


@pytest.fixture
def directory(tmp_path):
    d = tmp_path / "vectors"
    d.mkdir()
    _cvec(d / "happy.gguf")
    ICVector(torch.ones(LAYERS, HIDDEN), model="m", method="mean", num_pairs=1).save(d / "polite.safetensors")
    _cvec(d / "both.gguf")
    ICVector(torch.ones(LAYERS, HIDDEN), model="m", method="mean", num_pairs=1).save(d / "both.safetensors")
    _cvec(d / "deep.gguf", layers=(1, 7))
    (d / "junk.gguf").write_bytes(b"junk")
    os.mkfifo(d / "fifo.gguf")
    (d / "adir.gguf").mkdir()
    with open(d / "huge.gguf", "wb") as f:
        f.truncate(1 << 30)
    os.symlink("happy.gguf", d / "link.gguf")
    os.symlink("gone.gguf", d / "dangling.gguf")
    _cvec(tmp_path / "outside.gguf")
    os.symlink("../outside.gguf", d / "escape.gguf")
    (d / "notes.txt").write_text("not a vector")
    return d


def test_known_names_lists_gguf_stems_once(directory):
    assert known_names(directory) == ["adir", "both", "dangling", "deep", "escape", "fifo", "happy", "huge",
                                      "junk", "link", "polite"]


def test_gguf_is_converted_padded_and_pinnable(directory, tmp_path):
    data = read_vector(directory, "happy", LAYERS, MAX)
    assert read_vector(directory, "happy", LAYERS, MAX) == data  # same bytes: one digest, one pinned copy
    assert read_vector(directory, "link", LAYERS, MAX) == data
    digest, header = pinned_store.pin(tmp_path / "pins", data)
    assert (header.num_layers, header.hidden_size, header.method, header.default_mode, header.num_pairs) == (
        LAYERS, HIDDEN, "gguf", "add", None)
    tensor = pinned_store.load_pinned(tmp_path / "pins", digest)
    expected = torch.zeros(LAYERS, HIDDEN)
    expected[1], expected[2] = 1.0, 2.0
    assert torch.equal(tensor, expected)


def test_safetensors_bytes_are_unchanged(directory):
    assert read_vector(directory, "polite", LAYERS, MAX) == (directory / "polite.safetensors").read_bytes()


def _within(seconds, fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("name, error, words", [
    ("both", ICVFileError, "both both.safetensors and both.gguf are in the vector directory"),
    ("deep", ICVFileError, "steers layer 7, but the model has 5 layers"),
    ("junk", ICVFileError, "junk.gguf: not a GGUF file"),
    ("fifo", ICVFileError, "is a FIFO"),
    ("adir", ICVFileError, "is a directory"),
    ("huge", ICVFileError, "is 1073741824 bytes"),
    ("escape", ICVSpecError, "resolves outside the vector directory"),
    ("../x", ICVSpecError, "invalid vector name"),
    ("nothing", FileNotFoundError, "no vector named 'nothing'"),
    ("dangling", FileNotFoundError, ""),
])
def test_refusals(directory, name, error, words):
    with pytest.raises(error) as info:
        _within(10, lambda: read_vector(directory, name, LAYERS, MAX))
    assert words in str(info.value), str(info.value)


def test_hidden_size_mismatch_is_left_to_admission(directory, tmp_path):
    """read_vector does not know the hidden size; the header it returns says it (admission compares shapes)."""
    _cvec(directory / "wide.gguf", hidden=HIDDEN * 2)
    _, header = pinned_store.pin(tmp_path / "pins", read_vector(directory, "wide", LAYERS, MAX))
    assert (header.num_layers, header.hidden_size) == (LAYERS, HIDDEN * 2)
