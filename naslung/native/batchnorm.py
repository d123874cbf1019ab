"""BatchNorm3d + ReLU (+ a residual added after the ReLU) on csrc/batchnorm.cu, as torch ops.

`bn_stats` (batch statistics, running statistics updated in place) and `bn_relu` (the
normalise-ReLU-residual pass, with autograd through the statistics in training) are
`torch.library` custom ops, so autograd, CUDA graphs and torch.compile see single ops; each
picks the host library on the CPU and the CUDA library on a GPU (on torch's current stream).
Feature maps are NCDHW, fp32 or bf16; weights and statistics fp32.
"""

from __future__ import annotations

import torch

from naslung.native.library import (
    F32,
    I64,
    INT,
    PTR,
    call,
    check_operands,
    declare,
    device_kind,
    dtype_code,
    fp32_vector,
    on_device_of,
    ptr,
    stream_of,
)

declare({
    "nl_bn_workspace_floats": (I64, [I64, I64, I64]),
    "nl_bn_stats": (INT, [INT, PTR, I64, I64, I64, F32, F32, PTR, PTR, PTR, PTR, PTR, PTR]),
    "nl_bn_relu_forward": (INT, [INT, PTR, PTR, I64, I64, I64, PTR, PTR, PTR, PTR, PTR, PTR]),
    "nl_bn_relu_backward": (INT, [INT, PTR, PTR, I64, I64, I64, INT, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR,
                                  PTR]),
})


def _nsc(x: torch.Tensor) -> tuple[int, int, int]:
    """(N, C, S) of a non-empty (N, C, D, H, W) map."""
    if x.dim() != 5 or x.numel() == 0:
        raise ValueError(f"the native BatchNorm takes a non-empty (N, C, D, H, W) map, not {tuple(x.shape)}")
    return x.shape[0], x.shape[1], x[0, 0].numel()


def _running(t: torch.Tensor | None, c: int, x: torch.Tensor, name: str) -> int | None:
    """The pointer of a running statistic the kernel updates in place (None: not tracked)."""
    if t is None:
        return None
    check_operands(x, **{name: t})
    if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != c:
        raise ValueError(f"BatchNorm's {name} must be a contiguous fp32 vector of {c} values, not "
                         f"{t.dtype} {tuple(t.shape)}: keep BatchNorm in fp32 (autocast does)")
    return t.data_ptr()


