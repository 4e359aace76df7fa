"""Where the plugin finds its settings: vLLM's ``--additional-config`` first,
then environment variables (which ``icv-vllm serve`` sets for every process).

    --additional-config '{"icv_vllm": {"dir": "/vectors", "max_slots": 64}}'
    ICV_VLLM_DIR=/vectors ICV_VLLM_MAX_SLOTS=64
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADDITIONAL_CONFIG_SECTION = "icv_vllm"
ENV_DIR = "ICV_VLLM_DIR"
ENV_MAX_SLOTS = "ICV_VLLM_MAX_SLOTS"
DEFAULT_MAX_SLOTS = 64


@dataclass(frozen=True)
class PluginConfig:
    """vector_dir: where ``<name>.safetensors`` files live (None: steering off).
    max_slots: vectors kept on the device at once (distinct vectors in one step
    can never exceed it)."""

    vector_dir: Path | None
    max_slots: int


def plugin_config(vllm_config: Any | None = None) -> PluginConfig:
    section: dict = {}
    additional = getattr(vllm_config, "additional_config", None) or {}
    if isinstance(additional, dict):
        section = additional.get(ADDITIONAL_CONFIG_SECTION) or {}
        if not isinstance(section, dict):
            raise ValueError(
                f"additional_config[{ADDITIONAL_CONFIG_SECTION!r}] must be an object, "
                f"got {section!r}"
            )
        unknown = set(section) - {"dir", "max_slots"}
        if unknown:
            raise ValueError(
                f"unknown keys in additional_config[{ADDITIONAL_CONFIG_SECTION!r}]: "
                f"{sorted(unknown)} (known: dir, max_slots)"
            )
    raw_dir = section.get("dir") or os.environ.get(ENV_DIR) or None
    raw_slots = section.get("max_slots", os.environ.get(ENV_MAX_SLOTS, DEFAULT_MAX_SLOTS))
    try:
        max_slots = int(raw_slots)
    except (TypeError, ValueError):
        raise ValueError(f"icv_vllm max_slots must be an integer, got {raw_slots!r}") from None
    if max_slots < 1:
        raise ValueError(f"icv_vllm max_slots must be >= 1, got {max_slots}")
    return PluginConfig(Path(raw_dir).expanduser().resolve() if raw_dir else None, max_slots)
