"""The vector selection of one OpenAI request body, made canonical.

Users write ``"icv": "polite:0.1"`` or ``"icv": [{"name": "polite", "scale":
0.1}]`` at the top level (the ``extra_body`` of the official clients), or
vLLM's own ``"vllm_xargs": {"icv": "polite:0.1"}``. On the two routes that
serve vectors all of them become ``vllm_xargs["icv"] = "<canonical spec>"``,
which vLLM turns into ``SamplingParams.extra_args`` — the same place the
offline ``LLM`` reads it, so online and offline share one code path from
there on. Every other route refuses a selection instead of dropping it
silently (:func:`refuse_selection_elsewhere`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol import EXTRA_ARGS_KEY, RESERVED_EXTRA_ARGS_KEYS
from ..spec import MAX_ABS_SCALE, MIN_ABS_SCALE, ICVSpecError, VectorChoice, format_spec, parse_spec
from .errors import ICVHTTPError
from .json_body import UnderflowFloat

ICV_FIELD = "icv"
XARGS_FIELD = "vllm_xargs"
BEAM_FIELD = "use_beam_search"
SERVED_ON = ("/v1/completions", "/v1/chat/completions")
# Keys only icv-vllm itself may set (admission, tickets, in-server extraction).
RESERVED_XARGS = RESERVED_EXTRA_ARGS_KEYS


@dataclass(frozen=True)
class Translation:
    """``body``: the rewritten body; ``spec``: the canonical selection, or None
    when the request selects no vector (e.g. ``"icv": null``); ``choices``: the
    same, parsed (admission takes it as is: the field is parsed once)."""

    body: dict
    spec: str | None
    choices: tuple[VectorChoice, ...] | None = None


def _parse(value: object, where: str) -> tuple[VectorChoice, ...]:
    try:
        choices = parse_spec(value)
    except ICVSpecError as e:
        raise ICVHTTPError(400, f"invalid {where}: {e}", ICV_FIELD) from None
    if isinstance(value, (list, tuple)):
        for entry in value:  # a JSON number like 1e-400: non-zero as written, 0.0 once parsed
            scale = entry.get("scale")
            if isinstance(scale, UnderflowFloat):
                raise ICVHTTPError(
                    400, f"invalid {where}: scale of {entry['name']!r} must be 0 or between "
                         f"{MIN_ABS_SCALE:g} and {MAX_ABS_SCALE:g} in magnitude, got {scale.literal}",
                    ICV_FIELD)
    return choices


def _reserved_in(args: object) -> str | None:
    if isinstance(args, dict):
        for key in RESERVED_XARGS:
            if key in args:
                return key
    return None


def translate_body(body: dict, has_huge_ints: bool = False) -> Translation | None:
    """Move the selection into ``vllm_xargs`` in canonical form; None when the
    body mentions no vector at all (forward it untouched). Raises
    ``ICVHTTPError`` (400) for a selection that cannot be parsed, for
    ``icv`` and ``vllm_xargs.icv`` that disagree, for reserved keys, for a
    selection with beam search, and for a body that cannot be re-encoded
    faithfully (``has_huge_ints``: see ``json_body``)."""
    xargs = body.get(XARGS_FIELD)
    if xargs is not None and not isinstance(xargs, dict):
        if body.get(ICV_FIELD) is None:
            return None  # not ours: vLLM reports its own error for vllm_xargs
        raise ICVHTTPError(
            400, f"vllm_xargs must be an object, got {type(xargs).__name__}", XARGS_FIELD)
    xargs = dict(xargs or {})
    reserved = _reserved_in(xargs)
    if reserved is not None:
        raise ICVHTTPError(400, f"vllm_xargs key {reserved!r} is reserved for icv-vllm", XARGS_FIELD)
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
    if choices is not None and body.get(BEAM_FIELD):
        raise ICVHTTPError(400, "icv cannot be combined with use_beam_search: vLLM's beam search "
                                "does not carry per-request vectors", BEAM_FIELD)
    if has_huge_ints:
        raise ICVHTTPError(400, "the request body holds an integer literal too long to parse")

    out = {k: v for k, v in body.items() if k != ICV_FIELD}
    spec = format_spec(choices) if choices is not None else None
    if spec is not None:
        xargs[EXTRA_ARGS_KEY] = spec
    if xargs:
        out[XARGS_FIELD] = xargs
    else:
        out.pop(XARGS_FIELD, None)
    return Translation(out, spec, choices)


def engine_requests(body: dict) -> int:
    """How many engine requests vLLM makes of a generate body: one per prompt
    of a batched ``/v1/completions`` (``prompt`` as a list of texts or of
    token lists, ``prompt_embeds`` as a list); ``n`` fans out later."""
    count = 0
    for key in ("prompt", "prompt_embeds"):
        value = body.get(key)
        if isinstance(value, list) and value and (key == "prompt_embeds" or isinstance(value[0], (str, list))):
            count += len(value)
        elif value is not None:
            count += 1
    return max(count, 1)


def refuse_selection_elsewhere(body: object, path: str) -> None:
    """400 when a body for a route that does not serve vectors (``/v1/messages``,
    ``/v1/responses``, ``/inference/v1/generate``, pooling, ...) carries a
    selection or a reserved key, which that route would drop or misuse."""
    if not isinstance(body, dict):
        return
    unsupported = f"is not supported on {path}; it is supported on {' and '.join(SERVED_ON)} only"
    if body.get(ICV_FIELD) is not None:
        raise ICVHTTPError(400, f"{ICV_FIELD} {unsupported}", ICV_FIELD)
    params = body.get("sampling_params")  # /inference/v1/generate takes SamplingParams as JSON
    for where, args in ((XARGS_FIELD, body.get(XARGS_FIELD)),
                        ("sampling_params.extra_args", params.get("extra_args") if isinstance(params, dict) else None)):
        param = where.split(".")[0]
        reserved = _reserved_in(args)
        if reserved is not None:
            raise ICVHTTPError(400, f"{where} key {reserved!r} is reserved for icv-vllm", param)
        if isinstance(args, dict) and args.get(EXTRA_ARGS_KEY) is not None:
            raise ICVHTTPError(400, f"{where}.{EXTRA_ARGS_KEY} {unsupported}", param)
