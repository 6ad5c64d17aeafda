"""Hierarchical hard search, per-level search and union (docs/models.md, "TIN family"), against naive references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longrec.nn.hier_search import (
    _count_at_most,
    _from_position,
    _nth_member,
    hierarchical_hard_search,
    per_level_hard_search,
    union_search,
)
from longrec.nn.search import hard_search

ONES = 0x0101010101010101


# -- naive references (one sample, one target, Python lists) -------------------------------
def _match_level(hist, tgt, pos):
    """Finest level (1..H) down to which the behaviour's category path equals the target's."""
    depth = 0
    for level in range(len(tgt)):
        if hist[level][pos] != tgt[level]:
            break
        depth = level + 1
    return depth


def _ref_merged(hist, tgt, mask, quotas, k, fill):
    """The hierarchical rule literally: finest level first, most recent not-yet-taken matches up to the
    level's quota, until k; then (fill) the most recent remaining real behaviours."""
    recent = [p for p in range(len(mask) - 1, -1, -1) if mask[p]]
    taken: list[int] = []
    for level in range(len(quotas), 0, -1):
        got = 0
        for p in recent:
            if len(taken) == k or got == quotas[level - 1]:
                break
            if p not in taken and _match_level(hist, tgt, p) >= level:
                taken.append(p)
                got += 1
    if fill:
        taken += [p for p in recent if p not in taken][: max(0, k - len(taken))]
    return taken


def _ref_per_level(hist, tgt, mask, quotas):
    recent = [p for p in range(len(mask) - 1, -1, -1) if mask[p]]
    return [
        [p for p in recent if _match_level(hist, tgt, p) >= level][:q]
        for level, q in enumerate(quotas, start=1)
    ]


def _sample(x, b, m=None):
    return [lvl[b].tolist() if m is None else lvl[b, m].item() for lvl in x]


