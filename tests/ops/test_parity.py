"""The kernels switch (longrec.ops.dispatch) and the native ops against their reference twins.

Each test runs the same call under `kernels=native` and `kernels=reference` and compares
outputs (and gradients), on edge cases: an empty batch or history, one row, repeated ids, the
padding id 0 and multi-valued fields where the op takes them. Ops that had such a pair before
the switch are compared where their own tests live, now through it:
search_attend (tests/nn/test_search_attention.py), prelu_backward (tests/nn/test_prelu.py),
rowwise_adam_ / sparse_grad_adam_ / rowwise_adagrad_ (tests/train/test_rowwise_adam.py,
test_table_adam.py, test_rowwise_adagrad.py), and DARE / TWIN end to end
(tests/models/test_towers_speed_paths.py).
"""

from __future__ import annotations

import pytest
import torch

from longrec.config import RunConfig, build_config
from longrec.data.loader import ranges_taker
from longrec.errors import UserError
from longrec.models.towers import HistoryField, dedup
from longrec.nn import row_kernels
from longrec.nn.embedding import RowTable
from longrec.ops import dispatch

BOTH = ("native", "reference")


def test_the_extension_builds_here():
    # the native runs below would otherwise fail with "could not be built"
    assert row_kernels.available()


# -- the switch ---------------------------------------------------------------------------


def test_settings_and_the_context_manager(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_ALIAS, raising=False)
    x = torch.zeros(3, 4)
    assert dispatch.kernels() == "auto" and dispatch.use_native("op", x)
    assert not dispatch.use_native("op", x.double())  # auto: the reference path
    with dispatch.using("reference"):
        assert dispatch.kernels() == "reference" and not dispatch.use_native("op", x)
        with dispatch.using("native"):
            assert dispatch.use_native("op", x)
        assert dispatch.kernels() == "reference"
    assert dispatch.kernels() == "auto"
    with pytest.raises(UserError, match="expected auto, reference, native"):
        dispatch.set_kernels("fast")


def test_native_refuses_what_it_cannot_run_naming_the_op(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_ALIAS, raising=False)
    x = torch.zeros(3, 4)
    with dispatch.using("native"):
        with pytest.raises(UserError, match=r"kernels=native: my_op runs on CPU.*float64"):
            dispatch.use_native("my_op", x.double())
        with pytest.raises(UserError, match=r"my_op runs on CPU tensors .* on meta"):
            dispatch.use_native("my_op", x, torch.zeros(3, device="meta"))  # meta: a GPU
        with pytest.raises(UserError, match=r"dedup runs on CPU .*int64 on meta"):  # indices too
            dispatch.use_native("dedup", index=(torch.zeros(3, dtype=torch.long, device="meta"),))
        monkeypatch.setattr(row_kernels, "available", lambda: False)
        with pytest.raises(UserError, match=r"my_op needs the C\+\+ extension"):
            dispatch.use_native("my_op", x)
    with dispatch.using("auto"):
        assert not dispatch.use_native("my_op", x)  # auto falls back where nothing is built


def test_the_environment_alias_turns_auto_into_reference(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_ALIAS, "0")
    x = torch.zeros(3, 4)
    assert dispatch.kernels() == "reference" and not dispatch.use_native("op", x)
    with dispatch.using("native"), pytest.raises(UserError, match="contradicts"):
        dispatch.use_native("op", x)


def test_config_and_superseded_model_parameter():
    raw = RunConfig().to_dict()
    assert build_config(raw).train.kernels == "auto"
    raw["train"]["kernels"] = "turbo"
    with pytest.raises(UserError, match=r"config: train\.kernels = 'turbo'"):
        build_config(raw)
    assert dispatch.for_run("auto", {"fused_kernels": True}) == "auto"
    assert dispatch.for_run("auto", {"fused_kernels": False}) == "reference"
    assert dispatch.for_run("native", {}) == "native"
    with pytest.raises(UserError, match=r"fused_kernels=false .* --kernels=native"):
        dispatch.for_run("native", {"fused_kernels": False}, "--kernels")


def test_resume_may_change_the_kernels():
    from longrec.train.resume import RESUMABLE

    assert "train.kernels" in RESUMABLE


# -- ops ----------------------------------------------------------------------------------


def _under(setting: str, fn):
    with dispatch.using(setting):
        return fn()


def _close(native, reference, **tol):
    for a, b in zip(native, reference, strict=True):
        torch.testing.assert_close(a, b, **tol)


# (distinct rows U, batch B, history L, targets M, width d)
READS = [
    (50, 3, 7, 2, 5),
    (1, 2, 3, 1, 4),  # one row: every behaviour repeats it
    (30, 0, 5, 1, 4),  # an empty batch
    (30, 4, 0, 2, 4),  # empty histories
    (300, 8, 40, 3, 16),
]


@pytest.mark.parametrize("u,b,length,m,d", READS)
def test_history_reads_gather_dot_and_gather_pool(u, b, length, m, d):
    """HistoryField.dot / weighted_sum: the row kernels against rows[index] and a matmul."""
    g = torch.Generator().manual_seed(u + b + length)
    rows = torch.randn(u, d, generator=g)
    rows[0] = 0.0  # the padding row, as the tables hold it
    index = torch.randint(0, u, (b, length), generator=g)
    if index.numel():
        index[0, : length // 2] = 0  # padding ids, left
    query = torch.randn(b, m, d, generator=g)
    weight = torch.randn(b, m, length, generator=g)

    def run():
        leaves = [t.clone().requires_grad_() for t in (rows, query, weight)]
        field = HistoryField(leaves[0], index, fused=True)
        out = (field.dot(leaves[1]), field.weighted_sum(leaves[2]))
        native = dispatch.kernels() == "native"
        assert all(type(o.grad_fn).__name__.startswith("_Gather") == native for o in out)
        gs = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1)) for o in out]
        loss = sum((o * gi).sum() for o, gi in zip(out, gs, strict=True))
        return (*out, *torch.autograd.grad(loss, leaves))

    # float32 on both sides, summed in another order: each output is a sum of at most
    # max(L, d) products of N(0, 1) values, the rows' gradients of up to B*M*L such sums
    _close(_under("native", run), _under("reference", run), rtol=1e-4, atol=1e-4)


