"""Vocabularies: raw value -> index, with 0 = padding and 1 = unseen (or too rare).

Built in DuckDB from the canonical tables (so a 100M-row log never has to fit in Python
objects) and written as `vocab/<field>.parquet` (value as text, index, count). Indices are
assigned by decreasing frequency, ties by value, so they are deterministic and the hottest rows
of every embedding table sit together.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longrec.data.files import read_parquet
from longrec.data.schema import FIRST_INDEX, UNSEEN


def build_vocab(
    con: duckdb.DuckDBPyConnection,
    name: str,
    sources: list[tuple[str, str]],
    out_dir: Path,
    *,
    multi: bool = False,
    min_count: int = 1,
) -> int:
    """Create DuckDB table `vocab_<name>(value, index, count)`; return the vocabulary size.

    `sources` are (table, column) pairs whose values are pooled; values rarer than `min_count`
    are listed with index 1 (unseen).
    """
    selects = []
    for table, column in sources:
        expr = f"unnest({column})" if multi else column
        selects.append(f"SELECT {expr} AS value FROM {table}")
    union = " UNION ALL ".join(selects)
    con.execute(
        f"""CREATE OR REPLACE TABLE vocab_{name} AS
            WITH counts AS (
                SELECT value, count(*) AS count FROM ({union}) WHERE value IS NOT NULL GROUP BY value
            ), kept AS (
                SELECT value, count,
                       CAST(row_number() OVER (ORDER BY count DESC, value) + {FIRST_INDEX - 1} AS INTEGER) AS index
                FROM counts WHERE count >= {int(min_count)}
            )
            SELECT value, count, index FROM kept
            UNION ALL
            SELECT value, count, {UNSEEN} FROM counts WHERE count < {int(min_count)}"""
    )
    table = con.sql(
        f"SELECT CAST(value AS VARCHAR) AS value, index, count FROM vocab_{name} ORDER BY index, value"
    ).to_arrow_table()
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_dir / f"{name}.parquet")
    if multi:
        con.execute(
            f"SET VARIABLE vocab_map_{name} = (SELECT map(list(value), list(index)) FROM vocab_{name})"
        )
    # fetchall, not fetchone: a partly fetched result would block a following con.sql() (DuckDB 2)
    top = con.execute(f"SELECT coalesce(max(index), {UNSEEN}) FROM vocab_{name}").fetchall()[0][0]
    return int(top) + 1


def encode_sql(name: str, column: str, alias: str, multi: bool = False) -> tuple[str, str]:
    """(select expression, join clause) turning `column` of alias into its vocabulary index."""
    if multi:
        # a per-element join is not expressible in a lambda: look the values up in a MAP variable
        lookup = f"getvariable('vocab_map_{name}')[x]"
        return f"list_transform({alias}.{column}, lambda x: coalesce({lookup}, {UNSEEN}))", ""
    join = f"LEFT JOIN vocab_{name} v_{name} ON v_{name}.value = {alias}.{column}"
    return f"coalesce(v_{name}.index, {UNSEEN})", join


def load_vocab(root: str | Path, name: str) -> dict[str, int]:
    """Raw value (as text) -> index, for serving and inspection."""
    table = read_parquet(Path(root) / "vocab" / f"{name}.parquet")
    return dict(zip(table["value"].to_pylist(), table["index"].to_pylist(), strict=True))


def pad_lists(array: pa.ListArray | pa.ChunkedArray, width: int) -> np.ndarray:
    """A list column as a zero-padded int32 [n, width] matrix (longer lists are cut)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    offsets = np.asarray(array.offsets, dtype=np.int64)
    values = np.asarray(array.flatten().fill_null(0), dtype=np.int32)
    lengths = np.minimum(np.diff(offsets), width)
    out = np.zeros((len(lengths), width), dtype=np.int32)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = values[offsets[:-1][rows] + cols]
    return out
