"""Tmall user_log_format1.csv (IJCAI-15, Tianchi 42).

Header `user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type`; `time_stamp` is mmdd
(no year: `--year`, default 2015, the year of the competition logs); action_type 0 click,
1 add-to-cart, 2 purchase, 3 favourite. A day is the finest time resolution, so behaviours of the
same day are never in each other's history (histories are strictly earlier than the target).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from longrec.data.sources.base import FieldDecl, LoadedSource, Source, SourceOptions
from longrec.data.sources.delimited import Check, Column, read_delimited

TMALL_ACTIONS = {"0": "click", "1": "cart", "2": "buy", "3": "fav"}


class TmallSource(Source):
    name = "tmall"
    help = "Tmall user_log_format1.csv (header; time_stamp mmdd + --year; action_type 0-3)"

    def load(
        self, con: duckdb.DuckDBPyConnection, path: Path, opts: SourceOptions, scratch: Path
    ) -> LoadedSource:
        columns = [
            Column("user_id", "BIGINT"),
            Column("item_id", "BIGINT"),
            Column("cat_id", "BIGINT"),
            Column("seller_id", "BIGINT"),
            Column("brand_id", "BIGINT"),
            Column("time_stamp", "BIGINT", expect="a date as mmdd"),
            Column("action_type", "ENUM", tuple(TMALL_ACTIONS)),
        ]
        year = int(opts.year)
        # the range test first: lpad cuts longer values, so 11111 would read as 1111 (Nov 11)
        date_sql = (
            "try_strptime(CASE WHEN time_stamp BETWEEN 0 AND 9999 THEN "
            f"lpad(CAST(time_stamp AS VARCHAR), 4, '0') END || '{year:04d}', '%m%d%Y')"
        )
        checks = (
            Check(
                "user_id IS NULL OR item_id IS NULL OR time_stamp IS NULL OR action_type IS NULL",
                "missing_value",
                "a required field (user_id, item_id, time_stamp, action_type) is empty",
            ),
            Check(
                f"{date_sql} IS NULL",
                "bad_value:time_stamp",
                f"field 'time_stamp': expected a date as mmdd in {year}, got {{value}}",
                "time_stamp",
            ),
        )
        report = read_delimited(
            con,
            path,
            columns,
            "tmall_raw",
            delimiter=opts.delimiter or ",",
            header=opts.header != "no",
            checks=checks,
            on_bad_rows=opts.on_bad_rows,
            scratch=scratch,
        )
        mapping = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in TMALL_ACTIONS.items())
        con.execute(
            f"""CREATE OR REPLACE TABLE behaviors AS
                SELECT ord, user_id AS user, item_id AS item, cat_id AS category,
                       seller_id AS seller, brand_id AS brand,
                       CASE CAST(action_type AS VARCHAR) {mapping} END AS behavior,
                       CAST(epoch({date_sql}) AS BIGINT) AS ts
                FROM tmall_raw"""
        )
        con.execute("DROP TABLE tmall_raw")
        fields = [
            FieldDecl("item"),
            FieldDecl("category"),
            FieldDecl("seller"),
            FieldDecl("brand"),
            FieldDecl("behavior", side="event"),
        ]
        return LoadedSource("behaviors", fields, report, inputs=[str(path)], notes={"year": year})
