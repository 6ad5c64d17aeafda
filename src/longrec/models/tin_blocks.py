"""Interest modules of the TIN family (docs/models.md, "Sequence modelling"): each pools retrieved
behaviours for each target. Inputs are already temporally encoded: behaviours e [B, M, K, d]
(= e_i + P[f(i)]), targets v [B, M, d] (= v_t + P[0]), validity [B, M, K].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longrec.nn.attention import masked_softmax


def tin_pool(
    e: Tensor, v: Tensor, valid: Tensor, query: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """TIN's target-aware attention and representation: alpha = softmax(<e_i, q>/sqrt(d)),
    u = sum_i alpha_i (e_i ⊙ q) = (sum_i alpha_i e_i) ⊙ q (TR after pooling is exact for a single
    head, as ⊙ q is linear). Returns (u [B, M, d], alpha [B, M, K])."""
    q = v if query is None else query
    scores = (e * q.unsqueeze(2)).sum(-1) / math.sqrt(e.shape[-1])
    alpha = masked_softmax(scores, valid)
    return (alpha.unsqueeze(-1) * e).sum(2) * q, alpha


class MultiHeadTin(nn.Module):
    """Multi-head TIN: per-head projections, and TR inside each head (value_h ⊙ query_h before
    the weighted sum, as third-party implementations do; docs/models.md, "Sequence
    modelling")."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TIN dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim)

    def forward(self, e: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        h = self.heads
        q = self.q(v).unflatten(-1, (h, -1))  # [B, M, h, dh]
        k = self.k(e).unflatten(-1, (h, -1))  # [B, M, K, h, dh]
        val = self.v(e).unflatten(-1, (h, -1))
        scores = torch.einsum("bmhd,bmkhd->bmhk", q, k) / math.sqrt(q.shape[-1])
        alpha = masked_softmax(scores, valid.unsqueeze(2).expand_as(scores))
        pooled = torch.einsum("bmhk,bmkhd->bmhd", alpha, val) * q  # TR per head
        return self.o(pooled.flatten(-2))


class StackedTin(nn.Module):
    """Stacked TIN (docs/models.md, "Sequence modelling"; [INFER] equations): L layers of target
    attention with a running query q^(l) = LN(q^(l-1) + W^(l) u^(l)),
    u^(l) = sum_i alpha^(l)_i (e_i ⊙ q^(l-1)), so layer l multiplies l+1 embeddings (3 layers:
    "up to 4th-order" interactions). Output: concat of all u^(l) (`output="concat"`) or the last
    (`"last"`)."""

    def __init__(self, dim: int, layers: int = 3, output: str = "concat"):
        super().__init__()
        if output not in ("concat", "last"):
            raise ValueError("stacked output must be concat or last")
        self.output = output
        self.maps = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.out_dim = dim * (layers if output == "concat" else 1)

    def forward(self, e: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        q, outs = v, []
        for w, norm in zip(self.maps, self.norms, strict=True):
            u, _ = tin_pool(e, v, valid, query=q)
            outs.append(u)
            q = norm(q + w(u))
        return torch.cat(outs, dim=-1) if self.output == "concat" else outs[-1]


def dsi_pool(group_scores: list[Tensor], e: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """Decoupled Side-Info TIN (docs/models.md, "Sequence modelling"; [INFER] equations): every
    field group attends with its own scores, all groups pool the same fused values, TR per group:
    concat_m u^(m)."""
    outs = []
    for scores in group_scores:
        alpha = masked_softmax(scores, valid)
        outs.append((alpha.unsqueeze(-1) * e).sum(2) * v)
    return torch.cat(outs, dim=-1)
