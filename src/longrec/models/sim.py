"""SIM: Search-based user Interest Modeling (Pi et al., CIKM 2020, arXiv 2006.05639).

The first two-stage (GSU/ESU) model (docs/models.md, "SIM"):

* GSU, hard search (`sim_hard`): the behaviours whose category equals the target's, the most
  recent `top_k` of them (`nn.search.hard_search`). SIM keeps only matches (`fill=False`);
  `fill=True` tops the set up with the most recent other behaviours, as DARE's "TWIN (hard)".
* GSU, soft search (`sim_soft`): separate GSU embeddings scored by r_i = <W_b e_i, W_a e_t>,
  top `top_k` by r. Top-k is not differentiable, so the GSU is trained by an auxiliary CTR
  task over the whole long sequence: softmax(r) over all behaviours weights the GSU embeddings,
  an auxiliary head sees [e_t, u, e_t ⊙ u], and the loss is α·L_GSU + β·L_ESU
  (`gsu_weight`, `esu_weight`; the paper sets both to 1 for soft search, α = 0 for hard).
* ESU: multi-head target attention (`nn.attention.MultiHeadTargetAttention`) over the
  retrieved behaviours, each embedding concatenated with a time-interval embedding (bucketised
  target-relative time gap, `nn.temporal.time_gap_buckets`); the MLP head sees
  [v_t, h, v_t ⊙ h] (TR, as DARE gives every baseline) and is DARE's BN-200-80 head.

Decisions the paper leaves open ([INFER], each a parameter):
* [INFER] the target's own vector is its field embeddings plus the time embedding of bucket 0
  (gap "none", reserved for targets by `time_gap_buckets`), so the target and the attention
  output have the same width and TR is defined (`time_dim`, `time_buckets`, `time_base`).
* [INFER] the attention width equals the behaviour-vector width and `heads` defaults to 2.
* [INFER] TR is applied after the attention's output projection (v_t ⊙ h), as for DARE's
  other baselines, not per head (`target_repr`).
* [INFER] GSU tables are separate from the ESU tables (`gsu_shared=False`), their width per
  field defaults to `embed_dim` (`gsu_dim`), W_a and W_b are bias-free maps to `gsu_proj_dim`
  (default: the GSU width), r is an unscaled inner product (as written in the paper), and the
  auxiliary path pools the raw GSU embeddings e_i with softmax(r) weights.
* [INFER] the auxiliary head is one hidden layer (`hidden[:1]`), like DARE's auxiliary head.
* The loss weights use the `forward_train` contract (total = L_main + Σ w·L_aux): the GSU
  logits come with weight α and, when β ≠ 1, the main logits again with weight β − 1, so the
  total is exactly α·L_GSU + β·L_ESU.
* [INFER] with several item-side fields (e.g. genres) every shared field is embedded, as in
  two_stage.py; hard search matches on `search_field` (default "category").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register, register_variant
from longrec.nn.attention import MultiHeadTargetAttention, masked_softmax
from longrec.nn.embedding import FieldEmbedding, init_normal, zero_padding_rows
from longrec.nn.heads import MLPHead
from longrec.nn.search import gather_behaviours, hard_rank, hard_search, topk_search
from longrec.nn.temporal import relative_positions, time_gap_buckets


def init_weights(model: nn.Module, std: float) -> None:
    """DARE's N(0, std) init, then zero the padding rows of every table (as two_stage.py)."""
    init_normal(model, std)
    zero_padding_rows(model)


def tr_input(target: Tensor, pooled: Tensor, target_repr: bool) -> Tensor:
    """MLP input [v_t, h, v_t ⊙ h] (TR, docs/models.md, "Setting parameters") or [v_t, h]
    without it."""
    if target_repr:
        return torch.cat((target, pooled, target * pooled), dim=-1)
    return torch.cat((target, pooled), dim=-1)


def joined(sem: Tensor, pos: Tensor | None) -> Tensor:
    """[..., D] semantic vectors with the position vector(s) ([L, Dp] or [Dp]) appended."""
    if pos is None:
        return sem
    pos = pos.to(sem.dtype)
    return torch.cat((sem, pos.expand(*sem.shape[:-1], pos.shape[-1])), dim=-1)


