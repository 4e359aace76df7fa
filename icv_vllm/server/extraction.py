"""In-server extraction: demonstration pairs -> ICV with the engine already loaded.

Same steps as the offline ``icv-vllm extract`` (``vectors.extraction``), so
both give the same vector for the same model and pairs: clean each text as
the authors do, tokenize it alone with the tokenizer's default special tokens
(here the engine's own tokenizer), take the residual streams at the last
token (here computed by the running engine, batched with live traffic),
difference target - input, then ``icv_from_streams``. No second copy of
the model is loaded.

Serving comes first: sizes are checked before any tokenizing, tokenizing and
the PCA run in threads (the event loop serves everyone else), and the
capture requests go to the engine in small waves (``capture_client``).
"""

from __future__ import annotations

import asyncio
import copy
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from ..spec import ICVSpecError, validate_name
from ..vectors.pairs import DemoPair, PairsError, extraction_texts, pairs_from_records
from .errors import ICVHTTPError
from .vllm_hooks import check_data_parallel_routing, engine_tokenizer

METHODS = ("pca", "mean")
# Bound one request's work, checked before anything is tokenized:
# demonstrations are sentences, and 1M characters tokenize in about a second.
MAX_PAIRS = 512
MAX_TEXT_CHARS = 16384
MAX_TOTAL_CHARS = 1_000_000
CREATE_KEYS = ("name", "pairs", "method", "overwrite")


def check_captures_possible(engine_client: Any, what: str) -> None:
    """Before any forward pass: under data parallelism the captures are routed
    to one engine core (``capture_client``), through a vLLM parameter checked here."""
    from ..frontend.capture_client import several_engines

    if several_engines(engine_client):
        check_data_parallel_routing(engine_client, what)


@dataclass(frozen=True)
class CreateRequest:
    name: str
    pairs: list[DemoPair]
    method: str
    overwrite: bool


def parse_create_body(body: object) -> CreateRequest:
    """Validate a ``POST /v1/icv`` body; every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise ICVHTTPError(400, 'body must be a JSON object {"name", "pairs", "method"?, "overwrite"?}')
    unknown = sorted(set(body) - set(CREATE_KEYS))
    if unknown:
        raise ICVHTTPError(400, f"unknown field {', '.join(map(repr, unknown))}; "
                                f"allowed: {', '.join(CREATE_KEYS)}", unknown[0])
    if "name" not in body:
        raise ICVHTTPError(400, "name is required", "name")
    try:
        name = validate_name(body["name"])
    except ICVSpecError as e:
        raise ICVHTTPError(400, str(e), "name") from None
    if "pairs" not in body:
        raise ICVHTTPError(400, 'pairs is required: a list of {"input": ..., "target": ...}', "pairs")
    try:
        pairs = pairs_from_records(body["pairs"])
    except PairsError as e:
        raise ICVHTTPError(400, str(e), "pairs") from None
    if len(pairs) > MAX_PAIRS:
        raise ICVHTTPError(400, f"at most {MAX_PAIRS} pairs per request, got {len(pairs)}", "pairs")
    _check_sizes(pairs)
    method = body.get("method", "pca")
    if method not in METHODS:
        raise ICVHTTPError(400, f"method must be one of {', '.join(METHODS)}, got {method!r}", "method")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ICVHTTPError(400, f"overwrite must be true or false, got {overwrite!r}", "overwrite")
    return CreateRequest(name, pairs, method, overwrite)


def _check_sizes(pairs: list[DemoPair]) -> None:
    total = 0
    for pair in pairs:
        for key in ("input", "target"):
            size = len(getattr(pair, key))
            if size > MAX_TEXT_CHARS:
                raise ICVHTTPError(400, f"{pair.where}.{key} is {size} characters; at most "
                                        f"{MAX_TEXT_CHARS} per text", "pairs")
            total += size
    if total > MAX_TOTAL_CHARS:
        raise ICVHTTPError(400, f"the pairs hold {total} characters; at most {MAX_TOTAL_CHARS} "
                                "per request", "pairs")


def cleaned_texts(pairs: list[DemoPair]) -> list[str]:
    """Inputs then targets, cleaned as the offline extractor does."""
    try:
        inputs, targets = extraction_texts(pairs)
    except PairsError as e:
        raise ICVHTTPError(400, str(e), "pairs") from None
    return inputs + targets


def tokenize(tokenizer: Any, texts: list[str], pairs: list[DemoPair], max_model_len: int) -> list[list[int]]:
    ids = [list(tokenizer(text)["input_ids"]) for text in texts]
    n = len(pairs)
    for i, token_ids in enumerate(ids):
        where = f"{pairs[i % n].where}.{'input' if i < n else 'target'}"
        if not token_ids:
            raise ICVHTTPError(400, f"{where} has no tokens", "pairs")
        if len(token_ids) >= max_model_len:
            raise ICVHTTPError(
                400, f"{where} is {len(token_ids)} tokens; the served model takes fewer than "
                     f"{max_model_len} (--max-model-len)", "pairs")
    return ids


_private_tokenizers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_private_lock = threading.Lock()


def private_tokenizer(engine_client: Any) -> Any:
    """A copy of the engine's tokenizer for this module's threads: Hugging Face
    fast tokenizers change their truncation state per call and refuse
    concurrent use ("Already borrowed") with vLLM's own tokenizing thread."""
    with _private_lock:
        tokenizer = _private_tokenizers.get(engine_client)
        if tokenizer is None:
            tokenizer = copy.deepcopy(engine_tokenizer(engine_client))
            _private_tokenizers[engine_client] = tokenizer
        return tokenizer


def _tokenize_all(engine_client: Any, request: CreateRequest, max_model_len: int) -> list[list[int]]:
    texts = cleaned_texts(request.pairs)
    return tokenize(private_tokenizer(engine_client), texts, request.pairs, max_model_len)


async def extract_in_server(engine_client: Any, request: CreateRequest):
    """The ICV of ``request.pairs`` computed by the running engine."""
    import torch

    from ..frontend.capture_client import capture_residual_streams
    from ..vectors.extraction import icv_from_streams
    from ..vectors.vector import ICVector

    model_config = engine_client.vllm_config.model_config
    ids = await asyncio.to_thread(_tokenize_all, engine_client, request, model_config.max_model_len)
    streams: torch.Tensor = await capture_residual_streams(engine_client, ids)
    tensor = await asyncio.to_thread(icv_from_streams, streams, request.method)
    return ICVector(tensor, model=str(model_config.model), method=request.method,
                    num_pairs=len(request.pairs))
