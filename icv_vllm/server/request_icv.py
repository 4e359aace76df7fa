"""The vector selection of one OpenAI request body, made canonical.

Users write ``"icv": "polite:0.1"`` or ``"icv": [{"name": "polite", "scale":
0.1}]`` at the top level (the ``extra_body`` of the official clients), or
vLLM's own ``"vllm_xargs": {"icv": "polite:0.1"}``. All of them become
``vllm_xargs["icv"] = "<canonical spec>"``, which vLLM turns into
``SamplingParams.extra_args`` — the same place the offline ``LLM`` reads it,
so online and offline share one code path from there on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import EXTRA_ARGS_KEY, RESOLVED_EXTRA_ARGS_KEY, ICVSpecError, VectorChoice, format_spec, parse_spec
from .errors import ICVHTTPError

ICV_FIELD = "icv"
XARGS_FIELD = "vllm_xargs"
# Keys only the plugin itself may set (see icv_vllm.plugin.admission).
RESERVED_XARGS = (RESOLVED_EXTRA_ARGS_KEY, "icv_capture")


@dataclass(frozen=True)
class Translation:
    """``body``: the rewritten body; ``spec``: the canonical selection, or None
    when the request selects no vector (e.g. ``"icv": null``)."""

    body: dict
    spec: str | None


def _parse(value: object, where: str) -> tuple[VectorChoice, ...]:
    try:
        return parse_spec(value)
    except ICVSpecError as e:
        raise ICVHTTPError(400, f"invalid {where}: {e}", ICV_FIELD) from None


def translate_body(body: dict) -> Translation | None:
    """Move the selection into ``vllm_xargs`` in canonical form; None when the
    body mentions no vector at all (forward it untouched). Raises
    ``ICVHTTPError`` (400) for a selection that cannot be parsed, for
    ``icv`` and ``vllm_xargs.icv`` that disagree, and for reserved keys."""
    xargs = body.get(XARGS_FIELD)
    if xargs is not None and not isinstance(xargs, dict):
        if body.get(ICV_FIELD) is None:
            return None  # not ours: vLLM reports its own error for vllm_xargs
        raise ICVHTTPError(
            400, f"vllm_xargs must be an object, got {type(xargs).__name__}", XARGS_FIELD)
    xargs = dict(xargs or {})
    for key in RESERVED_XARGS:
        if key in xargs:
            raise ICVHTTPError(400, f"vllm_xargs key {key!r} is reserved for icv-vllm", XARGS_FIELD)
    if ICV_FIELD not in body and EXTRA_ARGS_KEY not in xargs:
        return None

    top = body.get(ICV_FIELD)
    inner = xargs.pop(EXTRA_ARGS_KEY, None)
    choices = _parse(top, "icv") if top is not None else None
    if inner is not None:
        inner_choices = _parse(inner, "vllm_xargs.icv")
        if choices is not None and inner_choices != choices:
            raise ICVHTTPError(
                400,
                f"icv ({format_spec(choices)!r}) and vllm_xargs.icv ({format_spec(inner_choices)!r}) "
                "disagree; give the selection once",
                ICV_FIELD,
            )
        choices = inner_choices

    out = {k: v for k, v in body.items() if k != ICV_FIELD}
    spec = format_spec(choices) if choices is not None else None
    if spec is not None:
        xargs[EXTRA_ARGS_KEY] = spec
    if xargs:
        out[XARGS_FIELD] = xargs
    else:
        out.pop(XARGS_FIELD, None)
    return Translation(out, spec)
