"""Every Triton kernel variant, in every autotune config, builds for sm_80 and sm_90 without a
GPU, fits the target's shared memory and spills no registers (DESIGN.md section 5); and the
proof's command line takes real arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow  # some 1,150 builds: minutes, even in parallel


@pytest.fixture(scope="module")
def builds() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "naslung.kernels.compile_proof"], env=env,
                          capture_output=True, text=True, timeout=3600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no kernel was compiled:\n{proc.stderr[-3000:]}"
    return rows


def test_every_kernel_builds_for_sm80_and_sm90(builds):
    print()
    for row in builds:
        print(f"{row['kernel']:<48} sm_{row['sm']} warps {row['num_warps']} stages {row['num_stages']}: "
              + (row["error"][:200] if "error" in row else
                 f"{row['registers']} registers, {row['shared']:,} B shared, {row['local']} B local"))
    assert not [r for r in builds if "error" in r], "kernels that do not build"
    assert {r["sm"] for r in builds} == {80, 90}


def test_every_kernel_fits_shared_memory_and_does_not_spill(builds):
    assert all(r["fits"] for r in builds), [r for r in builds if not r["fits"]]
    assert all(r["local"] == 0 for r in builds), [r for r in builds if r["local"]]


def compile_proof(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "naslung.kernels.compile_proof", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_proof_has_real_arguments():
    assert compile_proof("--help").returncode == 0
    assert compile_proof("--sm", "75").returncode == 2
    assert compile_proof("--filter", "(").returncode == 2
    narrow = compile_proof("--sm", "90", "--filter", r"^bn_finalize_batch_fp32$", "--jobs", "1")
    rows = [json.loads(line) for line in narrow.stdout.splitlines() if line.startswith("{")]
    assert narrow.returncode == 0
    assert [(r["kernel"], r["sm"]) for r in rows] == [("bn_finalize_batch_fp32", 90)]
