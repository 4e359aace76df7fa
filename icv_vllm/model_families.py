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
    """``stream``: how a layer's output gives the residual stream — ``"sum"``:
    it returns ``(hidden, residual)`` and the add happens in the next layer's
    fused add + norm; ``"output"``: it returns the stream; ``"first"``: it
    returns ``(stream, other)``. ``ff_output``: ``"tensor"``, or ``"out_bias"``
    for a block returning ``(output, bias)`` whose bias the layer adds later
    (the shift applies to output + bias, the block's true output).
    ``tp_safe``: whether the block's output is all-reduced inside it; where
    not, tensor parallelism is refused at start-up (``tp_unsafe_when`` names
    the config flags that make it so)."""

    architecture: str
    layer_classes: tuple[str, ...]
    ff_attribute: str = "mlp"
    stream: str = "sum"
    ff_output: str = "tensor"
    tp_unsafe_when: tuple[str, ...] = ()
    note: str = ""


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("LlamaForCausalLM", ("LlamaDecoderLayer",)),
    ModelFamily("MistralForCausalLM", ("MistralDecoderLayer",)),
    ModelFamily("Qwen2ForCausalLM", ("Qwen2DecoderLayer",)),
    ModelFamily("Qwen3ForCausalLM", ("Qwen3DecoderLayer",)),
    ModelFamily("GemmaForCausalLM", ("GemmaDecoderLayer",)),
    ModelFamily("Gemma2ForCausalLM", ("Gemma2DecoderLayer",),
                note="shift before the post-feed-forward norm"),
    ModelFamily("Gemma3ForCausalLM", ("Gemma3DecoderLayer",),
                note="shift before the post-feed-forward norm"),
    ModelFamily("Phi3ForCausalLM", ("LlamaDecoderLayer",), note="vLLM runs it with Llama's layers"),
    ModelFamily("GraniteForCausalLM", ("GraniteDecoderLayer",), stream="output",
                note="shift before the residual multiplier"),
    ModelFamily("Olmo2ForCausalLM", ("Olmo2DecoderLayer",), stream="output",
                note="vLLM's Transformers backend; shift before the post-feed-forward norm"),
    ModelFamily("Starcoder2ForCausalLM", ("Starcoder2DecoderLayer",), stream="output",
                note="vLLM's Transformers backend"),
    ModelFamily("FalconForCausalLM", ("FalconDecoderLayer",), stream="output", ff_output="out_bias",
                tp_unsafe_when=("parallel_attn", "new_decoder_architecture"),
                note="parallel attention: shift on the MLP branch; tensor parallel only for sequential layouts"),
    ModelFamily("GPTNeoXForCausalLM", ("GPTNeoXLayer",), stream="output",
                note="vLLM's Transformers backend; parallel residual: shift on the MLP branch"),
    ModelFamily("StableLmForCausalLM", ("StablelmDecoderLayer",), stream="first",
                note="use_parallel_residual=True is served wrongly by vLLM 0.32 itself"),
    ModelFamily("MixtralForCausalLM", ("MixtralDecoderLayer",), ff_attribute="block_sparse_moe",
                note="shift on the sparse-MoE block's output"),
    ModelFamily("Qwen2MoeForCausalLM", ("Qwen2MoeDecoderLayer",), note="shift on the sparse-MoE block's output"),
    ModelFamily("Qwen3MoeForCausalLM", ("Qwen3MoeDecoderLayer",), note="shift on the sparse-MoE block's output"),
    ModelFamily("Qwen2VLForConditionalGeneration", ("Qwen2DecoderLayer",),
                note="the language model's layers; vLLM needs torchvision for this model"),
    ModelFamily("Gemma3ForConditionalGeneration", ("Gemma3DecoderLayer",),
                note="the language model's layers; vLLM needs torchvision for this model"),
)
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}


def family_of(architectures: list[str] | tuple[str, ...]) -> ModelFamily | None:
    for name in architectures:
        if name in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[name]
    return None


def supported_architectures() -> list[str]:
    return sorted(BY_ARCHITECTURE)
