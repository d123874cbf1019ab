"""Classifier heads and their losses: A-Softmax (SphereFace) with its margin, or linear + CE.

`AngleLinear` returns ordinary class logits ``cos(theta_j) * |x|`` in train and eval mode
alike, so softmax gives probabilities. In training mode it also computes the margin term
``phi(theta) * |x|`` that A-Softmax needs for the target class and keeps it on the head;
`AngleLoss` takes it from there (and clears it) in the same step.

Unlike the original code (whose target mask was never set and whose step counter never
advanced), the margin here is applied to the target class and the lambda that blends it in is
annealed per training step: lambda = max(5, 1500 / (1 + 0.1 * step)). The step count can live
on the device (`AngleLoss.count_on_device`), so that a training step captured as a CUDA graph
keeps annealing lambda, with the same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from naslung.arch import HEAD_KINDS


class AngleLinear(nn.Module):
    """SphereFace's angular layer with margin m (default 4) and unit-norm class weights."""

    def __init__(self, in_features: int, out_features: int = 2, margin: int = 4) -> None:
        super().__init__()
        if margin < 1:
            raise ValueError(f"A-Softmax margin must be >= 1, got {margin}")
        self.margin = margin
        # (in, out) as in the original, so that its checkpoints keep their layout.
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
        self.phi_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        w = F.normalize(self.weight, dim=0)
        cos_theta = (x @ w / x_norm).clamp(-1.0, 1.0)
        self.phi_logits = self._phi(cos_theta) * x_norm if self.training else None
        return cos_theta * x_norm

    def _phi(self, cos_theta: torch.Tensor) -> torch.Tensor:
        """phi(theta) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi): monotone in theta."""
        theta = torch.acos(cos_theta.detach())
        k = torch.floor(self.margin * theta / math.pi)
        cos_m_theta = _chebyshev_cos_multiple(cos_theta, self.margin)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        return sign * cos_m_theta - 2.0 * k


def _chebyshev_cos_multiple(cos_theta: torch.Tensor, m: int) -> torch.Tensor:
    """cos(m theta) from cos(theta) through the Chebyshev recurrence (differentiable)."""
    previous, current = torch.ones_like(cos_theta), cos_theta
    for _ in range(m - 1):
        previous, current = current, 2 * cos_theta * current - previous
    return current


class AngleLoss(nn.Module):
    """A-Softmax loss: cross-entropy with the target logit pulled towards phi(theta)*|x|.

    target logit <- logit - (cos - phi) * |x| / (1 + lambda), other logits unchanged.
    ``step`` counts training calls; lambda anneals from 1500 towards ``lambda_min``.
    """

    def __init__(self, head: AngleLinear, lambda_min: float = 5.0, lambda_max: float = 1500.0,
                 gamma: float = 0.0) -> None:
        super().__init__()
        self.head = [head]  # a list, so the head is not registered twice as a submodule
        self.lambda_min = lambda_min
        self.lambda_max = lambda_max
        self.gamma = gamma
        # The step count lives in a Python int, or (after `count_on_device`) in this float64
        # tensor, which the forward pass advances itself so that a captured CUDA graph does too.
        self.register_buffer("step_count", None, persistent=False)
        self.step = 0

    @property
    def step(self) -> int:
        """Training calls so far (read from the device when the count lives there)."""
        if self.step_count is not None:
            return int(self.step_count.item())
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        if self.step_count is not None:
            self.step_count.fill_(value)
        else:
            self._step = int(value)

    def count_on_device(self, device: torch.device | str | None) -> AngleLoss:
        """Keep the step count in a tensor on ``device`` (``None``: back in a Python int).

        Lambda is then computed on the device too, from the same float64 operations as `lam`,
        so the losses are the same numbers as with the Python count, and a CUDA graph that
        captures this loss advances the count and anneals lambda on every replay.
        """
        step = self.step
        if device is None:
            self.step_count = None
            self._step = step
        else:
            self.step_count = torch.tensor(float(step), dtype=torch.float64, device=device)
        return self

    @property
    def lam(self) -> float:
        """The current blend factor lambda."""
        return max(self.lambda_min, self.lambda_max / (1 + 0.1 * self.step))

    def lam_tensor(self) -> torch.Tensor:
        """Lambda as a float64 tensor computed on the device from ``step_count``, no host sync."""
        if self.step_count is None:
            raise RuntimeError("lam_tensor needs the step count on a device: call count_on_device")
        return annealed_lambda(self.step_count, self.lambda_min, self.lambda_max)

    def margin_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The logits with the target-class margin applied (no state change)."""
        phi_logits = self.head[0].phi_logits
        if phi_logits is None or phi_logits.shape != logits.shape:
            raise RuntimeError("AngleLoss needs the logits of the head's latest forward pass "
                               "in training mode")
        target_mask = F.one_hot(target, logits.shape[1]).to(torch.bool)
        if self.step_count is None:
            adjusted = logits - (logits - phi_logits) / (1.0 + self.lam)
        else:
            adjusted = logits - divide_as_by_number(logits - phi_logits, self.lam_tensor().add(1.0))
        return torch.where(target_mask, adjusted, logits)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.step_count is None:
                self._step += 1
            else:
                self.step_count.add_(1)
        margin_logits = self.margin_logits(logits, target)
        self.head[0].phi_logits = None  # used once: never paired with a later forward
        log_p = F.log_softmax(margin_logits, dim=1)
        log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        focal = (1 - log_pt.detach().exp()) ** self.gamma if self.gamma else 1.0
        return -(focal * log_pt).mean()


def annealed_lambda(step: torch.Tensor, lambda_min: float = 5.0,
                    lambda_max: float = 1500.0) -> torch.Tensor:
    """max(lambda_min, lambda_max / (1 + 0.1 * step)) for a float64 ``step`` tensor, bit for bit
    what `AngleLoss.lam` computes in Python floats: the same IEEE double operations in the same
    order (a true division: ``lambda_max / tensor`` would multiply by a reciprocal)."""
    denominator = step.mul(0.1).add_(1.0)
    return torch.full_like(step, lambda_max).div_(denominator).clamp_min_(lambda_min)


def divide_as_by_number(x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """``x / float(divisor)`` with the same result as dividing by a Python number, for a 0-dim
    float64 ``divisor`` that stays on the device.

    For a Python number torch rounds it to x's op-math type (float32 for half types); then CUDA
    multiplies by its reciprocal while the CPU divides, and half types round once at the end.
    """
    opmath = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    wide, divisor = x.to(opmath), divisor.to(opmath)
    out = wide * divisor.reciprocal() if x.device.type == "cuda" else wide / divisor
    return out.to(x.dtype)


def make_head(kind: str, in_features: int, num_classes: int = 2) -> nn.Module:
    """The classifier head named ``kind`` (one of `HEAD_KINDS`)."""
    if kind == "asoftmax":
        return AngleLinear(in_features, num_classes)
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    raise ValueError(f"unknown head {kind!r}; choose from {', '.join(HEAD_KINDS)}")


def make_loss(head: nn.Module, margin: bool = True) -> nn.Module:
    """The training loss that belongs to ``head``: `AngleLoss` for the A-Softmax head with its
    ``margin``, else cross-entropy (on the A-Softmax head's normalised logits without margin,
    which is what the original code trained, its target mask never being set)."""
    if isinstance(head, AngleLinear) and margin:
        return AngleLoss(head)
    return nn.CrossEntropyLoss()
