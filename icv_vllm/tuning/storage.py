"""Recording a recommendation in the vector file: ``recommended_scale``
metadata (``vectors/file_format``; older readers ignore it).

The tensor and every metadata key are kept as they were (keys this version
does not know included); only ``recommended_scale`` is set. The caller passes
the bytes the sweep measured, and this refuses to write when the file no
longer holds that vector (it was replaced while it was being tuned: the
recommendation would be for other content); a ``recommended_scale`` stored
meanwhile by another tune of the same vector is not a change of vector. The write is atomic (temporary file + rename) and
replaces the directory entry itself, as saving a vector does: a link is
replaced, its target left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..vectors.file_format import TENSOR_NAME, ICVFileError, check_metadata

_LENGTH_BYTES = 8
KEY = "recommended_scale"


class VectorChangedError(RuntimeError):
    """The vector file changed between the sweep and the store."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _metadata_of(data: bytes, where: str) -> dict[str, str]:
    try:
        length = int.from_bytes(data[:_LENGTH_BYTES], "little")
        raw = json.loads(data[_LENGTH_BYTES:_LENGTH_BYTES + length])
        metadata = raw.get("__metadata__") or {}
    except Exception as e:
        raise ICVFileError(f"{where}: not a readable safetensors file ({e})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ICVFileError(f"{where}: metadata values must be strings")
    return dict(metadata)


def with_recommended_scale(data: bytes, scale: float, where: str) -> bytes:
    """The bytes of the same vector file with ``recommended_scale`` set."""
    import safetensors.torch

    from ..server.vector_bytes import header_of_bytes

    header_of_bytes(data, where)  # the whole file as readers check it
    tensor = safetensors.torch.load(data)[TENSOR_NAME]
    metadata = _metadata_of(data, where)
    metadata[KEY] = repr(float(scale))
    check_metadata(where, metadata)  # refuse to write what we would refuse to read
    out = safetensors.torch.save({TENSOR_NAME: tensor}, metadata=metadata)
    header = header_of_bytes(out, where)
    if header.recommended_scale != float(scale):
        raise ICVFileError(f"{where}: recommended_scale {scale!r} does not read back")
    return out


def _same_vector(a: bytes, b: bytes, where: str) -> bool:
    """Same tensor and metadata, ``recommended_scale`` aside (another tune stored one meanwhile)."""
    import safetensors.torch
    import torch

    try:
        ma, mb = _metadata_of(a, where), _metadata_of(b, where)
        ta, tb = safetensors.torch.load(a), safetensors.torch.load(b)
    except Exception:
        return False
    ma.pop(KEY, None)
    mb.pop(KEY, None)
    return ma == mb and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta)


def store_recommended_scale(entry: str | os.PathLike, measured: bytes, scale: float) -> None:
    """Set ``recommended_scale`` in the file at ``entry``, which must still
    hold the vector in ``measured``: the same bytes, or the same tensor and
    metadata with another ``recommended_scale`` (else :class:`VectorChangedError`
    and nothing is written). Callers that share the directory with other
    writers hold their lock."""
    entry = Path(entry)
    try:
        current = entry.read_bytes()
    except FileNotFoundError:
        raise VectorChangedError(f"{entry.name} was removed while it was being tuned; nothing stored") from None
    if digest(current) != digest(measured) and not _same_vector(current, measured, entry.name):
        raise VectorChangedError(f"{entry.name} was replaced while it was being tuned; the recommendation is "
                                 "for its old content, so nothing was stored: tune it again")
    out = with_recommended_scale(current, scale, entry.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(out)
        os.chmod(tmp, 0o644)  # as write_icv: a server may run as another user
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
