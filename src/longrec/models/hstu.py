"""HSTU — Hierarchical Sequential Transduction Units (Meta, ICML 2024) as a CTR model
(docs/models.md, "HSTU").

Per layer (`HstuLayer`), with X the token sequence [T, d]:

    U, Q, V, K = Split(SiLU(f_1(LayerNorm(X))))                    (per head h: d_v, d_qk, d_v, d_qk)
    A_ij       = SiLU(<Q_i, K_j> + rab^{p,t}_{ij}) / n   if j <= i and j is real, else exactly 0
    Y          = f_2(Dropout(LayerNorm(A V) ⊙ U)) + X

Pointwise attention: no softmax and no 1/sqrt(d) scaling (as Meta's reference code,
facebookresearch/generative-recommenders, research/modeling/sequential/hstu.py); the weights are
divided by a length n instead of being normalised to sum 1, so the intensity of a preference
survives. With no softmax to send a -inf score to zero, padding and future keys are zeroed
explicitly (`pointwise_attention` selects 0 for them, whatever their scores); n is applied to
the [.., T, d_v] output rather than to the [.., T, T] weights (the same, one pass cheaper).

rab^{p,t} (`RelativeBias`): a learned scalar per (layer, head) for the bucket of the relative
position i - j plus one for the bucket of the time gap ts_i - ts_j (unix seconds), both log
buckets (`nn.temporal.log_buckets`; positions exact up to `exact_positions`, then log2, so the
table does not grow with the history length; Meta's code has one weight per exact distance up
to its max length). Bucket 0 is the token itself (distance 0), so a token's attention to itself
has its own learned bias. The time buckets are computed with one `torch.bucketize` against
boundaries derived from `log_buckets` by bisection (identical ids, tested), and a pair's two
buckets are folded into one id of a [pos x time] table of sums, so each layer's bias is a single
gather written in the scores' layout (the [B, L, L] pair work dominated the step time on CPU).

Use as a CTR model ([INFER]: the paper trains generatively on interleaved item/action tokens;
the ranking use here is the project's reconstruction):

* Tokens: each behaviour is the concatenation of its item-side field embeddings (`fields`,
  default item + category), d = embed_dim x n_fields (32 by default); the target is embedded with
  the same tables and appended as the last token, with its own timestamp (`target_ts`). There is
  no absolute position embedding: rab carries position and time. The most recent `max_len`
  behaviours are used.
* The target token attends causally to the whole history and to itself; history tokens never see
  it. Its last-layer output goes through a final LayerNorm and DARE's BN-200-80 MLP to the logit.
* M targets of one request: each target is its own last token against the shared history, and
  targets never see each other. That is the HSTU paper's M-FALCON candidate mask: because history
  tokens are causal and never see a target, their layer outputs are candidate-independent, so
  `encode_user` runs the history through the layers once and caches every layer's keys and
  values (the user KV cache, [B, layers, heads, L, d_h]); `score` computes only the target rows:
  per layer, each target projects its own U, Q, V, K, attends to the cached history K/V plus
  itself, and updates its own row. Cost per target O(layers x L x d) instead of a full
  O(layers x L^2 x d) pass per candidate; the history's last layer needs only its K/V
  projection, never its attention. `micro_batch` (eval only) scores the targets of a request in
  chunks of that size against the same cache, M-FALCON's micro-batching; training always scores
  all M at once (the MLP's BatchNorm sees all real targets).
* [INFER] n: `attn_norm="max_len"` (default) divides by the constant max_len + 1 (the longest
  sequence, history plus target: Meta's code divides by the padded maximum length); `"count"`
  divides by the number of keys each token attends to (its own causal length), a mean.
  Either way, extra left padding changes nothing.
* [INFER] rab: one table per (layer, head) (Meta's code shares a layer's bias over heads); the
  time gap of a pair is ts_query - ts_key (Meta's code uses the next token's timestamp for the
  query, a next-item artefact). `rab="position" | "time" | "none"` ablate it.
* [INFER] Init: field tables, rab tables and the head N(0, init_std) as DARE; HSTU layers keep
  PyTorch's Linear init (near-zero Q/K would leave SiLU(QK^T) at ~0 and the attention stuck),
  except that `attn_init="identity"` starts f_1's Q, K and V blocks at the identity, so the
  first scores are similarities of the tokens themselves.
* [INFER] `head_interest`: the head sees the target token x_t, what it gathered through the
  layers (h = its final state - x_t) and h ⊙ x_t beside its final state: the explicit target
  x interest product of DIN's head (without it the Taobao sample's test AUC was 0.65).
  f_1 has a bias and both LayerNorms are affine (Meta's: no bias, non-affine norms; a superset).

Not reproduced: stochastic-length sub-sampling of long histories at training, interleaved
action tokens, the generative (next-item) training loss, the fused kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.models.base import DataSchema, SequenceModel, UserState
from longrec.models.registry import register
from longrec.nn.embedding import FieldEmbedding, init_normal, zero_padding_rows
from longrec.nn.heads import MLPHead
from longrec.nn.readout import TargetReadout
from longrec.nn.temporal import log_buckets, relative_positions

RABS = ("both", "position", "time", "none")
ATTN_NORMS = ("max_len", "count")
ATTN_INITS = ("identity", "default")


@dataclass
class HstuParams:
    embed_dim: int = 16  # per item-side field; the model width is d = embed_dim * n_fields
    fields: tuple[str, ...] | None = None  # None = item-side fields shared by history and target
    max_len: int | None = None  # use the most recent max_len behaviours; None = schema.max_len
    n_layers: int = 2
    n_heads: int = 2
    qk_dim: int | None = None  # per head Q/K width; None = d // n_heads
    v_dim: int | None = None  # per head U/V width; None = d // n_heads
    rab: str = "both"  # relative bias: both (position + time) | position | time | none
    pos_buckets: int = 64  # relative-position buckets (0 = the token itself)
    exact_positions: int = 32  # distances up to this get their own bucket, then log2 buckets
    time_buckets: int = 64  # time-gap buckets of log_base(1 + seconds) (0 = the token itself)
    time_base: float = 2.0
    attn_norm: str = "max_len"  # max_len (divide by max_len + 1) | count (by the causal length)
    dropout: float = 0.0  # on the input tokens and before f_2
    hidden: tuple[int, ...] = (200, 80)  # MLP head widths
    type_dim: int = 8  # target-type embedding into the head when the data has types; 0 = off
    init_std: float = 0.01  # N(0, std) for field and rab tables and the head
    micro_batch: int = 0  # eval: score the targets in chunks of this size (0 = all at once)
    dedup: bool = False  # look each distinct id of a batch up once
    head_interest: bool = True  # head also sees x_t, its gathered h and h ⊙ x_t [INFER]
    # none | tokens: the head also gets r, an attention of the target over the behaviour
    # embeddings, and r ⊙ x_t (nn/readout.py) [INFER] (docs/models.md)
    readout: str = "tokens"
    readout_score: str = "both"  # din (DIN's MLP) | cosine (temperature 4 x cosine) | both
    attn_init: str = "identity"  # identity (f_1's Q, K, V blocks = I) | default [INFER]


def position_buckets(distance: Tensor, n_buckets: int, exact: int) -> Tensor:
    """Relative-position bucket ids: 0 for distance 0 (the token itself), then 1..exact one per
    distance, then log2 buckets (`log_buckets`); non-decreasing in the distance."""
    return torch.where(distance <= 0, 0, log_buckets(distance, n_buckets, exact))


def time_bucket_boundaries(n_buckets: int, base: float) -> Tensor:
    """[n_buckets - 2] int64: boundary k is the smallest number of seconds that
    `log_buckets(., n_buckets, base=base)` puts in bucket >= k + 2, found by bisection over the
    integers (exact, since log_buckets is non-decreasing), so that `gap_buckets` is one
    torch.bucketize pass instead of ~8 elementwise passes over every [B, L, L] pair."""
    want = torch.arange(2, n_buckets, dtype=torch.int64)
    lo = torch.zeros_like(want)
    hi = torch.full_like(want, 2**62)  # log_buckets(2**62) = n_buckets - 1 for any sane base
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        ok = log_buckets(mid, n_buckets, base=base) >= want
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid + 1)
    return lo


def gap_buckets(gap: Tensor, is_self: Tensor | bool, boundaries: Tensor) -> Tensor:
    """Time-gap bucket ids: 0 for the token itself, else `log_buckets` of the gap in seconds
    (1..n_buckets-1; negative gaps, only on masked pairs, count as 0 s), via the boundaries of
    `time_bucket_boundaries`; non-decreasing in the gap."""
    ids = torch.bucketize(gap.long(), boundaries.to(gap.device), right=True) + 1
    if isinstance(is_self, Tensor):
        return ids.masked_fill_(is_self, 0)
    return torch.zeros_like(ids) if is_self else ids


def pointwise_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, allowed: Tensor, norm: Tensor | float
) -> Tensor:
    """(SiLU(q k^T + bias), exactly 0 where not `allowed`) v / norm: no softmax.

    q [B, h, Tq, dq], k [B, h, Tk, dq], v [B, h, Tk, dv]; bias broadcastable to [B, h, Tq, Tk];
    allowed bool broadcastable to it; norm a float or per query row ([B, 1, Tq, 1]), applied to
    the [B, h, Tq, dv] output rather than to the weights (the same, and cheaper) -> [B, h, Tq, dv].
    """
    *lead, tq, dq = q.shape
    tk = k.shape[-2]
    if bias is not None and tuple(bias.shape) == (*lead, tq, tk):  # fuse the add into the GEMM
        scores = torch.baddbmm(
            bias.reshape(-1, tq, tk), q.reshape(-1, tq, dq), k.reshape(-1, tk, dq).transpose(1, 2)
        ).view(*lead, tq, tk)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2))
        if bias is not None:
            scores = scores + bias
    weights = torch.where(allowed, F.silu(scores), 0.0)
    return torch.matmul(weights, v) / norm


class RelativeBias(nn.Module):
    """rab^{p,t}: a learned scalar per (layer, head) for each relative-position bucket plus one
    for each time-gap bucket. A pair's two buckets are folded into one combined id
    (pos * time_buckets + time) indexing the [layers, heads, pos x time] table of sums, so each
    layer's bias is one gather, written straight in the [B, h, Tq, Tk] layout of the scores."""

    def __init__(self, kind: str, layers: int, heads: int, p: HstuParams, sparse: bool):
        super().__init__()
        self.layers, self.heads = layers, heads
        self.pos_buckets, self.exact, self.time_buckets = (
            p.pos_buckets,
            p.exact_positions,
            p.time_buckets,
        )
        width = layers * heads
        self.pos = self.time = None
        if kind in ("both", "position"):
            self.pos = nn.Embedding(p.pos_buckets, width, sparse=sparse)
        if kind in ("both", "time"):
            self.time = nn.Embedding(p.time_buckets, width, sparse=sparse)
        self.register_buffer(
            "boundaries", time_bucket_boundaries(p.time_buckets, p.time_base), persistent=False
        )

    @torch.no_grad()
    def bucket_ids(self, distance: Tensor, gap: Tensor, is_self: Tensor | bool) -> Tensor:
        """distance (query - key position), gap (query - key seconds), is_self: broadcastable
        [..., Tq, Tk] -> combined bucket ids (broadcast shape; [Tq, Tk] if position only)."""
        ids = None
        if self.pos is not None:
            ids = position_buckets(distance, self.pos_buckets, self.exact)
        if self.time is not None:
            t = gap_buckets(gap, is_self, self.boundaries)
            ids = t if ids is None else ids * self.time_buckets + t
        return ids

    def tables(self) -> Tensor:
        """[layers, heads, n_ids]: the bias of every combined bucket id."""
        out = None
        for table in (self.pos, self.time):
            if table is None:
                continue
            rows = table(torch.arange(table.num_embeddings, device=table.weight.device)).T
            out = rows if out is None else (out[:, :, None] + rows[:, None, :]).flatten(1)
        return out.view(self.layers, self.heads, -1)


