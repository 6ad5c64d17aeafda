"""Does a trained run read the history? AUC with its own histories, with other users' and
with none, and how much attention goes to behaviours of the target's own item.

    python benchmarks/e2e_diagnosis.py RUN [RUN ...] [--splits train,test]

A model that predicts from the target alone scores the same with swapped histories; under
DARE's protocol such a model anti-generalises (docs/models.md, "Why the end-to-end models did
not learn on real data"). The attention share is read from `search_scores` (softmax over the
real behaviours), for models that expose one.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from longrec.data.batch import Batch
from longrec.data.dataset import PreparedDataset
from longrec.train.evaluate import evaluation_loader
from longrec.train.run_dir import load_run


def swapped(batch: Batch) -> Batch:
    """Every row's history replaced by the next row's."""
    order = torch.roll(torch.arange(batch.user.shape[0]), 1)
    return replace(
        batch,
        history={k: v[order] for k, v in batch.history.items()},
        history_mask=batch.history_mask[order],
        history_ts=batch.history_ts[order],
    )


def emptied(batch: Batch) -> Batch:
    return replace(batch, history_mask=torch.zeros_like(batch.history_mask))


@torch.no_grad()
def diagnose(run: str, split: str) -> dict[str, float]:
    model, cfg, _ = load_run(run)
    dataset = PreparedDataset(cfg.data.path)
    labels, scores = [], {"own": [], "swapped": [], "empty": []}
    share, rows = 0.0, 0
    for batch in evaluation_loader(model, dataset, split, cfg):
        mask = batch.target_mask
        labels.append(batch.label[mask].numpy())
        for name, fn in (("own", None), ("swapped", swapped), ("empty", emptied)):
            scores[name].append(model(fn(batch) if fn else batch)[mask].float().numpy())
        relevance = model.search_scores(batch)
        if relevance is not None and "item" in batch.history:
            real = batch.history_mask[:, None, :]
            weights = torch.softmax(relevance.masked_fill(~real, float("-inf")), -1)
            same = (batch.history["item"][:, None, :] == batch.target["item"][..., None]) & real
            hit = same.any(-1) & mask
            share += float((weights * same).sum(-1)[hit].sum())
            rows += int(hit.sum())
    y = np.concatenate(labels)
    out = {f"auc_{k}": roc_auc_score(y, np.concatenate(v)) for k, v in scores.items()}
    if rows:
        out["attention_on_same_item"] = share / rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--splits", default="train,test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        for split in args.splits.split(","):
            figures = diagnose(run, split)
            print(run, split, " ".join(f"{k} {v:.4f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
