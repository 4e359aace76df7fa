"""Serving layer: ICV selection in OpenAI requests, the ``/v1/icv``
management routes, and ``icv-vllm serve``.

Runs only in vLLM's API server process and imports no vLLM worker module;
the engine side is the plugin (``icv_vllm.plugin``).
"""
