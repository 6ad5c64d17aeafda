"""The fixed "world" of the synthetic generator: taxonomy, content categories and item pools.

Everything here is drawn once per seed, before any user, from its own random stream, so the
world does not depend on how users are chunked. See docs/synthetic.md for the process.

Index spaces used internally (all 0-based): l1 in [0, n_l1), l2 in [0, n_l2), leaf in
[0, n_leaf); children are contiguous (l2 `j` has leaves `[j*leaves_per_l2, (j+1)*leaves_per_l2)`).
Public ids written to files are 1-based and disjoint across levels (see `Taxonomy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from longrec.data.synthetic import SynthConfig

DOMAINS: tuple[str, ...] = ("ads_moments", "ads_channels", "content")
AD_DOMAINS: tuple[int, ...] = (0, 1)
CONTENT = 2
# Behaviour codes; ad domains use (click, conversion), the content domain (view, like).
BEHAVIORS: tuple[str, ...] = ("click", "conversion", "view", "like")
WEAK_BEHAVIOR = np.array([0, 0, 2], dtype=np.int8)  # per domain: the ordinary behaviour
# Candidate-leaf sources and behaviour sources share these codes.
NOISE, SHORT_TERM, LONG_TERM = 0, 1, 2


def sample_segments(cum0: np.ndarray, lo: np.ndarray, hi: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Draw one index per row from the segment [lo, hi) with probability proportional to weight.

    `cum0` is the cumulative weight with a leading 0 (length n + 1): element i has weight
    cum0[i + 1] - cum0[i]. `u` holds uniforms in [0, 1). Vectorised inverse-CDF sampling: one
    binary search per row.
    """
    a = cum0[lo]
    x = a + u * (cum0[hi] - a)
    idx = np.searchsorted(cum0, x, side="right") - 1
    return np.clip(idx, lo, hi - 1)


def forward_fill_index(event: np.ndarray) -> np.ndarray:
    """For each position, the index of the last position <= it where `event` is True.

    Position 0 of every group must be an event (callers force it), so nothing leaks between
    groups laid out one after the other.
    """
    idx = np.where(event, np.arange(event.shape[0], dtype=np.int64), 0)
    return np.maximum.accumulate(idx)


@dataclass(frozen=True)
class Taxonomy:
    """The unified 3-level category tree.

    Public ids: l1 -> 1..n_l1, l2 -> n_l1+1..n_l1+n_l2, leaf -> n_l1+n_l2+1..n_l1+n_l2+n_leaf, so
    an id alone says its level. `leaf_weight` is the popularity of each leaf (Zipf over a random
    order); l2 and l1 weights are sums over their leaves.
    """

    n_l1: int
    n_l2: int
    n_leaf: int
    leaves_per_l2: int
    l2_per_l1: int
    leaf_weight: np.ndarray  # float64 [n_leaf]
    leaf_cum0: np.ndarray  # float64 [n_leaf + 1]
    l2_cum0: np.ndarray  # float64 [n_l2 + 1]
    l1_cum0: np.ndarray  # float64 [n_l1 + 1]

    @property
    def l2_of_leaf(self) -> np.ndarray:
        return np.arange(self.n_leaf, dtype=np.int32) // self.leaves_per_l2

    @property
    def l1_of_l2(self) -> np.ndarray:
        return np.arange(self.n_l2, dtype=np.int32) // self.l2_per_l1

    @property
    def leaf_id0(self) -> int:
        """Public id of leaf index 0."""
        return 1 + self.n_l1 + self.n_l2

    def leaf_ids(self) -> np.ndarray:
        return self.leaf_id0 + np.arange(self.n_leaf, dtype=np.int64)

    def l2_ids_of_leaves(self) -> np.ndarray:
        return 1 + self.n_l1 + self.l2_of_leaf.astype(np.int64)

    def l1_ids_of_leaves(self) -> np.ndarray:
        return 1 + self.l1_of_l2[self.l2_of_leaf].astype(np.int64)


