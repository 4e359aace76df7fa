"""Worker-side state of the plugin: one per worker process (the custom op has
no way to receive Python objects, so it finds this module-level instance).

``setup`` runs once after the model is loaded, ``prepare_step`` once per step
after vLLM prepared its inputs, ``apply`` once per decoder layer per step.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..kernels import apply_icv_shift, cpu_kernel, icv_shift_planned, plan_icv_shift
from ..spec import MAX_VECTORS_PER_REQUEST
from .admission import CAPTURE_EXTRA_ARGS_KEY
from .config import plugin_config
from .resolved_spec import parse_resolved, resolved_of
from .step_metadata import StepMetadata
from .vector_bank import VectorBank

logger = logging.getLogger("vllm.icv_vllm")

MAX_PENDING_CAPTURES = 4096
SHIFT_PATHS = {
    "triton": "the Triton kernel",
    "c": "the C kernel",
    "torch": "torch ops (the C kernel is off: not built for lack of a C compiler, or ICV_VLLM_CPU_KERNEL=0)",
}


class SteeringRuntime:
    def __init__(self) -> None:
        self.bank: VectorBank | None = None
        self.metadata: StepMetadata | None = None
        self.layers: list[int] = []
        self.model: Any = None
        # On CUDA the op always launches the kernel (a captured CUDA graph must
        # not depend on a Python branch); on the CPU it skips unsteered steps.
        self.always_launch = False
        self.shift_path: str | None = None  # a SHIFT_PATHS key, once set up
        self._cpu_shift: Any = None  # the C kernel bound to the step tables (CPU)
        self.active = False
        self._step = 0
        self._plan_key: tuple[int, int] | None = None
        self._plan = None
        self._step_captures: list[tuple[str, int]] = []
        self._captures: OrderedDict[str, dict] = OrderedDict()
        self._failed_requests: set[str] = set()

    # -- once, after load_model ------------------------------------------------
    def setup(self, runner: Any, model: torch.nn.Module) -> None:
        from .decoder_layers import install_steering

        self.layers = install_steering(model)
        self.model = model
        if not self.layers:
            logger.warning("icv: no supported decoder layer in %s; steering is off",
                           type(model).__name__)
            return
        config = plugin_config(runner.vllm_config)
        text_config = runner.model_config.hf_text_config
        self.num_layers = int(text_config.num_hidden_layers)
        device = torch.device(runner.device)
        self.bank = VectorBank(config.vector_dir, config.max_slots, self.num_layers,
                               int(text_config.hidden_size), device,
                               growable=device.type != "cuda")
        self.metadata = StepMetadata(runner.max_num_tokens, runner.max_num_reqs, device)
        self.always_launch = device.type == "cuda"
        if device.type == "cpu" and cpu_kernel.AVAILABLE:  # tables checked once, here
            self._cpu_shift = cpu_kernel.BoundTables(self.metadata.token_rows, self.metadata.entry_slots,
                                                     self.metadata.entry_scales)
        self.shift_path = "triton" if device.type == "cuda" else "c" if self._cpu_shift else "torch"
        logger.info("icv: steering %d decoder layers of %s, %d vector slots, vectors from %s; "
                    "shift by %s", len(self.layers), type(model).__name__, config.max_slots,
                    config.vector_dir, SHIFT_PATHS[self.shift_path])

    # -- once per step -----------------------------------------------------------
    def prepare_step(self, runner: Any, num_scheduled_tokens: np.ndarray) -> None:
        if self.metadata is None:
            return
        num_reqs = len(num_scheduled_tokens)
        req_ids = runner.input_batch.req_ids[:num_reqs]
        rows = np.full(num_reqs, -1, dtype=np.int32)
        slots = np.full((num_reqs, MAX_VECTORS_PER_REQUEST), -1, dtype=np.int32)
        scales = np.zeros((num_reqs, MAX_VECTORS_PER_REQUEST), dtype=np.float32)
        starts = np.concatenate(([0], np.cumsum(num_scheduled_tokens)[:-1]))
        pinned: set[int] = set()
        captures = []
        for i, req_id in enumerate(req_ids):
            params = runner.requests[req_id].sampling_params
            extra = params.extra_args if params is not None else None
            if not extra:
                continue
            resolved = resolved_of(extra)
            if resolved is not None:
                self._map_request(i, req_id, resolved, pinned, rows, slots, scales)
            capture_id = extra.get(CAPTURE_EXTRA_ARGS_KEY)
            if capture_id is not None:
                state = runner.requests[req_id]
                done = int(runner.input_batch.num_computed_tokens_cpu[i])
                last = state.num_prompt_tokens - 1
                if done <= last < done + int(num_scheduled_tokens[i]):
                    captures.append((str(capture_id), int(starts[i]) + last - done))
                    self._new_capture(str(capture_id), state.prompt_token_ids[-1])
        self.metadata.fill(np.repeat(rows, num_scheduled_tokens), slots, scales)
        self.active = bool((rows >= 0).any())
        self._step += 1
        self._step_captures = captures

    def _map_request(self, i, req_id, resolved, pinned, rows, slots, scales) -> None:
        choices = parse_resolved(resolved)
        try:
            request_slots = self.bank.slots_for(choices, pinned)
        except Exception as e:  # a file removed or broken after admission
            if req_id not in self._failed_requests:
                self._failed_requests.add(req_id)
                logger.error("icv: request %s runs UNSTEERED: %s", req_id, e)
            return
        rows[i] = i
        slots[i, : len(choices)] = request_slots
        scales[i, : len(choices)] = [c.scale for c in choices]

    # -- once per decoder layer per step ---------------------------------------
    def apply(self, hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
        if self._step_captures:
            self._record(hidden_states, residual, layer)
        if not (self.active or self.always_launch) or self.metadata is None:
            return
        m = self.metadata
        if self.always_launch:  # CUDA: one fused launch, graph-safe, no host work
            apply_icv_shift(hidden_states, m.token_rows, m.entry_slots, m.entry_scales,
                            self.bank.tensor, layer)
            return
        if self._cpu_shift is not None and self._cpu_shift(hidden_states, self.bank.tensor, layer):
            return  # one C call, which read the tables itself
        # torch fallback: which tokens use which vectors is the same for every
        # layer of a step, so it is worked out once per step, not once per layer.
        key = (self._step, hidden_states.shape[0])
        if self._plan_key != key:
            self._plan = plan_icv_shift(key[1], m.token_rows, m.entry_slots, m.entry_scales)
            self._plan_key = key
        if self._plan is not None:
            icv_shift_planned(hidden_states, self._plan, self.bank.tensor, layer)

    # -- capture of residual streams for in-server extraction -------------------
    def _new_capture(self, capture_id: str, last_token_id: int) -> None:
        self._captures[capture_id] = {"token": int(last_token_id), "layers": {}}
        while len(self._captures) > MAX_PENDING_CAPTURES:
            self._captures.popitem(last=False)

    def _record(self, hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
        for capture_id, index in self._step_captures:
            stream = hidden_states[index].float() + residual[index].float()
            self._captures[capture_id]["layers"][layer] = stream.cpu()

    def take_captures(self, capture_ids: list[str]) -> dict[str, Any]:
        """Pop finished captures as {id: [[embedding], [layer 0], ...]} rows
        (plain lists: they cross process boundaries through vLLM's RPC)."""
        out: dict[str, Any] = {}
        for capture_id in capture_ids:
            entry = self._captures.pop(capture_id, None)
            missing = None if entry is None else [l for l in range(self.num_layers) if l not in entry["layers"]]
            if entry is None or missing:
                raise RuntimeError(
                    f"icv capture {capture_id!r} was not recorded"
                    + (f" for layers {missing}" if missing else "")
                    + ": in-server extraction needs the steering op to run in Python each "
                    "step (CPU backend, or --enforce-eager on CUDA)"
                )
            device = self.bank.tensor.device if self.bank is not None else "cpu"
            with torch.inference_mode():
                ids = torch.tensor([entry["token"]], device=device)
                embedding = self.model.embed_input_ids(ids)[0].float().cpu()
            rows = [embedding] + [entry["layers"][l] for l in range(self.num_layers)]
            out[capture_id] = torch.stack(rows).tolist()
        return out


RUNTIME = SteeringRuntime()
