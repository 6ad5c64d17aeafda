"""td_sasrec beyond the generic model contract (test_models.py): per-type user vectors, target
independence of the user state, causality and padding, schemas with and without target types,
every option, and learning a task where the label depends on target type x recency."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from longrec.data.batch import Batch
from longrec.errors import UserError
from longrec.models import build_model
from longrec.models.base import DataSchema

N_TYPES = 4  # vocabulary: 0 = padding, 1 = unseen, 2 and 3 = real types
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _kit(helpers):
    """conftest's builders as module globals (tests/ is not a package)."""
    global make_schema, tiny_batch
    make_schema, tiny_batch = helpers["make_schema"], helpers["tiny_batch"]


def item_category(items: np.ndarray) -> np.ndarray:
    """As conftest: item i >= 2 has category 2 + i % 6."""
    return np.where(items >= 2, 2 + items % 6, 0)


def item_of(cat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random item of each category (as conftest's _item_of)."""
    items = (cat - 2) + 6 * rng.integers(0, 8, size=cat.shape)
    return np.where(items < 2, items + 48, items)


def typed_schema(genres: bool = False) -> DataSchema:
    base = make_schema(genres)
    return replace(base, target_fields=(*base.target_fields, "target_type"), n_target_types=N_TYPES)


def with_types(batch: Batch, types: torch.Tensor | int | None = None, seed: int = 0) -> Batch:
    """The batch with a target_type per target (real types 2..3 at random, 0 on padding)."""
    if types is None:
        gen = torch.Generator().manual_seed(seed)
        types = torch.randint(2, N_TYPES, batch.target_mask.shape, generator=gen)
    elif isinstance(types, int):
        types = torch.full(batch.target_mask.shape, types)
    types = torch.where(batch.target_mask, types, 0)
    return replace(batch, target={**batch.target, "target_type": types})


def _model(schema, **params):
    torch.manual_seed(0)
    return build_model("td_sasrec", schema, params or None)


def _left_pad(batch: Batch, length: int) -> Batch:
    extra = length - batch.history_len

    def pad(x):
        return torch.cat((x.new_zeros((x.shape[0], extra, *x.shape[2:])), x), dim=1)

    return replace(
        batch,
        history={k: pad(v) for k, v in batch.history.items()},
        history_mask=pad(batch.history_mask),
        history_ts=pad(batch.history_ts),
    )


# -- per-type user vectors ----------------------------------------------------------------
@pytest.mark.parametrize("decouple", ["position", "query"])
def test_target_types_get_different_user_vectors(decouple):
    schema = typed_schema()
    model = _model(schema, decouple=decouple, init_std=0.1).eval()
    batch = tiny_batch(schema)
    with torch.no_grad():
        users = model.encode_user(batch)["user"]
        two, three = model(with_types(batch, 2)), model(with_types(batch, 3))
    assert users.shape == (batch.batch_size, N_TYPES - 1, model.dim)
    for a, b in itertools.combinations(range(N_TYPES - 1), 2):
        assert (users[:, a] - users[:, b]).abs().amax(-1).min() > 1e-4, (a, b)
    m = batch.target_mask
    assert (two[m] - three[m]).abs().min() > 1e-6  # same history and targets, other type


def test_no_decoupling_gives_one_user_vector_for_every_type():
    schema = typed_schema()
    model = _model(schema, decouple="none", init_std=0.1).eval()
    batch = tiny_batch(schema)
    with torch.no_grad():
        users = model.encode_user(batch)["user"]
        logits = [model(with_types(batch, k)) for k in range(N_TYPES)]
    assert users.shape == (batch.batch_size, 1, model.dim)
    for other in logits[1:]:
        torch.testing.assert_close(logits[0], other, atol=0, rtol=0)


def test_unseen_type_uses_the_generic_row():
    """Type ids 0 (padding) and 1 (unseen) map to row 0; under `delta` tables that row is the
    shared table, the same as a batch without target types."""
    schema = typed_schema()
    model = _model(schema, init_std=0.1).eval()
    batch = tiny_batch(schema)
    with torch.no_grad():
        unseen = model(with_types(batch, 1))
        missing = model(batch)  # no "target_type" in the batch
        rows = model.type_rows(with_types(batch, torch.tensor([[0, 1, 2], [3, 2, 1]]).repeat(2, 1)))
    torch.testing.assert_close(unseen, missing, atol=0, rtol=0)
    m = batch.target_mask
    assert rows[m].tolist() == [0, 2, 1, 0, 0, 0, 2, 1, 0]  # real type k -> row k - 1
    delta = model.pos.delta.weight.view(N_TYPES - 2, model.max_len + 1, -1)
    positions = torch.arange(model.max_len + 1)
    torch.testing.assert_close(model.pos.all_types(positions)[0], model.pos.shared(positions))
    torch.testing.assert_close(
        model.pos.all_types(positions)[1:], model.pos.shared(positions) + delta
    )


# -- the user state does not depend on the targets ----------------------------------------
@pytest.mark.parametrize("decouple", ["position", "query", "none"])
def test_user_state_ignores_targets(decouple):
    schema = typed_schema()
    model = _model(schema, decouple=decouple).eval()
    batch = with_types(tiny_batch(schema, seed=0), seed=0)
    other_targets = with_types(tiny_batch(schema, seed=5), seed=7)
    other = replace(
        batch,
        target=other_targets.target,
        target_ts=other_targets.target_ts + 123,
        label=1 - batch.label,
        target_mask=other_targets.target_mask,
        sample_index=None,
    )
    with torch.no_grad():
        a, b = model.encode_user(batch), model.encode_user(other)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- causality and padding ----------------------------------------------------------------
@pytest.mark.parametrize("decouple", ["position", "query"])
def test_causal_later_behaviours_never_reach_earlier_positions(decouple):
    schema = typed_schema()
    model = _model(schema, decouple=decouple, init_std=0.1).eval()
    batch = tiny_batch(schema)  # row 1 is a full history of 16
    j = 10
    changed = replace(batch, history={**batch.history})
    for f in ("item", "category"):
        changed.history[f] = batch.history[f].clone()
    changed.history["item"][1, j] = (batch.history["item"][1, j] + 1 - 2) % 48 + 2
    changed.history["category"][1, j] = torch.from_numpy(
        item_category(changed.history["item"][1, j].numpy())
    )
    with torch.no_grad():
        before = model.hidden_states(batch, last_only=False)
        after = model.hidden_states(changed, last_only=False)
    torch.testing.assert_close(before[:, :, :j], after[:, :, :j], atol=0, rtol=0)
    assert (before[1, :, j:] - after[1, :, j:]).abs().amax() > 1e-4  # and it does reach later
    torch.testing.assert_close(before[[0, 2, 3]], after[[0, 2, 3]], atol=0, rtol=0)


@pytest.mark.parametrize("decouple", ["position", "query", "none"])
def test_padded_slots_never_leak(decouple):
    """Garbage ids in the padded (earlier) slots change nothing; all-padding rows are finite in
    training mode, with dropout, and give finite gradients."""
    schema = typed_schema()
    model = _model(schema, decouple=decouple, init_std=0.1).eval()
    batch = with_types(_left_pad(tiny_batch(schema), 24))
    pad = ~batch.history_mask
    gen = torch.Generator().manual_seed(3)
    items = torch.where(pad, torch.randint(2, 50, pad.shape, generator=gen), batch.history["item"])
    cats = torch.from_numpy(item_category(items.numpy()))
    garbage = replace(batch, history={**batch.history, "item": items, "category": cats})
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(garbage), atol=ATOL, rtol=0)
        real = batch.history_mask[:, None, :, None]
        torch.testing.assert_close(
            model.hidden_states(batch, last_only=False).masked_select(real),
            model.hidden_states(garbage, last_only=False).masked_select(real),
            atol=ATOL,
            rtol=0,
        )
    empty = replace(
        batch, history_mask=torch.zeros_like(batch.history_mask), target_mask=batch.target_mask
    )
    train = _model(schema, decouple=decouple, dropout=0.3).train()
    logits = train(empty)
    assert torch.isfinite(logits).all()
    F.binary_cross_entropy_with_logits(
        logits[batch.target_mask], batch.label[batch.target_mask]
    ).backward()
    for name, p in train.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad.to_dense()).all(), name


