"""The machine's own limits, measured: dense GEMM FLOP/s in fp32 and bf16 (AMX on Sapphire
Rapids) and memory bandwidth. Model throughputs are judged against these figures, not against
a datasheet, so "efficiency" means a fraction of what this machine really does."""

from __future__ import annotations

import torch

from longrec.bench.common import call_seconds


def _best_seconds(fn, repeats: int) -> float:
    return call_seconds(fn, (), repeats)[0]


def gemm_flops(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matrix product (2 n^3 FLOP), best of `repeats`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), repeats)


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), best of `repeats`."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), repeats)


def bench_peak(n: int = 2048, mib: int = 512) -> dict:
    return {
        "threads": torch.get_num_threads(),
        "gemm_n": n,
        "fp32_gflops": round(gemm_flops(n, torch.float32) / 1e9, 1),
        "bf16_gflops": round(gemm_flops(n, torch.bfloat16) / 1e9, 1),
        "copy_gb_per_s": round(copy_bandwidth(mib) / 1e9, 2),
    }
