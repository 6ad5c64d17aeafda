"""STCA's single-query cross attention (nn.cross_attention) and SwiGLU (nn.ffn).

The re-associated kernel (K and V never built) must equal the plain one (K, V materialised),
and both must equal the per-(row, target, head) definition (docs/models.md, "STCA").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longrec.nn.cross_attention import (
    MultiHeadCrossAttention,
    cheaper_kernel,
    cross_attention_plain,
    cross_attention_reassociated,
)
from longrec.nn.ffn import SwiGLU, SwiGLUStack

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(b, m, length, heads, dh, seed, dtype, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    d = heads * dh
    query = torch.randn(b, m, d, generator=g, dtype=dtype)
    x = torch.randn(b, length, d, generator=g, dtype=dtype)
    weights = [torch.randn(d, d, generator=g, dtype=dtype) / math.sqrt(d) for _ in range(3)]
    # left padding of random length per row, the first row possibly empty
    n_real = torch.randint(0, length + 1, (b,), generator=g)
    if not empty_row:
        n_real = n_real.clamp_min(1)
    mask = torch.arange(length) >= (length - n_real).unsqueeze(1)
    return query, x, mask, weights


def _fused(*args):
    """The re-associated kernel as the model runs it: fused attention, no scores."""
    return cross_attention_reassociated(*args, return_scores=False)


def _naive(query, x, mask, w_q, w_k, w_v, heads):
    """The definition literally, one (row, target, head) at a time."""
    b, m, d = query.shape
    dh = d // heads
    out = torch.zeros_like(query)
    for r in range(b):
        real = x[r][mask[r]]  # [n, d]
        for t in range(m):
            for h in range(heads):
                rows = slice(h * dh, (h + 1) * dh)
                q = query[r, t] @ w_q[rows].T  # q W_Q^h
                k = real @ w_k[rows].T
                v = real @ w_v[rows].T
                if len(real):
                    alpha = torch.softmax(k @ q / math.sqrt(dh), dim=0)
                    out[r, t, rows] = alpha @ v
    return out


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    m=st.integers(1, 4),
    length=st.integers(1, 12),
    heads=st.sampled_from([1, 2, 4]),
    dh=st.sampled_from([1, 3, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_reassociated_equals_plain(b, m, length, heads, dh, seed):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        query, x, mask, (w_q, w_k, w_v) = _case(b, m, length, heads, dh, seed, dtype)
        plain, s_plain = cross_attention_plain(query, x, mask, w_q, w_k, w_v, heads)
        fast, s_fast = cross_attention_reassociated(query, x, mask, w_q, w_k, w_v, heads)
        fused, none = cross_attention_reassociated(
            query, x, mask, w_q, w_k, w_v, heads, return_scores=False
        )
        assert none is None
        torch.testing.assert_close(fast, plain, atol=tol, rtol=tol)
        torch.testing.assert_close(fused, plain, atol=tol, rtol=tol)
        torch.testing.assert_close(s_fast, s_plain, atol=tol, rtol=tol)
        assert s_fast.shape == (b, m, heads, length)
        empty = ~mask.any(1)
        assert (fast[empty] == 0).all() and (fused[empty] == 0).all()  # nothing to attend to


def test_both_kernels_equal_the_definition():
    query, x, mask, (w_q, w_k, w_v) = _case(3, 4, 9, 2, 4, seed=1, dtype=torch.float64)
    expect = _naive(query, x, mask, w_q, w_k, w_v, 2)
    for fn in (cross_attention_plain, cross_attention_reassociated, _fused):
        torch.testing.assert_close(fn(query, x, mask, w_q, w_k, w_v, 2)[0], expect)


@pytest.mark.parametrize("seed", [2, 7])
def test_gradients_agree(seed):
    """Same function, so the same gradients for queries, history and every weight (float64),
    also with an empty history (zero output, zero gradient) or no padding at all."""
    query, x, mask, weights = _case(3, 3, 7, 2, 4, seed=seed, dtype=torch.float64)
    mask[0] = False
    mask[1] = True
    grads = []
    for fn in (cross_attention_plain, cross_attention_reassociated, _fused):
        inputs = [t.clone().requires_grad_() for t in (query, x, *weights)]
        out, _ = fn(inputs[0], inputs[1], mask, *inputs[2:], 2)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).cos()).sum().backward()
        grads.append([t.grad for t in inputs])
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_padding_never_leaks():
    query, x, mask, weights = _case(3, 2, 10, 2, 4, seed=3, dtype=torch.float64)
    noisy = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, 1e3))
    for fn in (cross_attention_plain, cross_attention_reassociated, _fused):
        torch.testing.assert_close(
            fn(query, noisy, mask, *weights, 2)[0], fn(query, x, mask, *weights, 2)[0]
        )


def test_many_targets_equal_one_at_a_time():
    """M queries in one call give what M single-query calls give (the RLB layout)."""
    query, x, mask, weights = _case(2, 5, 11, 4, 2, seed=4, dtype=torch.float32)
    together, _ = _fused(query, x, mask, *weights, 4)
    for t in range(5):
        alone, _ = _fused(query[:, t : t + 1], x, mask, *weights, 4)
        torch.testing.assert_close(together[:, t : t + 1], alone, atol=1e-6, rtol=1e-5)


def test_module_kernels_agree_and_validate():
    torch.manual_seed(0)
    fast = MultiHeadCrossAttention(16, 4)
    plain = MultiHeadCrossAttention(16, 4, kernel="plain")
    plain.load_state_dict(fast.state_dict())
    query, x, mask, _ = _case(2, 3, 6, 4, 4, seed=5, dtype=torch.float32)
    out, scores = fast.attend(query, x, mask, return_scores=True)
    torch.testing.assert_close(out, plain(query, x, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(query, x, mask), out, atol=1e-6, rtol=1e-5)
    assert scores.shape == (2, 3, 4, 6)
    assert fast.attend(query, x, mask)[1] is None  # the fused path keeps no scores
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadCrossAttention(10, 4)
    with pytest.raises(ValueError, match="kernel"):
        MultiHeadCrossAttention(16, 4, kernel="flash")


@pytest.mark.parametrize("targets", [1, 3, 6, 40])
def test_auto_kernel_picks_the_cheaper_form_with_the_same_result(targets):
    """d = 16, h = 4: re-associated while M·3 < 16 (M <= 5), plain from M = 6."""
    assert cheaper_kernel(targets, 4, 16) == ("plain" if targets >= 6 else "reassociated")
    torch.manual_seed(0)
    auto = MultiHeadCrossAttention(16, 4)
    assert auto.kernel == "auto"
    reference = MultiHeadCrossAttention(16, 4, kernel="reassociated")
    reference.load_state_dict(auto.state_dict())
    query, x, mask, _ = _case(2, targets, 9, 4, 4, seed=7, dtype=torch.float32)
    torch.testing.assert_close(
        auto(query, x, mask), reference(query, x, mask), atol=1e-5, rtol=1e-5
    )


def test_runs_under_bf16_autocast():
    torch.manual_seed(0)
    attn = MultiHeadCrossAttention(16, 4)
    query, x, mask, _ = _case(2, 3, 50, 4, 4, seed=6, dtype=torch.float32, empty_row=False)
    expect = attn(query, x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(query, x, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expect, atol=0.05, rtol=0.05)


# -- SwiGLU ---------------------------------------------------------------------------------
def test_swiglu_is_the_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(8, ratio=2)
    x = torch.randn(3, 5, 8)
    out = ffn(x)
    assert out.shape == x.shape
    assert ffn.w_u.shape == ffn.w_v.shape == (8, 16) and ffn.w_o.shape == (16, 8)
    expect = ((x @ ffn.w_u) * F.silu(x @ ffn.w_v)) @ ffn.w_o  # ((x W_u) ⊙ Swish(x W_v)) W_o
    torch.testing.assert_close(out, expect)
    assert SwiGLU(8, ratio=1.5, out_dim=3)(x).shape == (3, 5, 3)


def test_swiglu_gradients_reach_every_weight():
    torch.manual_seed(0)
    ffn = SwiGLU(6, ratio=2)
    x = torch.randn(4, 6, requires_grad=True)
    ffn(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in ffn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_swiglu_stack():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 8)
    stack = SwiGLUStack(8, depth=2)
    h = x
    for ffn, norm in zip(stack.ffns, stack.norms, strict=True):
        h = norm(ffn(h))
    torch.testing.assert_close(stack(x), h)
    residual = SwiGLUStack(8, depth=1, residual=True)
    torch.testing.assert_close(residual(x), residual.norms[0](x + residual.ffns[0](x)))
    with pytest.raises(ValueError, match="depth"):
        SwiGLUStack(8, depth=0)


def test_training_pool_matches_sdpa_and_passes_gradcheck():
    """CPU training pools with `_SoftmaxPool` (hand-written backward), inference with SDPA: the
    two agree, empty histories give zero in both, and the backward passes gradcheck."""
    from longrec.nn.cross_attention import _pool_fused, _SoftmaxPool

    g = torch.Generator().manual_seed(5)
    u = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    x = torch.randn(3, 9, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 9, generator=g) < 0.6
    mask[0] = False  # an empty history
    mask[1] = True
    with torch.no_grad():
        inference = _pool_fused(u, x, mask)  # SDPA
    trained = _pool_fused(u.clone().requires_grad_(), x.clone().requires_grad_(), mask)
    assert "_SoftmaxPoolBackward" in _graph_names(trained.grad_fn)
    torch.testing.assert_close(trained.detach(), inference, atol=1e-10, rtol=1e-10)
    assert (trained[0] == 0).all()
    real = mask.clone()
    real[0] = True  # `_pool_fused` lets an empty row attend to its padding, then zeroes it
    ui, xi = u.clone().requires_grad_(), x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _SoftmaxPool.apply(a, b, real), (ui, xi))
    assert torch.autograd.gradcheck(lambda a, b: _SoftmaxPool.apply(a, b, None), (ui, xi))


def _graph_names(fn, seen=None) -> set[str]:
    """Class names of every node of an autograd graph."""
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return set()
    seen.add(fn)
    names = {type(fn).__name__}
    for nxt, _ in fn.next_functions:
        names |= _graph_names(nxt, seen)
    return names
