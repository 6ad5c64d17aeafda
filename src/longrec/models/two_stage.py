"""The two-stage search family of DARE's Table 1: TWIN and its variants, TWIN-4E and DARE.

Search (GSU): score every behaviour against the target with the attention embeddings and keep
the top K (soft), or keep the target's category (hard). Sequence modelling (ESU): softmax of
the same scores over the retrieved behaviours weights the representation embeddings; the MLP
sees [v_t, h, v_t ⊙ h] (target-aware representation, TR). DARE (Feng et al., ICLR 2025,
arXiv 2410.02604) decouples the attention and representation tables, so the search can run at a
smaller attention dimension; TWIN (Chang et al., KDD 2023) shares one table, as re-implemented
in DARE's code. Everything here follows DARE's released code (docs/models.md, "DARE and the TWIN
family"), including the auxiliary full-sequence head that gives every behaviour an attention
gradient.
[INFER] With several item-side fields (e.g. genres, category levels) every shared field is
embedded; DARE's public data has item and category only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register, register_variant
from longrec.models.towers import HistoryEmbedding, TargetEmbedding, Towers, scores
from longrec.nn import search_attention
from longrec.nn.attention import masked_softmax
from longrec.nn.embedding import init_normal, zero_padding_rows
from longrec.nn.heads import MLPHead
from longrec.nn.search import hard_rank, hard_search, topk_search
from longrec.ops import dispatch


@dataclass
class TwoStageParams:
    embed_dim: int = 16  # representation dim per field (Table 1's "embedding dim")
    pos_dim: int = 16  # target-relative position ("time") embedding; 0 = none
    attn_dim: int | None = None  # attention dim per field (DARE); None = embed_dim
    attn_pos_dim: int | None = None  # None = pos_dim
    fields: tuple[str, ...] | None = None  # None = item-side fields shared by history and target
    coupling: str = "decoupled"  # decoupled (DARE) | shared (TWIN) | four (TWIN-4E) | projection
    projection: str = "per_field"  # TWIN w/ proj.: per_field (released script) | concat (README)
    search: str = "soft"  # soft (top-k by score) | hard (same category, then recent) | full
    top_k: int = 20
    target_repr: bool = True  # TR: v_t ⊙ h into the MLP
    only_odot: bool = False  # the MLP sees v_t ⊙ h only
    aux_loss: bool = True  # full-sequence auxiliary head, on in all of DARE's scripts
    attention_sink: bool = False  # a learned extra softmax slot, so the weights keep match counts
    aux_weight: float = 1.0
    hidden: tuple[int, ...] = (200, 80)
    type_dim: int = 8  # target-type embedding into the head(s) when the data has types; 0 = off
    init_std: float = 0.01  # N(0, 0.01) for every non-bias parameter, as in DARE
    # Speed only (same results to float rounding): scores and poolings read the distinct rows
    # with the C++ kernels of nn.row_kernels instead of gathering [B, L, d]; the soft search
    # with both its poolings runs as one C++ pass per user (nn.search_attention). Superseded
    # by train.kernels (ops.dispatch), which chooses every kernel: still read from older run
    # configs, where false keeps this model's kernels off and makes the Trainer, `longrec eval`
    # and the ranker run the whole run as kernels=reference (ops.dispatch.for_run).
    fused_kernels: bool = True
    fused_search: bool = True  # with fused_kernels: the soft search by nn.search_attention
    # with fused_search, in training: the search reads the tables at the batch's ids instead
    # of a copy of the batch's distinct rows (EmbeddingSet.history's `direct`)
    read_tables: bool = True


@register("dare", "DARE: decoupled attention/representation tables, soft top-k search (ICLR'25)")
class TwoStageModel(SequenceModel):
    Params = TwoStageParams

    def __init__(self, schema: DataSchema, params: TwoStageParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        if p.search not in ("soft", "hard", "full"):
            raise ValueError(f"search must be soft, hard or full, got '{p.search}'")
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        if p.search == "hard" and "category" not in self.fields:
            raise ValueError("hard search needs a category field")
        self.towers = Towers(
            schema,
            self.fields,
            embed_dim=p.embed_dim,
            pos_dim=p.pos_dim,
            attn_dim=p.attn_dim or p.embed_dim,
            attn_pos_dim=p.pos_dim if p.attn_pos_dim is None else p.attn_pos_dim,
            coupling=p.coupling,
            projection=p.projection,
            max_positions=max(schema.max_len, 1),
            sparse=sparse_embeddings,
            fused=p.fused_kernels,
        )
        d = self.towers.repr_dim()
        in_dim = d if p.only_odot else (3 * d if p.target_repr else 2 * d)
        # [INFER] not in DARE/TWIN: see nn.attention.masked_softmax; one scalar logit, init 0
        self.sink = nn.Parameter(torch.zeros(())) if p.attention_sink else None
        types = schema.head_types(p.type_dim)
        self.head = MLPHead(in_dim, p.hidden, **types)
        self.aux_head = MLPHead(in_dim, p.hidden[:1], **types) if p.aux_loss else None
        init_normal(self, p.init_std)
        zero_padding_rows(self)

    # -- contract -------------------------------------------------------------------------
    def encode_user(self, batch: Batch) -> UserState:
        return self._encode(batch, self.towers.distinct_ids(batch), {})

    def _encode(self, batch: Batch, distinct, cache: dict, direct: bool = False) -> UserState:
        keys, values = self.towers.keys_and_values(batch, distinct, cache, direct)
        state = {"keys": keys, "values": values, "mask": batch.history_mask}
        if self.params.search == "hard":
            state["category"] = batch.history["category"]
        return state

    def forward(self, batch: Batch) -> Tensor:
        """Inference reads the tables at the raw ids when the fused soft search applies (same
        logits as score(encode_user(batch)) to float rounding)."""
        if not torch.is_grad_enabled() and self._fuses_search():
            state = self._table_state(batch)
            if state is not None:
                return self._run(state, batch, aux=False)[0]
        return super().forward(batch)

    def _table_state(self, batch: Batch) -> UserState | None:
        """encode_user's state with the tables themselves as rows and the raw ids as index
        (Towers.table_history), or None where the towers cannot give it."""
        # int32 ids as they come: the kernel takes them (a .long() copy was 1 ms a field)
        ids = {f: _index_ids(batch.history[f]) for f in self.fields}
        keys = self.towers.table_history("attn_hist", batch, ids)
        values = self.towers.table_history("repr_hist", batch, ids)
        if keys is None or values is None:
            return None
        return {"keys": keys, "values": values, "mask": batch.history_mask}

    def _fuses_search(self) -> bool:
        p = self.params
        on = p.fused_kernels and p.fused_search and dispatch.kernels() != "reference"
        return p.search == "soft" and on and self.sink is None

    def score(self, state: UserState, batch: Batch) -> Tensor:
        return self._run(state, batch, aux=False)[0]

    def forward_train(self, batch: Batch):
        # one table lookup per step for history and targets (Towers.distinct_ids)
        cache: dict = {}
        distinct = self.towers.distinct_ids(batch, with_targets=True)
        # the fused search reads the tables at the batch's ids: no copies of the distinct rows
        direct = self._fuses_search() and self.params.read_tables
        state = self._encode(batch, distinct, cache, direct=direct)
        logits, aux = self._run(state, batch, aux=self.aux_head is not None, cache=cache)
        return logits, ([(aux, self.params.aux_weight)] if aux is not None else [])

    def reads_history_ts(self) -> bool:
        return False  # positions, not times (as DARE's code); hard search matches categories

    def search_scores(self, batch: Batch) -> Tensor:
        state = self.encode_user(batch)
        if self.params.search == "hard":
            return hard_rank(state["category"], batch.target["category"], state["mask"]).float()
        return scores(state["keys"], self.towers.target("attn_tgt", batch))

    # -- pieces ---------------------------------------------------------------------------
    def _run(
        self, state: UserState, batch: Batch, aux: bool, cache: dict | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """`cache`: the table lookups of `_encode`, which the targets reuse in training."""
        p = self.params
        query = self.towers.target("attn_tgt", batch, cache)
        mask, values = state["mask"], state["values"]
        fused = None
        if self._fuses_search():
            fused = fused_soft_search(state["keys"], values, query, mask, p.top_k, aux)
        if fused is not None:
            pooled, full = fused
            return self._heads(batch, cache, pooled, full)
        s = scores(state["keys"], query)  # [B, M, L]
        if p.search == "full":
            pooled = values.pool_all(masked_softmax(s, mask, self.sink))
        else:
            if p.search == "soft":
                idx, valid = topk_search(s, mask, p.top_k)
            else:
                idx, valid = hard_search(state["category"], batch.target["category"], mask, p.top_k)
            weights = masked_softmax(torch.gather(s, 2, idx), valid, self.sink)  # [B, M, K]
            pooled = values.pool_at(idx, weights)
        full = values.pool_all(masked_softmax(s, mask, self.sink)) if aux else None
        return self._heads(batch, cache, pooled, full)

    def _heads(
        self, batch: Batch, cache: dict | None, pooled: Tensor, full: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The main head on the top-K pooling and the auxiliary one on the full-history one."""
        target = self.towers.target("repr_tgt", batch, cache).joined()
        ttype = batch.target_type
        logits = self.head(self._mlp_input(target, pooled), batch.target_mask, ttype)
        aux_logits = None
        if full is not None:
            aux_logits = self.aux_head(self._mlp_input(target, full), batch.target_mask, ttype)
        return logits, aux_logits

    def _mlp_input(self, target: Tensor, pooled: Tensor) -> Tensor:
        p = self.params
        pooled = pooled.to(target.dtype)
        if p.only_odot:
            return target * pooled
        if p.target_repr:
            return torch.cat((target, pooled, target * pooled), dim=-1)
        return torch.cat((target, pooled), dim=-1)


