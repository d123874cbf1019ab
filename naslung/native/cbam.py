"""CBAM attention, both variants of `naslung.models.cbam`, on csrc/cbam.cu, as torch ops.

`cbam_forward` returns the block's output and the small fp32 tensors its backward reads (the
channel weights, per-channel and per-voxel pooling statistics, the spatial attention map), so
the backward need not repeat the forward's reductions; `cbam_backward` returns the gradients of
x and of the three weights. Both are `torch.library` custom ops, so autograd, CUDA graphs and
torch.compile see single ops; each picks the host library on the CPU and the CUDA library on a
GPU (on torch's current stream). Feature maps are NCDHW, fp32 or bf16; weights fp32.
"""

from __future__ import annotations

import torch

from naslung.native.library import (
    I64,
    INT,
    PTR,
    call,
    check_operands,
    declare,
    device_kind,
    dtype_code,
    on_device_of,
    stream_of,
)

VARIANT_CODES = {"nas-lung": 0, "woo": 1}
"""CBAM variants and their codes in the C ABI (nl_cbam_variant)."""
MAX_CHANNELS = 512
"""The widest map the kernels take (their shared-memory arrays are sized for it)."""

_SHAPE = [I64] * 5
declare({
    "nl_cbam_forward_workspace_floats": (I64, _SHAPE),
    "nl_cbam_backward_workspace_floats": (I64, _SHAPE),
    "nl_cbam_forward": (INT, [INT, INT, PTR, *_SHAPE, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR]),
    "nl_cbam_backward": (INT, [INT, INT, PTR, PTR, *_SHAPE, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR,
                               PTR, PTR, PTR]),
})


def _weights(*weights: torch.Tensor) -> list[torch.Tensor]:
    """fp32 and contiguous, as the C ABI reads weights."""
    return [w.float().contiguous() for w in weights]


@torch.library.custom_op("naslung::cbam_forward", mutates_args=())
def cbam_forward(x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
                 conv_weight: torch.Tensor,
                 variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, channel weights (N, C), channel stats (N, 3, C), spatial stats (N, 3, D, H, W),
    attention map (N, 1, D, H, W)); the last four are what `cbam_backward` needs (csrc/cbam.h)."""
    x = x.contiguous()
    fc1, fc2, conv = _weights(fc1_weight, fc2_weight, conv_weight)
    n, c, d, h, w = x.shape
    kind = device_kind(x)
    f32 = dict(device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    channel_weights = torch.empty((n, c), **f32)
    channel_stats = torch.empty((n, 3, c), **f32)
    spatial_stats = torch.empty((n, 3, d, h, w), **f32)
    gate = torch.empty((n, 1, d, h, w), **f32)
    workspace = torch.empty(call(kind, "nl_cbam_forward_workspace_floats", n, c, d, h, w), **f32)
    with on_device_of(x):
        call(kind, "nl_cbam_forward", dtype_code(x), VARIANT_CODES[variant], x.data_ptr(), n, c, d, h, w,
             fc1.data_ptr(), fc2.data_ptr(), conv.data_ptr(), workspace.data_ptr(),
             channel_weights.data_ptr(), channel_stats.data_ptr(), spatial_stats.data_ptr(), gate.data_ptr(),
             out.data_ptr(), stream_of(x))
    return out, channel_weights, channel_stats, spatial_stats, gate


@cbam_forward.register_fake
def _(x, fc1_weight, fc2_weight, conv_weight, variant):
    n, c, d, h, w = x.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            *(x.new_empty(shape, dtype=torch.float32) for shape in ((n, c), (n, 3, c), (n, 3, d, h, w),
                                                                   (n, 1, d, h, w))))


@torch.library.custom_op("naslung::cbam_backward", mutates_args=())
def cbam_backward(x: torch.Tensor, grad: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
                  conv_weight: torch.Tensor, channel_weights: torch.Tensor, channel_stats: torch.Tensor,
                  spatial_stats: torch.Tensor, gate: torch.Tensor,
                  variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `cbam_forward`'s output with respect to x (x's dtype) and the fc1, fc2 and
    conv weights (fp32)."""
    x, grad = x.contiguous(), grad.to(x.dtype).contiguous()
    fc1, fc2, conv = _weights(fc1_weight, fc2_weight, conv_weight)
    n, c, d, h, w = x.shape
    kind = device_kind(x)
    dx = torch.empty_like(x)
    grad_fc1, grad_fc2, grad_conv = torch.empty_like(fc1), torch.empty_like(fc2), torch.empty_like(conv)
    workspace = torch.empty(call(kind, "nl_cbam_backward_workspace_floats", n, c, d, h, w), device=x.device)
    with on_device_of(x):
        call(kind, "nl_cbam_backward", dtype_code(x), VARIANT_CODES[variant], x.data_ptr(), grad.data_ptr(),
             n, c, d, h, w, fc1.data_ptr(), fc2.data_ptr(), conv.data_ptr(), channel_weights.data_ptr(),
             channel_stats.data_ptr(), spatial_stats.data_ptr(), gate.data_ptr(), workspace.data_ptr(),
             grad_fc1.data_ptr(), grad_fc2.data_ptr(), grad_conv.data_ptr(), dx.data_ptr(), stream_of(x))
    return dx, grad_fc1, grad_fc2, grad_conv


