"""RowwiseAdagrad (train/rowwise_adagrad.py): FBGEMM's exact row-wise Adagrad on the rows a batch
touched, against the formula written out in float64; untouched rows stay put; the C++ and the
PyTorch paths agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longrec.nn import row_kernels
from longrec.ops import dispatch
from longrec.train.rowwise_adagrad import RowwiseAdagrad

LR, EPS = 0.05, 1e-10


def _steps(rows: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    steps = [torch.randint(0, rows, (rows // 2 + 3,), generator=g) for _ in range(4)]
    steps.insert(1, torch.arange(1, rows, 3))  # increasing ids: the kernel's no-order path
    return steps


def _run(ids_per_step, rows=12, dim=4, seed=0):
    torch.manual_seed(seed)
    table = nn.Embedding(rows, dim, sparse=True)
    opt = RowwiseAdagrad(table.parameters(), lr=LR, eps=EPS)
    target = torch.randn(rows, dim)
    for ids in ids_per_step:
        opt.zero_grad()
        ((table(ids) - target[ids]) ** 2).sum().backward()
        opt.step()
    return table.weight.detach(), opt


def _formula(ids_per_step, rows=12, dim=4, seed=0):
    """The update written out row by row, in float64."""
    torch.manual_seed(seed)
    weight = nn.Embedding(rows, dim).weight.detach().double().clone()
    target = torch.randn(rows, dim).double()
    state = torch.zeros(rows, dtype=torch.float64)
    for ids in ids_per_step:
        grad = torch.zeros(rows, dim, dtype=torch.float64)
        for i in ids.tolist():  # d/dw of sum (w[i] - target[i])^2, repeats add up
            grad[i] += 2 * (weight[i] - target[i])
        for r in sorted(set(ids.tolist())):
            state[r] += (grad[r] ** 2).mean()
            weight[r] -= LR * grad[r] / (state[r].sqrt() + EPS)
    return weight, state


def test_matches_the_formula_with_repeated_ids():
    steps = _steps(12)
    ours, opt = _run(steps)
    want, want_state = _formula(steps)
    torch.testing.assert_close(ours, want.float(), rtol=1e-5, atol=1e-6)
    state = next(iter(opt.state.values()))["sum"]
    torch.testing.assert_close(state, want_state.float(), rtol=1e-5, atol=1e-7)


def test_untouched_rows_and_their_state_stay_put():
    before, _ = _run([])
    after, opt = _run([torch.tensor([1, 3, 3, 5])] * 3)
    untouched = [i for i in range(12) if i not in (1, 3, 5)]
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.equal(after[[1, 3, 5]], before[[1, 3, 5]])
    state = next(iter(opt.state.values()))["sum"]
    assert state[untouched].abs().sum() == 0 and state[[1, 3, 5]].min() > 0


@pytest.mark.parametrize("rows", [12, 5000])  # 5000: rows across many bitmap words
def test_cpp_and_pytorch_paths_agree(rows):
    """kernels=native against kernels=reference (ops.dispatch), with an empty step and one
    row repeated among the steps."""
    assert row_kernels.available()
    steps = _steps(rows, seed=1)
    steps += [torch.tensor([], dtype=torch.long), torch.tensor([0, 0])]
    with dispatch.using("native"):
        fused, fused_opt = _run(steps, rows=rows)
    with dispatch.using("reference"):
        plain, plain_opt = _run(steps, rows=rows)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    state = [next(iter(o.state.values()))["sum"] for o in (fused_opt, plain_opt)]
    torch.testing.assert_close(*state, rtol=1e-5, atol=1e-7)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="invalid RowwiseAdagrad"):
        RowwiseAdagrad([nn.Parameter(torch.zeros(2, 2))], lr=-1.0)
    table = torch.zeros(10, 4)
    with pytest.raises(RuntimeError, match="outside"):
        row_kernels.rowwise_adagrad_(
            table, torch.zeros(10), torch.tensor([3, 10]), torch.ones(2, 4), 0.1, 1e-10
        )
    assert table.abs().sum() == 0
