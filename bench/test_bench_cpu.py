"""CPU timings of ConvRes: one training step and batch-1 inference, per memory layout.

Providers: ``eager`` (NCDHW), ``channels_last_3d`` (model and input in that layout), ``bf16``
and ``bf16_channels_last_3d`` (bfloat16 autocast with fp32 master weights, as ``naslung train
--precision bf16`` runs; only on CPUs with native bf16), ``native`` and ``bf16_native`` (the
csrc/ kernels' host build for BatchNorm+ReLU and CBAM, as ``--kernels native`` runs) and
``compile`` (torch.compile of the model, opt-in: see conftest.py). Each benchmark's group is
``{kind}-{arch}``, so pytest-benchmark compares the providers of one arch side by side.
Compiling and warm-up happen before the timed rounds. The file is outside ``tests/`` so the
default test run does not collect it; run it with

    python -m pytest bench/test_bench_cpu.py --benchmark-json=/tmp/bench_cpu.json -q
    python bench/report.py /tmp/bench_cpu.json

The machine may be shared: compare the providers within one run (the ratios), not runs.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import pytest
import torch

from naslung import Arch, ConvRes
from naslung.arch import PAPER_28M
from naslung.models import make_loss
from naslung.models.fused import fuse
from naslung.native.library import library_path
from naslung.train.formats import cpu_supports_bf16

CROP = 32
TRAIN_BATCH = 8
INFER_BATCH = 1
COMPILE_WARMUP_CALLS = 2  # the first call compiles; the second catches any recompile


class Case(NamedTuple):
    """An arch and how many warm-up and timed rounds it gets per kind of benchmark."""

    arch: str
    train_rounds: tuple[int, int]  # (warm-up, timed)
    infer_rounds: tuple[int, int]


CASES = [
    pytest.param(Case("4,8,16/32,32/64,128", (2, 10), (3, 30)), id="tiny"),
    pytest.param(Case("16,32/64,64/128", (1, 5), (3, 20)), id="small"),
    pytest.param(Case(str(PAPER_28M), (1, 3), (2, 10)), id="paper28m"),
]
PROVIDERS = ["eager", "channels_last_3d", "bf16", "bf16_channels_last_3d", "native", "bf16_native", "compile"]


def _channels_last(provider: str) -> bool:
    return provider.endswith("channels_last_3d")


def _autocast(provider: str) -> torch.autocast:
    if provider.startswith("bf16") and not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=provider.startswith("bf16"))


def _model(arch: str, provider: str, train: bool) -> ConvRes:
    torch.manual_seed(0)
    model = ConvRes(Arch.parse(arch)).train(train)
    if provider.endswith("native"):
        if library_path("host") is None:
            pytest.skip("the host kernel library is not built")
        model = fuse(model, inplace=True, backend="native")
    if _channels_last(provider):
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def _crops(batch: int, provider: str) -> torch.Tensor:
    x = torch.randn(batch, 1, CROP, CROP, CROP, generator=torch.Generator().manual_seed(1))
    if _channels_last(provider):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _prepare(benchmark, request, kind: str, case: Case, provider: str, batch: int) -> None:
    benchmark.group = f"{kind}-{case.arch}"
    benchmark.extra_info.update(
        kind=kind, provider=provider, arch=case.arch, arch_id=request.node.callspec.id,
        batch=batch, crop=CROP, torch=torch.__version__, threads=torch.get_num_threads(),
    )


def _warm_compiled(benchmark, call) -> None:
    """Run the compile (and its recompiles) outside the timed rounds, and record its cost."""
    start = time.perf_counter()
    for _ in range(COMPILE_WARMUP_CALLS):
        call()
    benchmark.extra_info["compile_warmup_s"] = round(time.perf_counter() - start, 2)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES)
def test_train_step(benchmark, request, case: Case, provider: str) -> None:
    """Forward, A-Softmax loss, backward and an Adam step on a batch of 8 crops."""
    _prepare(benchmark, request, "train", case, provider, TRAIN_BATCH)
    model = _model(case.arch, provider, train=True)
    net = torch.compile(model) if provider == "compile" else model
    loss_fn = make_loss(model.head)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))
    x = _crops(TRAIN_BATCH, provider)
    target = torch.randint(0, 2, (TRAIN_BATCH,), generator=torch.Generator().manual_seed(2))
    autocast = _autocast(provider)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(net(x), target)
        loss.backward()
        optimizer.step()
        return loss.item()

    if provider == "compile":
        _warm_compiled(benchmark, step)
    warmup, rounds = case.train_rounds
    loss = benchmark.pedantic(step, warmup_rounds=warmup, rounds=rounds, iterations=1)
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES)
def test_infer(benchmark, request, case: Case, provider: str) -> None:
    """Eval-mode forward of one crop under torch.inference_mode."""
    _prepare(benchmark, request, "infer", case, provider, INFER_BATCH)
    model = _model(case.arch, provider, train=False)
    net = torch.compile(model) if provider == "compile" else model
    x = _crops(INFER_BATCH, provider)
    autocast = _autocast(provider)

    def infer() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return net(x)

    if provider == "compile":
        _warm_compiled(benchmark, infer)
    warmup, rounds = case.infer_rounds
    logits = benchmark.pedantic(infer, warmup_rounds=warmup, rounds=rounds, iterations=1)
    assert logits.shape == (INFER_BATCH, 2)
