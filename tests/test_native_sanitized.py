"""The host build's parity suites again, on a build with AddressSanitizer and UBSan: an index
that would read or write outside a tensor on the GPU stops the run here, on the CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARITY_SUITES = ["tests/test_native_batchnorm.py", "tests/test_native_cbam.py",
                 "tests/test_native_augment.py", "tests/test_native_training.py"]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None,
                                reason="needs CMake and g++ to build the sanitized library")


def runtime(name: str) -> str:
    return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def sanitized_env(tmp_path_factory) -> dict[str, str]:
    """An environment that loads the sanitized host library (built here with CMake) in place of
    the installed one, with the sanitizers' runtimes preloaded into Python."""
    build = tmp_path_factory.mktemp("sanitized")
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DNASLUNG_SANITIZE=ON",
                    "-DNASLUNG_CUDA=OFF", "-DNASLUNG_WERROR=ON"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--parallel", "2"], check=True, capture_output=True)
    return {**os.environ, "NASLUNG_HOST_LIBRARY": str(build / "libnaslung_host_sanitized.so"),
            "LD_PRELOAD": f"{runtime('libasan.so')} {runtime('libubsan.so')}",
            # Python and torch are not built for leak checking; every report aborts the run.
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def test_parity_suites_pass_under_asan_and_ubsan(sanitized_env):
    suites = [s for s in PARITY_SUITES if (ROOT / s).is_file()]
    done = subprocess.run([sys.executable, "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider", "-o",
                           "addopts=", "-m", "not gpu"], cwd=ROOT, env=sanitized_env, capture_output=True,
                          text=True, timeout=1800)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "AddressSanitizer" not in output and "runtime error" not in output, output[-6000:]
    assert " passed" in output


def test_the_sanitizer_is_live(sanitized_env):
    """One value read past the end of a tensor is reported: the run above would have caught it."""
    script = ("import torch\n"
              "from naslung.native.library import call\n"
              "import naslung.native.batchnorm\n"
              "x, y, stats = torch.zeros(2, 4, 8), torch.empty(2, 4, 8), torch.ones(4)\n"
              "call('host', 'nl_bn_relu_forward', 0, x.data_ptr(), None, 2, 4, 9, stats.data_ptr(),\n"
              "     stats.data_ptr(), stats.data_ptr(), stats.data_ptr(), y.data_ptr(), None)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=sanitized_env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
