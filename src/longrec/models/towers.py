"""Embedding towers of the two-stage family: which tables (and projections) give the attention
and representation vectors of behaviours and targets. This is where DARE, TWIN, TWIN-4E and
TWIN w/ proj. differ (docs/models.md, "DARE and the TWIN family"): decoupled
attention/representation sets, one shared set, four sets, or one set with learned projections
per role.

Speed (issue: 37,000 samples/s at B=2048, L=200 on 2 cores): a history is never embedded as
one concatenated [B, L, D] tensor. Each field's ids are de-duplicated once per batch
(`dedup`), each table looks up only the distinct rows [U, d], and the model gathers per field:
scores are sums of per-field dot products, the top-k pooling gathers only K rows, and the
full-sequence pooling multiplies the softmax weights into the gathered rows. Gathers accumulate
their gradient with a linear index_add (nn.embedding.gather_rows). The backward pass therefore
touches U rows per table, never the whole vocabulary (with sparse gradients, a 4M-row table
costs what a 50K-row one does).

Four roles: attention-history (keys), attention-target (query), representation-history
(values), representation-target. Scores are split-scaled as in DARE's code:
s_i = <e_sem, v_sem>/sqrt(d_sem) + <p_i, p_0>/sqrt(d_pos).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longrec.data.batch import Batch
from longrec.nn import row_kernels
from longrec.nn.embedding import RowTable, gather_rows, rows_and_picks, table_rows
from longrec.nn.temporal import relative_positions
from longrec.ops import dispatch

ROLES = ("attn_hist", "attn_tgt", "repr_hist", "repr_tgt")
COUPLINGS = ("decoupled", "shared", "four", "projection")


def dedup(ids: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """(distinct ids [U] in increasing order, inverse with the shape of ids) in O(N + vocab)
    without sorting N ids (torch.unique sorts): a bitmap over the id range, in C++
    (row_kernels.dedup_ids) or in PyTorch. Increasing order keeps the passes over a table's
    rows in address order. The padding id 0 always comes first, present or not: a sparse
    table gradient drops it by slicing (nn.embedding._LookupDistinctRowsSparse)."""
    if dispatch.use_native("dedup_ids", index=(ids,)):
        return row_kernels.dedup_ids(ids, vocab, include=0)
    flat = ids.reshape(-1).long()
    seen = torch.zeros(vocab, dtype=torch.bool, device=ids.device)
    seen[0] = True
    seen[flat] = True
    uniq = seen.nonzero().squeeze(1)
    slot = torch.empty(vocab, dtype=torch.int64, device=ids.device)
    slot[uniq] = torch.arange(len(uniq), device=ids.device)
    return uniq, slot[flat].view(ids.shape)


@dataclass
class HistoryField:
    """One field of a history as distinct rows plus an inverse index (never [B, L, d] unless
    asked). `inverse` is [B, L] or [B, L, W] for multi-valued fields (0-id entries are padding)."""

    rows: Tensor  # [U, d]
    inverse: Tensor
    value_mask: Tensor | None = None  # [B, L, W] for multi-valued fields
    gathered: Tensor | None = None  # [B, L, d] when already gathered (Towers.keys_and_values)
    fused: bool = False  # read rows straight from `rows` with nn.row_kernels where possible
    # the targets' rows, taken from `rows` (training only; nn.embedding.rows_and_picks)
    target_rows: Tensor | None = None
    # (table, the batch's ids [B, L]) where `rows` is only a stand-in for the distinct rows
    # (nn.embedding.table_rows): the fused search reads the table at the ids itself, and
    # nothing else may read `rows`
    table: tuple[Tensor, Tensor] | None = None

    def _readable(self) -> None:
        if self.table is not None:
            raise RuntimeError("a history field read from its table serves the fused search only")

    def uses_kernels(self, x: Tensor) -> bool:
        """Whether dot / weighted_sum run the row kernels for this per-target tensor."""
        self._readable()
        return (
            self.fused
            and self.value_mask is None
            and self.gathered is None
            and self.inverse.dtype == torch.int64  # the row kernels index with int64 only
            and dispatch.use_native("gather_dot / gather_pool", self.rows, x)
        )

    def _pool_values(self, x: Tensor, vmask: Tensor | None) -> Tensor:
        if vmask is None:
            return x
        w = vmask.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(-2) / w.sum(-2).clamp_min(1.0)

    def dense(self) -> Tensor:
        """[B, L, d] (gathered once and kept)."""
        self._readable()
        if self.gathered is None:
            self.gathered = self._pool_values(gather_rows(self.rows, self.inverse), self.value_mask)
        return self.gathered

    def at(self, idx: Tensor) -> Tensor:
        """Rows of the behaviours at idx [B, M, K] -> [B, M, K, d]."""
        self._readable()
        b, m, k = idx.shape
        inv = self.inverse
        flat_idx = (idx + torch.arange(b, device=idx.device).view(b, 1, 1) * inv.shape[1]).reshape(
            -1
        )
        if self.value_mask is None:
            picked = inv.reshape(-1)[flat_idx].view(b, m, k)
            return gather_rows(self.rows, picked)
        w = inv.shape[-1]
        picked = inv.reshape(-1, w)[flat_idx].view(b, m, k, w)
        vmask = self.value_mask.reshape(-1, w)[flat_idx].view(b, m, k, w)
        return self._pool_values(gather_rows(self.rows, picked), vmask)

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """sum_l weights[b, m, l] * e[b, l] -> [B, M, d]."""
        if self.uses_kernels(weights):
            return row_kernels.gather_pool(self.rows, self.inverse, weights)
        return torch.matmul(weights, self.dense().to(weights.dtype))

    def dot(self, query: Tensor) -> Tensor:
        """<query[b, m], e[b, l]> -> [B, M, L]."""
        if self.uses_kernels(query):
            return row_kernels.gather_dot(self.rows, self.inverse, query)
        return torch.matmul(query, self.dense().transpose(-1, -2))


@dataclass
class HistoryEmbedding:
    fields: list[HistoryField]
    pos: Tensor | None  # [L, d_pos]

    @property
    def sem_dim(self) -> int:
        return sum(f.rows.shape[-1] for f in self.fields)

    def dense(self) -> Tensor:
        parts = [f.dense() for f in self.fields]
        if self.pos is not None:
            b, length = parts[0].shape[:2]
            parts.append(self.pos.expand(b, length, -1))
        return torch.cat(parts, dim=-1)

    def pool_at(self, idx: Tensor, weights: Tensor) -> Tensor:
        """sum_k weights * e[idx] over the retrieved behaviours -> [B, M, D]."""
        w = weights.unsqueeze(-1)
        parts = [(w * f.at(idx).to(w.dtype)).sum(2) for f in self.fields]
        if self.pos is not None:
            parts.append((w * self.pos[idx].to(w.dtype)).sum(2))
        return torch.cat(parts, dim=-1)

    def pool_all(self, weights: Tensor) -> Tensor:
        """sum_l weights * e_l over the whole history -> [B, M, D]."""
        parts = [f.weighted_sum(weights) for f in self.fields]
        if self.pos is not None:
            parts.append(torch.matmul(weights, self.pos.to(weights.dtype)))
        return torch.cat(parts, dim=-1)


@dataclass
class TargetEmbedding:
    fields: list[Tensor]  # each [B, M, d_f]
    pos: Tensor | None  # [d_pos] (target position 0)

    def joined(self) -> Tensor:
        parts = list(self.fields)
        if self.pos is not None:
            parts.append(self.pos.expand(*parts[0].shape[:-1], -1))
        return torch.cat(parts, dim=-1)


def scores(keys: HistoryEmbedding, query: TargetEmbedding) -> Tensor:
    """DARE's split-scaled attention score [B, M, L] as a sum of per-field dot products."""
    total = None
    for k, q in zip(keys.fields, query.fields, strict=True):
        part = k.dot(q)
        total = part if total is None else total + part
    total = total / keys.sem_dim**0.5
    if keys.pos is None or query.pos is None:
        return total
    bias = (keys.pos @ query.pos) / keys.pos.shape[-1] ** 0.5  # [L]: a learned recency prior
    return total + bias.to(total.dtype)


