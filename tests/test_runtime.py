"""Device and precision resolution (longrec/runtime.py): what auto picks, and one-line errors
for what this machine cannot do. CUDA is faked where the logic is under test, real where the
test says it needs a GPU."""

from __future__ import annotations

import pytest
import torch

from longrec import runtime
from longrec.errors import UserError
from longrec.runtime import Runtime, cpu_computes_bf16, cpu_flags, resolve_device, resolve_precision

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_vnni {extra}
bogomips\t: 4000.00
"""
SAPPHIRE_RAPIDS = CPUINFO.format(vendor="GenuineIntel", extra="amx_bf16 amx_tile amx_int8")
ZEN4 = CPUINFO.format(vendor="AuthenticAMD", extra="avx512_bf16")
SKYLAKE = CPUINFO.format(vendor="GenuineIntel", extra="")
CPU = torch.device("cpu")


@pytest.fixture
def fake_gpus(monkeypatch):
    """fake_gpus(n, capability): torch.cuda reports n GPUs of that compute capability."""

    def _fake(n: int, capability: tuple[int, int] = (8, 0)) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return _fake


def test_cpuinfo_flags_are_parsed_from_the_text():
    assert {"amx_bf16", "avx512f"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu_flags("processor : 0\n") == set()
    assert cpu_computes_bf16(SAPPHIRE_RAPIDS)  # AMX
    assert cpu_computes_bf16(ZEN4)  # AVX-512 BF16
    assert not cpu_computes_bf16(SKYLAKE)  # AVX-512 without bf16: a conversion path
    assert not cpu_computes_bf16("")


def test_auto_precision_on_a_cpu_follows_its_flags_and_the_switch(monkeypatch):
    assert resolve_precision("auto", CPU, cpuinfo=SKYLAKE)[0] == "fp32"
    for native in (SAPPHIRE_RAPIDS, ZEN4):
        assert resolve_precision("auto", CPU, cpuinfo=native, cpu_auto=True)[0] == "bf16"
        chosen, why = resolve_precision("auto", CPU, cpuinfo=native, cpu_auto=False)
        assert chosen == "fp32" and "only when set" in why
    # without an explicit cpu_auto, the module's switch decides
    monkeypatch.setattr(runtime, "CPU_BF16_AUTO", True)
    assert resolve_precision("auto", CPU, cpuinfo=ZEN4) == ("bf16", "auto: CPU with native bf16")
    monkeypatch.setattr(runtime, "CPU_BF16_AUTO", False)
    assert resolve_precision("auto", CPU, cpuinfo=ZEN4)[0] == "fp32"


def test_set_precisions_are_kept_on_a_cpu():
    assert resolve_precision("bf16", CPU, cpuinfo=SKYLAKE) == ("bf16", "set")
    assert resolve_precision("fp32", CPU, cpuinfo=ZEN4) == ("fp32", "set")


def test_auto_precision_on_cuda_needs_compute_capability_8(fake_gpus):
    gpu = torch.device("cuda", 0)
    fake_gpus(1, (9, 0))
    assert resolve_precision("auto", gpu) == ("bf16", "auto: sm90")
    fake_gpus(1, (7, 5))
    assert resolve_precision("auto", gpu) == ("fp32", "auto: sm75")
    with pytest.raises(UserError, match=r"train.precision = bf16: cuda:0 \(sm75\) does not"):
        resolve_precision("bf16", gpu)


def test_devices_resolve_and_unavailable_ones_are_one_line(fake_gpus, monkeypatch):
    fake_gpus(0)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    with pytest.raises(UserError) as err:
        resolve_device("cuda")
    assert str(err.value) == "train.device = cuda: CUDA is not available here (available: cpu)"
    with pytest.raises(UserError, match=r"train.device = 'gpu': expected auto, cpu, cuda"):
        resolve_device("gpu")
    fake_gpus(2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a data-parallel process: its own GPU
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU
    with pytest.raises(
        UserError, match=r"--device = cuda:2: no GPU 2 \(available: cpu, cuda:0, cuda:1\)"
    ):
        resolve_device("cuda:2", "--device")


def test_runtime_autocasts_on_its_device_type():
    rt = Runtime.resolve("cpu", "bf16")
    assert (rt.device, rt.precision, rt.bf16) == (CPU, "bf16", True)
    with rt.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with Runtime.resolve("cpu", "fp32").autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert rt.record() == {"device": "cpu", "precision": "bf16", "precision_why": "set"}
    assert "precision bf16" in rt.describe()
    with pytest.raises(UserError, match=r"train\.precision = 'fp16': expected auto, fp32, bf16"):
        Runtime.resolve("cpu", "fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_real_gpu_auto_is_cuda_and_batches_move_there():
    from longrec.data.batch import Batch

    rt = Runtime.resolve("auto", "auto")
    assert rt.device.type == "cuda"
    major, _ = torch.cuda.get_device_capability(rt.device)
    assert rt.precision == ("bf16" if major >= 8 else "fp32")
    ids = torch.zeros(2, 3, dtype=torch.int64)
    batch = Batch(
        ids[:, 0], {"item": ids}, ids.bool(), ids, {"item": ids[:, :1]}, ids[:, :1],
        ids[:, :1].float(), ids[:, :1].bool(),
    )  # fmt: skip
    moved = rt.put(batch.pin_memory())
    assert moved.history["item"].is_cuda and moved.label.is_cuda
    with rt.autocast(True):
        assert torch.mm(moved.label, moved.label.T).dtype == torch.bfloat16
