"""Each csrc/ op's host build against eager PyTorch on the CPU, forward and backward.

Groups (one per op and shape) compare ``eager`` with ``native`` in the same run:

* ``bn_relu``: BatchNorm3d (training) + ReLU + the residual, forward and backward, at the
  shapes a batch of 8 has in `4,8,16/32,32/64,128` (32^3 at width 4 down to 4^3 at 128);
* ``cbam``: the nas-lung CBAM block, forward and backward, at the same shapes;
* ``augment``: a batch of 8 training crops (32^3 from the 48^3 store: shift, flips, zeroed
  cube, window and standardisation): `Augmenter` against the one-launch kernel.

    python -m pytest bench/test_bench_native.py --benchmark-json=/tmp/bench_native.json -q
    python bench/report.py /tmp/bench_native.json

The whole training step with ``--kernels native`` is in bench/test_bench_cpu.py (providers
``native`` and ``bf16_native``).
"""

from __future__ import annotations

import pytest
import torch

from naslung.data.augment import Augmenter, Normalisation
from naslung.models.cbam import ResidualCBAM
from naslung.native.library import library_path

pytestmark = pytest.mark.skipif(library_path("host") is None, reason="the host kernel library is not built")

BATCH = 8
SHAPES = [pytest.param((BATCH, 4, 32, 32, 32), id="4x32^3"),
          pytest.param((BATCH, 16, 16, 16, 16), id="16x16^3"),
          pytest.param((BATCH, 32, 8, 8, 8), id="32x8^3"),
          pytest.param((BATCH, 128, 4, 4, 4), id="128x4^3")]
PROVIDERS = ["eager", "native"]
ROUNDS = (3, 20)  # (warm-up, timed)


def _time(benchmark, group: str, provider: str, call) -> None:
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, torch=torch.__version__, threads=torch.get_num_threads())
    benchmark.pedantic(call, warmup_rounds=ROUNDS[0], rounds=ROUNDS[1], iterations=1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_relu(benchmark, shape, provider):
    from naslung.native.batchnorm import batchnorm_relu

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, requires_grad=True)
    residual = torch.randn(shape, generator=generator, requires_grad=True)
    grad = torch.randn(shape, generator=generator)
    bn = torch.nn.BatchNorm3d(shape[1])

    def step() -> None:
        y = batchnorm_relu(x, bn, residual) if provider == "native" else torch.relu(bn(x)) + residual
        y.backward(grad)

    _time(benchmark, f"bn_relu-{'x'.join(map(str, shape))}", provider, step)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cbam(benchmark, shape, provider):
    from naslung.native.cbam import cbam

    generator = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(shape, generator=generator)).requires_grad_()
    grad = torch.randn(shape, generator=generator)
    block = ResidualCBAM(shape[1])

    def step() -> None:
        if provider == "native":
            y = cbam(x, block.fc1.weight, block.fc2.weight, block.spatial_conv.weight, "nas-lung")
        else:
            y = block(x)
        y.backward(grad)

    _time(benchmark, f"cbam-{'x'.join(map(str, shape))}", provider, step)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_augment(benchmark, provider):
    from naslung.native.augment import augment_batch

    generator = torch.Generator().manual_seed(0)
    volumes = (torch.randn(256, 48, 48, 48, generator=generator) * 300 - 600).to(torch.int16)
    indices = torch.randperm(256, generator=generator)[:BATCH]
    normalisation = Normalisation(-1000.0, 400.0, -600.0, 300.0)
    augmenter = Augmenter(32, 4, True, 4)
    steps = iter(range(10**6))

    def batch() -> torch.Tensor:
        if provider == "native":
            return augment_batch(volumes, indices, 32, 4, True, 4, normalisation, seed=0, step=next(steps))
        return augmenter(volumes[indices], normalisation, generator)

    _time(benchmark, "augment-8x32^3", provider, batch)
