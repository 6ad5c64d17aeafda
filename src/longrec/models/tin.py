"""The Tencent advertising stack (docs/models.md, "TIN family"): TIN and its descendants behind
one search stage.

TIN (Zhou et al., WWW'24 companion, arXiv 2308.08487): target-aware temporal encoding (TTE:
target-relative position and/or time-gap buckets added to behaviour and target embeddings),
target-aware attention and target-aware representation. The "Practice" paper (Tencent, arXiv
2510.21714) builds on it; only its abstract and blog-level summaries are public, so everything
taken from it is [INFER] and a parameter here:

- search: `none` (whole history), `recent` (most recent K), `hard` (target's category),
  `hier` (hierarchical hard search over category_l1..lH, finest first, `hier_reading` merged or
  per_level), `soft` (decoupled-embedding soft search: DARE-style attention tables, trained by
  a full-sequence auxiliary head), `hier+soft` (union, de-duplicated).
- modelling: `tin`, `tin_mh` (multi-head), `stacked` (Stacked TIN, running query), `dsi`
  (Decoupled Side-Info TIN: one attention per field group, shared fused values; event-side
  fields such as behaviour type and domain score against a per-target-type query [INFER]).
- `td_pe`: temporal tables indexed by advertising target type (Target-Decoupled PE).
- `type_heads`: one prediction head per advertising target type.

Registered: tin, tin_mh, stacked_tin, dsi_tin, tencent (hier+soft, DSI-TIN, TD-PE, type heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.data.schema import category_level_field
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register, register_variant
from longrec.models.tin_blocks import MultiHeadTin, StackedTin, dsi_pool, tin_pool
from longrec.models.towers import EmbeddingSet, dedup, scores
from longrec.nn.attention import masked_softmax
from longrec.nn.embedding import init_normal, zero_padding_rows
from longrec.nn.heads import MLPHead
from longrec.nn.search import gather_behaviours, hard_search, topk_search
from longrec.nn.temporal import TemporalEncoding

SEARCHES = ("none", "recent", "hard", "hier", "soft", "hier+soft")
MODELLING = ("tin", "tin_mh", "stacked", "dsi")


@dataclass
class TinParams:
    embed_dim: int = 16  # per item-side field; TIN's code uses 64 + 64
    fields: tuple[str, ...] | None = (
        None  # item-side fields (default: shared by history and target)
    )
    temporal: str = "both"  # TTE: position | time | both
    temporal_buckets: int = 64
    td_pe: bool = False  # Target-Decoupled PE: temporal tables per advertising target type
    search: str = "none"
    top_k: int = 50  # K of recent / hard / soft search
    hier_quotas: tuple[int, ...] | None = None  # per level, coarse -> fine; default: K split evenly
    hier_reading: str = "merged"  # merged list | per_level (one sub-sequence and TIN per level)
    soft_k: int = 50  # K of the soft half of hier+soft
    attn_dim: int = 16  # attention tables of the soft search (DARE-style, decoupled)
    aux_loss: bool = True  # full-sequence auxiliary head training the soft-search tables
    modelling: str = "tin"
    heads: int = 2  # tin_mh
    layers: int = 3  # stacked
    stacked_output: str = "concat"
    dsi_groups: tuple[tuple[str, ...], ...] | None = None  # default: see _default_groups
    type_heads: bool = False
    hidden: tuple[int, ...] = (200, 80)
    type_dim: int = 8  # target-type embedding into the head(s) when the data has types; 0 = off
    init_std: float = 0.01


@register("tin", "TIN: target-aware temporal encoding, attention and representation (WWW'24)")
class TinModel(SequenceModel):
    Params = TinParams

    def __init__(self, schema: DataSchema, params: TinParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        if p.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got '{p.search}'")
        if p.modelling not in MODELLING:
            raise ValueError(f"modelling must be one of {MODELLING}, got '{p.modelling}'")
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        self.n_types = max(1, schema.n_target_types) if p.td_pe or p.type_heads else 1
        max_pos = max(schema.max_len, 1)
        self.values = EmbeddingSet(schema, self.fields, p.embed_dim, 0, max_pos, sparse_embeddings)
        d = self.values.sem_dim
        self.event_fields = [
            n for n, f in schema.fields.items() if f.side == "event" and f.width == 1
        ]
        self.levels = self._levels(schema)
        if p.modelling == "dsi":
            self.groups = [g for g in (p.dsi_groups or self._default_groups()) if g]
            self.event_tables = nn.ModuleDict(
                {f: nn.Embedding(schema.vocab(f), p.embed_dim) for f in self.event_fields}
            )
            self.fuse = nn.Linear(d + p.embed_dim * len(self.event_fields), d)
            self.fuse_target = nn.Linear(d, d)
            group_fields = sorted({f for g in self.groups for f in g})
            item_side = [f for f in group_fields if f in self.fields]
            self.group_attn = (
                EmbeddingSet(schema, item_side, p.embed_dim, 0, max_pos, sparse_embeddings)
                if item_side
                else None
            )
            self.group_event_query = nn.ModuleDict(
                {
                    f: nn.Embedding(self.n_types, p.embed_dim)
                    for f in group_fields
                    if f in self.event_fields
                }
            )
            self.group_temporal = nn.ModuleList(
                TemporalEncoding(1, p.temporal, p.temporal_buckets, n_target_types=self.n_types)
                for _ in self.groups
            )
        self.temporal = TemporalEncoding(
            d, p.temporal, p.temporal_buckets, n_target_types=self.n_types if p.td_pe else 1
        )
        if p.search in ("soft", "hier+soft"):
            self.attn = EmbeddingSet(
                schema, self.fields, p.attn_dim, p.attn_dim, max_pos, sparse_embeddings
            )
        if p.modelling == "tin_mh":
            self.mh = MultiHeadTin(d, p.heads)
        elif p.modelling == "stacked":
            self.stacked = StackedTin(d, p.layers, p.stacked_output)
        pooled = {
            "tin": d,
            "tin_mh": d,
            "stacked": d * (p.layers if p.stacked_output == "concat" else 1),
        }.get(p.modelling, d * len(getattr(self, "groups", [])) or d)
        n_branches = len(self.levels) if p.search == "hier" and p.hier_reading == "per_level" else 1
        in_dim = pooled * n_branches + 2 * d
        n_heads = self.n_types if p.type_heads else 1
        types = schema.head_types(p.type_dim)
        self.heads = nn.ModuleList(MLPHead(in_dim, p.hidden, **types) for _ in range(n_heads))
        self.aux_head = (
            MLPHead(3 * d, p.hidden[:1], **types)
            if p.search in ("soft", "hier+soft") and p.aux_loss
            else None
        )
        init_normal(self, p.init_std)
        zero_padding_rows(self)

    # -- configuration helpers ----------------------------------------------------------
    def _levels(self, schema: DataSchema) -> list[str]:
        levels = []
        level = 1
        while category_level_field(level) in schema.fields:
            name = category_level_field(level)
            if name in schema.target_fields:
                levels.append(name)
            level += 1
        if not levels and "category" in schema.fields and "category" in schema.target_fields:
            levels = ["category"]
        if self.params.search in ("hard", "hier", "hier+soft") and not levels:
            raise ValueError(
                "hard/hierarchical search needs a category field in history and target"
            )
        return levels

    def _default_groups(self) -> list[tuple[str, ...]]:
        """[INFER] semantic (item, category), scene (category, domain), action (category, behaviour)."""
        cat = "category" if "category" in self.fields else self.fields[-1]
        groups = [tuple(f for f in ("item", cat) if f in self.fields)]
        groups += [(cat, f) for f in ("domain", "behavior") if f in self.event_fields]
        return groups

    def history_fields(self) -> tuple[str, ...]:
        names = list(self.fields) + [f for f in self.levels if f not in self.fields]
        if self.params.modelling == "dsi":
            names += [f for f in self.event_fields if f not in names]
        return tuple(names)

    # -- contract -------------------------------------------------------------------------
    def encode_user(self, batch: Batch) -> UserState:
        distinct = {
            f: dedup(batch.history[f], self.values.tables[f].num_embeddings) for f in self.fields
        }
        state: UserState = {
            "values": self.values.history(batch, distinct),
            "mask": batch.history_mask,
            "ts": batch.history_ts,
        }
        if hasattr(self, "attn"):
            state["keys"] = self.attn.history(batch, distinct)
        for f in set(self.levels) | (
            set(self.event_fields) if self.params.modelling == "dsi" else set()
        ):
            state[f] = batch.history[f]
        if self.params.modelling == "dsi" and self.group_attn is not None:
            state["group_keys"] = self.group_attn.history(
                batch, {f: distinct[f] for f in self.group_attn.fields}
            )
        return state

    def score(self, state: UserState, batch: Batch) -> Tensor:
        return self._run(state, batch, aux=False)[0]

    def forward_train(self, batch: Batch):
        logits, aux = self._run(self.encode_user(batch), batch, aux=self.aux_head is not None)
        return logits, ([(aux, 1.0)] if aux is not None else [])

    def search_scores(self, batch: Batch) -> Tensor | None:
        state = self.encode_user(batch)
        if hasattr(self, "attn"):
            return scores(state["keys"], self.attn.target(batch))
        v = self.values.target(batch).joined()
        return torch.matmul(v, state["values"].dense().transpose(-1, -2))

    # -- search ---------------------------------------------------------------------------
    def _search(
        self, state: UserState, batch: Batch, soft_scores: Tensor | None
    ) -> list[tuple[Tensor, Tensor]]:
        p, mask = self.params, state["mask"]
        b, length = mask.shape
        m = batch.num_targets
        if p.search == "none":
            idx = torch.arange(length).expand(b, m, length)
            return [(idx, mask.unsqueeze(1).expand(b, m, length))]
        if p.search == "recent":
            k = min(p.top_k, length)
            idx = torch.arange(length - k, length).expand(b, m, k)
            return [(idx, torch.gather(mask.unsqueeze(1).expand(b, m, length), 2, idx))]
        if p.search == "soft":
            return [topk_search(soft_scores, mask, p.top_k)]
        if p.search == "hard":
            level = self.levels[-1]
            return [hard_search(state[level], batch.target[level], mask, p.top_k)]
        from longrec.nn.hier_search import (
            hierarchical_hard_search,
            per_level_hard_search,
            union_search,
        )

        hist = [state[f] for f in self.levels]
        tgt = [batch.target[f] for f in self.levels]
        quotas = list(p.hier_quotas) if p.hier_quotas else _even_split(p.top_k, len(hist))
        if p.search == "hier" and p.hier_reading == "per_level":
            return per_level_hard_search(hist, tgt, mask, quotas)
        hard = hierarchical_hard_search(hist, tgt, mask, quotas, p.top_k)
        if p.search == "hier":
            return [hard]
        soft = topk_search(soft_scores, mask, p.soft_k)
        return [union_search(*hard, *soft)]

    # -- scoring --------------------------------------------------------------------------
    def _run(self, state: UserState, batch: Batch, aux: bool):
        p = self.params
        ttype = batch.target_type
        target = self.values.target(batch).joined()  # [B, M, d]
        soft_scores = (
            scores(state["keys"], self.attn.target(batch)) if hasattr(self, "attn") else None
        )
        v_t = target + self.temporal.target(ttype if p.td_pe else None, target.shape[:-1]).to(
            target.dtype
        )
        pooled = [
            self._pool(state, batch, idx, valid, v_t, ttype)
            for idx, valid in self._search(state, batch, soft_scores)
        ]
        x = torch.cat([*pooled, v_t, target], dim=-1)
        logits = self._heads(x, batch, ttype)
        aux_logits = None
        if aux:
            full = state["values"].pool_all(masked_softmax(soft_scores, state["mask"]))
            aux_logits = self.aux_head(
                torch.cat((target, full, target * full), dim=-1), batch.target_mask, ttype
            )
        return logits, aux_logits

    def _pool(self, state, batch, idx: Tensor, valid: Tensor, v_t: Tensor, ttype) -> Tensor:
        p = self.params
        length = state["mask"].shape[1]
        e = torch.cat([f.at(idx) for f in state["values"].fields], dim=-1)  # [B, M, K, d]
        positions = length - idx
        gaps = batch.target_ts.unsqueeze(-1) - gather_behaviours(state["ts"], idx)
        temporal = self.temporal.behaviours(positions, gaps, ttype if p.td_pe else None)
        if p.modelling == "dsi":
            return self._dsi(state, idx, valid, e, v_t, positions, gaps, ttype, batch)
        e = e + temporal.to(e.dtype)
        if p.modelling == "tin":
            return tin_pool(e, v_t, valid)[0]
        if p.modelling == "tin_mh":
            return self.mh(e, v_t, valid)
        return self.stacked(e, v_t, valid)

    def _dsi(self, state, idx, valid, e, v_t, positions, gaps, ttype, batch) -> Tensor:
        p = self.params
        events = [self.event_tables[f](gather_behaviours(state[f], idx)) for f in self.event_fields]
        values = self.fuse(torch.cat([e, *events], dim=-1))
        values = values + self.temporal.behaviours(positions, gaps, ttype if p.td_pe else None).to(
            values.dtype
        )
        target = self.fuse_target(v_t)
        type_ids = (
            ttype
            if ttype is not None and self.n_types > 1
            else torch.zeros_like(batch.target_mask, dtype=torch.long)
        )
        group_scores = []
        item_keys = {}
        if "group_keys" in state:
            tgt = self.group_attn.target(batch)
            for name, field, t in zip(
                self.group_attn.fields, state["group_keys"].fields, tgt.fields, strict=True
            ):
                item_keys[name] = (field.at(idx), t)
        for g, temporal in zip(self.groups, self.group_temporal, strict=True):
            s = None
            for f in g:
                if f in item_keys:
                    k, t = item_keys[f]
                    part = (k * t.unsqueeze(2)).sum(-1)
                else:  # event-side field: its value against a per-target-type query
                    k = self.event_tables[f](gather_behaviours(state[f], idx))
                    part = (k * self.group_event_query[f](type_ids).unsqueeze(2)).sum(-1)
                s = part if s is None else s + part
            s = s / (p.embed_dim * len(g)) ** 0.5
            s = s + temporal.behaviours(positions, gaps, ttype).squeeze(-1)
            group_scores.append(s)
        return dsi_pool(group_scores, values, target, valid)

    def _heads(self, x: Tensor, batch: Batch, ttype) -> Tensor:
        if len(self.heads) == 1 or ttype is None:
            return self.heads[0](x, batch.target_mask, ttype)
        out = torch.zeros(batch.target_mask.shape, dtype=x.dtype)
        for t, head in enumerate(self.heads):
            rows = batch.target_mask & (ttype == t)
            if rows.any():
                out = out + head(x, rows, ttype)
        return out


def _even_split(k: int, n: int) -> list[int]:
    base = [k // n] * n
    for i in range(k - sum(base)):
        base[-1 - i] += 1  # remainder to the finest levels
    return base


register_variant(
    "tin_mh",
    TinModel,
    "TIN with multi-head target attention (TR inside each head)",
    modelling="tin_mh",
)
register_variant(
    "stacked_tin",
    TinModel,
    "Stacked TIN: 3 target-attention layers with a running query (Tencent Practice)",
    modelling="stacked",
)
register_variant(
    "dsi_tin",
    TinModel,
    "Decoupled Side-Info TIN: one attention per field group (Tencent Practice)",
    modelling="dsi",
)
register_variant(
    "tencent",
    TinModel,
    "Tencent stack: hierarchical hard ∪ decoupled soft search, DSI-TIN, target-decoupled PE, a head per target type",
    search="hier+soft",
    modelling="dsi",
    td_pe=True,
    type_heads=True,
    top_k=50,
    soft_k=50,
)
