"""The plugin's settings: vLLM's ``--additional-config`` first, then
environment variables (which ``icv-vllm serve`` sets for every process).

    --additional-config '{"icv_vllm": {"dir": "/vectors", "max_slots": 8}}'
    ICV_VLLM_DIR=/vectors ICV_VLLM_MAX_SLOTS=8

Steering is on only when a vector directory is configured; without one the
plugin changes nothing in vLLM (see ``icv_vllm.plugin``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADDITIONAL_CONFIG_SECTION = "icv_vllm"
ENV_DIR = "ICV_VLLM_DIR"
ENV_MAX_SLOTS = "ICV_VLLM_MAX_SLOTS"
ENV_PIN_DIR = "ICV_VLLM_PIN_DIR"
KNOWN_KEYS = ("dir", "max_slots", "pin_dir")
# Bank size when max_slots is not given: where the bank is fixed (CUDA) this
# is also the scheduler's budget of distinct vectors among running requests.
DEFAULT_MAX_SLOTS = 64
HOW_TO_CONFIGURE = (
    f"start the server with --icv-dir DIR (icv-vllm serve), set {ENV_DIR}=DIR, or pass "
    f"--additional-config '{{\"{ADDITIONAL_CONFIG_SECTION}\": {{\"dir\": \"DIR\"}}}}'"
)


class ICVConfigError(ValueError):
    """A setting that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class PluginConfig:
    """vector_dir: where ``<name>.safetensors`` files live (None: steering off).
    max_slots: vectors kept on the device at once. fixed_slots: whether that
    number was given explicitly, which fixes the bank on every device and
    makes the scheduler keep distinct vectors among running requests within it.
    pin_dir: the content-addressed copies of admitted vectors."""

    vector_dir: Path | None
    max_slots: int
    fixed_slots: bool
    pin_dir: Path

    @property
    def enabled(self) -> bool:
        return self.vector_dir is not None

    def bank_is_fixed(self, device_type: str) -> bool:
        """CUDA graphs need a bank whose address never changes, so it is fixed
        there even without an explicit max_slots; elsewhere only when asked."""
        return self.fixed_slots or device_type == "cuda"


def _section(vllm_config: Any | None) -> dict:
    additional = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(additional, dict):
        return {}
    section = additional.get(ADDITIONAL_CONFIG_SECTION) or {}
    if not isinstance(section, dict):
        raise ICVConfigError(f"additional_config[{ADDITIONAL_CONFIG_SECTION!r}] must be an object, "
                             f"got {section!r}")
    unknown = set(section) - set(KNOWN_KEYS)
    if unknown:
        raise ICVConfigError(f"unknown keys in additional_config[{ADDITIONAL_CONFIG_SECTION!r}]: "
                             f"{sorted(unknown)} (known: {', '.join(KNOWN_KEYS)})")
    return section


def default_pin_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "icv-vllm" / "pinned"


def plugin_config(vllm_config: Any | None = None) -> PluginConfig:
    section = _section(vllm_config)
    raw_dir = section.get("dir") or os.environ.get(ENV_DIR) or None
    raw_slots = section.get("max_slots", os.environ.get(ENV_MAX_SLOTS))
    fixed = raw_slots is not None and raw_slots != ""
    max_slots = DEFAULT_MAX_SLOTS
    if fixed:
        if isinstance(raw_slots, bool) or not (isinstance(raw_slots, int) or
                                               (isinstance(raw_slots, str) and raw_slots.isdigit())):
            raise ICVConfigError(f"icv_vllm max_slots must be a positive integer, got {raw_slots!r}")
        max_slots = int(raw_slots)
        if max_slots < 1:
            raise ICVConfigError(f"icv_vllm max_slots must be >= 1, got {max_slots}")
    raw_pin = section.get("pin_dir") or os.environ.get(ENV_PIN_DIR) or None
    pin_dir = Path(raw_pin).expanduser().resolve() if raw_pin else default_pin_dir()
    return PluginConfig(Path(raw_dir).expanduser().resolve() if raw_dir else None, max_slots, fixed, pin_dir)


def steering_enabled(vllm_config: Any | None) -> bool:
    """Cheap check used by every patch: is a vector directory configured?"""
    try:
        return plugin_config(vllm_config).enabled
    except ICVConfigError:
        return True  # configured, wrongly: the patch goes on and reports the error
