"""``torch.ops.icv_vllm.steer_``: the one op the decoder layers call.

A registered custom op is opaque to Dynamo and inductor, so the compiled model
keeps calling it every step and it reads that step's state from the
persistent buffers of the worker's ``SteeringRuntime`` (never baked into the
graph). It mutates ``hidden_states`` in place: no extra copy when steering is
off.
"""

from __future__ import annotations

import torch

from .runtime import RUNTIME


@torch.library.custom_op("icv_vllm::steer_", mutates_args=("hidden_states",))
def steer_(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    RUNTIME.apply(hidden_states, residual, layer)


@steer_.register_fake
def _(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None
