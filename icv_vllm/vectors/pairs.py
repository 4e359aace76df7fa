"""Demonstration pairs: the input of extraction, from a JSONL file or JSON records.

A pair is ``{"input": <sentence without the style>, "target": <the same
sentence with it>}``; the ICV points from inputs to targets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable

KEYS = ("input", "target")

# The authors (shengliu66/ICV, tasks/loader.py `tokenize_each_demonstration`,
# same code in demo_notebook.ipynb) delete these 32 ASCII punctuation
# characters everywhere in a demonstration, then strip surrounding whitespace,
# before tokenizing. Nothing else (no lower-casing, no whitespace collapsing).
AUTHORS_STRIPPED_CHARACTERS = "~!@#$%^&*()_+`-={}[]|\\:;\"'<>,.?/"
_DELETE = str.maketrans("", "", AUTHORS_STRIPPED_CHARACTERS)


def clean_demonstration_text(text: str) -> str:
    """The authors' preprocessing of a demonstration sentence before extraction.

    Removes every occurrence of ``~!@#$%^&*()_+`-={}[]|\\:;"'<>,.?/`` and then
    leading/trailing whitespace (``str.strip``), exactly as their
    ``strip_special_characters``; e.g. ``"Don't, please!"`` -> ``"Dont please"``.
    Why it matters: the vector is read at the last token, and without this the
    last token of most sentences would be a period or "!" for both sides of a
    pair, so the difference would measure punctuation context instead of style.
    """
    return text.translate(_DELETE).strip()


class PairsError(ValueError):
    """Demonstration pairs that cannot be used; the message says where and why."""


def extraction_texts(pairs: "Iterable[DemoPair]", clean: bool = True) -> tuple[list[str], list[str]]:
    """Inputs and targets exactly as extraction tokenizes them (offline and in
    the server): cleaned as the authors do unless ``clean=False``; a text that
    cleaning empties is a ``PairsError`` naming the pair."""
    inputs, targets = [], []
    for pair in pairs:
        x, y = (clean_demonstration_text(t) if clean else t for t in (pair.input, pair.target))
        for key, text in (("input", x), ("target", y)):
            if not text:
                raise PairsError(f"{pair.where}: {key!r} is empty after removing punctuation")
        inputs.append(x)
        targets.append(y)
    return inputs, targets


@dataclass(frozen=True)
class DemoPair:
    input: str
    target: str
    # where the pair came from ("pairs.jsonl:3", "pairs[2]"), for later error messages
    where: str = field(default="", compare=False, repr=False)


def _pair(obj: object, where: str) -> DemoPair:
    if not isinstance(obj, dict):
        raise PairsError(f"{where}: expected an object {{\"input\": ..., \"target\": ...}}, got {type(obj).__name__}")
    missing = [k for k in KEYS if k not in obj]
    if missing:
        raise PairsError(f"{where}: missing key {', '.join(repr(k) for k in missing)}")
    extra = sorted(set(obj) - set(KEYS))
    if extra:
        raise PairsError(f"{where}: unexpected key {', '.join(repr(k) for k in extra)}; a pair has only 'input' and 'target'")
    for key in KEYS:
        value = obj[key]
        if not isinstance(value, str):
            raise PairsError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise PairsError(f"{where}: {key!r} is empty")
    return DemoPair(obj["input"], obj["target"], where)


def read_pairs_jsonl(path: str | os.PathLike) -> list[DemoPair]:
    """One JSON object per non-blank line; errors name the file and line."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PairsError(f"{name}: cannot read pairs file ({e})") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PairsError(f"{name}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        pairs.append(_pair(obj, f"{name}:{number}"))
    if not pairs:
        raise PairsError(f"{name}: no demonstration pairs (need at least one line {{\"input\": ..., \"target\": ...}})")
    return pairs


def pairs_from_records(records: object, where: str = "pairs") -> list[DemoPair]:
    """The same checks for pairs given as a JSON list (the server's API)."""
    if not isinstance(records, (list, tuple)):
        raise PairsError(f"{where}: expected a list of {{\"input\", \"target\"}} objects, got {type(records).__name__}")
    if not records:
        raise PairsError(f"{where}: no demonstration pairs")
    return [_pair(obj, f"{where}[{i}]") for i, obj in enumerate(records)]


def as_pairs(pairs: Iterable[DemoPair | tuple[str, str]]) -> list[DemoPair]:
    """Accept ``DemoPair`` or ``(input, target)`` tuples from Python callers."""
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, DemoPair):
            out.append(_pair({"input": p.input, "target": p.target}, p.where or f"pairs[{i}]"))
        elif isinstance(p, (tuple, list)) and len(p) == 2:
            out.append(_pair({"input": p[0], "target": p[1]}, f"pairs[{i}]"))
        else:
            raise PairsError(f"pairs[{i}]: expected a DemoPair or an (input, target) tuple, got {p!r}")
    if not out:
        raise PairsError("pairs: no demonstration pairs")
    return out
