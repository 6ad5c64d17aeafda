"""The model contract, for every registered model (new models are covered automatically).

Shapes and gradients, forward == score(encode_user), invariance to extra left padding and to
padded targets, the search stage never retrieving padding, and that each model learns a tiny
task (label = the target's category appears in the history).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from longrec.errors import UserError
from longrec.models import build_model, describe_models
from longrec.nn.search import hard_search, topk_search

NAMES = [name for name, _ in describe_models()]
MODELS_WITHOUT_SEARCH = {
    "td_sasrec",
    "sasrec",
    "hstu",
    "longer",
}  # encoders over the whole sequence
ATOL = 1e-5


def _model(name, schema, **params):
    torch.manual_seed(0)
    return build_model(name, schema, params or None)


@pytest.fixture(autouse=True)
def _kit(helpers):
    """conftest's training helpers as module globals (tests/ is not a package)."""
    global _loss, _train_and_auc
    _loss, _train_and_auc = helpers["training_loss"], helpers["train_and_auc"]


def test_registry_descriptions():
    for name, description in describe_models():
        assert description and "\n" not in description, name


# -- 1. forward / backward ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name, schema, batch):
    model = _model(name, schema)
    model.train()
    logits, loss = _loss(model, batch)
    assert logits.shape == batch.target_mask.shape
    assert torch.isfinite(logits).all()
    loss.backward()
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert tables
    for table in tables:
        assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0, table


# -- 2. forward == score(encode_user) -----------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_forward_equals_score_of_encode_user(name, schema, batch):
    model = _model(name, schema).eval()
    with torch.no_grad():
        direct = model(batch)
        split = model.score(model.encode_user(batch), batch)
    torch.testing.assert_close(direct, split, atol=ATOL, rtol=0)


