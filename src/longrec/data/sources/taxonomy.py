"""Unify category systems and attach category paths.

Behaviour trajectories that cross domains carry categories from different systems; a mapping
table (`domain,raw_category,leaf`) puts them in one taxonomy, and a taxonomy table
(`leaf,...,l1`, finest to coarsest) gives every leaf its path, stored as fields
`category_l1` (coarsest) ... `category_lH` (the leaf).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from longrec.data.schema import category_level_field
from longrec.data.sources.base import FieldDecl
from longrec.data.sources.delimited import check_readable
from longrec.errors import DataError


def _header(con: duckdb.DuckDBPyConnection, path: Path) -> list[str]:
    check_readable(path)
    return [
        r[0]
        for r in con.execute(
            "SELECT column_name FROM (DESCRIBE SELECT * FROM read_csv(?, header = true, all_varchar = true))",
            [str(path)],
        ).fetchall()
    ]


def unify_categories(
    con: duckdb.DuckDBPyConnection, table: str, category_map: Path, notes: dict
) -> None:
    """Replace `category` by the unified leaf of (domain, category)."""
    cols = _header(con, category_map)
    if cols[:3] != ["domain", "raw_category", "leaf"]:
        raise DataError(
            category_map, f"expected header domain,raw_category,leaf, found {','.join(cols)}"
        )
    con.execute(
        """CREATE OR REPLACE TEMP TABLE category_map AS
           SELECT domain, raw_category, leaf FROM read_csv(?, header = true, all_varchar = true)""",
        [str(category_map)],
    )
    con.execute(
        f"""CREATE OR REPLACE TABLE {table} AS
            SELECT b.* REPLACE (m.leaf AS category) FROM {table} b
            LEFT JOIN category_map m
              ON m.domain = CAST(b.domain AS VARCHAR) AND m.raw_category = CAST(b.category AS VARCHAR)
            ORDER BY b.ord"""
    )
    unmapped = con.execute(f"SELECT count(*) FROM {table} WHERE category IS NULL").fetchone()[0]
    notes["rows_with_unmapped_category"] = int(unmapped)


def attach_taxonomy(
    con: duckdb.DuckDBPyConnection, tables: list[str], taxonomy: Path, notes: dict
) -> list[FieldDecl]:
    """Add category_l1..category_lH to each table from a leaf,...,l1 taxonomy file."""
    cols = _header(con, taxonomy)
    if len(cols) < 2 or cols[0] != "leaf":
        raise DataError(
            taxonomy,
            f"expected header leaf,<parent levels>...,<root level>, found {','.join(cols)}",
        )
    depth = len(cols)
    # file columns run finest -> coarsest; level 1 is the coarsest
    select = ", ".join(
        f'CAST(t."{cols[depth - level]}" AS VARCHAR) AS {category_level_field(level)}'
        for level in range(1, depth + 1)
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE taxonomy AS SELECT * FROM read_csv(?, header = true, all_varchar = true)",
        [str(taxonomy)],
    )
    duplicate = con.execute(
        "SELECT leaf FROM taxonomy GROUP BY leaf HAVING count(*) > 1 LIMIT 1"
    ).fetchone()
    if duplicate:
        raise DataError(taxonomy, f"leaf {duplicate[0]} appears more than once", field="leaf")
    for table in tables:
        con.execute(
            f"""CREATE OR REPLACE TABLE {table} AS
                SELECT b.*, {select} FROM {table} b
                LEFT JOIN taxonomy t ON t.leaf = CAST(b.category AS VARCHAR)
                ORDER BY b.ord"""
        )
    missing = con.execute(
        f"SELECT count(*) FROM {tables[0]} WHERE category IS NOT NULL AND {category_level_field(1)} IS NULL"
    ).fetchone()[0]
    notes["rows_with_category_outside_taxonomy"] = int(missing)
    notes["taxonomy_depth"] = depth
    return [FieldDecl(category_level_field(level)) for level in range(1, depth + 1)]
