"""Proof that every csrc/ kernel builds for the GPUs it targets, without a GPU.

nvcc compiles each csrc/*.cu for sm_80 and sm_90 with ptxas' verbose report; a kernel fails
the proof when it spills registers to local memory (a silent slowdown) or declares more shared
memory than a block may have statically (48 KB on both targets; the launch would fail). The
report lists registers, spills and shared memory per kernel and target.

    python -m naslung.native.compile_proof        # prints the table; exit 1 on a failure
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
TARGETS = ("sm_80", "sm_90")
STATIC_SHARED_LIMIT = 48 * 1024
"""Bytes of static shared memory a block may declare, on sm_80 and sm_90 alike."""

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")
_SHORT = re.compile(r"^(?:void )?([\w:]+(?:<[^()]*>)?)\(.*$")


@dataclass
class KernelUsage:
    source: str
    target: str
    kernel: str
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0

    @property
    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes")
        if self.shared_bytes > STATIC_SHARED_LIMIT:
            found.append(f"{self.shared_bytes} bytes of shared memory > {STATIC_SHARED_LIMIT}")
        return found


def nvcc() -> str | None:
    """The CUDA compiler on PATH or in /usr/local/cuda, if any."""
    default = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.is_file() else None)


def demangle(names: list[str]) -> list[str]:
    """Kernel names as written, e.g. ``bn_stats_partials_kernel<float>`` (c++filt, without the
    namespace and parameters), or mangled where c++filt is missing."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return names
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
    return [_SHORT.sub(r"\1", name.replace("(anonymous namespace)::", ""))
            for name in done.stdout.splitlines()]


def compile_source(source: Path, target: str, compiler: str) -> list[KernelUsage]:
    """Every kernel of ``source`` as ptxas builds it for ``target``."""
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run([compiler, "-std=c++17", f"-arch={target}", "-Xptxas", "-v", "-c", str(source),
                               f"-I{source.parent}", "-o", str(Path(scratch) / "out.o")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for {target}:\n{done.stderr[-4000:]}")
    kernels: list[KernelUsage] = []
    for line in done.stderr.splitlines():
        if (entry := _ENTRY.search(line)) is not None:
            kernels.append(KernelUsage(source.name, entry.group(2), entry.group(1)))
        elif kernels and (spills := _SPILLS.search(line)) is not None:
            kernels[-1].spill_bytes = int(spills.group(1)) + int(spills.group(2))
        elif kernels and (usage := _USAGE.search(line)) is not None:
            kernels[-1].registers = int(usage.group(1))
            shared = _SHARED.search(line)
            kernels[-1].shared_bytes = int(shared.group(1)) if shared else 0
    for kernel, name in zip(kernels, demangle([k.kernel for k in kernels]), strict=True):
        kernel.kernel = name
    return kernels


def compile_all(compiler: str, sources: list[Path] | None = None) -> list[KernelUsage]:
    """Every kernel of every csrc/*.cu for every target (builds run two at a time)."""
    jobs = [(source, target) for source in sources or sorted(CSRC.glob("*.cu")) for target in TARGETS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = pool.map(lambda job: compile_source(job[0], job[1], compiler), jobs)
    return [kernel for report in reports for kernel in report]


def table(kernels: list[KernelUsage]) -> str:
    """The report as a Markdown table."""
    rows = ["| source | target | kernel | registers | spill bytes | shared bytes |",
            "|---|---|---|---:|---:|---:|"]
    rows += [f"| {k.source} | {k.target} | `{k.kernel}` | {k.registers} | {k.spill_bytes} | "
             f"{k.shared_bytes} |" for k in kernels]
    return "\n".join(rows)


def main() -> int:
    compiler = nvcc()
    if compiler is None:
        print("compile_proof: nvcc not found (install the CUDA toolkit)", file=sys.stderr)
        return 1
    kernels = compile_all(compiler)
    print(table(kernels))
    failures = [f"{k.source} {k.target} {k.kernel}: {', '.join(k.problems)}" for k in kernels if k.problems]
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
