"""Embedding tables for categorical fields, shared between history and targets.

`FieldEmbedding` holds one table per field and returns the concatenation of the fields'
vectors (SPEC §1.3). Multi-valued fields ([..., W] ids, 0 = padding) are mean-pooled. With
`dedup=True` each distinct id of a batch is looked up once and the result scattered back, which
makes the backward pass touch each row once (ids repeat heavily in long histories).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def init_normal(module: nn.Module, std: float) -> None:
    """DARE's init: N(0, std) for every non-bias parameter, zeros for biases."""
    for name, param in module.named_parameters():
        if param.dim() <= 1 or name.endswith("bias"):
            if name.endswith("bias"):
                nn.init.zeros_(param)
            continue
        nn.init.normal_(param, mean=0.0, std=std)


class FieldEmbedding(nn.Module):
    def __init__(
        self,
        dims: dict[str, tuple[int, int]],  # field -> (vocab size, dim)
        sparse: bool = False,
        dedup: bool = False,
        multi: frozenset[str] = frozenset(),  # fields whose ids have a trailing value axis [..., W]
    ):
        super().__init__()
        self.names = list(dims)
        self.dims = {k: d for k, (_, d) in dims.items()}
        self.tables = nn.ModuleDict(
            {
                k: nn.Embedding(max(v, 2), d, padding_idx=0, sparse=sparse)
                for k, (v, d) in dims.items()
            }
        )
        self.dedup = dedup
        self.multi = frozenset(multi)

    @property
    def out_dim(self) -> int:
        return sum(self.dims.values())

    def lookup(self, name: str, ids: Tensor) -> Tensor:
        table = self.tables[name]
        if self.dedup and ids.numel() > 4096:
            uniq, inverse = torch.unique(ids, return_inverse=True)
            out = table(uniq)[inverse]
        else:
            out = table(ids)
        if name in self.multi:
            valid = (ids != 0).unsqueeze(-1).to(out.dtype)
            out = (out * valid).sum(-2) / valid.sum(-2).clamp_min(1.0)
        return out

    def forward(self, ids: dict[str, Tensor], names: list[str] | None = None) -> Tensor:
        names = names or self.names
        return torch.cat([self.lookup(n, ids[n]) for n in names], dim=-1)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.tables.values()]
