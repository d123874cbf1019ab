"""The compile proof of csrc/: nvcc builds every kernel for sm_80 and sm_90 without register
spills and within the static shared-memory limit (no GPU needed; the CUDA compiler is)."""

from __future__ import annotations

import os
import re

import pytest

from naslung.native.compile_proof import (
    CSRC,
    STATIC_SHARED_LIMIT,
    TARGETS,
    KernelUsage,
    compile_all,
    nvcc,
    table,
)


@pytest.fixture(scope="module")
def compiler() -> str:
    found = nvcc()
    if found is None:
        if os.environ.get("NASLUNG_REQUIRE_NVCC") == "1":
            pytest.fail("nvcc is missing: the compile proof cannot run")
        pytest.skip("nvcc is not installed")
    return found


def declared_kernels(source) -> set[str]:
    return set(re.findall(r"NL_KERNEL\s+void\s+(\w+)", source.read_text()))


def test_every_kernel_builds_for_every_target_without_spills(compiler, capsys):
    kernels = compile_all(compiler)
    with capsys.disabled():
        print("\n" + table(kernels))
    for source in sorted(CSRC.glob("*.cu")):
        for target in TARGETS:
            built = {re.sub(r"<.*", "", k.kernel) for k in kernels
                     if k.source == source.name and k.target == target}
            assert declared_kernels(source) <= built, f"{source.name} {target}: kernels missing"
    failures = [f"{k.source} {k.target} {k.kernel}: {k.problems}" for k in kernels if k.problems]
    assert not failures, failures


def test_a_spill_or_too_much_shared_memory_fails_the_proof():
    assert KernelUsage("a.cu", "sm_80", "k", 40, 0, STATIC_SHARED_LIMIT).problems == []
    assert KernelUsage("a.cu", "sm_80", "k", 255, 8, 0).problems == ["spills 8 bytes"]
    assert KernelUsage("a.cu", "sm_90", "k", 32, 0, STATIC_SHARED_LIMIT + 4).problems


def test_a_spilling_kernel_is_caught_by_the_parser(compiler, tmp_path):
    """A kernel made to spill (64 values live at once under a 32-register cap) is reported
    with its spill bytes: the proof reads ptxas' report correctly."""
    from naslung.native.compile_proof import compile_source

    source = tmp_path / "spill.cu"
    source.write_text(
        "__global__ void __launch_bounds__(1024, 2) spill_kernel(float* out, int k) {\n"
        "  float v[64];\n"
        "#pragma unroll\n  for (int i = 0; i < 64; ++i) v[i] = out[i * k + threadIdx.x];\n"
        "  for (int r = 0; r < k; ++r) {\n"
        "#pragma unroll\n    for (int i = 0; i < 64; ++i) v[i] = v[i] * v[(i + 1) & 63] + 1.0f;\n  }\n"
        "  float sum = 0;\n#pragma unroll\n  for (int i = 0; i < 64; ++i) sum += v[i];\n"
        "  out[threadIdx.x] = sum;\n}\n")
    [kernel] = compile_source(source, "sm_80", compiler)
    assert kernel.kernel.startswith("spill_kernel") and kernel.registers > 0
    assert kernel.spill_bytes > 0 and kernel.problems
