"""ICV extraction (docs/method.md §1), with Hugging Face transformers.

``icv_from_differences`` and ``clean_demonstration_text`` are pure functions
the API server reuses for in-server extraction; importing this module loads
torch but not transformers or any model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .pairs import DemoPair, as_pairs, clean_demonstration_text, extraction_texts
from .vector import ICVector

__all__ = [
    "clean_demonstration_text",
    "decoder_layers",
    "extract_icv",
    "icv_from_differences",
    "icv_from_streams",
    "residual_streams_at_last_token",
]

EXTRACTION_METHODS = ("pca", "mean")
# |U| entries closer than this (relative) to the largest count as tied; only
# N = 2 produces ties (the two centred rows are exact opposites), see below.
_TIE_TOLERANCE = 1e-9


def icv_from_differences(diffs: torch.Tensor, method: str = "pca") -> torch.Tensor:
    """Turn per-pair residual-stream differences ``[N, L+1, D]`` (embedding row
    first) into the ICV ``[L, D]`` float32.

    - ``mean``: the mean difference.
    - ``pca``: mean difference + PC1, the unit first principal component of
      the N differences flattened to ``(L+1)*D`` (centred SVD, float64).
      Sign rule: the authors' ``svd_flip`` (shengliu66/ICV ``utils/pca.py``)
      is u-based: the pair with the largest ``|U[:, 0]|`` (the largest
      projection onto PC1) gets a positive projection. So the result does not
      depend on the order of the pairs (N >= 3), and swapping every input with
      its target negates the ICV. With N = 2 the two projections tie exactly
      (centred rows are opposites); the authors' argmax takes the first, and
      so do we, deterministically: PC1 points along ``d_1 - d_2``.
    - N = 1, or N > 1 identical differences: the centred data is zero and PC1
      undefined, so ``pca`` returns the mean difference.

    The embedding row is dropped at the end: one direction per decoder layer.
    """
    if method not in EXTRACTION_METHODS:
        raise ValueError(f"method must be one of {', '.join(EXTRACTION_METHODS)}, got {method!r}")
    if diffs.ndim != 3 or diffs.shape[0] < 1 or diffs.shape[1] < 2 or diffs.shape[2] < 1:
        raise ValueError(f"differences must be [N >= 1, L+1 >= 2, D], got {list(diffs.shape)}")
    n, rows, width = diffs.shape
    flat = diffs.detach().to("cpu", torch.float64).reshape(n, rows * width)
    mean = flat.mean(dim=0)
    direction = mean
    if method == "pca" and n > 1:
        centred = flat - mean
        u, s, vh = torch.linalg.svd(centred, full_matrices=False)
        if s[0] > 1e-9 * float(flat.norm()):  # else: only rounding noise, PC1 undefined
            magnitudes = u[:, 0].abs()
            first = int(torch.nonzero(magnitudes >= magnitudes.max() * (1 - _TIE_TOLERANCE))[0])
            direction = mean + torch.sign(u[first, 0]) * vh[0]
    return direction.reshape(rows, width)[1:].to(torch.float32)


def icv_from_streams(streams: torch.Tensor, method: str = "pca") -> torch.Tensor:
    """The ICV ``[L, D]`` from residual streams ``[2N, L+1, D]`` laid out as
    the N inputs then the N targets: ``d_i = h(target_i) - h(input_i)``, then
    :func:`icv_from_differences`. Offline and in-server extraction both end here."""
    if streams.ndim != 3 or streams.shape[0] == 0 or streams.shape[0] % 2:
        raise ValueError(f"streams must be [2N, L+1, D] (inputs then targets), got {list(streams.shape)}")
    n = streams.shape[0] // 2
    return icv_from_differences(streams[n:] - streams[:n], method)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM: the ``ModuleList`` with the text
    config's ``num_hidden_layers`` entries (``model.model.layers`` for Llama,
    ``transformer.h`` for Falcon, the language model's layers of a
    vision-language model)."""
    count = _text_config(model).num_hidden_layers
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == count:
            return layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row: right and left padding alike."""
    length = attention_mask.shape[1]
    flipped_first = attention_mask.flip(dims=[1]).to(torch.int64).argmax(dim=1)
    return length - 1 - flipped_first


@torch.inference_mode()
def residual_streams_at_last_token(
    model, tokenizer, texts: Sequence[str], batch_size: int = 8, progress: bool = True
) -> torch.Tensor:
    """For each text, the residual stream at its last token: the embedding
    output and the full output of every decoder layer, ``[N, L+1, D]`` float32.

    Forward hooks, not ``output_hidden_states``: transformers' last hidden
    state is taken after the final norm, the ICV needs the raw stream.
    Texts are tokenized alone with the tokenizer's default special tokens and
    batched with right padding (real tokens keep positions 0..n-1, exactly as
    unbatched); longest first to waste little padding; order is restored.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"text {i} ({texts[i]!r}) has no tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    body = getattr(model, "base_model", model)  # the decoder without the LM head: no logits needed
    captured: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def recorder(slot: int):
        def hook(module, args, output):
            captured[slot] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [model.get_input_embeddings().register_forward_hook(recorder(0))]
    handles += [layer.register_forward_hook(recorder(i + 1)) for i, layer in enumerate(layers)]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    result = torch.empty(len(texts), len(layers) + 1, _text_config(model).hidden_size, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        # one pair = its input and its target text
        with tqdm(total=len(texts) / 2, disable=not progress, desc="demonstration pairs", unit="pair",
                  bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}]") as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[row, : len(encoded[i])] = 1
                captured[:] = [None] * len(captured)
                body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                last = _last_real_index(mask).to(device)
                rows = torch.arange(len(chunk), device=device)
                stacked = torch.stack([h[rows, last] for h in captured], dim=1)
                result[torch.tensor(chunk)] = stacked.to("cpu", torch.float32)
                bar.update(len(chunk) / 2)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return result


