"""Streaming output of the synthetic generator (pyarrow CSV / Parquet writers) and its stats."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from longrec.data.synthetic_behaviours import Behaviours
from longrec.data.synthetic_impressions import Impressions
from longrec.data.synthetic_world import BEHAVIORS, DOMAINS, World

if TYPE_CHECKING:
    from longrec.data.synthetic import SynthConfig

BEHAVIOR_SCHEMA = pa.schema(
    [
        ("user", pa.int64()),
        ("item", pa.int64()),
        ("category", pa.int64()),
        ("behavior", pa.string()),
        ("ts", pa.int64()),
        ("domain", pa.string()),
    ]
)
IMPRESSION_SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("user", pa.int64()),
        ("item", pa.int64()),
        ("category", pa.int64()),
        ("ts", pa.int64()),
        ("target_type", pa.string()),
        ("label", pa.int8()),
    ]
)
TRUTH_SCHEMA = pa.schema(
    [("impression", pa.int64()), ("behavior_row", pa.int64()), ("relevance", pa.float32())]
)
PARQUET_COMPRESSION = "zstd"


def _strings(codes: np.ndarray, names: tuple[str, ...]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(names))).cast(pa.string())


CSV_OPTIONS = pacsv.WriteOptions(include_header=False, quoting_style="none")


class _CsvFile:
    """A streaming CSV writer with an unquoted header line (or none, like the Taobao file)."""

    def __init__(self, path: Path, schema: pa.Schema, header: bool):
        self.sink = pa.OSFile(str(path), "wb")
        if header:
            self.sink.write((",".join(schema.names) + "\n").encode())
        self.writer = pacsv.CSVWriter(self.sink, schema, write_options=CSV_OPTIONS)

    def write_table(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


def _write_small_csv(path: Path, columns: dict[str, Any]) -> None:
    table = pa.table(columns)
    out = _CsvFile(path, table.schema, header=True)
    out.write_table(table)
    out.close()


class ChunkWriter:
    """Open writers for the three streamed files plus the diagnostics gathered per chunk."""

    def __init__(self, folder: Path, config: SynthConfig, world: World):
        self.config = config
        self.world = world
        ext = config.format
        self.files = {
            "behaviors": f"behaviors.{ext}",
            "taxonomy": "taxonomy.csv",
            "category_map": "category_map.csv",
            "impressions": f"impressions.{ext}",
            "truth": "truth.parquet",
        }
        tax = world.tax
        _write_small_csv(
            folder / self.files["taxonomy"],
            {
                "leaf": tax.leaf_ids(),
                "l2": tax.l2_ids_of_leaves(),
                "l1": tax.l1_ids_of_leaves(),
            },
        )
        content = world.content
        n_ad = len(DOMAINS) - 1
        _write_small_csv(
            folder / self.files["category_map"],
            {
                "domain": [d for d in DOMAINS[:n_ad] for _ in range(tax.n_leaf)]
                + [DOMAINS[-1]] * content.n,
                "raw_category": np.concatenate(
                    [np.tile(tax.leaf_ids(), n_ad), np.sort(content.raw_by_slot)]
                ),
                "leaf": np.concatenate(
                    [
                        np.tile(tax.leaf_ids(), n_ad),
                        tax.leaf_id0 + content.leaf_by_slot[np.argsort(content.raw_by_slot)],
                    ]
                ),
            },
        )
        if ext == "csv":
            self.behaviors = _CsvFile(
                folder / self.files["behaviors"], BEHAVIOR_SCHEMA, header=False
            )
            self.impressions = _CsvFile(
                folder / self.files["impressions"], IMPRESSION_SCHEMA, header=True
            )
        else:
            self.behaviors = pq.ParquetWriter(
                folder / self.files["behaviors"], BEHAVIOR_SCHEMA, compression=PARQUET_COMPRESSION
            )
            self.impressions = pq.ParquetWriter(
                folder / self.files["impressions"],
                IMPRESSION_SCHEMA,
                compression=PARQUET_COMPRESSION,
            )
        self.truth = pq.ParquetWriter(
            folder / self.files["truth"], TRUTH_SCHEMA, compression=PARQUET_COMPRESSION
        )
        self.diag: dict[str, list[np.ndarray]] = {
            k: [] for k in ("label", "prob", "score", "score_recent", "target", "history_len")
        }
        self.truth_rows = 0
        self.requests = 0
        self.closed = False

    def collect(self, imp: Impressions) -> None:
        for key, values in self.diag.items():
            values.append(getattr(imp, key))
        self.truth_rows += int(imp.truth_imp.shape[0])
        self.requests += imp.n_requests

    def close(self) -> None:
        """Close the three files (idempotent)."""
        if not self.closed:
            self.closed = True
            self.behaviors.close()
            self.impressions.close()
            self.truth.close()

    def diagnostics(self) -> dict[str, np.ndarray]:
        return {
            k: np.concatenate(v) if v else np.zeros(0, dtype=np.float32)
            for k, v in self.diag.items()
        }


def write_tables(
    writer: ChunkWriter,
    beh: Behaviours,
    imp: Impressions,
    user_id0: int,
    row0: int,
    imp0: int,
    req0: int,
) -> int:
    """Append one chunk to the three files; returns the number of behaviours written."""
    items, tax = writer.world.items, writer.world.tax
    behaviors = pa.Table.from_arrays(
        [
            pa.array(user_id0 + beh.user.astype(np.int64)),
            pa.array(beh.item),
            pa.array(items.raw_of[beh.item]),
            _strings(beh.behavior, BEHAVIORS),
            pa.array(beh.ts),
            _strings(beh.domain, DOMAINS),
        ],
        schema=BEHAVIOR_SCHEMA,
    )
    writer.behaviors.write_table(behaviors)
    del behaviors
    impressions = pa.Table.from_arrays(
        [
            pa.array(req0 + 1 + imp.request),
            pa.array(user_id0 + imp.user.astype(np.int64)),
            pa.array(imp.item),
            pa.array(tax.leaf_id0 + imp.leaf.astype(np.int64)),
            pa.array(imp.ts),
            _strings(imp.target, tuple(writer.config.target_types)),
            pa.array(imp.label),
        ],
        schema=IMPRESSION_SCHEMA,
    )
    writer.impressions.write_table(impressions)
    truth = pa.Table.from_arrays(
        [pa.array(imp0 + imp.truth_imp), pa.array(row0 + imp.truth_row), pa.array(imp.truth_rel)],
        schema=TRUTH_SCHEMA,
    )
    writer.truth.write_table(truth)
    return beh.rows


def auc(label: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum formula with average ranks for ties (None if one class only).

    numpy only: a sort of the impressions, so it stays cheap at millions of impressions.
    """
    label = np.asarray(label)
    n_pos = int(np.count_nonzero(label))
    n_neg = int(label.size) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="stable")
    s = np.asarray(score)[order]
    first = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(first)
    counts = np.diff(np.r_[starts, s.size])
    ranks = np.repeat(starts + (counts + 1) / 2.0, counts)  # 1-based average ranks
    rank_sum = float(ranks[label[order] != 0].sum())
    return round((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg), 4)


