"""The held-out inputs of benchmarks/quality.py: enough of them, distinct, and never a
copy or near-copy of any demonstration pair (examples/*.jsonl), from which the vectors
and the ICL prompts are built. Fast: no model, no engine."""

from __future__ import annotations

import difflib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("icv_quality_benchmark", REPO / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, quality)  # dataclasses look their module up there
_spec.loader.exec_module(quality)

# the demonstration pairs: examples/ (quality.py) and the larger sets of paper_claims.py's pairs sweep
PAIR_FILES = sorted((REPO / "examples").glob("*.jsonl")) + sorted((REPO / "benchmarks" / "quality_data").glob("*_pairs.jsonl"))


def _pair_texts() -> list[str]:
    texts = []
    for path in PAIR_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                texts += [obj["input"], obj["target"]]
    return texts


@pytest.mark.parametrize("name", sorted(quality.TASKS))
def test_at_least_100_distinct_inputs(name):
    inputs = quality.read_inputs(quality.TASKS[name].inputs)
    normalised = [quality.normalise(t) for t in inputs]
    assert len(inputs) >= 100
    assert all(normalised), "an input with no words"
    assert len(set(normalised)) == len(normalised), "duplicate inputs (after normalising)"


@pytest.mark.parametrize("name", sorted(quality.TASKS))
def test_inputs_never_copy_a_demonstration_pair(name):
    pairs = {quality.normalise(t) for t in _pair_texts()}
    assert len(PAIR_FILES) >= 5 and pairs
    for text in quality.read_inputs(quality.TASKS[name].inputs):
        n = quality.normalise(text)
        assert n not in pairs, f"{text!r} is a demonstration text"
        matcher = difflib.SequenceMatcher(None, b=n)
        for p in pairs:  # near-copies: same words in nearly the same order
            matcher.set_seq1(p)
            if matcher.real_quick_ratio() < 0.8 or matcher.quick_ratio() < 0.8:  # upper bounds of ratio()
                continue
            ratio = matcher.ratio()
            assert ratio < 0.8, f"{text!r} is a near-copy of the pair text {p!r} ({ratio:.2f})"


@pytest.mark.parametrize("name", sorted(quality.TASKS))
def test_every_task_has_a_pairs_file(name):
    from icv_vllm.vectors.pairs import read_pairs_jsonl

    pairs = read_pairs_jsonl(quality.TASKS[name].pairs)
    assert len(pairs) == 5


def test_degeneration_measure():
    assert quality.is_degenerate("")
    assert quality.is_degenerate("   ")
    assert quality.is_degenerate("I am sorry I am sorry I am sorry I am sorry")
    assert not quality.is_degenerate("Could you please turn the music down a little?")
    assert quality.repeated_ngram_share("a b c a b c", 3) == pytest.approx(1 - 3 / 4)


def test_chat_prompt_kept_for_icv_vs_icl():
    # benchmarks/icv_vs_icl.py imports these names
    assert callable(quality.chat_prompt) and "{}" in quality.INSTRUCTION and len(quality.HELD_OUT) == 8


def test_base_models_are_prompted_in_plain_text():
    assert quality.prompt_style("gemma-3-270m") == "completion"
    assert quality.prompt_style("SmolLM2-135M-Instruct") == quality.prompt_style("an unknown model") == "chat"
    assert quality.stop_strings("chat") is None
    prompt = quality.completion_prompt([("Rewrite this sentence: a", "b")], "Rewrite this sentence: c")
    assert prompt == "Rewrite this sentence: a\nRewritten: b\n\nRewrite this sentence: c\nRewritten:"
    with pytest.raises(ValueError, match="unknown prompt style"):
        quality.make_prompt("instruct", None, [], "x")
