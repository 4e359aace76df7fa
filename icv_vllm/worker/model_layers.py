"""Makes a loaded model call the steering ops, from the one family table
(``icv_vllm.model_families``) that admission also reads.

- Each decoder layer's feed-forward block (``layer.<ff_attribute>``: the MLP,
  or the sparse-MoE block) gets a subclass whose forward calls the original
  and then ``torch.ops.icv_vllm.steer_`` in place on its output: the shift
  sits exactly where the authors apply it (docs/method.md §3) — before any
  post-feed-forward norm, residual multiplier or residual add, and on the MLP
  branch of parallel-residual layers.
- Each decoder layer gets a subclass whose forward ends with
  ``torch.ops.icv_vllm.observe_`` on its output (the residual stream, for
  in-server extraction).

Swapping classes (not wrapping modules) keeps parameter names and lets
Dynamo trace them like any module. A model of a listed family whose layers
are not all found is an error, never a half-steered model.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..model_families import ModelFamily

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)$")
_steered: dict[type, type] = {}
_observed: dict[tuple[type, str], type] = {}


class UnsupportedModelError(RuntimeError):
    pass


def _steered_feed_forward(base: type) -> type:
    if base not in _steered:
        def forward(self, *args, **kwargs):
            out = base.forward(self, *args, **kwargs)
            torch.ops.icv_vllm.steer_(out, self.icv_layer_index)
            return out

        _steered[base] = type(f"Steered{base.__name__}", (base,), {"forward": forward})
    return _steered[base]


def _observed_layer(base: type, stream: str) -> type:
    key = (base, stream)
    if key not in _observed:
        if stream == "sum":  # returns (feed-forward output, residual): the stream is their sum
            def forward(self, *args, **kwargs):
                hidden, residual = base.forward(self, *args, **kwargs)
                torch.ops.icv_vllm.observe_(hidden, residual, self.icv_layer_index)
                return hidden, residual
        elif stream == "output":  # returns the residual stream itself
            def forward(self, *args, **kwargs):
                hidden = base.forward(self, *args, **kwargs)
                torch.ops.icv_vllm.observe_(hidden, None, self.icv_layer_index)
                return hidden
        else:
            raise ValueError(f"unknown stream layout {stream!r}")
        _observed[key] = type(f"Observed{base.__name__}", (base,), {"forward": forward})
    return _observed[key]


def install_steering(model: nn.Module, family: ModelFamily, num_layers: int) -> list[int]:
    """Wrap every decoder layer of ``model`` and its feed-forward block;
    raises unless exactly layers 0..num_layers-1 were found."""
    from . import steering_op  # noqa: F401  (registers the ops)

    indices = []
    wrapped = set(_observed.values())
    for name, module in model.named_modules():
        cls = type(module)
        if cls in wrapped:
            indices.append(module.icv_layer_index)
            continue
        if cls.__name__ not in family.layer_classes:
            continue
        match = _LAYER_INDEX.search(name)
        if match is None:
            raise UnsupportedModelError(f"cannot tell the layer index of decoder layer {name!r}")
        index = int(match.group(1))
        feed_forward = getattr(module, family.ff_attribute, None)
        if not isinstance(feed_forward, nn.Module):
            raise UnsupportedModelError(
                f"decoder layer {name!r} ({cls.__name__}) has no feed-forward block "
                f"{family.ff_attribute!r}; vLLM changed this model (icv-vllm read vllm 0.32.0)")
        feed_forward.__class__ = _steered_feed_forward(type(feed_forward))
        feed_forward.icv_layer_index = index
        module.__class__ = _observed_layer(cls, family.stream)
        module.icv_layer_index = index
        indices.append(index)
    indices.sort()
    if indices != list(range(num_layers)):
        raise UnsupportedModelError(
            f"{type(model).__name__} ({family.architecture}): found steerable layers {indices}, "
            f"expected 0..{num_layers - 1} of classes {family.layer_classes}; vLLM changed this model "
            "(icv-vllm read vllm 0.32.0)")
    return indices