def summarize(
    config: SynthConfig, world: World, lengths: np.ndarray, writer: ChunkWriter
) -> dict[str, Any]:
    """The manifest's stats: sizes, label rates, length percentiles and signal diagnostics."""
    d = writer.diagnostics()
    label = d["label"]
    n_imp = int(label.size)
    by_type = {}
    for t, name in enumerate(config.target_types):
        mask = d["target"] == t
        by_type[name] = round(float(label[mask].mean()), 4) if mask.any() else None
    q = np.percentile(lengths, [50, 90, 99, 99.9]) if lengths.size else [0] * 4
    return {
        "rows": int(lengths.sum()),
        "users": int(lengths.size),
        "items": int(sum(world.items.n_per_domain)),
        "items_per_domain": dict(zip(DOMAINS, world.items.n_per_domain, strict=True)),
        "leaves": world.tax.n_leaf,
        "content_categories": world.content.n,
        "requests": writer.requests,
        "impressions": n_imp,
        "truth_rows": writer.truth_rows,
        "positive_rate": round(float(label.mean()), 4) if n_imp else None,
        "positive_rate_by_target": by_type,
        "history_length": {
            "mean": round(float(lengths.mean()), 2),
            "min": int(lengths.min()),
            "p50": float(q[0]),
            "p90": float(q[1]),
            "p99": float(q[2]),
            "p99.9": float(q[3]),
            "max": int(lengths.max()),
        },
        "impression_history_length_mean": round(float(d["history_len"].mean()), 2)
        if n_imp
        else None,
        # AUC of the true click probability, of S (summed truth relevance) and of S restricted
        # to the last `eval_recent` behaviours: the gap is the long-range signal
        "auc": {
            "oracle_probability": auc(label, d["prob"]),
            "truth_relevance": auc(label, d["score"]),
            f"truth_relevance_last{config.eval_recent}": auc(label, d["score_recent"]),
        },
    }
