"""Offline metrics: AUC and logloss (scikit-learn), GAUC (vectorised, per user), NDCG@k.

GAUC = sum_u w_u AUC_u / sum_u w_u with w_u = the user's number of samples; users whose
samples are all of one class have no AUC and are skipped, and counted (`gauc_users_skipped`).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    probs = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(log_loss(labels, probs, labels=[0, 1]))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int, int]:
    """(GAUC, users used, users skipped). Ties get average ranks, as in roc_auc_score."""
    if len(users) == 0:
        return math.nan, 0, 0
    order = np.lexsort((scores, users))
    u, s, y = users[order], scores[order], labels[order].astype(np.float64)
    n = len(u)
    new_user = np.r_[True, u[1:] != u[:-1]]
    user_start = np.flatnonzero(new_user)
    user_id = np.cumsum(new_user) - 1
    rank = np.arange(n) - user_start[user_id] + 1.0  # 1-based rank within the user
    new_tie = new_user | np.r_[True, s[1:] != s[:-1]]
    tie_start = np.flatnonzero(new_tie)
    tie_id = np.cumsum(new_tie) - 1
    tie_mean = np.add.reduceat(rank, tie_start) / np.diff(np.r_[tie_start, n])
    rank = tie_mean[tie_id]
    count = np.diff(np.r_[user_start, n]).astype(np.float64)
    pos = np.add.reduceat(y, user_start)
    neg = count - pos
    pos_rank_sum = np.add.reduceat(rank * y, user_start)
    ok = (pos > 0) & (neg > 0)
    per_user = (pos_rank_sum[ok] - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
    weights = count[ok]
    if weights.sum() == 0:
        return math.nan, 0, int((~ok).sum())
    return float((per_user * weights).sum() / weights.sum()), int(ok.sum()), int((~ok).sum())


def classification_metrics(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict:
    g, used, skipped = gauc(users, labels, probs)
    return {
        "auc": auc(labels, probs),
        "gauc": g,
        "logloss": logloss(labels, probs),
        "n": len(labels),
        "positive_rate": float(labels.mean()) if len(labels) else math.nan,
        "gauc_users": used,
        "gauc_users_skipped": skipped,
    }


def ndcg_at_k(
    pred_scores: np.ndarray, relevance: np.ndarray, mask: np.ndarray, k: int
) -> np.ndarray:
    """NDCG@k per row of the model's ranking against graded ground-truth relevance.

    pred_scores, relevance, mask: [N, L]. Rows without any relevant behaviour give NaN.
    """
    pred = np.where(mask, pred_scores, -np.inf)
    rel = np.where(mask, relevance, 0.0)
    k = min(k, pred.shape[1])
    top = np.argsort(-pred, axis=1, kind="stable")[:, :k]
    gains = np.take_along_axis(rel, top, axis=1)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (gains * discount).sum(1)
    ideal = -np.sort(-rel, axis=1)[:, :k]
    idcg = (ideal * discount).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan)
