"""STCA's re-associated attention at 10K: the fused SDPA call (what the model runs) against two
explicit batched GEMMs with a hand-written backward (dP = dO Xᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)),
dU = dS X, dX = Pᵀ dO + dSᵀ U), forward + backward, interleaved rounds. Checks first that both
give the same outputs and gradients.

Usage: python benchmarks/stca_attention_ab.py [B R L d]   (default 16 32 10000 64: 16 requests,
8 targets x 4 heads, 10K history, width 64)
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F


class ExplicitPool(torch.autograd.Function):
    """softmax(U Xᵀ) X with K = V = X, saving P (the [B, R, L] weights) for the backward."""

    @staticmethod
    def forward(ctx, u, x, mask):
        s = torch.bmm(u, x.transpose(1, 2))
        s.masked_fill_(~mask.unsqueeze(1), torch.finfo(s.dtype).min / 2)
        p = torch.softmax(s, -1)
        o = torch.bmm(p, x)
        ctx.save_for_backward(u, x, p, o)
        return o

    @staticmethod
    def backward(ctx, do):
        u, x, p, o = ctx.saved_tensors
        ds = torch.bmm(do, x.transpose(1, 2)).sub_((do * o).sum(-1, keepdim=True)).mul_(p)
        dx = torch.bmm(p.transpose(1, 2), do).baddbmm_(ds.transpose(1, 2), u)
        return torch.bmm(ds, x), dx, None


def fused(u, x, mask):
    xs = x.unsqueeze(1)
    m = mask[:, None, None, :]
    return F.scaled_dot_product_attention(u.unsqueeze(1), xs, xs, attn_mask=m, scale=1.0)[:, 0]


def main(b: int = 16, r: int = 32, length: int = 10_000, d: int = 64, rounds: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, r, d, generator=g, requires_grad=True)
    x = torch.randn(b, length, d, generator=g, requires_grad=True)
    lens = torch.randint(length // 2, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None] < lens[:, None]
    grad = torch.randn(b, r, d, generator=g)
    results = {}
    for name, f in (("explicit", ExplicitPool.apply), ("fused_sdpa", fused)):
        out = f(u, x, mask)
        out.backward(grad)
        results[name] = (out.detach(), u.grad.clone(), x.grad.clone())
        u.grad = x.grad = None
    for a, c in zip(results["explicit"], results["fused_sdpa"], strict=True):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    times: dict[str, list[float]] = {"explicit": [], "fused_sdpa": []}
    for _ in range(rounds):
        for name, f in (("explicit", ExplicitPool.apply), ("fused_sdpa", fused)):
            t0 = time.perf_counter()
            for _ in range(3):
                f(u, x, mask).backward(grad)
            times[name].append((time.perf_counter() - t0) / 3 * 1e3)
    for name, ms in times.items():
        print(
            f"{name}: forward + backward {min(ms):.1f}-{max(ms):.1f} ms (B={b}, R={r}, L={length}, d={d})"
        )


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:5]])
