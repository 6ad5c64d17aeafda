"""Predict a split and compute its metrics; evaluation always uses the request layout, which
computes each user's side once for all its targets (BatchNorm runs on running statistics in
eval mode, so the layout does not change a single score). The forward runs where the model
lives (`rt`: device and precision); the probabilities come back to the host for the metrics."""

from __future__ import annotations

import numpy as np
import torch

from longrec.config import RunConfig
from longrec.data.dataset import PreparedDataset
from longrec.data.loader import BatchLoader, LoaderConfig
from longrec.runtime import Runtime
from longrec.train.metrics import classification_metrics


def model_runtime(model, cfg: RunConfig) -> Runtime:
    """Where `model` lives, with the precision the run's setting resolves to there."""
    first = next(model.parameters(), None)
    device = str(first.device) if first is not None else "cpu"
    return Runtime.resolve(device, cfg.train.precision)


@torch.no_grad()
def predict_split(
    model, dataset: PreparedDataset, split: str, cfg: RunConfig, rt: Runtime | None = None
) -> dict[str, np.ndarray]:
    """Per sample of the split (in split order): user, label, probability; on `rt` (default:
    the model's device, under the run's precision)."""
    cols = dataset.split(split)
    n = len(cols["label"])
    probs = np.full(n, np.nan, dtype=np.float64)
    if n == 0:
        return {"user": cols["user"], "label": cols["label"], "prob": probs}
    rt = rt or model_runtime(model, cfg)
    loader = evaluation_loader(model, dataset, split, cfg, pin_memory=rt.cuda)
    model.eval()
    for batch in loader:
        with rt.autocast():
            logits = model(rt.put(batch))
        p = torch.sigmoid(logits.float()).cpu()
        idx = batch.sample_index[batch.target_mask].numpy()
        probs[idx] = p[batch.target_mask].numpy()
    return {"user": cols["user"], "label": cols["label"], "prob": probs}


# behaviour slots per evaluation batch at most: the default 4,096 requests at a 2.7K history
# took DARE's evaluation past 13 GB; scores do not depend on the batch (request layout, eval mode)
EVAL_BEHAVIOURS = 1 << 20


def eval_batch_rows(cfg: RunConfig) -> int:
    """`data.eval_batch_size`, fewer where the history is so long that the batch would hold
    more than EVAL_BEHAVIOURS behaviours."""
    return max(1, min(cfg.data.eval_batch_size, EVAL_BEHAVIOURS // max(cfg.data.max_len, 1)))


def evaluation_loader(
    model, dataset: PreparedDataset, split: str, cfg: RunConfig, pin_memory: bool = False
) -> BatchLoader:
    """The loader every evaluation reads: request layout in split order (each user's side once
    per request), only the history fields and timestamps the model reads."""
    return BatchLoader(
        dataset,
        split,
        LoaderConfig(
            batch_size=eval_batch_rows(cfg),
            max_len=cfg.data.max_len,
            layout="request",
            shuffle=False,
            prefetch=cfg.data.prefetch,
            history_fields=model.history_fields(),
            history_ts=model.reads_history_ts(),
            token_store=cfg.data.token_store,
            max_tokens=cfg.data.max_tokens,
            pin_memory=pin_memory,
        ),
    )


def evaluate_split(
    model, dataset: PreparedDataset, split: str, cfg: RunConfig, rt: Runtime | None = None
) -> dict:
    pred = predict_split(model, dataset, split, cfg, rt)
    if len(pred["label"]) == 0:
        return {}
    return classification_metrics(pred["user"], pred["label"], pred["prob"])
