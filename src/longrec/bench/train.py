"""Training and inference throughput of a model on a prepared dataset (timed steps only)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from longrec.bench.common import tensor_bytes
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
    profile_steps: int = 0,
    trace: Path | None = None,
) -> dict:
    """Samples/s of full training steps (forward, backward, optimiser) and of inference, on
    batches built beforehand so that the figure is the model's, not the loader's. With
    `profile_steps`, that many further training steps run under `torch.profiler` (see
    `profile_training`)."""
    sets = [
        f"data.max_len={max_len}",
        f"train.batch_size={batch_size}",
        f"data.layout={layout}",
        "train.progress=false",
        *(overrides or []),
    ]
    cfg = resolve(None, sets, data__path=str(data), model__name=model)
    trainer = Trainer(cfg, run_dir or Path("/tmp/longrec-bench-train"))
    rt = trainer.runtime
    chunks = trainer.loader.batch_requests(0)
    need = warmup + steps
    # already on the device: the figure is the model's, not the host-to-device copies'
    batches = [rt.put(trainer.loader.make_batch(chunks[i % len(chunks)])) for i in range(need)]
    for b in batches[:warmup]:
        trainer._step(b, 0)
    rt.synchronize()
    t0 = time.perf_counter()
    samples = 0
    for b in batches[warmup:]:
        trainer._step(b, 0)
        samples += int(b.target_mask.sum())
    rt.synchronize()
    train_s = time.perf_counter() - t0
    model_ = trainer.model.eval()
    with torch.no_grad(), rt.autocast():
        for b in batches[:warmup]:
            model_(b)
        rt.synchronize()
        t0 = time.perf_counter()
        for b in batches[warmup:]:
            model_(b)
        rt.synchronize()
        infer_s = time.perf_counter() - t0
    hist = sum(int(b.history_mask.sum()) for b in batches[warmup:])
    profiled = None
    if profile_steps:
        model_.train()
        profiled = profile_training(trainer, batches[warmup:][:profile_steps], trace)
    result = {
        "model": model,
        "max_len": max_len,
        "batch_size": batch_size,
        "layout": layout,
        "steps": steps,
        "overrides": overrides or [],
        "threads": torch.get_num_threads(),
        "device": str(rt.device),
        "precision": rt.precision,
        "train_samples_per_s": round(samples / train_s),
        "infer_samples_per_s": round(samples / infer_s),
        "train_ms_per_step": round(1000 * train_s / steps, 2),
        "mean_history": round(hist / max(samples, 1), 1),
        "parameters": int(sum(p.numel() for p in trainer.model.parameters())),
    }
    if profiled is not None:
        result["profile"] = profiled
    return result


MATRIX_OPS = frozenset(f"aten::{op}" for op in ("mm", "addmm", "bmm", "baddbmm", "addbmm"))


def profile_training(trainer: Trainer, batches: list, trace: Path | None = None, top: int = 12):
    """Where a training step's time goes: the operators with the most self time (ms per step
    and share), and the matrix products' achieved FLOP/s (mm, addmm, bmm, baddbmm, whose FLOPs
    the profiler counts; fused attention is not counted), to hold against `bench_peak`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for b in batches:
            trainer._step(b, 0)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    n = len(batches)
    total_us = sum(e.self_cpu_time_total for e in events)
    gemm = [e for e in events if e.key in MATRIX_OPS]
    gemm_us = sum(e.self_cpu_time_total for e in gemm)
    gemm_flops = sum(e.flops for e in gemm)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "steps": n,
        "ms_per_step": round(total_us / 1e3 / n, 1),
        "top": [
            {
                "op": e.key.removeprefix("aten::"),
                "ms_per_step": round(e.self_cpu_time_total / 1e3 / n, 2),
                "share": round(e.self_cpu_time_total / max(total_us, 1), 3),
            }
            for e in ranked
        ],
        "gemm_share": round(gemm_us / max(total_us, 1), 3),
        "gemm_gflops": round(gemm_flops / max(gemm_us, 1) / 1e3, 1),
        "gemm_gflop_per_step": round(gemm_flops / 1e9 / n, 2),
    }


def _history_bytes(batch) -> int:
    return sum(tensor_bytes(x) for x in (batch.history, batch.history_ts, batch.history_mask))


def bench_layouts(
    data: Path,
    model: str,
    max_len: int,
    requests_per_batch: int,
    steps: int,
    overrides: list[str] | None = None,
    warmup: int = 2,
    run_dir: Path | None = None,
) -> dict:
    """Request-level batching (docs/architecture.md, "The batch") against the pointwise layout on
    the SAME samples: history bytes gathered per sample and training samples/s of each layout."""
    from longrec.data.loader import BatchLoader, LoaderConfig

    sets = [
        f"data.max_len={max_len}",
        f"train.batch_size={requests_per_batch}",
        "data.layout=request",
        "train.progress=false",
        *(overrides or []),
    ]
    cfg = resolve(None, sets, data__path=str(data), model__name=model)
    trainer = Trainer(cfg, run_dir or Path("/tmp/longrec-bench-layouts"))
    fields = trainer.model.history_fields()
    req_loader = trainer.loader
    point = BatchLoader(
        trainer.dataset,
        "train",
        LoaderConfig(batch_size=1, max_len=max_len, layout="pointwise", history_fields=fields),
    )
    plan = req_loader.batch_requests(0)[: warmup + steps]
    req_batches = [req_loader.make_batch(r) for r in plan]
    point_batches = []
    for r in plan:
        start, count = req_loader.requests.start[r], req_loader.requests.count[r]
        rows = np.concatenate([np.arange(s, s + c) for s, c in zip(start, count, strict=True)])
        point_batches.append(point.make_batch(rows))
    out = {
        "model": model,
        "max_len": max_len,
        "requests_per_batch": requests_per_batch,
        "steps": steps,
    }
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for name, batches in (("pointwise", point_batches), ("request", req_batches)):
        trainer.model.load_state_dict(state)
        for b in batches[:warmup]:
            trainer._step(b, 0)
        samples = sum(int(b.target_mask.sum()) for b in batches[warmup:])
        t0 = time.perf_counter()
        for b in batches[warmup:]:
            trainer._step(b, 0)
        seconds = time.perf_counter() - t0
        out[name] = {
            "samples_per_s": round(samples / seconds),
            "history_bytes_per_sample": round(
                sum(_history_bytes(b) for b in batches[warmup:]) / samples
            ),
            "targets_per_row": round(samples / sum(b.batch_size for b in batches[warmup:]), 2),
        }
    out["throughput_ratio"] = round(
        out["request"]["samples_per_s"] / out["pointwise"]["samples_per_s"], 2
    )
    out["bytes_saved"] = round(
        1
        - out["request"]["history_bytes_per_sample"] / out["pointwise"]["history_bytes_per_sample"],
        3,
    )
    return out
