"""`longrec bench ...`: the benchmark suite; each writes benchmarks/results/<name>.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(
    help="Benchmarks: all (the whole suite), data, train, search, scaling, serve (each writes a JSON result).",
    no_args_is_help=True,
)
RESULTS = Path("benchmarks/results")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


def _emit(name: str, result: dict, out: Path) -> None:
    from longrec.bench.common import write_result

    path = write_result(out, name, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


@bench_app.command(
    "data",
    help="Prepare wall time / peak RSS, and loader samples/s by history length.\n\nExample:  longrec bench data --raw /tmp/synth100m --source synth --loader-data data/synth-long",
)
def bench_data_command(
    raw: Annotated[
        Path | None, typer.Option(help="raw input to prepare (file or synth folder)")
    ] = None,
    source: Annotated[str, typer.Option(help="source of --raw")] = "taobao",
    prepared: Annotated[Path, typer.Option(help="where the prepared dataset goes")] = Path(
        ".cache/bench/prepared"
    ),
    prepare_args: Annotated[
        str, typer.Option(help="extra prepare arguments")
    ] = "--protocol dare --behaviors pv",
    loader_data: Annotated[
        Path | None, typer.Option(help="prepared dataset for the loader benchmark")
    ] = None,
    lengths: Annotated[str, typer.Option(help="history lengths")] = "200,1000,10000",
    batch_size: Annotated[int, typer.Option(help="loader batch size")] = 256,
    out: Annotated[Path, typer.Option(help="results directory")] = RESULTS,
) -> None:
    from longrec.bench.data import bench_loader, bench_prepare

    result: dict = {}
    if raw is not None:
        result["prepare"] = bench_prepare(source, raw, prepared, prepare_args.split())
    if loader_data is not None:
        result["loader"] = bench_loader(
            loader_data, [int(x) for x in lengths.split(",")], batch_size=batch_size
        )
    _emit("data", result, out)


@bench_app.command(
    "train",
    help="Time training and inference steps of one model.\n\nExample:  longrec bench train --data data/taobao --model dare --max-len 200 --steps 20 --out bench.json",
)
def bench_train_command(
    data: Annotated[Path, typer.Option(help="prepared dataset")],
    model: Annotated[str, typer.Option(help="model name")] = "dare",
    max_len: Annotated[int, typer.Option(help="history length")] = 200,
    steps: Annotated[int, typer.Option(help="timed steps")] = 20,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 2048,
    layout: Annotated[str, typer.Option(help="pointwise | request")] = "pointwise",
    set: Annotated[list[str] | None, typer.Option("--set", help="config override")] = None,
    out: Annotated[Path | None, typer.Option(help="JSON file to write")] = None,
    compare_layouts: Annotated[
        bool, typer.Option(help="request-level vs pointwise on the same samples (batch = requests)")
    ] = False,
    profile: Annotated[
        int, typer.Option(help="then profile this many training steps (top operators, GEMM FLOP/s)")
    ] = 0,
    trace: Annotated[
        Path | None, typer.Option(help="with --profile: write a Chrome trace here")
    ] = None,
) -> None:
    from longrec.bench.common import machine
    from longrec.bench.train import bench_layouts, bench_train

    if compare_layouts:
        result = bench_layouts(data, model, max_len, batch_size, steps, set or [])
    else:
        result = bench_train(
            data,
            model,
            max_len,
            steps,
            batch_size,
            layout,
            set or [],
            profile_steps=profile,
            trace=trace,
        )
    result["machine"] = machine()
    print(json.dumps(result, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


@bench_app.command(
    "search",
    help="Search cost by attention dim (ratio to 128); with --data, AUC and NDCG by dim for DARE and TWIN.\n\nExample:  longrec bench search --data data/synth",
)
def bench_search_command(
    data: Annotated[
        Path | None, typer.Option(help="synthetic prepared dataset for AUC/NDCG by dim")
    ] = None,
    dims: Annotated[str, typer.Option(help="attention dims")] = "128,64,32,16",
    set: Annotated[
        list[str] | None, typer.Option("--set", help="config override for the quality runs")
    ] = None,
    out: Annotated[Path, typer.Option(help="results directory")] = RESULTS,
) -> None:
    from longrec.bench.hier_search import bench_hier_search
    from longrec.bench.search import bench_search_dims, bench_search_quality

    dim_list = tuple(int(x) for x in dims.split(","))
    result: dict = {"cost": bench_search_dims(dim_list), "hierarchical": bench_hier_search()}
    if data is not None:
        result["quality"] = bench_search_quality(data, dim_list, overrides=set or [])
    _emit("search", result, out)


@bench_app.command(
    "scaling",
    help="Test AUC against history length (50 ... the full history) per model, mean ± std over "
    "seeds, with samples/s and peak RSS.\n\n"
    "Every (model, length, seed) trains in OUT/runs/<model>-L<length>-s<seed> (finished runs "
    "are reused); `full` is the dataset's longest history. Writes scaling.json, table.md (with "
    "the gain from the shortest to the longest length in stds) and scaling.png.\n\n"
    "Example:  longrec bench scaling --data data/synth-long --out benchmarks/results/scaling-synth "
    "--lengths 25,50,100,300,1000,full --seeds 3",
)
def bench_scaling_command(
    data: Annotated[Path, typer.Option(help="prepared dataset with long histories")],
    out: Annotated[
        Path, typer.Option(help="results directory (runs, scaling.json, table.md, scaling.png)")
    ],
    models: Annotated[str, typer.Option(help="models")] = "stca,longer,hstu,din,dare,twin_hard",
    lengths: Annotated[
        str, typer.Option(help="history lengths; `full` = the dataset's longest history")
    ] = "50,100,300,1000,full",
    seeds: Annotated[int, typer.Option(help="seeds per (model, length): 1..N")] = 3,
    set: Annotated[
        list[str] | None, typer.Option("--set", help="config override for every run")
    ] = None,
) -> None:
    import sys

    from longrec.bench.scaling import parse_lengths, run_scaling, scaling_plot, scaling_table
    from longrec.errors import UserError

    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise UserError("--models: give at least one model name")
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, not {seeds}")
    length_list = parse_lengths(lengths)
    _check_models(names)
    rows = run_scaling(
        data,
        out,
        names,
        length_list,
        set or [],
        log=lambda m: print(m, file=sys.stderr),
        seeds=seeds,
    )
    table = scaling_table(rows, f"AUC against history length on {data}")
    (out / "table.md").write_text(table + "\n")
    scaling_plot(rows, out / "scaling.png", str(data.name))
    print(table)


def _check_models(names: list[str]) -> None:
    """Unknown names fail before the first (long) run, not after it."""
    from longrec.errors import UserError
    from longrec.models.registry import MODELS, _load_all

    _load_all()
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise UserError(f"unknown model(s) {', '.join(unknown)}; `longrec models` lists them")


@bench_app.command(
    "serve",
    help="Latency p50/p99 and throughput of POST /v1/rank (models x history x candidates x clients, cold/warm cache).\n\nExample:  longrec bench serve --data data/synth-long --models dare,stacked_tin,stca,longer",
)
def bench_serve_command(
    data: Annotated[
        Path, typer.Option(help="prepared dataset with long histories (history source)")
    ],
    models: Annotated[str, typer.Option(help="models")] = "dare,stacked_tin,stca,longer",
    lengths: Annotated[str, typer.Option(help="history lengths")] = "1000,10000",
    candidates: Annotated[str, typer.Option(help="candidates per request")] = "100,500,1000",
    concurrency: Annotated[str, typer.Option(help="concurrent clients")] = "1,4,16",
    requests: Annotated[int, typer.Option(help="requests per configuration")] = 40,
    micro_batch: Annotated[
        str, typer.Option(help="micro-batch sizes to compare (1 = off)")
    ] = "1,8",
    work: Annotated[Path, typer.Option(help="where tiny runs and the history store go")] = Path(
        ".cache/bench/serve"
    ),
    out: Annotated[Path, typer.Option(help="results directory")] = RESULTS,
    device: Annotated[
        str, typer.Option(help="where the ranker scores: auto | cpu | cuda[:N]")
    ] = "auto",
) -> None:
    import sys

    from longrec.bench.serve import bench_serve, train_tiny_runs

    names = [m for m in models.split(",") if m]
    runs = train_tiny_runs(data, names, work / "runs")
    rows = bench_serve(
        runs,
        data,
        f"lmdb://{(work / 'history').resolve()}",
        [int(x) for x in lengths.split(",")],
        [int(x) for x in candidates.split(",")],
        [int(x) for x in concurrency.split(",")],
        requests,
        log=lambda r: print(r, file=sys.stderr),
        micro_batches=tuple(int(x) for x in micro_batch.split(",")),
        device=device,
    )
    _emit("serve", {"rows": rows}, out)


@bench_app.command(
    "all",
    help="The whole suite on a synthetic dataset it makes; one JSON per benchmark, and the "
    "generated section of BENCHMARKS.md.\n\n"
    "Makes (or reuses) a synthetic dataset with long histories under --work, then measures "
    "loader samples/s, train/infer samples/s per model and length (+ request vs pointwise "
    "layout), search cost, serving latency and short scaling runs (AUC by history length): "
    "data.json, train.json, search.json, serve.json and scaling.json (+ scaling.png) in --out. The text between the lines '<!-- bench all: begin -->' and "
    "'<!-- bench all: end -->' of --benchmarks-md is replaced by tables of them (the section "
    "is appended if the markers are missing). A failed benchmark records its error, the others "
    "still run, and the exit status is 1.\n\n"
    "Example:  longrec bench all --out benchmarks/results\n\n"
    "Quick check (tiny sizes, under a minute):  longrec bench all --quick --out /tmp/bench "
    "--benchmarks-md /tmp/BENCHMARKS.md",
)
def bench_all_command(
    out: Annotated[Path, typer.Option(help="results directory")] = RESULTS,
    work: Annotated[
        Path, typer.Option(help="where the synthetic dataset and the tiny runs go (reused)")
    ] = Path(".cache/bench/suite"),
    quick: Annotated[bool, typer.Option("--quick", help="tiny sizes (seconds; for tests)")] = False,
    benchmarks_md: Annotated[
        Path, typer.Option(help="markdown file whose generated section is replaced")
    ] = Path("BENCHMARKS.md"),
    serve: Annotated[bool, typer.Option(help="run the serving benchmark")] = True,
    scaling: Annotated[bool, typer.Option(help="run the short scaling runs")] = True,
) -> None:
    import sys

    from longrec.bench.suite import SuiteConfig, run_suite
    from longrec.bench.summary import render_summary, update_benchmarks_md

    cfg = SuiteConfig.quick() if quick else SuiteConfig()
    cfg.serve, cfg.scaling = serve, scaling
    command = " ".join(
        [
            f"longrec bench all --out {out} --work {work}",
            *(["--quick"] if quick else []),
            *([] if serve else ["--no-serve"]),
            *([] if scaling else ["--no-scaling"]),
            f"--benchmarks-md {benchmarks_md}",
        ]
    )
    failed = run_suite(
        cfg, out, work, log=lambda m: print(m, file=sys.stderr, flush=True), command=command
    )
    summary = render_summary(out)
    try:
        update_benchmarks_md(benchmarks_md, summary)
        print(summary)
        print(f"updated {benchmarks_md}")
    except (OSError, ValueError) as err:
        print(summary)
        print(f"bench all: could not update {benchmarks_md}: {err}", file=sys.stderr)
        failed.append(f"{benchmarks_md}")
    if failed:
        print(f"bench all: failed: {', '.join(failed)}", file=sys.stderr)
        raise typer.Exit(1)
