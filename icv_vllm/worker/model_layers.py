"""Makes the decoder layers of a loaded model call the steering op.

The layers to wrap come from the one family table (``icv_vllm.model_families``)
that admission also reads. Each such layer returns ``(mlp_output, residual)``;
after loading, every instance gets a subclass whose forward calls the
original and then ``torch.ops.icv_vllm.steer_`` in place on the MLP output
(docs/method.md §3). Swapping the class (not wrapping modules) keeps
parameter names and lets Dynamo trace it like any module.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from ..model_families import ModelFamily

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
                f"{_EXPECTED_PARAMS}: vLLM changed this layer; icv-vllm was written against vllm 0.32.0")

        def forward(self, positions, hidden_states, residual, *args, **kwargs):
            hidden_states, residual = base.forward(self, positions, hidden_states, residual, *args, **kwargs)
            torch.ops.icv_vllm.steer_(hidden_states, residual, self.icv_layer_index)
            return hidden_states, residual

        _steered_classes[base] = type(f"Steered{base.__name__}", (base,), {"forward": forward})
    return _steered_classes[base]


def install_steering(model: nn.Module, family: ModelFamily, num_layers: int) -> list[int]:
    """Make every decoder layer of ``model`` steerable; raises unless exactly
    layers 0..num_layers-1 were found (a family is never half steered)."""
    from . import steering_op  # noqa: F401  (registers torch.ops.icv_vllm.steer_)

    indices = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls in _steered_classes.values():
            indices.append(module.icv_layer_index)
            continue
        if cls.__name__ not in family.layer_classes:
            continue
        match = _LAYER_INDEX.search(name)
        if match is None:
            raise UnsupportedModelError(f"cannot tell the layer index of decoder layer {name!r}")
        module.__class__ = _steered_class(cls)
        module.icv_layer_index = int(match.group(1))
        indices.append(module.icv_layer_index)
    indices.sort()
    if indices != list(range(num_layers)):
        raise UnsupportedModelError(
            f"{type(model).__name__} ({family.architecture}): found steerable layers {indices}, "
            f"expected 0..{num_layers - 1} of classes {family.layer_classes}; vLLM changed this model "
            "(icv-vllm read vllm 0.32.0)")
    return indices
