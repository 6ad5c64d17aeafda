"""Any CSV or Parquet behaviour log, described by a column map.

`--columns user=uid,item=iid,ts=time,category=cat,behavior=act` names, for each canonical
column, the file's column (a header name, or a 0-based position for files without a header).
`user`, `item` and `ts` (integer unix seconds) are required; `category`, `behavior`, `domain`
are recognised; any other key becomes an extra item-side field of that name.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import duckdb

from longrec.data.schema import BEHAVIOR, DOMAIN, EVENT_SIDE_FIELDS, REQUIRED_COLUMNS, USER
from longrec.data.sources.base import FieldDecl, LoadedSource, Source, SourceOptions
from longrec.data.sources.delimited import (
    Check,
    Column,
    check_readable,
    read_delimited,
    ts_in_range,
)
from longrec.data.sources.rows import BadRow, RowReport
from longrec.data.sources.taxonomy import attach_taxonomy, unify_categories
from longrec.errors import DataError, UserError


def parse_column_map(text: str | None) -> dict[str, str] | None:
    """'user=uid,item=iid' -> {'user': 'uid', 'item': 'iid'}."""
    if not text:
        return None
    mapping: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(
                f"--columns: expected key=column pairs separated by commas, got '{part}'"
            )
        mapping[key.strip()] = value.strip()
    missing = [c for c in REQUIRED_COLUMNS if c not in mapping]
    if missing:
        raise UserError(f"--columns: missing required key(s) {', '.join(missing)}")
    check_field_names(mapping, "--columns")
    return mapping


# names the prepared dataset already uses for its own columns and files
_RESERVED_NAMES = frozenset(
    {"ord", "offsets", "source_row", "hist_end", "target_ts", "label", "request_id", "target_type"}
)


def check_field_names(names, where: str) -> None:
    """Field names become SQL identifiers and file names: plain words that DuckDB accepts bare,
    other than the names of the dataset's own columns."""
    for name in names:
        ok = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None
        ok = ok and name not in _RESERVED_NAMES
        if ok:
            try:
                duckdb.execute(f'SELECT {name} FROM (SELECT 1 AS "{name}")').fetchall()
            except duckdb.Error:
                ok = False
        if not ok:
            raise UserError(
                f"{where}: '{name}' cannot be a field name (use letters, digits and _, not an "
                "SQL keyword or a name the dataset uses); map it with --columns NAME=COLUMN"
            )


def _fields_for(keys: list[str]) -> list[FieldDecl]:
    return [
        FieldDecl(k, side="event" if k in EVENT_SIDE_FIELDS else "item")
        for k in keys
        if k not in (USER, "ts")
    ]


def _first_line(path: Path, delimiter: str) -> list[str]:
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        if len(delimiter) != 1:  # the csv module takes one character; DuckDB also takes "::"
            line = f.readline().rstrip("\r\n")
            return [v.strip('"') for v in line.split(delimiter)] if line else []
        return next(csv.reader(f, delimiter=delimiter), [])


def _resolve(mapping: dict[str, str] | None, first: list[str], header_opt: str, path: Path):
    """(header?, canonical -> 0-based position)."""
    if mapping is None:
        if header_opt == "no":
            raise UserError(f"{path}: without a header line, --columns must give column positions")
        mapping = {c: c for c in first}
        check_field_names(mapping, f"{path}: header")
        missing = [c for c in REQUIRED_COLUMNS if c not in first]
        if missing:
            raise DataError(
                path,
                f"header line lacks {', '.join(missing)}; name the columns with --columns "
                "(e.g. --columns user=uid,item=iid,ts=time)",
                line=1,
            )
    positional = all(v.isdigit() for v in mapping.values())
    if header_opt != "auto":
        header = header_opt == "yes"
    elif not positional:
        header = True  # columns named, so the first line must name them
    else:
        ts_pos = int(mapping["ts"])
        ts_text = first[ts_pos].strip() if ts_pos < len(first) else ""
        header = not ts_text.lstrip("-").isdigit()
    positions: dict[str, int] = {}
    for key, col in mapping.items():
        if col.isdigit():
            positions[key] = int(col)
        elif header and col in first:
            positions[key] = first.index(col)
        else:
            where = f"header columns are {','.join(first)}" if header else "the file has no header"
            raise DataError(path, f"column '{col}' (for {key}) not found: {where}", line=1)
        if positions[key] >= len(first):
            raise DataError(
                path,
                f"column {positions[key]} (for {key}) not found: the first line has {len(first)} columns",
                line=1,
            )
    return header, positions


