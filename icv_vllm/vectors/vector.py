"""``ICVector``: an extracted vector as a value, with the paper's arithmetic.

The paper combines ICVs by arithmetic (sums, differences, scaling). Results
keep the model and record ``method="arithmetic"``; ``num_pairs`` of a sum or
difference is the total number of demonstration pairs behind it, or None
(unknown) when one of them is an imported vector (method ``gguf``). A
vector's ``default_mode`` (``icv``, or ``add`` for an imported llama.cpp
control vector) is kept by loading, saving and arithmetic; vectors of
different default modes are not combined. A ``recommended_scale`` (the
strength ``icv-vllm tune`` measured for this content) is kept by loading and
saving, and dropped by arithmetic: a result is other content, never measured.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from .file_format import METHODS, MODES, UNKNOWN_PAIRS_METHODS, load_icv, write_icv


class ICVector:
    """One direction per decoder layer: a float32 ``[num_layers, hidden_size]`` tensor."""

    __slots__ = ("tensor", "model", "method", "num_pairs", "default_mode", "recommended_scale")
    # numpy scalars would otherwise try to broadcast over us instead of calling __rmul__
    __array_ufunc__ = None

    def __init__(self, tensor: torch.Tensor, *, model: str, method: str, num_pairs: int | None,
                 default_mode: str = "icv", recommended_scale: float | None = None):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or 0 in tensor.shape:
            raise ValueError(
                f"an ICV is a non-empty 2-D tensor [num_layers, hidden_size], got "
                f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}"
            )
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(tensor).all():
            raise ValueError("an ICV must have finite values (found NaN or inf)")
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
        if num_pairs is None:
            if method not in UNKNOWN_PAIRS_METHODS:
                raise ValueError(f"num_pairs is required for method {method!r}")
        elif isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
            raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
        if default_mode not in MODES:
            raise ValueError(f"default_mode {default_mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if recommended_scale is not None and (self._scalar(recommended_scale) is None or recommended_scale == 0):
            raise ValueError(f"recommended_scale must be a finite non-zero number, got {recommended_scale!r}")
        self.tensor = tensor
        self.model = model
        self.method = method
        self.num_pairs = num_pairs
        self.default_mode = default_mode
        self.recommended_scale = None if recommended_scale is None else float(recommended_scale)

    @property
    def num_layers(self) -> int:
        return self.tensor.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.tensor.shape[1]

    def save(self, path: str | os.PathLike) -> None:
        write_icv(path, self.tensor, model=self.model, method=self.method, num_pairs=self.num_pairs,
                  default_mode=self.default_mode, recommended_scale=self.recommended_scale)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ICVector":
        """Load and validate; raises ``ICVFileError`` naming the file and the problem."""
        tensor, header = load_icv(path)
        return cls(tensor, model=header.model, method=header.method, num_pairs=header.num_pairs,
                   default_mode=header.default_mode, recommended_scale=header.recommended_scale)

    def __repr__(self) -> str:
        return (
            f"ICVector(model={self.model!r}, method={self.method!r}, num_pairs={self.num_pairs}, "
            f"shape={list(self.tensor.shape)})"
        )

    # arithmetic -----------------------------------------------------------

    def _derived(self, tensor: torch.Tensor, num_pairs: int | None) -> "ICVector":
        return ICVector(tensor, model=self.model, method="arithmetic", num_pairs=num_pairs,
                        default_mode=self.default_mode)

    @staticmethod
    def _total_pairs(a: int | None, b: int | None) -> int | None:
        return None if a is None or b is None else a + b

    def _check_compatible(self, other: "ICVector", op: str) -> None:
        if self.tensor.shape != other.tensor.shape:
            raise ValueError(
                f"cannot {op} ICVs of shapes {list(self.tensor.shape)} and {list(other.tensor.shape)}"
            )
        if self.model != other.model:
            raise ValueError(f"cannot {op} ICVs of different models: {self.model!r} and {other.model!r}")
        if self.default_mode != other.default_mode:
            raise ValueError(f"cannot {op} ICVs of different default modes: {self.default_mode!r} and "
                             f"{other.default_mode!r}")

    @staticmethod
    def _scalar(value: object) -> float | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"cannot scale an ICV by {value}")
        return value

    def __add__(self, other: object) -> "ICVector":
        if not isinstance(other, ICVector):
            return NotImplemented
        self._check_compatible(other, "add")
        return self._derived(self.tensor + other.tensor, self._total_pairs(self.num_pairs, other.num_pairs))

    def __sub__(self, other: object) -> "ICVector":
        if not isinstance(other, ICVector):
            return NotImplemented
        self._check_compatible(other, "subtract")
        return self._derived(self.tensor - other.tensor, self._total_pairs(self.num_pairs, other.num_pairs))

    def __neg__(self) -> "ICVector":
        return self._derived(-self.tensor, self.num_pairs)

    def __mul__(self, other: object) -> "ICVector":
        scale = self._scalar(other)
        if scale is None:
            return NotImplemented
        return self._derived(self.tensor * scale, self.num_pairs)

    __rmul__ = __mul__

    def __truediv__(self, other: object) -> "ICVector":
        scale = self._scalar(other)
        if scale is None:
            return NotImplemented
        if scale == 0.0:
            raise ZeroDivisionError("cannot divide an ICV by zero")
        return self._derived(self.tensor / scale, self.num_pairs)
