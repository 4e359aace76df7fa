"""ICV shift (docs/method.md §2) in plain torch: the CPU production path.

Called on every decoder layer of every step, so it is built to stay cheap:
one ``nonzero`` finds the steered tokens (none: return at once), and all
work is on those tokens only, vectorised over tokens and entries. On CPU,
large fresh temporaries cost more than the arithmetic (glibc returns them to
the OS on free, so each call page-faults them in again), so tokens go through
in chunks of ~1 MB of fp32 (64 tokens at D = 4096), each updated in place;
when every token is steered (decode) chunks are slices: no gather, no scatter. Each distinct vector is normalised once; tokens reach it in one of two
ways:
- few distinct vectors (the usual prefill): two matmuls against the [S', D]
  table, 2*S' flops per element and no per-token copy of the vectors;
- many (a decode step with one vector per request): a per-token gather
  [n, E, D] (E = entry columns up to the last one in use, usually 1) and
  row-wise dots, which stays linear in n where the matmuls grow as n * S'.
(Ops picked by measurement: ``bmm`` over [1, D] x [D, 1] batches and
``u[inv]`` are several times slower than ``vecdot`` and ``index_select``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-12  # every norm divides by max(norm, EPS): zero x or v never gives NaN/inf
MATMUL_MAX_VECTORS = 4  # distinct vectors up to which the matmul route is used
CHUNK_ELEMENTS = 1 << 18  # tokens are processed in chunks of ~1 MB of fp32


@dataclass(frozen=True)
class ShiftPlan:
    """The layer-independent part of a step's shift: which tokens, which
    distinct vectors, each entry's lam/K. Computed once per step, reused by
    every decoder layer (``icv_shift_planned``)."""

    num_tokens: int
    tokens: torch.Tensor  # [n] steered token indices (sorted)
    lam: torch.Tensor     # [n, E] lam_k / K, 0 for empty entries
    inv: torch.Tensor     # [n, E] row of each entry in ``slots``
    slots: torch.Tensor   # [S'] distinct bank slots used by the step


def plan_icv_shift(num_tokens: int, token_rows: torch.Tensor, entry_slots: torch.Tensor,
                   entry_scales: torch.Tensor) -> ShiftPlan | None:
    """Plan for the first ``num_tokens`` tokens; None when none is steered."""
    rows = token_rows[:num_tokens]
    tokens = (rows >= 0).nonzero().squeeze(1)
    if tokens.numel() == 0:
        return None
    row = rows.index_select(0, tokens).long()
    slots, lam = entry_slots.index_select(0, row), entry_scales.index_select(0, row)  # [n, 4]
    valid = slots >= 0
    k = valid.sum(1, keepdim=True)                       # K per token
    if not bool(k.all()):                                # rows without vectors: untouched
        keep = k.squeeze(1) > 0
        tokens, slots, lam, valid, k = tokens[keep], slots[keep], lam[keep], valid[keep], k[keep]
        if tokens.numel() == 0:
            return None
    lam = torch.where(valid, lam, 0.0) / k               # lam_k / K, 0 for empty entries
    uniq, inv = torch.unique(slots.clamp(min=0), return_inverse=True)  # inv: [n, 4] -> table row
    if len(uniq) > MATMUL_MAX_VECTORS:                   # gather route: skip trailing empty columns
        cols = int(valid.any(0).nonzero()[-1]) + 1
        lam, inv = lam[:, :cols], inv[:, :cols]
    return ShiftPlan(num_tokens, tokens, lam, inv, uniq.long())


def icv_shift_planned(hidden: torch.Tensor, plan: ShiftPlan, bank: torch.Tensor, layer: int) -> None:
    """Shift ``hidden`` [T, D] in place for layer ``layer`` following ``plan``."""
    if plan.num_tokens != hidden.shape[0]:
        raise ValueError(f"plan is for {plan.num_tokens} tokens, hidden has {hidden.shape[0]}")
    tokens, lam, inv = plan.tokens, plan.lam, plan.inv
    u = bank[:, layer].index_select(0, plan.slots)       # [S', D] fp32 copy: distinct vectors
    u.div_(u.norm(dim=-1, keepdim=True).clamp_min_(EPS))
    everyone = len(tokens) == hidden.shape[0]            # e.g. decode: slices, no gather/scatter
    step = max(1, CHUNK_ELEMENTS // hidden.shape[1])
    for i in range(0, len(tokens), step):
        part = slice(i, i + step)
        x = (hidden[part] if everyone else hidden.index_select(0, tokens[part])).float()
        _shift_(x, lam[part], inv[part], u)              # fp32 hidden + everyone: x is hidden itself
        if everyone:
            hidden[part].copy_(x)
        else:
            hidden.index_copy_(0, tokens[part], x.to(hidden.dtype))


def icv_shift_torch(hidden: torch.Tensor, token_rows: torch.Tensor, entry_slots: torch.Tensor,
                    entry_scales: torch.Tensor, bank: torch.Tensor, layer: int) -> None:
    """Shift ``hidden`` [T, D] in place; semantics in docs/method.md §2."""
    plan = plan_icv_shift(hidden.shape[0], token_rows, entry_slots, entry_scales)
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
