"""GGUF control vectors written with the `gguf` library, as llama.cpp's
cvector-generator and repeng's ``export_gguf`` write them (shared by the
tests that read, list and serve them)."""

from __future__ import annotations

import gguf
import numpy as np


def write_control_vector(path, directions: dict, *, hint="llama", layer_count=None, count_type="int32",
                         extra=None, arch="controlvector"):
    """``directions``: layer -> 1-D float32 array, written in that order."""
    w = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        w.add_string("controlvector.model_hint", hint)
    if count_type is not None:
        getattr(w, f"add_{count_type}")("controlvector.layer_count",
                                        len(directions) if layer_count is None else layer_count)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for layer, values in directions.items():
        w.add_tensor(f"direction.{layer}", np.asarray(values, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def layer_numbered(path, layers, hidden: int):
    """A control vector whose direction N is N everywhere (easy to check after padding)."""
    return write_control_vector(path, {layer: np.full(hidden, float(layer), dtype=np.float32) for layer in layers})