class EmbeddingSet(nn.Module):
    """One table per field plus a target-relative position table."""

    def __init__(
        self,
        schema,
        fields: list[str],
        dim: int,
        pos_dim: int,
        max_positions: int,
        sparse: bool,
        fused: bool = False,
    ):
        super().__init__()
        self.fields = fields
        self.fused = fused
        self.multi = schema.multi_fields() & set(fields)
        self.tables = nn.ModuleDict(
            {
                f: RowTable(max(schema.vocab(f), 2), dim, padding_idx=0, sparse=sparse)
                for f in fields
            }
        )
        self.max_positions = max_positions
        self.pos = RowTable(max_positions + 1, pos_dim, sparse=sparse) if pos_dim > 0 else None
        self.sem_dim, self.pos_dim = dim * len(fields), pos_dim

    def positions(self, length: int, device) -> Tensor | None:
        if self.pos is None:
            return None
        return self.pos(relative_positions(length, device, self.max_positions))

    def history(
        self, batch: Batch, distinct: dict[str, tuple[Tensor, ...]], direct: bool = False
    ) -> HistoryEmbedding:
        """`distinct[f]`: (distinct ids, history index) or, from Towers.distinct_ids, also
        the targets' index. `direct` (training with the fused search, targets' index given,
        no multi-valued field): the fields are read by the search from the tables themselves
        (`HistoryField.table`) instead of from a copy of their distinct rows, which at DARE's
        Taobao configuration with 6.2M items cost a tenth of a step (BENCHMARKS.md)."""
        fields = []
        for f in self.fields:
            uniq, inverse, *target_inverse = distinct[f]
            target_inverse = target_inverse[0] if target_inverse else None
            table = self.tables[f]
            if direct and target_inverse is not None:
                read = table_rows(table, uniq, batch.target[f], target_inverse)
                if read is not None:
                    rows, picks = read
                    fields.append(
                        HistoryField(
                            rows,
                            inverse,
                            fused=True,
                            target_rows=picks,
                            table=(table.weight, batch.history[f]),
                        )
                    )
                    continue
            vmask = (batch.history[f] != 0) if f in self.multi else None
            rows = table(uniq, distinct=True)
            picks = None
            if target_inverse is not None:  # the targets' rows, gradient added in place
                rows, picks = rows_and_picks(rows, target_inverse)
            fields.append(
                HistoryField(
                    rows,
                    inverse,
                    vmask,
                    fused=self.fused,
                    target_rows=picks,
                )
            )
        return HistoryEmbedding(
            fields, self.positions(batch.history_len, batch.history_mask.device)
        )

    def target(self, batch: Batch, history: HistoryEmbedding | None = None) -> TargetEmbedding:
        """Target embeddings; with `history` (looked up at the distinct ids of history and
        targets, `Towers.distinct_ids(with_targets=True)`) they are gathered from its rows, so
        each table is looked up, and its gradient accumulated, once per step."""
        fields = []
        for i, f in enumerate(self.fields):
            ids = batch.target[f]
            if history is not None:
                hf = history.fields[i]
                e = hf.target_rows
            else:
                e = self.tables[f](ids)
            if f in self.multi:
                w = (ids != 0).unsqueeze(-1).to(e.dtype)
                e = (e * w).sum(-2) / w.sum(-2).clamp_min(1.0)
            fields.append(e)
        return TargetEmbedding(
            fields, self.pos(torch.zeros((), dtype=torch.long)) if self.pos is not None else None
        )


