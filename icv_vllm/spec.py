"""The per-request vector selection: ``"name:scale[,name:scale...]"``.

One grammar serves offline ``SamplingParams(extra_args={"icv": ...})``, the
OpenAI ``extra_body`` and the management API, so every entry point refuses the
same inputs with the same messages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_VECTORS_PER_REQUEST = 4
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Key in SamplingParams.extra_args that users set.
EXTRA_ARGS_KEY = "icv"
# Key the front end adds after resolving names to files (see plugin.admission).
RESOLVED_EXTRA_ARGS_KEY = "icv_resolved"


class ICVSpecError(ValueError):
    """A vector selection that cannot be served; the message says why."""


@dataclass(frozen=True)
class VectorChoice:
    """One vector of a request and its strength (the paper's lambda)."""

    name: str
    scale: float


def validate_name(name: object) -> str:
    """Return ``name`` if it is a legal vector name, else raise ICVSpecError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in (".", ".."):
        raise ICVSpecError(
            f"invalid vector name {name!r}: use 1-128 characters from [A-Za-z0-9._-]"
        )
    return name


def _scale(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ICVSpecError(f"scale of {name!r} must be a number, got {type(value).__name__}")
    try:
        scale = float(value)
    except ValueError:
        raise ICVSpecError(f"scale of {name!r} is not a number: {value!r}") from None
    if not math.isfinite(scale):
        raise ICVSpecError(f"scale of {name!r} must be finite, got {value!r}")
    return scale


def parse_spec(spec: object) -> tuple[VectorChoice, ...]:
    """Parse a selection given as ``"a:0.1,b:-0.05"`` or a list of
    ``{"name": str, "scale": float}``; a bare ``"a"`` means scale 1.0 is NOT
    accepted: strengths differ by orders of magnitude between vectors, so the
    caller must say it."""
    if isinstance(spec, str):
        items: list[tuple[object, object]] = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                raise ICVSpecError(f"empty entry in vector spec {spec!r}")
            name, sep, scale = part.rpartition(":")
            if not sep:
                raise ICVSpecError(
                    f"entry {part!r} must be 'name:scale' (e.g. 'polite:0.1')"
                )
            items.append((name.strip(), scale.strip()))
    elif isinstance(spec, (list, tuple)):
        items = []
        for entry in spec:
            if not isinstance(entry, dict) or set(entry) - {"name", "scale"} or "name" not in entry or "scale" not in entry:
                raise ICVSpecError(
                    'each vector must be an object {"name": str, "scale": number}, '
                    f"got {entry!r}"
                )
            items.append((entry["name"], entry["scale"]))
    else:
        raise ICVSpecError(
            "icv must be a string 'name:scale,...' or a list of "
            f'{{"name", "scale"}} objects, got {type(spec).__name__}'
        )
    if not items:
        raise ICVSpecError("icv selects no vector")
    if len(items) > MAX_VECTORS_PER_REQUEST:
        raise ICVSpecError(
            f"a request may combine at most {MAX_VECTORS_PER_REQUEST} vectors, got {len(items)}"
        )
    choices = tuple(VectorChoice(validate_name(n), _scale(s, str(n))) for n, s in items)
    return choices


def format_spec(choices: tuple[VectorChoice, ...] | list[VectorChoice]) -> str:
    """Canonical string form; ``parse_spec(format_spec(c)) == c`` exactly."""
    return ",".join(f"{c.name}:{c.scale!r}" for c in choices)
