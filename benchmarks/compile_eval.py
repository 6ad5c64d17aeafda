"""Does torch.compile pay back here? Eager against compiled training steps (fp32, batch 2048,
history 200), batches built beforehand, in one process: eager steps first, then the same
steps after compiling one part of the model.

    .venv/bin/python benchmarks/compile_eval.py DATASET [MODEL] [PART]

PART `forward_train` (default) compiles the model's whole training forward (static shapes);
`history_ffn` compiles STCA's history SwiGLU stacks only (dynamic token count), the densest
fixed-width part in the project (BENCHMARKS.md, "torch.compile").
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(".cache/inductor").resolve()))

from longrec.config import resolve
from longrec.train.loop import Trainer


def _compile(model, part: str) -> None:
    if part == "forward_train":
        model.forward_train = torch.compile(model.forward_train, dynamic=False)
    elif part == "history_ffn":
        for i, stack in enumerate(model.history_ffn):
            model.history_ffn[i] = torch.compile(stack, dynamic=True)
    else:
        raise SystemExit(f"PART must be forward_train or history_ffn, got '{part}'")


def main(data: str, model: str = "dare", part: str = "forward_train") -> None:
    sets = ["data.max_len=200", "train.batch_size=2048", "train.progress=false"]
    cfg = resolve(None, sets, data__path=data, model__name=model)
    trainer = Trainer(cfg, Path(".cache/bench/compile_eval"))
    chunks = trainer.loader.batch_requests(0)
    batches = [trainer.loader.make_batch(chunks[i % len(chunks)]) for i in range(14)]

    def ms_per_step(first: int, last: int) -> float:
        t0 = time.perf_counter()
        for b in batches[first:last]:
            trainer._step(b, 0)
        return round((time.perf_counter() - t0) / (last - first) * 1000, 1)

    for b in batches[:2]:
        trainer._step(b, 0)
    eager = ms_per_step(2, 6)
    _compile(trainer.model, part)
    t0 = time.perf_counter()
    ms_per_step(6, 8)
    warmup_s = round(time.perf_counter() - t0, 1)
    compiled = ms_per_step(8, 14)
    print(
        f"{model} ({part}): eager {eager} ms/step, compiled {compiled} ms/step, "
        f"compile + 2 steps {warmup_s} s"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
