"""Name -> file resolution for the vector directory, shared by the front end
(admission) and the workers (loading).

A vector is identified by its name *and* a digest of its file: the digest goes
into the prefix-cache key and tells a worker that a file was replaced, so a
re-created vector never reuses KV blocks or device slots of the old one.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from ..spec import ICVSpecError, validate_name

SUFFIX = ".safetensors"


def vector_path(directory: Path, name: str) -> Path:
    """The file of ``name`` inside ``directory``; never a path outside it."""
    validate_name(name)
    path = (directory / f"{name}{SUFFIX}").resolve()
    if path.parent != directory.resolve():
        raise ICVSpecError(f"vector name {name!r} resolves outside the vector directory")
    return path


def known_names(directory: Path) -> list[str]:
    try:
        return sorted(p.name[: -len(SUFFIX)] for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except FileNotFoundError:
        return []


@lru_cache(maxsize=1024)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Content digest, recomputed only when size or mtime change."""
    st = os.stat(path)
    return _digest(str(path), st.st_size, st.st_mtime_ns)
