"""Choosing a strength from measurements: the rule, independent of how the
measurements were made (``measure`` runs them through a vLLM engine).

For each swept λ (and λ = 0, the baseline) the sweep has:

- **fluency cost**: the perplexity of the steered outputs under the
  unsteered model, pooled over all outputs' tokens
  (``exp(Σ NLL / Σ tokens)``), and its **relative increase** over the
  baseline, ``ppl(λ) / ppl(0) - 1`` (0.25 = a quarter more perplexed);
- **effect**: how far the steered outputs themselves point along the vector
  (``measure``: the unsteered model's residual stream at the last token of
  each output read alone, projected on each layer's unit direction); reported,
  not used by the rule.

**The rule.** The recommendation is the largest swept λ such that every
swept λ' ≤ λ has a relative increase ≤ ``max_ppl_increase`` (inclusive; a
non-finite perplexity never qualifies). Requiring the whole prefix, not only
λ itself, makes the recommendation monotone in the bound by construction: a
larger bound never gives a smaller λ, even when the measured curve is not
monotone (a noisy dip at a large λ after a spike at a smaller one is not
taken). When even the smallest λ exceeds the bound there is no
recommendation (``None``) and nothing is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_MAX_PPL_INCREASE = 0.25
DEFAULT_MIN_SCALE = 1e-3
DEFAULT_MAX_SCALE = 0.3
DEFAULT_STEPS = 12
DEFAULT_MAX_TOKENS = 32
PROMPTS_RESOURCE = "data/neutral_prompts.txt"


class TuningError(ValueError):
    """Tuning inputs that cannot be used; the message says which and why."""


def geometric_scales(low: float = DEFAULT_MIN_SCALE, high: float = DEFAULT_MAX_SCALE,
                     steps: int = DEFAULT_STEPS) -> tuple[float, ...]:
    """``steps`` values from ``low`` to ``high`` (both included), evenly spaced in log."""
    if not (math.isfinite(low) and math.isfinite(high)) or not 0 < low <= high:
        raise TuningError(f"the sweep needs 0 < min scale <= max scale, got {low!r} and {high!r}")
    if steps < 1:
        raise TuningError(f"the sweep needs at least 1 step, got {steps}")
    if steps == 1 or low == high:
        return check_scales([high])
    ratio = (high / low) ** (1.0 / (steps - 1))
    values = [low * ratio ** i for i in range(steps - 1)] + [high]
    rounded = check_scales(float(f"{v:.3g}") for v in values)  # readable: 0.00168, not 0.0016795...
    return rounded if len(rounded) == steps else check_scales(values)


def check_scales(scales: Iterable[float]) -> tuple[float, ...]:
    """Sorted distinct positive strengths a request may carry (spec's bounds)."""
    from ..spec import MAX_ABS_SCALE, MIN_ABS_SCALE

    out = set()
    for value in scales:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TuningError(f"every scale must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or not MIN_ABS_SCALE <= value <= MAX_ABS_SCALE:
            raise TuningError(f"every scale must be positive, between {MIN_ABS_SCALE:g} and {MAX_ABS_SCALE:g} "
                              f"(the sweep tries the vector's own direction), got {value!r}")
        out.add(value)
    if not out:
        raise TuningError("the sweep needs at least one scale")
    return tuple(sorted(out))


def check_bound(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TuningError(f"max_ppl_increase must be a finite number >= 0 (a relative increase: 0.25 = "
                          f"perplexity up by a quarter), got {value!r}")
    return float(value)


def parse_prompts(text: str, where: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise TuningError(f"{where}: no prompts (one per line; blank lines and # comments are skipped)")
    return prompts


def neutral_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts in ``path``, or the built-in neutral ones."""
    if path is None:
        text = resources.files("icv_vllm").joinpath(PROMPTS_RESOURCE).read_text(encoding="utf-8")
        return parse_prompts(text, f"icv_vllm/{PROMPTS_RESOURCE}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TuningError(f"cannot read prompts from {path}: {e}") from None
    return parse_prompts(text, str(path))


@dataclass(frozen=True)
class Measurement:
    """What one strength gave over all prompts. ``perplexity``: pooled over
    ``tokens`` scored output tokens; ``effect``: mean projection over
    ``effect_samples`` outputs (None when no output had text to read)."""

    scale: float
    perplexity: float
    tokens: int
    effect: float | None
    effect_samples: int


@dataclass(frozen=True)
class Point:
    """A row of the table: a measurement compared with the baseline."""

    scale: float
    perplexity: float
    ppl_increase: float  # ppl / baseline ppl - 1
    effect: float | None
    effect_gain: float | None  # effect - baseline effect
    within_bound: bool  # this λ and every smaller swept λ keep the increase within the bound
    tokens: int
    effect_samples: int


@dataclass(frozen=True)
class TuneResult:
    baseline: Measurement
    points: tuple[Point, ...]
    max_ppl_increase: float
    recommended_scale: float | None

    def to_json(self) -> dict:
        base = self.baseline
        return {
            "max_ppl_increase": self.max_ppl_increase,
            "recommended_scale": self.recommended_scale,
            "baseline": {"perplexity": _finite_or_none(base.perplexity), "effect": base.effect,
                         "tokens": base.tokens, "effect_samples": base.effect_samples},
            "points": [{"scale": p.scale, "perplexity": _finite_or_none(p.perplexity),
                        "ppl_increase": _finite_or_none(p.ppl_increase), "effect": p.effect,
                        "effect_gain": p.effect_gain, "within_bound": p.within_bound, "tokens": p.tokens,
                        "effect_samples": p.effect_samples} for p in self.points],
        }

    def table(self) -> str:
        rows = [("scale", "effect", "gain", "perplexity", "ppl increase", "")]
        rows.append(("0 (off)", _num(self.baseline.effect), "", _num(self.baseline.perplexity), "", ""))
        for p in self.points:
            if p.scale == self.recommended_scale:
                mark = "<- recommended"
            elif p.within_bound:
                mark = ""
            else:
                mark = "over" if not p.ppl_increase <= self.max_ppl_increase else "after a scale over"
            rows.append((f"{p.scale:g}", _num(p.effect), _num(p.effect_gain, signed=True), _num(p.perplexity),
                         f"{p.ppl_increase:+.1%}" if math.isfinite(p.ppl_increase) else "inf", mark))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w) if i < 5 else c for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                         for r in rows)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def relative_increase(perplexity: float, baseline: float) -> float:
    if not (math.isfinite(perplexity) and math.isfinite(baseline)) or baseline <= 0:
        return math.inf
    return perplexity / baseline - 1.0


def recommend(baseline: Measurement, measured: Sequence[Measurement], max_ppl_increase: float) -> TuneResult:
    """The table and the recommendation (see the module docstring for the rule)."""
    bound = check_bound(max_ppl_increase)
    ordered = sorted(measured, key=lambda m: m.scale)
    if len({m.scale for m in ordered}) != len(ordered) or any(m.scale <= 0 for m in ordered):
        raise TuningError("measurements need distinct positive scales")
    points, prefix_ok, best = [], True, None
    for m in ordered:
        increase = relative_increase(m.perplexity, baseline.perplexity)
        prefix_ok = prefix_ok and increase <= bound
        if prefix_ok:
            best = m.scale
        gain = None if m.effect is None or baseline.effect is None else m.effect - baseline.effect
        points.append(Point(m.scale, m.perplexity, increase, m.effect, gain, prefix_ok, m.tokens, m.effect_samples))
    return TuneResult(baseline, tuple(points), bound, best)


def no_recommendation_message(result: TuneResult) -> str:
    first = result.points[0]
    shown = f"{first.ppl_increase:+.1%}" if math.isfinite(first.ppl_increase) else "to infinity"
    return (f"no swept scale keeps the perplexity increase within {result.max_ppl_increase:g} "
            f"({result.max_ppl_increase:.0%}): the smallest, {first.scale:g}, already raises it {shown}; "
            "sweep smaller scales or allow a larger increase; nothing stored")


# -- the two measures, from what the engine returns ----------------------------------------

def pooled_perplexity(token_logprobs: Iterable[Sequence[float]]) -> tuple[float, int]:
    """``exp(-mean logprob)`` over every token of every output, and the token count."""
    total, count = 0.0, 0
    for logprobs in token_logprobs:
        for lp in logprobs:
            total -= float(lp)
            count += 1
    if count == 0:
        raise TuningError("no output tokens to score: every output was empty")
    mean = total / count
    return (math.exp(mean) if mean < 700 else math.inf), count


def mean_projection(streams, vector) -> float:
    """Mean over outputs and decoder layers of ``<h_l, v_l / |v_l|>``.
    ``streams``: ``[N, L+1, D]`` (row 0 the embedding, as captures and
    extraction give them); ``vector``: ``[L, D]``. Layers where the vector is
    zero have no direction and are left out."""
    import torch

    if streams.ndim != 3 or streams.shape[1] != vector.shape[0] + 1 or streams.shape[2] != vector.shape[1]:
        raise TuningError(f"residual streams {list(streams.shape)} do not fit a vector of shape {list(vector.shape)}")
    v = vector.to(torch.float64)
    norms = v.norm(dim=1)
    used = norms > 0
    if not bool(used.any()):
        raise TuningError("the vector is zero at every layer: it has no direction to tune")
    units = v[used] / norms[used, None]
    h = streams[:, 1:, :].to(torch.float64)[:, used, :]
    return float((h * units).sum(dim=2).mean())
