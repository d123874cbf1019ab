"""Print a pytest-benchmark JSON file as a Markdown table for the README.

One row per benchmark: group, provider, median time and its ratio to the group's baseline:
the provider whose ``extra_info`` says ``baseline: true``, else ``eager`` (below 1.00 is faster).
A benchmark whose ``extra_info`` has a ``status`` other than ``ok`` (the GPU suites record
providers that ran out of memory, failed, were unavailable or were not measured) shows that
status and its reason in a note column instead of a time. Where benchmarks record
``crops_per_s`` (the deployment suite) the table has a crops/s column, and each ``headline``
in ``extra_info`` is printed under the table.

    python bench/report.py /tmp/bench_cpu.json
    python bench/report.py results/bench_gpu.progress.jsonl   # what a killed run measured
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROVIDER_ORDER = ("eager", "cuda_eager", "channels_last_3d", "bf16", "bf16_channels_last_3d", "graphs",
                  "cuda_graph", "compile", "triton", "triton_graphs", "onnxruntime", "onnxruntime_cuda",
                  "tensorrt_fp32", "tensorrt_fp16")


def provider_of(bench: dict) -> str:
    return bench.get("extra_info", {}).get("provider") or bench.get("param") or bench["name"]


def table(benchmarks: list[dict]) -> str:
    """The Markdown table of ``benchmarks`` (pytest-benchmark's ``benchmarks`` list)."""
    groups: dict[str, dict[str, float]] = {}
    notes: dict[tuple[str, str], str] = {}
    baselines: dict[str, str] = {}
    throughput: dict[tuple[str, str], float] = {}
    for bench in benchmarks:
        group = bench.get("group") or bench["name"]
        provider, extra = provider_of(bench), bench.get("extra_info", {})
        groups.setdefault(group, {})[provider] = bench["stats"]["median"] * 1e3
        if "crops_per_s" in extra:
            throughput[group, provider] = extra["crops_per_s"]
        status = extra.get("status", "ok")
        if status != "ok":
            notes[group, provider] = f"{status}: {extra.get('reason', '')}".rstrip(": ")
        if extra.get("baseline"):
            baselines[group] = provider

    def order(provider: str) -> tuple[int, str]:
        known = provider in PROVIDER_ORDER
        return (PROVIDER_ORDER.index(provider) if known else len(PROVIDER_ORDER), provider)

    header = "| group | provider | median ms | vs baseline |"
    rule = "|---|---|---:|---:|"
    if throughput:
        header, rule = header + " crops/s |", rule + "---:|"
    if notes:
        header, rule = header + " note |", rule + "---|"
    lines = [header, rule]
    for group, medians in groups.items():
        base_provider = baselines.get(group, "eager")
        base = None if (group, base_provider) in notes else medians.get(base_provider)
        for provider in sorted(medians, key=order):
            note = notes.get((group, provider))
            rate = " - |" if throughput else ""
            if note is not None:
                lines.append(f"| {group} | {provider} | - | - |{rate} {_cell(note)} |")
                continue
            ratio = f"{medians[provider] / base:.2f}x" if base else "n/a"
            if throughput and (group, provider) in throughput:
                rate = f" {throughput[group, provider]:,.1f} |"
            row = f"| {group} | {provider} | {_ms(medians[provider])} | {ratio} |{rate}"
            lines.append(row + " |" if notes else row)
    return "\n".join(lines)


def _ms(value: float) -> str:
    """Milliseconds with one decimal from 10 ms up, three significant digits below (GPU layers)."""
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def gpu_line(data: dict) -> str | None:
    """The device and settings the GPU suite stored with its results, if it did."""
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "device_name" in info:
            return (f"GPU: {info['device_name']} ({info.get('capability', '?')}), torch {info['torch']}, "
                    f"triton {info['triton']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, "
                    f"Python {info.get('python', '?')}; cuDNN TF32 {info.get('cudnn_allow_tf32')}, "
                    f"matmul TF32 {info.get('matmul_allow_tf32')}, cudnn.benchmark "
                    f"{info.get('cudnn_benchmark')}")
    return None


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
    parser.add_argument("json_file", type=Path, help="file written by --benchmark-json, or the JSON "
                        "lines of $NASLUNG_BENCH_PROGRESS (.jsonl)")
    args = parser.parse_args(argv)
    text = args.json_file.read_text(encoding="utf-8")
    if args.json_file.suffix == ".jsonl":
        data = {"benchmarks": [json.loads(line) for line in text.splitlines() if line.strip()]}
    else:
        data = json.loads(text)
    if not data.get("benchmarks"):
        parser.error(f"{args.json_file} holds no benchmarks; was the suite skipped?")
    print(machine_line(data))
    gpu = gpu_line(data)
    if gpu:
        print()
        print(gpu)
    print()
    print(table(data["benchmarks"]))
    headlines = [b["extra_info"]["headline"] for b in data["benchmarks"]
                 if "headline" in b.get("extra_info", {})]
    if headlines:
        print()
        print("\n".join(headlines))


if __name__ == "__main__":
    main()
