"""DIN (Zhou et al., KDD 2018) as in DARE's code: an MLP scores every behaviour against the
target ([q, k, q-k, q*k] -> 36 -> PReLU -> 1, divided by the input width), the scores are
softmax-normalised (the original DIN does not normalise; DARE's re-implementation does), and
the MLP sees [v_t, h, v_t ⊙ h] (TR, given to all baselines in DARE's Table 1).

Options: the full history (default), only the most recent N behaviours (`recent`), or DARE's
top-k variant (`top_k`). No position embedding by default, as in DARE's DIN. `normalize=False`
is the original DIN: the pooled vector is the sum of the behaviours weighted by their raw
scores, so it grows with the number of matching behaviours (the paper's argument: the
intensity of an interest is information that a softmax discards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longrec.data.batch import Batch
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register
from longrec.models.towers import EmbeddingSet, dedup
from longrec.nn.attention import DinScore, masked_softmax, masked_weights
from longrec.nn.embedding import init_normal, zero_padding_rows
from longrec.nn.heads import MLPHead
from longrec.nn.search import gather_behaviours, topk_search


@dataclass
class DinParams:
    embed_dim: int = 16
    pos_dim: int = 0  # DARE's DIN has no position embedding
    fields: tuple[str, ...] | None = None
    recent: int | None = None  # attend to the most recent N behaviours only
    top_k: int | None = None  # keep the top k by MLP score before the softmax (DARE's variant)
    attn_hidden: int = 36
    normalize: bool = True  # softmax the scores (DARE's DIN); False = the original raw sum
    target_repr: bool = True
    hidden: tuple[int, ...] = (200, 80)
    type_dim: int = 8  # target-type embedding into the head when the data has types; 0 = off
    init_std: float = 0.01


@register("din", "DIN: MLP target attention over the full (or most recent N) history (KDD'18)")
class DinModel(SequenceModel):
    Params = DinParams

    def __init__(self, schema: DataSchema, params: DinParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        fields = list(p.fields) if p.fields else schema.shared_item_fields()
        self.fields = fields
        self.tables = EmbeddingSet(
            schema, fields, p.embed_dim, p.pos_dim, max(schema.max_len, 1), sparse_embeddings
        )
        d = self.tables.sem_dim + self.tables.pos_dim
        self.attention = DinScore(d, p.attn_hidden)
        self.head = MLPHead(
            3 * d if p.target_repr else 2 * d, p.hidden, **schema.head_types(p.type_dim)
        )
        init_normal(self, p.init_std)
        zero_padding_rows(self)

    def _weights(self, scores: Tensor, mask: Tensor) -> Tensor:
        if self.params.normalize:
            return masked_softmax(scores, mask)
        return masked_weights(scores, mask)  # raw scores; padding contributes nothing

    def _mask(self, batch: Batch) -> Tensor:
        mask = batch.history_mask
        if self.params.recent is not None and self.params.recent < mask.shape[1]:
            recent = torch.zeros_like(mask)
            recent[:, -self.params.recent :] = True
            mask = mask & recent
        return mask

    def encode_user(self, batch: Batch) -> UserState:
        distinct = {
            f: dedup(batch.history[f], self.tables.tables[f].num_embeddings) for f in self.fields
        }
        return {"keys": self.tables.history(batch, distinct).dense(), "mask": self._mask(batch)}

    def search_scores(self, batch: Batch) -> Tensor:
        state = self.encode_user(batch)
        return self.attention(self.tables.target(batch).joined(), state["keys"])

    def score(self, state: UserState, batch: Batch) -> Tensor:
        keys, mask = state["keys"], state["mask"]
        target = self.tables.target(batch).joined()
        scores = self.attention(target, keys)  # [B, M, L]
        if self.params.top_k is not None:
            idx, valid = topk_search(scores, mask, self.params.top_k)
            weights = self._weights(torch.gather(scores, 2, idx), valid)
            pooled = (weights.unsqueeze(-1) * gather_behaviours(keys, idx)).sum(2)
        else:
            pooled = torch.matmul(self._weights(scores, mask), keys)
        parts = [target, pooled, target * pooled] if self.params.target_repr else [target, pooled]
        return self.head(torch.cat(parts, dim=-1), batch.target_mask, batch.target_type)
