"""Search-stage cost of the hierarchical hard search (docs/models.md, "Search stage"): the merged
reading and the per-level reading of ``nn.hier_search``, next to the single-level SIM/TWIN hard
search and a soft top-k at attention dim 16 (dot product over the whole history + top k), on
synthetic histories over a category taxonomy (8 -> 64 -> 768 categories for 3 levels)."""

from __future__ import annotations

import math

import torch

from longrec.bench.common import median_ms
from longrec.bench.search import soft_search
from longrec.nn.hier_search import hierarchical_hard_search, per_level_hard_search
from longrec.nn.search import hard_search


def taxonomy_fans(levels: int) -> list[int]:
    """Children per node, coarse -> fine: 8 roots, x8 per middle level, x12 leaves per parent
    (3 levels: 8 -> 64 -> 768 categories)."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    return [8] * (levels - 1) + [12] if levels > 1 else [12]


def synthetic_taxonomy_batch(
    batch: int, length: int, targets: int, levels: int = 3, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(history ids per level [B, L], target ids per level [B, M], mask [B, L]), coarse -> fine.

    Each user has 8 interest leaves; a behaviour picks one of them and is that leaf with
    probability a ~ U(0.08, 0.4) (so each interest leaf, and hence each target, holds about
    1-5% of the history), else a random leaf under the same level-h node (30% spread over
    the levels above the leaf, 15% each for 3 levels), else a uniformly random leaf. Targets are interest leaves.
    Level-h ids are globally unique (leaf // leaves-per-level-h-node). Histories are
    left-padded to between L/2 and L real behaviours."""
    gen = torch.Generator().manual_seed(seed)
    fans = taxonomy_fans(levels)
    leaves = math.prod(fans)
    under = [math.prod(fans[h + 1 :]) for h in range(levels)]  # leaves per level-h node
    interest = torch.randint(0, leaves, (batch, 8), generator=gen)
    pick = torch.randint(0, 8, (batch, length), generator=gen)
    focus = interest.gather(1, pick)  # the interest leaf each behaviour relates to
    exact = 0.08 + 0.32 * torch.rand(batch, 1, generator=gen)
    u = torch.rand(batch, length, generator=gen)
    leaf = torch.randint(0, leaves, (batch, length), generator=gen)  # uniform by default
    step = 0.3 / max(levels - 1, 1)  # sibling mass per level above the leaf
    for h in range(levels - 1):
        lo = exact + step * (levels - 2 - h)  # finer groups sit closer to the exact leaf
        group = under[h]
        sibling = focus // group * group + torch.randint(0, group, leaf.shape, generator=gen)
        leaf = torch.where((u >= lo) & (u < lo + step), sibling, leaf)
    leaf = torch.where(u < exact, focus, leaf)
    target_leaf = interest.gather(1, torch.randint(0, 8, (batch, targets), generator=gen))
    real = torch.randint(length // 2, length + 1, (batch, 1), generator=gen)
    mask = torch.arange(length) >= length - real
    history = [leaf // under[h] for h in range(levels)]
    target = [target_leaf // under[h] for h in range(levels)]
    return history, target, mask


def default_quotas(levels: int, k: int) -> list[int]:
    """Coarse -> fine: half of k for the finest level, the rest shared by the coarser ones."""
    if levels == 1:
        return [k]
    finest = k // 2
    rest = k - finest
    share = [rest // (levels - 1)] * (levels - 1)
    share[-1] += rest - sum(share)
    return [*share, finest]


def bench_hier_search(
    batch: int = 256,
    lengths=(1000, 10000),
    targets=(1, 8),
    levels: int = 3,
    k: int = 100,
    repeats: int = 7,
    seed: int = 0,
    soft_dim: int = 16,
) -> list[dict]:
    """Median wall ms per (history length, targets) of: the merged hierarchical hard search,
    the per-level reading (one sub-sequence per level, same quotas), single-level
    ``hard_search`` on the leaf, and soft top-k (``dot_scores`` at dim ``soft_dim`` +
    ``topk_search``). Runs with torch's current thread setting. ``match_share`` is the
    fraction of real behaviours matching the target at each level (coarse -> fine)."""
    rows = []
    quotas = default_quotas(levels, k)
    for length in lengths:
        for m in targets:
            history, target, mask = synthetic_taxonomy_batch(batch, length, m, levels, seed)
            gen = torch.Generator().manual_seed(seed + 1)
            keys = torch.randn(batch, length, soft_dim, generator=gen)
            query = torch.randn(batch, m, soft_dim, generator=gen)
            real = mask.unsqueeze(1)
            share = [
                ((hist.unsqueeze(1) == tgt.unsqueeze(-1)) & real).sum().item() / (m * real.sum())
                for hist, tgt in zip(history, target, strict=True)
            ]
            rows.append(
                {
                    "history": length,
                    "targets": m,
                    "batch": batch,
                    "levels": levels,
                    "k": k,
                    "quotas": quotas,
                    "threads": torch.get_num_threads(),
                    "match_share": [round(float(x), 4) for x in share],
                    "merged_ms": median_ms(
                        hierarchical_hard_search, (history, target, mask, quotas, k), repeats
                    ),
                    "per_level_ms": median_ms(
                        per_level_hard_search, (history, target, mask, quotas), repeats
                    ),
                    "hard_search_ms": median_ms(
                        hard_search, (history[-1], target[-1], mask, k), repeats
                    ),
                    f"soft_topk_d{soft_dim}_ms": median_ms(
                        soft_search, (query, keys, mask, k), repeats
                    ),
                }
            )
    return rows
