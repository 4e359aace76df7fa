"""Several API server processes: ``--api-server-count N`` (and data
parallelism, whose default is one API server per engine, as in ``vllm serve``).

vLLM's ``run_multi_api_server`` starts the engine core(s) in this process's
children and spawns N API server processes, fresh interpreters that share one
listening socket. ``icv-vllm serve`` adds ICV serving to vLLM's app by
wrapping ``build_app`` in its own process, which a spawned process does not
inherit; so each API server process starts in :func:`api_server_process`
(vLLM's ``APIServerProcessManager`` takes it as ``target_server_fn``, see
``vllm_hooks.patch_api_server_processes``), which wraps ``build_app`` there
and runs vLLM's own worker. A plain ``vllm serve`` is not touched.

What each process holds on its own (all of it safe to keep per process):
admission tickets (issued and used by the same request in the same process),
the per-process write lock of the management routes (writes to the directory
are also serialised across processes: ``store.directory_write_lock``), and
its front-end metrics (vLLM's Prometheus multiprocess mode adds them up).
The pinned store is content-addressed and written atomically, so processes
share it safely.
"""

from __future__ import annotations


def api_server_process(listen_address, sock, args, client_config=None, **uvicorn_kwargs) -> None:
    """The body of one spawned API server process."""
    from ..plugin import register
    from .app import patch_vllm_app
    from .vllm_hooks import RUN_API_SERVER_WORKER

    patch_vllm_app()
    register()  # vLLM loads it here too (EngineArgs); explicit, as in the single-server process
    RUN_API_SERVER_WORKER.get()(listen_address, sock, args, client_config, **uvicorn_kwargs)


def start_api_servers_with_icv() -> None:
    """In the ``icv-vllm serve`` process, before ``run_multi_api_server``."""
    from .vllm_hooks import patch_api_server_processes

    patch_api_server_processes(api_server_process)
