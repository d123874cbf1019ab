"""CUDA-graph training steps: the device-side A-Softmax lambda (CPU) and captured vs eager (GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from naslung.models import AngleLinear, AngleLoss, ConvRes, make_loss
from naslung.models.fused import fuse
from naslung.models.heads import annealed_lambda, divide_as_by_number
from naslung.train.graphs import (
    CapturedTrainStep,
    TrainingState,
    TrainStep,
    require_capturable,
    train_step,
    warm_up,
)

ARCH = "4,8,16/32,32/64,128"
LR, BETAS = 2e-4, (0.5, 0.999)
LAMBDA_FLOOR_STEP = 2990  # 1500 / (1 + 0.1 * 2990) = 5: where lambda reaches its floor

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _losses(device: str = "cpu") -> tuple[AngleLinear, AngleLoss, AngleLoss]:
    torch.manual_seed(0)
    head = AngleLinear(16, 2).to(device)
    return head, AngleLoss(head), AngleLoss(head).count_on_device(device)


def test_annealed_lambda_is_the_float_lambda_bit_for_bit():
    steps = torch.arange(10_001, dtype=torch.float64)
    expected = torch.tensor([max(5.0, 1500.0 / (1 + 0.1 * s)) for s in range(10_001)], dtype=torch.float64)
    assert torch.equal(annealed_lambda(steps), expected)


def test_device_count_gives_the_same_lambda_over_10k_steps():
    _, host, device = _losses()
    for step in range(10_001):
        host.step = device.step = step
        assert device.lam_tensor().item() == host.lam, step
        assert device.lam == host.lam


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dividing_by_a_device_number_matches_a_python_number(dtype):
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    for step in range(0, 4000, 37):
        lam = max(5.0, 1500.0 / (1 + 0.1 * step))
        divisor = annealed_lambda(torch.tensor(float(step), dtype=torch.float64)).add(1.0)
        assert torch.equal(divide_as_by_number(x, divisor), x / (1.0 + lam)), step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_count_gives_the_same_losses_and_gradients(dtype):
    head, host, device = _losses()
    head = head.to(dtype)
    features = torch.randn(8, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1] * 4)
    for start in (0, LAMBDA_FLOOR_STEP - 5):
        host.step = device.step = start
        for _ in range(10):
            results = []
            for loss_fn in (host, device):
                x = features.clone().requires_grad_()
                loss = loss_fn(head(x), target)
                loss.backward()
                results.append((loss.detach(), x.grad))
            assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
        assert host.step == device.step == start + 10


def test_device_count_reads_writes_and_returns_to_a_python_int():
    head, _, loss_fn = _losses()
    assert loss_fn.step == 0 and loss_fn.step_count.dtype == torch.float64
    loss_fn(head(torch.randn(4, 16)), torch.tensor([0, 1, 0, 1]))
    assert loss_fn.step == 1 and loss_fn.step_count.item() == 1.0
    loss_fn.step = 41
    assert loss_fn.step_count.item() == 41.0 and loss_fn.lam == 1500.0 / (1 + 0.1 * 41)
    loss_fn.eval()
    head.train()
    loss_fn(head(torch.randn(4, 16)), torch.tensor([0, 1, 0, 1]))
    assert loss_fn.step == 41, "the step count advances only in training"
    loss_fn.count_on_device(None)
    assert loss_fn.step_count is None and loss_fn.step == 41 and isinstance(loss_fn.step, int)
    assert "step_count" not in loss_fn.state_dict()
    with pytest.raises(RuntimeError, match="count_on_device"):
        loss_fn.lam_tensor()


def _training(seed: int = 0, crop: int = 8, batch: int = 2, steps: int = 2):
    torch.manual_seed(seed)
    model = ConvRes(ARCH).train()
    loss_fn = make_loss(model.head)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(batch, 1, crop, crop, crop, generator=generator),
                torch.randint(0, 2, (batch,), generator=generator)) for _ in range(steps)]
    return model, loss_fn, optimizer, batches


def _run(model, loss_fn, optimizer, batches) -> list[torch.Tensor]:
    losses = []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        losses.append(train_step(model, loss_fn, optimizer, x, y).detach())
    return losses


def _assert_same_training_state(a, b) -> None:
    (model_a, loss_a, opt_a), (model_b, loss_b, opt_b) = a, b
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert loss_a.step == loss_b.step
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        for key, value in opt_a.state[pa].items():
            assert torch.equal(value, opt_b.state[pb][key]), key


@pytest.mark.parametrize("stepped_before, device_count", [(False, False), (True, True)],
                         ids=["fresh-host-count", "stepped-device-count"])
def test_warm_up_leaves_no_trace(stepped_before, device_count):
    """Warm-up steps, undone, leave training exactly where it would be without them (Adam's
    fresh state is zeros, so zeroing the state the warm-up created is the same as not having it)."""
    runs = []
    for warm in (False, True):
        model, loss_fn, optimizer, batches = _training()
        if device_count:
            loss_fn.count_on_device("cpu")
        if stepped_before:
            _run(model, loss_fn, optimizer, batches[:1])
        if warm:
            x, y = batches[1]
            warm_up(model, loss_fn, optimizer, x * 3, 1 - y, steps=2)
            assert all(p.grad is None for p in model.parameters())
        losses = _run(model, loss_fn, optimizer, batches)
        runs.append((losses, (model, loss_fn, optimizer)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    _assert_same_training_state(runs[0][1], runs[1][1])


def test_warm_up_cannot_undo_a_fresh_optimizer_with_non_zero_first_state():
    model, loss_fn, _, _ = _training()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    with pytest.raises(ValueError, match="use Adam or AdamW"):
        TrainingState(model, loss_fn, optimizer)


def test_train_step_eager_is_the_plain_loop():
    model, loss_fn, optimizer, batches = _training()
    expected = _run(model, loss_fn, optimizer, batches)
    model, loss_fn, optimizer, batches = _training()
    step = TrainStep(model, loss_fn, optimizer)
    assert all(torch.equal(step(x, y), loss) for (x, y), loss in zip(batches, expected, strict=True))


def test_capture_needs_a_capturable_optimizer():
    model, loss_fn, optimizer, _ = _training()
    with pytest.raises(ValueError, match="capturable=True"):
        require_capturable(optimizer)
    with pytest.raises(ValueError, match="capturable=True"):
        TrainStep(model, loss_fn, optimizer, cuda_graphs=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_capture_on_the_cpu_is_a_clear_error():
    model, loss_fn, optimizer, batches = _training()
    with pytest.raises(ValueError, match="CUDA GPU.*drop --cuda-graphs"):
        CapturedTrainStep(model, loss_fn, optimizer, *batches[0])
    assert loss_fn.step_count is None, "a refused capture changes nothing"


# -------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_device_count_gives_the_same_losses(dtype):
    head, host, device = _losses("cuda")
    head = head.to(dtype)
    features = torch.randn(64, 16, device="cuda", dtype=dtype)
    target = torch.randint(0, 2, (64,), device="cuda")
    steps = torch.arange(10_001, dtype=torch.float64, device="cuda")
    expected = torch.tensor([max(5.0, 1500.0 / (1 + 0.1 * s)) for s in range(10_001)], dtype=torch.float64)
    assert torch.equal(annealed_lambda(steps).cpu(), expected)
    for start in (0, LAMBDA_FLOOR_STEP - 5):
        host.step = device.step = start
        for _ in range(10):
            losses = [loss_fn(head(features), target) for loss_fn in (host, device)]
            assert torch.equal(*losses)


STEPS = 5
GPU_BATCH, RAGGED_BATCH, CROP = 4, 3, 32


def _gpu_batches():
    generator = torch.Generator(device="cuda").manual_seed(3)
    shapes = [GPU_BATCH] * STEPS + [RAGGED_BATCH, GPU_BATCH]  # a ragged batch, then a replay again
    return [(torch.randn(n, 1, CROP, CROP, CROP, device="cuda", generator=generator),
             torch.randint(0, 2, (n,), device="cuda", generator=generator)) for n in shapes]


def _assert_close_training(eager: ConvRes, captured: ConvRes, steps: int) -> None:
    """Tight tolerances, except where rounding noise is all there is: a conv bias before a
    training-mode BatchNorm has a gradient of pure rounding noise (BN removes the bias), and Adam
    turns any noise into steps of about +-lr; the BN running means carry that bias along."""
    slack = 2 * LR * steps + 1e-6
    captured_state = captured.state_dict()
    for key, value in eager.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, captured_state[key]), key
        elif key.endswith(("conv.bias", "bn.running_mean")):
            torch.testing.assert_close(captured_state[key], value, rtol=0, atol=slack, msg=key)
        else:
            torch.testing.assert_close(captured_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_captured_steps_match_eager_steps(kernels, monkeypatch):
    if kernels == "triton":
        pytest.importorskip("triton")
        pytest.importorskip("naslung.kernels.batchnorm")
        pytest.importorskip("naslung.kernels.cbam")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    reference = ConvRes(ARCH).train()
    if kernels == "triton":
        reference = fuse(reference)
    batches = _gpu_batches()

    eager = copy.deepcopy(reference).cuda()
    eager_loss_fn = make_loss(eager.head)
    eager_opt = torch.optim.Adam(eager.parameters(), lr=LR, betas=BETAS, capturable=True)
    eager_losses = torch.stack(_run(eager, eager_loss_fn, eager_opt, batches))

    model = copy.deepcopy(reference).cuda()
    loss_fn = make_loss(model.head)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, capturable=True)
    step = CapturedTrainStep(model, loss_fn, optimizer, *batches[0])
    assert loss_fn.step == 0 and all(not s["step"].item() for s in optimizer.state.values()), \
        "warm-up and capture leave the training state as it was"
    losses = torch.stack([step(x, y) for x, y in batches])

    assert (step.replays, step.eager_steps) == (len(batches) - 1, 1)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert loss_fn.step == eager_loss_fn.step == len(batches)
    assert loss_fn.lam == eager_loss_fn.lam
    assert all(s["step"].item() == len(batches) for s in optimizer.state.values())
    _assert_close_training(eager, model, len(batches))


@pytest.mark.gpu
@needs_cuda
def test_train_step_captures_on_the_first_batch():
    torch.manual_seed(0)
    model = ConvRes(ARCH).cuda().train()
    loss_fn = make_loss(model.head)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, capturable=True)
    step = TrainStep(model, loss_fn, optimizer, cuda_graphs=True)
    losses = [step(x, y) for x, y in _gpu_batches()]
    assert step.captured is not None and step.captured.replays == len(losses) - 1
    assert all(torch.isfinite(loss) for loss in losses)
    model.eval()
    with pytest.raises(RuntimeError, match="model.train"):
        step(*_gpu_batches()[0])

