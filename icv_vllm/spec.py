"""The per-request vector selection, one strict grammar for every entry point
(offline ``SamplingParams(extra_args={"icv": ...})``, the OpenAI body field
``icv``, ``vllm_xargs``), so all refuse the same inputs with the same messages.

String form (ASCII only; spaces allowed around names, scales and commas)::

    selection := entry ("," entry)*          1 to 4 entries
    entry     := name ":" scale
    name      := [A-Za-z0-9._-]{1,128}       not "." or ".."
    scale     := [+-]? (digits ["." digits*] | "." digits) [("e"|"E") [+-]? digits]
    digits    := [0-9]+

List form: ``[{"name": str, "scale": number}, ...]`` (a JSON number; a string,
a boolean or null is refused). In both forms a scale is the paper's lambda:
0, or a magnitude in [MIN_ABS_SCALE, MAX_ABS_SCALE] — outside that range the
kernels' float32 arithmetic would overflow or the value would round to 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .protocol import EXTRA_ARGS_KEY, MAX_VECTORS_PER_REQUEST  # noqa: F401  (re-exported)

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
SCALE_PATTERN = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPACES = " "  # the only whitespace the string form allows
MAX_ABS_SCALE = 1000.0
MIN_ABS_SCALE = 1e-30
MAX_SPEC_CHARS = 4096


class ICVSpecError(ValueError):
    """A vector selection that cannot be served; the message says why."""


@dataclass(frozen=True)
class VectorChoice:
    """One vector of a request and its strength (the paper's lambda)."""

    name: str
    scale: float


def validate_name(name: object) -> str:
    """Return ``name`` if it is a legal vector name, else raise ICVSpecError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        shown = name if not isinstance(name, str) or len(name) <= 140 else name[:140] + "..."
        raise ICVSpecError(f"invalid vector name {shown!r}: use 1-128 characters from [A-Za-z0-9._-]")
    return name


def _checked_scale(value: float, name: str, shown: str) -> float:
    if not math.isfinite(value):
        raise ICVSpecError(f"scale of {name!r} must be finite, got {shown}")
    if value != 0.0 and not (MIN_ABS_SCALE <= abs(value) <= MAX_ABS_SCALE):
        raise ICVSpecError(f"scale of {name!r} must be 0 or between {MIN_ABS_SCALE:g} and "
                           f"{MAX_ABS_SCALE:g} in magnitude, got {shown}")
    return value


def _scale_text(text: str, name: str) -> float:
    if not SCALE_PATTERN.fullmatch(text):
        raise ICVSpecError(f"scale of {name!r} is not a number: {text[:40]!r} "
                           "(write e.g. 0.1, -2, 1.5e-2)")
    value = float(text)
    if value == 0.0 and re.search(r"[1-9]", re.split(r"[eE]", text)[0]):
        raise ICVSpecError(f"scale of {name!r} must be 0 or between {MIN_ABS_SCALE:g} and "
                           f"{MAX_ABS_SCALE:g} in magnitude, got {text[:40]!r}")
    return _checked_scale(value, name, repr(text))


def parse_scale(text: str, name: str) -> float:
    """A scale written as text (the string form's grammar and bounds)."""
    return _scale_text(text, name)


def _scale_value(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ICVSpecError(f"scale of {name!r} must be a number, got {type(value).__name__}")
    if isinstance(value, int):
        if abs(value) > MAX_ABS_SCALE:  # before float(): huge ints do not convert
            raise ICVSpecError(f"scale of {name!r} must be 0 or between {MIN_ABS_SCALE:g} and "
                               f"{MAX_ABS_SCALE:g} in magnitude, got an integer of "
                               f"{len(str(abs(value))) if abs(value) < 10**100 else 'over 100'} digits")
        value = float(value)
    return _checked_scale(value, name, repr(value))


def _entries_of_string(spec: str) -> list[tuple[str, float]]:
    if len(spec) > MAX_SPEC_CHARS:
        raise ICVSpecError(f"icv selection is longer than {MAX_SPEC_CHARS} characters")
    out = []
    for part in spec.split(","):
        part = part.strip(_SPACES)
        if not part:
            raise ICVSpecError(f"empty entry in vector spec {spec[:200]!r}")
        name, sep, scale = part.rpartition(":")
        if not sep:
            raise ICVSpecError(f"entry {part[:140]!r} must be 'name:scale' (e.g. 'polite:0.1')")
        name = validate_name(name.strip(_SPACES))
        out.append((name, _scale_text(scale.strip(_SPACES), name)))
    return out


def _entries_of_list(spec: list | tuple) -> list[tuple[str, float]]:
    out = []
    for entry in spec:
        if (not isinstance(entry, dict) or set(entry) - {"name", "scale"}
                or "name" not in entry or "scale" not in entry):
            shown = repr(entry)
            raise ICVSpecError('each vector must be an object {"name": str, "scale": number}, '
                               f"got {shown[:200]}")
        name = validate_name(entry["name"])
        out.append((name, _scale_value(entry["scale"], name)))
    return out


def parse_spec(spec: object) -> tuple[VectorChoice, ...]:
    """Parse a selection (see the module docstring); a bare name without a
    scale is refused: strengths differ by orders of magnitude between
    vectors, so the caller must say it."""
    if isinstance(spec, str):
        entries = _entries_of_string(spec)
    elif isinstance(spec, (list, tuple)):
        if len(spec) > MAX_VECTORS_PER_REQUEST:
            raise ICVSpecError(f"a request may combine at most {MAX_VECTORS_PER_REQUEST} vectors, got {len(spec)}")
        entries = _entries_of_list(spec)
    else:
        raise ICVSpecError("icv must be a string 'name:scale,...' or a list of "
                           f'{{"name", "scale"}} objects, got {type(spec).__name__}')
    if not entries:
        raise ICVSpecError("icv selects no vector")
    if len(entries) > MAX_VECTORS_PER_REQUEST:
        raise ICVSpecError(f"a request may combine at most {MAX_VECTORS_PER_REQUEST} vectors, got {len(entries)}")
    return tuple(VectorChoice(n, s) for n, s in entries)


def format_spec(choices: tuple[VectorChoice, ...] | list[VectorChoice]) -> str:
    """Canonical string form; ``parse_spec(format_spec(c)) == c`` exactly."""
    return ",".join(f"{c.name}:{c.scale!r}" for c in choices)
