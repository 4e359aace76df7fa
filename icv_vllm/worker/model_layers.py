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
_steered: dict[tuple[type, str], type] = {}
_observed: dict[tuple[type, str], type] = {}


class UnsupportedModelError(RuntimeError):
    pass


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[T, D] view of a block's output (the Transformers backend runs [1, T, D])."""
    return t if t.dim() == 2 else t.view(-1, t.shape[-1])


def _steer(out, index: int, ff_output: str):
    """Shift a feed-forward block's output in place; returns it unchanged in form."""
    if ff_output == "tensor":
        torch.ops.icv_vllm.steer_(_rows(out), index)
    elif ff_output == "out_bias":  # (output, bias): the block's true output is their sum
        value, bias = out
        if bias is None:
            torch.ops.icv_vllm.steer_(_rows(value), index)
        else:
            value += bias
            torch.ops.icv_vllm.steer_(_rows(value), index)
            value -= bias
    else:
        raise ValueError(f"unknown feed-forward output {ff_output!r}")
    return out


def _observe(out, index: int, stream: str):
    if stream == "sum":  # (feed-forward output, residual): the stream is their sum
        hidden, residual = out
        torch.ops.icv_vllm.observe_(_rows(hidden), _rows(residual), index)
    elif stream in ("output", "first"):  # the stream itself, alone or first of a tuple
        torch.ops.icv_vllm.observe_(_rows(out[0] if isinstance(out, tuple) else out), None, index)
    else:
        raise ValueError(f"unknown stream layout {stream!r}")
    return out


def _wrap_forward(module: nn.Module, after, cache: dict, prefix: str, kind: str) -> None:
    """Make ``module``'s forward end with ``after(out, module.icv_layer_index, kind)``:
    a subclass (keeps parameter names; Dynamo traces it like any module), or,
    where the instance carries its own ``forward`` (set by a decorator or a
    kernel hub), a wrapper of that."""
    own = module.__dict__.get("forward")
    if own is not None:
        if getattr(own, "__icv_wrapped__", False):
            return

        def forward(*args, **kwargs):
            return after(own(*args, **kwargs), module.icv_layer_index, kind)

        forward.__icv_wrapped__ = True
        module.forward = forward
        return
    base = type(module)
    if getattr(base, "__icv_wrapped__", False):
        return
    if (base, kind) not in cache:
        def forward(self, *args, **kwargs):
            return after(base.forward(self, *args, **kwargs), self.icv_layer_index, kind)

        cache[(base, kind)] = type(f"{prefix}{base.__name__}", (base,), {"forward": forward,
                                                                         "__icv_wrapped__": True})
    module.__class__ = cache[(base, kind)]


def install_steering(model: nn.Module, family: ModelFamily, num_layers: int,
                     expected: range | None = None) -> list[int]:
    """Wrap every decoder layer of ``model`` and its feed-forward block;
    raises unless exactly the ``expected`` layers (default 0..num_layers-1;
    a pipeline stage holds a range of them) were found."""
    expected = range(num_layers) if expected is None else expected
    from . import steering_op  # noqa: F401  (registers the ops)

    indices = []
    for name, module in model.named_modules():
        cls = type(module)
        if getattr(module, "icv_layer_index", None) is not None and hasattr(module, family.ff_attribute):
            indices.append(module.icv_layer_index)  # wrapped already
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
        feed_forward.icv_layer_index = index
        _wrap_forward(feed_forward, _steer, _steered, "Steered", family.ff_output)
        module.icv_layer_index = index
        _wrap_forward(module, _observe, _observed, "Observed", family.stream)
        indices.append(index)
    indices.sort()
    if indices != list(expected):
        raise UnsupportedModelError(
            f"{type(model).__name__} ({family.architecture}): found steerable layers {indices}, "
            f"expected {expected.start}..{expected.stop - 1} of classes {family.layer_classes}; vLLM "
            "changed this model (icv-vllm read vllm 0.32.0)")
    return indices
