"""Training and inference throughput of a model on a prepared dataset (timed steps only)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from longrec.config import resolve
from longrec.train.loop import Trainer


def bench_train(
    data: Path,
    model: str,
    max_len: int,
    steps: int,
    batch_size: int,
    layout: str = "pointwise",
    overrides: list[str] | None = None,
    warmup: int = 3,
    run_dir: Path | None = None,
) -> dict:
    """Samples/s of full training steps (forward, backward, optimiser) and of inference, on
    batches built beforehand so that the figure is the model's, not the loader's."""
    sets = [
        f"data.max_len={max_len}",
        f"train.batch_size={batch_size}",
        f"data.layout={layout}",
        "train.progress=false",
        *(overrides or []),
    ]
    cfg = resolve(None, sets, data__path=str(data), model__name=model)
    trainer = Trainer(cfg, run_dir or Path("/tmp/longrec-bench-train"))
    chunks = trainer.loader.batch_requests(0)
    need = warmup + steps
    batches = [trainer.loader.make_batch(chunks[i % len(chunks)]) for i in range(need)]
    for b in batches[:warmup]:
        trainer._step(b, 0)
    t0 = time.perf_counter()
    samples = 0
    for b in batches[warmup:]:
        trainer._step(b, 0)
        samples += int(b.target_mask.sum())
    train_s = time.perf_counter() - t0
    model_ = trainer.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
        for b in batches[:warmup]:
            model_(b)
        t0 = time.perf_counter()
        for b in batches[warmup:]:
            model_(b)
        infer_s = time.perf_counter() - t0
    hist = sum(int(b.history_mask.sum()) for b in batches[warmup:])
    return {
        "model": model,
        "max_len": max_len,
        "batch_size": batch_size,
        "layout": layout,
        "steps": steps,
        "overrides": overrides or [],
        "threads": torch.get_num_threads(),
        "train_samples_per_s": round(samples / train_s),
        "infer_samples_per_s": round(samples / infer_s),
        "train_ms_per_step": round(1000 * train_s / steps, 2),
        "mean_history": round(hist / max(samples, 1), 1),
        "parameters": int(sum(p.numel() for p in trainer.model.parameters())),
    }
