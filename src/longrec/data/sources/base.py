"""What every reader produces: the canonical behaviour table, as a DuckDB table.

The table `behaviors` has one row per behaviour with the canonical columns of DESIGN.md:
`ord` (file order, for a stable sort), `user`, `item`, `ts` (int64 unix seconds) and whichever
optional columns the source has: `category`, `category_l1..category_lH` (a category path, coarse
to fine), `behavior`, `domain`, multi-valued columns as DuckDB lists, and any further item-side
columns. Readers may also produce an `impressions` table (user, item, ts, label, target_type,
request_id, item-side columns) and a `truth` table (impression, behavior_ord, relevance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from longrec.data.sources.rows import OnBadRows, RowReport


@dataclass
class SourceOptions:
    """Reader options common to all sources; each reader uses the ones that apply to it."""

    on_bad_rows: OnBadRows = "error"
    columns: dict[str, str] | None = None  # canonical name -> file column (name or 0-based index)
    delimiter: str | None = None
    header: str = "auto"  # "auto" | "yes" | "no"
    year: int = 2015  # Tmall's time_stamp is mmdd; the year is not in the file
    taxonomy: Path | None = None  # CSV leaf,...,l1 mapping categories to a path
    category_map: Path | None = None  # CSV domain,raw_category,leaf unifying category systems


@dataclass
class FieldDecl:
    """A column of the canonical table that becomes a field of the prepared dataset."""

    name: str
    side: str = "item"  # "item" (property of the item) or "event" (of the behaviour)
    multi: bool = False  # a DuckDB list column (e.g. genres)


@dataclass
class LoadedSource:
    behaviors: str
    fields: list[FieldDecl]
    report: RowReport
    impressions: str | None = None
    truth: str | None = None
    inputs: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


class Source(ABC):
    """A raw format."""

    name: str = ""
    help: str = ""

    @abstractmethod
    def load(
        self, con: duckdb.DuckDBPyConnection, path: Path, opts: SourceOptions, scratch: Path
    ) -> LoadedSource:
        """Create the canonical `behaviors` table (and impressions/truth if any) in `con`."""
