"""Single-query multi-head cross attention (STCA, SPEC §7.2), in two forms with equal results.

Every target m of a request is one query attending over the request's history X [L, d]
(shared by its M targets); head r (of h, d_h = d/h):

    α_r = softmax(q W_Q^r (X W_K^r)ᵀ / √d_h),   o_r = α_r X W_V^r,   o = [o_1 ‖ … ‖ o_h] W_O.

* `plain`: K = X W_K and V = X W_V are materialised ([B, L, d]), then scores and pooling per
  head. Costs 2·L·d² (projections) + 2·M·L·d (scores, pooling) multiply-adds per request.
* `reassociated` (SPEC §7.2 "kernel trick"): with one query per (target, head),
  q W_Q^r (X W_K^r)ᵀ = ((q W_Q^r) W_K^rᵀ) Xᵀ = u_r Xᵀ and α_r X W_V^r = (α_r X) W_V^r, so K and V
  are never built: u [B, M·h, d] (from the queries alone), then two batched GEMMs over all
  targets and heads at once, scores = u Xᵀ [B, M·h, L] and pooled = α X [B, M·h, d], then W_V^r
  on d-vectors. Costs 2·M·h·L·d multiply-adds per request: cheaper than `plain` while
  M·h < d + M (M·h·d vs d² + M·d per token), i.e. for up to ~2d/h targets per request; it
  never builds an L-sized tensor wider than M·h. With M·h ≫ d, `plain` is the cheaper one.

Weights follow nn.Linear (W [out, in], y = x Wᵀ); the projections have no bias (a key bias adds
a per-query constant that softmax cancels; a value bias would not vanish for an empty history).
Padding (mask False) gets no weight; a history without any real behaviour pools to zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longrec.nn.attention import masked_softmax

KERNELS = ("reassociated", "plain")


def cross_attention_plain(
    query: Tensor, x: Tensor, mask: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor, heads: int
) -> tuple[Tensor, Tensor]:
    """query [B, M, d], x [B, L, d], mask [B, L] -> (heads concatenated before W_O [B, M, d],
    scaled scores [B, M, h, L]). The reference form: K and V materialised."""
    b, m, d = query.shape
    dh = d // heads
    q = (query @ w_q.T).view(b, m, heads, dh)
    k = (x @ w_k.T).view(b, -1, heads, dh)
    v = (x @ w_v.T).view(b, -1, heads, dh)
    scores = torch.einsum("bmhe,blhe->bmhl", q, k) / math.sqrt(dh)
    alpha = masked_softmax(scores, mask[:, None, None, :].expand_as(scores))
    pooled = torch.einsum("bmhl,blhe->bmhe", alpha, v)
    return pooled.reshape(b, m, d), scores


def cross_attention_reassociated(
    query: Tensor,
    x: Tensor,
    mask: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    heads: int,
    temperature=None,
) -> tuple[Tensor, Tensor]:
    """Same inputs and outputs as `cross_attention_plain`, without K or V."""
    b, m, d = query.shape
    dh = d // heads
    q = (query @ w_q.T).view(b, m, heads, dh)
    # u_r = (q W_Q^r) W_K^rᵀ with W_K^r = w_k[r·dh:(r+1)·dh]ᵀ; the 1/√d_h scale folded in
    u = torch.einsum("bmhe,hed->bmhd", q, w_k.view(heads, dh, d)) / math.sqrt(dh)
    if temperature is not None:
        u = torch.nn.functional.normalize(u, dim=-1) * temperature.view(heads, 1)
    u = u.reshape(b, m * heads, d)
    scores = torch.matmul(u, x.transpose(1, 2))  # [B, M·h, L]: GEMM 1
    alpha = masked_softmax(scores, mask)
    pooled = torch.matmul(alpha, x).view(b, m, heads, d)  # [B, M·h, d]: GEMM 2
    out = torch.einsum("bmhd,hed->bmhe", pooled, w_v.view(heads, dh, d))  # (α_r X) W_V^r
    return out.reshape(b, m, d), scores.view(b, m, heads, -1)


class MultiHeadCrossAttention(nn.Module):
    """o = MHCrossAttn(q, X): queries [B, M, d] against a shared history [B, L, d] -> [B, M, d]."""

    def __init__(self, dim: int, heads: int, kernel: str = "reassociated", norm: bool = False):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(heads)) if norm else None
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got '{kernel}'")
        self.heads, self.kernel = heads, kernel
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim)

    def attend(self, query: Tensor, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(output [B, M, d], scaled pre-softmax scores [B, M, h, L])."""
        fn = (
            cross_attention_reassociated if self.kernel == "reassociated" else cross_attention_plain
        )
        pooled, scores = fn(
            query,
            x,
            mask,
            self.q.weight,
            self.k.weight,
            self.v.weight,
            self.heads,
            self.temperature,
        )
        return self.o(pooled), scores

    def forward(self, query: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        return self.attend(query, x, mask)[0]
