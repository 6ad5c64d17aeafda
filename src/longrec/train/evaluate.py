"""Predict a split and compute its metrics; evaluation always uses the request layout, which
computes each user's side once for all its targets (BatchNorm runs on running statistics in
eval mode, so the layout does not change a single score)."""

from __future__ import annotations

import numpy as np
import torch

from longrec.config import RunConfig
from longrec.data.dataset import PreparedDataset
from longrec.data.loader import BatchLoader, LoaderConfig
from longrec.train.metrics import classification_metrics


@torch.no_grad()
def predict_split(
    model, dataset: PreparedDataset, split: str, cfg: RunConfig
) -> dict[str, np.ndarray]:
    """Per sample of the split (in split order): user, label, probability."""
    cols = dataset.split(split)
    n = len(cols["label"])
    probs = np.full(n, np.nan, dtype=np.float64)
    if n == 0:
        return {"user": cols["user"], "label": cols["label"], "prob": probs}
    loader = evaluation_loader(model, dataset, split, cfg)
    model.eval()
    for batch in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
            logits = model(batch)
        p = torch.sigmoid(logits.float())
        idx = batch.sample_index[batch.target_mask].numpy()
        probs[idx] = p[batch.target_mask].numpy()
    return {"user": cols["user"], "label": cols["label"], "prob": probs}


def evaluation_loader(model, dataset: PreparedDataset, split: str, cfg: RunConfig) -> BatchLoader:
    """The loader every evaluation reads: request layout in split order (each user's side once
    per request), only the history fields and timestamps the model reads."""
    return BatchLoader(
        dataset,
        split,
        LoaderConfig(
            batch_size=cfg.data.eval_batch_size,
            max_len=cfg.data.max_len,
            layout="request",
            shuffle=False,
            prefetch=cfg.data.prefetch,
            history_fields=model.history_fields(),
            history_ts=model.reads_history_ts(),
            token_store=cfg.data.token_store,
            max_tokens=cfg.data.max_tokens,
        ),
    )


def evaluate_split(model, dataset: PreparedDataset, split: str, cfg: RunConfig) -> dict:
    pred = predict_split(model, dataset, split, cfg)
    if len(pred["label"]) == 0:
        return {}
    return classification_metrics(pred["user"], pred["label"], pred["prob"])
