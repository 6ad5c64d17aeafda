"""Fused gather kernels for histories held as distinct rows plus an index (C++, built on first use).

Why: at DARE's Taobao configuration (batch 2048, history 200) most of a training step went to
writing the gathered [B, L, d] history, reading it back in batched matrix-vector products and
scattering its gradient (BENCHMARKS.md, "Where the time goes"). These kernels compute the
attention scores and the full-sequence pooling straight from the [U, d] rows and write each
row's gradient in place, prefetching the rows a few behaviours ahead.

The extension is compiled with the system's C++ compiler the first time it is needed (about 40
seconds) and cached under $TORCH_EXTENSIONS_DIR (the Makefile points it into `.cache/`; PyTorch's
default is ~/.cache/torch_extensions). Whether a caller runs a kernel or the equivalent PyTorch
operations is decided by longrec.ops.dispatch (`train.kernels`: auto | reference | native).
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from longrec.ops import dispatch

log = logging.getLogger(__name__)
SOURCES = [
    Path(__file__).with_name("csrc") / n
    for n in (
        "row_kernels.cpp",
        "search_attention.cpp",
        "search_attention_backward.cpp",
        "adam_rows.cpp",
        "prelu.cpp",
    )
]


@cache
def _extension() -> ModuleType | None:
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name="longrec_row_kernels",
            sources=[str(s) for s in SOURCES],
            # -fno-math-errno: with errno to set, GCC calls sqrtf once per element instead of
            # vectorising (rowwise_adam_ was compute-bound: 37 -> 24 ms for 290K rows)
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler or ninja: the PyTorch path computes the same
        log.warning("fused row kernels unavailable, using PyTorch ops instead: %s", exc)
        return None


def available() -> bool:
    """Whether the extension is built (building it on first call), whatever the setting."""
    return _extension() is not None


def applicable(*tensors: Tensor) -> bool:
    """Whether the row kernels run on these tensors under the kernels setting
    (ops.dispatch.use_native)."""
    return dispatch.use_native("row kernels", *tensors)


class _Gather(torch.autograd.Function):
    """gather_dot (pooling=False: x is the query [B, M, d], out [B, M, L]) and its dual
    gather_pool (pooling=True: x is the weight [B, M, L], out [B, M, d]). The gradient with
    respect to x is the other kernel applied to the incoming gradient."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, x: Tensor, pooling: bool) -> Tensor:
        ctx.save_for_backward(rows, index, x)
        ctx.pooling = pooling
        kernel = _extension().gather_pool if pooling else _extension().gather_dot
        return kernel(rows, index, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        rows, index, x = ctx.saved_tensors
        ext, grad = _extension(), grad.contiguous()
        if ctx.needs_input_grad[0]:  # the per-target gradient comes with it in the same pass
            grad_rows, grad_x = ext.gather_backward(rows, index, x, grad, ctx.pooling)
            return grad_rows, None, grad_x if ctx.needs_input_grad[2] else None, None
        if not ctx.needs_input_grad[2]:
            return None, None, None, None
        dual = ext.gather_dot if ctx.pooling else ext.gather_pool
        return None, None, dual(rows, index, grad), None


def gather_dot(rows: Tensor, index: Tensor, query: Tensor) -> Tensor:
    """query [B, M, d] against rows[index] ([U, d] at [B, L]) -> scores [B, M, L]."""
    return _Gather.apply(rows, index.contiguous(), query.contiguous(), False)


def gather_pool(rows: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """sum_l weight[b, m, l] * rows[index[b, l]] -> [B, M, d]."""
    return _Gather.apply(rows, index.contiguous(), weight.contiguous(), True)


def dedup_ids(ids: Tensor, vocab: int, include: int | None = None) -> tuple[Tensor, Tensor]:
    """(distinct ids in increasing order [U], inverse with the shape of ids), both int64, from
    int64 or int32 ids; `include` is among the distinct ids whether or not it occurs."""
    uniq, inverse = dedup_parts([ids], vocab, include)
    return uniq, inverse[0]


def dedup_parts(
    parts: list[Tensor], vocab: int, include: int | None = None
) -> tuple[Tensor, list[Tensor]]:
    """dedup_ids over several tensors at once (a batch's history and targets): the distinct ids
    of all, and each part's inverse, without concatenating them first."""
    dtype = torch.int32 if all(p.dtype == torch.int32 for p in parts) else torch.int64
    parts = [p.to(dtype).contiguous() for p in parts]
    uniq, *inverses = _extension().dedup_ids(parts, vocab, -1 if include is None else include)
    return uniq, inverses


def gather_ranges(values: Tensor, lo: Tensor, end: Tensor, length: int) -> Tensor:
    """[B, length, ...]: rows [lo[b], end[b]) of `values` at the end of row b, zeros before
    (the loader's left-padded histories); single-threaded."""
    return _extension().gather_ranges(values.contiguous(), lo.long(), end.long(), length)


def lookup_rows(weight: Tensor, ids: Tensor) -> Tensor:
    """weight[ids] ([V, d] float32 at int64 ids [N]) with the rows prefetched ahead."""
    return _extension().lookup_rows(weight, ids.contiguous().long())


def scatter_distinct_rows(ids: Tensor, grad: Tensor, vocab: int) -> Tensor:
    """[vocab, d] zeros with grad[i] at row ids[i]; the ids must be distinct."""
    return _extension().scatter_distinct_rows(ids.contiguous().long(), grad.contiguous(), vocab)


def adam_rows_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    ids: Tensor,
    grad: Tensor,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    step: float,
    lazy: bool,
) -> None:
    """Adam on a table [V, d] from a sparse gradient (ids [N], grad [N, d]; ids may repeat, in
    any order: repeats are summed), in place, at optimiser step `step` (bias correction).
    `lazy`: only the rows in the gradient move (train/rowwise_adam.py, one pass over them);
    else every row, absent ones with a zero gradient: torch.optim.Adam's update
    (train/table_adam.py, one pass over the table)."""
    b1, b2 = betas
    kernel = _extension().rowwise_adam_ if lazy else _extension().sparse_grad_adam_
    ids, grad = ids.contiguous().long(), grad.contiguous()
    kernel(param, exp_avg, exp_avg_sq, ids, grad, lr, b1, b2, eps, 1 - b1**step, 1 - b2**step)


def rowwise_adagrad_(
    param: Tensor, state_sum: Tensor, ids: Tensor, grad: Tensor, lr: float, eps: float
) -> None:
    """Row-wise Adagrad on a table [V, d] from a sparse gradient (ids [N], grad [N, d]; repeats
    summed), in place, with one accumulator per row (state_sum [V]): train/rowwise_adagrad.py."""
    _extension().rowwise_adagrad_(
        param, state_sum, ids.contiguous().long(), grad.contiguous(), lr, eps
    )


if __name__ == "__main__":  # `make kernels`: build (or find) the extension before anything times it
    print("row kernels:", "built" if available() else "unavailable, PyTorch fallback in use")
