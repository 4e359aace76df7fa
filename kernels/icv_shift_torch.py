"""Steering shift (docs/method.md §2 and §7) in plain torch: the CPU fallback.

The tables (``entry_*``, one row per request part, ``ENTRY_COLUMNS`` columns)
hold ICV entries in the first ``ICV_COLUMNS`` columns — averaged, the paper's
transform — and plain-add entries in the rest; an entry applies at a layer
when its bit in ``entry_layer_bits`` is set (see ``layer_mask``).

Called on every decoder layer of every step, so it is built to stay cheap:
one ``nonzero`` finds the steered tokens (none: return at once), and all
work is on those tokens only, vectorised over tokens and entries. When every
entry of the step covers every layer (the usual case), what each token does
is worked out once per step (``plan_icv_shift``) and reused by every layer;
otherwise per layer, from the same plan. On CPU, large fresh temporaries
cost more than the arithmetic (glibc returns them to the OS on free, so each
call page-faults them in again), so tokens go through in chunks of ~1 MB of
fp32 (64 tokens at D = 4096), each updated in place; when every token is
steered (decode) chunks are slices: no gather, no scatter. Each distinct
vector is read once; tokens reach it in one of two ways:
- few distinct vectors (the usual prefill): matmuls against the [S', D]
  table, 2*S' flops per element and no per-token copy of the vectors;
- many (a decode step with one vector per request): a per-token gather
  [n, E, D] (E = entry columns up to the last one in use, usually 1) and
  row-wise dots, which stays linear in n where the matmuls grow as n * S'.
(Ops picked by measurement: ``bmm`` over [1, D] x [D, 1] batches and
``u[inv]`` are several times slower than ``vecdot`` and ``index_select``.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

EPS = 1e-12  # every norm divides by max(norm, EPS): zero x or v never gives NaN/inf
ICV_COLUMNS = 4  # entry columns [0, 4): ICV entries; [4, 8): add entries
ENTRY_COLUMNS = 8
MATMUL_MAX_VECTORS = 4  # distinct vectors up to which the matmul route is used
CHUNK_ELEMENTS = 1 << 18  # tokens are processed in chunks of ~1 MB of fp32
ALL_LAYERS = -1  # an int32 layer-bit word with every bit set


def layer_bit_words(num_layers: int) -> int:
    """int32 words per entry in ``entry_layer_bits``: bit l % 32 of word l // 32 is layer l."""
    return (num_layers + 31) // 32


