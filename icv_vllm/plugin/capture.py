"""Residual streams from the running engine, for in-server extraction.

Each text becomes an ordinary one-token request tagged with a capture id; the
workers record, at its last prompt token, every decoder layer's full output
(MLP output + residual) and the embedding of that token. One collective RPC
then collects them. No second copy of the model is loaded, and the requests
are batched and scheduled like any other.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import torch

from .admission import CAPTURE_EXTRA_ARGS_KEY, CAPTURE_REQUEST_ID_PREFIX

RPC_METHOD = "icv_take_captures"


async def capture_residual_streams(engine_client: Any, token_id_lists: list[list[int]]) -> torch.Tensor:
    """[N, L+1, D] fp32: for each prompt, row 0 is the last token's embedding
    and row l+1 the residual stream after decoder layer l, at that token."""
    from vllm import SamplingParams

    if not token_id_lists or any(len(ids) == 0 for ids in token_id_lists):
        raise ValueError("every text must tokenize to at least one token")
    batch = uuid.uuid4().hex
    capture_ids = [f"{batch}-{i}" for i in range(len(token_id_lists))]

    async def run_one(capture_id: str, ids: list[int]) -> None:
        params = SamplingParams(max_tokens=1, temperature=0.0,
                                extra_args={CAPTURE_EXTRA_ARGS_KEY: capture_id})
        async for _ in engine_client.generate({"prompt_token_ids": ids}, params,
                                              f"{CAPTURE_REQUEST_ID_PREFIX}{capture_id}"):
            pass

    await asyncio.gather(*(run_one(c, ids) for c, ids in zip(capture_ids, token_id_lists)))
    per_worker = await engine_client.collective_rpc(RPC_METHOD, args=(capture_ids,))
    captured = per_worker[0]  # every tensor-parallel rank holds the same full streams
    return torch.tensor([captured[c] for c in capture_ids], dtype=torch.float32)