def test_multi_valued_fields_take_the_reference_path_under_both():
    """The kernels do not read multi-valued fields (value_mask); native does not refuse them."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(10, 4, generator=g)
    inverse = torch.randint(0, 10, (3, 5, 2), generator=g)
    vmask = inverse > 0
    query = torch.randn(3, 2, 4, generator=g)
    out = [
        _under(s, lambda: HistoryField(rows, inverse, vmask, fused=True).dot(query)) for s in BOTH
    ]
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("b,length", [(6, 9), (0, 4), (5, 0), (1, 1)])
@pytest.mark.parametrize("dense", [True, False])
def test_gather_ranges_is_exact(b, length, dense):
    """The loader's left-padded histories: exact copies (no arithmetic), every dtype and
    trailing shape; `dense` picks lengths that send the reference down each of its routes."""
    g = torch.Generator().manual_seed(b * 10 + length)
    offsets = torch.arange(b) * 20
    n = torch.randint(length if dense else 0, length + 3 if dense else 2, (b,), generator=g)
    lo, end = offsets + 3, offsets + 3 + n
    lo = torch.maximum(lo, end - length)
    values = [
        torch.randint(0, 1000, (20 * b + 10,), generator=g),
        torch.randint(0, 1000, (20 * b + 10,), generator=g).int(),
        torch.randn(20 * b + 10, 3, generator=g),
    ]

    def run():
        take, mask = ranges_taker(lo, end, length)
        return (mask, *(take(v) for v in values))

    native, reference = _under("native", run), _under("reference", run)
    for a, r in zip(native, reference, strict=True):
        assert a.dtype == r.dtype and torch.equal(a, r)


@pytest.mark.parametrize("shape", [(4, 7), (0, 3), (3, 0), (2, 5, 3)])
def test_dedup_is_exact(shape):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 6, shape, generator=g)  # many repeats, padding 0 present or not
    native, reference = (
        _under("native", lambda: dedup(ids, 9)),
        _under("reference", lambda: dedup(ids, 9)),
    )
    for a, r in zip(native, reference, strict=True):
        assert torch.equal(a, r)
    assert native[0][0] == 0  # padding leads, present or not


@pytest.mark.parametrize("n_ids", [0, 7, 5000])  # > 4096: the prefetching lookup_rows kernel
@pytest.mark.parametrize("distinct", [False, True])
def test_table_lookups_and_their_gradients_are_exact(n_ids, distinct):
    """RowTable lookups: lookup_rows (over 4,096 ids) and, at distinct ids, the backward's
    scatter_distinct_rows, against index_select and index_add_; the padding row gets none."""
    g = torch.Generator().manual_seed(3)
    vocab = 6000
    ids = (
        torch.randperm(vocab, generator=g)[:n_ids]
        if distinct
        else torch.randint(0, 40, (n_ids,), generator=g)
    )
    if n_ids:
        ids[0] = 0
    grad = torch.randn(n_ids, 8, generator=g)

    def run():
        torch.manual_seed(0)
        table = RowTable(vocab, 8, padding_idx=0)
        out = table(ids, distinct=distinct)
        out.backward(grad)
        return out.detach(), table.weight.grad

    native, reference = _under("native", run), _under("reference", run)
    if distinct:  # one term per row: exact
        _close(native, reference, rtol=0, atol=0)
    else:  # index_add_ in both; the forward is a copy
        _close(native, reference, rtol=1e-6, atol=1e-6)


# -- runs ---------------------------------------------------------------------------------


def test_dare_trains_the_same_under_native_and_reference(prepared_taobao, tmp_path):
    """train.kernels through the Trainer: three real DARE steps (loader, model, TableAdam)."""
    from longrec.config import resolve
    from longrec.train.loop import Trainer

    losses = {}
    for kernels in BOTH:
        sets = ["train.batch_size=256", "train.progress=false", "data.prefetch=0"]
        sets.append(f"train.kernels={kernels}")
        cfg = resolve(None, sets, data__path=str(prepared_taobao), model__name="dare")
        trainer = Trainer(cfg, tmp_path / kernels)
        assert dispatch.kernels() == kernels
        chunks = trainer.loader.batch_requests(0)
        losses[kernels] = [trainer._step(trainer.loader.make_batch(chunks[i]), i) for i in range(3)]
    # float32 rounding of sums taken in another order, carried through two Adam updates
    assert losses["native"] == pytest.approx(losses["reference"], rel=1e-4)


def test_the_superseded_model_parameter_reads_as_reference(prepared_taobao, tmp_path):
    from longrec.config import resolve
    from longrec.train.loop import Trainer

    sets = ["train.progress=false", "data.prefetch=0", "model.params.fused_kernels=false"]
    cfg = resolve(None, sets, data__path=str(prepared_taobao), model__name="dare")
    Trainer(cfg, tmp_path / "a")
    assert dispatch.kernels() == "reference"
    cfg = resolve(None, [*sets, "train.kernels=native"], data__path=str(prepared_taobao))
    with pytest.raises(UserError, match="drop one"):
        Trainer(cfg, tmp_path / "b")
