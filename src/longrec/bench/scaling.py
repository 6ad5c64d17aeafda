"""Scaling study (issue 04): test AUC against history length for several models, with the
training cost (samples/s, peak RSS) at each length.

Every (model, length) pair trains in its own `longrec train` process, so its peak memory is
its own (polled with psutil); finished pairs are reused, like `compare`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from longrec.train import run_dir as rd

DEFAULT_LENGTHS = (100, 300, 1000, 3000, 10000)
DEFAULT_MODELS = ("stca", "longer", "din", "dare")


def _run_measured(cmd: list[str], log_path: Path) -> float:
    """Run cmd (output to log_path, never a pipe that could fill up); return its peak RSS in
    GiB (children included), polled every 0.2 s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        return _poll(proc, log_path)


def _poll(proc: subprocess.Popen, log_path: Path) -> float:
    peak = 0
    handle = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = handle.memory_info().rss + sum(
                c.memory_info().rss for c in handle.children(recursive=True)
            )
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    if proc.wait() != 0:
        raise RuntimeError(
            f"{' '.join(map(str, proc.args))} failed:\n{log_path.read_text()[-3000:]}"
        )
    return peak / 2**30


def run_scaling(
    data: Path,
    out: Path,
    models=DEFAULT_MODELS,
    lengths=DEFAULT_LENGTHS,
    overrides: list[str] | None = None,
    per_model: dict[str, list[str]] | None = None,
    log=print,
) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models:
        for length in lengths:
            run = out / "runs" / f"{model}-L{length}"
            if not (run / rd.METRICS).exists():
                sets = [
                    f"data.max_len={length}",
                    *(overrides or []),
                    *((per_model or {}).get(model, [])),
                ]
                cmd = [
                    sys.executable,
                    "-m",
                    "longrec",
                    "train",
                    "--data",
                    str(data),
                    "--model",
                    model,
                    "--out",
                    str(run),
                    "--overwrite",
                    *[a for s in sets for a in ("--set", s)],
                ]
                log(f"{model} at history {length}: training in {run}")
                peak = _run_measured(cmd, out / "logs" / f"{model}-L{length}.log")
                (run / "peak_rss_gib.txt").write_text(f"{peak:.3f}\n")
            metrics = json.loads((run / rd.METRICS).read_text())
            peak = (
                float((run / "peak_rss_gib.txt").read_text())
                if (run / "peak_rss_gib.txt").exists()
                else None
            )
            rows.append(
                {
                    "model": model,
                    "history": length,
                    "test_auc": metrics["test"].get("auc"),
                    "test_gauc": metrics["test"].get("gauc"),
                    "test_logloss": metrics["test"].get("logloss"),
                    "train_samples_per_s": round(metrics["train"]["samples_per_s"]),
                    "peak_rss_gib": peak,
                }
            )
            (out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def scaling_table(rows: list[dict], title: str) -> str:
    lengths = sorted({r["history"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["history"]): r for r in rows}
    head = "| model | " + " | ".join(f"L={n:,}" for n in lengths) + " |"
    lines = [
        f"## {title}",
        "",
        "test AUC (train samples/s, peak RSS GiB)",
        "",
        head,
        "|---|" + "---:|" * len(lengths),
    ]
    for m in models:
        cells = []
        for n in lengths:
            r = by.get((m, n))
            if r is None:
                cells.append("")
                continue
            rss = f", {r['peak_rss_gib']:.1f}" if r.get("peak_rss_gib") is not None else ""
            cells.append(f"{r['test_auc']:.4f} ({r['train_samples_per_s']:,}{rss})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["history"], r["test_auc"]) for r in rows if r["model"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("history length (behaviours)")
    ax.set_ylabel("test AUC")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
