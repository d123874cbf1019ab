"""Options, report header and shared guards of the benchmark suites.

The compile provider costs minutes of compiling per model on a CPU, so it is opt-in:
``--bench-compile`` or ``NASLUNG_BENCH_COMPILE=1``. With ``NASLUNG_BENCH_PROGRESS=FILE`` every
benchmark is appended to FILE as one JSON line the moment it ends (pytest-benchmark writes its
JSON only at the end of the session, so a killed run would otherwise keep nothing);
``bench/report.py`` reads such a file as well.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from naslung.versions import cpu_model

COMPILE_ENV = "NASLUNG_BENCH_COMPILE"
PROGRESS_ENV = "NASLUNG_BENCH_PROGRESS"
_INTERRUPTS: list[int] = []


@contextmanager
def interrupt_after_rounds() -> Iterator[None]:
    """Hold off SIGINT (what ``timeout -s INT`` sends) until the timed rounds are stored.

    An interrupt inside ``benchmark.pedantic`` leaves pytest-benchmark an entry without data, on
    which it fails to write any JSON at all; so the rounds (short by design) finish first and
    the interrupt is raised right after, and pytest saves everything measured so far.
    """
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: _INTERRUPTS.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if _INTERRUPTS:
        raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def _record_progress(request: pytest.FixtureRequest) -> Iterator[None]:
    """Append the test's benchmark, once stored, to ``$NASLUNG_BENCH_PROGRESS``."""
    yield
    path = os.environ.get(PROGRESS_ENV)
    benchmark = request.node.funcargs.get("benchmark")
    stats = getattr(benchmark, "stats", None)
    if path and stats is not None:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(stats.as_dict(include_data=False), default=str) + "\n")


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
