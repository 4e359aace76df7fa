"""The scheduler's view of vectors (engine core process).

- **Loading.** When a request arrives, its pinned vectors are read by digest
  (``pinned_store.load_pinned``). If one cannot be (copy gone, unreadable,
  altered), the request is never scheduled: it finishes with vLLM's
  ``FINISHED_ERROR``, which the OpenAI server turns into an error for the
  client (HTTP 500 before a stream starts, an error event in a stream).
- **Slot budget.** Where the workers' bank is fixed (CUDA, or an explicit
  ``max_slots``), a waiting request is admitted to the running set only if
  the distinct vectors of running requests plus its own fit in the bank, as
  vLLM does with ``max_loras``; otherwise it waits, and runs later, steered.
- **Shipping.** Each step that runs tokens carries, as ``SchedulerOutput``
  attribute ``icv_step_vectors``, the contents the workers do not hold yet
  and the digests no unfinished request needs any more, so the workers'
  contents mirror exactly what unfinished requests use — they never read a
  file, and need no access to the vector directory.
- **Counting** (``metrics.EngineCounts``, sent with vLLM's scheduler stats):
  steered tokens as scheduled, contents shipped and dropped, load failures,
  and the contents held and the bank slots the latest step needs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .. import metrics
from ..config import plugin_config
from ..pinned_store import PinnedVectorError, load_pinned
from ..protocol import STEP_VECTORS_ATTR, StepVectors, parse_resolved, resolved_of

logger = logging.getLogger("vllm.icv_vllm")


class VectorScheduling:
    def __init__(self, vllm_config: Any):
        config = plugin_config(vllm_config)
        self.pin_dir = config.pin_dir
        device_type = str(vllm_config.device_config.device_type)
        self.budget: int | None = config.max_slots if config.bank_is_fixed(device_type) else None
        self.contents: dict[str, torch.Tensor] = {}      # digest -> tensor (unfinished requests' vectors)
        self.request_digests: dict[str, frozenset[str]] = {}
        self.failed: dict[str, str] = {}                 # request id -> why it cannot run
        self.shipped: set[str] = set()                   # digests the workers hold
        self._step_digests: set[str] = set()
        # request id -> (steers prompt tokens, steers generated tokens): its entries' positions
        self.request_positions: dict[str, tuple[bool, bool]] = {}
        self.counts = metrics.EngineCounts(self.budget)

    # -- a new request ------------------------------------------------------------------
    def on_add(self, request: Any) -> None:
        params = request.sampling_params
        resolved = resolved_of(params.extra_args if params is not None else None)
        if not resolved:
            return
        choices = parse_resolved(resolved)
        digests = frozenset(c.digest for c in choices)
        try:
            for digest in digests:
                if digest not in self.contents:
                    self.contents[digest] = load_pinned(self.pin_dir, digest)
        except (PinnedVectorError, OSError, MemoryError) as e:
            logger.error("icv: request %s fails: %s", request.request_id, e)
            self.failed[request.request_id] = str(e)
            self.counts.add(metrics.LOAD_FAILURES, 1)
            return
        self.request_digests[request.request_id] = digests
        self.request_positions[request.request_id] = (any(c.affects_prompt for c in choices),
                                                      any(c.affects_generated for c in choices))

    # -- each step -------------------------------------------------------------------------
    def begin_step(self, scheduler: Any) -> None:
        self._forget_finished(scheduler.requests)
        step: set[str] = set()
        for request in scheduler.running:
            step |= self.request_digests.get(request.request_id, frozenset())
        self._step_digests = step

    def may_schedule(self, scheduler: Any, request: Any) -> bool:
        """Whether a waiting request may join the running set this step."""
        request_id = request.request_id
        if request_id in self.failed:
            scheduler.grammar_compile_error_reqs.add(request_id)  # finished with FINISHED_ERROR
            return False
        if self.budget is None:
            return True
        need = self.request_digests.get(request_id)
        if not need:
            return True
        joined = self._step_digests | need
        if len(joined) > self.budget:
            return False  # waits, as a LoRA request does beyond max_loras
        self._step_digests = joined
        return True

    def end_step(self, scheduler: Any, output: Any) -> None:
        self._count_step(scheduler, output)
        if not output.total_num_scheduled_tokens:
            return  # the workers skip _prepare_inputs for an empty step: ship with the next one
        live: set[str] = set()
        for digests in self.request_digests.values():
            live |= digests
        added = {d: self.contents[d] for d in live - self.shipped}
        dropped = sorted(self.shipped - live)
        if added or dropped:
            setattr(output, STEP_VECTORS_ATTR, StepVectors(added, dropped))
            self.shipped = (self.shipped | set(added)) - set(dropped)
            self.counts.add(metrics.VECTORS_SHIPPED, len(added))
            self.counts.add(metrics.VECTORS_DROPPED, len(dropped))
        self.counts.vectors_held = len(self.shipped)
        for digest in [d for d in self.contents if d not in live and d not in self.shipped]:
            del self.contents[digest]

    def _count_step(self, scheduler: Any, output: Any) -> None:
        """Steered tokens of this step, split at each request's prompt length as
        the workers split them (``positions``), and the distinct vectors it uses.
        ``schedule`` has already advanced ``num_computed_tokens`` past the step."""
        used: set[str] = set()
        prompt = generated = 0
        for request_id, n in output.num_scheduled_tokens.items():
            digests = self.request_digests.get(request_id)
            if not digests or not n:
                continue
            used |= digests
            request = scheduler.requests[request_id]
            start = request.num_computed_tokens - n
            in_prompt = min(n, max(0, request.num_prompt_tokens - start))
            steers_prompt, steers_generated = self.request_positions[request_id]
            prompt += in_prompt if steers_prompt else 0
            generated += (n - in_prompt) if steers_generated else 0
        self.counts.add(metrics.STEERED_PROMPT_TOKENS, prompt)
        self.counts.add(metrics.STEERED_GENERATED_TOKENS, generated)
        self.counts.slots_in_use = len(used)

    def _forget_finished(self, unfinished: dict) -> None:
        for request_id in [r for r in self.request_digests if r not in unfinished]:
            del self.request_digests[request_id]
            self.request_positions.pop(request_id, None)
        for request_id in [r for r in self.failed if r not in unfinished]:
            del self.failed[request_id]
