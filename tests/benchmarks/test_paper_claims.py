"""benchmarks/paper_claims.py and benchmarks/lora_baseline.py without an engine: the pair files
the number-of-pairs sweep reads, the layer subsets, and the LoRA training on a tiny model."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks import each other as top-level modules
paper_claims = importlib.import_module("paper_claims")
lora_baseline = importlib.import_module("lora_baseline")
quality = importlib.import_module("quality")


@pytest.mark.parametrize("task", paper_claims.TASK_NAMES)
def test_pairs_file_nests_the_examples_and_holds_the_largest_sweep(task):
    from icv_vllm.vectors import read_pairs_jsonl

    pairs = read_pairs_jsonl(paper_claims.PAIRS[task])
    examples = read_pairs_jsonl(REPO / "examples" / f"{task}.jsonl")
    assert len(pairs) == 256
    assert pairs[: len(examples)] == examples  # N = 5 is the pairs of examples/, as in quality.py
    inputs = [quality.normalise(p.input) for p in pairs]
    assert len(set(inputs)) == len(inputs), "duplicate demonstration inputs"


def test_layer_subsets_cover_the_model():
    subsets = paper_claims.layer_subsets(30)
    assert subsets == {"first half": "0-14", "second half": "15-29", "middle third": "10-19"}
    from icv_vllm.spec import parse_spec

    for layers in subsets.values():  # the `layers` option accepts each, as paper_claims writes it
        (choice,) = parse_spec(f"polite-5:0.05;layers={layers}")
        lo, hi = map(int, layers.split("-"))
        assert choice.layers == tuple(range(lo, hi + 1))


def test_training_examples_label_only_the_answer(tiny_llama_dir):
    from transformers import AutoTokenizer

    from icv_vllm.vectors.pairs import DemoPair

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pair = DemoPair("Shut the door.", "Could you close the door, please?")
    (ids, n_prompt), = lora_baseline.training_examples(tokenizer, [pair])
    prompt = quality.chat_prompt(tokenizer, [], quality.INSTRUCTION.format(pair.input))
    assert ids[:n_prompt] == tokenizer(prompt)["input_ids"]  # what vLLM is given at inference
    answer = tokenizer.decode(ids[n_prompt:])
    assert answer.startswith(pair.target) and len(ids) > n_prompt + 1
    assert ids[-1] in tokenizer.all_special_ids  # the end-of-turn token closes the answer


def test_completion_examples_end_the_answer_with_the_newline_inference_stops_at(tiny_llama_dir):
    from transformers import AutoTokenizer

    from icv_vllm.vectors.pairs import DemoPair

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pair = DemoPair("Shut the door.", "Could you close the door, please?")
    (ids, n_prompt), = lora_baseline.training_examples(tokenizer, [pair], "completion")
    prompt = quality.make_prompt("completion", tokenizer, [], quality.INSTRUCTION.format(pair.input))
    assert ids[:n_prompt] == tokenizer(prompt)["input_ids"]  # what vLLM is given at inference
    answer = tokenizer.decode(ids[n_prompt:])
    assert answer.strip() == pair.target and answer.endswith("\n")
    assert quality.stop_strings("completion") == ["\n"]  # where inference ends the same answer


def test_train_lora_writes_an_adapter_that_fits_the_pairs(tiny_llama_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from icv_vllm.vectors import read_pairs_jsonl

    pairs = read_pairs_jsonl(REPO / "examples" / "polite.jsonl")
    recipe = lora_baseline.LoraRecipe(min_steps=25, lr=3e-3, dropout=0.0)
    summary = lora_baseline.train_lora(tiny_llama_dir, pairs, tmp_path / "adapter", recipe)
    assert summary["pairs"] == 5 and summary["steps"] == 25
    assert summary["last_loss"] < 0.8 * summary["first_loss"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == recipe.rank and set(config["target_modules"]) == set(lora_baseline.TARGET_MODULES)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().max() > 0 for p in trained)  # B starts at zero: training moved it
    # the same pairs and recipe are not trained twice
    again = lora_baseline.ensure_lora(tiny_llama_dir, pairs, tmp_path / "adapter", recipe)
    assert again == summary
    assert summary["prompt_style"] == "chat"