class RoleProjection(nn.Module):
    """TWIN w/ proj.: per-field bias-free d_f x d_f maps (the released script's path), applied to
    the distinct rows; or one D x D map with bias over the concatenation (the README's
    description), which needs the history materialised as [B, L, D]."""

    def __init__(self, n_fields: int, dim: int, pos_dim: int, mode: str):
        super().__init__()
        if mode not in ("per_field", "concat"):
            raise ValueError(f"projection must be per_field or concat, got '{mode}'")
        self.mode = mode
        if mode == "per_field":
            self.maps = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(n_fields))
            self.pos_map = nn.Linear(pos_dim, pos_dim, bias=False) if pos_dim else None
        else:
            total = dim * n_fields + pos_dim
            self.full = nn.Linear(total, total)

    def history(self, h: HistoryEmbedding) -> HistoryEmbedding:
        if self.mode == "per_field":
            fields = [
                HistoryField(m(f.rows), f.inverse, f.value_mask, fused=f.fused)
                for m, f in zip(self.maps, h.fields, strict=True)
            ]
            pos = self.pos_map(h.pos) if self.pos_map is not None and h.pos is not None else h.pos
            return HistoryEmbedding(fields, pos)
        dense = self.full(h.dense())  # [B, L, D]
        b, length, d = dense.shape
        inverse = torch.arange(b * length, device=dense.device).view(b, length)
        return HistoryEmbedding([HistoryField(dense.reshape(b * length, d), inverse)], None)

    def target(self, t: TargetEmbedding) -> TargetEmbedding:
        if self.mode == "per_field":
            fields = [m(e) for m, e in zip(self.maps, t.fields, strict=True)]
            pos = self.pos_map(t.pos) if self.pos_map is not None and t.pos is not None else t.pos
            return TargetEmbedding(fields, pos)
        return TargetEmbedding([self.full(t.joined())], None)


