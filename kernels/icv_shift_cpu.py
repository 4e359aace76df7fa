"""Steering shift (docs/method.md §2 and §7) on the CPU as one C call per decoder layer.

The C loop (``icv_shift_cpu.c``, built at install time) is the Triton
kernel's algorithm for one core: it reads the per-step tables itself, so a
step needs no planning and a layer costs one call instead of ~15 torch ops
(whose dispatch dominates at decode sizes). ``AVAILABLE`` is False when the
extension was not built (no C compiler at install) or is switched off with
``ICV_VLLM_CPU_KERNEL=0`` (to compare, or to test the fallback): callers then
use the torch path, which computes the same thing.

Threads: a call large enough to gain (``MIN_PARALLEL_ELEMENTS``) splits its
tokens over ``torch.get_num_threads()`` threads (vLLM's CPU worker sets that
to its cores) with OpenMP. The extension needs ``libgomp.so.1``, which torch
has already loaded (torch is imported first), so both use one runtime and
one pool: checked at import by comparing where the extension's
``omp_get_max_threads`` and torch's resolve. If they differ (a torch built
with another OpenMP), the kernel stays on one thread rather than let two
pools fight over the cores; ``THREADS_NOTE`` says so, and the worker logs it.
"""

from __future__ import annotations

import ctypes
import os

import torch

from .icv_shift_torch import ENTRY_COLUMNS

DISABLE_ENV = "ICV_VLLM_CPU_KERNEL"

try:
    from . import _icv_shift_cpu as _ext
except ImportError:  # built without a C compiler: the torch path serves
    _ext = None
if os.environ.get(DISABLE_ENV, "1") == "0":
    _ext = None

AVAILABLE = _ext is not None
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
if _ext is not None and _ext.HAVE_FLOAT16:
    _DTYPE_CODES[torch.float16] = 2


def torch_omp_entry() -> int | None:
    """Address ``omp_get_max_threads`` has for torch's CPU library (None: not found)."""
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return ctypes.cast(ctypes.CDLL(library).omp_get_max_threads, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


if _ext is None or not _ext.HAVE_OPENMP:
    THREADED, THREADS_NOTE = False, "one thread (built without OpenMP)"
elif torch_omp_entry() != _ext.OMP_ENTRY:
    THREADED, THREADS_NOTE = False, ("one thread: its OpenMP runtime is not torch's, and two thread pools "
                                     "would fight over the cores")
else:
    THREADED, THREADS_NOTE = True, "torch's intra-op threads (OpenMP)"


def supports(hidden: torch.Tensor) -> bool:
    """Whether ``icv_shift_cpu`` takes this hidden block (CPU, rows of unit stride, dtype)."""
    return (AVAILABLE and hidden.device.type == "cpu" and hidden.dim() == 2
            and hidden.dtype in _DTYPE_CODES and (hidden.stride(1) == 1 or hidden.shape[1] <= 1))


def icv_shift_cpu(hidden: torch.Tensor, token_rows: torch.Tensor, entry_slots: torch.Tensor,
                  entry_scales: torch.Tensor, entry_layer_bits: torch.Tensor, bank: torch.Tensor,
                  layer: int) -> None:
    """Shift ``hidden`` [T, D] in place; semantics in docs/method.md §2 and §7."""
    if not BoundTables(token_rows, entry_slots, entry_scales, entry_layer_bits)(hidden, bank, layer):
        raise ValueError(f"icv_shift_cpu cannot take a {hidden.dtype} {tuple(hidden.shape)} tensor on "
                         f"{hidden.device} with strides {hidden.stride()} (built: {AVAILABLE})")


class BoundTables:
    """The C kernel bound to one set of tables, checked once: the plugin binds
    its persistent per-step buffers at start-up, so a per-layer call only
    looks at hidden and the bank (which may be regrown between steps).
    Indices read from the tables are still range-checked in C on every call."""

    def __init__(self, token_rows: torch.Tensor, entry_slots: torch.Tensor, entry_scales: torch.Tensor,
                 entry_layer_bits: torch.Tensor):
        _check_tables(token_rows, entry_slots, entry_scales, entry_layer_bits)
        self._keep_alive = (token_rows, entry_slots, entry_scales, entry_layer_bits)  # pointers kept below
        self.max_tokens = token_rows.shape[0]
        self._tables = (token_rows.data_ptr(), entry_slots.data_ptr(), entry_slots.stride(0),
                        entry_scales.data_ptr(), entry_scales.stride(0), entry_layer_bits.data_ptr(),
                        entry_layer_bits.stride(0), entry_layer_bits.stride(1), entry_layer_bits.shape[2],
                        entry_slots.shape[0])

    def __call__(self, hidden: torch.Tensor, bank: torch.Tensor, layer: int) -> bool:
        """Shift ``hidden`` in place; False (nothing done) when ``supports(hidden)``
        is not true, so that the caller takes another path."""
        if not supports(hidden):
            return False
        T, D = hidden.shape
        if T > self.max_tokens:
            raise ValueError(f"icv_shift_cpu: tables do not fit: {T} tokens, token_rows has {self.max_tokens}")
        if (bank.dtype != torch.float32 or bank.dim() != 3 or bank.shape[2] != D
                or not bank.is_contiguous() or bank.device.type != "cpu"):
            raise ValueError(f"icv_shift_cpu: bank must be a contiguous float32 [S, L, {D}] CPU tensor, "
                             f"got {bank.dtype} {tuple(bank.shape)}")
        if T:
            _ext.shift(hidden.data_ptr(), T, D, hidden.stride(0), _DTYPE_CODES[hidden.dtype], *self._tables,
                       bank.data_ptr(), bank.shape[0], bank.shape[1], layer,
                       torch.get_num_threads() if THREADED else 1)
        return True


def _check_tables(token_rows: torch.Tensor, entry_slots: torch.Tensor, entry_scales: torch.Tensor,
                  entry_layer_bits: torch.Tensor) -> None:
    if (token_rows.dtype != torch.int32 or entry_slots.dtype != torch.int32 or entry_scales.dtype != torch.float32
            or entry_layer_bits.dtype != torch.int32):
        raise TypeError("icv_shift_cpu: token_rows/entry_slots/entry_layer_bits must be int32, entry_scales float32")
    if (token_rows.dim() != 1 or entry_slots.dim() != 2 or entry_slots.shape != entry_scales.shape
            or entry_slots.shape[1] != ENTRY_COLUMNS or entry_layer_bits.dim() != 3
            or entry_layer_bits.shape[:2] != entry_slots.shape):
        raise ValueError(f"icv_shift_cpu: tables do not fit: token_rows {tuple(token_rows.shape)}, "
                         f"slots {tuple(entry_slots.shape)}, scales {tuple(entry_scales.shape)}, "
                         f"layer bits {tuple(entry_layer_bits.shape)}")
    for t in (token_rows, entry_slots, entry_scales, entry_layer_bits):
        if t.device.type != "cpu" or t.stride(-1) != 1:
            raise ValueError("icv_shift_cpu: tables must be CPU tensors with unit last stride")
