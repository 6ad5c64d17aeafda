"""Run every (model, seed) on one dataset under one config; resumable.

Each pair trains in RESULTS/runs/<model>-seed<seed>; a pair whose metrics.json exists is not
rerun, and an interrupted pair resumes from its checkpoint. Results are rewritten after every
pair, so a partial comparison is always readable.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from longrec.config import RunConfig
from longrec.errors import UserError
from longrec.outputs import retire_dir
from longrec.train import run_dir as rd
from longrec.train.loop import Trainer
from longrec.train.resume import describe, differences


def pair_dir(out: Path, model: str, seed: int) -> Path:
    return out / "runs" / f"{model}-seed{seed}"


def records_of(model: str, seed: int, metrics: dict) -> list[dict]:
    speed = metrics["train"]["samples_per_s"]
    return [
        {
            "model": model,
            "seed": seed,
            "split": split,
            "auc": metrics[split].get("auc"),
            "gauc": metrics[split].get("gauc"),
            "logloss": metrics[split].get("logloss"),
            "train_samples_per_s": speed,
        }
        for split in ("valid", "test")
        if metrics.get(split)
    ]


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a label, a registered model and parameters on top of the base."""

    label: str
    model: str
    params: dict = field(default_factory=dict)


def run_compare(
    base: RunConfig,
    models: list[str | Variant],
    seeds: list[int],
    out: Path,
    log=print,
    retrain_changed: bool = False,
) -> list[dict]:
    """Train (or reuse) every (model, seed) run under `out`. A run trained with other settings
    is refused, or with `retrain_changed` (longrec's own demo folder) trained again."""
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    variants = [m if isinstance(m, Variant) else Variant(m, m) for m in models]
    for v in variants:
        for seed in seeds:
            run = pair_dir(
                out, "".join(c if c.isalnum() or c in "-_" else "_" for c in v.label), seed
            )
            cfg = copy.deepcopy(base)
            cfg.model.name, cfg.train.seed = v.model, seed
            cfg.model.params = {**cfg.model.params, **v.params}
            if (run / rd.CONFIG).exists():
                refused, _ = differences(rd.read_config(run)[0], cfg)
                if refused and retrain_changed:
                    log(f"{v.label} seed {seed}: settings changed ({describe(refused)}), again")
                    retire_dir(run)
                elif refused:
                    raise UserError(
                        f"{run} holds a run with other settings ({describe(refused)}); "
                        "compare into another --out"
                    )
            if (run / rd.METRICS).exists():
                metrics = json.loads((run / rd.METRICS).read_text())
                log(f"{v.label} seed {seed}: done before, reusing {run}")
            else:
                log(f"{v.label} seed {seed}: training in {run}")
                metrics = Trainer(cfg, run).fit(resume=(run / rd.STATE).exists())
            records.extend(records_of(v.label, seed, metrics))
            _write_json(out / "results.json", records)
    return records


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
