"""The shift kernel a worker uses, chosen once at setup (never switched
mid-run): Triton on CUDA, the C kernel on the CPU when it was built and
takes the model's dtype, the torch version otherwise. Each is bound to the
step tables (``StepMetadata``) and called once per decoder layer as
``shift(hidden, bank, layer)``; the choice is logged and exposed as
``SteeringRuntime.shift_path``.
"""

from __future__ import annotations

import torch

from ..kernels import cpu_kernel, icv_shift_planned, plan_icv_shift
from .step_metadata import StepMetadata

DESCRIPTIONS = {
    "triton": "the Triton kernel",
    "c": f"the C kernel on {cpu_kernel.THREADS_NOTE}",
    "torch": "torch ops (the C kernel is off: not built for lack of a C compiler, "
             "ICV_VLLM_CPU_KERNEL=0, or the model's dtype is not one it takes)",
}


class ShiftError(RuntimeError):
    pass


class TritonShift:
    """CUDA: one launch per layer, every step (graph-safe: no host branch)."""

    name = "triton"
    always_launch = True

    def __init__(self, metadata: StepMetadata):
        from ..kernels.icv_shift_triton import icv_shift_triton

        self._kernel = icv_shift_triton
        self._m = metadata

    def __call__(self, hidden: torch.Tensor, bank: torch.Tensor, layer: int) -> None:
        self._kernel(hidden, *self._m.tables, bank, layer)

    def new_step(self) -> None:
        pass


class CShift:
    """CPU: one C call per layer reading the tables itself (bound once)."""

    name = "c"
    always_launch = False

    def __init__(self, metadata: StepMetadata):
        self._bound = cpu_kernel.BoundTables(*metadata.tables)

    def __call__(self, hidden: torch.Tensor, bank: torch.Tensor, layer: int) -> None:
        if not self._bound(hidden, bank, layer):
            raise ShiftError(f"icv: the C kernel cannot take a {hidden.dtype} {tuple(hidden.shape)} block "
                             f"with strides {hidden.stride()}")

    def new_step(self) -> None:
        pass


class TorchShift:
    """Anywhere: which tokens use which vectors is worked out once per step
    (``plan_icv_shift``) and reused by every layer."""

    name = "torch"
    always_launch = False

    def __init__(self, metadata: StepMetadata):
        self._m = metadata
        self._plan_key: int | None = None
        self._plan = None

    def new_step(self) -> None:
        self._plan_key = None

    def __call__(self, hidden: torch.Tensor, bank: torch.Tensor, layer: int) -> None:
        if self._plan_key != hidden.shape[0]:
            self._plan = plan_icv_shift(hidden.shape[0], *self._m.tables)
            self._plan_key = hidden.shape[0]
        if self._plan is not None:
            icv_shift_planned(hidden, self._plan, bank, layer)


def choose_shift(device: torch.device, dtype: torch.dtype, metadata: StepMetadata):
    if device.type == "cuda":
        return TritonShift(metadata)
    if device.type == "cpu" and cpu_kernel.AVAILABLE and cpu_kernel.supports(torch.empty(1, 1, dtype=dtype)):
        return CShift(metadata)
    return TorchShift(metadata)
