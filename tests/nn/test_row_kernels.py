"""The C++ row kernels (nn.row_kernels) against the PyTorch operations they replace: scores,
pooling and every gradient, for one and several targets per row, strided row views and
repeated ids; deterministic gradients; and the towers' fallback rules."""

from __future__ import annotations

import pytest
import torch

from longrec.nn import row_kernels, search_attention

CASES = [  # (distinct rows U, batch B, history L, targets M, width d)
    (50, 3, 7, 1, 5),
    (1, 2, 3, 1, 4),  # every behaviour is the same row
    (300, 16, 40, 4, 16),
    (40, 5, 200, 2, 32),
]


def test_the_extension_builds_here():
    # the rest of this file would silently test the fallback if it did not
    assert row_kernels.available()


def _case(u, b, length, m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    both = torch.randn(u, 2 * d, generator=g).requires_grad_()
    index = torch.randint(0, u, (b, length), generator=g)
    query = torch.randn(b, m, d, generator=g).requires_grad_()
    weight = torch.randn(b, m, length, generator=g).requires_grad_()
    return both, index, query, weight


def _grads(out, inputs):
    loss = (out[0].sin().sum() + out[1].cos().sum()) if isinstance(out, tuple) else out
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("u,b,length,m,d", CASES)
def test_kernels_equal_gather_and_matmul(u, b, length, m, d):
    both, index, query, weight = _case(u, b, length, m, d)
    keys, values = both[:, :d], both[:, d:]  # strided views, as the towers may pass
    fused = (
        row_kernels.gather_dot(keys, index, query),
        row_kernels.gather_pool(values, index, weight),
    )
    # reference in float64: the kernels sum in another order than gather + matmul, so float32
    # results differ by rounding that grows with how often a row repeats
    ref = [t.detach().double().requires_grad_() for t in (both, query, weight)]
    keys64, values64 = ref[0][:, :d], ref[0][:, d:]
    plain = (ref[1] @ keys64[index].transpose(1, 2), ref[2] @ values64[index])
    for a, e in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=1e-5)
    got, want = _grads(fused, (both, query, weight)), _grads(plain, ref)
    for a, e in zip(got, want, strict=True):
        scale = e.abs().max().item()  # float32 rounding of sums of many terms of this size
        torch.testing.assert_close(a, e.float(), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("wanted", ["rows", "per_target"])
def test_one_gradient_alone_equals_both(wanted):
    """The backward computes the rows' gradient together with the per-target one, and the
    per-target one alone with the dual kernel: each route agrees with both together."""
    both, index, query, weight = _case(300, 16, 40, 4, 16, seed=5)

    def grads(*inputs):
        out = (
            row_kernels.gather_dot(both[:, :16], index, query),
            row_kernels.gather_pool(both[:, 16:], index, weight),
        )
        return _grads(out, inputs)

    together = grads(both, query, weight)
    if wanted == "rows":
        query.requires_grad_(False)
        weight.requires_grad_(False)
        torch.testing.assert_close(grads(both)[0], together[0], rtol=1e-6, atol=1e-6)
    else:
        both.requires_grad_(False)
        for a, b in zip(grads(query, weight), together[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # per-thread partial sums


def test_gradients_are_bitwise_repeatable():
    both, index, query, weight = _case(300, 64, 50, 3, 16, seed=3)

    def run():
        out = (
            row_kernels.gather_dot(both[:, :16], index, query),
            row_kernels.gather_pool(both[:, 16:], index, weight),
        )
        return _grads(out, (both, query, weight))

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_only_cpu_float32_is_applicable():
    x = torch.zeros(3, 4)
    assert row_kernels.applicable(x)
    assert not row_kernels.applicable(x.bfloat16())
    assert not row_kernels.applicable(x.double())
    # a tensor on another device (meta stands in for a GPU): the PyTorch path
    elsewhere = torch.zeros(3, 4, device="meta")
    assert not row_kernels.applicable(x, elsewhere)
    assert not search_attention.applicable(x, elsewhere)


def test_bad_shapes_are_refused_with_a_message():
    both, index, query, _ = _case(10, 2, 5, 1, 4)
    with pytest.raises(RuntimeError, match="query width"):
        row_kernels.gather_dot(both, index, query)  # rows are 8 wide, the query 4


def test_dedup_ids_inverts_in_increasing_order():
    ids = torch.tensor([[5, 3, 5, 0], [3, 9, 9, 5]])
    uniq, inverse = row_kernels.dedup_ids(ids, vocab=10)
    assert uniq.tolist() == [0, 3, 5, 9]
    assert torch.equal(uniq[inverse], ids)
    with pytest.raises(RuntimeError, match="outside"):
        row_kernels.dedup_ids(torch.tensor([10]), vocab=10)


def test_dedup_ids_includes_an_id_present_or_not():
    ids = torch.tensor([[5, 3, 5], [3, 9, 9]])
    uniq, inverse = row_kernels.dedup_ids(ids, vocab=10, include=0)
    assert uniq.tolist() == [0, 3, 5, 9]  # padding leads even when absent
    assert torch.equal(uniq[inverse], ids)
    uniq, inverse = row_kernels.dedup_ids(ids, vocab=10, include=7)
    assert uniq.tolist() == [3, 5, 7, 9]
    assert torch.equal(uniq[inverse], ids)
    uniq, _ = row_kernels.dedup_ids(ids, vocab=10)  # and the bit of 7 was cleared
    assert uniq.tolist() == [3, 5, 9]


def test_dedup_ids_matches_torch_unique_on_long_batches():
    """Long batches are marked by several threads in bitmaps of their own, which are merged
    and must be left clear: consecutive calls with other ids (and parts that straddle the
    threads' shares) each give torch.unique's answer."""
    g = torch.Generator().manual_seed(4)
    for low, high in ((0, 200_000), (150_000, 400_000), (0, 1000)):
        ids = torch.randint(low, high, (2048, 200), generator=g)
        uniq, inverse = row_kernels.dedup_ids(ids, vocab=400_000)
        want_uniq, want_inverse = torch.unique(ids, return_inverse=True)
        assert torch.equal(uniq, want_uniq)
        assert torch.equal(inverse, want_inverse)
        head, tail = ids[:1500], ids[1500:, :7]
        uniq, (h_inv, t_inv) = row_kernels.dedup_parts([head, tail.contiguous()], 400_000, 0)
        both = torch.cat((head.reshape(-1), tail.reshape(-1), torch.zeros(1, dtype=torch.long)))
        assert torch.equal(uniq, torch.unique(both))
        assert torch.equal(uniq[h_inv], head) and torch.equal(uniq[t_inv], tail)


def test_scatter_distinct_rows_equals_index_add():
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(5000, generator=g)[:1234]
    grad = torch.randn(1234, 16, generator=g)
    want = torch.zeros(5000, 16).index_add_(0, ids, grad)
    assert torch.equal(row_kernels.scatter_distinct_rows(ids, grad, 5000), want)


def test_dedup_ids_reuses_its_table_cleanly_across_calls_and_errors():
    """The bitmap persists between calls (O(ids + vocab / 64) per call): a failed call and
    calls with other vocabularies must not leave stale bits behind."""
    g = torch.Generator().manual_seed(5)
    for vocab in (50, 7, 50, 1000):
        ids = torch.randint(0, vocab, (300,), generator=g)
        uniq, inverse = row_kernels.dedup_ids(ids, vocab)
        assert torch.equal(uniq[inverse], ids)
        assert len(uniq) == len(torch.unique(ids))
        with pytest.raises(RuntimeError, match="1 ids outside"):
            row_kernels.dedup_ids(torch.cat([ids, torch.tensor([vocab])]), vocab)


def test_dedup_ids_takes_int32_ids_as_they_come():
    ids = torch.randint(0, 5000, (64, 50), generator=torch.Generator().manual_seed(6))
    for got, want in zip(
        row_kernels.dedup_ids(ids.int(), 5000, include=0),
        row_kernels.dedup_ids(ids, 5000, include=0),
        strict=True,
    ):
        assert got.dtype == torch.int64 and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="1 ids outside"):
        row_kernels.dedup_ids(torch.tensor([3, 5000], dtype=torch.int32), 5000)


def test_lookup_rows_equals_index_select_and_refuses_bad_ids():
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(20_000, 16, generator=g)
    ids = torch.randint(0, 20_000, (9_000,), generator=g)  # repeats, any order
    assert torch.equal(row_kernels.lookup_rows(weight, ids), weight.index_select(0, ids))
    with pytest.raises(RuntimeError, match="1 ids outside"):
        row_kernels.lookup_rows(weight, torch.tensor([5, 20_000]))


def test_dedup_parts_equals_dedup_of_the_concatenation():
    g = torch.Generator().manual_seed(9)
    hist = torch.randint(0, 3000, (32, 40), generator=g, dtype=torch.int32)
    tgt = torch.randint(0, 3000, (32, 1), generator=g, dtype=torch.int32)
    uniq, (h_inv, t_inv) = row_kernels.dedup_parts([hist, tgt], 3000, include=0)
    want_uniq, want_inv = row_kernels.dedup_ids(
        torch.cat((hist.reshape(-1), tgt.reshape(-1))), 3000, 0
    )
    assert torch.equal(uniq, want_uniq)
    assert torch.equal(torch.cat((h_inv.reshape(-1), t_inv.reshape(-1))), want_inv)
    assert h_inv.shape == hist.shape and t_inv.shape == tgt.shape
    with pytest.raises(RuntimeError, match="1 ids outside"):
        row_kernels.dedup_parts([hist, torch.tensor([[3000]], dtype=torch.int32)], 3000)
    uniq, _ = row_kernels.dedup_parts([hist], 3000)  # the failed call left no bits behind
    assert torch.equal(uniq, torch.unique(hist).long())