def make_taxonomy(n_l1: int, l2_per_l1: int, leaves_per_l2: int, zipf: float, rng) -> Taxonomy:
    n_l2 = n_l1 * l2_per_l1
    n_leaf = n_l2 * leaves_per_l2
    rank = rng.permutation(n_leaf)
    w = (rank + 1.0) ** -zipf
    leaf_cum0 = np.concatenate([[0.0], np.cumsum(w)])
    l2_w = w.reshape(n_l2, leaves_per_l2).sum(axis=1)
    l1_w = l2_w.reshape(n_l1, l2_per_l1).sum(axis=1)
    return Taxonomy(
        n_l1=n_l1,
        n_l2=n_l2,
        n_leaf=n_leaf,
        leaves_per_l2=leaves_per_l2,
        l2_per_l1=l2_per_l1,
        leaf_weight=w,
        leaf_cum0=leaf_cum0,
        l2_cum0=np.concatenate([[0.0], np.cumsum(l2_w)]),
        l1_cum0=np.concatenate([[0.0], np.cumsum(l1_w)]),
    )


@dataclass(frozen=True)
class Items:
    """All item pools, laid out for vectorised sampling.

    Items are stored sorted by (domain, leaf) at "positions" p; `cum0` is the cumulative Zipf
    popularity over positions, `seg[d * n_leaf + leaf]` the first position of (domain, leaf)
    (with a final sentinel), and `dom_lo[d]..dom_lo[d + 1]` the positions of domain d. Lookups by
    public item id (1-based, contiguous per domain): `leaf_of`, `raw_of` (the raw category the
    item's domain uses) and `quality_of` (a per-item click-logit offset).
    """

    ids_at: np.ndarray  # int64 [n_items] item id at each position
    leaf_at: np.ndarray  # int32 [n_items]
    cum0: np.ndarray  # float64 [n_items + 1]
    seg: np.ndarray  # int64 [n_domains * n_leaf + 1]
    dom_lo: np.ndarray  # int64 [n_domains + 1]
    leaf_of: np.ndarray  # int32 [n_items + 1], indexed by id
    raw_of: np.ndarray  # int64 [n_items + 1]
    quality_of: np.ndarray  # float32 [n_items + 1]
    first_id: np.ndarray  # int64 [n_domains] first item id of each domain
    n_per_domain: tuple[int, ...]


@dataclass(frozen=True)
class ContentCategories:
    """The content domain's own category system: finer than the unified leaves.

    Leaf `k` is split into `count[k]` raw categories (>= 1); raw ids are `base + j` over a random
    permutation, so ranges do not reveal the leaf. `leaf_of_raw[j]` maps raw id base + j.
    """

    base: int
    start: np.ndarray  # int64 [n_leaf + 1] first slot of each leaf in `raw_by_slot`
    raw_by_slot: np.ndarray  # int64 raw ids, grouped by leaf
    leaf_by_slot: np.ndarray  # int32

    @property
    def n(self) -> int:
        return int(self.raw_by_slot.shape[0])


def make_content_categories(tax: Taxonomy, per_leaf: float, base: int, rng) -> ContentCategories:
    count = 1 + rng.poisson(max(per_leaf - 1.0, 0.0), tax.n_leaf)
    start = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    total = int(start[-1])
    raw_by_slot = base + rng.permutation(total).astype(np.int64)
    leaf_by_slot = np.repeat(np.arange(tax.n_leaf, dtype=np.int32), count)
    return ContentCategories(base, start, raw_by_slot, leaf_by_slot)


