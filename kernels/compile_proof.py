"""Prove that every kernel builds for the GPUs we target, without a GPU.

Each kernel module lists `KernelSpec`s (one per kernel and autotune config) in a
``compile_specs()`` function. `compile_kernel` builds one for a compute capability with
`triton.compile(..., target=GPUTarget(...))` and reads its registers, shared memory and local
memory (register spills) from the cubin with Triton's bundled ``cuobjdump``.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNEL_MODULES = ("naslung.kernels.conv3d", "naslung.kernels.batchnorm", "naslung.kernels.cbam")

TARGETS = {80: 166_912, 90: 232_448}
"""Compute capability -> the most shared memory one block may use (bytes, opt-in maximum)."""


@dataclass(frozen=True)
class KernelSpec:
    """One kernel with one set of compile-time constants and launch options.

    ``signature`` names every argument's type as Triton spells it ("*fp32", "*bf16", "i32",
    "fp32", "constexpr"); ``constexprs`` gives the values of the constexpr ones.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    capability: int
    registers: int
    shared: int
    local: int

    @property
    def fits(self) -> bool:
        return self.shared <= TARGETS[self.capability]


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL):(\d+)", out)}


def compile_kernel(spec: KernelSpec, capability: int) -> CompiledKernel:
    """Build ``spec`` for sm_<capability>; raises whatever Triton raises if it does not build."""
    source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **spec.options}
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    usage = _resource_usage(compiled.asm["cubin"])
    shared = max(int(compiled.metadata.shared), usage.get("SHARED", 0))
    return CompiledKernel(spec.name, capability, usage.get("REG", 0), shared, usage.get("LOCAL", 0))


def all_specs() -> list[KernelSpec]:
    """Every kernel of every kernel module, in every autotune config and dtype."""
    return [spec for name in KERNEL_MODULES for spec in importlib.import_module(name).compile_specs()]


def _build(job: tuple[str, int, int]) -> dict[str, Any]:
    """Compile spec ``index`` of kernel module ``module`` for ``capability``: one report row."""
    module, index, capability = job
    spec = importlib.import_module(module).compile_specs()[index]
    row: dict[str, Any] = {"kernel": spec.name, "sm": capability, "num_warps": spec.num_warps,
                           "num_stages": spec.num_stages}
    try:
        built = compile_kernel(spec, capability)
        row.update(registers=built.registers, shared=built.shared, local=built.local, fits=built.fits)
    except Exception as err:  # report every failure, not just the first
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
    return row


def main() -> int:
    """Compile everything for every target in parallel; one JSON line per build, exit 1 if one
    fails, does not fit or spills.

    Run as ``python -m naslung.kernels.compile_proof`` (without TRITON_INTERPRET set).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    jobs = [(module, index, capability) for module in KERNEL_MODULES
            for index in range(len(importlib.import_module(module).compile_specs()))
            for capability in TARGETS]
    failed = 0
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        for row in pool.map(_build, jobs):
            failed += "error" in row or not row["fits"] or row["local"] > 0
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
