"""Throughput cost of the plugin, as ratios measured in one run.

Three engines, each in its own process, on the same model and workload
(vLLM defaults: compiled, prefix caching on, greedy):
  plain      vLLM without the plugin (VLLM_PLUGINS=none)
  plugin     the plugin loaded, no request selects a vector
  steered    every request selects a vector; --distinct vectors in the batch
  steered-torch  (with --compare-torch) the same, the C kernel switched off
             (ICV_VLLM_CPU_KERNEL=0): the torch fallback, on the CPU
Each engine does one warm-up generate, then --repeats timed generates; the
best is kept. Rounds alternate the engines to spread machine noise; the table
gives the ratio of the best runs and, per round, the ratio to that round's
plain engine (with their median).

    python benchmarks/throughput.py --model .cache/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("plain", "plugin", "steered", "steered-torch")


def _worker(args: argparse.Namespace) -> None:
    """One engine; prints a JSON line with its best output tokens/s."""
    from vllm import LLM, SamplingParams

    llm = LLM(args.model, max_model_len=1024, seed=0, enforce_eager=args.eager)
    prompts = [f"Write a short story about a {w} who learns to cook, number {i}."
               for i, w in zip(range(args.num_prompts), ["cat", "dog", "robot", "pirate"] * 1000)]
    def params(i: int) -> SamplingParams:
        extra = {"icv": f"v{i % args.distinct}:0.1"} if args.config.startswith("steered") else None
        return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                              extra_args=extra)
    all_params = [params(i) for i in range(len(prompts))]
    llm.generate(prompts[:8], all_params[:8], use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, all_params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        best = max(best, tokens / elapsed)
    print("RESULT " + json.dumps({"config": args.config, "tokens_per_s": best}), flush=True)


def _write_vectors(model: str, directory: Path, count: int) -> None:
    import torch
    from transformers import AutoConfig

    from icv_vllm.vectors.vector import ICVector

    config = AutoConfig.from_pretrained(model)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        tensor = torch.randn(config.num_hidden_layers, config.hidden_size, generator=g)
        ICVector(tensor, model=model, method="mean", num_pairs=1).save(directory / f"v{i}.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--distinct", type=int, default=8, help="distinct vectors in the steered batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also run steered with the C kernel off (CPU: the torch fallback)")
    parser.add_argument("--out", default="benchmarks/results/throughput.md")
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return _worker(args)

    vector_dir = Path(tempfile.mkdtemp(prefix="icv-bench-"))
    _write_vectors(args.model, vector_dir, args.distinct)
    configs = CONFIGS if args.compare_torch else CONFIGS[:3]
    rounds: list[dict[str, float]] = []  # per round: config -> its best tokens/s in that round
    for _ in range(args.rounds):
        rounds.append({})
        for config in configs:
            env = dict(os.environ, ICV_VLLM_DIR=str(vector_dir), VLLM_NO_USAGE_STATS="1",
                       VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
            if config == "plain":
                env["VLLM_PLUGINS"] = "none"
            if config == "steered-torch":
                env["ICV_VLLM_CPU_KERNEL"] = "0"
            cmd = [sys.executable, __file__, "--config", config] + sys.argv[1:]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            rounds[-1][config] = result["tokens_per_s"]
            print(f"{config}: {result['tokens_per_s']:.1f} tokens/s", flush=True)
    mode = "eager" if args.eager else "compiled"
    best = {config: max(r[config] for r in rounds) for config in configs}
    # each round's ratio to that round's plain engine: machine noise that spans
    # a round (minutes) cancels; the median over rounds resists one outlier run
    per_round = {config: sorted(r[config] / r["plain"] for r in rounds) for config in configs}
    table = [
        f"Model {Path(args.model).name}, {args.num_prompts} prompts x {args.max_tokens} tokens, "
        f"{mode}, {args.distinct} distinct vectors when steered, {args.rounds} rounds, "
        f"best of {args.repeats} runs per engine and round.",
        "",
        "| engine | best output tokens/s | ratio of bests | ratio per round (sorted) | median ratio |",
        "|---|---|---|---|---|",
    ]
    for config in configs:
        ratios = per_round[config]
        table.append(f"| {config} | {best[config]:.1f} | {best[config] / best['plain']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in ratios)} | {statistics.median(ratios):.3f} |")
    text = "\n".join(table)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
