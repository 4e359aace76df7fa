"""``/v1/icv``: list, create (extract from pairs in the running server) and
delete vectors. Off unless ``ICV_VLLM_ALLOW_RUNTIME_UPDATES=1``: creating a
vector runs the model and writes files, as LoRA loading does in vLLM, which
keeps that behind ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``. Under ``/v1``, so
vLLM's ``--api-key`` check covers these routes.

A created vector is usable by the next request: requests resolve names
against the directory each time.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import APIRouter, Request

from .errors import ICVHTTPError
from .extraction import extract_in_server, parse_create_body
from .state import ICVServer

logger = logging.getLogger("vllm.icv_vllm.server")

PREFIX = "/v1/icv"
STATE_KEY = "icv_server"

router = APIRouter()


def _server(request: Request) -> ICVServer:
    server: ICVServer = getattr(request.app.state, STATE_KEY)
    server.require_updates()
    return server


@router.get(PREFIX)
async def list_vectors(request: Request) -> dict:
    server = _server(request)
    return {"object": "list", "data": await asyncio.to_thread(server.store.list)}


@router.post(PREFIX)
async def create_vector(request: Request) -> dict:
    server = _server(request)
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise ICVHTTPError(400, f"body is not valid JSON ({e})") from None
    create = parse_create_body(body)
    async with server.write_lock:
        if server.store.path(create.name).exists() and not create.overwrite:
            raise server.store.conflict(create.name)  # before spending a forward pass
        try:
            vector = await extract_in_server(server.engine_client(), create)
        except ICVHTTPError:
            raise
        except ValueError as e:
            raise ICVHTTPError(400, f"cannot extract {create.name!r}: {e}", "pairs") from None
        except Exception as e:
            logger.exception("icv: in-server extraction of %r failed", create.name)
            raise ICVHTTPError(500, f"in-server extraction of {create.name!r} failed: {e}") from None
        info = await asyncio.to_thread(server.store.save, create.name, vector, create.overwrite)
    logger.info("icv: created vector %r from %d pairs (%s)", create.name, len(create.pairs), create.method)
    return info


@router.delete(PREFIX + "/{name}")
async def delete_vector(name: str, request: Request) -> dict:
    server = _server(request)
    async with server.write_lock:
        result = server.store.delete(name)
    logger.info("icv: deleted vector %r", name)
    return result
