"""Print a pytest-benchmark JSON file as a Markdown table for the README.

One row per benchmark: group, provider, median time and its ratio to the group's baseline:
the provider whose ``extra_info`` says ``baseline: true``, else ``eager`` (below 1.00 is faster).

    python bench/report.py /tmp/bench_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROVIDER_ORDER = ("eager", "channels_last_3d", "compile")


def provider_of(bench: dict) -> str:
    return bench.get("extra_info", {}).get("provider") or bench.get("param") or bench["name"]


def table(benchmarks: list[dict]) -> str:
    """The Markdown table of ``benchmarks`` (pytest-benchmark's ``benchmarks`` list)."""
    groups: dict[str, dict[str, float]] = {}
    baselines: dict[str, str] = {}
    for bench in benchmarks:
        group = bench.get("group") or bench["name"]
        groups.setdefault(group, {})[provider_of(bench)] = bench["stats"]["median"] * 1e3
        if bench.get("extra_info", {}).get("baseline"):
            baselines[group] = provider_of(bench)

    def order(provider: str) -> tuple[int, str]:
        known = provider in PROVIDER_ORDER
        return (PROVIDER_ORDER.index(provider) if known else len(PROVIDER_ORDER), provider)

    lines = ["| group | provider | median ms | vs baseline |", "|---|---|---:|---:|"]
    for group, medians in groups.items():
        base = medians.get(baselines.get(group, "eager"))
        for provider in sorted(medians, key=order):
            ratio = f"{medians[provider] / base:.2f}x" if base else "n/a"
            lines.append(f"| {group} | {provider} | {medians[provider]:,.1f} | {ratio} |")
    return "\n".join(lines)


def machine_line(data: dict) -> str:
    """One line naming the versions, CPU and threads the numbers came from."""
    info = data.get("machine_info", {}).get("naslung")
    if not info:  # a file written without bench/conftest.py
        cpu = data.get("machine_info", {}).get("cpu", {})
        return f"CPU: {cpu.get('brand_raw', 'unknown')} ({cpu.get('count', '?')} cores)"
    return (
        f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
        f"cuDNN {info['cudnn']}, CPU {info['cpu_model']} ({info['cpu_count']} cores), "
        f"{info['torch_threads']} torch threads"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", type=Path, help="file written by --benchmark-json")
    args = parser.parse_args(argv)
    data = json.loads(args.json_file.read_text(encoding="utf-8"))
    if not data.get("benchmarks"):
        parser.error(f"{args.json_file} holds no benchmarks; was the suite skipped?")
    print(machine_line(data))
    print()
    print(table(data["benchmarks"]))


if __name__ == "__main__":
    main()
