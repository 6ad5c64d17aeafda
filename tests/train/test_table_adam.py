"""TableAdam (train/table_adam.py): torch.optim.Adam that also takes the sparse gradients of
tables looked up at distinct ids, updating every row as Adam does. It must step like Adam on the
dense equivalent (untouched rows decay and move), sum repeated ids, share Adam's state format,
fall back for settings the kernel lacks, and global-norm clipping must count sparse gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longrec.config import resolve
from longrec.nn import row_kernels
from longrec.nn.embedding import RowTable
from longrec.ops import dispatch
from longrec.train.loop import Trainer
from longrec.train.optim import clip_grad_norm_
from longrec.train.table_adam import TableAdam, use_sparse_table_grads

ROWS, DIM = 40, 16
TOL = {"rtol": 1e-5, "atol": 1e-6}  # float rounding; a step moves a row by ~lr = 0.05


def _sparse(ids: list[int], values: torch.Tensor) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([ids]), values, (ROWS, DIM))


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    ours = nn.Parameter(torch.randn(ROWS, DIM))
    ref = nn.Parameter(ours.detach().clone())
    return ours, TableAdam([ours], lr=0.05, **kw), ref, torch.optim.Adam([ref], lr=0.05, **kw)


@pytest.mark.parametrize("setting", ["native", "reference"])
def test_sparse_gradients_step_like_adam_on_the_dense_ones(setting, monkeypatch):
    """Repeated ids, any order, and steps that leave rows out (their moments decay, they move);
    through the kernel (kernels=native) and through torch.optim.Adam (reference)."""
    assert row_kernels.available()
    kernel_steps = []  # the kernel's steps (TableAdam._sparse_step)
    original = TableAdam._sparse_step

    def counted(self, *a):
        kernel_steps.append(1)
        original(self, *a)

    monkeypatch.setattr(TableAdam, "_sparse_step", counted)
    ours, opt, ref, ref_opt = _pair()
    g = torch.Generator().manual_seed(1)
    with dispatch.using(setting):
        for ids in ([5, 3, 5, 39, 0], [7], list(range(ROWS)), [38, 2, 2, 2]):
            values = torch.randn(len(ids), DIM, generator=g)
            ours.grad = _sparse(ids, values)
            ref.grad = _sparse(ids, values).to_dense()
            opt.step()
            ref_opt.step()
            torch.testing.assert_close(ours, ref, **TOL)
    assert len(kernel_steps) == (4 if setting == "native" else 0)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[ours][key], ref_opt.state[ref][key], **TOL)
    assert float(opt.state[ours]["step"]) == 4


def test_state_continues_in_torch_adam_and_back():
    """The checkpoint of a run (state.pt) loads whichever path the next step takes."""
    ours, opt, ref, ref_opt = _pair()
    values = torch.randn(3, DIM)
    for p, o in ((ours, opt), (ref, ref_opt)):
        p.grad = _sparse([1, 9, 4], values)
        if o is ref_opt:
            p.grad = p.grad.to_dense()
        o.step()
    plain = torch.optim.Adam([ours], lr=0.05)
    plain.load_state_dict(opt.state_dict())
    back = TableAdam([ref], lr=0.05)
    back.load_state_dict(ref_opt.state_dict())
    dense = torch.randn(ROWS, DIM)
    ours.grad, ref.grad = dense.clone(), _sparse(list(range(ROWS)), dense.clone())
    plain.step()
    back.step()
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("setting", [{"weight_decay": 0.1}, {"amsgrad": True}])
def test_settings_the_kernel_lacks_go_through_adam(setting):
    ours, opt, ref, ref_opt = _pair(**setting)
    for ids in ([2, 8], [8, 30, 30]):
        values = torch.randn(len(ids), DIM)
        ours.grad, ref.grad = _sparse(ids, values), _sparse(ids, values).to_dense()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, **TOL)


def test_distinct_lookups_give_sparse_gradients_and_others_dense():
    table = RowTable(ROWS, DIM, padding_idx=0)
    assert use_sparse_table_grads(nn.ModuleList([table])) == 1
    ids = torch.tensor([0, 4, 9])  # distinct, padding first (models.towers.dedup)
    table(ids, distinct=True).sum().backward()
    assert table.weight.grad.is_sparse
    assert table.weight.grad.to_dense()[[4, 9]].eq(1).all()
    assert table.weight.grad.to_dense()[0].eq(0).all()  # padding never trains
    table.weight.grad = None
    table(torch.tensor([4, 4])).sum().backward()
    assert not table.weight.grad.is_sparse


def test_clipping_counts_sparse_gradients_like_dense_ones():
    torch.manual_seed(0)
    grads = [_sparse([3, 3, 7], torch.randn(3, DIM)), torch.randn(5, 2)]
    ours = [nn.Parameter(torch.zeros(ROWS, DIM)), nn.Parameter(torch.zeros(5, 2))]
    ref = [nn.Parameter(torch.zeros(ROWS, DIM)), nn.Parameter(torch.zeros(5, 2))]
    for p, q, g in zip(ours, ref, grads, strict=True):
        p.grad, q.grad = g.clone(), g.to_dense() if g.is_sparse else g.clone()
    total = clip_grad_norm_(ours, 1.0)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(total, want)
    assert want > 1.0  # the clipping did scale
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.grad.to_dense(), q.grad)


def test_dare_trains_the_same_with_sparse_or_dense_table_gradients(prepared_taobao, tmp_path):
    """The default path (sparse) against torch.optim.Adam on dense gradients, five real steps."""
    losses, grads_sparse = [], []
    for sparse in (True, False):
        sets = ["train.batch_size=256", "train.progress=false", "data.prefetch=0"]
        sets.append(f"train.sparse_table_grads={str(sparse).lower()}")
        cfg = resolve(None, sets, data__path=str(prepared_taobao), model__name="dare")
        trainer = Trainer(cfg, tmp_path / str(sparse))
        chunks = trainer.loader.batch_requests(0)
        losses.append([trainer._step(trainer.loader.make_batch(chunks[i]), i) for i in range(5)])
        tables = [p for p in trainer.model.embedding_parameters() if p.grad is not None]
        grads_sparse.append({p.grad.is_sparse for p in tables})
    assert grads_sparse == [{True, False}, {False}]  # item tables sparse, positions dense
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
