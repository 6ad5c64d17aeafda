"""Behaviour logs of one chunk of users, fully vectorised (no loop per user or per behaviour).

The process (docs/synthetic.md, "Behaviours"): sessions cut each history; a session-level
random walk over the taxonomy gives the short-term interest; a few long-term interest leaves per
user recur sparsely at random positions (hence spread over years); the rest is noise drawn by
item popularity. Every session happens in one domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from longrec.data.synthetic_world import (
    CONTENT,
    LONG_TERM,
    NOISE,
    SHORT_TERM,
    WEAK_BEHAVIOR,
    Taxonomy,
    World,
    forward_fill_index,
    sample_segments,
)

if TYPE_CHECKING:
    from longrec.data.synthetic import SynthConfig

DAY = 86_400
YEAR = 365.25 * DAY


@dataclass
class Behaviours:
    """One chunk's behaviours, rows grouped by user and in time order; users are 0-based here."""

    offsets: np.ndarray  # int64 [n_users + 1] first row of each user
    user: np.ndarray  # int32 [rows]
    item: np.ndarray  # int64 [rows] public item id
    leaf: np.ndarray  # int32 [rows] unified leaf index (0-based)
    behavior: np.ndarray  # int8 [rows] index into BEHAVIORS
    ts: np.ndarray  # int64 [rows] unix seconds, strictly increasing within a user
    domain: np.ndarray  # int8 [rows] index into DOMAINS
    source: np.ndarray  # int8 [rows] NOISE / SHORT_TERM / LONG_TERM (not written)
    interests: np.ndarray  # int32 [n_users, max_interests] long-term interest leaves
    n_interests: np.ndarray  # int64 [n_users] how many columns of `interests` are used

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])


def _session_walk(
    cfg: SynthConfig, tax: Taxonomy, n_sess: int, first_sess: np.ndarray, rng
) -> np.ndarray:
    """Focus leaf of every session: a Markov chain over the taxonomy, restarted per user.

    At each session boundary: with prob walk_l1 redraw the l1 branch (and below), else with prob
    walk_l2 redraw the l2 branch within the l1, else with prob walk_leaf redraw the leaf within
    the l2, else keep the leaf. Redraws follow category popularity. Vectorised by drawing a
    candidate at every session and forward-filling the last redraw at each level.
    """
    u = rng.random((3, n_sess), dtype=np.float32)
    e1 = u[0] < cfg.walk_l1
    e1[first_sess] = True
    e2 = e1 | (u[1] < cfg.walk_l2)
    e3 = e2 | (u[2] < cfg.walk_leaf)
    zeros = np.zeros(n_sess, dtype=np.int64)
    l1 = sample_segments(tax.l1_cum0, zeros, zeros + tax.n_l1, rng.random(n_sess))
    l1 = l1[forward_fill_index(e1)]
    k = tax.l2_per_l1
    l2 = sample_segments(tax.l2_cum0, l1 * k, (l1 + 1) * k, rng.random(n_sess))
    l2 = l2[forward_fill_index(e2)]
    k = tax.leaves_per_l2
    leaf = sample_segments(tax.leaf_cum0, l2 * k, (l2 + 1) * k, rng.random(n_sess))
    return leaf[forward_fill_index(e3)].astype(np.int32)


