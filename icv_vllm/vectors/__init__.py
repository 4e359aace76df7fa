"""In-context vectors as data: the file format, the value type, demonstration
pairs and extraction.

Names are imported lazily, so ``import icv_vllm.vectors.file_format`` (what
the server does per request) does not pull in the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FORMAT": "file_format",
    "ICVFileError": "file_format",
    "ICVHeader": "file_format",
    "read_icv_header": "file_format",
    "load_icv": "file_format",
    "write_icv": "file_format",
    "ICVector": "vector",
    "DemoPair": "pairs",
    "PairsError": "pairs",
    "read_pairs_jsonl": "pairs",
    "pairs_from_records": "pairs",
    "as_pairs": "pairs",
    "clean_demonstration_text": "pairs",
    "extract_icv": "extraction",
    "icv_from_differences": "extraction",
    "residual_streams_at_last_token": "extraction",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
