"""icv_vllm.metrics: refusal reasons, the front end's counters, the engine
core's counts (VectorScheduling with a stand-in scheduler) and their way to
the front end through vLLM's SchedulerStats. The end-to-end check on a
running server is tests/server/test_metrics.py."""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY

from icv_vllm import metrics
from icv_vllm.frontend.admission import Admission, AdmissionError
from icv_vllm.server.errors import ICVHTTPError
from icv_vllm.server.request_icv import refuse_selection_elsewhere, translate_body
from icv_vllm.vectors.vector import ICVector


def value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- refusal reasons ------------------------------------------------------------------------------
def _config(vectors, pins, max_slots=None, architectures=("LlamaForCausalLM",)):
    text = SimpleNamespace(num_hidden_layers=3, hidden_size=8)
    model = SimpleNamespace(hf_text_config=text, architectures=list(architectures), model="tiny")
    section = {"dir": str(vectors), "pin_dir": str(pins)}
    if max_slots is not None:
        section["max_slots"] = max_slots
    return SimpleNamespace(model_config=model, additional_config={"icv_vllm": section},
                           device_config=SimpleNamespace(device_type="cpu"))


@pytest.fixture
def dirs(tmp_path):
    vectors, pins = tmp_path / "vectors", tmp_path / "pins"
    vectors.mkdir()
    for name in ("polite", "formal"):
        ICVector(torch.ones(3, 8), model="m", method="mean", num_pairs=1).save(vectors / f"{name}.safetensors")
    ICVector(torch.ones(2, 8), model="m", method="mean", num_pairs=1).save(vectors / "short.safetensors")
    (vectors / "broken.safetensors").write_bytes(b"not a safetensors file")
    return vectors, pins


@pytest.mark.parametrize("selection, reason", [
    ("polite:abc", "invalid_selection"),
    ("a:1,b:1,c:1,d:1,e:1", "invalid_selection"),
    ("polite:1;layers=7", "invalid_selection"),
    ("nope:1", "unknown_vector"),
    ("broken:1", "bad_file"),
    ("short:1", "shape_mismatch"),
    ("polite", "no_recommended_scale"),
    ("polite:1,formal:1", "too_many_vectors"),
])
def test_each_admission_refusal_has_its_reason(dirs, selection, reason):
    with pytest.raises(AdmissionError) as info:
        Admission(_config(*dirs, max_slots=1)).admit({"icv": selection})
    assert info.value.reason == reason
    assert metrics.refusal_reason(info.value) == reason


def test_model_config_and_reserved_key_reasons(dirs, monkeypatch):
    with pytest.raises(AdmissionError) as info:
        Admission(_config(*dirs, architectures=("GPT2LMHeadModel",))).admit({"icv": "polite:1"})
    assert info.value.reason == "unsupported_model"
    with pytest.raises(AdmissionError) as info:
        Admission(_config(*dirs)).admit({"icv": "polite:1", "icv_resolved": "x"})
    assert info.value.reason == "reserved_key"
    bad = _config(*dirs)
    bad.additional_config = {"icv_vllm": {"dir": str(dirs[0]), "max_slots": "many"}}
    with pytest.raises(AdmissionError) as info:
        Admission(bad).admit({"icv": "polite:1"})
    assert info.value.reason == "not_configured"


def test_the_http_layer_keeps_the_admission_reason():
    """ICVServer.admit raises the 400 while handling the AdmissionError."""
    try:
        try:
            raise AdmissionError("unknown vector 'x'", "unknown_vector")
        except AdmissionError:
            raise ICVHTTPError(400, "unknown vector 'x'", "icv") from None
    except ICVHTTPError as e:
        assert metrics.refusal_reason(e) == "unknown_vector"


@pytest.mark.parametrize("body, reason", [
    ({"icv": "polite:abc"}, "invalid_selection"),
    ({"icv": "a:1", "vllm_xargs": {"icv": "a:2"}}, "invalid_selection"),
    ({"icv": "a:1", "use_beam_search": True}, "invalid_selection"),
    ({"icv": "a:1", "vllm_xargs": "x"}, "invalid_selection"),
    ({"vllm_xargs": {"icv_ticket": "t"}}, "reserved_key"),
])
def test_http_layer_refusals_have_their_reason(body, reason):
    with pytest.raises(ICVHTTPError) as info:
        translate_body(body)
    assert metrics.refusal_reason(info.value) == reason


def test_other_routes_and_bad_bodies():
    with pytest.raises(ICVHTTPError) as info:
        refuse_selection_elsewhere({"icv": "a:1"}, "/v1/messages")
    assert metrics.refusal_reason(info.value, route_serves_vectors=False) == "unsupported_route"
    assert metrics.refusal_reason(ICVHTTPError(400, "too deep"), route_serves_vectors=False) == "bad_body"
    assert metrics.refusal_reason(ValueError("?")) == "other"


