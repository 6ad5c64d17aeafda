"""The end-to-end models learn on real data and read the history to do so.

Each model trains briefly on the bundled Taobao sample under DARE's protocol (the session
fixture `prepared_taobao`; histories cut to 50, one epoch of batch 128, one thread; LONGER and
HSTU a little more) and must reach a test AUC bar set with a margin below what seeds 1-5
reached (measured figures next to each bar). Then the same trained model scores the test split with every request's history
swapped for another user's: a model that predicts from the target alone (the failure these
models had, docs/models.md) scores the same either way and fails the second assertion.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from longrec.config import resolve
from longrec.data.batch import Batch
from longrec.train.evaluate import evaluation_loader
from longrec.train.loop import Trainer
from longrec.train.run_dir import load_run

SETTINGS = [
    "data.max_len=50",
    "train.epochs=1",
    "train.batch_size=128",
    "train.eval_every=100",
    "train.progress=false",
    "train.threads=1",
]
# per model: extra settings (LONGER and HSTU need more steps to be stable) and the test AUC
# bar, with what seeds 1-5 reached in exactly this setup (`train.seed=S`) on 2026-12-07
MODELS = {
    "stca": ([], 0.75),  # 0.798-0.826; swapped-history drop 0.309-0.327
    # the target read-out with both scorers (2026-12-08): sasrec 0.801-0.808, drop 0.263-0.314;
    # hstu 0.790-0.813, drop 0.251-0.292
    "sasrec": ([], 0.75),
    "hstu": (["train.epochs=2"], 0.75),
    # target read-out, both scorers: 0.799-0.807; drop 0.247-0.287 (2026-12-08)
    "longer": (["train.epochs=2", "data.max_len=100"], 0.75),
}
MIN_SWAP_DROP = 0.05


def swap_histories(batch: Batch) -> Batch:
    """Every row's history replaced by the next row's (the last by the first's)."""
    order = torch.roll(torch.arange(batch.user.shape[0]), 1)
    return replace(
        batch,
        history={k: v[order] for k, v in batch.history.items()},
        history_mask=batch.history_mask[order],
        history_ts=batch.history_ts[order],
    )


@torch.no_grad()
def test_auc(run: Path, swap: bool) -> float:
    model, cfg, _ = load_run(run)
    from longrec.data.dataset import PreparedDataset

    labels, scores = [], []
    for batch in evaluation_loader(model, PreparedDataset(cfg.data.path), "test", cfg):
        if swap:
            batch = swap_histories(batch)
        logits = model(batch)
        labels.append(batch.label[batch.target_mask].numpy())
        scores.append(logits[batch.target_mask].float().numpy())
    return roc_auc_score(np.concatenate(labels), np.concatenate(scores))


test_auc.__test__ = False  # a helper, not a test


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_learns_from_the_history_on_real_data(name, prepared_taobao, tmp_path):
    extra, bar = MODELS[name]
    cfg = resolve(None, SETTINGS + extra, data__path=str(prepared_taobao), model__name=name)
    run = tmp_path / name
    metrics = Trainer(cfg, run).fit()
    auc = metrics["test"]["auc"]
    assert auc > bar, f"{name}: test AUC {auc:.3f} <= {bar}"
    assert test_auc(run, swap=False) == pytest.approx(auc, abs=1e-6)
    swapped = test_auc(run, swap=True)
    assert auc - swapped > MIN_SWAP_DROP, (
        f"{name}: test AUC {auc:.3f} with its own histories, {swapped:.3f} with other users': "
        "the model hardly reads the history"
    )
