"""Safe file output: nothing half-written, and nothing of the user's replaced by mistake.

* Every file is written by `write_atomically`: into a temporary file beside the target, fsynced,
  renamed over the target, and the folder fsynced, so a reader sees the old file or the whole
  new one. A write that fails (a full disk, a read-only folder) raises `OutputError` naming the
  file, and leaves no temporary file behind.
* Only a regular file (or nothing) is ever replaced. A symbolic link, a device, a FIFO or a
  folder at the target is refused: naslung never writes through a link or over a device node.
  Commands check their outputs this way, and that the folder takes a file, before any work
  (`check_output_file`, `check_output_dir`).
* A set of files that belongs together (a crop store, an explanation folder) is built in a
  temporary folder and renamed into place (`replace_dir`).
* Temporary names end in ``.naslung-tmp-<host>-<pid>``: a writer killed outright (SIGKILL)
  cannot remove its own, so the next writer into that folder on the same host removes those
  whose process is gone (`sweep_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".naslung-tmp"
_TMP_NAME = re.compile(re.escape(TMP_MARK) + r"[a-z]*-(?P<host>.+)-(?P<pid>\d+)$")
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_swept: set[Path] = set()


class OutputError(RuntimeError):
    """An output that cannot or must not be written; str(err) is one line naming it."""


def temp_path(target: Path, tag: str = "") -> Path:
    """This process's temporary name for ``target`` (``tag`` tells several apart)."""
    return target.with_name(f".{target.name}{TMP_MARK}{tag}-{_HOST}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(folder: Path) -> None:
    """Remove the temporary files and folders that dead naslung writers of this host left in
    ``folder`` (once per folder and process)."""
    if folder in _swept:
        return
    _swept.add(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TMP_NAME.search(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)


def describe_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def refuse_non_regular(path: Path, label: str = "") -> None:
    """`OutputError` if something other than a regular file is at ``path``."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there (`probe_writable` tells what is wrong with the folders above)
    except OSError as err:
        raise OutputError(f"{label}{path} cannot be written: {_reason(err)}") from err
    if not stat.S_ISREG(mode):
        raise OutputError(f"{label}{path} is {describe_kind(mode)}; naslung writes only regular "
                          "files, never through a link or over a device, so give a file path")


def probe_writable(path: Path, label: str = "") -> None:
    """`OutputError` unless a file can be created where ``path`` will go: in ``path``'s nearest
    existing folder, by creating (and removing) a file there, which also catches read-only
    filesystems and permissions that an access() check misses."""
    path = Path(os.path.abspath(path))
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise OutputError(f"{label}{path} cannot be written: {existing} is not a folder")
    probe = temp_path(existing / "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{label}{path} cannot be written: {existing}: {_reason(err)}") from err


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Before any work: ``path`` is absent or a regular file, in a folder that takes files."""
    path = Path(path)
    label = f"{option} " if option else ""
    refuse_non_regular(path, label)
    probe_writable(path.parent, label)
    return path


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Before any work: ``path`` is absent or a folder (a link to one is fine: files go inside
    it), and files can be created there."""
    path = Path(path)
    label = f"{option} " if option else ""
    if os.path.lexists(path) and not path.is_dir():
        mode = os.lstat(path).st_mode
        kind = "a file" if stat.S_ISREG(mode) else describe_kind(mode)
        raise OutputError(f"{label}{path} is {kind}; give a folder")
    probe_writable(path, label)
    return path


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` for the ``with`` block to write; when the block ends
    without error it is fsynced and renamed over ``path`` (and the folder fsynced), else removed.

    `OutputError` when ``path`` is not a regular file or the write fails for want of space or
    permission; nothing is left behind then.
    """
    path = Path(path)
    refuse_non_regular(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as err:
        failure = _as_output_error(err, path)
        if failure is err:
            raise
        raise failure from err
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def make_dirs(folder: Path) -> Path | None:
    """Create ``folder`` and its missing parents; the topmost folder created (None if it was
    there), so that a failed command can remove what it made."""
    folder = Path(os.path.abspath(folder))
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    folder.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and put the file in place as `staged_file` does."""
    with staged_file(path) as tmp:
        write(tmp)
    return Path(path)


def _as_output_error(err: Exception, path: Path) -> Exception:
    """A failed write as one line; errors that are not about the output are passed on as is.
    Some writers (torch.save) turn ENOSPC into their own exception, so a full disk is asked
    for directly."""
    if isinstance(err, OutputError):
        return err
    if isinstance(err, OSError):
        return OutputError(f"cannot write {path}: {_reason(err)}")
    if disk_full(path.parent):
        return OutputError(f"cannot write {path}: {os.strerror(errno.ENOSPC)}")
    return err


def disk_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def json_text(data: Any) -> str:
    """naslung's JSON files: indented, keys sorted, anything else as its str()."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json_text(data))


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folders themselves."""
    for root, _, names in os.walk(folder):
        for name in names:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def replace_dir(new: Path, target: Path) -> None:
    """Move folder ``new`` to ``target``, replacing what is there; ``target`` is missing only
    between two renames, and the old folder is deleted afterwards. The caller has checked that
    what is at ``target`` may be replaced."""
    old = temp_path(target, "old")
    shutil.rmtree(old, ignore_errors=True)
    try:
        if os.path.lexists(target):
            os.replace(target, old)
        os.replace(new, target)
        fsync_dir(target.parent)
    except OSError as err:
        if os.path.lexists(old) and not os.path.lexists(target):
            os.replace(old, target)  # put the old one back
        raise OutputError(f"cannot put {target} in place: {_reason(err)}") from err
    shutil.rmtree(old, ignore_errors=True)


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__
