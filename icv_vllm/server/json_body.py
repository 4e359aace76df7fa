"""Parsing a request body as the rest of the server would, without its 500s.

Python's ``json`` (what FastAPI and vLLM use) raises ``RecursionError`` for
deeply nested input and ``ValueError`` for an integer literal longer than
``sys.get_int_max_str_digits()``; unhandled, either becomes a 500 (or a
dropped connection once a stream has started). Here both are 400s, and the
values the selection grammar must judge stay judgeable:

- an integer literal too long to convert becomes :class:`HugeInt` (a stand-in
  the selection check refuses by type; a body that carries one anywhere else
  is refused rather than forwarded with a changed value);
- a float literal that rounds to 0 although it is not zero (``1e-400``)
  becomes :class:`UnderflowFloat`: still 0.0 to everyone, but recognisable.
"""

from __future__ import annotations

import json
import re
import sys

from .errors import ICVHTTPError

# Bodies with fewer brackets than this cannot nest deeply enough to fail.
MAX_SAFE_BRACKETS = 256
_NONZERO_MANTISSA = re.compile(r"[1-9]")


class HugeInt(int):
    """An integer literal with more digits than Python converts; its value is
    a stand-in (10**120, signed), ``digits`` the literal's length."""

    digits: int = 0


class UnderflowFloat(float):
    """A non-zero float literal that rounds to 0.0; ``literal`` is its text."""

    literal: str = ""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits <= _int_digit_limit():
        return int(text)
    out = HugeInt(-(10 ** 120) if text.startswith("-") else 10 ** 120)
    out.digits = digits
    return out


def _parse_float(text: str) -> float:
    value = float(text)
    if value == 0.0 and _NONZERO_MANTISSA.search(re.split(r"[eE]", text)[0]):
        out = UnderflowFloat(value)
        out.literal = text[:40]
        return out
    return value


def _int_digit_limit() -> int:
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    return limit if limit > 0 else 1 << 30


def load_body(body: bytes) -> tuple[object, bool]:
    """(the parsed body, whether it holds a :class:`HugeInt`). ``ValueError``
    when it is not JSON (callers let vLLM answer that itself); ``ICVHTTPError``
    400 when it nests too deeply for Python to parse."""
    try:
        try:
            return json.loads(body, parse_float=_parse_float), False
        except ValueError as e:
            if "integer string conversion" not in str(e):
                raise
        # rare: only now pay a Python call per integer literal
        return json.loads(body, parse_int=_parse_int, parse_float=_parse_float), True
    except RecursionError:
        raise ICVHTTPError(400, "the request body is nested too deeply to parse") from None


def may_be_too_deep(body: bytes) -> bool:
    """Cheap (C-speed) test: could this body make ``json.loads`` recurse too deeply?"""
    return body.count(b"[") + body.count(b"{") > MAX_SAFE_BRACKETS
