"""STCA: Stacked Target-to-history Cross Attention (Douyin, arXiv 2511.06077; SPEC §7).

Each behaviour is one token, the target is one query: no self-attention over the history, so the
cost is linear in L, and the history's token-wise transform is shared by all targets of a
request (request-level batching, SPEC §7.3) and by all layers.

    x_j  = LN_tok(W_in [e_j^(f1) ‖ e_j^(f2) ‖ … (‖ e_time(bucket(τ_req − τ_j)))])   history tokens
    x_t  = LN_tok(W_in [e_t^(f1) ‖ … (‖ e_time(0))])                              target token
    X̃    = LN(SwiGLU(… LN(SwiGLU(X)) …))   depth `history_ffn_depth`, ONCE per user (encode_user)
    q^(1) = LN(SwiGLU^(1)(x_t))
    o^(i) = MHCrossAttn^(i)(q^(i), X̃)     (single query per target, re-associated kernel)
    q^(i+1) = LN(SwiGLU^(i+1)([o^(1) ‖ … ‖ o^(i) ‖ x_t] W_C^(i+1)))          (query fusion)
    z    = SwiGLU([o^(1) ‖ … ‖ o^(n) ‖ x_t] W_Z)        n = `layers`         (no LayerNorm)
    ŷ    = MLP([z ‖ x_t])

Design choices beyond the paper ([INFER], each a parameter):

* Tokens: the concatenated item-side field embeddings (`fields`, default the fields shared by
  history and target) projected to `dim` by one linear map W_in, computed per field on the
  batch's distinct rows (W_in [a ‖ b] = W_a a + W_b b) and gathered, so the [B, L, n·e]
  concatenation is never built. `token_norm` adds a LayerNorm on the tokens (history and
  target alike): it puts the tokens at unit scale whatever the embedding init, so the
  LN(SwiGLU(.)) stack starts in its normal regime rather than in LayerNorm's eps.
* Time delta (`time_delta`, SPEC §7.1 "request time − interaction time"): a log-bucket
  (`nn.temporal.log_buckets`) embedding of τ_req − τ_j concatenated to the fields before W_in;
  the target takes bucket 0. τ_req is the request time, taken as the latest real target time of
  the row (the targets of one request share it), so the history transform still depends on no
  target, only on the request's time. A cached user state (serving) is then valid for one
  request time only: with `time_delta` the cache key must include it.
* History transform: one token-wise stack shared by all layers (SPEC default);
  `history_per_layer` gives each layer its own stack on X (the other reading of the paper).
  No residual inside the stack (the paper's X̃ = LN(SwiGLU(X))).
* No positional bias anywhere in the attention (what makes length extrapolation benign,
  SPEC §7.4): order enters only through the optional time delta.
* Read-out: the paper's mixer (RankMixer over z, user and candidate tokens) is replaced by
  DARE's BN-MLP head on [z ‖ x_t] (`head_target=False`: z only).
* Init: embedding tables N(0, init_std) with zero padding rows; the read-out (W_Z, its SwiGLU),
  the MLP head and the LayerNorms keep PyTorch's defaults; every other linear weight (W_in,
  the history and query SwiGLUs, W_C) starts at `init_gain` x PyTorch's default
  (Kaiming-uniform), the attention's at sqrt(init_gain) (scores are bilinear in W_Q, W_K).
  Those weights feed a LayerNorm, so their scale hardly changes the function, but Adam's steps
  are absolute, so larger weights take smaller relative steps. With gain 1 the model needs
  lr ~0.002: at DARE's lr 0.01 the attention logits grew to ~150 and training stalled
  (held-out AUC 0.48-0.74 on the model tests' category task, seeds 0-2). With gain 8 it learns
  that task at lr 0.01 (AUC 0.967-0.999, seeds 0-6).

Speed (see `encode_user`): with `token_dedup` the history stack runs on the batch's distinct
tokens only (the same ids, and time bucket if any, give the same token, so X̃ is computed once
per distinct token and gathered back to [B, L, d]); this is exact, and skipped when fewer than
half the tokens repeat. `checkpoint` recomputes the history stack in the backward pass
(activation checkpointing, in segments of `checkpoint_tokens` tokens) instead of keeping its
[N, 2rd] intermediates: the peak memory of a training step then no longer grows with the
stack's width (one segment's intermediates at a time), for ~1/3 more history-FFN FLOPs. `kernel="plain"`
materialises K and V (the reference form, nn.cross_attention); the default `auto` uses the
re-associated form for a few targets per request (training) and the plain one for many
(serving 500 candidates: 2.56 -> 0.72 GFLOP per request at L = 10K, d = 64, h = 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longrec.data.batch import Batch
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register
from longrec.models.towers import EmbeddingSet, HistoryField, dedup
from longrec.nn.cross_attention import KERNELS, MultiHeadCrossAttention
from longrec.nn.embedding import gather_rows, init_normal, zero_padding_rows
from longrec.nn.ffn import SwiGLU, SwiGLUStack
from longrec.nn.heads import MLPHead
from longrec.nn.temporal import log_buckets

_MAX_KEY = 2**62  # token keys are mixed-radix int64 numbers; beyond this, no token dedup


@dataclass
class StcaParams:
    dim: int = 64  # d: token and attention width
    embed_dim: int = 32  # per field table width (the concatenation is projected to dim)
    fields: tuple[str, ...] | None = None  # None = item-side fields shared by history and target
    layers: int = 2  # M stacked cross-attention layers
    heads: int = 4  # d must be divisible by it
    ratio: float = 2.0  # SwiGLU hidden width r·d
    history_ffn_depth: int = 2  # LN(SwiGLU) layers of the history transform
    history_per_layer: bool = False  # one history transform per layer (on X) instead of shared
    query_fusion: bool = True  # q^(i+1) from [o^(1..i) ‖ x_t] W_C (else from o^(i) alone)
    time_delta: bool = False  # request-time − behaviour-time bucket embedding in the tokens
    time_buckets: int = 64  # log2 buckets of the gap in seconds (bucket 0 = the target)
    token_norm: bool = True  # LayerNorm on the projected tokens
    kernel: str = "auto"  # auto (cheaper per call) | reassociated (K, V never built) | plain
    checkpoint: bool = False  # recompute the history transform in backward (saves memory)
    checkpoint_tokens: int = 32768  # tokens per checkpointed segment (bounds the peak memory)
    token_dedup: bool = True  # run the history transform on distinct tokens only (exact)
    head_target: bool = True  # head input [z ‖ x_t] (else z)
    hidden: tuple[int, ...] = (200, 80)  # MLP head widths
    type_dim: int = 8  # target-type embedding into the head when the data has types; 0 = off
    init_std: float = 0.05  # embedding tables N(0, init_std)
    init_gain: float = 8.0  # linear weights before a LayerNorm: gain x PyTorch's init (see above)


@dataclass
class _Part:
    """One additive part of the history tokens: projected rows [U, d] and where they go."""

    rows: Tensor
    inverse: Tensor  # [B, L] or [B, L, W] (multi-valued)
    ids: Tensor | None = None  # distinct raw ids [U] of a multi-valued field (0 = padding)
    value_mask: Tensor | None = None

    def field(self) -> HistoryField:
        return HistoryField(self.rows, self.inverse, self.value_mask)


@register("stca", "STCA: stacked target-to-history cross attention, history FFN once per user")
class StcaModel(SequenceModel):
    Params = StcaParams

    def __init__(self, schema: DataSchema, params: StcaParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        if p.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got '{p.kernel}'")
        if p.layers < 1:
            raise ValueError(f"layers must be >= 1, got {p.layers}")
        d = p.dim
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        self.tables = EmbeddingSet(
            schema, self.fields, p.embed_dim, 0, max(schema.max_len, 1), sparse_embeddings
        )
        self.time = (
            nn.Embedding(p.time_buckets, p.embed_dim, sparse=sparse_embeddings)
            if p.time_delta
            else None
        )
        in_dim = self.tables.sem_dim + (p.embed_dim if p.time_delta else 0)
        self.proj = nn.Linear(in_dim, d)  # W_in
        self.token_norm = nn.LayerNorm(d) if p.token_norm else nn.Identity()
        n_stacks = p.layers if p.history_per_layer else 1
        self.history_ffn = nn.ModuleList(
            SwiGLUStack(d, p.ratio, p.history_ffn_depth) for _ in range(n_stacks)
        )
        self.query_ffn = nn.ModuleList(SwiGLU(d, p.ratio) for _ in range(p.layers))
        self.query_norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(p.layers))
        # W_C^(i+1) ∈ R^{(i+1)d × d} for i = 1..layers-1 (query fusion)
        self.fuse = nn.ModuleList(
            nn.Linear((i + 1) * d, d, bias=False) for i in range(1, p.layers) if p.query_fusion
        )
        self.attn = nn.ModuleList(
            MultiHeadCrossAttention(d, p.heads, p.kernel) for _ in range(p.layers)
        )
        self.readout_in = nn.Linear((p.layers + 1) * d, d, bias=False)  # W_Z
        self.readout = SwiGLU(d, p.ratio)
        self.head = MLPHead(
            2 * d if p.head_target else d, p.hidden, **schema.head_types(p.type_dim)
        )
        with torch.no_grad():
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear) and not name.startswith(("head.", "readout")):
                    module.weight.mul_(p.init_gain ** (0.5 if name.startswith("attn.") else 1.0))
        init_normal(self.tables, p.init_std)
        if self.time is not None:
            nn.init.normal_(self.time.weight, std=p.init_std)
        zero_padding_rows(self)

    @property
    def user_state_uses_request_time(self) -> bool:
        """The serving cache must key user states by request time when tokens carry the gap."""
        return self.params.time_delta

    # -- tokens ---------------------------------------------------------------------------
    def _field_weights(self) -> list[Tensor]:
        """W_in split by input block: one [d, e] matrix per field (and the time block)."""
        e = self.params.embed_dim
        n = len(self.fields) + (1 if self.time is not None else 0)
        return list(self.proj.weight.split([e] * n, dim=1))

    def _request_time(self, batch: Batch) -> Tensor:
        """[B] latest real target time of each row (the request time; 0 without targets)."""
        return batch.target_ts.masked_fill(~batch.target_mask, 0).max(dim=1).values

    def _history_parts(self, batch: Batch) -> list[_Part]:
        weights = self._field_weights()
        parts = []
        for f, w in zip(self.fields, weights[: len(self.fields)], strict=True):
            table = self.tables.tables[f]
            ids = batch.history[f]
            uniq, inverse = dedup(ids, table.num_embeddings)
            multi = f in self.tables.multi
            parts.append(
                _Part(
                    table(uniq) @ w.T,
                    inverse,
                    uniq if multi else None,
                    (ids != 0) if multi else None,
                )
            )
        if self.time is not None:
            gap = self._request_time(batch).unsqueeze(1) - batch.history_ts
            uniq, inverse = dedup(
                log_buckets(gap, self.params.time_buckets), self.time.num_embeddings
            )
            parts.append(_Part(self.time(uniq) @ weights[-1].T, inverse))
        return parts

    @staticmethod
    @torch.no_grad()
    def _distinct_tokens(parts: list[_Part]) -> tuple[list[_Part], Tensor] | None:
        """The parts re-indexed to the distinct tokens [U] and the token of every history slot
        [B, L]; None when the token key would overflow or fewer than half the tokens repeat.

        A token is identified by its parts' row indices (mixed-radix key, one digit per part and
        value slot); the distinct keys are decoded back into per-part row indices."""
        columns: list[tuple[int, Tensor, int]] = []  # (part, inverse column [B, L], radix)
        for i, part in enumerate(parts):
            inv = part.inverse if part.inverse.dim() == 3 else part.inverse.unsqueeze(-1)
            columns += [(i, inv[..., c], part.rows.shape[0]) for c in range(inv.shape[-1])]
        stride, key = 1, None
        strides = []
        for _, col, radix in columns:
            strides.append(stride)
            digit = col.reshape(-1) * stride
            key = digit if key is None else key + digit
            stride *= radix
            if stride >= _MAX_KEY:
                return None
        uniq, token = torch.unique(key, sorted=True, return_inverse=True)
        if uniq.numel() > key.numel() // 2:
            return None
        slots: list[list[Tensor]] = [[] for _ in parts]
        for (i, _, radix), s in zip(columns, strides, strict=True):
            slots[i].append(torch.div(uniq, s, rounding_mode="floor") % radix)
        out = []
        for part, cols in zip(parts, slots, strict=True):
            if part.value_mask is None:
                out.append(_Part(part.rows, cols[0]))
            else:
                inv = torch.stack(cols, dim=-1)  # [U, W]
                out.append(_Part(part.rows, inv, part.ids, part.ids[inv] != 0))
        shape = parts[0].inverse.shape[:2]
        return out, token.view(shape)

    def _tokens(self, parts: list[_Part]) -> Tensor:
        x = None
        for part in parts:
            e = part.field().dense()
            x = e if x is None else x + e
        return self.token_norm(x + self.proj.bias)

    def _target_tokens(self, batch: Batch) -> Tensor:
        """x_t [B, M, d]."""
        parts = self.tables.target(batch).fields
        if self.time is not None:
            zero = torch.zeros(batch.target_mask.shape, dtype=torch.long, device=parts[0].device)
            parts = [*parts, self.time(zero)]
        return self.token_norm(self.proj(torch.cat(parts, dim=-1)))

    # -- contract -------------------------------------------------------------------------
    def encode_user(self, batch: Batch) -> UserState:
        """Embedded history tokens and their transform X̃ [B, L, d] (per layer with
        `history_per_layer`): everything the targets share."""
        parts = self._history_parts(batch)
        distinct = self._distinct_tokens(parts) if self.params.token_dedup else None
        if distinct is not None:
            parts, token = distinct
        x = self._tokens(parts)  # [B, L, d], or [U, d] on distinct tokens
        state: UserState = {"mask": batch.history_mask}
        for i, stack in enumerate(self.history_ffn):
            if self.params.checkpoint and torch.is_grad_enabled():
                h = self._checkpointed(stack, x)
            else:
                h = stack(x)
            state[f"history_{i}"] = gather_rows(h, token) if distinct is not None else h
        return state

    def _checkpointed(self, stack: nn.Module, x: Tensor) -> Tensor:
        """The token-wise stack on segments of `checkpoint_tokens` tokens, each recomputed in
        the backward pass: only the segments' inputs and the output are kept, and the backward
        rebuilds one segment's intermediates at a time (exact: the stack is token-wise)."""
        flat = x.reshape(-1, x.shape[-1])
        chunks = flat.split(max(1, self.params.checkpoint_tokens))
        out = [checkpoint(stack, c, use_reentrant=False) for c in chunks]
        return (out[0] if len(out) == 1 else torch.cat(out)).view(*x.shape[:-1], -1)

    def score(self, state: UserState, batch: Batch) -> Tensor:
        return self._run(state, batch)[0]

    def search_scores(self, batch: Batch) -> Tensor:
        """First layer's attention scores, mean over heads [B, M, L] (0 on padding)."""
        scores = self._run(self.encode_user(batch), batch, want_scores=True)[1]
        mask = batch.history_mask[:, None, None, :]
        return scores.masked_fill(~mask, 0.0).mean(dim=2)

    def _run(
        self, state: UserState, batch: Batch, want_scores: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        p = self.params
        x_t = self._target_tokens(batch)
        mask = state["mask"]
        last_stack = len(self.history_ffn) - 1
        q = self.query_norm[0](self.query_ffn[0](x_t))
        outs: list[Tensor] = []
        first_scores = None
        for i, attn in enumerate(self.attn):
            o, scores = attn.attend(
                q,
                state[f"history_{min(i, last_stack)}"],
                mask,
                return_scores=want_scores and i == 0,
            )
            if i == 0:
                first_scores = scores
            outs.append(o)
            if i + 1 < p.layers:
                fused = self.fuse[i](torch.cat([*outs, x_t], dim=-1)) if p.query_fusion else o
                q = self.query_norm[i + 1](self.query_ffn[i + 1](fused))
        z = self.readout(self.readout_in(torch.cat([*outs, x_t], dim=-1)))
        head_in = torch.cat((z, x_t), dim=-1) if p.head_target else z
        return self.head(head_in, batch.target_mask, batch.target_type), first_scores
