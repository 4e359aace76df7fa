"""Tiny random-init Llama and Qwen2 checkpoints with a locally trained
tokenizer: real architectures, no hub, built in seconds and cached.

Cached in ``.cache/test-models/<name>-<hash of build params>``: change a
parameter (or BUILDER_VERSION when this code changes) and a new folder is
built; unchanged, reruns reuse it. Built in a temporary folder and renamed, so
an interrupted build never leaves a half folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "test-models"
BUILDER_VERSION = 2

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Special tokens per family, as the real models have them: Llama adds <s> in
# front of every text, Qwen2 adds nothing (so extraction sees both conventions).
_SPECIALS = {
    "llama": {"bos": "<s>", "eos": "</s>", "pad": None, "add_bos": True},
    "qwen2": {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": False},
    # the other decoder layers the plugin supports, for engine tests
    "mistral": {"bos": "<s>", "eos": "</s>", "pad": None, "add_bos": True},
    "qwen3": {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": False},
}


def tiny_model_params(arch: str = "llama", **overrides) -> dict:
    """Build parameters of a tiny model; what vLLM's CPU backend accepts
    (head_dim 32, GQA 4:2). ``initializer_range`` 0.1 instead of HF's 0.02
    gives clear argmax margins, so greedy vLLM vs HF comparisons are stable."""
    if arch not in _SPECIALS:
        raise ValueError(f"arch must be one of {sorted(_SPECIALS)}, got {arch!r}")
    params = {
        "arch": arch,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "vocab_size": 1024,
        "initializer_range": 0.1,
        "rms_norm_eps": 1e-6,
        "seed": 1234,
        "corpus_lines": 600,
        "builder_version": BUILDER_VERSION,
    }
    unknown = set(overrides) - set(params)
    if unknown:
        raise TypeError(f"unknown tiny model parameters: {sorted(unknown)}")
    params.update(overrides)
    return params


_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "you", "we", "they", "the old man",
             "a small child", "the manager", "our neighbour", "this team", "the doctor", "she", "he", "I"]
_VERBS = ["sat on", "looked at", "talked to", "wrote about", "walked past", "asked about", "liked",
          "did not like", "helped", "thanked", "ignored", "painted", "cleaned", "visited", "found", "read"]
_OBJECTS = ["the mat", "the dog", "a letter", "the garden", "the window", "a long book", "the station",
            "the red car", "everyone", "the report", "a cup of tea", "the city", "the small house",
            "the music", "the world", "a test"]
_TAILS = ["today", "yesterday", "again", "and smiled", "and left", "in the morning", "with care",
          "for a while", "before dinner", "at night", "quietly", "very slowly", "once more", ""]
_EXTRA = ["please be kind to everyone you meet", "you are so rude and I do not like it",
          "hello world this is a small test of steering", "thank you very much for your help",
          "could you please stop shouting", "that was a stupid idea", "would you mind closing the door",
          "I am sorry for the trouble", "shut up and listen to me", "what a lovely day it is",
          "numbers like 1 2 3 10 42 and 2024 appear too", "questions? answers! lists: a, b; c."]


_ONSETS = ["b", "br", "c", "ch", "d", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl", "r", "s",
           "sh", "st", "t", "th", "tr", "v", "w", "y", "z"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "oo", "ou", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "nd", "ng", "ck", "ll", "st", "m"]


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3)))


def _corpus(lines: int, seed: int) -> list[str]:
    """Template sentences plus made-up words, enough for ~1000 BPE merges."""
    rng = random.Random(seed)
    out = list(_EXTRA)
    while len(out) < lines:
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}".strip()
        sentence += " " + " ".join(_pseudo_word(rng) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.3:
            sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", ","])
        out.append(sentence)
    return out


def _build_tokenizer(params: dict, out: Path) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[params["arch"]]
    special_tokens = [t for t in dict.fromkeys([specials["bos"], specials["eos"], specials["pad"]]) if t]
    special_tokens += ["<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params["vocab_size"],
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(params["corpus_lines"], params["seed"]), trainer=trainer)
    if specials["add_bos"]:
        bos = specials["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        pad_token=specials["pad"],
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=params["max_position_embeddings"],
    )
    fast.save_pretrained(out)
    return {
        "vocab_size": len(fast),
        "bos_token_id": fast.bos_token_id,
        "eos_token_id": fast.eos_token_id,
        "pad_token_id": fast.pad_token_id,
    }


def _build_model(params: dict, token_ids: dict, out: Path) -> None:
    import torch
    from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    config_cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM,
                  {"head_dim": params["hidden_size"] // params["num_attention_heads"]}),
    }[params["arch"]]
    config = config_cls(
        vocab_size=token_ids["vocab_size"],
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate_size"],
        num_hidden_layers=params["num_hidden_layers"],
        num_attention_heads=params["num_attention_heads"],
        num_key_value_heads=params["num_key_value_heads"],
        max_position_embeddings=params["max_position_embeddings"],
        initializer_range=params["initializer_range"],
        rms_norm_eps=params["rms_norm_eps"],
        tie_word_embeddings=False,
        bos_token_id=token_ids["bos_token_id"],
        eos_token_id=token_ids["eos_token_id"],
        pad_token_id=token_ids["pad_token_id"],
        **extra,
    )
    config.dtype = torch.float32
    torch.manual_seed(params["seed"])
    model = model_cls(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["bos_token_id"], eos_token_id=token_ids["eos_token_id"],
        pad_token_id=token_ids["pad_token_id"],
    )
    model.save_pretrained(out)


def build_tiny_model(arch: str = "llama", cache_dir: Path | None = None, **overrides) -> Path:
    """Return the folder of a tiny ``arch`` model, building it if not cached."""
    params = tiny_model_params(arch, **overrides)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir or os.environ.get("ICV_VLLM_TEST_MODELS") or CACHE_DIR)
    final = cache_dir / f"tiny-{arch}-{digest}"
    if (final / "build_params.json").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=cache_dir))
    tmp.chmod(0o755)
    try:
        token_ids = _build_tokenizer(params, tmp)
        _build_model(params, token_ids, tmp)
        (tmp / "build_params.json").write_text(json.dumps(params, indent=1, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "build_params.json").exists():  # not a concurrent build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
