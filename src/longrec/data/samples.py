"""Turn protocol targets into sample tables: negatives, history pointers, target fields, stats.

A sample table (one per split) has the columns
    user, hist_end, target_ts, label, request_id, <item-side fields of the target> [, target_type]
sorted so that the targets of one request are contiguous (positive first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longrec.data.files import read_parquet
from longrec.data.protocols import SPLITS, NegativeSampler, Positives, ProtocolConfig
from longrec.data.store import SequenceStore, history_end

Columns = dict[str, np.ndarray]


@dataclass
class SampleSet:
    splits: dict[str, Columns]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count of targets dropped
    truth: dict[str, Columns] = field(default_factory=dict)


def from_positives(
    store: SequenceStore,
    user_of_row: np.ndarray,
    positives: Positives,
    cfg: ProtocolConfig,
    sampler: NegativeSampler | None,
    rng: np.random.Generator,
) -> SampleSet:
    """Samples for behaviour-derived protocols: each positive plus `cfg.negatives` negatives."""
    rows = positives.rows
    users = user_of_row[rows]
    ts = np.asarray(store.ts[rows])
    hist_end = history_end(store.ts, store.offsets, users, ts)
    hist_len = hist_end - store.offsets[users]
    keep = hist_len >= cfg.min_history
    dropped = {}
    if (~keep).any():
        dropped[f"history shorter than --min-history {cfg.min_history}"] = int((~keep).sum())
    rows, users, ts, hist_end, split = (
        rows[keep],
        users[keep],
        ts[keep],
        hist_end[keep],
        positives.split[keep],
    )
    n_neg = int(cfg.negatives or 0)
    items = np.asarray(store.fields["item"][rows], dtype=np.int64)[:, None]
    if n_neg:
        negs = sampler.sample(rng, np.repeat(users, n_neg)).reshape(-1, n_neg)
        items = np.concatenate((items, negs), axis=1)
    width = 1 + n_neg
    label = np.zeros((len(rows), width), dtype=np.float32)
    label[:, 0] = 1.0
    splits = {}
    request = np.arange(len(rows), dtype=np.int64)
    for index, name in enumerate(SPLITS):
        sel = np.flatnonzero(split == index)
        splits[name] = {
            "user": np.repeat(users[sel], width),
            "hist_end": np.repeat(hist_end[sel], width),
            "target_ts": np.repeat(ts[sel], width),
            "label": label[sel].reshape(-1),
            "request_id": np.repeat(request[sel], width),
            "item": items[sel].reshape(-1),
        }
    return SampleSet(splits, dropped)


def add_item_fields(samples: SampleSet, item_tables: dict[str, np.ndarray]) -> None:
    """Target fields looked up from the item tables: the same for positives and negatives, so no
    field can reveal the label."""
    for cols in samples.splits.values():
        for name, table in item_tables.items():
            if name != "item" and name not in cols:
                cols[name] = table[cols["item"]]


def split_stats(cols: Columns, offsets: np.ndarray, max_len: int) -> dict:
    n = len(cols["label"])
    if n == 0:
        return {"samples": 0}
    hist = cols["hist_end"] - offsets[cols["user"]]
    used = np.minimum(hist, max_len)
    q = [0, 50, 90, 99, 100]
    return {
        "samples": int(n),
        "positives": int(cols["label"].sum()),
        "positive_rate": float(cols["label"].mean()),
        "requests": len(np.unique(cols["request_id"])),
        "users": len(np.unique(cols["user"])),
        "history_len_percentiles": dict(
            zip(map(str, q), np.percentile(hist, q).round(1).tolist(), strict=True)
        ),
        "history_len_used_percentiles": dict(
            zip(map(str, q), np.percentile(used, q).round(1).tolist(), strict=True)
        ),
    }


def write_split(path: Path, cols: Columns) -> None:
    arrays = {}
    for name, values in cols.items():
        if values.ndim == 2:
            flat = pa.array(values.reshape(-1))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        else:
            arrays[name] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)


def read_split(root: str | Path, split: str) -> Columns:
    """A split as numpy columns (fixed-width list columns become [n, W] matrices)."""
    table = read_parquet(Path(root) / "samples" / f"{split}.parquet")
    out: Columns = {}
    for name in table.column_names:
        col = table[name].combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = np.asarray(col.flatten()).reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out
