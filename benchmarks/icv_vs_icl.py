"""Serving cost of in-context learning vs an in-context vector (and a LoRA adapter), in one run.

The same model and the same demonstration pairs (the first N of --pairs, for each N of
--num-pairs) used three ways:
  icl N  the N pairs as chat turns before each query (as benchmarks/quality.py builds
         them): every request carries the demonstrations
  icv    the pairs extracted once into a vector (icv_vllm.vectors.extract_icv, from the
         largest N: a vector costs the same whatever it was extracted from), selected per
         request ("task:--scale"); the prompt is the query alone
  none   the query alone, unsteered (reference)
  lora   (--lora) a rank-8 LoRA adapter trained on the largest N pairs
         (benchmarks/lora_baseline.py), served by vLLM's LoRA support in a second engine
         started after the first one is gone (the plugin off; vLLM runs LoRA eagerly on the
         CPU), timed against that engine's own unsteered batches
Queries: --concurrency distinct rude sentences per batch (the 8 held-out
sentences of quality.py, each addressed to --concurrency/8 different names,
a fresh set of names per timed batch, so no query is ever in the prefix
cache; the demonstrations are, after the warm-up, as they would be in a
server). All of a batch's requests go to the engine at once (one
LLM.generate); greedy, ignore_eos, --max-tokens each, so every way makes the
same number of tokens. Warm-up: one batch per way. Then --repeats batches
per way, ways alternating; reported per way: output tokens/s (median over
batches), its ratio to each ICL (median of per-batch ratios), time to first token
p50/p95 over all timed requests (vLLM's RequestOutput.metrics:
first_token_latency, from the request's arrival), prompt tokens/request.
Batches timed one after another carry the shared machine's drifts (up to 40 %
between adjacent batches here), so the ratios of ICV to each ICL and to the
unsteered queries are also measured in turns (--turn-runs, benchmarks/turns.py):
two more plugin engines, one running ICV and the other the way compared, in
turns of --slice-ms, each counted for the time it ran; the goal is judged on
those when they are measured.

    .venv/bin/python benchmarks/icv_vs_icl.py --model .cache/models/SmolLM2-135M-Instruct [--lora]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from quality import HELD_OUT, INSTRUCTION, chat_prompt, leave_now
from turns import Engine, serve_commands, timed_run

NAMES = ["Tom", "Anna", "Raj", "Mia", "Leo", "Sara", "Omar", "Ines", "Ken", "Lucy", "Ivan", "Nora",
         "Paul", "Zoe", "Hugo", "Ada", "Max", "Eva", "Ravi", "Lena", "Sam", "Yuki", "Ben", "Ida",
         "Tariq", "Olga", "Finn", "Maya", "Jon", "Rosa", "Eli", "Vera"]
GOAL = 3.0


def queries(batch: int, size: int) -> list[str]:
    """size distinct rude sentences for batch number `batch` (names never reused across batches)."""
    per = -(-size // len(HELD_OUT))
    ids = range(batch * per, (batch + 1) * per)  # past the list: "Tom 2", "Anna 2", ...
    names = [NAMES[i % len(NAMES)] + (f" {i // len(NAMES) + 1}" if i >= len(NAMES) else "") for i in ids]
    return [f"{name}, {s[0].lower()}{s[1:]}" for name in names for s in HELD_OUT][:size]


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def plugin_ways(pairs: list, counts: list[int], scale: float) -> dict[str, tuple]:
    """The ways one plugin engine serves: name -> (demonstration turns, icv selection, LoRARequest)."""
    ways = {f"icl {n}": ([(INSTRUCTION.format(p.input), p.target) for p in pairs[:n]], None, None) for n in counts}
    return ways | {"icv": ([], f"task:{scale}", None), "none": ([], None, None)}


def run_batch(llm, tokenizer, way: tuple, batch: int, args) -> tuple[int, float, list]:
    """One batch of a way (see plugin_ways), all requests at once: output tokens,
    seconds, and vLLM's RequestOutputs."""
    from vllm import SamplingParams

    demonstrations, spec, lora = way
    prompts = [chat_prompt(tokenizer, demonstrations, INSTRUCTION.format(q)) for q in queries(batch, args.concurrency)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                            extra_args={"icv": spec} if spec else None)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs), elapsed, outs


