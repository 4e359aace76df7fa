"""``/v1/icv``: list, create (extract from pairs in the running server),
tune (``POST /v1/icv/{name}/tune``, ``tuning_route``) and delete vectors. Off unless ``ICV_VLLM_ALLOW_RUNTIME_UPDATES=1``: creating a
vector runs the model and writes files, as LoRA loading does in vLLM, which
keeps that behind ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``. Under ``/v1``, so
vLLM's ``--api-key`` check covers these routes.

A created vector is usable by the next request: requests resolve names
against the directory each time. File work runs in threads; an extraction
stops (and writes nothing) when its client disconnects or the server shuts
down (``abandon``).
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import APIRouter, Request

from .abandon import server_stopping, until_abandoned
from .errors import ICVHTTPError
from .extraction import CreateRequest, check_captures_possible, extract_in_server, parse_create_body
from .state import ICVServer

logger = logging.getLogger("vllm.icv_vllm.server")

PREFIX = "/v1/icv"
STATE_KEY = "icv_server"
# Room for MAX_PAIRS pairs of MAX_TEXT_CHARS-bounded texts, JSON-escaped.
MAX_CREATE_BODY_BYTES = 8 << 20

router = APIRouter()


def _server(request: Request) -> ICVServer:
    server: ICVServer = getattr(request.app.state, STATE_KEY)
    server.require_updates()
    return server


async def _read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ICVHTTPError(413, f"body is {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ICVHTTPError(413, f"body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return await asyncio.to_thread(json.loads, b"".join(chunks))
    except RecursionError:
        raise ICVHTTPError(400, "body is not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise ICVHTTPError(400, f"body is not valid JSON ({e})") from None


@router.get(PREFIX)
async def list_vectors(request: Request) -> dict:
    server = _server(request)
    return {"object": "list", "data": await asyncio.to_thread(server.store.list)}


async def _create(server: ICVServer, create: CreateRequest) -> dict:
    async with server.write_lock:
        exists = await asyncio.to_thread(server.store.exists, create.name)
        if exists and not create.overwrite:
            raise server.store.conflict(create.name)  # before spending a forward pass
        check_captures_possible(server.engine_client(), "in-server extraction")
        try:
            vector = await extract_in_server(server.engine_client(), create)
        except ICVHTTPError:
            raise
        except ValueError as e:
            raise ICVHTTPError(400, f"cannot extract {create.name!r}: {e}", "pairs") from None
        except Exception as e:
            logger.exception("icv: in-server extraction of %r failed", create.name)
            raise ICVHTTPError(500, f"in-server extraction of {create.name!r} failed: {e}") from None
        return await asyncio.to_thread(server.store.save, create.name, vector, create.overwrite)


@router.post(PREFIX)
async def create_vector(request: Request) -> dict:
    server = _server(request)
    create = parse_create_body(await _read_json(request, MAX_CREATE_BODY_BYTES))
    info = await until_abandoned(_create(server, create), request.receive, server_stopping(request.app.state),
                                 f"extraction of {create.name!r}")
    logger.info("icv: created vector %r from %d pairs (%s)", create.name, len(create.pairs), create.method)
    return info


@router.delete(PREFIX + "/{name}")
async def delete_vector(name: str, request: Request) -> dict:
    server = _server(request)
    async with server.write_lock:
        result = await asyncio.to_thread(server.store.delete, name)
    logger.info("icv: deleted vector %r", name)
    return result


@router.post(PREFIX + "/{name}/tune")
async def tune_vector(name: str, request: Request) -> dict:
    """Sweep the vector's strength with the running engine and store the
    recommendation as its ``recommended_scale`` (``tuning_route``)."""
    from .tuning_route import MAX_TUNE_BODY_BYTES, check_name, parse_tune_body, tune_in_server

    server = _server(request)
    name = check_name(name)
    has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    tune = parse_tune_body(await _read_json(request, MAX_TUNE_BODY_BYTES) if has_body else None)
    result = await until_abandoned(tune_in_server(server, name, tune), request.receive,
                                   server_stopping(request.app.state), f"tuning of {name!r}")
    logger.info("icv: tuned vector %r: recommended scale %s%s", name, result["recommended_scale"],
                " (stored)" if result["stored"] else "")
    return result
