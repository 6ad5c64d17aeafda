"""Table-wise sharded embeddings (TorchRec) with 2 CPU processes (gloo).

A tiny DARE model has its four tables (attention/representation x item/category) sharded
table-wise; both ranks train on identical data, so every step must match a plain single-process
model with the same init: a sharded table receives the average of the ranks' (equal) gradients.
"""

from __future__ import annotations

import copy
import os
import socket
import time

import pytest
import torch

pytest.importorskip("torchrec")

pytestmark = pytest.mark.slow

WORLD = 2
N_ITEMS, N_CATS, L = 40, 8, 8


def _schema():
    from longrec.data.schema import FieldSpec
    from longrec.models.base import DataSchema

    fields = {"item": FieldSpec("item", N_ITEMS), "category": FieldSpec("category", N_CATS)}
    return DataSchema(fields, ("item", "category"), n_users=10, max_len=L)


def _batch(seed: int = 0):
    """B=4 requests, M=2 targets, left-padded histories of lengths 8, 5, 2 and 0."""
    from longrec.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    b, m = 4, 2
    mask = torch.zeros(b, L, dtype=torch.bool)
    for r, n in enumerate((8, 5, 2, 0)):
        mask[r, L - n :] = True
    items = torch.randint(2, N_ITEMS, (b, L), generator=g) * mask
    t_items = torch.randint(2, N_ITEMS, (b, m), generator=g)
    t_mask = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    t_items = t_items * t_mask

    def cat(x):
        return torch.where(x >= 2, 2 + x % 6, 0)

    return Batch(
        user=torch.arange(b),
        history={"item": items, "category": cat(items)},
        history_mask=mask,
        history_ts=torch.arange(L).expand(b, L) * mask,
        target={"item": t_items, "category": cat(t_items)},
        target_ts=torch.full((b, m), 100),
        label=torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
        target_mask=t_mask,
    )


def _loss(model, batch):
    from longrec.train.loop import masked_bce

    logits, aux = model.forward_train(batch)
    loss = masked_bce(logits, batch.label, batch.target_mask)
    for a, w in aux:
        loss = loss + w * masked_bce(a, batch.label, batch.target_mask)
    return logits, loss


def _check(rank: int) -> None:
    import torch.distributed as dist
    from torch import nn

    from longrec.models.two_stage import TwoStageModel, TwoStageParams
    from longrec.train.optim import set_lr
    from longrec.train.sharded import ShardedEmbedding, shard_embeddings

    torch.manual_seed(0)  # the same init on every rank, as the Trainer does
    params = TwoStageParams(embed_dim=4, pos_dim=4, top_k=L, hidden=(8,), init_std=0.1)
    model = TwoStageModel(_schema(), params)
    ref = copy.deepcopy(model)  # plain tables, trained in this process alone
    n_ref = sum(p.numel() for p in ref.parameters())
    tables = shard_embeddings(model, WORLD, tables=("item", "category"), optimizer="sgd", lr=1.0)
    paths = [s.path for s in tables.specs.values()]
    assert sorted(paths) == sorted(
        f"towers.sets.{s}.tables.{f}" for s in ("attn", "repr") for f in ("item", "category")
    )

    # (a) table-wise: each table lives whole on exactly one rank; the model holds none of them
    placement = tables.placement()
    assert all(len(r) == 1 for r in placement.values()), placement
    local = {n for n, shards in tables.local_shards().items() if shards}
    everyone: list = [None] * WORLD
    dist.all_gather_object(everyone, sorted(local))
    assert set(everyone[0]).isdisjoint(everyone[1]) and len(everyone[0]) == len(everyone[1]) == 2
    assert set(everyone[0]) | set(everyone[1]) == set(placement)
    for name, shards in tables.local_shards().items():
        if name in local:
            ((offset, t),) = shards
            spec = tables.specs[name]
            assert offset == (0, 0) and tuple(t.shape) == (spec.rows, spec.dim)
            assert placement[name] == [rank]
    table_params = sum(s.rows * s.dim for s in tables.specs.values())
    assert sum(p.numel() for p in model.parameters()) == n_ref - table_params
    assert all(p.shape[0] == L + 1 for p in model.embedding_parameters())  # position tables
    assert all(isinstance(model.get_submodule(p), ShardedEmbedding) for p in paths)

    # (b) forward: the same rows as the plain table, padding row 0 zero
    ids = torch.tensor([[0, 3, 3, 7], [5, 1, 0, 2]])
    for path in paths:
        got = model.get_submodule(path)(ids)
        assert torch.equal(got, ref.get_submodule(path)(ids)), path
        assert got.shape == (2, 4, 4) and not got[0, 0].any()

    # (c) one SGD step with a known gradient; the lr goes through the Trainer's set_lr
    opts = tables.optimizers()
    assert len(opts) == 1
    set_lr(opts, 0.5)  # initial lr 1.0 -> 0.5
    for opt in opts:
        opt.zero_grad()  # pushes the lr into the fused kernel
    path = "towers.sets.attn.tables.item"
    grad = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1))
    (model.get_submodule(path)(ids) * grad).sum().backward()
    for opt in opts:
        opt.step()
    plain = ref.get_submodule(path)
    with torch.no_grad():  # expected: SGD on the plain table (no update of the padding row)
        g = torch.zeros_like(plain.weight).index_add_(0, ids.reshape(-1), grad.reshape(-1, 4))
        g[0] = 0
        plain.weight -= 0.5 * g
    name = path.replace(".", "__")
    if name in local:
        ((_, t),) = tables.local_shards()[name]
        assert torch.allclose(t, plain.weight, atol=1e-6)
    assert torch.allclose(model.get_submodule(path)(ids), plain(ids), atol=1e-6)

    # (d) whole-model training: sharded == plain, step by step, and the loss falls
    batch = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        for o in (opt, ref_opt, *opts):
            o.zero_grad()
        logits, loss = _loss(model, batch)
        ref_logits, ref_loss = _loss(ref, batch)
        assert torch.allclose(logits, ref_logits, atol=1e-5), (logits, ref_logits)
        loss.backward()
        ref_loss.backward()
        for o in (opt, ref_opt, *opts):
            o.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch), ref.eval()(batch), atol=1e-5)
    seen: list = [None] * WORLD
    dist.all_gather_object(seen, losses)
    assert seen[0] == seen[1]

    # per-rank checkpoint round trip
    state = tables.state_dict()
    with torch.no_grad():
        for shards in tables.local_shards().values():
            for _, t in shards:
                t.add_(1.0)
    tables.load_state_dict(state)
    for name, shards in tables.local_shards().items():
        for (_, t), saved in zip(shards, state["weights"][name], strict=True):
            assert torch.equal(t, saved)

    # export: plain tables with the trained weights on rank 0 equal the plain model's
    if tables.unshard(model, dst=0):
        assert rank == 0
        for p in paths:
            assert isinstance(model.get_submodule(p), nn.Embedding)
        ours, theirs = model.state_dict(), ref.state_dict()
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert torch.allclose(ours[k], theirs[k], atol=1e-5), k
    else:
        assert rank == 1
    dist.barrier()


def _worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _check(rank)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_table_wise_sharding_matches_plain_tables():
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker, args=(_free_port(),), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300  # a hang (mismatched collectives) must not hang pytest
    try:
        while not ctx.join(timeout=5):  # raises with the worker's traceback if one fails
            if time.monotonic() > deadline:
                pytest.fail("sharded-embedding workers did not finish in 300 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in ctx.processes] == [0] * WORLD  # both exited cleanly
