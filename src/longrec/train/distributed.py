"""Data-parallel training across processes (torchrun / torch.distributed): gloo on CPU, NCCL
on GPU. Every process trains on its shard of the requests (the loader splits by rank), DDP
averages gradients, and rank 0 alone validates, checkpoints and writes the run directory.

    torchrun --standalone --nproc_per_node 2 -m longrec train --data D --model dare --out RUN
    longrec train --nproc 2 --data D --model dare --out RUN      # the same, launched for you
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init() -> bool:
    """Join the process group when started by torchrun with more than one process."""
    _, size = world()
    if size <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj):
    """Rank 0's value of a picklable object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class TrainStep(nn.Module):
    """Lets DDP wrap `forward_train` (DDP synchronises through `forward`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.forward_train(batch)


def wrap(model: nn.Module) -> nn.Module:
    """The module to call for a training step: DDP around forward_train in a process group."""
    if not dist.is_initialized():
        return TrainStep(model)
    return nn.parallel.DistributedDataParallel(TrainStep(model), find_unused_parameters=True)


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m longrec ARGV` under torch.distributed.run with `nproc` local processes."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "longrec",
        *argv,
    ]
    return subprocess.call(cmd, env=env)
