"""The nn/ building blocks, each against a naive reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from longrec.nn.attention import DinScore, MultiHeadTargetAttention, masked_softmax
from longrec.nn.heads import MLPHead
from longrec.nn.search import gather_behaviours, hamming_similarity, simhash_signs
from longrec.nn.temporal import relative_positions, time_gap_buckets


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- masked softmax -----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_masked_softmax_ignores_padding(b, m, length, seed):
    g = _gen(seed)
    scores = torch.randn(b, m, length, generator=g) * 5
    mask = torch.rand(b, length, generator=g) < 0.6
    mask[0] = False  # an all-padding row
    weights = masked_softmax(scores, mask)
    noisy = masked_softmax(torch.where(mask.unsqueeze(1), scores, 1e4), mask)
    torch.testing.assert_close(weights, noisy)  # padding values do not matter
    assert (weights[~mask.unsqueeze(1).expand_as(weights)] == 0).all()
    assert (weights[0] == 0).all()
    for r in range(b):
        real = mask[r]
        if real.any():
            ref = torch.softmax(scores[r][:, real], dim=-1)
            torch.testing.assert_close(weights[r][:, real], ref)
            torch.testing.assert_close(weights[r].sum(-1), torch.ones(m))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 10), st.floats(-3, 3), st.integers(0, 2**31 - 1))
def test_masked_softmax_with_a_sink_equals_an_extra_slot(b, length, sink, seed):
    g = _gen(seed)
    scores = torch.randn(b, 2, length, generator=g) * 5
    mask = torch.rand(b, length, generator=g) < 0.6
    mask[0] = False  # an all-padding row
    weights = masked_softmax(scores, mask, torch.tensor(sink))
    assert (weights[0] == 0).all()
    assert (weights[~mask.unsqueeze(1).expand_as(weights)] == 0).all()
    for r in range(1, b):
        real = mask[r]
        extra = torch.cat((scores[r][:, real], torch.full((2, 1), sink)), dim=-1)
        torch.testing.assert_close(weights[r][:, real], torch.softmax(extra, dim=-1)[:, :-1])


def test_a_sink_keeps_the_count_of_matches_and_learns():
    """n equal scores s: plain softmax gives each 1/n (sum 1 whatever n); with a sink the sum is
    n e^s / (1 + n e^s), growing with n, and the sink logit gets a gradient."""
    sink = torch.zeros((), requires_grad=True)
    scores = torch.full((1, 1, 8), 2.0)
    sums = []
    for n in (1, 2, 4, 8):
        mask = torch.arange(8).unsqueeze(0) < n
        assert masked_softmax(scores, mask).sum().item() == pytest.approx(1.0)
        w = masked_softmax(scores, mask, sink)
        sums.append(w.sum())
        expected = n * math.exp(2.0) / (1 + n * math.exp(2.0))
        assert w.sum().item() == pytest.approx(expected, rel=1e-6)
    assert sums == sorted(sums)
    torch.stack(sums).sum().backward()
    assert sink.grad is not None and sink.grad.item() < 0


def test_masked_softmax_per_target_mask():
    scores = torch.randn(2, 3, 5, generator=_gen())
    mask = torch.rand(2, 3, 5, generator=_gen(1)) < 0.5
    weights = masked_softmax(scores, mask)
    assert (weights[~mask] == 0).all()
    rows = mask.any(-1)
    torch.testing.assert_close(weights.sum(-1)[rows], torch.ones(int(rows.sum())))


# -- DIN score ----------------------------------------------------------------------------
def test_din_score_equals_naive_concat_mlp():
    torch.manual_seed(0)
    d, h = 6, 36
    score = DinScore(d, h)
    nn.init.normal_(score.first.bias)
    q = torch.randn(2, 3, d)
    k = torch.randn(2, 5, d)
    qe = q.unsqueeze(2).expand(-1, -1, 5, -1)
    ke = k.unsqueeze(1).expand(-1, 3, -1, -1)
    x = torch.cat((qe, ke, qe - ke, qe * ke), dim=-1)  # [B, M, L, 4d]
    naive = score.out(score.act(score.first(x))).squeeze(-1) / (4 * d)
    torch.testing.assert_close(score(q, k), naive, atol=1e-6, rtol=1e-5)


# -- hashing ------------------------------------------------------------------------------
def test_hamming_similarity_equals_bits_minus_popcount_xor():
    g = _gen()
    bits = 64
    planes = torch.randn(8, bits, generator=g)
    q = simhash_signs(torch.randn(2, 3, 8, generator=g), planes)
    k = simhash_signs(torch.randn(2, 7, 8, generator=g), planes)
    assert set(q.unique().tolist()) <= {-1.0, 1.0}

    def pack(signs: torch.Tensor) -> list[int]:
        """Each ±1 signature as an integer bit field."""
        flat = (signs > 0).reshape(-1, bits).long().tolist()
        return [sum(bit << i for i, bit in enumerate(row)) for row in flat]

    qi, ki = pack(q), pack(k)
    naive = torch.tensor(
        [
            [
                [bits - bin(qi[b * 3 + m] ^ ki[b * 7 + j]).count("1") for j in range(7)]
                for m in range(3)
            ]
            for b in range(2)
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(hamming_similarity(q, k), naive)


def test_simhash_is_scale_invariant():
    g = _gen()
    planes = torch.randn(8, 32, generator=g)
    x = torch.randn(4, 8, generator=g)
    assert torch.equal(simhash_signs(x, planes), simhash_signs(3.7 * x, planes))


# -- gather -------------------------------------------------------------------------------
def test_gather_behaviours_equals_naive_loop():
    g = _gen()
    b, length, d, m, k = 3, 7, 4, 2, 5
    x = torch.randn(b, length, d, generator=g)
    ids = torch.randint(0, 50, (b, length), generator=g)
    idx = torch.randint(0, length, (b, m, k), generator=g)
    out, out_ids = gather_behaviours(x, idx), gather_behaviours(ids, idx)
    for r in range(b):
        for t in range(m):
            for s in range(k):
                assert torch.equal(out[r, t, s], x[r, idx[r, t, s]])
                assert out_ids[r, t, s] == ids[r, idx[r, t, s]]


# -- temporal -----------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 10**10), min_size=2, max_size=30), st.integers(2, 80))
def test_time_gap_buckets_monotone(gaps, n_buckets):
    gaps = torch.tensor(sorted(gaps), dtype=torch.int64)
    target_ts = torch.tensor([[2 * 10**10]])
    history_ts = (target_ts[0, 0] - gaps).unsqueeze(0)  # [1, L], gaps ascending
    buckets = time_gap_buckets(history_ts, target_ts, n_buckets)[0, 0]
    assert (buckets[1:] >= buckets[:-1]).all()  # larger gap, never a smaller bucket
    assert buckets.min() >= 1 and buckets.max() <= n_buckets - 1  # 0 is the target's


def test_time_gap_buckets_future_and_zero_gaps():
    target_ts = torch.tensor([[1000, 5]])
    history_ts = torch.tensor([[999, 1000, 2000]])
    buckets = time_gap_buckets(history_ts, target_ts)
    assert buckets.shape == (1, 2, 3)
    assert (buckets[0, 1] == 1).all()  # behaviour after the target: clamped to gap 0
    assert buckets[0, 0, 1] == 1 and buckets[0, 0, 0] == 2


def test_relative_positions():
    assert relative_positions(4).tolist() == [4, 3, 2, 1]
    assert relative_positions(4, max_position=2).tolist() == [2, 2, 2, 1]


# -- heads --------------------------------------------------------------------------------
def test_mlp_head_with_mask_equals_head_on_real_rows():
    torch.manual_seed(0)
    head = MLPHead(5, (7, 3))
    x = torch.randn(4, 3, 5)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    for train in (True, False):
        head.train(train)
        out = head(x, mask)
        ref = head.net(x[mask]).squeeze(-1)  # BatchNorm statistics of the real rows only
        torch.testing.assert_close(out[mask], ref)
        assert (out[~mask] == 0).all()
    head.train()
    full = torch.ones(4, 3, dtype=torch.bool)
    torch.testing.assert_close(head(x, full), head.net(x.reshape(-1, 5)).view(4, 3))


# -- multi-head target attention ----------------------------------------------------------
def test_multi_head_attention_shared_keys_equal_broadcast_keys():
    torch.manual_seed(0)
    att = MultiHeadTargetAttention(6, 8, 12, heads=3)
    q = torch.randn(2, 3, 6)
    k = torch.randn(2, 5, 8)
    mask = torch.rand(2, 5) < 0.7
    mask[1] = False
    shared = att(q, k, mask)
    per_target = att(q, k.unsqueeze(1).expand(-1, 3, -1, -1), mask.unsqueeze(1).expand(-1, 3, -1))
    assert shared.shape == (2, 3, 12)
    torch.testing.assert_close(shared, per_target)
    # an all-padding history pools nothing: only the output bias remains
    torch.testing.assert_close(shared[1], att.o.bias.expand(3, -1))


def test_multi_head_attention_equals_naive_heads():
    torch.manual_seed(0)
    att = MultiHeadTargetAttention(4, 4, 8, heads=2)
    q = torch.randn(1, 2, 4)
    k = torch.randn(1, 2, 5, 4)
    mask = torch.tensor([[[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]]], dtype=torch.bool)
    out = att(q, k, mask)
    for t in range(2):
        heads = []
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            qh = att.q(q[0, t])[sl]
            kh = att.k(k[0, t])[:, sl]
            vh = att.v(k[0, t])[:, sl]
            s = (kh @ qh) / 2.0
            w = torch.softmax(s[mask[0, t]], dim=0)
            heads.append(w @ vh[mask[0, t]])
        torch.testing.assert_close(out[0, t], att.o(torch.cat(heads)))
