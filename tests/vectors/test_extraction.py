"""Extraction against an independent computation of the same quantities.

Reference residual streams come from running each text alone and rebuilding
the stream layer by layer by calling the decoder blocks directly (checked
against transformers' own ``output_hidden_states`` where those agree, i.e.
everywhere except after the last block, where transformers applies the final
norm). The reference PCA is numpy's eigen-decomposition of the covariance.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from icv_vllm.vectors.extraction import (
    _last_real_index,
    extract_icv,
    icv_from_differences,
    residual_streams_at_last_token,
)
from icv_vllm.vectors.pairs import DemoPair, PairsError, clean_demonstration_text

PAIRS = [
    DemoPair("you are so rude!", "you are very kind."),
    DemoPair("Shut up.", "Could you please be a little quieter, if you do not mind?"),
    DemoPair("that was a stupid idea", "that idea could be better"),
    DemoPair("I do not like it, at all", "thank you very much for your help"),
    DemoPair("go away", "would you mind closing the door"),
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tiny_model_dir, model, tokenizer


@torch.no_grad()
def reference_stream(model, tokenizer, text: str) -> torch.Tensor:
    """[L+1, D] at the last token of ``text``, run alone, block by block."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    length = ids.shape[1]
    positions = torch.arange(length).unsqueeze(0)
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    inner = model.model
    h = inner.embed_tokens(ids)
    rope = inner.rotary_emb(h, position_ids=positions)
    stream = [h]
    for layer in inner.layers:
        h = layer(h, attention_mask=causal, position_ids=positions, position_embeddings=rope)
        stream.append(h)
    hf = model(ids, output_hidden_states=True).hidden_states
    for mine, theirs in zip(stream[:-1], hf[:-1]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inner.norm(stream[-1]), hf[-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stream[-1], hf[-1], atol=1e-2)  # hooks matter: HF's last one is normed
    return torch.stack([s[0, -1] for s in stream])


def reference_diffs(model, tokenizer, pairs) -> torch.Tensor:
    return torch.stack([
        reference_stream(model, tokenizer, clean_demonstration_text(p.target))
        - reference_stream(model, tokenizer, clean_demonstration_text(p.input))
        for p in pairs
    ])


def reference_pca_icv(diffs: torch.Tensor) -> np.ndarray:
    """mean + top covariance eigenvector, sign so that the pair with the largest
    |projection| projects positively; embedding row dropped."""
    n, rows, width = diffs.shape
    x = diffs.double().numpy().reshape(n, -1)
    mean = x.mean(axis=0)
    centred = x - mean
    # eigenvectors of the (N x N) Gram matrix, mapped back: the same top
    # principal direction as the (huge) covariance matrix, computed differently
    values, vectors = np.linalg.eigh(centred @ centred.T)
    pc1 = centred.T @ vectors[:, -1]
    pc1 /= np.linalg.norm(pc1)
    projections = centred @ pc1
    pc1 *= np.sign(projections[np.argmax(np.abs(projections))])
    return (mean + pc1).reshape(rows, width)[1:]


def test_streams_match_block_by_block_reference(loaded):
    _, model, tokenizer = loaded
    texts = [clean_demonstration_text(t) for p in PAIRS for t in (p.input, p.target)]
    got = residual_streams_at_last_token(model, tokenizer, texts, batch_size=4, progress=False)
    assert got.shape == (len(texts), model.config.num_hidden_layers + 1, model.config.hidden_size)
    assert got.dtype == torch.float32
    expected = torch.stack([reference_stream(model, tokenizer, t) for t in texts])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_batched_equals_unbatched(loaded):
    _, model, tokenizer = loaded
    texts = ["a", "the cat sat on the mat and looked at the dog again", "hello world", "you are so rude"]
    lengths = {len(tokenizer(t)["input_ids"]) for t in texts}
    assert len(lengths) == len(texts)  # batches really need padding
    one = residual_streams_at_last_token(model, tokenizer, texts, batch_size=1, progress=False)
    for batch_size in (2, 3, 8):
        batched = residual_streams_at_last_token(model, tokenizer, texts, batch_size=batch_size, progress=False)
        torch.testing.assert_close(batched, one, rtol=1e-5, atol=1e-5)


def test_last_real_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert _last_real_index(right).tolist() == [2, 4, 0]
    assert _last_real_index(left).tolist() == [4, 4, 4]


def test_mean_and_pca_match_independent_computation(loaded):
    model_dir, model, tokenizer = loaded
    diffs = reference_diffs(model, tokenizer, PAIRS)
    mean = extract_icv(model_dir, PAIRS, method="mean", progress=False, batch_size=3)
    pca = extract_icv(model_dir, PAIRS, method="pca", progress=False, batch_size=3)
    assert (mean.method, mean.num_pairs, mean.model) == ("mean", 5, str(model_dir))
    assert (pca.method, pca.num_pairs) == ("pca", 5)
    assert mean.tensor.shape == (model.config.num_hidden_layers, model.config.hidden_size)
    torch.testing.assert_close(mean.tensor, diffs.mean(0)[1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pca.tensor.numpy(), reference_pca_icv(diffs), rtol=1e-4, atol=1e-4)
    # pca = mean + a unit vector over all L+1 rows; the dropped embedding row
    # takes its share, so the remaining part has norm <= 1 but is far from 0
    shift = (pca.tensor - mean.tensor).norm()
    assert 0.2 < shift <= 1.0 + 1e-5


def test_loaded_model_and_tokenizer_accepted(loaded):
    model_dir, model, tokenizer = loaded
    from_dir = extract_icv(model_dir, PAIRS, progress=False)
    from_model = extract_icv(model, PAIRS, tokenizer=tokenizer, progress=False, model_name="tiny")
    assert from_model.model == "tiny"
    torch.testing.assert_close(from_model.tensor, from_dir.tensor, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokenizer="):
        extract_icv(model, PAIRS, progress=False)


def test_one_pair_is_the_difference(loaded):
    model_dir, model, tokenizer = loaded
    diff = reference_diffs(model, tokenizer, PAIRS[:1])[0]
    for method in ("pca", "mean"):
        icv = extract_icv(model_dir, PAIRS[:1], method=method, progress=False)
        assert icv.num_pairs == 1
        torch.testing.assert_close(icv.tensor, diff[1:], rtol=1e-5, atol=1e-5)


def test_cleaning_is_applied_and_can_be_disabled(loaded):
    model_dir, _, _ = loaded
    raw = [DemoPair("Hey!!! (you) -- rude...", "Hello, kind friend.")]
    pre_cleaned = [DemoPair("Hey you  rude", "Hello kind friend")]
    cleaned = extract_icv(model_dir, raw, method="mean", progress=False)
    manual = extract_icv(model_dir, pre_cleaned, method="mean", progress=False, clean=False)
    kept = extract_icv(model_dir, raw, method="mean", progress=False, clean=False)
    torch.testing.assert_close(cleaned.tensor, manual.tensor, rtol=0, atol=0)
    assert not torch.allclose(kept.tensor, cleaned.tensor, atol=1e-3)


def test_pair_empty_after_cleaning_is_refused(loaded):
    model_dir, _, _ = loaded
    with pytest.raises(PairsError, match=r"^pairs\[1\]: 'target' is empty after removing punctuation$"):
        extract_icv(model_dir, [PAIRS[0], ("fine words", "?!...")], progress=False)


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("Don't, please!", "Dont please"),
        ("  (a-b) = c/d?  ", "ab  cd"),
        ("~!@#$%^&*()_+`-={}[]|\\:;\"'<>,./?", ""),
        ("keeps unicode: “quotes” — dashes…", "keeps unicode “quotes” — dashes…"),
        ("line\nbreaks stay\tinside ", "line\nbreaks stay\tinside"),
    ],
)
def test_clean_demonstration_text(text, cleaned):
    assert clean_demonstration_text(text) == cleaned


# ---------------------------------------------------------------- pure math


def _random_diffs(n: int, seed: int = 0, rows: int = 4, width: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rows, width, generator=g) + torch.linspace(0, 2, width)


def test_pca_is_mean_plus_unit_pc1():
    diffs = _random_diffs(6)
    got = icv_from_differences(diffs, "pca").numpy()
    np.testing.assert_allclose(got, reference_pca_icv(diffs), rtol=1e-6, atol=1e-6)
    mean = icv_from_differences(diffs, "mean")
    torch.testing.assert_close(mean, diffs.mean(0)[1:])
    assert got.dtype == np.float32


def test_sign_rule_order_independent_and_antisymmetric():
    """The authors' u-based rule fixes the sign by the pair with the largest
    projection: reordering pairs changes nothing (N >= 3), and swapping every
    input with its target (negating all differences) negates the ICV."""
    diffs = _random_diffs(5, seed=3)
    base = icv_from_differences(diffs, "pca")
    for seed in range(5):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(icv_from_differences(diffs[perm], "pca"), base, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(icv_from_differences(-diffs, "pca"), -base, rtol=1e-6, atol=1e-6)
    # PC1 is a unit vector whatever the scale of the differences
    scaled = icv_from_differences(diffs * 10, "pca") - icv_from_differences(diffs * 10, "mean")
    torch.testing.assert_close(scaled, base - icv_from_differences(diffs, "mean"), rtol=1e-5, atol=1e-5)


def test_sign_rule_largest_projection_is_positive():
    diffs = _random_diffs(7, seed=11)
    n = diffs.shape[0]
    # embedding row kept at zero so the dropped row carries no PC1 share
    diffs[:, 0] = 0
    pc1 = icv_from_differences(diffs, "pca") - icv_from_differences(diffs, "mean")
    centred = (diffs - diffs.mean(0))[:, 1:].reshape(n, -1)
    projections = centred @ pc1.reshape(-1)
    assert torch.isclose(pc1.norm(), torch.tensor(1.0), atol=1e-6)
    assert projections[projections.abs().argmax()] > 0


def test_two_pairs_tie_resolved_towards_first_pair():
    """N = 2: both centred rows are opposite, their |projections| tie; the
    authors' argmax takes the first: PC1 = (d1 - d2) / |d1 - d2|."""
    diffs = _random_diffs(2, seed=5)
    flat = diffs.double().reshape(2, -1)
    unit = (flat[0] - flat[1]) / (flat[0] - flat[1]).norm()
    expected = (flat.mean(0) + unit).reshape(diffs.shape[1:])[1:].float()
    torch.testing.assert_close(icv_from_differences(diffs, "pca"), expected, rtol=1e-6, atol=1e-6)
    swapped = icv_from_differences(diffs.flip(0), "pca")
    torch.testing.assert_close(swapped, (flat.mean(0) - unit).reshape(diffs.shape[1:])[1:].float(),
                               rtol=1e-6, atol=1e-6)


def test_degenerate_inputs_give_the_mean():
    one = _random_diffs(1)
    torch.testing.assert_close(icv_from_differences(one, "pca"), one[0, 1:])
    same = one.repeat(4, 1, 1)
    torch.testing.assert_close(icv_from_differences(same, "pca"), one[0, 1:])


@pytest.mark.parametrize(
    ("diffs", "method", "message"),
    [
        (torch.zeros(2, 3, 4), "svd", "method must be one of pca, mean"),
        (torch.zeros(0, 3, 4), "pca", r"must be \[N >= 1, L\+1 >= 2, D\], got \[0, 3, 4\]"),
        (torch.zeros(2, 1, 4), "pca", "got \\[2, 1, 4\\]"),
        (torch.zeros(3, 4), "mean", "got \\[3, 4\\]"),
    ],
)
def test_icv_from_differences_refuses_bad_input(diffs, method, message):
    with pytest.raises(ValueError, match=message):
        icv_from_differences(diffs, method)


def test_math_importable_without_transformers():
    code = (
        "import sys\n"
        "from icv_vllm.vectors.extraction import icv_from_differences, clean_demonstration_text\n"
        "from icv_vllm.vectors import read_icv_header, ICVector\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_icv_from_streams_pairs_targets_with_inputs():
    from icv_vllm.vectors.extraction import icv_from_differences, icv_from_streams

    g = torch.Generator().manual_seed(5)
    streams = torch.randn(6, 4, 8, generator=g)  # 3 inputs, then 3 targets
    for method in ("mean", "pca"):
        assert torch.equal(icv_from_streams(streams, method),
                           icv_from_differences(streams[3:] - streams[:3], method))
    with pytest.raises(ValueError, match="inputs then targets"):
        icv_from_streams(streams[:5])
