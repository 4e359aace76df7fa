"""The vector file: one safetensors file per ICV.

Layout (format ``icv-vllm/1``):

- exactly one tensor, ``icv``: float32, shape ``[num_layers, hidden_size]``,
  row ``l`` is the direction added at decoder layer ``l`` (the embedding row of
  the extraction is already dropped);
- string metadata ``format``, ``model``, ``hidden_size``, ``num_layers``,
  ``method`` (``pca``, ``mean``, ``arithmetic`` or ``gguf``) and ``num_pairs``
  (absent allowed only for ``gguf`` and ``arithmetic``: not known). Other
  metadata keys are kept by readers that know them and ignored here, so later
  versions can add provenance without breaking old readers.

Optional metadata (older readers ignore it):

- ``default_mode``: ``icv`` (the paper's transform) or ``add`` (plain
  addition, as llama.cpp control vectors): what a request that names the
  vector without a ``mode`` gets; ``icv`` when absent;
- ``recommended_scale``: the strength ``icv-vllm tune`` recommends, used by a
  request that names the vector without a scale.

Shape is stored twice (tensor and metadata) on purpose: the server checks the
metadata copy per request with :func:`read_icv_header`, which reads only the
JSON header, and loading checks that both copies agree.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..protocol import MODES  # docs/method.md §2 (icv) and §7 (add)

FORMAT = "icv-vllm/1"
TENSOR_NAME = "icv"
# "gguf": imported from a llama.cpp/repeng GGUF control vector (vectors/gguf_format.py);
# how it was computed, and from how many pairs, is not known.
METHODS = ("pca", "mean", "arithmetic", "gguf")
REQUIRED_METADATA = ("format", "model", "hidden_size", "num_layers", "method", "num_pairs")
# methods whose files may omit num_pairs (unknown: an imported vector, or arithmetic on one)
UNKNOWN_PAIRS_METHODS = ("gguf", "arithmetic")
_POSITIVE_INT = re.compile(r"[1-9][0-9]*")


class ICVFileError(ValueError):
    """A vector file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ICVHeader:
    """What a vector file says about itself, checked, without its tensor data."""

    path: str
    model: str
    num_layers: int
    hidden_size: int
    method: str
    num_pairs: int | None  # None: not known (method gguf, or arithmetic on such a vector)
    default_mode: str = "icv"
    recommended_scale: float | None = None


def _fail(path: str | os.PathLike, problem: str) -> ICVFileError:
    return ICVFileError(f"{os.fspath(path)}: {problem}")


def _positive_int(path, metadata: dict[str, str], key: str) -> int:
    value = metadata[key]
    if not _POSITIVE_INT.fullmatch(value):
        raise _fail(path, f"metadata {key!r} must be a positive integer, got {value!r}")
    return int(value)


def check_metadata(path, metadata: dict[str, str] | None) -> ICVHeader:
    """Validate the metadata block; shape is checked against the tensor by the caller."""
    if not metadata:
        raise _fail(path, f"no metadata; an {FORMAT} vector file needs {', '.join(REQUIRED_METADATA)}")
    missing = [k for k in REQUIRED_METADATA if k not in metadata
               and not (k == "num_pairs" and metadata.get("method") in UNKNOWN_PAIRS_METHODS)]
    if missing:
        raise _fail(path, f"metadata is missing {', '.join(repr(k) for k in missing)}")
    if metadata["format"] != FORMAT:
        raise _fail(path, f"format is {metadata['format']!r}; this version reads {FORMAT!r}")
    if metadata["method"] not in METHODS:
        raise _fail(path, f"method {metadata['method']!r} is not one of {', '.join(METHODS)}")
    if not metadata["model"].strip():
        raise _fail(path, "metadata 'model' is empty")
    default_mode = metadata.get("default_mode", "icv")
    if default_mode not in MODES:
        raise _fail(path, f"default_mode {default_mode!r} is not one of {', '.join(MODES)}")
    return ICVHeader(
        path=os.fspath(path),
        model=metadata["model"],
        num_layers=_positive_int(path, metadata, "num_layers"),
        hidden_size=_positive_int(path, metadata, "hidden_size"),
        method=metadata["method"],
        num_pairs=_positive_int(path, metadata, "num_pairs") if "num_pairs" in metadata else None,
        default_mode=default_mode,
        recommended_scale=_recommended_scale(path, metadata.get("recommended_scale")),
    )


