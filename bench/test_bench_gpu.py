"""GPU timings of ConvRes: its layer shapes, whole training steps and batch-1 inference.

Kinds of benchmark (each benchmark's group is one case, so the ratios come from one run):

- ``layer``: forward + backward of one conv unit (conv + BN + ReLU) or CBAM block at a shape
  ConvRes has on 32^3 crops, batch 32; providers ``eager`` (fp32), ``bf16`` (autocast, NCDHW),
  ``bf16_channels_last_3d``, ``triton`` (the fused modules of naslung.models.fused, fp32) and
  ``cuda`` (cuDNN convolutions, BatchNorm+ReLU and CBAM from csrc/'s CUDA build, fp32).
- ``train``: forward, A-Softmax loss, backward and an Adam step of three archs at batch 8, 32
  and 128; providers as for layers plus ``graphs`` (eager fp32 replayed as a CUDA graph),
  ``triton_graphs`` (fused model as a CUDA graph; both graph providers use Adam with
  capturable=True, see naslung.train.graphs) and ``compile`` (torch.compile of the model, fp32,
  compiled at batch 32 only: the other batches are listed as not measured).
- ``infer``: eval-mode forward of one crop: ``eager``, ``channels_last_3d``, ``triton`` (fused
  model in eval mode: BN applied from running statistics in the conv kernel's epilogue) and
  ``compile``.

Times are GPU time between CUDA events around each round (the clock synchronises), medians of
warm rounds; the first calls (cuDNN plans, Triton JIT and autotuning, graph capture, compiling)
happen before and are recorded as ``first_call_s``. "fp32" convolutions use whatever
``torch.backends.cudnn.allow_tf32`` says (True by default: TF32), recorded with every result.

A failing provider (out of memory, a kernel error) is recorded, not fatal: its entry carries
``status`` and ``reason`` in extra_info, and a kernel error also fails its test. The suite keeps
to a time budget (``NASLUNG_BENCH_GPU_BUDGET_S``, default 200 s, counted from import): cases it
cannot start in time are listed as not measured. Run order puts what the kernels exist for first:
the Triton providers (with CUDA graphs), then torch.compile, then the eager torch ones, so a
short window measures the Triton numbers before anything else. Without CUDA the suite is skipped.

    python -m pytest bench/test_bench_gpu.py --benchmark-json=/tmp/bench_gpu.json -q
    python bench/report.py /tmp/bench_gpu.json
"""

from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from conftest import interrupt_after_rounds

from naslung.arch import PAPER_28M
from naslung.models import ConvBNReLU, ConvRes, make_cbam, make_loss
from naslung.models.fused import fuse
from naslung.train.graphs import CapturedTrainStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")
BUDGET_ENV = "NASLUNG_BENCH_GPU_BUDGET_S"
CUDNN_BENCHMARK_ENV = "NASLUNG_BENCH_CUDNN_BENCHMARK"
STARTED = time.monotonic()
CROP = 32
LAYER_BATCH = 32
TRAIN_BATCHES = (8, 32, 128)
COMPILE_BATCH = 32
LR, BETAS = 2e-4, (0.5, 0.999)

ROUND_TARGET_S = {"layer": 0.1, "train": 0.3, "infer": 0.1}
"""Roughly how long the timed rounds of one case may take."""
MIN_ROUND_S = 2e-3  # calls shorter than this are looped within a round (iterations)
NEEDS_S = {"layer": 3.0, "train": 10.0, "infer": 3.0, "compile": 90.0}
"""Budget a case must still have left to start (compiling takes a minute or more)."""


class Layer(NamedTuple):
    """One conv unit (conv + BN + ReLU) or CBAM block of ConvRes at its input size."""

    slug: str
    op: str  # "conv" or "cbam"
    cin: int
    cout: int
    kernel: int
    stride: int
    size: int

    @property
    def label(self) -> str:
        if self.op == "cbam":
            return f"CBAM {self.cin}ch @{self.size}^3"
        stride = " s2" if self.stride == 2 else ""
        return f"conv{self.kernel} {self.cin}->{self.cout}{stride} @{self.size}^3"


def _conv(cin: int, cout: int, size: int, kernel: int = 3, stride: int = 1) -> Layer:
    return Layer(f"conv{kernel}s{stride}-{cin}-{cout}-{size}", "conv", cin, cout, kernel, stride, size)


def _cbam(channels: int, size: int) -> Layer:
    return Layer(f"cbam-{channels}-{size}", "cbam", channels, channels, 3, 1, size)


LAYERS = {layer.slug: layer for layer in [
    _conv(1, 4, 32), _conv(4, 4, 32),                                       # stem
    _conv(4, 4, 32, stride=2), _conv(64, 64, 16, stride=2), _conv(256, 256, 8, stride=2),  # downs
    _conv(4, 64, 16), _conv(16, 16, 16), _conv(64, 64, 16),                 # blocks at 16^3
    _conv(32, 32, 8), _conv(128, 128, 8), _conv(128, 256, 8),               # at 8^3
    _conv(64, 128, 4), _conv(256, 256, 4), _conv(512, 512, 4),              # at 4^3
    _conv(64, 64, 16, kernel=1), _conv(128, 256, 8, kernel=1), _conv(256, 512, 4, kernel=1),  # shortcuts
    _cbam(4, 32), _cbam(64, 16), _cbam(256, 8), _cbam(512, 4),
]}
ARCHS = {"tiny": "4,8,16/32,32/64,128", "small": "16,32/64,64/128", "paper28m": str(PAPER_28M)}

