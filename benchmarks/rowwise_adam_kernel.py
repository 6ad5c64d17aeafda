"""Time one `rowwise_adam_` update (nn.row_kernels) in isolation: U random rows of a V-row,
16-wide table, ids in random order as a de-duplicated batch delivers them. Min of 15 calls.

    .venv/bin/python benchmarks/rowwise_adam_kernel.py [V U]   (default: 6200000 290000)

The defaults are the item table of BENCHMARKS.md's 6.2M-item dataset and the ~290K distinct
items a 2048 x 200 batch of it touches; `200000 90000` is the 200K-item dataset's.
"""

# ruff: noqa: I001  (longrec is imported before torch on purpose)
from __future__ import annotations

import longrec  # noqa: F401  (first: its allocator settings apply before torch allocates)

import sys
import time

import torch

from longrec.nn import row_kernels


def main(vocab: int = 6_200_000, touched: int = 290_000, calls: int = 15) -> float:
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(vocab, 16, generator=gen)
    exp_avg, exp_avg_sq = torch.zeros(vocab, 16), torch.zeros(vocab, 16)
    ids = torch.randperm(vocab, generator=gen)[:touched]
    grad = torch.randn(touched, 16, generator=gen)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        row_kernels.adam_rows_(
            param, exp_avg, exp_avg_sq, ids, grad, 1e-3, (0.9, 0.999), 1e-8, 1, lazy=True
        )
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


if __name__ == "__main__":
    v, u = (int(a) for a in sys.argv[1:3]) if len(sys.argv) >= 3 else (6_200_000, 290_000)
    print(f"rowwise_adam_: {u:,} of {v:,} rows, 16 wide: {main(v, u):.1f} ms (min of 15)")
