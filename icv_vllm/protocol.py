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

from dataclasses import dataclass, replace
from functools import lru_cache

# -- extra_args keys -------------------------------------------------------------
EXTRA_ARGS_KEY = "icv"                 # what users set: the selection
RESOLVED_EXTRA_ARGS_KEY = "icv_resolved"  # set by admission only
CAPTURE_EXTRA_ARGS_KEY = "icv_capture"    # set by in-server extraction only
ADMISSION_TICKET_KEY = "icv_ticket"       # API server: selection already resolved by the HTTP layer
RESERVED_EXTRA_ARGS_KEYS = (RESOLVED_EXTRA_ARGS_KEY, CAPTURE_EXTRA_ARGS_KEY, ADMISSION_TICKET_KEY)

# -- limits ---------------------------------------------------------------------------
# Entries one request may combine.
MAX_VECTORS_PER_REQUEST = 4
# Kernel table columns: ICV entries (averaged, docs/method.md §2) first, then
# add entries (plain addition, §7); each request fits in either group.
ICV_COLUMNS = MAX_VECTORS_PER_REQUEST
ENTRY_COLUMNS = 2 * MAX_VECTORS_PER_REQUEST

# -- per-vector options (docs/method.md §7) ----------------------------------------------
POSITIONS = ("all", "prompt", "generated")
MODES = ("icv", "add")

# -- RPC and per-step transport -------------------------------------------------------------
CAPTURE_RPC_METHOD = "icv_take_captures"
# SchedulerOutput attribute: StepVectors of what the workers must add/drop this step.
STEP_VECTORS_ATTR = "icv_step_vectors"

DIGEST_HEX_CHARS = 64  # sha256 of the vector file's bytes


def format_layers(layers: tuple[int, ...]) -> str:
    """Sorted distinct layer indices as spans: (0, 1, 2, 5) -> "0-2+5"."""
    spans, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            spans.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return "+".join(spans)


def parse_layers(text: str) -> tuple[int, ...]:
    """Inverse of :func:`format_layers` (sorted, distinct). Raises ValueError."""
    layers: set[int] = set()
    for span in text.split("+"):
        first, sep, last = span.partition("-")
        lo, hi = int(first), int(last) if sep else int(first)
        if lo > hi:
            raise ValueError(f"layer span {span!r} runs backwards")
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers))


@dataclass(frozen=True)
class ResolvedChoice:
    """One vector of a request, pinned: name (for messages), content digest,
    lambda, and where it applies: decoder layers (None = all), token
    positions, mode."""

    name: str
    digest: str
    scale: float
    layers: tuple[int, ...] | None = None
    positions: str = "all"
    mode: str = "icv"

    @property
    def affects_prompt(self) -> bool:
        return self.positions != "generated"

    @property
    def affects_generated(self) -> bool:
        return self.positions != "prompt"


def format_resolved(choices: tuple[ResolvedChoice, ...]) -> str:
    """``"name@digest:scale[;layers=..][;positions=..][;mode=add],..."``;
    defaults are left out; scales in ``repr`` form round-trip exactly."""
    parts = []
    for c in choices:
        text = f"{c.name}@{c.digest}:{c.scale!r}"
        if c.layers is not None:
            text += f";layers={format_layers(c.layers)}"
        if c.positions != "all":
            text += f";positions={c.positions}"
        if c.mode != "icv":
            text += f";mode={c.mode}"
        parts.append(text)
    return ",".join(parts)


@lru_cache(maxsize=4096)
def parse_resolved(text: str) -> tuple[ResolvedChoice, ...]:
    """Inverse of :func:`format_resolved` (only admission writes these)."""
    out = []
    for part in text.split(","):
        head, *options = part.split(";")
        ident, _, scale = head.rpartition(":")
        name, _, digest = ident.partition("@")
        fields = dict(option.split("=", 1) for option in options)
        layers = parse_layers(fields["layers"]) if "layers" in fields else None
        out.append(ResolvedChoice(name, digest, float(scale), layers,
                                  fields.get("positions", "all"), fields.get("mode", "icv")))
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


@lru_cache(maxsize=4096)
def prefix_cache_keys(resolved: str) -> tuple[str | None, str | None]:
    """(key of prompt blocks, key of blocks holding generated tokens): what
    changes the KV of each. A ``generated``-only entry leaves the prompt's
    KV as unsteered, so such a selection shares the unsteered prompt's
    cache; ``all`` and ``prompt`` steer prompt tokens alike, so they share
    prompt blocks too."""
    choices = parse_resolved(resolved)
    prompt = tuple(replace(c, positions="all") for c in choices if c.affects_prompt)
    return (format_resolved(prompt) if prompt else None), resolved


@dataclass
class StepVectors:
    """Engine core -> workers, attached to a step's SchedulerOutput: contents
    (fp32 [layers, hidden] tensors) the workers must hold from this step on,
    and digests no unfinished request needs any more."""

    added: dict
    dropped: list
