"""Token-wise feed-forward blocks: SwiGLU (STCA's; docs/models.md, "STCA") and a stack of
LN(SwiGLU(.)) layers.

SwiGLU(x) = ((x W_u) ⊙ Swish(x W_v)) W_o with W_u, W_v ∈ R^{d×rd}, W_o ∈ R^{rd×d} and
Swish = SiLU (x·σ(x)). W_u and W_v are stored as one [2rd, d] matrix (`up`), so the two input
GEMMs are one GEMM over the tokens (one pass over x instead of two); `w_u`/`w_v` expose the
halves. No biases by default: the formula has none, and in STCA a LayerNorm follows.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    def __init__(
        self, dim: int, ratio: float = 2.0, out_dim: int | None = None, bias: bool = False
    ):
        super().__init__()
        hidden = max(1, round(dim * ratio))
        self.hidden = hidden
        self.up = nn.Linear(dim, 2 * hidden, bias=bias)  # [W_u | W_v]ᵀ, one GEMM
        self.down = nn.Linear(hidden, out_dim or dim, bias=bias)  # W_oᵀ

    @property
    def w_u(self) -> Tensor:
        """W_u [d, rd] (a view of `up`)."""
        return self.up.weight[: self.hidden].T

    @property
    def w_v(self) -> Tensor:
        """W_v [d, rd] (a view of `up`)."""
        return self.up.weight[self.hidden :].T

    @property
    def w_o(self) -> Tensor:
        """W_o [rd, d]."""
        return self.down.weight.T

    def forward(self, x: Tensor) -> Tensor:
        u, v = self.up(x).chunk(2, dim=-1)
        return self.down(u * F.silu(v))


class SwiGLUStack(nn.Module):
    """h_0 = x, h_k = LN(SwiGLU_k(h_{k-1})) for k = 1..depth (no residual, as in the STCA paper's
    X̃ = LN(SwiGLU(X)), docs/models.md, "STCA"; depth > 1 is the "FFN depth" of the paper's
    ablation)."""

    # train.compile=dense compiles this stack: fixed width, many tokens, GEMMs plus elementwise
    # ops that Inductor fuses (train/compile.py has the measurement)
    compile_dense = True

    def __init__(self, dim: int, ratio: float = 2.0, depth: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        if depth < 1:
            raise ValueError(f"FFN depth must be >= 1, got {depth}")
        self.ffns = nn.ModuleList(SwiGLU(dim, ratio) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for ffn, norm in zip(self.ffns, self.norms, strict=True):
            x = norm(x + ffn(x)) if self.residual else norm(ffn(x))
        return x
