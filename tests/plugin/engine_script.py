"""Runs one vLLM engine (in its own process: one engine per process, as the
plugin's worker state is per process) over batches of requests given as JSON
and writes what it generated. Used by the plugin tests.

    python tests/plugin/engine_script.py CASES.json OUT.json

Besides ``batches`` (each run with ``LLM.generate``; a batch may name a file
action to do first), ``inflight`` scenarios add requests to the engine, run
a few steps, act on the vector directory while they are in flight, and run
them to the end. ``fail_vector``: the engine core's load of that vector's
pinned copy fails (storage unreadable), to see the request end in an error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys


def _act(action: dict | None) -> None:
    if not action:
        return
    if "delete" in action:
        os.remove(action["delete"])
    if "copy" in action:
        src, dst = action["copy"]
        shutil.copyfile(src, dst + ".tmp")
        os.replace(dst + ".tmp", dst)


def _result(output) -> dict:
    out = output.outputs[0]
    return {
        "token_ids": list(out.token_ids),
        "logprobs": ([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)] if out.logprobs else None),
        "num_cached_tokens": output.num_cached_tokens,
        "finish_reason": out.finish_reason,
    }


def main(cases_path: str, out_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    before_env = dict(os.environ)
    tensor_parallel = cases.get("tensor_parallel_size", 1)
    pipeline_parallel = cases.get("pipeline_parallel_size", 1)
    one_worker = tensor_parallel * pipeline_parallel == 1
    os.environ.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0" if one_worker else "1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_NO_USAGE_STATS="1",
        VLLM_DISABLE_COMPILE_CACHE="1",
        HF_HUB_OFFLINE="1",
    )
    if cases.get("vector_dir"):
        os.environ["ICV_VLLM_DIR"] = cases["vector_dir"]
        os.environ["ICV_VLLM_PIN_DIR"] = cases["vector_dir"] + "-pinned"
    else:
        os.environ.pop("ICV_VLLM_DIR", None)
    if cases.get("distributed_executor_backend") == "ray":  # Ray actors get only the variables vLLM copies
        os.environ["VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"] = "ICV_VLLM_"
    if cases.get("max_slots"):
        os.environ["ICV_VLLM_MAX_SLOTS"] = str(cases["max_slots"])
    if not one_worker:
        # vllm-cpu binds each rank's threads to NUMA nodes; this machine has
        # one, so give each rank its own core explicitly (read on the CPU backend only).
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    env_set_by_us = dict(os.environ)
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    if cases.get("fail_vector"):
        import hashlib

        from icv_vllm.engine import vector_scheduling

        path = os.path.join(cases["vector_dir"], cases["fail_vector"] + ".safetensors")
        failing = hashlib.sha256(open(path, "rb").read()).hexdigest()
        real = vector_scheduling.load_pinned

        def load_pinned(pin_dir, digest):
            if digest == failing:
                raise OSError(5, "Input/output error (injected)")
            return real(pin_dir, digest)

        vector_scheduling.load_pinned = load_pinned

    llm = LLM(
        cases["model"],
        enforce_eager=cases["mode"] == "eager",
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=cases.get("max_num_batched_tokens", 1024),
        tensor_parallel_size=tensor_parallel,
        pipeline_parallel_size=pipeline_parallel,
        distributed_executor_backend=cases.get("distributed_executor_backend"),
        seed=0,
    )
    compilation = llm.llm_engine.vllm_config.compilation_config
    results = {"compilation_mode": getattr(compilation.mode, "name", str(compilation.mode)), "batches": [],
               "inflight": []}
    if one_worker:  # the worker is in this process
        from icv_vllm.worker.runtime import RUNTIME

        results["shift_path"] = RUNTIME.shift_path
        results["steering_ready"] = RUNTIME.ready
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
        results["layer_classes"] = sorted({type(m).__name__ for m in model.modules() if "DecoderLayer" in type(m).__name__})
        results["env_changed"] = sorted(k for k in set(os.environ) | set(env_set_by_us)
                                        if os.environ.get(k) != env_set_by_us.get(k))

    def params(r):
        return SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=0,
                              extra_args={"icv": r["icv"]} if r.get("icv") else None)

    for batch in cases["batches"]:
        if isinstance(batch, dict):
            _act(batch.get("before"))
            batch = batch["requests"]
        outputs = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in batch],
                               [params(r) for r in batch], use_tqdm=False)
        results["batches"].append([_result(o) for o in outputs])
    engine = llm.llm_engine
    for n, scenario in enumerate(cases.get("inflight", [])):
        _act(scenario.get("before"))
        ids = [f"inflight-{n}-{i}" for i in range(len(scenario["requests"]))]
        for request_id, r in zip(ids, scenario["requests"]):
            engine.add_request(request_id, {"prompt_token_ids": r["prompt_ids"]}, params(r))
        finished = {}
        for _ in range(scenario.get("steps_before", 2)):
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = o
        _act(scenario.get("action"))
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = o
        results["inflight"].append([_result(finished[i]) for i in ids])
    errors = []
    for spec in cases.get("bad_specs", []):
        try:
            llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                         [SamplingParams(max_tokens=1, extra_args={"icv": spec})], use_tqdm=False)
            errors.append(None)
        except VLLMValidationError as e:
            errors.append(str(e))
    results["bad_spec_errors"] = errors
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
