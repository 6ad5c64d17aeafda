"""The run directory (DESIGN.md): config.yaml, model.safetensors, state.pt, metrics.json, log.jsonl.

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
torn checkpoint. Weights are safetensors; state.pt holds only tensors and plain Python values,
so it loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from longrec.config import RunConfig
from longrec.errors import UserError
from longrec.models import build_model
from longrec.models.base import DataSchema

CONFIG, WEIGHTS, STATE, METRICS, LOG = (
    "config.yaml",
    "model.safetensors",
    "state.pt",
    "metrics.json",
    "log.jsonl",
)
LAST, BEST = "last.safetensors", "best.safetensors"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_config(run: Path, cfg: RunConfig, schema: DataSchema) -> None:
    body = cfg.to_dict()
    body["schema"] = schema.to_json()
    _atomic(run / CONFIG, lambda p: p.write_text(yaml.safe_dump(body, sort_keys=False)))


def read_config(run: Path) -> tuple[RunConfig, DataSchema]:
    path = Path(run) / CONFIG
    if not path.exists():
        raise UserError(f"{run} is not a run directory (no {CONFIG})")
    body = yaml.safe_load(path.read_text())
    schema = DataSchema.from_json(body.pop("schema"))
    return RunConfig.from_dict(body), schema


def save_weights(model: torch.nn.Module, path: Path) -> None:
    _atomic(path, lambda p: save_model(model, str(p)))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    missing, unexpected = load_model(model, str(path), strict=True)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the model ({missing or unexpected})")


def save_state(run: Path, state: dict) -> None:
    _atomic(run / STATE, lambda p: torch.save(state, p))


def load_state(run: Path) -> dict:
    return torch.load(Path(run) / STATE, weights_only=True)


def write_metrics(run: Path, metrics: dict) -> None:
    _atomic(run / METRICS, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))


def append_log(run: Path, record: dict) -> None:
    with open(run / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def load_run(run: str | Path, weights: str = WEIGHTS):
    """(model in eval mode, config, schema) of a finished run."""
    run = Path(run)
    cfg, schema = read_config(run)
    model = build_model(cfg.model.name, schema, cfg.model.params)
    path = run / weights
    if not path.exists():
        raise UserError(f"{run}: no {weights} (did training finish?)")
    load_weights(model, path)
    model.eval()
    return model, cfg, schema