def gather_bias(table: Tensor, ids: Tensor) -> Tensor:
    """One layer's bias: table [h, n]; ids [Tq, Tk] -> [h, Tq, Tk], ids [B, Tq, Tk] ->
    [B, h, Tq, Tk] (contiguous; the backward scatters into a [B, h, n] buffer)."""
    h = table.shape[0]
    if ids.dim() == 2:
        return table.index_select(1, ids.reshape(-1)).view(h, *ids.shape)
    b = ids.shape[0]
    flat = ids.reshape(b, 1, -1).expand(-1, h, -1)
    return torch.gather(table.unsqueeze(0).expand(b, -1, -1), 2, flat).view(b, h, *ids.shape[1:])


class HstuLayer(nn.Module):
    """One HSTU layer's projections; the attention between them is the caller's (the history
    attends causally to itself in `encode_user`, targets to the cache in `score`)."""

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, dropout: float):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim = heads, qk_dim, v_dim
        self.ln_in = nn.LayerNorm(dim)
        self.f1 = nn.Linear(dim, heads * (2 * v_dim + 2 * qk_dim))  # -> U, Q, V, K
        self.ln_attn = nn.LayerNorm(heads * v_dim)
        self.f2 = nn.Linear(heads * v_dim, dim)
        self.drop = nn.Dropout(dropout)

    @torch.no_grad()
    def identity_init(self) -> None:
        """Q, K and V start as SiLU(LayerNorm(x)) (their blocks of f_1 the identity, per head a
        slice of x), so the first scores are similarities of the tokens themselves; U and f_2
        keep PyTorch's init. Needs per-head widths that tile d (the defaults do)."""
        h, dq, dv = self.heads, self.qk_dim, self.v_dim
        d = self.f1.weight.shape[1]
        if h * dq != d or h * dv != d:
            return  # widths that do not tile d: keep the default init
        eye = torch.eye(d)
        w = self.f1.weight  # rows: U (h dv), Q (h dq), V (h dv), K (h dq)
        w[h * dv : h * (dv + dq)] = eye
        w[h * (dv + dq) : h * (2 * dv + dq)] = eye
        w[h * (2 * dv + dq) :] = eye
        self.f1.bias[h * dv :] = 0.0

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # [B, T, h*w] -> [B, h, T, w]

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, d] -> U, Q, V, K, each [B, h, T, d_h]."""
        h = self.heads
        uqvk = F.silu(self.f1(self.ln_in(x)))
        sizes = [h * self.v_dim, h * self.qk_dim, h * self.v_dim, h * self.qk_dim]
        return tuple(self._heads(t) for t in uqvk.split(sizes, dim=-1))

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """V, K only (the rows of f_1 that give them): what the cache needs of the last layer."""
        start = self.heads * (self.v_dim + self.qk_dim)
        vk = F.silu(F.linear(self.ln_in(x), self.f1.weight[start:], self.f1.bias[start:]))
        v, k = vk.split([self.heads * self.v_dim, self.heads * self.qk_dim], dim=-1)
        return self._heads(v), self._heads(k)

    def output(self, x: Tensor, u: Tensor, av: Tensor) -> Tensor:
        """Y = f_2(Dropout(LayerNorm(A V) ⊙ U)) + X; u, av [B, h, T, d_v], x [B, T, d]."""
        u, av = (t.transpose(-3, -2).flatten(-2) for t in (u, av))
        return x + self.f2(self.drop(self.ln_attn(av) * u))


@register(
    "hstu",
    "HSTU: pointwise SiLU attention with relative position/time bias, target as last token (ICML'24)",
)
class HstuModel(SequenceModel):
    Params = HstuParams

    def __init__(self, schema: DataSchema, params: HstuParams, sparse_embeddings: bool = False):
        super().__init__(schema, params)
        p = params
        for value, allowed, what in (
            (p.rab, RABS, "rab"),
            (p.attn_norm, ATTN_NORMS, "attn_norm"),
            (p.attn_init, ATTN_INITS, "attn_init"),
            (p.readout, ("none", "tokens"), "readout"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got '{value}'")
        if p.n_layers < 1 or p.n_heads < 1:
            raise ValueError("hstu needs n_layers >= 1 and n_heads >= 1")
        if p.time_base <= 1 or min(p.pos_buckets, p.time_buckets) < 2:
            raise ValueError("hstu needs time_base > 1 and at least 2 position and time buckets")
        self.fields = list(p.fields) if p.fields else schema.shared_item_fields()
        if not self.fields:
            raise ValueError("hstu needs at least one item-side field in history and target")
        self.embed = FieldEmbedding(
            {f: (schema.vocab(f), p.embed_dim) for f in self.fields},
            sparse=sparse_embeddings,
            dedup=p.dedup,
            multi=schema.multi_fields() & set(self.fields),
        )
        d = self.dim = self.embed.out_dim
        if (p.qk_dim is None or p.v_dim is None) and d % p.n_heads:
            raise ValueError(f"model width {d} is not divisible by n_heads={p.n_heads}")
        qk_dim, v_dim = p.qk_dim or d // p.n_heads, p.v_dim or d // p.n_heads
        cap = p.max_len or schema.max_len
        self.max_len = max(min(cap, schema.max_len) if schema.max_len else cap, 1)
        self.input_drop = nn.Dropout(p.dropout)
        self.layers = nn.ModuleList(
            HstuLayer(d, p.n_heads, qk_dim, v_dim, p.dropout) for _ in range(p.n_layers)
        )
        self.rab = None
        if p.rab != "none":
            self.rab = RelativeBias(p.rab, p.n_layers, p.n_heads, p, sparse_embeddings)
        self.final_ln = nn.LayerNorm(d)
        self.readout = TargetReadout(d, p.readout_score) if p.readout == "tokens" else None
        head_in = d * (4 if p.head_interest else 1) + (self.readout.width if self.readout else 0)
        self.head = MLPHead(head_in, p.hidden, **schema.head_types(p.type_dim))
        for part in (self.embed, self.rab, self.head):
            if part is not None:
                init_normal(part, p.init_std)
        if p.attn_init == "identity":
            for layer in self.layers:
                layer.identity_init()
        zero_padding_rows(self)

    # -- contract -------------------------------------------------------------------------
    def encode_user(self, batch: Batch) -> UserState:
        """The user KV cache: every layer's history keys and values [B, layers, h, L, d_h]
        (history tokens are causal and never see a target), the mask and the timestamps."""
        x, mask, ts = self._history(batch)
        tokens = x
        length = x.shape[1]
        ids = tables = None
        if self.rab is not None:
            pos = torch.arange(length, device=x.device)
            distance = pos.view(-1, 1) - pos.view(1, -1)  # [L, L] query - key
            gap = ts.unsqueeze(-1) - ts.unsqueeze(-2)  # [B, L, L]
            ids = self.rab.bucket_ids(distance, gap, distance == 0)
            tables = self.rab.tables().to(x.dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = (causal & mask.unsqueeze(1)).unsqueeze(1)  # [B, 1, L, L]
        norm = self._norm(mask.cumsum(1)[:, None, :, None], x.dtype)  # [B, 1, L, 1]
        keys, values = [], []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i == last:  # its history outputs are never read: only K, V for the targets
                v, k = layer.project_kv(x)
            else:
                u, q, v, k = layer.project(x)
                bias = None if ids is None else gather_bias(tables[i], ids)
                av = pointwise_attention(q, k, v, bias, allowed, norm)
                x = layer.output(x, u, av)
            keys.append(k)
            values.append(v)
        state = {"k": torch.stack(keys, 1), "v": torch.stack(values, 1), "mask": mask, "ts": ts}
        if self.readout is not None:
            state["tokens"] = tokens
        return state

    def score(self, state: UserState, batch: Batch) -> Tensor:
        chunk = self.params.micro_batch
        m = batch.num_targets
        if self.training or chunk <= 0 or m <= chunk:
            return self._score(state, batch)
        parts = [self._score(state, _targets(batch, s, s + chunk)) for s in range(0, m, chunk)]
        return torch.cat(parts, dim=1)

    # -- pieces ---------------------------------------------------------------------------
    def _history(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The most recent max_len behaviours: tokens [B, L, d] (0 on padding), mask, ts."""
        keep = min(batch.history_len, self.max_len)
        start = batch.history_len - keep
        mask = batch.history_mask[:, start:]
        x = self.embed({f: batch.history[f][:, start:] for f in self.fields}, self.fields)
        x = self.input_drop(x * mask.unsqueeze(-1).to(x.dtype))
        return x, mask, batch.history_ts[:, start:]

    def _norm(self, count: Tensor, dtype: torch.dtype) -> Tensor | float:
        """n of A = SiLU(...) / n: max_len + 1, or the number of keys a token attends to."""
        if self.params.attn_norm == "max_len":
            return float(self.max_len + 1)
        return count.clamp_min(1).to(dtype)

    def _score(self, state: UserState, batch: Batch) -> Tensor:
        k_hist, v_hist, mask, ts = state["k"], state["v"], state["mask"], state["ts"]
        x = x_t = self.input_drop(self.embed(batch.target, self.fields))  # [B, M, d]
        length = mask.shape[1]
        ids = tables = None
        if self.rab is not None:
            distance = relative_positions(length, x.device).view(1, -1)  # the target is slot L
            gap = batch.target_ts.unsqueeze(-1) - ts.unsqueeze(1)  # [B, M, L]
            ids = self.rab.bucket_ids(distance, gap, False)  # [B, M, L] ([1, L] position only)
            zero = torch.zeros(1, 1, dtype=torch.long, device=x.device)
            own_id = self.rab.bucket_ids(zero, zero, True)  # distance 0, the token itself
            tables = self.rab.tables().to(x.dtype)
        allowed = mask[:, None, None, :]  # [B, 1, 1, L]
        norm = self._norm((mask.sum(1) + 1).view(-1, 1, 1, 1), x.dtype)  # history + itself
        for i, layer in enumerate(self.layers):
            u, q, v, k = layer.project(x)  # [B, h, M, d_h]
            bias = bias_own = None
            if ids is not None:
                bias = gather_bias(tables[i], ids)  # [B, h, M, L] ([h, 1, L] position only)
                bias_own = gather_bias(tables[i], own_id)  # [h, 1, 1]
            av = pointwise_attention(q, k_hist[:, i], v_hist[:, i], bias, allowed, norm)
            own = (q * k).sum(-1, keepdim=True)  # each target attends to itself
            if bias_own is not None:
                own = own + bias_own
            x = layer.output(x, u, av + F.silu(own) / norm * v)
        out = self.final_ln(x)
        if self.params.head_interest:  # what the target gathered: the sum of its layer updates
            gathered = x - x_t
            out = torch.cat((out, x_t, gathered, gathered * x_t), dim=-1)
        if self.readout is not None:
            out = torch.cat((out, self.readout(x_t, state["tokens"], mask)), dim=-1)
        return self.head(out, batch.target_mask, batch.target_type)


def _targets(batch: Batch, start: int, stop: int) -> Batch:
    """The batch with targets [start, stop) only (same histories)."""

    def cut(t):
        return None if t is None else t[:, start:stop]

    return replace(
        batch,
        target={k: cut(v) for k, v in batch.target.items()},
        target_ts=cut(batch.target_ts),
        label=cut(batch.label),
        target_mask=cut(batch.target_mask),
        sample_index=cut(batch.sample_index),
    )
