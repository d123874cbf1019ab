"""ConvRes's Conv3d -> BatchNorm3d -> ReLU (+ residual) fused around the Triton conv3d.

Training forward, three launches: the conv (its epilogue writes per-tile channel sums and
squared deviations), a one-program-per-channel-block finalize (mean, 1/std, the affine that
normalises, and torch's in-place running-stat update), and one pass that normalises, applies
the ReLU and adds the residual. Training backward: one reduction pass (sum of dy and of
dy * xhat per channel, behind the ReLU's mask), one elementwise pass giving the conv output's
gradient, then conv dgrad and wgrad (which also reduces the conv bias gradient).

Eval: BatchNorm is folded into the conv weight and bias, and bias, ReLU and residual are the
conv's epilogue: one launch.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .compile_proof import KernelSpec, make_spec
from .conv3d import (
    channels_last,
    check_residual,
    conv3d_backward,
    conv3d_forward,
    conv3d_relu,
    stats_tiles,
)
from .runtime import autotune_configs, on_tensor_device


def _config(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


FINALIZE_CONFIG = _config(4, 1, BLOCK_T=64, BLOCK_C=64)
"""The finalize is tiny and updates the running stats in place, so it is never autotuned (a
benchmark run would apply the momentum update again)."""

ELEMENTWISE_CONFIGS = [
    _config(4, 1, BLOCK=1024),
    _config(8, 1, BLOCK=2048),
    _config(8, 1, BLOCK=4096),
]
"""Normalise+ReLU+residual forward and the BN/ReLU backward: BLOCK flat NDHWC elements."""

REDUCE_CONFIGS = [
    _config(4, 1, BLOCK_P=64, BLOCK_C=16, ITERS=16),
    _config(4, 1, BLOCK_P=32, BLOCK_C=64, ITERS=16),
    _config(8, 1, BLOCK_P=64, BLOCK_C=64, ITERS=8),
    _config(8, 1, BLOCK_P=16, BLOCK_C=256, ITERS=16),
]
"""Backward channel reduction: BLOCK_P positions x BLOCK_C channels a step, ITERS steps a
program, one fp32 atomic add per channel and program."""

INTERPRET_CONFIGS = {
    "elementwise": _config(4, 1, BLOCK=1 << 16),
    "reduce": _config(4, 1, BLOCK_P=4096, BLOCK_C=64, ITERS=1),
}


def _configs(kind: str, configs: list[triton.Config]) -> list[triton.Config]:
    return autotune_configs(configs, INTERPRET_CONFIGS[kind])


@triton.jit
def _bn_finalize_kernel(
    psum_ptr, pm2_ptr, pcount_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr,
    mean_ptr, rstd_ptr, scale_ptr, shift_ptr, batches_ptr,
    num_tiles, C, count, momentum, eps,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the conv's per-tile (sum, squared deviations, count) into the batch mean and
    biased variance (Chan et al.: stable where sum-of-squares minus square-of-sum is not), then
    scale = gamma / std, shift = beta - mean * scale; running stats as torch updates them. With
    CUMULATIVE (BatchNorm's momentum=None) the momentum is 1 / num_batches_tracked, read on the
    device so that the step needs no host sync and can be captured in a CUDA graph."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        n = tl.load(pcount_ptr + offs_t, mask=offs_t < num_tiles, other=0.0)
        ok = (n > 0)[:, None] & c_ok[None, :]
        total += tl.sum(tl.load(psum_ptr + offs_t[:, None] * C + offs_c[None, :], mask=ok, other=0.0), axis=0)
    mean = total / count
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        n = tl.load(pcount_ptr + offs_t, mask=offs_t < num_tiles, other=0.0)
        ok = (n > 0)[:, None] & c_ok[None, :]
        off = offs_t[:, None] * C + offs_c[None, :]
        s = tl.load(psum_ptr + off, mask=ok, other=0.0)
        q = tl.load(pm2_ptr + off, mask=ok, other=0.0)
        d = s / tl.maximum(n, 1.0)[:, None] - mean[None, :]
        m2 += tl.sum(tl.where(ok, q + n[:, None] * d * d, 0.0), axis=0)
    var = m2 / count
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    scale = gamma * rstd
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(rstd_ptr + offs_c, rstd, mask=c_ok)
    tl.store(scale_ptr + offs_c, scale, mask=c_ok)
    tl.store(shift_ptr + offs_c, beta - mean * scale, mask=c_ok)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            momentum = 1.0 / tl.load(batches_ptr).to(tl.float32)
        rm = tl.load(rmean_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        rm = momentum * mean + (1.0 - momentum) * rm
        rv = momentum * (var * count / (count - 1.0)) + (1.0 - momentum) * rv
        tl.store(rmean_ptr + offs_c, rm.to(rmean_ptr.dtype.element_ty), mask=c_ok)
        tl.store(rvar_ptr + offs_c, rv.to(rvar_ptr.dtype.element_ty), mask=c_ok)


@triton.autotune(configs=_configs("elementwise", ELEMENTWISE_CONFIGS), key=["numel", "C"])
@triton.jit
def _bn_relu_fwd_kernel(
    z_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, numel, C,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = relu(z * scale + shift) (+ residual) over flat NDHWC memory (channel = index % C)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    ok = offs < numel
    c = ((start % C).to(tl.int32) + tl.arange(0, BLOCK)) % C
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=ok, other=0.0)
    y = tl.maximum(z * scale + tl.load(shift_ptr + c, mask=ok, other=0.0), 0.0)
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_configs("reduce", REDUCE_CONFIGS), key=["P", "C"], reset_to_zero=["sums_ptr"])
@triton.jit
def _bn_relu_bwd_reduce_kernel(
    dy_ptr, z_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, sums_ptr, P, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
):
    """sums[0, c] += sum(dy'), sums[1, c] += sum(dy' * xhat) with dy' = dy behind the ReLU's
    mask (recomputed from z exactly as the forward did) and xhat = (z - mean) / std."""
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    scale = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    sum_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(ITERS):
        offs_p = (tl.program_id(0) * ITERS + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (offs_p < P)[:, None] & c_ok[None, :]
        off = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
        z = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dy = tl.where(z * scale + shift > 0, dy, 0.0)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xhat += tl.sum(dy * (z - mean) * rstd, axis=0)
    tl.atomic_add(sums_ptr + offs_c, sum_dy, mask=c_ok)
    tl.atomic_add(sums_ptr + C + offs_c, sum_dy_xhat, mask=c_ok)


@triton.autotune(configs=_configs("elementwise", ELEMENTWISE_CONFIGS), key=["numel", "C"])
@triton.jit
def _bn_relu_bwd_kernel(
    dy_ptr, z_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, sums_ptr, dz_ptr, numel, C, inv_count,
    BLOCK: tl.constexpr,
):
    """dz = gamma / std * (dy' - mean(dy') - xhat * mean(dy' * xhat)): the gradient of the conv
    output through training-mode BatchNorm and the ReLU, in one pass."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    ok = offs < numel
    c = ((start % C).to(tl.int32) + tl.arange(0, BLOCK)) % C
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=ok, other=0.0)
    dy = tl.where(z * scale + tl.load(shift_ptr + c, mask=ok, other=0.0) > 0, dy, 0.0)
    xhat = (z - tl.load(mean_ptr + c, mask=ok, other=0.0)) * tl.load(rstd_ptr + c, mask=ok, other=0.0)
    mean_dy = tl.load(sums_ptr + c, mask=ok, other=0.0) * inv_count
    mean_dy_xhat = tl.load(sums_ptr + C + c, mask=ok, other=0.0) * inv_count
    dz = scale * (dy - mean_dy - xhat * mean_dy_xhat)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Host functions


