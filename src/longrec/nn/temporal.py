"""Target-relative temporal ids (docs/models.md, "Temporal encoding (TTE)"): positions and
bucketised time gaps.

Histories are left-padded with the most recent behaviour last, so the slot j of a history of
padded length L has target-relative position L - j (1 = most recent) whatever the padding;
the target itself has position 0. Time gaps (target time - behaviour time) are bucketised on a
log scale; bucket 0 is reserved for the target, padding is masked by the caller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def relative_positions(length: int, device=None, max_position: int | None = None) -> Tensor:
    """[L] positions L..1 for left-padded slots, clipped to `max_position`."""
    pos = torch.arange(length, 0, -1, device=device)
    return pos.clamp_max(max_position) if max_position is not None else pos


def time_gap_buckets(
    history_ts: Tensor, target_ts: Tensor, n_buckets: int = 64, base: float = 2.0
) -> Tensor:
    """[B, M, L] bucket ids in 1..n_buckets-1 of log_base(1 + gap seconds); gap < 0 -> 1."""
    gap = (target_ts.unsqueeze(-1) - history_ts.unsqueeze(-2)).clamp_min(0).to(torch.float32)
    bucket = torch.floor(torch.log1p(gap) / math.log(base)).long() + 1
    return bucket.clamp(1, n_buckets - 1)


def log_buckets(values: Tensor, n_buckets: int, exact: int = 0, base: float = 2.0) -> Tensor:
    """Bucket ids 1..n_buckets-1 of non-negative values: the first `exact` values get their own
    bucket, larger ones share log-scale buckets (so a table of ~64 rows covers 10K positions or
    years of seconds). Bucket 0 stays free for the target itself."""
    v = values.clamp_min(0)
    if exact:
        logb = (
            exact
            + torch.floor(torch.log1p((v - exact).clamp_min(0).float()) / math.log(base)).long()
        )
        bucket = torch.where(v <= exact, v.long(), logb + 1)
        return bucket.clamp(1, n_buckets - 1)
    return (torch.floor(torch.log1p(v.float()) / math.log(base)).long() + 1).clamp(1, n_buckets - 1)


class TemporalEncoding(torch.nn.Module):
    """Target-aware temporal encoding (TIN's TTE; docs/models.md, "Temporal encoding (TTE)"): an
    embedding of each behaviour's target-relative position and/or time gap, and of the target's
    own bucket 0.

    `kind` is "position" (TTE-P), "time" (TTE-T) or "both" (their sum). With `n_target_types`
    > 1 every table is indexed by the target's advertising type as well (Target-Decoupled PE,
    same section): different optimisation goals learn different recency curves.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "both",
        n_buckets: int = 64,
        exact_positions: int = 32,
        n_target_types: int = 1,
    ):
        super().__init__()
        if kind not in ("position", "time", "both"):
            raise ValueError(f"temporal kind must be position, time or both, got '{kind}'")
        self.kind, self.n_buckets, self.exact = kind, n_buckets, exact_positions
        self.types = max(1, n_target_types)
        rows = self.types * n_buckets
        self.position = torch.nn.Embedding(rows, dim) if kind in ("position", "both") else None
        self.time = torch.nn.Embedding(rows, dim) if kind in ("time", "both") else None

    def _type_offset(self, target_type: Tensor | None, like: Tensor) -> Tensor:
        if target_type is None or self.types == 1:
            return torch.zeros((), dtype=torch.long, device=like.device)
        return target_type.long().clamp(0, self.types - 1) * self.n_buckets

    def behaviours(self, positions: Tensor, gaps: Tensor, target_type: Tensor | None) -> Tensor:
        """positions, gaps: [B, M, K] (target-relative position, seconds before the target);
        target_type [B, M] or None -> [B, M, K, dim]."""
        offset = self._type_offset(target_type, positions)
        offset = offset.unsqueeze(-1) if offset.dim() else offset
        out = None
        if self.position is not None:
            out = self.position(offset + log_buckets(positions, self.n_buckets, self.exact))
        if self.time is not None:
            t = self.time(offset + log_buckets(gaps, self.n_buckets))
            out = t if out is None else out + t
        return out

    def target(self, target_type: Tensor | None, shape: torch.Size) -> Tensor:
        """Bucket 0 of the target's type: [B, M, dim]."""
        offset = self._type_offset(target_type, torch.zeros(()))
        ids = offset.expand(shape) if offset.dim() else torch.zeros(shape, dtype=torch.long)
        out = None
        for table in (self.position, self.time):
            if table is not None:
                e = table(ids.to(table.weight.device))
                out = e if out is None else out + e
        return out
