"""Serving cost of in-context learning vs an in-context vector, in one run.

The same model and the same demonstration pairs (--pairs) used two ways:
  icl    the pairs as chat turns before each query (as benchmarks/quality.py
         builds them): every request carries the demonstrations
  icv    the pairs extracted once into a vector (icv_vllm.vectors.extract_icv),
         selected per request ("task:--scale"); the prompt is the query alone
  none   the query alone, unsteered (reference)
Queries: --concurrency distinct rude sentences per batch (the 8 held-out
sentences of quality.py, each addressed to --concurrency/8 different names,
a fresh set of names per timed batch, so no query is ever in the prefix
cache; the demonstrations are, after the warm-up, as they would be in a
server). All of a batch's requests go to the engine at once (one
LLM.generate); greedy, ignore_eos, --max-tokens each, so every way makes the
same number of tokens. Warm-up: one batch per way. Then --repeats batches
per way, ways alternating; reported per way: output tokens/s (median over
batches), its ratio to ICL (median of per-batch ratios), time to first token
p50/p95 over all timed requests (vLLM's RequestOutput.metrics:
first_token_latency, from the request's arrival), prompt tokens/request.

    python benchmarks/icv_vs_icl.py --model .cache/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from quality import HELD_OUT, INSTRUCTION, chat_prompt

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", default="examples/polite.jsonl")
    parser.add_argument("--scale", type=float, default=0.04)
    parser.add_argument("--concurrency", type=int, default=64, help="requests per batch, sent at once")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per way")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="turn vLLM's prefix cache off (ICL then prefills its demonstrations every time)")
    parser.add_argument("--out", default="benchmarks/results/icv_vs_icl.md")
    args = parser.parse_args()
    t0 = time.perf_counter()

    from icv_vllm.vectors import extract_icv
    from icv_vllm.vectors.pairs import read_pairs_jsonl

    pairs = read_pairs_jsonl(args.pairs)
    vector_dir = Path(tempfile.mkdtemp(prefix="icv-vs-icl-"))
    start = time.perf_counter()
    extract_icv(args.model, pairs, progress=False).save(vector_dir / "task.safetensors")
    extraction_s = time.perf_counter() - start
    os.environ["ICV_VLLM_DIR"] = str(vector_dir)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # CPU: else a fraction of all memory
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # see benchmarks/throughput.py

    from vllm import LLM, SamplingParams

    llm = LLM(args.model, max_model_len=2048, seed=0, disable_log_stats=False,  # per-request metrics
              enable_prefix_caching=not args.no_prefix_caching)
    tokenizer = llm.get_tokenizer()
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    block_size = llm.llm_engine.vllm_config.cache_config.block_size  # prefix cache granularity

    def chat(turns: list[tuple[str, str]], final: str) -> str:
        return chat_prompt(tokenizer, turns, final)

    demos = [(INSTRUCTION.format(p.input), p.target) for p in pairs]
    ways = {"icl": (demos, None), "icv": ([], f"task:{args.scale}"), "none": ([], None)}

    def run(way: str, batch: int) -> tuple[float, list[float], float]:
        """One batch: (output tokens/s, TTFT per request in s, mean prompt tokens)."""
        turns, spec = ways[way]
        prompts = [chat(turns, INSTRUCTION.format(q)) for q in queries(batch, args.concurrency)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                                extra_args={"icv": spec} if spec else None)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        if any(o.metrics is None for o in outs):
            raise RuntimeError("RequestOutput.metrics is None: this vLLM does not report per-request stats")
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return (tokens / elapsed, [o.metrics.first_token_latency for o in outs],
                sum(len(o.prompt_token_ids) for o in outs) / len(outs))

    for way in ways:  # warm-up: compiles, loads the vector, caches the demonstrations
        run(way, 0)
    icl_ids = [tokenizer.encode(chat(demos, INSTRUCTION.format(q))) for q in queries(0, 2)]
    shared = next(i for i, (a, b) in enumerate(zip(*icl_ids)) if a != b)  # tokens all ICL prompts share
    results: dict[str, list[tuple[float, list[float], float]]] = {w: [] for w in ways}
    for r in range(args.repeats):
        for way in ways if r % 2 == 0 else list(ways)[::-1]:
            results[way].append(run(way, r + 1))
            print(f"batch {r + 1} {way}: {results[way][-1][0]:.1f} output tokens/s", flush=True)

    icl_tps = [tps for tps, _, _ in results["icl"]]
    rows = ["| way | output tokens/s (median) | vs ICL (median of per-batch ratios) | TTFT p50 ms | "
            "TTFT p95 ms | prompt tokens / request |", "|---|---:|---:|---:|---:|---:|"]
    names = {"icl": f"ICL ({len(pairs)} pairs in the prompt)", "icv": f"ICV (vector, scale {args.scale})",
             "none": "neither (query alone, reference)"}
    for way, runs in results.items():
        tps = [x for x, _, _ in runs]
        ratio = statistics.median(a / b for a, b in zip(tps, icl_tps))
        ttft = [t * 1000 for _, ts, _ in runs for t in ts]
        rows.append(f"| {names[way]} | {statistics.median(tps):.1f} | {ratio:.2f}x | "
                    f"{percentile(ttft, 50):.0f} | {percentile(ttft, 95):.0f} | {runs[0][2]:.0f} |")
    ratio = statistics.median(a / b for a, b in zip((x for x, _, _ in results["icv"]), icl_tps))
    caching = "off" if args.no_prefix_caching else (
        f"on (vLLM default): the ICL prompts share their first {shared} tokens, of which the full "
        f"{block_size}-token blocks are cached after the warm-up")
    text = "\n".join([
        f"Model {Path(args.model).name}, CPU, vLLM's defaults (compiled, chunked prefill, max_num_seqs "
        f"{scheduler.max_num_seqs}, max_num_batched_tokens {scheduler.max_num_batched_tokens}); prefix caching "
        f"{caching}. {len(pairs)} pairs from {args.pairs}; {args.concurrency} distinct rude sentences per batch "
        f"sent at once; greedy, ignore_eos, {args.max_tokens} output tokens each; {args.repeats} timed batches "
        f"per way (after one warm-up batch each).", "", *rows, "",
        f"Goal: ICV >= {GOAL:g}x ICL output tokens/s: {'met' if ratio >= GOAL else 'not met'} ({ratio:.2f}x). "
        f"One-off extraction of the vector: {extraction_s:.1f} s. Total run {time.perf_counter() - t0:.0f} s."])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
