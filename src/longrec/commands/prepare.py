"""`longrec prepare`: a raw log becomes a prepared dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

HELP = """Prepare a dataset: vocabularies, the sequence store and samples by protocol.

Example (DARE's Taobao protocol on the bundled sample, which ends with a truncated line):

    longrec prepare taobao --input examples/data/taobao/UserBehavior_head.csv \\
        --out data/taobao --protocol dare --behaviors pv --min-len 50 --on-bad-rows skip

SOURCE is one of: taobao, tmall, movielens, csv, parquet, synth.
"""


def register(app: typer.Typer) -> None:
    app.command("prepare", help=HELP)(prepare_command)


def prepare_command(
    source: Annotated[
        str, typer.Argument(help="taobao | tmall | movielens | csv | parquet | synth")
    ],
    input: Annotated[Path, typer.Option("--input", "-i", help="raw file or folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output dataset directory")],
    protocol: Annotated[
        str, typer.Option(help="dare | leave_one_out | time_split | impressions")
    ] = "dare",
    on_bad_rows: Annotated[
        str, typer.Option(help="error: stop at the first bad row; skip: drop and count")
    ] = "error",
    behaviors: Annotated[
        str | None, typer.Option(help="keep only these behaviour types, e.g. pv")
    ] = None,
    duplicates: Annotated[
        str, typer.Option(help="rows identical in every field: keep (counted) | drop")
    ] = "keep",
    columns: Annotated[
        str | None, typer.Option(help="csv/parquet column map: user=uid,item=iid,ts=time,...")
    ] = None,
    delimiter: Annotated[
        str | None, typer.Option(help="field delimiter (default , or tab for .tsv)")
    ] = None,
    header: Annotated[str, typer.Option(help="auto | yes | no")] = "auto",
    year: Annotated[int, typer.Option(help="tmall: the year of the mmdd time_stamp")] = 2015,
    taxonomy: Annotated[
        Path | None, typer.Option(help="CSV leaf,...,l1 giving category paths")
    ] = None,
    category_map: Annotated[
        Path | None, typer.Option(help="CSV domain,raw_category,leaf unifying categories")
    ] = None,
    min_len: Annotated[
        int, typer.Option(help="dare: users with at least this many behaviours")
    ] = 210,
    max_len: Annotated[int, typer.Option(help="default history length for training")] = 200,
    train_targets: Annotated[int, typer.Option(help="dare: train positives per user")] = 19,
    train_stride: Annotated[int, typer.Option(help="dare: gap between train positives")] = 5,
    train_offset: Annotated[int, typer.Option(help="dare: newest train target is T - offset")] = 2,
    negatives: Annotated[
        int | None, typer.Option(help="negatives per positive (dare 2, else 1)")
    ] = None,
    neg_sampling: Annotated[str | None, typer.Option(help="popularity | uniform")] = None,
    min_history: Annotated[int, typer.Option(help="drop targets with a shorter history")] = 1,
    valid_quantile: Annotated[
        float, typer.Option(help="time_split/impressions: valid cut quantile")
    ] = 0.8,
    test_quantile: Annotated[
        float, typer.Option(help="time_split/impressions: test cut quantile")
    ] = 0.9,
    valid_cut: Annotated[int | None, typer.Option(help="explicit valid cut (unix seconds)")] = None,
    test_cut: Annotated[int | None, typer.Option(help="explicit test cut (unix seconds)")] = None,
    train_fraction: Annotated[
        float, typer.Option(help="time_split: subsample train targets")
    ] = 1.0,
    min_count: Annotated[int, typer.Option(help="rarer item-side values map to 'unseen'")] = 1,
    seed: Annotated[int, typer.Option(help="seed of negative sampling and subsampling")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    memory_limit: Annotated[str, typer.Option(help="DuckDB memory budget")] = "4GB",
    threads: Annotated[int | None, typer.Option(help="DuckDB threads (default: all cores)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress lines")] = False,
) -> None:
    from longrec.data.prepare import PrepareConfig, prepare
    from longrec.data.protocols import ProtocolConfig
    from longrec.data.sources import SourceOptions, parse_column_map
    from longrec.errors import UserError
    from longrec.report.dataset import dataset_table

    if on_bad_rows not in ("error", "skip"):
        raise UserError(f"--on-bad-rows must be error or skip, got '{on_bad_rows}'")
    if header not in ("auto", "yes", "no"):
        raise UserError(f"--header must be auto, yes or no, got '{header}'")
    if delimiter == "\\t":  # typed as --delimiter '\t' in a shell
        delimiter = "\t"
    if delimiter == "":
        raise UserError("--delimiter must not be empty")
    cfg = PrepareConfig(
        source=source,
        input=input,
        out=out,
        protocol=ProtocolConfig(
            name=protocol,
            min_len=min_len,
            max_len=max_len,
            train_targets=train_targets,
            train_stride=train_stride,
            train_offset=train_offset,
            negatives=negatives,
            neg_sampling=neg_sampling,
            min_history=min_history,
            valid_quantile=valid_quantile,
            test_quantile=test_quantile,
            valid_cut_ts=valid_cut,
            test_cut_ts=test_cut,
            train_fraction=train_fraction,
            seed=seed,
        ),
        source_options=SourceOptions(
            on_bad_rows=on_bad_rows,
            columns=parse_column_map(columns),
            delimiter=delimiter,
            header=header,
            year=year,
            taxonomy=taxonomy,
            category_map=category_map,
        ),
        behaviors=tuple(b.strip() for b in behaviors.split(",") if b.strip())
        if behaviors
        else None,
        min_count=min_count,
        duplicates=duplicates,
        overwrite=overwrite,
        memory_limit=memory_limit,
        threads=threads,
        quiet=quiet,
    )
    meta = prepare(cfg)
    print(dataset_table(meta, title=str(out)))
