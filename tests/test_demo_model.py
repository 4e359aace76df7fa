"""The demo model builder's cheap parts (a full build takes ~20 s and runs in
scripts/setup.sh): locating the GGUF, the cache location, completeness."""

from __future__ import annotations

import json

from icv_vllm import demo_model


def test_gguf_is_found_in_the_package():
    path = demo_model.find_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("ICV_VLLM_CACHE", str(tmp_path))
    assert demo_model.default_output_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("ICV_VLLM_CACHE")
    repo = demo_model.cache_root().parent
    assert (repo / "setup.py").is_file() and demo_model.cache_root().name == ".cache"


def test_completeness_needs_every_file_and_the_marker(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    for name in demo_model.REQUIRED_FILES:
        (out / name).write_text("{}")
    assert not demo_model.is_complete(out)
    (out / demo_model.MARKER).write_text(json.dumps({"build_version": demo_model.BUILD_VERSION}))
    assert demo_model.is_complete(out)
    # complete: the command only prints the folder, no conversion
    assert demo_model.build_demo_model(out) == out
    from icv_vllm.cli import main

    assert main(["demo-model", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    (out / "tokenizer.json").unlink()
    assert not demo_model.is_complete(out)
    (out / "tokenizer.json").write_text("{}")
    (out / demo_model.MARKER).write_text(json.dumps({"build_version": demo_model.BUILD_VERSION - 1}))
    assert not demo_model.is_complete(out)