class Towers(nn.Module):
    def __init__(
        self,
        schema,
        fields: list[str],
        *,
        embed_dim: int,
        pos_dim: int,
        attn_dim: int,
        attn_pos_dim: int,
        coupling: str,
        projection: str = "per_field",
        max_positions: int,
        sparse: bool = False,
        fused: bool = False,
    ):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got '{coupling}'")
        self.fields = fields
        self.vocab = {f: max(schema.vocab(f), 2) for f in fields}

        def make(d: int, p: int) -> EmbeddingSet:
            return EmbeddingSet(schema, fields, d, p, max_positions, sparse, fused)

        if coupling == "decoupled":
            self.sets = nn.ModuleDict(
                {"attn": make(attn_dim, attn_pos_dim), "repr": make(embed_dim, pos_dim)}
            )
            self.role_set = {
                "attn_hist": "attn",
                "attn_tgt": "attn",
                "repr_hist": "repr",
                "repr_tgt": "repr",
            }
        elif coupling == "four":
            self.sets = nn.ModuleDict(
                {
                    r: make(attn_dim, attn_pos_dim)
                    if r.startswith("attn")
                    else make(embed_dim, pos_dim)
                    for r in ROLES
                }
            )
            self.role_set = {r: r for r in ROLES}
        else:  # one shared set (TWIN), optionally projected per role
            self.sets = nn.ModuleDict({"shared": make(embed_dim, pos_dim)})
            self.role_set = dict.fromkeys(ROLES, "shared")
        self.projections = None
        if coupling == "projection":
            self.projections = nn.ModuleDict(
                {r: RoleProjection(len(fields), embed_dim, pos_dim, projection) for r in ROLES}
            )
        self._repr_dim = embed_dim * len(fields) + pos_dim

    def distinct_ids(
        self, batch: Batch, with_targets: bool = False
    ) -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
        """Per field: (distinct ids, the history's index into them, the targets' index or
        None). With targets, `target(role, batch, cache)` reuses the history's rows."""
        out = {}
        for f in self.fields:
            hist = batch.history[f]
            if not with_targets:
                out[f] = (*dedup(hist, self.vocab[f]), None)
                continue
            tgt = batch.target[f]
            if dispatch.use_native("dedup_parts", index=(hist, tgt)):  # no concatenation
                uniq, (h_inv, t_inv) = row_kernels.dedup_parts([hist, tgt], self.vocab[f], 0)
                out[f] = (uniq, h_inv, t_inv)
                continue
            uniq, inverse = dedup(torch.cat((hist.reshape(-1), tgt.reshape(-1))), self.vocab[f])
            n = hist.numel()
            out[f] = (uniq, inverse[:n].view(hist.shape), inverse[n:].view(tgt.shape))
        return out

    def history(
        self, role: str, batch: Batch, distinct, cache: dict, direct: bool = False
    ) -> HistoryEmbedding:
        """`direct`: see EmbeddingSet.history; only where the fused search takes every field
        (no projections, which need the rows; no multi-valued fields)."""
        key = self.role_set[role]
        if key not in cache:  # one lookup per table even when roles share it
            direct = direct and self.projections is None and not self.sets[key].multi
            cache[key] = self.sets[key].history(batch, distinct, direct)
        out = cache[key]
        return self.projections[role].history(out) if self.projections is not None else out

    def table_history(
        self, role: str, batch: Batch, ids: dict[str, Tensor]
    ) -> HistoryEmbedding | None:
        """The history as the tables themselves at the raw ids (`ids`: int64 [B, L] per
        field), for inference: no de-duplication and no row lookups (a third of an inference
        batch at DARE's Taobao configuration). None where that does not apply (projections,
        multi-valued fields, tables that are not plain RowTables, e.g. sharded ones)."""
        emb = self.sets[self.role_set[role]]
        if self.projections is not None or emb.multi:
            return None
        if not all(isinstance(emb.tables[f], RowTable) for f in self.fields):
            return None
        fields = [HistoryField(emb.tables[f].weight, ids[f], fused=emb.fused) for f in self.fields]
        return HistoryEmbedding(fields, emb.positions(batch.history_len, batch.history_mask.device))

    def keys_and_values(
        self, batch: Batch, distinct, cache: dict | None = None, direct: bool = False
    ) -> tuple[HistoryEmbedding, HistoryEmbedding]:
        """Attention (keys) and representation (values) embeddings of the history.

        With separate tables (DARE, TWIN-4E) and without the fused kernels, each single-valued
        field's two row blocks are gathered together as one [B, L, d_A + d_R] tensor, so the
        backward pass accumulates both tables' gradients in one index_add instead of two.
        The fused kernels never gather the whole history, so they skip this.
        """
        cache = {} if cache is None else cache
        keys = self.history("attn_hist", batch, distinct, cache, direct)
        values = self.history("repr_hist", batch, distinct, cache, direct)
        if keys is values or self.projections is not None:
            return keys, values
        for k, v in zip(keys.fields, values.fields, strict=True):
            if k.table is not None or k.value_mask is not None or k.uses_kernels(k.rows):
                continue
            both = gather_rows(torch.cat((k.rows, v.rows), dim=1), k.inverse)
            # split (not two slices): its backward concatenates both gradients in one pass
            k.gathered, v.gathered = torch.split(both, [k.rows.shape[1], v.rows.shape[1]], dim=-1)
        return keys, values

    def target(self, role: str, batch: Batch, cache: dict | None = None) -> TargetEmbedding:
        """With the `cache` of `keys_and_values` over `distinct_ids(with_targets=True)`, the
        targets come from the same rows as the history."""
        key = self.role_set[role]
        history = None
        if cache is not None and key in cache and cache[key].fields[0].target_rows is not None:
            history = cache[key]
        out = self.sets[key].target(batch, history)
        return self.projections[role].target(out) if self.projections is not None else out

    def repr_dim(self) -> int:
        return self._repr_dim
