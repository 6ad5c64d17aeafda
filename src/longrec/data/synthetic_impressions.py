"""Impressions, labels and ground truth of one chunk of users, fully vectorised.

Requests happen some time after a behaviour in the later part of a user's history; every
candidate's click probability is a function of the relevance of the user's earlier behaviours
in the candidate's l2 branch (docs/synthetic.md, "Impressions and labels"). The truth records,
for each impression, the behaviours that contributed (at most `truth_top_k`, largest first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from longrec.data.synthetic_behaviours import DAY, Behaviours
from longrec.data.synthetic_world import AD_DOMAINS, World, sample_segments

if TYPE_CHECKING:
    from longrec.data.synthetic import SynthConfig

# Candidate sources, in the order of SynthConfig.candidate_mix.
CAND_LONG_TERM, CAND_RECENT, CAND_POPULAR = 0, 1, 2


@dataclass
class Impressions:
    """One chunk's impressions (grouped by request, requests by user then time) and truth."""

    request: np.ndarray  # int64 [imps] 0-based request index within the chunk
    user: np.ndarray  # int32 [imps] 0-based user within the chunk
    item: np.ndarray  # int64 [imps]
    leaf: np.ndarray  # int32 [imps] unified leaf index (0-based)
    ts: np.ndarray  # int64 [imps]
    target: np.ndarray  # int8 [imps] index into target_types
    label: np.ndarray  # int8 [imps]
    logit: np.ndarray  # float32 [imps] click logit before the calibrated offset
    prob: np.ndarray  # float32 [imps] the click probability the label was drawn from
    score: np.ndarray  # float32 [imps] S: summed relevance of the truth rows
    score_recent: np.ndarray  # float32 [imps] the same, over the last `eval_recent` behaviours
    history_len: np.ndarray  # int64 [imps] behaviours of the user strictly before ts
    truth_imp: np.ndarray  # int64 [truth] 0-based impression within the chunk
    truth_row: np.ndarray  # int64 [truth] 0-based row within the chunk
    truth_rel: np.ndarray  # float32 [truth]

    @property
    def n(self) -> int:
        return int(self.item.shape[0])

    @property
    def n_requests(self) -> int:
        return int(self.request[-1]) + 1 if self.request.size else 0


def relevance(
    cfg: SynthConfig, same_leaf: np.ndarray, behavior: np.ndarray, age_s: np.ndarray, target
) -> np.ndarray:
    """r = m * w_behaviour * (floor_t + (1 - floor_t) * exp(-age_days / tau_t)), float32.

    m = 1 for a behaviour in the candidate's leaf, `branch_weight` for another leaf of its l2.
    """
    floor = np.asarray(cfg.target_floor, dtype=np.float64)[target]
    tau = np.asarray(cfg.target_tau_days, dtype=np.float64)[target]
    kernel = floor + (1.0 - floor) * np.exp(-(age_s / DAY) / tau)
    m = np.where(same_leaf, 1.0, cfg.branch_weight)
    w = np.asarray(cfg.behavior_weights, dtype=np.float64)[behavior]
    return (m * w * kernel).astype(np.float32)


def pool_relevance(pool: str, imp: np.ndarray, rel: np.ndarray, n: int) -> np.ndarray:
    """S per impression (float64 [n], 0 where nothing is relevant): the sum or the max of `rel`."""
    if pool == "sum":
        return np.bincount(imp, weights=rel, minlength=n)
    out = np.zeros(n, dtype=np.float64)
    np.maximum.at(out, imp, rel.astype(np.float64))
    return out


def _top_k(pi: np.ndarray, row: np.ndarray, rel: np.ndarray, cnt: np.ndarray, k: int):
    """Mask of the pairs kept: every pair of impressions with <= k pairs, else the k largest."""
    keep = np.ones(pi.shape[0], dtype=bool)
    big = np.flatnonzero(cnt[pi] > k)
    if big.size:
        order = np.lexsort((row[big], -rel[big], pi[big]))
        sorted_pi = pi[big][order]
        first = np.flatnonzero(np.r_[True, sorted_pi[1:] != sorted_pi[:-1]])
        group_start = np.repeat(first, np.diff(np.r_[first, sorted_pi.size]))
        rank = np.arange(sorted_pi.size) - group_start
        keep[big[order[rank >= k]]] = False
    return keep


