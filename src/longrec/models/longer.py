"""LONGER: Long-sequence Optimized traNsformer for GPU-Efficient Recommenders (Chai et al.,
ByteDance, RecSys 2025, arXiv 2505.04421; docs/models.md, "LONGER").

A transformer over the whole long history, made affordable by three ideas: token merging (K
adjacent behaviours -> one token), hybrid attention (a first cross-causal layer whose queries
are only the global tokens and the k most recent merged tokens, then N self-causal layers over
those m + k tokens) and KV-cache serving (the sequence side never sees a candidate, so it is
computed once per request and only the candidate's global token is run per target).

Pipeline and the project's choices ([INFER] = not in any public source; every one a parameter):

1. Behaviour tokens. Concatenation of the item-side field embeddings (`fields`, default the
   fields shared by history and target, tables shared with the target), the event-side field
   embeddings (`side_fields`, default every single-valued event-side field such as behaviour
   type or domain [INFER]) and a time-gap embedding, projected to width `dim` (d = 32).
   [INFER] The paper concatenates the time difference to the *target*; that would make every
   sequence token candidate-dependent and break KV caching, so the gap is taken to the
   *request* time instead: `target_ts[:, 0]` (all targets of a request share one request time;
   a pointwise batch of the same samples therefore gives the same tokens). Gaps are
   log-bucketed (`time_buckets`, nn.temporal.log_buckets); bucket 0 is the candidate's own.
   Padded behaviours are zeroed after the projection, whatever their ids or timestamps.
2. Token merge by K (`merge_k`, 1/4/8): groups are aligned from the MOST RECENT end (the
   history is left-padded by up to K-1 slots), so extra left padding never regroups real
   behaviours; the merged sequence has ceil(L/K) tokens. A group is real if any of its
   behaviours is; padded slots inside the oldest, partial group are zeros. `merge="concat"`:
   the K tokens are concatenated (K * d) and projected to `merged_dim` (d'; None = dim)
   [INFER: the paper keeps width K * d; projecting back keeps the attention width fixed].
   `merge="inner"` (InnerTrans): one pre-LN transformer block over the K tokens of each group
   (padded slots masked as keys, a learned in-group slot embedding added [INFER]), then
   `inner_pool="flatten"` (concatenate the K outputs, padded ones zeroed, project to d') or
   `"mean"` (mean over real slots, project to d') [INFER].
   A learned absolute position embedding is added per merged token, counted from the most
   recent group (1 = most recent, clipped at ceil(max_len / K)) [INFER: counting from the
   recent end keeps it invariant to left padding].
3. Global tokens, in the order [candidate, CLS, user]: the candidate token is the target's
   item-side field embeddings and the bucket-0 time embedding, projected to d' [INFER]; CLS is
   learned; the user-id token (`user_token`, an embedding of `batch.user`, vocabulary
   `schema.n_users`) is off by default [INFER: a per-user table overfits on public data with
   few samples per user; the paper uses it]. High-order cross-feature tokens are not built
   (the data has no cross features).
4. Hybrid attention, pre-LN blocks (`heads`, `ffn_dim` [INFER: NOT FOUND in the paper]):
   layer 1 is cross-causal: queries O = [global; the k = `n_query` most recent merged tokens]
   (all of them if fewer: "Recent-k"), keys R = [global; all merged tokens]; then `n_layers`
   self-causal blocks over the m + k tokens. Visibility, with "j >= i" of the printed mask read
   with globals first and the sequence in reverse chronological order:
   - a sequence token sees the real sequence tokens not after it, and itself; never a global
     token (so every sequence state is candidate-independent and cached);
   - a global token sees every real sequence token and, among global tokens,
     `global_mask="causal"` (default, the printed mask): global i sees global j >= i. With
     the candidate first, the candidate sees CLS and user, while CLS and user never see the
     candidate: they are candidate-independent too and computed once per request.
     `global_mask="full"` [INFER]: a target's global tokens all see each other (CLS and user
     then run per target). A target's global tokens never see another target's.
   Output: the final states of the global tokens -> LayerNorm -> concatenation -> MLP
   (BN-200-80, as the project's other heads) -> logit.
5. KV cache (`cache=True`): `encode_user` computes the merged tokens, the layer-1 keys/values
   of all merged tokens, the states of the k sequence queries (and of CLS/user under
   "causal") through every layer and their keys/values at every layer; `score` runs only the
   per-target global tokens, each target's group attending to its own tokens plus the cached
   keys (nn.transformer.split_attention: the cache is never copied per target).
   `cache=False` is the reference: `score` builds the full [global; sequence] token set per
   target and recomputes everything with a dense mask (SDPA). Both give the same logits.

Init and relevance [INFER] (docs/models.md, "Why the end-to-end models did not learn"). With
PyTorch's init and plain q·k scores the candidate's attention scores grew from 0.21 to 17.6
in spread within a few hundred steps at lr 0.01 and the model ignored the history (test AUC
0.56 on the Taobao sample, unchanged with histories swapped between users). So, each a
parameter: `attn_init="identity"` starts W_in orthogonal without bias, a concat merge as the
sum of its K slots, and every block as identity attention with a zero FFN output
(`PreLNBlock.identity_init`), so the candidate initially scores merged tokens by their
similarity to it; `qk_norm` scores temperature x cosine per head (learned temperature,
initially `temperature`), bounded whatever the weights do; `head_interest` gives the head the
candidate token x_t, what it gathered (h = its final state - x_t, the sum of its blocks'
residual updates) and h ⊙ x_t: DIN's target x interest product. `shared_shift=False` drops every
vector that is added to all tokens alike (the projections' biases, the merged-token and
attention LayerNorms' shifts, the Q/K/V biases): on MovieLens they grew under Adam until the
merged tokens were mostly one common vector (mean pairwise cosine 0.78 after training) and
the candidate's attention could not tell behaviours apart (docs/models.md, "Why the
end-to-end models did not learn"). Off by default: measured on one seed only. Tables, the position table,
the user table and the head are N(0, `init_std`) as DARE. Dropout defaults to 0.

Target read-out [INFER] (`readout="tokens"`, default; `nn/readout.py`): the head also gets
the candidate's attention over the history's item-field embeddings, unmerged and
unprojected, as [r, r ⊙ x_t], with both a DIN scorer and a cosine scorer
(`readout_score="both"`). Merged tokens mix four behaviours and every token shares the
blocks' shifts, so the hybrid attention alone stayed near chance on MovieLens; the read-out
reads the history where it is still item-specific (docs/models.md, "Why the end-to-end
models did not learn"). `readout="none"` is the paper's read-out of the global tokens only.

Cost (B requests, M targets, L' = ceil(L/K), k = min(n_query, L')): the shared part is
O(B (L d^2 + k L' d' + n_layers k^2 d')) once per request; the per-target part is
O(B M (n_layers + 1) (L' + k) d') for the candidate's attention, linear in L'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register
from longrec.models.towers import EmbeddingSet, HistoryEmbedding, HistoryField, dedup
from longrec.nn.embedding import init_normal, zero_padding_rows
from longrec.nn.heads import MLPHead
from longrec.nn.readout import TargetReadout
from longrec.nn.temporal import log_buckets, relative_positions
from longrec.nn.transformer import PreLNBlock

MERGES = ("concat", "inner")


class _BagSum(torch.autograd.Function):
    """sum_j weights[n, j] * rows[index[n, j]] -> [N, d] (embedding_bag, mode "sum") whose
    backward is one linear index_add_ instead of embedding_bag's sort-based backward (which
    took a fifth of a training step). The weights are masks: they get no gradient."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(index, weights)
        ctx.n_rows = rows.shape[0]
        return F.embedding_bag(index, rows, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, weights = ctx.saved_tensors
        src = (grad.unsqueeze(1) * weights.unsqueeze(-1).to(grad.dtype)).reshape(-1, grad.shape[-1])
        out = grad.new_zeros(ctx.n_rows, grad.shape[-1])
        out.index_add_(0, index.reshape(-1), src)
        return out, None, None


INNER_POOLS = ("flatten", "mean")
ATTN_INITS = ("identity", "default")
GLOBAL_MASKS = ("causal", "full")
READOUTS = ("none", "tokens")


@dataclass
class LongerParams:
    embed_dim: int = 16  # per field (item-side and event-side tables)
    fields: tuple[str, ...] | None = None  # item-side; None = fields shared by history and target
    side_fields: tuple[str, ...] | None = None  # history-only; None = single-valued event fields
    time_dim: int = 16  # request-relative time-gap embedding; 0 = none [INFER]
    time_buckets: int = 64  # log2 buckets of the gap in seconds
    dim: int = 32  # d: behaviour token width after the projection (paper: d = 32)
    merged_dim: int | None = None  # d': merged token / attention width; None = dim [INFER]
    merge_k: int = 4  # K behaviours per merged token (paper: 4 or 8; 1 = no merge)
    merge: str = "concat"  # concat (K*d -> d') | inner (InnerTrans over the K tokens)
    inner_pool: str = "flatten"  # InnerTrans output: flatten (K*d -> d') | mean (d -> d')
    inner_heads: int = 1  # heads of the InnerTrans block [INFER]
    n_query: int = 100  # k most recent merged tokens used as queries (paper: 100 in production)
    n_layers: int = 2  # self-causal layers after the cross-causal one [NOT FOUND; 2 in scaling]
    heads: int = 2  # [NOT FOUND]
    ffn_dim: int | None = None  # None = 4 * d' [INFER]
    dropout: float = 0.0
    user_token: bool = False  # user-id global token (embedding of batch.user) [INFER default]
    global_mask: str = "causal"  # causal (printed mask: CLS/user cached) | full
    null_key: bool = False  # every query may also attend to "nothing" (score 0, value 0) [INFER]
    cache: bool = True  # KV-cache path; False recomputes everything per target (reference)
    qk_norm: bool = True  # scores = learned temperature x cosine(q, k), per head [INFER]
    temperature: float = 4.0  # QK-norm's initial temperature
    attn_init: str = "identity"  # identity (starts as similarity attention) | default [INFER]
    head_interest: bool = True  # head also sees the candidate x_t, its gathered h and h ⊙ x_t
    # biases of the token/merge projections, shift of the merged-token and attention
    # LayerNorms, biases of Q/K/V: one vector added to every token; False drops them [INFER]
    shared_shift: bool = True
    # none | tokens: the head also gets an attention of the candidate over the unmerged
    # item-field embeddings of the history, r and r ⊙ x_t (nn/readout.py) [INFER]
    readout: str = "tokens"
    readout_score: str = "both"  # din (DIN's MLP) | cosine (temperature x cosine) | both
    hidden: tuple[int, ...] = (200, 80)
    type_dim: int = 8  # target-type embedding into the head when the data has types; 0 = off
    init_std: float = 0.01


@register(
    "longer",
    "LONGER: token merge, global tokens, cross-causal + self-causal transformer, KV cache (RecSys'25)",
)
class LongerModel(SequenceModel):
    Params = LongerParams

    def __init__(self, schema: DataSchema, params: LongerParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        for value, allowed, what in (
            (p.merge, MERGES, "merge"),
            (p.inner_pool, INNER_POOLS, "inner_pool"),
            (p.global_mask, GLOBAL_MASKS, "global_mask"),
            (p.attn_init, ATTN_INITS, "attn_init"),
            (p.readout, READOUTS, "readout"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got '{value}'")
        if p.merge_k < 1 or p.n_query < 1:
            raise ValueError("merge_k and n_query must be >= 1")
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        if not self.fields:
            raise ValueError("longer needs at least one item-side field in history and target")
        if p.side_fields is None:
            side = [n for n, f in schema.fields.items() if f.side == "event" and f.width == 1]
        else:
            side = list(p.side_fields)
        self.side_fields = [f for f in side if f not in self.fields]
        max_pos = max(schema.max_len, 1)
        self.items = EmbeddingSet(schema, self.fields, p.embed_dim, 0, max_pos, sparse_embeddings)
        self.side = (
            EmbeddingSet(schema, self.side_fields, p.embed_dim, 0, max_pos, sparse_embeddings)
            if self.side_fields
            else None
        )
        self.time = (
            nn.Embedding(p.time_buckets, p.time_dim, sparse=sparse_embeddings)
            if p.time_dim > 0
            else None
        )
        d, k = p.dim, p.merge_k
        dm = p.merged_dim or d
        self.d, self.dm = d, dm
        token_in = p.embed_dim * (len(self.fields) + len(self.side_fields)) + max(p.time_dim, 0)
        shift = p.shared_shift
        self.token_proj = nn.Linear(token_in, d, bias=shift)  # concat(fields, side, time) -> d
        self.inner = self.slot_pos = None
        if p.merge == "inner":
            self.slot_pos = nn.Parameter(torch.zeros(k, d))
            self.inner = PreLNBlock(d, p.inner_heads, 4 * d, p.dropout)
        pool_in = d if (p.merge == "inner" and p.inner_pool == "mean") else k * d
        self.merge_proj = nn.Linear(pool_in, dm, bias=shift)
        # LayerNorm after the merge: small-init tables give merged tokens far below the blocks'
        # LayerNorm eps, and a position embedding of that size would drown their content
        self.merge_ln = nn.LayerNorm(dm, bias=shift)
        self.max_groups = math.ceil(max_pos / k)
        self.pos = nn.Embedding(self.max_groups + 1, dm, sparse=sparse_embeddings)
        self.cls = nn.Parameter(torch.zeros(dm))
        self.user = self.user_ln = None
        if p.user_token:
            self.user = nn.Embedding(
                max(schema.n_users, 2), dm, padding_idx=0, sparse=sparse_embeddings
            )
            self.user_ln = nn.LayerNorm(dm)
        self.n_global = 3 if p.user_token else 2  # [candidate, CLS, user]
        # per-target global tokens: the candidate only under "causal", all of them under "full"
        self.n_own = 1 if p.global_mask == "causal" else self.n_global
        ffn = p.ffn_dim or 4 * dm
        temperature = p.temperature if p.qk_norm else None
        self.blocks = nn.ModuleList(
            PreLNBlock(dm, p.heads, ffn, p.dropout, p.null_key, temperature, shift)
            for _ in range(1 + p.n_layers)
        )
        self.final_ln = nn.LayerNorm(dm)
        head_in = (self.n_global + (3 if p.head_interest else 0)) * dm
        self.readout = None
        if p.readout == "tokens":
            self.readout = TargetReadout(self.items.sem_dim, p.readout_score, p.temperature)
            head_in += self.readout.width
        self.head = MLPHead(head_in, p.hidden, **schema.head_types(p.type_dim))
        for part in (self.items, self.side, self.time, self.pos, self.user, self.head):
            if part is not None:
                init_normal(part, p.init_std)
        nn.init.normal_(self.cls)  # a unit-scale token, like the normalised behaviour tokens
        if self.slot_pos is not None:
            nn.init.normal_(self.slot_pos, std=p.init_std)
        if p.attn_init == "identity":
            self._identity_init()
        zero_padding_rows(self)

    @torch.no_grad()
    def _identity_init(self) -> None:
        """Start as similarity attention over the embeddings: W_in keeps their inner products
        (orthogonal, no bias), a concat merge sums its K slots (each slot's block of W_merge is
        the identity when d' = d, else one orthogonal map shared by the slots), and every
        block starts as identity attention with a zero FFN (`PreLNBlock.identity_init`)."""
        nn.init.orthogonal_(self.token_proj.weight)
        if self.token_proj.bias is not None:
            nn.init.zeros_(self.token_proj.bias)
        slot = torch.empty(self.dm, self.merge_proj.weight.shape[1] // self.params.merge_k)
        nn.init.orthogonal_(slot) if self.dm != slot.shape[1] else nn.init.eye_(slot)
        self.merge_proj.weight.copy_(slot.repeat(1, self.params.merge_k))
        if self.merge_proj.bias is not None:
            nn.init.zeros_(self.merge_proj.bias)
        for block in self.blocks:
            block.identity_init()

    def history_fields(self) -> tuple[str, ...]:
        return (*self.fields, *self.side_fields)

    # -- contract -------------------------------------------------------------------------
    def encode_user(self, batch: Batch) -> UserState:
        """Merged tokens and, with the cache, every candidate-independent state and K/V."""
        histories = self._histories(batch)  # looked up once: the tokens and the read-out
        tokens, valid = self.sequence_tokens(batch, histories)
        state: UserState = {"tokens": tokens, "valid": valid}
        if self.user is not None:
            state["user"] = self.user_ln(self.user(batch.user))
        if self.readout is not None:  # the item fields, unmerged and unprojected
            items = histories[0].dense()
            state["items"] = items * batch.history_mask.unsqueeze(-1).to(items.dtype)
            state["items_valid"] = batch.history_mask
        if not self.params.cache:
            return state
        shared = self._shared_globals(state, tokens)  # [B, gs, d'] (CLS, user) or [B, 0, d']
        gs = shared.shape[1]
        kq = min(self.params.n_query, tokens.shape[1])
        first = self.blocks[0]
        # layer 1 (cross-causal): keys = [shared globals; all merged tokens]
        k_g, v_g = first.kv(shared)
        k_s, v_s = first.kv(tokens)
        keys, values = torch.cat((k_g, k_s), dim=-2), torch.cat((v_g, v_s), dim=-2)
        queries = torch.cat((shared, tokens[:, -kq:]), dim=1)
        x = first(queries, keys, values, self._mask(self._causal_globals(gs), valid, kq))
        state.update(k0=keys, v0=values, kvalid0=self._key_valid(gs, valid))
        # self-causal layers over [shared globals; k sequence queries]
        q_valid = valid[:, -kq:]
        mask = self._mask(self._causal_globals(gs), q_valid, kq)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks[1:], start=1):
            keys, values = block.kv(x)
            state[f"k{i}"], state[f"v{i}"] = keys, values
            if i == last:  # the sequence's last-layer outputs are never read: globals only
                x, mask = x[:, :gs], mask[:, :, :gs]
            x = block(x, keys, values, mask)
        state["kvalid1"] = self._key_valid(gs, q_valid)
        state["globals"] = x[:, :gs]  # final states of CLS / user (causal mask)
        return state

    def score(self, state: UserState, batch: Batch) -> Tensor:
        if not self.params.cache:
            return self._score_reference(state, batch)
        own = self._own_globals(state, batch)  # [B, M, n_own, d']
        own_mask = torch.ones(self.n_own, self.n_own, dtype=torch.bool, device=own.device)
        x = own
        for i, block in enumerate(self.blocks):
            kv_valid = state["kvalid0" if i == 0 else "kvalid1"]  # [B, S]
            x = block.forward_split(
                x, own_mask, state[f"k{i}"], state[f"v{i}"], kv_valid[:, None, None, :]
            )
        shared = state["globals"]
        final = torch.cat((x, shared.unsqueeze(1).expand(-1, x.shape[1], -1, -1)), dim=2)
        return self._head(final, own[:, :, 0], state, batch)

    @property
    def user_state_uses_request_time(self) -> bool:
        """The serving cache must key user states by request time when tokens carry the gap."""
        return self.time is not None

    # -- tokens -------------------------------------------------------------------------------
    @staticmethod
    def request_time(batch: Batch) -> Tensor:
        """[B] the request time: all targets of a request share it, the first is always real."""
        return batch.target_ts[:, 0]

    def _histories(self, batch: Batch) -> list[HistoryEmbedding]:
        """The item-side, then (if any) event-side history fields at the batch's distinct ids."""
        out = []
        for emb in (self.items, self.side):
            if emb is not None:
                distinct = {
                    f: dedup(batch.history[f], emb.tables[f].num_embeddings) for f in emb.fields
                }
                out.append(emb.history(batch, distinct))
        return out

    def _field_rows(
        self, batch: Batch, histories: list[HistoryEmbedding] | None = None
    ) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor]]:
        """Per history field: (distinct rows [U, e], inverse [B, L] or [B, L, W], value mask
        of multi-valued fields, its block of the token projection [d, e]); the time gap last,
        its rows being the whole bucket table."""
        p = self.params
        weight = self.token_proj.weight  # [d, token_in]: concat(item, side, time) -> d
        out, offset = [], 0
        for history in histories or self._histories(batch):
            for field in history.fields:
                block = weight[:, offset : offset + p.embed_dim]
                out.append((field.rows, field.inverse, field.value_mask, block))
                offset += p.embed_dim
        if self.time is not None:
            gap = self.request_time(batch).unsqueeze(1) - batch.history_ts
            bucket = log_buckets(gap, p.time_buckets)
            rows = self.time(torch.arange(p.time_buckets, device=gap.device))
            out.append((rows, bucket, None, weight[:, offset:]))
        return out

    def behaviour_tokens(
        self, batch: Batch, histories: list[HistoryEmbedding] | None = None
    ) -> Tensor:
        """[B, L, d]: projection of concat(item fields, side fields, time-gap embedding),
        computed per field on the batch's distinct rows (a Linear of a concat is the sum of
        per-field Linears), zero on padding."""
        out = self._bias(self.token_proj)
        for rows, inverse, vmask, block in self._field_rows(batch, histories):
            out = out + HistoryField(rows @ block.T, inverse, vmask).dense()
        return out * batch.history_mask.unsqueeze(-1).to(out.dtype)

    @staticmethod
    def _bias(lin: nn.Linear) -> Tensor:
        """A projection's bias, zeros without one (`shared_shift=False`)."""
        if lin.bias is not None:
            return lin.bias
        return lin.weight.new_zeros(lin.weight.shape[0])

    def _merge(self, x: Tensor, slots: Tensor) -> Tensor:
        """Groups of K behaviour tokens [N, G, K, d] (slots [N, G, K] True = real, padded
        tokens already zero) -> merged tokens [N, G, d'] before the LayerNorm."""
        n, g, k, d = x.shape
        if self.inner is None:
            return self.merge_proj(x.reshape(n, g, k * d))
        pooled = self._inner(x.reshape(n * g, k, d), slots.reshape(n * g, k))
        return self.merge_proj(pooled.view(n, g, -1))

    def _merge_concat_folded(
        self,
        batch: Batch,
        extra: int,
        slots: Tensor,
        histories: list[HistoryEmbedding] | None = None,
    ) -> Tensor:
        """Concat merge without the [B, L, d] behaviour tokens: merge_proj(concat_s(token_s))
        = sum over slots s and fields f of (W_s P_f) e_f, so each field's distinct rows are
        projected once per slot ([U, K, d']) and one embedding_bag per field sums the K slots
        of every group (weights: 0 on padding, 1/count over the values of multi-valued
        fields). Same result as `_merge` on `behaviour_tokens`, about half the time."""
        b, g, k = slots.shape
        w = self.merge_proj.weight.view(self.dm, k, self.d)  # W_s = w[:, s]
        slot_of = torch.arange(g * k, device=slots.device) % k  # padded position -> slot
        real = slots.reshape(b, g * k).to(w.dtype)
        bias = torch.einsum("msd,d->sm", w, self._bias(self.token_proj))  # [K, d']: W_s b
        out = self._bias(self.merge_proj) + slots.to(w.dtype) @ bias
        for rows, inverse, vmask, block in self._field_rows(batch, histories):
            per_slot = torch.einsum("ue,de,msd->usm", rows, block, w)  # [U, K, d']
            pad = (b, extra, *inverse.shape[2:])
            idx = torch.cat((inverse.new_zeros(pad), inverse), 1) * k
            weight = real
            if vmask is not None:  # mean over the values of a multi-valued field
                vm = torch.cat((vmask.new_zeros(pad), vmask), 1).to(w.dtype)
                weight = real.unsqueeze(-1) * vm / vm.sum(-1, keepdim=True).clamp_min(1.0)
                idx = idx + slot_of.view(1, -1, 1)
            else:
                idx = idx + slot_of
            rows_k = per_slot.reshape(-1, self.dm)
            bags = _BagSum.apply(rows_k, idx.reshape(b * g, -1), weight.reshape(b * g, -1))
            out = out + bags.view(b, g, self.dm)
        return out

    def sequence_tokens(
        self, batch: Batch, histories: list[HistoryEmbedding] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Merged tokens [B, L', d'] (L' = ceil(L / K), chronological, groups aligned from the
        most recent end), LayerNorm-ed, with their positions added, and which are real."""
        k = self.params.merge_k
        mask = batch.history_mask
        b, length = mask.shape
        extra = (-length) % k if length else k
        mask = torch.cat((mask.new_zeros(b, extra), mask), dim=1)
        groups = mask.shape[1] // k
        slots = mask.view(b, groups, k)
        if self.inner is None:
            merged = self._merge_concat_folded(batch, extra, slots, histories)
        else:
            x = self.behaviour_tokens(batch, histories)
            x = torch.cat((x.new_zeros(b, extra, x.shape[-1]), x), dim=1)
            merged = self._merge(x.view(b, groups, k, -1), slots)
        positions = relative_positions(groups, mask.device, self.max_groups)
        return self.merge_ln(merged) + self.pos(positions).to(merged.dtype), slots.any(-1)

    def _inner(self, x: Tensor, slot_mask: Tensor) -> Tensor:
        """InnerTrans: one block over the K tokens of each group [G, K, d] -> [G, K*d | d]."""
        g, k, d = x.shape
        x = x + self.slot_pos.to(x.dtype)
        eye = torch.eye(k, dtype=torch.bool, device=x.device)
        attend = (slot_mask[:, None, None, :] | eye).expand(g, 1, k, k)
        keys, values = self.inner.kv(x)
        y = self.inner(x, keys, values, attend) * slot_mask.unsqueeze(-1).to(x.dtype)
        if self.params.inner_pool == "flatten":
            return y.reshape(g, k * d)
        w = slot_mask.unsqueeze(-1).to(y.dtype)
        return (y * w).sum(1) / w.sum(1).clamp_min(1.0)

    def candidate_tokens(self, batch: Batch) -> Tensor:
        """[B, M, d']: the candidate embedded exactly like a behaviour (item fields, no event
        fields, time-gap bucket 0, the same projection) and merged as a group holding only the
        candidate in its most recent slot, plus position 0: the candidate lives in the space of
        the merged sequence tokens [INFER]."""
        p = self.params
        weight = self.token_proj.weight
        token = self._bias(self.token_proj)
        for i, e in enumerate(self.items.target(batch).fields):
            token = token + e @ weight[:, i * p.embed_dim : (i + 1) * p.embed_dim].T
        if self.time is not None:
            zero = torch.zeros(1, dtype=torch.long, device=weight.device)
            token = token + self.time(zero)[0] @ weight[:, -p.time_dim :].T
        b, m, d = token.shape
        k = p.merge_k
        group = torch.cat((token.new_zeros(b, m, k - 1, d), token.unsqueeze(2)), dim=2)
        slots = torch.zeros(k, dtype=torch.bool, device=token.device)
        slots[-1] = True
        merged = self.merge_ln(self._merge(group, slots.expand(b, m, k)))
        zero = torch.zeros(1, dtype=torch.long, device=token.device)
        return merged + self.pos(zero)[0].to(merged.dtype)

    def _shared_globals(self, state: UserState, like: Tensor) -> Tensor:
        """[B, gs, d'] candidate-independent global tokens (CLS, user) under the causal mask;
        [B, 0, d'] under the full mask (every global token then runs per target)."""
        b = like.shape[0]
        if self.params.global_mask == "full":
            return like.new_zeros(b, 0, self.dm)
        parts = [self.cls.to(like.dtype).expand(b, 1, -1)]
        if self.user is not None:
            parts.append(state["user"].unsqueeze(1).to(like.dtype))
        return torch.cat(parts, dim=1)

    def _own_globals(self, state: UserState, batch: Batch) -> Tensor:
        """[B, M, n_own, d'] per-target global tokens: candidate (+ CLS, user under full)."""
        if self.n_own == 1:
            return self.candidate_tokens(batch).unsqueeze(2)
        return self._all_globals(state, batch)

    # -- masks ------------------------------------------------------------------------------
    def _causal_globals(self, g: int) -> Tensor:
        """[g, g] visibility among g global tokens: j >= i (causal) or all (full)."""
        ones = torch.ones(g, g, dtype=torch.bool, device=self.cls.device)
        return ones.triu() if self.params.global_mask == "causal" else ones

    @staticmethod
    def _mask(global_vis: Tensor, key_valid: Tensor, kq: int) -> Tensor:
        """[B, 1, g + kq, g + S] for queries [global (g); the last kq sequence tokens] over keys
        [global; S sequence tokens]: globals see `global_vis` and every real sequence token;
        sequence token a sees sequence tokens j <= a that are real, and itself; no global."""
        g = global_vis.shape[0]
        b, s = key_valid.shape
        dev = key_valid.device
        top = torch.cat((global_vis.expand(b, g, g), key_valid[:, None, :].expand(b, g, s)), 2)
        rows = torch.arange(s - kq, s, device=dev)[:, None]
        cols = torch.arange(s, device=dev)[None, :]
        seq = (cols <= rows) & (key_valid[:, None, :] | (cols == rows))  # [B, kq, S]
        bottom = torch.cat((torch.zeros(b, kq, g, dtype=torch.bool, device=dev), seq), 2)
        return torch.cat((top, bottom), dim=1).unsqueeze(1)

    @staticmethod
    def _key_valid(g: int, valid: Tensor) -> Tensor:
        """[B, g + S]: which cached keys a per-target global token may read."""
        ones = torch.ones(valid.shape[0], g, dtype=torch.bool, device=valid.device)
        return torch.cat((ones, valid), dim=1)

    # -- reference (no cache) ----------------------------------------------------------------
    def _all_globals(self, state: UserState, batch: Batch) -> Tensor:
        """[B, M, g, d'] every global token of every target, order [candidate, CLS, user]."""
        cand = self.candidate_tokens(batch).unsqueeze(2)
        b, m = cand.shape[:2]
        parts = [cand, self.cls.to(cand.dtype).expand(b, m, 1, -1)]
        if self.user is not None:
            parts.append(state["user"].to(cand.dtype)[:, None, None].expand(-1, m, 1, -1))
        return torch.cat(parts, dim=2)

    def _score_reference(self, state: UserState, batch: Batch) -> Tensor:
        """The hybrid attention run on [global tokens of target m; merged sequence] for every
        target separately (B*M rows), with dense masks: no cache, no split attention."""
        tokens, valid = state["tokens"], state["valid"]
        glob = self._all_globals(state, batch)  # [B, M, g, d']
        b, m, g, dm = glob.shape
        s = tokens.shape[1]
        kq = min(self.params.n_query, s)
        glob = glob.reshape(b * m, g, dm)
        tokens = tokens.unsqueeze(1).expand(-1, m, -1, -1).reshape(b * m, s, dm)
        valid = valid.unsqueeze(1).expand(-1, m, -1).reshape(b * m, s)
        vis = self._causal_globals(g)
        first = self.blocks[0]
        keys, values = first.kv(torch.cat((glob, tokens), dim=1))
        x = torch.cat((glob, tokens[:, -kq:]), dim=1)
        x = first(x, keys, values, self._mask(vis, valid, kq))
        mask = self._mask(vis, valid[:, -kq:], kq)
        for block in self.blocks[1:]:
            keys, values = block.kv(x)
            x = block(x, keys, values, mask)
        return self._head(x[:, :g].reshape(b, m, g, dm), glob[:, 0].view(b, m, dm), state, batch)

    def _head(self, final: Tensor, candidate: Tensor, state: UserState, batch: Batch) -> Tensor:
        """Global tokens [B, M, g, d'] (order candidate, CLS, user) and the candidate's input
        token [B, M, d'] -> logits [B, M]. With `head_interest` the head also sees x_t, what
        the candidate gathered from the history (h = its final state - x_t, the sum of its
        blocks' residual updates) and h ⊙ x_t: DIN's target-interest product [INFER]. With
        `readout="tokens"` also r, a DIN attention of the target's item fields over the
        history's (never merged), and r ⊙ target [INFER]."""
        parts = [self.final_ln(final).flatten(-2)]
        if self.params.head_interest:
            gathered = final[:, :, 0] - candidate
            parts += [candidate, gathered, gathered * candidate]
        if self.readout is not None:
            target = self.items.target(batch).joined().to(final.dtype)  # [B, M, e * fields]
            parts.append(self.readout(target, state["items"], state["items_valid"]))
        head_in = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return self.head(head_in, batch.target_mask, batch.target_type)
