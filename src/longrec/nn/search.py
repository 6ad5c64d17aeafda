"""The search stage (GSU, the first of a two-stage model's stages): pick K of L behaviours for
each target.

Every search returns indices [B, M, K] into the history and a validity mask [B, M, K]; padding
is never selected as valid (if a history has fewer than K real behaviours, the extra slots are
marked invalid). All searches are batched tensor ops, never a loop over samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrec.nn.attention import masked_fill_scores


def topk_search(scores: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k behaviours by score: scores [B, M, L], mask [B, L] -> (idx, valid) [B, M, k']."""
    k = min(k, scores.shape[-1])
    idx = torch.topk(masked_fill_scores(scores.detach(), mask), k, dim=-1).indices
    valid = torch.gather(mask.unsqueeze(1).expand(-1, idx.shape[1], -1), 2, idx)
    return idx, valid


def hard_search(
    history_cat: Tensor, target_cat: Tensor, mask: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """SIM/TWIN hard search: behaviours of the target's category, most recent first; if fewer
    than k, the most recent other behaviours fill up (DARE's "TWIN (hard)")."""
    return topk_search(hard_rank(history_cat, target_cat, mask).float(), mask, k)


def hard_rank(history_cat: Tensor, target_cat: Tensor, mask: Tensor) -> Tensor:
    """[B, M, L] integer rank key: same-category behaviours outrank all others, then recency."""
    length = history_cat.shape[-1]
    match = (history_cat.unsqueeze(1) == target_cat.unsqueeze(-1)) & mask.unsqueeze(1)
    return match * (2 * length) + torch.arange(length, device=history_cat.device)


def gather_behaviours(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, L, D] (or [B, L]), idx [B, M, K] -> [B, M, K, D] (or [B, M, K])."""
    b, m, k = idx.shape
    flat = (idx + torch.arange(b, device=idx.device).view(b, 1, 1) * x.shape[1]).reshape(-1)
    if x.dim() == 2:
        return x.reshape(-1)[flat].view(b, m, k)
    return x.reshape(-1, x.shape[-1])[flat].view(b, m, k, x.shape[-1])


def simhash_signs(x: Tensor, planes: Tensor) -> Tensor:
    """SimHash: sign(x @ planes) in {-1, +1}; planes [d, bits] are fixed random hyperplanes."""
    return torch.where(x @ planes >= 0, 1.0, -1.0).to(x.dtype)


def hamming_similarity(query_signs: Tensor, key_signs: Tensor) -> Tensor:
    """Number of equal signature bits, bits - Hamming distance: [B, M, b] x [B, L, b] -> [B, M, L].

    With ±1 codes, <s_q, s_k> = bits - 2 * hamming, so one batched matmul replaces XOR+popcount.
    """
    bits = query_signs.shape[-1]
    return (torch.matmul(query_signs, key_signs.transpose(-1, -2)) + bits) / 2
