"""Residual streams from the running engine, for in-server extraction.

Each text becomes an ordinary one-token request carrying a one-use capture
id (``CAPTURE_IDS``: admission accepts the capture key only with an id this
process issued, so no client can set it); the workers record, at its last
prompt token, every decoder layer's full output (MLP output + residual) and
the embedding of that token, and collective RPCs collect them. No second
copy of the model is loaded, and the requests are scheduled like any other.

At most ``WINDOW`` capture requests are in the engine at once, so live
traffic interleaves: the scheduler is first come, first served, and hundreds
submitted at once would queue every later client behind all of them. A
sliding window (not lock-step waves) keeps the engine's batches full.
Finished captures are collected every ``COLLECT_EVERY``, which bounds what
the workers hold. Cancelling the caller aborts the requests in flight (vLLM
aborts a request whose ``generate`` is cancelled), starts no more, and
collects what the finished ones left behind.

Under data parallelism this API server feeds several engine cores, and each
records only the captures it ran. vLLM's collective RPC asks every engine and
answers with the first one's result, so every capture request is routed to
that same first engine (``data_parallel_rank=0``: the index among this
client's engines) and the other engines answer the RPC with nothing instead
of refusing ids they never saw. A capture that no engine returns is still an
error (the final check below).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import torch

from ..protocol import CAPTURE_EXTRA_ARGS_KEY, CAPTURE_RPC_METHOD
from .admission import CAPTURE_IDS

REQUEST_ID_PREFIX = "icv-capture-"  # cosmetic (logs); the capture id is what authorises
WINDOW = 8
COLLECT_EVERY = 64
# Collecting a cancelled extraction's leftovers is best effort: the engine may be shutting down.
CLEANUP_TIMEOUT_S = 2.0


def several_engines(engine_client: Any) -> bool:
    """Whether this API server may feed more than one engine core (data parallelism)."""
    parallel = engine_client.vllm_config.parallel_config
    return int(getattr(parallel, "data_parallel_size", 1) or 1) > 1


async def _run_one(engine_client: Any, capture_id: str, ids: list[int], pinned: bool) -> None:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={CAPTURE_EXTRA_ARGS_KEY: capture_id})
    async for _ in engine_client.generate({"prompt_token_ids": ids}, params, f"{REQUEST_ID_PREFIX}{capture_id}",
                                          data_parallel_rank=0 if pinned else None):
        pass


async def _take(engine_client: Any, capture_ids: list[str], pinned: bool) -> dict:
    # pinned: the engines that did not run the captures answer {} (the first engine's answer is ours)
    per_worker = await engine_client.collective_rpc(CAPTURE_RPC_METHOD, args=(capture_ids, pinned))
    return per_worker[0]  # every tensor-parallel rank holds the same full streams


async def capture_residual_streams(engine_client: Any, token_id_lists: list[list[int]],
                                   window: int = WINDOW, collect_every: int = COLLECT_EVERY) -> torch.Tensor:
    """[N, L+1, D] fp32: for each prompt, row 0 is the last token's embedding
    and row l+1 the residual stream after decoder layer l, at that token."""
    if not token_id_lists or any(len(ids) == 0 for ids in token_id_lists):
        raise ValueError("every text must tokenize to at least one token")
    capture_ids = [CAPTURE_IDS.issue(True) for _ in token_id_lists]
    pinned = several_engines(engine_client)
    slots = asyncio.Semaphore(window)
    rows: dict[str, Any] = {}
    uncollected: list[str] = []  # finished, still in the workers

    async def collect() -> None:
        batch = uncollected[:]
        del uncollected[:]
        rows.update(await _take(engine_client, batch, pinned))

    async def run(capture_id: str, ids: list[int]) -> None:
        async with slots:
            await _run_one(engine_client, capture_id, ids, pinned)
        uncollected.append(capture_id)
        if len(uncollected) >= collect_every:
            await collect()

    try:
        async with asyncio.TaskGroup() as group:  # one failure cancels (aborts) the rest
            for capture_id, ids in zip(capture_ids, token_id_lists):
                group.create_task(run(capture_id, ids))
    except BaseException as e:
        # the workers refuse to hand out ids they never recorded: ask only for finished ones
        if uncollected:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(collect(), CLEANUP_TIMEOUT_S)
        if isinstance(e, BaseExceptionGroup):  # the failing request's own error, not the group's
            raise e.exceptions[0] from None
        raise
    if uncollected:
        await collect()
    missing = [c for c in capture_ids if c not in rows]
    if missing:
        raise RuntimeError(f"the workers returned {len(capture_ids) - len(missing)} of {len(capture_ids)} captures")
    return torch.stack([torch.as_tensor(rows[c], dtype=torch.float32) for c in capture_ids])
