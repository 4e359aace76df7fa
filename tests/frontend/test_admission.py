"""Admission without an engine: a stand-in for vLLM's config that carries
only what Admission reads. Admission resolves, validates and pins."""

import hashlib
import os
from types import SimpleNamespace

import pytest
import torch

from icv_vllm import pinned_store
from icv_vllm.frontend.admission import TICKETS, Admission, AdmissionError
from icv_vllm.protocol import parse_resolved
from icv_vllm.vectors.vector import ICVector


def vllm_config(directory, pin_dir, architectures=("LlamaForCausalLM",), layers=3, hidden=8,
                max_slots=None, device_type="cpu"):
    text = SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden)
    model = SimpleNamespace(hf_text_config=text, architectures=list(architectures), model="tiny")
    section = {"dir": str(directory), "pin_dir": str(pin_dir)}
    if max_slots is not None:
        section["max_slots"] = max_slots
    return SimpleNamespace(model_config=model, additional_config={"icv_vllm": section},
                           device_config=SimpleNamespace(device_type=device_type))


@pytest.fixture
def dirs(tmp_path):
    vectors, pins = tmp_path / "vectors", tmp_path / "pins"
    vectors.mkdir()
    for name, value in (("polite", 1.0), ("formal", 2.0), ("third", 3.0)):
        ICVector(torch.full((3, 8), value), model="m", method="mean", num_pairs=1).save(vectors / f"{name}.safetensors")
    ICVector(torch.ones(2, 8), model="m", method="mean", num_pairs=1).save(vectors / "short.safetensors")
    (vectors / "broken.safetensors").write_bytes(b"not a safetensors file")
    return vectors, pins


def admission(dirs, **kw):
    return Admission(vllm_config(*dirs, **kw))


def test_resolves_to_the_content_digest_and_pins_the_bytes(dirs):
    vectors, pins = dirs
    extra = admission(dirs).admit({"icv": "polite:0.1", "other": 1})
    data = (vectors / "polite.safetensors").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert extra["icv_resolved"] == f"polite@{digest}:0.1" and extra["other"] == 1
    assert parse_resolved(extra["icv_resolved"])[0].scale == 0.1
    assert (pins / f"{digest}.safetensors").read_bytes() == data
    # the user's file can go: the pinned copy is what the engine loads
    os.remove(vectors / "polite.safetensors")
    assert torch.equal(pinned_store.load_pinned(pins, digest), torch.full((3, 8), 1.0))


def test_same_size_same_mtime_rewrite_is_a_new_digest(dirs):
    vectors, _ = dirs
    a = admission(dirs)
    path = vectors / "polite.safetensors"
    first = a.resolve("polite:1")
    stat = path.stat()
    ICVector(torch.full((3, 8), 9.0), model="m", method="mean", num_pairs=1).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert a.resolve("polite:1") != first


def test_values_are_checked_at_admission_not_only_the_header(dirs):
    vectors, _ = dirs
    from safetensors.torch import save_file

    bad = torch.ones(3, 8)
    bad[1, 2] = float("nan")
    save_file({"icv": bad}, str(vectors / "nan.safetensors"), metadata={
        "format": "icv-vllm/1", "model": "m", "hidden_size": "8", "num_layers": "3", "method": "mean",
        "num_pairs": "1"})
    with pytest.raises(AdmissionError, match="non-finite"):
        admission(dirs).resolve("nan:1")


@pytest.mark.parametrize("spec, message", [
    ("nosuch:1", "unknown vector 'nosuch'; known vectors: broken, formal, polite, short, third"),
    ("short:1", "has 2 layers x 8 hidden size, but the served model tiny has 3 x 8"),
    ("broken:1", "vector 'broken' cannot be used"),
    ("polite", "vector 'polite' has no recommended scale: give one .e.g. polite:0.02. or run `icv-vllm tune"),
    ("polite:1;layers=2-3", "layers of 'polite' name layer 3, but the served model has 3 decoder layers .0-2."),
    ("polite:1e39", "must be 0 or between"),
])
def test_bad_selections(dirs, spec, message):
    with pytest.raises(AdmissionError, match=message):
        admission(dirs).admit({"icv": spec})


def test_server_paths_never_reach_the_message(dirs):
    vectors, pins = dirs
    for spec in ("broken:1", "short:1"):
        with pytest.raises(AdmissionError) as info:
            admission(dirs).resolve(spec)
        assert str(pins) not in str(info.value) and ".tmp" not in str(info.value)


