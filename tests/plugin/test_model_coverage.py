"""Every supported family, steered, equal to the independent HF reference
(greedy, fp32, token for token): a mixed batch with an unsteered request, a
negative scale and a two-vector mix; eager for every family, compiled for
one with a post-feed-forward norm (Llama and Qwen2 run compiled in
test_engine_steering). The families run one after another in one process
(engine start is the cost)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from icv_vllm.model_families import FAMILIES
from icv_vllm.vectors.extraction import residual_streams_at_last_token
from icv_vllm.vectors.vector import ICVector

from ..tiny_models import build_tiny_model
from .hf_reference import HFReference

SCRIPT = Path(__file__).with_name("coverage_script.py")
MAX_TOKENS = 6
TEXTS = ["the cat sat on the mat and looked at the dog", "you are so rude and I do not like it",
         "please be kind to everyone you meet today"]
SPECS = [None, "alpha:1.5", "beta:-1.5", "alpha:1.0,beta:0.7"]
# tiny-model key -> architecture; the four original families run in test_engine_steering
ARCHS = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
         "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM", "olmo2": "Olmo2ForCausalLM",
         "starcoder2": "Starcoder2ForCausalLM", "falcon": "FalconForCausalLM",
         "gpt_neox": "GPTNeoXForCausalLM", "stablelm": "StableLmForCausalLM",
         "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
         "qwen3_moe": "Qwen3MoeForCausalLM"}
COMPILED = ("gemma2",)
# Gemma 2's tiny model at the default init repeats one token whatever the vector
# (tied embeddings dominate), which would make the comparison say nothing.
BUILD_OVERRIDES = {"gemma2": {"initializer_range": 0.02}}
RUNS = [(arch, "eager") for arch in ARCHS] + [(arch, "compiled") for arch in COMPILED]


def _vectors(num_layers: int, hidden: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"alpha": torch.randn(num_layers, hidden, generator=g),
            "beta": torch.randn(num_layers, hidden, generator=g) * 3.0}


def _choices(spec, vectors):
    if not spec:
        return []
    return [(vectors[n], float(s)) for n, s in (part.split(":") for part in spec.split(","))]


@pytest.fixture(scope="module")
def coverage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coverage")
    runs, expected = [], {}
    for arch in ARCHS:
        model_dir = build_tiny_model(arch, **BUILD_OVERRIDES.get(arch, {}))
        reference = HFReference(str(model_dir))
        config = reference.model.config.get_text_config()
        vectors = _vectors(config.num_hidden_layers, config.hidden_size)
        vector_dir = tmp / f"vectors-{arch}"
        vector_dir.mkdir()
        for name, tensor in vectors.items():
            ICVector(tensor, model=str(model_dir), method="mean", num_pairs=1).save(vector_dir / f"{name}.safetensors")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
        requests = [{"prompt_ids": prompts[i % len(prompts)], "icv": s, "max_tokens": MAX_TOKENS}
                    for i, s in enumerate(SPECS)]
        expected[arch] = [reference.greedy(r["prompt_ids"], _choices(r["icv"], vectors), MAX_TOKENS)
                          for r in requests]
        expected[f"{arch}-plain"] = [reference.greedy(r["prompt_ids"], [], MAX_TOKENS) for r in requests]
        streams = residual_streams_at_last_token(reference.model, tokenizer, TEXTS[:2], progress=False)
        expected[f"{arch}-streams"] = streams[:, 1:]  # decoder layers (the embedding row is dropped)
        for mode in ("eager", "compiled") if arch in COMPILED else ("eager",):
            runs.append({"label": f"{arch}-{mode}", "model": str(model_dir), "mode": mode,
                         "vector_dir": str(vector_dir), "requests": requests,
                         "capture": prompts[:2] if mode == "eager" else None})
    cases, out = tmp / "cases.json", tmp / "out.json"
    cases.write_text(json.dumps({"runs": runs}))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(cases), str(out)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text()), expected


def test_every_family_of_the_table_is_covered():
    assert {f.architecture for f in FAMILIES} - set(ARCHS.values()) == {
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",  # test_engine_steering
        "Qwen2VLForConditionalGeneration", "Gemma3ForConditionalGeneration"}  # need torchvision (README)


@pytest.mark.parametrize("arch, mode", RUNS, ids=[f"{a}-{m}" for a, m in RUNS])
def test_family_matches_the_reference(coverage, arch, mode):
    results, expected = coverage
    run = results[f"{arch}-{mode}"]
    assert run["error"] is None, run["error"]
    assert run["token_ids"] == expected[arch]
    # the comparison means something: some steered request differs from its unsteered run
    assert any(run["token_ids"][i] != expected[f"{arch}-plain"][i] for i in range(1, len(SPECS)))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_in_server_capture_reads_the_residual_stream(coverage, arch):
    """What in-server extraction records at each decoder layer equals HF's
    residual stream there (offline extraction's hooks), for every family."""
    results, expected = coverage
    run = results[f"{arch}-eager"]
    assert run["error"] is None, run["error"]
    captured = torch.tensor(run["streams"])[:, 1:]
    torch.testing.assert_close(captured, expected[f"{arch}-streams"], atol=2e-4, rtol=2e-4)