# -- front-end counters ------------------------------------------------------------------------------
def test_refusals_are_counted_by_reason_never_by_message():
    before = value("icv_vllm_admission_refusals_total", reason="unknown_vector")
    metrics.record_refusal("unknown_vector")
    metrics.record_refusal("unknown vector 'x'; known vectors: a, b")  # not a reason: "other"
    assert value("icv_vllm_admission_refusals_total", reason="unknown_vector") == before + 1
    labels = {s.labels["reason"] for m in REGISTRY.collect() if m.name == "icv_vllm_admission_refusals"
              for s in m.samples}
    assert labels == set(metrics.REFUSAL_REASONS)  # all visible from the start, nothing else


def test_steered_requests_by_vector_once_per_name(monkeypatch):
    steered = value("icv_vllm_steered_requests_total")
    a = value("icv_vllm_vector_requests_total", vector="mx-a")
    metrics.record_admitted("mx-a@" + "1" * 64 + ":0.1,mx-a@" + "2" * 64 + ":-0.1,mx-b@" + "3" * 64 + ":1.0")
    assert value("icv_vllm_steered_requests_total") == steered + 1
    assert value("icv_vllm_vector_requests_total", vector="mx-a") == a + 1
    assert value("icv_vllm_vector_requests_total", vector="mx-b") >= 1
    # bounded: past MAX_VECTOR_LABELS names, new names count as "(other)"
    front = metrics._front_end()
    monkeypatch.setattr(front, "_vectors", {f"n{i}" for i in range(metrics.MAX_VECTOR_LABELS)})
    other = value("icv_vllm_vector_requests_total", vector=metrics.OTHER_VECTOR)
    metrics.record_admitted("mx-new@" + "4" * 64 + ":1.0")
    assert value("icv_vllm_vector_requests_total", vector=metrics.OTHER_VECTOR) == other + 1
    assert value("icv_vllm_vector_requests_total", vector="mx-new") == 0


# -- engine core counts -------------------------------------------------------------------------------
def _digest(c):
    return c * 64


class _Scheduler:
    """What VectorScheduling reads of vLLM's Scheduler and Request."""

    def __init__(self):
        self.requests, self.running = {}, []

    def add(self, state, request_id, resolved, prompt_tokens):
        request = SimpleNamespace(request_id=request_id, num_prompt_tokens=prompt_tokens, num_computed_tokens=0,
                                  sampling_params=SimpleNamespace(extra_args={"icv_resolved": resolved}))
        self.requests[request_id] = request
        self.running.append(request)
        state.on_add(request)

    def step(self, state, scheduled: dict):
        """begin_step, then what schedule() does (advance num_computed_tokens), then end_step."""
        state.begin_step(self)
        for request_id, n in scheduled.items():
            self.requests[request_id].num_computed_tokens += n
        output = SimpleNamespace(num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()))
        state.end_step(self, output)
        return output

    def finish(self, request_id):
        request = self.requests.pop(request_id)
        self.running.remove(request)


@pytest.fixture
def scheduling(tmp_path):
    from icv_vllm.engine.vector_scheduling import VectorScheduling

    config = SimpleNamespace(additional_config={"icv_vllm": {"dir": str(tmp_path), "pin_dir": str(tmp_path),
                                                             "max_slots": 4}},
                             device_config=SimpleNamespace(device_type="cpu"))
    state = VectorScheduling(config)
    for c in "abc":
        state.contents[_digest(c)] = torch.zeros(3, 8)  # as if loaded from the pinned store
    return state


def test_engine_counts_steered_tokens_by_position(scheduling):
    s = _Scheduler()
    s.add(scheduling, "all", f"a@{_digest('a')}:1.0", prompt_tokens=10)
    s.add(scheduling, "gen", f"b@{_digest('b')}:1.0;positions=generated", prompt_tokens=4)
    s.add(scheduling, "prompt", f"a@{_digest('a')}:1.0;positions=prompt", prompt_tokens=6)
    s.requests["plain"] = SimpleNamespace(num_computed_tokens=0, num_prompt_tokens=5)  # unsteered
    s.step(scheduling, {"all": 10, "gen": 4, "prompt": 4, "plain": 5})  # prefill (one chunked)
    first = scheduling.counts.take()
    assert first[metrics.STEERED_PROMPT_TOKENS] == 10 + 4 and first[metrics.STEERED_GENERATED_TOKENS] == 0
    assert first[metrics.VECTORS_SHIPPED] == 2 and first[metrics.VECTORS_DROPPED] == 0
    assert first[metrics.SLOTS_IN_USE] == 2 and first[metrics.VECTORS_HELD] == 2
    assert first[metrics.SLOT_BUDGET] == 4
    # the rest of "prompt"'s prompt and a draft token in one chunk: 2 prompt tokens steered, 2 generated not
    s.step(scheduling, {"all": 1, "gen": 1, "prompt": 4, "plain": 1})
    second = scheduling.counts.take()
    assert second[metrics.STEERED_PROMPT_TOKENS] == 2 and second[metrics.STEERED_GENERATED_TOKENS] == 2
    assert second[metrics.VECTORS_SHIPPED] == 0  # counters are increments since the last take
    s.finish("gen")
    s.step(scheduling, {"all": 1})
    third = scheduling.counts.take()
    assert third[metrics.VECTORS_DROPPED] == 1 and third[metrics.VECTORS_HELD] == 1
    assert third[metrics.SLOTS_IN_USE] == 1 and third[metrics.STEERED_GENERATED_TOKENS] == 1


