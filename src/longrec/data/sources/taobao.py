"""Alibaba Taobao UserBehavior.csv (Tianchi 649): no header; user,item,category,behavior,ts."""

from __future__ import annotations

from pathlib import Path

import duckdb

from longrec.data.sources.base import FieldDecl, LoadedSource, Source, SourceOptions
from longrec.data.sources.delimited import Column, not_null, read_delimited, ts_in_range

TAOBAO_BEHAVIORS = ("pv", "buy", "cart", "fav")


class TaobaoSource(Source):
    name = "taobao"
    help = "Taobao UserBehavior.csv (no header: user,item,category,behavior,ts; pv/buy/cart/fav)"

    def load(
        self, con: duckdb.DuckDBPyConnection, path: Path, opts: SourceOptions, scratch: Path
    ) -> LoadedSource:
        columns = [
            Column("user", "BIGINT"),
            Column("item", "BIGINT"),
            Column("category", "BIGINT"),
            Column("behavior", "ENUM", TAOBAO_BEHAVIORS),
            Column("ts", "BIGINT", expect="an integer unix timestamp"),
        ]
        report = read_delimited(
            con,
            path,
            columns,
            "taobao_raw",
            delimiter=opts.delimiter or ",",
            header=opts.header == "yes",
            # an empty field would otherwise become a NULL user/item/time or behaviour type
            checks=(
                not_null("user", "an integer"),
                not_null("item", "an integer"),
                not_null("behavior", "one of " + ", ".join(TAOBAO_BEHAVIORS)),
                not_null("ts", "an integer unix timestamp"),
                ts_in_range(),
            ),
            on_bad_rows=opts.on_bad_rows,
            scratch=scratch,
        )
        con.execute(
            """CREATE OR REPLACE TABLE behaviors AS
               SELECT ord, user, item, category, CAST(behavior AS VARCHAR) AS behavior, ts
               FROM taobao_raw"""
        )
        con.execute("DROP TABLE taobao_raw")
        fields = [FieldDecl("item"), FieldDecl("category"), FieldDecl("behavior", side="event")]
        return LoadedSource("behaviors", fields, report, inputs=[str(path)])