# -- random cases: few categories (many ties), left padding or arbitrary masks -------------
@st.composite
def cases(draw, max_len=70):
    levels = draw(st.integers(1, 4))
    b, m = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    length = draw(st.integers(1, max_len))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    fan = [draw(st.integers(1, 3)) for _ in range(levels)]
    if draw(st.booleans()):  # globally unique ids: a finer id determines its parents
        leaf_count = 1
        for f in fan:
            leaf_count *= f
        leaf_h = torch.randint(0, leaf_count, (b, length), generator=gen)
        leaf_t = torch.randint(0, leaf_count, (b, m), generator=gen)
        hist, tgt, div = [], [], leaf_count
        for f in fan:
            div //= f
            hist.append(leaf_h // div)
            tgt.append(leaf_t // div)
    else:  # ids only unique within their parent: matching must follow the path
        hist = [torch.randint(0, f, (b, length), generator=gen) for f in fan]
        tgt = [torch.randint(0, f, (b, m), generator=gen) for f in fan]
    offset = draw(st.sampled_from([0, 0, 300, 40_000, -7, 2**40]))  # uint8/int16/int64 paths
    hist = [x + offset for x in hist]
    tgt = [x + offset for x in tgt]
    if draw(st.booleans()):
        real = torch.randint(0, length + 1, (b,), generator=gen)
        mask = torch.arange(length) >= (length - real).unsqueeze(1)  # left padding
    else:
        mask = torch.rand(b, length, generator=gen) < draw(st.floats(0.0, 1.0))
    quotas = [draw(st.integers(0, 8)) for _ in range(levels)]
    k = draw(st.integers(0, 24))
    block = draw(st.sampled_from([8, 16, 64]))
    return hist, tgt, mask, quotas, k, block


def _selected(idx, valid, b, m):
    return idx[b, m][valid[b, m]].tolist()


def _stage_total(hist, tgt, mask, quotas, k):
    """Behaviours the level stages take in all (before fill), from |U_h| alone:
    C_h = min(C_{h+1} + q_h, |U_h|, k) with U_h = real behaviours matching at level h."""
    total = 0
    for level in range(len(quotas), 0, -1):
        members = sum(mask[p] and _match_level(hist, tgt, p) >= level for p in range(len(mask)))
        total = min(total + quotas[level - 1], members, k)
    return total


@settings(max_examples=150, deadline=None)
@given(cases(), st.booleans())
def test_merged_matches_reference(case, fill):
    hist, tgt, mask, quotas, k, block = case
    idx, valid = hierarchical_hard_search(hist, tgt, mask, quotas, k, fill, block=block)
    b, m = tgt[0].shape
    assert idx.shape == valid.shape == (b, m, k) and idx.dtype == torch.int64
    assert (idx[~valid] == 0).all()
    for r in range(b):
        real = mask[r].tolist()
        for t in range(m):
            h, g = _sample(hist, r), _sample(tgt, r, t)
            chosen = _selected(idx, valid, r, t)
            assert set(chosen) == set(_ref_merged(h, g, real, quotas, k, fill))
            assert len(chosen) == len(set(chosen))  # no duplicates
            assert all(real[p] for p in chosen)  # never padding
            assert chosen == sorted(chosen, reverse=True)  # most recent first
            assert valid[r, t].tolist() == sorted(valid[r, t].tolist(), reverse=True)
            stages = _stage_total(h, g, real, quotas, k)
            assert len(chosen) == (min(k, sum(real)) if fill else stages)
            for level in range(1, len(quotas) + 1):  # stages >= level took their quotas
                finer = [0] * (level - 1) + quotas[level - 1 :]
                got = sum(_match_level(h, g, p) >= level for p in chosen)
                assert got >= _stage_total(h, g, real, finer, k)


@settings(max_examples=80, deadline=None)
@given(cases())
def test_fill_only_tops_up_after_the_stages(case):
    hist, tgt, mask, quotas, k, block = case
    with_fill = hierarchical_hard_search(hist, tgt, mask, quotas, k, True, block=block)
    stages = hierarchical_hard_search(hist, tgt, mask, quotas, k, False, block=block)
    for r in range(mask.shape[0]):
        recent = [p for p in range(mask.shape[1] - 1, -1, -1) if mask[r, p]]
        for t in range(tgt[0].shape[1]):
            first = _selected(*stages, r, t)
            both = _selected(*with_fill, r, t)
            assert set(first) <= set(both)
            rest = [p for p in recent if p not in first]
            assert set(both) - set(first) == set(rest[: len(both) - len(first)])
            assert len(both) == min(k, len(recent))


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(1, 80), st.booleans())
def test_extra_left_padding_changes_nothing(case, pad, fill):
    hist, tgt, mask, quotas, k, block = case
    gen = torch.Generator().manual_seed(pad)
    b, length = mask.shape
    padded_hist = [torch.cat([torch.randint(-3, 3, (b, pad), generator=gen), x], 1) for x in hist]
    padded_mask = torch.cat([torch.zeros(b, pad, dtype=torch.bool), mask], 1)
    idx, valid = hierarchical_hard_search(hist, tgt, mask, quotas, k, fill, block=block)
    idx2, valid2 = hierarchical_hard_search(
        padded_hist, tgt, padded_mask, quotas, k, fill, block=block
    )
    assert torch.equal(valid, valid2)
    from_end = torch.where(valid, length - idx, 0)
    from_end2 = torch.where(valid2, length + pad - idx2, 0)
    assert torch.equal(from_end, from_end2)  # same behaviours, counted from the end


@settings(max_examples=100, deadline=None)
@given(cases())
def test_per_level_matches_reference(case):
    hist, tgt, mask, quotas, _, block = case
    out = per_level_hard_search(hist, tgt, mask, quotas, block=block)
    assert len(out) == len(quotas)
    for (idx, valid), q in zip(out, quotas, strict=True):
        assert idx.shape == valid.shape == (*tgt[0].shape, q)
        assert (idx[~valid] == 0).all()
    for r in range(mask.shape[0]):
        for t in range(tgt[0].shape[1]):
            ref = _ref_per_level(_sample(hist, r), _sample(tgt, r, t), mask[r].tolist(), quotas)
            for (idx, valid), expect in zip(out, ref, strict=True):
                assert _selected(idx, valid, r, t) == expect  # exact, most recent first


@settings(max_examples=60, deadline=None)
@given(cases())
def test_single_level_with_fill_is_hard_search(case):
    hist, tgt, mask, _, k, block = case
    k = max(k, 1)
    idx, valid = hierarchical_hard_search(hist[-1:], tgt[-1:], mask, [k], k, True, block=block)
    ref_idx, ref_valid = hard_search(hist[-1], tgt[-1], mask, k)
    for r in range(mask.shape[0]):
        for t in range(tgt[0].shape[1]):
            assert set(_selected(idx, valid, r, t)) == set(_selected(ref_idx, ref_valid, r, t))


# -- union ----------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_union_dedups_and_keeps_valid_first(data):
    b, m = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    ka, kb, length = data.draw(st.integers(0, 8)), data.draw(st.integers(0, 8)), 10
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    idx_a = torch.randint(0, length, (b, m, ka), generator=gen)
    idx_b = torch.randint(0, length, (b, m, kb), generator=gen)
    valid_a = torch.rand(b, m, ka, generator=gen) < 0.7
    valid_b = torch.rand(b, m, kb, generator=gen) < 0.7
    k_total = data.draw(st.one_of(st.none(), st.integers(0, 20)))
    idx, valid = union_search(idx_a, valid_a, idx_b, valid_b, k_total)
    width = ka + kb if k_total is None else k_total
    assert idx.shape == valid.shape == (b, m, width)
    assert (idx[~valid] == 0).all()
    for r in range(b):
        for t in range(m):
            flags = valid[r, t].tolist()
            assert flags == sorted(flags, reverse=True)  # valid slots first
            chosen = _selected(idx, valid, r, t)
            assert len(chosen) == len(set(chosen))  # each position at most once
            order = _selected(idx_a, valid_a, r, t) + _selected(idx_b, valid_b, r, t)
            distinct = list(dict.fromkeys(order))  # a's valid in order, then b's new ones
            assert chosen == distinct[:width]  # never an invalid input slot
            if width >= len(distinct):
                assert set(chosen) == set(order)


def test_union_of_hard_and_soft_search():
    gen = torch.Generator().manual_seed(0)
    b, m, length = 4, 2, 300
    leaf = torch.randint(0, 12, (b, length), generator=gen)
    tleaf = torch.randint(0, 12, (b, m), generator=gen)
    mask = torch.arange(length) >= torch.tensor([0, 100, 290, 300]).unsqueeze(1)
    hard = hierarchical_hard_search([leaf // 4, leaf], [tleaf // 4, tleaf], mask, [5, 5], 16)
    scores = torch.randn(b, m, length, generator=gen)
    soft = torch.topk(scores.masked_fill(~mask.unsqueeze(1), -1e9), 16).indices
    soft_valid = torch.gather(mask.unsqueeze(1).expand(b, m, length), 2, soft)
    idx, valid = union_search(*hard, soft, soft_valid, 24)
    assert not valid[3].any()  # an all-padding history selects nothing
    assert (valid.sum(-1)[2] == 10).all()  # ten real behaviours in all
    for r in range(b):
        for t in range(m):
            chosen = _selected(idx, valid, r, t)
            assert len(chosen) == len(set(chosen)) and all(mask[r, p] for p in chosen)


# -- edge cases and the SWAR helpers --------------------------------------------------------
def test_edge_cases():
    hist, tgt = [torch.zeros(2, 0, dtype=torch.long)], [torch.zeros(2, 3, dtype=torch.long)]
    idx, valid = hierarchical_hard_search(hist, tgt, torch.zeros(2, 0, dtype=torch.bool), [2], 4)
    assert idx.shape == (2, 3, 4) and not valid.any()
    hist, tgt = [torch.arange(5).expand(2, 5)], [torch.tensor([[4], [9]])]
    idx, valid = hierarchical_hard_search(hist, tgt, torch.ones(2, 5, dtype=torch.bool), [3], 0)
    assert idx.shape == (2, 1, 0)
    idx, valid = hierarchical_hard_search(hist, tgt, torch.ones(2, 5, dtype=torch.bool), [1], 9)
    assert valid.sum().item() == 10 and idx[0, 0, :5].tolist() == [4, 3, 2, 1, 0]
    out = per_level_hard_search(hist, tgt, torch.ones(2, 5, dtype=torch.bool), [0])
    assert out[0][0].shape == (2, 1, 0)
    with pytest.raises(ValueError):
        hierarchical_hard_search(hist, tgt, torch.ones(2, 5, dtype=torch.bool), [1, 2], 3)
    with pytest.raises(ValueError):
        hierarchical_hard_search(hist, tgt, torch.ones(2, 5, dtype=torch.bool), [1], 3, block=12)
    with pytest.raises(ValueError):
        union_search(idx, valid, idx, valid, -1)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_nth_member_and_byte_helpers(per_block, seed, density):
    gen = torch.Generator().manual_seed(seed)
    n = 32
    flags = torch.rand(n, 8 * per_block, generator=gen) < density
    words = flags.view(torch.uint8).view(torch.int64).view(n, per_block)
    members = [row.nonzero().flatten().tolist() for row in flags]
    before = torch.tensor(
        [torch.randint(0, max(len(p), 1), (1,), generator=gen).item() for p in members]
    )
    got = _nth_member(words, before).tolist()
    for row, ahead, pos in zip(members, before.tolist(), got, strict=True):
        if row:
            assert pos == row[ahead]
    packed = torch.randint(0, 128, (n, 8), generator=gen, dtype=torch.uint8)
    limit = torch.randint(0, 128, (n,), generator=gen)
    count = _count_at_most(packed.view(torch.int64).squeeze(-1), limit)
    assert torch.equal(count, (packed.long() <= limit.unsqueeze(-1)).sum(-1))
    start = torch.randint(-10, 8 * per_block + 10, (n,), generator=gen)
    bytes_ = _from_position(start, per_block).view(torch.uint8).view(n, -1)
    assert torch.equal(bytes_.bool(), torch.arange(8 * per_block) >= start.unsqueeze(-1))


def test_bench_smoke():
    from longrec.bench.hier_search import bench_hier_search, synthetic_taxonomy_batch

    history, target, mask = synthetic_taxonomy_batch(3, 50, 2, levels=3, seed=1)
    assert [int(x.max()) < n for x, n in zip(history, (8, 64, 768), strict=True)] == [True] * 3
    assert torch.equal(history[0], history[2] // 96) and torch.equal(target[1], target[2] // 12)
    assert (mask.sum(1) >= 25).all()
    rows = bench_hier_search(batch=4, lengths=(100,), targets=(1, 2), k=10, repeats=1)
    assert [(r["history"], r["targets"]) for r in rows] == [(100, 1), (100, 2)]
    assert all(r["merged_ms"] > 0 and r["soft_topk_d16_ms"] > 0 for r in rows)
