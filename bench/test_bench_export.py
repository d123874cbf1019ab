"""Deployment latency of the exported ensemble: batch-1 latency and batch-64 throughput per runtime.

The model is a representative ensemble of three ConvRes members of searched sizes (random
weights, BatchNorm statistics away from identity, each member with its own HU normalisation),
32^3 crops, exported once per module to ONNX with `export_onnx`. Every provider is timed the
way `naslung predict` uses a runner: float32 HU crops (N, 32, 32, 32) on the host in, all five
outputs (probability, member probabilities, vote, attention, Grad-CAM) on the host out.

Providers (each benchmark's group is ``deploy {cpu|cuda} b{batch}``; ratios are within one run):

- CPU: ``eager`` (the DeployedEnsemble in eval mode under torch.inference_mode, torch's default
  threads; the group's baseline) and ``onnxruntime`` (OnnxRunner, its default threads).
  `test_report_onnxruntime_speedup_over_eager` then prints eager median / ONNX Runtime median per batch
  and stores it with both entries (``eager_over_onnxruntime``). Reported, never asserted.
- CUDA (``gpu`` marker; skipped without a GPU): ``cuda_eager`` (the group's baseline),
  ``cuda_graph`` (the same forward captured once per batch size as a CUDA graph on static
  buffers), ``triton`` (each member fused onto naslung's Triton kernels; the stem CBAM, whose
  attention is an output, stays PyTorch), ``onnxruntime_cuda`` (when onnxruntime has the CUDA
  execution provider), ``tensorrt_fp32`` and ``tensorrt_fp16`` (engines for batches 1..64 built
  as `naslung-export --trt` builds them, when `tensorrt_available()` says so). On a GPU, a
  provider that cannot run there is recorded as ``unavailable`` with its reason, so the table
  says why its row is empty. TF32 is off for the whole module: "fp32" is fp32 for every
  provider, as in the TensorRT build, and the check below can hold it to 1e-5.

Before a provider is timed, its outputs on four nodule-like crops are checked once against the
CPU eager ensemble (probabilities within 1e-5 for fp32 and 2e-2 for fp16; attention and
Grad-CAM maps within 1e-4 and 5e-2; the vote where every member is decided), so the suite never
times a wrong answer. The first call (ONNX Runtime's session warm-up, cuDNN plans, graph capture,
Triton compiling) is made before the warm-up rounds and recorded as ``first_call_s``.

Each entry records ``cpu_wait_fraction``: how long this process's threads waited for a CPU per
second of timing (see `naslung.search.timing.CpuWait`, which also warns above 10 %). On the
2-core machine one busy process elsewhere stalls torch's two threads at every barrier: eager's
batch-1 median went from 40 ms to 1.1 s (rounds from 42 ms to 1.9 s) while ONNX Runtime's stayed
at 14 ms, so read the ratio only beside a small wait fraction.

GPU rounds synchronise inside the timed function. The GPU cases keep to a time budget when
``NASLUNG_BENCH_EXPORT_BUDGET_S`` is set (seconds from import; `bench/gpu_check.sh` sets it):
cases that cannot start in time are recorded as not measured. On the quiet 2-core development
CPU the whole CPU part takes about 30 s (export included); a busy core makes it minutes.

    python -m pytest bench/test_bench_export.py -q --benchmark-json=/tmp/bench_export.json
    python bench/report.py /tmp/bench_export.json
    python -m pytest bench/test_bench_export.py -m gpu -q    # the GPU cases only
"""

from __future__ import annotations

import copy
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import interrupt_after_rounds

from naslung.arch import Arch
from naslung.data.augment import AIR_HU, Normalisation
from naslung.export.deploy import parity_crops
from naslung.export.ensemble import DeployedEnsemble, DeployedMember
from naslung.export.metadata import OUTPUT_NAMES, MemberInfo, ModelMetadata
from naslung.export.onnx_export import export_onnx
from naslung.export.runners import OnnxRunner, Outputs, ensemble_outputs
from naslung.models import ConvRes
from naslung.search.timing import CpuWait
from naslung.testing import randomise_batchnorm

