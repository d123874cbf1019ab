"""3D convolution as an implicit GEMM over channels-last (NDHWC) tensors.

Kernel size 1 or 3, stride 1 or 2, any padding; fp32 or bf16 inputs with fp32 accumulation.
The reduction index runs over (tap, input channel) flattened, so a 1- or 4-channel input
(ConvRes's stem) wastes no lanes on channel padding. The forward epilogue adds the bias and
can write per-tile BatchNorm partial statistics, apply a ReLU and add a residual: that is what
lets `kernels.batchnorm` fuse ConvRes's conv -> BN -> ReLU (+ residual) around it.

Logical tensors are NCDHW; they are kept (or made) ``channels_last_3d`` so that the memory is
NDHWC, and the outputs come back in that memory format.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import triton
import triton.language as tl

from .compile_proof import KernelSpec, make_spec
from .runtime import autotune_configs, interpreting, on_tensor_device

INTERPRET = interpreting()
"""Under the interpreter every kernel launches one large-tile config (DESIGN.md section 5)."""

GEOMETRIES = ((3, 1), (3, 2), (1, 1))
"""(kernel size, stride) of every convolution ConvRes uses; padding is kernel_size // 2."""


def _config(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


FWD_CONFIGS = [
    _config(4, 3, BLOCK_M=64, BLOCK_N=16, BLOCK_K=32),
    _config(4, 3, BLOCK_M=128, BLOCK_N=32, BLOCK_K=32),
    _config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    _config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
]
"""Forward tiles: BLOCK_M output positions x BLOCK_N output channels, BLOCK_K of (tap, c_in)."""

DGRAD_CONFIGS = FWD_CONFIGS
"""Input-gradient tiles: BLOCK_M input positions x BLOCK_N input channels, BLOCK_K of (tap, c_out)."""

WGRAD_CONFIGS = [
    _config(4, 3, BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, SPLIT_ROWS=1024),
    _config(4, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, SPLIT_ROWS=4096),
    _config(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, SPLIT_ROWS=2048),
    _config(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_ROWS=2048),
]
"""Weight-gradient tiles: BLOCK_K of (tap, c_in) x BLOCK_N output channels, reducing BLOCK_M
output positions a step; SPLIT_ROWS positions per program (split-K, fp32 atomics)."""

INTERPRET_CONFIGS = {
    "fwd": _config(4, 1, BLOCK_M=2048, BLOCK_N=64, BLOCK_K=128),
    "dgrad": _config(4, 1, BLOCK_M=2048, BLOCK_N=64, BLOCK_K=128),
    "wgrad": _config(4, 1, BLOCK_M=2048, BLOCK_N=64, BLOCK_K=128, SPLIT_ROWS=4096),
}


MAX_GRID_Z = 65_535
"""CUDA's limit on a grid's third dimension: the wgrad's split-K programs loop past it."""


def _configs(kind: str, configs: list[triton.Config]) -> list[triton.Config]:
    return autotune_configs(configs, INTERPRET_CONFIGS[kind])


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc += a @ b in fp32. UPCAST feeds fp32 operands (the interpreter's bf16 dot is wrong;
    a bf16 x bf16 product is exact in fp32, so the result is the tensor-core one)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif ALLOW_TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


# Zeroing the tile counts makes tiles that the chosen config does not use (but a benchmarked
# one did) count for nothing in the BN finalize.
@triton.autotune(configs=_configs("fwd", FWD_CONFIGS), key=["M", "C_in", "C_out", "KSIZE", "STRIDE"],
                 reset_to_zero=["pcount_ptr"])
@triton.jit
def _conv3d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, psum_ptr, pm2_ptr, pcount_ptr,
    M, C_in, C_out, D, H, W, D_out, H_out, W_out, pad,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr,
    RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, co] = sum_k x[m, k] w[k, co] (+ bias, -> stats, -> relu, + residual).

    m runs over output positions (n, od, oh, ow); k over (kd, kh, kw, ci), matching the weight
    laid out as [KSIZE^3 * C_in, C_out]. With STATS, tile pid_m writes its per-channel sum and
    sum of squared deviations from the tile mean (Chan et al.), and its row count.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C_out

    ow = offs_m % W_out
    t = offs_m // W_out
    oh = t % H_out
    t = t // H_out
    od = t % D_out
    nb = t // D_out
    d0 = od * STRIDE - pad
    h0 = oh * STRIDE - pad
    w0 = ow * STRIDE - pad
    row = (((nb.to(tl.int64) * D + d0) * H + h0) * W + w0) * C_in

    K_total = KSIZE * KSIZE * KSIZE * C_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_total, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K_total
        tap = offs_k // C_in
        ci = offs_k % C_in
        kd = tap // (KSIZE * KSIZE)
        kh = (tap // KSIZE) % KSIZE
        kw = tap % KSIZE
        col = ((kd * H + kh) * W + kw) * C_in + ci
        di = d0[:, None] + kd[None, :]
        hi = h0[:, None] + kh[None, :]
        wi = w0[:, None] + kw[None, :]
        a_ok = (m_ok[:, None] & k_ok[None, :] & (di >= 0) & (di < D) & (hi >= 0) & (hi < H)
                & (wi >= 0) & (wi < W))
        a = tl.load(x_ptr + row[:, None] + col[None, :], mask=a_ok, other=0.0)
        b = tl.load(w_ptr + offs_k[:, None] * C_out + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, ALLOW_TF32)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if STATS:
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_sum = tl.sum(tl.where(m_ok[:, None], acc, 0.0), axis=0)
        dev = tl.where(m_ok[:, None], acc - (tile_sum / count)[None, :], 0.0)
        tl.store(psum_ptr + pid_m * C_out + offs_n, tile_sum, mask=n_ok)
        tl.store(pm2_ptr + pid_m * C_out + offs_n, tl.sum(dev * dev, axis=0), mask=n_ok)
        tl.store(pcount_ptr + pid_m, count)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_off = offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.autotune(configs=_configs("dgrad", DGRAD_CONFIGS), key=["M", "C_in", "C_out", "KSIZE", "STRIDE"])
@triton.jit
def _conv3d_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    M, C_in, C_out, D, H, W, D_out, H_out, W_out, pad,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[m, ci] = sum_k dy[m, k] w_t[k, ci]: m over input positions, k over (kd, kh, kw, co)
    with w_t laid out as [KSIZE^3 * C_out, C_in]. Output position od = (id + pad - kd) / STRIDE
    contributes only where the division is exact and in range (masked, so stride 2 is exact)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C_in

    iw = offs_m % W
    t = offs_m // W
    ih = t % H
    t = t // H
    id_ = t % D
    nb = t // D
    row = nb.to(tl.int64) * D_out * H_out * W_out * C_out

    K_total = KSIZE * KSIZE * KSIZE * C_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_total, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K_total
        tap = offs_k // C_out
        co = offs_k % C_out
        kd = tap // (KSIZE * KSIZE)
        kh = (tap // KSIZE) % KSIZE
        kw = tap % KSIZE
        sd = (id_ + pad)[:, None] - kd[None, :]
        sh = (ih + pad)[:, None] - kh[None, :]
        sw = (iw + pad)[:, None] - kw[None, :]
        ok = (m_ok[:, None] & k_ok[None, :] & (sd >= 0) & (sh >= 0) & (sw >= 0)
              & (sd < D_out * STRIDE) & (sh < H_out * STRIDE) & (sw < W_out * STRIDE))
        if STRIDE > 1:
            ok = ok & (sd % STRIDE == 0) & (sh % STRIDE == 0) & (sw % STRIDE == 0)
        pos = ((sd // STRIDE) * H_out + sh // STRIDE) * W_out + sw // STRIDE
        a = tl.load(dy_ptr + row[:, None] + (pos * C_out + co[None, :]), mask=ok, other=0.0)
        b = tl.load(w_ptr + offs_k[:, None] * C_in + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, ALLOW_TF32)

    dx_off = offs_m.to(tl.int64)[:, None] * C_in + offs_n[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_configs("wgrad", WGRAD_CONFIGS), key=["M", "C_in", "C_out", "KSIZE", "STRIDE"],
                 reset_to_zero=["dw_ptr", "db_ptr"])
@triton.jit
def _conv3d_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, db_ptr,
    M, C_in, C_out, D, H, W, D_out, H_out, W_out, pad,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_ROWS: tl.constexpr,
):
    """dw[k, co] += sum_m x[m, k] dy[m, co] over this program's splits of SPLIT_ROWS output
    positions (splits pid_s, pid_s + grid z, ...: a grid holds at most 65,535 of them), with
    fp32 atomics into dw laid out as [KSIZE^3 * C_in, C_out]; the programs of the first k-block
    also reduce dy into the bias gradient."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    K_total = KSIZE * KSIZE * KSIZE * C_in
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K_total
    n_ok = offs_n < C_out
    tap = offs_k // C_in
    ci = offs_k % C_in
    kd = tap // (KSIZE * KSIZE)
    kh = (tap // KSIZE) % KSIZE
    kw = tap % KSIZE
    col = ((kd * H + kh) * W + kw) * C_in + ci

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in range(pid_s * SPLIT_ROWS, M, tl.num_programs(2) * SPLIT_ROWS):
        m_end = tl.minimum(split + SPLIT_ROWS, M)
        for m0 in range(split, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < m_end
            ow = offs_m % W_out
            t = offs_m // W_out
            oh = t % H_out
            t = t // H_out
            od = t % D_out
            nb = t // D_out
            d0 = od * STRIDE - pad
            h0 = oh * STRIDE - pad
            w0 = ow * STRIDE - pad
            row = (((nb.to(tl.int64) * D + d0) * H + h0) * W + w0) * C_in
            di = d0[:, None] + kd[None, :]
            hi = h0[:, None] + kh[None, :]
            wi = w0[:, None] + kw[None, :]
            a_ok = (m_ok[:, None] & k_ok[None, :] & (di >= 0) & (di < D) & (hi >= 0) & (hi < H)
                    & (wi >= 0) & (wi < W))
            a = tl.load(x_ptr + row[:, None] + col[None, :], mask=a_ok, other=0.0)
            g = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :],
                        mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(tl.trans(a), g, acc, UPCAST, ALLOW_TF32)
            if HAS_BIAS:
                db += tl.sum(g.to(tl.float32), axis=0)

    tl.atomic_add(dw_ptr + offs_k[:, None] * C_out + offs_n[None, :], acc,
                  mask=k_ok[:, None] & n_ok[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.atomic_add(db_ptr + offs_n, db, mask=n_ok)


# ----------------------------------------------------------------------------------------------
# Host functions


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels_last_3d memory (a no-op when it already is)."""
    return t.contiguous(memory_format=torch.channels_last_3d)


def output_shape(x_shape, c_out: int, ksize: int, stride: int, padding: int) -> tuple[int, ...]:
    n, _, d, h, w = x_shape
    return (n, c_out) + tuple((s + 2 * padding - ksize) // stride + 1 for s in (d, h, w))


def check_residual(residual: torch.Tensor, out: torch.Tensor) -> None:
    """A residual must be the output's shape and dtype: one of another dtype would turn the
    output, and so the backward's dy, into that dtype, and feed tl.dot mixed operands."""
    if residual.shape != out.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match the output {tuple(out.shape)}")
    if residual.dtype != out.dtype:
        raise TypeError(f"residual is {residual.dtype}, the output {out.dtype}: cast it first")


def _check(x: torch.Tensor, weight: torch.Tensor, stride: int) -> int:
    if x.dim() != 5 or weight.dim() != 5:
        raise ValueError(f"conv3d needs a 5-D input and weight, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    ksize = weight.shape[2]
    if weight.shape[2:] != (ksize,) * 3 or ksize not in (1, 3) or stride not in (1, 2):
        raise ValueError(f"the Triton conv3d supports cubic kernels of size 1 or 3 and stride 1 or 2, "
                         f"got weight {tuple(weight.shape)} and stride {stride}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[1]} channels, the weight expects {weight.shape[1]}")
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        raise TypeError(f"conv3d takes fp32 or bf16 inputs with a weight of the same dtype, "
                        f"got {x.dtype} and {weight.dtype}")
    return ksize


def _dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """fp32 follows torch's own setting for convolutions (cuDNN uses TF32 unless told not to);
    TF32 means nothing for bf16 operands, so a bf16 kernel always has it off."""
    return {"UPCAST": INTERPRET and dtype == torch.bfloat16,
            "ALLOW_TF32": dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32) and not INTERPRET}


def _geometry(x: torch.Tensor, out_shape) -> tuple[int, ...]:
    return (*x.shape[2:], *out_shape[2:])


def stats_tiles(m: int) -> int:
    """Rows of the per-tile partial statistics buffers: enough for the smallest BLOCK_M."""
    return triton.cdiv(m, min(c.kwargs["BLOCK_M"] for c in _configs("fwd", FWD_CONFIGS)))


@on_tensor_device
def conv3d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                   padding: int, *, relu: bool = False, residual: torch.Tensor | None = None,
                   stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """conv3d(x) (+ bias) (-> per-tile stats) (-> relu) (+ residual), channels_last_3d out.

    ``stats`` = (sum, m2, count) buffers of shapes [stats_tiles(M), C_out] x2 and
    [stats_tiles(M)]; ``count`` must be zeroed (tiles a config does not use stay at count 0).
    """
    ksize = _check(x, weight, stride)
    x = channels_last(x)
    c_out = weight.shape[0]
    out_shape = output_shape(x.shape, c_out, ksize, stride, padding)
    out = torch.empty(out_shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last_3d)
    m = out_shape[0] * out_shape[2] * out_shape[3] * out_shape[4]
    w = weight.permute(2, 3, 4, 1, 0).contiguous()  # [kd, kh, kw, c_in, c_out]
    if residual is not None:
        residual = channels_last(residual)
        check_residual(residual, out)
    psum, pm2, pcount = stats if stats is not None else (out, out, out)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))

    _conv3d_fwd_kernel[grid](
        x, w, bias if bias is not None else w, residual if residual is not None else out, out,
        psum, pm2, pcount, m, x.shape[1], c_out, *_geometry(x, out_shape), padding,
        KSIZE=ksize, STRIDE=stride, HAS_BIAS=bias is not None, STATS=stats is not None, RELU=relu,
        HAS_RESIDUAL=residual is not None, **_dot_flags(x.dtype))
    return out


@on_tensor_device
def conv3d_dgrad(dy: torch.Tensor, weight: torch.Tensor, x_shape, stride: int, padding: int) -> torch.Tensor:
    """The input gradient of conv3d, channels_last_3d."""
    dy = channels_last(dy)
    ksize = weight.shape[2]
    c_out, c_in = weight.shape[:2]
    dx = torch.empty(x_shape, device=dy.device, dtype=dy.dtype, memory_format=torch.channels_last_3d)
    m = x_shape[0] * x_shape[2] * x_shape[3] * x_shape[4]
    w = weight.to(dy.dtype).permute(2, 3, 4, 0, 1).contiguous()  # [kd, kh, kw, c_out, c_in]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_in, meta["BLOCK_N"]))

    _conv3d_dgrad_kernel[grid](dy, w, dx, m, c_in, c_out, *x_shape[2:], *dy.shape[2:], padding,
                               KSIZE=ksize, STRIDE=stride, **_dot_flags(dy.dtype))
    return dx


@on_tensor_device
def conv3d_wgrad(x: torch.Tensor, dy: torch.Tensor, weight_shape, stride: int, padding: int,
                 bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight gradient, bias gradient or None), both fp32."""
    x, dy = channels_last(x), channels_last(dy)
    c_out, c_in, ksize = weight_shape[0], weight_shape[1], weight_shape[2]
    k_total = ksize**3 * c_in
    m = dy.shape[0] * dy.shape[2] * dy.shape[3] * dy.shape[4]
    dw = torch.zeros((k_total, c_out), device=x.device, dtype=torch.float32)
    db = torch.zeros((c_out,), device=x.device, dtype=torch.float32) if bias else dw

    def grid(meta):
        return (triton.cdiv(k_total, meta["BLOCK_K"]), triton.cdiv(c_out, meta["BLOCK_N"]),
                min(triton.cdiv(m, meta["SPLIT_ROWS"]), MAX_GRID_Z))

    _conv3d_wgrad_kernel[grid](x, dy, dw, db, m, c_in, c_out, *_geometry(x, dy.shape), padding,
                               KSIZE=ksize, STRIDE=stride, HAS_BIAS=bias, **_dot_flags(x.dtype))
    dw = dw.view(ksize, ksize, ksize, c_in, c_out).permute(4, 3, 0, 1, 2).contiguous()
    return dw, (db if bias else None)


def conv3d_backward(ctx, x: torch.Tensor, weight: torch.Tensor, dz: torch.Tensor, stride: int, padding: int,
                    has_bias: bool) -> tuple[torch.Tensor | None, ...]:
    """The input, weight and bias gradients of a conv whose output gradient is ``dz``, each only
    if the autograd context ``ctx`` (inputs x, weight, bias first) needs it."""
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = conv3d_dgrad(dz, weight, x.shape, stride, padding)
    if ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2]):
        dw, db = conv3d_wgrad(x, dz, weight.shape, stride, padding, bias=has_bias)
        dw = dw.to(weight.dtype)
        db = db.to(weight.dtype) if db is not None else None
    return dx, dw, db


class Conv3dFunction(torch.autograd.Function):
    """conv3d (+ bias) (-> relu) (+ residual) with Triton forward, dgrad and wgrad."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, stride, padding, relu, keep_mask):
        x = channels_last(x)
        if keep_mask and residual is not None:  # the ReLU's mask must outlive the residual sum
            y = conv3d_forward(x, weight, bias, stride, padding, relu=True)
            out = y + channels_last(residual)
        else:
            out = y = conv3d_forward(x, weight, bias, stride, padding, relu=relu, residual=residual)
        ctx.save_for_backward(x, weight, y if relu else None)
        ctx.conf = (stride, padding, relu, bias is not None, residual is not None)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        stride, padding, relu, has_bias, has_residual = ctx.conf
        dy = channels_last(dy)
        dz = dy * (y > 0) if relu else dy
        dx, dw, db = conv3d_backward(ctx, x, weight, dz, stride, padding, has_bias)
        return dx, dw, db, (dy if has_residual else None), None, None, None, None


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           padding: int = 0) -> torch.Tensor:
    """``torch.nn.functional.conv3d`` for cubic kernels of size 1 or 3, stride 1 or 2; the
    result is in channels_last_3d memory."""
    return Conv3dFunction.apply(x, weight, bias, None, stride, padding, False, False)


def conv3d_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu(conv3d(x) + bias) (+ residual) in one kernel (ConvRes in eval mode, BN folded)."""
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"residual is {residual.dtype}, the input {x.dtype}: cast it first")
    tensors = (x, weight, bias, residual)
    keep_mask = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return Conv3dFunction.apply(x, weight, bias, residual, stride, padding, True, keep_mask)


# ----------------------------------------------------------------------------------------------
# Compile specs

DOT_MODES = (("fp32", True), ("fp32", False), ("bf16", False))
"""(dtype, ALLOW_TF32) as `_dot_flags` sets them: fp32 follows torch's TF32 switch, bf16 never
uses TF32; UPCAST is an interpreter-only flag, always off when compiled."""
STEM = (3, 1)
"""The (kernel size, stride) of ConvRes's first conv, whose C_in == 1 Triton makes a constant."""
STEM_EPILOGUES = ({"HAS_BIAS": True, "STATS": True, "RELU": False, "HAS_RESIDUAL": False},
                  {"HAS_BIAS": True, "STATS": False, "RELU": True, "HAS_RESIDUAL": False})
"""The stem conv (with bias, no residual) in training and in eval mode."""


def fwd_epilogues() -> list[dict[str, bool]]:
    """Every forward epilogue the host functions can ask for: the full product of the four
    flags, less training statistics with a ReLU or residual (training normalises first) and a
    residual without the ReLU (only `conv3d_relu` adds one)."""
    flags = ("HAS_BIAS", "STATS", "RELU", "HAS_RESIDUAL")
    combos = [dict(zip(flags, bits, strict=True)) for bits in itertools.product((False, True), repeat=4)]
    return [c for c in combos if not (c["STATS"] and (c["RELU"] or c["HAS_RESIDUAL"]))
            and not (c["HAS_RESIDUAL"] and not c["RELU"])]


def _name(kind: str, flags: dict[str, Any], dtype: str, tf32: bool, config_index: int, c_in_one: bool) -> str:
    set_flags = "".join(f"_{k.lower()}" for k, v in flags.items()
                        if v is True and k not in ("KSIZE", "STRIDE", "UPCAST", "ALLOW_TF32"))
    return (f"conv3d_{kind}_k{flags['KSIZE']}s{flags['STRIDE']}{set_flags}_{dtype}"
            f"{'_tf32' if tf32 else ''}{'_cin1' if c_in_one else ''}_c{config_index}")


def compile_specs() -> list[KernelSpec]:
    """Every kernel x (kernel size, stride) ConvRes uses x dtype and TF32 mode x epilogue x
    autotune config, with the ints Triton fixes to 1: the padding of 3^3 convs and the stem's
    single input channel (in the stem's own epilogues; no input gradient there: the image needs
    none)."""
    specs = []
    for (dtype, tf32), (ksize, stride) in itertools.product(DOT_MODES, GEOMETRIES):
        t = f"*{dtype}"
        base = {"KSIZE": ksize, "STRIDE": stride, "UPCAST": False, "ALLOW_TF32": tf32}
        ones = ("pad",) if ksize == 3 else ()
        for c_in_one in (False, True) if (ksize, stride) == STEM else (False,):
            c_ones = (*ones, "C_in") if c_in_one else ones
            epilogues = STEM_EPILOGUES if c_in_one else fwd_epilogues()
            for epilogue, (i, cfg) in itertools.product(epilogues, enumerate(FWD_CONFIGS)):
                flags = {**base, **epilogue}
                stats = "*fp32" if epilogue["STATS"] else t  # without statistics the output stands in
                fwd_types = {"x_ptr": t, "w_ptr": t, "b_ptr": t, "res_ptr": t, "out_ptr": t,
                             "psum_ptr": stats, "pm2_ptr": stats, "pcount_ptr": stats}
                specs.append(make_spec(_name("fwd", flags, dtype, tf32, i, c_in_one), _conv3d_fwd_kernel,
                                       fwd_types, flags, cfg, c_ones))
            for has_bias, (i, cfg) in itertools.product((True,) if c_in_one else (False, True),
                                                        enumerate(WGRAD_CONFIGS)):
                flags = {**base, "HAS_BIAS": has_bias}
                specs.append(make_spec(_name("wgrad", flags, dtype, tf32, i, c_in_one), _conv3d_wgrad_kernel,
                                       {"x_ptr": t, "dy_ptr": t, "dw_ptr": "*fp32", "db_ptr": "*fp32"},
                                       flags, cfg, c_ones))
            if not c_in_one:
                for i, cfg in enumerate(DGRAD_CONFIGS):
                    specs.append(make_spec(_name("dgrad", base, dtype, tf32, i, False), _conv3d_dgrad_kernel,
                                           {"dy_ptr": t, "w_ptr": t, "dx_ptr": t}, base, cfg, ones))
    return specs
