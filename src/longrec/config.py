"""Dataclass configs, YAML files and `--set a.b=c` overrides.

A run's configuration has three parts: `data` (which dataset, how batches are cut), `model`
(the registered model name and its own keyword arguments) and `train` (optimisation and
evaluation). The fully resolved config is written to RUN/config.yaml, enough to rerun.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longrec.errors import UserError


@dataclass
class DataConfig:
    path: str = ""  # prepared dataset directory
    max_len: int = 200  # most recent behaviours per history
    layout: str = "pointwise"  # "pointwise" | "request" (all targets of a request share a row)
    eval_batch_size: int = 4096
    prefetch: int | None = None  # batches built ahead in a thread; None: 2 given a spare core
    # length-extrapolative training (docs/models.md, "STCA"): per-request training lengths
    # ~ Beta on [train_min_len, max_len] with mean train_mean_len; evaluation always uses max_len
    train_lengths: str = "fixed"  # fixed | beta
    train_min_len: int = 8
    train_mean_len: int | None = None
    train_length_alpha: float = 0.5
    bucket: bool = False  # batches of similar history length (less padding)
    order: str = "shuffle"  # training order: shuffle | user_time (IAT's user-order source model)
    token_store: str | None = None  # IAT: instance tokens attached to every batch
    max_tokens: int = 256  # IAT: tokens per request (most recent before the request time)


@dataclass
class TrainConfig:
    epochs: int = 2
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    # rows of a batch: samples (pointwise) or requests (request layout), per process; None:
    # auto, from the train split's size (train/batch_size.py: ~300 steps, 32..2048)
    batch_size: int | None = None
    lr: float = 0.01
    optimizer: str = "adam"  # dense parameters: "adam" | "adamw" | "sgd"
    # "adam" (dense, as DARE) | "rowwise_adam" (lazy: touched rows only) | "rowwise_adagrad"
    # (one accumulator per row, touched rows only) | "sparse_adam" | "adagrad" | "sgd"
    embed_optimizer: str = "adam"
    # embed_optimizer=adam: tables looked up at distinct ids pass their gradients sparse to an
    # Adam that still updates every row (train/table_adam.py; same updates, no [V, d] gradient)
    sparse_table_grads: bool = True
    embed_lr: float | None = None  # default: lr
    l2: float = 1e-6  # DARE: explicit L2 penalty on non-bias, non-embedding weights
    weight_decay: float = 0.0  # decoupled weight decay (adamw) instead of / besides l2
    grad_clip: float | None = None  # global-norm clipping, sparse table grads included (TIN: 5)
    schedule: str = "constant"  # "constant" | "cosine" | "linear"
    warmup_steps: int = 0
    # auto | cpu | cuda | cuda:N; auto: the GPU when CUDA is available, else the CPU
    device: str = "auto"
    # auto | fp32 | bf16 (autocast); auto: bf16 where the hardware computes it natively (CUDA
    # sm80+; on CPUs with AMX / AVX-512 BF16 only once runtime.CPU_BF16_AUTO allows), else fp32.
    # The run's log.jsonl and its first stderr line say what auto chose (longrec/runtime.py)
    precision: str = "auto"
    compile: str = "none"  # "none" | "dense": torch.compile the dense stacks (train/compile.py)
    # auto | reference | native: the C++ kernels where they apply, plain PyTorch everywhere, or
    # the C++ kernels with an error where they cannot run (longrec/ops/dispatch.py); the same
    # results to float rounding. Supersedes model.params.fused_kernels
    kernels: str = "auto"
    loss_reduction: str = "mean"  # "mean" over targets | "per_user": mean per request, then mean
    eval_every: int = 150  # validate every N steps (DARE: 150)
    select_by: str = "auc"  # "auc" | "gauc": best checkpoint by this validation metric
    early_stop_patience: int | None = None  # evaluations without improvement before stopping
    seed: int = 1
    deterministic: bool = True  # deterministic kernels: a seeded CPU run is exactly repeatable
    threads: int | None = None  # torch intra-op threads (default: all cores)
    log_every: int = 50
    progress: bool = True
    # sharded embedding tables (TorchRec, docs/distributed.md): needs >= 2 processes
    shard_embeddings: bool = False
    shard_min_rows: int = 100_000  # shard every table with at least this many rows...
    shard_tables: list[str] | None = None  # ...or these (module paths or field names: item)
    shard_optimizer: str | None = None  # fused: sgd | adagrad | rowwise_adagrad (| adam on CUDA)
    shard_plan: str = "greedy"  # greedy (largest table to least-loaded rank) | planner


@dataclass
class ModelConfig:
    name: str = "dare"
    params: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the model


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        unknown = set(d) - {"data", "model", "train"}
        if unknown:
            raise UserError(f"config: unknown section(s) {', '.join(sorted(unknown))}")
        return cls(
            data=_build(DataConfig, d.get("data", {}), "data"),
            model=_build(ModelConfig, d.get("model", {}), "model"),
            train=_build(TrainConfig, _legacy_bf16(d.get("train", {})), "train"),
        )


def _legacy_bf16(values: dict) -> dict:
    """`train.bf16: true/false` (run configs written before train.precision) as the precision
    it meant, so that such runs still load, resume and compare."""
    if not isinstance(values, dict) or "bf16" not in values:
        return values
    values = dict(values)
    flag = values.pop("bf16")
    if not isinstance(flag, bool):
        raise UserError(
            f"config: train.bf16 = {flag!r} is not a bool (train.precision replaces it)"
        )
    meant = "bf16" if flag else "fp32"
    if values.get("precision", "auto") not in ("auto", meant):
        raise UserError(
            f"config: train.bf16 = {flag} contradicts train.precision = {values['precision']!r}"
        )
    values["precision"] = meant
    return values


def _build(kind, values: dict, section: str):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise UserError(
            f"config: unknown key(s) {', '.join(f'{section}.{k}' for k in sorted(unknown))}; "
            f"known: {', '.join(sorted(names))}"
        )
    return kind(**values)


def load_config(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with data/model/train sections")
    return data


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """`train.lr=0.001`, `model.params.attn_dim=32`, `model.embed_dim=16` (a model parameter)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got '{item}'")
        path = key.strip().split(".")
        if path[0] == "model" and len(path) == 2 and path[1] not in ("name", "params"):
            path = ["model", "params", path[1]]  # model.embed_dim is shorthand for a model param
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{part}' is not a section")
        node[path[-1]] = yaml.safe_load(raw)
    return config


