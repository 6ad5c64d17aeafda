"""Row-wise ("lazy") Adam for embedding tables: updates only the rows a batch touched.

Why: with a dense optimiser every step costs O(vocabulary): the tables' gradients are zero-filled
and Adam reads and writes every row. At DARE's Taobao configuration with a 6.2M-item
vocabulary that made a step 3.5x slower than with 200K items (BENCHMARKS.md). PyTorch's
SparseAdam has the right semantics but its CPU implementation is slower still (sparse
additions into dense moments, zero-fills and a coalesce per table). Here a step costs
O(rows touched): one C++ call (nn.row_kernels.rowwise_adam_) sums repeated ids, orders the rows
by address with a bitmap (a 6.2M-row table's rows are not in cache; ascending addresses halve
the TLB misses) and gathers, updates and writes back the weights and moments of those rows.

Semantics are SparseAdam's: the moments of untouched rows do not decay and their weights do not
move; bias correction uses the optimiser's step count. When every row is touched every step it
equals Adam.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrec.nn import row_kernels
from longrec.ops import dispatch


def _distinct_rows(grad: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """(row ids [U], summed gradient rows [U, d]) of a sparse or dense gradient, for the
    PyTorch path (the C++ kernel sums repeats itself)."""
    if not grad.is_sparse:
        return torch.arange(n_rows, device=grad.device), grad
    ids, values = grad._indices()[0], grad._values()
    uniq, inverse = torch.unique(ids, return_inverse=True)
    summed = values.new_zeros(len(uniq), values.shape[1])
    summed.index_add_(0, inverse, values.contiguous())
    return uniq, summed


def table_grad_rows(p: Tensor, optimizer: str) -> tuple[Tensor, Tensor]:
    """(row ids [N], gradient rows [N, d]) of table p's sparse or dense gradient, as the row-wise
    kernels take them (ids may repeat); refuses anything but a [rows, dim] table."""
    if p.dim() != 2:
        raise ValueError(f"{optimizer} updates [rows, dim] tables only")
    if p.grad.is_sparse:
        return p.grad._indices()[0], p.grad._values()
    return torch.arange(p.shape[0], device=p.device), p.grad


def update_rows(p: Tensor, state: dict, group: dict, ids: Tensor, values: Tensor, lazy: bool):
    """One C++ Adam pass (nn.row_kernels.adam_rows_) on table p from a sparse gradient, with
    the optimiser's state (exp_avg, exp_avg_sq, step already counted) and settings."""
    row_kernels.adam_rows_(
        p,
        state["exp_avg"],
        state["exp_avg_sq"],
        ids,
        values,
        group["lr"],
        group["betas"],
        group["eps"],
        float(state["step"]),
        lazy,
    )


def _fused(p: Tensor, grad: Tensor, state: dict) -> bool:
    tensors = (p, state["exp_avg"], state["exp_avg_sq"])
    contiguous = all(t.is_contiguous() for t in tensors)
    return contiguous and dispatch.use_native("rowwise_adam_", *tensors, grad)


class RowwiseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid RowwiseAdam settings lr={lr} betas={betas} eps={eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                ids, values = table_grad_rows(p, "RowwiseAdam")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                if _fused(p, p.grad, state):
                    update_rows(p, state, group, ids, values, lazy=True)
                    continue
                rows, g = _distinct_rows(p.grad, p.shape[0])
                m = state["exp_avg"].index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                denom = v.div_(1 - b2**t).sqrt_().add_(group["eps"])
                p.index_add_(0, rows, m.div_(denom).mul_(-group["lr"] / (1 - b1**t)))
        return loss
