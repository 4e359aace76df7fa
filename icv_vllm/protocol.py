"""What the front end (API server or offline ``LLM``), the engine core and the
workers agree on. Imports nothing heavy: every process loads it.

Flow of one request's vectors (see README, "How a selection is served"):

1. front end: ``SamplingParams.extra_args["icv"]`` (the user's selection) is
   parsed, each name resolved to its file, the file read whole, checked and
   copied into the content-addressed pinned store under its digest; the
   request carries ``extra_args["icv_resolved"] = "name@digest:scale,..."``;
2. engine core: the scheduler loads the pinned content by digest (a request
   whose content cannot be loaded finishes with an error), keeps at most
   ``max_slots`` distinct vectors among running requests when the budget is
   fixed, and ships new contents to the workers with the step that first
   needs them (``SchedulerOutput`` attribute ``STEP_VECTORS_ATTR``);
3. workers: never read a file; they copy shipped contents into their device
   bank and build the per-step token -> vector map.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

# -- extra_args keys -------------------------------------------------------------
EXTRA_ARGS_KEY = "icv"                 # what users set: the selection
RESOLVED_EXTRA_ARGS_KEY = "icv_resolved"  # set by admission only
CAPTURE_EXTRA_ARGS_KEY = "icv_capture"    # set by in-server extraction only
ADMISSION_TICKET_KEY = "icv_ticket"       # API server: selection already resolved by the HTTP layer
RESERVED_EXTRA_ARGS_KEYS = (RESOLVED_EXTRA_ARGS_KEY, CAPTURE_EXTRA_ARGS_KEY, ADMISSION_TICKET_KEY)

# -- limits ---------------------------------------------------------------------------
# Entries one request may combine; the width of the kernels' per-request tables.
MAX_VECTORS_PER_REQUEST = 4

# -- RPC and per-step transport -------------------------------------------------------------
CAPTURE_RPC_METHOD = "icv_take_captures"
# SchedulerOutput attribute: StepVectors of what the workers must add/drop this step.
STEP_VECTORS_ATTR = "icv_step_vectors"

DIGEST_HEX_CHARS = 64  # sha256 of the vector file's bytes


@dataclass(frozen=True)
class ResolvedChoice:
    """One vector of a request, pinned: name (for messages), content digest, lambda."""

    name: str
    digest: str
    scale: float


def format_resolved(choices: tuple[ResolvedChoice, ...]) -> str:
    """``"name@digest:scale,..."``; scales in ``repr`` form round-trip exactly."""
    return ",".join(f"{c.name}@{c.digest}:{c.scale!r}" for c in choices)


@lru_cache(maxsize=4096)
def parse_resolved(text: str) -> tuple[ResolvedChoice, ...]:
    """Inverse of :func:`format_resolved` (only admission writes these)."""
    out = []
    for part in text.split(","):
        ident, _, scale = part.rpartition(":")
        name, _, digest = ident.partition("@")
        out.append(ResolvedChoice(name, digest, float(scale)))
    return tuple(out)


def resolved_of(extra_args: dict | None) -> str | None:
    """The resolved selection of a request, or None when it selects no vector."""
    if not extra_args:
        return None
    return extra_args.get(RESOLVED_EXTRA_ARGS_KEY)


def digests_of(extra_args: dict | None) -> frozenset[str]:
    """Distinct vector contents a request needs (empty: unsteered)."""
    resolved = resolved_of(extra_args)
    if not resolved:
        return frozenset()
    return frozenset(c.digest for c in parse_resolved(resolved))


@dataclass
class StepVectors:
    """Engine core -> workers, attached to a step's SchedulerOutput: contents
    (fp32 [layers, hidden] tensors) the workers must hold from this step on,
    and digests no unfinished request needs any more."""

    added: dict
    dropped: list
