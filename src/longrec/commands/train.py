"""`longrec train`, `longrec eval`, `longrec models`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer

TRAIN_HELP = """Train a model on a prepared dataset.

The run directory gets config.yaml, model.safetensors, state.pt, metrics.json and log.jsonl.

Example:

    longrec train --data data/taobao --model dare --out runs/dare \\
        --set train.epochs=2 --set model.embed_dim=16 --set data.max_len=200
"""


def register(app: typer.Typer) -> None:
    app.command("train", help=TRAIN_HELP)(train_command)
    app.command(
        "eval",
        help="Evaluate a trained run on a split.\n\nExample:  longrec eval --run runs/dare --split test",
    )(eval_command)
    app.command("models", help="List the registered models, one line each.")(models_command)


def train_command(
    data: Annotated[Path, typer.Option(help="prepared dataset directory")],
    out: Annotated[Path, typer.Option(help="run directory")],
    model: Annotated[
        str | None, typer.Option(help="registered model name (see `longrec models`)")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML config with data/model/train sections")
    ] = None,
    set: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. train.lr=0.001")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue an interrupted run from its state.pt")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="start over in an existing run directory")
    ] = False,
    nproc: Annotated[
        int, typer.Option(help="data-parallel processes (torchrun on this machine, gloo on CPU)")
    ] = 1,
) -> None:
    import os
    import sys

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from longrec.train.distributed import relaunch

        argv = sys.argv[1:]
        i = argv.index("--nproc") if "--nproc" in argv else None
        argv = (
            argv[:i] + argv[i + 2 :]
            if i is not None
            else [a for a in argv if not a.startswith("--nproc=")]
        )
        raise SystemExit(relaunch(nproc, argv))
    from longrec.config import resolve
    from longrec.data.dataset import PreparedDataset
    from longrec.errors import UserError
    from longrec.outputs import check_replaceable, retire_dir, writer_lock
    from longrec.report.runs import metrics_table
    from longrec.train import run_dir as rd
    from longrec.train.loop import Trainer
    from longrec.train.optim import dense_update_hint
    from longrec.train.resume import resume_config

    rank = int(os.environ.get("RANK", 0))
    if resume and overwrite:
        raise UserError("pass either --resume (continue the run) or --overwrite (start over)")
    if rank == 0:
        check_replaceable(
            out,
            "run",
            resume or overwrite,
            "pass --resume to continue it or --overwrite to start over",
        )
    with writer_lock(out) if rank == 0 else contextlib.nullcontext():
        existing = check_replaceable(out, "run", resume or overwrite) if rank == 0 else True
        if existing and resume and (out / rd.CONFIG).exists():
            stored, schema = rd.read_config(out)
            PreparedDataset(data).check_belongs(schema.fingerprint, schema.fields, str(out))
            cfg, changed = resume_config(
                stored, config, set or [], data__path=str(data), model__name=model
            )
            if changed and rank == 0:
                rd.append_log(out, {"resume_changes": {k: list(v) for k, v in changed.items()}})
        else:
            cfg = resolve(config, set or [], data__path=str(data), model__name=model)
        if rank == 0 and existing and overwrite:
            retire_dir(out)  # nothing of the old run may sit beside the new one
        trainer = Trainer(cfg, out)
        hint = dense_update_hint(trainer.model, cfg.train)
        if hint and rank == 0:
            print(hint, file=sys.stderr)
        metrics = trainer.fit(resume=resume)
    if metrics:  # rank 0 of a data-parallel run, or a single process
        print(metrics_table({cfg.model.name: metrics}))


def eval_command(
    run: Annotated[Path, typer.Option(help="run directory")],
    split: Annotated[str, typer.Option(help="valid | test | train")] = "test",
    data: Annotated[Path | None, typer.Option(help="evaluate on another prepared dataset")] = None,
    max_len: Annotated[
        int | None, typer.Option(help="history length at evaluation (e.g. train 1K, serve 10K)")
    ] = None,
    retrieval: Annotated[bool, typer.Option(help="also NDCG@k of the search stage")] = False,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: the GPU if there is one)")
    ] = "auto",
    kernels: Annotated[
        str | None,
        typer.Option(help="auto | reference | native (default: the run's train.kernels)"),
    ] = None,
) -> None:
    import sys

    from longrec.data.dataset import PreparedDataset
    from longrec.errors import UserError
    from longrec.ops import dispatch
    from longrec.runtime import resolve_device
    from longrec.train.evaluate import evaluate_split, model_runtime
    from longrec.train.run_dir import load_run

    if max_len is not None and max_len < 1:
        raise UserError(f"--max-len {max_len} must be at least 1")
    if kernels is not None:
        dispatch.check_kernels(kernels, "--kernels")
    where = resolve_device(device, "--device")
    model, cfg, schema = load_run(run, device=where)
    if data is not None:
        cfg.data.path = str(data)
    if max_len is not None:
        cfg.data.max_len = max_len
    name = "train.kernels" if kernels is None else "--kernels"
    setting = cfg.train.kernels if kernels is None else kernels
    dispatch.set_kernels(dispatch.for_run(setting, cfg.model.params, name))
    dataset = PreparedDataset(cfg.data.path)
    dataset.check_belongs(schema.fingerprint, schema.fields, str(run))
    cap = model.history_cap()
    if max_len is not None and cap is not None and max_len > cap:
        print(
            f"note: {cfg.model.name} reads at most its {cap:,} most recent behaviours (fixed when "
            f"it was built); --max-len {max_len:,} gives it no more",
            file=sys.stderr,
        )
    rt = model_runtime(model, cfg)
    metrics = evaluate_split(model, dataset, split, cfg, rt)
    out = {"run": str(run), "split": split, "max_len": cfg.data.max_len, **metrics}
    out.update(device=str(rt.device), precision=rt.precision)
    if retrieval:
        from longrec.train.retrieval import retrieval_ndcg

        out["retrieval"] = retrieval_ndcg(model, dataset, split, cfg)
    print(json.dumps(out, indent=2))


def models_command() -> None:
    from longrec.models import describe_models

    for name, description in describe_models():
        print(f"{name:16s} {description}")
