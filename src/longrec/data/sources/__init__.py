"""One reader per raw format; each produces the canonical behaviour table (see base.py)."""

from __future__ import annotations

from longrec.data.sources.base import FieldDecl, LoadedSource, Source, SourceOptions
from longrec.data.sources.movielens import MovieLensSource
from longrec.data.sources.synth import SynthSource
from longrec.data.sources.tabular import CsvSource, ParquetSource, parse_column_map
from longrec.data.sources.taobao import TaobaoSource
from longrec.data.sources.tmall import TmallSource
from longrec.errors import UserError

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        TaobaoSource(),
        TmallSource(),
        MovieLensSource(),
        CsvSource(),
        ParquetSource(),
        SynthSource(),
    )
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise UserError(f"unknown source '{name}'; choose one of {', '.join(SOURCES)}") from None


__all__ = [
    "SOURCES",
    "FieldDecl",
    "LoadedSource",
    "Source",
    "SourceOptions",
    "get_source",
    "parse_column_map",
]
