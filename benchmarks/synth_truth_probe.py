"""How much AUC a `longrec synth` dataset's own truth holds within the last L behaviours.

For every impression: the truth rows' relevance among the last L behaviours before the request,
pooled as the generator pools it (manifest `relevance_pool`: sum or max). A logistic regression
on the target type and type x log(1 + S_L) is fitted on the earlier impressions and scored on the
later ones (time split at the 0.8 / 0.9 quantiles, as the `impressions` protocol). It reads the
generator's truth, which no model sees, so it is a ceiling for what a cut at L allows, not a
model; what it shows is how much a longer history *can* add.

Usage: python benchmarks/synth_truth_probe.py RAW_DIR [L ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score
from synth_count_probe import time_split_probe

LENGTHS = (25, 50, 100, 300, 1000, 2000, 4000, 10000)


def _read(raw: Path, name: str, columns: list[str]) -> pl.DataFrame:
    if (raw / f"{name}.parquet").exists():
        return pl.read_parquet(raw / f"{name}.parquet", columns=columns)
    if name == "behaviors":  # the Taobao layout: no header
        cols = ["user", "item", "category", "behavior", "ts", "domain"]
        return pl.read_csv(raw / "behaviors.csv", has_header=False, new_columns=cols)[columns]
    return pl.read_csv(raw / f"{name}.csv")[columns]


def pooled(raw: Path, lengths) -> tuple[np.ndarray, pl.DataFrame]:
    """[impressions, len(lengths)] truth relevance among the last L behaviours, pooled."""
    pool = json.loads((raw / "manifest.json").read_text())["config"].get("relevance_pool", "sum")
    b = _read(raw, "behaviors", ["user", "ts"])
    imp = _read(raw, "impressions", ["user", "ts", "target_type", "label"])
    truth = pl.read_parquet(raw / "truth.parquet")
    user, ts = b["user"].to_numpy().astype(np.int64), b["ts"].to_numpy()
    iu, it = imp["user"].to_numpy().astype(np.int64), imp["ts"].to_numpy()
    t0 = min(int(ts.min()), int(it.min()))
    # rows are sorted by user then time: the history of a request ends at this row
    end = np.searchsorted((user << 34) | (ts - t0), (iu << 34) | (it - t0), side="left")
    t_imp, t_row = truth["impression"].to_numpy(), truth["behavior_row"].to_numpy()
    back = end[t_imp] - t_row  # 1 = the last behaviour before the request
    rel = truth["relevance"].to_numpy().astype(np.float64)
    out = np.zeros((iu.size, len(lengths)))
    for j, length in enumerate(lengths):
        keep = back <= length
        if pool == "max":
            np.maximum.at(out[:, j], t_imp[keep], rel[keep])
        else:
            out[:, j] = np.bincount(t_imp[keep], weights=rel[keep], minlength=iu.size)
    return out, imp


def probe(raw: Path, lengths=LENGTHS) -> list[dict]:
    s, imp = pooled(raw, lengths)
    y, types, onehot, test, auc = time_split_probe(imp)
    kinds = [str(k) for k in np.unique(types)]
    rows = [{"L": 0, "type_x_log_truth": auc(onehot), **dict.fromkeys(kinds, 0.5)}]
    for j, length in enumerate(lengths):
        x = np.hstack([onehot, onehot * np.log1p(s[:, [j]])])
        row = {"L": length, "type_x_log_truth": auc(x)}
        for k in kinds:  # within one target type: how well S_L alone ranks its impressions
            sel = test & (types == k)
            row[k] = round(float(roc_auc_score(y[sel], s[sel, j])), 4)
        rows.append(row)
    return rows


if __name__ == "__main__":
    raw = Path(sys.argv[1])
    lengths = tuple(int(x) for x in sys.argv[2:]) or LENGTHS
    rows = probe(raw, lengths)
    kinds = [k for k in rows[0] if k not in ("L", "type_x_log_truth")]
    head = " | ".join(f"{k}: S_L alone" for k in kinds)
    print(f"| L | type x log(1 + truth in the last L) | {head} |")
    print("|---:|---:|" + "---:|" * len(kinds))
    for row in rows:
        cells = " | ".join(f"{row[k]:.4f}" for k in kinds)
        print(f"| {row['L'] or 'type only'} | {row['type_x_log_truth']:.4f} | {cells} |")
