"""Front-end checks, without an engine: a stand-in for vLLM's config that
carries only what Admission reads."""

from types import SimpleNamespace

import pytest
import torch
from vllm.exceptions import VLLMValidationError

from icv_vllm.plugin.admission import Admission
from icv_vllm.plugin.resolved_spec import parse_resolved
from icv_vllm.plugin.vector_directory import file_digest
from icv_vllm.vectors.vector import ICVector


def vllm_config(directory, architectures=("LlamaForCausalLM",), layers=3, hidden=8):
    text = SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden)
    model = SimpleNamespace(hf_text_config=text, architectures=list(architectures), model="tiny")
    return SimpleNamespace(model_config=model, additional_config={"icv_vllm": {"dir": str(directory)}})


@pytest.fixture
def vector_dir(tmp_path):
    ICVector(torch.ones(3, 8), model="m", method="mean", num_pairs=1).save(tmp_path / "polite.safetensors")
    ICVector(torch.ones(2, 8), model="m", method="mean", num_pairs=1).save(tmp_path / "short.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    return tmp_path


def test_resolves_names_to_digests(vector_dir):
    extra = Admission(vllm_config(vector_dir)).admit("r1", {"icv": "polite:0.1", "other": 1})
    digest = file_digest(vector_dir / "polite.safetensors")
    assert extra["icv_resolved"] == f"polite@{digest}:0.1"
    assert extra["other"] == 1
    assert parse_resolved(extra["icv_resolved"])[0].scale == 0.1


@pytest.mark.parametrize("spec, message", [
    ("nosuch:1", "unknown vector 'nosuch'; known vectors: broken, polite, short"),
    ("short:1", "has 2 layers x 8 hidden size, but the served model tiny has 3 x 8"),
    ("broken:1", "vector 'broken' cannot be used"),
    ("polite", "invalid icv: entry 'polite' must be 'name:scale'"),
])
def test_bad_selections(vector_dir, spec, message):
    with pytest.raises(VLLMValidationError, match=message):
        Admission(vllm_config(vector_dir)).admit("r1", {"icv": spec})


def test_unsupported_architecture_is_an_error_not_a_no_op(vector_dir):
    admission = Admission(vllm_config(vector_dir, architectures=("GPT2LMHeadModel",)))
    with pytest.raises(VLLMValidationError, match="not supported for GPT2LMHeadModel; supported: LlamaForCausalLM, MistralForCausalLM"):
        admission.admit("r1", {"icv": "polite:1"})


def test_reserved_keys(vector_dir):
    admission = Admission(vllm_config(vector_dir))
    with pytest.raises(VLLMValidationError, match="'icv_resolved' is reserved"):
        admission.admit("r1", {"icv_resolved": "polite@0:1.0"})
    with pytest.raises(VLLMValidationError, match="'icv_capture' is reserved"):
        admission.admit("cmpl-1", {"icv_capture": "x"})
    assert admission.admit("icv-capture-1", {"icv_capture": "x"}) == {"icv_capture": "x"}


def test_no_directory_configured(monkeypatch, tmp_path):
    monkeypatch.delenv("ICV_VLLM_DIR", raising=False)
    config = vllm_config(tmp_path)
    config.additional_config = {}
    with pytest.raises(VLLMValidationError, match="no vector directory is configured"):
        Admission(config).admit("r1", {"icv": "a:1"})
