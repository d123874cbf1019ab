"""Prove that every kernel variant naslung launches builds for the GPUs we target, without a GPU;
and plan what each stage of the GPU check will build.

A *variant* is a kernel with its pointer dtypes, its compile-time flags and the integer arguments
Triton fixes to the constant 1 (it specialises every int argument equal to 1: the stem's C_in,
a 3^3 conv's padding): what decides which code exists. A *spec* (`KernelSpec`) is a variant with
one autotune config: one build. Each kernel module's ``compile_specs()`` lists every spec its
host functions can launch, built from the full product of its flags, dtypes and configs less the
combinations the host code never asks for; `naslung.kernels.coverage` records what a fused
ConvRes really launches, and the tests hold the two together.

`compile_kernel` builds one spec for a compute capability with ``triton.compile(...,
target=GPUTarget(...))``, pointers 16-byte aligned as at run time, and reads its registers,
shared memory and local memory (register spills) from the cubin with Triton's bundled
``cuobjdump``. Triton also specialises integer arguments divisible by 16; that changes
vectorisation, not which code exists, and the proof leaves those hints out.

    python -m naslung.kernels.compile_proof                   # every spec, sm_80 and sm_90
    python -m naslung.kernels.compile_proof --sm 90 --filter conv3d_fwd --jobs 8
    python -m naslung.kernels.compile_proof --plan            # the GPU check's builds and time
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNEL_MODULES = ("naslung.kernels.conv3d", "naslung.kernels.batchnorm", "naslung.kernels.cbam")

TARGETS = {80: 166_912, 90: 232_448}
"""Compute capability -> the most shared memory one block may use (bytes, opt-in maximum)."""

TILE_PARAMETERS = frozenset({"BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_ROWS", "BLOCK", "BLOCK_P", "BLOCK_C",
                             "BLOCK_T", "BLOCK_S", "ITERS"})
"""Every kernel's autotune parameters: a variant leaves them out, a spec fixes them."""

Kind = str | tuple[str, Any]
"""An argument of a variant: a Triton type ("*fp32", "i32", "fp32") or ("=", its constant value)."""
Variant = tuple[str, frozenset[tuple[str, Kind]]]
"""(kernel name, {(argument, kind)}), autotune parameters left out."""


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

    @property
    def variant(self) -> Variant:
        kinds = {(arg, ("=", self.constexprs[arg]) if kind == "constexpr" else kind)
                 for arg, kind in self.signature.items() if arg not in TILE_PARAMETERS}
        return kernel_name(self.fn), frozenset(kinds)


def kernel_name(fn: Any) -> str:
    return fn.__name__


