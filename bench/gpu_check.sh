#!/usr/bin/env bash
# Everything a GPU machine should check, in one command that keeps to about six minutes:
#   1. device, driver and versions (torch, triton, CUDA, cuDNN, Python), nvidia-smi
#   2. pip install --no-deps --no-build-isolation -e .   (the GPU machine has no network)
#   3. naslung.models, .train.trainer, .train.graphs, .kernels and .export import without the data
#      readers (SimpleITK, pylidc, pydicom) or ray
#   4. the GPU-marked tests (kernel parity, CUDA-graph steps): every tests/ file that uses the
#      gpu marker, run with -m gpu, JUnit XML
#   5. the deployment latency suite's GPU cases (bench/test_bench_export.py -m gpu: eager CUDA,
#      CUDA graph, Triton, ONNX Runtime CUDA and TensorRT where present) with its own JSON and
#      Markdown table; its own time budget (NASLUNG_EXPORT_BENCH_LIMIT_S, default 100)
#   6. bench/test_bench_gpu.py with --benchmark-json, and its Markdown table (bench/report.py),
#      in whatever is left of the budget
# Logs and results go to $OUT when it is set, else bench/results/. Every step has a timeout
# (SIGINT first, so pytest still writes its JUnit XML and benchmark JSON); a failed or timed-out
# step does not stop the later ones; the exit status is 1 if any step failed.
#
#   bench/gpu_check.sh                       # NASLUNG_GPU_CHECK_BUDGET_S=345 by default
set -u -o pipefail

cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
PY="${PYTHON:-python}"
BUDGET_S="${NASLUNG_GPU_CHECK_BUDGET_S:-345}"
LOG="$RESULTS/gpu_check.log"
STEPS="$RESULTS/steps.tsv"
FAILED=()
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # imports work even if the install fails
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels run compiled on the GPU, not interpreted

: > "$LOG"
printf 'step\texit\tseconds\tlog\n' > "$STEPS"

note() { echo "$*" | tee -a "$LOG"; }

# run_step NAME LIMIT_S CMD...: run CMD with a timeout, log it, record its exit status.
run_step() {
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    note "== $name (limit ${limit}s): $*"
    timeout -s INT -k 15 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    rc=$?
    tail -n 25 "$RESULTS/$name.log" | sed 's/^/   /' | tee -a "$LOG"
    case $rc in
        0) note "   -> ok ($((SECONDS - started)) s)" ;;
        124 | 137) note "   -> TIMED OUT after ${limit}s (exit $rc)"; FAILED+=("$name (timed out)") ;;
        *) note "   -> FAILED (exit $rc)"; FAILED+=("$name (exit $rc)") ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" "$name.log" >> "$STEPS"
    return 0
}

skip_step() {
    note "== $1: skipped ($2)"
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$STEPS"
}

left_s() { echo $((BUDGET_S - SECONDS)); }

note "naslung GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), results in $RESULTS"
note "commit: $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no git)')"

# 1. Versions and device -------------------------------------------------------------------
run_step env 60 "$PY" - "$RESULTS/env.json" <<'PY'
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
for name in ("triton", "pytest", "pytest_benchmark", "numpy", "onnx", "onnxruntime", "setuptools"):
    try:
        info[name] = __import__(name).__version__
    except Exception as err:  # absent or broken: say which
        info[name] = f"unavailable ({type(err).__name__})"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device_name=props.name, capability=f"sm_{props.major}{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                device_count=torch.cuda.device_count())
for key, value in info.items():
    print(f"{key:>18}: {value}")
with open(sys.argv[1], "w", encoding="utf-8") as out:
    json.dump(info, out, indent=2)
PY
if command -v nvidia-smi > /dev/null; then
    run_step nvidia-smi 20 nvidia-smi
else
    skip_step nvidia-smi "no nvidia-smi on PATH"
fi
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)

# 2. Install -------------------------------------------------------------------------------
run_step install 90 "$PY" -m pip install --no-deps --no-build-isolation -e .
if ! "$PY" -c "import naslung.kernels" > /dev/null 2>&1 && [ -f kernels/__init__.py ]; then
    # The install failed (e.g. no setuptools >= 77 offline) and only it maps the top-level
    # kernels/ and export/ folders to naslung.kernels and naslung.export (setup.py): do the
    # same with an import hook, so that the tests and benchmarks can still run.
    SHIM="$(mktemp -d)"
    cat > "$SHIM/sitecustomize.py" <<PYSHIM
"""naslung.kernels and naslung.export from the repository's top-level folders, as setup.py maps
them; written by bench/gpu_check.sh because the editable install failed."""
import importlib.abc
import importlib.util
import sys
from pathlib import Path

FOLDERS = {"naslung.kernels": Path("$PWD/kernels"), "naslung.export": Path("$PWD/export")}


class TopLevelSubpackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = FOLDERS.get(name)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


sys.meta_path.insert(0, TopLevelSubpackages())
PYSHIM
    export PYTHONPATH="$SHIM:$PYTHONPATH"
    note "   naslung.kernels did not import after the install: mapped by an import hook in $SHIM"
fi

