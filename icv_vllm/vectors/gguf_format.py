"""llama.cpp / repeng GGUF control vectors <-> the ``icv-vllm/1`` vector file.

The GGUF layout (docs/gguf_control_vectors.md, read from llama.cpp's and
repeng's source):

- ``general.architecture`` = ``controlvector``;
- ``controlvector.model_hint``: a string naming the model family
  (llama.cpp's cvector-generator writes the model's GGUF architecture,
  repeng the Hugging Face ``model_type``); llama.cpp does not read it;
- ``controlvector.layer_count``: an integer, the number of direction tensors
  in the file (INT32 from llama.cpp, UINT32 from repeng); llama.cpp does not
  read it;
- one 1-D F32 tensor ``direction.N`` of ``hidden_size`` values per steered
  layer: it is added to the output of decoder block ``N`` (0-based), after
  the feed-forward residual add — row ``N`` of our tensor. llama.cpp refuses
  ``direction.0`` (block 0 cannot be steered); repeng writes it only when asked
  to steer block 0, and applies it there, so it is read as row 0 here.

Reading is stricter than llama.cpp's loader in ways that only refuse files
it would misread or half-use: every tensor must be ``direction.N`` with ``N``
in canonical decimal, F32, 1-D, all of one size, finite; ``N`` must be a
layer of the model. Missing layers are zero rows, which in ``add`` mode is
exactly "no change". Unknown metadata keys are ignored (llama.cpp ignores
them too) and reported by :attr:`GGUFControlVector.ignored_keys`.

Writing never drops data silently: row 0 cannot be written in llama.cpp's
layout, so a nonzero row 0 is refused unless the caller asks to drop it.

A converted safetensors file records the GGUF layout it came from
(``gguf_layout`` metadata: model hint, layer count and its type, the
directions in file order), so converting it back gives the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .file_format import FORMAT, TENSOR_NAME, ICVFileError, ICVHeader, check_metadata, load_icv

ARCHITECTURE = "controlvector"
KEY_ARCHITECTURE = "general.architecture"
KEY_MODEL_HINT = f"{ARCHITECTURE}.model_hint"
KEY_LAYER_COUNT = f"{ARCHITECTURE}.layer_count"
TENSOR_PREFIX = "direction."
METHOD = "gguf"  # file_format.METHODS: imported, computed by unknown means
DEFAULT_MODE = "add"  # llama.cpp adds a control vector: h += scale * v
LAYOUT_KEY = "gguf_layout"  # safetensors metadata: the GGUF layout a vector was converted from
_DIRECTION = re.compile(r"direction\.(0|[1-9][0-9]*)")
_INTEGER_TYPES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")

# Cheap limits checked before GGUFReader parses the file: the reader spends
# tens of microseconds per array element, and a control vector has no arrays.
MAX_KV = 256
MAX_TENSORS = 4096
MAX_ARRAY_ELEMENTS = 4096
_SUPPORTED_VERSIONS = (2, 3)


def _fail(where: str, problem: str) -> ICVFileError:
    return ICVFileError(f"{where}: {problem}")


def _gguf(where: str):
    """The ``gguf`` library (vLLM's CPU wheel does not install it)."""
    try:
        import gguf
    except ImportError:
        raise _fail(where, "GGUF control vectors need the 'gguf' package: pip install 'gguf>=0.10'") from None
    return gguf


@dataclass(frozen=True)
class GGUFLayout:
    """What a GGUF control vector says besides its values: enough to write the same file."""

    model_hint: str
    layer_count: int | None  # the controlvector.layer_count value; None when the file has none
    layer_count_type: str  # GGUFValueType name, e.g. INT32 (llama.cpp) or UINT32 (repeng)
    directions: tuple[int, ...]  # the layer of each direction tensor, in file order

    def to_json(self) -> str:
        return json.dumps({"model_hint": self.model_hint, "layer_count": self.layer_count,
                           "layer_count_type": self.layer_count_type, "directions": list(self.directions)},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str) -> "GGUFLayout":
        try:
            raw = json.loads(text)
            layout = cls(model_hint=raw["model_hint"], layer_count=raw["layer_count"],
                         layer_count_type=raw["layer_count_type"], directions=tuple(raw["directions"]))
        except (ValueError, TypeError, KeyError) as e:
            raise _fail(where, f"metadata {LAYOUT_KEY!r} is not a GGUF layout ({e})") from None
        ok = (isinstance(layout.model_hint, str)
              and (layout.layer_count is None or (isinstance(layout.layer_count, int)
                                                   and not isinstance(layout.layer_count, bool)))
              and layout.layer_count_type in _INTEGER_TYPES
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in layout.directions)
              and len(set(layout.directions)) == len(layout.directions))
        if not ok:
            raise _fail(where, f"metadata {LAYOUT_KEY!r} is not a GGUF layout: {text[:200]!r}")
        return layout


