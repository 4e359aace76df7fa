"""Trust in operation, end to end against the HF reference: a request runs
with exactly the bytes it was admitted with, whatever happens to the vector
directory; the prefix cache keys exactly what was applied; a fixed slot
budget is scheduled (requests wait, then run steered); a vector whose
pinned copy cannot be loaded ends its request with an error; and without a
vector directory the plugin changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from icv_vllm.vectors.vector import ICVector

from .hf_reference import HFReference
from .test_engine_steering import TEXTS, _vectors, run_cases

LONG_TOKENS = 24
IN_FLIGHT = 12


@pytest.fixture(scope="module")
def setting(tiny_llama_dir, tmp_path_factory):
    reference = HFReference(str(tiny_llama_dir))
    config = reference.model.config
    vectors = _vectors(config.num_hidden_layers, config.hidden_size)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    long_prompt = tokenizer(" ".join(TEXTS * 6))["input_ids"]
    return reference, vectors, prompts, long_prompt, tmp_path_factory


def _vector_dir(tmp, vectors: dict, model) -> Path:
    """``tmp/vectors`` holding ``vectors`` ({name: tensor}) as vector files."""
    directory = tmp / "vectors"
    directory.mkdir()
    for name, tensor in vectors.items():
        ICVector(tensor, model=str(model), method="mean", num_pairs=1).save(directory / f"{name}.safetensors")
    return directory


@pytest.fixture(scope="module")
def operated_run(setting, tiny_llama_dir):
    reference, vectors, prompts, long_prompt, factory = setting
    tmp = factory.mktemp("operation")
    directory = _vector_dir(tmp, vectors, tiny_llama_dir)
    for name in ("mut", "pfx"):
        shutil.copyfile(directory / "alpha.safetensors", directory / f"{name}.safetensors")
    shutil.copyfile(directory / "gamma.safetensors", directory / "bad.safetensors")
    mut, alpha, beta = (str(directory / f"{n}.safetensors") for n in ("mut", "alpha", "beta"))
    pfx = str(directory / "pfx.safetensors")
    in_flight = [{"prompt_ids": prompts[i % len(prompts)], "icv": "mut:1.5", "max_tokens": LONG_TOKENS}
                 for i in range(IN_FLIGHT)]
    cases = {
        "model": str(tiny_llama_dir), "mode": "eager", "vector_dir": str(directory),
        "max_num_batched_tokens": 96, "fail_vector": "bad",
        "batches": [
            [{"prompt_ids": long_prompt, "icv": "pfx:1.5", "max_tokens": 8}],
            {"before": {"copy": [beta, pfx]},
             "requests": [{"prompt_ids": long_prompt, "icv": "pfx:1.5", "max_tokens": 8}]},
            [{"prompt_ids": prompts[0], "icv": "bad:1.0", "max_tokens": 8},
             {"prompt_ids": prompts[1], "icv": "alpha:1.5", "max_tokens": 8},
             {"prompt_ids": prompts[2], "icv": None, "max_tokens": 8}],
            [{"prompt_ids": p, "icv": s, "max_tokens": 8} for p in prompts for s in ("alpha:1000", "beta:-1000")],
            [{"prompt_ids": p, "icv": None, "max_tokens": 8} for p in prompts],
        ],
        "inflight": [
            {"requests": in_flight, "steps_before": 3, "action": {"delete": mut}},
            {"before": {"copy": [alpha, mut]}, "requests": in_flight, "steps_before": 3,
             "action": {"copy": [beta, mut]}},
        ],
    }
    run = run_cases(tmp, "operated", cases)
    expected = {
        "alpha_long": [reference.greedy(p, [(vectors["alpha"], 1.5)], LONG_TOKENS) for p in prompts],
        "pfx_a": reference.greedy(long_prompt, [(vectors["alpha"], 1.5)], 8),
        "pfx_b": reference.greedy(long_prompt, [(vectors["beta"], 1.5)], 8),
        "alpha": reference.greedy(prompts[1], [(vectors["alpha"], 1.5)], 8),
        "plain": reference.greedy(prompts[2], [], 8),
        "all_plain": [reference.greedy(p, [], 8) for p in prompts],
    }
    return run, expected


@pytest.mark.parametrize("scenario", ["deleted", "overwritten"])
def test_in_flight_requests_keep_their_admitted_content(operated_run, scenario):
    run, expected = operated_run
    results = run["inflight"][0 if scenario == "deleted" else 1]
    assert len(results) == IN_FLIGHT
    for i, r in enumerate(results):
        assert r["finish_reason"] == "length"
        assert r["token_ids"] == expected["alpha_long"][i % len(TEXTS)], i


def test_prefix_cache_keys_the_content_not_the_name(operated_run):
    run, expected = operated_run
    first, again = run["batches"][0][0], run["batches"][1][0]
    assert first["token_ids"] == expected["pfx_a"]
    assert again["token_ids"] == expected["pfx_b"]  # as a fresh engine with B gives
    assert again["num_cached_tokens"] == 0


def test_unloadable_pinned_copy_ends_the_request_with_an_error(operated_run):
    run, expected = operated_run
    failed, steered, plain = run["batches"][2]
    assert failed["finish_reason"] == "error" and failed["token_ids"] == []
    assert steered["token_ids"] == expected["alpha"] and plain["token_ids"] == expected["plain"]


@pytest.fixture(scope="module")
def budget_run(setting, tiny_llama_dir):
    reference, vectors, prompts, _, factory = setting
    tmp = factory.mktemp("budget")
    config = reference.model.config
    g = torch.Generator().manual_seed(11)
    directory = _vector_dir(tmp, {f"v{i}": torch.randn(config.num_hidden_layers, config.hidden_size, generator=g)
                                  for i in range(12)}, tiny_llama_dir)
    requests = []
    for i in range(16):
        spec = f"v{i % 12}:1.2" if i % 3 else f"v{i % 12}:0.8,v{(i + 5) % 12}:-1.0"
        requests.append({"prompt_ids": prompts[i % len(prompts)], "icv": spec, "max_tokens": 8})
    cases = {"model": str(tiny_llama_dir), "mode": "eager", "vector_dir": str(directory), "max_slots": 4,
             "batches": [requests, *[[r] for r in requests]]}
    return run_cases(tmp, "budget", cases), requests


def test_fixed_slot_budget_is_scheduled_and_every_request_is_steered(budget_run):
    run, requests = budget_run
    together, solo = run["batches"][0], [b[0] for b in run["batches"][1:]]
    assert len(together) == 16
    for r, alone, spec in zip(together, solo, requests):
        assert r["finish_reason"] == "length", spec
        assert r["token_ids"] == alone["token_ids"], spec["icv"]


def test_without_a_vector_directory_the_plugin_changes_nothing(setting, tiny_llama_dir):
    reference, _, prompts, _, factory = setting
    tmp = factory.mktemp("inert")
    cases = {"model": str(tiny_llama_dir), "mode": "eager", "vector_dir": None,
             "batches": [[{"prompt_ids": p, "icv": None, "max_tokens": 8} for p in prompts]],
             "bad_specs": ["alpha:1"]}
    run = run_cases(tmp, "inert", cases)
    assert run["steering_ready"] is False and run["shift_path"] is None
    assert run["layer_classes"] == ["LlamaDecoderLayer"]  # no class swapped
    # vLLM sets its own variables while starting; none of ours, and the runner is not forced
    assert not [k for k in run["env_changed"] if k.startswith("ICV_") or k == "VLLM_USE_V2_MODEL_RUNNER"]
    assert [r["token_ids"] for r in run["batches"][0]] == [reference.greedy(p, [], 8) for p in prompts]
    assert "steering is not configured" in run["bad_spec_errors"][0]
    assert "ICV_VLLM_DIR" in run["bad_spec_errors"][0]


def test_the_largest_scales_leave_no_state_behind(operated_run):
    """|scale| = 1000 is the largest admitted: its arithmetic stays finite, and
    the requests after it (same engine, reused KV blocks) are unaffected."""
    run, expected = operated_run
    extreme, after = run["batches"][3], run["batches"][4]
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 8 for r in extreme)
    assert [r["token_ids"] for r in after] == expected["all_plain"]
