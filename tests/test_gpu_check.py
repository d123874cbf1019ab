"""bench/gpu_check.sh on a machine without a GPU: each stage prints its plan, runs through with
the GPU cases skipped, and leaves its JSON and Markdown summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def gpu_check(stage: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "NASLUNG_GPU_CHECK_JOBS": "2"}
    return subprocess.run(["bash", "bench/gpu_check.sh", stage], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_plan_names_every_step_and_the_expected_compile_time(tmp_path):
    proc = gpu_check("plan", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for stage, limit in (("correctness", 360), ("speed", 420)):
        assert f"stage {stage} (at most {limit} s" in proc.stdout
    assert proc.stdout.count("expected cold Triton compile") == 2
    assert "sanitizers: rest" in proc.stdout and "precompile: 90 s" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage, steps", [
    ("correctness", ["env", "nvidia-smi", "install", "imports", "gpu-tests", "sanitizers"]),
    ("speed", ["env", "install", "precompile", "bench-gpu", "bench-export"]),
])
def test_each_stage_runs_through_without_a_gpu(tmp_path, stage, steps):
    proc = gpu_check(stage, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "expected cold Triton compile" in proc.stdout and f"stage {stage} passed" in proc.stdout
    summary = json.loads((tmp_path / f"{stage}.json").read_text())
    assert [step["step"] for step in summary["steps"]] == steps
    assert all(step["exit"] in ("0", "skipped") for step in summary["steps"])
    assert (tmp_path / f"{stage}.md").read_text().startswith(f"# naslung GPU check: {stage}")
