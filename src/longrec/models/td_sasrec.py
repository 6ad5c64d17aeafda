"""Target-Decoupled SASRec (Tencent "Practice on Long Behavior Sequence Modeling in Tencent
Advertising", arXiv 2510.21714; docs/models.md, "TD-SASRec"): a SASRec-style causal self-attention
encoder over the most recent behaviours whose positional encodings are decoupled by the advertising
target type (the ad's optimisation goal), used as a candidate-independent, cacheable user encoder
for pre-ranking.

Only the name and a blog-level description are public, so the whole architecture below is a
reconstruction ([INFER]); every choice is a parameter:

* [INFER] Tokens: each behaviour is the concatenation of its item-side field embeddings
  (`fields`, default: the item-side fields shared by history and target, as
  `schema.shared_item_fields()`), so d = embed_dim x n_fields; the target is embedded with the
  same tables. Event-side history fields (behaviour type, domain) are not used.
* [INFER] Encoder: SASRec's: `n_layers` blocks of causal multi-head self-attention and
  a point-wise ReLU FFN (`ffn_dim`, default d as in SASRec), residuals, LayerNorm before
  (`norm="pre"`, plus a final LayerNorm) or after (`norm="post"`) each sub-layer, `dropout` on
  the inputs, attention weights and residual branches. Only the most recent `max_len`
  behaviours are encoded.
* [INFER] Positions are target-relative (1 = most recent), so extra left padding never moves a
  real behaviour; the learned table is P[k, pos] for target type k (Target-Decoupled PE;
  docs/models.md, "Temporal encoding (TTE)"). `type_tables="delta"` (default) builds it as a
  shared table plus a per-type delta, P[k] = P_shared + Δ_k, with no delta for the generic row,
  so an unseen target type falls back to the shared table; `"separate"` gives every type its own
  table.
* [INFER] Decoupling (`decouple`):
  - `"position"` (default): the sequence is encoded once per target type with that type's
    positions (T types -> the encoder runs on [B*T, L, d]; fine for a handful of types), and the
    user vector of type k is the last position's hidden state;
  - `"query"`: one encoding with the shared positions, then one cross-attention layer (+ FFN) in
    which a learned per-type query token attends over the encoded sequence; its output is the
    user vector of that type;
  - `"none"`: plain SASRec, one user vector whatever the target type.
* [INFER] Type rows: target-type vocabulary ids are 0 = padding, 1 = unseen, 2.. = real types;
  real type k uses row k - 1, padding and unseen use row 0 (the generic row: the shared table
  under `"delta"`). With `schema.n_target_types == 0` (no types in the data) there is one row.
  `encode_user` returns the user vectors of all rows, [B, T, d] (T = max(n_target_types - 1, 1),
  1 for `"none"`), so it is cacheable per user and request; `score` picks each target's row.
* [INFER] Head: `"mlp"` (default) is DARE's BN-200-80 MLP on [u, v_t, u ⊙ v_t]; `"dot"` is
  <u, v_t> + b, the two-tower pre-ranking form. With `target_pos`, the target vector is
  v_t + P[k, 0] (the target's own position 0 of its type, as in Target-Decoupled PE);
  `type_in_head` adds a learned type embedding to the MLP input (a type-aware head, e.g. for
  `decouple="none"`).
* Padding never leaks: real positions attend only to real, earlier-or-same positions (causal +
  key-padding mask); every position may attend to itself, so padded positions (and empty
  histories) have a finite output without reading anything else. Padded slots carry their
  position vector only (their ids are ignored), so an empty history's user vector is a learned
  per-type "no history" vector.
* [INFER] Init: tables and head N(0, init_std) as DARE; the SASRec blocks too by default
  (`encoder_init`), which starts the encoder near the identity and was the only setting stable
  over seeds in the tests; the query layer keeps PyTorch's init. Like most transformers it wants
  a smaller learning rate than DARE's 0.01 (the tests use 0.003; at 0.01 `query` often stalls).

Cost: `"position"` runs the encoder T times (T = real types + the generic row), so training and
`encode_user` cost ~T x plain SASRec; `"query"` costs one encoding plus T query tokens, but its
last layer runs over all positions (the other modes run their last layer for the last position
only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register
from longrec.nn.attention import MultiHeadTargetAttention
from longrec.nn.embedding import FieldEmbedding, init_normal, zero_padding_rows
from longrec.nn.heads import MLPHead
from longrec.nn.readout import TargetReadout
from longrec.nn.temporal import relative_positions

DECOUPLE = ("position", "query", "none")
HEADS = ("mlp", "dot")
NORMS = ("pre", "post")
READOUTS = ("last", "tokens", "encoded")
TYPE_TABLES = ("delta", "separate")
TYPE_FIELD = "target_type"


@dataclass
class TdSasrecParams:
    embed_dim: int = 16  # per item-side field; the model width is d = embed_dim * n_fields
    fields: tuple[str, ...] | None = None  # None = item-side fields shared by history and target
    max_len: int | None = None  # encode the most recent max_len behaviours; None = schema.max_len
    n_layers: int = 2  # SASRec blocks
    n_heads: int = 2  # attention heads (d must be divisible by it)
    ffn_dim: int | None = None  # point-wise FFN width; None = d (SASRec's d -> d -> d)
    norm: str = "pre"  # pre (LayerNorm before each sub-layer + final LN) | post
    dropout: float = 0.0  # on inputs, attention weights and residual branches
    decouple: str = "position"  # position (P[k, pos], one encoding per type) | query | none
    type_tables: str = "delta"  # delta (P_shared + Δ_k; unseen -> shared) | separate
    head: str = "mlp"  # mlp ([u, v_t, u ⊙ v_t] -> BN-200-80) | dot (<u, v_t> + b, pre-ranking)
    target_pos: bool = True  # target vector v_t + P[k, 0] (its type's position 0)
    type_in_head: bool = False  # mlp head also sees a learned target-type embedding
    hidden: tuple[int, ...] = (200, 80)  # MLP head widths
    init_std: float = 0.01  # N(0, std) for tables and the head, as in DARE
    # SASRec blocks: normal = N(0, init_std) like the tables (sub-layers start near zero, so the
    # encoder starts near the identity: stable over seeds) | default = PyTorch's Linear init.
    # The query layer always keeps PyTorch's init (a near-zero query/key start leaves its
    # attention uniform and stuck).
    encoder_init: str = "normal"
    dedup: bool = False  # look each distinct id of a batch up once
    # last: the user vector alone (the paper) | tokens / encoded: the head also gets r, a DIN
    # attention of the target over the behaviour tokens (embeddings) / over every encoded
    # position, and r ⊙ v_t [INFER] (docs/models.md)
    readout: str = "last"
    readout_score: str = "din"  # din (DIN's MLP) | cosine (temperature 4 x cosine) [INFER]


class TypeTable(nn.Module):
    """Per-type rows P[k, r] (k = type row, r = position), looked up through nn.Embedding so that
    sparse embedding optimisers work. `delta`: P[k] = P_shared + Δ_k with Δ_0 = 0; `separate`:
    one independent table per type."""

    def __init__(self, n_types: int, rows: int, dim: int, mode: str, sparse: bool):
        super().__init__()
        if mode not in TYPE_TABLES:
            raise ValueError(f"type_tables must be one of {TYPE_TABLES}, got '{mode}'")
        self.n_types, self.rows, self.mode = n_types, rows, mode
        self.shared = self.delta = self.table = None
        if mode == "separate":
            self.table = nn.Embedding(n_types * rows, dim, sparse=sparse)
        else:
            self.shared = nn.Embedding(rows, dim, sparse=sparse)
            if n_types > 1:
                self.delta = nn.Embedding((n_types - 1) * rows, dim, sparse=sparse)

    def all_types(self, index: Tensor) -> Tensor:
        """index [N] -> [n_types, N, dim]."""
        types = torch.arange(self.n_types, device=index.device).unsqueeze(1)
        return self.lookup(types, index.unsqueeze(0))

    def lookup(self, type_rows: Tensor, index: Tensor) -> Tensor:
        """type_rows, index broadcastable int tensors -> [*shape, dim]."""
        type_rows, index = torch.broadcast_tensors(type_rows, index)
        if self.table is not None:
            return self.table(type_rows * self.rows + index)
        out = self.shared(index)
        if self.delta is None:
            return out
        delta = self.delta((type_rows - 1).clamp_min(0) * self.rows + index)
        return out + delta * (type_rows > 0).unsqueeze(-1).to(delta.dtype)


class SasrecBlock(nn.Module):
    """Causal multi-head self-attention + point-wise FFN, pre- or post-LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, norm: str):
        super().__init__()
        self.heads, self.dropout, self.pre = heads, dropout, norm == "pre"
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.ln_attn, self.ln_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _attend(self, x: Tensor, bias: Tensor, last_only: bool) -> Tensor:
        n, length, d = x.shape
        h, users = self.heads, bias.shape[0]  # n = users x groups (groups = types, innermost)
        q, k, v = self.qkv(x).view(n, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if last_only:
            q = q[:, :, -1:]
        # [users, groups * heads, L, dh]: one mask per user serves all its groups and heads
        q, k, v = (t.reshape(users, -1, t.shape[2], d // h) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )  # [users, groups * heads, Lq, dh]
        lq = out.shape[2]
        return self.out(out.reshape(n, h, lq, d // h).transpose(1, 2).reshape(n, lq, d))

    def forward(self, x: Tensor, bias: Tensor, last_only: bool = False) -> Tensor:
        """x [N, L, d] (N = users x groups), bias [users, 1, Lq, L] additive mask (0 = may
        attend, -inf = may not) -> [N, Lq, d]; Lq = 1 (the last position only) when
        `last_only`."""
        res = x[:, -1:] if last_only else x
        if self.pre:
            h = res + self.drop(self._attend(self.ln_attn(x), bias, last_only))
            return h + self.drop(self.ffn(self.ln_ffn(h)))
        h = self.ln_attn(res + self.drop(self._attend(x, bias, last_only)))
        return self.ln_ffn(h + self.drop(self.ffn(h)))


class QueryBlock(nn.Module):
    """One cross-attention layer: per-type query tokens attend over the encoded sequence
    (key-padding masked; an empty history gives zero attention output), then an FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, norm: str):
        super().__init__()
        self.pre = norm == "pre"
        self.attn = MultiHeadTargetAttention(dim, dim, dim, heads)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.ln_attn, self.ln_ffn, self.ln_out = nn.LayerNorm(dim), nn.LayerNorm(dim), None
        if self.pre:
            self.ln_out = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, queries: Tensor, seq: Tensor, mask: Tensor) -> Tensor:
        """queries [B, T, d], seq [B, L, d], mask [B, L] -> [B, T, d]."""
        if self.pre:
            h = queries + self.drop(self.attn(self.ln_attn(queries), seq, mask))
            return self.ln_out(h + self.drop(self.ffn(self.ln_ffn(h))))
        h = self.ln_attn(queries + self.drop(self.attn(queries, seq, mask)))
        return self.ln_ffn(h + self.drop(self.ffn(h)))


@register(
    "td_sasrec",
    "Target-Decoupled SASRec: causal self-attention, positions per target type (Tencent'25)",
)
class TdSasrecModel(SequenceModel):
    Params = TdSasrecParams

    def __init__(self, schema: DataSchema, params: TdSasrecParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        for value, allowed, what in (
            (p.decouple, DECOUPLE, "decouple"),
            (p.head, HEADS, "head"),
            (p.norm, NORMS, "norm"),
            (p.encoder_init, ("default", "normal"), "encoder_init"),
            (p.readout, READOUTS, "readout"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got '{value}'")
        if p.readout != "last" and (p.head != "mlp" or p.decouple == "position"):
            raise ValueError(
                f"readout='{p.readout}' needs head='mlp' and one encoding (decouple none or "
                "query); readout='last' scores the user vector alone"
            )
        if p.type_in_head and p.head != "mlp":
            raise ValueError("type_in_head needs head='mlp' (the dot head has no feature input)")
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        if not self.fields:
            raise ValueError("td_sasrec needs at least one item-side field in history and target")
        self.embed = FieldEmbedding(
            {f: (schema.vocab(f), p.embed_dim) for f in self.fields},
            sparse=sparse_embeddings,
            dedup=p.dedup,
            multi=schema.multi_fields() & set(self.fields),
        )
        d = self.embed.out_dim
        if d % p.n_heads:
            raise ValueError(f"model width {d} is not divisible by n_heads={p.n_heads}")
        self.dim = d
        cap = p.max_len or schema.max_len
        self.max_len = max(min(cap, schema.max_len) if schema.max_len else cap, 1)
        # type rows: 0 = padding / unseen / no types, k - 1 = real type k (vocabulary id k >= 2)
        self.n_types = max(schema.n_target_types - 1, 1)
        self.n_enc = 1 if p.decouple == "none" else self.n_types
        pos_types = self.n_enc if p.decouple == "position" else 1
        self.pos = TypeTable(pos_types, self.max_len + 1, d, p.type_tables, sparse_embeddings)
        self.queries = None
        if p.decouple == "query":
            self.queries = TypeTable(self.n_enc, 1, d, p.type_tables, sparse_embeddings)
        self.type_embed = None
        if p.type_in_head and self.n_types > 1:  # no types in the data: nothing to embed
            self.type_embed = nn.Embedding(self.n_types, d, sparse=sparse_embeddings)
        ffn = p.ffn_dim or d
        self.blocks = nn.ModuleList(
            SasrecBlock(d, p.n_heads, ffn, p.dropout, p.norm) for _ in range(p.n_layers)
        )
        self.final_ln = nn.LayerNorm(d) if p.norm == "pre" else None
        self.input_drop = nn.Dropout(p.dropout)
        self.query_block = (
            QueryBlock(d, p.n_heads, ffn, p.dropout, p.norm) if p.decouple == "query" else None
        )
        self.readout = TargetReadout(d, p.readout_score) if p.readout != "last" else None
        if p.head == "mlp":
            in_dim = 3 * d + (d if self.type_embed is not None else 0)
            in_dim += self.readout.width if self.readout is not None else 0
            self.head = MLPHead(in_dim, p.hidden)
            self.bias = None
        else:
            self.head = None
            self.bias = nn.Parameter(torch.zeros(()))
        for part in (self.embed, self.pos, self.queries, self.type_embed, self.head):
            if part is not None:
                init_normal(part, p.init_std)
        if p.encoder_init == "normal":
            init_normal(self.blocks, p.init_std)
        zero_padding_rows(self)

    # -- contract -------------------------------------------------------------------------
    def encode_user(self, batch: Batch) -> UserState:
        """Per-type user vectors [B, T, d]: nothing here reads the targets; with the target
        read-out also the encoded sequence [B, L, d] and its mask, which the targets attend."""
        if self.readout is None:
            return {"user": self.user_vectors(batch)}
        tokens = self._tokens(batch)  # looked up once: the encoder's input and the keys
        seq = self.hidden_states(batch, last_only=False, tokens=tokens)[:, 0]  # [B, L, d]
        keys = tokens[0] if self.params.readout == "tokens" else seq
        return {"user": self.user_vectors(batch, seq), "seq": keys, "seq_mask": tokens[1]}

    def score(self, state: UserState, batch: Batch) -> Tensor:
        rows = self.type_rows(batch)  # [B, M]
        users = state["user"]  # [B, T, d]
        enc_rows = rows if users.shape[1] > 1 else torch.zeros_like(rows)
        u = torch.gather(users, 1, enc_rows.unsqueeze(-1).expand(-1, -1, users.shape[-1]))
        v = self.embed(batch.target, self.fields)  # [B, M, d]
        if self.params.target_pos:
            pos_rows = enc_rows if self.params.decouple == "position" else torch.zeros_like(rows)
            v = v + self.pos.lookup(pos_rows, torch.zeros_like(pos_rows)).to(v.dtype)
        u = u.to(v.dtype)
        if self.head is None:  # dot: the two-tower pre-ranking score
            logits = (u * v).sum(-1) + self.bias
            return torch.where(batch.target_mask, logits, torch.zeros_like(logits))
        parts = [u, v, u * v]
        if self.type_embed is not None:
            parts.append(self.type_embed(rows))
        if self.readout is not None:
            parts.append(self.readout(v, state["seq"], state["seq_mask"]))
        return self.head(torch.cat(parts, dim=-1), batch.target_mask)

    # -- pieces ---------------------------------------------------------------------------
    def type_rows(self, batch: Batch) -> Tensor:
        """[B, M] row of each target's type (0 = padding / unseen / no types)."""
        types = batch.target.get(TYPE_FIELD)
        if types is None or self.n_types == 1:
            return torch.zeros(batch.target_mask.shape, dtype=torch.long, device=batch.user.device)
        return (types.long() - 1).clamp(0, self.n_types - 1)

    def _tokens(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The most recent max_len behaviours: (tokens [B, L, d], mask [B, L], positions [L])."""
        keep = min(batch.history_len, self.max_len)
        history = {f: batch.history[f][:, -keep:] for f in self.fields}
        mask = batch.history_mask[:, -keep:]
        # padded slots carry their position only, whatever ids they hold (an empty history's
        # user vector is then a learned per-type "no history" vector)
        x = self.embed(history, self.fields) * mask.unsqueeze(-1)
        positions = relative_positions(keep, x.device, self.max_len)
        return x, mask, positions

    @staticmethod
    def _attention_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, 1, L, L] additive mask: query i may attend key j iff j <= i and (j is real or
        j == i), so every row has at least its own position (no NaN) and real positions never
        read padding or later behaviours."""
        length = mask.shape[1]
        eye = torch.eye(length, dtype=torch.bool, device=mask.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        allowed = (causal & (mask.unsqueeze(1) | eye)).unsqueeze(1)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill_(~allowed, float("-inf"))

    def hidden_states(
        self, batch: Batch, last_only: bool = True, tokens: tuple | None = None
    ) -> Tensor:
        """Encoder output [B, T', L', d] (T' = position-decoupled types, else 1; L' = 1 with
        `last_only`, else every position). Position i never reads positions after i or padding.
        `tokens`: `_tokens(batch)` when the caller already has it."""
        x, mask, positions = tokens or self._tokens(batch)
        b, length, d = x.shape
        pos = self.pos.all_types(positions).to(x.dtype)  # [T', L, d]
        t = pos.shape[0]
        h = self.input_drop(x.unsqueeze(1) + pos.unsqueeze(0)).reshape(b * t, length, d)
        bias = self._attention_bias(mask, h.dtype)
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            h = block(h, bias[..., -1:, :] if last else bias, last_only=last)
        if last_only and not self.blocks:
            h = h[:, -1:]
        if self.final_ln is not None:
            h = self.final_ln(h)
        return h.view(b, t, h.shape[1], d)

    def user_vectors(self, batch: Batch, seq: Tensor | None = None) -> Tensor:
        """[B, T, d]; `seq`: the encoded sequence [B, L, d] when already computed."""
        if self.query_block is None:  # position / none: the last position's hidden state
            if seq is not None:
                return seq[:, -1:]
            return self.hidden_states(batch, last_only=True)[:, :, -1]
        if seq is None:
            seq = self.hidden_states(batch, last_only=False)[:, 0]  # [B, L, d]
        mask = batch.history_mask[:, -seq.shape[1] :]
        queries = self.queries.all_types(torch.zeros(1, dtype=torch.long, device=seq.device))
        queries = queries[:, 0].to(seq.dtype).unsqueeze(0).expand(seq.shape[0], -1, -1)
        return self.query_block(queries, seq, mask)
