"""Named kill points for fault-injection tests: `LONGREC_KILL_AT=NAME[:N]` SIGKILLs the process
the N-th time (default 1st) it reaches `fault_point(NAME)`.

A SIGKILL runs no handler, no `finally` and no atexit, which is exactly what a power cut or the
OOM killer does; the tests use it between named write steps of `prepare` and `train` to check
(and `synth`) that what is left is a finished artefact, one that resumes exactly, or one that is refused.
Unset (every normal run), a fault point is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("LONGREC_KILL_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