@cbam_backward.register_fake
def _(x, grad, fc1_weight, fc2_weight, conv_weight, channel_weights, channel_stats, spatial_stats, gate,
      variant):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            *(torch.empty_like(wt, dtype=torch.float32, memory_format=torch.contiguous_format)
              for wt in (fc1_weight, fc2_weight, conv_weight)))


def _cbam_setup(ctx, inputs, output) -> None:
    x, fc1_weight, fc2_weight, conv_weight, variant = inputs
    _, channel_weights, channel_stats, spatial_stats, gate = output
    ctx.save_for_backward(x, fc1_weight, fc2_weight, conv_weight, channel_weights, channel_stats,
                          spatial_stats, gate)
    ctx.variant = variant


def _cbam_grad(ctx, grad_out, *unused_grads):
    """Only the output carries a gradient: the other four outputs are not part of `cbam`'s result."""
    x, *saved = ctx.saved_tensors
    return *cbam_backward(x, grad_out, *saved, ctx.variant), None


cbam_forward.register_autograd(_cbam_grad, setup_context=_cbam_setup)


def cbam(x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, conv_weight: torch.Tensor,
         variant: str = "nas-lung") -> torch.Tensor:
    """`make_cbam(C, variant)` applied to x (N, C, D, H, W) with these weights: fc1 (C//4, C),
    fc2 (C, C//4), conv (1, 2, 3, 3, 3) as the module holds them; differentiable in x and all
    three weights. The output is NCDHW-contiguous, in x's dtype."""
    if variant not in VARIANT_CODES:
        raise ValueError(f"unknown CBAM variant {variant!r}; choose from {', '.join(VARIANT_CODES)}")
    if x.dim() != 5:
        raise ValueError(f"cbam expects (N, C, D, H, W) input, got shape {tuple(x.shape)}")
    check_operands(x, fc1_weight=fc1_weight, fc2_weight=fc2_weight, conv_weight=conv_weight)
    c = x.shape[1]
    if not 1 <= c <= MAX_CHANNELS:
        raise ValueError(f"the native CBAM takes 1 to {MAX_CHANNELS} channels, not {c}")
    if (fc1_weight.shape != (c // 4, c) or fc2_weight.shape != (c, c // 4)
            or conv_weight.shape != (1, 2, 3, 3, 3)):
        got = ", ".join(str(tuple(t.shape)) for t in (fc1_weight, fc2_weight, conv_weight))
        raise ValueError(f"CBAM weights for {c} channels must be fc1 {(c // 4, c)}, fc2 {(c, c // 4)} and "
                         f"conv (1, 2, 3, 3, 3); got {got}")
    return cbam_forward(x, fc1_weight.float(), fc2_weight.float(), conv_weight.float(), variant)[0]
