"""Time the fused soft search (nn.search_attention) alone on a real DARE training batch: the
inputs are captured from one training step, then the forward and backward kernels are called
15 times each and the minimum is printed.

    .venv/bin/python benchmarks/search_kernel.py PREPARED_DIR [--set key=value ...]

e.g. `benchmarks/search_kernel.py prep100m` (200K items) or `benchmarks/search_kernel.py prep4m
--set train.embed_optimizer=rowwise_adam` (BENCHMARKS.md, "Vocabulary size"). DARE's Taobao
configuration: batch 2048, history 200, top-k 20.
"""

# ruff: noqa: I001  (longrec is imported before torch on purpose)
from __future__ import annotations

import longrec  # noqa: F401  (first: its allocator settings apply before torch allocates)

import argparse
import tempfile
import time
from pathlib import Path

import torch

import longrec.nn.search_attention as search_attention
from longrec.config import resolve
from longrec.nn import row_kernels
from longrec.train.loop import Trainer


def capture_inputs(data: Path, overrides: list[str]) -> list:
    """The arguments of the first fused search call of one training step."""
    captured: list = []
    apply = search_attention._SearchAttend.apply

    def recording(*args):
        captured.append([a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
        return apply(*args)

    sets = ["data.max_len=200", "train.batch_size=2048", "data.layout=pointwise"]
    sets += ["train.progress=false", *overrides]
    cfg = resolve(None, sets, data__path=str(data), model__name="dare")
    search_attention._SearchAttend.apply = recording
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, Path(run_dir))
            trainer._step(trainer.loader.make_batch(trainer.loader.batch_requests(0)[0]), 0)
    finally:
        search_attention._SearchAttend.apply = apply
    return captured[0]


def min_ms(fn, calls: int = 15) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    n, scale, mask, k, full, *tensors = capture_inputs(args.data, args.overrides)
    # the rows read (the tables, in training) and each field's gradient index and rows
    _, _, index, query, attn, repr_, grad_index = search_attention._fields(tensors, n)
    grad_rows = search_attention.grad_rows(tensors[:n], grad_index)
    ext = row_kernels._extension()
    top, idx, _, w_top, pooled_all, w_all = ext.search_attend(
        attn, repr_, index, query, scale, mask, k, full
    )
    grad_top, grad_all = torch.randn_like(top), torch.randn_like(pooled_all)
    forward = min_ms(lambda: ext.search_attend(attn, repr_, index, query, scale, mask, k, full))
    backward = min_ms(
        lambda: ext.search_attend_backward(
            attn,
            repr_,
            index,
            query,
            scale,
            mask,
            idx,
            w_top,
            w_all,
            grad_top,
            grad_all,
            search_attention.row_owned_bytes(),
            grad_index,
            grad_rows,
        )
    )
    rows = ", ".join(f"{g or a.shape[0]:,}" for a, g in zip(attn, grad_rows, strict=True))
    print(f"fields' rows {rows}; k {k}: forward {forward:.1f} ms, backward {backward:.1f} ms")


if __name__ == "__main__":
    main()
