"""The fused soft search (nn.search_attention) against the PyTorch operations it replaces
(scores, `topk_search`, `masked_softmax`, top-k and full-history pooling) in float64: outputs
and every gradient, with several targets per user, padding, histories shorter than k, an
all-padding history, position fields (no index) and zero-width fields; the rows' gradients both
through per-thread copies and through the row-owned second phase (`ROW_OWNED_BYTES`)."""

from __future__ import annotations

import pytest
import torch

from longrec.nn import row_kernels, search_attention
from longrec.ops import dispatch

CASES = [  # (batch B, targets M, history L, k, distinct rows per field, with a position field,
    #         every row width (None: mixed widths))
    (6, 1, 30, 5, (11, 4), True, None),
    (4, 3, 17, 8, (50,), False, None),
    (3, 2, 6, 10, (5, 3), True, None),  # L < k
    (8, 1, 200, 20, (300, 40), True, 16),  # DARE's shape, smaller batch: the width-16 path
    (5, 2, 40, 6, (30, 7), True, 16),
]


def test_the_extension_builds_here():
    assert row_kernels.available()


@pytest.fixture(params=["copies", "row_owned"])
def backward_mode(request, monkeypatch):
    """The backward's two ways to the rows' gradients: per-thread copies (the default at these
    sizes) and, with the threshold at 0, the row-owned second phase for every indexed field."""
    monkeypatch.delenv("LONGREC_ROW_OWNED_BYTES", raising=False)
    if request.param == "row_owned":
        monkeypatch.setattr(search_attention, "ROW_OWNED_BYTES", 0)
    return request.param


def _case(b, m, length, k, uniq, pos, width=None, seed=0, shared_pos=False):
    g = torch.Generator().manual_seed(seed)
    attn_dims, repr_dims = [4, 3, 16][: len(uniq)], [5, 2, 16][: len(uniq)]
    if width is not None:
        attn_dims = repr_dims = [width] * len(uniq)
    attn = [torch.randn(u, d, generator=g) for u, d in zip(uniq, attn_dims, strict=True)]
    repr_ = [torch.randn(u, d, generator=g) for u, d in zip(uniq, repr_dims, strict=True)]
    index = [torch.randint(0, u, (b, length), generator=g) for u in uniq]
    if pos:
        attn.append(torch.randn(length + 2, width or 3, generator=g))
        repr_.append(torch.randn(length + 2, width or 4, generator=g))
        index.append(None)
    query = [torch.randn(b, m, a.shape[1], generator=g) for a in attn]
    if pos and shared_pos:  # one position query for every target, as the towers pass it
        query[-1] = torch.randn(1, 1, attn[-1].shape[1], generator=g)
    scale = [0.5] * len(uniq) + ([0.7] if pos else [])
    mask = torch.rand(b, length, generator=g) < 0.8
    if b > 0:
        mask[0] = False  # an all-padding history
    if b > 1:
        mask[1, 2:] = False  # fewer real behaviours than k
    params = [t.requires_grad_() for t in (*attn, *repr_, *query)]
    return attn, repr_, index, query, scale, mask, params


def _reference(attn, repr_, index, query, scale, mask, k):
    """The library's reference path (the kernels=reference twin), with the full pooling."""
    return search_attention.search_attend_reference(
        attn, repr_, index, query, scale, mask, k, full=True
    )


# every case with its own per-target position queries, and the position cases also with the
# one shared position query the towers pass
SHARED = [(*c, False) for c in CASES] + [(*c, True) for c in CASES if c[5]]


