"""Stop long route work (in-server extraction) nobody will wait for.

Two cases, both seen as a hung server otherwise:

- the client disconnects: vLLM's own routes stop through ``with_cancellation``;
  ours watch ``http.disconnect`` the same way;
- the server is shutting down: vLLM's SIGTERM handler stops the engine and
  then sets ``should_exit`` on the uvicorn server (``app.state.server``);
  uvicorn then waits, without a time limit, for every open response. Work
  still awaiting the stopped engine would never end, so it is cancelled.

Cancelled work gets ``CLEANUP_S`` to finish its own cleanup (aborting engine
requests); past that it is left behind so the response can still go out.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable, TypeVar

from .errors import ICVHTTPError

T = TypeVar("T")
POLL_S = 0.25
CLEANUP_S = 3.0


def server_stopping(app_state: Any, engine_client: Any) -> Callable[[], bool]:
    """True once vLLM's shutdown has begun or the engine has died."""
    def stopping() -> bool:
        server = getattr(app_state, "server", None)
        if getattr(server, "should_exit", False):
            return True
        return bool(getattr(engine_client, "errored", False))
    return stopping


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
