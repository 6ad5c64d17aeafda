"""glibc malloc settings that keep freed activation buffers in the process.

Training allocates and frees the same large activation and gradient tensors every step. glibc
serves each allocation above its mmap threshold with a fresh `mmap` (and gives heap memory
above the trim threshold back to the kernel), so every step page-faults its buffers in again:
in `torch.profiler` this shows as `fill_` taking 10-20% of a step (zero-filling a just-mapped
[B, L, 1, d] gradient runs at ~5 GB/s instead of ~20). Raising both thresholds keeps the pages
mapped and reused: measured here, STCA at history 200 x batch 2048 trains 1.7x faster and DARE
1.4x (BENCHMARKS.md, "Memory allocator").

Large tensors also get transparent huge pages: PyTorch's `THP_MEM_ALLOC_ENABLE=1` aligns
allocations of 2 MiB and more and advises the kernel to back them with 2 MiB pages. Embedding
tables are read and updated at random rows, so with 4 KiB pages nearly every row costs a TLB
miss: with a 6.2M-item vocabulary, DARE trained 4-15% and inferred 14-65% faster with huge pages
(BENCHMARKS.md). PyTorch reads the variable once, at its first allocation, so it is set here,
before longrec imports torch; it does nothing when torch was imported and used first, or where
the kernel's THP setting is `never`.

Applied once, when longrec is imported; `LONGREC_MALLOC_TUNING=0` turns both off (an explicit
`THP_MEM_ALLOC_ENABLE` is respected). Only glibc is touched (elsewhere this does nothing). The
cost: freed memory is kept for reuse rather than returned to the operating system, so a
process's RSS stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only beyond 2 GiB of free heap top
TOP_PAD = 2**30  # grow the heap in 1 GiB steps (virtual: pages are mapped when touched)

_applied: bool | None = None


def tune_malloc() -> bool:
    """Apply the settings (once); True if glibc accepted them."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("LONGREC_MALLOC_TUNING", "1") == "0":
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by PyTorch's CPU allocator
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    _applied = ok
    return ok
