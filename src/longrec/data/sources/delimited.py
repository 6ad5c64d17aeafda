"""Read a delimited text file into a DuckDB table, locating every bad row by its line number.

DuckDB parses in parallel and out of core, and its reject tables give the physical line of
every structural or conversion error; we type the columns strictly (integers as BIGINT, closed
vocabularies as ENUM) so that most semantic problems surface there as conversion errors with a
line number. DuckDB aborts on invalid UTF-8 instead of rejecting the row, so a fast byte-level
pre-scan finds those lines first.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from longrec.data.sources.rows import BadRow, OnBadRows, RowReport
from longrec.errors import DataError

_CHUNK = 1 << 24


@dataclass(frozen=True)
class Column:
    """A column of the file: its DuckDB type and, for messages, what a value should look like."""

    name: str
    sql_type: str  # "BIGINT", "VARCHAR", "DOUBLE", or "ENUM" with `values`
    values: tuple[str, ...] = ()
    expect: str = ""

    def type_sql(self) -> str:
        if self.sql_type == "ENUM":
            quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in self.values)
            return f"ENUM({quoted})"
        return self.sql_type

    def expectation(self) -> str:
        if self.expect:
            return self.expect
        if self.sql_type == "ENUM":
            return "one of " + ", ".join(self.values)
        return {"BIGINT": "an integer", "DOUBLE": "a number"}.get(self.sql_type, "a value")


def check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "no such file")
    if path.is_dir():
        raise DataError(path, "is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise DataError(path, "not readable (permission denied)")
    if path.stat().st_size == 0:
        raise DataError(path, "the file is empty")


def invalid_utf8_lines(path: Path) -> list[int]:
    """1-based numbers of the lines that are not valid UTF-8, found chunk by chunk."""
    bad: list[int] = []
    line_base = 0
    carry = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            data = carry + block
            if not block:
                cut = len(data)
            else:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
            chunk, carry = data[:cut], data[cut:]
            pos = 0
            while pos < len(chunk):
                try:
                    chunk[pos:].decode("utf-8")
                    break
                except UnicodeDecodeError as err:
                    at = pos + err.start
                    bad.append(line_base + chunk.count(b"\n", 0, at) + 1)
                    nl = chunk.find(b"\n", at)
                    pos = len(chunk) if nl < 0 else nl + 1
            line_base += chunk.count(b"\n")
            if not block:
                return bad


def blank_lines(path: Path, lines: list[int], out: Path) -> Path:
    """Copy `path` to `out` with the given lines emptied (line numbers stay valid)."""
    targets = set(lines)
    with open(path, "rb") as src, open(out, "wb") as dst:
        for number, raw in enumerate(src, start=1):
            if number in targets:
                dst.write(b"\n" if raw.endswith(b"\n") else b"")
            else:
                dst.write(raw)
    return out


_CONVERT = re.compile(r'Could not convert string "(.*?)" to')
_COUNT = re.compile(r"Expected Number of Columns: (\d+) Found: (\d+)")


def _describe(error_type: str, column: str | None, message: str, columns: dict[str, Column]):
    """(reason key, human message) for one DuckDB reject row."""
    if error_type == "CAST" and column in columns:
        m = _CONVERT.search(message or "")
        got = f', got "{m.group(1)}"' if m else ""
        return (
            f"bad_value:{column}",
            f"field '{column}': expected {columns[column].expectation()}{got}",
        )
    if error_type in ("MISSING COLUMNS", "TOO MANY COLUMNS"):
        m = _COUNT.search(message or "")
        if m:
            want, got = m.groups()
            hint = " (truncated line?)" if error_type == "MISSING COLUMNS" else ""
            text = f"expected {want} columns, found {got}{hint}"
        else:
            text = error_type.lower()
        return error_type.lower().replace(" ", "_"), text
    if error_type == "UNQUOTED VALUE":
        return "bad_quoting", "unterminated or misplaced quote"
    if error_type == "LINE SIZE OVER MAXIMUM":
        return "line_too_long", "line longer than the reader's maximum"
    if error_type == "INVALID UNICODE":
        return "invalid_utf8", "not valid UTF-8"
    return error_type.lower().replace(" ", "_"), message or error_type


@dataclass(frozen=True)
class Check:
    """A semantic rule checked after parsing: rows where `violation_sql` is true are bad."""

    violation_sql: str
    reason: str
    message: str  # may contain {value}, filled with `value_sql` of the first offending row
    value_sql: str = "NULL"


def not_null(column: str, expect: str = "a value") -> Check:
    return Check(
        f"{column} IS NULL",
        f"missing_value:{column}",
        f"field '{column}': expected {expect}, got an empty value",
    )


def read_delimited(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    columns: list[Column],
    table: str,
    *,
    delimiter: str = ",",
    header: bool = False,
    quote: str = '"',
    encoding: str = "utf-8",
    checks: tuple[Check, ...] = (),
    on_bad_rows: OnBadRows = "error",
    scratch: Path | None = None,
) -> RowReport:
    """Create `table` with the rows that pass; column `ord` holds their file order.

    With on_bad_rows="error" the first bad row (smallest line) raises a DataError naming it.
    """
    path = Path(path)
    check_readable(path)
    bad_rows: list[tuple[BadRow, int]] = []  # (example, count)
    source = path
    if encoding == "utf-8":
        bad_utf8 = invalid_utf8_lines(path)
        if bad_utf8:
            first = BadRow(
                str(path), bad_utf8[0], "invalid_utf8", "not valid UTF-8 (wrong encoding?)"
            )
            if on_bad_rows == "error":
                raise first.as_error()
            bad_rows.append((first, len(bad_utf8)))
            source = blank_lines(path, bad_utf8, (scratch or path.parent) / f"{table}.utf8-clean")

    by_name = {c.name: c for c in columns}
    spec = (
        "{"
        + ", ".join(f"'{c.name}': '" + c.type_sql().replace("'", "''") + "'" for c in columns)
        + "}"
    )
    rejects, scans, raw = f"{table}_rejects", f"{table}_reject_scans", f"{table}_raw"
    con.execute(
        f"""CREATE OR REPLACE TABLE {raw} AS SELECT * FROM read_csv(?,
            delim = ?, quote = ?, escape = ?, header = ?, auto_detect = false, encoding = ?,
            columns = {spec}, store_rejects = true,
            rejects_table = '{rejects}', rejects_scan = '{scans}', null_padding = false)""",
        [str(source), delimiter, quote, quote, header, encoding],
    )
    rejected = con.execute(
        f"""SELECT line, column_name, error_type, error_message FROM {rejects}
            QUALIFY row_number() OVER (PARTITION BY line ORDER BY column_idx) = 1
            ORDER BY line"""
    ).fetchall()
    con.execute(f"DROP TABLE IF EXISTS {rejects}; DROP TABLE IF EXISTS {scans}")
    for line, column, error_type, message in rejected:
        reason, text = _describe(error_type, column, message, by_name)
        bad_rows.append((BadRow(str(path), int(line), reason, text), 1))
    rejected_lines = np.array([r[0] for r in rejected], dtype=np.int64)

    con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT rowid AS ord, * FROM {raw}")
    con.execute(f"DROP TABLE {raw}")
    semantic = _run_checks(con, table, path, header, checks, rejected_lines)
    bad_rows.extend(semantic)

    report = RowReport()
    if bad_rows:
        bad_rows.sort(key=lambda b: b[0].line if b[0].line is not None else 0)
        if on_bad_rows == "error":
            raise bad_rows[0][0].as_error()
        for bad, count in bad_rows:
            report.add_bad(bad, count)
    accepted = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    report.rows_read = accepted + report.total_skipped
    if accepted == 0:
        detail = f" ({report.total_skipped} bad rows skipped)" if report.total_skipped else ""
        raise DataError(path, f"no data rows{detail}")
    return report


def _run_checks(con, table, path, header, checks, rejected_lines) -> list[tuple[BadRow, int]]:
    """Find rows violating `checks`, delete them, and describe the first of each kind."""
    found: list[tuple[BadRow, int]] = []
    for check in checks:
        n, first_ord, value = con.execute(
            f"""SELECT count(*), min(ord), arg_min({check.value_sql}, ord)
                FROM {table} WHERE {check.violation_sql}"""
        ).fetchone()
        if not n:
            continue
        line = int(data_line_numbers(path, header, rejected_lines, np.array([first_ord]))[0])
        message = check.message.format(value=value)
        found.append((BadRow(str(path), line if line > 0 else None, check.reason, message), n))
        con.execute(f"DELETE FROM {table} WHERE {check.violation_sql}")
    return found


def data_line_numbers(path: Path, header: bool, excluded: np.ndarray, rowids: np.ndarray):
    """Physical line numbers of accepted rows `rowids` (0-based, file order).

    Used only to report semantic errors found after parsing (e.g. an impossible date); skipped
    are blank lines, the header and the `excluded` (rejected) lines, exactly as DuckDB does.
    """
    want = np.sort(np.asarray(rowids, dtype=np.int64))
    excluded = np.asarray(sorted(excluded), dtype=np.int64)
    result: dict[int, int] = {}
    seen_rows = 0
    line_base = 0
    with open(path, "rb") as f:
        carry = b""
        while len(result) < len(want):
            block = f.read(_CHUNK)
            data = carry + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            chunk, carry = data[:cut], data[cut:]
            if not chunk:
                if not block:
                    break
                continue
            buf = np.frombuffer(chunk, dtype=np.uint8)
            ends = np.flatnonzero(buf == 10)
            if not block and (len(ends) == 0 or ends[-1] != len(buf) - 1):
                ends = np.append(ends, len(buf))
            starts = np.concatenate(([0], ends[:-1] + 1))
            lengths = ends - starts
            # a line holding only "\r" is blank too
            cr_only = (lengths == 1) & (buf[np.minimum(starts, len(buf) - 1)] == 13)
            numbers = line_base + np.arange(1, len(ends) + 1)
            keep = (lengths > 0) & ~cr_only & ~np.isin(numbers, excluded)
            if header:
                keep &= numbers > 1
            data_numbers = numbers[keep]
            lo, hi = seen_rows, seen_rows + len(data_numbers)
            for r in want[(want >= lo) & (want < hi)]:
                result[int(r)] = int(data_numbers[r - lo])
            seen_rows = hi
            line_base += len(ends)
            if not block:
                break
    return np.array([result.get(int(r), -1) for r in rowids], dtype=np.int64)
