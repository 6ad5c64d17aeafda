"""`longrec compare`: every model x seed on one dataset, a mean ± std table and a plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

HELP = """Train and evaluate several models over several seeds under one config.

Writes RESULTS/results.json (one record per model, seed and split), RESULTS/table.md
(mean ± std) and RESULTS/auc.png. Finished (model, seed) pairs are not rerun.

Example:

    longrec compare --data data/taobao --models din,twin,dare --seeds 5 --out results/taobao
"""


def register(app: typer.Typer) -> None:
    app.command("compare", help=HELP)(compare_command)


def compare_command(
    data: Annotated[Path, typer.Option(help="prepared dataset directory")],
    models: Annotated[str, typer.Option(help="comma-separated model names")],
    out: Annotated[Path, typer.Option(help="results directory")],
    seeds: Annotated[int, typer.Option(help="number of seeds (1..N, as DARE's 1..5)")] = 3,
    config: Annotated[Path | None, typer.Option(help="YAML config applied to every run")] = None,
    set: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. train.epochs=1")
    ] = None,
) -> None:
    from longrec.config import resolve
    from longrec.errors import UserError
    from longrec.report.compare import auc_plot, compare_table
    from longrec.train.compare import run_compare

    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise UserError("--models: give at least one model name")
    if seeds < 1:
        raise UserError("--seeds must be >= 1")
    base = resolve(config, set or [], data__path=str(data))
    from longrec.models.registry import MODELS, _load_all

    _load_all()
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise UserError(f"unknown model(s) {', '.join(unknown)}; `longrec models` lists them")
    records = run_compare(
        base, names, list(range(1, seeds + 1)), out, log=lambda m: print(m, file=sys.stderr)
    )
    table = compare_table(records, title=f"{data} ({seeds} seeds)")
    (out / "table.md").write_text(table + "\n")
    auc_plot(records, out / "auc.png", title=str(data))
    print(table)