def test_special_files_are_refused_without_blocking(dirs):
    vectors, _ = dirs
    os.mkfifo(vectors / "fifo.safetensors")
    (vectors / "folder.safetensors").mkdir()
    with open(vectors / "huge.safetensors", "wb") as f:
        f.truncate(1 << 30)
    a = admission(dirs)
    with pytest.raises(AdmissionError, match="is a FIFO"):
        a.resolve("fifo:1")
    with pytest.raises(AdmissionError, match="is a directory"):
        a.resolve("folder:1")
    with pytest.raises(AdmissionError, match="1073741824 bytes"):
        a.resolve("huge:1")


def test_unsupported_architecture_is_an_error_not_a_no_op(dirs):
    a = admission(dirs, architectures=("GPT2LMHeadModel",))
    with pytest.raises(AdmissionError, match="not supported for GPT2LMHeadModel; supported: FalconForCausalLM, .*LlamaForCausalLM"):
        a.admit({"icv": "polite:1"})


def test_reserved_keys(dirs):
    a = admission(dirs)
    for key in ("icv_resolved", "icv_capture", "icv_ticket"):
        with pytest.raises(AdmissionError, match=f"'{key}' is reserved"):
            a.admit({key: "x", "icv": "polite:1"} if key == "icv_ticket" else {key: "x"})


def test_a_ticket_carries_the_http_layers_resolution_once(dirs):
    a = admission(dirs)
    resolved = a.resolve("polite:0.5")
    ticket = TICKETS.issue(("polite:0.5", resolved))
    assert a.admit({"icv": "polite:0.5", "icv_ticket": ticket})["icv_resolved"] == resolved
    with pytest.raises(AdmissionError, match="reserved"):  # one use
        a.admit({"icv": "polite:0.5", "icv_ticket": ticket})
    other = TICKETS.issue(("polite:0.5", resolved))
    with pytest.raises(AdmissionError, match="reserved"):  # for another selection
        a.admit({"icv": "formal:0.5", "icv_ticket": other})


def test_a_fixed_budget_refuses_more_distinct_vectors_than_slots(dirs):
    with pytest.raises(AdmissionError, match=r"needs 2 distinct vectors at once.*at most 1 \(max_slots\)"):
        admission(dirs, max_slots=1).resolve("polite:1,formal:1")
    assert admission(dirs, max_slots=1).resolve("polite:1,polite:-0.5")  # one distinct vector
    with pytest.raises(AdmissionError, match="at most 2"):  # CUDA: fixed at 64 by default; here 2
        admission(dirs, max_slots=2, device_type="cuda").resolve("polite:1,formal:1,third:1")
    assert admission(dirs).resolve("polite:1,formal:1,third:1")  # growable CPU bank: no budget


def test_not_configured(monkeypatch, dirs):
    monkeypatch.delenv("ICV_VLLM_DIR", raising=False)
    config = vllm_config(*dirs)
    config.additional_config = {}
    with pytest.raises(AdmissionError, match="steering is not configured.*--icv-dir DIR.*ICV_VLLM_DIR"):
        Admission(config).admit({"icv": "a:1"})


def test_a_ticket_serves_each_engine_request_of_one_body(dirs):
    a = admission(dirs)
    resolved = a.resolve("polite:0.5")
    ticket = TICKETS.issue(("polite:0.5", resolved), uses=3)
    for _ in range(3):
        assert a.admit({"icv": "polite:0.5", "icv_ticket": ticket})["icv_resolved"] == resolved
    with pytest.raises(AdmissionError, match="reserved"):
        a.admit({"icv": "polite:0.5", "icv_ticket": ticket})


def test_options_resolve_against_the_file_and_the_model(dirs):
    vectors, _ = dirs
    ICVector(torch.full((3, 8), 4.0), model="m", method="mean", num_pairs=1).save(vectors / "tuned.safetensors")
    from icv_vllm.vectors.file_format import load_icv, write_icv

    tensor, _ = load_icv(vectors / "tuned.safetensors")
    write_icv(vectors / "tuned.safetensors", tensor, model="m", method="mean", num_pairs=1,
              default_mode="add", recommended_scale=0.03)
    a = admission(dirs)
    tuned, polite = parse_resolved(a.resolve("tuned;positions=generated, polite:0.1;layers=0-2;mode=add"))
    assert (tuned.scale, tuned.mode, tuned.positions, tuned.layers) == (0.03, "add", "generated", None)
    assert (polite.mode, polite.layers) == ("add", None)  # every layer of the model: canonical None
    (explicit,) = parse_resolved(a.resolve("tuned:-0.5;mode=icv;layers=1"))
    assert (explicit.scale, explicit.mode, explicit.layers) == (-0.5, "icv", (1,))