def resolve(config_file: str | Path | None, overrides: list[str], **direct: Any) -> RunConfig:
    """Defaults < config file < explicit options (data path, model name) < --set overrides."""
    raw = load_config(config_file)
    for dotted, value in direct.items():
        if value is not None:
            apply_overrides(raw, [f"{dotted.replace('__', '.')}={yaml.safe_dump(value).strip()}"])
    apply_overrides(raw, overrides)
    return build_config(raw)


def build_config(raw: dict) -> RunConfig:
    """A RunConfig from a full config dict, every field's type and range checked."""
    from longrec.ops.dispatch import check_kernels
    from longrec.runtime import check_device, check_precision

    cfg = RunConfig.from_dict(raw)
    _check_types(cfg)
    _check_ranges(cfg)
    check_device(cfg.train.device, "config: train.device")
    check_precision(cfg.train.precision, "config: train.precision")
    check_kernels(cfg.train.kernels, "config: train.kernels")
    return cfg


# (section.field, smallest allowed value); None values mean "default / off" and pass
_AT_LEAST = {
    "data.max_len": 1,
    "data.eval_batch_size": 1,
    "data.prefetch": 0,
    "data.train_min_len": 1,
    "data.train_mean_len": 1,
    "data.max_tokens": 1,
    "train.epochs": 1,
    "train.max_steps": 1,
    "train.batch_size": 1,
    "train.eval_every": 1,
    "train.log_every": 1,
    "train.threads": 1,
    "train.warmup_steps": 0,
    "train.early_stop_patience": 1,
    "train.shard_min_rows": 1,
    "train.l2": 0,
    "train.weight_decay": 0,
}
_POSITIVE = ("train.lr", "train.embed_lr", "train.grad_clip", "data.train_length_alpha")


def _check_ranges(cfg: RunConfig) -> None:
    """One line for the first value no run could use (a zero batch, a NaN learning rate...)."""
    for name, low in _AT_LEAST.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None and not value >= low:  # `not >=` also catches NaN
            raise UserError(f"config: {name} = {value!r} must be at least {low}")
    for name in _POSITIVE:
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"config: {name} = {value!r} must be a positive finite number")


def _check_types(cfg: RunConfig) -> None:
    for section in ("data", "train"):
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not _matches(value, hints[f.name]):
                raise UserError(f"config: {section}.{f.name} = {value!r} is not a {hints[f.name]}")


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True
