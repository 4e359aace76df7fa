"""icv-vllm's Prometheus metrics, served on vLLM's own ``/metrics``.

Every metric is created with ``prometheus_client`` in its default registry,
the one vLLM's ``/metrics`` serves (in vLLM's multiprocess mode, with
``PROMETHEUS_MULTIPROC_DIR``, values go through its files as vLLM's own do;
gauges use ``multiprocess_mode="mostrecent"`` as vLLM's). Nothing is created
until steering is configured and something happens: a plain vLLM server, or
one that has refused and admitted nothing yet, shows no ``icv_vllm_`` metric.

Two sources, two processes:

- **Front end** (API server, or the offline ``LLM``'s process): admission
  knows which vectors a request selected and why a selection was refused.
  ``record_admitted`` / ``record_refusal`` count them here directly.
- **Engine core** (its own process under ``vllm serve``): the scheduler knows
  the steered tokens it schedules and the vector contents it ships to the
  workers. It counts them in plain integers (``EngineCounts``), vLLM's
  ``Scheduler.make_stats`` hands them over in ``SchedulerStats`` (field
  ``STATS_FIELD``, added by ``plugin.vllm_patches``), they travel to the front
  end with vLLM's own scheduler stats, and the wrapped
  ``PrometheusStatLogger.record`` turns them into metrics
  (``record_engine_counts``). So they exist exactly where vLLM's own
  per-engine metrics do (not with ``--disable-log-stats``).

Label values are bounded: ``reason`` is one of ``REFUSAL_REASONS`` (never a
message); ``vector`` is a vector name (names are file stems in the vector
directory), at most ``MAX_VECTOR_LABELS`` distinct ones per process, the rest
counted under ``OTHER_VECTOR``; ``engine`` is vLLM's engine index.
"""

from __future__ import annotations

import threading
from typing import Any

PREFIX = "icv_vllm_"

# -- why a selection was refused (label ``reason``) ------------------------------
REFUSAL_REASONS = (
    "invalid_selection",     # grammar, types, scales, options, > 4 entries, layers the model lacks,
                             # icv and vllm_xargs.icv disagreeing, icv with use_beam_search
    "unknown_vector",        # no file of that name in the vector directory
    "bad_file",              # the file cannot be used: special, oversized, malformed, NaN/inf, .safetensors + .gguf
    "shape_mismatch",        # a vector of another model shape
    "no_recommended_scale",  # no scale given, and the file recommends none
    "too_many_vectors",      # more distinct vectors in one request than max_slots
    "unsupported_model",     # the served architecture is not a steerable family
    "not_configured",        # the icv_vllm settings cannot be used
    "pin_failed",            # the admitted copy could not be written (disk full, permissions)
    "reserved_key",          # an extra_args / vllm_xargs key only icv-vllm may set
    "unsupported_route",     # a selection (or reserved key) sent to a route that does not serve vectors
    "bad_body",              # a body too deeply nested, or with an integer literal too long, to parse
    "other",
)
OTHER_REASON = "other"

MAX_VECTOR_LABELS = 256
OTHER_VECTOR = "(other)"  # not a legal vector name, so never confused with one

# -- what the engine core sends (keys of the SchedulerStats field) ---------------------------
STATS_FIELD = "icv_vllm"
# counters: increments since the previous SchedulerStats
STEERED_PROMPT_TOKENS = "steered_prompt_tokens"
STEERED_GENERATED_TOKENS = "steered_generated_tokens"
VECTORS_SHIPPED = "vectors_shipped"
VECTORS_DROPPED = "vectors_dropped"
LOAD_FAILURES = "load_failures"
COUNTER_KEYS = (STEERED_PROMPT_TOKENS, STEERED_GENERATED_TOKENS, VECTORS_SHIPPED, VECTORS_DROPPED, LOAD_FAILURES)
# gauges: values after the latest scheduled step
VECTORS_HELD = "vectors_held"
SLOTS_IN_USE = "slots_in_use"
SLOT_BUDGET = "slot_budget"  # 0: the bank is not fixed (grows on the CPU)


class EngineCounts:
    """The engine core's numbers (plain ints: no prometheus here); ``take``
    returns the counters' increments since the previous take and the gauges."""

    def __init__(self, slot_budget: int | None):
        self.pending = dict.fromkeys(COUNTER_KEYS, 0)
        self.vectors_held = 0
        self.slots_in_use = 0
        self.slot_budget = slot_budget or 0

    def add(self, key: str, n: int) -> None:
        self.pending[key] += n

    def take(self) -> dict[str, int]:
        out = self.pending
        self.pending = dict.fromkeys(COUNTER_KEYS, 0)
        out[VECTORS_HELD] = self.vectors_held
        out[SLOTS_IN_USE] = self.slots_in_use
        out[SLOT_BUDGET] = self.slot_budget
        return out


# -- the metrics, created on first use ---------------------------------------------------------
_lock = threading.Lock()
_front: "_FrontEndMetrics | None" = None
_engine: "_EngineMetrics | None" = None


