"""The per-request vector selection, one strict grammar for every entry point
(offline ``SamplingParams(extra_args={"icv": ...})``, the OpenAI body field
``icv``, ``vllm_xargs``), so all refuse the same inputs with the same messages.

String form (ASCII only; spaces allowed around names, scales and commas)::

    selection := entry ("," entry)*          1 to 4 entries
    entry     := name [":" scale] (";" option)*
    name      := [A-Za-z0-9._-]{1,128}       not "." or ".."
    scale     := [+-]? (digits ["." digits*] | "." digits) [("e"|"E") [+-]? digits]
    option    := "layers=" span ("+" span)*  decoder layers, 0-based; span := int | int "-" int
               | "positions=" ("all" | "prompt" | "generated")
               | "mode=" ("icv" | "add")
    digits    := [0-9]+

e.g. ``polite:0.02;layers=4-20;positions=generated, formal:0.04``.

List form: ``[{"name": str, "scale": number, "layers": [int, ...] | "4-20",
"positions": str, "mode": str}, ...]`` (only ``name`` required; a scale is a
JSON number — a string, a boolean or null is refused). In both forms a scale
is the paper's lambda: 0, or a magnitude in [MIN_ABS_SCALE, MAX_ABS_SCALE] —
outside that range the kernels' float32 arithmetic would overflow or the
value would round to 0. Without a scale, admission uses the vector file's
``recommended_scale`` (written by ``icv-vllm tune``) or refuses. Options are
defined in docs/method.md §7; ``mode`` defaults to the file's ``default_mode``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .protocol import EXTRA_ARGS_KEY, MAX_VECTORS_PER_REQUEST, MODES, POSITIONS, format_layers, parse_layers  # noqa: F401

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
SCALE_PATTERN = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPACES = " "  # the only whitespace the string form allows
MAX_ABS_SCALE = 1000.0
MIN_ABS_SCALE = 1e-30
MAX_SPEC_CHARS = 4096
MAX_LAYER_INDEX = 4095  # far beyond any model; bounds what a span may expand to
LAYER_SPAN_PATTERN = re.compile(r"[0-9]{1,5}(?:-[0-9]{1,5})?")
OPTIONS = ("layers", "positions", "mode")


class ICVSpecError(ValueError):
    """A vector selection that cannot be served; the message says why."""


@dataclass(frozen=True)
class VectorChoice:
    """One vector of a request: its strength (the paper's lambda; None = the
    file's recommendation) and where it applies (docs/method.md §7): decoder
    layers (None = all), positions, mode (None = the file's default)."""

    name: str
    scale: float | None
    layers: tuple[int, ...] | None = None
    positions: str = "all"
    mode: str | None = None


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


def _layers_text(text: str, name: str) -> tuple[int, ...]:
    spans = text.split("+")
    if not all(LAYER_SPAN_PATTERN.fullmatch(span) for span in spans):
        raise ICVSpecError(f"layers of {name!r} must be indices or spans like 0-11+14, got {text[:60]!r}")
    return _layers_checked([int(i) for span in spans for i in span.split("-")], spans, name)


def _layers_checked(bounds: list[int], spans: list[str], name: str) -> tuple[int, ...]:
    if any(i > MAX_LAYER_INDEX for i in bounds):
        raise ICVSpecError(f"layers of {name!r} must be at most {MAX_LAYER_INDEX}")
    try:
        return parse_layers("+".join(spans))
    except ValueError as e:
        raise ICVSpecError(f"layers of {name!r}: {e}") from None


def _layers_value(value: object, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        return _layers_text(value, name)
    if (not isinstance(value, (list, tuple)) or not value
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value)):
        raise ICVSpecError(f"layers of {name!r} must be a non-empty list of layer indices (integers >= 0) "
                           f"or a string like \"0-11+14\", got {repr(value)[:60]}")
    return _layers_checked(list(value), [str(i) for i in value], name)


def _choice(name: str, scale: float | None, options: dict[str, object]) -> VectorChoice:
    positions = options.get("positions", "all")
    if positions not in POSITIONS:
        raise ICVSpecError(f"positions of {name!r} must be one of {', '.join(POSITIONS)}, got {repr(positions)[:60]}")
    mode = options.get("mode")
    if mode is not None and mode not in MODES:
        raise ICVSpecError(f"mode of {name!r} must be one of {', '.join(MODES)}, got {repr(mode)[:60]}")
    layers = options.get("layers")
    if layers is not None:
        layers = _layers_value(layers, name)
    return VectorChoice(name, scale, layers, positions, mode)


def _entries_of_string(spec: str) -> list[VectorChoice]:
    if len(spec) > MAX_SPEC_CHARS:
        raise ICVSpecError(f"icv selection is longer than {MAX_SPEC_CHARS} characters")
    out = []
    for part in spec.split(","):
        part = part.strip(_SPACES)
        if not part:
            raise ICVSpecError(f"empty entry in vector spec {spec[:200]!r}")
        head, *option_texts = part.split(";")
        name, sep, scale = head.rpartition(":")
        if not sep:
            name, scale = head, None
        name = validate_name(name.strip(_SPACES))
        options: dict[str, object] = {}
        for text in option_texts:
            key, eq, value = text.strip(_SPACES).partition("=")
            key = key.strip(_SPACES)
            if not eq or key not in OPTIONS:
                raise ICVSpecError(f"option {text[:60]!r} of {name!r} must be one of "
                                   f"{', '.join(k + '=...' for k in OPTIONS)}")
            if key in options:
                raise ICVSpecError(f"option {key!r} of {name!r} is given twice")
            options[key] = value.strip(_SPACES)
        out.append(_choice(name, None if scale is None else _scale_text(scale.strip(_SPACES), name), options))
    return out


def _entries_of_list(spec: list | tuple) -> list[VectorChoice]:
    out = []
    for entry in spec:
        if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "scale", *OPTIONS}:
            shown = repr(entry)
            raise ICVSpecError('each vector must be an object {"name": str, "scale": number, "layers": ..., '
                               f'"positions": str, "mode": str}} (only name required), got {shown[:200]}')
        name = validate_name(entry["name"])
        scale = _scale_value(entry["scale"], name) if "scale" in entry else None
        out.append(_choice(name, scale, {k: entry[k] for k in OPTIONS if k in entry}))
    return out


def parse_spec(spec: object) -> tuple[VectorChoice, ...]:
    """Parse a selection (see the module docstring)."""
    if isinstance(spec, str):
        entries = _entries_of_string(spec)
    elif isinstance(spec, (list, tuple)):
        if len(spec) > MAX_VECTORS_PER_REQUEST:
            raise ICVSpecError(f"a request may combine at most {MAX_VECTORS_PER_REQUEST} vectors, got {len(spec)}")
        entries = _entries_of_list(spec)
    else:
        raise ICVSpecError("icv must be a string 'name:scale,...' or a list of "
                           f'{{"name", "scale", ...}} objects, got {type(spec).__name__}')
    if not entries:
        raise ICVSpecError("icv selects no vector")
    if len(entries) > MAX_VECTORS_PER_REQUEST:
        raise ICVSpecError(f"a request may combine at most {MAX_VECTORS_PER_REQUEST} vectors, got {len(entries)}")
    return tuple(entries)


def format_spec(choices: tuple[VectorChoice, ...] | list[VectorChoice]) -> str:
    """Canonical string form; ``parse_spec(format_spec(c)) == c`` exactly."""
    parts = []
    for c in choices:
        text = c.name if c.scale is None else f"{c.name}:{c.scale!r}"
        if c.layers is not None:
            text += f";layers={format_layers(c.layers)}"
        if c.positions != "all":
            text += f";positions={c.positions}"
        if c.mode is not None:
            text += f";mode={c.mode}"
        parts.append(text)
    return ",".join(parts)
