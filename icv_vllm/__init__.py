"""icv-vllm: In-Context Vectors (Liu et al., ICML 2024) served by vLLM.

Importing this package is cheap: it pulls neither vLLM nor transformers.
"""

__version__ = "0.1.0"
