"""The `longrec` command line: one typer app; each command lives in `longrec.commands`.

Heavy imports (torch, duckdb) happen inside the commands so that `longrec --help` stays instant.
"""

from __future__ import annotations

import os
import sys

import typer

from longrec.commands import register_all
from longrec.errors import UserError

app = typer.Typer(
    name="longrec",
    help="Long user-behaviour sequence models: prepare data, train, compare, serve, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_all(app)


def main(argv: list[str] | None = None) -> None:
    """Run the app; user mistakes become one line on stderr and exit status 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same mistake: one line
            print(f"longrec: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("longrec: interrupted", file=sys.stderr)
        sys.exit(130)
