"""LONGER beyond the generic model contract (test_models.py): the KV-cache path equals the
per-target reference, the user state never reads a target, groups are aligned from the most
recent behaviour, Recent-k queries, causality of the sequence side, target independence, and
the split attention primitive of nn/transformer.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from longrec.data.batch import Batch
from longrec.errors import UserError
from longrec.models import build_model
from longrec.nn.transformer import split_attention

# init_std 0.1: logits of order 0.1-1 (with DARE's 0.01 they are ~1e-4 and every comparison
# would pass trivially)
STD = 0.1
TOL = {"atol": 1e-5, "rtol": 1e-5}

CONFIGS = {
    "concat_k4": {},
    "inner_k4": {"merge": "inner"},
    "concat_k1_user": {"merge_k": 1, "user_token": True},
    "inner_mean_k8_user": {
        "merge": "inner",
        "inner_pool": "mean",
        "merge_k": 8,
        "user_token": True,
    },
    "full_mask_user": {"global_mask": "full", "user_token": True},
    "recent2_null": {"n_query": 2, "null_key": True},
    "no_self_layers": {"n_layers": 0, "merge_k": 2},
    "no_shared_shift": {"shared_shift": False},
    "no_shared_shift_inner_k1": {"shared_shift": False, "merge": "inner", "merge_k": 1},
    "readout_tokens": {"readout": "tokens"},
    "readout_tokens_full_user": {"readout": "tokens", "global_mask": "full", "user_token": True},
    "readout_both": {"readout": "tokens", "readout_score": "both"},
}


@pytest.fixture(autouse=True)
def _kit(helpers):
    """conftest's builders as module globals (tests/ is not a package)."""
    global make_schema, tiny_batch, left_pad
    make_schema, tiny_batch, left_pad = (
        helpers["make_schema"],
        helpers["tiny_batch"],
        helpers["left_pad"],
    )


def _model(schema, **params):
    torch.manual_seed(0)
    return build_model("longer", schema, {"init_std": STD, **params})


def _pair(schema, **params):
    """The cached model and the uncached reference with the same weights."""
    cached = _model(schema, **params)
    reference = _model(schema, **params, cache=False)
    reference.load_state_dict(cached.state_dict())
    return cached, reference


def _with_targets(batch: Batch, items: torch.Tensor) -> Batch:
    cats = torch.where(items >= 2, 2 + items % 6, 0)
    return replace(batch, target={**batch.target, "item": items, "category": cats})


def test_no_shared_shift_drops_every_per_token_constant(schema):
    """shared_shift=False: no bias on the projections or Q/K/V, no shift in the merged-token
    and attention LayerNorms (the FFN and output projection keep theirs)."""
    model = _model(schema, shared_shift=False)
    assert model.token_proj.bias is None and model.merge_proj.bias is None
    assert model.merge_ln.bias is None
    for block in model.blocks:
        assert block.q.bias is None and block.kv_proj.bias is None and block.ln_attn.bias is None
        assert block.out.bias is not None
    with_shift = _model(schema)
    assert with_shift.token_proj.bias is not None and with_shift.blocks[0].q.bias is not None


# -- cache == reference ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_equals_uncached(name, schema, batch):
    cached, reference = _pair(schema, **CONFIGS[name])
    cached.eval(), reference.eval()
    with torch.no_grad():
        fast, slow = cached(batch), reference(batch)
        assert fast[batch.target_mask].std() > 1e-3  # non-trivial logits
        torch.testing.assert_close(fast, slow, **TOL)
        longer = left_pad(batch, 29)  # 29 is no multiple of K: the oldest group is partial
        torch.testing.assert_close(cached(longer), reference(longer), **TOL)