@pytest.mark.parametrize("b,m,length,k,uniq,pos,width,shared_pos", SHARED)
def test_fused_search_equals_pytorch_in_float64(
    b, m, length, k, uniq, pos, width, shared_pos, backward_mode
):
    attn, repr_, index, query, scale, mask, params = _case(
        b, m, length, k, uniq, pos, width, shared_pos=shared_pos
    )
    top, full, idx, valid = search_attention.search_attend(
        attn, repr_, index, query, scale, mask, k, full=True
    )
    ref_params = [p.detach().double().requires_grad_() for p in params]
    n = len(attn)
    r_attn, r_repr, r_query = ref_params[:n], ref_params[n : 2 * n], ref_params[2 * n :]
    r_top, r_full, r_idx, r_valid = _reference(r_attn, r_repr, index, r_query, scale, mask, k)
    torch.testing.assert_close(top, r_top.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, r_full.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(valid, r_valid)
    # the same behaviours are selected (the order within the top k may differ)
    picked = torch.where(valid, idx, -1).sort(-1).values
    assert torch.equal(picked, torch.where(r_valid, r_idx, -1).sort(-1).values)
    assert not (
        ~mask.unsqueeze(1).expand_as(torch.zeros(b, m, length)).gather(2, idx) & valid
    ).any()
    assert top[0].abs().max() == 0 and full[0].abs().max() == 0  # all-padding pools to zero
    g = torch.Generator().manual_seed(1)
    g_top, g_full = torch.randn(top.shape, generator=g), torch.randn(full.shape, generator=g)
    got = torch.autograd.grad((top * g_top).sum() + (full * g_full).sum(), params)
    want = torch.autograd.grad(
        (r_top * g_top.double()).sum() + (r_full * g_full.double()).sum(), ref_params
    )
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e.float(), rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max()))


# the switch's edge cases besides CASES: one user, an empty batch, empty histories, one row
EDGES = [(1, 2, 9, 4, (1,), True, None), (0, 2, 9, 4, (6,), True, None)]
EDGES += [(3, 2, 0, 4, (6, 2), True, None), (4, 1, 12, 3, (1, 1), False, 16)]


@pytest.mark.parametrize("b,m,length,k,uniq,pos,width", CASES + EDGES)
@pytest.mark.parametrize("full", [True, False])
def test_native_and_reference_agree_through_the_switch(
    b, m, length, k, uniq, pos, width, full, backward_mode
):
    """search_attend under kernels=native and kernels=reference (ops.dispatch), both float32:
    outputs, the selected behaviours and every gradient."""

    def run(setting):
        attn, repr_, index, query, scale, mask, params = _case(b, m, length, k, uniq, pos, width)
        with dispatch.using(setting):
            top, pooled_all, idx, valid = search_attention.search_attend(
                attn, repr_, index, query, scale, mask, k, full
            )
        kernel = type(top.grad_fn).__name__ == "_SearchAttendBackward"
        assert kernel == (setting == "native" and b > 0)  # empty batches: nothing to compute
        outs = [top] + ([pooled_all] if full else [])
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads, strict=True)
        ]
        # the behaviours picked, as each field's ids (the order within the top k may differ,
        # and so may the positions picked among equal scores: repeated ids)
        picked = [
            torch.where(valid, i.unsqueeze(1).expand(-1, idx.shape[1], -1).gather(2, idx), -1)
            if i is not None
            else torch.where(valid, idx, -1)
            for i in index
        ]
        picked = torch.stack([p.sort(-1).values for p in picked])
        return [o.detach() for o in outs], picked, valid, grads

    native, reference = run("native"), run("reference")
    assert torch.equal(native[1], reference[1]) and torch.equal(native[2], reference[2])
    # float32 on both sides, summed in another order: rounding relative to the largest term
    for a, e in zip(native[0] + native[3], reference[0] + reference[3], strict=True):
        largest = e.abs().max().item() if e.numel() else 0.0
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * max(1.0, largest))


def test_without_the_full_pooling_only_the_top_k_is_computed(backward_mode):
    attn, repr_, index, query, scale, mask, params = _case(5, 2, 40, 6, (30, 7), True)
    top, full, _, _ = search_attention.search_attend(
        attn, repr_, index, query, scale, mask, 6, full=False
    )
    assert full is None
    both, _, _, _ = search_attention.search_attend(
        attn, repr_, index, query, scale, mask, 6, full=True
    )
    torch.testing.assert_close(top, both)
    grads = torch.autograd.grad(top.sum(), params)
    assert all(torch.isfinite(g).all() for g in grads)
    # the top-k pooling's gradient alone, against the PyTorch operations
    ref_params = [p.detach().double().requires_grad_() for p in params]
    r_attn, r_repr, r_query = ref_params[:3], ref_params[3:6], ref_params[6:]
    r_top = _reference(r_attn, r_repr, index, r_query, scale, mask, 6)[0]
    want = torch.autograd.grad(r_top.sum(), ref_params)
    for a, e in zip(grads, want, strict=True):
        torch.testing.assert_close(a, e.float(), rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max()))


