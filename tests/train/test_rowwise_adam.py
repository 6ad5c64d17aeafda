"""RowwiseAdam (train/rowwise_adam.py): lazy Adam on the rows a batch touched. It equals Adam
when every row is touched every step, leaves untouched rows and their moments alone, sums
repeated ids, and its C++ path equals its PyTorch path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longrec.nn import row_kernels
from longrec.ops import dispatch
from longrec.train import rowwise_adam
from longrec.train.rowwise_adam import RowwiseAdam


def _run(ids_per_step, sparse=True, opt_cls=RowwiseAdam, rows=12, seed=0, **kw):
    torch.manual_seed(seed)
    table = nn.Embedding(rows, 4, sparse=sparse)
    opt = opt_cls(table.parameters(), lr=0.05, **kw)
    target = torch.randn(rows, 4)
    for ids in ids_per_step:
        opt.zero_grad()
        ((table(ids) - target[ids]) ** 2).sum().backward()
        opt.step()
    return table.weight.detach(), opt


def test_equals_adam_when_every_row_is_touched():
    steps = [torch.randperm(12) for _ in range(5)]
    ours, _ = _run(steps)
    ref, _ = _run(steps, sparse=False, opt_cls=torch.optim.Adam, foreach=False)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)  # float rounding; a step is 0.05


def test_untouched_rows_and_their_moments_stay_put():
    before, _ = _run([])
    after, opt = _run([torch.tensor([1, 3, 3, 5])] * 3)
    untouched = [i for i in range(12) if i not in (1, 3, 5)]
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.equal(after[[1, 3, 5]], before[[1, 3, 5]])
    state = next(iter(opt.state.values()))
    assert state["exp_avg"][untouched].abs().sum() == 0
    assert state["exp_avg_sq"][[1, 3, 5]].min() > 0


def test_repeated_ids_are_summed_like_sparse_adam():
    steps = [torch.tensor([2, 2, 7, 0, 7, 7]), torch.tensor([7, 4, 4])]
    ours, _ = _run(steps)
    ref, _ = _run(steps, opt_cls=torch.optim.SparseAdam)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)  # float rounding; a step is 0.05


def _both(steps, **kw):
    """The table after `steps` under kernels=native and kernels=reference (ops.dispatch)."""
    with dispatch.using("native"):
        fused, _ = _run(steps, **kw)
    with dispatch.using("reference"):
        plain, _ = _run(steps, **kw)
    return fused, plain


def test_cpp_and_pytorch_paths_agree():
    assert row_kernels.available()
    steps = [torch.randint(0, 12, (9,)) for _ in range(4)]
    steps.insert(2, torch.tensor([1, 4, 5, 11]))  # increasing ids: the kernel's no-order path
    steps.insert(3, torch.tensor([], dtype=torch.long))  # a step without rows
    steps.insert(1, torch.tensor([0, 0, 0]))  # one row, repeated
    fused, plain = _both(steps)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_the_kernel_runs_under_native(monkeypatch):
    calls = []
    monkeypatch.setattr(rowwise_adam, "update_rows", lambda *a, **k: calls.append(1))
    with dispatch.using("native"):
        _run([torch.tensor([1, 2])])
    with dispatch.using("reference"):
        _run([torch.tensor([1, 2])])
    assert calls == [1]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="invalid RowwiseAdam"):
        RowwiseAdam([nn.Parameter(torch.zeros(2, 2))], lr=-1.0)


def test_cpp_path_orders_rows_across_bitmap_words_and_tables_of_any_size():
    """Rows far apart (many 64-row bitmap words), repeats, then a smaller and a larger table:
    the kernel's persistent bitmap must be left clear by every call."""
    assert row_kernels.available()
    for rows in (5000, 70, 9000):
        steps = [torch.randint(0, rows, (300,)) for _ in range(3)]
        fused, plain = _both(steps, rows=rows)
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_cpp_path_refuses_out_of_range_rows_and_stays_usable():
    table = nn.Parameter(torch.zeros(10, 4))
    state = [torch.zeros(10, 4), torch.zeros(10, 4)]
    with pytest.raises(RuntimeError, match="outside"):
        row_kernels.adam_rows_(
            table, *state, torch.tensor([3, 10]), torch.ones(2, 4), 0.1, (0.9, 0.9), 1e-8, 1, True
        )
    with torch.no_grad():
        row_kernels.adam_rows_(
            table, *state, torch.tensor([3, 3]), torch.ones(2, 4), 0.1, (0.9, 0.9), 1e-8, 1, True
        )
    assert torch.count_nonzero(table.detach().sum(1)).item() == 1  # only row 3 moved
