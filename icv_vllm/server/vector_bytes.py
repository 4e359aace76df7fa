"""A vector file's header, checked from bytes already read.

The management API lists files it has read through ``read_vector_bytes``
(which refuses FIFOs, directories and oversize files before reading), so it
must not reopen them by path with ``safe_open``: the name could point at a
FIFO by then. Same checks and messages as ``file_format.read_icv_header``.
"""

from __future__ import annotations

import json

import safetensors.torch

from ..vectors.file_format import TENSOR_NAME, ICVFileError, ICVHeader, check_metadata

_LENGTH_BYTES = 8


def _fail(where: str, problem: str) -> ICVFileError:
    return ICVFileError(f"{where}: {problem}")


def header_of_bytes(data: bytes, where: str) -> ICVHeader:
    """The checked header of a whole vector file's bytes; ``where`` names it in errors."""
    try:
        tensors = safetensors.torch.load(data)  # the layout: offsets, sizes, dtypes
        length = int.from_bytes(data[:_LENGTH_BYTES], "little")
        raw = json.loads(data[_LENGTH_BYTES:_LENGTH_BYTES + length])
    except Exception as e:  # safetensors raises its own error types for broken files
        raise _fail(where, f"not a readable safetensors file ({e})") from None
    metadata = raw.get("__metadata__") if isinstance(raw, dict) else None
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(where, "metadata values must be strings")
    keys = sorted(tensors)
    if keys != [TENSOR_NAME]:
        raise _fail(where, f"must hold exactly one tensor named {TENSOR_NAME!r}, found {keys}")
    header = check_metadata(where, metadata)
    tensor = tensors[TENSOR_NAME]
    dtype = raw[TENSOR_NAME].get("dtype")
    if dtype != "F32":
        raise _fail(where, f"tensor {TENSOR_NAME!r} has dtype {dtype}; it must be float32 (F32)")
    shape = tuple(tensor.shape)
    if len(shape) != 2:
        raise _fail(where, f"tensor {TENSOR_NAME!r} must be 2-D [num_layers, hidden_size], got shape {list(shape)}")
    if shape != (header.num_layers, header.hidden_size):
        raise _fail(where, f"tensor shape {list(shape)} does not match metadata num_layers={header.num_layers}, "
                           f"hidden_size={header.hidden_size}")
    return header
