"""Embedding tables for categorical fields, shared between history and targets.

`FieldEmbedding` holds one table per field and returns the concatenation of the fields'
vectors (a behaviour's embedding e_i). Multi-valued fields ([..., W] ids, 0 = padding) are
mean-pooled. With `dedup=True` each distinct id of a batch is looked up once and the result
scattered back, which makes the backward pass touch each row once (ids repeat heavily in long
histories).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longrec.nn import row_kernels
from longrec.ops import dispatch


def init_normal(module: nn.Module, std: float) -> None:
    """DARE's init: N(0, std) for every non-bias parameter, zeros for biases."""
    for name, param in module.named_parameters():
        if param.dim() <= 1 or name.endswith("bias"):
            if name.endswith("bias"):
                nn.init.zeros_(param)
            continue
        nn.init.normal_(param, mean=0.0, std=std)


class FieldEmbedding(nn.Module):
    def __init__(
        self,
        dims: dict[str, tuple[int, int]],  # field -> (vocab size, dim)
        sparse: bool = False,
        dedup: bool = False,
        multi: frozenset[str] = frozenset(),  # fields whose ids have a trailing value axis [..., W]
    ):
        super().__init__()
        self.names = list(dims)
        self.dims = {k: d for k, (_, d) in dims.items()}
        self.tables = nn.ModuleDict(
            {k: RowTable(max(v, 2), d, padding_idx=0, sparse=sparse) for k, (v, d) in dims.items()}
        )
        self.dedup = dedup
        self.multi = frozenset(multi)

    @property
    def out_dim(self) -> int:
        return sum(self.dims.values())

    def lookup(self, name: str, ids: Tensor) -> Tensor:
        table = self.tables[name]
        if self.dedup and ids.numel() > 4096:
            uniq, inverse = torch.unique(ids, return_inverse=True)
            out = table(uniq)[inverse]
        else:
            out = table(ids)
        if name in self.multi:
            valid = (ids != 0).unsqueeze(-1).to(out.dtype)
            out = (out * valid).sum(-2) / valid.sum(-2).clamp_min(1.0)
        return out

    def forward(self, ids: dict[str, Tensor], names: list[str] | None = None) -> Tensor:
        names = names or self.names
        return torch.cat([self.lookup(n, ids[n]) for n in names], dim=-1)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.tables.values()]


