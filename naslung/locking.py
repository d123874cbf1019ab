"""One writer at a time per run directory or crop store, by an OS file lock.

Two processes writing one run (a second ``naslung-search --out X --resume`` while the first
runs) would both journal every candidate and leave the run unresumable. So each command that
writes a run directory holds an exclusive ``flock`` on the directory itself, and a store build
holds one on ``.<store>.lock`` beside the store (the store folder is replaced by a rename, so it
cannot carry its own lock). The kernel drops a lock when its process ends, however it ends, so
no lock is ever left stale. The holder's pid, for the message, comes from ``/proc/locks``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class LockedError(RuntimeError):
    """Another process is writing the same run or store; one line naming it."""


def _holder(fd: int) -> str:
    """The pid holding a flock on ``fd``'s file, as Linux lists it in /proc/locks."""
    info = os.fstat(fd)
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for fields in (line.split() for line in lines):
        if len(fields) >= 6 and "->" not in fields and fields[1] == "FLOCK" and fields[5] == key:
            return fields[4]
    return "unknown"


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a folder, or a file created if needed) for the
    ``with`` block, or raise `LockedError` at once if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{what} is in use by process {_holder(fd)}; wait for it to end or "
                              "choose another folder") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_run_dir(run_dir: Path, what: str = "run directory") -> contextlib.AbstractContextManager[None]:
    """The lock of a run directory (search, training, ensemble or export output), created if
    it does not exist yet."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return exclusive(run_dir, f"{what} {run_dir}")


def lock_store(data_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The lock of a crop store being built (and its work folder of finished scans)."""
    data_dir = Path(data_dir)
    return exclusive(data_dir.parent / f".{data_dir.name}.lock", f"crop store {data_dir}")
