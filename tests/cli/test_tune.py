"""``icv-vllm tune`` end to end on the tiny Llama: one engine (its own
process, as the CLI runs), a small sweep; the table is real measurements,
the recommendation follows the rule and is monotone in the bound on the
measured curve, and it is stored in the file with everything else kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from icv_vllm.tuning import Measurement, recommend
from icv_vllm.vectors.file_format import load_icv, read_icv_header

SCALES = "0.01,0.1,1,3"
BOUND = 0.5
PROMPTS = ["Describe how to make a cup of tea.", "Explain what a rainbow is.",
           "Write a short note about tomorrow's meeting.", "List the steps to plant a tree."]


def _run_tune(argv: list[str], pin_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", VLLM_DISABLE_COMPILE_CACHE="1",
               HF_HUB_OFFLINE="1", ICV_VLLM_PIN_DIR=str(pin_dir))
    env.pop("ICV_VLLM_DIR", None)
    return subprocess.run([sys.executable, "-m", "icv_vllm.cli.tune", *argv], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tuned(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-cli")
    vectors = root / "vectors"
    vectors.mkdir()
    config = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    tensor = torch.randn(config["num_hidden_layers"], config["hidden_size"], generator=torch.Generator().manual_seed(1))
    path = vectors / "polite.safetensors"
    save_file({"icv": tensor}, str(path), metadata={
        "format": "icv-vllm/1", "model": str(tiny_llama_dir), "hidden_size": str(config["hidden_size"]),
        "num_layers": str(config["num_hidden_layers"]), "method": "pca", "num_pairs": "4",
        "provenance": "made by the test"})  # a key this version does not know: kept
    prompts = root / "prompts.txt"
    prompts.write_text("# four neutral prompts\n" + "\n".join(PROMPTS) + "\n")
    run = _run_tune(["--model", str(tiny_llama_dir), "--vector", "polite", "--icv-dir", str(vectors),
                     "--prompts", str(prompts), "--scales", SCALES, "--max-tokens", "8",
                     "--max-ppl-increase", str(BOUND), "--dtype", "float32", "--max-model-len", "256", "--json"],
                    root / "pinned")
    return run, path, tensor


def test_cli_stores_the_recommendation_and_keeps_the_rest(tuned):
    run, path, tensor = tuned
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout)
    assert [p["scale"] for p in result["points"]] == [0.01, 0.1, 1.0, 3.0]
    assert 0 < result["baseline"]["tokens"] <= len(PROMPTS) * 8
    for row in [result["baseline"], *result["points"]]:
        assert row["perplexity"] > 1.0 and row["tokens"] > 0 and row["effect"] is not None
    # a random vector at λ = 3 wrecks the tiny model: the bound bites below the largest scale
    assert result["points"][-1]["ppl_increase"] > BOUND
    recommended = result["recommended_scale"]
    assert recommended is not None and recommended < 3.0 and result["stored"] is True
    assert all(p["ppl_increase"] <= BOUND for p in result["points"] if p["scale"] <= recommended)

    header = read_icv_header(path)
    assert header.recommended_scale == recommended
    assert (header.method, header.num_pairs, header.default_mode) == ("pca", 4, "icv")
    assert torch.equal(load_icv(path)[0], tensor)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["provenance"] == "made by the test"


def test_recommendation_is_monotone_in_the_bound_on_the_measured_curve(tuned):
    run, _, _ = tuned
    result = json.loads(run.stdout)
    base = result["baseline"]
    baseline = Measurement(0.0, base["perplexity"], base["tokens"], base["effect"], base["effect_samples"])
    measured = [Measurement(p["scale"], p["perplexity"], p["tokens"], p["effect"], p["effect_samples"])
                for p in result["points"]]
    assert recommend(baseline, measured, BOUND).recommended_scale == result["recommended_scale"]
    bounds = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 100, 1e6]
    picks = [recommend(baseline, measured, b).recommended_scale or 0.0 for b in bounds]
    assert picks == sorted(picks)
    assert picks[-1] == 3.0  # an unlimited bound takes the largest scale
