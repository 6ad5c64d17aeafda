"""IAT: Instance-As-Token (ByteDance, arXiv 2604.08933; docs/iat.md). Two models, trained apart.

Stage I, `iat_source` (docs/iat.md, "Stage I: the source model"). A base ranker gives a
representation h of each training instance; it is compressed to a 64-d instance token and
decompressed again for the prediction:

    x   = [v_t, p, v_t ⊙ p]            DIN-style target attention p over the hand-crafted history
    h   = F_interaction(x)             BN -> MLP (`interaction`, default one layer of 200)
    h_c = σ(W_1 h + b_1) ∈ R^64        the instance token (InsEmb), `token_dim`
    ŷ   = head(decompress(h_c))        MLP (`decompress`) -> logit, BCE

`order="temporal"` (T-IAT): instances are independent. `order="user"` (U-IAT, registered as
`iat_source_user`): a causal Source Instance Transformer (SIT, `sit_layers` = 2 pre-LN blocks)
runs over the compressed vectors of the same user's instances in the batch and the head reads
its output; train it with `data.order=user_time` (each user's requests consecutive and in time
order). [INFER] The head reads [h_c, SIT(h_c)] (`head_input="both"`) through BatchNorm: with
the SIT output alone (`"sit"`, the paper's wording) the model sat at the base-rate loss on the
Taobao sample in user-time order (the SIT output collapsed to a near-constant vector). Instance i attends to instance j iff both belong to the same user, j is not after i in
batch order (targets of a request in target order) and j's request time is strictly earlier
than i's, or j = i. [INFER] The strict-time condition is the project's: on public data a
request's positive is stored first, so letting a request's negatives see their same-time
sibling would leak the label through the batch position. [INFER] A user's instances split over
two batches see only the earlier ones of their own batch (the paper's streaming version fetches
the user's previous T-1 tokens from the parameter server, with stop-gradient). `compress(batch)`
returns the PRE-SIT h_c [B, M, 64]: that is what the token store keeps (storing the post-SIT
vector is worse downstream, the paper reports).

Stage II, `iat` (docs/iat.md, "Stage II: the downstream model"). The loader attaches each request's
most recent `data.max_tokens` instance tokens strictly before the request time (`batch.extra`,
data/token_store.py); they are data, never trained (detached). Per token

    Ê = σ(W E + b)  (`adapt_dim`),   E_side = label embedding (+ time-gap bucket embedding),
    InsToken = concat(Ê, E_side) -> linear -> `dim`;

a transformer encoder (`encoder="transformer"`, `layers` = 2 pre-LN blocks; `"none"` skips it)
runs over [null; InsTokens]; the query, the current request's compressed features
MLP([v_t, p, v_t ⊙ p]) (its own DIN-style pooled hand-crafted history), cross-attends over the
encoded tokens to give ONE IAT token per target, which enters the prediction MLP together with
the standard features: head([v_t, p, v_t ⊙ p, IAT token]) (before the interaction MLP, as the
paper recommends). [INFER] The null token (zero InsEmb, label id 0 = "no instance", gap bucket
0) is always present: a request without earlier instances (or a batch without `extra`) still
gets a well-defined IAT token, and the model learns how far to trust the tokens. [INFER] No
LONGER encoder: models/longer.py has no encoder that takes a ready token sequence (see
docs/iat.md). Widths the paper does not give (SIT heads/FFN, adaptation and query MLPs) are
parameters with [INFER] defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.errors import UserError
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register, register_variant
from longrec.models.towers import EmbeddingSet, dedup
from longrec.nn.attention import DinScore, MultiHeadTargetAttention, masked_softmax
from longrec.nn.embedding import init_normal, zero_padding_rows
from longrec.nn.heads import MLPHead
from longrec.nn.temporal import log_buckets
from longrec.nn.transformer import PreLNBlock

ORDERS = ("temporal", "user")
HEAD_INPUTS = ("both", "sit")
ENCODERS = ("transformer", "none")


# -- shared pieces ------------------------------------------------------------------------
class DinFeatures(nn.Module):
    """The hand-crafted-sequence part of both stages: item-side tables shared by history and
    target, DIN's MLP attention (nn.attention.DinScore, softmax-normalised as in DARE's DIN),
    and x = [v_t, p, v_t ⊙ p] (or [v_t, p] without TR)."""

    def __init__(
        self,
        schema: DataSchema,
        fields: list[str],
        embed_dim: int,
        attn_hidden: int,
        target_repr: bool,
        sparse: bool,
    ):
        super().__init__()
        if not fields:
            raise ValueError("IAT needs at least one item-side field in history and target")
        self.fields, self.target_repr = fields, target_repr
        self.tables = EmbeddingSet(schema, fields, embed_dim, 0, max(schema.max_len, 1), sparse)
        d = self.tables.sem_dim
        self.attention = DinScore(d, attn_hidden)
        self.out_dim = 3 * d if target_repr else 2 * d

    def encode(self, batch: Batch) -> UserState:
        distinct = {
            f: dedup(batch.history[f], self.tables.tables[f].num_embeddings) for f in self.fields
        }
        return {"keys": self.tables.history(batch, distinct).dense(), "mask": batch.history_mask}

    def scores(self, state: UserState, target: Tensor) -> Tensor:
        return self.attention(target, state["keys"])  # [B, M, L]

    def forward(self, state: UserState, batch: Batch) -> Tensor:
        """[B, M, out_dim]."""
        target = self.tables.target(batch).joined()
        weights = masked_softmax(self.scores(state, target), state["mask"])
        pooled = torch.matmul(weights, state["keys"])
        parts = [target, pooled, target * pooled] if self.target_repr else [target, pooled]
        return torch.cat(parts, dim=-1)


class RowMLP(nn.Module):
    """BN -> (Linear -> PReLU) x n over rows [N, D] of real targets only (padding never enters
    the batch statistics); a single row in training is normalised with the running statistics."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], prelu_init: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim)
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.PReLU(init=prelu_init)]
            prev = width
        self.mlp = nn.Sequential(*layers)
        self.out_dim = prev

    def forward(self, rows: Tensor) -> Tensor:
        if self.training and rows.shape[0] == 1:
            self.bn.eval()
            try:
                x = self.bn(rows)
            finally:
                self.bn.train()
        else:
            x = self.bn(rows)
        return self.mlp(x)