def test_zero_width_fields_change_nothing():
    """A position field with no attention width (or no representation width) is how the
    towers pass a missing position table."""
    attn, repr_, index, query, scale, mask, _ = _case(4, 1, 25, 5, (20,), False)
    base = search_attention.search_attend(attn, repr_, index, query, scale, mask, 5, True)
    padded = search_attention.search_attend(
        [*attn, torch.zeros(25, 0)],
        [*repr_, torch.zeros(25, 0)],
        [*index, None],
        [*query, torch.zeros(4, 1, 0)],
        [*scale, 1.0],
        mask,
        5,
        True,
    )
    for a, e in zip(padded[:2], base[:2], strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("width", [None, 16])
def test_gradients_are_deterministic(width, backward_mode):
    attn, repr_, index, query, scale, mask, params = _case(
        64, 1, 50, 8, (40, 9), True, width, shared_pos=True
    )

    def grads():
        top, full, _, _ = search_attention.search_attend(
            attn, repr_, index, query, scale, mask, 8, True
        )
        return torch.autograd.grad(top.sin().sum() + full.cos().sum(), params)

    for a, b in zip(grads(), grads(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("width", [None, 16])
def test_row_owned_gradients_do_not_depend_on_the_thread_count(width, monkeypatch):
    monkeypatch.setenv("LONGREC_ROW_OWNED_BYTES", "0")  # the override a benchmark arm sets
    attn, repr_, index, query, scale, mask, params = _case(64, 2, 50, 8, (40, 9), True, width)

    def grads():
        top, full, _, _ = search_attention.search_attend(
            attn, repr_, index, query, scale, mask, 8, True
        )
        return torch.autograd.grad(top.sin().sum() + full.cos().sum(), params)

    threads = torch.get_num_threads()
    two = grads()
    torch.set_num_threads(1)
    try:
        one = grads()
    finally:
        torch.set_num_threads(threads)
    n = len(attn)
    indexed = [f for f in range(n) if index[f] is not None]  # the row-owned fields
    assert indexed
    for f in indexed:  # attention and representation rows
        assert torch.equal(one[f], two[f]) and torch.equal(one[n + f], two[n + f])


def test_a_bad_row_owned_threshold_gets_a_clear_error(monkeypatch):
    monkeypatch.setenv("LONGREC_ROW_OWNED_BYTES", "16MB")
    with pytest.raises(ValueError, match="LONGREC_ROW_OWNED_BYTES must be an integer"):
        search_attention.row_owned_bytes()


def test_bad_shapes_get_a_clear_error():
    attn, repr_, index, _query, scale, mask, _ = _case(4, 1, 25, 5, (20,), False)
    with pytest.raises(RuntimeError, match="query must be a contiguous float32"):
        search_attention.search_attend(
            attn, repr_, index, [torch.zeros(4, 1, 3)], scale, mask, 5, True
        )


def test_ids_past_the_table_are_refused_not_read():
    """Inference passes the raw ids straight into the tables: a bad id must fail cleanly."""
    attn, repr_, index, query, scale, mask, _ = _case(4, 1, 25, 5, (20,), False)
    index = [index[0].clone()]
    index[0][2, 3] = 20
    with pytest.raises(RuntimeError, match="1 ids outside"):
        search_attention.search_attend(attn, repr_, index, query, scale, mask, 5, False)


@pytest.mark.parametrize("width", [None, 16])
def test_int32_ids_index_like_int64_ones(width):
    """Inference indexes the tables with the batch's int32 ids as they come."""
    attn, repr_, index, query, scale, mask, params = _case(
        16, 2, 30, 5, (25, 6), True, width, shared_pos=True
    )
    index32 = [None if i is None else i.int() for i in index]

    def run(idx):
        top, full, picked, valid = search_attention.search_attend(
            attn, repr_, idx, query, scale, mask, 5, True
        )
        grads = torch.autograd.grad(top.sin().sum() + full.cos().sum(), params)
        return (top, full, picked, valid, *grads)

    for a, b in zip(run(index32), run(index), strict=True):
        assert torch.equal(a, b)
    index32[0][3, 4] = 25
    with pytest.raises(RuntimeError, match="1 ids outside"):
        search_attention.search_attend(attn, repr_, index32, query, scale, mask, 5, False)


@pytest.mark.parametrize("width", [3, 16])
def test_ties_at_the_kth_score_take_the_earliest_positions(width):
    """select_top's early exit and its tie rule: equal rows give equal scores."""
    rows = torch.zeros(5, width)
    rows[1], rows[2], rows[3], rows[4] = 1.0, 2.0, 2.0, 3.0  # rows 2 and 3 tie
    index = torch.tensor(
        [
            [0, 2, 1, 3, 2, 4, 1, 3, 0, 2, 1, 1],  # k-th score (2.0) shared by 4 positions
            [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],  # every score equal
            [1, 4, 2, 1, 4, 1, 1, 1, 4, 1, 1, 1],  # exactly 3 above the rest: no tie
        ]
    )
    mask = index != 0
    mask[2, 0] = False
    query = [torch.ones(3, 1, width)]
    _, _, idx, valid = search_attention.search_attend(
        [rows], [rows], [index], query, [1.0], mask, 3, False
    )
    for b in range(3):
        scores = (rows[index[b]] @ query[0][b, 0]).tolist()
        real = [p for p in range(12) if mask[b, p]]
        expected = sorted(sorted(real, key=lambda p: (-scores[p], p))[:3])
        assert idx[b, 0].tolist() == expected
        assert valid[b, 0].all()


@pytest.mark.parametrize("width", [None, 16])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_reading_the_tables_at_the_ids_equals_reading_the_distinct_rows(
    width, id_dtype, backward_mode
):
    """Training's path (`tables`): the kernels read whole tables at the batch's ids and add the
    gradients into the distinct rows at their index. Same outputs as the distinct rows read at
    that index, and the stand-ins get those rows' gradients exactly (same summation order)."""
    b, m, length, k = 12, 2, 40, 6
    g = torch.Generator().manual_seed(3)
    vocab = (90, 30)  # table rows; a batch uses some of them
    da, dr = ([16, 16], [16, 16]) if width else ([4, 16], [5, 2])
    tables = [
        (torch.randn(v, a, generator=g), torch.randn(v, r, generator=g))
        for v, a, r in zip(vocab, da, dr, strict=True)
    ]
    ids = [torch.randint(0, v // 2, (b, length), generator=g) * 2 for v in vocab]
    distinct = [torch.unique(i, return_inverse=True) for i in ids]
    pos_a, pos_r = torch.randn(length, 3, generator=g), torch.randn(length, 4, generator=g)
    query = [torch.randn(b, m, d, generator=g) for d in da] + [torch.randn(1, 1, 3, generator=g)]
    scale, mask = [0.5, 0.25, 0.7], torch.rand(b, length, generator=g) < 0.8
    mask[0] = False

    def run(read_tables: bool):
        rows_a = [t[0][u].requires_grad_() for t, (u, _) in zip(tables, distinct, strict=True)]
        rows_r = [t[1][u].requires_grad_() for t, (u, _) in zip(tables, distinct, strict=True)]
        attn, repr_ = [*rows_a, pos_a], [*rows_r, pos_r]
        if read_tables:  # the distinct rows' stand-ins: never read
            attn[:2] = [torch.zeros_like(r).requires_grad_() for r in rows_a]
            repr_[:2] = [torch.zeros_like(r).requires_grad_() for r in rows_r]
            index = [i.to(id_dtype) for i in ids] + [None]
            read = [(t[0], t[1], inv) for t, (_, inv) in zip(tables, distinct, strict=True)]
            read += [None]
        else:
            index, read = [inv for _, inv in distinct] + [None], None
        top, full, idx, valid = search_attention.search_attend(
            attn, repr_, index, query, scale, mask, k, True, read
        )
        grads = torch.autograd.grad(top.sin().sum() + full.cos().sum(), [*attn[:2], *repr_[:2]])
        return (top, full, idx, valid, *grads)

    for got, want in zip(run(True), run(False), strict=True):
        assert torch.equal(got, want)


def test_a_bad_gradient_index_is_refused():
    attn, repr_, index, query, scale, mask, _ = _case(4, 1, 25, 5, (20,), False)
    table = (attn[0].detach(), repr_[0].detach())
    grad_index = index[0].clone()
    grad_index[1, 2] = 20  # past the 20 distinct rows of the stand-ins
    top, full, _, _ = search_attention.search_attend(
        attn, repr_, index, query, scale, mask, 5, True, [(*table, grad_index)]
    )
    with pytest.raises(RuntimeError, match="grad_index: 1 ids outside"):
        torch.autograd.grad(top.sum() + full.sum(), attn)