def make_spec(name: str, kernel: Any, types: dict[str, str], constants: dict[str, Any], config: Any,
              ones: Iterable[str] = ()) -> KernelSpec:
    """One build of ``kernel`` (a jitted function, or an autotuner around one): ``types`` gives
    the pointer and float arguments' types (other runtime arguments are i32), ``constants`` the
    flags, ``ones`` the int arguments fixed to 1, ``config`` (a triton.Config) the tile."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    constexprs = {**constants, **dict.fromkeys(ones, 1), **config.kwargs}
    signature = {arg: "constexpr" if arg in constexprs else types.get(arg, "i32") for arg in fn.arg_names}
    return KernelSpec(name, fn, signature, constexprs, config.num_warps, config.num_stages)


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
    target = GPUTarget("cuda", capability, 32)
    aligned = triton.compiler.make_backend(target).parse_attr("D")  # tt.divisibility 16
    attrs = {(i,): aligned for i, kind in enumerate(spec.signature.values()) if kind.startswith("*")}
    source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **spec.options}
    compiled = triton.compile(source, target=target, options=options)
    usage = _resource_usage(compiled.asm["cubin"])
    shared = max(int(compiled.metadata.shared), usage.get("SHARED", 0))
    return CompiledKernel(spec.name, capability, usage.get("REG", 0), shared, usage.get("LOCAL", 0))


def all_specs() -> list[KernelSpec]:
    """Every spec of every kernel module."""
    return [spec for name in KERNEL_MODULES for spec in importlib.import_module(name).compile_specs()]


def _build(job: tuple[str, int, int]) -> dict[str, Any]:
    """Compile spec ``index`` of kernel module ``module`` for ``capability``: one report row."""
    module, index, capability = job
    spec = importlib.import_module(module).compile_specs()[index]
    row: dict[str, Any] = {"kernel": spec.name, "sm": capability, "num_warps": spec.num_warps,
                           "num_stages": spec.num_stages}
    started = time.perf_counter()
    try:
        built = compile_kernel(spec, capability)
        row.update(registers=built.registers, shared=built.shared, local=built.local, fits=built.fits)
    except Exception as err:  # report every failure, not just the first
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
    row["seconds"] = round(time.perf_counter() - started, 3)
    return row


def _jobs(keep: Any, capabilities: Sequence[int]) -> list[tuple[str, int, int]]:
    """(module, spec index, capability) of every spec for which ``keep(spec)`` holds."""
    return [(module, index, capability) for module in KERNEL_MODULES
            for index, spec in enumerate(importlib.import_module(module).compile_specs()) if keep(spec)
            for capability in capabilities]


def build_all(jobs: list[tuple[str, int, int]], workers: int) -> Iterable[dict[str, Any]]:
    """Report rows of the builds, in order, built by ``workers`` spawned processes."""
    import multiprocessing

    with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_build, jobs)


def _failed(row: dict[str, Any]) -> bool:
    return "error" in row or not row["fits"] or row["local"] > 0


# --- the GPU check's plan ------------------------------------------------------------------------

GPU_CHECK_JOBS = 16
"""Cores of the GPU machine: the check compiles that many kernels at once."""


def stage_specs(recorded: set[Variant]) -> dict[str, list[KernelSpec]]:
    """The builds of each GPU check stage, from the variants a fused ConvRes launches: the
    correctness stage runs the parity tests (fp32 with and without TF32, bf16) with one autotune
    config per kernel (NASLUNG_AUTOTUNE=first); the speed stage times fp32 with TF32, the torch
    default, and tunes every config."""
    first: dict[Variant, KernelSpec] = {}
    every: dict[Variant, list[KernelSpec]] = {}
    for spec in all_specs():
        first.setdefault(spec.variant, spec)
        every.setdefault(spec.variant, []).append(spec)
    correctness = [first[v] for v in sorted(recorded & first.keys(), key=repr)]
    timed = [v for v in recorded & every.keys() if dict(v[1]).get("ALLOW_TF32", ("=", True)) == ("=", True)
             and all(kind != "*bf16" for _, kind in v[1])]
    speed = [spec for v in sorted(timed, key=repr) for spec in every[v]]
    return {"correctness": correctness, "speed": speed}


def plan(capability: int, workers: int) -> dict[str, Any]:
    """Build every spec each stage needs (once, here) and estimate each stage's cold compile
    time on the GPU machine: the builds' summed time, times the specialisations a variant has
    on average (divisibility by 16 of its int arguments, as recorded), spread over 16 cores."""
    from naslung.kernels.coverage import recorded_launches_in_child

    recorded, per_variant = recorded_launches_in_child()
    stages = stage_specs(recorded)
    needed = {spec.name for specs in stages.values() for spec in specs}
    with tempfile.TemporaryDirectory(prefix="naslung-plan-triton-") as cold_cache:
        os.environ["TRITON_CACHE_DIR"] = cold_cache  # the workers inherit it: every build is cold
        rows = {row["kernel"]: row for row in build_all(_jobs(lambda s: s.name in needed, [capability]),
                                                        workers)}
    report = {"capability": capability, "gpu_check_jobs": GPU_CHECK_JOBS,
              "specialisations_per_variant": round(per_variant, 2), "stages": {}}
    for stage, specs in stages.items():
        seconds = [rows[spec.name]["seconds"] for spec in specs]
        expected = sum(seconds) * per_variant / GPU_CHECK_JOBS + max(seconds, default=0)
        report["stages"][stage] = {
            "variants": len({spec.variant for spec in specs}), "builds": len(specs),
            "build_seconds_here": round(sum(seconds), 1), "expected_cold_compile_s": round(expected, 1),
            "failed": [rows[spec.name] for spec in specs if _failed(rows[spec.name])]}
    return report


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m naslung.kernels.compile_proof",
        description="Compile every Triton kernel variant naslung launches, in every autotune config "
        "and dtype, for GPU targets without a GPU; fail if one does not build, does not fit the "
        "target's shared memory or spills registers. One JSON line per build. With --plan: the "
        "builds each stage of bench/gpu_check.sh needs and its expected cold compile time.")
    p.add_argument("--sm", default=",".join(map(str, TARGETS)),
                   help=f"compute capabilities, comma-separated (default {','.join(map(str, TARGETS))})")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel builds (default: all cores)")
    p.add_argument("--filter", default="", help="only specs whose name matches this regular expression")
    p.add_argument("--plan", action="store_true",
                   help="plan the GPU check instead (builds for the first --sm)")
    p.add_argument("--out", help="with --plan: also write the plan to this JSON file "
                   "(bench/gpu_check.sh prints bench/gpu_check_plan.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from naslung.kernels.runtime import interpreting

    if interpreting():
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    try:
        capabilities = [int(v) for v in args.sm.split(",")]
        pattern = re.compile(args.filter)
    except (ValueError, re.error) as err:
        print(f"compile_proof: bad --sm or --filter: {err}", file=sys.stderr)
        return 2
    unknown = sorted(set(capabilities) - set(TARGETS))
    if unknown or args.jobs < 1:
        print(f"compile_proof: --sm takes {', '.join(map(str, TARGETS))} and --jobs >= 1", file=sys.stderr)
        return 2
    if args.plan:
        report = plan(capabilities[0], args.jobs)
        print(json.dumps(report, indent=2))
        if args.out:
            from naslung.fileio import write_json

            write_json(args.out, report)
        for stage, entry in report["stages"].items():
            print(f"{stage}: {entry['variants']} variants, {entry['builds']} builds, "
                  f"{entry['build_seconds_here']} s of building here, expected cold compile "
                  f"{entry['expected_cold_compile_s']} s with {GPU_CHECK_JOBS} jobs", file=sys.stderr)
        return 1 if any(entry["failed"] for entry in report["stages"].values()) else 0
    failed = 0
    for row in build_all(_jobs(lambda spec: pattern.search(spec.name), capabilities), args.jobs):
        failed += _failed(row)
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