def instance_mask(
    user: Tensor, ts: Tensor, window: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group the N instances of a batch (in batch order) by user for the SIT.

    Returns (group [N], slot [N], key mask [U, S, S], real [U, S]): instance n sits at
    [group[n], slot[n]] of a [U, S] layout (U users, S = most instances of one user; slots
    follow batch order). mask[u, a, b]: slot a may attend to slot b iff b is real, b <= a, and
    (ts_b < ts_a or b == a), and with `window`, a - b <= window. Padding slots attend to
    themselves only (never read), so every softmax row has a key.
    """
    n = user.shape[0]
    dev = user.device
    _, group, counts = torch.unique(user, return_inverse=True, return_counts=True)
    order = torch.argsort(group, stable=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(group)
    slot[order] = torch.arange(n, device=dev) - start[group[order]]
    u, s = counts.shape[0], int(counts.max()) if n else 1
    real = torch.zeros(u, s, dtype=torch.bool, device=dev)
    real[group, slot] = True
    slot_ts = torch.zeros(u, s, dtype=ts.dtype, device=dev)
    slot_ts[group, slot] = ts
    a = torch.arange(s, device=dev)[:, None]
    b = torch.arange(s, device=dev)[None, :]
    earlier = (slot_ts[:, None, :] < slot_ts[:, :, None]) | (a == b)
    mask = (b <= a) & real[:, None, :] & earlier
    if window is not None:
        mask = mask & (a - b <= window)
    return group, slot, mask | (a == b), real


class SourceInstanceTransformer(nn.Module):
    """Causal pre-LN transformer over each user's instances in the batch (U-IAT's SIT)."""

    def __init__(self, dim: int, layers: int, heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(PreLNBlock(dim, heads, ffn_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, user: Tensor, ts: Tensor, window: int | None = None) -> Tensor:
        """x [N, d] (instances in batch order), user [N], ts [N] -> [N, d]."""
        if x.shape[0] == 0:
            return self.norm(x)
        group, slot, mask, _ = instance_mask(user, ts, window)
        packed = x.new_zeros(mask.shape[0], mask.shape[1], x.shape[1])
        packed = packed.index_put((group, slot), x)
        attend = mask.unsqueeze(1)  # [U, 1, S, S]
        for block in self.blocks:
            keys, values = block.kv(packed)
            packed = block(packed, keys, values, attend)
        return self.norm(packed[group, slot])


def _scatter_rows(values: Tensor, mask: Tensor) -> Tensor:
    """Per-real-target values [N] -> [B, M] (0 on padded targets)."""
    out = values.new_zeros(mask.shape)
    return out.masked_scatter(mask, values)


# -- Stage I --------------------------------------------------------------------------------
@dataclass
class IatSourceParams:
    embed_dim: int = 16  # per item-side field
    fields: tuple[str, ...] | None = None  # None = the fields shared by history and target
    attn_hidden: int = 36  # DIN's attention MLP
    target_repr: bool = True  # x = [v_t, p, v_t ⊙ p] (TR) rather than [v_t, p]
    interaction: tuple[int, ...] = (200,)  # F_interaction: BN -> MLP -> h [INFER widths]
    token_dim: int = 64  # h_c, the stored instance token (paper: 64)
    decompress: tuple[int, ...] = (200, 80)  # decompress MLP before the logit [INFER widths]
    order: str = "temporal"  # temporal (T-IAT) | user (U-IAT: causal SIT over the user's batch)
    sit_layers: int = 2  # paper: 2
    sit_heads: int = 2  # [INFER: NOT FOUND]
    sit_ffn: int | None = None  # None = 4 * token_dim [INFER]
    sit_window: int | None = None  # at most this many earlier instances (None = whole batch)
    head_input: str = "both"  # user order: "both" = [h_c, SIT(h_c)] [INFER] | "sit" = SIT(h_c)
    head_bn: bool = True  # BatchNorm at the head input, as the project's other heads
    dropout: float = 0.0
    init_std: float = 0.01  # embedding tables and attention MLP, as DARE's DIN


@register("iat_source", "IAT Stage I (T-IAT): base ranker -> 64-d instance token -> head")
class IatSourceModel(SequenceModel):
    Params = IatSourceParams

    def __init__(
        self, schema: DataSchema, params: IatSourceParams, sparse_embeddings: bool = False
    ):
        super().__init__(schema, params)
        p = params
        if p.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got '{p.order}'")
        if p.head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {HEAD_INPUTS}, got '{p.head_input}'")
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        self.features = DinFeatures(
            schema, self.fields, p.embed_dim, p.attn_hidden, p.target_repr, sparse_embeddings
        )
        self.interaction = RowMLP(self.features.out_dim, p.interaction)
        self.compressor = nn.Linear(self.interaction.out_dim, p.token_dim)
        self.sit = (
            SourceInstanceTransformer(
                p.token_dim, p.sit_layers, p.sit_heads, p.sit_ffn or 4 * p.token_dim, p.dropout
            )
            if p.order == "user"
            else None
        )
        both = p.order == "user" and p.head_input == "both"
        self.head = MLPHead(p.token_dim * (2 if both else 1), p.decompress, batch_norm=p.head_bn)
        init_normal(self.features, p.init_std)
        zero_padding_rows(self)

    def encode_user(self, batch: Batch) -> UserState:
        return self.features.encode(batch)

    def search_scores(self, batch: Batch) -> Tensor:
        return self.features.scores(
            self.encode_user(batch), self.features.tables.target(batch).joined()
        )

    def _compress_rows(self, state: UserState, batch: Batch) -> Tensor:
        """h_c of every real target, rows in batch order [N, token_dim]."""
        x = self.features(state, batch)[batch.target_mask]
        return torch.sigmoid(self.compressor(self.interaction(x)))

    def compress(self, batch: Batch) -> Tensor:
        """The instance tokens (pre-SIT h_c) [B, M, token_dim]; zeros on padded targets."""
        rows = self._compress_rows(self.encode_user(batch), batch)
        mask = batch.target_mask
        out = rows.new_zeros(*mask.shape, rows.shape[-1])
        return out.masked_scatter(mask.unsqueeze(-1), rows)

    def score(self, state: UserState, batch: Batch) -> Tensor:
        mask = batch.target_mask
        z = self._compress_rows(state, batch)
        if self.sit is not None:
            user = batch.user.unsqueeze(1).expand_as(mask)[mask]
            context = self.sit(z, user, batch.target_ts[mask], self.params.sit_window)
            z = torch.cat((z, context), dim=-1) if self.params.head_input == "both" else context
        # the head's BatchNorm sees the real instances only (one row of N), as in MLPHead
        rows = torch.ones(1, z.shape[0], dtype=torch.bool, device=z.device)
        return _scatter_rows(self.head(z.unsqueeze(0), rows)[0], mask)


register_variant(
    "iat_source_user",
    IatSourceModel,
    "IAT Stage I (U-IAT): causal SIT over each user's instances; train with data.order=user_time",
    order="user",
)


# -- Stage II -------------------------------------------------------------------------------
@dataclass
class IatParams:
    embed_dim: int = 16  # per item-side field (hand-crafted history and target)
    fields: tuple[str, ...] | None = None
    attn_hidden: int = 36
    target_repr: bool = True
    token_dim: int = 64  # width of the stored instance tokens (must match the token store)
    adapt_dim: int = 64  # Ê = σ(W E + b) (paper: 64)
    side_dim: int = 64  # E_side: label embedding (+ time-gap embedding) (paper: 64)
    time_gap: bool = True  # add a log-bucketed (request time - token time) embedding to E_side
    time_buckets: int = 64
    dim: int = 64  # encoder and IAT-token width [INFER]
    encoder: str = "transformer"  # transformer | none (cross-attend the raw InsTokens)
    layers: int = 2  # encoder blocks [INFER: the paper's Transformer depth is not given]
    heads: int = 2  # [INFER]
    ffn_dim: int | None = None  # None = 4 * dim [INFER]
    query_hidden: int = 128  # query compression MLP [INFER: the paper's d_query is 512]
    dropout: float = 0.0
    hidden: tuple[int, ...] = (200, 80)  # prediction MLP, as the project's other heads
    type_dim: int = 8  # target-type embedding into the head when the data has types; 0 = off
    init_std: float = 0.01


@register("iat", "IAT Stage II: DIN features + one token from the user's earlier instance tokens")
class IatModel(SequenceModel):
    Params = IatParams

    def __init__(self, schema: DataSchema, params: IatParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        if p.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got '{p.encoder}'")
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        self.features = DinFeatures(
            schema, self.fields, p.embed_dim, p.attn_hidden, p.target_repr, sparse_embeddings
        )
        self.adapt = nn.Linear(p.token_dim, p.adapt_dim)
        self.label = nn.Embedding(3, p.side_dim)  # 0 = the null token, 1 = negative, 2 = positive
        self.gap = nn.Embedding(p.time_buckets, p.side_dim) if p.time_gap else None
        self.token_proj = nn.Linear(p.adapt_dim + p.side_dim, p.dim)
        self.blocks = nn.ModuleList(
            PreLNBlock(p.dim, p.heads, p.ffn_dim or 4 * p.dim, p.dropout)
            for _ in range(p.layers if p.encoder == "transformer" else 0)
        )
        self.token_norm = nn.LayerNorm(p.dim)
        self.query = nn.Sequential(
            nn.Linear(self.features.out_dim, p.query_hidden),
            nn.PReLU(init=0.1),
            nn.Linear(p.query_hidden, p.dim),
            nn.LayerNorm(p.dim),
        )
        self.cross = MultiHeadTargetAttention(p.dim, p.dim, p.dim, p.heads)
        self.head = MLPHead(
            self.features.out_dim + p.dim, p.hidden, **schema.head_types(p.type_dim)
        )
        init_normal(self.features, p.init_std)
        for table in (self.label, self.gap):
            if table is not None:
                init_normal(table, p.init_std)
        zero_padding_rows(self)

    # -- tokens -----------------------------------------------------------------------------
    def _inputs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(tokens [B, T, D], label [B, T], ts [B, T], mask [B, T]); T = 0 without extra."""
        b = batch.batch_size
        dev = batch.target_ts.device
        extra = batch.extra
        if extra is None or "tokens" not in extra:
            empty = torch.zeros(b, 0, dtype=torch.long, device=dev)
            tokens = torch.zeros(b, 0, self.params.token_dim, device=dev)
            return tokens, empty.float(), empty, empty.bool()
        tokens = extra["tokens"].detach().float()  # data: no gradient into the store
        if tokens.shape[-1] != self.params.token_dim:
            raise UserError(
                f"the token store has {tokens.shape[-1]}-d tokens but model.token_dim is "
                f"{self.params.token_dim}; pass --set model.token_dim={tokens.shape[-1]}"
            )
        return tokens, extra["token_label"].float(), extra["token_ts"].long(), extra["token_mask"]

    def instance_tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """([null; InsTokens] projected to `dim` [B, 1 + T, dim], which are real [B, 1 + T])."""
        tokens, label, ts, mask = self._inputs(batch)
        b = tokens.shape[0]
        null = tokens.new_zeros(b, 1, tokens.shape[-1])
        tokens = torch.cat((null, tokens), dim=1)
        ids = torch.where(mask, 1 + (label > 0.5).long(), 0)
        ids = torch.cat((ids.new_zeros(b, 1), ids), dim=1)
        side = self.label(ids)
        if self.gap is not None:
            gap = batch.target_ts[:, :1] - ts  # request time: all targets of a request share it
            bucket = torch.where(mask, log_buckets(gap, self.params.time_buckets), 0)
            side = side + self.gap(torch.cat((bucket.new_zeros(b, 1), bucket), dim=1))
        adapted = torch.sigmoid(self.adapt(tokens))
        x = self.token_proj(torch.cat((adapted, side), dim=-1))
        valid = torch.cat((mask.new_ones(b, 1), mask), dim=1)
        return x * valid.unsqueeze(-1).to(x.dtype), valid

    def encode_tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        x, valid = self.instance_tokens(batch)
        n = x.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        attend = (valid[:, None, :] | eye).unsqueeze(1)  # [B, 1, N, N]; padding sees itself
        for block in self.blocks:
            keys, values = block.kv(x)
            x = block(x, keys, values, attend)
        return self.token_norm(x), valid

    # -- contract -------------------------------------------------------------------------
    def encode_user(self, batch: Batch) -> UserState:
        state = self.features.encode(batch)
        state["tokens"], state["token_valid"] = self.encode_tokens(batch)
        return state

    def search_scores(self, batch: Batch) -> Tensor:
        state = self.features.encode(batch)
        return self.features.scores(state, self.features.tables.target(batch).joined())

    def score(self, state: UserState, batch: Batch) -> Tensor:
        x = self.features(state, batch)  # [B, M, F]
        iat_token = self.cross(self.query(x), state["tokens"], state["token_valid"])
        return self.head(torch.cat((x, iat_token), dim=-1), batch.target_mask, batch.target_type)
