"""Data benchmarks: prepare wall time and peak memory; loader throughput by history length."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from longrec.bench.common import run_measured, tensor_bytes
from longrec.data.dataset import PreparedDataset
from longrec.data.loader import BatchLoader, LoaderConfig


def bench_prepare(source: str, raw: Path, out: Path, args: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "longrec",
        "prepare",
        source,
        "--input",
        str(raw),
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        *args,
    ]
    result = run_measured(cmd)
    meta = PreparedDataset(out).meta
    result.update(
        {
            "source": source,
            "input": str(raw),
            "input_bytes": sum(p.stat().st_size for p in Path(raw).rglob("*"))
            if Path(raw).is_dir()
            else Path(raw).stat().st_size,
            "rows_read": meta["rows"]["rows_read"],
            "store_rows": meta["store"]["rows"],
            "samples": {k: v.get("samples", 0) for k, v in meta["splits"].items()},
            "args": args,
        }
    )
    result["rows_per_second"] = round(result["rows_read"] / result["wall_seconds"])
    return result


def bench_loader(
    dataset: Path,
    lengths: list[int],
    split: str = "train",
    batch_size: int = 256,
    layout: str = "pointwise",
    min_batches: int = 10,
    min_seconds: float = 3.0,
) -> list[dict]:
    """Samples/s of batch building (gathers from the memory-mapped store, warm page cache),
    and the bytes/s of the batches it writes, to hold against the machine's copy bandwidth."""
    ds = PreparedDataset(dataset)
    results = []
    for max_len in lengths:
        loader = BatchLoader(
            ds,
            split,
            LoaderConfig(
                batch_size=batch_size, max_len=max_len, layout=layout, shuffle=True, prefetch=0
            ),
        )
        chunks = loader.batch_requests(0)
        for r in chunks[:3]:  # warm the page cache and allocator
            loader.make_batch(r)
        samples, batches, t0 = 0, 0, time.perf_counter()
        history = written = 0
        while batches < min_batches or time.perf_counter() - t0 < min_seconds:
            b = loader.make_batch(chunks[batches % len(chunks)])
            samples += int(b.target_mask.sum())
            history += int(b.history_mask.sum())
            written += tensor_bytes(b)
            batches += 1
        dt = time.perf_counter() - t0
        results.append(
            {
                "max_len": max_len,
                "batch_size": batch_size,
                "layout": layout,
                "batches": batches,
                "samples_per_s": round(samples / dt),
                "mean_history": round(history / max(samples, 1), 1),
                "behaviours_per_s": round(history / dt),
                "batch_bytes_per_sample": round(written / max(samples, 1)),
                "batch_mb_per_s": round(written / dt / 1e6, 1),
            }
        )
    return results


def mean_history(dataset: Path, split: str, max_len: int) -> float:
    ds = PreparedDataset(dataset)
    cols = ds.split(split)
    hist = cols["hist_end"] - ds.store.offsets[cols["user"]]
    return float(np.minimum(hist, max_len).mean())


TAOBAO_BEHAVIOR_OF = {"click": "pv", "view": "pv", "conversion": "buy", "like": "fav"}


def synth_as_taobao(synth_dir: Path, out_csv: Path) -> Path:
    """Rewrite a synth folder's behaviours in Taobao's exact 5-column layout (behaviour types
    mapped to pv/buy/fav), for benchmarking the Taobao reader at any scale."""
    import duckdb

    from longrec.data.sources.synth import read_manifest

    manifest = read_manifest(synth_dir)
    src = synth_dir / manifest["files"]["behaviors"]
    cases = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in TAOBAO_BEHAVIOR_OF.items())
    reader = (
        f"read_parquet('{src}')"
        if src.suffix == ".parquet"
        else f"read_csv('{src}', header=false, auto_detect=false, columns={{'user':'BIGINT','item':'BIGINT','category':'BIGINT','behavior':'VARCHAR','ts':'BIGINT','domain':'VARCHAR'}})"
    )
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(f".{out_csv.name}.tmp")
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    con.execute(
        f"COPY (SELECT user, item, category, CASE behavior {cases} ELSE 'pv' END, ts FROM {reader}) "
        f"TO '{tmp}' (FORMAT csv, HEADER false)"
    )
    tmp.replace(out_csv)
    return out_csv
