#!/usr/bin/env bash
# The GPU check, in two stages that each fit one command on a cold machine (at most 6 and 7
# minutes: the whole at most 13), run one after the other on the same machine:
#
#   bench/gpu_check.sh correctness   # env, offline install, imports without the data readers, then
#                                    # every GPU-marked test (kernel parity at full ConvRes shapes in
#                                    # fp32 and bf16, the CUDA-graph step, the fused whole-model step,
#                                    # two GPUs where present) with ONE autotune config per kernel
#                                    # (NASLUNG_AUTOTUNE=first), the test files in parallel
#   bench/gpu_check.sh speed         # the Triton benchmark cases' kernels compiled ahead, all
#                                    # configs, JOBS processes at once (untimed); then the GPU
#                                    # benchmarks, Triton, Triton + CUDA graphs and torch.compile
#                                    # cases first, eager after, every config tuned; the deployment
#                                    # latency last
#   bench/gpu_check.sh all           # both, one after the other
#   bench/gpu_check.sh plan          # print both stages' steps, limits and expected compile time
#
# Every stage prints its plan first: its steps with their time limits, and the cold compile time
# the CPU-side estimate expects (bench/gpu_check_plan.json, from `python -m
# naslung.kernels.compile_proof --plan`). Results go to $OUT when it is set, else bench/results/:
# each step's log, and per stage <stage>.json and <stage>.md, rewritten after every step, and the
# benchmarks' results as JSON lines as each ends, so a stage killed at any moment keeps what it
# measured. Triton's cache is a fixed folder outside $OUT ($NASLUNG_TRITON_CACHE, default
# ~/.cache/naslung/gpu-check-triton), so the speed stage starts warm after the correctness stage.
# Every step has a timeout (SIGINT first, so pytest still writes its JUnit XML and benchmark JSON);
# a failed or timed-out step does not stop the later ones; the exit status is 1 if any step failed.
set -u -o pipefail

STAGE="${1:-all}"
case "$STAGE" in
    correctness | speed | all | plan) ;;
    -h | --help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: bench/gpu_check.sh correctness|speed|all|plan" >&2; exit 2 ;;
esac
if [ "$STAGE" = all ]; then
    "$0" correctness; first=$?
    "$0" speed; second=$?
    exit $(( first || second ))
fi

cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
PY="${PYTHON:-python}"
declare -A STAGE_LIMITS=([correctness]=360 [speed]=420)
STAGE_LIMIT_S=${STAGE_LIMITS[$STAGE]:-0}
JOBS="${NASLUNG_GPU_CHECK_JOBS:-$(nproc 2> /dev/null || echo 4)}"
[ "$JOBS" -gt 16 ] && JOBS=16
export TRITON_CACHE_DIR="${NASLUNG_TRITON_CACHE:-$HOME/.cache/naslung/gpu-check-triton}"
mkdir -p "$TRITON_CACHE_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # imports work even if the install fails
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels run compiled on the GPU, not interpreted
LOG="$RESULTS/$STAGE.log"
STEPS="$RESULTS/$STAGE.steps.tsv"
FAILED=()
WARNINGS=()

# The steps of each stage: name and time limit (seconds), in order; the last step of each stage
# gets what the stage has left. No limit is below 30 s (limit_of), so the plan says 30 where it
# means "short". The correctness install builds csrc/ for one GPU: 11 s cold on 2 cores here.
declare -A PLAN=(
    [correctness]="env:30 nvidia-smi:30 install:60 imports:30 gpu-tests:120 sanitizers:rest"
    [speed]="env:30 install:60 precompile:90 bench-gpu:180 bench-export:rest"
)

note() { echo "$*" | tee -a "$LOG"; }

