"""The patch points must exist in the installed vLLM with the parameters we
rely on; if vLLM changes, the error must name the internal and the reason."""

import importlib
import types

import pytest

from icv_vllm.plugin.vllm_patches import (ALL_PATCH_POINTS, AttributeRead, PatchPoint, VLLMChangedError,
                                          _lookup)


@pytest.mark.parametrize("point", ALL_PATCH_POINTS, ids=lambda p: p.attribute)
def test_patch_point_exists_in_installed_vllm(point):
    module = importlib.import_module(point.module)
    _lookup(module, point)


def test_missing_internal_fails_loudly():
    fake = types.ModuleType("fake")
    point = PatchPoint("fake", "Runner.load_model", ("self",), "do a thing")
    with pytest.raises(VLLMChangedError, match=r"fake.Runner.load_model no longer exists .*0\.32\.0.*do a thing"):
        _lookup(fake, point)


def test_changed_signature_fails_loudly():
    fake = types.ModuleType("fake")

    class Runner:
        def _prepare_inputs(self, other):
            pass

    fake.Runner = Runner
    point = PatchPoint("fake", "Runner._prepare_inputs", ("self", "scheduler_output"), "map tokens")
    with pytest.raises(VLLMChangedError, match="now takes"):
        _lookup(fake, point)


def test_patches_are_installed_after_register():
    from icv_vllm.plugin import register

    register()
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker import cpu_model_runner, gpu_model_runner, worker_base

    assert kv_cache_utils._gen_prompt_embeds_extra_hash_keys.__icv_patched__
    assert InputProcessor.process_inputs.__icv_patched__
    assert gpu_model_runner.GPUModelRunner._prepare_inputs.__icv_patched__
    assert cpu_model_runner.CPUModelRunner.load_model.__icv_patched__
    from vllm.v1.core.sched.scheduler import Scheduler

    assert Scheduler.schedule.__icv_patched__ and Scheduler.add_request.__icv_patched__
    assert hasattr(worker_base.WorkerBase, "icv_take_captures")


def test_missing_attribute_read_fails_loudly():
    read = AttributeRead("vllm.Runner", "input_batch.req_ids", "order the step's requests")
    holder = types.SimpleNamespace(input_batch=types.SimpleNamespace(req_ids=["a"]))
    assert read.get(holder) == ["a"]
    with pytest.raises(VLLMChangedError, match=r"vllm.Runner.input_batch.req_ids is missing .*0\.32\.0.*order"):
        read.get(types.SimpleNamespace(input_batch=object()))


def test_v2_runner_is_not_chosen_when_steering_is_configured(monkeypatch):
    """On CUDA vLLM would pick Model Runner V2, whose steps our patches do not
    see; configured, icv-vllm lists itself as a feature V2 does not support
    (and changes no environment variable to get there)."""
    from icv_vllm.plugin.vllm_patches import _v1_runner_for_icv

    monkeypatch.delenv("ICV_VLLM_DIR", raising=False)
    wrapped = _v1_runner_for_icv(lambda self: ["x"])
    assert wrapped(types.SimpleNamespace(additional_config={})) == ["x"]
    on = types.SimpleNamespace(additional_config={"icv_vllm": {"dir": "/x"}})
    assert wrapped(on) == ["x", "icv-vllm steering"]


def test_prefix_cache_keys_carry_what_changes_each_block():
    """Prompt blocks carry the prompt-affecting entries (a generated-only
    selection none: it shares the unsteered prompt's cache); blocks holding
    generated tokens carry the whole selection (docs/method.md §7)."""
    from icv_vllm.plugin import register

    register()
    from vllm.v1.core import kv_cache_utils

    keys_of = kv_cache_utils._gen_prompt_embeds_extra_hash_keys

    def request(extra):
        return types.SimpleNamespace(lora_request=None, prompt_embeds=None, num_prompt_tokens=32, request_id="r",
                                     sampling_params=types.SimpleNamespace(extra_args=extra))

    assert keys_of(request(None), 0, 16) == []
    assert keys_of(request({"icv": "a:1"}), 0, 16) == []
    assert keys_of(request({"icv_resolved": "a@0123:1.0"}), 0, 16) == [("icv", "a@0123:1.0")]
    assert keys_of(request({"icv_resolved": "a@0123:1.0"}), 32, 48) == [
        ("icv", "a@0123:1.0"), ("icv-generated", "a@0123:1.0")]
    generated_only = {"icv_resolved": "a@0123:1.0;positions=generated"}
    assert keys_of(request(generated_only), 16, 32) == []
    assert keys_of(request(generated_only), 24, 40) == [("icv-generated", "a@0123:1.0;positions=generated")]
    prompt_only = {"icv_resolved": "a@0123:1.0;positions=prompt;mode=add"}
    assert keys_of(request(prompt_only), 0, 16) == [("icv", "a@0123:1.0;mode=add")]  # = positions=all's


def test_register_imports_nothing_heavy():
    """vLLM calls register() in the API server too: it must not pull the model
    runner (seconds of imports) or even torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from icv_vllm.plugin import register\n"
        "register()\n"
        "heavy = [m for m in ('torch', 'vllm.v1.worker.gpu_model_runner', 'transformers') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_worker_without_settings_refuses_a_step_that_ships_vectors(monkeypatch):
    """A worker that did not set up steering (e.g. a Ray actor that did not get
    ICV_VLLM_DIR) must not run a steered step unsteered."""
    from icv_vllm.plugin.vllm_patches import _after_prepare_inputs
    from icv_vllm.protocol import STEP_VECTORS_ATTR, StepVectors
    from icv_vllm.worker.runtime import RUNTIME

    monkeypatch.setattr(RUNTIME, "ready", False)
    wrapped = _after_prepare_inputs(lambda self, scheduler_output, num_scheduled_tokens: "inputs")
    plain_step = types.SimpleNamespace()
    assert wrapped(None, plain_step, [1]) == "inputs"
    steered_step = types.SimpleNamespace(**{STEP_VECTORS_ATTR: StepVectors({}, [])})
    with pytest.raises(RuntimeError, match="VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY=ICV_VLLM_"):
        wrapped(None, steered_step, [1])