def _index_ids(ids: Tensor) -> Tensor:
    """History ids as the search kernel indexes with them: int32 or int64, contiguous."""
    return ids.contiguous() if ids.dtype in (torch.int32, torch.int64) else ids.long().contiguous()


def fused_soft_search(
    keys: HistoryEmbedding,
    values: HistoryEmbedding,
    query: TargetEmbedding,
    mask: Tensor,
    k: int,
    full: bool,
) -> tuple[Tensor, Tensor | None] | None:
    """Soft top-k search, softmax over the top k and pooling (and the full-history pooling) as
    in `_run`, by nn.search_attention; None where it does not apply (multi-valued or gathered
    fields, keys and values at different indices, other dtypes or devices)."""
    if len(keys.fields) != len(values.fields):
        return None
    attn, repr_, index, queries, tables = [], [], [], [], []
    for kf, vf, q in zip(keys.fields, values.fields, query.fields, strict=True):
        if (kf.table is None) != (vf.table is None) or (
            kf.table is not None and kf.table[1] is not vf.table[1]
        ):
            raise ValueError("keys and values must both be read from their tables, or neither")
        if not (kf.fused and kf.inverse is vf.inverse and kf.value_mask is None):
            return None
        if kf.gathered is not None or vf.gathered is not None:
            return None
        attn.append(kf.rows)
        repr_.append(vf.rows)
        if kf.table is None:
            index.append(kf.inverse)
            tables.append(None)
        else:  # the tables at the batch's ids; gradients into the distinct rows' stand-ins
            index.append(_index_ids(kf.table[1]))
            tables.append((kf.table[0], vf.table[0], kf.inverse))
        queries.append(q)
    scale = [keys.sem_dim**-0.5] * len(attn)
    if values.pos is not None or keys.pos is not None:
        length = mask.shape[-1]
        like = queries[0]
        if keys.pos is not None and query.pos is not None:  # one query for every target
            attn_pos, q_pos = keys.pos, query.pos.reshape(1, 1, -1)
            scale.append(keys.pos.shape[-1] ** -0.5)
        else:
            attn_pos, q_pos = like.new_zeros(length, 0), like.new_zeros(1, 1, 0)
            scale.append(1.0)
        attn.append(attn_pos)
        repr_.append(values.pos if values.pos is not None else like.new_zeros(length, 0))
        index.append(None)
        queries.append(q_pos)
    if not search_attention.applicable(*attn, *repr_, *queries):
        if any(t is not None for t in tables):  # the stand-ins have nothing to fall back on
            raise RuntimeError("fields read from their tables need the fused search kernel")
        return None
    tables += [None] * (len(attn) - len(tables))  # the position field
    top, pooled_all, _, _ = search_attention.search_attend(
        attn, repr_, index, queries, scale, mask, k, full, tables
    )
    return top, pooled_all


register_variant(
    "twin",
    TwoStageModel,
    "TWIN: one shared table for search and representation (KDD'23)",
    coupling="shared",
)
register_variant(
    "twin_hard",
    TwoStageModel,
    "TWIN (hard): category search, most recent first",
    coupling="shared",
    search="hard",
)
register_variant(
    "twin_no_tr",
    TwoStageModel,
    "TWIN without target-aware representation",
    coupling="shared",
    target_repr=False,
)
register_variant(
    "twin_proj",
    TwoStageModel,
    "TWIN w/ proj.: shared table + per-role linear projections",
    coupling="projection",
)
register_variant(
    "twin_4e",
    TwoStageModel,
    "TWIN-4E: separate attention/representation tables for history and target",
    coupling="four",
)
