"""Row-wise Adagrad for embedding tables: one accumulator per row, only the rows a batch touched.

Why: the usual optimiser for very large tables in industrial rankers (FBGEMM's
EXACT_ROWWISE_ADAGRAD, TorchRec's default choice; longrec's sharded tables offer it as
`train.shard_optimizer=rowwise_adagrad`). Lazy Adam keeps two moments per weight, so its update
of a row not in cache moves 192 bytes each way; at DARE's Taobao configuration with a 6.2M-item
vocabulary that update runs at this machine's memory bandwidth (BENCHMARKS.md). Here a row moves
its 64 bytes of weights and a 4-byte accumulator.

Per distinct row r of the gradient (repeated ids summed first):
    sum[r] += mean_j g[r, j]^2;   w[r] -= lr * g[r] / (sqrt(sum[r]) + eps)
Rows without a gradient do not move. One C++ pass (nn.row_kernels.rowwise_adagrad_); the PyTorch
operations below compute the same where the extension does not apply.
"""

from __future__ import annotations

import torch

from longrec.nn import row_kernels
from longrec.ops import dispatch
from longrec.train.rowwise_adam import _distinct_rows, table_grad_rows


class RowwiseAdagrad(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.01, eps: float = 1e-10):
        if lr < 0 or eps < 0:
            raise ValueError(f"invalid RowwiseAdagrad settings lr={lr} eps={eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                ids, values = table_grad_rows(p, "RowwiseAdagrad")
                state = self.state[p]
                if not state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                tensors = (p, state["sum"], values)
                if p.is_contiguous() and dispatch.use_native("rowwise_adagrad_", *tensors):
                    row_kernels.rowwise_adagrad_(
                        p, state["sum"], ids, values, group["lr"], group["eps"]
                    )
                    continue
                rows, g = _distinct_rows(p.grad, p.shape[0])
                total = state["sum"].index_select(0, rows) + g.pow(2).mean(1)
                state["sum"].index_copy_(0, rows, total)
                step = group["lr"] / (total.sqrt() + group["eps"])
                p.index_add_(0, rows, -step.unsqueeze(1) * g)
        return loss