# -- 3. extra left padding ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_extra_left_padding_changes_nothing(name, schema, batch, helpers):
    model = _model(name, schema).eval()
    longer = helpers["left_pad"](batch, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(longer), atol=ATOL, rtol=0)
        scores = model.search_scores(batch)
        if scores is not None:
            # the ranking of the real behaviours is what must not change
            longer_scores = model.search_scores(longer)[..., -batch.history_len :]
            pairs = batch.history_mask[:, None, :, None] & batch.history_mask[:, None, None, :]
            before = _order(scores)[pairs.expand(*scores.shape, -1)]
            assert torch.equal(before, _order(longer_scores)[pairs.expand(*scores.shape, -1)])


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Pairwise order of behaviours [B, M, L, L]: sign(s_i - s_j), ties 0 (up to 1e-6)."""
    diff = scores.unsqueeze(-1) - scores.unsqueeze(-2)
    return torch.where(diff.abs() <= 1e-6, 0, torch.sign(diff)).to(torch.int8)


# -- 4. the search stage never selects padding ---------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_search_scores_never_select_padding(name, schema, batch, helpers):
    model = _model(name, schema).eval()
    with torch.no_grad():
        scores = model.search_scores(helpers["left_pad"](batch, 24))
    if scores is None:  # a model without a search stage must be a known one, not a silent gap
        assert name in MODELS_WITHOUT_SEARCH
        return
    mask = helpers["left_pad"](batch, 24).history_mask
    assert scores.shape == (*batch.target_mask.shape, mask.shape[1])
    assert torch.isfinite(scores).all()
    for k in (1, 4, 20):
        idx, valid = topk_search(scores, mask, k)
        picked_real = torch.gather(mask.unsqueeze(1).expand_as(scores), 2, idx)
        assert not (valid & ~picked_real).any()
        expect = mask.sum(1).clamp_max(idx.shape[-1]).unsqueeze(1).expand(valid.shape[:2])
        assert torch.equal(valid.sum(-1), expect)


def _random_search_case(data, max_len: int = 12):
    b = data.draw(st.integers(1, 3))
    m = data.draw(st.integers(1, 3))
    length = data.draw(st.integers(1, max_len))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, m, length, generator=gen)
    if data.draw(st.booleans()):  # many ties
        scores = scores.round()
    mask = torch.rand(b, length, generator=gen) < data.draw(st.floats(0.0, 1.0))
    k = data.draw(st.integers(1, length + 3))
    return scores, mask, k, gen


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_topk_search_properties(data):
    scores, mask, k, _ = _random_search_case(data)
    idx, valid = topk_search(scores, mask, k)
    for b in range(scores.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        for m in range(scores.shape[1]):
            chosen = idx[b, m][valid[b, m]].tolist()
            assert set(chosen) <= set(real)  # never padding
            assert len(chosen) == len(set(chosen)) == min(k, len(real))
            best = sorted((scores[b, m, j].item() for j in real), reverse=True)[: len(chosen)]
            assert sorted((scores[b, m, j].item() for j in chosen), reverse=True) == best


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_hard_search_matches_naive(data):
    scores, mask, k, gen = _random_search_case(data)
    b, m, length = scores.shape
    hist_cat = torch.randint(2, 5, (b, length), generator=gen)
    tgt_cat = torch.randint(2, 5, (b, m), generator=gen)
    idx, valid = hard_search(hist_cat, tgt_cat, mask, k)
    for r in range(b):
        real = mask[r].nonzero().flatten().tolist()[::-1]  # most recent first
        for t in range(m):
            matches = [j for j in real if hist_cat[r, j] == tgt_cat[r, t]]
            others = [j for j in real if hist_cat[r, j] != tgt_cat[r, t]]
            expect = (matches + others)[:k]
            assert idx[r, t][valid[r, t]].tolist() == expect


# -- 5. padded targets --------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_padded_targets_change_nothing(name, schema, batch, helpers):
    model = _model(name, schema).eval()
    with torch.no_grad():
        logits = model(batch)
        garbage = model(helpers["with_target_garbage"](batch))
        pointwise = model(helpers["to_pointwise"](batch))
    mask = batch.target_mask
    assert (logits[~mask] == 0).all() and (garbage[~mask] == 0).all()
    torch.testing.assert_close(logits[mask], garbage[mask], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[mask], pointwise[:, 0], atol=ATOL, rtol=0)


# -- 6. every model learns ----------------------------------------------------------------
@pytest.fixture(scope="module")
def task_data(helpers):
    schema = helpers["make_schema"](False)
    rng = np.random.default_rng(0)
    train = [helpers["category_task_batch"](schema, rng) for _ in range(150)]
    held = helpers["category_task_batch"](schema, np.random.default_rng(1), size=1024)
    return schema, train, held


# Measured held-out AUC after 150 Adam steps (lr 0.01, batch 64, L <= 32) in exactly this
# setup: dare 0.9999, din 0.999, eta 0.9985, sdim 1.0, sim_hard 1.0, sim_soft 0.9895,
# twin 0.9999, twin_4e 0.9999, twin_hard 0.9996, twin_no_tr 0.9966, twin_proj 0.9999.
# Over seeds 0-2 (and a genres variant) every model stays >= 0.976 except twin_no_tr, which
# ranges 0.786-0.998 over 8 seeds: without TR the head must learn the target/history
# comparison from [v_t, h] alone, so its bar is lower. The end-to-end models over data and
# model seeds 0-4: stca 1.000,
# longer 0.964-0.992 (with its default merge of 4; before QK-norm and the identity init it
# ended anywhere in 0.53-0.82), hstu 0.922-0.986.
LEARN_BAR = 0.9
LEARN_BAR_EXCEPTIONS = {"twin_no_tr": 0.7}


def _swapped(batch):
    """Every row's history replaced by the next row's."""
    order = torch.roll(torch.arange(batch.user.shape[0]), 1)
    return replace(
        batch,
        history={k: v[order] for k, v in batch.history.items()},
        history_mask=batch.history_mask[order],
        history_ts=batch.history_ts[order],
    )


@pytest.mark.parametrize("name", NAMES)
def test_model_learns(name, task_data):
    """Learns the task, and from the history: with every held-out row's history swapped for
    another row's, its AUC falls at least halfway back to chance (a model that scored the
    target alone would not move)."""
    schema, train, held = task_data
    model = _model(name, schema)
    auc = _train_and_auc(model, train, held)
    bar = LEARN_BAR_EXCEPTIONS.get(name, LEARN_BAR)
    assert auc > bar, f"{name}: AUC {auc:.3f} <= {bar}"
    with torch.no_grad():
        scores = model(_swapped(held))[:, 0]
    swapped = roc_auc_score(held.label[:, 0].numpy(), scores.numpy())
    assert auc - swapped > (auc - 0.5) / 2, f"{name}: AUC {auc:.3f}, swapped {swapped:.3f}"


# -- model-specific checks ----------------------------------------------------------------
def test_sim_hard_retrieves_only_the_target_category(schema, batch):
    model = _model("sim_hard", schema).eval()
    state = model.encode_user(batch)
    idx, valid, _ = model._search(state, batch)
    cat = torch.gather(batch.history["category"].unsqueeze(1).expand(-1, idx.shape[1], -1), 2, idx)
    assert (cat[valid] == batch.target["category"].unsqueeze(-1).expand_as(cat)[valid]).all()
    filled = _model("sim_hard", schema, fill=True)
    _, valid_fill, _ = filled._search(filled.encode_user(batch), batch)
    assert valid_fill.sum() > valid.sum()  # TWIN-style filling adds non-matching behaviours


@pytest.mark.parametrize("average", ["all", "hit"])
def test_sdim_bucket_and_match_pooling_agree(schema, batch, average):
    buckets = _model("sdim", schema, pooling="buckets", average=average).eval()
    match = _model("sdim", schema, pooling="match", average=average).eval()
    match.load_state_dict(buckets.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(buckets(batch), match(batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("eta", {"esu": "multihead"}),
        ("sdim", {"average": "hit"}),
        ("sim_soft", {"gsu_shared": True}),
        ("dare", {"attention_sink": True}),
        ("din", {"normalize": False}),
        ("din", {"normalize": False, "top_k": 4}),
        ("twin", {"attention_sink": True, "search": "full"}),
    ],
)
def test_model_options_run(name, params, schema, batch, helpers):
    model = _model(name, schema, **params)
    _, loss = _loss(model.train(), batch)
    loss.backward()
    model.eval()
    with torch.no_grad():
        logits = model(batch)
        torch.testing.assert_close(logits, model(helpers["left_pad"](batch, 40)), atol=ATOL, rtol=0)
    assert torch.isfinite(logits).all()


def test_sdim_pooling_equals_naive(schema, batch):
    model = _model("sdim", schema, hashes=4, bits_per_hash=2, pooling="buckets").eval()
    with torch.no_grad():
        sem, pos = model.tables.history(batch)
        values = torch.cat((sem, pos.expand(sem.shape[0], -1, -1)), dim=-1)
        hc, tc = model._codes(sem), model._codes(model.tables.target(batch)[0])
        b, m = batch.target_mask.shape
        expect = torch.zeros(b, m, values.shape[-1])
        for r in range(b):
            for t in range(m):
                for h in range(4):
                    total = torch.zeros(values.shape[-1])
                    for j in range(batch.history_len):
                        if batch.history_mask[r, j] and hc[r, j, h] == tc[r, t, h]:
                            total += values[r, j]
                    norm = total.norm()
                    expect[r, t] += (total / norm if norm > 0 else total) / 4
        state = model.encode_user(batch)
        table = F.normalize(state["buckets"], dim=-1).view(b, 4, 4, -1)  # [B, m, C, D]
        got = torch.stack(
            [
                torch.stack([table[r, h, tc[r, t, h]] for h in range(4)]).mean(0)
                for r in range(b)
                for t in range(m)
            ]
        ).view(b, m, -1)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)


def test_eta_retrieves_by_hamming_then_recency(schema, batch):
    model = _model("eta", schema, top_k=4).eval()
    with torch.no_grad():
        state = model.encode_user(batch)
        target = model.tables.target(batch)[0]
        sim = (model._signs(target).unsqueeze(2) == state["signs"].unsqueeze(1)).sum(-1)
        idx, valid = topk_search(model._search_key(state, target), batch.history_mask, 4)
    for r in range(batch.batch_size):
        real = batch.history_mask[r].nonzero().flatten().tolist()
        for t in range(batch.num_targets):
            order = sorted(real, key=lambda j, r=r, t=t: (-int(sim[r, t, j]), -j))[:4]
            assert idx[r, t][valid[r, t]].tolist() == order


def test_sim_soft_loss_weights(schema, batch):
    model = _model("sim_soft", schema, gsu_weight=0.5, esu_weight=2.0).train()
    logits, aux = model.forward_train(batch)
    assert [w for _, w in aux] == [0.5, 1.0]  # L_ESU + 0.5 L_GSU + (2 - 1) L_ESU
    assert aux[1][0] is logits
    hard = _model("sim_hard", schema).train()
    assert hard.forward_train(batch)[1] == []  # hard search: nonparametric GSU, α = 0


# -- 7. bad parameters ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("stca", {"history_ffn_depth": 0}, "depth must be >= 1"),
        ("stca", {"kernel": "fast"}, "kernel must be one of"),
        ("longer", {"merge": "sum"}, "merge must be one of"),
    ],
)
def test_bad_parameter_values_are_user_errors(name, params, message, schema):
    """A constructor's parameter check reaches the user as one line naming the model, not as a
    traceback."""
    with pytest.raises(UserError, match=f"model '{name}': .*{message}"):
        build_model(name, schema, params)


def test_din_without_normalisation_keeps_the_count(schema, batch):
    """normalize=False (the original DIN) weights each real behaviour by its raw score, so the
    weights do not sum to one and padding gets none; the softmax version sums to one."""
    raw = _model("din", schema, normalize=False)
    soft = _model("din", schema)
    scores = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False, True, True], [False] * 5])
    w = raw._weights(scores, mask)
    torch.testing.assert_close(w[0][:, mask[0]], scores[0][:, mask[0]])
    assert (w[0][:, ~mask[0]] == 0).all() and (w[1] == 0).all()
    torch.testing.assert_close(soft._weights(scores, mask)[0].sum(-1), torch.ones(3))
