"""Steering shift (docs/method.md §2 and §7) as one Triton launch per decoder layer.

One program per token; the token's row in the request tables is read inside
the kernel (row < 0, or no entry of the row on at this layer: return at
once), so the grid depends only on T and nothing syncs with the host: safe
under CUDA graphs, whatever mix of vectors, modes and layers the batch holds.
Empty or switched-off entries are masked loads, which issue no memory
traffic, so one vector costs one vector read, not eight. Columns
[0, ICV_COLUMNS) are ICV entries (averaged, renormalised), the rest are
added as they are.

The op is memory bound. When the padded row fits in registers (D <= 8192:
every common hidden size) it reads x and its vectors exactly once. Wider
rows take three passes over BLOCK_D chunks (norms and dots; norm of the
shifted row; write), re-reading the row from cache; recomputing the shifted
chunk the same way in passes 2 and 3 keeps ||x'|| == ||x|| exact up to
rounding even where the shifted direction nearly cancels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .icv_shift_torch import EPS, ICV_COLUMNS

MAX_SINGLE_BLOCK = 8192  # widest row kept in registers (16 warps, 16 fp32 per thread and vector)
MULTI_BLOCK = 4096       # chunk width of the multi-pass path


@triton.jit
def _coefficients(nx, xv, nv, lam, is_icv, k, EPS: tl.constexpr):
    """1/||x|| and c_k with y = x/||x|| + sum_k c_k v_k (raw v, so no unit copy)."""
    inv_x = 1.0 / tl.maximum(nx, EPS)
    inv_v = 1.0 / tl.maximum(nv, EPS)
    cos_neg = -xv * inv_x * inv_v                        # cos(x, -v_k)
    c = tl.where(is_icv, lam * (1.0 + tl.maximum(cos_neg, 0.0)) * inv_v / tl.maximum(k, 1.0), 0.0)
    return inv_x, c


@triton.jit
def _added(slots_row, scales_row, bits_row, stride_bits_entry, v_ptr, stride_v, layer_word, layer_bit, d, dm,
           ICV_COLUMNS: tl.constexpr, ADD_COLUMNS: tl.constexpr):
    """sum_j lam_j v_j[d] over the row's add entries on at this layer, one
    vector at a time (so registers hold one row, not all of them)."""
    total = tl.zeros(d.shape, dtype=tl.float32)
    for j in tl.static_range(ICV_COLUMNS, ICV_COLUMNS + ADD_COLUMNS):
        slot = tl.load(slots_row + j)
        bits = tl.load(bits_row + j * stride_bits_entry + layer_word)
        if slot >= 0 and ((bits >> layer_bit) & 1) != 0:
            v = tl.load(v_ptr + slot.to(tl.int64) * stride_v + d, mask=dm, other=0.0)
            total += tl.load(scales_row + j) * v
    return total


@triton.jit
def _icv_shift_kernel(h_ptr, rows_ptr, slots_ptr, scales_ptr, bits_ptr, v_ptr,
                      stride_h, stride_slots, stride_scales, stride_bits_row, stride_bits_entry, stride_v,
                      layer_word, layer_bit,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, ICV_COLUMNS: tl.constexpr,
                      ADD_COLUMNS: tl.constexpr, EPS: tl.constexpr):
    t = tl.program_id(0)
    r = tl.load(rows_ptr + t)
    if r < 0:
        return
    slots_row = slots_ptr + r * stride_slots
    scales_row = scales_ptr + r * stride_scales
    bits_row = bits_ptr + r * stride_bits_row
    e = tl.arange(0, ICV_COLUMNS + ADD_COLUMNS)
    slot = tl.load(slots_row + e)
    valid = (slot >= 0) & (((tl.load(bits_row + e * stride_bits_entry + layer_word) >> layer_bit) & 1) != 0)
    if tl.sum(valid.to(tl.int32), axis=0) == 0:
        return
    num_add = tl.sum((valid & (e >= ICV_COLUMNS)).to(tl.int32), axis=0)
    # the ICV entries, as [ICV_COLUMNS] vectors
    i = tl.arange(0, ICV_COLUMNS)
    icv_slot = tl.load(slots_row + i)
    is_icv = (icv_slot >= 0) & (((tl.load(bits_row + i * stride_bits_entry + layer_word) >> layer_bit) & 1) != 0)
    k = tl.sum(is_icv.to(tl.float32), axis=0)
    lam = tl.load(scales_row + i)
    v_rows = v_ptr + tl.where(is_icv, icv_slot, 0).to(tl.int64)[:, None] * stride_v  # [E, 1]
    h_row = h_ptr + t.to(tl.int64) * stride_h
    out_ty = h_ptr.dtype.element_ty
    if D <= BLOCK_D:  # whole row in registers: one read, one write
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        x = tl.load(h_row + d, mask=dm, other=0.0).to(tl.float32)
        if k > 0:
            v = tl.load(v_rows + d[None, :], mask=is_icv[:, None] & dm[None, :], other=0.0)
            nx = tl.sqrt(tl.sum(x * x, axis=0))
            inv_x, c = _coefficients(nx, tl.sum(v * x[None, :], axis=1), tl.sqrt(tl.sum(v * v, axis=1)),
                                     lam, is_icv, k, EPS)
            y = x * inv_x + tl.sum(c[:, None] * v, axis=0)
            x = y * (nx / tl.maximum(tl.sqrt(tl.sum(y * y, axis=0)), EPS))
        if num_add > 0:
            x += _added(slots_row, scales_row, bits_row, stride_bits_entry, v_ptr, stride_v, layer_word,
                        layer_bit, d, dm, ICV_COLUMNS, ADD_COLUMNS)
        tl.store(h_row + d, x.to(out_ty), mask=dm)
    elif k == 0:  # add entries only: one pass
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            x = tl.load(h_row + d, mask=dm, other=0.0).to(tl.float32)
            x += _added(slots_row, scales_row, bits_row, stride_bits_entry, v_ptr, stride_v, layer_word,
                        layer_bit, d, dm, ICV_COLUMNS, ADD_COLUMNS)
            tl.store(h_row + d, x.to(out_ty), mask=dm)
    else:
        xx = 0.0
        xv = tl.zeros([ICV_COLUMNS], dtype=tl.float32)
        vv = tl.zeros([ICV_COLUMNS], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # pass 1: ||x||^2, x.v_k, ||v_k||^2
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            x = tl.load(h_row + d, mask=dm, other=0.0).to(tl.float32)
            v = tl.load(v_rows + d[None, :], mask=is_icv[:, None] & dm[None, :], other=0.0)
            xx += tl.sum(x * x, axis=0)
            xv += tl.sum(v * x[None, :], axis=1)
            vv += tl.sum(v * v, axis=1)
        nx = tl.sqrt(xx)
        inv_x, c = _coefficients(nx, xv, tl.sqrt(vv), lam, is_icv, k, EPS)
        yy = 0.0
        for d0 in range(0, D, BLOCK_D):  # pass 2: ||y||^2
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            x = tl.load(h_row + d, mask=dm, other=0.0).to(tl.float32)
            v = tl.load(v_rows + d[None, :], mask=is_icv[:, None] & dm[None, :], other=0.0)
            y = x * inv_x + tl.sum(c[:, None] * v, axis=0)
            yy += tl.sum(y * y, axis=0)
        scale = nx / tl.maximum(tl.sqrt(yy), EPS)
        for d0 in range(0, D, BLOCK_D):  # pass 3: write
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            x = tl.load(h_row + d, mask=dm, other=0.0).to(tl.float32)
            v = tl.load(v_rows + d[None, :], mask=is_icv[:, None] & dm[None, :], other=0.0)
            y = (x * inv_x + tl.sum(c[:, None] * v, axis=0)) * scale
            if num_add > 0:
                y += _added(slots_row, scales_row, bits_row, stride_bits_entry, v_ptr, stride_v, layer_word,
                            layer_bit, d, dm, ICV_COLUMNS, ADD_COLUMNS)
            tl.store(h_row + d, y.to(out_ty), mask=dm)


def launch_config(D: int, block_d: int | None = None) -> tuple[int, int]:
    """(BLOCK_D, num_warps): the padded row if it fits, else MULTI_BLOCK chunks;
    about 16 elements per thread per vector either way."""
    if block_d is None:
        block_d = triton.next_power_of_2(D)
        if block_d > MAX_SINGLE_BLOCK:
            block_d = MULTI_BLOCK
    return block_d, max(1, min(16, block_d // 512))


def icv_shift_triton(hidden: torch.Tensor, token_rows: torch.Tensor, entry_slots: torch.Tensor,
                     entry_scales: torch.Tensor, entry_layer_bits: torch.Tensor, bank: torch.Tensor,
                     layer: int, *, block_d: int | None = None) -> None:
    """Shift ``hidden`` [T, D] in place with one launch; docs/method.md §2 and §7.
    ``block_d`` (a power of two) overrides the chunk width, for tests."""
    T, D = hidden.shape
    if T == 0:
        return
    block, warps = launch_config(D, block_d)
    _icv_shift_kernel[(T,)](
        hidden, token_rows, entry_slots, entry_scales, entry_layer_bits, bank[:, layer],
        hidden.stride(0), entry_slots.stride(0), entry_scales.stride(0),
        entry_layer_bits.stride(0), entry_layer_bits.stride(1), bank.stride(0),
        layer // 32, layer % 32,
        D=D, BLOCK_D=block, ICV_COLUMNS=ICV_COLUMNS, ADD_COLUMNS=entry_slots.shape[1] - ICV_COLUMNS, EPS=EPS,
        num_warps=warps,
    )
