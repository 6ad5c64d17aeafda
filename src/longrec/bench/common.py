"""Machine description and result files shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def write_result(out_dir: Path, name: str, result: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    body = {
        "benchmark": name,
        "command": " ".join(["longrec", *sys.argv[1:]]),
        "machine": machine(),
        **result,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)
    return path


def call_seconds(fn, args: tuple, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn(*args), sorted, after one untimed warm-up call
    (allocation, kernel selection), without autograd."""
    with torch.no_grad():
        fn(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return sorted(times)


def median_ms(fn, args: tuple, repeats: int) -> float:
    times = call_seconds(fn, args, repeats)
    return round(1000 * times[len(times) // 2], 2)


def run_measured(cmd: list[str]) -> dict:
    """Run a command in a child process; wall seconds and the child's peak RSS (GiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {
        "wall_seconds": round(wall, 2),
        "peak_rss_gib": round(max(peak, before) / 2**20, 3),
        "stdout_tail": proc.stdout[-1500:],
    }


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors of a batch-like object (dataclass fields, dicts, tensors)."""
    import dataclasses

    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0