TORCH_LAYER_PROVIDERS = ("eager", "bf16", "bf16_channels_last_3d")
TORCH_TRAIN_PROVIDERS = ("eager", "bf16", "bf16_channels_last_3d", "graphs")
TORCH_INFER_PROVIDERS = ("eager", "channels_last_3d")


class Case(NamedTuple):
    kind: str  # layer, train or infer
    provider: str
    target: str  # a LAYERS slug or an ARCHS key
    batch: int

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.provider}-{self.target}-b{self.batch}"

    @property
    def group(self) -> str:
        what = LAYERS[self.target].label if self.kind == "layer" else ARCHS[self.target]
        return f"{self.kind} {what} b{self.batch}"


def _cases() -> list[Case]:
    """All cases in run order: Triton, then torch.compile, then the eager torch providers."""
    cases = []
    for providers, train_providers, infer_providers in (
        (("triton", "cuda"), ("triton", "triton_graphs", "cuda"), ("triton",)),
        ((), ("compile",), ("compile",)),
        (TORCH_LAYER_PROVIDERS, TORCH_TRAIN_PROVIDERS, TORCH_INFER_PROVIDERS),
    ):
        cases += [Case("layer", p, slug, LAYER_BATCH) for slug in LAYERS for p in providers]
        for arch in ARCHS:  # per arch, so a spent budget leaves whole archs out
            cases += [Case("train", p, arch, batch) for batch in TRAIN_BATCHES for p in train_providers]
            cases += [Case("infer", p, arch, 1) for p in infer_providers]
    return cases


CASES = _cases()
CONTEXT_LOST: list[str] = []  # set once a kernel error leaves the CUDA context unusable


def _sync() -> None:
    torch.cuda.synchronize()


def cuda_event_clock() -> Callable[[], float]:
    """A pytest-benchmark timer reading the GPU's clock: seconds since its creation, taken from a
    CUDA event recorded on the current stream and waited for (so each reading synchronises)."""
    origin = torch.cuda.Event(enable_timing=True)
    origin.record()
    origin.synchronize()

    def cuda_event_clock_s() -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        return origin.elapsed_time(event) / 1e3

    return cuda_event_clock_s


def event_clock() -> Callable[[], float] | None:
    """The CUDA-event clock where the suite runs on a GPU, else None."""
    return cuda_event_clock() if DEVICE.type == "cuda" else None


def device_info() -> dict:
    """Device and versions, stored with every result (the house conftest knows only the CPU)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda or "none",
            "cudnn": str(torch.backends.cudnn.version() or "none"), "python": platform.python_version(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if DEVICE.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(DEVICE)
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(DEVICE))
    else:
        info["device_name"] = f"{DEVICE.type} (dry run)"
    return info


# ------------------------------------------------------------------------- what gets timed


def _memory_format(provider: str) -> torch.memory_format:
    return torch.channels_last_3d if provider.endswith("channels_last_3d") else torch.contiguous_format


def _autocast(provider: str):
    return torch.autocast(DEVICE.type, torch.bfloat16, enabled=provider.startswith("bf16"))


def layer_step(case: Case) -> Callable[[], None]:
    """Forward and backward of one layer on a batch of feature maps."""
    layer = LAYERS[case.target]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        module = (ConvBNReLU(layer.cin, layer.cout, layer.kernel, stride=layer.stride) if layer.op == "conv"
                  else make_cbam(layer.cin, "nas-lung")).train()
        x = torch.randn(case.batch, layer.cin, layer.size, layer.size, layer.size)
    if case.provider in ("triton", "cuda"):
        module = fuse(module, inplace=True, backend="native" if case.provider == "cuda" else "triton")
    memory_format = _memory_format(case.provider)
    module = module.to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    params = list(module.parameters())
    grad: list[torch.Tensor] = []  # made on the first call, which may be the kernels' first

    def step() -> None:
        with _autocast(case.provider):
            out = module(x)
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])
        x.grad = None
        for param in params:
            param.grad = None

    return step


def train_step(case: Case) -> Callable[[], object]:
    """One training step of an arch, as the provider runs it."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = ConvRes(ARCHS[case.target]).train()
        x = torch.randn(case.batch, 1, CROP, CROP, CROP)
        y = torch.randint(0, 2, (case.batch,))
    if case.provider.startswith("triton") or case.provider == "cuda":
        model = fuse(model, inplace=True, backend="native" if case.provider == "cuda" else "triton")
    memory_format = _memory_format(case.provider)
    model = model.to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    loss_fn = make_loss(model.head)
    graphs = case.provider.endswith("graphs")
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, capturable=graphs)
    if graphs:
        captured = CapturedTrainStep(model, loss_fn, optimizer, x, y)
        return lambda: captured(x, y)
    net = torch.compile(model) if case.provider == "compile" else model

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(case.provider):
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return step


