"""The `impressions` protocol: every labelled impression is a sample, its history cut at its time.

Impressions of one request share `request_id` (and user and time, hence one history). Splits
are by request time (quantiles or explicit cuts), as in industrial day-based splits. The
ground truth of a synthetic log (which behaviours drive each label) is carried over as
`truth/<split>.parquet`: (sample row in the split, store row, relevance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longrec.data.protocols import SPLITS, ProtocolConfig, split_by_time, time_cuts
from longrec.data.samples import SampleSet
from longrec.data.schema import USER, FieldSpec
from longrec.data.sources import LoadedSource
from longrec.data.store import SequenceStore, history_end
from longrec.data.vocab import build_vocab, encode_sql


@dataclass
class ImpressionTable:
    """The impressions, vocabulary-encoded, as numpy columns in file order (+ raw truth)."""

    cols: dict[str, np.ndarray]
    ords: np.ndarray
    item_fields: list[str]  # item-side fields the impressions carry themselves
    truth: dict[str, np.ndarray] | None


def fetch_impressions(
    con, loaded: LoadedSource, specs: list[FieldSpec], imp_cols: set[str], vocab_dir: Path
) -> ImpressionTable:
    """Everything the impressions protocol needs from DuckDB, so the connection (and its
    memory) can be released before the numpy phase."""
    imp = loaded.impressions
    build_vocab(con, "target_type", [(imp, "target_type")], vocab_dir)
    fields = [s.name for s in specs if s.side == "item" and s.name in imp_cols and s.width == 1]
    selects, joins = [], []
    for name in [USER, "target_type", *fields]:
        sql, join = encode_sql(name, name, "i")
        selects.append(f"{sql} AS {name}")
        joins.append(join)
    table = con.sql(
        f"""SELECT i.ord AS ord, i.ts AS target_ts, CAST(i.label AS FLOAT) AS label,
               CAST(i.request_id AS BIGINT) AS request_id, {", ".join(selects)}
            FROM {imp} i {" ".join(joins)} ORDER BY i.ord"""
    ).to_arrow_table()
    cols = {k: table[k].to_numpy() for k in table.column_names}
    ords = cols.pop("ord")
    truth = None
    if loaded.truth:
        t = con.sql(
            f"SELECT impression, behavior_ord, relevance FROM {loaded.truth}"
        ).to_arrow_table()
        truth = {k: t[k].to_numpy() for k in t.column_names}
    return ImpressionTable(cols, ords, fields, truth)


def impression_samples(
    data: ImpressionTable,
    item_tables: dict[str, np.ndarray],
    store: SequenceStore,
    protocol: ProtocolConfig,
    notes: dict,
) -> SampleSet:
    cols, ords = dict(data.cols), data.ords
    ts = cols["target_ts"].astype(np.int64)
    users = cols[USER].astype(np.int64)
    cols[USER] = users
    cols["hist_end"] = history_end(store.ts, store.offsets, users, ts)
    bad_labels = int(((cols["label"] != 0) & (cols["label"] != 1)).sum())
    if bad_labels:
        notes["labels_not_0_or_1"] = bad_labels

    # items seen only in impressions take their item-side fields from there
    for name in data.item_fields:
        if name != "item":
            table = item_tables[name]
            unknown = table[cols["item"]] == 0
            table[cols["item"][unknown]] = cols[name][unknown]

    valid_cut, test_cut = time_cuts(ts, protocol)
    notes["valid_cut_ts"], notes["test_cut_ts"] = valid_cut, test_cut
    split = split_by_time(ts, valid_cut, test_cut)
    order = np.lexsort((ords, cols["request_id"], split))
    splits, where_split, where_row = {}, np.empty(len(ords), np.int8), np.empty(len(ords), np.int64)
    for index, name in enumerate(SPLITS):
        sel = order[split[order] == index]
        splits[name] = {k: v[sel] for k, v in cols.items()}
        where_split[ords[sel]] = index
        where_row[ords[sel]] = np.arange(len(sel))
    samples = SampleSet(splits)
    if data.truth is not None:
        samples.truth = _truth(data.truth, store, where_split, where_row, splits, notes)
    return samples


def _truth(t, store, where_split, where_row, splits, notes) -> dict[str, dict[str, np.ndarray]]:
    imp = np.asarray(t["impression"], dtype=np.int64)
    ords = np.asarray(t["behavior_ord"], dtype=np.int64)
    rel = np.asarray(t["relevance"], dtype=np.float32)
    source_row = np.asarray(store.source_row)
    inverse = np.full(int(source_row.max()) + 1, -1, dtype=np.int64)
    inverse[source_row] = np.arange(len(source_row))
    known = (ords <= source_row.max()) & (imp < len(where_split))
    store_row = np.where(known, inverse[np.minimum(ords, len(inverse) - 1)], -1)
    known &= store_row >= 0
    notes["truth_rows_unmatched"] = int((~known).sum())
    out = {}
    outside = 0
    for index, name in enumerate(SPLITS):
        sel = known & (where_split[np.minimum(imp, len(where_split) - 1)] == index)
        rows = where_row[imp[sel]]
        cols = splits[name]
        user = cols[USER][rows]
        inside = (store_row[sel] < cols["hist_end"][rows]) & (store_row[sel] >= store.offsets[user])
        outside += int((~inside).sum())
        order = np.lexsort((-rel[sel], rows))
        out[name] = {
            "sample": rows[order],
            "store_row": store_row[sel][order],
            "relevance": rel[sel][order],
        }
    notes["truth_rows_outside_history"] = outside
    return out
