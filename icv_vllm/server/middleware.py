"""ASGI middleware: per-request vector selection on the OpenAI generate routes.

Why a body-rewriting middleware rather than a patch of vLLM's request models
(``to_sampling_params``): it touches no vLLM internal, works the same for
completions and chat, streaming or not, and answers a bad selection with a
400 *before* vLLM parses the body or the engine sees it — for a streaming
request vLLM would otherwise have sent its 200 headers already. It sits
innermost (inside vLLM's ``--api-key`` check), so an unauthenticated client
learns nothing about the vectors on the server.

Cost: bodies of the two routes are buffered (vLLM reads them whole anyway)
and parsed only when they can mention ``icv``.
"""

from __future__ import annotations

import json
import logging
from typing import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ICVHTTPError, error_response
from .request_icv import translate_body

logger = logging.getLogger("vllm.icv_vllm.server")

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")

Resolver = Callable[[str], None]  # raises ICVHTTPError when a spec cannot be served


class ICVRequestMiddleware:
    def __init__(self, app: ASGIApp, resolve: Resolver) -> None:
        self.app = app
        self.resolve = resolve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        if path.rstrip("/") not in GENERATE_PATHS:
            return await self.app(scope, receive, send)

        body = await _read_body(receive)
        if body is None:  # client went away before sending its body
            return
        try:
            new_body = self._rewrite(body)
        except ICVHTTPError as e:
            return await error_response(e.status, e.message, e.param)(scope, receive, send)
        if new_body is not None:
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope["headers"].append((b"content-length", str(len(new_body)).encode()))
            body = new_body
        await self.app(scope, _replay(body, receive), send)

    def _rewrite(self, body: bytes) -> bytes | None:
        """The rewritten body, or None to forward the original bytes."""
        # `icv` can only appear as a key spelled out or \u-escaped
        if b"icv" not in body and b"\\u" not in body:
            return None
        try:
            payload = json.loads(body)
        except ValueError:
            return None  # vLLM answers malformed JSON itself
        if not isinstance(payload, dict):
            return None
        translation = translate_body(payload)
        if translation is None:
            return None
        if translation.spec is not None:
            self.resolve(translation.spec)
        return json.dumps(translation.body).encode()


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
