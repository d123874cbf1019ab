"""Outputs under hostile conditions: links, devices and folders where a file goes, read-only and
full filesystems, and the leftovers of killed writers. Nothing a user had is replaced, every
failure is one line and exit 2, and no partial or temporary file is left."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess

import pytest
from conftest import random_ensemble
from faults import full_disk, one_error_line, run_naslung, temporary_leftovers

from naslung.fileio import OutputError, check_output_dir, check_output_file, write_atomically, write_text


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return random_ensemble(tmp_path_factory.mktemp("model"))["export"]


@pytest.fixture(scope="module")
def series_0001(shared_lidc):
    return next((shared_lidc / "LIDC-IDRI-0001").rglob("*.dcm")).parent


def kinds_of_non_files(tmp_path):
    """A symbolic link to a file, a dangling link, a FIFO and a folder, each where a file goes."""
    target = tmp_path / "target.json"
    target.write_text("precious")
    (tmp_path / "link.json").symlink_to(target)
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "folder.json").mkdir()
    return {"link.json": "a symbolic link", "dangling.json": "a symbolic link", "fifo.json": "a FIFO",
            "folder.json": "a folder"}


def test_the_atomic_writer_replaces_only_regular_files(tmp_path):
    for name, kind in kinds_of_non_files(tmp_path).items():
        before = os.lstat(tmp_path / name)
        with pytest.raises(OutputError, match=kind):
            write_text(tmp_path / name, "new")
        after = os.lstat(tmp_path / name)
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    assert (tmp_path / "target.json").read_text() == "precious"
    with pytest.raises(OutputError, match="a character device"):
        write_text("/dev/full", "new")
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)
    assert temporary_leftovers(tmp_path) == []


@pytest.mark.parametrize("errno_code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, errno_code):
    path = write_text(tmp_path / "report.json", "old")

    def write(tmp):
        tmp.write_text("half of the new")
        raise OSError(errno_code, os.strerror(errno_code))

    with pytest.raises(OutputError, match=f"cannot write {path}: {os.strerror(errno_code)}"):
        write_atomically(path, write)
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_outputs_are_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_file(tmp_path / "afile" / "report.json", "--out")
    with pytest.raises(OutputError, match="is a file; give a folder"):
        check_output_dir(tmp_path / "afile", "--out")
    with pytest.raises(OutputError, match="a character device"):
        check_output_file("/dev/null", "--out")
    assert check_output_dir(tmp_path / "new" / "run", "--out") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists() and temporary_leftovers(tmp_path) == []


def test_stale_temporary_files_of_killed_writers_are_swept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale_file = tmp_path / f".report.json.naslung-tmp-{host}-{dead.pid}"
    stale_dir = tmp_path / f".store.naslung-tmp-{host}-{dead.pid}"
    live = tmp_path / f".other.json.naslung-tmp-{host}-{os.getppid()}"
    foreign_host = tmp_path / f".x.json.naslung-tmp-elsewhere-{dead.pid}"
    for path in (stale_file, live, foreign_host):
        path.write_text("")
    stale_dir.mkdir()
    (stale_dir / "crops.npy").write_text("")
    write_text(tmp_path / "report.json", "{}")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and foreign_host.exists()  # a live writer's, and another host's


def test_predict_refuses_a_device_or_a_link_as_its_report_before_anything_runs(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("precious")
    (tmp_path / "link.json").symlink_to(target)
    for out, kind in (("/dev/full", "a character device"), (tmp_path / "link.json", "a symbolic link")):
        # The model and the CT do not exist: the output is checked first.
        proc = run_naslung("predict", "--model", tmp_path / "none.onnx", "--ct", tmp_path / "none",
                           "--at", "0,0,0", "--out", out)
        assert proc.returncode == 2
        assert f"--out {out} is {kind}" in one_error_line(proc.stderr)
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "precious"


def test_predict_into_a_read_only_folder_fails_before_the_model_runs(tmp_path, export, series_0001):
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only filesystem here, and root ignores folder permissions")
        folder.chmod(0o555)
    try:
        proc = run_naslung("predict", "--model", export, "--ct", series_0001, "--lidc",
                           "--out", folder / "p.json")
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and "cannot be written" in line
        assert "model" not in proc.stdout  # refused before the model was opened
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_predict_on_a_full_disk_writes_neither_report_nor_explanations(tmp_path, export, series_0001):
    with full_disk(tmp_path / "disk", 64) as disk:
        (disk.folder / "earlier").mkdir()
        (disk.folder / "earlier" / "note.txt").write_text("kept")
        proc = disk.run("predict", "--model", export, "--ct", series_0001, "--lidc",
                        "--explain", disk.folder / "explain", "--out", disk.folder / "p.json")
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and "cannot write" in line
        assert sorted(p.name for p in disk.folder.iterdir()) == ["earlier"]
        assert (disk.folder / "earlier" / "note.txt").read_text() == "kept"


def test_predict_leaves_an_explain_folder_it_does_not_own_untouched(tmp_path, export, series_0001):
    explain = tmp_path / "explain"
    (explain / "LIDC-IDRI-0001-n1").mkdir(parents=True)
    (explain / "LIDC-IDRI-0001-n1" / "notes.txt").write_text("mine")
    proc = run_naslung("predict", "--model", export, "--ct", series_0001, "--lidc", "--explain", explain,
                       "--out", tmp_path / "p.json")
    assert proc.returncode == 2 and "not an earlier explanation" in one_error_line(proc.stderr)
    assert [p.name for p in (explain / "LIDC-IDRI-0001-n1").iterdir()] == ["notes.txt"]
    assert not (tmp_path / "p.json").exists()

    # An earlier explanation of naslung's own is replaced, with the report, as one set.
    (explain / "LIDC-IDRI-0001-n1" / "notes.txt").unlink()
    assert run_naslung("predict", "--model", export, "--ct", series_0001, "--lidc", "--explain", explain,
                       "--out", tmp_path / "p.json").returncode == 0
    report = json.loads((tmp_path / "p.json").read_text())
    files = report["nodules"][0]["explain"]
    assert all(os.path.isfile(path) for path in files.values())
    assert temporary_leftovers(tmp_path) == []