print_plan() {  # print_plan STAGE
    local stage=$1
    echo "stage $stage (at most ${STAGE_LIMITS[$stage]} s; $JOBS parallel jobs; Triton cache $TRITON_CACHE_DIR):"
    for step in ${PLAN[$stage]}; do
        echo "  ${step%%:*}: ${step##*:}$( [ "${step##*:}" = rest ] || echo ' s')"
    done
    "$PY" - "$stage" <<'PY' 2> /dev/null || echo "  (no compile estimate: bench/gpu_check_plan.json missing)"
import json, sys
plan = json.load(open("bench/gpu_check_plan.json"))
entry = plan["stages"][sys.argv[1]]
print(f"  expected cold Triton compile: {entry['expected_cold_compile_s']} s ({entry['builds']} builds of "
      f"{entry['variants']} kernel variants, x{plan['specialisations_per_variant']} specialisations each, on "
      f"{plan['gpu_check_jobs']} cores), estimated on a CPU by compile_proof --plan")
PY
}

if [ "$STAGE" = plan ]; then
    print_plan correctness
    print_plan speed
    exit 0
fi

limit_of() {  # limit_of STEP: the step's time limit in this stage
    local step
    for step in ${PLAN[$STAGE]}; do
        if [ "${step%%:*}" = "$1" ]; then
            local value=${step##*:}
            [ "$value" = rest ] && value=$(( STAGE_LIMIT_S - SECONDS - 20 ))
            [ "$value" -lt 30 ] && value=30
            echo "$value"
            return
        fi
    done
    echo 60
}

write_summary() {  # the stage's JSON and Markdown, rewritten after every step
    "$PY" - "$STAGE" "$RESULTS" "$SECONDS" <<'PY'
import json, sys
from pathlib import Path
stage, results, seconds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
rows = [line.split("\t") for line in (results / f"{stage}.steps.tsv").read_text().splitlines()[1:]]
steps = [{"step": name, "exit": rc, "seconds": int(secs), "log": log} for name, rc, secs, log in rows]
env = json.loads((results / "env.json").read_text()) if (results / "env.json").is_file() else {}
(results / f"{stage}.json").write_text(json.dumps({"stage": stage, "seconds": seconds, "env": env,
                                                   "steps": steps}, indent=2))
lines = [f"# naslung GPU check: {stage}", "", f"{seconds} s so far.", ""]
if env:
    lines += ["```", *(f"{k:>18}: {v}" for k, v in env.items()), "```", ""]
lines += ["| step | exit | seconds | log |", "|---|---|---:|---|"]
lines += [f"| {s['step']} | {s['exit']} | {s['seconds']} | {s['log']} |" for s in steps]
for table in ("gpu_tests.md", "bench_gpu.md", "bench_export.md"):
    if stage == "correctness" and table != "gpu_tests.md" or stage == "speed" and table == "gpu_tests.md":
        continue
    path = results / table
    lines += ["", f"## {table[:-3]}", "", path.read_text() if path.is_file() else "Not measured (yet)."]
(results / f"{stage}.md").write_text("\n".join(lines) + "\n")
PY
}

# run_step NAME CMD...: run CMD with the step's time limit, log it, record its exit status.
run_bench_suite() {  # STEP SUITE BUDGET_VAR MARGIN_S PYTEST_ARGS...: a benchmark suite as a step
    # The suite stops starting cases MARGIN_S before the step's limit and writes its JSON; a
    # killed suite still leaves its progress file, which the report reads instead.
    local step=$1 suite=$2 budget_var=$3 margin=$4 source_file
    shift 4
    export "$budget_var"=$(( $(limit_of "$step") - margin ))
    rm -f "$RESULTS/$suite.json" "$RESULTS/$suite.progress.jsonl"
    NASLUNG_BENCH_PROGRESS="$RESULTS/$suite.progress.jsonl" run_step "$step" \
        "$PY" -m pytest "$@" -q -p no:cacheprovider \
        --benchmark-json="$RESULTS/$suite.json" --junitxml="$RESULTS/$suite.xml"
    source_file="$RESULTS/$suite.json"
    [ -s "$source_file" ] || source_file="$RESULTS/$suite.progress.jsonl"
    [ -s "$source_file" ] && "$PY" bench/report.py "$source_file" > "$RESULTS/$suite.md" 2>&1
    write_summary
}

run_step() {
    local name=$1 limit started=$SECONDS rc
    limit=$(limit_of "$1")
    shift
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
    write_summary
    return 0
}

skip_step() {
    note "== $1: skipped ($2)"
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$STEPS"
    write_summary
}

: > "$LOG"
printf 'step\texit\tseconds\tlog\n' > "$STEPS"
note "naslung GPU check, stage $STAGE, $(date -u +%Y-%m-%dT%H:%M:%SZ), results in $RESULTS"
note "commit: $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no git)')"
print_plan "$STAGE" | tee -a "$LOG"

# --- steps of both stages ------------------------------------------------------------------------

env_step() {
    run_step env "$PY" - "$RESULTS/env.json" <<'PY'
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
}

install_step() {
    # The GPU machine has no network: no index, no build isolation.
    # nvcc builds csrc/ for the GPU at hand only (both targets' builds are proven on any machine
    # by naslung.native.compile_proof); the CMake build under build/ is reused by a second stage.
    if [ "$HAS_CUDA" = 1 ]; then
        NASLUNG_CUDA_ARCHITECTURES=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
        export NASLUNG_CUDA_ARCHITECTURES
    fi
    run_step install "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
    if "$PY" -c "import naslung.kernels, naslung.export" > /dev/null 2>&1; then
        return
    fi
    # The install failed (e.g. no setuptools or wheel offline), and only it maps the top-level
    # kernels/ and export/ folders to naslung.kernels and naslung.export (setup.py): do the same
    # with an import hook, so that the tests and benchmarks still run. The check goes on with a
    # warning, not a failure: what it checks is the code, not the packaging.
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
    if "$PY" -c "import naslung.kernels, naslung.export" > /dev/null 2>&1; then
        local kept=() failure
        for failure in "${FAILED[@]}"; do [[ $failure == install* ]] || kept+=("$failure"); done
        FAILED=("${kept[@]}")
        WARNINGS+=("install failed; naslung.kernels and naslung.export mapped by an import hook ($SHIM)")
        note "   -> WARNING: ${WARNINGS[-1]}"
    fi
}

run_gpu_test_file() {  # one test file's GPU tests, with its log and JUnit XML beside the others
    local name rc
    name=$(basename "$1" .py)
    "$PY" -m pytest -m gpu -q -p no:cacheprovider "$1" --junitxml="$RESULTS/$name.xml" > "$RESULTS/$name.log" 2>&1
    rc=$?
    [ $rc -eq 5 ] && rc=0  # no GPU test selected in this file
    echo "$name: exit $rc, $(tail -n 1 "$RESULTS/$name.log")"
    return $rc
}

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)

# --- correctness ---------------------------------------------------------------------------------

if [ "$STAGE" = correctness ]; then
    env_step
    if command -v nvidia-smi > /dev/null; then run_step nvidia-smi nvidia-smi; else skip_step nvidia-smi "no nvidia-smi"; fi
    install_step
    run_step imports "$PY" - <<'PY'
import importlib, sys
FORBIDDEN = ("SimpleITK", "pylidc", "pydicom", "ray")
failed = []
for module in ("naslung.models", "naslung.models.fused", "naslung.train.trainer", "naslung.train.graphs",
               "naslung.kernels", "naslung.kernels.batchnorm", "naslung.kernels.cbam",
               "naslung.export.deploy", "naslung.export.tensorrt", "naslung.native.batchnorm"):
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
    # Every test file that uses the gpu marker, JOBS at a time: compiling is the bottleneck, and
    # the files share Triton's cache. One autotune config per kernel: parity does not pay for tuning.
    mapfile -t GPU_TESTS < <(grep -l -E "mark\.gpu|pytestmark.*gpu" tests/test_*.py 2> /dev/null)
    if [ "${#GPU_TESTS[@]}" -eq 0 ]; then
        skip_step gpu-tests "no test file uses the gpu marker"
    else
        note "GPU-marked test files: ${GPU_TESTS[*]}"
        export NASLUNG_AUTOTUNE=first RESULTS PY
        export -f run_gpu_test_file
        run_step gpu-tests bash -c 'printf "%s\n" "$@" | xargs -P "$0" -I{} bash -c "run_gpu_test_file {}"' \
            "$JOBS" "${GPU_TESTS[@]}"
        "$PY" - "$RESULTS" > "$RESULTS/gpu_tests.md" <<'PY'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
rows = ["| test file | passed | failed | skipped | seconds |", "|---|---:|---:|---:|---:|"]
for xml in sorted(Path(sys.argv[1]).glob("test_*.xml")):
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    rows.append(f"| {xml.stem} | {tests - failures - errors - skipped} | {failures + errors} | {skipped} | "
                f"{float(suite.get('time', 0)):.0f} |")
print("\n".join(rows))
PY
        write_summary
    fi
    # compute-sanitizer over the csrc/ CUDA kernels' parity tests: out-of-bounds and misaligned
    # accesses (memcheck), then shared-memory races between the threads of a block (racecheck).
    NATIVE_GPU_TESTS=(tests/test_native_batchnorm.py tests/test_native_cbam.py tests/test_native_augment.py)
    if [ "$HAS_CUDA" = 1 ] && command -v compute-sanitizer > /dev/null; then
        run_step sanitizers bash -c 'for tool in memcheck racecheck; do
            echo "--- compute-sanitizer --tool $tool"
            compute-sanitizer --tool "$tool" --error-exitcode 3 "$0" -m pytest -m gpu -q -p no:cacheprovider \
                "$@" || exit $?
        done' "$PY" "${NATIVE_GPU_TESTS[@]}"
    else
        skip_step sanitizers "no CUDA device or no compute-sanitizer"
    fi
fi

# --- speed ---------------------------------------------------------------------------------------

if [ "$STAGE" = speed ]; then
    env_step
    install_step
    unset NASLUNG_AUTOTUNE  # the benchmarks tune every config
    # Compile ahead, in parallel: the Triton cases once each, untimed, JOBS at a time; they fill
    # the shared Triton cache, so the timed run below builds nothing (it only re-tunes).
    mapfile -t TRITON_CASES < <("$PY" -m pytest bench/test_bench_gpu.py --collect-only -q -k triton 2> /dev/null \
        | grep '::')
    if [ "$HAS_CUDA" = 1 ] && [ "${#TRITON_CASES[@]}" -gt 0 ]; then
        run_step precompile bash -c 'printf "%s\n" "$@" | xargs -P "$0" -I{} "'"$PY"'" -m pytest -q \
            -p no:cacheprovider --benchmark-disable "{}"' "$JOBS" "${TRITON_CASES[@]}"
    else
        skip_step precompile "no CUDA device or no Triton case"
    fi
    run_bench_suite bench-gpu bench_gpu NASLUNG_BENCH_GPU_BUDGET_S 45 bench/test_bench_gpu.py
    run_bench_suite bench-export bench_export NASLUNG_BENCH_EXPORT_BUDGET_S 30 \
        bench/test_bench_export.py -m gpu
    if [ "$HAS_CUDA" = 1 ] && [ ! -s "$RESULTS/bench_gpu.md" ]; then
        FAILED+=("bench-gpu (no results although CUDA is available)")
    fi
fi

# --- the end -------------------------------------------------------------------------------------

[ "$HAS_CUDA" = 1 ] || note "no CUDA device here: the GPU tests and benchmarks skipped themselves"
for warning in "${WARNINGS[@]}"; do note "warning: $warning"; done
if [ "${#FAILED[@]}" -gt 0 ]; then
    note "stage $STAGE FAILED: ${FAILED[*]} (${SECONDS} s; see $RESULTS/$STAGE.md)"
    exit 1
fi
note "stage $STAGE passed (${SECONDS} s; see $RESULTS/$STAGE.md)"
