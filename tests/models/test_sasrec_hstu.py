"""sasrec and hstu beyond the generic model contract (test_models.py).

HSTU: the cached scoring (history K/V per layer in encode_user, target rows only in score)
equals running every target appended to its history through all layers; causality; the
relative-bias buckets; padding keys contribute exactly zero to the pointwise attention.
SASRec: the td_sasrec class without decoupling; the user vector ignores targets; causal; padding
never leaks; dot and MLP heads.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from longrec.data.batch import Batch
from longrec.errors import UserError
from longrec.models import build_model
from longrec.models.hstu import (
    gap_buckets,
    pointwise_attention,
    position_buckets,
    time_bucket_boundaries,
)
from longrec.models.td_sasrec import TdSasrecModel
from longrec.nn.attention import masked_softmax
from longrec.nn.temporal import log_buckets

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _kit(helpers):
    """conftest's builders as module globals (tests/ is not a package)."""
    global make_schema, tiny_batch, left_pad
    make_schema, tiny_batch = helpers["make_schema"], helpers["tiny_batch"]
    left_pad = helpers["left_pad"]


def _model(name, schema, **params):
    torch.manual_seed(0)
    return build_model(name, schema, params or None)


def _other_targets(batch: Batch, seed: int = 5) -> Batch:
    """The same histories with other targets, target times, labels and target mask."""
    other = tiny_batch(make_schema("genres" in batch.history), seed=seed)
    return replace(
        batch,
        target=other.target,
        target_ts=other.target_ts - 777,
        label=1 - batch.label,
        target_mask=other.target_mask,
        sample_index=None,
    )


def _history_garbage(batch: Batch, seed: int = 3) -> Batch:
    """Random ids and timestamps in the padded history slots; real behaviours unchanged."""
    gen = torch.Generator().manual_seed(seed)
    pad = ~batch.history_mask
    history = {}
    for k, v in batch.history.items():
        noise = torch.randint(2, 8, v.shape, generator=gen)
        history[k] = torch.where(pad.view(*pad.shape, *([1] * (v.dim() - 2))), noise, v)
    ts = torch.where(pad, torch.randint(0, 2 * 10**7, pad.shape, generator=gen), batch.history_ts)
    return replace(batch, history=history, history_ts=ts)


def _train_step(model, batch) -> torch.Tensor:
    model.train()
    logits = model(batch)
    m = batch.target_mask
    F.binary_cross_entropy_with_logits(logits[m], batch.label[m]).backward()
    return logits


# == HSTU =================================================================================
def ref_position_bucket(d: int, n: int, exact: int) -> int:
    """Hand-written reference of the position buckets: 0 = itself, exact ids, then log2."""
    if d <= 0:
        return 0
    if d <= exact:
        return min(d, n - 1)
    return min(exact + math.floor(math.log2(1 + d - exact)) + 1, n - 1)


def ref_gap_bucket(gap: int, is_self: bool, n: int, base: float) -> int:
    """Reference time-gap bucket: 0 = itself, else nn.temporal.log_buckets of the seconds."""
    if is_self:
        return 0
    return int(log_buckets(torch.tensor(gap), n, base=base))


