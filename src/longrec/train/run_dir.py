"""The run directory (DESIGN.md): config.yaml, model.safetensors, state.pt, metrics.json, log.jsonl.

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
torn checkpoint. Weights are safetensors; state.pt holds only tensors and plain Python values,
so it loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from longrec.config import RunConfig
from longrec.errors import UserError
from longrec.faults import fault_point
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
    try:
        body = yaml.safe_load(path.read_text())
        schema = DataSchema.from_json(body.pop("schema"))
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a longrec run config ({type(e).__name__})") from None
    return RunConfig.from_dict(body), schema


def copy_atomic(src: Path, dst: Path) -> None:
    _atomic(dst, lambda p: shutil.copyfile(src, p))


def save_weights(model: torch.nn.Module, path: Path) -> None:
    _atomic(path, lambda p: save_model(model, str(p)))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        # straight onto the model's device (safetensors record none: any run's weights load)
        first = next(model.parameters(), None)
        device = str(first.device) if first is not None else "cpu"
        missing, unexpected = load_model(model, str(path), strict=True, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{path}: unreadable or foreign weights ({reason})") from None
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the model ({missing or unexpected})")


def save_state(run: Path, state: dict) -> None:
    _atomic(run / STATE, lambda p: torch.save(state, p))


def load_state(run: Path) -> dict:
    path = Path(run) / STATE
    try:
        # tensors of a run on a GPU load on the CPU: the optimisers move theirs to their params
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torn, truncated or foreign: the message names the file
        raise UserError(
            f"{path} is unreadable ({type(e).__name__}); the run cannot resume"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{path} is not a longrec training state; the run cannot resume")
    return state


def _last_name(step: int) -> str:
    return f"last-{step}.safetensors"


def save_checkpoint(run: Path, model: torch.nn.Module, state: dict) -> None:
    """The weights under a name of their own, then state.pt naming them, then older weights.

    state.pt is the one commit point: a kill before its rename leaves the previous state.pt,
    whose weights file is still there; a kill after leaves the new pair. Either resumes
    exactly (the loop is deterministic from a checkpoint).
    """
    run = Path(run)
    name = _last_name(state["step"])
    save_weights(model, run / name)
    fault_point("checkpoint-weights-written")
    save_state(run, {**state, "last_weights": name})
    fault_point("checkpoint-state-written")
    for old in run.glob("last*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(run: Path, model: torch.nn.Module) -> dict:
    """The saved loop state, with `model` holding the weights it names; UserError if torn."""
    run = Path(run)
    state = load_state(run)
    name = state.pop("last_weights", LAST)
    if not (run / name).exists():
        raise UserError(
            f"{run}: {STATE} names {name}, which is missing; the run cannot resume exactly "
            "(start over with --overwrite)"
        )
    load_weights(model, run / name)
    return state


def has_checkpoint(run: Path) -> bool:
    return (Path(run) / STATE).exists()


def write_metrics(run: Path, metrics: dict) -> None:
    _atomic(run / METRICS, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))


def append_log(run: Path, record: dict) -> None:
    with open(run / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def last_logged(run: Path, key: str):
    """The value of `key` in the last log.jsonl record that has it; None if none does."""
    path = Path(run) / LOG
    value = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            if isinstance(record, dict) and key in record:
                value = record[key]
    return value


def load_run(run: str | Path, weights: str = WEIGHTS, device: torch.device | str = "cpu"):
    """(model in eval mode on `device`, config, schema) of a finished run (weights saved on
    any device)."""
    run = Path(run)
    cfg, schema = read_config(run)
    model = build_model(cfg.model.name, schema, cfg.model.params)
    path = run / weights
    if not path.exists():
        raise UserError(f"{run}: no {weights} (did training finish?)")
    load_weights(model, path)
    model.to(device).eval()
    return model, cfg, schema
