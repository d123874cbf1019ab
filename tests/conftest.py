"""Shared fixtures: a small store of synthetic spheres, and the real LIDC-IDRI test series."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from naslung.data.store import CropStore


def write_sphere_store(root, n: int = 40, side: int = 40, n_folds: int = 5,
                       seed: int = 0) -> CropStore:
    """Benign = small faint sphere, malignant = large solid one, in noisy lung-like HU.

    A real store (written and read by `CropStore`) of data easy enough that a short training
    run must learn it; two nodules per patient, patients never split across folds.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    grid = np.indices((side,) * 3) - side / 2 + 0.5
    radius = np.sqrt((grid**2).sum(0))
    crops = rng.normal(-820, 40, (n, side, side, side))
    masks = np.zeros(crops.shape, bool)
    for i, label in enumerate(labels):
        masks[i] = radius < (7 if label else 3)
        crops[i][masks[i]] = 40 if label else -500
    rows = [{"id": f"n{i}", "patient": f"p{i // 2}", "series_uid": f"s{i // 2}",
             "fold": (i // 2) % n_folds, "label": int(labels[i]), "diameter_mm": 14.0 if labels[i] else 6.0}
            for i in range(n)]
    return CropStore.write(root, crops.astype(np.int16), masks, rows,
                           {"source": "synthetic-spheres", "n_folds": n_folds})


@pytest.fixture(scope="session")
def sphere_store(tmp_path_factory) -> CropStore:
    return write_sphere_store(tmp_path_factory.mktemp("spheres") / "store")


SHARED_LIDC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lidc"


@pytest.fixture(scope="session")
def shared_lidc() -> Path:
    """The real LIDC-IDRI series beside the repository; CI (NASLUNG_REQUIRE_SHARED_DATA=1)
    fails without them, elsewhere their tests are skipped."""
    if not (SHARED_LIDC / "LIDC-IDRI-0001").is_dir():
        message = f"the shared LIDC-IDRI test data is missing at {SHARED_LIDC}"
        if os.environ.get("NASLUNG_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_LIDC


def run_interpreted(test_file: str) -> subprocess.CompletedProcess:
    """Run ``test_file`` in a child pytest with TRITON_INTERPRET=1: Triton binds its own helpers
    to the interpreter or the compiler when first imported, so it cannot switch in-process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=", "-W", "ignore::UserWarning"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=900)


def save_member(directory, arch: str, seed: int, crop: int = 32):
    """A random-weight checkpoint with non-trivial BatchNorm statistics, so that its output
    depends on its input."""
    import torch

    from naslung.models import ConvRes
    from naslung.testing import randomise_batchnorm
    from naslung.train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = randomise_batchnorm(ConvRes(arch), seed)
    save_checkpoint(directory, model, {
        "crop": crop, "normalisation": {"hu_min": -1000.0, "hu_max": 400.0, "mean": -600.0, "std": 350.0},
        "fold": 0, "val_metrics": {"auc": 0.5}, "train_config": {"select": "auc"}})
    return directory


def random_ensemble(root: Path, archs=("4/8/8", "4/4/8"), crop: int = 32) -> dict[str, Path]:
    """An ensemble directory of random-weight members (run in PyTorch) and its ONNX export."""
    from naslung.arch import Arch
    from naslung.export.deploy import export_run

    ensemble = root / "ensemble"
    for seed, arch in enumerate(archs):
        save_member(ensemble / "members" / Arch.parse(arch).dirname / "fold0", arch, seed, crop)
    (ensemble / "ensemble.csv").write_text("model,kind\n" + "".join(f"{a},member\n" for a in archs))
    export_run(ensemble, root / "export")
    return {"run": ensemble, "export": root / "export", "onnx": root / "export" / "model.onnx"}
