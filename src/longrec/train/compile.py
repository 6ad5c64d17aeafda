"""`train.compile`: torch.compile where it pays back its compile time.

Measured (BENCHMARKS.md, "torch.compile"): compiling a whole model's training forward loses
here (DARE 10x slower: its gathers, top-k and de-duplication become generic loops), while
compiling STCA's history SwiGLU stacks, the densest fixed-width part of the project, saves ~9%
per step after ~11 s of compiling (it pays back after ~140 steps). So "dense" compiles only the
modules that declare themselves worth it (`compile_dense = True`, e.g. nn.ffn.SwiGLUStack),
with dynamic shapes so that every history length reuses one graph. Off by default: short runs
(tests, the demo) never pay the compile time back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from longrec.errors import UserError

log = logging.getLogger(__name__)
COMPILE_MODES = ("none", "dense")


def compile_dense_modules(model: nn.Module, mode: str) -> list[str]:
    """Compile (in place: parameters and state_dict keys unchanged) every submodule that sets
    `compile_dense`; returns their names."""
    if mode not in COMPILE_MODES:
        raise UserError(f"train.compile must be one of {', '.join(COMPILE_MODES)}, got '{mode}'")
    if mode == "none":
        return []
    # Inductor's cache inside the project's cache dir unless the caller chose one (make does)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(".cache/inductor").resolve()))
    names = [name for name, m in model.named_modules() if getattr(m, "compile_dense", False)]
    for name in names:
        model.get_submodule(name).compile(dynamic=True)
    if names:
        log.info("train.compile=dense: compiled %s", ", ".join(names))
    else:
        log.warning(
            "train.compile=dense: %s has no dense stack to compile; running eager",
            type(model).__name__,
        )
    return names
