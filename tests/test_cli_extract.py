"""``icv-vllm extract`` end to end on the tiny models, and CLI dispatch."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from icv_vllm.cli import main
from icv_vllm.vectors.extraction import extract_icv
from icv_vllm.vectors.file_format import read_icv_header
from icv_vllm.vectors.pairs import read_pairs_jsonl
from icv_vllm.vectors.vector import ICVector

CLI = Path(sys.executable).with_name("icv-vllm")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _pairs_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_console_script_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "vectors" / "polite.safetensors"
    proc = subprocess.run(
        [str(CLI), "extract", "--model", str(tiny_model_dir), "--pairs", str(EXAMPLES / "polite.jsonl"),
         "--out", str(out), "--batch-size", "3", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tiny_model_dir / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    assert proc.stdout.strip() == f"wrote {out}: {layers} layers x {hidden}, method pca, 5 pairs"
    header = read_icv_header(out)
    assert (header.num_layers, header.hidden_size, header.method, header.num_pairs, header.model) == (
        layers, hidden, "pca", 5, str(tiny_model_dir))
    expected = extract_icv(tiny_model_dir, read_pairs_jsonl(EXAMPLES / "polite.jsonl"), progress=False)
    torch.testing.assert_close(ICVector.load(out).tensor, expected.tensor, rtol=1e-5, atol=1e-6)


def test_bad_pairs_file_exit_2_one_line(tiny_llama_dir, tmp_path):
    pairs = _pairs_file(tmp_path / "p.jsonl", ['{"input": "a", "target": "b"}', '{"input": "a", "targte": "b"}'])
    out = tmp_path / "v.safetensors"
    proc = subprocess.run(
        [str(CLI), "extract", "--model", str(tiny_llama_dir), "--pairs", str(pairs), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"icv-vllm extract: error: {pairs}:2: missing key 'target'\n"
    assert not out.exists()


def test_pair_empty_after_cleaning_names_its_line(tiny_llama_dir, tmp_path, capsys):
    pairs = _pairs_file(tmp_path / "p.jsonl", ['{"input": "a b", "target": "c d"}', "", '{"input": "...", "target": "ok"}'])
    code = main(["extract", "--model", str(tiny_llama_dir), "--pairs", str(pairs),
                 "--out", str(tmp_path / "v.safetensors"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"icv-vllm extract: error: {pairs}:3: 'input' is empty after removing punctuation\n"


def test_method_mean_and_no_clean(tiny_qwen2_dir, tmp_path, capsys):
    pairs = _pairs_file(tmp_path / "p.jsonl", ['{"input": "go away!", "target": "please, leave."}'])
    out = tmp_path / "v.safetensors"
    assert main(["extract", "--model", str(tiny_qwen2_dir), "--pairs", str(pairs), "--out", str(out),
                 "--method", "mean", "--no-clean", "--quiet"]) == 0
    expected = extract_icv(tiny_qwen2_dir, [("go away!", "please, leave.")], method="mean", clean=False,
                           progress=False)
    got = ICVector.load(out)
    assert got.method == "mean"
    torch.testing.assert_close(got.tensor, expected.tensor, rtol=0, atol=1e-6)


def test_missing_model_exit_2(tmp_path, capsys):
    pairs = _pairs_file(tmp_path / "p.jsonl", ['{"input": "a", "target": "b"}'])
    code = main(["extract", "--model", str(tmp_path / "no-model"), "--pairs", str(pairs),
                 "--out", str(tmp_path / "v.safetensors"), "--quiet", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"icv-vllm extract: error: cannot load model '{tmp_path / 'no-model'}'")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["extract", "--pairs", "p", "--out", "o"], "the following arguments are required: --model"),
        (["extract", "--model", "m", "--pairs", "p", "--out", "o", "--method", "svd"], "invalid choice: 'svd'"),
        (["extract", "--model", "m", "--pairs", "p", "--out", "o", "--batch-size", "0"], "must be >= 1, got 0"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_gets_its_argv_untouched(monkeypatch):
    seen = []
    fake = types.ModuleType("icv_vllm.cli.serve")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "icv_vllm.cli.serve", fake)
    argv = ["serve", "--model", "x", "--help", "--port=8001", "extract", "--", "-v"]
    assert main(argv) == 7
    assert seen == [argv[1:]]
