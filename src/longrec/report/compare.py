"""The comparison table (mean ± std over seeds, like DARE's Table 1) and the AUC plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def summarise(records: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in records:
        entry = out.setdefault(r["model"], {"seeds": set()})
        entry["seeds"].add(r["seed"])
        for key in ("auc", "gauc", "logloss"):
            entry.setdefault(f"{r['split']}_{key}", []).append(r[key])
        if r["split"] == "test":
            entry.setdefault("speed", []).append(r["train_samples_per_s"])
    return out


def _ms(values, digits=4) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def compare_table(records: list[dict], title: str = "", ranked: bool = True) -> str:
    summary = summarise(records)
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| model | seeds | valid AUC | test AUC | test GAUC | test logloss | train samples/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(summary.items())
    if ranked:
        rows.sort(
            key=lambda kv: -np.nanmean(np.asarray(kv[1].get("test_auc", [np.nan]), dtype=float))
        )
    for model, s in rows:
        speed = np.mean(s["speed"]) if s.get("speed") else float("nan")
        lines.append(
            f"| {model} | {len(s['seeds'])} | {_ms(s.get('valid_auc', []))} | {_ms(s.get('test_auc', []))} | "
            f"{_ms(s.get('test_gauc', []))} | {_ms(s.get('test_logloss', []))} | {speed:,.0f} |"
        )
    lines += [
        "",
        "mean ± sample std over seeds" + ("; ranked by mean test AUC." if ranked else "."),
    ]
    return "\n".join(lines)


def auc_plot(records: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(records)
    names = sorted(
        summary,
        key=lambda m: np.nanmean(np.asarray(summary[m].get("test_auc", [np.nan]), dtype=float)),
    )
    means = [
        np.nanmean(np.asarray(summary[m].get("test_auc", [np.nan]), dtype=float)) for m in names
    ]
    stds = [
        np.nanstd(np.asarray(summary[m].get("test_auc", [np.nan]), dtype=float), ddof=1)
        if len(summary[m].get("test_auc", [])) > 1
        else 0.0
        for m in names
    ]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.6))
    ax.bar(names, means, yerr=stds, capsize=4, color="#4C72B0")
    lo = min(m - s for m, s in zip(means, stds, strict=True))
    hi = max(m + s for m, s in zip(means, stds, strict=True))
    pad = max(0.002, (hi - lo) * 0.25)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title or "test AUC")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