# 3. Imports without the data readers ------------------------------------------------------
run_step imports 60 "$PY" - <<'PY'
import importlib, sys
FORBIDDEN = ("SimpleITK", "pylidc", "pydicom", "ray")
failed = []
for module in ("naslung.models", "naslung.models.fused", "naslung.train.trainer", "naslung.train.graphs",
               "naslung.kernels", "naslung.kernels.batchnorm", "naslung.kernels.cbam",
               "naslung.export.deploy", "naslung.export.tensorrt"):
    try:
        importlib.import_module(module)
        print(f"imported {module}")
    except Exception as err:
        failed.append(f"{module}: {type(err).__name__}: {err}")
loaded = sorted(name for name in sys.modules if name.split(".")[0] in FORBIDDEN)
if loaded:
    failed.append(f"imported at import time: {', '.join(loaded)}")
print("\n".join(failed) or f"none of {', '.join(FORBIDDEN)} imported")
sys.exit(1 if failed else 0)
PY

# 4. GPU-marked tests ----------------------------------------------------------------------
mapfile -t GPU_TESTS < <(grep -l -E "mark\.gpu|pytestmark.*gpu" tests/test_*.py 2> /dev/null)
if [ "${#GPU_TESTS[@]}" -eq 0 ]; then
    skip_step gpu-tests "no test file uses the gpu marker"
else
    note "GPU-marked test files: ${GPU_TESTS[*]}"
    run_step gpu-tests "${NASLUNG_GPU_TESTS_LIMIT_S:-120}" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
        --junitxml="$RESULTS/gpu_tests.xml" "${GPU_TESTS[@]}"
fi

# 5. Deployment latency and its table ------------------------------------------------------
# A fixed share of the budget; the suite stops starting cases 30 s before the timeout, so that
# the case in progress can finish and the JSON gets written.
EXPORT_LIMIT="${NASLUNG_EXPORT_BENCH_LIMIT_S:-100}"
rm -f "$RESULTS/bench_export.json"
NASLUNG_BENCH_EXPORT_BUDGET_S=$((EXPORT_LIMIT - 30)) run_step bench-export "$EXPORT_LIMIT" \
    "$PY" -m pytest bench/test_bench_export.py -m gpu -q -p no:cacheprovider \
    --benchmark-json="$RESULTS/bench_export.json" --junitxml="$RESULTS/bench_export.xml"
[ -s "$RESULTS/bench_export.json" ] || rm -f "$RESULTS/bench_export.json"
if [ -s "$RESULTS/bench_export.json" ]; then
    run_step report-export 30 "$PY" bench/report.py "$RESULTS/bench_export.json"
    cp "$RESULTS/report-export.log" "$RESULTS/bench_export.md"
elif [ "$HAS_CUDA" = 1 ]; then
    note "== report-export: no deployment benchmark JSON although CUDA is available"
    FAILED+=("report-export (no benchmark JSON)")
else
    skip_step report-export "no CUDA device: the deployment GPU benchmarks were skipped"
fi

# 6. Benchmarks and their table ------------------------------------------------------------
# Whatever is left of the budget, less time for the report; the suite's own budget is 45 s
# shorter than the timeout so it stops starting cases and writes its JSON before the timeout.
BENCH_LIMIT=$(( $(left_s) - 15 ))
[ "$BENCH_LIMIT" -lt 90 ] && BENCH_LIMIT=90
export NASLUNG_BENCH_GPU_BUDGET_S=$((BENCH_LIMIT - 45))
rm -f "$RESULTS/bench_gpu.json"
run_step bench "$BENCH_LIMIT" "$PY" -m pytest bench/test_bench_gpu.py -q -p no:cacheprovider \
    --benchmark-json="$RESULTS/bench_gpu.json" --junitxml="$RESULTS/bench_gpu.xml"
[ -s "$RESULTS/bench_gpu.json" ] || rm -f "$RESULTS/bench_gpu.json"  # made even when nothing ran
if [ -s "$RESULTS/bench_gpu.json" ]; then
    run_step report 30 "$PY" bench/report.py "$RESULTS/bench_gpu.json"
    cp "$RESULTS/report.log" "$RESULTS/bench_gpu.md"
elif [ "$HAS_CUDA" = 1 ]; then
    note "== report: no benchmark JSON although CUDA is available"
    FAILED+=("report (no benchmark JSON)")
else
    skip_step report "no CUDA device: the GPU benchmarks were skipped"
fi

# Summary ----------------------------------------------------------------------------------
{
    echo "# naslung GPU check"
    echo
    echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS} s."
    echo
    echo '```'
    cat "$RESULTS/env.log" 2> /dev/null
    echo '```'
    echo
    echo "| step | exit | seconds | log |"
    echo "|---|---|---:|---|"
    tail -n +2 "$STEPS" | while IFS=$'\t' read -r name rc secs log; do echo "| $name | $rc | $secs | $log |"; done
    echo
    if [ -s "$RESULTS/bench_gpu.md" ]; then cat "$RESULTS/bench_gpu.md"; else echo "No benchmark table."; fi
    echo
    echo "## Deployment latency (bench/test_bench_export.py)"
    echo
    if [ -s "$RESULTS/bench_export.md" ]; then cat "$RESULTS/bench_export.md"; else echo "No table."; fi
} > "$RESULTS/summary.md"

if [ "$HAS_CUDA" != 1 ]; then
    note "no CUDA device here: the GPU tests and benchmarks skipped themselves"
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
    note "FAILED: ${FAILED[*]} (${SECONDS} s; see $RESULTS)"
    exit 1
fi
note "all steps passed (${SECONDS} s; see $RESULTS)"
