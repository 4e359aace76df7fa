"""Which decoder layers are steered, and how they are made to call the op.

Each supported vLLM decoder layer ends with ``hidden_states = self.mlp(...);
return hidden_states, residual``: the returned ``hidden_states`` is the MLP
output the paper shifts (before the next layer's fused add + RMSNorm). After
the model is loaded, every such layer instance gets a subclass whose forward
calls the original and then ``torch.ops.icv_vllm.steer_`` in place. Swapping
the class (not wrapping modules) keeps parameter names and lets Dynamo trace
it like any module.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

# Checked against vllm 0.32.0 (model_executor/models/{llama,mistral,qwen2,qwen3}.py).
SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)
SUPPORTED_LAYER_CLASSES = frozenset(
    {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
)
_EXPECTED_PARAMS = ("positions", "hidden_states", "residual")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)$")
_steered_classes: dict[type, type] = {}


class UnsupportedModelError(RuntimeError):
    pass


def _steered_class(base: type) -> type:
    if base not in _steered_classes:
        params = tuple(inspect.signature(base.forward).parameters)[1:4]
        if params != _EXPECTED_PARAMS:
            raise UnsupportedModelError(
                f"{base.__module__}.{base.__qualname__}.forward takes {params}, expected "
                f"{_EXPECTED_PARAMS}: vLLM changed this layer; icv-vllm was written "
                "against vllm 0.32.0"
            )

        def forward(self, positions, hidden_states, residual, *args, **kwargs):
            hidden_states, residual = base.forward(
                self, positions, hidden_states, residual, *args, **kwargs
            )
            torch.ops.icv_vllm.steer_(hidden_states, residual, self.icv_layer_index)
            return hidden_states, residual

        _steered_classes[base] = type(f"Steered{base.__name__}", (base,), {"forward": forward})
    return _steered_classes[base]


def install_steering(model: nn.Module) -> list[int]:
    """Make every supported decoder layer of ``model`` steerable; returns the
    layer indices found (empty: the architecture is not supported)."""
    from . import steering_op  # noqa: F401  (registers torch.ops.icv_vllm.steer_)

    indices = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__name__ not in SUPPORTED_LAYER_CLASSES or cls in _steered_classes.values():
            continue
        match = _LAYER_INDEX.search(name)
        if match is None:
            raise UnsupportedModelError(f"cannot tell the layer index of decoder layer {name!r}")
        module.__class__ = _steered_class(cls)
        module.icv_layer_index = int(match.group(1))
        indices.append(module.icv_layer_index)
    return sorted(indices)
