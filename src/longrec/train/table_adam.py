"""Adam for embedding tables that also takes sparse gradients, with Adam's dense semantics.

Why: DARE trains its tables with plain Adam, which updates every row every step (untouched
rows' moments decay and the rows keep moving). torch.optim.Adam needs a dense [V, d] gradient
for that; building it (a zero-fill and a scatter of the looked-up rows, then a full read by the
update) cost more than the update itself at DARE's Taobao configuration. Tables looked up at
distinct ids (models.towers) hand their gradient over sparse instead (RowTable's
`sparse_distinct_grad`), and one C++ pass (nn.row_kernels.sparse_grad_adam_) updates every row,
reading a gradient row only where there is one. The update is torch.optim.Adam's to float
rounding, and so is the state: this is torch.optim.Adam, and its checkpoints load either way.

Dense gradients, settings the kernel does not cover (weight decay, amsgrad, maximize), and
tables ops.dispatch keeps off the kernel (`train.kernels`, non-float32 or non-CPU tables, no
compiler) go through torch.optim.Adam itself; a sparse gradient is then densified first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longrec.nn.embedding import RowTable
from longrec.ops import dispatch
from longrec.train.rowwise_adam import update_rows


class TableAdam(torch.optim.Adam):
    def _kernel_ok(self, p: Tensor, group: dict) -> bool:
        plain = not (group["weight_decay"] or group["amsgrad"] or group["maximize"])
        return (
            plain
            and not isinstance(group["lr"], Tensor)
            and p.dim() == 2
            and p.is_contiguous()
            and dispatch.use_native("sparse_grad_adam_", p, p.grad)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse: list[tuple[Tensor, dict, Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not p.grad.is_sparse:
                    continue
                if self._kernel_ok(p, group):
                    sparse.append((p, group, p.grad))
                    p.grad = None  # hidden from torch.optim.Adam, which rejects sparse grads
                else:
                    p.grad = p.grad.to_dense()
        try:
            super().step()
        finally:
            for p, _, grad in sparse:
                p.grad = grad
        for p, group, grad in sparse:
            self._sparse_step(p, group, grad)
        return loss

    def _sparse_step(self, p: Tensor, group: dict, grad: Tensor) -> None:
        state = self.state[p]
        if not state:  # torch.optim.Adam's state, so that either path can continue it
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        ids, values = grad._indices()[0], grad._values()
        update_rows(p, state, group, ids, values, lazy=False)


def use_sparse_table_grads(model: nn.Module) -> int:
    """Makes the model's RowTables hand the gradients of distinct-id lookups over sparse (for
    TableAdam); returns how many tables that applies to."""
    tables = [m for m in model.modules() if isinstance(m, RowTable) and not m.sparse]
    for table in tables:
        table.sparse_distinct_grad = True
    return len(tables)
