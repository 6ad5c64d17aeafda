"""Pre-LayerNorm transformer blocks whose attention can be split into a cached, shared part and
a per-target part (LONGER's KV-cache serving, docs/models.md, "LONGER").

Shapes: tokens [..., N, d]; heads [..., h, N, d_h]; boolean masks are True = may attend and
broadcast against the scores [..., h, N_q, N_k]. Every query row must be allowed at least one
key (callers let a query see itself), otherwise softmax has nothing to normalise.

A block computes  x + Attn(LN1(x_q), LN1(x_kv))  then  h + FFN(LN2(h)).  Its keys and values
depend only on the key tokens, so they can be computed once (`kv`) and reused by any queries
(`forward`), and `forward_split` lets per-target query groups attend jointly to their own keys
and to shared cached keys without copying the shared keys per target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrec.nn.attention import unit


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[..., N, h * d_h] -> [..., h, N, d_h]."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """[..., h, N, d_h] -> [..., N, h * d_h]."""
    return x.transpose(-3, -2).flatten(-2)


def split_attention(
    q: Tensor,
    k_own: Tensor,
    v_own: Tensor,
    own_mask: Tensor,
    k_shared: Tensor,
    v_shared: Tensor,
    shared_mask: Tensor,
    dropout: float = 0.0,
    null_key: bool = False,
    scale: float | None = None,
) -> Tensor:
    """One softmax over the union of a group's own keys and shared keys.

    q, k_own, v_own: [B, M, h, g, d_h] (M independent query groups of g tokens each, e.g. the
    global tokens of M targets); own_mask [g, g], True = may attend, with a True diagonal (every
    query sees itself, so no row is empty); k_shared, v_shared: [B, h, S, d_h] (e.g. the cached
    user-side keys); shared_mask [B, 1|h, 1, S]: which shared keys every query may read.
    Returns [B, M, h, g, d_h]: attention over the keys [own; shared] of each group, without
    materialising the shared keys M times. `null_key` adds a key of score 0 and value 0 (see
    `PreLNBlock`); `scale` multiplies the scores (default 1/√d_h).

    The softmax is taken in pieces (a common row maximum, exp, one sum), so the [.., M g, S]
    scores are never concatenated, masked with a boolean or copied: on 500 candidates against
    a 500-token cache this halves the time of a plain concat-and-softmax.
    """
    b, m, h, g, dh = q.shape
    q = q * (1.0 / math.sqrt(dh) if scale is None else scale)
    s_own = torch.matmul(q, k_own.transpose(-1, -2)).masked_fill(~own_mask, float("-inf"))
    qs = q.permute(0, 2, 1, 3, 4).reshape(b, h, m * g, dh)
    bias = torch.zeros(shared_mask.shape, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill(~shared_mask, float("-inf"))
    s_sh = torch.matmul(qs, k_shared.transpose(-1, -2)).add_(bias)  # [B, h, M g, S]
    own_max = s_own.amax(-1).transpose(1, 2).reshape(b, h, m * g, 1)  # finite: the diagonal
    top = torch.maximum(own_max, s_sh.amax(-1, keepdim=True))
    if null_key:
        top = top.clamp_min(0.0)
    if torch.is_grad_enabled() and s_sh.requires_grad:  # autograd keeps exp's output
        e_sh = (s_sh - top).exp()
    else:
        e_sh = s_sh.sub_(top).exp_()
    top_own = top.view(b, h, m, g, 1).transpose(1, 2)  # [B, M, h, g, 1]
    e_own = (s_own - top_own).exp()
    denom = e_own.sum(-1, keepdim=True) + e_sh.sum(-1, keepdim=True).view(b, h, m, g, 1).transpose(
        1, 2
    )
    if null_key:
        denom = denom + (-top_own).exp()
    if dropout > 0:
        e_own, e_sh = F.dropout(e_own, dropout), F.dropout(e_sh, dropout)
    out_sh = torch.matmul(e_sh, v_shared).view(b, h, m, g, dh).transpose(1, 2)
    return (torch.matmul(e_own, v_own) + out_sh) / denom


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear (position-wise)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PreLNBlock(nn.Module):
    """Pre-LN multi-head (cross-)attention + FFN with a reusable key/value projection.

    `null_key`: every query also sees a key of score 0 whose value is 0 (softmax "off by one"),
    so a query can attend to nothing: its attention output then shrinks towards 0 instead of
    being forced onto some key. It also gives every row a valid key, so an all-masked row
    returns 0 rather than NaN.

    `temperature` (QK-norm): each head's query and key are scaled to unit length and the score
    is a learned per-head temperature (initialised to this value) times their cosine, so no
    weight growth can saturate the softmax. Keys are normalised in `kv`, so cached keys are too.

    `shared_shift=False`: the attention LayerNorm has no shift and the query/key/value
    projections no bias. A shift or bias is one vector added to every token's query, key or
    value; Adam grows it by ~lr per step whatever its gradient, and once it dominates, every
    key points the same way, the cosine scores of QK-norm no longer tell tokens apart and the
    attention goes uniform (docs/models.md, "Why the end-to-end models did not learn").
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        dropout: float = 0.0,
        null_key: bool = False,
        temperature: float | None = None,
        shared_shift: bool = True,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout, self.null_key = heads, dropout, null_key
        self.ln_attn = nn.LayerNorm(dim, bias=shared_shift)
        self.ln_ffn = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=shared_shift)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=shared_shift)
        self.out = nn.Linear(dim, dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.drop = nn.Dropout(dropout)
        self.log_temperature = None
        if temperature is not None:
            if temperature <= 0:
                raise ValueError(f"attention temperature must be > 0, got {temperature}")
            self.log_temperature = nn.Parameter(torch.full((heads,), math.log(temperature)))

    def identity_init(self) -> None:
        """W_Q = W_K = W_V = W_O = I (biases 0) and the FFN's output 0: the block starts as
        similarity attention over its normalised inputs, added to the residual stream."""
        d = self.q.weight.shape[0]
        with torch.no_grad():
            for lin in (self.q, self.out, self.kv_proj):
                nn.init.eye_(lin.weight[:d])
                if lin is self.kv_proj:
                    nn.init.eye_(lin.weight[d:])
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            last = self.ffn.net[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _queries(self, normed: Tensor) -> Tensor:
        """Per-head queries [..., h, N, d_h], unit length x temperature under QK-norm."""
        q = split_heads(self.q(normed), self.heads)
        if self.log_temperature is None:
            return q
        temperature = self.log_temperature.exp().to(q.dtype).view(-1, 1, 1)
        return unit(q) * temperature

    def _keys(self, k: Tensor) -> Tensor:
        return k if self.log_temperature is None else unit(k)

    @property
    def _scale(self) -> float | None:
        return None if self.log_temperature is None else 1.0

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of tokens x [..., N, d] -> two [..., h, N, d_h]."""
        k, v = self.kv_proj(self.ln_attn(x)).chunk(2, dim=-1)
        return self._keys(split_heads(k, self.heads)), split_heads(v, self.heads)

    def _finish(self, x: Tensor, attended: Tensor) -> Tensor:
        """Residual + output projection, then the FFN sub-layer; attended [..., h, N, d_h]."""
        h = x + self.drop(self.out(merge_heads(attended)))
        return h + self.drop(self.ffn(self.ln_ffn(h)))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Queries x [B, N_q, d] over keys/values [B, h, N_k, d_h] (from `kv`), mask
        broadcastable to [B, h, N_q, N_k] (bool, True = may attend) -> [B, N_q, d]."""
        q = self._queries(self.ln_attn(x))
        if self.null_key:
            zero = k.new_zeros(*k.shape[:-2], 1, k.shape[-1])
            k, v = torch.cat((zero, k), dim=-2), torch.cat((zero, v), dim=-2)
            mask = mask.expand(*mask.shape[:-1], k.shape[-2] - 1)
            mask = torch.cat((mask.new_ones(*mask.shape[:-1], 1), mask), dim=-1)
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self._scale,
        )
        return self._finish(x, attended)

    def forward_split(
        self, x: Tensor, own_mask: Tensor, k_shared: Tensor, v_shared: Tensor, shared_mask: Tensor
    ) -> Tensor:
        """Query groups x [B, M, g, d] attend to their own tokens (own_mask [g, g]) and to the
        shared keys [B, h, S, d_h] (shared_mask [B, 1|h, 1, S]) -> [B, M, g, d]."""
        normed = self.ln_attn(x)
        q = self._queries(normed)
        k, v = (split_heads(t, self.heads) for t in self.kv_proj(normed).chunk(2, dim=-1))
        k = self._keys(k)
        attended = split_attention(
            q,
            k,
            v,
            own_mask,
            k_shared,
            v_shared,
            shared_mask,
            self.dropout if self.training else 0.0,
            self.null_key,
            self._scale,
        )
        return self._finish(x, attended)
