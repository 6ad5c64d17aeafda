"""Tiny synthetic batches for the model tests, built directly (no dataset on disk).

Vocabularies: item 50, category 8, behaviour type 4 (event-side), and in one variant a
multi-valued item-side field `genres` (vocab 10, width 3). Item i (>= 2) has category
2 + i % 6, so categories 2..7 are real and 0/1 are padding/unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from longrec.data.batch import Batch
from longrec.data.schema import FieldSpec
from longrec.models.base import DataSchema

N_ITEMS, N_CATS, N_BEHAVIORS, N_GENRES, GENRE_WIDTH = 50, 8, 4, 10, 3
MAX_LEN = 64
REAL_CATS = np.arange(2, 8)


def item_category(items: np.ndarray) -> np.ndarray:
    return np.where(items >= 2, 2 + items % 6, 0)


def make_schema(genres: bool = False) -> DataSchema:
    fields = {
        "item": FieldSpec("item", N_ITEMS),
        "category": FieldSpec("category", N_CATS),
        "behavior": FieldSpec("behavior", N_BEHAVIORS, side="event"),
    }
    targets = ["item", "category"]
    if genres:
        fields["genres"] = FieldSpec("genres", N_GENRES, width=GENRE_WIDTH)
        targets.append("genres")
    return DataSchema(fields, tuple(targets), n_users=10, max_len=MAX_LEN)


def _genres(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-padded multi-valued ids: 1 to 3 genres per item."""
    g = rng.integers(2, N_GENRES, size=(*shape, GENRE_WIDTH))
    count = rng.integers(1, GENRE_WIDTH + 1, size=shape)
    return np.where(np.arange(GENRE_WIDTH) < count[..., None], g, 0)


def build_batch(
    schema: DataSchema,
    hist_items: list[np.ndarray],
    target_items: list[np.ndarray],
    rng: np.random.Generator,
    length: int,
    n_targets: int,
    labels: list[np.ndarray] | None = None,
) -> Batch:
    """A left-padded request batch from per-row item lists (categories follow the items)."""
    b = len(hist_items)
    genres = "genres" in schema.fields
    items = np.zeros((b, length), np.int64)
    ts = np.zeros((b, length), np.int64)
    hmask = np.zeros((b, length), bool)
    behavior = np.zeros((b, length), np.int64)
    hgen = np.zeros((b, length, GENRE_WIDTH), np.int64)
    t_items = np.zeros((b, n_targets), np.int64)
    tmask = np.zeros((b, n_targets), bool)
    tgen = np.zeros((b, n_targets, GENRE_WIDTH), np.int64)
    label = np.zeros((b, n_targets), np.float32)
    target_ts = np.full((b, n_targets), 10_000_000, np.int64)
    for r, (h, t) in enumerate(zip(hist_items, target_items, strict=True)):
        n, m = len(h), len(t)
        if n:
            items[r, length - n :] = h
            hmask[r, length - n :] = True
            behavior[r, length - n :] = rng.integers(1, N_BEHAVIORS, size=n)
            gaps = rng.integers(1, 200_000, size=n)  # strictly earlier than the target
            ts[r, length - n :] = 10_000_000 - np.cumsum(gaps)[::-1]
            hgen[r, length - n :] = _genres(rng, (n,))
        t_items[r, :m] = t
        tmask[r, :m] = True
        tgen[r, :m] = _genres(rng, (m,))
        if labels is not None:
            label[r, :m] = labels[r]
        else:
            label[r, :m] = rng.integers(0, 2, size=m)
    history = {
        "item": torch.from_numpy(items),
        "category": torch.from_numpy(item_category(items)),
        "behavior": torch.from_numpy(behavior),
    }
    target = {
        "item": torch.from_numpy(t_items),
        "category": torch.from_numpy(item_category(t_items)),
    }
    if genres:
        history["genres"] = torch.from_numpy(hgen)
        target["genres"] = torch.from_numpy(tgen)
    return Batch(
        user=torch.arange(b, dtype=torch.int64),
        history=history,
        history_mask=torch.from_numpy(hmask),
        history_ts=torch.from_numpy(ts),
        target=target,
        target_ts=torch.from_numpy(target_ts),
        label=torch.from_numpy(label),
        target_mask=torch.from_numpy(tmask),
        sample_index=torch.from_numpy(np.where(tmask, np.arange(b * n_targets).reshape(b, -1), -1)),
    )


def tiny_batch(schema: DataSchema, seed: int = 0) -> Batch:
    """B=4, M=3, L=16: an empty history, a full one and two partial ones; padded targets."""
    rng = np.random.default_rng(seed)
    lengths, n_targets = [0, 16, 5, 11], [1, 3, 2, 3]
    hist = [rng.integers(2, N_ITEMS, size=n) for n in lengths]
    # make some targets share a category with the history, so hard search finds matches
    targets = []
    for h, m in zip(hist, n_targets, strict=True):
        t = rng.integers(2, N_ITEMS, size=m)
        if len(h):
            t[0] = h[-1] + 6 if h[-1] + 6 < N_ITEMS else h[-1] - 6
        targets.append(t)
    return build_batch(schema, hist, targets, rng, length=16, n_targets=3)


def left_pad(batch: Batch, length: int) -> Batch:
    """The same batch re-padded to a longer L (prepend padding to every history tensor)."""
    extra = length - batch.history_len

    def pad(x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], extra, *x.shape[2:])
        return torch.cat((x.new_zeros(shape), x), dim=1)

    return replace(
        batch,
        history={k: pad(v) for k, v in batch.history.items()},
        history_mask=pad(batch.history_mask),
        history_ts=pad(batch.history_ts),
    )


