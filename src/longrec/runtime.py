"""Where a model computes and in which precision: `train.device` and `train.precision` (and the
ranker's `--device` / `--precision`) resolved in one place, so that training, evaluation, the
training benchmark and serving agree, and a run records what `auto` chose.

Why `auto` detects instead of assuming: bf16 pays only where the hardware computes it natively
(CUDA compute capability 8.0+, AMX or AVX-512 BF16 on x86). Elsewhere bf16 matrix products run on
a conversion path, 4.7x slower than fp32 on a CPU without them (BENCHMARKS.md).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from longrec.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# /proc/cpuinfo flags of CPUs that compute bf16 matrix products natively
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# precision=auto on such a CPU. Off: on avx512_bf16 (no AMX) the demo's models trained as well
# in bf16 but no faster (0.7-1.0x; their GEMMs are too small), BENCHMARKS.md "Precision on a
# CPU with native bf16"; set train.precision=bf16 for large models
CPU_BF16_AUTO = False


def check_device(setting: str, name: str = "train.device") -> None:
    """UserError (one line, naming the setting) for a value that names no device."""
    if not isinstance(setting, str) or not DEVICE_PATTERN.fullmatch(setting):
        raise UserError(f"{name} = {setting!r}: expected auto, cpu, cuda or cuda:N")


def check_precision(setting: str, name: str = "train.precision") -> None:
    if setting not in PRECISIONS:
        raise UserError(f"{name} = {setting!r}: expected {', '.join(PRECISIONS)}")


def available_devices() -> str:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "cpu" + "".join(f", cuda:{i}" for i in range(n))


def resolve_device(setting: str, name: str = "train.device") -> torch.device:
    """auto: the (first, or this process's LOCAL_RANK) GPU when CUDA is available, else the CPU.
    Under several processes a bare `cuda` is each process's own GPU."""
    check_device(setting, name)
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{name} = {setting}: CUDA is not available here (available: cpu)")
    if setting in ("auto", "cuda"):
        index = int(os.environ.get("LOCAL_RANK", 0))
    else:
        index = int(setting.partition(":")[2])
    if index >= torch.cuda.device_count():
        raise UserError(f"{name} = {setting}: no GPU {index} (available: {available_devices()})")
    return torch.device("cuda", index)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of /proc/cpuinfo text (its first `flags` line)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_computes_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the given /proc/cpuinfo text) has AMX or AVX-512 BF16. Without
    /proc/cpuinfo PyTorch's own cpuinfo probe answers; get_cpu_capability() cannot (its
    "AVX512" says nothing about bf16), so anything else counts as no."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
            return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return bool(cpu_flags(cpuinfo) & NATIVE_BF16_FLAGS)


def resolve_precision(
    setting: str,
    device: torch.device,
    name: str = "train.precision",
    cpuinfo: str | None = None,
    cpu_auto: bool | None = None,
) -> tuple[str, str]:
    """(fp32 | bf16, why). auto: bf16 on CUDA with compute capability 8.0+, and on a CPU that
    computes bf16 natively when `cpu_auto` (default CPU_BF16_AUTO); fp32 otherwise."""
    check_precision(setting, name)
    cuda = device.type == "cuda"
    if cuda:
        major, minor = torch.cuda.get_device_capability(device)
        hardware, native = f"sm{major}{minor}", major >= 8
    else:
        native = cpu_computes_bf16(cpuinfo)
        hardware = "CPU with native bf16" if native else "CPU without native bf16"
    if setting == "bf16" and cuda and not native:
        raise UserError(f"{name} = bf16: {device} ({hardware}) does not compute bf16; use fp32")
    if setting != "auto":
        return setting, "set"
    if not native:
        return "fp32", f"auto: {hardware}"
    if not cuda and not (CPU_BF16_AUTO if cpu_auto is None else cpu_auto):
        return "fp32", f"auto: {hardware}; bf16 on a CPU only when set (not faster at small widths)"
    return "bf16", f"auto: {hardware}"


@dataclass(frozen=True)
class Runtime:
    """A resolved device and precision, and the settings they came from."""

    device: torch.device
    precision: str  # fp32 | bf16
    why: str = "set"  # how the precision was chosen
    settings: tuple[str, str] = ("auto", "auto")  # (device, precision) as given

    @classmethod
    def resolve(
        cls,
        device: str,
        precision: str,
        names: tuple[str, str] = ("train.device", "train.precision"),
    ) -> Runtime:
        check_precision(precision, names[1])
        dev = resolve_device(device, names[0])
        chosen, why = resolve_precision(precision, dev, names[1])
        return cls(dev, chosen, why, (device, precision))

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self, enabled: bool | None = None):
        """bf16 autocast on this device's type (`enabled` overrides the precision)."""
        on = self.bf16 if enabled is None else enabled
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def put(self, batch):
        """`batch` on this device (the CPU batch itself on the CPU)."""
        return batch if self.device.type == "cpu" else batch.to(self.device)

    def synchronize(self) -> None:
        """Wait for queued device work (timings on CUDA would otherwise stop early)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def rng_state(self) -> dict:
        """The generators a step draws from: the CPU's, and this GPU's on CUDA."""
        state = {"torch_rng": torch.get_rng_state()}
        if self.cuda:
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, saved: dict) -> None:
        """Restore (and pop from `saved`) what `rng_state` saved; a checkpoint from another
        device type restores the CPU generator only."""
        torch.set_rng_state(saved.pop("torch_rng"))
        cuda_rng = saved.pop("cuda_rng", None)
        if cuda_rng is not None and self.cuda:
            torch.cuda.set_rng_state(cuda_rng, self.device)

    def record(self) -> dict:
        """What the run computed on, for log.jsonl."""
        return {"device": str(self.device), "precision": self.precision, "precision_why": self.why}

    def describe(self) -> str:
        """One line for stderr: what was chosen, and from which settings."""
        dev = f"device {self.device}" + (" (auto)" if self.settings[0] == "auto" else "")
        return f"{dev}, precision {self.precision} ({self.why})"
