"""Retrieval quality of the search stage: NDCG@k of the model's behaviour ranking.

Ground truth comes from one of two places:
- synthetic data: the generator's truth (which behaviours drive each impression's label);
- real data: DARE's mutual-information relevance (from the paper's retrieval analysis): for
  every (target category c_t, behaviour category c, target-relative position p), the mutual
  information between "a behaviour of category c sits at position p" and the label, over
  training samples with target category c_t. Target categories with fewer than
  `min_target_samples` samples are skipped (DARE: 700).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from longrec.config import RunConfig
from longrec.data.dataset import PreparedDataset
from longrec.data.loader import BatchLoader, LoaderConfig
from longrec.train.metrics import ndcg_at_k


@dataclass
class MIRelevance:
    keys: np.ndarray  # sorted int64 keys of (target category, behaviour category, position)
    mi: np.ndarray  # mutual information of each key
    n_cat: int
    max_pos: int
    eligible_targets: np.ndarray  # bool [n_cat]: target categories with enough samples

    def key(self, ct: np.ndarray, c: np.ndarray, p: np.ndarray) -> np.ndarray:
        return (ct.astype(np.int64) * self.n_cat + c) * (self.max_pos + 1) + p

    def lookup(self, ct: np.ndarray, c: np.ndarray, p: np.ndarray) -> np.ndarray:
        k = self.key(ct, c, p)
        pos = np.searchsorted(self.keys, k)
        pos = np.minimum(pos, len(self.keys) - 1)
        return np.where(self.keys[pos] == k, self.mi[pos], 0.0)


def _binary_mi(xp, xn, tp, tn) -> np.ndarray:
    """MI between indicator X and label Y from counts: X=1&Y=1: xp, X=1&Y=0: xn; totals tp, tn."""
    n = tp + tn
    cells = [
        (xp, xp + xn, tp),
        (xn, xp + xn, tn),
        (tp - xp, n - xp - xn, tp),
        (tn - xn, n - xp - xn, tn),
    ]
    mi = np.zeros_like(n, dtype=np.float64)
    for joint, px, py in cells:
        with np.errstate(divide="ignore", invalid="ignore"):
            term = joint / n * np.log(joint * n / (px * py))
        mi += np.where(joint > 0, term, 0.0)
    return mi


def mi_relevance(
    dataset: PreparedDataset,
    max_len: int,
    split: str = "train",
    max_samples: int = 200_000,
    min_target_samples: int = 700,
    seed: int = 0,
) -> MIRelevance:
    cols = dataset.split(split)
    n = len(cols["label"])
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, max_samples), replace=False))
    store = dataset.store
    cat_store = np.asarray(store.fields["category"])
    n_cat = dataset.vocab_size("category")
    ct = cols["category"][rows].astype(np.int64)
    y = cols["label"][rows] > 0.5
    end = cols["hist_end"][rows].astype(np.int64)
    start = np.maximum(store.offsets[cols["user"][rows]], end - max_len)
    length = end - start
    # every (sample, position) pair: position 1 = the most recent behaviour
    owner = np.repeat(np.arange(len(rows)), length)
    pos = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length) + 1
    store_row = np.repeat(end, length) - pos
    keys = ((ct[owner] * n_cat + cat_store[store_row]) * (max_len + 1) + pos).astype(np.int64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    xp = np.bincount(inverse, weights=y[owner], minlength=len(uniq))
    xn = np.bincount(inverse, minlength=len(uniq)) - xp
    tp = np.bincount(ct, weights=y, minlength=n_cat)
    tn = np.bincount(ct, minlength=n_cat) - tp
    key_ct = uniq // ((max_len + 1) * n_cat)
    mi = _binary_mi(xp, xn, tp[key_ct], tn[key_ct])
    eligible = (tp + tn) >= min_target_samples
    return MIRelevance(uniq, mi, n_cat, max_len, eligible)


def _truth_lookup(truth: dict[str, np.ndarray] | None):
    if truth is None:
        return None
    order = np.argsort(truth["sample"], kind="stable")
    return {k: v[order] for k, v in truth.items()}


@torch.no_grad()
def retrieval_ndcg(
    model,
    dataset: PreparedDataset,
    split: str,
    cfg: RunConfig,
    ks=(1, 5, 10, 20),
    max_samples: int | None = 20_000,
    mi: MIRelevance | None = None,
    min_target_samples: int = 700,
) -> dict:
    """Mean NDCG@k over positive targets with any relevant behaviour in their visible history."""
    truth = _truth_lookup(dataset.truth(split))
    source = "synthetic truth" if truth is not None else "mutual information (DARE §3.8)"
    if truth is None and mi is None:
        mi = mi_relevance(dataset, cfg.data.max_len, min_target_samples=min_target_samples)
    loader = BatchLoader(
        dataset,
        split,
        LoaderConfig(batch_size=256, max_len=cfg.data.max_len, layout="pointwise", prefetch=0),
    )
    model.eval()
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    per_k: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    seen = 0
    for batch in loader:
        keep = (batch.label[:, 0] > 0.5).numpy()  # rank behaviours for positive targets
        if not keep.any():
            continue
        scores = model.search_scores(batch.to(device) if device.type != "cpu" else batch)
        if scores is None:
            return {"source": source, "available": False}
        scores = scores[:, 0, :].float().cpu().numpy()
        mask = batch.history_mask.numpy()
        rel = _relevance(batch, truth, mi, mask)
        if rel is None:
            continue
        rel, ok = rel
        sel = keep & ok
        for k in ks:
            per_k[k].append(ndcg_at_k(scores[sel], rel[sel], mask[sel], k))
        seen += int(sel.sum())
        if max_samples is not None and seen >= max_samples:
            break
    out = {"source": source, "available": True, "targets": seen}
    for k in ks:
        values = np.concatenate(per_k[k]) if per_k[k] else np.array([])
        values = values[~np.isnan(values)]
        out[f"ndcg@{k}"] = float(values.mean()) if len(values) else math.nan
    return out


def _relevance(batch, truth, mi: MIRelevance | None, mask: np.ndarray):
    """([B, L] relevance of every history slot, [B] usable) for the first target of each row."""
    b, length = mask.shape
    if truth is not None:
        samples = batch.sample_index[:, 0].numpy()
        lo = np.searchsorted(truth["sample"], samples, side="left")
        hi = np.searchsorted(truth["sample"], samples, side="right")
        counts = hi - lo
        owner = np.repeat(np.arange(b), counts)
        idx = (
            np.arange(counts.sum())
            - np.repeat(np.cumsum(counts) - counts, counts)
            + np.repeat(lo, counts)
        )
        hist_end = batch.history_end.numpy()
        slot = truth["store_row"][idx] - (hist_end[owner] - length)
        inside = (slot >= 0) & (slot < length)
        rel = np.zeros((b, length))
        np.add.at(rel, (owner[inside], slot[inside]), truth["relevance"][idx][inside])
        rel *= mask
        return rel, rel.sum(1) > 0
    cat = batch.history["category"].numpy()
    ct = batch.target["category"][:, 0].numpy()
    pos = np.broadcast_to(np.arange(length, 0, -1), (b, length))
    rel = (
        mi.lookup(np.broadcast_to(ct[:, None], (b, length)), cat, np.minimum(pos, mi.max_pos))
        * mask
    )
    ok = mi.eligible_targets[ct] & (rel.sum(1) > 0)
    return rel, ok
