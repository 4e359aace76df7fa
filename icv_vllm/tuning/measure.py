"""Measuring a λ sweep with a running vLLM engine (``AsyncLLM`` offline in
``icv-vllm tune``, the API server's engine client in ``POST
/v1/icv/{name}/tune``): the same code, so both give the same table.

Three passes, all ordinary requests scheduled with any other traffic, at most
``window`` in the engine at once:

1. **generate**: each prompt (the tokenizer's chat template when it has one,
   else the text with the default special tokens), greedy, up to
   ``max_tokens``, unsteered (λ = 0) and steered with ``name:λ`` for each λ;
2. **fluency**: each output scored by the *unsteered* model: prompt + output
   as one prompt with ``prompt_logprobs=0``, the log-probabilities of the
   output's tokens (the ending EOS too, when the model stopped by itself);
3. **effect**: each output's text read alone by the *unsteered* model, as
   extraction reads a demonstration (punctuation removed as the authors do,
   the tokenizer's default special tokens, no template; in-server captures):
   the residual stream after each decoder layer at the last token, projected
   on that layer's unit direction ``v_l/|v_l|`` and averaged over layers.
   That is the quantity the vector was built from (it is the mean difference
   of exactly such streams), so a larger value means an output that reads
   more like the demonstrations' targets. An output with no text left after
   cleaning gives no effect sample.

Cancelling the caller aborts every request in flight (``TaskGroup``).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Sequence

from .sweep import Measurement, TuningError, mean_projection, pooled_perplexity

DEFAULT_WINDOW = 16


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A user turn with the generation prompt when the tokenizer has a chat
    template; otherwise the text itself with the default special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _prompts_ids(tokenizer: Any, prompts: Sequence[str], max_tokens: int, max_model_len: int) -> list[list[int]]:
    out = []
    for i, prompt in enumerate(prompts):
        ids = prompt_token_ids(tokenizer, prompt)
        if not ids:
            raise TuningError(f"prompts[{i}] has no tokens")
        if len(ids) + max_tokens >= max_model_len:
            raise TuningError(f"prompts[{i}] is {len(ids)} tokens; with max_tokens {max_tokens} it must stay "
                              f"under the model's {max_model_len} (--max-model-len)")
        out.append(ids)
    return out


def _effect_ids(tokenizer: Any, texts: Sequence[str], max_model_len: int) -> list[list[int] | None]:
    from ..vectors.pairs import clean_demonstration_text

    out: list[list[int] | None] = []
    for text in texts:
        cleaned = clean_demonstration_text(text)
        ids = list(tokenizer(cleaned)["input_ids"]) if cleaned else []
        out.append(ids if 0 < len(ids) < max_model_len else None)
    return out


async def _final(engine_client: Any, prompt_ids: list[int], params: Any, request_id: str) -> Any:
    final = None
    async for output in engine_client.generate({"prompt_token_ids": prompt_ids}, params, request_id):
        final = output
    if final is None or not final.finished:
        raise RuntimeError(f"request {request_id} ended without a final output")
    reason = getattr(final.outputs[0], "finish_reason", None) if final.outputs else "no output"
    if reason not in ("stop", "length"):  # e.g. "error": the engine could not run it as asked
        raise RuntimeError(f"request {request_id} ended with finish reason {reason!r}; the sweep cannot use it")
    return final


async def _run_all(calls: list, window: int) -> list:
    """Run coroutine factories with at most ``window`` at once; one failure cancels the rest."""
    slots = asyncio.Semaphore(window)
    results: list = [None] * len(calls)

    async def run(i: int) -> None:
        async with slots:
            results[i] = await calls[i]()

    try:
        async with asyncio.TaskGroup() as group:
            for i in range(len(calls)):
                group.create_task(run(i))
    except BaseExceptionGroup as e:  # the failing request's own error
        raise e.exceptions[0] from None
    return results


async def measure_sweep(engine_client: Any, name: str, vector, prompts: Sequence[str], scales: Sequence[float],
                        max_tokens: int, *, window: int = DEFAULT_WINDOW,
                        tokenizer: Any = None) -> tuple[Measurement, list[Measurement]]:
    """The baseline (λ = 0) and one measurement per λ in ``scales`` for vector
    ``name`` (whose tensor ``vector`` [L, D] gives the effect's directions)."""
    from vllm import SamplingParams

    from ..frontend.capture_client import capture_residual_streams
    from ..protocol import EXTRA_ARGS_KEY

    if tokenizer is None:
        from ..server.extraction import private_tokenizer

        tokenizer = private_tokenizer(engine_client)
    max_model_len = int(engine_client.vllm_config.model_config.max_model_len)
    prompt_ids = await asyncio.to_thread(_prompts_ids, tokenizer, prompts, max_tokens, max_model_len)
    tag = f"icv-tune-{secrets.token_hex(4)}"
    all_scales = (0.0, *scales)
    jobs = [(s, p) for s in range(len(all_scales)) for p in range(len(prompts))]

    def generate(j: int):
        s, p = jobs[j]
        scale = all_scales[s]
        extra = {EXTRA_ARGS_KEY: f"{name}:{scale!r}"} if scale else None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra)
        return lambda: _final(engine_client, prompt_ids[p], params, f"{tag}-gen-{j}")

    generated = await _run_all([generate(j) for j in range(len(jobs))], window)
    outputs = [(list(g.outputs[0].token_ids), g.outputs[0].text) for g in generated]

    score_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    scored_jobs = [j for j, (ids, _) in enumerate(outputs) if ids]

    def score(j: int):
        ids = prompt_ids[jobs[j][1]] + outputs[j][0]
        return lambda: _final(engine_client, ids, score_params, f"{tag}-score-{j}")

    scored = await _run_all([score(j) for j in scored_jobs], window)
    logprobs: dict[int, list[float]] = {}
    for j, result in zip(scored_jobs, scored):
        start = len(prompt_ids[jobs[j][1]])
        entries = result.prompt_logprobs[start:]
        logprobs[j] = [entry[token].logprob for entry, token in zip(entries, outputs[j][0])]

    effect_ids = await asyncio.to_thread(_effect_ids, tokenizer, [text for _, text in outputs], max_model_len)
    read = [j for j, ids in enumerate(effect_ids) if ids is not None]
    projections: dict[int, float] = {}
    if read:
        streams = await capture_residual_streams(engine_client, [effect_ids[j] for j in read], window=window)
        for row, j in enumerate(read):
            projections[j] = mean_projection(streams[row:row + 1], vector)

    measured = []
    for s, scale in enumerate(all_scales):
        mine = [j for j in range(len(jobs)) if jobs[j][0] == s]
        try:
            ppl, tokens = pooled_perplexity(logprobs[j] for j in mine if j in logprobs)
        except TuningError:
            raise TuningError(f"every output at scale {scale:g} was empty; nothing to score") from None
        effects = [projections[j] for j in mine if j in projections]
        effect = sum(effects) / len(effects) if effects else None
        measured.append(Measurement(scale, ppl, tokens, effect, len(effects)))
    return measured[0], measured[1:]
