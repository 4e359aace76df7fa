"""The LoRA baseline of the paper: a low-rank adapter fine-tuned with `peft` on
the same demonstration pairs an ICV is extracted from, served by vLLM's own
LoRA support (``LLM(enable_lora=True)`` + ``LoRARequest``).

Training (CPU, minutes at most for the demo models): each pair becomes one chat
exchange, the user turn ``quality.INSTRUCTION`` applied to the pair's input
(the prompt every way of the quality benchmarks asks) and the assistant turn its
target (for a base model, prompted in plain text: the prompt, then the target
and the newline that ends its line); the loss is on the target's tokens only.
Every linear projection of the decoder layers gets an adapter (rank --rank, alpha 2 x rank), trained with AdamW
for max(--epochs passes over the pairs, --min-steps steps) in batches of
--batch-size, so a handful of pairs still gets a useful number of steps. The
adapter folder (adapter_config.json + adapter_model.safetensors) is what vLLM's
LoRARequest loads.

    .venv/bin/python benchmarks/lora_baseline.py --model .cache/models/SmolLM2-135M-Instruct \\
        --pairs examples/polite.jsonl --out .cache/lora/SmolLM2-135M-Instruct/polite-5

Needs `peft` (benchmarks/requirements-quality.txt lists it; it is not an install
requirement of the plugin).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from quality import INSTRUCTION, chat_prompt, completion_prompt

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class LoraRecipe:
    rank: int = 8
    epochs: int = 3
    min_steps: int = 30
    batch_size: int = 8
    lr: float = 5e-4
    dropout: float = 0.05
    seed: int = 0


def training_examples(tokenizer, pairs, style: str = "chat") -> list[tuple[list[int], int]]:
    """(token ids of prompt + target + end-of-turn token, number of prompt tokens) per pair,
    tokenized as vLLM tokenizes a text prompt (the tokenizer's own special tokens). style is
    quality.prompt_style's: "completion" ends the target with the newline where inference stops."""
    if style == "completion":
        return [completion_example(tokenizer, pair) for pair in pairs]
    examples = []
    for pair in pairs:
        prompt = chat_prompt(tokenizer, [], INSTRUCTION.format(pair.input))
        exchange = chat_prompt(tokenizer, [(INSTRUCTION.format(pair.input), pair.target)], "")
        end = exchange.index(pair.target, len(prompt) - 1) + len(pair.target)
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(exchange[:end])["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template tokenizes the prompt differently inside the exchange")
        # the template's end-of-turn token (<|im_end|>, <end_of_turn>, ...) closes the answer, as at inference
        after = tokenizer(exchange[end:], add_special_tokens=False)["input_ids"]
        end_of_turn = after[0] if after and after[0] in tokenizer.all_special_ids else tokenizer.eos_token_id
        examples.append((ids + [end_of_turn], len(prompt_ids)))
    return examples


def completion_example(tokenizer, pair) -> tuple[list[int], int]:
    prompt = completion_prompt([], INSTRUCTION.format(pair.input))
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(f"{prompt} {pair.target}\n")["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the tokenizer splits the prompt differently once the answer follows it")
    return ids, len(prompt_ids)


def train_lora(model_dir: str | Path, pairs, out_dir: str | Path, recipe: LoraRecipe = LoraRecipe(),
               style: str = "chat") -> dict:
    """Trains an adapter on the pairs (prompted in quality.prompt_style's style), saves it to out_dir
    (a vLLM-loadable folder); returns a summary."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=recipe.rank, lora_alpha=2 * recipe.rank, lora_dropout=recipe.dropout,
                        target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    examples = training_examples(tokenizer, pairs, style)
    per_epoch = math.ceil(len(examples) / recipe.batch_size)
    steps = max(recipe.epochs * per_epoch, recipe.min_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        if len(order) < recipe.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[i] for i in order[: recipe.batch_size]]
        del order[: recipe.batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    summary = {"pairs": len(examples), "steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
               "train_s": time.perf_counter() - start, "recipe": asdict(recipe), "prompt_style": style,
               "target_modules": TARGET_MODULES}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def ensure_lora(model_dir: str | Path, pairs, out_dir: str | Path, recipe: LoraRecipe = LoraRecipe(),
                style: str = "chat") -> dict:
    """The adapter in out_dir, trained unless one from the same pairs, recipe and prompt style is
    already there."""
    out_dir = Path(out_dir)
    done = out_dir / "training.json"
    if done.exists() and (out_dir / "adapter_model.safetensors").exists():
        summary = json.loads(done.read_text())
        if (summary["pairs"] == len(pairs) and summary["recipe"] == asdict(recipe)
                and summary.get("prompt_style", "chat") == style):
            return summary
    return train_lora(model_dir, pairs, out_dir, recipe, style)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", required=True, help="JSONL of {input, target}")
    parser.add_argument("--num-pairs", type=int, default=0, help="the first N pairs (0: all)")
    parser.add_argument("--out", required=True, help="adapter folder to write")
    parser.add_argument("--rank", type=int, default=LoraRecipe.rank)
    parser.add_argument("--epochs", type=int, default=LoraRecipe.epochs)
    parser.add_argument("--min-steps", type=int, default=LoraRecipe.min_steps)
    parser.add_argument("--batch-size", type=int, default=LoraRecipe.batch_size)
    parser.add_argument("--lr", type=float, default=LoraRecipe.lr)
    parser.add_argument("--prompt-style", choices=["chat", "completion"], default="chat",
                        help="completion: plain-text prompts, for a base model")
    args = parser.parse_args()
    from icv_vllm.vectors import read_pairs_jsonl

    pairs = read_pairs_jsonl(args.pairs)[: args.num_pairs or None]
    recipe = LoraRecipe(rank=args.rank, epochs=args.epochs, min_steps=args.min_steps, batch_size=args.batch_size,
                        lr=args.lr)
    print(json.dumps(train_lora(args.model, pairs, args.out, recipe, args.prompt_style), indent=1))


if __name__ == "__main__":
    main()