def make_behaviours(cfg: SynthConfig, world: World, lengths: np.ndarray, rng) -> Behaviours:
    tax, items = world.tax, world.items
    n = int(lengths.shape[0])
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = int(offsets[-1])
    first_row = offsets[:-1]
    user = np.repeat(np.arange(n, dtype=np.int32), lengths)

    # --- sessions: geometric lengths, each in one domain, with a focus leaf from the walk
    starts = rng.random(rows, dtype=np.float32) < np.float32(1.0 / cfg.session_len)
    starts[first_row] = True
    sess_row = np.flatnonzero(starts)
    sess_of_row = np.cumsum(starts, dtype=np.int64) - 1
    del starts
    n_sess = int(sess_row.shape[0])
    sess_user = user[sess_row]
    focus = _session_walk(cfg, tax, n_sess, sess_of_row[first_row], rng)
    dom_cum = np.cumsum(cfg.domain_weights) / sum(cfg.domain_weights)
    sess_domain = np.searchsorted(dom_cum[:-1], rng.random(n_sess), side="right").astype(np.int8)

    # --- long-term interests: a few leaves per user, recurring at random positions
    k_max = cfg.max_interests
    n_int = np.clip(1 + rng.poisson(max(cfg.lt_interests - 1.0, 0.0), n), 1, k_max)
    interests = rng.integers(0, tax.n_leaf, (n, k_max), dtype=np.int32)
    per_interest = cfg.lt_per_interest * np.sqrt(lengths / cfg.mean_len)
    p_lt = np.minimum(n_int * per_interest / lengths, cfg.lt_max_share).astype(np.float32)

    # --- the source of every behaviour
    u = rng.random(rows, dtype=np.float32)
    p_row = p_lt[user]
    source = np.full(rows, NOISE, dtype=np.int8)
    source[u < p_row + (1 - p_row) * np.float32(cfg.short_term_share)] = SHORT_TERM
    source[u < p_row] = LONG_TERM
    del u, p_row

    leaf = focus[sess_of_row]
    domain = sess_domain[sess_of_row]
    # within a session the short-term interest wanders to sibling leaves now and then
    drift = np.flatnonzero(
        (rng.random(rows, dtype=np.float32) < cfg.session_drift) & (source == SHORT_TERM)
    )
    k = tax.leaves_per_l2
    l2 = leaf[drift].astype(np.int64) // k
    leaf[drift] = sample_segments(tax.leaf_cum0, l2 * k, (l2 + 1) * k, rng.random(drift.size))
    lt = np.flatnonzero(source == LONG_TERM)
    lt_user = user[lt]
    col = (rng.random(lt.size) * n_int[lt_user]).astype(np.int64)
    leaf[lt] = interests[lt_user, col]

    # --- items: targeted rows pick an item of their leaf, noise rows any item, by popularity
    targeted = source != NOISE
    seg_index = domain.astype(np.int64) * tax.n_leaf + leaf
    lo = np.where(targeted, items.seg[seg_index], items.dom_lo[domain])
    hi = np.where(targeted, items.seg[seg_index + 1], items.dom_lo[domain.astype(np.int64) + 1])
    del seg_index, targeted
    pos = sample_segments(items.cum0, lo, hi, rng.random(rows))
    del lo, hi
    item = items.ids_at[pos]
    leaf = items.leaf_at[pos]
    del pos

    # --- behaviour type: the strong one (conversion / like) is likelier for interest behaviours
    strong_p = np.where(
        domain == CONTENT,
        np.asarray(cfg.like_prob, dtype=np.float32)[source],
        np.asarray(cfg.conversion_prob, dtype=np.float32)[source],
    )
    behavior = WEAK_BEHAVIOR[domain] + (rng.random(rows, dtype=np.float32) < strong_p)
    del strong_p

    # --- timestamps: sessions spread over the user's active span, short gaps inside a session
    gaps = 1 + np.floor(rng.exponential(cfg.gap_seconds, rows)).astype(np.int64)
    gaps[sess_row] = 0
    within = np.bincount(user, weights=gaps, minlength=n)
    sess_count = np.bincount(sess_user, minlength=n)
    span = cfg.years * YEAR * rng.uniform(cfg.span_min, 1.0, n)
    budget = np.maximum(span - within - sess_count, 0.0)
    e = rng.exponential(1.0, n_sess)
    e_total = np.bincount(sess_user, weights=e, minlength=n) + rng.exponential(1.0, n)
    gaps[sess_row] = 1 + np.floor(e / e_total[sess_user] * budget[sess_user]).astype(np.int64)
    del e
    start = cfg.start_ts + np.floor((cfg.years * YEAR - span) * rng.random(n)).astype(np.int64)
    cum = np.cumsum(gaps)
    base = start - (cum[first_row] - gaps[first_row])
    ts = base[user] + cum
    del cum, gaps
    return Behaviours(
        offsets=offsets,
        user=user,
        item=item,
        leaf=leaf,
        behavior=behavior.astype(np.int8),
        ts=ts,
        domain=domain,
        source=source,
        interests=interests,
        n_interests=n_int,
    )
