"""Embedding towers: which tables (and projections) give the attention and representation
vectors of behaviours and targets. This is where DARE, TWIN, TWIN-4E and TWIN w/ proj. differ
(SPEC §3.3): one shared set, decoupled attention/representation sets, four sets, or one set
with learned projections per role.

Four roles: attention-history (keys), attention-target (query), representation-history
(values) and representation-target. Each role returns its field vectors split into a semantic
part (item, category, ...) and a position part, because DARE scales the two dot products
separately: s_i = <e_sem, v_sem>/sqrt(d_sem) + <p_i, p_0>/sqrt(d_pos).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.nn.embedding import FieldEmbedding
from longrec.nn.temporal import relative_positions

ROLES = ("attn_hist", "attn_tgt", "repr_hist", "repr_tgt")
COUPLINGS = ("decoupled", "shared", "four", "projection")


@dataclass
class Embedded:
    sem: Tensor  # [B, L|M, D_sem]
    pos: Tensor | None  # [L, D_pos] for history, [D_pos] for targets; None without positions

    def joined(self) -> Tensor:
        if self.pos is None:
            return self.sem
        pos = self.pos.to(self.sem.dtype)
        return torch.cat((self.sem, pos.expand(*self.sem.shape[:-1], pos.shape[-1])), dim=-1)


class EmbeddingSet(nn.Module):
    """Tables for the semantic fields plus a target-relative position table."""

    def __init__(
        self,
        schema,
        fields: list[str],
        dim: int,
        pos_dim: int,
        max_positions: int,
        dedup: bool,
        sparse: bool,
    ):
        super().__init__()
        self.fields = fields
        self.embed = FieldEmbedding(
            {f: (schema.vocab(f), dim) for f in fields},
            sparse=sparse,
            dedup=dedup,
            multi=schema.multi_fields() & set(fields),
        )
        self.max_positions = max_positions
        self.pos = nn.Embedding(max_positions + 1, pos_dim, sparse=sparse) if pos_dim > 0 else None
        self.sem_dim, self.pos_dim = dim * len(fields), pos_dim

    def history(self, batch: Batch) -> Embedded:
        sem = self.embed(batch.history, self.fields)
        pos = None
        if self.pos is not None:
            ids = relative_positions(batch.history_len, sem.device, self.max_positions)
            pos = self.pos(ids)
        return Embedded(sem, pos)

    def target(self, batch: Batch) -> Embedded:
        sem = self.embed(batch.target, self.fields)
        pos = self.pos.weight[0] if self.pos is not None else None
        return Embedded(sem, pos)


class RoleProjection(nn.Module):
    """TWIN w/ proj.: per-field bias-free d_f x d_f maps (the released script's path) or one
    D x D map with bias over the concatenation (the README's description)."""

    def __init__(self, field_dims: list[int], pos_dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.field_dims, self.pos_dim = field_dims, pos_dim
        if mode == "per_field":
            self.maps = nn.ModuleList(nn.Linear(d, d, bias=False) for d in field_dims)
            self.pos_map = nn.Linear(pos_dim, pos_dim, bias=False) if pos_dim else None
        elif mode == "concat":
            total = sum(field_dims) + pos_dim
            self.full = nn.Linear(total, total)
        else:
            raise ValueError(f"projection must be per_field or concat, got '{mode}'")

    def forward(self, x: Embedded) -> Embedded:
        if self.mode == "per_field":
            parts = torch.split(x.sem, self.field_dims, dim=-1)
            sem = torch.cat([m(p) for m, p in zip(self.maps, parts, strict=True)], dim=-1)
            pos = self.pos_map(x.pos) if self.pos_map is not None and x.pos is not None else x.pos
            return Embedded(sem, pos)
        return Embedded(self.full(x.joined()), None)


class Towers(nn.Module):
    def __init__(
        self,
        schema,
        fields: list[str],
        *,
        embed_dim: int,
        pos_dim: int,
        attn_dim: int,
        attn_pos_dim: int,
        coupling: str,
        projection: str = "per_field",
        max_positions: int,
        dedup: bool = False,
        sparse: bool = False,
    ):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got '{coupling}'")
        make = lambda d, p: EmbeddingSet(schema, fields, d, p, max_positions, dedup, sparse)  # noqa: E731
        if coupling == "decoupled":
            self.sets = nn.ModuleDict(
                {"attn": make(attn_dim, attn_pos_dim), "repr": make(embed_dim, pos_dim)}
            )
            self.role_set = {
                "attn_hist": "attn",
                "attn_tgt": "attn",
                "repr_hist": "repr",
                "repr_tgt": "repr",
            }
        elif coupling == "four":
            self.sets = nn.ModuleDict(
                {
                    "attn_hist": make(attn_dim, attn_pos_dim),
                    "attn_tgt": make(attn_dim, attn_pos_dim),
                    "repr_hist": make(embed_dim, pos_dim),
                    "repr_tgt": make(embed_dim, pos_dim),
                }
            )
            self.role_set = {r: r for r in ROLES}
        else:  # shared table (TWIN), optionally with per-role projections
            self.sets = nn.ModuleDict({"shared": make(embed_dim, pos_dim)})
            self.role_set = dict.fromkeys(ROLES, "shared")
        self.projections = None
        if coupling == "projection":
            dims = [embed_dim] * len(fields)
            self.projections = nn.ModuleDict(
                {r: RoleProjection(dims, pos_dim, projection) for r in ROLES}
            )

    def embed(self, role: str, batch: Batch) -> Embedded:
        tables = self.sets[self.role_set[role]]
        out = tables.history(batch) if role.endswith("hist") else tables.target(batch)
        if self.projections is not None:
            out = self.projections[role](out)
        return out

    def repr_dim(self) -> int:
        tables = self.sets[self.role_set["repr_hist"]]
        return tables.sem_dim + tables.pos_dim


def attention_scores(keys: Embedded, query: Embedded) -> Tensor:
    """DARE's split-scaled score [B, M, L] (SPEC §3.3)."""
    sem = torch.matmul(query.sem, keys.sem.transpose(-1, -2)) / keys.sem.shape[-1] ** 0.5
    if keys.pos is None or query.pos is None:
        return sem
    bias = (keys.pos @ query.pos) / keys.pos.shape[-1] ** 0.5  # [L]: a learned recency prior
    return sem + bias.to(sem.dtype)
