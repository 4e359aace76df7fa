"""Throughput cost of the plugin vs the number of distinct vectors per batch.

Two engines on the same model, each in its own process and both kept alive
for the whole run (an idle vLLM engine takes no CPU), with vLLM's defaults
(compiled, prefix caching on):
  plain    vLLM without the plugin (VLLM_PLUGINS=none)
  plugin   the plugin loaded and configured (ICV_VLLM_DIR); per measurement
           K distinct vectors in the batch: request i selects vector i % K
           (random vectors on all layers, --scale), K=0: no request selects one
  torch    (with --compare-torch) a third engine, the plugin with the C kernel
           switched off (ICV_VLLM_CPU_KERNEL=0): the torch fallback, K >= 1
Workload: --num-prompts requests sent at once, greedy, ignore_eos,
--max-tokens each (every run makes the same tokens). A measurement is one
short warm-up generate over the whole batch (loads the vectors, fills the
prefix cache alike for every engine and K), then --repeats timed generates,
the best kept. Each round measures, for every K, the plain engine and the
plugin engine back to back (every second round in the other order), so each
ratio compares runs seconds apart; the median over rounds is reported.
Writes a markdown table, the raw numbers (.json) and a plot of the median
ratio vs K (.png) next to --out. Engines run with VLLM_USE_AOT_COMPILE=0
unless set: vllm-cpu 0.32's AOT compile cache fails to load here and
recompiles (~2 min) at each start; the older compile cache loads in seconds.

    python benchmarks/throughput.py --model .cache/models/SmolLM2-135M-Instruct \\
        --num-prompts 256 --max-tokens 32 --rounds 3
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


def _worker(args: argparse.Namespace) -> None:
    """One engine, kept alive: reads K per line on stdin, answers a JSON line
    with the best output tokens/s. vLLM's own output goes to stderr."""
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from vllm import LLM, SamplingParams

    llm = LLM(args.model, max_model_len=1024, seed=0, enforce_eager=args.eager)
    animals = ["cat", "dog", "robot", "pirate"]
    prompts = [f"Write a short story about a {animals[i % 4]} who learns to cook, number {i}."
               for i in range(args.num_prompts)]

    def params(k: int, max_tokens: int) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                               extra_args={"icv": f"v{i % k}:{args.scale}"} if k else None)
                for i in range(len(prompts))]

    llm.generate(prompts, params(0, args.max_tokens), use_tqdm=False)  # compiles the batch sizes
    print("READY", file=results, flush=True)
    for line in sys.stdin:
        k = int(line)
        llm.generate(prompts, params(k, min(4, args.max_tokens)), use_tqdm=False)  # warm-up
        timed = params(k, args.max_tokens)
        best = 0.0
        for _ in range(args.repeats):
            start = time.perf_counter()
            outs = llm.generate(prompts, timed, use_tqdm=False)
            elapsed = time.perf_counter() - start
            best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
        print(json.dumps({"k": k, "tokens_per_s": best}), file=results, flush=True)


