"""The TIN family's blocks against their definitions (docs/models.md, "TIN family")."""

from __future__ import annotations

import math

import torch

from longrec.models.tin_blocks import StackedTin, dsi_pool, tin_pool
from longrec.nn.temporal import TemporalEncoding, log_buckets


def _inputs(b=3, m=2, k=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(b, m, k, d, generator=g)
    v = torch.randn(b, m, d, generator=g)
    valid = torch.rand(b, m, k, generator=g) > 0.3
    valid[..., 0] = True
    return e, v, valid


def test_tin_pool_is_the_target_aware_sum():
    e, v, valid = _inputs()
    u, alpha = tin_pool(e, v, valid)
    for b in range(e.shape[0]):
        for m in range(e.shape[1]):
            keep = valid[b, m]
            s = (e[b, m, keep] @ v[b, m]) / math.sqrt(e.shape[-1])
            a = torch.softmax(s, 0)
            expected = (a[:, None] * (e[b, m, keep] * v[b, m])).sum(0)  # sum_i a_i (e_i ⊙ v)
            assert torch.allclose(u[b, m], expected, atol=1e-5)
            assert torch.allclose(alpha[b, m, keep], a, atol=1e-6)
            assert (alpha[b, m, ~keep] == 0).all()


def test_padding_never_changes_tin_pool():
    e, v, valid = _inputs()
    u, _ = tin_pool(e, v, valid)
    noisy = e.clone()
    noisy[~valid] = 1e3
    assert torch.allclose(tin_pool(noisy, v, valid)[0], u, atol=1e-5)


def test_one_stacked_layer_is_tin():
    e, v, valid = _inputs()
    stacked = StackedTin(e.shape[-1], layers=1, output="last")
    assert torch.allclose(stacked(e, v, valid), tin_pool(e, v, valid)[0], atol=1e-6)


def test_stacked_layers_feed_the_running_query():
    e, v, valid = _inputs()
    stacked = StackedTin(e.shape[-1], layers=3, output="concat")
    out = stacked(e, v, valid)
    assert out.shape[-1] == 3 * e.shape[-1]
    first = tin_pool(e, v, valid)[0]
    assert torch.allclose(out[..., : e.shape[-1]], first, atol=1e-6)
    q1 = stacked.norms[0](v + stacked.maps[0](first))
    second = tin_pool(e, v, valid, query=q1)[0]
    assert torch.allclose(out[..., e.shape[-1] : 2 * e.shape[-1]], second, atol=1e-5)


def test_dsi_groups_attend_independently():
    e, v, valid = _inputs()
    s1 = torch.randn(valid.shape)
    s2 = torch.randn(valid.shape)
    both = dsi_pool([s1, s2], e, v, valid)
    d = e.shape[-1]
    changed = dsi_pool([s1, s2 + 5 * torch.randn(valid.shape)], e, v, valid)
    assert torch.allclose(both[..., :d], changed[..., :d])  # group 1 unaffected by group 2's scores
    assert not torch.allclose(both[..., d:], changed[..., d:])


def test_log_buckets_are_exact_then_logarithmic_and_monotone():
    p = torch.arange(0, 20000)
    b = log_buckets(p, 64, exact=32)
    assert (b[1:33] == torch.arange(1, 33)).all()
    assert (b[1:] >= b[:-1]).all()
    assert int(b.max()) <= 63
    assert int(b[10000]) > int(b[1000]) > int(b[100])


def test_target_decoupled_tables_differ_by_target_type():
    enc = TemporalEncoding(4, "both", n_target_types=4)
    pos = torch.tensor([[[1, 5, 40]]]).expand(1, 2, 3)
    gaps = torch.tensor([[[60, 3600, 86400 * 30]]]).expand(1, 2, 3)
    types = torch.tensor([[2, 3]])
    out = enc.behaviours(pos, gaps, types)
    assert not torch.allclose(out[0, 0], out[0, 1])
    shared = TemporalEncoding(4, "both", n_target_types=1)
    out = shared.behaviours(pos, gaps, types)
    assert torch.allclose(out[0, 0], out[0, 1])
    tgt = enc.target(types, types.shape)
    assert tgt.shape == (1, 2, 4) and not torch.allclose(tgt[0, 0], tgt[0, 1])