def test_only_the_most_recent_max_len_behaviours_count():
    schema = typed_schema()
    model = _model(schema, max_len=5, init_std=0.1).eval()
    batch = with_types(tiny_batch(schema))
    items = batch.history["item"].clone()
    items[:, :-5] = torch.where(batch.history_mask[:, :-5], 2, 0)
    cats = torch.from_numpy(item_category(items.numpy()))
    older = replace(batch, history={**batch.history, "item": items, "category": cats})
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(older), atol=ATOL, rtol=0)
    assert model.pos.shared.num_embeddings == 6


# -- every option, with and without target types ------------------------------------------
OPTIONS = [
    {"decouple": d, "head": h, "norm": n, "type_tables": t}
    for d, h, n, t in itertools.product(
        ["position", "query", "none"], ["mlp", "dot"], ["pre", "post"], ["delta", "separate"]
    )
    if not (d == "none" and t == "separate")  # one type: no per-type tables
] + [
    {"decouple": "none", "type_in_head": True},
    {"encoder_init": "default", "ffn_dim": 8, "n_layers": 1, "n_heads": 4, "dropout": 0.1},
    {"target_pos": False, "dedup": True},
    {"n_layers": 0},
    {"decouple": "none", "readout": "tokens"},
    {"decouple": "none", "readout": "encoded"},
    {"decouple": "query", "readout": "tokens", "n_layers": 1},
]


