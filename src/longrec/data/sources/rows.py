"""Bad-row accounting shared by every reader.

A reader either stops at the first bad row (`on_bad_rows="error"`, the default) with one line
naming the file, the line number and the problem, or skips bad rows (`"skip"`) and counts them
per reason, so that nothing the user gave disappears without being reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from longrec.errors import DataError

OnBadRows = Literal["error", "skip"]


@dataclass
class BadRow:
    path: str
    line: int | None
    reason: str  # short machine key, e.g. "missing_columns", "bad_value:ts"
    message: str  # human sentence, e.g. "expected 5 columns, found 4"

    def as_error(self) -> DataError:
        return DataError(self.path, self.message, line=self.line)


@dataclass
class RowReport:
    """What happened to the rows of one input: read, skipped (per reason), filtered on request."""

    rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_example: dict[str, str] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # rows identical to an earlier one in every field

    def add_bad(self, bad: BadRow, count: int = 1) -> None:
        self.skipped[bad.reason] = self.skipped.get(bad.reason, 0) + count
        where = bad.path if bad.line is None else f"{bad.path}:{bad.line}"
        self.first_example.setdefault(bad.reason, f"{where}: {bad.message}")

    def add_filtered(self, why: str, count: int) -> None:
        if count:
            self.filtered[why] = self.filtered.get(why, 0) + count

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: RowReport) -> None:
        self.rows_read += other.rows_read
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        for k, v in other.first_example.items():
            self.first_example.setdefault(k, v)
        for k, v in other.filtered.items():
            self.filtered[k] = self.filtered.get(k, 0) + v

    def to_json(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_skipped": self.total_skipped,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "first_example_by_reason": dict(sorted(self.first_example.items())),
            "rows_filtered": dict(sorted(self.filtered.items())),
            "duplicate_rows": self.duplicates,
        }

    def summary_lines(self) -> list[str]:
        lines = []
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"skipped {n:,} bad rows ({reason}), e.g. {self.first_example[reason]}")
        for why, n in sorted(self.filtered.items()):
            lines.append(f"filtered {n:,} rows ({why})")
        return lines