def _recommended_scale(path, text: str | None) -> float | None:
    if text is None:
        return None
    from ..spec import ICVSpecError, parse_scale

    try:
        value = parse_scale(text, "recommended_scale")
    except ICVSpecError as e:
        raise _fail(path, f"metadata {e}") from None
    if value == 0.0:
        raise _fail(path, "metadata recommended_scale must not be 0")
    return value


def _open(path):
    try:
        return safe_open(os.fspath(path), framework="pt")
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except (SafetensorError, OSError) as e:
        raise _fail(path, f"not a readable safetensors file ({e})") from None


def _check_open(path, handle) -> ICVHeader:
    keys = list(handle.keys())
    if keys != [TENSOR_NAME]:
        raise _fail(path, f"must hold exactly one tensor named {TENSOR_NAME!r}, found {keys}")
    header = check_metadata(path, handle.metadata())
    tensor_slice = handle.get_slice(TENSOR_NAME)
    dtype = tensor_slice.get_dtype()
    if dtype != "F32":
        raise _fail(path, f"tensor {TENSOR_NAME!r} has dtype {dtype}; it must be float32 (F32)")
    shape = tuple(tensor_slice.get_shape())
    if len(shape) != 2:
        raise _fail(path, f"tensor {TENSOR_NAME!r} must be 2-D [num_layers, hidden_size], got shape {list(shape)}")
    if shape != (header.num_layers, header.hidden_size):
        raise _fail(
            path,
            f"tensor shape {list(shape)} does not match metadata num_layers={header.num_layers}, "
            f"hidden_size={header.hidden_size}",
        )
    return header


def read_icv_header(path: str | os.PathLike) -> ICVHeader:
    """Check a vector file's header (metadata, tensor name, dtype, shape) without
    reading its values: cheap enough for the server to run on every request."""
    with _open(path) as handle:
        return _check_open(path, handle)


def load_icv(path: str | os.PathLike) -> tuple[torch.Tensor, ICVHeader]:
    """Read and fully validate a vector file; values must be finite."""
    with _open(path) as handle:
        header = _check_open(path, handle)
        try:
            tensor = handle.get_tensor(TENSOR_NAME)
        except (SafetensorError, OSError) as e:
            raise _fail(path, f"cannot read tensor data ({e})") from None
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise _fail(path, f"tensor {TENSOR_NAME!r} has {bad} non-finite values (NaN or inf)")
    return tensor, header


def write_icv(path: str | os.PathLike, tensor: torch.Tensor, *, model: str, method: str, num_pairs: int | None,
              default_mode: str = "icv", recommended_scale: float | None = None) -> None:
    """Write a vector file atomically (temporary file + rename), so a server
    reading the directory never sees half a file. The optional keys are
    written only when they differ from their defaults."""
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        raise ValueError(f"an ICV is a 2-D tensor [num_layers, hidden_size], got {getattr(tensor, 'shape', tensor)!r}")
    tensor = tensor.detach().to("cpu", torch.float32).contiguous()
    metadata = {
        "format": FORMAT,
        "model": str(model),
        "hidden_size": str(tensor.shape[1]),
        "num_layers": str(tensor.shape[0]),
        "method": str(method),
    }
    if num_pairs is not None:  # None: not known; check_metadata allows it for UNKNOWN_PAIRS_METHODS only
        metadata["num_pairs"] = str(num_pairs)
    if default_mode != "icv":
        metadata["default_mode"] = str(default_mode)
    if recommended_scale is not None:
        metadata["recommended_scale"] = repr(float(recommended_scale))
    check_metadata(path, metadata)  # refuse to write what we would refuse to read
    if not torch.isfinite(tensor).all():
        raise _fail(path, "refusing to write non-finite values (NaN or inf)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({TENSOR_NAME: tensor}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a server may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
