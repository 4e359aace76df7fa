"""ICV shift (ICV_METHOD.md §2) in plain torch: the CPU production path.

Called on every decoder layer of every step, so it is built to stay cheap:
one ``nonzero`` finds the steered tokens (none: return at once), and all
work is on those tokens only, vectorised over tokens and entries. On CPU,
fresh [n, D]-sized temporaries (page faults) cost as much as arithmetic, so
the fp32 copy of the tokens is updated in place. Each distinct vector is
normalised once; tokens reach it in one of two ways:
- few distinct vectors (the usual prefill): two matmuls against the [S', D]
  table, 2*S' flops per element and no per-token copy of the vectors;
- many (a decode step with one vector per request): a per-token gather
  [n, E, D] (E = entry columns up to the last one in use, usually 1) and
  row-wise dots, which stays linear in n where the matmuls grow as n * S'.
(Ops picked by measurement: ``bmm`` with [1, D] x [D, 1] batches, ``u[inv]``
and ``index_copy_`` are several times slower than what is used instead.)
"""

from __future__ import annotations

import torch

EPS = 1e-12  # every norm divides by max(norm, EPS): zero x or v never gives NaN/inf
MATMUL_MAX_VECTORS = 4  # distinct vectors up to which the matmul route is used


def icv_shift_torch(hidden: torch.Tensor, token_rows: torch.Tensor, entry_slots: torch.Tensor,
                    entry_scales: torch.Tensor, bank: torch.Tensor, layer: int) -> None:
    """Shift ``hidden`` [T, D] in place; see ``icv_vllm.kernels.apply_icv_shift``."""
    rows = token_rows[: hidden.shape[0]]
    tokens = (rows >= 0).nonzero().squeeze(1)
    if tokens.numel() == 0:
        return
    row = rows.index_select(0, tokens).long()
    slots, lam = entry_slots.index_select(0, row), entry_scales.index_select(0, row)  # [n, 4]
    valid = slots >= 0
    k = valid.sum(1, keepdim=True)                       # K per token
    if not bool(k.all()):                                # rows without vectors: untouched
        keep = k.squeeze(1) > 0
        tokens, slots, lam, valid, k = tokens[keep], slots[keep], lam[keep], valid[keep], k[keep]
        if tokens.numel() == 0:
            return
    lam = torch.where(valid, lam, 0.0) / k               # lam_k / K, 0 for empty entries
    uniq, inv = torch.unique(slots.clamp(min=0), return_inverse=True)  # inv: [n, 4] -> table row
    u = bank[:, layer].index_select(0, uniq.long())      # [S', D] fp32 copy: distinct vectors
    u.div_(u.norm(dim=-1, keepdim=True).clamp_min_(EPS))
    everyone = len(tokens) == hidden.shape[0]            # e.g. decode: no gather, no scatter
    x = (hidden if everyone else hidden.index_select(0, tokens)).float()  # [n, D], in place (fp32: hidden)
    nx = x.norm(dim=-1, keepdim=True)
    x.div_(nx.clamp_min(EPS))                            # x / ||x||
    # c_k = lam_k / K * (1 + max(0, cos(x, -v_k))), cos(x, -v_k) = -x_hat . u_k
    if len(uniq) <= MATMUL_MAX_VECTORS:
        c = lam * (1 - torch.mm(x, u.T).gather(1, inv).clamp_max_(0))
        x.addmm_(torch.zeros(len(tokens), len(uniq), device=x.device).scatter_add_(1, inv, c), u)
    else:
        cols = int(valid.any(0).nonzero()[-1]) + 1      # skip trailing empty entry columns
        ut = u.index_select(0, inv[:, :cols].reshape(-1)).view(len(tokens), cols, -1)  # [n, E, D]
        c = lam[:, :cols] * (1 - torch.linalg.vecdot(ut, x.unsqueeze(1)).clamp_max_(0))
        x.unsqueeze(1).baddbmm_(c.unsqueeze(1), ut)      # y = x/||x|| + sum_k c_k u_k
    x.mul_(nx / x.norm(dim=-1, keepdim=True).clamp_min_(EPS))
    if everyone:
        hidden.copy_(x)
    else:
        hidden.index_copy_(0, tokens, x.to(hidden.dtype))