def zero_padding_rows(module: nn.Module) -> None:
    """Re-zero the padding row of every embedding table after a custom init."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()


def _take(rows: Tensor, index: Tensor) -> Tensor:
    """rows [U, d] at index (any shape) -> [*index.shape, d]."""
    return rows.index_select(0, index.reshape(-1)).view(*index.shape, rows.shape[-1])


class _GatherRows(torch.autograd.Function):
    """rows[index] whose backward accumulates with index_add_ (a linear pass) instead of the
    sort-based accumulate of index_put_, which dominated the step time of long histories."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.n_rows = rows.shape[0]
        return _take(rows, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        d = grad.shape[-1]
        out = grad.new_zeros(ctx.n_rows, d)
        out.index_add_(0, index.reshape(-1), grad.reshape(-1, d).contiguous())
        return out, None


def _lookup_forward(ctx, weight: Tensor, ids: Tensor, padding_idx: int | None) -> Tensor:
    """weight[ids], keeping what the lookups' backward passes need."""
    ctx.save_for_backward(ids)
    ctx.shape, ctx.padding_idx = weight.shape, padding_idx
    flat = ids.reshape(-1)
    if (
        flat.numel() > 4096
        and weight.is_contiguous()
        and dispatch.use_native("lookup_rows", weight)
    ):
        # prefetched rows: 4% of a DARE step at 6.2M items (index_select: 4-6 ms a lookup)
        return row_kernels.lookup_rows(weight, flat).view(*ids.shape, weight.shape[1])
    return _take(weight, ids)


class _LookupRows(torch.autograd.Function):
    """weight[ids] whose dense backward is a zero-fill plus a linear index_add_. PyTorch's
    embedding_dense_backward sorts the ids first; at DARE's Taobao configuration that sort and
    its zero-fills took a fifth of a training step."""

    @staticmethod
    def forward(
        ctx, weight: Tensor, ids: Tensor, padding_idx: int | None, distinct: bool
    ) -> Tensor:
        ctx.distinct = distinct
        return _lookup_forward(ctx, weight, ids, padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        # a contiguous source: index_add_ takes a slow per-row path for strided ones (6x here)
        flat = grad.reshape(-1, ctx.shape[1]).contiguous()
        if ctx.distinct and dispatch.use_native("scatter_distinct_rows", flat):
            out = row_kernels.scatter_distinct_rows(ids.reshape(-1), flat, ctx.shape[0])
        else:
            out = grad.new_zeros(ctx.shape)
            out.index_add_(0, ids.reshape(-1), flat)
        if ctx.padding_idx is not None:
            out[ctx.padding_idx] = 0  # nn.Embedding's padding_idx: that row never trains
        return out, None, None, None


class _LookupDistinctRowsSparse(torch.autograd.Function):
    """weight[ids] for distinct ids, with a sparse gradient built straight from the incoming
    one: the ids are already distinct, so the gradient needs no sort, coalesce or padding
    filter (nn.Embedding's sparse backward drops the padding entries with a nonzero and two
    index copies, ~4 ms a table for 290K ids). The padding entry is sliced off when it leads
    the ids (models.towers.dedup puts it there), else zeroed."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, padding_idx: int | None) -> Tensor:
        return _lookup_forward(ctx, weight, ids, padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        values = grad.reshape(-1, ctx.shape[1]).contiguous()
        return _sparse_distinct_grad(ids, values, ctx.shape, ctx.padding_idx), None, None


def _sparse_distinct_grad(ids: Tensor, values: Tensor, shape, pad: int | None) -> Tensor:
    """The sparse gradient [V, d] of rows at distinct ids, the padding entry sliced off when it
    leads the ids (models.towers.dedup puts it there), else zeroed."""
    flat_ids = ids.reshape(1, -1)
    if pad is not None and flat_ids.shape[1] and flat_ids[0, 0].item() == pad:
        flat_ids, values = flat_ids[:, 1:], values[1:]
    elif pad is not None:
        at = (flat_ids[0] == pad).nonzero().squeeze(1)
        if len(at):
            values = values.index_fill(0, at, 0.0)
    return torch.sparse_coo_tensor(flat_ids, values, shape, check_invariants=False)


class RowTable(nn.Embedding):
    """nn.Embedding with faster backward passes (`_LookupRows`, and `_LookupDistinctRowsSparse`
    for sparse tables looked up at distinct ids); max_norm and scale_grad_by_freq keep
    PyTorch's own lookup. Same parameters and state_dict keys.

    `sparse_distinct_grad`: a dense table whose optimiser takes sparse gradients
    (train.table_adam.TableAdam) gets the gradient of a distinct-id lookup sparse too, so
    that no [V, d] gradient is built; other lookups still give a dense one."""

    sparse_distinct_grad: bool = False

    def forward(self, ids: Tensor, distinct: bool = False) -> Tensor:
        """`distinct`: the caller guarantees no id repeats (a de-duplicated batch), which lets
        the backward write rows in parallel instead of accumulating them."""
        if (
            self.max_norm is not None
            or self.scale_grad_by_freq
            or not (torch.is_grad_enabled() and self.weight.requires_grad)
        ):
            return super().forward(ids)
        if distinct and (self.sparse or self.sparse_distinct_grad):
            return _LookupDistinctRowsSparse.apply(self.weight, ids, self.padding_idx)
        if self.sparse:
            return super().forward(ids)
        return _LookupRows.apply(self.weight, ids, self.padding_idx, distinct)


class _RowsAndPicks(torch.autograd.Function):
    """(rows, rows[index]) whose backward adds the picks' gradient into the rows' one in place,
    an index_add of the few picked rows: the targets among a batch's distinct rows. As a
    separate gather, the picks' gradient was a zero-filled [U, d] tensor plus a full add
    (15 ms a step at 6.2M items); as a sparse one, autograd added it out of place, copying the
    [U, d] gradient, whenever it arrived first."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor):
        ctx.save_for_backward(index)
        picks = _take(rows, index)
        return rows.view_as(rows), picks

    @staticmethod
    def backward(ctx, grad_rows: Tensor, grad_picks: Tensor):
        (index,) = ctx.saved_tensors
        d = grad_picks.shape[-1]
        picks = grad_picks.reshape(-1, d)
        if grad_rows._base is not None or not grad_rows.is_contiguous():
            return grad_rows.index_add(0, index.reshape(-1), picks), None
        # not a view: the rows' consumers' own fresh gradient (the search kernel's, or the
        # gathers'), which nothing else reads, so it takes the picks' gradient in place
        return grad_rows.index_add_(0, index.reshape(-1), picks), None


class _TableRows(torch.autograd.Function):
    """A table's distinct rows for a batch, not copied out: a stand-in [U, d] (no memory) that
    only the fused search takes (it reads the table at the batch's ids and returns the distinct
    rows' gradient as the stand-in's), plus the targets' rows. The backward adds the targets'
    gradient into the distinct rows' at their index and hands the table the same sparse (or
    dense) gradient as _LookupDistinctRowsSparse (or _LookupRows) would."""

    @staticmethod
    def forward(
        ctx,
        weight: Tensor,
        ids: Tensor,
        target_ids: Tensor,
        target_index: Tensor,
        padding_idx: int | None,
        sparse: bool,
    ):
        ctx.save_for_backward(ids, target_index)
        ctx.shape, ctx.padding_idx, ctx.sparse = weight.shape, padding_idx, sparse
        stand_in = weight.new_zeros(1, 1).expand(ids.shape[0], weight.shape[1])
        return stand_in, _take(weight, target_ids.long())

    @staticmethod
    def backward(ctx, grad_rows: Tensor, grad_picks: Tensor):
        ids, target_index = ctx.saved_tensors
        d = ctx.shape[1]
        picks = grad_picks.reshape(-1, d)
        if grad_rows._base is not None or grad_rows.stride() != (d, 1):
            grad_rows = grad_rows.clone(memory_format=torch.contiguous_format)
        # else the search's own fresh gradient (or autograd's sum of two): nothing else reads it
        grad_rows.index_add_(0, target_index.reshape(-1), picks)
        if ctx.sparse:
            return _sparse_distinct_grad(ids, grad_rows, ctx.shape, ctx.padding_idx), *[None] * 5
        out = row_kernels.scatter_distinct_rows(ids, grad_rows, ctx.shape[0])
        if ctx.padding_idx is not None:
            out[ctx.padding_idx] = 0
        return out, *[None] * 5


def table_rows(table: RowTable, ids: Tensor, target_ids: Tensor, target_index: Tensor):
    """(stand-in for table(ids, distinct=True), the targets' rows table(target_ids)) where the
    fused search reads the table itself (_TableRows); `target_index`: the targets' positions in
    `ids`. None where that does not apply (other lookups, e.g. sharded tables): the caller
    looks the rows up instead."""
    if not isinstance(table, RowTable):
        return None
    w = table.weight
    if (
        table.max_norm is not None
        or table.scale_grad_by_freq
        or not (torch.is_grad_enabled() and w.requires_grad)
        or not (w.is_contiguous() and dispatch.use_native("table_rows", w))
        or ids.dim() != 1
    ):
        return None
    sparse = table.sparse or table.sparse_distinct_grad
    return _TableRows.apply(w, ids, target_ids, target_index, table.padding_idx, sparse)


def rows_and_picks(rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, rows[index]) for a batch's distinct rows and the targets among them."""
    if not rows.requires_grad:
        return rows, _take(rows, index)
    return _RowsAndPicks.apply(rows, index)


def gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """rows [U, d] at index (any shape) -> [*index.shape, d], with a fast backward."""
    if not rows.requires_grad:
        return _take(rows, index)
    return _GatherRows.apply(rows, index)
