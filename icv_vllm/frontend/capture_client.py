"""Residual streams from the running engine, for in-server extraction.

Each text becomes an ordinary one-token request carrying a one-use capture
id (``CAPTURE_IDS``: admission accepts the capture key only with an id this
process issued, so no client can set it); the workers record, at its last
prompt token, every decoder layer's full output (MLP output + residual) and
the embedding of that token, and one collective RPC collects them. No second
copy of the model is loaded, and the requests are scheduled like any other.

Requests go in waves of at most ``WAVE`` so that live traffic interleaves
(hundreds submitted at once would queue every later client behind them), and
each wave's captures are collected before the next, which bounds what the
workers hold. Cancelling the caller aborts the wave's requests (vLLM aborts a
request whose ``generate`` is cancelled) and drops what was captured.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import torch

from ..protocol import CAPTURE_EXTRA_ARGS_KEY, CAPTURE_RPC_METHOD
from .admission import CAPTURE_IDS

REQUEST_ID_PREFIX = "icv-capture-"  # cosmetic (logs); the capture id is what authorises
WAVE = 10**6
# Collecting a cancelled wave's leftovers is best effort: the engine may be shutting down.
CLEANUP_TIMEOUT_S = 2.0


async def _run_one(engine_client: Any, capture_id: str, ids: list[int]) -> None:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={CAPTURE_EXTRA_ARGS_KEY: capture_id})
    async for _ in engine_client.generate({"prompt_token_ids": ids}, params, f"{REQUEST_ID_PREFIX}{capture_id}"):
        pass


async def _take(engine_client: Any, capture_ids: list[str]) -> dict:
    per_worker = await engine_client.collective_rpc(CAPTURE_RPC_METHOD, args=(capture_ids,))
    return per_worker[0]  # every tensor-parallel rank holds the same full streams


async def _wave(engine_client: Any, token_id_lists: list[list[int]]) -> list:
    capture_ids = [CAPTURE_IDS.issue(True) for _ in token_id_lists]
    try:
        async with asyncio.TaskGroup() as group:  # one failure cancels (aborts) the rest
            for capture_id, ids in zip(capture_ids, token_id_lists):
                group.create_task(_run_one(engine_client, capture_id, ids))
    except BaseException:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(_take(engine_client, capture_ids), CLEANUP_TIMEOUT_S)
        raise
    captured = await _take(engine_client, capture_ids)
    missing = [c for c in capture_ids if c not in captured]
    if missing:
        raise RuntimeError(f"the workers captured {len(capture_ids) - len(missing)} of {len(capture_ids)} texts")
    return [captured[c] for c in capture_ids]


async def capture_residual_streams(engine_client: Any, token_id_lists: list[list[int]],
                                   wave: int = WAVE) -> torch.Tensor:
    """[N, L+1, D] fp32: for each prompt, row 0 is the last token's embedding
    and row l+1 the residual stream after decoder layer l, at that token."""
    if not token_id_lists or any(len(ids) == 0 for ids in token_id_lists):
        raise ValueError("every text must tokenize to at least one token")
    rows = []
    for start in range(0, len(token_id_lists), wave):
        rows.extend(await _wave(engine_client, token_id_lists[start:start + wave]))
    return torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rows])
