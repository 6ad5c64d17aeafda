"""Optimisers: one for dense parameters, one for embedding tables; schedules; DARE's L2.

Sparse embedding optimisers (rowwise_adam, rowwise_adagrad, sparse_adam, adagrad, sgd) update
only the rows a batch touched, which is what makes 4M-item tables affordable; "adam" is dense,
as in DARE's code (train/table_adam.py: torch.optim.Adam that also takes the sparse gradients of
tables looked up at distinct ids). rowwise_adam (train/rowwise_adam.py) is SparseAdam's lazy Adam,
several times faster; rowwise_adagrad (train/rowwise_adagrad.py) keeps one accumulator per
row, for tables too large for Adam's moments to be cheap.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longrec.config import TrainConfig
from longrec.errors import UserError
from longrec.train.rowwise_adagrad import RowwiseAdagrad
from longrec.train.rowwise_adam import RowwiseAdam
from longrec.train.table_adam import TableAdam

SPARSE_EMBED_OPTIMIZERS = ("rowwise_adam", "rowwise_adagrad", "sparse_adam", "adagrad", "sgd")


def wants_sparse_embeddings(cfg: TrainConfig) -> bool:
    return cfg.embed_optimizer in SPARSE_EMBED_OPTIMIZERS


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    embed_ids = {id(p) for p in model.embedding_parameters()}
    embed = [p for p in model.parameters() if id(p) in embed_ids and p.requires_grad]
    dense = [p for p in model.parameters() if id(p) not in embed_ids and p.requires_grad]
    return dense, embed


def _fusable(params: list[nn.Parameter]) -> bool | None:
    """Adam's fused kernel: one pass per tensor instead of a dozen elementwise ops (7x faster
    on DARE's dense embedding tables). It needs floating-point CPU/CUDA tensors; None leaves
    PyTorch's default otherwise."""
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    dense, embed = split_parameters(model)
    opts: list[torch.optim.Optimizer] = []
    if dense:
        if cfg.optimizer == "adam":
            opts.append(torch.optim.Adam(dense, lr=cfg.lr, fused=_fusable(dense)))
        elif cfg.optimizer == "adamw":
            opts.append(
                torch.optim.AdamW(
                    dense, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=_fusable(dense)
                )
            )
        elif cfg.optimizer == "sgd":
            opts.append(torch.optim.SGD(dense, lr=cfg.lr, momentum=0.9))
        else:
            raise UserError(f"train.optimizer must be adam, adamw or sgd, got '{cfg.optimizer}'")
    if embed:
        lr = cfg.embed_lr if cfg.embed_lr is not None else cfg.lr
        kinds = {
            "adam": lambda: TableAdam(embed, lr=lr, fused=_fusable(embed)),
            "rowwise_adam": lambda: RowwiseAdam(embed, lr=lr),
            "rowwise_adagrad": lambda: RowwiseAdagrad(embed, lr=lr),
            "sparse_adam": lambda: torch.optim.SparseAdam(embed, lr=lr),
            "adagrad": lambda: torch.optim.Adagrad(embed, lr=lr),
            "sgd": lambda: torch.optim.SGD(embed, lr=lr),
        }
        if cfg.embed_optimizer not in kinds:
            raise UserError(
                f"train.embed_optimizer must be one of {', '.join(kinds)}, got '{cfg.embed_optimizer}'"
            )
        opts.append(kinds[cfg.embed_optimizer]())
    return opts


LARGE_TABLE_ROWS = 1_000_000


def dense_update_hint(model: nn.Module, cfg: TrainConfig) -> str | None:
    """A note for runs whose dense embedding optimiser updates every row of a large table each
    step: at 6.2M items DARE trained 2.5x faster with row-wise Adagrad (BENCHMARKS.md)."""
    if cfg.embed_optimizer != "adam":
        return None
    rows = max((p.shape[0] for p in model.embedding_parameters() if p.dim() == 2), default=0)
    if rows < LARGE_TABLE_ROWS:
        return None
    return (
        f"note: train.embed_optimizer=adam updates all {rows:,} rows of the largest table every"
        " step; train.embed_optimizer=rowwise_adagrad with train.embed_lr=0.1 updates only the"
        " rows a batch touches (for DARE at 6.2M items: 2.5x faster, the same test AUC;"
        " BENCHMARKS.md)"
    )


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Global-norm clipping over dense and sparse gradients alike (torch's clip_grad_norm_
    takes dense ones only): a table's sparse gradient counts with its coalesced rows, as its
    dense equivalent would."""
    grads = [p.grad for p in params if p.grad is not None]
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g for g in grads if g.is_sparse]
    norms = [g.coalesce()._values() for g in sparse]
    total = torch.nn.utils.get_total_norm(dense + norms)
    torch.nn.utils.clip_grads_with_norm_(
        [p for p in params if p.grad is not None and not p.grad.is_sparse], max_norm, total
    )
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in sparse:
        g.mul_(scale)
    return total


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1.0 - progress
    raise UserError(f"train.schedule must be constant, cosine or linear, got '{cfg.schedule}'")


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor


def l2_penalty(model: nn.Module, weight: float) -> torch.Tensor | None:
    """DARE: weight * sum ||W||^2 over non-bias, non-embedding weight matrices."""
    if weight <= 0:
        return None
    embed_ids = {id(p) for p in model.embedding_parameters()}
    mats = [
        p for p in model.parameters() if p.dim() > 1 and id(p) not in embed_ids and p.requires_grad
    ]
    if not mats:
        return None
    return weight * sum((p.float() ** 2).sum() for p in mats)
