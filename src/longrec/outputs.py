"""Output folders that longrec owns: a marker, a writer lock, stale-temp cleanup, atomic replace.

`--overwrite` must never delete what longrec did not write, and two processes writing the same
`--out` must not both succeed. So every folder longrec writes (a prepared dataset, a synth
output, a run, a token store) carries a marker file naming its kind; an existing folder is
replaced only when its marker (or, for folders written before markers existed, its own
descriptor file) says it is that kind. Writers hold an exclusive lock on `.NAME.lock` beside
the folder for as long as they write it (fcntl.flock: the kernel releases it when the process
dies, so a killed writer never blocks the next one). Builders write into `.NAME.tmp-PID` and
rename into place; under the lock, temporaries whose process is gone are debris and removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml

from longrec.errors import UserError

Kind = Literal["dataset", "synth", "run", "token-store"]
MARKER = ".longrec.json"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:synth-)?(?:tmp|old)-(?P<pid>\d+)$")


def write_marker(folder: Path, kind: Kind) -> None:
    """Mark `folder` as written by longrec (before it is renamed into place)."""
    from longrec import __version__

    body = {"kind": kind, "longrec_version": __version__, "created_at": time.time()}
    (Path(folder) / MARKER).write_text(json.dumps(body) + "\n")


def _legacy_kind(folder: Path) -> str | None:
    """The kind of a folder written before markers existed, from its own descriptor file."""
    try:
        if (folder / "meta.json").is_file():
            meta = json.loads((folder / "meta.json").read_text())
            if isinstance(meta, dict) and {"format_version", "longrec_version"} <= meta.keys():
                return "dataset"
            if isinstance(meta, dict) and {"token", "source_model"} <= meta.keys():
                return "token-store"
        if (folder / "manifest.json").is_file():
            manifest = json.loads((folder / "manifest.json").read_text())
            if isinstance(manifest, dict) and manifest.get("format") == "longrec-synth/1":
                return "synth"
        if (folder / "config.yaml").is_file():
            body = yaml.safe_load((folder / "config.yaml").read_text())
            if isinstance(body, dict) and {"schema", "model", "train", "data"} <= body.keys():
                return "run"
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return None


def kind_of(folder: Path) -> str | None:
    """What longrec wrote in `folder` ('dataset', 'synth', 'run', ...), or None."""
    folder = Path(folder)
    try:
        body = json.loads((folder / MARKER).read_text())
        if isinstance(body, dict) and isinstance(body.get("kind"), str):
            return body["kind"]
    except (OSError, ValueError):
        pass
    return _legacy_kind(folder)


def check_replaceable(out: Path, kind: Kind, overwrite: bool, hint: str = "") -> bool:
    """Whether `out` holds something to replace; UserError unless that is allowed and safe.

    An absent or empty folder is free. A non-empty one needs `overwrite` and must be a longrec
    folder of the same kind: anything else (a user's folder, a run where a dataset should go)
    is refused with one line and left untouched.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return False
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another output path")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise UserError(f"{out}: cannot read it ({e.strerror})") from None
    if empty:
        return False
    if not overwrite:
        raise UserError(f"{out} already exists; {hint or 'pass --overwrite to replace it'}")
    found = kind_of(out)
    if found != kind:
        what = f"a longrec {found}" if found else "not something longrec wrote"
        raise UserError(
            f"{out} is {what}, not a longrec {kind}; --overwrite only replaces a {kind} "
            "longrec wrote: choose another output path or remove it yourself"
        )
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` / `.NAME.old-PID` folders beside `out` whose process is gone.

    Call it while holding `out`'s lock: then no live longrec process is writing them.
    """
    out = Path(out)
    removed = []
    with contextlib.suppress(OSError):
        for entry in out.parent.iterdir():
            m = _TEMP.match(entry.name)
            if not m or m["name"] != out.name:
                continue
            pid = int(m["pid"])
            if pid == os.getpid() or _alive(pid):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def temp_path(out: Path, tag: str = "tmp") -> Path:
    """`.NAME.TAG-PID` beside `out`: the name `remove_stale_temps` recognises."""
    out = Path(out)
    return out.parent / f".{out.name}.{tag}-{os.getpid()}"


@contextlib.contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive writer lock of `out` (`.NAME.lock` beside it) or refuse in one line.

    The lock file is removed on release; a waiter that opened it before the removal notices
    (its open file is no longer the one at the path) and refuses instead of holding a lock on
    an orphaned file.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out.parent}: {e.strerror}") from None
    path = out.parent / f".{out.name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write beside {out} ({path}: {e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise UserError(
                f"{out} is being written by another longrec process (lock {path}); "
                "wait for it or choose another output path"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise UserError(f"{out} was just written by another longrec process; run again")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        remove_stale_temps(out)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


def replace_dir(build: Path, out: Path) -> None:
    """Move the finished `build` to `out`, replacing what is there (checked beforehand)."""
    build, out = Path(build), Path(out)
    if out.exists() or out.is_symlink():
        old = temp_path(out, "old")
        os.rename(out, old)
        os.rename(build, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.rename(build, out)


def retire_dir(out: Path) -> None:
    """Move `out` aside and delete it, so a new writer starts from nothing.

    A kill in between leaves `.NAME.old-PID`, which the next writer removes.
    """
    out = Path(out)
    if not out.exists():
        return
    old = temp_path(out, "old")
    os.rename(out, old)
    shutil.rmtree(old)
