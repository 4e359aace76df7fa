"""Choosing a vector's strength: sweep λ on neutral prompts, measure the
steering effect and the fluency cost, recommend the largest λ whose cost
stays within a bound (``icv-vllm tune``, ``POST /v1/icv/{name}/tune``).

- ``sweep``: the rule and the table, independent of how outputs are made;
- ``measure``: the measurements through a running vLLM engine (imports vLLM);
- ``storage``: ``recommended_scale`` written into the vector file.
"""

from .sweep import (DEFAULT_MAX_PPL_INCREASE, DEFAULT_MAX_SCALE, DEFAULT_MAX_TOKENS, DEFAULT_MIN_SCALE,
                    DEFAULT_STEPS, Measurement, Point, TuneResult, TuningError, check_bound, check_scales,
                    geometric_scales, mean_projection, neutral_prompts, no_recommendation_message,
                    parse_prompts, pooled_perplexity, recommend, relative_increase)

__all__ = [
    "DEFAULT_MAX_PPL_INCREASE", "DEFAULT_MAX_SCALE", "DEFAULT_MAX_TOKENS", "DEFAULT_MIN_SCALE", "DEFAULT_STEPS",
    "Measurement", "Point", "TuneResult", "TuningError", "check_bound", "check_scales", "geometric_scales",
    "mean_projection", "neutral_prompts", "no_recommendation_message", "parse_prompts", "pooled_perplexity",
    "recommend", "relative_increase",
]
