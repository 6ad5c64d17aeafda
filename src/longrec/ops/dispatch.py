"""The one switch between the C++ kernels and the plain PyTorch operations they replace.

Why one switch: the fast paths are chosen at a dozen call sites (history reads, the search,
the PReLU, table lookups, the loader, the row-wise optimisers); each used to check the dtype,
the device and whether the extension had been built on its own. `use_native` is that check,
made once, under a process-wide setting:

* `auto` (the default): the C++ path where it applies (CPU float32 tensors, extension built),
  else the reference path;
* `reference`: the PyTorch path everywhere (the extension is not even built);
* `native`: the C++ path, and a one-line UserError naming the op where it cannot run (no
  compiler, other dtypes or devices), instead of a silent fallback: for benchmarks and tests
  that must measure or check the kernels themselves.

Both paths compute the same results to float rounding (tests/ops/test_parity.py).
`LONGREC_FUSED_KERNELS=0` in the environment is an alias of `reference`: it turns `auto` into
`reference` (and contradicts `native`). Structural conditions a kernel does not cover
(multi-valued fields, several PReLU weights, non-contiguous optimiser state...) stay with the
call sites and take the reference path under every setting.

The setting is process-wide, not per thread: the loader's prefetch thread follows it too. A
decision is taken when an op's forward runs; its backward follows that decision.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from longrec.errors import UserError

KERNELS = ("auto", "reference", "native")
ENV_ALIAS = "LONGREC_FUSED_KERNELS"  # "0": reference

_setting = "auto"


def check_kernels(value: object, name: str = "train.kernels") -> str:
    """`value` if it is a kernels setting, else a one-line UserError naming `name`."""
    if value not in KERNELS:
        raise UserError(f"{name} = {value!r}: expected {', '.join(KERNELS)}")
    return str(value)


def set_kernels(value: str, name: str = "kernels") -> None:
    """Sets the process-wide setting (the Trainer, the ranker and `longrec eval` do)."""
    global _setting
    _setting = check_kernels(value, name)


def kernels() -> str:
    """The setting in force: `auto` reads as `reference` under LONGREC_FUSED_KERNELS=0."""
    if _setting == "auto" and os.environ.get(ENV_ALIAS, "1") == "0":
        return "reference"
    return _setting


@contextmanager
def using(value: str) -> Iterator[None]:
    """Runs the block under another setting, restoring the previous one after (tests and
    benchmarks; process-wide, so not for concurrent callers)."""
    global _setting
    previous = _setting
    set_kernels(value)
    try:
        yield
    finally:
        _setting = previous


def for_run(
    value: str, model_params: Mapping[str, Any] | None = None, name: str = "train.kernels"
) -> str:
    """The setting a run uses: `value` (train.kernels, --kernels), with the superseded model
    parameter `fused_kernels: false` of older configs read as `reference`."""
    check_kernels(value, name)
    if model_params is not None and model_params.get("fused_kernels") is False:
        if value == "native":
            raise UserError(
                f"model.params.fused_kernels=false asks for the reference kernels and "
                f"{name}=native for the C++ ones: drop one (fused_kernels is superseded)"
            )
        return "reference"
    return value


def _extension_built() -> bool:
    from longrec.nn import row_kernels  # nn imports this module: imported when first needed

    return row_kernels.available()


def use_native(op: str, *tensors: Tensor, index: tuple[Tensor, ...] = ()) -> bool:
    """Whether `op` runs its C++ kernel on these float32 `tensors` (and integer `index`
    tensors, which must be on the CPU). Under `native`, a UserError where it cannot."""
    setting = kernels()
    if setting == "reference":
        return False
    fits = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and all(
        t.device.type == "cpu" for t in index
    )
    if setting == "auto":
        return fits and _extension_built()
    if os.environ.get(ENV_ALIAS, "1") == "0":
        raise UserError(f"kernels=native contradicts {ENV_ALIAS}=0 (an alias of reference)")
    if not fits:
        got = ", ".join(sorted({f"{t.dtype} on {t.device}" for t in (*tensors, *index)}))
        raise UserError(
            f"kernels=native: {op} runs on CPU tensors with float32 values only, got {got} "
            "(use kernels=auto to fall back to PyTorch)"
        )
    if not _extension_built():
        raise UserError(
            f"kernels=native: {op} needs the C++ extension, which could not be built "
            "(see the warning above; kernels=auto falls back to PyTorch)"
        )
    return True
