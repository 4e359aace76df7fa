"""Tiny random-init checkpoints with a locally trained tokenizer: real
architectures, no hub, built in seconds and cached.

Families (``build_tiny_model(arch)``): the four the plugin steers today
(``llama``, ``qwen2``, ``mistral``, ``qwen3``) and, for model-coverage work
(docs/model_families_research.md), ``gemma``, ``gemma2``, ``gemma3`` (text-only
``Gemma3ForCausalLM``), ``phi3``, ``granite``, ``olmo2``, ``starcoder2``,
``falcon``, ``gpt_neox``, ``stablelm``, ``mixtral``, ``qwen2_moe``,
``qwen3_moe``, and the vision-language ``qwen2_vl`` and ``gemma3_mm``
(``Gemma3ForConditionalGeneration``; both with a tiny vision tower and the
processor files vLLM needs to start). Every family: hidden 128, 3 layers,
head_dim 32 (vLLM's CPU attention supports it), fp32, initializer_range 0.1.

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
    # model-coverage families (docs/model_families_research.md); "extra": more
    # special tokens (the vision-language models' image tokens)
    "gemma": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "add_bos": True},
    "gemma2": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "add_bos": True},
    "gemma3": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "add_bos": True},
    "phi3": {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": True},
    "granite": {"bos": "<|end_of_text|>", "eos": "<|end_of_text|>", "pad": "<|end_of_text|>", "add_bos": False},
    "olmo2": {"bos": None, "eos": "<|endoftext|>", "pad": "<|pad|>", "add_bos": False},
    "starcoder2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None, "add_bos": False},
    "falcon": {"bos": None, "eos": "<|endoftext|>", "pad": None, "add_bos": False},
    "gpt_neox": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None, "add_bos": False},
    "stablelm": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None, "add_bos": False},
    "mixtral": {"bos": "<s>", "eos": "</s>", "pad": None, "add_bos": True},
    "qwen2_moe": {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": False},
    "qwen3_moe": {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": False},
    "qwen2_vl": {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": False,
                 "extra": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]},
    "gemma3_mm": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "add_bos": True,
                  "extra": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
                  # tokenizer attributes Gemma3Processor reads (tokenizer.boi_token_id, ...)
                  "named": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                            "image_token": "<image_soft_token>"},
                  # vLLM's Gemma 3 processor looks these up as whole tokens (Gemma's vocabulary has them)
                  "added": ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]},
}

# Per-family build parameters, added to the common ones below for that family
# only (the four original families have none, so their cache digests stay).
# ``coverage_builder_version``: bump it when the code building these families
# changes (BUILDER_VERSION would rebuild the original four as well).
COVERAGE_BUILDER_VERSION = 1
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
_FAMILY_PARAMS = {
    "gemma": {"head_dim": 32},
    # vLLM's Gemma2ForCausalLM computes logits with embed_tokens: tied only.
    # Gemma 2/3 alternate sliding-window and global layers; sliding_window=4
    # makes short prompts exercise the window.
    "gemma2": {"head_dim": 32, "tie_word_embeddings": True, "sliding_window": 4096},
    # Gemma 3's pattern (5 local : 1 global) cut to 3 layers: local, local, global
    "gemma3": {"head_dim": 32, "sliding_window": 512},
    "phi3": {},
    # real Granite 3 multipliers, scaled to head_dim 32 (attention_multiplier = 1/head_dim)
    "granite": {"embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
                "attention_multiplier": 0.03125},
    "olmo2": {},
    "starcoder2": {},
    # Falcon-40B/180B layout (new_decoder_architecture: GQA, two layer norms,
    # attention and MLP in parallel); set new_decoder_architecture=False,
    # num_key_value_heads=1 for the Falcon-7B layout (multi-query, one norm)
    "falcon": {"new_decoder_architecture": True, "parallel_attn": True},
    # GPT-NeoX has no GQA: 4 key/value heads; Pythia's parallel residual
    "gpt_neox": {"num_key_value_heads": 4, "use_parallel_residual": True},
    "stablelm": {},
    "mixtral": {"intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2},
    # norm_topk_prob as the real models: Qwen1.5/2-MoE false, Qwen3-MoE true
    "qwen2_moe": {**_MOE, "shared_expert_intermediate_size": 128, "norm_topk_prob": False},
    "qwen3_moe": {**_MOE, "norm_topk_prob": True},
    "qwen2_vl": {"vision_depth": 1, "vision_embed_dim": 64, "vision_heads": 2},
    "gemma3_mm": {"head_dim": 32, "sliding_window": 512, "vision_depth": 1, "vision_embed_dim": 64, "vision_heads": 2,
                  "mm_tokens_per_image": 4},
}


def tiny_model_params(arch: str = "llama", **overrides) -> dict:
    """Build parameters of a tiny model; what vLLM's CPU backend accepts
    (head_dim 32, GQA 4:2). ``initializer_range`` 0.1 instead of HF's 0.02
    gives clear argmax margins, so greedy vLLM vs HF comparisons are stable.
    ``overrides`` may set any key the family has (e.g. ``falcon``:
    ``new_decoder_architecture=False, num_key_value_heads=1``)."""
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
    if arch in _FAMILY_PARAMS:
        params.update(_FAMILY_PARAMS[arch], coverage_builder_version=COVERAGE_BUILDER_VERSION)
    if arch == "qwen2_vl":  # without torchvision only the image processor is saved (see _save_processor)
        import importlib.util

        params["full_processor"] = importlib.util.find_spec("torchvision") is not None
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
    extra = specials.get("extra", [])
    special_tokens += extra
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
    if specials.get("added"):
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, normalized=False) for t in specials["added"]])
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
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *extra],
        chat_template=CHAT_TEMPLATE,
        model_max_length=params["max_position_embeddings"],
        **({"extra_special_tokens": specials["named"]} if "named" in specials else {}),
    )
    fast.save_pretrained(out)
    ids = {
        "vocab_size": len(fast),
        "bos_token_id": fast.bos_token_id,
        "eos_token_id": fast.eos_token_id,
        "pad_token_id": fast.pad_token_id,
    }
    ids.update({t: fast.convert_tokens_to_ids(t) for t in extra})
    return ids


def _build_model(params: dict, token_ids: dict, out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    config, model_cls = _make_config(params, token_ids)
    config.dtype = torch.float32
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub).dtype = torch.float32
    torch.manual_seed(params["seed"])
    model = model_cls(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["bos_token_id"], eos_token_id=token_ids["eos_token_id"],
        pad_token_id=token_ids["pad_token_id"],
    )
    model.save_pretrained(out)
    if params["arch"] == "gemma3_mm":
        _hub_layout_siglip(out)
    if params["arch"] in ("qwen2_vl", "gemma3_mm"):
        _save_processor(params, out)


def _hub_layout_siglip(out: Path) -> None:
    """transformers 5 saves Gemma 3's SigLIP tower as ``vision_tower.<...>``;
    hub checkpoints (and vLLM 0.32's loader) have ``vision_tower.vision_model.<...>``,
    which transformers 5 also loads. Rename to the hub layout."""
    from safetensors.torch import load_file, save_file

    (path,) = out.glob("*.safetensors")
    tensors = load_file(path)
    renamed = {
        ("vision_tower.vision_model." + k[len("vision_tower."):]
         if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
        for k, v in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def _make_config(params: dict, token_ids: dict):
    """The transformers config and model class of ``params["arch"]``."""
    import transformers as tf

    arch = params["arch"]
    hidden, heads, kv_heads = params["hidden_size"], params["num_attention_heads"], params["num_key_value_heads"]
    head_dim = hidden // heads
    common = dict(
        vocab_size=token_ids["vocab_size"],
        hidden_size=hidden,
        intermediate_size=params["intermediate_size"],
        num_hidden_layers=params["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=params["max_position_embeddings"],
        initializer_range=params["initializer_range"],
        rms_norm_eps=params["rms_norm_eps"],
        tie_word_embeddings=params.get("tie_word_embeddings", False),
        bos_token_id=token_ids["bos_token_id"],
        eos_token_id=token_ids["eos_token_id"],
        pad_token_id=token_ids["pad_token_id"],
    )
    if arch in ("llama", "qwen2", "mistral", "qwen3"):  # the original four, unchanged
        config_cls, model_cls, extra = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": head_dim}),
        }[arch]
        return config_cls(**common, **extra), model_cls
    if arch in ("gemma", "gemma2", "gemma3"):
        config_cls, model_cls = {
            "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
            "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
            "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        }[arch]
        extra = {"head_dim": params["head_dim"]}
        if arch != "gemma":  # scores scaled by query_pre_attn_scalar**-0.5, as the real models (= head_dim)
            extra["query_pre_attn_scalar"] = params["head_dim"]
            extra["sliding_window"] = params["sliding_window"]
        if arch == "gemma3":
            n = params["num_hidden_layers"]
            extra["layer_types"] = ["sliding_attention"] * (n - 1) + ["full_attention"]
        return config_cls(**common, **extra), model_cls
    if arch == "phi3":
        return tf.Phi3Config(**common), tf.Phi3ForCausalLM
    if arch == "granite":
        extra = {k: params[k] for k in ("embedding_multiplier", "logits_scaling", "residual_multiplier",
                                        "attention_multiplier")}
        return tf.GraniteConfig(**common, **extra), tf.GraniteForCausalLM
    if arch == "olmo2":
        return tf.Olmo2Config(**common), tf.Olmo2ForCausalLM
    if arch == "mixtral":
        extra = {"num_local_experts": params["num_experts"], "num_experts_per_tok": params["num_experts_per_tok"],
                 "sliding_window": None}
        return tf.MixtralConfig(**common, **extra), tf.MixtralForCausalLM
    if arch in ("qwen2_moe", "qwen3_moe"):
        extra = {k: params[k] for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                        "norm_topk_prob")}
        if arch == "qwen2_moe":
            extra["shared_expert_intermediate_size"] = params["shared_expert_intermediate_size"]
            return tf.Qwen2MoeConfig(**common, **extra), tf.Qwen2MoeForCausalLM
        return tf.Qwen3MoeConfig(**common, **extra, head_dim=head_dim), tf.Qwen3MoeForCausalLM
    # families without RMSNorm / with other argument names
    del common["rms_norm_eps"]
    eps = params["rms_norm_eps"]
    if arch == "starcoder2":
        return tf.Starcoder2Config(**common, norm_epsilon=eps), tf.Starcoder2ForCausalLM
    if arch == "stablelm":
        return tf.StableLmConfig(**common, layer_norm_eps=eps), tf.StableLmForCausalLM
    if arch == "gpt_neox":
        del common["num_key_value_heads"]
        return tf.GPTNeoXConfig(**common, layer_norm_eps=eps, use_parallel_residual=params["use_parallel_residual"]), \
            tf.GPTNeoXForCausalLM
    if arch == "falcon":
        del common["num_key_value_heads"], common["intermediate_size"]  # vLLM's FalconMLP is 4*hidden
        new_arch = params["new_decoder_architecture"]
        if not new_arch and kv_heads not in (1, heads):
            raise ValueError("Falcon without new_decoder_architecture has 1 (multi-query) or all kv heads")
        extra = dict(new_decoder_architecture=new_arch, parallel_attn=params["parallel_attn"],
                     multi_query=not new_arch and kv_heads == 1, num_kv_heads=kv_heads,
                     layer_norm_epsilon=eps, bias=False, alibi=False)
        return tf.FalconConfig(**common, **extra), tf.FalconForCausalLM
    if arch == "qwen2_vl":
        text = dict(common, rms_norm_eps=eps)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0,
                                   "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]}
        vision = dict(depth=params["vision_depth"], embed_dim=params["vision_embed_dim"],
                      num_heads=params["vision_heads"], hidden_size=hidden, mlp_ratio=2,
                      initializer_range=params["initializer_range"])
        config = tf.Qwen2VLConfig(
            text_config=text, vision_config=vision,
            image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
            vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        return config, tf.Qwen2VLForConditionalGeneration
    if arch == "gemma3_mm":
        n = params["num_hidden_layers"]
        text = dict(common, rms_norm_eps=eps, head_dim=params["head_dim"], query_pre_attn_scalar=params["head_dim"],
                    sliding_window=params["sliding_window"],
                    layer_types=["sliding_attention"] * (n - 1) + ["full_attention"])
        vision = dict(hidden_size=params["vision_embed_dim"], intermediate_size=2 * params["vision_embed_dim"],
                      num_hidden_layers=params["vision_depth"], num_attention_heads=params["vision_heads"],
                      image_size=32, patch_size=8)  # 16 patches, pooled to mm_tokens_per_image (4)
        config = tf.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=params["mm_tokens_per_image"],
            boi_token_index=token_ids["<start_of_image>"], eoi_token_index=token_ids["<end_of_image>"],
            image_token_index=token_ids["<image_soft_token>"], initializer_range=params["initializer_range"],
            tie_word_embeddings=False,
        )
        return config, tf.Gemma3ForConditionalGeneration
    raise ValueError(f"no builder for {arch!r}")


def _save_processor(params: dict, out: Path) -> None:
    """The processor files a vision-language model needs (vLLM builds its
    multi-modal processor from them at start-up, even for text-only use)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    if params["arch"] == "qwen2_vl":
        from transformers import Qwen2VLImageProcessor

        patch = 14 * 2  # patch_size * spatial_merge_size
        image_processor = Qwen2VLImageProcessor(min_pixels=patch * patch * 4, max_pixels=patch * patch * 16)
        try:
            from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

            processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                                         video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
        except Exception:
            # transformers 5 cannot build Qwen2VLProcessor without torchvision (its
            # video processor needs it; this project's setup removes torchvision):
            # save the image processor alone, enough for text-only serving
            image_processor.save_pretrained(out)
            return
    else:
        from transformers import Gemma3ImageProcessor, Gemma3Processor

        image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32})
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                    image_seq_length=params["mm_tokens_per_image"], chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)


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
