"""Data-parallel training across processes (torchrun / torch.distributed): gloo when
`train.device` is the CPU, NCCL when it is CUDA (each process on its LOCAL_RANK's GPU). Every process trains on its shard of the requests (the loader splits by rank), DDP
averages gradients, and rank 0 alone validates, checkpoints and writes the run directory.

    torchrun --standalone --nproc_per_node 2 -m longrec train --data D --model dare --out RUN
    longrec train --nproc 2 --data D --model dare --out RUN      # the same, launched for you
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device | None = None) -> bool:
    """Join the process group when started by torchrun with more than one process: NCCL for
    a CUDA `device` (made this process's current GPU), gloo for the CPU."""
    _, size = world()
    if size <= 1:
        return False
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # NCCL's collectives run on the current GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
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
    nccl = dist.get_backend() == "nccl"  # NCCL reduces GPU tensors only
    t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if nccl else "cpu")
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


def wrap(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """The module to call for a training step: DDP around forward_train in a process group
    (on a GPU, DDP's buckets live on `device`)."""
    if not dist.is_initialized():
        return TrainStep(model)
    ids = [device] if device is not None and device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        TrainStep(model), device_ids=ids, find_unused_parameters=True
    )


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m longrec ARGV` in `nproc` local processes (torch.distributed's elastic
    launcher, as `torchrun --standalone` does) and return their exit status.

    A failed process makes the launcher stop the others and raise `ChildFailedError` with a
    traceback of its own; the processes have already said what went wrong (a user mistake is
    one line from rank 0), so that becomes the exit status, not a second report."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "longrec", *argv)
    except ChildFailedError as failed:
        codes = [f.exitcode for f in failed.failures.values()]
        return next((c for c in codes if c > 0), 1)
    return 0
