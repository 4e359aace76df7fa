"""ICV shift (docs/method.md §2) as one Triton launch per decoder layer.

One program per token; the token's row in the request tables is read inside
the kernel (row < 0, or no vector in the row: return at once), so the grid
depends only on T and nothing syncs with the host: safe under CUDA graphs,
whatever mix of vectors the batch holds. Empty entries are masked loads,
which issue no memory traffic, so K = 1 costs one vector read, not four.

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

from .icv_shift_torch import EPS

MAX_SINGLE_BLOCK = 8192  # widest row kept in registers (16 warps, 16 fp32 per thread and vector)
MULTI_BLOCK = 4096       # chunk width of the multi-pass path


@triton.jit
def _coefficients(nx, xv, nv, lam, valid, k, EPS: tl.constexpr):
    """1/||x|| and c_k with y = x/||x|| + sum_k c_k v_k (raw v, so no unit copy)."""
    inv_x = 1.0 / tl.maximum(nx, EPS)
    inv_v = 1.0 / tl.maximum(nv, EPS)
    cos_neg = -xv * inv_x * inv_v                        # cos(x, -v_k)
    c = tl.where(valid, lam * (1.0 + tl.maximum(cos_neg, 0.0)) * inv_v / k, 0.0)
    return inv_x, c


@triton.jit
def _icv_shift_kernel(h_ptr, rows_ptr, slots_ptr, scales_ptr, v_ptr,
                      stride_h, stride_slots, stride_scales, stride_v,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, ENTRIES: tl.constexpr,
                      EPS: tl.constexpr):
    t = tl.program_id(0)
    r = tl.load(rows_ptr + t)
    if r < 0:
        return
    e = tl.arange(0, ENTRIES)
    slot = tl.load(slots_ptr + r * stride_slots + e)
    valid = slot >= 0
    k = tl.sum(valid.to(tl.float32), axis=0)
    if k == 0:
        return
    lam = tl.load(scales_ptr + r * stride_scales + e)
    v_rows = v_ptr + tl.where(valid, slot, 0).to(tl.int64)[:, None] * stride_v  # [E, 1]
    h_row = h_ptr + t.to(tl.int64) * stride_h
    out_ty = h_ptr.dtype.element_ty
    if D <= BLOCK_D:  # whole row in registers: one read, one write
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        x = tl.load(h_row + d, mask=dm, other=0.0).to(tl.float32)
        v = tl.load(v_rows + d[None, :], mask=valid[:, None] & dm[None, :], other=0.0)
        nx = tl.sqrt(tl.sum(x * x, axis=0))
        inv_x, c = _coefficients(nx, tl.sum(v * x[None, :], axis=1), tl.sqrt(tl.sum(v * v, axis=1)),
                                 lam, valid, k, EPS)
        y = x * inv_x + tl.sum(c[:, None] * v, axis=0)
        scale = nx / tl.maximum(tl.sqrt(tl.sum(y * y, axis=0)), EPS)
        tl.store(h_row + d, (y * scale).to(out_ty), mask=dm)
    else:
        xx = 0.0
        xv = tl.zeros([ENTRIES], dtype=tl.float32)
        vv = tl.zeros([ENTRIES], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # pass 1: ||x||^2, x.v_k, ||v_k||^2
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            x = tl.load(h_row + d, mask=dm, other=0.0).to(tl.float32)
            v = tl.load(v_rows + d[None, :], mask=valid[:, None] & dm[None, :], other=0.0)
            xx += tl.sum(x * x, axis=0)
            xv += tl.sum(v * x[None, :], axis=1)
            vv += tl.sum(v * v, axis=1)
        nx = tl.sqrt(xx)
        inv_x, c = _coefficients(nx, xv, tl.sqrt(vv), lam, valid, k, EPS)
        yy = 0.0
        for d0 in range(0, D, BLOCK_D):  # pass 2: ||y||^2
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            x = tl.load(h_row + d, mask=dm, other=0.0).to(tl.float32)
            v = tl.load(v_rows + d[None, :], mask=valid[:, None] & dm[None, :], other=0.0)
            y = x * inv_x + tl.sum(c[:, None] * v, axis=0)
            yy += tl.sum(y * y, axis=0)
        scale = nx / tl.maximum(tl.sqrt(yy), EPS)
        for d0 in range(0, D, BLOCK_D):  # pass 3: write
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            x = tl.load(h_row + d, mask=dm, other=0.0).to(tl.float32)
            v = tl.load(v_rows + d[None, :], mask=valid[:, None] & dm[None, :], other=0.0)
            y = x * inv_x + tl.sum(c[:, None] * v, axis=0)
            tl.store(h_row + d, (y * scale).to(out_ty), mask=dm)


def launch_config(D: int, block_d: int | None = None) -> tuple[int, int]:
    """(BLOCK_D, num_warps): the padded row if it fits, else MULTI_BLOCK chunks;
    about 16 elements per thread per vector either way."""
    if block_d is None:
        block_d = triton.next_power_of_2(D)
        if block_d > MAX_SINGLE_BLOCK:
            block_d = MULTI_BLOCK
    return block_d, max(1, min(16, block_d // 512))


def icv_shift_triton(hidden: torch.Tensor, token_rows: torch.Tensor, entry_slots: torch.Tensor,
                     entry_scales: torch.Tensor, bank: torch.Tensor, layer: int, *,
                     block_d: int | None = None) -> None:
    """Shift ``hidden`` [T, D] in place with one launch; docs/method.md §2.
    ``block_d`` (a power of two) overrides the chunk width, for tests."""
    T, D = hidden.shape
    if T == 0:
        return
    block, warps = launch_config(D, block_d)
    _icv_shift_kernel[(T,)](
        hidden, token_rows, entry_slots, entry_scales, bank[:, layer],
        hidden.stride(0), entry_slots.stride(0), entry_scales.stride(0), bank.stride(0),
        D=D, BLOCK_D=block, ENTRIES=entry_slots.shape[1], EPS=EPS, num_warps=warps,
    )
