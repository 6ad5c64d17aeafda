"""ETA: End-to-end Target Attention (Chen et al., Alibaba 2021, arXiv 2108.04468).

Makes the search stage part of the trained model (docs/models.md, "ETA"): every behaviour and the
target are hashed with SimHash (`bits` fixed random hyperplanes, a buffer: sign(R e)); the GSU keeps
the `top_k` behaviours with the most equal signature bits (bits − Hamming distance,
`nn.search.hamming_similarity`); the ESU is target attention over them with the *same* embeddings,
so the embeddings behind the hashes are the ones the CTR loss trains (the hash itself is not
differentiable and the planes never change).

Decisions ([INFER], each a parameter):
* [INFER] the ESU (`esu`) defaults to DARE's public re-implementation style ("dot"): one
  shared table set, scaled dot product over [item; category; ...] plus a target-relative
  position embedding with DARE's split scaling (as `towers.scores`), softmax over the
  retrieved behaviours, i.e. TWIN's ESU behind a SimHash GSU. "multihead" uses the paper's
  multi-head target attention (learned Q/K/V/O, `heads`) on the same vectors instead. Either
  way the MLP sees [v_t, h, v_t ⊙ h] (TR, `target_repr`).
* [INFER] one signature over the concatenated semantic fields (item, category, ...), without
  the position embedding (the target's position is always 0, so hashing it would only add
  a recency term to the similarity).
* [INFER] Hamming ties are broken towards the most recent behaviour (exactly, with an integer
  key), so which behaviours are retrieved never depends on how far a history is padded.
* The hash planes are drawn from N(0, 1) with a fixed seed (`hash_seed`) and saved with the
  model (a persistent buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longrec.data.batch import Batch
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register
from longrec.models.sim import ItemTables, init_weights, joined, tr_input
from longrec.nn.attention import MultiHeadTargetAttention, masked_softmax
from longrec.nn.heads import MLPHead
from longrec.nn.search import gather_behaviours, hamming_similarity, simhash_signs, topk_search
from longrec.nn.temporal import relative_positions


def random_planes(dim: int, bits: int, seed: int) -> Tensor:
    """Fixed SimHash hyperplanes [dim, bits], N(0, 1), reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, bits, generator=gen)


def recency_tiebreak(similarity: Tensor, bound: int, max_position: int) -> Tensor:
    """Integer-valued similarity in [0, bound] ([B, M, L]) made strict: ties go to the most
    recent behaviour.

    The key sim * (P + 1) + (P + 1 - p), p = target-relative position (1 = most recent,
    clipped to P), depends on p only, so extra left padding never changes the order. It is
    exact in float32 while it stays below 2^24, else computed in float64.
    """
    big = max_position + 1
    pos = relative_positions(similarity.shape[-1], similarity.device, max_position)
    dtype = torch.float32 if (bound + 1) * big < 2**24 else torch.float64
    return similarity.to(dtype) * big + (big - pos).to(dtype)


@dataclass
class EtaParams:
    embed_dim: int = 16  # per item-side field (DARE's public setting)
    pos_dim: int = 16  # target-relative position embedding in the ESU; 0 = none
    fields: tuple[str, ...] | None = None  # None = item-side fields shared by history and target
    bits: int = 64  # SimHash signature length
    hash_seed: int = 0  # seed of the fixed random hyperplanes
    top_k: int = 20
    esu: str = "dot"  # dot (TWIN-style, DARE's re-implementations) | multihead (the paper's)
    heads: int = 2  # multihead ESU only
    target_repr: bool = True  # TR: v_t ⊙ h into the MLP
    hidden: tuple[int, ...] = (200, 80)
    type_dim: int = 8  # target-type embedding into the head when the data has types; 0 = off
    init_std: float = 0.01  # N(0, 0.01) for every non-bias parameter, as in DARE
    dedup: bool = False  # look each distinct id of a batch up once


@register("eta", "ETA: SimHash + Hamming top-k search, target attention on the same embeddings")
class EtaModel(SequenceModel):
    Params = EtaParams

    def __init__(self, schema: DataSchema, params: EtaParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        if p.bits < 1:
            raise ValueError(f"bits must be positive, got {p.bits}")
        if p.esu not in ("dot", "multihead"):
            raise ValueError(f"esu must be dot or multihead, got '{p.esu}'")
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        self.tables = ItemTables(
            schema, self.fields, p.embed_dim, p.pos_dim, sparse_embeddings, p.dedup
        )
        self.max_positions = self.tables.max_positions
        d = self.tables.sem_dim + self.tables.pos_dim
        self.attention = (
            MultiHeadTargetAttention(d, d, d, p.heads) if p.esu == "multihead" else None
        )
        self.head = MLPHead(
            3 * d if p.target_repr else 2 * d, p.hidden, **schema.head_types(p.type_dim)
        )
        self.register_buffer("planes", random_planes(self.tables.sem_dim, p.bits, p.hash_seed))
        init_weights(self, p.init_std)

    # -- contract -------------------------------------------------------------------------
    def encode_user(self, batch: Batch) -> UserState:
        sem, pos = self.tables.history(batch)
        state = {
            "sem": sem,  # [B, L, D]
            "signs": self._signs(sem),  # [B, L, bits]
            "mask": batch.history_mask,
        }
        if pos is not None:
            state["pos"] = pos  # [L, Dp]
        return state

    def score(self, state: UserState, batch: Batch) -> Tensor:
        p = self.params
        query, query_pos = self.tables.target(batch)
        idx, valid = topk_search(self._search_key(state, query), state["mask"], p.top_k)
        sem = gather_behaviours(state["sem"], idx)  # [B, M, K, D]
        pos = state.get("pos")
        values = sem if pos is None else torch.cat((sem, pos[idx].to(sem.dtype)), dim=-1)
        target = joined(query, query_pos)
        if self.attention is not None:
            pooled = self.attention(target, values, valid)
        else:
            scores = (sem * query.unsqueeze(2)).sum(-1) / sem.shape[-1] ** 0.5
            if pos is not None and query_pos is not None:
                bias = (pos @ query_pos) / pos.shape[-1] ** 0.5  # [L]: learned recency prior
                scores = scores + bias[idx].to(scores.dtype)
            weights = masked_softmax(scores, valid)  # [B, M, K]
            pooled = (weights.unsqueeze(-1) * values).sum(2)
        return self.head(
            tr_input(target, pooled, p.target_repr),
            batch.target_mask,
            batch.target_type,
        )

    def search_scores(self, batch: Batch) -> Tensor:
        state = self.encode_user(batch)
        key = self._search_key(state, self.tables.target(batch)[0])
        return (key / (self.max_positions + 1)).float()  # Hamming similarity + recency fraction

    # -- pieces ---------------------------------------------------------------------------
    def _signs(self, x: Tensor) -> Tensor:
        return simhash_signs(x.detach(), self.planes.to(x.dtype))

    def _search_key(self, state: UserState, target_sem: Tensor) -> Tensor:
        sim = hamming_similarity(self._signs(target_sem), state["signs"])  # [B, M, L]
        return recency_tiebreak(sim, self.params.bits, self.max_positions)