def test_engine_counts_load_failures(scheduling):
    s = _Scheduler()
    s.add(scheduling, "lost", f"a@{_digest('f')}:1.0", prompt_tokens=3)  # no pinned copy of f...
    assert "lost" in scheduling.failed
    assert scheduling.counts.take()[metrics.LOAD_FAILURES] == 1


def test_engine_counts_reach_prometheus_through_scheduler_stats(scheduling, monkeypatch, tmp_path):
    import vllm.v1.metrics.stats as stats_module
    from icv_vllm.plugin.vllm_patches import _add_stats_field, _record_icv_stats, _with_icv_stats
    from vllm.v1.metrics.stats import SchedulerStats

    monkeypatch.setenv("ICV_VLLM_DIR", str(tmp_path))  # as icv-vllm serve exports it
    _add_stats_field(stats_module)

    s = _Scheduler()
    s.__dict__["_icv_scheduling"] = scheduling
    s.add(scheduling, "r", f"a@{_digest('a')}:1.0", prompt_tokens=7)
    s.step(scheduling, {"r": 7})
    stats = _with_icv_stats(lambda self: SchedulerStats())(s)
    assert getattr(stats, metrics.STATS_FIELD)[metrics.STEERED_PROMPT_TOKENS] == 7
    seen = []
    record = _record_icv_stats(lambda *args, **kwargs: seen.append(args))
    before = value("icv_vllm_steered_tokens_total", engine="3", position="prompt")
    shipped = value("icv_vllm_vectors_shipped_total", engine="3")
    record(object(), stats, None, None, 3)
    assert seen  # vLLM's own record ran
    assert value("icv_vllm_steered_tokens_total", engine="3", position="prompt") == before + 7
    assert value("icv_vllm_vectors_shipped_total", engine="3") == shipped + 1
    assert value("icv_vllm_bank_slots_in_use", engine="3") == 1
    assert value("icv_vllm_bank_slot_budget", engine="3") == 4
    # no steering in the engine (the field stays None): nothing recorded, vLLM's record still runs
    record(object(), SchedulerStats(), None, None, 3)
    assert value("icv_vllm_steered_tokens_total", engine="3", position="prompt") == before + 7
    assert len(seen) == 2


_INERT_SCRIPT = textwrap.dedent("""
    import os
    from icv_vllm.plugin import register
    register()
    from types import SimpleNamespace
    from prometheus_client import REGISTRY
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder
    from icv_vllm.plugin.vllm_patches import _FrontEndAdmission, _record_icv_stats

    def icv_metrics():
        return sorted(m.name for m in REGISTRY.collect() if m.name.startswith("icv_vllm"))

    decoder = MsgpackDecoder(EngineCoreOutputs)
    if os.environ.get("ICV_VLLM_DIR"):  # as under icv-vllm serve: the field crosses engine -> front end
        stats = SchedulerStats()
        stats.icv_vllm = {"steered_prompt_tokens": 5}
        out = decoder.decode(MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats)))
        assert out.scheduler_stats.icv_vllm == {"steered_prompt_tokens": 5}, out.scheduler_stats
        out = decoder.decode(MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=SchedulerStats())))
        assert out.scheduler_stats.icv_vllm is None
        print("ok")
        raise SystemExit(0)
    # unconfigured: vLLM's class is untouched, its stats recorded, a selection refused, no icv metric
    assert "icv_vllm" not in SchedulerStats.__dataclass_fields__
    out = decoder.decode(MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=SchedulerStats())))
    _record_icv_stats(lambda *a, **k: None)(object(), out.scheduler_stats, None, None, 0)
    text = SimpleNamespace(num_hidden_layers=2, hidden_size=4)
    config = SimpleNamespace(additional_config={}, device_config=SimpleNamespace(device_type="cpu"),
                             model_config=SimpleNamespace(hf_text_config=text, architectures=["LlamaForCausalLM"],
                                                          model="m"))
    try:
        _FrontEndAdmission(config).admit({"icv": "a:1"})
        raise SystemExit("not refused")
    except Exception as e:
        assert "not configured" in str(e), e
    assert icv_metrics() == [], icv_metrics()
    print("ok")
""")


@pytest.mark.parametrize("configured", [False, True], ids=["no-vector-dir", "ICV_VLLM_DIR"])
def test_inert_without_a_vector_directory_and_the_field_crosses_processes(configured, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICV_VLLM_")}
    if configured:
        env["ICV_VLLM_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", _INERT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
