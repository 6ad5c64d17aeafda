"""`longrec serve`: the online ranker over HTTP; `longrec serve load-history`: fill a store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

serve_app = typer.Typer(
    help="Serve a trained run over HTTP (POST /v1/rank, /v1/events; GET /healthz, /metrics).\n\n"
    "Example:  longrec serve --run runs/dare --history lmdb://data/history --port 8000",
    invoke_without_command=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")


@serve_app.callback()
def serve_command(
    ctx: typer.Context,
    run: Annotated[Path | None, typer.Option(help="trained run directory")] = None,
    history: Annotated[str | None, typer.Option(help="lmdb://PATH or redis://HOST:PORT")] = None,
    create_history: Annotated[
        bool, typer.Option(help="start an empty history store if --history has none")
    ] = False,
    host: Annotated[
        str, typer.Option(help="bind address (127.0.0.1 unless you mean it)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    data: Annotated[Path | None, typer.Option(help="prepared dataset (default: the run's)")] = None,
    max_len: Annotated[int | None, typer.Option(help="history length at serving")] = None,
    max_candidates: Annotated[int, typer.Option(help="candidates per request")] = 1000,
    max_body_bytes: Annotated[int, typer.Option(help="request body limit")] = 1 << 20,
    cache_mb: Annotated[int, typer.Option(help="user-state cache bound")] = 512,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: the GPU if there is one)")
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(help="auto | fp32 | bf16 (bf16 kept only within tolerance of fp32)"),
    ] = "auto",
    bf16: Annotated[bool, typer.Option(help="the same as --precision bf16")] = False,
    kernels: Annotated[
        str,
        typer.Option(help="auto | reference | native: C++ kernels where they apply, or PyTorch"),
    ] = "auto",
    micro_batch: Annotated[
        int, typer.Option(help="concurrent requests run as one forward pass (1 = off)")
    ] = 8,
    micro_batch_wait_ms: Annotated[
        float, typer.Option(help="how long a forward waits for more requests")
    ] = 0.0,
    docs: Annotated[
        bool, typer.Option(help="serve /docs and /openapi.json (behind the token, if one is set)")
    ] = False,
    token_env: Annotated[
        str, typer.Option(help="env var holding an optional bearer token")
    ] = "LONGREC_TOKEN",
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from longrec.errors import UserError

    if run is None or history is None:
        raise UserError("longrec serve needs --run and --history (see longrec serve --help)")
    import uvicorn

    from longrec.ops.dispatch import check_kernels
    from longrec.runtime import check_precision, resolve_device
    from longrec.serve.app import create_app
    from longrec.serve.ranker import Ranker, RankerConfig

    if micro_batch < 1 or not micro_batch_wait_ms >= 0:
        raise UserError("--micro-batch must be >= 1 and --micro-batch-wait-ms >= 0")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (0..65535)")
    for name, value, low in (
        ("--max-candidates", max_candidates, 1),
        ("--max-body-bytes", max_body_bytes, 1),
        ("--cache-mb", cache_mb, 0),
        ("--max-len", max_len, 1),
    ):
        if value is not None and value < low:
            raise UserError(f"{name} {value} must be at least {low}")
    if bf16:
        if precision not in ("auto", "bf16"):
            raise UserError(f"--bf16 contradicts --precision {precision}")
        precision = "bf16"
    check_precision(precision, "--precision")
    resolve_device(device, "--device")
    check_kernels(kernels, "--kernels")
    config = RankerConfig(
        max_len=max_len,
        max_candidates=max_candidates,
        cache_bytes=cache_mb << 20,
        device=device,
        precision=precision,
        kernels=kernels,
        micro_batch=micro_batch,
        micro_batch_wait_ms=micro_batch_wait_ms,
    )
    ranker = Ranker.from_run(
        run, history=history, data=data, config=config, create_history=create_history
    )
    app = create_app(
        ranker,
        token=os.environ.get(token_env) or None,
        max_body_bytes=max_body_bytes,
        docs=docs,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


@serve_app.command(
    "load-history",
    help="Bulk-load a history store from a prepared dataset.\n\nExample:  longrec serve load-history --data data/taobao --history lmdb://data/history",
)
def load_history_command(
    data: Annotated[Path, typer.Option(help="prepared dataset")],
    history: Annotated[str, typer.Option(help="lmdb://PATH or redis://HOST:PORT")],
) -> None:
    from longrec.serve.load_history import load_history

    result = load_history(data, history)
    print(result)
