"""``icv_vllm.tuning``: the recommendation rule (largest λ whose fluency cost,
and every smaller λ's, stays within the bound; monotone in the bound), the
two measures, storing ``recommended_scale``, the tune body and the CLI's
arguments. Fast: no model, no engine (the engine runs are in
tests/cli/test_tune.py and tests/server/test_tune_route.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from icv_vllm.tuning import (Measurement, TuningError, check_bound, check_scales, geometric_scales, mean_projection,
                             neutral_prompts, no_recommendation_message, parse_prompts, pooled_perplexity, recommend)


def _curve(ppls: list[float], base: float = 10.0, scales: list[float] | None = None):
    scales = scales or [0.01 * 2 ** i for i in range(len(ppls))]
    baseline = Measurement(0.0, base, 100, 1.0, 16)
    return baseline, [Measurement(s, p, 100, 1.0 + s, 16) for s, p in zip(scales, ppls)]


# -- the rule --------------------------------------------------------------------------

def test_largest_scale_within_the_bound():
    baseline, measured = _curve([10.0, 10.5, 11.0, 12.0, 13.0, 20.0])
    result = recommend(baseline, measured, 0.2)  # 12/10 - 1 = 0.2: inclusive
    assert result.recommended_scale == 0.08
    assert [p.within_bound for p in result.points] == [True, True, True, True, False, False]
    assert result.points[3].ppl_increase == pytest.approx(0.2)
    assert result.points[0].effect_gain == pytest.approx(0.01)


def test_a_dip_after_a_spike_is_not_taken():
    """A noisy curve: λ=0.04 is over, λ=0.08 back under; the rule stops at 0.02."""
    baseline, measured = _curve([10.0, 10.5, 15.0, 10.8, 30.0])
    result = recommend(baseline, measured, 0.1)
    assert result.recommended_scale == 0.02
    assert [p.within_bound for p in result.points] == [True, True, False, False, False]
    assert "after a scale over" in result.table() and "<- recommended" in result.table()


def test_ties_and_order_of_input():
    baseline, measured = _curve([12.0, 12.0, 12.0, 12.0001])
    result = recommend(baseline, list(reversed(measured)), 0.2)
    assert result.recommended_scale == 0.04  # equal costs: the largest λ
    assert [p.scale for p in result.points] == [0.01, 0.02, 0.04, 0.08]


def test_no_scale_within_the_bound():
    baseline, measured = _curve([13.0, 15.0])
    result = recommend(baseline, measured, 0.25)
    assert result.recommended_scale is None
    assert not any(p.within_bound for p in result.points)
    message = no_recommendation_message(result)
    assert "0.01" in message and "+30.0%" in message and "nothing stored" in message
    assert result.to_json()["recommended_scale"] is None


def test_non_finite_perplexity_never_qualifies():
    baseline, measured = _curve([10.0, math.inf, 10.0])
    result = recommend(baseline, measured, 100.0)
    assert result.recommended_scale == 0.01
    assert result.to_json()["points"][1]["perplexity"] is None  # JSON has no inf
    baseline = Measurement(0.0, math.inf, 10, None, 0)
    assert recommend(baseline, measured, 100.0).recommended_scale is None


@pytest.mark.parametrize("seed", range(30))
def test_monotone_in_the_bound_on_random_curves(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 15)
    ppls = [rng.choice([rng.uniform(5, 40), 10.0, math.inf if rng.random() < 0.05 else 12.5]) for _ in range(n)]
    baseline, measured = _curve(ppls, base=rng.uniform(5, 20))
    bounds = sorted({0.0, *(rng.uniform(0, 3) for _ in range(20)),
                     *(p / baseline.perplexity - 1 for p in ppls if math.isfinite(p) and p >= baseline.perplexity)})
    picks = [recommend(baseline, measured, b).recommended_scale for b in bounds]
    numeric = [-1.0 if p is None else p for p in picks]
    assert numeric == sorted(numeric), list(zip(bounds, picks))
    for b, pick in zip(bounds, picks):  # and each pick is the largest λ whose prefix is within b
        ok = [m.scale for i, m in enumerate(measured)
              if all(x.perplexity / baseline.perplexity - 1 <= b for x in measured[: i + 1])]
        assert pick == (max(ok) if ok else None)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "0.2", True, None])
def test_bad_bounds(bad):
    with pytest.raises(TuningError, match="max_ppl_increase must be"):
        check_bound(bad)


def test_measurements_need_distinct_positive_scales():
    baseline, measured = _curve([10.0, 11.0])
    with pytest.raises(TuningError):
        recommend(baseline, measured + measured[:1], 0.1)


# -- the grid and the prompts ------------------------------------------------------------

def test_geometric_grid():
    scales = geometric_scales()
    assert len(scales) == 12 and scales[0] == 0.001 and scales[-1] == 0.3
    ratios = [b / a for a, b in zip(scales, scales[1:])]
    assert max(ratios) / min(ratios) < 1.02  # 3 significant digits
    assert geometric_scales(0.05, 0.05, 3) == (0.05,)
    dense = geometric_scales(0.01, 0.0101, 40)
    assert len(dense) == 40  # never silently fewer points than asked
    for low, high, steps in [(0, 1, 3), (0.5, 0.1, 3), (0.1, math.inf, 3), (0.1, 1, 0)]:
        with pytest.raises(TuningError):
            geometric_scales(low, high, steps)


def test_scales_are_positive_within_spec_bounds():
    assert check_scales([0.2, 0.1, 0.2, 1]) == (0.1, 0.2, 1.0)
    for bad in ([], [0.0], [-0.1], [math.nan], [1e9], ["0.1"], [True]):
        with pytest.raises(TuningError):
            check_scales(bad)


def test_prompts(tmp_path):
    builtin = neutral_prompts()
    assert len(builtin) == 16 and all(p and not p.startswith("#") for p in builtin)
    assert parse_prompts("# c\n\n  one  \ntwo\n", "f") == ["one", "two"]
    f = tmp_path / "p.txt"
    f.write_text("# only a comment\n\n")
    with pytest.raises(TuningError, match="no prompts"):
        neutral_prompts(f)
    with pytest.raises(TuningError, match="cannot read prompts"):
        neutral_prompts(tmp_path / "missing.txt")


# -- the measures ----------------------------------------------------------------------------

def test_pooled_perplexity_weights_tokens():
    ppl, n = pooled_perplexity([[-1.0, -1.0, -1.0], [-4.0]])
    assert n == 4 and ppl == pytest.approx(math.exp(7 / 4))
    assert pooled_perplexity([[-1e6]])[0] == math.inf
    with pytest.raises(TuningError, match="no output tokens"):
        pooled_perplexity([[], []])


def test_mean_projection_uses_unit_directions_and_skips_zero_layers():
    vector = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, -2.0]])  # L = 3, D = 2; layer 1 has no direction
    streams = torch.zeros(2, 4, 2)
    streams[:, 0] = 100.0  # the embedding row is never read
    streams[0, 1] = torch.tensor([2.0, 5.0])  # on layer 0's direction: 2
    streams[0, 2] = torch.tensor([7.0, 7.0])  # layer 1: skipped
    streams[0, 3] = torch.tensor([1.0, -4.0])  # on -y: 4
    streams[1, 1] = torch.tensor([-1.0, 0.0])  # -1
    streams[1, 3] = torch.tensor([0.0, 1.0])  # -1
    assert mean_projection(streams, vector) == pytest.approx((2 + 4 - 1 - 1) / 4)
    with pytest.raises(TuningError, match="no direction"):
        mean_projection(streams, torch.zeros(3, 2))
    with pytest.raises(TuningError, match="do not fit"):
        mean_projection(streams, torch.ones(2, 2))


# -- storing the recommendation ------------------------------------------------------------------

def _vector_file(path, **kwargs):
    from icv_vllm.vectors.file_format import write_icv

    tensor = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    write_icv(path, tensor, model="m", method="pca", num_pairs=4, **kwargs)
    return tensor


def test_store_keeps_tensor_and_metadata(tmp_path):
    from safetensors import safe_open

    from icv_vllm.tuning.storage import store_recommended_scale
    from icv_vllm.vectors.file_format import load_icv, read_icv_header

    path = tmp_path / "v.safetensors"
    tensor = _vector_file(path, default_mode="add")
    store_recommended_scale(path, path.read_bytes(), 0.0377)
    header = read_icv_header(path)
    assert header.recommended_scale == 0.0377
    assert (header.default_mode, header.method, header.num_pairs, header.model) == ("add", "pca", 4, "m")
    assert torch.equal(load_icv(path)[0], tensor)
    with safe_open(str(path), framework="pt") as f:  # as an older reader sees it: one more string key
        assert f.metadata()["recommended_scale"] == "0.0377"
    store_recommended_scale(path, path.read_bytes(), 0.5)  # a second tune replaces the value
    assert read_icv_header(path).recommended_scale == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temporary file left


def test_store_keeps_unknown_metadata_keys(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from icv_vllm.tuning.storage import store_recommended_scale

    path = tmp_path / "v.safetensors"
    save_file({"icv": torch.ones(3, 8)}, str(path), metadata={
        "format": "icv-vllm/1", "model": "m", "hidden_size": "8", "num_layers": "3", "method": "mean",
        "num_pairs": "1", "provenance": "pairs.jsonl@abc"})
    store_recommended_scale(path, path.read_bytes(), 0.02)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["provenance"] == "pairs.jsonl@abc"
        assert f.metadata()["recommended_scale"] == "0.02"


def test_store_refuses_a_file_that_changed(tmp_path):
    from icv_vllm.tuning.storage import VectorChangedError, store_recommended_scale
    from icv_vllm.vectors.file_format import read_icv_header

    path = tmp_path / "v.safetensors"
    _vector_file(path)
    measured = path.read_bytes()
    _vector_file(path, default_mode="add")  # replaced during the sweep
    after = path.read_bytes()
    with pytest.raises(VectorChangedError, match="replaced while it was being tuned"):
        store_recommended_scale(path, measured, 0.1)
    assert path.read_bytes() == after and read_icv_header(path).recommended_scale is None
    # another tune of the same vector stored a value meanwhile: still the same vector, stored
    _vector_file(path)
    measured = path.read_bytes()
    store_recommended_scale(path, path.read_bytes(), 0.3)
    store_recommended_scale(path, measured, 0.1)
    assert read_icv_header(path).recommended_scale == 0.1
    path.unlink()
    with pytest.raises(VectorChangedError, match="removed"):
        store_recommended_scale(path, measured, 0.1)


def test_store_replaces_a_link_not_its_target(tmp_path):
    from icv_vllm.tuning.storage import store_recommended_scale
    from icv_vllm.vectors.file_format import read_icv_header

    target = tmp_path / "shared.safetensors"
    _vector_file(target)
    link = tmp_path / "v.safetensors"
    link.symlink_to(target)
    store_recommended_scale(link, link.read_bytes(), 0.1)
    assert not link.is_symlink() and read_icv_header(link).recommended_scale == 0.1
    assert read_icv_header(target).recommended_scale is None


# -- the route's body ---------------------------------------------------------------------------

def test_tune_body_defaults_and_limits():
    from icv_vllm.server.errors import ICVHTTPError
    from icv_vllm.server.tuning_route import MAX_GENERATIONS, MAX_PROMPTS, parse_tune_body

    tune = parse_tune_body(None)
    assert len(tune.prompts) == 16 and len(tune.scales) == 12 and tune.max_ppl_increase == 0.25
    assert (tune.max_tokens, tune.dry_run) == (32, False)
    tune = parse_tune_body({"prompts": ["a"], "scales": [0.2, 0.1], "max_ppl_increase": 1, "dry_run": True})
    assert (tune.prompts, tune.scales, tune.max_ppl_increase, tune.dry_run) == (["a"], (0.1, 0.2), 1.0, True)
    bad = [
        ([1], None, "body must be a JSON object"),
        ({"prompt": ["a"]}, "prompt", "unknown field 'prompt'"),
        ({"prompts": []}, "prompts", "non-empty list"),
        ({"prompts": ["a", " "]}, "prompts", "non-empty list"),
        ({"prompts": ["a"] * (MAX_PROMPTS + 1)}, "prompts", f"at most {MAX_PROMPTS} prompts"),
        ({"prompts": ["a" * 5000]}, "prompts", "prompts[0] is 5000 characters"),
        ({"max_ppl_increase": -1}, "max_ppl_increase", "finite number >= 0"),
        ({"scales": "0.1"}, "scales", "must be a list"),
        ({"scales": [0.1, -0.1]}, "scales", "must be positive"),
        ({"scales": [0.01 * i for i in range(1, 40)]}, "scales", "at most 32 scales"),
        ({"max_tokens": 0}, "max_tokens", "from 1 to 256"),
        ({"max_tokens": 2.5}, "max_tokens", "from 1 to 256"),
        ({"dry_run": "yes"}, "dry_run", "true or false"),
        ({"prompts": ["a"] * 64, "scales": [0.01 * i for i in range(1, 17)]}, "prompts",
         f"at most {MAX_GENERATIONS} per call"),
    ]
    for body, param, words in bad:
        with pytest.raises(ICVHTTPError) as info:
            parse_tune_body(body)
        assert info.value.status == 400 and info.value.param == param and words in info.value.message, body


# -- the CLI's arguments (no engine starts) --------------------------------------------------------

def test_cli_argument_errors(tmp_path, monkeypatch, capsys):
    from icv_vllm.cli.tune import main

    monkeypatch.delenv("ICV_VLLM_DIR", raising=False)
    path = tmp_path / "v.safetensors"
    _vector_file(path)
    cases = [
        (["--model", "m", "--vector", "v"], "give --icv-dir DIR"),
        (["--model", "m", "--vector", str(tmp_path / "missing.safetensors")], "cannot read"),
        (["--model", "m", "--vector", str(path), "--max-ppl-increase", "-1"], "max_ppl_increase must be"),
        (["--model", "m", "--vector", str(path), "--scales", "0.1,-1"], "must be positive"),
        (["--model", "m", "--vector", str(path), "--min-scale", "0.5", "--max-scale", "0.1"], "0 < min scale"),
        (["--model", "m", "--vector", str(path), "--prompts", str(tmp_path / "none.txt")], "cannot read prompts"),
        (["--model", "m", "--vector", "v", "--icv-dir", str(tmp_path / "elsewhere")], "cannot read"),
        (["--model", "m", "--vector", "../v", "--icv-dir", str(tmp_path)], "is not in --icv-dir"),
        (["--model", "m", "--vector", "bad name!", "--icv-dir", str(tmp_path)], "invalid vector name"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("icv-vllm tune: error: ") and words in err, (argv, err)
    (tmp_path / "broken.safetensors").write_bytes(b"not a vector")
    assert main(["--model", "m", "--vector", "broken", "--icv-dir", str(tmp_path)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_cli_resolves_a_name_in_the_directory(tmp_path, monkeypatch):
    from icv_vllm.cli.tune import resolve_vector

    monkeypatch.setenv("ICV_VLLM_DIR", str(tmp_path))
    assert resolve_vector("polite", None) == (tmp_path.resolve(), "polite")
    assert resolve_vector(str(tmp_path / "formal.safetensors"), None) == (tmp_path.resolve(), "formal")


def test_cli_refuses_gguf_and_other_shapes(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    from icv_vllm.cli.tune import main
    from icv_vllm.vectors.vector import ICVector

    (tmp_path / "cv.gguf").write_bytes(b"GGUF")
    assert main(["--model", "m", "--vector", str(tmp_path / "cv.gguf")]) == 2
    assert "convert it (icv-vllm convert)" in capsys.readouterr().err
    ICVector(torch.ones(2, 16), model="other", method="mean", num_pairs=1).save(tmp_path / "small.safetensors")
    assert main(["--model", str(tiny_llama_dir), "--vector", str(tmp_path / "small.safetensors")]) == 2
    assert "has 2 layers x 16 hidden size, but the model" in capsys.readouterr().err


# -- the measurement passes, against a stand-in engine ------------------------------------------------

class _Tokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [2 + len(w) for w in text.split()]}


class _Engine:
    """``generate`` and ``collective_rpc`` as the sweep uses them: a steered
    output depends on its scale, a token's logprob is -token/10, a capture's
    layer-l row is (number of tokens + l) everywhere."""

    LAYERS, HIDDEN = 3, 4

    def __init__(self, step_s: float = 0.0):
        from types import SimpleNamespace

        self.step_s = step_s
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64, model="m"),
                                           parallel_config=SimpleNamespace(data_parallel_size=1))
        self.in_flight = self.max_in_flight = 0
        self.aborted = 0
        self.captured = {}
        self.selections = []

    @staticmethod
    def output_ids(scale: float) -> list[int]:
        return [3, 4 + round(scale * 10), 5]

    async def generate(self, prompt, params, request_id, data_parallel_rank=None):
        import asyncio
        from types import SimpleNamespace

        from icv_vllm.frontend.admission import CAPTURE_IDS

        ids = prompt["prompt_token_ids"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.step_s)
            extra = params.extra_args or {}
            prompt_logprobs = None
            if "icv_capture" in extra:
                assert CAPTURE_IDS.take(extra["icv_capture"]) is True
                self.captured[extra["icv_capture"]] = [[float(len(ids) + l)] * self.HIDDEN
                                                       for l in range(self.LAYERS + 1)]
                token_ids, text = [0], ""
            elif params.prompt_logprobs == 0:
                assert not extra  # scored unsteered
                prompt_logprobs = [None] + [{t: SimpleNamespace(logprob=-t / 10)} for t in ids[1:]]
                token_ids, text = [0], ""
            else:
                self.selections.append(extra.get("icv"))
                scale = float(extra["icv"].split(":")[1]) if extra else 0.0
                token_ids = self.output_ids(scale)
                text = "" if scale == 0.3 else " ".join("w" * t for t in token_ids) + "."
            reason = "error" if extra.get("icv") == "v:0.666" else "length"
            yield SimpleNamespace(finished=True, prompt_logprobs=prompt_logprobs,
                                  outputs=[SimpleNamespace(token_ids=token_ids, text=text, finish_reason=reason)])
        except BaseException:
            self.aborted += 1
            raise
        finally:
            self.in_flight -= 1

    async def collective_rpc(self, method, args):
        assert method == "icv_take_captures"
        return [{c: self.captured.pop(c) for c in args[0]}]


def test_measure_sweep_computes_both_measures():
    import asyncio

    from icv_vllm.tuning.measure import measure_sweep

    engine = _Engine()
    vector = torch.ones(engine.LAYERS, engine.HIDDEN)
    prompts = ["a b", "c d e"]
    baseline, measured = asyncio.run(measure_sweep(engine, "v", vector, prompts, [0.1, 0.3], max_tokens=3,
                                                   window=2, tokenizer=_Tokenizer()))
    assert engine.max_in_flight <= 2
    assert sorted(s or "" for s in engine.selections) == ["", "", "v:0.1", "v:0.1", "v:0.3", "v:0.3"]
    for m, scale in zip([baseline, *measured], [0.0, 0.1, 0.3]):
        out = engine.output_ids(scale)
        assert m.scale == scale and m.tokens == 2 * len(out)  # only the output's tokens are scored
        assert m.perplexity == pytest.approx(math.exp(sum(out) / 10 / len(out)))
    # effect: the output text alone ("www wwwww wwwww", punctuation removed) -> 1 + 3 tokens;
    # rows 1..3 (the decoder layers) are 4+l, projected on the unit direction (1,1,1,1)/2
    assert baseline.effect == pytest.approx(sum((4 + l) * 2.0 for l in (1, 2, 3)) / 3)
    assert baseline.effect_samples == 2
    assert measured[1].effect is None and measured[1].effect_samples == 0  # empty text: no sample
    assert engine.captured == {}  # every capture collected


def test_measure_sweep_refuses_long_prompts_failed_requests_and_stops_when_cancelled():
    import asyncio

    from icv_vllm.tuning.measure import measure_sweep

    engine = _Engine()
    with pytest.raises(TuningError, match="prompts\\[0\\] is 3 tokens; with max_tokens 62"):
        asyncio.run(measure_sweep(engine, "v", torch.ones(3, 4), ["a b"], [0.1], max_tokens=62,
                                  tokenizer=_Tokenizer()))

    with pytest.raises(RuntimeError, match="finish reason 'error'"):  # never scored as if it had run
        asyncio.run(measure_sweep(engine, "v", torch.ones(3, 4), ["a b"], [0.1, 0.666], max_tokens=3,
                                  tokenizer=_Tokenizer()))

    slow = _Engine(step_s=30.0)

    async def cancel_soon():
        task = asyncio.ensure_future(measure_sweep(slow, "v", torch.ones(3, 4), ["a"] * 10, [0.1, 0.2],
                                                   max_tokens=3, window=4, tokenizer=_Tokenizer()))
        await asyncio.sleep(0.2)
        assert slow.in_flight == 4  # the window, not all 30 generations
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    assert slow.in_flight == 0 and slow.aborted == 4