class ItemTables(nn.Module):
    """One table per item-side field (shared by history and target) plus an optional
    target-relative position table (1 = most recent behaviour, 0 = the target)."""

    def __init__(
        self,
        schema: DataSchema,
        fields: list[str],
        dim: int,
        pos_dim: int = 0,
        sparse: bool = False,
        dedup: bool = False,
    ):
        super().__init__()
        self.fields = fields
        self.embed = FieldEmbedding(
            {f: (schema.vocab(f), dim) for f in fields},
            sparse=sparse,
            dedup=dedup,
            multi=schema.multi_fields() & set(fields),
        )
        self.max_positions = max(schema.max_len, 1)
        self.pos = nn.Embedding(self.max_positions + 1, pos_dim, sparse=sparse) if pos_dim else None
        self.sem_dim, self.pos_dim = self.embed.out_dim, max(pos_dim, 0)

    def history(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """([B, L, D] field vectors, [L, Dp] position vectors or None)."""
        sem = self.embed(batch.history, self.fields)
        if self.pos is None:
            return sem, None
        ids = relative_positions(batch.history_len, sem.device, self.max_positions)
        return sem, self.pos(ids)

    def target(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """([B, M, D] field vectors, [Dp] the target's position-0 vector or None)."""
        sem = self.embed(batch.target, self.fields)
        return sem, (self.pos(torch.zeros((), dtype=torch.long)) if self.pos is not None else None)


@dataclass
class SimParams:
    embed_dim: int = 16  # per item-side field (DARE's public setting)
    time_dim: int = 16  # time-interval embedding concatenated to each behaviour; 0 = none
    time_buckets: int = 64  # log-scale gap buckets (bucket 0 = the target itself)
    time_base: float = 2.0  # bucket = floor(log_base(1 + gap seconds)) + 1
    fields: tuple[str, ...] | None = None  # None = item-side fields shared by history and target
    search: str = "hard"  # hard (category match) | soft (learned inner product)
    search_field: str = "category"  # the field hard search matches on
    top_k: int = 20
    fill: bool = False  # hard: fill up with recent non-matching behaviours (TWIN hard); SIM: no
    heads: int = 2  # ESU attention heads
    gsu_dim: int | None = None  # soft: GSU table width per field; None = embed_dim
    gsu_proj_dim: int | None = None  # soft: width of W_a e_t and W_b e_i; None = GSU width
    gsu_shared: bool = False  # soft: the GSU reuses the ESU tables instead of its own
    gsu_weight: float = 1.0  # α: weight of the GSU auxiliary CTR loss (soft search only)
    esu_weight: float = 1.0  # β: weight of the main (ESU) CTR loss
    target_repr: bool = True  # TR: v_t ⊙ h into the MLP
    hidden: tuple[int, ...] = (200, 80)
    type_dim: int = 8  # target-type embedding into the head when the data has types; 0 = off
    init_std: float = 0.01  # N(0, 0.01) for every non-bias parameter, as in DARE
    dedup: bool = False  # look each distinct id of a batch up once


@register("sim_hard", "SIM (hard): same-category search, multi-head attention + time (CIKM'20)")
class SimModel(SequenceModel):
    Params = SimParams

    def __init__(self, schema: DataSchema, params: SimParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        if p.search not in ("hard", "soft"):
            raise ValueError(f"search must be hard or soft, got '{p.search}'")
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        if p.search == "hard" and (
            p.search_field not in schema.fields
            or p.search_field not in schema.target_fields
            or schema.fields[p.search_field].width > 1
        ):
            raise ValueError(
                f"hard search needs a single-valued field '{p.search_field}' in history and target"
            )
        multi = schema.multi_fields()
        self.embed = FieldEmbedding(
            {f: (schema.vocab(f), p.embed_dim) for f in self.fields},
            sparse=sparse_embeddings,
            dedup=p.dedup,
            multi=multi & set(self.fields),
        )
        self.time = (
            nn.Embedding(p.time_buckets, p.time_dim, sparse=sparse_embeddings)
            if p.time_dim > 0
            else None
        )
        d = self.embed.out_dim + max(p.time_dim, 0)
        self.esu = MultiHeadTargetAttention(d, d, d, p.heads)
        self.head = MLPHead(
            3 * d if p.target_repr else 2 * d, p.hidden, **schema.head_types(p.type_dim)
        )
        self.gsu = self.w_a = self.w_b = self.aux_head = None
        if p.search == "soft":
            if p.gsu_shared:
                gsu_width = self.embed.out_dim
            else:
                self.gsu = FieldEmbedding(
                    {f: (schema.vocab(f), p.gsu_dim or p.embed_dim) for f in self.fields},
                    sparse=sparse_embeddings,
                    dedup=p.dedup,
                    multi=multi & set(self.fields),
                )
                gsu_width = self.gsu.out_dim
            proj = p.gsu_proj_dim or gsu_width
            self.w_a = nn.Linear(gsu_width, proj, bias=False)
            self.w_b = nn.Linear(gsu_width, proj, bias=False)
            in_aux = 3 * gsu_width if p.target_repr else 2 * gsu_width
            self.aux_head = MLPHead(in_aux, p.hidden[:1], **schema.head_types(p.type_dim))
        init_weights(self, p.init_std)

    # -- contract -------------------------------------------------------------------------
    def encode_user(self, batch: Batch) -> UserState:
        state = {
            "behaviours": self.embed(batch.history, self.fields),  # [B, L, D]
            "mask": batch.history_mask,
            "ts": batch.history_ts,
        }
        if self.params.search == "hard":
            state["search_field"] = batch.history[self.params.search_field]
        else:
            gsu = self._gsu_embed(batch.history)
            state["gsu"] = gsu  # [B, L, Dg]
            state["gsu_keys"] = self.w_b(gsu)  # W_b e_i  [B, L, P]
        return state

    def score(self, state: UserState, batch: Batch) -> Tensor:
        return self._run(state, batch, aux=False)[0]

    def forward_train(self, batch: Batch):
        p = self.params
        aux = self.aux_head is not None and p.gsu_weight != 0
        logits, gsu_logits = self._run(self.encode_user(batch), batch, aux=aux)
        extra = [(gsu_logits, p.gsu_weight)] if gsu_logits is not None else []
        if p.esu_weight != 1.0:  # total = L_ESU + (β - 1) L_ESU + α L_GSU
            extra.append((logits, p.esu_weight - 1.0))
        return logits, extra

    def search_scores(self, batch: Batch) -> Tensor:
        state = self.encode_user(batch)
        if self.params.search == "soft":
            return self._gsu_scores(state, batch)
        tgt = batch.target[self.params.search_field]
        return hard_rank(state["search_field"], tgt, state["mask"]).float()

    # -- pieces ---------------------------------------------------------------------------
    def _gsu_embed(self, ids: dict[str, Tensor]) -> Tensor:
        tables = self.gsu if self.gsu is not None else self.embed
        return tables(ids, self.fields)

    def _gsu_scores(self, state: UserState, batch: Batch) -> Tensor:
        query = self.w_a(self._gsu_embed(batch.target))  # W_a e_t  [B, M, P]
        return torch.matmul(query, state["gsu_keys"].transpose(-1, -2))  # r  [B, M, L]

    def _search(self, state: UserState, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
        p, mask = self.params, state["mask"]
        if p.search == "soft":
            r = self._gsu_scores(state, batch)
            idx, valid = topk_search(r, mask, p.top_k)
            return idx, valid, r
        hist, tgt = state["search_field"], batch.target[p.search_field]
        idx, valid = hard_search(hist, tgt, mask, p.top_k)
        if not p.fill:  # SIM: only behaviours of the target's category
            valid = valid & (gather_behaviours(hist, idx) == tgt.unsqueeze(-1))
        return idx, valid, None

    def _run(self, state: UserState, batch: Batch, aux: bool) -> tuple[Tensor, Tensor | None]:
        p = self.params
        idx, valid, r = self._search(state, batch)
        keys = gather_behaviours(state["behaviours"], idx)  # [B, M, K, D]
        target = self.embed(batch.target, self.fields)  # [B, M, D]
        if self.time is not None:
            buckets = time_gap_buckets(state["ts"], batch.target_ts, p.time_buckets, p.time_base)
            gaps = self.time(torch.gather(buckets, 2, idx))  # [B, M, K, Dt]
            keys = torch.cat((keys, gaps.to(keys.dtype)), dim=-1)
            own = self.time.weight[0].to(target.dtype)
            target = torch.cat((target, own.expand(*target.shape[:-1], own.shape[-1])), dim=-1)
        pooled = self.esu(target, keys, valid)  # [B, M, D]
        logits = self.head(
            tr_input(target, pooled, p.target_repr),
            batch.target_mask,
            batch.target_type,
        )
        gsu_logits = None
        if aux and r is not None:
            weights = masked_softmax(r, state["mask"])  # over the whole long sequence
            user = torch.matmul(weights, state["gsu"])
            gsu_target = self._gsu_embed(batch.target)
            gsu_logits = self.aux_head(
                tr_input(gsu_target, user, p.target_repr),
                batch.target_mask,
                batch.target_type,
            )
        return logits, gsu_logits


register_variant(
    "sim_soft",
    SimModel,
    "SIM (soft): learned inner-product top-k search trained by an auxiliary CTR loss",
    search="soft",
)