def timed_batches(llm, ways: dict, args, tokenizer, log: str = "") -> dict[str, list[tuple[float, list[float], float]]]:
    """One warm-up batch per way, then --repeats batches per way, ways alternating.
    ways: name -> (demonstration turns, icv selection or None, LoRARequest or None).
    Per way and batch: (output tokens/s, TTFT per request in s, mean prompt tokens)."""

    def run(way: str, batch: int) -> tuple[float, list[float], float]:
        tokens, elapsed, outs = run_batch(llm, tokenizer, ways[way], batch, args)
        if any(o.metrics is None for o in outs):
            raise RuntimeError("RequestOutput.metrics is None: this vLLM does not report per-request stats")
        return (tokens / elapsed, [o.metrics.first_token_latency for o in outs],
                sum(len(o.prompt_token_ids) for o in outs) / len(outs))

    for way in ways:  # warm-up: compiles, loads the vector or adapter, caches the demonstrations
        run(way, 0)
    results: dict[str, list] = {w: [] for w in ways}
    for r in range(args.repeats):
        for way in ways if r % 2 == 0 else list(ways)[::-1]:
            results[way].append(run(way, r + 1))
            print(f"{log}batch {r + 1} {way}: {results[way][-1][0]:.1f} output tokens/s", flush=True)
    return results


def lora_phase(args) -> None:
    """The LoRA engine (run as a child with VLLM_PLUGINS=none): 'lora' and 'none' batches, JSON to --phase-out."""
    import json

    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from lora_baseline import LoraRecipe

    llm = LLM(args.model, max_model_len=args.max_model_len, seed=0, disable_log_stats=False,
              enable_prefix_caching=not args.no_prefix_caching, enable_lora=True, max_loras=1,
              max_lora_rank=LoraRecipe.rank)
    request = LoRARequest("task", 1, args.lora_dir)
    results = timed_batches(llm, {"lora": ([], None, request), "none": ([], None, None)}, args,
                            llm.get_tokenizer(), log="[lora engine] ")
    mode = llm.llm_engine.vllm_config.compilation_config.mode
    Path(args.phase_out).write_text(json.dumps({"results": results, "compilation_mode": str(mode)}))


def turn_engine(args) -> None:
    """A plugin engine of the turns phase (a child process): answers "warm WAY BATCH"
    and "time WAY BATCH" (WAY: a name of plugin_ways) with the output tokens made."""
    from icv_vllm.vectors.pairs import read_pairs_jsonl

    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM's output goes to the log
    from vllm import LLM

    llm = LLM(args.model, max_model_len=args.max_model_len, seed=0, enable_prefix_caching=not args.no_prefix_caching)
    ways = plugin_ways(read_pairs_jsonl(args.pairs), sorted(set(args.num_pairs)), args.scale)
    tokenizer = llm.get_tokenizer()

    def handle(command: str) -> dict:
        what, rest = command.split(" ", 1)
        way, batch = rest.rsplit(" ", 1)
        tokens, _, _ = run_batch(llm, tokenizer, ways[way], int(batch), args)
        return {"what": what, "way": way, "tokens": tokens}

    serve_commands(handle, results)


