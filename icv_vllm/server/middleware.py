"""ASGI middleware: per-request vector selection on the OpenAI generate routes,
and a 400 for a selection sent to any other route.

Why a body-rewriting middleware rather than a patch of vLLM's request models
(``to_sampling_params``): it touches no vLLM internal, works the same for
completions and chat, streaming or not, and answers a bad selection with a
400 *before* vLLM parses the body or the engine sees it — for a streaming
request vLLM would otherwise have sent its 200 headers already. It sits
innermost (inside vLLM's ``--api-key`` check), so an unauthenticated client
learns nothing about the vectors on the server.

Admission (resolve names, read and pin files) runs in a worker thread: the
event loop, which serves every other client, never waits on a file. Its
result travels to the engine's admission as a one-use ticket in
``vllm_xargs``, so the selection is not resolved twice.

On shutdown (``abandon.StopSignal``) a POST still running is cancelled: vLLM
0.32 would otherwise leave it waiting on the stopped engine, and the server
waiting on it, forever.

Cost: POST bodies are buffered (vLLM reads them whole anyway; form uploads
are not touched) and parsed only when they can mention ``icv`` or nest
deeply enough to break Python's parser.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import metrics
from ..protocol import ADMISSION_TICKET_KEY
from .abandon import CLEANUP_S, StopSignal
from .errors import ICVHTTPError, error_response
from .json_body import load_body, may_be_too_deep
from .request_icv import SERVED_ON, XARGS_FIELD, engine_requests, refuse_selection_elsewhere, translate_body

logger = logging.getLogger("vllm.icv_vllm.server")

GENERATE_PATHS = SERVED_ON
# Form bodies (audio uploads) are not JSON; vLLM's own admission checks their fields.
FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")

# Blocking: resolves and pins a parsed selection, returns its ticket good for
# the given number of engine requests; raises ICVHTTPError when it cannot be served.
Admit = Callable[[tuple, int], str]


class ICVRequestMiddleware:
    def __init__(self, app: ASGIApp, admit: Admit, own_prefix: str = "/v1/icv") -> None:
        self.app = app
        self.admit = admit
        self.own_prefix = own_prefix  # the management routes read their own bodies
        self.stop = StopSignal()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "").rstrip("/")
        generate = path in GENERATE_PATHS
        if not generate and (path == self.own_prefix or path.startswith(self.own_prefix + "/")
                             or _is_form(scope)):
            return await self._until_stop(scope, receive, send)

        body = await _read_body(receive)
        if body is None:  # client went away before sending its body
            return
        try:
            if generate:
                new_body = await self._rewrite(body)
            else:
                _check_elsewhere(body, path)
                new_body = None
        except ICVHTTPError as e:
            metrics.record_refusal(metrics.refusal_reason(e, route_serves_vectors=generate))
            return await error_response(e.status, e.message, e.param)(scope, receive, send)
        if new_body is not None:
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope["headers"].append((b"content-length", str(len(new_body)).encode()))
            body = new_body
        await self._until_stop(scope, _replay(body, receive), send)

    async def _until_stop(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, cancelled when the server shuts down (see the module docstring)."""
        app = scope.get("app")
        if app is None:  # not under Starlette: nothing to watch
            return await self.app(scope, receive, send)
        stop = self.stop.event(app.state)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=CLEANUP_S)
        if task.done() and not task.cancelled():
            return task.result()
        if not started:
            await error_response(503, "the server is shutting down")(scope, receive, send)

    async def _rewrite(self, body: bytes) -> bytes | None:
        """The rewritten body, or None to forward the original bytes."""
        # `icv` can only appear as a key spelled out or \u-escaped
        mentions = b"icv" in body or b"\\u" in body
        if not mentions and not may_be_too_deep(body):
            return None
        try:
            payload, huge = load_body(body)  # a body too deep for Python is a 400 here
        except ValueError:
            return None  # vLLM answers malformed JSON itself
        if not mentions or not isinstance(payload, dict):
            return None
        translation = translate_body(payload, huge)
        if translation is None:
            return None
        if translation.spec is not None:
            # one ticket use per engine request the body makes (a batched
            # completion makes one per prompt; n > 1 fans out after admission)
            uses = engine_requests(translation.body)
            ticket = await asyncio.to_thread(self.admit, translation.choices, uses)
            translation.body[XARGS_FIELD][ADMISSION_TICKET_KEY] = ticket
        return json.dumps(translation.body).encode()


def _check_elsewhere(body: bytes, path: str) -> None:
    if b"icv" not in body and b"\\u" not in body:
        return
    try:
        payload, _ = load_body(body)
    except ValueError:
        return
    refuse_selection_elsewhere(payload, path)


def _is_form(scope: Scope) -> bool:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return value.split(b";", 1)[0].strip().lower() in FORM_TYPES
    return False


async def _read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A receive that yields the (rewritten) body once, then the real channel
    (vLLM listens on it for client disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