class CsvSource(Source):
    name = "csv"
    help = "any delimited file; --columns user=COL,item=COL,ts=COL[,category=COL,...]"

    def load(
        self, con: duckdb.DuckDBPyConnection, path: Path, opts: SourceOptions, scratch: Path
    ) -> LoadedSource:
        path = Path(path)
        check_readable(path)
        delimiter = opts.delimiter or ("\t" if path.suffix in (".tsv", ".tab") else ",")
        first = _first_line(path, delimiter)
        header, positions = _resolve(opts.columns, first, opts.header, path)
        by_position = {pos: key for key, pos in positions.items()}
        columns = []
        for i in range(len(first)):
            key = by_position.get(i, f"_unused{i}")
            kind = "BIGINT" if key == "ts" else "VARCHAR"
            columns.append(
                Column(key, kind, expect="an integer unix timestamp" if key == "ts" else "")
            )
        missing = [
            Check(
                f"{k} IS NULL OR {k} = ''" if k != "ts" else "ts IS NULL",
                f"missing_value:{k}",
                f"field '{k}': expected a value, got an empty one",
            )
            for k in REQUIRED_COLUMNS
        ]
        checks = (*missing, ts_in_range())
        report = read_delimited(
            con,
            path,
            columns,
            "tabular_raw",
            delimiter=delimiter,
            header=header,
            checks=checks,
            on_bad_rows=opts.on_bad_rows,
            scratch=scratch,
        )
        keys = list(positions)
        con.execute(
            f"CREATE OR REPLACE TABLE behaviors AS SELECT ord, {', '.join(keys)} FROM tabular_raw"
        )
        con.execute("DROP TABLE tabular_raw")
        return finish_tabular(con, keys, report, [str(path)], opts)


class ParquetSource(Source):
    name = "parquet"
    help = "a Parquet file (or glob); --columns maps canonical names to its columns"

    def load(
        self, con: duckdb.DuckDBPyConnection, path: Path, opts: SourceOptions, scratch: Path
    ) -> LoadedSource:
        if "*" not in str(path):
            check_readable(Path(path))
        try:
            schema = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
        except duckdb.Error as err:
            raise DataError(
                path, f"not a readable Parquet file ({str(err).splitlines()[0]})"
            ) from None
        types = {name: kind for name, kind, *_ in schema}
        mapping = opts.columns or {c: c for c in types}
        check_field_names(mapping, f"{path}: column names")
        for key in REQUIRED_COLUMNS:
            if key not in mapping:
                raise DataError(path, f"no '{key}' column; name it with --columns {key}=COLUMN")
        for key, col in mapping.items():
            if col not in types:
                raise DataError(
                    path, f"column '{col}' (for {key}) not found; columns are {', '.join(types)}"
                )
        ts_type = types[mapping["ts"]]
        if "TIMESTAMP" in ts_type:
            ts_sql = f'CAST(epoch("{mapping["ts"]}") AS BIGINT)'
        elif ts_type in (
            "TINYINT",
            "SMALLINT",
            "INTEGER",
            "BIGINT",
            "UTINYINT",
            "USMALLINT",
            "UINTEGER",
            "UBIGINT",
            "HUGEINT",
        ):
            ts_sql = f'CAST("{mapping["ts"]}" AS BIGINT)'
        else:
            raise DataError(
                path,
                f"expected integer unix seconds or a timestamp, found {ts_type}",
                field=mapping["ts"],
            )
        select = ", ".join(
            ts_sql + " AS ts" if key == "ts" else f'"{col}" AS {key}'
            for key, col in mapping.items()
        )
        con.execute(
            f"""CREATE OR REPLACE TABLE behaviors AS
                SELECT row_number() OVER () - 1 AS ord, {select}
                FROM read_parquet(?)""",
            [str(path)],
        )
        report = RowReport(rows_read=con.execute("SELECT count(*) FROM behaviors").fetchone()[0])
        for key in REQUIRED_COLUMNS:
            n, first = con.execute(
                f"SELECT count(*), min(ord) FROM behaviors WHERE {key} IS NULL"
            ).fetchone()
            if n:
                bad = BadRow(
                    str(path),
                    None,
                    f"missing_value:{key}",
                    f"row {first + 1}: field '{mapping[key]}' is null",
                )
                if opts.on_bad_rows == "error":
                    raise bad.as_error()
                report.add_bad(bad, n)
                con.execute(f"DELETE FROM behaviors WHERE {key} IS NULL")
        return finish_tabular(con, list(mapping), report, [str(path)], opts)


def finish_tabular(
    con, keys: list[str], report: RowReport, inputs: list[str], opts: SourceOptions
) -> LoadedSource:
    """Apply the optional category map and taxonomy, and declare the fields."""
    notes: dict = {}
    fields = _fields_for(keys)
    if opts.category_map is not None:
        if DOMAIN not in keys:
            raise UserError(
                "--category-map needs a 'domain' column (add domain=COLUMN to --columns)"
            )
        unify_categories(con, "behaviors", opts.category_map, notes)
    if opts.taxonomy is not None:
        fields += attach_taxonomy(con, ["behaviors"], opts.taxonomy, notes)
    if BEHAVIOR in keys:
        fields = [f for f in fields if f.name != BEHAVIOR] + [FieldDecl(BEHAVIOR, side="event")]
    return LoadedSource("behaviors", fields, report, inputs=inputs, notes=notes)