CROP = 32
BATCHES = (1, 64)
ARCHS = ("4,8,16/32,32/64,128", "4,8/16,32/64", "8/16,16/32,64")
"""Searched sizes: 1.0 M, 0.26 M and 0.25 M parameters."""
NORMALISATIONS = (Normalisation(-1000.0, 400.0, -612.0, 318.0), Normalisation(-1000.0, 400.0, -598.0, 331.0),
                  Normalisation(-1000.0, 400.0, -605.0, 322.0))
"""One per member, as members trained on different folds have."""
CHECK_CROPS = 4
TOLERANCES = {"fp32": (1e-5, 1e-4), "fp16": (2e-2, 5e-2)}
"""precision -> (probabilities, attention and Grad-CAM maps): largest |provider - CPU eager|."""
ROUNDS = {("cpu", 1): (3, 30), ("cpu", 64): (1, 10), ("cuda", 1): (10, 100), ("cuda", 64): (3, 30)}
"""(device, batch) -> (warm-up rounds, timed rounds). On the quiet 2-core development CPU one batch
of 64 takes about 0.95 s in eager and 0.7 s in ONNX Runtime, one crop 37 and 13 ms."""
BUDGET_ENV = "NASLUNG_BENCH_EXPORT_BUDGET_S"
STARTED = time.monotonic()
NEEDS_S = {"tensorrt_fp32": 45.0, "tensorrt_fp16": 45.0, "triton": 25.0}
"""Budget a GPU case must still have left to start (engine builds, Triton compiling); others 5 s."""


class Provider(NamedTuple):
    name: str
    device: str  # "cpu" or "cuda"
    precision: str


PROVIDERS = [
    Provider("eager", "cpu", "fp32"),
    Provider("onnxruntime", "cpu", "fp32"),
    Provider("cuda_eager", "cuda", "fp32"),
    Provider("cuda_graph", "cuda", "fp32"),
    Provider("triton", "cuda", "fp32"),
    Provider("onnxruntime_cuda", "cuda", "fp32"),
    Provider("tensorrt_fp32", "cuda", "fp32"),
    Provider("tensorrt_fp16", "cuda", "fp16"),
]
BASELINES = {"cpu": "eager", "cuda": "cuda_eager"}
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
"""Skipped before the module's fixtures export anything, so a GPU-only run without one is quick."""


def _cases() -> list:
    """CPU providers batch by batch (each pair compared within minutes), then the GPU ones."""
    cpu = [(p, b) for b in BATCHES for p in PROVIDERS if p.device == "cpu"]
    cuda = [(p, b) for p in PROVIDERS if p.device == "cuda" for b in BATCHES]
    return ([pytest.param(p, b, id=f"{p.name}-b{b}") for p, b in cpu]
            + [pytest.param(p, b, id=f"{p.name}-b{b}", marks=GPU_MARKS) for p, b in cuda])


Run = Callable[[np.ndarray], Outputs]


@dataclass
class Setup:
    """The ensemble, its ONNX export, timing crops and the CPU eager reference on check crops."""

    ensemble: DeployedEnsemble
    out: Path
    onnx32: Path
    export_s: float
    crops: np.ndarray
    check: np.ndarray
    reference: Outputs
    onnx16: Path | None = None
    runners: dict[str, Run] = field(default_factory=dict)
    failures: dict[str, Exception] = field(default_factory=dict)
    """Providers that could not be built or checked: the other batch size is not tried again."""
    facts: dict[str, dict] = field(default_factory=dict)


RESULTS: dict[tuple[str, int], dict] = {}
"""(provider, batch) -> median_s and the entry's extra_info (the same dict, so later tests can add
to what gets saved)."""


# --------------------------------------------------------------------------- the ensemble


