"""STCA (models.stca; docs/models.md, "STCA") beyond the model contract of test_models.py: the history transform
is target-independent and computed once per user, request-level scoring equals pointwise
scoring, and the speed options (token de-duplication, activation checkpointing, the
re-associated kernel, bf16 autocast) change nothing but speed (or precision, for bf16)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longrec.errors import UserError
from longrec.models import build_model
from longrec.models.stca import StcaModel

ATOL = 1e-5


def _model(schema, **params) -> StcaModel:
    torch.manual_seed(0)
    return build_model("stca", schema, params or None)


def _request_batch(helpers, schema, seed=0, b=3, m=5, length=40, repeats=False):
    """B requests of M real targets each (one request time), histories of mixed length; with
    `repeats`, each history draws from a handful of items (token de-duplication kicks in)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 3, length + 1, size=b)
    lengths[0] = length
    hist = []
    for n in lengths:
        pool = rng.integers(2, 50, size=4) if repeats else np.arange(2, 50)
        hist.append(rng.choice(pool, size=n))
    targets = [rng.integers(2, 50, size=m) for _ in range(b)]
    batch = helpers["build_batch"](schema, hist, targets, rng, length=length, n_targets=m)
    if repeats and "genres" in batch.history:  # genres of an item: fixed, 1-3 of them
        item = batch.history["item"].unsqueeze(-1)
        genres = 2 + (item * torch.tensor([1, 3, 5])) % 8
        genres = torch.where(torch.arange(3) < 1 + item % 3, genres, 0)
        batch.history["genres"] = torch.where(item > 0, genres, 0)
    return batch


def _loss(model, batch):
    logits, _ = model.forward_train(batch)
    m = batch.target_mask
    return F.binary_cross_entropy_with_logits(logits[m], batch.label[m])


