"""Soft top-k search plus target attention in one C++ pass per user (csrc/search_attention.cpp).

Why: at DARE's Taobao configuration the PyTorch operations between the row kernels (masking,
top-k, two softmaxes, gathering and pooling the top K, and all their backward passes) took a
fifth of a training step, each a pass over [B, M, L] tensors. This computes, per user, what
`topk_search` + `masked_softmax` + pooling compute (models.two_stage): the scores stay in a
thread-local buffer, and the backward pass reads each behaviour's rows once per role.

A history is a list of fields: attention rows [U, da] and representation rows [U, dr] at one
index [B, L] into them (None: row l is position l, for position tables), a per-target query
[B, M, da] and a score scale. Same results as the PyTorch path (`search_attend_reference`)
to float rounding (tests/nn/test_search_attention.py, tests/ops/test_parity.py); float32 CPU
tensors only. Which one runs is ops.dispatch's choice (`train.kernels`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from longrec.nn import row_kernels
from longrec.nn.attention import masked_softmax
from longrec.nn.search import topk_search
from longrec.ops import dispatch

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
    """tensors: attn, repr_ (what the gradients are for: the rows, or the distinct rows'
    stand-ins of nn.embedding.table_rows), index, query, then the rows the kernels read and
    each field's gradient index (empty: `index`), F of each."""

    @staticmethod
    def forward(ctx, n: int, scale: list[float], mask: Tensor, k: int, full: bool, *tensors):
        attn, _repr, index, query, read_a, read_r, grad_index = _fields(tensors, n)
        top, idx, valid, w_top, pooled_all, w_all = row_kernels._extension().search_attend(
            read_a, read_r, index, query, scale, mask, k, full
        )
        ctx.n, ctx.scale = n, scale
        ctx.grad_rows = grad_rows(attn, grad_index)
        ctx.save_for_backward(mask, idx, w_top, w_all, *tensors)
        ctx.mark_non_differentiable(idx, valid)
        return top, pooled_all, idx, valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_top, grad_all, _idx, _valid):
        mask, idx, w_top, w_all, *tensors = ctx.saved_tensors
        n = ctx.n
        _attn, _repr, index, query, read_a, read_r, grad_index = _fields(tensors, n)
        empty = grad_top.new_empty(0)
        grads = row_kernels._extension().search_attend_backward(
            read_a,
            read_r,
            index,
            query,
            ctx.scale,
            mask,
            idx,
            w_top,
            w_all,
            grad_top.contiguous(),  # unused outputs' gradients arrive as zeros (materialised)
            grad_all.contiguous() if w_all.numel() else empty,
            row_owned_bytes(),
            grad_index,
            ctx.grad_rows,
        )
        g_attn, g_repr, g_query = grads[:n], grads[n : 2 * n], grads[2 * n :]
        none = [None] * n
        return (None, None, None, None, None, *g_attn, *g_repr, *none, *g_query, *none * 3)


def _fields(tensors, n: int) -> list[list[Tensor]]:
    return [list(tensors[i * n : (i + 1) * n]) for i in range(7)]


def grad_rows(attn: list[Tensor], grad_index: list[Tensor]) -> list[int]:
    """Each field's gradient rows where it has a gradient index of its own (the count of the
    distinct rows' stand-ins), else 0 (the rows read)."""
    return [a.shape[0] if g.numel() else 0 for a, g in zip(attn, grad_index, strict=True)]


def applicable(*tensors: Tensor) -> bool:
    """Whether the kernel runs on these tensors under the kernels setting (ops.dispatch)."""
    return dispatch.use_native("search_attend", *tensors)


def search_attend(
    attn: list[Tensor],
    repr_: list[Tensor],
    index: list[Tensor | None],
    query: list[Tensor],
    scale: list[float],
    mask: Tensor,
    k: int,
    full: bool,
    tables: list[tuple[Tensor, Tensor, Tensor] | None] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(pooled over the top k [B, M, sum dr], pooled over the whole history or None,
    idx [B, M, k'], valid [B, M, k']) with k' = min(k, L); the poolings are softmax-weighted
    by score[b, m, l] = sum_f scale_f <query_f[b, m], attn_f[index_f[b, l]]>.

    `tables[f]` = (attention table, representation table, grad index [B, L] int64): field f's
    rows are read from the tables at `index` (the batch's ids), and attn[f] / repr_[f] are the
    batch's distinct rows' stand-ins [U, d] (nn.embedding.table_rows), whose gradients are
    added at grad index. Training then copies no rows out of the tables.

    Where the kernel does not run (ops.dispatch; an empty batch), `search_attend_reference`
    computes the same; fields read from their tables need the kernel."""
    n = len(attn)
    tables = tables or [None] * n
    # an empty batch has nothing to compute, and its empty index would read as "no index"
    if mask.shape[0] == 0 or not applicable(*attn, *repr_, *query):
        if mask.shape[0] and any(t is not None for t in tables):
            raise RuntimeError("fields read from their tables need the fused search kernel")
        return search_attend_reference(attn, repr_, index, query, scale, mask, k, full)
    index = [_NO_INDEX if i is None else i.contiguous() for i in index]
    read_a = [a if t is None else t[0].detach() for a, t in zip(attn, tables, strict=True)]
    read_r = [r if t is None else t[1].detach() for r, t in zip(repr_, tables, strict=True)]
    grad_index = [_NO_INDEX if t is None else t[2].contiguous() for t in tables]
    tensors = [*attn, *repr_, *index, *(q.contiguous() for q in query)]
    tensors += [*read_a, *read_r, *grad_index]
    top, pooled_all, idx, valid = _SearchAttend.apply(
        n, [float(s) for s in scale], mask.contiguous(), k, full, *tensors
    )
    return top, (pooled_all if full else None), idx, valid


def search_attend_reference(
    attn: list[Tensor],
    repr_: list[Tensor],
    index: list[Tensor | None],
    query: list[Tensor],
    scale: list[float],
    mask: Tensor,
    k: int,
    full: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """search_attend in PyTorch operations (the reference path; any dtype and device): each
    field gathered to [B, L, d], scores, `topk_search`, `masked_softmax` and the poolings."""
    b, length = mask.shape
    m = max(q.shape[1] for q in query)
    s: Tensor | float = 0.0
    gathered = []
    for a, r, i, q, c in zip(attn, repr_, index, query, scale, strict=True):
        rows_a = a[i] if i is not None else a[:length].expand(b, length, -1)
        gathered.append(r[i] if i is not None else r[:length].expand(b, length, -1))
        s = s + c * torch.einsum("bmd,bld->bml", q.expand(b, m, -1), rows_a)
    assert isinstance(s, Tensor)
    idx, valid = topk_search(s, mask, k)
    w_top = masked_softmax(torch.gather(s, 2, idx), valid)
    w_all = masked_softmax(s, mask) if full else None
    top, pooled_all = [], []
    for rows in gathered:
        picked = torch.gather(
            rows.unsqueeze(1).expand(-1, idx.shape[1], -1, -1),
            2,
            idx.unsqueeze(-1).expand(-1, -1, -1, rows.shape[-1]),
        )
        top.append((w_top.unsqueeze(-1) * picked).sum(2))
        if w_all is not None:
            pooled_all.append(w_all @ rows)
    return torch.cat(top, -1), (torch.cat(pooled_all, -1) if full else None), idx, valid
