"""The batch every model consumes (DESIGN.md, "The batch").

Pointwise data is the M = 1 case of the request layout, so request-level training is not a
second code path: a batch holds B requests, each with up to M targets sharing one history.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Batch:
    user: Tensor  # [B] int64
    history: dict[str, Tensor]  # field -> [B, L] (or [B, L, W] multi-valued), left-padded
    history_mask: Tensor  # [B, L] bool, True = real behaviour
    history_ts: Tensor  # [B, L] int64, 0 on padding
    target: dict[str, Tensor]  # field -> [B, M] (or [B, M, W])
    target_ts: Tensor  # [B, M] int64
    label: Tensor  # [B, M] float32
    target_mask: Tensor  # [B, M] bool, True = real target
    sample_index: Tensor | None = None  # [B, M] int64 row of each target in its split, -1 = pad
    history_end: Tensor | None = None  # [B] int64 store row just after the history (provenance)
    extra: dict[str, Tensor] | None = None  # side sequences, e.g. IAT tokens [B, T, D] + masks

    @property
    def batch_size(self) -> int:
        return int(self.user.shape[0])

    @property
    def history_len(self) -> int:
        return int(self.history_mask.shape[1])

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.shape[1])

    @property
    def target_type(self) -> Tensor | None:
        """[B, M] advertising target type ids, or None when the data has no types."""
        return self.target.get("target_type")

    def to(self, device: torch.device | str) -> Batch:
        def move(x):
            if x is None:
                return None
            if isinstance(x, dict):
                return {k: v.to(device, non_blocking=True) for k, v in x.items()}
            return x.to(device, non_blocking=True)

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def pin_memory(self) -> Batch:
        def pin(x):
            if x is None:
                return None
            if isinstance(x, dict):
                return {k: v.pin_memory() for k, v in x.items()}
            return x.pin_memory()

        return Batch(**{f.name: pin(getattr(self, f.name)) for f in fields(self)})
