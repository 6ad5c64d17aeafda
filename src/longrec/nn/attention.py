"""Target attention (the target queries its user's history): scaled dot product, DIN's MLP
score, multi-head.

Shapes follow the request layout: queries [B, M, d] (M targets of one user), keys and values
[B, L, d] (the user's history), scores [B, M, L].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longrec.nn.prelu import PReLU


def _broadcast(mask: Tensor, scores: Tensor) -> Tensor:
    """A history mask [B, L] as [B, 1, L] against scores [B, M, L]; a [B, M, L] one as is."""
    return mask.unsqueeze(-2) if mask.dim() == scores.dim() - 1 else mask


def masked_fill_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """Padding (mask False, [B, L] or [B, M, L]) gets a very negative score, dtype-safe."""
    return scores.masked_fill(~_broadcast(mask, scores), torch.finfo(scores.dtype).min / 2)


def masked_weights(scores: Tensor, mask: Tensor) -> Tensor:
    """The raw scores as weights, zero on padding (the original DIN: no normalisation)."""
    return scores * _broadcast(mask, scores).to(scores.dtype)


def masked_softmax(scores: Tensor, mask: Tensor, sink: Tensor | None = None) -> Tensor:
    """Softmax over the last axis ignoring padding; an all-padding row gives all zeros.

    With a `sink` logit (a scalar tensor) the softmax also runs over one extra, always-present
    slot that is then dropped: w_j = exp(s_j) / (exp(sink) + Σ_k exp(s_k)). The weights then
    sum to less than one, and their sum grows with how many behaviours score high, so the
    pooled vector keeps the *intensity* of a match (how many relevant behaviours) that a plain
    softmax normalises away (DIN's argument for not normalising, kept bounded here)."""
    mask = _broadcast(mask, scores)
    filled = masked_fill_scores(scores, mask)
    if sink is None:
        weights = torch.softmax(filled, dim=-1)
    else:
        total = torch.logaddexp(torch.logsumexp(filled, dim=-1, keepdim=True), sink.to(filled))
        weights = torch.exp(filled - total)
    return weights * mask.to(weights.dtype)


def unit(x: Tensor, eps: float = 1e-4) -> Tensor:
    """x scaled to unit length along the last axis (QK-norm), x / sqrt(|x|² + eps): for the
    O(1)-norm vectors of a normalised attention it is F.normalize, but a zero vector (a padded
    or empty slot) gets a gradient of at most 1/sqrt(eps), not F.normalize's 1/1e-12."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def dot_scores(query: Tensor, keys: Tensor, scale: float | None = None) -> Tensor:
    """<q, k> / sqrt(d) for every (target, behaviour): [B, M, d] x [B, L, d] -> [B, M, L]."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return torch.matmul(query, keys.transpose(-1, -2)) * scale


class DinScore(nn.Module):
    """DIN's local activation unit: MLP([q, k, q-k, q*k]) -> 36 -> PReLU -> 1 (DARE's variant).

    The first layer is applied to the four blocks separately, W[q,k,q-k,q*k] =
    (W1+W3) q + (W2-W3) k + W4 (q*k), so the [B, M, L, 4d] concatenation is never built.
    The score is divided by the input width, as in DARE's code.
    """

    def __init__(self, dim: int, hidden: int = 36):
        super().__init__()
        self.first = nn.Linear(4 * dim, hidden)
        self.act = PReLU(init=0.1)
        self.out = nn.Linear(hidden, 1)
        self.dim = dim

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        d = self.dim
        w = self.first.weight  # [h, 4d]
        wq, wk, wd, wp = w[:, :d], w[:, d : 2 * d], w[:, 2 * d : 3 * d], w[:, 3 * d :]
        q_part = query @ (wq + wd).T + self.first.bias  # [B, M, h]
        k_part = keys @ (wk - wd).T  # [B, L, h]
        prod = query.unsqueeze(2) * keys.unsqueeze(1)  # [B, M, L, d]
        hidden = q_part.unsqueeze(2) + k_part.unsqueeze(1) + prod @ wp.T
        return self.out(self.act(hidden)).squeeze(-1) / (4 * d)


class MultiHeadTargetAttention(nn.Module):
    """Multi-head attention of each target over behaviours with learned Q/K/V/O projections
    (the ESU of SIM and ETA); returns [B, M, dim]."""

    def __init__(self, query_dim: int, key_dim: int, dim: int, heads: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} not divisible by {heads} heads")
        self.heads, self.dim = heads, dim
        self.q = nn.Linear(query_dim, dim, bias=False)
        self.k = nn.Linear(key_dim, dim, bias=False)
        self.v = nn.Linear(key_dim, dim, bias=False)
        self.o = nn.Linear(dim, dim)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """query [B, M, dq]; keys [B, M, K, dk] (per-target retrieved) or [B, L, dk]; mask alike."""
        h, dh = self.heads, self.dim // self.heads
        q = self.q(query).unflatten(-1, (h, dh))  # [B, M, h, dh]
        if keys.dim() == 3:  # shared history: broadcast over targets
            keys, mask = keys.unsqueeze(1), mask.unsqueeze(1)
        k = self.k(keys).unflatten(-1, (h, dh))  # [B, M|1, K, h, dh]
        v = self.v(keys).unflatten(-1, (h, dh))
        scores = torch.einsum("bmhd,bmkhd->bmhk", q, k) / math.sqrt(dh)
        weights = masked_softmax(scores, mask.unsqueeze(-2).expand_as(scores))
        out = torch.einsum("bmhk,bmkhd->bmhd", weights, v.expand(-1, q.shape[1], -1, -1, -1))
        return self.o(out.flatten(-2))