@torch.library.custom_op("naslung::bn_stats", mutates_args=("running_mean", "running_var"))
def bn_stats(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
             momentum: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's per-channel mean and 1/sqrt(var + eps); running statistics, where given, are
    updated with ``momentum`` as torch does (unbiased variance)."""
    x = x.contiguous()
    n, c, s = _nsc(x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running statistics or neither")
    kind = device_kind(x)
    mean = torch.empty(c, device=x.device, dtype=torch.float32)
    invstd = torch.empty_like(mean)
    workspace = torch.empty(call(kind, "nl_bn_workspace_floats", n, c, s), device=x.device,
                            dtype=torch.float32)
    with on_device_of(x):
        call(kind, "nl_bn_stats", dtype_code(x), x.data_ptr(), n, c, s, eps, momentum,
             _running(running_mean, c, x, "running_mean"), _running(running_var, c, x, "running_var"),
             workspace.data_ptr(), mean.data_ptr(), invstd.data_ptr(), stream_of(x))
    return mean, invstd


@bn_stats.register_fake
def _(x, running_mean, running_var, momentum, eps):
    return x.new_empty(x.shape[1], dtype=torch.float32), x.new_empty(x.shape[1], dtype=torch.float32)


def _vectors(x: torch.Tensor, c: int, **vectors: torch.Tensor) -> list[torch.Tensor]:
    check_operands(x, **vectors)
    return [fp32_vector(t, c, name) for name, t in vectors.items()]


@torch.library.custom_op("naslung::bn_relu", mutates_args=())
def bn_relu(x: torch.Tensor, residual: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor, batch_stats: bool) -> torch.Tensor:
    """relu((x - mean) * invstd * weight + bias) [+ residual]. With ``batch_stats`` the
    gradient flows through mean and invstd as the statistics of x (training); without, they are
    constants (eval)."""
    x = x.contiguous()
    n, c, s = _nsc(x)
    vectors = _vectors(x, c, mean=mean, invstd=invstd, weight=weight, bias=bias)
    if residual is not None:
        check_operands(x, residual=residual)
        if residual.shape != x.shape:
            raise ValueError(f"the residual {tuple(residual.shape)} must have the map's shape "
                             f"{tuple(x.shape)}")
        residual = residual.to(x.dtype).contiguous()
    y = torch.empty_like(x)
    with on_device_of(x):
        call(device_kind(x), "nl_bn_relu_forward", dtype_code(x), x.data_ptr(), ptr(residual), n, c, s,
             *(v.data_ptr() for v in vectors), y.data_ptr(), stream_of(x))
    return y


@bn_relu.register_fake
def _(x, residual, mean, invstd, weight, bias, batch_stats):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("naslung::bn_relu_backward", mutates_args=())
def bn_relu_backward(x: torch.Tensor, grad: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor,
                     batch_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `bn_relu`'s output with respect to x, weight and bias."""
    x, grad = x.contiguous(), grad.to(x.dtype).contiguous()
    n, c, s = _nsc(x)
    check_operands(x, grad=grad)
    vectors = _vectors(x, c, mean=mean, invstd=invstd, weight=weight, bias=bias)
    kind = device_kind(x)
    dx = torch.empty_like(x)
    grad_weight = torch.empty(c, device=x.device, dtype=torch.float32)
    grad_bias = torch.empty_like(grad_weight)
    workspace = torch.empty(call(kind, "nl_bn_workspace_floats", n, c, s), device=x.device,
                            dtype=torch.float32)
    with on_device_of(x):
        call(kind, "nl_bn_relu_backward", dtype_code(x), x.data_ptr(), grad.data_ptr(), n, c, s,
             int(batch_stats), *(v.data_ptr() for v in vectors), workspace.data_ptr(), grad_weight.data_ptr(),
             grad_bias.data_ptr(), dx.data_ptr(), stream_of(x))
    return dx, grad_weight, grad_bias


@bn_relu_backward.register_fake
def _(x, grad, mean, invstd, weight, bias, batch_stats):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(c, dtype=torch.float32),
            x.new_empty(c, dtype=torch.float32))


def _bn_relu_setup(ctx, inputs, output) -> None:
    x, residual, mean, invstd, weight, bias, batch_stats = inputs
    ctx.save_for_backward(x, mean, invstd, weight, bias)
    ctx.batch_stats, ctx.has_residual = batch_stats, residual is not None


def _bn_relu_grad(ctx, grad_y):
    x, mean, invstd, weight, bias = ctx.saved_tensors
    dx, grad_weight, grad_bias = bn_relu_backward(x, grad_y, mean, invstd, weight, bias, ctx.batch_stats)
    return (dx, grad_y if ctx.has_residual else None, None, None, grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype), None)


bn_relu.register_autograd(_bn_relu_grad, setup_context=_bn_relu_setup)


def batchnorm_relu(x: torch.Tensor, bn: torch.nn.BatchNorm3d,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu(bn(x)) [+ residual] on the native kernels, as torch's BatchNorm3d would normalise:
    batch statistics in training or without running statistics, which training updates
    (momentum None: the cumulative average, which reads the batch count on the host)."""
    weight, bias = bn.weight, bn.bias
    if weight is None:  # affine=False: the identity
        weight = torch.ones(bn.num_features, device=x.device)
        bias = torch.zeros(bn.num_features, device=x.device)
    batch_stats = bn.training or bn.running_mean is None
    if batch_stats:
        momentum = 0.0
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        updated = bn.training and bn.running_mean is not None
        mean, invstd = bn_stats(x.detach(), bn.running_mean if updated else None,
                                bn.running_var if updated else None, momentum, bn.eps)
    else:
        mean, invstd = bn.running_mean.float(), torch.rsqrt(bn.running_var.float() + bn.eps)
    return bn_relu(x, residual, mean, invstd, weight, bias, batch_stats)
