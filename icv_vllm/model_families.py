"""Which model families are steered, in one table read by both sides: the
front end admits a selection only for an architecture listed here, and the
workers wrap exactly the layers listed here (and refuse to start steering
when a listed model has none of them), so a family can never be admitted and
then run unsteered. Pure data: imports nothing.

Each entry: the vLLM architecture name (``config.json`` ``architectures``);
the vLLM decoder-layer class names; the attribute of a layer that holds its
feed-forward block, whose output the paper shifts (docs/method.md §3); and
how the layer's output gives the residual stream (``"sum"``: it returns
``(feed-forward output, residual)`` and the residual add happens in the next
layer's fused add + norm; ``"output"``: it returns the stream itself).
Checked against vllm 0.32.0 ``model_executor/models/*.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    architecture: str
    layer_classes: tuple[str, ...]
    ff_attribute: str = "mlp"
    stream: str = "sum"
    note: str = ""


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("LlamaForCausalLM", ("LlamaDecoderLayer",)),
    ModelFamily("MistralForCausalLM", ("MistralDecoderLayer",)),
    ModelFamily("Qwen2ForCausalLM", ("Qwen2DecoderLayer",)),
    ModelFamily("Qwen3ForCausalLM", ("Qwen3DecoderLayer",)),
)
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}


def family_of(architectures: list[str] | tuple[str, ...]) -> ModelFamily | None:
    for name in architectures:
        if name in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[name]
    return None


def supported_architectures() -> list[str]:
    return sorted(BY_ARCHITECTURE)