def make_items(
    tax: Taxonomy,
    content: ContentCategories,
    n_per_domain: tuple[int, ...],
    zipf: float,
    quality_sd: float,
    rng,
) -> Items:
    n_leaf = tax.n_leaf
    total = sum(n_per_domain)
    ids_at = np.empty(total, dtype=np.int64)
    leaf_at = np.empty(total, dtype=np.int32)
    pop_at = np.empty(total, dtype=np.float64)
    seg_counts = np.empty(len(n_per_domain) * n_leaf, dtype=np.int64)
    leaf_of = np.zeros(total + 1, dtype=np.int32)
    raw_of = np.zeros(total + 1, dtype=np.int64)
    first_id = np.zeros(len(n_per_domain), dtype=np.int64)
    leaf_p = tax.leaf_weight / tax.leaf_weight.sum()
    pos = 0
    next_id = 1
    for d, n in enumerate(n_per_domain):
        # every leaf gets at least one item in every domain, the rest follow leaf popularity
        counts = 1 + rng.multinomial(n - n_leaf, leaf_p)
        ids = next_id + rng.permutation(n).astype(np.int64)  # ids in leaf order, shuffled
        leaves = np.repeat(np.arange(n_leaf, dtype=np.int32), counts)
        popularity = (rng.permutation(n) + 1.0) ** -zipf  # Zipf over a random rank
        ids_at[pos : pos + n] = ids
        leaf_at[pos : pos + n] = leaves
        pop_at[pos : pos + n] = popularity
        seg_counts[d * n_leaf : (d + 1) * n_leaf] = counts
        leaf_of[ids] = leaves
        if d == CONTENT:
            slot = content.start[leaves] + np.floor(
                rng.random(n) * (content.start[leaves + 1] - content.start[leaves])
            ).astype(np.int64)
            raw_of[ids] = content.raw_by_slot[slot]
        else:
            raw_of[ids] = tax.leaf_id0 + leaves
        first_id[d] = next_id
        pos += n
        next_id += n
    seg = np.concatenate([[0], np.cumsum(seg_counts)]).astype(np.int64)
    dom_lo = np.concatenate([[0], np.cumsum(n_per_domain)]).astype(np.int64)
    quality = np.zeros(total + 1, dtype=np.float32)
    quality[1:] = rng.normal(0.0, quality_sd, total)
    return Items(
        ids_at=ids_at,
        leaf_at=leaf_at,
        cum0=np.concatenate([[0.0], np.cumsum(pop_at)]),
        seg=seg,
        dom_lo=dom_lo,
        leaf_of=leaf_of,
        raw_of=raw_of,
        quality_of=quality,
        first_id=first_id,
        n_per_domain=tuple(n_per_domain),
    )


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[min(max(X, lo), hi)] for X ~ LogNormal(mu, sigma)."""
    a, b = math.log(lo), math.log(hi)
    below = lo * _normal_cdf((a - mu) / sigma)
    above = hi * (1.0 - _normal_cdf((b - mu) / sigma))
    s2 = sigma * sigma
    middle = math.exp(mu + s2 / 2) * (
        _normal_cdf((b - mu - s2) / sigma) - _normal_cdf((a - mu - s2) / sigma)
    )
    return below + middle + above


def lognormal_mu_for_mean(mean: float, sigma: float, lo: float, hi: float) -> float:
    """The mu that makes the clipped lognormal have the requested mean (bisection)."""
    left, right = math.log(lo) - 12 * sigma, math.log(hi) + 12 * sigma
    for _ in range(200):
        mid = (left + right) / 2
        if clipped_lognormal_mean(mid, sigma, lo, hi) < mean:
            left = mid
        else:
            right = mid
    return (left + right) / 2


def history_lengths(users: int, mean: float, sigma: float, lo: int, hi: int, rng) -> np.ndarray:
    """Heavy-tailed history lengths: round(LogNormal(mu, sigma)) clipped to [lo, hi].

    mu is solved so that the clipped distribution has mean `mean` (before rounding).
    """
    if lo == hi:
        return np.full(users, lo, dtype=np.int64)
    mu = lognormal_mu_for_mean(mean, sigma, lo, hi)
    x = rng.lognormal(mu, sigma, users)
    return np.clip(np.rint(x), lo, hi).astype(np.int64)


@dataclass(frozen=True)
class World:
    """Taxonomy, content categories and item pools: everything shared by all users."""

    tax: Taxonomy
    content: ContentCategories
    items: Items


def make_world(cfg: SynthConfig, rng) -> World:
    tax = make_taxonomy(cfg.n_l1, cfg.l2_per_l1, cfg.leaves_per_l2, cfg.category_zipf, rng)
    content = make_content_categories(
        tax, cfg.content_cats_per_leaf, cfg.content_category_base, rng
    )
    n_per_domain = (cfg.ad_items, cfg.ad_items, cfg.content_items)
    items = make_items(tax, content, n_per_domain, cfg.zipf, cfg.item_quality_sd, rng)
    return World(tax, content, items)
