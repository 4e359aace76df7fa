"""ICV vs in-context learning vs nothing, on one style task, in one run.

Task (the paper's detoxification setting, small): rewrite held-out rude
sentences politely. Three ways, same model, same greedy decoding:
  none   the instruction alone
  icl    the instruction preceded by the demonstration pairs (what ICL pays
         for in prompt tokens on every request)
  icv    the instruction alone, steered by the vector extracted from the same
         pairs, at each --scale
Reported per way: a politeness score from a small lexicon (polite markers
minus rude markers per output; crude, but the same judge for every way), the
fraction of outputs that repeat the rude words of their input, mean prompt
tokens per request, and output tokens/s. Writes a markdown table.

    python benchmarks/quality.py --model .cache/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

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
POLITE = ["please", "thank", "sorry", "could you", "would you", "kindly", "appreciate", "may i",
          "excuse me", "if you don't mind", "i understand"]
RUDE = ["stupid", "idiot", "dumb", "fool", "moron", "garbage", "useless", "shut up", "get lost",
        "lazy", "deaf", "annoying"]
INSTRUCTION = "Rewrite this sentence: {}"



def chat_prompt(tokenizer, turns: list[tuple[str, str]], final: str) -> str:
    """``final`` as the last user turn after ``turns`` (demonstrations as
    user/assistant pairs: how the ICL way puts the pairs in the prompt)."""
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": final})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

def politeness(text: str) -> int:
    t = text.lower()
    return sum(t.count(w) for w in POLITE) - sum(t.count(w) for w in RUDE)


def repeats_rude(source: str, text: str) -> bool:
    rude_in_source = {w for w in RUDE if w in source.lower()}
    return any(w in text.lower() for w in rude_in_source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", default="examples/polite.jsonl")
    parser.add_argument("--scale", type=float, nargs="+", default=[0.02, 0.04, 0.06])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/quality.md")
    args = parser.parse_args()

    from icv_vllm.vectors import extract_icv
    from icv_vllm.vectors.pairs import read_pairs_jsonl

    pairs = read_pairs_jsonl(args.pairs)
    vector_dir = Path(tempfile.mkdtemp(prefix="icv-quality-"))
    extract_icv(args.model, pairs, progress=False).save(vector_dir / "task.safetensors")
    os.environ["ICV_VLLM_DIR"] = str(vector_dir)
    # on the CPU backend the KV cache otherwise claims a fraction of all memory
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm import LLM, SamplingParams

    llm = LLM(args.model, max_model_len=2048, seed=0)
    tokenizer = llm.get_tokenizer()

    def chat(turns: list[tuple[str, str]], final: str) -> str:
        return chat_prompt(tokenizer, turns, final)

    demos = [(INSTRUCTION.format(p.input), p.target) for p in pairs]
    ways: list[tuple[str, list[str], str | None]] = [
        ("none", [chat([], INSTRUCTION.format(s)) for s in HELD_OUT], None),
        ("icl", [chat(demos, INSTRUCTION.format(s)) for s in HELD_OUT], None),
    ] + [(f"icv {scale}", [chat([], INSTRUCTION.format(s)) for s in HELD_OUT], f"task:{scale}")
         for scale in args.scale]
    rows = ["| way | politeness (mean) | repeats rude words | prompt tokens / request | output tokens/s |",
            "|---|---|---|---|---|"]
    samples = []
    for name, prompts, spec in ways:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                extra_args={"icv": spec} if spec else None)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        texts = [o.outputs[0].text for o in outs]
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs) / len(outs)
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        score = sum(map(politeness, texts)) / len(texts)
        rude = sum(repeats_rude(s, t) for s, t in zip(HELD_OUT, texts)) / len(texts)
        rows.append(f"| {name} | {score:.2f} | {rude:.0%} | {prompt_tokens:.0f} | {out_tokens / elapsed:.1f} |")
        samples.append(f"- **{name}**: {texts[0].strip()[:160]!r}")
    text = "\n".join([f"Model {Path(args.model).name}, {len(pairs)} pairs from {args.pairs}, "
                      f"{len(HELD_OUT)} held-out sentences, greedy, {args.max_tokens} tokens.", "", *rows,
                      "", f"First held-out sentence ({HELD_OUT[0]!r}):", *samples])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