def to_pointwise(batch: Batch) -> Batch:
    """Every real target as its own row (M = 1), history repeated: padded targets removed."""
    rows, cols = torch.nonzero(batch.target_mask, as_tuple=True)
    per_target = {"target", "target_ts", "label", "target_mask", "sample_index"}

    def take(name: str, x):
        if x is None:
            return None
        if isinstance(x, dict):
            return {k: take(name, v) for k, v in x.items()}
        return x[rows, cols].unsqueeze(1) if name in per_target else x[rows]

    return Batch(**{f.name: take(f.name, getattr(batch, f.name)) for f in fields(batch)})


def with_target_garbage(batch: Batch, seed: int = 1) -> Batch:
    """Random ids (and times) in the padded target slots; real targets unchanged."""
    gen = torch.Generator().manual_seed(seed)
    pad = ~batch.target_mask
    target = {}
    for k, v in batch.target.items():
        vocab = {"item": N_ITEMS, "category": N_CATS, "genres": N_GENRES}[k]
        noise = torch.randint(2, vocab, v.shape, generator=gen)
        m = pad.view(*pad.shape, *([1] * (v.dim() - 2)))
        target[k] = torch.where(m, noise, v)
    target_ts = torch.where(pad, torch.randint(0, 10**7, pad.shape, generator=gen), batch.target_ts)
    return replace(batch, target=target, target_ts=target_ts)


def category_task_batch(
    schema: DataSchema, rng: np.random.Generator, size: int = 64, max_len: int = 32
) -> Batch:
    """Label 1 iff the target's category appears in the history (vectorised, M = 1).

    Each user draws from 2 of the 6 categories; lengths are uniform in 0..max_len; half of the
    targets come from the user's categories, so classes are roughly balanced.
    """
    b, length = size, max_len
    cats = np.argsort(rng.random((b, len(REAL_CATS))), axis=1)[:, :2] + 2  # 2 distinct per user
    n = rng.integers(0, max_len + 1, size=b)
    hmask = np.arange(length) >= (length - n)[:, None]
    h_cat = np.take_along_axis(cats, rng.integers(0, 2, size=(b, length)), axis=1)
    items = _item_of(h_cat, rng)
    items = np.where(hmask, items, 0)
    t_cat = np.where(
        rng.random(b) < 0.5,
        np.take_along_axis(cats, rng.integers(0, 2, size=(b, 1)), axis=1)[:, 0],
        rng.choice(REAL_CATS, size=b),
    )
    t_items = _item_of(t_cat, rng)[:, None]
    label = ((item_category(items) == t_cat[:, None]) & hmask).any(1)[:, None]
    gaps = rng.integers(1, 200_000, size=(b, length))
    ts = np.where(hmask, 10_000_000 - np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1], 0)
    history = {
        "item": torch.from_numpy(items),
        "category": torch.from_numpy(item_category(items)),
        "behavior": torch.from_numpy(np.where(hmask, rng.integers(1, N_BEHAVIORS, (b, length)), 0)),
    }
    target = {
        "item": torch.from_numpy(t_items),
        "category": torch.from_numpy(item_category(t_items)),
    }
    if "genres" in schema.fields:
        history["genres"] = torch.from_numpy(
            np.where(hmask[..., None], _genres(rng, (b, length)), 0)
        )
        target["genres"] = torch.from_numpy(_genres(rng, (b, 1)))
    return Batch(
        user=torch.arange(b, dtype=torch.int64),
        history=history,
        history_mask=torch.from_numpy(hmask),
        history_ts=torch.from_numpy(ts),
        target=target,
        target_ts=torch.full((b, 1), 10_000_000, dtype=torch.int64),
        label=torch.from_numpy(label.astype(np.float32)),
        target_mask=torch.ones((b, 1), dtype=torch.bool),
    )


def _item_of(cat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random item of each category (item i has category 2 + i % 6; items 0, 1 -> 48, 49)."""
    items = (cat - 2) + 6 * rng.integers(0, 8, size=cat.shape)
    return np.where(items < 2, items + 48, items)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every model test runs single-threaded (tests/conftest.py: `one_thread`)."""


@pytest.fixture(params=[False, True], ids=["plain", "genres"])
def schema(request) -> DataSchema:
    return make_schema(genres=request.param)


@pytest.fixture
def batch(schema: DataSchema) -> Batch:
    return tiny_batch(schema)


def training_loss(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, BCE on the real targets plus the model's weighted auxiliary losses)."""
    logits, aux = model.forward_train(batch)
    m = batch.target_mask
    loss = F.binary_cross_entropy_with_logits(logits[m], batch.label[m])
    for extra, weight in aux:
        loss = loss + weight * F.binary_cross_entropy_with_logits(extra[m], batch.label[m])
    return logits, loss


def train_and_auc(model, train: list[Batch], held: Batch, lr: float = 0.01) -> float:
    """Adam over `train` once, then the held-out AUC of the first target of each row."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for batch in train:
        _, loss = training_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        scores = model(held)[:, 0]
    return roc_auc_score(held.label[:, 0].numpy(), scores.numpy())


@pytest.fixture(scope="session")
def helpers() -> dict[str, Callable]:
    return {
        "training_loss": training_loss,
        "train_and_auc": train_and_auc,
        "make_schema": make_schema,
        "tiny_batch": tiny_batch,
        "left_pad": left_pad,
        "to_pointwise": to_pointwise,
        "with_target_garbage": with_target_garbage,
        "category_task_batch": category_task_batch,
        "build_batch": build_batch,
    }
