"""Runs several tiny models, one after another, in ONE process (engine start
dominates the cost; the plugin's worker state is rebuilt by each model's
load): for each, a mixed batch of steered and unsteered requests, greedy.

    python tests/plugin/coverage_script.py CASES.json OUT.json

CASES: {"runs": [{"label", "model", "mode": "eager"|"compiled", "vector_dir",
"requests": [{"prompt_ids", "icv", "max_tokens"}]}]}; OUT: {label: {"token_ids":
[...], "shift_path": ..., "error": str | None}}.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback


def main(cases_path: str, out_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                      VLLM_DISABLE_COMPILE_CACHE="1", HF_HUB_OFFLINE="1")
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from icv_vllm.frontend.admission import CAPTURE_IDS
    from icv_vllm.worker.runtime import RUNTIME

    results = {}
    for run in cases["runs"]:
        os.environ["ICV_VLLM_DIR"] = run["vector_dir"]
        os.environ["ICV_VLLM_PIN_DIR"] = run["vector_dir"] + "-pinned"
        entry = {"error": None}
        llm = None
        try:
            llm = LLM(run["model"], enforce_eager=run["mode"] == "eager", dtype="float32", max_model_len=512,
                      seed=0, max_num_seqs=16)
            params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True,
                                     extra_args={"icv": r["icv"]} if r.get("icv") else None)
                      for r in run["requests"]]
            outputs = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in run["requests"]], params,
                                   use_tqdm=False)
            entry["token_ids"] = [list(o.outputs[0].token_ids) for o in outputs]
            entry["shift_path"] = RUNTIME.shift_path
            entry["layers"] = RUNTIME.layers
            if run.get("capture"):  # in-server extraction's residual streams, as the server takes them
                ids = [CAPTURE_IDS.issue(True) for _ in run["capture"]]
                llm.generate([{"prompt_token_ids": p} for p in run["capture"]],
                             [SamplingParams(max_tokens=1, extra_args={"icv_capture": i}) for i in ids],
                             use_tqdm=False)
                captured = llm.collective_rpc("icv_take_captures", args=(ids,))[0]
                entry["streams"] = [captured[i] for i in ids]
        except Exception:
            entry["error"] = traceback.format_exc()[-3000:]
        finally:
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()
        results[run["label"]] = entry
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
