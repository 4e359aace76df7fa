"""Throughput cost of the plugin vs the number of distinct vectors per batch.

Engines on the same model and workload (vLLM defaults: compiled, prefix
caching on; greedy, ignore_eos, so every run makes the same tokens), each
started in its own process:
  plain    vLLM without the plugin (VLLM_PLUGINS=none)
  K=0      the plugin loaded and configured (ICV_VLLM_DIR), no request
           selects a vector
  K=k      every request steered, request i by vector i % k (random vectors
           on all layers, --scale), so k distinct vectors in the batch
  K=k torch  (with --compare-torch) the same with the C kernel switched off
           (ICV_VLLM_CPU_KERNEL=0): the torch fallback, on the CPU
Each engine does one short warm-up generate over the whole batch (compiles,
loads every vector, fills the prefix cache alike for all engines), then
--repeats timed generates; the best is kept. Rounds run the engines in turn
(plain, K=0, K=1, ...; every second round in reverse order, so a steady
drift of the machine cancels) to spread machine noise; each engine's ratio
is to the plain engine of the same round, and the median over rounds is
reported. Engines run with VLLM_USE_AOT_COMPILE=0 unless set: vllm-cpu
0.32's AOT compile cache fails to load here and recompiles (~2 min) at each
start, while the older compile cache loads in seconds.
Writes a markdown table, a JSON of the raw numbers and a PNG plot of the
median ratio vs K (--out, --out with .json / .png).

    python benchmarks/throughput.py --model .cache/models/SmolLM2-135M-Instruct \\
        --num-prompts 256 --max-tokens 32 --rounds 2
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

GOAL = 0.95


def _k_of(config: str) -> int:
    """'k8' / 'k8-torch' -> 8."""
    return int(config[1:].split("-")[0])


def _label(config: str) -> str:
    if config == "plain":
        return "plain vLLM (plugin not loaded)"
    k = _k_of(config)
    if k == 0:
        return "K=0 (plugin configured, no vector selected)"
    return f"K={k}" + (" (torch fallback)" if config.endswith("-torch") else "")


def _worker(args: argparse.Namespace) -> None:
    """One engine; prints a JSON line with its best output tokens/s."""
    from vllm import LLM, SamplingParams

    llm = LLM(args.model, max_model_len=1024, seed=0, enforce_eager=args.eager)
    animals = ["cat", "dog", "robot", "pirate"]
    prompts = [f"Write a short story about a {animals[i % 4]} who learns to cook, number {i}."
               for i in range(args.num_prompts)]
    k = 0 if args.config == "plain" else _k_of(args.config)

    def params(i: int, max_tokens: int) -> SamplingParams:
        extra = {"icv": f"v{i % k}:{args.scale}"} if k else None
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)

    llm.generate(prompts, [params(i, min(4, args.max_tokens)) for i in range(len(prompts))],
                 use_tqdm=False)  # warm-up
    all_params = [params(i, args.max_tokens) for i in range(len(prompts))]
    best = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, all_params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        best = max(best, tokens / elapsed)
    print("RESULT " + json.dumps({"config": args.config, "tokens_per_s": best}), flush=True)


def _write_vectors(model: str, directory: Path, count: int) -> None:
    """count random [num_layers, hidden_size] vectors v0 ... v{count-1}."""
    import torch
    from transformers import AutoConfig

    from icv_vllm.vectors.vector import ICVector

    config = AutoConfig.from_pretrained(model)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        tensor = torch.randn(config.num_hidden_layers, config.hidden_size, generator=g)
        ICVector(tensor, model=model, method="mean", num_pairs=1).save(directory / f"v{i}.safetensors")


def _plot(path: Path, ks: list[int], medians: list[float], per_round: list[list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    for k, ratios in zip(ks, per_round):
        ax.scatter([k] * len(ratios), ratios, s=12, color="0.6", zorder=2,
                   label="per round" if k == ks[0] else None)
    ax.plot(ks, medians, "o-", color="tab:blue", zorder=3, label="median over rounds")
    ax.axhline(GOAL, color="tab:red", linestyle="--", linewidth=1, label=f"goal {GOAL}")
    ax.axhline(1.0, color="0.3", linewidth=0.6)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlim(-0.3, max(ks) * 1.5)
    low = min([GOAL] + [r for rs in per_round for r in rs])
    high = max([1.0] + [r for rs in per_round for r in rs])
    ax.set_ylim(low - 0.03, high + 0.03)
    ax.set_xlabel("distinct vectors in the batch (K; 0 = plugin on, nothing steered)")
    ax.set_ylabel("output tokens/s vs plain vLLM")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 8, 64, 256],
                        help="distinct vectors per batch to sweep (0: plugin on, no vector selected)")
    parser.add_argument("--scale", type=float, default=0.02, help="scale of every selected vector")
    parser.add_argument("--repeats", type=int, default=2, help="timed generates per engine and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also run each K >= 1 with the C kernel off (CPU: the torch fallback)")
    parser.add_argument("--out", default="benchmarks/results/throughput_k_sweep.md")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return _worker(args)

    t0 = time.perf_counter()
    ks = sorted(set(args.ks))
    vector_dir = Path(tempfile.mkdtemp(prefix="icv-bench-"))
    _write_vectors(args.model, vector_dir, max(ks + [1]))
    configs = ["plain"] + [f"k{k}" for k in ks]
    if args.compare_torch:
        configs += [f"k{k}-torch" for k in ks if k > 0]
    rounds: list[dict[str, float]] = []  # per round: config -> its best tokens/s in that round
    print(f"{len(configs)} engines x {args.rounds} rounds: {', '.join(map(_label, configs))}", flush=True)
    for r in range(args.rounds):
        rounds.append({})
        for config in configs if r % 2 == 0 else configs[::-1]:
            env = dict(os.environ, ICV_VLLM_DIR=str(vector_dir), VLLM_NO_USAGE_STATS="1",
                       VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                       VLLM_USE_AOT_COMPILE=os.environ.get("VLLM_USE_AOT_COMPILE", "0"))
            if config == "plain":
                env["VLLM_PLUGINS"] = "none"
            if config.endswith("-torch"):
                env["ICV_VLLM_CPU_KERNEL"] = "0"
            cmd = [sys.executable, __file__, "--config", config] + sys.argv[1:]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            rounds[-1][config] = json.loads(lines[-1][len("RESULT "):])["tokens_per_s"]
            print(f"round {r + 1} {_label(config)}: {rounds[-1][config]:.1f} tokens/s "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    mode = "eager" if args.eager else "compiled"
    best = {c: max(r[c] for r in rounds) for c in configs}
    # each round's ratio to that round's plain engine: machine noise that spans
    # a round (minutes) cancels; the median over rounds resists one outlier run
    per_round = {c: sorted(r[c] / r["plain"] for r in rounds) for c in configs}
    median = {c: statistics.median(per_round[c]) for c in configs}
    header = (f"Model {Path(args.model).name}, {args.num_prompts} requests x {args.max_tokens} output tokens, "
              f"{mode}, greedy, every request steered when K >= 1 (request i: vector i % K, all layers, "
              f"scale {args.scale}), {args.rounds} rounds, best of {args.repeats} runs per engine and round.")
    table = [header, "",
             "| engine | best output tokens/s | ratio of bests | ratio per round (sorted) | median ratio |",
             "|---|---|---|---|---|"]
    for c in configs:
        table.append(f"| {_label(c)} | {best[c]:.1f} | {best[c] / best['plain']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in per_round[c])} | {median[c]:.3f} |")
    steered = [c for c in configs if c != "plain" and not c.endswith("-torch")]
    worst = min(median[c] for c in steered)
    table += ["", f"Goal: median ratio >= {GOAL} at every K: "
                  f"{'met' if worst >= GOAL else 'not met'} (lowest {worst:.3f}). "
                  f"Total run {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(table)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "config"},
                                                     "rounds": rounds}, indent=1) + "\n")
    _plot(out.with_suffix(".png"), ks, [median[f"k{k}"] for k in ks], [per_round[f"k{k}"] for k in ks],
          f"{Path(args.model).name}, CPU ({mode}), {args.num_prompts} req x {args.max_tokens} tok, "
          f"{args.rounds} rounds")


if __name__ == "__main__":
    main()
