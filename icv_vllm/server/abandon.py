"""Stop request work nobody will wait for.

Two cases, both seen as a hung server otherwise:

- the client disconnects: vLLM's own routes stop through ``with_cancellation``;
  in-server extraction watches ``http.disconnect`` the same way
  (:func:`until_abandoned`);
- the server shuts down: vLLM 0.32's SIGTERM handler stops the engine (in
  its default abort mode, without finishing the requests it was running),
  then sets ``should_exit`` on the uvicorn server (``app.state.server``), and
  uvicorn waits, with no time limit, for every open response. A request still
  awaiting the stopped engine would never end, and neither would the server,
  so :class:`StopSignal` tells the middleware and the extraction to cancel.

Cancelled work gets ``CLEANUP_S`` to finish its own cleanup (aborting engine
requests); past that it is left behind so that the response can go out.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable, TypeVar

from .errors import ICVHTTPError
from .vllm_hooks import STATE_ENGINE_CLIENT, STATE_UVICORN_SERVER

T = TypeVar("T")
POLL_S = 0.25
CLEANUP_S = 3.0


def server_stopping(app_state: Any) -> Callable[[], bool]:
    """True once vLLM's shutdown has begun or the engine has died."""
    def stopping() -> bool:
        if getattr(getattr(app_state, STATE_UVICORN_SERVER, None), "should_exit", False):
            return True
        return bool(getattr(getattr(app_state, STATE_ENGINE_CLIENT, None), "errored", False))
    return stopping


class StopSignal:
    """One poller per app (started by the first request) sets an event once
    :func:`server_stopping` turns true; requests wait on the event."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event = asyncio.Event()
        self._poller: asyncio.Task | None = None

    def event(self, app_state: Any) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first request (or a test client's new loop)
            self._loop, self._event = loop, asyncio.Event()
            self._poller = loop.create_task(self._poll(server_stopping(app_state), self._event))
        return self._event

    @staticmethod
    async def _poll(stopping: Callable[[], bool], event: asyncio.Event) -> None:
        while not stopping():
            await asyncio.sleep(POLL_S)
        event.set()


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _watch(receive: Callable[[], Awaitable[dict]], stopping: Callable[[], bool]) -> str:
    disconnect = asyncio.create_task(_disconnected(receive))
    try:
        while True:
            if disconnect.done():
                return "the client disconnected"
            if stopping():
                return "the server is shutting down"
            await asyncio.wait({disconnect}, timeout=POLL_S)
    finally:
        disconnect.cancel()


async def until_abandoned(work: Awaitable[T], receive: Callable[[], Awaitable[dict]],
                          stopping: Callable[[], bool], what: str) -> T:
    """``await work``, unless the client leaves (``receive`` yields
    ``http.disconnect``; the body must have been read) or ``stopping()``:
    then ``work`` is cancelled and a 503 naming ``what`` is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_watch(receive, stopping))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CLEANUP_S)
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    if not task.cancelled() and task.done():
        return task.result()
    reason = watcher.result() if watcher.done() and not watcher.cancelled() else "it was cancelled"
    raise ICVHTTPError(503, f"{what} stopped: {reason}")
