"""Target-relative temporal ids (SPEC §1.2): positions and bucketised time gaps.

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