class _FrontEndMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter

        self.steered = Counter(
            PREFIX + "steered_requests", "Requests admitted with at least one in-context vector (one per "
            "prompt vLLM accepted; n > 1 counts once)")
        self.by_vector = Counter(
            PREFIX + "vector_requests", "Requests admitted with this vector among their selection "
            f"(at most {MAX_VECTOR_LABELS} names per process, the rest as {OTHER_VECTOR!r})", ["vector"])
        self.refusals = Counter(
            PREFIX + "admission_refusals", "Requests refused because of their vector selection, by reason",
            ["reason"])
        for reason in REFUSAL_REASONS:  # every reason visible at 0 from the start
            self.refusals.labels(reason=reason)
        self._vectors: set[str] = set()

    def vector_label(self, name: str) -> str:
        if name in self._vectors:
            return name
        with _lock:
            if len(self._vectors) < MAX_VECTOR_LABELS:
                self._vectors.add(name)
                return name
        return OTHER_VECTOR


class _EngineMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        labels = ["engine"]
        self.tokens = Counter(
            PREFIX + "steered_tokens", "Tokens the engine core scheduled with at least one vector applying at "
            "their position (its positions option), by position; counted when scheduled", labels + ["position"])
        self.shipped = Counter(
            PREFIX + "vectors_shipped", "Vector contents the engine core sent to the workers (each is loaded "
            "into every worker's bank when a step first uses it)", labels)
        self.dropped = Counter(
            PREFIX + "vectors_dropped", "Vector contents the workers were told to drop because no unfinished "
            "request needs them any more (their bank slots are freed)", labels)
        self.load_failures = Counter(
            PREFIX + "vector_load_failures", "Requests the engine core failed because a pinned vector could "
            "not be loaded (HTTP 500 / finish_reason error)", labels)
        self.held = Gauge(
            PREFIX + "vectors_held", "Distinct vector contents the workers hold: those of unfinished "
            "(running or waiting) requests", labels, multiprocess_mode="mostrecent")
        self.slots_in_use = Gauge(
            PREFIX + "bank_slots_in_use", "Distinct vectors the latest scheduled step uses: the bank slots "
            "it needs on every worker", labels, multiprocess_mode="mostrecent")
        self.slot_budget = Gauge(
            PREFIX + "bank_slot_budget", "max_slots, where the bank is fixed (the scheduler keeps "
            "bank_slots_in_use within it); absent where the bank grows", labels, multiprocess_mode="mostrecent")


def _front_end() -> _FrontEndMetrics:
    global _front
    if _front is None:
        with _lock:
            if _front is None:
                _front = _FrontEndMetrics()
    return _front


def _engine_metrics() -> _EngineMetrics:
    global _engine
    if _engine is None:
        with _lock:
            if _engine is None:
                _engine = _EngineMetrics()
    return _engine


# -- recording -------------------------------------------------------------------------------
def record_admitted(resolved: str) -> None:
    """A request vLLM accepted with this resolved selection (``protocol.format_resolved``)."""
    from .protocol import parse_resolved

    metrics = _front_end()
    metrics.steered.inc()
    for name in sorted({c.name for c in parse_resolved(resolved)}):
        metrics.by_vector.labels(vector=metrics.vector_label(name)).inc()


def record_refusal(reason: str) -> None:
    _front_end().refusals.labels(reason=reason if reason in REFUSAL_REASONS else OTHER_REASON).inc()


def refusal_reason(error: BaseException, route_serves_vectors: bool = True) -> str:
    """The ``reason`` label of a refused request's error: the ``reason`` an
    ``AdmissionError`` carries (also when an HTTP error was raised while
    handling one), else what the HTTP layer refused, from the field at fault."""
    for e in (error, error.__cause__, error.__context__):
        reason = getattr(e, "reason", None)
        if isinstance(reason, str) and reason in REFUSAL_REASONS:
            return reason
    param = getattr(error, "param", "")
    if param is None:
        return "bad_body"
    if not route_serves_vectors:
        return "unsupported_route"
    if param == "vllm_xargs":
        return "reserved_key" if "reserved" in str(getattr(error, "message", error)) else "invalid_selection"
    if param in ("icv", "use_beam_search"):
        return "invalid_selection"
    return OTHER_REASON


def record_engine_counts(counts: dict[str, Any], engine_idx: int) -> None:
    """One SchedulerStats' numbers from engine ``engine_idx``."""
    metrics = _engine_metrics()
    engine = str(engine_idx)
    for position, key in (("prompt", STEERED_PROMPT_TOKENS), ("generated", STEERED_GENERATED_TOKENS)):
        child = metrics.tokens.labels(engine=engine, position=position)
        if counts.get(key):
            child.inc(counts[key])
    for counter, key in ((metrics.shipped, VECTORS_SHIPPED), (metrics.dropped, VECTORS_DROPPED),
                         (metrics.load_failures, LOAD_FAILURES)):
        child = counter.labels(engine=engine)
        if counts.get(key):
            child.inc(counts[key])
    metrics.held.labels(engine=engine).set(counts.get(VECTORS_HELD, 0))
    metrics.slots_in_use.labels(engine=engine).set(counts.get(SLOTS_IN_USE, 0))
    if counts.get(SLOT_BUDGET):
        metrics.slot_budget.labels(engine=engine).set(counts[SLOT_BUDGET])
