"""Does torch.compile pay back on a dense, fixed-width part? STCA's history SwiGLU stack
compiled with inductor (dynamic token count) against eager, full training steps.

Usage: .venv/bin/python benchmarks/compile_ffn.py DATASET [eager|compiled]
(BENCHMARKS.md, "torch.compile"; DATASET e.g. .cache/bench/suite/prepared)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(".cache/inductor").resolve()))

import torch

from longrec.config import resolve
from longrec.train.loop import Trainer


def main(data: str, mode: str, steps: int = 7, warmup: int = 3) -> None:
    sets = ["data.max_len=200", "train.batch_size=2048", "train.progress=false"]
    cfg = resolve(None, sets, data__path=data, model__name="stca")
    trainer = Trainer(cfg, Path(".cache/compile-ffn-run"))
    if mode == "compiled":
        for i, stack in enumerate(trainer.model.history_ffn):
            trainer.model.history_ffn[i] = torch.compile(stack, dynamic=True)
    chunks = trainer.loader.batch_requests(0)
    batches = [trainer.loader.make_batch(chunks[i]) for i in range(warmup + steps)]
    t0 = time.perf_counter()
    for b in batches[:warmup]:
        trainer._step(b, 0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        trainer._step(b, 0)
    per_step = (time.perf_counter() - t0) / steps
    print(
        f"{mode}: first {warmup} steps {first:.1f} s, then {1e3 * per_step:.0f} ms/step "
        f"({2048 / per_step:,.0f} samples/s)"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "compiled")
