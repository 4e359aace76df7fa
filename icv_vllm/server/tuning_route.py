"""``POST /v1/icv/{name}/tune``: recommend a strength for a vector with the
running engine and store it as the file's ``recommended_scale``.

Body (every field optional)::

    {"prompts": [str, ...],        # default: the 16 built-in neutral prompts
     "max_ppl_increase": 0.25,     # bound on ppl(λ)/ppl(0) - 1
     "scales": [0.01, 0.02, ...],  # default: 12 values, geometric, 0.001 to 0.3
     "max_tokens": 32,             # generated per prompt, greedy
     "dry_run": false}             # true: measure and answer, store nothing

The measurements are ``tuning.measure``'s, the same as ``icv-vllm tune``'s:
steered generations, their perplexity under the unsteered model (prompt
logprobs) and the projection of their residual streams on the vector (in-server
captures), all ordinary requests batched with live traffic. The answer is the
table (``tuning.sweep.TuneResult.to_json``), ``recommended_scale`` (null when
no swept λ is within the bound: then nothing is stored and ``message`` says
why) and ``stored``. Bounded: at most ``MAX_PROMPTS`` prompts, ``MAX_SCALES``
scales, ``MAX_TUNE_TOKENS`` tokens and ``MAX_GENERATIONS`` generations per
call; cancelled (engine requests aborted, nothing stored) when the client
disconnects or the server stops. The sweep does not hold the directory's
write lock (it can take a while); the store does, and refuses with a 409 if
the file changed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from ..spec import ICVSpecError, validate_name
from ..tuning.sweep import (DEFAULT_MAX_PPL_INCREASE, DEFAULT_MAX_TOKENS, TuningError, check_bound, check_scales,
                            geometric_scales, neutral_prompts, no_recommendation_message, recommend)
from .errors import ICVHTTPError
from .state import ICVServer

logger = logging.getLogger("vllm.icv_vllm.server")

TUNE_KEYS = ("prompts", "max_ppl_increase", "scales", "max_tokens", "dry_run")
MAX_TUNE_BODY_BYTES = 1 << 20
MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 4096
MAX_SCALES = 32
MAX_TUNE_TOKENS = 256
MAX_GENERATIONS = 1024  # (scales + 1) x prompts
WINDOW = 16  # tune requests in the engine at once: live traffic interleaves


@dataclass(frozen=True)
class TuneRequest:
    prompts: list[str]
    max_ppl_increase: float
    scales: tuple[float, ...]
    max_tokens: int
    dry_run: bool


def parse_tune_body(body: object) -> TuneRequest:
    """Validate a tune body; every problem is a 400 naming the field."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ICVHTTPError(400, "body must be a JSON object (every field optional: "
                                f"{', '.join(TUNE_KEYS)})")
    unknown = sorted(set(body) - set(TUNE_KEYS))
    if unknown:
        raise ICVHTTPError(400, f"unknown field {', '.join(map(repr, unknown))}; allowed: {', '.join(TUNE_KEYS)}",
                           unknown[0])
    prompts = body.get("prompts")
    if prompts is None:
        prompts = neutral_prompts()
    elif (not isinstance(prompts, list) or not prompts
          or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise ICVHTTPError(400, "prompts must be a non-empty list of non-empty strings", "prompts")
    if len(prompts) > MAX_PROMPTS:
        raise ICVHTTPError(400, f"at most {MAX_PROMPTS} prompts, got {len(prompts)}", "prompts")
    for i, prompt in enumerate(prompts):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ICVHTTPError(400, f"prompts[{i}] is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}",
                               "prompts")
    try:
        bound = check_bound(body.get("max_ppl_increase", DEFAULT_MAX_PPL_INCREASE))
    except TuningError as e:
        raise ICVHTTPError(400, str(e), "max_ppl_increase") from None
    scales = body.get("scales")
    try:
        if scales is None:
            scales = geometric_scales()
        elif not isinstance(scales, list):
            raise TuningError(f"scales must be a list of numbers, got {type(scales).__name__}")
        else:
            if len(scales) > MAX_SCALES:
                raise TuningError(f"at most {MAX_SCALES} scales, got {len(scales)}")
            scales = check_scales(scales)
    except TuningError as e:
        raise ICVHTTPError(400, str(e), "scales") from None
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TUNE_TOKENS:
        raise ICVHTTPError(400, f"max_tokens must be an integer from 1 to {MAX_TUNE_TOKENS}, got {max_tokens!r}",
                           "max_tokens")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise ICVHTTPError(400, f"dry_run must be true or false, got {dry_run!r}", "dry_run")
    generations = (len(scales) + 1) * len(prompts)
    if generations > MAX_GENERATIONS:
        raise ICVHTTPError(400, f"{len(scales)} scales (and the unsteered baseline) on {len(prompts)} prompts "
                                f"make {generations} generations; at most {MAX_GENERATIONS} per call", "prompts")
    return TuneRequest(list(prompts), bound, tuple(scales), max_tokens, dry_run)


def _read_vector(server: ICVServer, name: str):
    """(bytes, tensor) of the ``.safetensors`` vector ``name`` the served model can use."""
    import safetensors.torch

    from ..frontend.vector_files import read_vector_bytes, vector_path
    from ..vectors.file_format import TENSOR_NAME, ICVFileError
    from .store import MAX_LISTED_FILE_BYTES
    from .vector_bytes import header_of_bytes

    entry = server.store.entry(name)  # 400 for an illegal name
    if not os.path.lexists(entry):
        if os.path.lexists(entry.with_name(f"{name}.gguf")):
            raise ICVHTTPError(400, f"{name!r} is a GGUF control vector; recommended_scale is stored in "
                                    "icv-vllm/1 files: convert it (icv-vllm convert) and tune that", "name")
        raise server.store.not_found(name)
    problem = server.problem_with(name)  # the served model's own words (shape, format, finite values)
    if problem is not None:
        raise ICVHTTPError(400, f"vector {name!r} cannot be used: {problem}", "name")
    try:
        data = read_vector_bytes(vector_path(server.directory, name), MAX_LISTED_FILE_BYTES)
        header_of_bytes(data, f"{name}.safetensors")
        tensor = safetensors.torch.load(data)[TENSOR_NAME]
    except FileNotFoundError:
        raise server.store.not_found(name) from None
    except (ICVFileError, ICVSpecError, OSError) as e:
        raise ICVHTTPError(400, f"vector {name!r} cannot be used: {server.store.hide_dir(str(e))}", "name") from None
    return entry, data, tensor


async def tune_in_server(server: ICVServer, name: str, tune: TuneRequest) -> dict:
    from vllm.exceptions import VLLMValidationError

    from ..tuning.measure import measure_sweep
    from ..tuning.storage import VectorChangedError
    from .extraction import check_captures_possible

    entry, data, tensor = await asyncio.to_thread(_read_vector, server, name)
    check_captures_possible(server.engine_client(), "in-server tuning")
    try:
        baseline, measured = await measure_sweep(server.engine_client(), name, tensor, tune.prompts, tune.scales,
                                                 tune.max_tokens, window=WINDOW)
    except TuningError as e:
        raise ICVHTTPError(400, f"cannot tune {name!r}: {e}", "prompts") from None
    except VLLMValidationError as e:  # admission refused the vector (it changed, or its pin failed)
        raise ICVHTTPError(400, f"cannot tune {name!r}: {server.store.hide_dir(str(e))}", "name") from None
    except ICVHTTPError:
        raise
    except Exception as e:
        logger.exception("icv: tuning %r failed", name)
        raise ICVHTTPError(500, f"tuning {name!r} failed: {e}") from None
    result = recommend(baseline, measured, tune.max_ppl_increase)
    answer = {"object": "icv.tune", "name": name, "prompts": len(tune.prompts), "max_tokens": tune.max_tokens,
              **result.to_json(), "stored": False}
    if result.recommended_scale is None:
        answer["message"] = no_recommendation_message(result)
        return answer
    if tune.dry_run:
        return answer
    async with server.write_lock:
        try:
            await asyncio.to_thread(_store_locked, server, entry, data, result.recommended_scale)
        except VectorChangedError as e:
            raise ICVHTTPError(409, str(e), "name") from None
    answer["stored"] = True
    return answer


def _store_locked(server: ICVServer, entry, data: bytes, scale: float) -> None:
    """``store_recommended_scale`` under the directory's write lock: another
    API server process cannot replace the file between its check and its write."""
    from ..tuning.storage import store_recommended_scale
    from .store import directory_write_lock

    with directory_write_lock(server.directory):
        store_recommended_scale(entry, data, scale)


def check_name(name: str) -> str:
    try:
        return validate_name(name)
    except ICVSpecError as e:
        raise ICVHTTPError(400, str(e), "name") from None
