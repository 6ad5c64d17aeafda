"""STCA: Stacked Target-to-history Cross Attention (Douyin, arXiv 2511.06077; docs/models.md).

Each behaviour is one token, the target is one query: no self-attention over the history, so the
cost is linear in L, and the history's token-wise transform F is shared by all targets of a
request (request-level batching) and by all layers.

    x_j  = [e_j^(f1) ‖ e_j^(f2) ‖ … (‖ e_time(bucket(τ_req − τ_j)))]  (W_in x_j if `dim` is set)
    x_t  = [e_t^(f1) ‖ … (‖ e_time(0))]                                target token, same tables
    X̃    = F(X),  F = LN(· + SwiGLU(·)) x `history_ffn_depth`, ONCE per user (encode_user)
    q^(1) = F(x_t)                                          (`tied_query`: one space, see below)
    o^(i) = MHCrossAttn^(i)(q^(i), X̃),  score = τ_{i,r} cos(q W_Q^r, x̃_j W_K^r)   (QK-norm)
    q^(i+1) = F([o^(1) ‖ … ‖ o^(i) ‖ x_t] W_C^(i+1))                         (query fusion)
    z    = SwiGLU([o^(1) ‖ … ‖ o^(n) ‖ x_t] W_Z)        n = `layers`         (no LayerNorm)
    ŷ    = MLP([z ‖ x̂_t ‖ h ‖ h ⊙ x̂_t]),  x̂_t = q^(1), h = o^(n)

Why the departures from the paper's letter ([INFER], each a parameter that restores it). The
paper's form (X̃ = LN(SwiGLU(X)), separate query FFNs, default init, unbounded q·k scores, head
on [z ‖ x_t]) never used the history on the bundled real samples: test AUC 0.48-0.50, the same
with histories swapped between users, i.e. a model of the target alone, which under DARE's
split anti-generalises. A fresh random LN(SwiGLU(.)) on each side maps the same item to
unrelated vectors, so relevance had to be learnt from scratch through two transforms, and the
unbounded scores saturated first (docs/models.md, "STCA: why the paper's form did not learn").
The model therefore starts as similarity search over the embeddings and keeps that structure:

* `residual`: each layer of F is LN(x + SwiGLU(x)) with SwiGLU's output matrix at 0, so F
  starts as LN and learns a correction (LN(SwiGLU(x)), the paper's, lost 0.18 test AUC on
  Taobao and 0.09 on MovieLens in an ablation).
* `tied_query`: the queries go through the same F as the history (the paper writes the same
  SwiGLUFFN^(i) on both sides), so a target and a behaviour of the same item map to the same
  vector whatever F learns.
* `qk_norm`: each head scores temperature x cosine (a learned temperature per head, initially
  `temperature`), bounded whatever the weights do; `attn_init="identity"` starts W_Q, W_K,
  W_V, W_O at I and W_C at "pick x_t", so layer 1 initially scores behaviours by their
  similarity to the target and pools them as they are.
* `head_interest`: the head sees the last layer's output h and h ⊙ x̂_t beside z and x̂_t: the
  explicit target x interest product that DIN and DARE's heads have (DARE's "target
  representation"); without it the head must find the match through z.
* No W_in by default (`dim=None`): a random projection of the concatenated fields, even
  orthogonal, lost 0.02-0.06 AUC; with `dim` set, W_in is orthogonal without bias.
* Sizes: the paper's layers, width and ratio are not public. On the bundled samples one layer,
  one head and a one-layer F beat two layers / two heads / depth two by 0.03 (Taobao) and 0.02
  (MovieLens) test AUC (3 seeds each; BENCHMARKS.md): the defaults are the small model, the
  stacked one is `layers=2` (and up).
* Time delta (`time_delta`, "request time − interaction time"): a log-bucket
  (`nn.temporal.log_buckets`) embedding of τ_req − τ_j concatenated to the fields; the target
  takes bucket 0. τ_req is the request time, taken as the latest real target time of the row
  (the targets of one request share it), so the history transform still depends on no target,
  only on the request's time. A cached user state (serving) is then valid for one request time
  only: with `time_delta` the cache key must include it.
* Type-aware recency (`type_query`, with `time_delta` on data with target types) [INFER]: the
  target's time slot is e_time(0) + e_type(type) instead of e_time(0), so its score against a
  behaviour gains a learned e_type · e_time(gap) term: a purchase can prefer old behaviours
  while a click prefers recent ones. The type otherwise enters only the head, after the
  attention has already chosen what to read. Zero at init. Off: on the long-range synthetic
  data it gained nothing at 1K or 10K (one seed each, BENCHMARKS.md).
* History transform: one token-wise stack shared by all layers; `history_per_layer` gives each
  layer its own stack on X (the other reading of the paper).
* No positional bias anywhere in the attention (what makes length extrapolation benign): order
  enters only through the optional time delta.
* Read-out: the paper's mixer (RankMixer over z, user and candidate tokens) is replaced by
  DARE's BN-MLP head.
* Init: embedding tables N(0, init_std) with zero padding rows, as DARE; the read-out, the MLP
  head and the LayerNorms keep PyTorch's defaults; `init_gain` scales the untied query FFNs and
  W_C under `attn_init="default"`.

Speed (see `encode_user`): with `token_dedup` the history stack runs on the batch's distinct
tokens only (the same ids, and time bucket if any, give the same token, so X̃ is computed once
per distinct token and gathered back to [B, L, d]); this is exact, and skipped when fewer than
half the tokens repeat. `checkpoint` recomputes the history stack in the backward pass
(activation checkpointing, in segments of `checkpoint_tokens` tokens) instead of keeping its
[N, 2rd] intermediates: the peak memory of a training step then no longer grows with the
stack's width, for ~1/3 more history-FFN FLOPs. Under QK-norm the attention materialises its
keys (the plain kernel of nn.cross_attention: unit keys need K); without it, `kernel="auto"`
uses the re-associated form (K and V never built) for a few targets per request and the plain
one for many (serving 500 candidates: 2.56 -> 0.72 GFLOP per request at L = 10K, d = 64, h = 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

ATTN_INITS = ("identity", "default")
_MAX_KEY = 2**62  # token keys are mixed-radix int64 numbers; beyond this, no token dedup


@dataclass
class StcaParams:
    dim: int | None = None  # d; None = the concatenated field width (no W_in projection)
    embed_dim: int = 16  # per field table width
    fields: tuple[str, ...] | None = None  # None = item-side fields shared by history and target
    layers: int = 1  # M stacked cross-attention layers (see the docstring for why 1)
    heads: int = 1  # d must be divisible by it
    ratio: float = 2.0  # SwiGLU hidden width r·d
    history_ffn_depth: int = 1  # SwiGLU layers of the history transform F
    history_per_layer: bool = False  # one history transform per layer (on X) instead of shared
    residual: bool = (
        True  # F's layers are LN(x + SwiGLU(x)), SwiGLU starting at 0 (else LN(SwiGLU))
    )
    tied_query: bool = True  # queries go through the history transform F (one space)
    query_fusion: bool = True  # q^(i+1) from [o^(1..i) ‖ x_t] W_C (else from o^(i) alone)
    qk_norm: bool = True  # scores = learned temperature x cosine(q W_Q, x̃ W_K), per head
    temperature: float = 4.0  # QK-norm's initial temperature
    attn_init: str = "identity"  # identity (W_Q = W_K = W_V = W_O = I, W_C picks x_t) | default
    time_delta: bool = False  # request-time − behaviour-time bucket embedding in the tokens
    time_buckets: int = 64  # log2 buckets of the gap in seconds (bucket 0 = the target)
    # with time_delta and typed targets: the target's time slot also holds an embedding of its
    # type, so its attention can prefer recent behaviours for one type and old ones for another
    type_query: bool = False
    token_norm: bool = False  # LayerNorm on the tokens
    kernel: str = "auto"  # auto (cheaper per call) | reassociated (K, V never built) | plain
    checkpoint: bool = False  # recompute the history transform in backward (saves memory)
    checkpoint_tokens: int = 32768  # tokens per checkpointed segment (bounds the peak memory)
    token_dedup: bool = True  # run the history transform on distinct tokens only (exact)
    head_target: bool = True  # head input has the target token x̂_t
    head_interest: bool = True  # head input has the last layer's output h and h ⊙ x̂_t
    hidden: tuple[int, ...] = (200, 80)  # MLP head widths
    type_dim: int = 8  # target-type embedding into the head when the data has types; 0 = off
    init_std: float = 0.01  # embedding tables N(0, init_std), as DARE
    init_gain: float = 1.0  # W_in, untied query FFNs, W_C under attn_init=default: x PyTorch's


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
        if p.attn_init not in ATTN_INITS:
            raise ValueError(f"attn_init must be one of {ATTN_INITS}, got '{p.attn_init}'")
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
        self.type_query = None
        if p.type_query and p.time_delta and schema.n_target_types > 0:
            # the head's type ids; starts at zero, so the model starts as without it
            self.type_query = nn.Embedding(schema.n_target_types, p.embed_dim)
        d = self.dim = p.dim or in_dim
        if d % p.heads:
            raise ValueError(f"token width {d} is not divisible by heads={p.heads}")
        self.proj = nn.Linear(in_dim, d, bias=False) if p.dim else None  # W_in
        self.token_norm = nn.LayerNorm(d) if p.token_norm else nn.Identity()
        n_stacks = p.layers if p.history_per_layer else 1
        self.history_ffn = nn.ModuleList(
            SwiGLUStack(d, p.ratio, p.history_ffn_depth, residual=p.residual)
            for _ in range(n_stacks)
        )
        self.query_ffn = self.query_norm = None
        if not p.tied_query:
            self.query_ffn = nn.ModuleList(SwiGLU(d, p.ratio) for _ in range(p.layers))
            self.query_norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(p.layers))
        # W_C^(i+1) ∈ R^{(i+1)d × d} for i = 1..layers-1 (query fusion)
        self.fuse = nn.ModuleList(
            nn.Linear((i + 1) * d, d, bias=False) for i in range(1, p.layers) if p.query_fusion
        )
        temperature = p.temperature if p.qk_norm else None
        self.attn = nn.ModuleList(
            MultiHeadCrossAttention(d, p.heads, p.kernel, temperature) for _ in range(p.layers)
        )
        self.readout_in = nn.Linear((p.layers + 1) * d, d, bias=False)  # W_Z
        self.readout = SwiGLU(d, p.ratio)
        head_in = d * (1 + int(p.head_target) + 2 * int(p.head_interest))
        self.head = MLPHead(head_in, p.hidden, **schema.head_types(p.type_dim))
        self._init_weights()
        zero_padding_rows(self)

    def _init_weights(self) -> None:
        """See the module docstring: the model starts as similarity search over the embeddings."""
        p, d = self.params, self.dim
        init_normal(self.tables, p.init_std)
        if self.time is not None:
            nn.init.normal_(self.time.weight, std=p.init_std)
        if self.type_query is not None:
            nn.init.zeros_(self.type_query.weight)
        with torch.no_grad():
            if self.proj is not None:
                nn.init.orthogonal_(self.proj.weight)  # keeps the embeddings' inner products
            for module in (self.query_ffn, self.fuse):
                if module is None:
                    continue
                for lin in (m for m in module.modules() if isinstance(m, nn.Linear)):
                    lin.weight.mul_(p.init_gain)
            if p.residual:  # each residual SwiGLU starts as the identity map
                ffns = [f for stack in self.history_ffn for f in stack.ffns]
                for ffn in ffns + list(self.query_ffn or []):
                    nn.init.zeros_(ffn.down.weight)
            if p.attn_init == "identity":
                for attn in self.attn:
                    attn.identity_init()
                for i, fuse in enumerate(self.fuse, start=1):  # W_C^(i+1) = [0 … 0 ‖ I]
                    nn.init.zeros_(fuse.weight)
                    nn.init.eye_(fuse.weight[:, i * d :])

    @property
    def user_state_uses_request_time(self) -> bool:
        """The serving cache must key user states by request time when tokens carry the gap."""
        return self.params.time_delta

    # -- tokens ---------------------------------------------------------------------------
    def _project(self, i: int, rows: Tensor) -> Tensor:
        """Input block i (a field, or the time gap last) of the tokens, [U, e] -> [U, d]: its
        slice of W_in (W_in [a ‖ b] = W_a a + W_b b), or without W_in its place in the
        concatenation (zero elsewhere), so per-field parts always add up to the token."""
        e = self.params.embed_dim
        if self.proj is None:
            return F.pad(rows, (i * e, self.dim - (i + 1) * e))
        return rows @ self.proj.weight[:, i * e : (i + 1) * e].T

    def _request_time(self, batch: Batch) -> Tensor:
        """[B] latest real target time of each row (the request time; 0 without targets)."""
        return batch.target_ts.masked_fill(~batch.target_mask, 0).max(dim=1).values

    def _history_parts(self, batch: Batch) -> list[_Part]:
        parts = []
        for i, f in enumerate(self.fields):
            table = self.tables.tables[f]
            ids = batch.history[f]
            uniq, inverse = dedup(ids, table.num_embeddings)
            multi = f in self.tables.multi
            parts.append(
                _Part(
                    self._project(i, table(uniq)),
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
            parts.append(_Part(self._project(len(self.fields), self.time(uniq)), inverse))
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
        return self.token_norm(x)

    def _target_tokens(self, batch: Batch) -> Tensor:
        """x_t [B, M, d]."""
        parts = self.tables.target(batch).fields
        if self.time is not None:
            zero = torch.zeros(batch.target_mask.shape, dtype=torch.long, device=parts[0].device)
            slot = self.time(zero)
            if self.type_query is not None and batch.target_type is not None:
                slot = slot + self.type_query(
                    batch.target_type.long().clamp(0, self.type_query.num_embeddings - 1)
                )
            parts = [*parts, slot]
        x = torch.cat(parts, dim=-1)
        return self.token_norm(x if self.proj is None else self.proj(x))

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
        q = self._query(0, x_t)
        target = q if p.tied_query else x_t  # x̂_t: the target in the history's space
        outs: list[Tensor] = []
        first_scores = None
        for i, attn in enumerate(self.attn):
            o, scores = attn.attend(
                q, state[f"history_{self._stack(i)}"], mask, return_scores=want_scores and i == 0
            )
            if i == 0:
                first_scores = scores
            outs.append(o)
            if i + 1 < p.layers:
                fused = self.fuse[i](torch.cat([*outs, x_t], dim=-1)) if p.query_fusion else o
                q = self._query(i + 1, fused)
        z = self.readout(self.readout_in(torch.cat([*outs, x_t], dim=-1)))
        parts = [z]
        if p.head_target:
            parts.append(target)
        if p.head_interest:
            parts += [outs[-1], outs[-1] * target]
        head_in = torch.cat(parts, dim=-1) if len(parts) > 1 else z
        return self.head(head_in, batch.target_mask, batch.target_type), first_scores

    def _stack(self, layer: int) -> int:
        """Index of the history transform that layer `layer` reads."""
        return min(layer, len(self.history_ffn) - 1)

    def _query(self, layer: int, x: Tensor) -> Tensor:
        """q^(i): F_i(x) with the history transform itself (`tied_query`), else the layer's own
        LN(SwiGLU(x)) (LN(x + SwiGLU(x)) with `residual`)."""
        if self.params.tied_query:
            return self.history_ffn[self._stack(layer)](x)
        h = self.query_ffn[layer](x)
        return self.query_norm[layer](x + h if self.params.residual else h)