def make_impressions(
    cfg: SynthConfig,
    world: World,
    b: Behaviours,
    lengths: np.ndarray,
    rng,
    bias_offset: float = 0.0,
) -> Impressions:
    tax, items = world.tax, world.items
    n = int(lengths.shape[0])
    n_req_user = rng.poisson(cfg.requests_per_user, n)
    ru = np.repeat(np.arange(n, dtype=np.int32), n_req_user)
    nr = int(ru.shape[0])

    # --- request times: shortly after a behaviour in the later part of the history
    lo = np.minimum(np.floor(cfg.request_start * lengths).astype(np.int64), lengths - 1)
    span = lengths[ru] - lo[ru]
    anchor = lo[ru] + np.floor(rng.random(nr) * span).astype(np.int64)
    delay = 1 + np.floor(rng.exponential(cfg.request_delay_seconds, nr)).astype(np.int64)
    t = b.ts[b.offsets[ru] + anchor] + delay
    order = np.lexsort((t, ru))
    ru, t = ru[order], t[order]
    # the history of a request: the user's rows strictly before t (rows are sorted by user, ts)
    t0 = cfg.start_ts - DAY
    key = (b.user.astype(np.int64) << 34) | (b.ts - t0)
    hist_end = np.searchsorted(key, (ru.astype(np.int64) << 34) | (t - t0), side="left")
    del key

    # --- candidates: from a long-term interest, a recent behaviour's leaf, or by popularity
    c = cfg.candidates_per_request
    ni = nr * c
    req = np.repeat(np.arange(nr, dtype=np.int64), c)
    iu, it, iend = ru[req], t[req], hist_end[req]
    ad = np.asarray(AD_DOMAINS, dtype=np.int64)
    ad_w = np.asarray(cfg.domain_weights, dtype=np.float64)[ad]
    req_dom = ad[np.searchsorted(np.cumsum(ad_w)[:-1] / ad_w.sum(), rng.random(nr), side="right")]
    dom = req_dom[req]
    tt_cum = np.cumsum(cfg.target_weights) / sum(cfg.target_weights)
    target = np.searchsorted(tt_cum[:-1], rng.random(ni), side="right").astype(np.int8)
    mix_cum = np.cumsum(cfg.candidate_mix) / sum(cfg.candidate_mix)
    src = np.searchsorted(mix_cum[:-1], rng.random(ni), side="right")
    leaf = np.zeros(ni, dtype=np.int64)
    lt = np.flatnonzero(src == CAND_LONG_TERM)
    col = (rng.random(lt.size) * b.n_interests[iu[lt]]).astype(np.int64)
    leaf[lt] = b.interests[iu[lt], col]
    rec = np.flatnonzero(src == CAND_RECENT)
    have = np.minimum(iend[rec] - b.offsets[iu[rec]], cfg.recent_window)
    back = np.floor(rng.random(rec.size) * have).astype(np.int64)
    leaf[rec] = b.leaf[iend[rec] - 1 - back]
    targeted = src != CAND_POPULAR
    seg = dom * tax.n_leaf + leaf
    lo_pos = np.where(targeted, items.seg[seg], items.dom_lo[dom])
    hi_pos = np.where(targeted, items.seg[seg + 1], items.dom_lo[dom + 1])
    pos = sample_segments(items.cum0, lo_pos, hi_pos, rng.random(ni))
    item = items.ids_at[pos]
    leaf = items.leaf_at[pos]

    # --- pairs (impression, earlier behaviour of the same user in the candidate's l2 branch)
    rows = b.rows
    shift = max(rows.bit_length(), 1)
    n_l2 = tax.n_l2
    if (n * n_l2).bit_length() + shift > 62:
        raise ValueError("chunk too large for the pair index; lower chunk_rows")
    k = tax.leaves_per_l2
    group = b.user.astype(np.int64) * n_l2 + b.leaf // k
    comp = np.sort((group << shift) | np.arange(rows, dtype=np.int64))
    del group
    ikey = (iu.astype(np.int64) * n_l2 + leaf // k) << shift
    p_lo = np.searchsorted(comp, ikey, side="left")
    p_hi = np.searchsorted(comp, ikey | iend, side="left")
    cnt = p_hi - p_lo
    pairs = int(cnt.sum())
    pi = np.repeat(np.arange(ni, dtype=np.int64), cnt)
    pos = np.arange(pairs, dtype=np.int64) + np.repeat(p_lo - (np.cumsum(cnt) - cnt), cnt)
    row = comp[pos] & ((1 << shift) - 1)
    del comp, pos
    rel = relevance(cfg, b.leaf[row] == leaf[pi], b.behavior[row], it[pi] - b.ts[row], target[pi])
    recent = row >= iend[pi] - cfg.eval_recent
    score_recent = pool_relevance(cfg.relevance_pool, pi[recent], rel[recent], ni)
    keep = _top_k(pi, row, rel, cnt, cfg.truth_top_k)
    pi, row, rel = pi[keep], row[keep], rel[keep]
    score = pool_relevance(cfg.relevance_pool, pi, rel, ni)

    # --- labels
    bias = np.asarray(cfg.target_bias, dtype=np.float64)[target]
    z = bias + cfg.relevance_gain * np.log1p(score) + items.quality_of[item]
    prob = 1.0 / (1.0 + np.exp(-(z + bias_offset)))
    label = (rng.random(ni) < prob).astype(np.int8)
    return Impressions(
        request=req,
        user=iu,
        item=item,
        leaf=leaf.astype(np.int32),
        ts=it,
        target=target,
        label=label,
        logit=z.astype(np.float32),
        prob=prob.astype(np.float32),
        score=score.astype(np.float32),
        score_recent=score_recent.astype(np.float32),
        history_len=iend - b.offsets[iu],
        truth_imp=pi,
        truth_row=row,
        truth_rel=rel,
    )
