"""Output of `longrec synth`: behaviours, taxonomy, category map, impressions and ground truth.

The folder's manifest.json names the files. Categories of every domain are unified through the
category map and given their taxonomy path, so the prepared dataset has `category` (unified
leaf), `category_l1..3`, `behavior` and `domain`; the impressions become samples with
`--protocol impressions`, and the truth tells which behaviours drive each impression's label.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from longrec.data.sources.base import FieldDecl, LoadedSource, Source, SourceOptions
from longrec.data.sources.delimited import Column, check_readable, not_null, read_delimited
from longrec.data.sources.taxonomy import attach_taxonomy, unify_categories
from longrec.errors import DataError


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    check_readable(path)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(path, f"not valid JSON ({err.msg})", line=err.lineno) from None
    if not str(manifest.get("format", "")).startswith("longrec-synth/"):
        raise DataError(path, "not a longrec synth manifest (format field)")
    return manifest


def _table_from(con, path: Path, table: str, columns: list[Column], header: bool, opts, scratch):
    if path.suffix == ".parquet":
        check_readable(path)
        con.execute(
            f"CREATE OR REPLACE TABLE {table} AS SELECT row_number() OVER () - 1 AS ord, * FROM read_parquet(?)",
            [str(path)],
        )
        from longrec.data.sources.rows import RowReport

        return RowReport(rows_read=con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    return read_delimited(
        con,
        path,
        columns,
        table,
        header=header,
        checks=tuple(not_null(c.name) for c in columns),
        on_bad_rows=opts.on_bad_rows,
        scratch=scratch,
    )


class SynthSource(Source):
    name = "synth"
    help = "a folder written by `longrec synth` (manifest.json, behaviours, impressions, truth)"

    def load(
        self, con: duckdb.DuckDBPyConnection, path: Path, opts: SourceOptions, scratch: Path
    ) -> LoadedSource:
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(folder, "expected the folder written by `longrec synth`")
        manifest = read_manifest(folder)
        files = manifest["files"]
        behavior_cols = [
            Column("user", "BIGINT"),
            Column("item", "BIGINT"),
            Column("category", "BIGINT"),
            Column("behavior", "VARCHAR"),
            Column("ts", "BIGINT"),
            Column("domain", "VARCHAR"),
        ]
        report = _table_from(
            con, folder / files["behaviors"], "behaviors", behavior_cols, False, opts, scratch
        )
        if report.total_skipped:
            raise DataError(
                folder / files["behaviors"],
                "bad rows in a synthetic log: the ground truth cannot be aligned",
            )
        impression_cols = [
            Column("request_id", "BIGINT"),
            Column("user", "BIGINT"),
            Column("item", "BIGINT"),
            Column("category", "BIGINT"),
            Column("ts", "BIGINT"),
            Column("target_type", "VARCHAR"),
            Column("label", "BIGINT"),
        ]
        _table_from(
            con, folder / files["impressions"], "impressions", impression_cols, True, opts, scratch
        )
        notes: dict = {
            "synth_seed": manifest.get("seed"),
            "target_types": manifest.get("target_types"),
        }
        unify_categories(con, "behaviors", folder / files["category_map"], notes)
        con.execute("ALTER TABLE impressions ALTER category TYPE VARCHAR")
        fields = [FieldDecl("item"), FieldDecl("category")]
        fields += attach_taxonomy(
            con, ["behaviors", "impressions"], folder / files["taxonomy"], notes
        )
        fields += [FieldDecl("behavior", side="event"), FieldDecl("domain", side="event")]
        truth = folder / files["truth"]
        check_readable(truth)
        con.execute(
            """CREATE OR REPLACE TABLE truth AS
               SELECT impression, behavior_row AS behavior_ord, relevance FROM read_parquet(?)""",
            [str(truth)],
        )
        inputs = [str(folder / f) for f in files.values()]
        return LoadedSource(
            "behaviors",
            fields,
            report,
            impressions="impressions",
            truth="truth",
            inputs=inputs,
            notes=notes,
        )
