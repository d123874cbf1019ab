"""Crop stores under hostile conditions: every writer refuses to replace what is not a store of
its own, stores are verified before training, damaged work files are redone, and a full disk
stops a build with one line and leaves nothing half-written."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import write_sphere_store
from faults import full_disk, one_error_line, run_naslung, temporary_leftovers
from test_nodulemnist import medmnist_arrays, write_npz

from naslung.cli import main
from naslung.data.store import CROPS_FILE, MANIFEST_FILE, TABLE_FILE, CropStore, StoreError


def luna16_layout(root):
    """The smallest input `prepare luna16` reads before its target check: one subset, one .mhd
    name, and annotations.csv naming it."""
    (root / "subset0").mkdir(parents=True)
    (root / "subset0" / "1.2.3.mhd").write_text("")
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,0,0,0,5\n")
    return root


def writer_commands(tmp_path, shared_lidc):
    npz = write_npz(tmp_path / "n.npz", medmnist_arrays())
    luna = luna16_layout(tmp_path / "luna")
    return {
        "phantom": ["prepare", "phantom", "--limit", "2", "--workers", "1", "--no-progress"],
        "lidc": ["prepare", "lidc", "--root", str(shared_lidc), "--workers", "1", "--no-progress"],
        "luna16": ["prepare", "luna16", "--root", str(luna), "--annotations", str(luna / "annotations.csv"),
                   "--workers", "1", "--no-progress"],
        "nodulemnist3d": ["prepare", "nodulemnist3d", "--npz", str(npz)],
    }


def snapshot(path):
    """What is at ``path``: a file's bytes, or a folder's names and bytes."""
    if path.is_file():
        return path.read_bytes()
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("writer", ["phantom", "lidc", "luna16", "nodulemnist3d"])
@pytest.mark.parametrize("target", ["a file", "a folder of other files"])
def test_no_store_writer_replaces_what_is_not_a_store(tmp_path, shared_lidc, capsys, writer, target):
    data_dir = tmp_path / "target"
    if target == "a file":
        data_dir.write_text("my notes")
    else:
        (data_dir / "thesis").mkdir(parents=True)
        (data_dir / "thesis" / "chapter1.tex").write_text("...")
    before = snapshot(data_dir)
    command = writer_commands(tmp_path, shared_lidc)[writer]
    for force in ([], ["--force"]):
        assert main([*command, "--data-dir", str(data_dir), *force]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert ("is a file, not a crop store" if target == "a file" else "a folder of other files") in line
        assert snapshot(data_dir) == before


def test_a_store_from_other_data_is_replaced_only_with_force(tmp_path, capsys):
    first = write_npz(tmp_path / "a.npz", medmnist_arrays(seed=0))
    second = write_npz(tmp_path / "b.npz", medmnist_arrays(seed=1))
    store = tmp_path / "store"
    assert main(["prepare", "nodulemnist3d", "--npz", str(first), "--data-dir", str(store)]) == 0
    built = CropStore.open(store).fingerprint
    capsys.readouterr()
    assert main(["prepare", "nodulemnist3d", "--npz", str(second), "--data-dir", str(store)]) == 2
    assert "built from other data or parameters: npz_sha256" in one_error_line(capsys.readouterr().err)
    assert CropStore.open(store).fingerprint == built
    assert main(["prepare", "nodulemnist3d", "--npz", str(first), "--data-dir", str(store)]) == 0
    assert main(["prepare", "nodulemnist3d", "--npz", str(second), "--data-dir", str(store), "--force"]) == 0
    assert CropStore.open(store).fingerprint != built


def test_a_link_to_a_store_folder_is_written_through(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    npz = write_npz(tmp_path / "a.npz", medmnist_arrays())
    assert main(["prepare", "nodulemnist3d", "--npz", str(npz), "--data-dir", str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and (real / MANIFEST_FILE).is_file()
    assert CropStore.open(tmp_path / "link").fingerprint == CropStore.open(real).fingerprint


def test_writing_over_a_foreign_folder_is_refused_by_the_store_itself(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="folder of other files"):
        write_sphere_store(tmp_path / "x", n=4, side=8, n_folds=2)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


# --- damaged stores -----------------------------------------------------------------------------


def copy_store(tmp_path):
    return CropStore.open(shutil.copytree(write_sphere_store(tmp_path / "original", n=20, side=12).root,
                                          tmp_path / "store"))


def zero_crop_bytes(store):
    path = store.root / CROPS_FILE
    data = bytearray(path.read_bytes())
    data[-5000:-4000] = bytes(1000)  # same size, header intact: only the hash can tell
    path.write_bytes(bytes(data))


def cut(path, count):
    path.write_bytes(path.read_bytes()[:-count])


DAMAGE = {
    "0-byte crops.npy": (lambda s: (s.root / CROPS_FILE).write_bytes(b""), "damaged or unreadable"),
    "truncated crops.npy": (lambda s: cut(s.root / CROPS_FILE, 7), "its header says"),
    "table cut mid-number": (lambda s: cut(s.root / TABLE_FILE, 3), "cut short"),
    "a table row missing": (lambda s: (s.root / TABLE_FILE).write_text(
        "".join((s.root / TABLE_FILE).read_text().splitlines(keepends=True)[:-1])), "manifest says"),
    "diameter not a number": (lambda s: (s.root / TABLE_FILE).write_text(
        (s.root / TABLE_FILE).read_text().replace(",14.0\n", ",14.O\n", 1)), "not a number"),
    "manifest not JSON": (lambda s: (s.root / MANIFEST_FILE).write_text("{"), "damaged or unreadable"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_store_is_refused_on_open_with_one_line(tmp_path, capsys, damage):
    store = copy_store(tmp_path)
    harm, message = DAMAGE[damage]
    harm(store)
    with pytest.raises(StoreError, match=message):
        CropStore.open(store.root)
    assert main(["train", "--data-dir", str(store.root), "--arch", "4/4/4", "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_changed_bytes_are_found_by_the_hash_before_training(tmp_path, capsys):
    store = copy_store(tmp_path)
    zero_crop_bytes(store)
    CropStore.open(store.root)  # the fast checks cannot see it
    train = ["train", "--data-dir", str(store.root), "--arch", "4/4/4", "--epochs", "1", "--folds", "0",
             "--loss", "ce", "--device", "cpu", "--no-progress"]
    evaluate = ["eval", str(store.root), "--data-dir", str(store.root)]
    for command in (evaluate, [*train, "--out", str(tmp_path / "a")]):
        assert main(command) == 2
        assert "do not match the SHA-256 in its manifest" in one_error_line(capsys.readouterr().err)
    assert main([*train, "--out", str(tmp_path / "b"), "--no-verify"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["store_verified"] == "sizes and headers"
    fresh = write_sphere_store(tmp_path / "fresh", n=20, side=12)
    assert main([*train[:2], str(fresh.root), *train[3:], "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["store_verified"] == "sha256"


# --- work files and full disks ------------------------------------------------------------------


def test_damaged_part_files_are_redone(tmp_path, shared_lidc, capsys):
    store = tmp_path / "store"
    command = ["prepare", "lidc", "--root", str(shared_lidc), "--data-dir", str(store), "--workers", "1",
               "--no-progress"]
    assert main(command) == 0
    first = CropStore.open(store).fingerprint
    parts = sorted((tmp_path / ".store.parts").rglob("*.npz"))
    assert len(parts) == 2
    parts[0].write_bytes(b"")
    parts[1].write_bytes(parts[1].read_bytes()[:1000])
    capsys.readouterr()
    assert main(command) == 0
    err = capsys.readouterr().err
    assert err.count("naslung: redone: ") == 2 and "damaged part file" in err and "Traceback" not in err
    assert CropStore.open(store).fingerprint == first


def test_prepare_lidc_on_a_full_disk_stops_with_one_line(tmp_path, shared_lidc):
    with full_disk(tmp_path / "disk", 512) as disk:
        proc = disk.run("prepare", "lidc", "--root", shared_lidc, "--data-dir", disk.folder / "store",
                        "--workers", "1", "--no-progress")
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and "cannot write" in line
        assert not (disk.folder / "store").exists() and temporary_leftovers(disk.folder) == []


def test_a_store_that_cannot_be_written_keeps_the_earlier_one(tmp_path):
    with full_disk(tmp_path / "disk", 1024) as disk:
        small = medmnist_arrays(size=8)
        big = {k: np.repeat(v, 40, axis=0) if k.endswith("images") or k.endswith("labels") else v
               for k, v in medmnist_arrays(size=28).items()}
        store = disk.folder / "store"
        assert disk.run("prepare", "nodulemnist3d", "--npz", write_npz(tmp_path / "s.npz", small),
                        "--data-dir", store).returncode == 0
        before = snapshot(store)
        proc = disk.run("prepare", "nodulemnist3d", "--npz", write_npz(tmp_path / "b.npz", big),
                        "--data-dir", store, "--force")
        assert proc.returncode == 2 and "cannot write" in one_error_line(proc.stderr)
        assert snapshot(store) == before
        assert [p.name for p in disk.folder.iterdir() if not p.name.startswith(".store.lock")] == ["store"]


def test_the_cli_prints_nothing_but_one_line_for_an_empty_crops_file(tmp_path):
    store = copy_store(tmp_path)
    (store.root / CROPS_FILE).write_bytes(b"")
    proc = run_naslung("eval", store.root, "--data-dir", store.root)
    assert proc.returncode == 2 and CROPS_FILE in one_error_line(proc.stderr)
    assert os.path.getsize(store.root / CROPS_FILE) == 0