class _Engine:
    """A worker process and its log file."""

    def __init__(self, name: str, env: dict[str, str], log: Path):
        self.name, self.log = name, log
        cmd = [sys.executable, __file__, "--engine", name] + sys.argv[1:]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True)

    def _answer(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-4000:]
            sys.exit(f"engine {self.name} stopped (exit {self.proc.wait()}), log {self.log}:\n{tail}")
        return line

    def wait_ready(self) -> None:
        assert self._answer().strip() == "READY"

    def measure(self, k: int) -> float:
        self.proc.stdin.write(f"{k}\n")
        self.proc.stdin.flush()
        return json.loads(self._answer())["tokens_per_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


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


def _plot(path: Path, ks: list[int], series: dict[str, list[list[float]]], title: str) -> None:
    """Median ratio vs K per engine (lines), each round's ratio (grey dots), the goal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=100)
    everything = [GOAL, 1.0]
    for (name, per_k), color in zip(series.items(), ["tab:blue", "tab:orange"]):
        xs = [k for k, ratios in zip(ks, per_k) if ratios]
        per_k = [ratios for ratios in per_k if ratios]
        for k, ratios in zip(xs, per_k):
            ax.scatter([k] * len(ratios), ratios, s=10, color="0.65", zorder=2,
                       label="each round" if k == xs[0] and color == "tab:blue" else None)
            everything += ratios
        ax.plot(xs, [statistics.median(r) for r in per_k], "o-", color=color, zorder=3, label=name)
    ax.axhline(GOAL, color="tab:red", linestyle="--", linewidth=1, label=f"goal {GOAL}")
    ax.axhline(1.0, color="0.3", linewidth=0.6)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlim(-0.3, max(ks) * 1.6)
    ax.set_ylim(min(everything) - 0.03, max(everything) + 0.03)
    ax.set_xlabel("distinct vectors in the batch, K (0: plugin on, nothing steered)")
    ax.set_ylabel("output tokens/s / plain vLLM")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
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
    parser.add_argument("--repeats", type=int, default=2, help="timed generates per measurement (best kept)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also measure K >= 1 with the C kernel off (CPU: the torch fallback)")
    parser.add_argument("--out", default="benchmarks/results/throughput_k_sweep.md")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return _worker(args)

    t0 = time.perf_counter()
    ks = sorted(set(args.ks))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vector_dir = Path(tempfile.mkdtemp(prefix="icv-bench-"))
    _write_vectors(args.model, vector_dir, max(ks + [1]))
    base_env = dict(os.environ, ICV_VLLM_DIR=str(vector_dir), VLLM_NO_USAGE_STATS="1",
                    VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                    VLLM_USE_AOT_COMPILE=os.environ.get("VLLM_USE_AOT_COMPILE", "0"))
    envs = {"plain": dict(base_env, VLLM_PLUGINS="none"), "plugin": base_env}
    if args.compare_torch:
        envs["torch"] = dict(base_env, ICV_VLLM_CPU_KERNEL="0")
    engines = {name: _Engine(name, env, out.with_name(f"{out.stem}.{name}.log")) for name, env in envs.items()}
    for engine in engines.values():
        engine.wait_ready()
    print(f"engines ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    # rows[r]: one dict per (K, engine) measured in round r, plain paired with each
    rows: list[list[dict]] = []
    for r in range(args.rounds):
        rows.append([])
        for k in ks:
            names = ["plain", "plugin"] + (["torch"] if "torch" in engines and k > 0 else [])
            tps = {name: engines[name].measure(k) for name in (names if r % 2 == 0 else names[::-1])}
            for name in names[1:]:
                rows[-1].append({"k": k, "engine": name, "tokens_per_s": tps[name],
                                 "plain_tokens_per_s": tps["plain"], "ratio": tps[name] / tps["plain"]})
            print(f"round {r + 1} K={k}: " + ", ".join(f"{n} {tps[n]:.1f}" for n in names) +
                  f" tokens/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    for engine in engines.values():
        engine.close()

    mode = "eager" if args.eager else "compiled"
    flat = [row for round_rows in rows for row in round_rows]

    def ratios(k: int, name: str) -> list[float]:
        return sorted(row["ratio"] for row in flat if row["k"] == k and row["engine"] == name)

    best_plain = max(row["plain_tokens_per_s"] for row in flat)
    table = [
        f"Model {Path(args.model).name}, CPU, {mode}, {args.num_prompts} requests at once x {args.max_tokens} "
        f"output tokens, greedy; K >= 1: every request steered, request i by vector i % K (all layers, scale "
        f"{args.scale}). {args.rounds} rounds; per round and K the plain engine and the plugin engine back to "
        f"back, best of {args.repeats} generates each; ratio = plugin / plain of the same pair.",
        "",
        "| K (distinct vectors) | engine | best output tokens/s | plain best (pairs' plain runs) | "
        "ratio per round (sorted) | median ratio |",
        "|---:|---|---:|---:|---|---:|",
    ]
    labels = {"plugin": "plugin, C kernel", "torch": "plugin, torch fallback"}
    for k in ks:
        for name in [n for n in ("plugin", "torch") if ratios(k, n)]:
            mine = [row for row in flat if row["k"] == k and row["engine"] == name]
            table.append(f"| {k} | {labels[name] if k else 'plugin, nothing steered'} | "
                         f"{max(row['tokens_per_s'] for row in mine):.1f} | "
                         f"{max(row['plain_tokens_per_s'] for row in mine):.1f} | "
                         f"{', '.join(f'{x:.3f}' for x in ratios(k, name))} | "
                         f"**{statistics.median(ratios(k, name)):.3f}** |")
    worst = min(statistics.median(ratios(k, "plugin")) for k in ks)
    table += ["", f"Goal: median ratio >= {GOAL} at every K (C kernel): {'met' if worst >= GOAL else 'NOT met'} "
                  f"(lowest {worst:.3f}). Plain vLLM's best: {best_plain:.1f} output tokens/s. "
                  f"Whole run: {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(table)
    print(text)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if k != "engine"}, "rounds": rows}, indent=1) + "\n")
    series = {labels[n]: [ratios(k, n) for k in ks] for n in ("plugin", "torch") if n in engines}
    _plot(out.with_suffix(".png"), ks, series,
          f"{Path(args.model).name}, CPU ({mode}), {args.num_prompts} requests x {args.max_tokens} tokens, "
          f"{args.rounds} rounds")


if __name__ == "__main__":
    main()