@pytest.mark.parametrize("typed", [True, False], ids=["types", "no_types"])
@pytest.mark.parametrize("params", OPTIONS, ids=lambda p: ",".join(f"{v}" for v in p.values()))
def test_options(params, typed):
    schema = typed_schema() if typed else make_schema()
    assert (schema.n_target_types == 0) != typed
    batch = tiny_batch(schema)
    if typed:
        batch = with_types(batch)
    model = _model(schema, **params)
    logits = model.train()(batch)
    m = batch.target_mask
    F.binary_cross_entropy_with_logits(logits[m], batch.label[m]).backward()
    model.eval()
    with torch.no_grad():
        state = model.encode_user(batch)
        direct = model(batch)
        torch.testing.assert_close(direct, model.score(state, batch), atol=ATOL, rtol=0)
        torch.testing.assert_close(direct, model(_left_pad(batch, 40)), atol=ATOL, rtol=0)
    expect_t = N_TYPES - 1 if typed and params.get("decouple", "position") != "none" else 1
    assert state["user"].shape == (batch.batch_size, expect_t, model.dim)
    assert torch.isfinite(direct).all() and (direct[~m] == 0).all()


def test_sparse_embeddings_work_with_sparse_adam():
    schema = typed_schema()
    for decouple in ("position", "query"):
        torch.manual_seed(0)
        model = build_model(
            "td_sasrec", schema, {"decouple": decouple}, sparse_embeddings=True
        ).train()
        batch = with_types(tiny_batch(schema))
        logits = model(batch)
        m = batch.target_mask
        F.binary_cross_entropy_with_logits(logits[m], batch.label[m]).backward()
        embed = model.embedding_parameters()
        assert embed and all(p.grad is not None and p.grad.is_sparse for p in embed)
        torch.optim.SparseAdam(embed, lr=0.01).step()


@pytest.mark.parametrize(
    "params",
    [
        {"decouple": "x"},
        {"head": "x"},
        {"norm": "x"},
        {"type_tables": "x"},
        {"encoder_init": "x"},
        {"n_heads": 5},
        {"head": "dot", "type_in_head": True},
        {"readout": "x"},
        {"readout": "tokens", "decouple": "position"},
        {"readout": "encoded", "decouple": "none", "head": "dot"},
    ],
)
def test_bad_parameters_raise(params):
    with pytest.raises(UserError):
        _model(typed_schema(), **params)


