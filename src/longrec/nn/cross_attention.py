"""Single-query multi-head cross attention (STCA; docs/models.md, "STCA"), in two forms with
equal results.

Every target m of a request is one query attending over the request's history X [L, d]
(shared by its M targets); head r (of h, d_h = d/h):

    α_r = softmax(q W_Q^r (X W_K^r)ᵀ / √d_h),   o_r = α_r X W_V^r,   o = [o_1 ‖ … ‖ o_h] W_O.

* `plain`: K = X W_K and V = X W_V are materialised ([B, L, d]), then scores and pooling per
  head. Costs 2·L·d² (projections) + 2·M·L·d (scores, pooling) multiply-adds per request.
* `reassociated` (the STCA paper's "kernel trick"): with one query per (target, head),
  q W_Q^r (X W_K^r)ᵀ = ((q W_Q^r) W_K^rᵀ) Xᵀ = u_r Xᵀ and α_r X W_V^r = (α_r X) W_V^r, so K and V
  are never built: u [B, M·h, d] (from the queries alone), then two batched GEMMs over all
  targets and heads at once, scores = u Xᵀ [B, M·h, L] and pooled = α X [B, M·h, d] (run fused,
  as one attention with K = V = X, by `F.scaled_dot_product_attention`), then W_V^r on
  d-vectors. Costs 2·M·h·L·d multiply-adds per request against 2·L·d² + 2·M·L·d for
  `plain`: cheaper while M·(h − 1) < d, i.e. up to 21 targets per request at d = 64, h = 4
  (any M with one head), and it never builds an L-sized tensor wider than M·h. For larger M
  (serving hundreds of candidates) `plain` is the cheaper form, and its K and V depend on the
  user only.
* `auto` (the default) picks the cheaper of the two per call from M, h and d
  (`cheaper_kernel`); both give the same result.

Weights follow nn.Linear (W [out, in], y = x Wᵀ); the projections have no bias (a key bias adds
a per-query constant that softmax cancels; a value bias would not vanish for an empty history).
Padding (mask False) gets no weight; a history without any real behaviour pools to zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from longrec.nn.attention import masked_fill_scores, masked_softmax, unit

KERNELS = ("auto", "reassociated", "plain")


def cheaper_kernel(targets: int, heads: int, dim: int) -> str:
    """The form with fewer multiply-adds for `targets` queries per history (see above): the
    re-associated one while M·(h − 1) < d (training: a few targets per request), the plain one
    beyond (serving hundreds of candidates against one history)."""
    return "plain" if targets * (heads - 1) >= dim else "reassociated"


def cross_attention_plain(
    query: Tensor,
    x: Tensor,
    mask: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    heads: int,
    return_scores: bool = True,
    temperature: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """query [B, M, d], x [B, L, d], mask [B, L] -> (heads concatenated before W_O [B, M, d],
    scaled scores [B, M, h, L], padding set to finfo.min / 2). The reference form: K and V
    materialised, `nn.attention.masked_softmax`. Without `return_scores` the per-head
    attention runs fused (`F.scaled_dot_product_attention`: no [B, M, h, L] tensor), which is
    what makes this form fast for hundreds of candidates.

    With a `temperature` [h] (QK-norm), each head's query and key are scaled to unit length and
    the score is temperature x their cosine instead of q·k/√d_h: bounded by the temperature
    whatever the weights grow to."""
    b, m, d = query.shape
    dh = d // heads
    q = (query @ w_q.T).view(b, m, heads, dh)
    k = (x @ w_k.T).view(b, -1, heads, dh)
    v = (x @ w_v.T).view(b, -1, heads, dh)
    scale = 1.0 / math.sqrt(dh)
    if temperature is not None:
        q = unit(q) * temperature.to(q.dtype).view(heads, 1)
        k = unit(k)
        scale = 1.0
    if not return_scores and x.shape[1] > 0:
        attn_mask, keep = _fused_mask(mask)
        pooled = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            scale=scale,
        ).transpose(1, 2)
        return _zero_empty(pooled, keep).reshape(b, m, d), None
    scores = torch.einsum("bmhe,blhe->bmhl", q, k) * scale
    mask = mask[:, None, None, :].expand_as(scores)
    alpha = masked_softmax(scores, mask)
    pooled = torch.einsum("bmhl,blhe->bmhe", alpha, v)
    return pooled.reshape(b, m, d), masked_fill_scores(scores, mask)


def cross_attention_reassociated(
    query: Tensor,
    x: Tensor,
    mask: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    heads: int,
    return_scores: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Same inputs and outputs as `cross_attention_plain`, without K or V (scores None unless
    `return_scores`).

    All targets and heads form one set of M·h queries u of width d against the history itself
    (K = V = X). Without `return_scores` the two GEMMs and the softmax run fused in
    `F.scaled_dot_product_attention` (one head of width d, scale 1) at inference: its CPU flash
    kernel streams X block by block and never stores the [B, M·h, L] scores. In CPU training
    `_SoftmaxPool` runs the two GEMMs with a hand-written backward (see `_pool_fused`; autograd's
    generic backward of the same GEMMs was measured 1.5-2x slower than SDPA). With
    `return_scores` (search scores, tests) the GEMMs run explicitly: `_pool_explicit`."""
    b, m, d = query.shape
    dh = d // heads
    q = (query @ w_q.T).view(b, m, heads, dh)
    # u_r = (q W_Q^r) W_K^rᵀ with W_K^r = w_k[r·dh:(r+1)·dh]ᵀ; the 1/√d_h scale folded in
    u = torch.einsum("bmhe,hed->bmhd", q, w_k.view(heads, dh, d)) / math.sqrt(dh)
    u = u.reshape(b, m * heads, d)
    if return_scores or x.shape[1] == 0:
        pooled, scores = _pool_explicit(u, x, mask)
    else:
        pooled, scores = _pool_fused(u, x, mask), None
    pooled = pooled.view(b, m, heads, d)
    out = torch.einsum("bmhd,hed->bmhe", pooled, w_v.view(heads, dh, d))  # (α_r X) W_V^r
    return out.reshape(b, m, d), (scores.view(b, m, heads, -1) if return_scores else None)


