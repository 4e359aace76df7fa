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
from ..plugin.vllm_patches import MODEL_READS, PIPELINE_READS, REQUEST_STATE_READS, check_reads
from ..protocol import ENTRY_COLUMNS, STEP_VECTORS_ATTR
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
        self.num_layers = 0
        self.captures: CaptureRecorder | None = None
        self.active = False          # this step steers at least one token
        self._checked_request_state = False

    # -- once, after load_model ------------------------------------------------
    def setup(self, runner: Any, model: torch.nn.Module) -> None:
        from .model_layers import UnsupportedModelError, install_steering

        config = plugin_config(runner.vllm_config)
        model_config = runner.model_config
        family = family_of(list(model_config.architectures or []))
        if family is None:
            logger.info("icv: %s is not a steerable family; selections are refused at admission",
                        model_config.architectures)
            return
        text_config = model_config.hf_text_config
        num_layers = int(text_config.num_hidden_layers)
        tensor_parallel = int(runner.vllm_config.parallel_config.tensor_parallel_size)
        unsafe = [flag for flag in family.tp_unsafe_when if getattr(text_config, flag, False)]
        if tensor_parallel > 1 and unsafe:
            raise UnsupportedModelError(
                f"icv-vllm cannot steer {family.architecture} with {', '.join(unsafe)} under tensor "
                f"parallelism ({tensor_parallel} ranks): its feed-forward output is only summed across "
                "ranks together with the attention output, so no rank holds it. Run it with "
                "--tensor-parallel-size 1, or without a vector directory")
        self.layers = install_steering(model, family, num_layers, _layers_of_this_rank(runner, num_layers))
        check_reads(model, MODEL_READS)
        device = torch.device(runner.device)
        self.build(VectorBank(config.max_slots, num_layers, int(text_config.hidden_size), device,
                              growable=not config.bank_is_fixed(device.type)),
                   StepMetadata(runner.max_num_tokens, runner.max_num_reqs, num_layers, device), model_config.dtype,
                   CaptureRecorder(num_layers, model.embed_input_ids, device, held_layers=self.layers))
        logger.info("icv: steering %d decoder layers of %s; %s bank of %d vector slots; shift by %s",
                    len(self.layers), type(model).__name__, "growable" if self.bank.growable else "fixed",
                    self.bank.capacity, DESCRIPTIONS[self.shift_path])

    def build(self, bank: VectorBank, metadata: StepMetadata, dtype: torch.dtype,
              captures: CaptureRecorder) -> None:
        """The state ``setup`` makes (also used on its own by benchmarks/host_step.py)."""
        self.bank, self.metadata, self.captures = bank, metadata, captures
        self.shift = choose_shift(bank.tensor.device, dtype, metadata)
        self.shift_path = self.shift.name
        self.num_layers = bank.tensor.shape[1]
        self._request_rows = np.arange(metadata.max_num_reqs, dtype=np.int32)  # prompt part of request i: row i
        self._no_entries = (np.full((1, 0, ENTRY_COLUMNS), -1, dtype=np.int32),
                            np.zeros((1, 0, ENTRY_COLUMNS), np.float32),
                            np.zeros((1, 0, ENTRY_COLUMNS, metadata.entry_layer_bits.shape[2]), np.int32))
        self.ready = True

    # -- once per step -----------------------------------------------------------
    def prepare_step(self, runner: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> None:
        """Fill the step tables from the per-request rows (``RequestTables``,
        kept as requests join, leave and move): numpy over the step's rows, a
        Python loop only over its distinct vectors."""
        shipped = getattr(scheduler_output, STEP_VECTORS_ATTR, None)
        tables = runner.input_batch.__dict__.get("_icv_tables")
        if shipped is not None:
            if tables is not None:
                self.bank.release(tables.forget_vectors(shipped.dropped))
            self.bank.drop_contents(shipped.dropped)
            self.bank.add_contents(shipped.added)
        num_reqs = len(num_scheduled_tokens)
        self.shift.new_step()
        self.captures.step_captures = []
        steered = tables.steered[:num_reqs] if tables is not None else None
        self.active = steered is not None and bool(steered.any())
        if self.active:
            # prompt rows only, unless some request steers prompt and generated tokens differently
            parts = 2 if tables.splits_positions[:num_reqs].any() else 1
            ids = tables.vector_ids[:parts, :num_reqs]
            lookup = self.bank.slots_for(tables.ids_in_use(), tables.digest_of_id)
            rows = np.where(steered, self._request_rows[:num_reqs], -1).astype(np.int32, copy=False)
            token_rows = np.repeat(rows, num_scheduled_tokens)
            if parts == 2:  # a generated token names its request's second row, max_num_reqs + i
                token_rows += self.metadata.max_num_reqs * (self._generated(runner, num_scheduled_tokens)
                                                            & (token_rows >= 0))
            self.metadata.fill(token_rows, lookup.take(ids), tables.scales[:parts, :num_reqs],
                               tables.layer_bits[:parts, :num_reqs])
        else:  # nothing steered: every token row -1
            self.metadata.fill(np.full(int(num_scheduled_tokens.sum()), -1, dtype=np.int32), *self._no_entries)
        if tables is not None and tables.capturing[:num_reqs].any():
            self.captures.step_captures = self._step_captures(runner, tables, num_scheduled_tokens)

    def _generated(self, runner: Any, num_scheduled_tokens: np.ndarray) -> np.ndarray:
        """[T] int32: 1 where the step's token is a generated one (its position
        is at or past its request's prompt length), else 0."""
        batch = runner.input_batch
        n = len(num_scheduled_tokens)
        ends = np.cumsum(num_scheduled_tokens)
        offset_in_request = np.arange(int(ends[-1])) - np.repeat(ends - num_scheduled_tokens, num_scheduled_tokens)
        first_generated = batch.num_prompt_tokens[:n] - batch.num_computed_tokens_cpu[:n]
        return (offset_in_request >= np.repeat(first_generated, num_scheduled_tokens)).astype(np.int32)

    def _step_captures(self, runner: Any, tables, num_scheduled_tokens: np.ndarray) -> list[tuple[str, int]]:
        """(capture id, token index) of capture requests whose last prompt
        token is in this step."""
        out = []
        starts = np.concatenate(([0], np.cumsum(num_scheduled_tokens)[:-1]))
        for row in np.flatnonzero(tables.capturing[: len(num_scheduled_tokens)]).tolist():
            state = runner.requests[runner.input_batch.req_ids[row]]
            if not self._checked_request_state:
                check_reads(state, REQUEST_STATE_READS)
                self._checked_request_state = True
            done = int(runner.input_batch.num_computed_tokens_cpu[row])
            last = state.num_prompt_tokens - 1
            if done <= last < done + int(num_scheduled_tokens[row]):
                capture_id = tables.capture_ids[row]
                out.append((capture_id, int(starts[row]) + last - done))
                self.captures.begin(capture_id, state.prompt_token_ids[-1])
        return out

    # -- once per decoder layer per step ---------------------------------------
    def apply(self, ff_output: torch.Tensor, layer: int) -> None:
        """Shift a feed-forward block's output in place."""
        if self.ready and (self.active or self.shift.always_launch):
            self.shift(ff_output, self.bank.tensor, layer)

    def observe(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
        """A decoder layer's output (its stream is hidden + residual, or hidden)."""
        if self.ready and self.captures.step_captures:
            self.captures.record(hidden_states, residual, layer)

    def take_captures(self, capture_ids: list[str], absent_ok: bool = False) -> dict[str, Any]:
        if not self.ready:
            raise RuntimeError("icv: steering is not set up in this worker (no vector directory configured)")
        return self.captures.take(capture_ids, absent_ok)


def _layers_of_this_rank(runner: Any, num_layers: int) -> range:
    """The decoder layers this worker runs: all of them, or its pipeline
    stage's share (vLLM's own split, ``get_pp_indices``)."""
    stages = int(runner.vllm_config.parallel_config.pipeline_parallel_size)
    if stages == 1:
        return range(num_layers)
    import vllm.distributed as distributed
    import vllm.distributed.utils as distributed_utils

    rank = int(PIPELINE_READS[1].get(PIPELINE_READS[0].get(distributed)()))
    start, end = PIPELINE_READS[2].get(distributed_utils)(num_layers, rank, stages)
    return range(start, end)


RUNTIME = SteeringRuntime()