def _assert_states_equal(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


# -- the user side ------------------------------------------------------------------------
@pytest.mark.parametrize("time_delta", [False, True])
def test_encode_user_does_not_depend_on_targets(schema, batch, helpers, time_delta):
    model = _model(schema, time_delta=time_delta).eval()
    other = helpers["with_target_garbage"](batch)  # padded target slots: other ids and times
    gen = torch.Generator().manual_seed(3)
    other = replace(
        other,
        target={k: torch.randint(2, 8, v.shape, generator=gen) for k, v in other.target.items()},
        label=1 - batch.label,
    )
    if not time_delta:  # without the time delta not even the request time matters
        other = replace(other, target_ts=other.target_ts - 12345)
    with torch.no_grad():
        _assert_states_equal(model.encode_user(batch), model.encode_user(other))


@pytest.mark.parametrize("time_delta", [False, True])
def test_request_equals_pointwise(schema, helpers, time_delta):
    """M targets scored in one request (one history transform) give the logits of the B·M
    pointwise rows (history repeated, M = 1 each), in eval mode."""
    model = _model(schema, time_delta=time_delta).eval()
    batch = _request_batch(helpers, schema)
    with torch.no_grad():
        request = model(batch)
        pointwise = model(helpers["to_pointwise"](batch))
    assert request.shape == (3, 5)
    torch.testing.assert_close(request.reshape(-1), pointwise[:, 0], atol=ATOL, rtol=0)


def _count_history_calls(model: StcaModel) -> list[tuple[int, ...]]:
    """Input shapes of every run of the history stacks (hooked on their first SwiGLU: a
    checkpointed recompute stops once it has what the backward needs)."""
    calls: list[tuple[int, ...]] = []
    for stack in model.history_ffn:
        stack.ffns[0].register_forward_hook(
            lambda _m, args, _out: calls.append(tuple(args[0].shape))
        )
    return calls


@pytest.mark.parametrize("per_layer", [False, True])
def test_history_transform_runs_once_per_user(schema, helpers, per_layer):
    batch = _request_batch(helpers, schema)  # B = 3, M = 5, L = 40
    params = {"history_per_layer": per_layer, "layers": 2, "tied_query": False}
    model = _model(schema, token_dedup=False, **params).train()
    calls = _count_history_calls(model)
    _loss(model, batch).backward()
    n_stacks = model.params.layers if per_layer else 1
    assert calls == [(3, 40, model.dim)] * n_stacks  # [B, L, d]: not B·M rows
    # with de-duplication: once, on at most B·L distinct tokens
    model = _model(schema, **params).eval()
    calls = _count_history_calls(model)
    with torch.no_grad():
        model(_request_batch(helpers, schema, repeats=True))
    assert len(calls) == n_stacks
    assert all(len(c) == 2 and c[0] <= 3 * 40 // 2 for c in calls)


def test_tied_queries_go_through_the_history_transform(schema, helpers):
    """With `tied_query` the stack also maps the queries ([B, M, d]), never B·M histories."""
    batch = _request_batch(helpers, schema)
    model = _model(schema, token_dedup=False, layers=2).train()
    calls = _count_history_calls(model)
    _loss(model, batch).backward()
    assert calls == [(3, 40, model.dim), (3, 5, model.dim), (3, 5, model.dim)]


def test_starts_as_similarity_search(schema, helpers):
    """At init (identity attention, residual stack at identity) a target's attention peaks on
    the history slots holding the same item: relevance is the embeddings' similarity."""
    batch = _request_batch(helpers, schema, b=2, m=1, length=30)
    target = {f: v.clone() for f, v in batch.target.items()}
    for f in target:
        target[f][:, 0] = batch.history[f][:, -7]  # the target is the 7th most recent behaviour
    batch = replace(batch, target=target)
    model = _model(schema).eval()
    with torch.no_grad():
        scores = model.search_scores(batch)[:, 0]  # [B, L]
    same = batch.history["item"] == batch.target["item"][:, :1]
    for row in range(2):
        assert (
            scores[row][same[row]].min() > scores[row][~same[row] & batch.history_mask[row]].max()
        )
    # QK-norm bounds every score by the temperature
    assert scores.abs().max() <= model.params.temperature + 1e-5


# -- speed options change nothing -----------------------------------------------------------
def test_token_dedup_is_exact(schema, helpers):
    batch = _request_batch(helpers, schema, repeats=True)
    model = _model(schema, time_delta=True).eval()
    plain = _model(schema, time_delta=True, token_dedup=False).eval()
    parts = model._history_parts(batch)
    assert model._distinct_tokens(parts) is not None  # the de-duplicated path is taken
    with torch.no_grad():
        _assert_states_equal(model.encode_user(batch), plain.encode_user(batch), atol=ATOL)
        torch.testing.assert_close(model(batch), plain(batch), atol=ATOL, rtol=0)
    # and its gradients are those of the plain path
    model.train()
    plain.train()
    _loss(model, batch).backward()
    _loss(plain, batch).backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("segment", [7, 32768])
def test_checkpointing_gives_the_same_loss_and_gradients(schema, helpers, segment):
    batch = _request_batch(helpers, schema)
    grads = []
    losses = []
    for ckpt in (False, True):
        model = _model(schema, checkpoint=ckpt, checkpoint_tokens=segment, time_delta=True)
        model.train()
        loss = _loss(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_recomputes_in_backward(schema, helpers):
    params = {"checkpoint_tokens": 50, "token_dedup": False, "tied_query": False}
    model = _model(schema, checkpoint=True, **params).train()
    calls = _count_history_calls(model)
    loss = _loss(model, _request_batch(helpers, schema))  # B·L = 120 tokens: 3 segments
    d = model.dim
    assert calls == [(50, d), (50, d), (20, d)]
    loss.backward()
    assert len(calls) == 6  # each segment ran again in the backward pass


def test_plain_kernel_gives_the_same_logits(schema, batch):
    fast = _model(schema).eval()
    plain = _model(schema, kernel="plain").eval()
    plain.load_state_dict(fast.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fast(batch), plain(batch), atol=ATOL, rtol=0)
        torch.testing.assert_close(
            fast.search_scores(batch), plain.search_scores(batch), atol=ATOL, rtol=0
        )


def test_bf16_autocast_is_close_to_fp32(schema, helpers):
    model = _model(schema, time_delta=True).eval()
    batch = _request_batch(helpers, schema, length=64)
    with torch.no_grad():
        fp32 = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(batch)
    assert torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16.float(), fp32, atol=0.01, rtol=0.02)
    # and it trains under autocast (the trainer's train.precision=bf16)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model.forward_train(batch)
    F.binary_cross_entropy_with_logits(logits.float(), batch.label).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- options ------------------------------------------------------------------------------
def test_time_delta(schema, batch, helpers):
    model = _model(schema, time_delta=True).train()
    _loss(model, batch).backward()
    assert model.time.weight.grad is not None and model.time.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        logits = model(batch)
        # invariances of the model contract hold with the time delta too
        torch.testing.assert_close(logits, model(helpers["left_pad"](batch, 40)), atol=ATOL, rtol=0)
        garbage = model(helpers["with_target_garbage"](batch))
        mask = batch.target_mask
        torch.testing.assert_close(logits[mask], garbage[mask], atol=ATOL, rtol=0)
        # behaviour times now matter (they do not without the time delta)
        older = replace(batch, history_ts=batch.history_ts - 10**6 * batch.history_mask)
        assert not torch.allclose(model(older)[mask], logits[mask])
        no_time = _model(schema).eval()
        torch.testing.assert_close(no_time(older), no_time(batch), atol=0, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        {"history_per_layer": True, "layers": 2},
        {"query_fusion": False, "layers": 2},
        {"layers": 3, "heads": 2, "history_ffn_depth": 2},
        {"head_target": False, "head_interest": False, "token_norm": True},
        {"dim": 64, "heads": 4, "layers": 2},
        # the paper's literal form: no residual, untied queries, default init, unbounded scores
        {"residual": False, "tied_query": False, "attn_init": "default", "qk_norm": False},
        {"qk_norm": False, "layers": 2, "heads": 2, "kernel": "reassociated"},
    ],
)
def test_options_run(schema, batch, helpers, params):
    model = _model(schema, **params).train()
    _loss(model, batch).backward()
    model.eval()
    with torch.no_grad():
        logits = model(batch)
        torch.testing.assert_close(logits, model(helpers["left_pad"](batch, 40)), atol=ATOL, rtol=0)
        torch.testing.assert_close(
            logits, model.score(model.encode_user(batch), batch), atol=ATOL, rtol=0
        )
    assert torch.isfinite(logits).all()


def test_bad_parameters(schema):
    with pytest.raises(UserError, match="kernel"):
        _model(schema, kernel="flash")
    with pytest.raises(UserError, match="divisible"):
        _model(schema, dim=10, heads=4)
    with pytest.raises(UserError, match="attn_init"):
        _model(schema, attn_init="zeros")
    with pytest.raises(UserError, match="temperature"):
        _model(schema, temperature=0.0)
