"""A sample's history is the same whichever loader serves it: the training loader (shuffled,
pointwise or request layout, padded to whatever batch it lands in) and the evaluation loader
(request layout in split order, as `predict_split` builds it) must both give exactly the store
slice `[max(user_start, hist_end - max_len), hist_end)`. A difference would mean the model is
scored on histories other than those it was trained on."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch

from longrec.config import resolve
from longrec.data.batch import Batch
from longrec.data.dataset import PreparedDataset
from longrec.data.loader import BatchLoader, LoaderConfig
from longrec.train.evaluate import evaluation_loader

MAX_LEN = 64  # below most Taobao histories (>= 50 behaviours), so many are cut
TRAIN_BATCHES = 5
TRAIN_BATCH = 64  # requests (= samples pointwise); the test split has ~500 requests

History = dict[str, np.ndarray]  # store field -> values, plus "ts"


class _EveryField:
    """Stands in for a model in `evaluation_loader`: reads every store field and timestamps,
    so that the comparison covers all of them."""

    def history_fields(self) -> None:
        return None

    def reads_history_ts(self) -> bool:
        return True


def _histories(batches: Iterable[Batch]) -> dict[int, History]:
    """sample row -> its history without the left padding, from every target of the batches."""
    out: dict[int, History] = {}
    for batch in batches:
        length = batch.history_len
        for row in range(batch.batch_size):
            mask = batch.history_mask[row]
            n = int(mask.sum())
            # left padding: the real behaviours are the last n slots, most recent last
            assert torch.equal(mask, torch.arange(length) >= length - n)
            history = {name: v[row, length - n :].numpy() for name, v in batch.history.items()}
            history["ts"] = batch.history_ts[row, length - n :].numpy()
            for sample in batch.sample_index[row][batch.target_mask[row]].tolist():
                out[sample] = history
    return out


def _store_slice(ds: PreparedDataset, split: str, sample: int) -> History:
    cols, store = ds.split(split), ds.store
    end = int(cols["hist_end"][sample])
    start = max(int(store.offsets[cols["user"][sample]]), end - MAX_LEN)
    out = {name: np.asarray(values[start:end]) for name, values in store.fields.items()}
    out["ts"] = np.asarray(store.ts[start:end])
    return out


def _training_batches(ds: PreparedDataset, split: str, layout: str) -> list[Batch]:
    """The first batches of a shuffled epoch, as the trainer's loader cuts them."""
    loader = BatchLoader(
        ds,
        split,
        LoaderConfig(
            batch_size=TRAIN_BATCH, max_len=MAX_LEN, layout=layout, shuffle=True, prefetch=0
        ),
    )
    batches = loader.iter_epoch(1)
    return [next(batches) for _ in range(TRAIN_BATCHES)]


def _assert_same(got: History, want: History, sample: int, where: str) -> None:
    assert got.keys() == want.keys(), (where, sample)
    for name in want:
        assert np.array_equal(got[name], want[name]), (where, sample, name)


@pytest.mark.parametrize("split", ["train", "test"])
def test_training_and_evaluation_batches_hold_the_same_history(prepared_taobao, one_thread, split):
    ds = PreparedDataset(prepared_taobao)
    cfg = resolve(
        None,
        [f"data.max_len={MAX_LEN}", "data.eval_batch_size=512", "data.prefetch=0"],
        data__path=str(prepared_taobao),
    )
    evaluated = _histories(evaluation_loader(_EveryField(), ds, split, cfg))
    assert sorted(evaluated) == list(range(len(ds.split(split)["label"])))  # every sample once
    cut = 0
    for layout in ("pointwise", "request"):
        trained = _histories(_training_batches(ds, split, layout))
        assert len(trained) >= TRAIN_BATCHES * TRAIN_BATCH
        for sample, history in trained.items():
            want = _store_slice(ds, split, sample)
            _assert_same(history, want, sample, f"{layout} training loader")
            _assert_same(evaluated[sample], history, sample, "evaluation loader")
            cut += len(want["ts"]) == MAX_LEN
    assert cut > 0, "no history reached max_len: the cut is untested"


def test_evaluation_batches_are_bounded_in_behaviours(prepared_taobao, monkeypatch):
    """At long histories the evaluation batch holds fewer requests (its memory grows with
    requests x history), and every sample is still scored on the same history."""
    from longrec.train import evaluate

    cfg = resolve(None, [f"data.max_len={MAX_LEN}"], data__path=str(prepared_taobao))
    dataset = PreparedDataset(prepared_taobao)
    whole = _histories(evaluation_loader(_EveryField(), dataset, "test", cfg))
    monkeypatch.setattr(evaluate, "EVAL_BEHAVIOURS", 10 * MAX_LEN)
    assert evaluate.eval_batch_rows(cfg) == 10
    loader = evaluation_loader(_EveryField(), dataset, "test", cfg)
    batches = list(loader)
    assert max(b.user.shape[0] for b in batches) == 10
    small = _histories(batches)
    assert small.keys() == whole.keys()
    for row, hist in whole.items():
        for field, values in hist.items():
            np.testing.assert_array_equal(small[row][field], values)
