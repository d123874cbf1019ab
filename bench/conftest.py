"""Options and report header for the CPU benchmark suite.

The compile provider costs minutes of compiling per model on a CPU, so it is opt-in:
``--bench-compile`` or ``NASLUNG_BENCH_COMPILE=1``.
"""

from __future__ import annotations

import os

import pytest

from naslung.versions import cpu_model

COMPILE_ENV = "NASLUNG_BENCH_COMPILE"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-compile", action="store_true", default=False,
        help=f"also time the torch.compile provider (slow to compile; or set {COMPILE_ENV}=1)",
    )


def compile_enabled(config: pytest.Config) -> bool:
    """Whether the torch.compile provider was asked for on the command line or environment."""
    return config.getoption("--bench-compile") or os.environ.get(COMPILE_ENV, "") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if compile_enabled(config):
        return
    skip = pytest.mark.skip(
        reason=f"torch.compile takes minutes per model on a CPU; enable it with "
               f"--bench-compile or {COMPILE_ENV}=1",
    )
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("provider") == "compile":
            item.add_marker(skip)


def platform_info() -> dict[str, str | int]:
    """Versions, CPU and thread count to print and store with every result."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version() or "none"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
    }


def header_line() -> str:
    info = platform_info()
    return (
        f"naslung bench: torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
        f"cuDNN {info['cudnn']}, CPU {info['cpu_model']} ({info['cpu_count']} cores), "
        f"torch threads {info['torch_threads']}"
    )


def pytest_report_header(config: pytest.Config) -> str:
    return header_line()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    # -q hides the report header; the versions still belong next to the numbers.
    if config.get_verbosity() < 0:
        terminalreporter.write_line(header_line())


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["naslung"] = platform_info()