@dataclass(frozen=True)
class GGUFControlVector:
    tensor: torch.Tensor  # float32 [num_layers, hidden_size]; rows without a direction are zero
    layout: GGUFLayout
    ignored_keys: tuple[str, ...] = field(default=())  # metadata keys llama.cpp ignores, and so do we

    @property
    def num_layers(self) -> int:
        return self.tensor.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.tensor.shape[1]


# -- reading ------------------------------------------------------------------------------------

def _prescan(data: bytes, where: str) -> None:
    """Refuse what would make GGUFReader slow or is not a control vector GGUF
    at all, from the fixed header and the key/value section only."""
    if len(data) < 24 or data[:4] != b"GGUF":
        raise _fail(where, "not a GGUF file (no GGUF magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in _SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise _fail(where, "is a big-endian GGUF file; only little-endian (as llama.cpp writes) is read")
        raise _fail(where, f"GGUF version {version} is not supported (2 or 3)")
    if n_kv > MAX_KV:
        raise _fail(where, f"has {n_kv} metadata keys; a control vector has 3 (at most {MAX_KV} are read)")
    if n_tensors > MAX_TENSORS:
        raise _fail(where, f"has {n_tensors} tensors; a control vector has one per layer (at most {MAX_TENSORS})")
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    budget = [MAX_ARRAY_ELEMENTS]
    off = 24

    def need(n: int) -> None:
        if off + n > len(data):
            raise _fail(where, "is truncated (its metadata runs past the end of the file)")

    def skip_value(vtype: int) -> None:
        nonlocal off
        if vtype in sizes:
            need(sizes[vtype])
            off += sizes[vtype]
        elif vtype == 8:  # string
            need(8)
            (n,) = struct.unpack_from("<Q", data, off)
            need(8 + n)
            off += 8 + n
        elif vtype == 9:  # array
            need(12)
            itype, n = struct.unpack_from("<IQ", data, off)
            off += 12
            budget[0] -= n
            if budget[0] < 0:
                raise _fail(where, f"holds metadata arrays of more than {MAX_ARRAY_ELEMENTS} elements; "
                                   "a control vector has none")
            if itype in sizes:
                need(n * sizes[itype])
                off += n * sizes[itype]
            else:
                for _ in range(n):
                    skip_value(itype)
        else:
            raise _fail(where, f"metadata value type {vtype} is not a GGUF type")

    for _ in range(n_kv):
        skip_value(8)  # the key
        need(4)
        (vtype,) = struct.unpack_from("<I", data, off)
        off += 4
        skip_value(vtype)


def _open_reader(data: bytes, where: str):
    """GGUFReader over bytes already read (the reader maps a file: an
    anonymous in-memory one, never the user's path again)."""
    GGUFReader = _gguf(where).GGUFReader
    try:
        fd = os.memfd_create("icv-gguf", getattr(os, "MFD_CLOEXEC", 0))
        handle = os.fdopen(fd, "w+b")
    except (AttributeError, OSError):
        handle = tempfile.TemporaryFile()
    with handle:
        handle.write(data)
        handle.flush()
        try:
            return GGUFReader(handle)
        except Exception as e:  # the reader raises ValueError, KeyError, IndexError, UnicodeError ...
            raise _fail(where, f"not a readable GGUF file ({type(e).__name__}: {e})") from None


def _string_field(reader, key: str, where: str, required: bool) -> str | None:
    GGUFValueType = _gguf(where).GGUFValueType
    f = reader.get_field(key)
    if f is None:
        if required:
            raise _fail(where, f"metadata is missing {key!r}")
        return None
    if f.types != [GGUFValueType.STRING]:
        raise _fail(where, f"metadata {key!r} must be a string, got {'/'.join(t.name for t in f.types)}")
    try:
        return bytes(f.parts[-1]).decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(where, f"metadata {key!r} is not UTF-8") from None


def parse_gguf(data: bytes, where: str, num_layers: int | None = None) -> GGUFControlVector:
    """A GGUF control vector's bytes -> float32 ``[num_layers, hidden]``.

    ``num_layers``: the model's decoder layers (rows; a direction beyond them
    is refused); ``None``: the highest direction + 1. Raises ``ICVFileError``
    naming ``where`` and the problem."""
    where = os.fspath(where)
    _prescan(data, where)
    reader = _open_reader(data, where)
    GGMLQuantizationType = _gguf(where).GGMLQuantizationType

    arch = _string_field(reader, KEY_ARCHITECTURE, where, required=True)
    if arch != ARCHITECTURE:
        raise _fail(where, f"is a GGUF file of architecture {arch!r}, not a control vector "
                           f"({KEY_ARCHITECTURE} must be {ARCHITECTURE!r})")
    model_hint = _string_field(reader, KEY_MODEL_HINT, where, required=True)
    if not model_hint.strip():
        raise _fail(where, f"metadata {KEY_MODEL_HINT!r} is empty")
    layer_count, layer_count_type = None, "INT32"
    f = reader.get_field(KEY_LAYER_COUNT)
    if f is not None:
        if len(f.types) != 1 or f.types[0].name not in _INTEGER_TYPES:
            raise _fail(where, f"metadata {KEY_LAYER_COUNT!r} must be an integer, "
                               f"got {'/'.join(t.name for t in f.types)}")
        layer_count, layer_count_type = int(f.parts[-1][0]), f.types[0].name
        if layer_count < 0:
            raise _fail(where, f"metadata {KEY_LAYER_COUNT!r} is negative ({layer_count})")
    known = {KEY_ARCHITECTURE, KEY_MODEL_HINT, KEY_LAYER_COUNT, "general.alignment"}
    ignored = tuple(k for k in reader.fields if not k.startswith("GGUF.") and k not in known)

    if not reader.tensors:
        raise _fail(where, "holds no direction tensors")
    rows: dict[int, np.ndarray] = {}
    order: list[int] = []
    hidden = None
    for t in reader.tensors:
        m = _DIRECTION.fullmatch(t.name)
        if m is None:
            raise _fail(where, f"tensor {t.name!r} is not a control vector direction; tensors must be "
                               f"named {TENSOR_PREFIX}N, N the layer (decimal, no leading zeros)")
        layer = int(m.group(1))
        if layer in rows:  # the reader refuses duplicate names; kept for safety
            raise _fail(where, f"layer {layer} has two direction tensors")
        if t.tensor_type != GGMLQuantizationType.F32:
            raise _fail(where, f"tensor {t.name!r} has type {t.tensor_type.name}; directions must be F32")
        if len(t.shape) != 1:
            raise _fail(where, f"tensor {t.name!r} has shape {[int(d) for d in t.shape]}; "
                               "directions must be 1-D [hidden_size]")
        size = int(t.shape[0])
        if size == 0:
            raise _fail(where, f"tensor {t.name!r} is empty")
        if hidden is None:
            hidden = size
        elif size != hidden:
            raise _fail(where, f"tensor {t.name!r} has {size} values but {TENSOR_PREFIX}{order[0]} "
                               f"has {hidden}; all directions must have the model's hidden size")
        values = np.array(t.data, dtype=np.float32, copy=True).reshape(size)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise _fail(where, f"tensor {t.name!r} has {bad} non-finite values (NaN or inf)")
        rows[layer] = values
        order.append(layer)
    highest = max(rows)
    if num_layers is None:
        num_layers = highest + 1
    elif highest >= num_layers:
        raise _fail(where, f"tensor {TENSOR_PREFIX}{highest} steers layer {highest}, but the model has "
                           f"{num_layers} layers (0..{num_layers - 1})")
    array = np.zeros((num_layers, hidden), dtype=np.float32)
    for layer, values in rows.items():
        array[layer] = values
    tensor = torch.from_numpy(array)
    layout = GGUFLayout(model_hint=model_hint, layer_count=layer_count,
                        layer_count_type=layer_count_type, directions=tuple(order))
    return GGUFControlVector(tensor=tensor, layout=layout, ignored_keys=ignored)


def read_gguf(path: str | os.PathLike, num_layers: int | None = None) -> GGUFControlVector:
    """:func:`parse_gguf` of a file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise _fail(os.fspath(path), "no such file") from None
    except OSError as e:
        raise _fail(os.fspath(path), f"cannot be read ({e.strerror or e})") from None
    return parse_gguf(data, os.fspath(path), num_layers)


# -- the icv-vllm/1 file of an imported vector ---------------------------------------------------

def icv_metadata(vector: GGUFControlVector) -> dict[str, str]:
    """The safetensors metadata of an imported vector: method ``gguf``, no
    ``num_pairs`` (not known), ``default_mode`` ``add``, and its GGUF layout."""
    return {
        "format": FORMAT,
        "model": vector.layout.model_hint,
        "hidden_size": str(vector.hidden_size),
        "num_layers": str(vector.num_layers),
        "method": METHOD,
        "default_mode": DEFAULT_MODE,
        LAYOUT_KEY: vector.layout.to_json(),
    }


def safetensors_bytes(tensor: torch.Tensor, metadata: dict[str, str], where: str = "<vector>") -> bytes:
    """An ``icv-vllm/1`` file's bytes, deterministically (the safetensors
    library writes metadata in hash order, so the same vector would get a
    new digest, and a new pinned copy, every time it is converted)."""
    check_metadata(where, metadata)
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if array.ndim != 2 or array.shape != (int(metadata["num_layers"]), int(metadata["hidden_size"])):
        raise _fail(where, f"tensor shape {list(array.shape)} does not match its metadata")
    if not np.isfinite(array).all():
        raise _fail(where, "refusing to write non-finite values (NaN or inf)")
    payload = array.astype("<f4", copy=False).tobytes()
    header = {"__metadata__": dict(sorted(metadata.items())),
              TENSOR_NAME: {"dtype": "F32", "shape": list(array.shape), "data_offsets": [0, len(payload)]}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)  # as the safetensors library pads it
    return struct.pack("<Q", len(text)) + text + payload


_CONVERTED: OrderedDict[tuple[str, int | None], tuple[bytes, GGUFControlVector]] = OrderedDict()
_CONVERTED_MAX = 16
_CONVERTED_LOCK = threading.Lock()


def gguf_to_icv_bytes(data: bytes, where: str, num_layers: int | None = None) -> tuple[bytes, GGUFControlVector]:
    """A GGUF control vector's bytes -> the bytes of the same vector as an
    ``icv-vllm/1`` file (padded to ``num_layers``), and the parsed vector.
    Admission converts on every request: the last few results are kept by
    the content's digest (an identical file gives identical bytes anyway)."""
    key = (hashlib.sha256(data).hexdigest(), num_layers)
    with _CONVERTED_LOCK:
        hit = _CONVERTED.get(key)
        if hit is not None:
            _CONVERTED.move_to_end(key)
            data_bytes, vector = hit
            return data_bytes, GGUFControlVector(vector.tensor.clone(), vector.layout, vector.ignored_keys)
    vector = parse_gguf(data, where, num_layers)
    result = (safetensors_bytes(vector.tensor, icv_metadata(vector), where), vector)
    with _CONVERTED_LOCK:
        _CONVERTED[key] = result
        while len(_CONVERTED) > _CONVERTED_MAX:
            _CONVERTED.popitem(last=False)
    return result


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gguf_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike,
                        num_layers: int | None = None) -> GGUFControlVector:
    """Convert a GGUF control vector file to an ``icv-vllm/1`` file (atomic write)."""
    vector = read_gguf(src, num_layers)
    _atomic_write(Path(dst), safetensors_bytes(vector.tensor, icv_metadata(vector), os.fspath(dst)))
    return vector


