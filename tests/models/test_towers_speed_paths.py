"""The two-stage towers' speed paths change nothing but speed: the C++ kernels (train.kernels,
ops.dispatch; the superseded `fused_kernels`), the fused soft search (`fused_search`) and the
single table lookup for history and targets in training give the logits and parameter
gradients of the plain PyTorch path."""

from __future__ import annotations

import pytest
import torch

from longrec.models import build_model
from longrec.nn import search_attention
from longrec.ops import dispatch

MODELS = ["dare", "twin", "twin_4e", "twin_proj", "twin_hard"]


def _grads(model, logits, aux):
    loss = logits.sum() + sum(w * a.sum() for a, w in aux)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        loss, [p for _, p in model.named_parameters() if p.requires_grad], allow_unused=True
    )
    return dict(zip(names, grads, strict=True))


def _assert_same(a: dict, b: dict):
    for name, ga in a.items():
        gb = b[name]
        if ga is None or gb is None:
            assert ga is None and gb is None, name
            continue
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "fast,slow",
    [
        ({"fused_kernels": True}, {"fused_kernels": False}),  # everything against plain
        ({"fused_search": True}, {"fused_search": False}),  # the fused search alone
    ],
)
def test_fused_kernels_equal_plain_pytorch(name, fast, slow, schema, batch):
    torch.manual_seed(0)
    fused = build_model(name, schema, fast)
    plain = build_model(name, schema, slow)
    plain.load_state_dict(fused.state_dict())
    out_f, out_p = fused.forward_train(batch), plain.forward_train(batch)
    torch.testing.assert_close(out_f[0], out_p[0], rtol=1e-5, atol=1e-6)
    _assert_same(_grads(fused, *out_f), _grads(plain, *out_p))
    with torch.no_grad():
        torch.testing.assert_close(fused(batch), plain(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_kernels_switch_gives_the_same_loss_and_gradients(name, schema, batch, helpers):
    """train.kernels (ops.dispatch): one model's training loss and every parameter gradient
    under kernels=native and kernels=reference, and its inference logits (the search reads the
    tables at the raw ids). Float32 on both sides, summed in another order: float rounding."""
    torch.manual_seed(0)
    model = build_model(name, schema)
    params = [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for setting in ("native", "reference"):
        with dispatch.using(setting):
            _, loss = helpers["training_loss"](model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                logits = model(batch)
        runs[setting] = (loss.detach(), grads, logits)
    (loss_n, grads_n, logits_n), (loss_r, grads_r, logits_r) = runs.values()
    torch.testing.assert_close(loss_n, loss_r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits_n, logits_r, rtol=1e-5, atol=1e-6)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    _assert_same(dict(zip(names, grads_n, strict=True)), dict(zip(names, grads_r, strict=True)))


@pytest.mark.parametrize("name", MODELS)
def test_one_lookup_for_history_and_targets_changes_nothing(name, schema, batch):
    torch.manual_seed(0)
    model = build_model(name, schema)
    shared = model.forward_train(batch)  # targets gathered from the history's rows
    separate = model._run(model.encode_user(batch), batch, aux=model.aux_head is not None)
    separate = (
        separate[0],
        [(separate[1], model.params.aux_weight)] if separate[1] is not None else [],
    )
    torch.testing.assert_close(shared[0], separate[0], rtol=1e-6, atol=1e-7)
    _assert_same(_grads(model, *shared), _grads(model, *separate))


@pytest.mark.parametrize("name", MODELS)
def test_sparse_tables_give_the_dense_tables_gradients(name, schema, batch):
    """Sparse tables (the row-wise and sparse optimisers) look up distinct ids with their own
    backward (nn.embedding._LookupDistinctRowsSparse): same gradients as dense tables, padding
    row included (zero)."""
    torch.manual_seed(0)
    sparse = build_model(name, schema, sparse_embeddings=True)
    dense = build_model(name, schema)
    dense.load_state_dict(sparse.state_dict())
    out_s, out_d = sparse.forward_train(batch), dense.forward_train(batch)
    torch.testing.assert_close(out_s[0], out_d[0], rtol=1e-6, atol=1e-7)
    grads_s, grads_d = _grads(sparse, *out_s), _grads(dense, *out_d)
    assert any(g is not None and g.is_sparse for g in grads_s.values())
    _assert_same(
        {n: g.to_dense() if g is not None and g.is_sparse else g for n, g in grads_s.items()},
        grads_d,
    )


@pytest.mark.parametrize("name", ["dare", "twin", "twin_4e"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("row_owned", [False, True])
def test_training_reads_the_tables_as_it_read_the_distinct_rows(
    name, sparse, row_owned, schema, batch, monkeypatch
):
    """With the fused search, training reads the tables at the batch's ids
    (`read_tables`, nn.embedding.table_rows) instead of copying the batch's distinct rows out:
    the same logits and table gradients (dense or sparse, the targets' share included), through
    both of the search backward's ways to the rows' gradients."""
    if row_owned:
        monkeypatch.setattr(search_attention, "ROW_OWNED_BYTES", 0)
    torch.manual_seed(0)
    direct = build_model(name, schema, sparse_embeddings=sparse)
    copied = build_model(name, schema, {"read_tables": False}, sparse_embeddings=sparse)
    copied.load_state_dict(direct.state_dict())
    if schema.multi_fields():  # the fused search does not take multi-valued fields
        keys, _ = direct.towers.keys_and_values(
            batch, direct.towers.distinct_ids(batch, True), {}, direct=True
        )
        assert all(f.table is None for f in keys.fields)
        return
    keys, _ = direct.towers.keys_and_values(
        batch, direct.towers.distinct_ids(batch, True), {}, direct=True
    )
    assert all(f.table is not None for f in keys.fields)  # the path under test is taken
    out_d, out_c = direct.forward_train(batch), copied.forward_train(batch)
    torch.testing.assert_close(out_d[0], out_c[0], rtol=0, atol=0)
    grads_d, grads_c = _grads(direct, *out_d), _grads(copied, *out_c)
    dense = {n: g.to_dense() if g is not None and g.is_sparse else g for n, g in grads_d.items()}
    assert sparse == any(g is not None and g.is_sparse for g in grads_d.values())
    _assert_same(
        dense, {n: g.to_dense() if g is not None and g.is_sparse else g for n, g in grads_c.items()}
    )
