"""Read a delimited text file into a DuckDB table, locating every bad row by its line number.

DuckDB parses in parallel and out of core, and its reject tables give the physical line of
every structural or conversion error; we type the columns strictly (integers as BIGINT, closed
vocabularies as ENUM) so that most semantic problems surface as conversion errors with a line
number (integers and ENUMs are checked by us after parsing, see `read_delimited`). DuckDB aborts
on invalid UTF-8 instead of rejecting the row, so a fast byte-level pre-scan finds those lines
first.
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


# Text that DuckDB's lenient integer parser would turn into a number although it is not an
# integer: decimals ("1.5" -> 2), exponents ("1e3"), digit separators ("1_000"), hex/binary.
_LENIENT_INT_SYNTAX = (b".", b"e", b"E", b"_", b"0x", b"0X", b"0b", b"0B")


def invalid_utf8_lines(path: Path) -> list[int]:
    """1-based numbers of the lines that are not valid UTF-8, found chunk by chunk."""
    return scan_bytes(path)[0]


def scan_bytes(path: Path) -> tuple[list[int], bool]:
    """One pass over the raw bytes: (lines that are not valid UTF-8, whether the file contains
    any text that a lenient integer parse would accept). Files of digits, separators and short
    codes such as Taobao's pv/buy/cart/fav have none, so their integers parse natively."""
    bad: list[int] = []
    lenient = False
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
            lenient = lenient or any(tok in chunk for tok in _LENIENT_INT_SYNTAX)
            if not block:
                return bad, lenient


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
        got = f', got "{shown(m.group(1))}"' if m else ""
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
    return error_type.lower().replace(" ", "_"), shown(message or error_type, 200)


@dataclass(frozen=True)
class Check:
    """A semantic rule checked after parsing: rows where `violation_sql` is true are bad."""

    violation_sql: str
    reason: str
    message: str  # may contain {value}, filled with `value_sql` of the first offending row
    value_sql: str = "NULL"


# unix seconds: before 1970 or after year ~36800 is not a behaviour's time (the server's bound too)
MAX_TS = 2**40


def ts_in_range(column: str = "ts") -> Check:
    return Check(
        f"{column} < 0 OR {column} > {MAX_TS}",
        f"bad_value:{column}",
        f"field '{column}': expected unix seconds in [0, 2^40], got {{value}}",
        column,
    )


