"""The vLLM plugin: per-request In-Context Vectors inside continuous batching.

``register`` is the ``vllm.general_plugins`` entry point; vLLM calls it in the
API server, the engine core and every worker. It imports nothing heavy: each
patch waits for its vLLM module to be imported (see ``vllm_patches``).
"""

import logging

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from .vllm_patches import install

    install()
    _registered = True
    logging.getLogger("vllm.icv_vllm").debug("icv-vllm plugin registered")
