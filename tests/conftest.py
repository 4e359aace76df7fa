"""Shared fixtures: tiny Llama / Qwen2 checkpoints (see tests/tiny_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

try:  # tests/ as a package (rootdir on sys.path) or as a plain folder
    from .tiny_models import build_tiny_model
except ImportError:
    from tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """Folder of a tiny random-init LlamaForCausalLM (adds <s> to every text)."""
    return build_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir() -> Path:
    """Folder of a tiny random-init Qwen2ForCausalLM (no BOS token)."""
    return build_tiny_model("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral_dir() -> Path:
    """Folder of a tiny random-init MistralForCausalLM."""
    return build_tiny_model("mistral")


@pytest.fixture(scope="session")
def tiny_qwen3_dir() -> Path:
    """Folder of a tiny random-init Qwen3ForCausalLM (q/k norms)."""
    return build_tiny_model("qwen3")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request) -> Path:
    """Each tiny model in turn."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")