def _pool_explicit(u: Tensor, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(u Xᵀ) X as two batched GEMMs: (pooled [B, R, d], masked scores [B, R, L]).

    In place where autograd allows: padding is masked in the first GEMM's own output (its
    backward does not need it), and a history without real behaviours has its pooled rows
    zeroed rather than its weights (`masked_softmax`'s last pass over [B, R, L])."""
    full = bool(mask.all())
    scores = _masked_scores(u, x, None if full else mask)  # [B, R, L]: GEMM 1
    pooled = torch.matmul(torch.softmax(scores, dim=-1), x)  # [B, R, d]: GEMM 2
    if not full:
        pooled = pooled * mask.any(dim=1).view(-1, 1, 1).to(pooled.dtype)
    return pooled, scores


def _masked_scores(u: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
    """u Xᵀ [B, R, L] with padding (mask [B, L] False) set to finfo.min / 2, in place."""
    scores = torch.matmul(u, x.transpose(1, 2))
    if mask is not None:
        scores.masked_fill_(~mask.unsqueeze(1), torch.finfo(scores.dtype).min / 2)
    return scores


def _fused_mask(mask: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """SDPA mask [B, 1, 1, L] for a history mask [B, L] (None when nothing is padded), and
    which rows have a real behaviour [B] (None likewise). A history without any attends to all
    its (padding) slots, to stay finite; `_zero_empty` then zeroes its output."""
    if bool(mask.all()):
        return None, None
    keep = mask.any(dim=1)
    return (mask | ~keep.unsqueeze(1))[:, None, None, :], keep


def _zero_empty(pooled: Tensor, keep: Tensor | None) -> Tensor:
    """Rows of pooled [B, ...] whose history had no real behaviour set to zero."""
    if keep is None:
        return pooled
    return pooled * keep.view(-1, *[1] * (pooled.dim() - 1)).to(pooled.dtype)


def _pool_fused(u: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """softmax(u Xᵀ) X [B, R, d] without returning scores.

    Inference runs one fused attention call (no [B, R, L] tensor). CPU training runs
    `_SoftmaxPool` instead: SDPA's backward treats K and V as two inputs, so it zero-fills two
    [B, L, 1, d] gradient buffers per layer and autograd then adds them; measured in a full
    STCA training step at L = 10K (16 requests of 8 targets), 327-336 ms against 397-405 with
    SDPA (`benchmarks/stca_attention_ab.py` times the two in isolation)."""
    attn_mask, keep = _fused_mask(mask)
    needs_grad = torch.is_grad_enabled() and (u.requires_grad or x.requires_grad)
    if needs_grad and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        pooled = _SoftmaxPool.apply(u, x, None if attn_mask is None else attn_mask[:, 0, 0, :])
    else:
        xs = x.unsqueeze(1)
        pooled = F.scaled_dot_product_attention(
            u.unsqueeze(1), xs, xs, attn_mask=attn_mask, scale=1.0
        ).squeeze(1)
    return _zero_empty(pooled, keep)


class _SoftmaxPool(torch.autograd.Function):
    """O = softmax(U Xᵀ) X with K = V = X, as two batched GEMMs that keep the weights P [B, R, L]
    for the backward (R = targets x heads is small, so P is too: 20 MB at B = 16, R = 32,
    L = 10K). Backward, with δ = rowsum(dO ⊙ O):

        dS = P ⊙ (dO Xᵀ − δ),   dU = dS X,   dX = Pᵀ dO + dSᵀ U   (one bmm + one baddbmm)

    so the history gradient is written once, with no per-role buffers to zero and add."""

    @staticmethod
    def forward(ctx, u: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        weights = torch.softmax(_masked_scores(u, x, mask), dim=-1)
        out = torch.bmm(weights, x)
        ctx.save_for_backward(u, x, weights, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        u, x, weights, out = ctx.saved_tensors
        grad = grad.contiguous()
        ds = torch.bmm(grad, x.transpose(1, 2))
        ds.sub_((grad * out).sum(-1, keepdim=True)).mul_(weights)
        du = torch.bmm(ds, x)
        dx = torch.bmm(weights.transpose(1, 2), grad).baddbmm_(ds.transpose(1, 2), u)
        return du, dx, None


class MultiHeadCrossAttention(nn.Module):
    """o = MHCrossAttn(q, X): queries [B, M, d] against a shared history [B, L, d] -> [B, M, d]."""

    def __init__(
        self, dim: int, heads: int, kernel: str = "auto", temperature: float | None = None
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got '{kernel}'")
        self.heads, self.kernel = heads, kernel
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim)
        # QK-norm: a learned log-temperature per head (see `cross_attention_plain`)
        self.log_temperature = None
        if temperature is not None:
            if temperature <= 0:
                raise ValueError(f"attention temperature must be > 0, got {temperature}")
            self.log_temperature = nn.Parameter(torch.full((heads,), math.log(temperature)))

    def identity_init(self) -> None:
        """W_Q = W_K = W_V = W_O = I, b_O = 0: at init a query scores the history by its
        similarity to each behaviour and pools the behaviours themselves."""
        with torch.no_grad():
            for lin in (self.q, self.k, self.v, self.o):
                nn.init.eye_(lin.weight)
            nn.init.zeros_(self.o.bias)

    def attend(
        self, query: Tensor, x: Tensor, mask: Tensor, return_scores: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(output [B, M, d], scaled pre-softmax scores [B, M, h, L] or None unless
        `return_scores`)."""
        weights = (self.q.weight, self.k.weight, self.v.weight)
        kernel = self.kernel
        if self.log_temperature is not None:  # unit keys need K: only the plain form has it
            kernel = "plain"
        elif kernel == "auto":
            kernel = cheaper_kernel(query.shape[1], self.heads, query.shape[-1])
        if kernel == "plain":
            temperature = None if self.log_temperature is None else self.log_temperature.exp()
            pooled, scores = cross_attention_plain(
                query, x, mask, *weights, self.heads, return_scores, temperature
            )
        else:
            pooled, scores = cross_attention_reassociated(
                query, x, mask, *weights, self.heads, return_scores=return_scores
            )
        return self.o(pooled), scores

    def forward(self, query: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        return self.attend(query, x, mask)[0]
