"""What `--resume` may change: the run's stored config is the base, the command line may only
extend the schedule or change how the run is watched.

An exact resume replays the same steps from the last checkpoint, so anything that changes what
a step computes (model, its parameters, the data, the batch, the learning rate, the seed...)
would silently splice two different runs together. Such a difference is refused before
anything is touched, naming it; the allowed ones are applied and recorded in the run's log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from longrec.config import RunConfig, apply_overrides, build_config, load_config
from longrec.errors import UserError

# settings a resumed run may change: how long it runs and how it is watched, not what a step does
RESUMABLE = frozenset(
    {
        "train.epochs",
        "train.max_steps",
        "train.early_stop_patience",
        "train.threads",
        "train.device",  # where the steps run, not what they compute (a GPU run can end on CPU)
        "train.kernels",  # C++ or PyTorch ops: the same steps to float rounding
        "train.progress",
        "train.log_every",
        "data.prefetch",
        "data.eval_batch_size",
    }
)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if (isinstance(value, dict) and key != "params") or name == "model.params":
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def _same_path(a: Any, b: Any) -> bool:
    return os.path.realpath(str(a)) == os.path.realpath(str(b))


def differences(stored: RunConfig, new: RunConfig) -> tuple[dict, dict]:
    """(refused, allowed): {setting: (stored value, new value)} for each setting that differs."""
    old, now = _flat(stored.to_dict()), _flat(new.to_dict())
    refused, allowed = {}, {}
    for key in sorted(old.keys() | now.keys()):
        a, b = old.get(key), now.get(key)
        if a == b or (key == "data.path" and a and b and _same_path(a, b)):
            continue
        if key == "train.batch_size" and b is None:  # auto: resolved from the same data
            continue
        if key == "train.precision" and _same_precision(a, b, new.train.device):
            continue
        (allowed if key in RESUMABLE else refused)[key] = (a, b)
    return refused, allowed


def _same_precision(a: str, b: str, device: str) -> bool:
    """Whether `auto` and a set precision compute alike on this machine: a run configured
    before train.precision existed records fp32 (or bf16), the same settings today say auto."""
    if "auto" not in (a, b):
        return False
    from longrec.runtime import resolve_device, resolve_precision

    try:
        where = resolve_device(device)
        return resolve_precision(a, where)[0] == resolve_precision(b, where)[0]
    except UserError:  # not possible here: a difference, named as such
        return False


def describe(refused: dict) -> str:
    shown = [f"{k}: run {a!r}, now {b!r}" for k, (a, b) in list(refused.items())[:3]]
    more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
    return "; ".join(shown) + more


def resume_config(
    stored: RunConfig, config_file: str | Path | None, overrides: list[str], **direct: Any
) -> tuple[RunConfig, dict]:
    """The config to resume with: the stored one, then the --config file's own settings, the
    explicit options and the --set overrides. UserError naming what may not change."""
    raw = stored.to_dict()
    if config_file is not None:
        for section, values in load_config(config_file).items():
            if isinstance(values, dict):
                for key, value in values.items():
                    if section == "model" and key == "params" and isinstance(value, dict):
                        raw["model"]["params"] = {**raw["model"]["params"], **value}
                    else:
                        raw.setdefault(section, {})[key] = value
    for dotted, value in direct.items():
        if value is not None:
            apply_overrides(raw, [f"{dotted.replace('__', '.')}={yaml.safe_dump(value).strip()}"])
    apply_overrides(raw, overrides)
    new = build_config(raw)
    refused, allowed = differences(stored, new)
    if refused:
        raise UserError(
            f"--resume keeps the run's settings, but the command line changes {describe(refused)}; "
            "only " + ", ".join(sorted(RESUMABLE)) + " may change: start a new run "
            "(another --out) or start over with --overwrite"
        )
    return new, allowed
