"""Fault injection for the reliability tests: naslung run as a user runs it (its own process),
on a filesystem that fills up, and the processes it leaves behind.

A full disk is a tmpfs of a few hundred KiB mounted for the test where this process may mount
one (root with CAP_SYS_ADMIN, as on the development and CI machines); elsewhere the child gets
a file size limit (RLIMIT_FSIZE) instead, so writes past it fail with EFBIG where ENOSPC would.
Either way the failure happens inside the kernel, for Python and C++ (SimpleITK) writers alike.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def naslung_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "naslung", *map(str, args)]


def run_naslung(*args: object, cwd: Path | None = None, file_size_limit: int | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``naslung ARGS`` in a child process, optionally with writes limited to ``file_size_limit``
    bytes per file."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(naslung_command(*args), cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit if file_size_limit is not None else None)


@dataclass
class FullDisk:
    """A folder whose filesystem runs out of space, and how to run naslung writing there."""

    folder: Path
    file_size_limit: int | None
    """Set when no tmpfs could be mounted: the per-file limit standing in for a full disk."""

    def run(self, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run_naslung(*args, cwd=cwd, file_size_limit=self.file_size_limit)


@contextlib.contextmanager
def full_disk(folder: Path, size_kib: int) -> Iterator[FullDisk]:
    """``folder`` on a tmpfs of ``size_kib`` KiB, or with a file size limit of that much."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield FullDisk(folder, None if mounted else size_kib * 1024)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def temporary_leftovers(folder: Path) -> list[Path]:
    """Temporary files or folders naslung would have left under ``folder``."""
    return [p for p in folder.rglob("*") if ".naslung-tmp" in p.name or ".tmp-" in p.name]


def one_error_line(stderr: str) -> str:
    """The single ``naslung: error:`` line a failed command prints, checked to be all it printed."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("naslung: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def start(args: Sequence[object], **kwargs) -> subprocess.Popen:
    """``naslung ARGS`` started in its own session (so a signal can go to its whole group)."""
    return subprocess.Popen(naslung_command(*args), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the process group, as a terminal's Ctrl-C does."""
    os.killpg(process.pid, signum)