def make_ensemble() -> DeployedEnsemble:
    members, infos = [], []
    for seed, (text, normalisation) in enumerate(zip(ARCHS, NORMALISATIONS, strict=True)):
        torch.manual_seed(seed)
        arch = Arch.parse(text)
        model = randomise_batchnorm(ConvRes(arch), seed)
        members.append(DeployedMember(model, normalisation))
        infos.append(MemberInfo(arch=str(arch), cbam=model.cbam_variant, head=model.head_kind,
                                normalisation=normalisation.to_dict(), source="bench (random weights)"))
    metadata = ModelMetadata(crop=CROP, grid=CROP, spacing_mm=1.0, outside_hu=AIR_HU, units="HU",
                             members=infos, label_rule={"threshold": 0.5})
    return DeployedEnsemble(members, metadata).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    out = tmp_path_factory.mktemp("export")
    ensemble = make_ensemble()
    start = time.perf_counter()
    onnx32 = export_onnx(ensemble, out / "model.onnx")
    export_s = time.perf_counter() - start
    check = parity_crops(CROP, count=CHECK_CROPS, seed=0)
    reference = ensemble_outputs(ensemble, check)
    return Setup(ensemble, out, onnx32, export_s, parity_crops(CROP, count=max(BATCHES), seed=1), check,
                 reference)


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    """fp32 means fp32 on a GPU too (cuDNN, matmuls and the Triton convs read these flags)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- the providers


class Unavailable(Exception):
    """A provider that cannot run on this machine; str(err) says why."""


def _torch_run(model: DeployedEnsemble, device: str) -> Run:
    return lambda crops: ensemble_outputs(model, crops, device)


class GraphRun:
    """The ensemble's forward captured as a CUDA graph per batch size, replayed on static buffers."""

    def __init__(self, model: DeployedEnsemble) -> None:
        self.model = model
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, ...]]:
        static_in = torch.full((batch, 1, CROP, CROP, CROP), AIR_HU, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # cuDNN plans and allocations before capture
                self.model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_out = self.model(static_in)
        return graph, static_in, static_out

    def __call__(self, crops: np.ndarray) -> Outputs:
        if len(crops) not in self.graphs:
            self.graphs[len(crops)] = self._capture(len(crops))
        graph, static_in, static_out = self.graphs[len(crops)]
        static_in.copy_(torch.from_numpy(crops[:, None]))
        graph.replay()
        return Outputs.from_tensors(static_out)


def _fused(ensemble: DeployedEnsemble) -> DeployedEnsemble:
    from naslung.models.fused import fuse

    fused = copy.deepcopy(ensemble)
    for member in fused.members:  # after DeployedMember, which un-fuses what it is given
        member.model = fuse(member.model, inplace=True)
    return fused


def _onnxruntime_cuda(setup: Setup) -> Run:
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        available = ", ".join(onnxruntime.get_available_providers())
        raise Unavailable(f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (it has "
                          f"{available}); install onnxruntime-gpu")
    runner = OnnxRunner(setup.onnx32, provider="cuda")
    try:  # TF32 off, as for the other fp32 providers (the runner takes no provider options)
        runner.session.set_providers(["CUDAExecutionProvider", "CPUExecutionProvider"],
                                     [{"use_tf32": "0"}, {}])
        setup.facts["onnxruntime_cuda"] = {"ort_tf32": False}
    except Exception as err:  # an onnxruntime without that option keeps its default
        setup.facts["onnxruntime_cuda"] = {"ort_tf32": f"onnxruntime default ({type(err).__name__})"}
    if runner.session.get_providers()[0] != "CUDAExecutionProvider":
        raise Unavailable(f"onnxruntime could not start its CUDA provider here (the session runs on "
                          f"{', '.join(runner.session.get_providers())})")
    return runner.run


def _tensorrt(setup: Setup, precision: str) -> Run:
    from naslung.export.tensorrt import TensorRTRunner, build_engine, tensorrt_available

    reason = tensorrt_available()
    if reason is not None:
        raise Unavailable(reason)
    import tensorrt

    source = setup.onnx32
    if precision == "fp16":
        if setup.onnx16 is None:
            half = copy.deepcopy(setup.ensemble).to_precision("fp16")
            setup.onnx16 = export_onnx(half, setup.out / "model.fp16.onnx")
        source = setup.onnx16
    start = time.perf_counter()
    engine = build_engine(source, setup.out / f"model.{precision}.engine", max_batch=max(BATCHES),
                          precision=precision)
    setup.facts[f"tensorrt_{precision}"] = {"build_s": round(time.perf_counter() - start, 2),
                                            "opt_batch": 1, "max_batch": max(BATCHES),
                                            "tensorrt": tensorrt.__version__}
    return TensorRTRunner(engine).run


def build(provider: Provider, setup: Setup) -> Run:
    """The provider's run function (raises `Unavailable` where it cannot run)."""
    name = provider.name
    if name == "eager":
        return _torch_run(setup.ensemble, "cpu")
    if name == "onnxruntime":
        return OnnxRunner(setup.onnx32).run
    if not torch.cuda.is_available():
        raise Unavailable("needs a CUDA GPU")
    if name == "cuda_eager":
        return _torch_run(copy.deepcopy(setup.ensemble).to("cuda"), "cuda")
    if name == "cuda_graph":
        return GraphRun(copy.deepcopy(setup.ensemble).to("cuda"))
    if name == "triton":
        return _torch_run(_fused(setup.ensemble).to("cuda"), "cuda")
    if name == "onnxruntime_cuda":
        return _onnxruntime_cuda(setup)
    if name.startswith("tensorrt_"):
        return _tensorrt(setup, provider.precision)
    raise ValueError(f"unknown provider {name}")


def check_outputs(provider: Provider, got: Outputs, want: Outputs) -> dict[str, float]:
    """Largest |difference| per output against the CPU eager reference, within the tolerances."""
    prob_tol, map_tol = TOLERANCES[provider.precision]
    diffs = {name: float(np.abs(getattr(got, name).astype(np.float64) - getattr(want, name)).max())
             for name in OUTPUT_NAMES}
    for name in OUTPUT_NAMES:
        tol = map_tol if name in ("attention", "gradcam") else prob_tol
        assert diffs[name] <= tol, (f"{provider.name}: {name} differs from CPU eager by {diffs[name]:.2e} "
                                    f"(> {tol:.0e}); not timing a wrong answer")
    decided = (np.abs(want.member_probabilities - 0.5) > prob_tol).all(axis=1)
    np.testing.assert_array_equal(got.majority_vote[decided], want.majority_vote[decided])
    return diffs


def runner_for(provider: Provider, setup: Setup) -> Run:
    """Build the provider once per module and check its outputs once before anything is timed."""
    if provider.name in setup.failures:
        raise setup.failures[provider.name]
    if provider.name not in setup.runners:
        try:
            run = build(provider, setup)
            diffs = check_outputs(provider, run(setup.check), setup.reference)
        except Exception as err:
            setup.failures[provider.name] = err
            raise
        rounded = {name: float(f"{value:.3g}") for name, value in diffs.items()}
        setup.facts.setdefault(provider.name, {})["max_abs_diff"] = rounded
        setup.runners[provider.name] = run
    return setup.runners[provider.name]


# --------------------------------------------------------------------------- the harness


def _remaining_s() -> float:
    budget = os.environ.get(BUDGET_ENV)
    return float("inf") if not budget else float(budget) - (time.monotonic() - STARTED)


def _platform(device: str) -> dict:
    info = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "not installed"
        info.update(triton=triton_version, cuda=torch.version.cuda or "none",
                    cudnn=str(torch.backends.cudnn.version() or "none"),
                    device_name=torch.cuda.get_device_name(),
                    capability="sm_{}{}".format(*torch.cuda.get_device_capability()),
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    return info


def _record(benchmark, status: str, reason: str) -> None:
    """An entry with no timing, so the report lists the case and says why."""
    benchmark.extra_info.update(status=status, reason=reason[:300], measured=False)
    with interrupt_after_rounds():
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


@pytest.mark.parametrize(("provider", "batch"), _cases())
def test_deploy(benchmark, setup: Setup, provider: Provider, batch: int) -> None:
    """All five outputs for ``batch`` host crops, as the provider runs the exported ensemble."""
    benchmark.group = f"deploy {provider.device} b{batch}"
    benchmark.extra_info.update(
        provider=provider.name, baseline=provider.name == BASELINES[provider.device], batch=batch,
        crop=CROP, device=provider.device, precision=provider.precision, members=list(ARCHS),
        export_s=round(setup.export_s, 2), **_platform(provider.device))
    started = provider.name in setup.runners or provider.name in setup.failures
    need = 5.0 if started else NEEDS_S.get(provider.name, 5.0)
    if provider.device == "cuda" and _remaining_s() < need:
        reason = f"time budget spent ({BUDGET_ENV}; {need:.0f} s needed, {_remaining_s():.0f} s left)"
        _record(benchmark, "not measured", reason)
        pytest.skip(reason)
    try:
        run = runner_for(provider, setup)
    except Unavailable as err:
        if provider.device == "cuda":  # on a GPU machine, say in the table why the row is empty
            _record(benchmark, "unavailable", str(err))
        pytest.skip(str(err))
    except Exception as err:  # a build error or a wrong answer: listed, and the test fails
        _record(benchmark, "error", f"{type(err).__name__}: {_first_line(err)}")
        raise
    benchmark.extra_info.update(setup.facts.get(provider.name, {}))

    crops = np.ascontiguousarray(setup.crops[:batch])
    if provider.device == "cuda":
        def timed(crops: np.ndarray) -> Outputs:
            outputs = run(crops)
            torch.cuda.synchronize()
            return outputs
    else:
        timed = run
    start = time.perf_counter()
    outputs = timed(crops)
    benchmark.extra_info["first_call_s"] = round(time.perf_counter() - start, 3)
    warmup, rounds = ROUNDS[provider.device, batch]
    with CpuWait(f"{provider.name} at batch {batch}") as wait, interrupt_after_rounds():
        outputs = benchmark.pedantic(timed, args=(crops,), warmup_rounds=warmup, rounds=rounds, iterations=1)
    assert outputs.probability.shape == (batch,)

    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(status="ok", measured=True, warmup_rounds=warmup, rounds=rounds,
                                median_ms=round(median_s * 1e3, 3), crops_per_s=round(batch / median_s, 2),
                                cpu_wait_fraction=None if wait.fraction is None else round(wait.fraction, 4))
    RESULTS[provider.name, batch] = {"median_s": median_s, "extra_info": benchmark.extra_info}


def test_report_onnxruntime_speedup_over_eager(capsys) -> None:
    """eager median / ONNX Runtime median on this CPU, per batch, from this run (reported only;
    the deployment target is at least 2x at batch 1)."""
    lines = []
    for batch in BATCHES:
        eager, ort = RESULTS.get(("eager", batch)), RESULTS.get(("onnxruntime", batch))
        if eager is None or ort is None:
            continue
        ratio = eager["median_s"] / ort["median_s"]
        for result in (eager, ort):
            result["extra_info"]["eager_over_onnxruntime"] = round(ratio, 3)
        waits = [result["extra_info"].get("cpu_wait_fraction") for result in (eager, ort)]
        waited = "unknown" if None in waits else f"{waits[0]:.0%} and {waits[1]:.0%}"
        ort["extra_info"]["headline"] = (
            f"batch {batch}: eager {eager['median_s'] * 1e3:,.1f} ms / ONNX Runtime "
            f"{ort['median_s'] * 1e3:,.1f} ms = {ratio:.2f}x ({batch / ort['median_s']:,.1f} against "
            f"{batch / eager['median_s']:,.1f} crops/s) on the CPU, one run; waited for a CPU {waited}")
        lines.append(ort["extra_info"]["headline"])
    if not lines:
        pytest.skip("the CPU eager and ONNX Runtime cases did not both run")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
