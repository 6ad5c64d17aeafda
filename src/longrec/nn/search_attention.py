"""Soft top-k search plus target attention in one C++ pass per user (csrc/search_attention.cpp).

Why: at DARE's Taobao configuration the PyTorch operations between the row kernels (masking,
top-k, two softmaxes, gathering and pooling the top K, and all their backward passes) took a
fifth of a training step, each a pass over [B, M, L] tensors. This computes, per user, what
`topk_search` + `masked_softmax` + pooling compute (models.two_stage): the scores stay in a
thread-local buffer, and the backward pass reads each behaviour's rows once per role.

A history is a list of fields: attention rows [U, da] and representation rows [U, dr] at one
index [B, L] into them (None: row l is position l, for position tables), a per-target query
[B, M, da] and a score scale. Same results as the PyTorch path to float rounding (tests in
tests/nn/test_search_attention.py); float32 CPU tensors only (`applicable`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from longrec.nn import row_kernels

_NO_INDEX = torch.empty(0, dtype=torch.long)

# Fields whose per-thread gradient copies would take this many bytes or more get their rows'
# gradients in a second, row-owned phase of the backward (csrc/search_rows_owned.h): no copies
# to zero and fold. Measured on captured DARE batches (min / median of 12 interleaved rounds):
# at 6.2M items (291K distinct rows, 37 MB of copies) the backward took 20.0 / 25.0 ms against
# 27.1 / 28.4 with copies; at 200K items (90K rows, 11.5 MB) copies stayed faster, 13.0 / 13.6
# against 14.6 / 17.3. 0 sends every indexed field through the second phase (tests). The
# crossover depends on the machine's caches: `LONGREC_ROW_OWNED_BYTES` overrides it per call
# (benchmarks/ab_steps.py compares two settings with `ENV:LONGREC_ROW_OWNED_BYTES=...`).
ROW_OWNED_BYTES = 16 << 20


def row_owned_bytes() -> int:
    value = os.environ.get("LONGREC_ROW_OWNED_BYTES")
    if value is None:
        return ROW_OWNED_BYTES
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"LONGREC_ROW_OWNED_BYTES must be an integer (bytes), got '{value}'"
        ) from None


class _SearchAttend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n: int, scale: list[float], mask: Tensor, k: int, full: bool, *tensors):
        attn, repr_, index, query = (list(tensors[i * n : (i + 1) * n]) for i in range(4))
        top, idx, valid, w_top, pooled_all, w_all = row_kernels._extension().search_attend(
            attn, repr_, index, query, scale, mask, k, full
        )
        ctx.n, ctx.scale = n, scale
        ctx.save_for_backward(mask, idx, w_top, w_all, *tensors)
        ctx.mark_non_differentiable(idx, valid)
        return top, pooled_all, idx, valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_top, grad_all, _idx, _valid):
        mask, idx, w_top, w_all, *tensors = ctx.saved_tensors
        n = ctx.n
        attn, repr_, index, query = (tensors[i * n : (i + 1) * n] for i in range(4))
        empty = grad_top.new_empty(0)
        grads = row_kernels._extension().search_attend_backward(
            list(attn),
            list(repr_),
            list(index),
            list(query),
            ctx.scale,
            mask,
            idx,
            w_top,
            w_all,
            grad_top.contiguous(),  # unused outputs' gradients arrive as zeros (materialised)
            grad_all.contiguous() if w_all.numel() else empty,
            row_owned_bytes(),
        )
        g_attn, g_repr, g_query = grads[:n], grads[n : 2 * n], grads[2 * n :]
        return (None, None, None, None, None, *g_attn, *g_repr, *([None] * n), *g_query)


def applicable(*tensors: Tensor) -> bool:
    """Whether the kernel can take these tensors (float32 on the CPU, extension built)."""
    return row_kernels.applicable(*tensors)


def search_attend(
    attn: list[Tensor],
    repr_: list[Tensor],
    index: list[Tensor | None],
    query: list[Tensor],
    scale: list[float],
    mask: Tensor,
    k: int,
    full: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(pooled over the top k [B, M, sum dr], pooled over the whole history or None,
    idx [B, M, k'], valid [B, M, k']) with k' = min(k, L); the poolings are softmax-weighted
    by score[b, m, l] = sum_f scale_f <query_f[b, m], attn_f[index_f[b, l]]>."""
    n = len(attn)
    index = [_NO_INDEX if i is None else i.contiguous() for i in index]
    tensors = [*attn, *repr_, *index, *(q.contiguous() for q in query)]
    top, pooled_all, idx, valid = _SearchAttend.apply(
        n, [float(s) for s in scale], mask.contiguous(), k, full, *tensors
    )
    return top, (pooled_all if full else None), idx, valid