@on_tensor_device
def bn_statistics(psum, pm2, pcount, count: int, gamma, beta, running_mean, running_var,
                  momentum: float | None, eps: float,
                  num_batches_tracked: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(mean, rstd, scale, shift) fp32 per channel; updates running_mean/var in place, with
    ``momentum``, or as a cumulative average over ``num_batches_tracked`` when it is None."""
    c = psum.shape[1]
    out = torch.empty((4, c), device=psum.device, dtype=torch.float32)
    update = running_mean is not None and running_var is not None
    cumulative = update and momentum is None
    if cumulative and num_batches_tracked is None:
        raise ValueError("a cumulative running average (momentum None) needs num_batches_tracked")
    cfg = FINALIZE_CONFIG
    _bn_finalize_kernel[(triton.cdiv(c, cfg.kwargs["BLOCK_C"]),)](
        psum, pm2, pcount, gamma, beta, running_mean if update else out, running_var if update else out,
        out[0], out[1], out[2], out[3], num_batches_tracked if cumulative else out, psum.shape[0], c,
        float(count), 0.0 if momentum is None else float(momentum), float(eps), UPDATE_RUNNING=update,
        CUMULATIVE=cumulative, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out[0], out[1], out[2], out[3]


@on_tensor_device
def bn_relu_forward(z, scale, shift, residual=None) -> torch.Tensor:
    """relu(z * scale + shift) (+ residual), channels_last_3d."""
    y = torch.empty_like(z, memory_format=torch.channels_last_3d)
    if residual is not None:
        residual = channels_last(residual)
        check_residual(residual, z)
    numel = z.numel()
    _bn_relu_fwd_kernel[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
        z, scale, shift, residual if residual is not None else z, y, numel, z.shape[1],
        HAS_RESIDUAL=residual is not None)
    return y


@on_tensor_device
def bn_relu_backward(dy, z, mean, rstd, scale, shift) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dgamma, dbeta): the conv output's gradient (dtype of z) and the BN affine's (fp32)."""
    c = z.shape[1]
    p = z.numel() // c
    sums = torch.zeros((2, c), device=z.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"] * meta["ITERS"]), triton.cdiv(c, meta["BLOCK_C"]))

    _bn_relu_bwd_reduce_kernel[grid](dy, z, mean, rstd, scale, shift, sums, p, c)
    dz = torch.empty_like(z, memory_format=torch.channels_last_3d)
    numel = z.numel()
    _bn_relu_bwd_kernel[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
        dy, z, mean, rstd, scale, shift, sums, dz, numel, c, 1.0 / p)
    return dz, sums[1], sums[0]


class ConvBNReLUFunction(torch.autograd.Function):
    """Training-mode conv3d -> BatchNorm3d (batch statistics) -> ReLU (+ residual)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, residual, running_mean, running_var, momentum, eps,
                stride, padding, num_batches_tracked):
        x = channels_last(x)
        n, _, d, h, w = x.shape
        ksize = weight.shape[2]
        m = n * ((d + 2 * padding - ksize) // stride + 1) * ((h + 2 * padding - ksize) // stride + 1) \
            * ((w + 2 * padding - ksize) // stride + 1)
        if m < 2:
            raise ValueError("training-mode BatchNorm needs more than one value per channel "
                             f"(input {tuple(x.shape)} gives {m})")
        tiles, c_out = stats_tiles(m), weight.shape[0]
        psum = torch.empty((tiles, c_out), device=x.device, dtype=torch.float32)
        pm2 = torch.empty_like(psum)
        pcount = torch.zeros((tiles,), device=x.device, dtype=torch.float32)
        z = conv3d_forward(x, weight, bias, stride, padding, stats=(psum, pm2, pcount))
        mean, rstd, scale, shift = bn_statistics(psum, pm2, pcount, m, gamma, beta, running_mean, running_var,
                                                 momentum, eps, num_batches_tracked)
        y = bn_relu_forward(z, scale, shift, residual)
        ctx.save_for_backward(x, weight, z, mean, rstd, scale, shift)
        ctx.conf = (stride, padding, bias is not None, residual is not None)
        ctx.gamma_dtype = gamma.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z, mean, rstd, scale, shift = ctx.saved_tensors
        stride, padding, has_bias, has_residual = ctx.conf
        dy = channels_last(dy)
        dz, dgamma, dbeta = bn_relu_backward(dy, z, mean, rstd, scale, shift)
        dx, dw, db = conv3d_backward(ctx, x, weight, dz, stride, padding, has_bias)
        dgamma, dbeta = dgamma.to(ctx.gamma_dtype), dbeta.to(ctx.gamma_dtype)
        return (dx, dw, db, dgamma, dbeta, dy if has_residual else None,
                None, None, None, None, None, None, None)


def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm folded into the conv: w' = w * gamma / std, b' = (b - mean) * gamma /
    std + beta (computed in fp32, differentiable in every parameter)."""
    scale = bn_weight.float() * torch.rsqrt(running_var.float() + eps)
    bias = conv_bias.float() if conv_bias is not None else torch.zeros_like(scale)
    weight = conv_weight.float() * scale.view(-1, 1, 1, 1, 1)
    return weight.to(conv_weight.dtype), ((bias - running_mean.float()) * scale + bn_bias.float()).to(
        conv_weight.dtype)


def conv_bn_relu(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                 bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor | None,
                 running_var: torch.Tensor | None, *, training: bool, momentum: float | None, eps: float,
                 stride: int, padding: int, residual: torch.Tensor | None = None,
                 num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """relu(batch_norm(conv3d(x))) (+ residual): `naslung.models.blocks.ConvBNReLU`'s forward
    with ``bn.training = training`` (a residual is added after the ReLU, as `ResidualBlock` sums).

    Training mode normalises with the batch statistics and updates ``running_mean`` /
    ``running_var`` in place (momentum, or with momentum None the cumulative average over
    ``num_batches_tracked``; the unbiased variance, as torch); counting batches is the caller's
    business. Eval mode folds the running statistics into the conv. The result is
    in channels_last_3d memory; gradients reach x, both weights, both biases and the residual.
    """
    if training:
        return ConvBNReLUFunction.apply(x, conv_weight, conv_bias, bn_weight, bn_bias, residual, running_mean,
                                        running_var, momentum, eps, stride, padding, num_batches_tracked)
    if running_mean is None or running_var is None:
        raise ValueError("eval-mode BatchNorm needs running_mean and running_var")
    weight, bias = fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return conv3d_relu(x, weight, bias, stride, padding, residual)


# ----------------------------------------------------------------------------------------------
# Compile specs

_DTYPES = ("fp32", "bf16")
FINALIZE_MODES = ({"UPDATE_RUNNING": True, "CUMULATIVE": False}, {"UPDATE_RUNNING": True, "CUMULATIVE": True},
                  {"UPDATE_RUNNING": False, "CUMULATIVE": False})
"""Running statistics updated with a momentum, as a cumulative average (momentum None), or not
at all (track_running_stats=False)."""


def compile_specs() -> list[KernelSpec]:
    """Every kernel x autotune config x activation dtype (statistics are fp32); the finalize in
    each running-statistics mode with fp32 or bf16 BatchNorm parameters, over several tiles of
    statistics or one (num_tiles == 1, a constant to Triton: small maps)."""
    f32 = "*fp32"
    specs = []
    for mode, params, one_tile in itertools.product(FINALIZE_MODES, _DTYPES, (False, True)):
        p = f"*{params}"
        name = f"bn_finalize_{'update' if mode['UPDATE_RUNNING'] else 'batch'}" \
               f"{'_cumulative' if mode['CUMULATIVE'] else ''}_{params}{'_one_tile' if one_tile else ''}"
        specs.append(make_spec(name, _bn_finalize_kernel, {
            "psum_ptr": f32, "pm2_ptr": f32, "pcount_ptr": f32, "gamma_ptr": p, "beta_ptr": p, "rmean_ptr": p,
            "rvar_ptr": p, "mean_ptr": f32, "rstd_ptr": f32, "scale_ptr": f32, "shift_ptr": f32,
            "batches_ptr": "*i64" if mode["CUMULATIVE"] else f32, "count": "fp32", "momentum": "fp32",
            "eps": "fp32"}, mode, FINALIZE_CONFIG, ("num_tiles",) if one_tile else ()))
    for dname in _DTYPES:
        t = f"*{dname}"
        stats = {"mean_ptr": f32, "rstd_ptr": f32, "scale_ptr": f32, "shift_ptr": f32, "sums_ptr": f32}
        for i, cfg in enumerate(ELEMENTWISE_CONFIGS):
            for has_residual in (False, True):
                specs.append(make_spec(f"bn_relu_fwd{'_res' if has_residual else ''}_{dname}_c{i}",
                                       _bn_relu_fwd_kernel, {"z_ptr": t, "scale_ptr": f32, "shift_ptr": f32,
                                                             "res_ptr": t, "y_ptr": t},
                                       {"HAS_RESIDUAL": has_residual}, cfg))
            specs.append(make_spec(f"bn_relu_bwd_{dname}_c{i}", _bn_relu_bwd_kernel,
                                   {"dy_ptr": t, "z_ptr": t, **stats, "dz_ptr": t, "inv_count": "fp32"},
                                   {}, cfg))
        for i, cfg in enumerate(REDUCE_CONFIGS):
            specs.append(make_spec(f"bn_relu_bwd_reduce_{dname}_c{i}", _bn_relu_bwd_reduce_kernel,
                                   {"dy_ptr": t, "z_ptr": t, **stats}, {}, cfg))
    return specs
