"""How much of a `longrec synth` dataset's signal a *count* of matching behaviours carries.

For every impression: the number of the user's behaviours in the impression's leaf category
among the last L before the request, for several L. A logistic regression on the target type
and type x log(1 + count) is fitted on the earlier impressions and scored on the later ones
(time split at the 0.8 / 0.9 quantiles, as the `impressions` protocol). It is a probe, not a
model: it reads the generator's unified leaf for every behaviour, which a model only sees
through the category fields. What it shows is whether longer histories *can* help, and that
the help comes from counting: "any match" alone loses AUC as L grows.

Usage: python benchmarks/synth_count_probe.py RAW_DIR [L ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

LENGTHS = (50, 100, 300, 1000, 3000, 10000)


def load(raw: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    cols = ["user", "item", "category", "behavior", "ts", "domain"]
    b = pl.read_csv(raw / "behaviors.csv", has_header=False, new_columns=cols)
    leaf = pl.read_csv(raw / "category_map.csv")
    b = b.join(leaf, left_on=["domain", "category"], right_on=["domain", "raw_category"])
    return b.select("user", "ts", "leaf").sort("user", "ts"), pl.read_csv(raw / "impressions.csv")


def counts(b: pl.DataFrame, imp: pl.DataFrame, lengths) -> np.ndarray:
    """[impressions, len(lengths)] same-leaf behaviours among the last L before each request,
    by binary search over (user, leaf, position) keys: no loop over impressions."""
    user, ts, leaf = (b[c].to_numpy().astype(np.int64) for c in ("user", "ts", "leaf"))
    start = np.searchsorted(user, np.arange(user.max() + 2))
    pos = np.arange(user.size) - start[user]  # position within the user's history
    n_leaf = int(max(leaf.max(), imp["category"].max())) + 1
    shift = int(pos.max()).bit_length() + 1
    key = np.sort(((user * n_leaf + leaf) << shift) | pos)
    iu, it = imp["user"].to_numpy().astype(np.int64), imp["ts"].to_numpy()
    il = imp["category"].to_numpy().astype(np.int64)
    # behaviours strictly before the request: one search over (user, time) keys
    t0 = min(int(ts.min()), int(it.min()))
    when = (user << 34) | (ts - t0)  # rows are sorted by user, then time
    ends = np.searchsorted(when, (iu << 34) | (it - t0), side="left") - start[iu]
    group = (iu * n_leaf + il) << shift
    hi = np.searchsorted(key, group | ends, side="left")
    out = np.empty((iu.size, len(lengths)))
    for j, length in enumerate(lengths):
        lo = np.searchsorted(key, group | np.maximum(ends - length, 0), side="left")
        out[:, j] = hi - lo
    return out


def time_split_probe(imp: pl.DataFrame):
    """(labels, target types, their one-hot, test mask, auc): auc(x) fits a logistic regression
    on the earlier impressions' features x and scores the later ones (the impressions
    protocol's 0.8 / 0.9 time quantiles)."""
    y = imp["label"].to_numpy()
    types = imp["target_type"].to_numpy()
    onehot = (types[:, None] == np.unique(types)[None, :]).astype(float)
    ts = imp["ts"].to_numpy()
    train, test = ts < np.quantile(ts, 0.8), ts >= np.quantile(ts, 0.9)

    def auc(x: np.ndarray) -> float:
        fit = LogisticRegression(max_iter=2000).fit(x[train], y[train])
        return round(float(roc_auc_score(y[test], fit.predict_proba(x[test])[:, 1])), 4)

    return y, types, onehot, test, auc


def probe(raw: Path, lengths=LENGTHS) -> list[dict]:
    b, imp = load(raw)
    cnt = counts(b, imp, lengths)
    _, _, onehot, _, auc = time_split_probe(imp)
    rows = [{"L": 0, "type_only": auc(onehot)}]
    for j, length in enumerate(lengths):
        c = cnt[:, [j]]
        rows.append(
            {
                "L": length,
                "mean_count": round(float(c.mean()), 1),
                "type_x_log_count": auc(np.hstack([onehot, onehot * np.log1p(c)])),
                "type_x_any_match": auc(np.hstack([onehot, onehot * (c > 0)])),
            }
        )
    return rows


if __name__ == "__main__":
    lengths = [int(x) for x in sys.argv[2:]] or LENGTHS
    for row in probe(Path(sys.argv[1]), lengths):
        print(row)