def turns_phase(args, counts: list[int], vector_dir: Path) -> dict[str, list[float]]:
    """ICV against each ICL and against the unsteered queries, timed in turns
    (benchmarks/turns.py) on two plugin engines: per comparison --turn-runs runs,
    which engine runs which way and which one starts alternating. Returns, per
    way compared with, ICV's tokens/s over that way's in each run."""
    out = Path(args.out)
    env = dict(os.environ, ICV_VLLM_DIR=str(vector_dir), VLLM_CPU_KVCACHE_SPACE=str(args.turns_kv_space))
    cmd = [sys.executable, __file__, *sys.argv[1:], "--turn-engine"]
    engines = [Engine(f"turns-{i}", cmd, env, out.with_name(f"{out.stem}.turns-{i}.log")) for i in range(2)]
    bases = [f"icl {n}" for n in counts] + ["none"]
    ratios: dict[str, list[float]] = {base: [] for base in bases}
    try:
        for engine in engines:
            engine.wait_ready()
        for engine in engines:  # compiles, loads the vector, caches the demonstrations
            for way in bases + ["icv"]:
                engine.ask(f"warm {way} 0")
        batch = 0
        for base in bases:
            for run in range(args.turn_runs):
                batch += 1  # fresh queries, the same on both engines
                icv_engine, base_engine = engines if run % 4 < 2 else engines[::-1]
                commands = [(icv_engine, f"time icv {batch}"), (base_engine, f"time {base} {batch}")]
                tps = timed_run(commands if run % 2 == 0 else commands[::-1], args.slice_ms / 1000)
                ratios[base].append(tps[icv_engine.name] / tps[base_engine.name])
                print(f"turns: icv {tps[icv_engine.name]:.1f} vs {base} {tps[base_engine.name]:.1f} output "
                      f"tokens/s of the time each ran", flush=True)
        for engine in engines:
            engine.close()
    finally:
        for engine in engines:
            engine.kill()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", default="benchmarks/quality_data/polite_pairs.jsonl")
    parser.add_argument("--num-pairs", type=int, nargs="+", default=[5, 16, 64],
                        help="ICL with the first N pairs, for each N")
    parser.add_argument("--scale", type=float, default=0.04)
    parser.add_argument("--concurrency", type=int, default=64, help="requests per batch, sent at once")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per way")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="turn vLLM's prefix cache off (ICL then prefills its demonstrations every time)")
    parser.add_argument("--lora", action="store_true", help="also time a LoRA adapter trained on the pairs")
    parser.add_argument("--out", default="benchmarks/results/icv_vs_icl.md")
    parser.add_argument("--turn-runs", type=int, default=4,
                        help="runs in turns per comparison of ICV with another way (0: no turns phase)")
    parser.add_argument("--slice-ms", type=float, default=250.0, help="length of each engine's turn")
    parser.add_argument("--turns-kv-space", type=float, default=3,
                        help="VLLM_CPU_KVCACHE_SPACE (GiB) of each of the two engines of the turns phase")
    parser.add_argument("--turn-engine", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    parser.add_argument("--lora-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "8")  # GiB; CPU: else a fraction of all memory
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # see benchmarks/throughput.py
    if args.phase_out:
        lora_phase(args)
        leave_now()
    if args.turn_engine:
        turn_engine(args)
        leave_now()
    t0 = time.perf_counter()

    from icv_vllm.vectors import extract_icv
    from icv_vllm.vectors.pairs import read_pairs_jsonl

    counts = sorted(set(args.num_pairs))
    pairs = read_pairs_jsonl(args.pairs)
    if len(pairs) < counts[-1]:
        raise SystemExit(f"{args.pairs} has {len(pairs)} pairs, fewer than {counts[-1]}")
    pairs = pairs[: counts[-1]]
    vector_dir = Path(tempfile.mkdtemp(prefix="icv-vs-icl-"))
    start = time.perf_counter()
    extract_icv(args.model, pairs, progress=False).save(vector_dir / "task.safetensors")
    extraction_s = time.perf_counter() - start
    os.environ["ICV_VLLM_DIR"] = str(vector_dir)

    from vllm import LLM

    llm = LLM(args.model, max_model_len=args.max_model_len, seed=0, disable_log_stats=False,  # per-request metrics
              enable_prefix_caching=not args.no_prefix_caching)
    tokenizer = llm.get_tokenizer()
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    block_size = llm.llm_engine.vllm_config.cache_config.block_size  # prefix cache granularity
    results = timed_batches(llm, plugin_ways(pairs, counts, args.scale), args, tokenizer)
    del llm
    in_turns = turns_phase(args, counts, vector_dir) if args.turn_runs else {}

    lora_note = ""
    if args.lora:
        import gc
        import json
        import subprocess

        from lora_baseline import ensure_lora

        gc.collect()
        lora_dir = Path(".cache") / "lora" / f"{Path(args.model).name}-{Path(args.pairs).stem}-{counts[-1]}"
        summary = ensure_lora(args.model, pairs, lora_dir)
        phase_out = vector_dir / "lora.json"
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--phase-out", str(phase_out),
                        "--lora-dir", str(lora_dir)], env=dict(os.environ, VLLM_PLUGINS="none"), check=True)
        phase = json.loads(phase_out.read_text())
        results["lora"] = [tuple(x) for x in phase["results"]["lora"]]
        results["none (LoRA engine)"] = [tuple(x) for x in phase["results"]["none"]]
        lora_note = (f" **lora**: rank-8 adapter trained on the {counts[-1]} pairs ({summary['steps']} steps, "
                     f"{summary['train_s']:.0f} s on the CPU), served by vLLM's LoRA support in a second engine "
                     f"(plugin off; vLLM's CPU platform runs LoRA engines eagerly: compilation mode "
                     f"{phase['compilation_mode']}), timed against that engine's own unsteered batches.")

    tps = {way: [x for x, _, _ in runs] for way, runs in results.items()}
    icls = [f"icl {n}" for n in counts]
    head = "| way | output tokens/s (median) | " + " | ".join(f"vs ICL {n}" for n in counts)
    rows = [head + " | TTFT p50 ms | TTFT p95 ms | prompt tokens / request |",
            "|---|---:|" + "---:|" * len(counts) + "---:|---:|---:|"]
    names = {**{f"icl {n}": f"ICL ({n} pairs in the prompt)" for n in counts},
             "icv": f"ICV (vector from the {counts[-1]} pairs, scale {args.scale})",
             "none": "neither (query alone, reference)", "lora": f"LoRA (adapter trained on the {counts[-1]} pairs)",
             "none (LoRA engine)": "neither, in the LoRA engine"}

    def ratio(way: str, base: str) -> float:
        """Median per-batch ratio; the LoRA engine's ways go through that engine's own unsteered batches."""
        if way in ("lora", "none (LoRA engine)"):
            own = [a / b for a, b in zip(tps[way], tps["none (LoRA engine)"])]
            return statistics.median(own) * statistics.median(a / b for a, b in zip(tps["none"], tps[base]))
        return statistics.median(a / b for a, b in zip(tps[way], tps[base]))

    for way, runs in results.items():
        ttft = [t * 1000 for _, ts, _ in runs for t in ts]
        ratios = (["(LoRA's reference)"] * len(icls) if way == "none (LoRA engine)"
                  else [f"{ratio(way, base):.2f}x" for base in icls])
        rows.append(f"| {names[way]} | {statistics.median(tps[way]):.1f} | " + " | ".join(ratios)
                    + f" | {percentile(ttft, 50):.0f} | {percentile(ttft, 95):.0f} | {runs[0][2]:.0f} |")
    turn_rows = []
    if in_turns:
        turn_rows = ["", f"In turns: ICV's output tokens/s over another way's, the two ways run by two plugin engines "
                     f"taking turns of {args.slice_ms:g} ms (the other stopped), each counted for the time it ran "
                     f"(benchmarks/turns.py); {args.turn_runs} runs per row, which engine runs which way and which "
                     f"starts alternating, fresh queries each run.", "",
                     "| ICV vs | ratio per run (sorted) | median |", "|---|---|---:|"]
        turn_rows += [f"| {names[base]} | {', '.join(f'{x:.2f}' for x in sorted(values))} | "
                      f"**{statistics.median(values):.2f}x** |" for base, values in in_turns.items()]

    def goal_ratio(n: int) -> float:
        return statistics.median(in_turns[f"icl {n}"]) if in_turns else ratio("icv", f"icl {n}")

    verdicts = [f"{n} pairs: {'met' if goal_ratio(n) >= GOAL else 'not met'} ({goal_ratio(n):.3f}x)" for n in counts]
    caching = "off" if args.no_prefix_caching else (
        f"on (vLLM default): every ICL prompt's demonstrations are a shared prefix, cached in full "
        f"{block_size}-token blocks after the warm-up")
    text = "\n".join([
        f"Model {Path(args.model).name}, CPU, vLLM's defaults (compiled, chunked prefill, max_num_seqs "
        f"{scheduler.max_num_seqs}, max_num_batched_tokens {scheduler.max_num_batched_tokens}); prefix caching "
        f"{caching}. Pairs: the first N of {args.pairs}; {args.concurrency} distinct rude sentences per batch "
        f"sent at once; greedy, ignore_eos, {args.max_tokens} output tokens each; {args.repeats} timed batches "
        f"per way (after one warm-up batch each).{lora_note}", "", *rows, *turn_rows, "",
        f"Goal: ICV >= {GOAL:g}x ICL output tokens/s{' (in turns)' if in_turns else ''}: " + "; ".join(verdicts) + ". "
        f"One-off extraction of the vector: {extraction_s:.1f} s. Total run {time.perf_counter() - t0:.0f} s."])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
