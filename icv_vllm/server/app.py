"""Adds ICV serving to vLLM's OpenAI app: the request middleware, the
``/v1/icv`` routes, and their error format."""

from __future__ import annotations

import logging
from typing import Any, Callable

from starlette.middleware import Middleware

from ..config import ENV_DIR, plugin_config
from .errors import ICVHTTPError, handle_icv_http_error
from .management import PREFIX, STATE_KEY, router
from .middleware import ICVRequestMiddleware
from .state import ENV_ALLOW_RUNTIME_UPDATES, ICVServer, runtime_updates_allowed
from .vllm_hooks import check_api_key_covers, patch_build_app, reset_middleware_stack

logger = logging.getLogger("vllm.icv_vllm.server")


def install(app: Any, args: Any) -> ICVServer:
    """Add ICV serving to a FastAPI ``app`` built from vLLM serve ``args``
    (before it starts). The vector directory is the plugin's own setting
    (``--additional-config`` or ``ICV_VLLM_DIR``), so the front end and the
    engine read the same one."""
    directory = plugin_config(args).vector_dir
    if directory is None:
        raise ValueError(f"no vector directory: pass --icv-dir or set {ENV_DIR}")
    server = ICVServer(directory, runtime_updates_allowed(), app.state)
    setattr(app.state, STATE_KEY, server)
    check_api_key_covers(PREFIX)
    # innermost (add_middleware would make it outermost): runs after vLLM's
    # --api-key check and CORS, right before routing
    app.user_middleware.append(Middleware(ICVRequestMiddleware, admit=server.admit, own_prefix=PREFIX))
    app.include_router(router)
    app.add_exception_handler(ICVHTTPError, handle_icv_http_error)
    reset_middleware_stack(app)
    logger.info(
        "icv: vectors in %s; management API (%s) %s", server.directory, PREFIX,
        "enabled" if server.updates_allowed else f"disabled (set {ENV_ALLOW_RUNTIME_UPDATES}=1)",
    )
    return server


def _with_icv(build_app: Callable) -> Callable:
    def build_app_with_icv(args, *rest, **kwargs):
        app = build_app(args, *rest, **kwargs)
        install(app, args)
        return app
    return build_app_with_icv


def patch_vllm_app() -> None:
    """Make vLLM's API server build its app with ICV serving (idempotent)."""
    patch_build_app(_with_icv)