def _load(model_dir: str | os.PathLike, device: str, progress: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # fp32 on CPU (bf16 matmuls are slow there and lose precision); the
    # checkpoint's own dtype on accelerators, where memory matters.
    dtype = torch.float32 if device == "cpu" else "auto"
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:  # transformers' own "Loading weights" bar
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        except ValueError:  # a vision-language checkpoint: its language model is what we read
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
    finally:
        if was_enabled and not progress:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def extract_icv(
    model_or_dir,
    pairs: Sequence[DemoPair | tuple[str, str]],
    method: str = "pca",
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
    *,
    tokenizer=None,
    clean: bool = True,
    model_name: str | None = None,
) -> ICVector:
    """Extract an ICV from demonstration pairs: ``d_i = h(target_i) - h(input_i)``
    at the last token of each text run alone (no prompt template), then
    :func:`icv_from_differences`.

    ``model_or_dir`` is a model directory (or hub id), or a loaded causal LM
    together with ``tokenizer=``. Texts go through
    :func:`clean_demonstration_text` first, as in the authors' code, unless
    ``clean=False``. ``model_name`` (default: the directory / the config's
    ``name_or_path``) is recorded in the vector file.
    """
    if method not in EXTRACTION_METHODS:
        raise ValueError(f"method must be one of {', '.join(EXTRACTION_METHODS)}, got {method!r}")
    pairs = as_pairs(pairs)
    inputs, targets = extraction_texts(pairs, clean)
    if isinstance(model_or_dir, (str, Path)):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = _load(model_or_dir, device, progress)
        model_name = model_name or str(model_or_dir)
    else:
        model = model_or_dir
        if tokenizer is None:
            raise ValueError("pass tokenizer= together with a loaded model")
        if device is not None:
            model = model.to(device)
        model_name = model_name or model.config.name_or_path or type(model).__name__
    streams = residual_streams_at_last_token(model, tokenizer, inputs + targets, batch_size, progress)
    return ICVector(icv_from_streams(streams, method), model=model_name, method=method, num_pairs=len(pairs))
