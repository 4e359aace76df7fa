"""``torch.ops.icv_vllm.steer_`` and ``torch.ops.icv_vllm.observe_``: the two
ops the wrapped modules call.

Registered custom ops are opaque to Dynamo and inductor, so the compiled
model keeps calling them every step and they read that step's state from the
persistent buffers of the worker's ``SteeringRuntime`` (never baked into the
graph). ``steer_`` shifts a feed-forward output in place (no copy when
nothing is steered); ``observe_`` records a decoder layer's output for
in-server extraction (declared as mutating so the compiler never drops it).
"""

from __future__ import annotations

from typing import Optional

import torch

from .runtime import RUNTIME


@torch.library.custom_op("icv_vllm::steer_", mutates_args=("hidden_states",))
def steer_(hidden_states: torch.Tensor, layer: int) -> None:
    RUNTIME.apply(hidden_states, layer)


@steer_.register_fake
def _(hidden_states: torch.Tensor, layer: int) -> None:
    return None


@torch.library.custom_op("icv_vllm::observe_", mutates_args=("hidden_states",))
def observe_(hidden_states: torch.Tensor, residual: Optional[torch.Tensor], layer: int) -> None:
    RUNTIME.observe(hidden_states, residual, layer)


@observe_.register_fake
def _(hidden_states: torch.Tensor, residual: Optional[torch.Tensor], layer: int) -> None:
    return None