# -- learning a target type x recency interaction -----------------------------------------
def type_recency_batch(
    rng: np.random.Generator, b: int = 64, length: int = 16, m: int = 2
) -> Batch:
    """Each user draws behaviours from 3 of the 6 categories; each of m targets gets type 2 or 3.
    Type 2 is positive iff the MOST RECENT behaviour's category equals the target's, type 3 iff
    ANY behaviour's does. Targets are the last behaviour's category, another of the user's
    categories or any category (1/3 each), so a target of the user's categories that is not the
    last one is positive for type 3 and negative for type 2: a type-blind model cannot rank it."""
    cats = np.argsort(rng.random((b, 6)), axis=1)[:, :3] + 2
    n = rng.integers(1, length + 1, size=b)
    hmask = np.arange(length) >= (length - n)[:, None]
    items = np.where(
        hmask, item_of(np.take_along_axis(cats, rng.integers(0, 3, (b, length)), 1), rng), 0
    )
    h_cat = item_category(items)
    last = h_cat[:, -1:]
    kind = rng.integers(0, 3, size=(b, m))
    user_cat = np.take_along_axis(cats, rng.integers(0, 3, (b, m)), 1)
    t_cat = np.where(kind == 0, last, np.where(kind == 1, user_cat, rng.integers(2, 8, (b, m))))
    t_items = item_of(t_cat, rng)
    t_type = rng.integers(2, 4, size=(b, m))
    in_history = ((h_cat[:, None, :] == t_cat[:, :, None]) & hmask[:, None, :]).any(-1)
    label = np.where(t_type == 2, t_cat == last, in_history).astype(np.float32)
    gaps = rng.integers(1, 1000, (b, length))
    ts = np.where(hmask, 10_000_000 - np.cumsum(gaps[:, ::-1], 1)[:, ::-1], 0)
    t = torch.from_numpy
    return Batch(
        user=torch.arange(b),
        history={
            "item": t(items),
            "category": t(h_cat),
            "behavior": t(hmask.astype(np.int64)),
        },
        history_mask=t(hmask),
        history_ts=t(np.ascontiguousarray(ts)),
        target={
            "item": t(t_items),
            "category": t(item_category(t_items)),
            "target_type": t(t_type),
        },
        target_ts=torch.full((b, m), 10_000_000),
        label=t(label),
        target_mask=torch.ones(b, m, dtype=torch.bool),
    )


def _train_auc(schema, params, train, held, lr=0.003) -> float:
    model = _model(schema, **params).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for batch in train:
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        scores = model(held)
    return roc_auc_score(held.label.numpy().ravel(), scores.numpy().ravel())


# Measured held-out AUC (1024 users x 2 targets) after 200 Adam steps (lr 0.003, batch 64,
# L <= 16), model seeds 0-4, in exactly this setup:
#   position (default)        0.9999 0.9994 0.9983 0.9995 0.9981
#   query                     0.9890 0.9823 0.9879 0.9987 0.9993
#   none (plain SASRec)       0.9486 0.9462 0.9376 0.9326 0.9339   (type-blind: see the batch)
#   none + type_in_head       0.9977 0.9955 0.9970 0.9969 0.9865
#   position, head=dot        1.0000 x5;  none, head=dot 0.9510-0.9559
# Within each type a type-blind model ranks well (type 2 ~1.0, type 3 >= 0.93); what it cannot
# do is order type-2 negatives below type-3 positives of the same (history, target).
# lr 0.01 is less stable for this transformer (position 0.970-0.999, query ~0.67 at lr 0.01).
LEARN_BAR = 0.99
NONE_GAP = 0.02  # measured gap position - none: >= 0.049 over seeds 0-4


def test_learns_type_times_recency():
    schema = typed_schema()
    rng = np.random.default_rng(0)
    train = [type_recency_batch(rng) for _ in range(200)]
    held = type_recency_batch(np.random.default_rng(1), b=1024)
    position = _train_auc(schema, {}, train, held)
    none = _train_auc(schema, {"decouple": "none"}, train, held)
    assert position > LEARN_BAR, f"td_sasrec (position): AUC {position:.4f} <= {LEARN_BAR}"
    assert none < position - NONE_GAP, f"none {none:.4f} vs position {position:.4f}"
