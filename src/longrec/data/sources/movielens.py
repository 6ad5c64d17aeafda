"""GroupLens MovieLens: ml-latest(-small)/ml-20m (`ratings.csv` + `movies.csv`, with headers) and
ML-1M/10M (`ratings.dat` + `movies.dat`, `::`-separated, no header).

The rating is the behaviour type ("4.0"); the first genre is the category and the full genre
list a multi-valued field. `--input` is the dataset folder (or its ratings file). ML-1M's
movies.dat is Latin-1, as GroupLens documents; everything else is UTF-8.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from longrec.data.sources.base import FieldDecl, LoadedSource, Source, SourceOptions
from longrec.data.sources.delimited import Column, not_null, read_delimited, ts_in_range
from longrec.errors import DataError


def _locate(path: Path) -> tuple[Path, Path | None, str]:
    """(ratings file, movies file or None, "csv" | "dat")."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        for name in ("ratings.csv", "ratings.dat"):
            if (folder / name).exists():
                ratings = folder / name
                break
        else:
            raise DataError(path, "no ratings.csv or ratings.dat in this folder")
    else:
        ratings = path
    kind = "dat" if ratings.suffix == ".dat" else "csv"
    movies = folder / ("movies.dat" if kind == "dat" else "movies.csv")
    return ratings, (movies if movies.exists() else None), kind


class MovieLensSource(Source):
    name = "movielens"
    help = "MovieLens folder: ratings.csv+movies.csv (ml-latest, 20M) or ratings.dat+movies.dat (1M, 10M)"

    def load(
        self, con: duckdb.DuckDBPyConnection, path: Path, opts: SourceOptions, scratch: Path
    ) -> LoadedSource:
        ratings, movies, kind = _locate(Path(path))
        csv = kind == "csv"
        delim, quote = (",", '"') if csv else ("::", "")
        rating_cols = [
            Column("user", "BIGINT"),
            Column("item", "BIGINT"),
            Column("rating", "DOUBLE"),
            Column("ts", "BIGINT", expect="an integer unix timestamp"),
        ]
        report = read_delimited(
            con,
            ratings,
            rating_cols,
            "ml_ratings",
            delimiter=delim,
            quote=quote,
            header=csv,
            checks=(
                not_null("user"),
                not_null("item"),
                not_null("rating"),
                not_null("ts"),
                ts_in_range(),
            ),
            on_bad_rows=opts.on_bad_rows,
            scratch=scratch,
        )
        inputs = [str(ratings)]
        notes: dict = {"format": kind}
        if movies is not None:
            movie_cols = [
                Column("item", "BIGINT"),
                Column("title", "VARCHAR"),
                Column("genres", "VARCHAR"),
            ]
            movie_report = read_delimited(
                con,
                movies,
                movie_cols,
                "ml_movies",
                delimiter=delim,
                quote=quote,
                header=csv,
                encoding="utf-8" if csv else "latin-1",
                checks=(not_null("item"),),
                on_bad_rows=opts.on_bad_rows,
                scratch=scratch,
            )
            report.rows_read += movie_report.rows_read  # rows read from both input files
            report.skipped.update({f"movies:{k}": v for k, v in movie_report.skipped.items()})
            report.first_example.update(
                {f"movies:{k}": v for k, v in movie_report.first_example.items()}
            )
            inputs.append(str(movies))
            con.execute(
                """CREATE OR REPLACE TABLE behaviors AS
                   SELECT r.ord, r.user, r.item, r.ts, printf('%.1f', r.rating) AS behavior,
                          NULLIF(string_split(m.genres, '|')[1], '') AS category,
                          string_split(m.genres, '|') AS genres
                   FROM ml_ratings r
                   LEFT JOIN (SELECT item, any_value(genres) AS genres FROM ml_movies GROUP BY item) m
                   USING (item)"""
            )
            notes["ratings_without_movie"] = con.execute(
                "SELECT count(*) FROM behaviors WHERE genres IS NULL"
            ).fetchone()[0]
            fields = [FieldDecl("item"), FieldDecl("category"), FieldDecl("genres", multi=True)]
        else:
            con.execute(
                """CREATE OR REPLACE TABLE behaviors AS
                   SELECT ord, user, item, ts, printf('%.1f', rating) AS behavior FROM ml_ratings"""
            )
            notes["movies_file"] = "missing: no category or genres"
            fields = [FieldDecl("item")]
        fields.append(FieldDecl("behavior", side="event"))
        con.execute("DROP TABLE IF EXISTS ml_ratings; DROP TABLE IF EXISTS ml_movies")
        return LoadedSource("behaviors", fields, report, inputs=inputs, notes=notes)
