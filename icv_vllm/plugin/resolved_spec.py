"""The spec after the front end resolved each name to a file digest.

Stored in ``SamplingParams.extra_args["icv_resolved"]`` as
``"name@digest:scale,..."``; the scheduler hashes it into prefix-cache keys and
the workers load exactly these files. Only the front end writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..spec import RESOLVED_EXTRA_ARGS_KEY


@dataclass(frozen=True)
class ResolvedChoice:
    name: str
    digest: str
    scale: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.digest)


def format_resolved(choices: tuple[ResolvedChoice, ...]) -> str:
    return ",".join(f"{c.name}@{c.digest}:{c.scale!r}" for c in choices)


@lru_cache(maxsize=4096)
def parse_resolved(text: str) -> tuple[ResolvedChoice, ...]:
    out = []
    for part in text.split(","):
        ident, _, scale = part.rpartition(":")
        name, _, digest = ident.partition("@")
        out.append(ResolvedChoice(name, digest, float(scale)))
    return tuple(out)


def resolved_of(extra_args: dict | None) -> str | None:
    """The resolved spec of a request, or None when it selects no vector."""
    if not extra_args:
        return None
    return extra_args.get(RESOLVED_EXTRA_ARGS_KEY)