@pytest.mark.parametrize("name", ["concat_k4", "full_mask_user", "readout_tokens", "readout_both"])
def test_cached_and_uncached_gradients_agree(name, schema, batch):
    """Training runs the cached path: its gradients must be the reference's."""
    # real users (>= 2): the padding user's all-zero token makes LayerNorm and QK-norm
    # ill-conditioned, which amplifies the two paths' float rounding differences
    batch = replace(batch, user=batch.user + 2)
    grads = []
    for model in _pair(schema, **CONFIGS[name]):
        model.train()
        logits = model(batch)
        m = batch.target_mask
        F.binary_cross_entropy_with_logits(logits[m], batch.label[m]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, grad in grads[0].items():  # float32 sums in another order: tolerance ~ |grad|
        atol = 3e-5 * max(1.0, grad.abs().max().item())
        torch.testing.assert_close(grad, grads[1][n], atol=atol, rtol=1e-4)


# -- the user state never reads a target --------------------------------------------------------
@pytest.mark.parametrize("name", ["concat_k4", "inner_k4", "concat_k1_user", "full_mask_user"])
def test_user_state_is_target_independent(name, schema, batch):
    model = _model(schema, **CONFIGS[name]).eval()
    gen = torch.Generator().manual_seed(3)
    other = _with_targets(batch, torch.randint(2, 50, batch.target_mask.shape, generator=gen))
    # later targets of a request may carry any time: only the first (the request time) is read
    other = replace(
        other, target_ts=torch.cat((batch.target_ts[:, :1], other.target_ts[:, 1:] - 7), 1)
    )
    with torch.no_grad():
        a, b = model.encode_user(batch), model.encode_user(other)
        assert a.keys() == b.keys() and {"tokens", "k0", "v0", "globals"} <= a.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert not torch.equal(model(batch), model(other))


def test_sequence_side_is_causal(schema, batch):
    """Changing the most recent behaviour changes only the last sequence query's states."""
    model = _model(schema, merge_k=1).eval()
    changed = replace(batch, history={**batch.history, "item": batch.history["item"].clone()})
    new = (batch.history["item"][:, -1] + 1) % 48 + 2
    changed.history["item"][:, -1] = torch.where(batch.history_mask[:, -1], new, 0)
    with torch.no_grad():
        a, b = model.encode_user(batch), model.encode_user(changed)
    real = batch.history_mask[:, -1]
    for i in range(1, 1 + model.params.n_layers):  # K/V of the sequence queries at layer i
        ka, kb = a[f"k{i}"], b[f"k{i}"]  # [B, h, gs + kq, d_h]; gs = 1 (CLS)
        torch.testing.assert_close(ka[:, :, 1:-1], kb[:, :, 1:-1], atol=0, rtol=0)
        assert not torch.allclose(ka[real][:, :, -1], kb[real][:, :, -1])


# -- groups: alignment from the most recent end, count ceil(L / K) -----------------------------
@pytest.mark.parametrize("k", [1, 3, 4, 8])
def test_merged_token_count_and_alignment(k):
    schema = make_schema()
    model = _model(schema, merge_k=k).eval()
    batch = tiny_batch(schema)
    with torch.no_grad():
        for length in (16, 17, 21, 24, 29):
            padded = left_pad(batch, length) if length > 16 else batch
            tokens, valid = model.sequence_tokens(padded)
            assert tokens.shape[1] == valid.shape[1] == math.ceil(length / k)
            # real groups: ceil(n / K) for n real behaviours, always the most recent ones
            n_groups = (padded.history_mask.sum(1) + k - 1) // k
            slots = torch.arange(valid.shape[1])
            assert torch.equal(valid, slots >= valid.shape[1] - n_groups.unsqueeze(1))
        # the (K+1)-th most recent behaviour belongs to the second most recent group
        changed = replace(batch, history={**batch.history, "item": batch.history["item"].clone()})
        changed.history["item"][1, -(k + 1)] = (batch.history["item"][1, -(k + 1)] + 1) % 48 + 2
        a, _ = model.sequence_tokens(batch)
        b, _ = model.sequence_tokens(changed)
        assert torch.equal(a[1, -1], b[1, -1])
        assert not torch.equal(a[1, -2], b[1, -2])


@pytest.mark.parametrize("k", [1, 4, 8])
def test_folded_concat_merge_equals_concat_of_tokens(k, schema, batch):
    """The concat merge computed per field and slot (embedding_bag) is the plain one:
    merge_proj(concat of the K behaviour tokens), also on a partial oldest group."""
    model = _model(schema, merge_k=k).eval()
    padded = left_pad(batch, 19)
    with torch.no_grad():
        tokens, _valid = model.sequence_tokens(padded)
        x = model.behaviour_tokens(padded)  # [B, 19, d], zero on padding
        extra = (-19) % k
        x = torch.cat((x.new_zeros(x.shape[0], extra, x.shape[2]), x), dim=1)
        b, g = x.shape[0], x.shape[1] // k
        plain = model.merge_ln(model.merge_proj(x.reshape(b, g, k * x.shape[2])))
        positions = torch.arange(g, 0, -1).clamp_max(model.max_groups)
        torch.testing.assert_close(tokens, plain + model.pos(positions), **TOL)


@pytest.mark.parametrize(
    "name", ["concat_k4", "inner_k4", "inner_mean_k8_user", "recent2_null", "readout_tokens"]
)
def test_extra_left_padding_changes_nothing(name, schema, batch):
    model = _model(schema, **CONFIGS[name]).eval()
    with torch.no_grad():
        base = model(batch)
        for length in (17, 18, 19, 23, 40):
            torch.testing.assert_close(model(left_pad(batch, length)), base, **TOL)


def test_n_query_larger_than_merged_tokens(schema, batch):
    """Recent-k with k >= L' uses every merged token; k = 1 still runs and caches exactly."""
    with torch.no_grad():
        wide = _model(schema, n_query=1000).eval()
        exact = _model(schema, n_query=4).eval()  # L = 16, K = 4: exactly 4 merged tokens
        torch.testing.assert_close(wide(batch), exact(batch), atol=0, rtol=0)
        assert wide.encode_user(batch)["k1"].shape[2] == 1 + 4  # CLS + every merged token
        narrow, reference = _pair(schema, n_query=1)
        narrow.eval(), reference.eval()
        torch.testing.assert_close(narrow(batch), reference(batch), **TOL)
        assert not torch.allclose(narrow(batch), wide(batch))


# -- targets are independent --------------------------------------------------------------
@pytest.mark.parametrize("name", ["concat_k4", "full_mask_user"])
def test_each_target_is_scored_independently(name, schema, batch, helpers):
    model = _model(schema, **CONFIGS[name]).eval()
    items = batch.target["item"].clone()
    items[:, 1] = torch.where(batch.target_mask[:, 1], (items[:, 1] + 7) % 48 + 2, 0)
    with torch.no_grad():
        base = model(batch)
        changed = model(_with_targets(batch, items))
        pointwise = model(helpers["to_pointwise"](batch))[:, 0]
    assert torch.equal(base[:, [0, 2]], changed[:, [0, 2]])
    assert not torch.allclose(
        base[:, 1][batch.target_mask[:, 1]], changed[:, 1][batch.target_mask[:, 1]]
    )
    torch.testing.assert_close(base[batch.target_mask], pointwise, **TOL)


def test_serving_many_candidates_of_one_user(schema):
    """500 candidates of one user against one cached state, as the ranker scores them."""
    batch = tiny_batch(schema)
    one = Batch(
        user=batch.user[1:2],
        history={k: v[1:2] for k, v in batch.history.items()},
        history_mask=batch.history_mask[1:2],
        history_ts=batch.history_ts[1:2],
        target={
            "item": torch.arange(500).remainder(48).add(2).view(1, -1),
            "category": (2 + torch.arange(500).remainder(48).add(2) % 6).view(1, -1),
        },
        target_ts=torch.full((1, 500), 10_000_000),
        label=torch.zeros(1, 500),
        target_mask=torch.ones(1, 500, dtype=torch.bool),
    )
    if "genres" in schema.fields:
        one.target["genres"] = torch.full((1, 500, 3), 2)
    cached, reference = _pair(schema, user_token=True)
    cached.eval(), reference.eval()
    with torch.no_grad():
        state = cached.encode_user(one)
        torch.testing.assert_close(cached.score(state, one), reference(one), **TOL)


# -- embedding tables and options -------------------------------------------------------------
def test_sparse_embeddings_give_sparse_gradients(schema, batch):
    torch.manual_seed(0)
    model = build_model("longer", schema, {"user_token": True}, sparse_embeddings=True)
    logits = model(batch)
    logits[batch.target_mask].sum().backward()
    for table in model.embedding_parameters():
        assert table.grad is not None and table.grad.is_sparse
    assert set(model.history_fields()) == {*model.fields, "behavior"}


@pytest.mark.parametrize(
    "params", [{"merge": "sum"}, {"inner_pool": "max"}, {"global_mask": "none"}, {"merge_k": 0}]
)
def test_bad_parameters_raise(schema, params):
    with pytest.raises(UserError):
        build_model("longer", schema, params)


# -- nn/transformer.py -----------------------------------------------------------------------
def test_split_attention_equals_dense_attention():
    """Own + shared keys in one softmax == SDPA over each group's concatenated keys."""
    gen = torch.Generator().manual_seed(0)
    b, m, h, g, s, dh = 2, 3, 2, 2, 5, 4
    q, k_own, v_own = (torch.randn(b, m, h, g, dh, generator=gen) for _ in range(3))
    k_sh, v_sh = (torch.randn(b, h, s, dh, generator=gen) for _ in range(2))
    own_mask = torch.tensor([[True, True], [False, True]])
    shared_mask = torch.rand(b, 1, 1, s, generator=gen) > 0.4
    shared_mask[0, 0, 0] = False  # one user reads no shared key at all
    for null in (False, True):
        got = split_attention(q, k_own, v_own, own_mask, k_sh, v_sh, shared_mask, null_key=null)
        keys = torch.cat((k_own, k_sh.unsqueeze(1).expand(-1, m, -1, -1, -1)), dim=-2)
        values = torch.cat((v_own, v_sh.unsqueeze(1).expand(-1, m, -1, -1, -1)), dim=-2)
        mask = torch.cat(
            (own_mask.expand(b, m, h, g, g), shared_mask.unsqueeze(1).expand(b, m, h, g, s)), -1
        )
        if null:
            zero = torch.zeros(b, m, h, 1, dh)
            keys, values = torch.cat((zero, keys), -2), torch.cat((zero, values), -2)
            mask = torch.cat((torch.ones(b, m, h, g, 1, dtype=torch.bool), mask), -1)
        want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
