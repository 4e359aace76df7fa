"""Worker-side state of the plugin: one per worker process (the custom op
has no way to receive Python objects, so it finds this module-level instance).

``setup`` runs once after the model is loaded (only where steering is
configured), ``prepare_step`` once per step after vLLM prepared its inputs,
``apply`` once per decoder layer per step.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..config import plugin_config
from ..model_families import family_of
from ..plugin.vllm_patches import MODEL_READS, REQUEST_STATE_READS, check_reads
from ..protocol import (CAPTURE_EXTRA_ARGS_KEY, MAX_VECTORS_PER_REQUEST, STEP_VECTORS_ATTR,
                        parse_resolved, resolved_of)
from .captures import CaptureRecorder
from .shift import DESCRIPTIONS, choose_shift
from .step_metadata import StepMetadata
from .vector_bank import VectorBank

logger = logging.getLogger("vllm.icv_vllm")


class SteeringRuntime:
    def __init__(self) -> None:
        self.ready = False
        self.bank: VectorBank | None = None
        self.metadata: StepMetadata | None = None
        self.layers: list[int] = []
        self.shift = None            # chosen once (worker.shift)
        self.shift_path: str | None = None
        self.captures: CaptureRecorder | None = None
        self.active = False          # this step steers at least one token
        self._checked_request_state = False

    # -- once, after load_model ------------------------------------------------
    def setup(self, runner: Any, model: torch.nn.Module) -> None:
        from .model_layers import install_steering

        config = plugin_config(runner.vllm_config)
        model_config = runner.model_config
        family = family_of(list(model_config.architectures or []))
        if family is None:
            logger.info("icv: %s is not a steerable family; selections are refused at admission",
                        model_config.architectures)
            return
        text_config = model_config.hf_text_config
        num_layers = int(text_config.num_hidden_layers)
        self.layers = install_steering(model, family, num_layers)
        check_reads(model, MODEL_READS)
        device = torch.device(runner.device)
        self.bank = VectorBank(config.max_slots, num_layers, int(text_config.hidden_size), device,
                               growable=not config.bank_is_fixed(device.type))
        self.metadata = StepMetadata(runner.max_num_tokens, runner.max_num_reqs, device)
        self.shift = choose_shift(device, model_config.dtype, self.metadata)
        self.shift_path = self.shift.name
        self.captures = CaptureRecorder(num_layers, model.embed_input_ids, device)
        self.ready = True
        logger.info("icv: steering %d decoder layers of %s; %s bank of %d vector slots; shift by %s",
                    len(self.layers), type(model).__name__, "growable" if self.bank.growable else "fixed",
                    self.bank.capacity, DESCRIPTIONS[self.shift_path])

    # -- once per step -----------------------------------------------------------
    def prepare_step(self, runner: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> None:
        shipped = getattr(scheduler_output, STEP_VECTORS_ATTR, None)
        if shipped is not None:
            self.bank.drop_contents(shipped.dropped)
            self.bank.add_contents(shipped.added)
        num_reqs = len(num_scheduled_tokens)
        req_ids = runner.input_batch.req_ids[:num_reqs]
        rows = np.full(num_reqs, -1, dtype=np.int32)
        slots = np.full((num_reqs, MAX_VECTORS_PER_REQUEST), -1, dtype=np.int32)
        scales = np.zeros((num_reqs, MAX_VECTORS_PER_REQUEST), dtype=np.float32)
        pinned: set[int] = set()
        captures = []
        for i, req_id in enumerate(req_ids):
            state = runner.requests[req_id]
            if not self._checked_request_state:
                check_reads(state, REQUEST_STATE_READS)
                self._checked_request_state = True
            params = state.sampling_params
            extra = params.extra_args if params is not None else None
            if not extra:
                continue
            resolved = resolved_of(extra)
            if resolved is not None:
                choices = parse_resolved(resolved)
                rows[i] = i
                slots[i, : len(choices)] = [self.bank.slot_of(c.digest, pinned) for c in choices]
                scales[i, : len(choices)] = [c.scale for c in choices]
            capture_id = extra.get(CAPTURE_EXTRA_ARGS_KEY)
            if capture_id is not None:
                done = int(runner.input_batch.num_computed_tokens_cpu[i])
                last = state.num_prompt_tokens - 1
                if done <= last < done + int(num_scheduled_tokens[i]):
                    start = int(num_scheduled_tokens[:i].sum())
                    captures.append((str(capture_id), start + last - done))
                    self.captures.begin(str(capture_id), state.prompt_token_ids[-1])
        self.metadata.fill(np.repeat(rows, num_scheduled_tokens), slots, scales)
        self.active = bool((rows >= 0).any())
        self.shift.new_step()
        self.captures.step_captures = captures

    # -- once per decoder layer per step ---------------------------------------
    def apply(self, ff_output: torch.Tensor, layer: int) -> None:
        """Shift a feed-forward block's output in place."""
        if self.ready and (self.active or self.shift.always_launch):
            self.shift(ff_output, self.bank.tensor, layer)

    def observe(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
        """A decoder layer's output (its stream is hidden + residual, or hidden)."""
        if self.ready and self.captures.step_captures:
            self.captures.record(hidden_states, residual, layer)

    def take_captures(self, capture_ids: list[str]) -> dict[str, Any]:
        if not self.ready:
            raise RuntimeError("icv: steering is not set up in this worker (no vector directory configured)")
        return self.captures.take(capture_ids)


RUNTIME = SteeringRuntime()
