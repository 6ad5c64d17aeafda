"""`longrec ablate`: the Tencent stack, one component at a time."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

HELP = """Add the Tencent-stack components one at a time and tabulate test AUC (mean ± std).

Steps: TIN over the most recent K behaviours; + hierarchical hard search; + decoupled soft
search (union); + DSI-TIN; + target-decoupled PE; + a head per target type (= `tencent`);
and the composed model with Stacked TIN instead of DSI-TIN.

Example:

    longrec ablate --data data/synth --seeds 3 --out results/ablation
"""


def register(app: typer.Typer) -> None:
    app.command("ablate", help=HELP)(ablate_command)


def ablate_command(
    data: Annotated[Path, typer.Option(help="prepared dataset (multi-domain, target types)")],
    out: Annotated[Path, typer.Option(help="results directory")],
    seeds: Annotated[int, typer.Option(help="seeds per step")] = 3,
    config: Annotated[Path | None, typer.Option(help="YAML config applied to every run")] = None,
    set: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. train.epochs=1")
    ] = None,
) -> None:
    from longrec.config import resolve
    from longrec.report.compare import auc_plot, compare_table
    from longrec.train.ablation import ALTERNATIVES, TENCENT_STEPS
    from longrec.train.compare import run_compare

    base = resolve(config, set or [], data__path=str(data))
    records = run_compare(
        base,
        TENCENT_STEPS + ALTERNATIVES,
        list(range(1, seeds + 1)),
        out,
        log=lambda m: print(m, file=sys.stderr),
    )
    table = compare_table(
        records, title=f"Tencent-stack ablation on {data} ({seeds} seeds)", ranked=False
    )
    (out / "table.md").write_text(table + "\n")
    auc_plot(records, out / "auc.png", title="ablation")
    print(table)
