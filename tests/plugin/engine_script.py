"""Runs one vLLM engine (in its own process: one engine per process, as the
plugin's worker state is per process) over batches of requests given as JSON
and writes what it generated. Used by the plugin tests.

    python tests/plugin/engine_script.py CASES.json OUT.json
"""

from __future__ import annotations

import json
import os
import sys


def main(cases_path: str, out_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    os.environ.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0" if cases.get("tensor_parallel_size", 1) == 1 else "1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_NO_USAGE_STATS="1",
        VLLM_DISABLE_COMPILE_CACHE="1",
        HF_HUB_OFFLINE="1",
        ICV_VLLM_DIR=cases["vector_dir"],
    )
    if cases.get("tensor_parallel_size", 1) > 1:
        # vllm-cpu binds each rank's threads to NUMA nodes; this machine has
        # one, so give each rank its own core explicitly.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = LLM(
        cases["model"],
        enforce_eager=cases["mode"] == "eager",
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=cases.get("max_num_batched_tokens", 1024),
        tensor_parallel_size=cases.get("tensor_parallel_size", 1),
        seed=0,
    )
    compilation = llm.llm_engine.vllm_config.compilation_config
    results = {"compilation_mode": getattr(compilation.mode, "name", str(compilation.mode)), "batches": []}
    if cases.get("tensor_parallel_size", 1) == 1:  # the worker is in this process
        from icv_vllm.plugin.runtime import RUNTIME

        results["shift_path"] = RUNTIME.shift_path
    for batch in cases["batches"]:
        params = [
            SamplingParams(
                max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=0,
                extra_args={"icv": r["icv"]} if r.get("icv") else None,
            )
            for r in batch
        ]
        prompts = [{"prompt_token_ids": r["prompt_ids"]} for r in batch]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results["batches"].append([
            {
                "token_ids": list(o.outputs[0].token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
                "num_cached_tokens": o.num_cached_tokens,
            }
            for o in outputs
        ])
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
