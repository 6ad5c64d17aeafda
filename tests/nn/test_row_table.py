"""RowTable (nn.embedding): nn.Embedding with a linear dense backward. Same values and
gradients as nn.Embedding, padding row included; sparse tables keep PyTorch's lookup."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longrec.nn.embedding import RowTable, gather_rows, rows_and_picks


def test_values_and_gradients_equal_nn_embedding():
    torch.manual_seed(0)
    ours = RowTable(30, 6, padding_idx=0)
    ref = nn.Embedding(30, 6, padding_idx=0)
    ref.load_state_dict(ours.state_dict())
    ids = torch.tensor([[0, 3, 3, 29], [5, 0, 3, 7]])
    w = torch.randn(2, 4, 6)
    for table in (ours, ref):
        (table(ids) * w).sum().backward()
    torch.testing.assert_close(ours(ids), ref(ids))
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert ours.weight.grad[0].abs().sum() == 0  # the padding row never trains


def test_sparse_tables_keep_sparse_gradients():
    table = RowTable(10, 4, sparse=True)
    table(torch.tensor([1, 2, 2])).sum().backward()
    assert table.weight.grad.is_sparse


@pytest.mark.parametrize("ids", [[[0, 17, 3], [39, 5, 2]], [[17, 0, 3], [39, 5, 2]], [[1, 2]]])
def test_sparse_distinct_lookup_gives_nn_embeddings_gradient_without_the_padding_row(ids):
    """Padding leading the ids (sliced off), elsewhere (zeroed) and absent."""
    torch.manual_seed(0)
    ours = RowTable(40, 6, padding_idx=0, sparse=True)
    ref = nn.Embedding(40, 6, padding_idx=0, sparse=True)
    ref.load_state_dict(ours.state_dict())
    ids = torch.tensor(ids)
    w = torch.randn(*ids.shape, 6)
    (ours(ids, distinct=True) * w).sum().backward()
    (ref(ids) * w).sum().backward()
    assert ours.weight.grad.is_sparse
    torch.testing.assert_close(ours.weight.grad.to_dense(), ref.weight.grad.to_dense())
    assert ours.weight.grad.to_dense()[0].abs().sum() == 0


@pytest.mark.parametrize("rows_used", ["kernel", "gather", "not"])
def test_rows_and_picks_give_the_rows_the_gathers_gradient(rows_used):
    """rows_and_picks (the targets among a batch's distinct rows) adds the picks' gradient
    into the rows' own in place; through a dense or a sparse table's distinct lookup, the
    table's gradient is that of two separate gathers."""
    ids = torch.tensor([0, 2, 5, 9])  # distinct, padding first
    picks_at = torch.tensor([[1, 3], [3, 3]])  # repeats: summed
    w_hist, w_tgt = torch.randn(4, 6), torch.randn(2, 2, 6)
    grads = []
    for fused, sparse_table in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        table = RowTable(10, 6, padding_idx=0, sparse=sparse_table)
        rows = table(ids, distinct=True)
        if fused:
            rows, picks = rows_and_picks(rows, picks_at)
        else:
            picks = gather_rows(rows, picks_at)
        loss = (picks * w_tgt).sum()
        if rows_used == "kernel":  # a custom backward's fresh gradient, like the search's
            loss = loss + (rows.exp() * w_hist).sum()
        elif rows_used == "gather":
            loss = loss + (gather_rows(rows, torch.tensor([3, 1])) * w_hist[:2]).sum()
        loss.backward()
        grads.append(table.weight.grad.to_dense())
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(grads[2], grads[0])
    assert grads[0][9].abs().sum() > 0 and grads[0][0].abs().sum() == 0