def infer_step(case: Case) -> Callable[[], torch.Tensor]:
    """Eval-mode forward of one crop under inference_mode."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = ConvRes(ARCHS[case.target]).eval()
        x = torch.randn(case.batch, 1, CROP, CROP, CROP)
    if case.provider == "triton":
        model = fuse(model, inplace=True)
    memory_format = _memory_format(case.provider)
    model = model.to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    net = torch.compile(model) if case.provider == "compile" else model

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return net(x)

    return step


BUILDERS = {"layer": layer_step, "train": train_step, "infer": infer_step}


# --------------------------------------------------------------------------- the harness


def _remaining_s() -> float:
    return float(os.environ.get(BUDGET_ENV, "200")) - (time.monotonic() - STARTED)


def _why_not_measured(case: Case) -> str | None:
    if CONTEXT_LOST:
        return f"CUDA context lost after an earlier error ({CONTEXT_LOST[0]})"
    if case.provider == "compile" and case.kind == "train" and case.batch != COMPILE_BATCH:
        return f"torch.compile timed at batch {COMPILE_BATCH} only (compiling takes minutes)"
    need = NEEDS_S["compile" if case.provider == "compile" else case.kind]
    if _remaining_s() < need:
        return f"time budget spent ({BUDGET_ENV}; {need:.0f} s needed, {_remaining_s():.0f} s left)"
    return None


def _record(benchmark, status: str, reason: str) -> None:
    """Store an entry with no timing (status and reason say why) so the report lists the case."""
    benchmark.extra_info.update(status=status, reason=reason[:300], measured=False)
    with interrupt_after_rounds():
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def _release() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _context_usable() -> bool:
    try:
        _sync()
        torch.zeros(1, device=DEVICE).add_(1).item()
    except Exception as err:  # a sticky CUDA error: nothing after it can run
        CONTEXT_LOST.append(f"{type(err).__name__}: {_first_line(err)}")
        return False
    return True


def _first_calls(step: Callable[[], object], calls: int) -> tuple[float, float]:
    """Run the first calls (compiles, plans, autotunes), then one more to estimate a call's time."""
    start = time.perf_counter()
    for _ in range(calls):
        step()
    _sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    _sync()
    return first, time.perf_counter() - start


def _rounds(kind: str, call_s: float) -> tuple[int, int]:
    """(rounds, iterations per round) that fit the kind's time target."""
    iterations = max(1, min(50, int(MIN_ROUND_S / max(call_s, 1e-6))))
    rounds = int(ROUND_TARGET_S[kind] / max(call_s * iterations, 1e-6))
    return max(3 if call_s < 1.0 else 2, min(30, rounds)), iterations


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_gpu(benchmark, case: Case) -> None:
    benchmark.group = case.group
    benchmark.extra_info.update(
        kind=case.kind, provider=case.provider, baseline=case.provider == "eager", target=case.target,
        batch=case.batch, crop=CROP, **device_info(),
    )
    reason = _why_not_measured(case)
    if reason:
        _record(benchmark, "not measured", reason)
        pytest.skip(reason)

    torch.backends.cudnn.benchmark = os.environ.get(CUDNN_BENCHMARK_ENV, "") == "1"
    failure = None
    try:
        step = BUILDERS[case.kind](case)
        first_s, call_s = _first_calls(step, 2 if case.provider == "compile" else 1)
    except torch.cuda.OutOfMemoryError as err:
        failure = ("out of memory", _first_line(err))
    except Exception as err:
        failure = ("error", f"{type(err).__name__}: {_first_line(err)}")
    if failure:  # outside the except clause, so the traceback and its tensors are gone
        step = None
        _release()
        status, message = failure
        if status == "error" and not _context_usable():
            status = "error, CUDA context lost"
        _record(benchmark, status, message)
        if status == "out of memory":
            pytest.skip(f"{case.id}: {message}")
        pytest.fail(f"{case.provider} failed on {case.group}: {message}")

    rounds, iterations = _rounds(case.kind, call_s)
    benchmark.extra_info.update(status="ok", measured=True, first_call_s=round(first_s, 3),
                                rounds=rounds, iterations=iterations)
    clock = event_clock()
    if clock is not None and hasattr(benchmark, "_timer"):
        benchmark._timer = clock  # pytest-benchmark has no public per-test timer
        benchmark.extra_info["timer"] = "cuda events"
        timed = step
    else:  # synchronise inside each call instead
        benchmark.extra_info["timer"] = "perf_counter + synchronize"
        iterations = 1

        def timed() -> None:
            step()
            _sync()

    try:
        with interrupt_after_rounds():
            benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=0)
    finally:
        step = timed = None
        if case.provider == "compile":
            torch._dynamo.reset()
        _release()