# -- writing GGUF ------------------------------------------------------------------------------

class LayerZeroError(ICVFileError):
    """Row 0 is nonzero, and llama.cpp's layout cannot hold it."""


def _stored_layout(metadata: dict[str, str], tensor: torch.Tensor, where: str) -> GGUFLayout | None:
    """The GGUF layout an imported vector came from, if it still describes the
    tensor: its directions are rows of it, and every other row is zero."""
    text = metadata.get(LAYOUT_KEY)
    if text is None:
        return None
    layout = GGUFLayout.from_json(text, where)
    listed = set(layout.directions)
    if any(d >= tensor.shape[0] for d in listed):
        return None
    unlisted = [r for r in range(tensor.shape[0]) if r not in listed]
    if unlisted and bool(tensor[unlisted].any()):
        return None
    return layout


def write_gguf(path: str | os.PathLike, tensor: torch.Tensor, *, model_hint: str,
               layout: GGUFLayout | None = None, drop_layer_0: bool = False,
               source: str | os.PathLike | None = None) -> GGUFLayout:
    """Write ``tensor`` (float32 ``[num_layers, hidden]``) as a llama.cpp
    control vector (atomic write). ``layout`` (an imported vector's) fixes
    which directions are written, in which order, and the layer count and its
    type; without it, ``direction.1`` .. ``direction.{num_layers-1}`` in order
    and ``layer_count`` = their number as INT32, as llama.cpp's
    cvector-generator writes. Row 0 cannot be written: when it is nonzero this
    raises ``LayerZeroError`` (naming ``source``, the file converted, if given)
    unless ``drop_layer_0``. Returns the layout written."""
    path = Path(path)
    where = os.fspath(path)
    gguf = _gguf(where)
    tensor = tensor.detach().to("cpu", torch.float32).contiguous()
    if tensor.ndim != 2 or 0 in tensor.shape:
        raise _fail(where, f"a vector is a non-empty 2-D tensor [num_layers, hidden_size], got {list(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise _fail(where, "refusing to write non-finite values (NaN or inf)")
    if not model_hint.strip():
        raise _fail(where, "the model hint is empty")
    if bool(tensor[0].any()) and not drop_layer_0:
        raise LayerZeroError(
            f"{os.fspath(source) if source is not None else where}: row 0 (decoder layer 0) is nonzero, but a llama.cpp control vector cannot steer "
            f"layer 0 (its loader refuses direction.0); drop it explicitly to write layers "
            f"1..{tensor.shape[0] - 1} only")
    if layout is None:
        directions = tuple(range(1, tensor.shape[0]))
        layout = GGUFLayout(model_hint=model_hint, layer_count=len(directions),
                            layer_count_type="INT32", directions=directions)
    else:
        directions = tuple(d for d in layout.directions if d != 0)
        layout = GGUFLayout(model_hint=model_hint, layer_count=layout.layer_count,
                            layer_count_type=layout.layer_count_type, directions=directions)
    if not directions:
        raise _fail(where, "no layer to write: llama.cpp's layout starts at layer 1, and this vector has one layer")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(KEY_MODEL_HINT, model_hint)
        if layout.layer_count is not None:
            writer.add_key_value(KEY_LAYER_COUNT, layout.layer_count, gguf.GGUFValueType[layout.layer_count_type])
        for d in directions:
            writer.add_tensor(f"{TENSOR_PREFIX}{d}", tensor[d].numpy().copy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return layout


def safetensors_to_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, model_hint: str | None = None,
                        drop_layer_0: bool = False) -> tuple[GGUFLayout, ICVHeader, bool]:
    """Convert an ``icv-vllm/1`` file to a llama.cpp control vector. An
    imported vector is written back in the layout it came from; ``model_hint``
    defaults to that layout's, else to the file's ``model``. Returns the
    layout written, the file's header, and whether a nonzero row 0 was dropped."""
    from safetensors import safe_open

    tensor, header = load_icv(src)
    with safe_open(os.fspath(src), framework="pt") as handle:
        metadata = handle.metadata() or {}
    layout = _stored_layout(metadata, tensor, os.fspath(src))
    hint = model_hint if model_hint is not None else (layout.model_hint if layout else header.model)
    written = write_gguf(dst, tensor, model_hint=hint, layout=layout, drop_layer_0=drop_layer_0, source=src)
    return written, header, bool(tensor[0].any())