def layer_mask(layers, num_layers: int) -> list[int]:
    """The int32 words of ``entry_layer_bits`` for a set of layers (None = all)."""
    words = [0] * layer_bit_words(num_layers)
    if layers is None:
        return [ALL_LAYERS] * len(words)
    for layer in layers:
        words[layer // 32] |= 1 << (layer % 32)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # as signed int32


@dataclass(frozen=True)
class LayerPlan:
    """What one layer does to the planned tokens (computed from a ShiftPlan)."""

    tokens: torch.Tensor         # [m] token indices (sorted)
    everyone: bool               # tokens are all of 0..T-1 (slices, no gather)
    icv_rows: torch.Tensor | None  # [m'] rows of ``tokens`` with >= 1 ICV entry (None: all m)
    icv_lam: torch.Tensor        # [m', E] lam_k / K, 0 for empty entries
    icv_inv: torch.Tensor        # [m', E] row of each entry in ``slots``
    add_lam: torch.Tensor | None  # [m, E] add scales (0 = none); None: no add entry
    add_inv: torch.Tensor | None


@dataclass(frozen=True)
class ShiftPlan:
    """The layer-independent part of a step's shift: which tokens, which
    distinct vectors, each entry's scale and layers. Computed once per step,
    reused by every decoder layer (``icv_shift_planned``)."""

    num_tokens: int
    tokens: torch.Tensor   # [n] steered token indices (sorted)
    valid: torch.Tensor    # [n, 8] entry present
    lam: torch.Tensor      # [n, 8] scales
    inv: torch.Tensor      # [n, 8] row of each entry in ``slots``
    layer_bits: torch.Tensor | None  # [n, 8, W]; None when every valid entry covers every layer
    slots: torch.Tensor    # [S'] distinct bank slots used by the step
    every_layer: LayerPlan | None  # the one LayerPlan of all layers when layer_bits is None


def plan_icv_shift(num_tokens: int, token_rows: torch.Tensor, entry_slots: torch.Tensor,
                   entry_scales: torch.Tensor, entry_layer_bits: torch.Tensor) -> ShiftPlan | None:
    """Plan for the first ``num_tokens`` tokens; None when none is steered."""
    rows = token_rows[:num_tokens]
    tokens = (rows >= 0).nonzero().squeeze(1)
    if tokens.numel() == 0:
        return None
    row = rows.index_select(0, tokens).long()
    slots, lam = entry_slots.index_select(0, row), entry_scales.index_select(0, row)  # [n, 8]
    valid = slots >= 0
    keep = valid.any(1)
    if not bool(keep.all()):                             # rows without vectors: untouched
        tokens, row, slots, lam, valid = tokens[keep], row[keep], slots[keep], lam[keep], valid[keep]
        if tokens.numel() == 0:
            return None
    bits = entry_layer_bits.index_select(0, row)         # [n, 8, W]
    every = bool(((bits == ALL_LAYERS) | ~valid.unsqueeze(-1)).all())
    uniq, inv = torch.unique(slots.clamp(min=0), return_inverse=True)  # inv: [n, 8] -> table row
    plan = ShiftPlan(num_tokens, tokens, valid, lam, inv, None if every else bits, uniq.long(), None)
    return replace(plan, every_layer=_layer_plan(plan, valid, tokens)) if every else plan


def _layer_plan(plan: ShiftPlan, active: torch.Tensor, tokens: torch.Tensor) -> LayerPlan | None:
    """The LayerPlan for the entries ``active`` [n, 8] of ``plan``'s tokens."""
    used = active.any(1)
    everyone = len(tokens) == plan.num_tokens
    if not bool(used.all()):
        if not bool(used.any()):
            return None
        active, tokens, lam, inv = active[used], tokens[used], plan.lam[used], plan.inv[used]
        everyone = False
    else:
        lam, inv = plan.lam, plan.inv
    icv, add = active[:, :ICV_COLUMNS], active[:, ICV_COLUMNS:]
    k = icv.sum(1, keepdim=True)
    has_icv = k.squeeze(1) > 0
    icv_rows = None if bool(has_icv.all()) else has_icv.nonzero().squeeze(1)
    icv_lam = torch.where(icv, lam[:, :ICV_COLUMNS], 0.0) / k.clamp_min(1)
    icv_inv = inv[:, :ICV_COLUMNS]
    if icv_rows is not None:
        icv_lam, icv_inv = icv_lam[icv_rows], icv_inv[icv_rows]
    add_lam = add_inv = None
    if bool(add.any()):
        add_lam, add_inv = torch.where(add, lam[:, ICV_COLUMNS:], 0.0), inv[:, ICV_COLUMNS:]
    if len(plan.slots) > MATMUL_MAX_VECTORS:             # gather route: skip trailing empty columns
        icv_lam, icv_inv = _trim(icv_lam, icv_inv)
        if add_lam is not None:
            add_lam, add_inv = _trim(add_lam, add_inv)
    return LayerPlan(tokens, everyone, icv_rows, icv_lam, icv_inv, add_lam, add_inv)


def _trim(lam: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    used = (lam != 0).any(0).nonzero()
    cols = int(used[-1]) + 1 if len(used) else 1
    return lam[:, :cols], inv[:, :cols]


def icv_shift_planned(hidden: torch.Tensor, plan: ShiftPlan, bank: torch.Tensor, layer: int) -> None:
    """Shift ``hidden`` [T, D] in place for layer ``layer`` following ``plan``."""
    if plan.num_tokens != hidden.shape[0]:
        raise ValueError(f"plan is for {plan.num_tokens} tokens, hidden has {hidden.shape[0]}")
    if plan.layer_bits is None:
        lp = plan.every_layer
    else:
        word = plan.layer_bits[:, :, layer // 32]
        lp = _layer_plan(plan, plan.valid & (((word >> (layer % 32)) & 1) == 1), plan.tokens)
    if lp is None:
        return
    v = bank[:, layer].index_select(0, plan.slots)       # [S', D] fp32 copy: distinct vectors
    u = v / v.norm(dim=-1, keepdim=True).clamp_min_(EPS)
    tokens = lp.tokens
    step = max(1, CHUNK_ELEMENTS // hidden.shape[1])
    for i in range(0, len(tokens), step):
        part = slice(i, i + step)
        x = (hidden[part] if lp.everyone else hidden.index_select(0, tokens[part])).float()
        if lp.icv_rows is None:
            _shift_(x, lp.icv_lam[part], lp.icv_inv[part], u)  # fp32 hidden + everyone: x is hidden itself
        else:
            lo, hi = torch.searchsorted(lp.icv_rows, torch.tensor([i, i + len(x)])).tolist()
            if hi > lo:
                rows = lp.icv_rows[lo:hi] - i
                y = x.index_select(0, rows)
                _shift_(y, lp.icv_lam[lo:hi], lp.icv_inv[lo:hi], u)
                x.index_copy_(0, rows, y)
        if lp.add_lam is not None:
            _add_(x, lp.add_lam[part], lp.add_inv[part], v)
        if lp.everyone:
            hidden[part].copy_(x)
        else:
            hidden.index_copy_(0, tokens[part], x.to(hidden.dtype))


def icv_shift_torch(hidden: torch.Tensor, token_rows: torch.Tensor, entry_slots: torch.Tensor,
                    entry_scales: torch.Tensor, entry_layer_bits: torch.Tensor, bank: torch.Tensor,
                    layer: int) -> None:
    """Shift ``hidden`` [T, D] in place; semantics in docs/method.md §2 and §7."""
    plan = plan_icv_shift(hidden.shape[0], token_rows, entry_slots, entry_scales, entry_layer_bits)
    if plan is not None:
        icv_shift_planned(hidden, plan, bank, layer)


def _shift_(x: torch.Tensor, lam: torch.Tensor, inv: torch.Tensor, u: torch.Tensor) -> None:
    """x [m, D] fp32 -> x' in place. lam [m, E] (already / K, 0 = empty), inv [m, E]
    rows of the unit-vector table u [S', D]."""
    nx = x.norm(dim=-1, keepdim=True)
    x.div_(nx.clamp_min(EPS))                            # x / ||x||
    # c_k = lam_k / K * (1 + max(0, cos(x, -v_k))), cos(x, -v_k) = -x_hat . u_k
    if len(u) <= MATMUL_MAX_VECTORS:
        c = lam * (1 - torch.mm(x, u.T).gather(1, inv).clamp_max_(0))
        x.addmm_(torch.zeros(len(x), len(u), device=x.device).scatter_add_(1, inv, c), u)
    else:
        ut = u.index_select(0, inv.reshape(-1)).view(len(x), inv.shape[1], -1)  # [m, E, D]
        c = lam * (1 - torch.linalg.vecdot(ut, x.unsqueeze(1)).clamp_max_(0))
        x.unsqueeze(1).baddbmm_(c.unsqueeze(1), ut)      # y = x/||x|| + sum_k c_k u_k
    x.mul_(nx / x.norm(dim=-1, keepdim=True).clamp_min_(EPS))


def _add_(x: torch.Tensor, lam: torch.Tensor, inv: torch.Tensor, v: torch.Tensor) -> None:
    """x += sum_j lam_j v_j (raw vectors; lam 0 = no entry), in place."""
    if len(v) <= MATMUL_MAX_VECTORS:
        x.addmm_(torch.zeros(len(x), len(v), device=x.device).scatter_add_(1, inv, lam), v)
    else:
        vt = v.index_select(0, inv.reshape(-1)).view(len(x), inv.shape[1], -1)  # [m, E, D]
        x.unsqueeze(1).baddbmm_(lam.unsqueeze(1), vt)