def naive_hstu(model, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every target appended as the last token of its history and the whole sequence run
    through all layers (no cache, the bias built pair by pair from the tables).
    Returns logits [B, M] (0 on padded targets) and each target's last-layer history rows."""
    p = model.params
    keep = min(batch.history_len, model.max_len)
    start = batch.history_len - keep
    hmask, hts = batch.history_mask[:, start:], batch.history_ts[:, start:]
    hist = {f: batch.history[f][:, start:] for f in model.fields}
    b, m_total = batch.target_mask.shape
    heads, n_layers, t_len = p.n_heads, p.n_layers, keep + 1
    logits = torch.zeros(b, m_total)
    history_rows = []
    for m in range(m_total):
        x = torch.cat(
            (
                model.embed(hist, model.fields) * hmask.unsqueeze(-1),
                model.embed({f: batch.target[f][:, m : m + 1] for f in model.fields}),
            ),
            dim=1,
        )  # [B, T, d]
        target_token = x[:, -1]
        mask = torch.cat((hmask, torch.ones(b, 1, dtype=torch.bool)), dim=1)
        ts = torch.cat((hts, batch.target_ts[:, m : m + 1]), dim=1)
        bias = torch.zeros(n_layers, b, heads, t_len, t_len)
        if model.rab is not None:
            pos_w = model.rab.pos.weight if model.rab.pos is not None else None
            time_w = model.rab.time.weight if model.rab.time is not None else None
            for r in range(b):
                for i in range(t_len):
                    for j in range(i + 1):
                        col = torch.zeros(n_layers * heads)
                        if pos_w is not None:
                            col = col + pos_w[ref_position_bucket(i - j, *_pos_cfg(p))]
                        if time_w is not None:
                            gap = int(ts[r, i] - ts[r, j])
                            col = col + time_w[ref_gap_bucket(gap, i == j, *_time_cfg(p))]
                        bias[:, r, :, i, j] = col.view(n_layers, heads)
        causal = torch.ones(t_len, t_len, dtype=torch.bool).tril()
        allowed = causal & mask.unsqueeze(1)  # [B, T, T]
        if p.attn_norm == "max_len":
            norm = torch.full((b, t_len, 1), float(model.max_len + 1))
        else:
            norm = allowed.sum(-1, keepdim=True).clamp_min(1).float()
        for li, layer in enumerate(model.layers):
            uqvk = F.silu(layer.f1(layer.ln_in(x)))
            dv, dq = layer.v_dim * heads, layer.qk_dim * heads
            u, q, v, k = uqvk.split([dv, dq, dv, dq], dim=-1)
            outs = []
            for h in range(heads):
                qh = q[..., h * layer.qk_dim : (h + 1) * layer.qk_dim]
                kh = k[..., h * layer.qk_dim : (h + 1) * layer.qk_dim]
                vh = v[..., h * layer.v_dim : (h + 1) * layer.v_dim]
                s = qh @ kh.transpose(1, 2) + bias[li, :, h]  # [B, T, T]
                w = torch.where(allowed, F.silu(s), torch.zeros(())) / norm
                outs.append(w @ vh)
            x = x + layer.f2(layer.ln_attn(torch.cat(outs, dim=-1)) * u)
        history_rows.append(x[:, :keep])
        final = model.final_ln(x[:, -1])
        if p.head_interest:  # [final, x_t, h, h ⊙ x_t], h = what the target gathered
            gathered = x[:, -1] - target_token
            final = torch.cat((final, target_token, gathered, gathered * target_token), dim=-1)
        if model.readout is not None:  # [r, r ⊙ x_t]: the target's attention over the tokens
            tokens = model.embed(hist, model.fields) * hmask.unsqueeze(-1)
            query = target_token.unsqueeze(1)
            if model.readout.din is not None:
                scores = model.readout.din(query, tokens)  # [B, 1, L]
                r = (masked_softmax(scores, hmask) @ tokens)[:, 0]
                final = torch.cat((final, r, r * target_token), dim=-1)
            if model.readout.cosine is not None:  # nn.cross_attention's own tests cover it
                r = model.readout.cosine(query, tokens, hmask)[:, 0]
                final = torch.cat((final, r, r * target_token), dim=-1)
        out = model.head.net(final).squeeze(-1)
        logits[:, m] = torch.where(batch.target_mask[:, m], out, 0.0)
    return logits, history_rows


def _pos_cfg(p):
    return p.pos_buckets, p.exact_positions


def _time_cfg(p):
    return p.time_buckets, p.time_base


HSTU_CASES = [
    {},
    {"attn_norm": "count"},
    {"rab": "time", "n_layers": 3},
    {"rab": "position", "n_heads": 4, "qk_dim": 3, "v_dim": 5, "exact_positions": 4},
    {"rab": "none", "n_layers": 1},
    {"max_len": 6, "pos_buckets": 8, "time_buckets": 12, "init_std": 0.3},
    {"readout": "none", "rab": "none", "n_layers": 1},
    {"readout_score": "cosine"},
    {"readout_score": "both"},
]


@pytest.mark.parametrize("params", HSTU_CASES, ids=lambda p: ",".join(p) or "default")
def test_hstu_cached_scoring_equals_full_sequence(params):
    schema = make_schema()
    model = _model("hstu", schema, **{"init_std": 0.2, **params})
    _train_step(model, tiny_batch(schema))  # non-trivial BatchNorm statistics
    model.eval()
    batch = tiny_batch(schema, seed=2)
    with torch.no_grad():
        cached = model.score(model.encode_user(batch), batch)
        naive, _ = naive_hstu(model, batch)
    torch.testing.assert_close(cached, naive, atol=ATOL, rtol=1e-4)
    assert cached.abs().max() > 1e-3  # not trivially zero


def test_hstu_target_readout_is_cached_padding_free_and_reads_the_history():
    schema = make_schema()
    model = _model("hstu", schema, init_std=0.2, readout="tokens")
    _train_step(model, tiny_batch(schema))
    model.eval()
    batch = tiny_batch(schema, seed=2)
    with torch.no_grad():
        direct = model(batch)
        torch.testing.assert_close(direct, model.score(model.encode_user(batch), batch))
        torch.testing.assert_close(direct, model(left_pad(batch, 40)), atol=ATOL, rtol=0)
    # [out, x_t, h, h ⊙ x_t] and [r, r ⊙ x_t] of each of the two scorers
    assert model.head.net[0].num_features == 8 * model.dim
    assert torch.isfinite(direct).all() and (direct[~batch.target_mask] == 0).all()


def test_hstu_history_never_sees_the_targets():
    schema = make_schema()
    model = _model("hstu", schema, init_std=0.2).eval()
    batch = tiny_batch(schema)
    other = _other_targets(batch)
    with torch.no_grad():
        state, state_other = model.encode_user(batch), model.encode_user(other)
        _, rows = naive_hstu(model, batch)
        _, rows_other = naive_hstu(model, other)
        logits = model(batch)
        # change one target only: the other targets' logits stay (targets never see each other)
        changed = replace(batch, target={k: v.clone() for k, v in batch.target.items()})
        changed.target["item"][:, 0] = 7
        changed.target["category"][:, 0] = 3
        moved = model(changed)
    for key in ("k", "v"):
        assert torch.equal(state[key], state_other[key])
    for a in rows + rows_other:  # the history rows of the full sequence, whatever the target
        torch.testing.assert_close(a, rows[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits[:, 1:], moved[:, 1:], atol=0, rtol=0)
    assert (logits[:, 0] - moved[:, 0]).abs().max() > 1e-6


def test_position_buckets_monotone():
    distance = torch.arange(0, 20_000)
    ids = position_buckets(distance, 64, 32)
    assert ids[0] == 0 and (ids[1:] >= 1).all()  # 0 is the token itself only
    assert (ids[1:] >= ids[:-1]).all() and int(ids.max()) <= 63
    assert torch.equal(ids[1:33], torch.arange(1, 33))  # one bucket per distance up to exact
    assert ids.unique().numel() > 40  # log buckets beyond, not one catch-all
    for d in (0, 1, 5, 32, 33, 34, 100, 1000, 19_999):
        assert int(ids[d]) == ref_position_bucket(d, 64, 32)


@pytest.mark.parametrize("base", [2.0, 1.5])
def test_gap_buckets_are_log_buckets_and_monotone(base):
    bounds = time_bucket_boundaries(64, base)
    gen = torch.Generator().manual_seed(0)
    gaps = (
        torch.cat(
            (
                torch.arange(-5, 5000),
                torch.logspace(4, 9.5, 2000).long(),
                torch.randint(0, 2**40, (5000,), generator=gen),
                bounds - 1,
                bounds,
                bounds + 1,
            )
        )
        .sort()
        .values
    )
    ids = gap_buckets(gaps, False, bounds)
    # exactly nn.temporal.log_buckets (one bucketize pass instead of the float formula)
    assert torch.equal(ids, log_buckets(gaps, 64, base=base))
    assert (ids >= 1).all() and (ids[1:] >= ids[:-1]).all() and int(ids.max()) <= 63
    assert ids.unique().numel() > 30
    is_self = torch.zeros_like(gaps, dtype=torch.bool)
    is_self[::7] = True
    assert (gap_buckets(gaps, is_self, bounds)[is_self] == 0).all()  # the token itself
    assert (gap_buckets(gaps, True, bounds) == 0).all()
    hour, years = torch.tensor(3600), torch.tensor(3 * 365 * 86400)
    assert (
        int(ids[5]) < int(gap_buckets(hour, False, bounds)) < int(gap_buckets(years, False, bounds))
    )
    for g in (0, 1, 2, 3, 1000, 86_400, 10**9):
        expect = max(1, min(math.floor(math.log1p(g) / math.log(base)) + 1, 63))
        assert int(gap_buckets(torch.tensor(g), False, bounds)) == expect


def test_pointwise_attention_padding_keys_contribute_exactly_zero():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 5, 4, generator=gen), torch.randn(2, 2, 7, 4, generator=gen)
    v = torch.randn(2, 2, 7, 3, generator=gen)
    real = torch.tensor([[0, 0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    allowed = real[:, None, None, :]
    out = pointwise_attention(q, k, v, None, allowed, 8.0)
    # huge (finite) keys, biases and values on the padding: no softmax turns them off, the mask must
    k_bad = torch.where(real[:, None, :, None], k, 1e6)
    v_bad = torch.where(real[:, None, :, None], v, 1e30)
    bias = torch.where(allowed, 0.0, 1e8).expand(2, 2, 5, 7)
    torch.testing.assert_close(pointwise_attention(q, k_bad, v_bad, bias, allowed, 8.0), out)
    for r in range(2):  # equal to attending over the real keys only
        keep = real[r]
        alone = pointwise_attention(
            q[r : r + 1],
            k[r : r + 1, :, keep],
            v[r : r + 1, :, keep],
            None,
            torch.tensor(True),
            8.0,
        )
        torch.testing.assert_close(out[r : r + 1], alone, atol=1e-6, rtol=0)
    # pointwise, no softmax: weights do not sum to one, scaling v scales the output
    torch.testing.assert_close(pointwise_attention(q, k, 3 * v, None, allowed, 8.0), 3 * out)


@pytest.mark.parametrize("params", [{}, {"attn_norm": "count"}], ids=["max_len", "count"])
def test_hstu_padding_never_leaks(params):
    schema = make_schema()
    model = _model("hstu", schema, init_std=0.2, **params).eval()
    batch = tiny_batch(schema)
    garbage = _history_garbage(batch)
    with torch.no_grad():
        state, state_garbage = model.encode_user(batch), model.encode_user(garbage)
        logits, logits_garbage = model(batch), model(garbage)
        longer = model(left_pad(batch, 40))
    real = batch.history_mask[:, None, None, :, None]  # [B, layers, h, L, d_h] broadcast
    for key in ("k", "v"):
        a, b = state[key], state_garbage[key]
        assert torch.equal(a.masked_select(real), b.masked_select(real))
    assert torch.equal(logits, logits_garbage)
    torch.testing.assert_close(logits, longer, atol=ATOL, rtol=0)
    assert torch.isfinite(logits).all() and logits[0, 0] != 0  # the empty history scores too


def test_hstu_micro_batched_scoring_equals_one_pass():
    schema = make_schema(genres=True)
    model = _model("hstu", schema)
    batch = tiny_batch(schema)
    model.eval()
    with torch.no_grad():
        state = model.encode_user(batch)
        whole = model.score(state, batch)
        model.params.micro_batch = 2
        chunked = model.score(state, batch)
    torch.testing.assert_close(whole, chunked, atol=1e-6, rtol=0)


def test_hstu_sparse_embeddings_work_with_sparse_adam():
    schema = make_schema()
    torch.manual_seed(0)
    model = build_model("hstu", schema, None, sparse_embeddings=True)
    _train_step(model, tiny_batch(schema))
    embed = model.embedding_parameters()
    assert len(embed) == 4  # item, category, position bias, time bias
    assert all(p.grad is not None and p.grad.is_sparse for p in embed)
    torch.optim.SparseAdam(embed, lr=0.01).step()


@pytest.mark.parametrize(
    "params",
    [
        {"rab": "x"},
        {"attn_norm": "x"},
        {"n_heads": 5},
        {"n_layers": 0},
        {"time_base": 1.0},
        {"readout": "x"},
    ],
)
def test_hstu_bad_parameters_raise(params):
    with pytest.raises(UserError):
        _model("hstu", make_schema(), **params)


# == SASRec ===============================================================================
def _sasrec(schema, head="mlp", **params):
    """The dot head scores the user vector alone: the target read-out needs the MLP head."""
    return _model(
        "sasrec", schema, head=head, **({"readout": "last"} if head == "dot" else {}), **params
    )


def test_sasrec_is_td_sasrec_without_decoupling():
    model = _model("sasrec", make_schema())
    assert type(model) is TdSasrecModel and model.registered_name == "sasrec"
    assert model.params.decouple == "none" and not model.params.target_pos
    assert model.params.head == "mlp" and model.params.n_layers == 2
    assert model.dim == 32  # item + category, 16 each


@pytest.mark.parametrize("head", ["mlp", "dot"])
def test_sasrec_user_vector_ignores_targets(head):
    schema = make_schema()
    model = _sasrec(schema, head).eval()
    batch = tiny_batch(schema)
    with torch.no_grad():
        state = model.encode_user(batch)
        other = model.encode_user(_other_targets(batch))
        last = model.hidden_states(batch, last_only=False)[:, 0, -1]
    assert state["user"].shape == (batch.batch_size, 1, model.dim)
    assert torch.equal(state["user"], other["user"])
    torch.testing.assert_close(state["user"][:, 0], last, atol=1e-6, rtol=0)  # last position


def test_sasrec_is_causal():
    schema = make_schema()
    model = _model("sasrec", schema, init_std=0.2).eval()
    batch = tiny_batch(schema)
    changed = replace(batch, history={k: v.clone() for k, v in batch.history.items()})
    changed.history["item"][:, -1] = 7  # the most recent behaviour of every non-empty row
    changed.history["category"][:, -1] = 3
    with torch.no_grad():
        before = model.hidden_states(batch, last_only=False)[:, 0]
        after = model.hidden_states(changed, last_only=False)[:, 0]
    real = batch.history_mask
    torch.testing.assert_close(before[:, :-1][real[:, :-1]], after[:, :-1][real[:, :-1]])
    assert (before[:, -1][real[:, -1]] - after[:, -1][real[:, -1]]).abs().max() > 1e-6


@pytest.mark.parametrize("head", ["mlp", "dot"])
def test_sasrec_padding_never_leaks(head):
    schema = make_schema(genres=True)
    model = _sasrec(schema, head, init_std=0.2).eval()
    batch = tiny_batch(schema)
    with torch.no_grad():
        logits = model(batch)
        garbage = model(_history_garbage(batch))
        longer = model(left_pad(batch, 40))
    torch.testing.assert_close(logits, garbage, atol=0, rtol=0)
    torch.testing.assert_close(logits, longer, atol=ATOL, rtol=0)
    assert torch.isfinite(logits).all() and (logits[~batch.target_mask] == 0).all()


@pytest.mark.parametrize("head", ["mlp", "dot"])
def test_sasrec_heads(head):
    schema = make_schema()
    model = _sasrec(schema, head, init_std=0.2)
    batch = tiny_batch(schema)
    logits = _train_step(model, batch)
    assert logits.shape == batch.target_mask.shape and torch.isfinite(logits).all()
    assert all(p.grad is not None for p in model.embedding_parameters())
    model.eval()
    with torch.no_grad():
        logits = model(batch)
        u = model.encode_user(batch)["user"][:, 0]  # [B, d]
        v = model.embed(batch.target, model.fields)  # the plain target embedding M_i
    if head == "dot":  # <F_t, M_i> + b
        expect = torch.einsum("bd,bmd->bm", u, v) + model.bias
        expect = torch.where(batch.target_mask, expect, 0.0)
        torch.testing.assert_close(logits, expect, atol=1e-6, rtol=0)
        assert model.head is None
    else:
        # [u, v, u ⊙ v] and the target read-out [r, r ⊙ v] of each of its two scorers
        assert model.bias is None and model.head.net[0].num_features == 7 * model.dim