def shown(value: object, limit: int = 60) -> str:
    """A value echoed in a message: control and non-printable characters escaped, at most
    `limit` characters (a 5 MB field must not be printed or stored in meta.json)."""
    text = str(value)
    cut = text[:limit].encode("unicode_escape").decode("ascii")
    return cut + (f"... ({len(text):,} characters)" if len(text) > limit else "")


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
    lenient = True
    if encoding == "utf-8":
        bad_utf8, lenient = scan_bytes(path)
        if bad_utf8:
            first = BadRow(
                str(path), bad_utf8[0], "invalid_utf8", "not valid UTF-8 (wrong encoding?)"
            )
            if on_bad_rows == "error":
                raise first.as_error()
            bad_rows.append((first, len(bad_utf8)))
            source = blank_lines(path, bad_utf8, (scratch or path.parent) / f"{table}.utf8-clean")

    by_name = {c.name: c for c in columns}
    # Integer and ENUM columns are read as text, checked, then cast: DuckDB's text -> BIGINT cast
    # is lenient ("1.5" -> 2, "1e3" -> 1000, "0x10" -> 16, silently rounding timestamps and
    # merging ids), and its reject table gives ENUM errors a wrong line when blank lines follow.
    # With no such text in the file (see scan_bytes), DuckDB's native integer parse is exact and
    # several times faster; only ENUMs are then read as text.
    typed = [c for c in columns if c.sql_type == "ENUM" or (c.sql_type == "BIGINT" and lenient)]
    spec = (
        "{"
        + ", ".join(
            f"'{c.name}': '" + ("VARCHAR" if c in typed else c.type_sql()).replace("'", "''") + "'"
            for c in columns
        )
        + "}"
    )
    rejects, scans, raw = f"{table}_rejects", f"{table}_reject_scans", f"{table}_raw"
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {raw} AS SELECT * FROM read_csv(?,
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

    if source != path:  # lines blanked for invalid UTF-8 are not data rows either
        rejected_lines = np.union1d(rejected_lines, np.asarray(bad_utf8, dtype=np.int64))

    # the text table is temporary (strings are costly to persist); the typed one is kept
    type_checks = _type_checks(typed)
    found = _run_checks(
        con, raw, path, header, type_checks, rejected_lines, order="rowid", delete=False
    )
    bad_rows.extend(found)
    casts = ", ".join(f"CAST({c.name} AS {c.type_sql()}) AS {c.name}" for c in typed)
    replace = f" REPLACE ({casts})" if typed else ""
    where = f" WHERE NOT ({_any_violation(type_checks)})" if found else ""
    con.execute(
        f"CREATE OR REPLACE TABLE {table} AS SELECT rowid AS ord, *{replace} FROM {raw}{where}"
    )
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


def _type_checks(typed: list[Column]) -> tuple[Check, ...]:
    """Rows whose integer columns hold anything but an optionally signed run of digits, or whose
    ENUM columns hold a value outside the vocabulary."""
    checks = []
    for c in typed:
        if c.sql_type == "ENUM":
            listed = ", ".join("'" + v.replace("'", "''") + "'" for v in c.values)
            wrong = f"{c.name} NOT IN ({listed})"
        else:
            # a GLOB for stray characters is ~2x cheaper than a regular expression
            wrong = f"TRY_CAST({c.name} AS BIGINT) IS NULL OR {c.name} GLOB '*[!0-9 +-]*'"
        checks.append(
            Check(
                f"({c.name} IS NOT NULL AND ({wrong}))",
                f"bad_value:{c.name}",
                f"field '{c.name}': expected {c.expectation()}, got \"{{value}}\"",
                c.name,
            )
        )
    return tuple(checks)


def _violates(check: Check) -> str:
    return f"coalesce(({check.violation_sql}), false)"


def _any_violation(checks: tuple[Check, ...] | list[Check]) -> str:
    return " OR ".join(_violates(c) for c in checks) or "false"


def _run_checks(
    con, table, path, header, checks, rejected_lines, *, order: str = "ord", delete: bool = True
) -> list[tuple[BadRow, int]]:
    """Find rows violating `checks` in one scan, describe the first of each kind and (with
    `delete`) delete them. A row breaking several checks counts once, for the first of them."""
    if not checks:
        return []
    parts = []
    for k, check in enumerate(checks):
        only = " AND ".join([_violates(check), *(f"NOT {_violates(c)}" for c in checks[:k])])
        parts.append(
            f"count(*) FILTER (WHERE {only}), min({order}) FILTER (WHERE {only}), "
            f"arg_min({check.value_sql}, {order}) FILTER (WHERE {only})"
        )
    row = con.execute(f"SELECT {', '.join(parts)} FROM {table}").fetchall()[0]
    hits = [(c, row[3 * k], row[3 * k + 1], row[3 * k + 2]) for k, c in enumerate(checks)]
    hits = [h for h in hits if h[1]]
    if not hits:
        return []
    first_rows = np.array([h[2] for h in hits], dtype=np.int64)
    lines = data_line_numbers(path, header, rejected_lines, first_rows)
    found: list[tuple[BadRow, int]] = []
    for (check, n, _, value), line in zip(hits, lines.tolist(), strict=True):
        message = check.message.format(value=shown(value))
        found.append((BadRow(str(path), line if line > 0 else None, check.reason, message), n))
    if delete:
        con.execute(f"DELETE FROM {table} WHERE {_any_violation([h[0] for h in hits])}")
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
