"""The loader's history gathers: the C++ copy per history (row_kernels.gather_ranges) against
the PyTorch index-matrix path, on the bundled Taobao sample; and when batches are prefetched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longrec.data import loader as loader_module
from longrec.data.dataset import PreparedDataset
from longrec.data.loader import BatchLoader, LoaderConfig, default_prefetch
from longrec.nn import row_kernels


def _torch_gather(values: torch.Tensor, lo: torch.Tensor, end: torch.Tensor, length: int):
    out = values.new_zeros((len(lo), length, *values.shape[1:]))
    for b, (a, e) in enumerate(zip(lo.tolist(), end.tolist(), strict=True)):
        if e > a:
            out[b, length - (e - a) :] = values[a:e]
    return out


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32])
@pytest.mark.parametrize("width", [None, 3])
def test_gather_ranges_left_pads_each_history(dtype, width):
    g = torch.Generator().manual_seed(0)
    shape = (500,) if width is None else (500, width)
    values = torch.randint(1, 1000, shape, generator=g).to(dtype)
    lo = torch.randint(0, 480, (40,), generator=g)
    end = torch.minimum(lo + torch.randint(0, 25, (40,), generator=g), torch.tensor(500))
    end[3] = lo[3]  # an empty history: all padding
    got = row_kernels.gather_ranges(values, lo, end, 24)
    assert got.dtype == dtype and got.shape == (40, 24, *shape[1:])
    assert torch.equal(got, _torch_gather(values, lo, end, 24))


def test_gather_ranges_refuses_ranges_outside_the_rows_or_too_long():
    values = torch.arange(10, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="history 1 is rows"):
        row_kernels.gather_ranges(values, torch.tensor([0, 8]), torch.tensor([3, 11]), 5)
    with pytest.raises(RuntimeError, match="longer than 2"):
        row_kernels.gather_ranges(values, torch.tensor([0]), torch.tensor([3]), 2)


@pytest.mark.parametrize("layout", ["pointwise", "request"])
@pytest.mark.parametrize("max_len", [50, 200])
@pytest.mark.parametrize("history_ts", [True, False])
def test_batches_equal_the_pytorch_gathers(
    prepared_taobao, monkeypatch, layout, max_len, history_ts
):
    """Real data: every history field, the timestamps (or zeros, for models that never read
    them) and the mask, short and long caps."""
    ds = PreparedDataset(prepared_taobao)
    cfg = LoaderConfig(
        batch_size=64,
        max_len=max_len,
        layout=layout,
        shuffle=True,
        prefetch=0,
        history_ts=history_ts,
    )
    fast = BatchLoader(ds, "train", cfg)
    requests = fast.batch_requests(0)[:3]
    got = [fast.make_batch(r) for r in requests]
    monkeypatch.setattr(loader_module.row_kernels, "available", lambda: False)
    want = [BatchLoader(ds, "train", cfg).make_batch(r) for r in requests]
    for a, b in zip(got, want, strict=True):
        assert a.history.keys() == b.history.keys()
        for name in a.history:
            assert torch.equal(a.history[name], b.history[name]), name
        assert torch.equal(a.history_ts, b.history_ts)
        assert history_ts == bool(a.history_ts.any())
        assert torch.equal(a.history_mask, b.history_mask)
        assert torch.equal(a.label, b.label)


def test_prefetch_only_with_a_spare_core(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(loader_module.os, "cpu_count", lambda: threads)
    assert default_prefetch() == 0
    monkeypatch.setattr(loader_module.os, "cpu_count", lambda: threads + 1)
    assert default_prefetch() == 2
    assert default_prefetch(world_size=2) == (2 if threads + 1 > 2 * threads else 0)


def test_prefetched_batches_equal_batches_built_in_line(prepared_taobao):
    ds = PreparedDataset(prepared_taobao)
    inline = BatchLoader(ds, "train", LoaderConfig(batch_size=128, shuffle=True, prefetch=0))
    ahead = BatchLoader(ds, "train", LoaderConfig(batch_size=128, shuffle=True, prefetch=2))
    for a, b in zip(inline.iter_epoch(0), ahead.iter_epoch(0), strict=True):
        assert np.array_equal(a.sample_index.numpy(), b.sample_index.numpy())
        assert torch.equal(a.history["item"], b.history["item"])
