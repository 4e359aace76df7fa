"""Content-addressed copies of admitted vectors: ``<pin_dir>/<sha256>.safetensors``.

Admission (front end) writes a vector here, under the digest of its bytes,
before the request reaches the engine; the engine core reads it back by
digest and checks the digest again. Whatever happens to the user's directory
afterwards (deleted, overwritten, renamed), a request runs with the bytes it
was admitted with, or — if the copy cannot be read — ends with an error.
Files are written atomically and never change: one digest, one content.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from .protocol import DIGEST_HEX_CHARS
from .vectors.file_format import TENSOR_NAME, ICVHeader, load_icv

SUFFIX = ".safetensors"


class PinnedVectorError(RuntimeError):
    """A pinned copy that cannot be used (missing, unreadable, altered)."""


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pinned_path(pin_dir: Path, digest: str) -> Path:
    if len(digest) != DIGEST_HEX_CHARS or any(c not in "0123456789abcdef" for c in digest):
        raise PinnedVectorError(f"malformed vector digest {digest!r}")
    return Path(pin_dir) / f"{digest}{SUFFIX}"


def pin(pin_dir: Path, data: bytes, check=None) -> tuple[str, ICVHeader]:
    """Store ``data`` (a vector file's bytes) under its digest after full
    validation (``load_icv``: header, dtype, shape, finite values), then
    ``check(tensor, header)`` (raises to refuse). Returns (digest, header)."""
    digest = content_digest(data)
    pin_dir = Path(pin_dir)
    pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{digest[:16]}.", suffix=".tmp", dir=pin_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tensor, header = load_icv(tmp)
        if check is not None:
            check(tensor, header)
        os.chmod(tmp, 0o444)
        os.replace(tmp, pinned_path(pin_dir, digest))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest, header


def load_pinned(pin_dir: Path, digest: str) -> torch.Tensor:
    """The float32 [layers, hidden] tensor pinned under ``digest``; raises
    ``PinnedVectorError`` when it is gone, unreadable or not that content."""
    path = pinned_path(pin_dir, digest)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PinnedVectorError(f"the admitted copy of vector {digest[:12]} cannot be read "
                                f"({e.strerror or e})") from None
    if content_digest(data) != digest:
        raise PinnedVectorError(f"the admitted copy of vector {digest[:12]} was altered")
    try:  # validated in full when pinned; these bytes are those bytes
        tensor = safetensors.torch.load(data)[TENSOR_NAME]
    except Exception as e:
        raise PinnedVectorError(f"the admitted copy of vector {digest[:12]} is unusable: {e}") from None
    if tensor.dtype != torch.float32 or tensor.dim() != 2 or not bool(torch.isfinite(tensor).all()):
        raise PinnedVectorError(f"the admitted copy of vector {digest[:12]} is unusable")
    return tensor
