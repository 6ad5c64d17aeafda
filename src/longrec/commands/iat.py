"""`longrec iat ...`: IAT (Instance-As-Token) helpers; training itself is `longrec train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

iat_app = typer.Typer(
    help="IAT (Instance-As-Token): build instance-token stores (see docs/iat.md).",
    no_args_is_help=True,
)

TOKENS_HELP = """Write one instance token per sample to a token store.

Runs the trained IAT source model (Stage I: iat_source or iat_source_user) frozen over every sample of the given splits and stores its pre-SIT 64-d compressed vector with the sample's user, request time and label. Stage II reads the store with --set data.token_store=TOKENS; a request only ever sees tokens strictly earlier than its own time.

Example (the two-stage recipe):

    longrec train --data data/taobao --model iat_source_user \\
        --set data.order=user_time --out runs/iat-source

    longrec iat tokens --source-run runs/iat-source --out data/taobao-tokens

    longrec train --data data/taobao --model iat \\
        --set data.token_store=data/taobao-tokens --out runs/iat
"""


def register(app: typer.Typer) -> None:
    app.add_typer(iat_app, name="iat")


@iat_app.command("tokens", help=TOKENS_HELP)
def tokens_command(
    source_run: Annotated[Path, typer.Option(help="run directory of the Stage-I source model")],
    out: Annotated[Path, typer.Option(help="token store directory to write")],
    splits: Annotated[str, typer.Option(help="comma-separated splits")] = "train,valid,test",
    data: Annotated[
        Path | None, typer.Option(help="prepared dataset (default: the source run's)")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="requests per batch (default: data.eval_batch_size)")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 | float16 (half the disk)")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="replace an existing token store")] = False,
) -> None:
    from longrec.train.iat import build_tokens

    names = tuple(s.strip() for s in splits.split(",") if s.strip())
    meta = build_tokens(
        source_run,
        out,
        names,
        data=data,
        batch_size=batch_size,
        dtype=dtype,
        overwrite=overwrite,
        progress=True,
    )
    print(json.dumps(meta, indent=2))
