"""CBAM (both variants of `naslung.models.cbam`) as fused Triton kernels, forward and backward.

The feature map x is read as channels-last (N, S, C), S = D*H*W. Passes over the full map:

forward (x read 3 times, out written once)
  1. `_channel_pool_kernel`: per (n, c) sum, max and the number of voxels at the max, as
     partial results per chunk of voxels (combined in torch: N x chunks x C values).
  -  the channel MLP and softmax/sigmoid run in torch on (N, C): N*C work, less than one
     kernel launch costs, and its backward is six small matmuls.
  2. `_spatial_pool_kernel`: per voxel max and mean over channels of g = x * w (g is never
     stored) and the number of channels at the max, into a small (N, 3, S) map.
  3. `_spatial_gate_kernel`: the 3^3 conv 2->1 of that map, the sigmoid (s, saved as (N, S)),
     and ``out = s*x + x`` (NAS-Lung) or ``out = s*g`` (Woo) in the same pass.

backward (x read 3 times, dout 2 (NAS-Lung) or 3 (Woo) times, dx written once)
  1. `_gate_grad_kernel`: dz = sum_c(dout * x [* w]) * s * (1 - s), per voxel.
  -  `_spatial_grad_kernel` (small map only): the transposed conv of dz into the gradients of
     the [max, mean] map (pre-divided by the tie count and by C) and per-block sums for the
     conv weight gradient.
  2. `_weight_grad_kernel`: per (n, c) partial sums of dg * x, the gradient of the channel
     weights w; torch then backpropagates through the MLP to avg, max, fc1 and fc2.
  3. `_input_grad_kernel`: dx, elementwise, with every per-voxel and per-channel term known.

Max pooling follows torch's ``amax``: a gradient is split evenly between tied maxima, for the
channel pool over voxels and for the spatial pool over channels alike (ReLU outputs make such
ties common: voxels or channels that are all zero). The masks are recomputed in the backward
passes with the same fp32 arithmetic as the forward, so they match exactly.

Accumulation is fp32 for fp32, bf16 and fp16 inputs. Under ``TRITON_INTERPRET=1`` every kernel
uses one large tile (the interpreter's cost grows with program instances and loop trips).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .compile_proof import KernelSpec, make_spec
from .runtime import autotune_mode, interpreting, on_tensor_device

VARIANTS = ("nas-lung", "woo")

_INTERPRET = interpreting()
_BLOCK_CS = (4, 16, 64)
"""Channel tile widths; the one used is the smallest that holds C (64 beyond that)."""


def _tiles() -> list[triton.Config]:
    """Tiles of 16 elements per thread at each channel width; two CTA sizes where C is wide."""
    shapes = ((512, 4, 4), (128, 16, 4), (32, 64, 4), (64, 64, 8))  # (BLOCK_S, BLOCK_C, warps)
    return [triton.Config({"BLOCK_S": block_s, "BLOCK_C": block_c}, num_warps=warps)
            for block_s, block_c, warps in shapes]


CHANNEL_POOL_CONFIGS = _tiles()
SPATIAL_POOL_CONFIGS = _tiles()
SPATIAL_GATE_CONFIGS = _tiles()
GATE_GRAD_CONFIGS = _tiles()
WEIGHT_GRAD_CONFIGS = _tiles()
INPUT_GRAD_CONFIGS = _tiles()
SPATIAL_GRAD_CONFIGS = [triton.Config({"BLOCK_S": 512}, num_warps=4)]
"""One config only: the kernel writes one row of conv-weight partial sums per program."""

INTERPRETER_CONFIG = triton.Config({"BLOCK_S": 4096, "BLOCK_C": 64}, num_warps=4)
INTERPRETER_SPATIAL_GRAD_CONFIG = triton.Config({"BLOCK_S": 16384}, num_warps=4)

_TARGET_PROGRAMS = 512
"""Per-channel reductions split the voxels into chunks until about this many programs run."""
_MIN_CHUNK = 1024


def _block_c(channels: int) -> int:
    return next((b for b in _BLOCK_CS if b >= channels), _BLOCK_CS[-1])


def _prune(configs, named_args, **kwargs):
    block_c = _block_c(named_args["C"])
    return [config for config in configs if config.kwargs["BLOCK_C"] == block_c]


def _autotune(configs: list[triton.Config], key: tuple[str, ...] = ("S", "C", "RESIDUAL")):
    if _INTERPRET:
        return triton.autotune([INTERPRETER_CONFIG], key=list(key))
    if autotune_mode() == "first":  # the first config of each channel width (pruning keeps one width)
        configs = [next(c for c in configs if c.kwargs["BLOCK_C"] == width)
                   for width in dict.fromkeys(c.kwargs["BLOCK_C"] for c in configs)]
    return triton.autotune(configs, key=list(key), prune_configs_by={"early_config_prune": _prune})


# --------------------------------------------------------------------------- forward kernels


@_autotune(CHANNEL_POOL_CONFIGS, key=("S", "C"))
@triton.jit
def _channel_pool_kernel(x_ptr, sum_ptr, max_ptr, count_ptr, S, C, chunk, n_chunks,
                         BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (n, chunk, c): sum, max, and how many voxels hold the max."""
    n = tl.program_id(0)
    p = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    x_base = x_ptr + n.to(tl.int64) * S * C
    start = p * chunk
    end = tl.minimum(start + chunk, S)
    acc_sum = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    acc_max = tl.full([BLOCK_S, BLOCK_C], float("-inf"), tl.float32)
    acc_count = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < end)[:, None] & c_ok[None, :]
        x = tl.load(x_base + offs_s[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_sum += x
        x = tl.where(mask, x, float("-inf"))
        acc_count = tl.where(x > acc_max, 1.0, tl.where(mask & (x == acc_max), acc_count + 1.0, acc_count))
        acc_max = tl.maximum(acc_max, x)
    best = tl.max(acc_max, axis=0)
    count = tl.sum(tl.where(acc_max == best[None, :], acc_count, 0.0), axis=0)
    out = (n * n_chunks + p) * C + offs_c
    tl.store(sum_ptr + out, tl.sum(acc_sum, axis=0), mask=c_ok)
    tl.store(max_ptr + out, best, mask=c_ok)
    tl.store(count_ptr + out, count, mask=c_ok)


@_autotune(SPATIAL_POOL_CONFIGS, key=("S", "C"))
@triton.jit
def _spatial_pool_kernel(x_ptr, w_ptr, pool_ptr, S, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per voxel: max_c(x*w), mean_c(x*w) and how many channels hold the max -> pool (N, 3, S)."""
    n = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    x_base = x_ptr + n.to(tl.int64) * S * C
    run_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    run_count = tl.zeros([BLOCK_S], tl.float32)
    run_sum = tl.zeros([BLOCK_S], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mask = s_ok[:, None] & c_ok[None, :]
        x = tl.load(x_base + offs_s[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n * C + offs_c, mask=c_ok, other=0.0)
        g = x * w[None, :]
        run_sum += tl.sum(g, axis=1)
        g = tl.where(mask, g, float("-inf"))
        chunk_max = tl.max(g, axis=1)
        chunk_count = tl.sum(tl.where(mask & (g == chunk_max[:, None]), 1.0, 0.0), axis=1)
        run_count = tl.where(chunk_max > run_max, chunk_count,
                             tl.where(chunk_max == run_max, run_count + chunk_count, run_count))
        run_max = tl.maximum(run_max, chunk_max)
    pool = pool_ptr + n.to(tl.int64) * 3 * S + offs_s
    tl.store(pool, run_max, mask=s_ok)
    tl.store(pool + S, run_sum / C, mask=s_ok)
    tl.store(pool + 2 * S, run_count, mask=s_ok)


@_autotune(SPATIAL_GATE_CONFIGS)
@triton.jit
def _spatial_gate_kernel(x_ptr, w_ptr, pool_ptr, k_ptr, gate_ptr, out_ptr, S, C, D, H, W,
                         RESIDUAL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """s = sigmoid(conv3x3x3([max, mean])) per voxel, then out = s*x + x or s*(x*w)."""
    n = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    d = offs_s // (H * W)
    h = (offs_s // W) % H
    col = offs_s % W
    pool = pool_ptr + n.to(tl.int64) * 3 * S
    z = tl.zeros([BLOCK_S], tl.float32)
    for kd in tl.static_range(3):
        for kh in tl.static_range(3):
            for kw in tl.static_range(3):
                nd = d + (kd - 1)
                nh = h + (kh - 1)
                nw = col + (kw - 1)
                ok = s_ok & (nd >= 0) & (nd < D) & (nh >= 0) & (nh < H) & (nw >= 0) & (nw < W)
                neighbour = (nd * H + nh) * W + nw
                tap = kd * 9 + kh * 3 + kw
                z += tl.load(k_ptr + tap) * tl.load(pool + neighbour, mask=ok, other=0.0)
                z += tl.load(k_ptr + 27 + tap) * tl.load(pool + S + neighbour, mask=ok, other=0.0)
    gate = tl.sigmoid(z)
    tl.store(gate_ptr + n.to(tl.int64) * S + offs_s, gate, mask=s_ok)
    x_base = x_ptr + n.to(tl.int64) * S * C
    out_base = out_ptr + n.to(tl.int64) * S * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mask = s_ok[:, None] & c_ok[None, :]
        offs = offs_s[:, None] * C + offs_c[None, :]
        x = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            out = gate[:, None] * x + x
        else:
            w = tl.load(w_ptr + n * C + offs_c, mask=c_ok, other=0.0)
            out = gate[:, None] * (x * w[None, :])
        tl.store(out_base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------- backward kernels


@_autotune(GATE_GRAD_CONFIGS)
@triton.jit
def _gate_grad_kernel(x_ptr, dout_ptr, w_ptr, gate_ptr, dz_ptr, S, C,
                      RESIDUAL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz = d(loss)/d(conv output) = sum_c(dout * x [* w]) * s * (1 - s), per voxel."""
    n = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    x_base = x_ptr + n.to(tl.int64) * S * C
    dout_base = dout_ptr + n.to(tl.int64) * S * C
    acc = tl.zeros([BLOCK_S], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mask = s_ok[:, None] & c_ok[None, :]
        offs = offs_s[:, None] * C + offs_c[None, :]
        x = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_base + offs, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            acc += tl.sum(dout * x, axis=1)
        else:
            w = tl.load(w_ptr + n * C + offs_c, mask=c_ok, other=0.0)
            acc += tl.sum(dout * (x * w[None, :]), axis=1)
    gate = tl.load(gate_ptr + n.to(tl.int64) * S + offs_s, mask=s_ok, other=0.0)
    tl.store(dz_ptr + n.to(tl.int64) * S + offs_s, acc * gate * (1.0 - gate), mask=s_ok)


@triton.jit
def _spatial_grad_kernel(dz_ptr, pool_ptr, k_ptr, e_ptr, dk_ptr, S, C, D, H, W, BLOCK_S: tl.constexpr):
    """Transposed conv of dz into e = [d/dmax / ties, d/dmean / C] (N, 2, S); conv-weight sums.

    Writes one row of 54 partial sums of the conv weight gradient per program.
    """
    n = tl.program_id(0)
    block = tl.program_id(1)
    offs_s = block * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    d = offs_s // (H * W)
    h = (offs_s // W) % H
    col = offs_s % W
    pool = pool_ptr + n.to(tl.int64) * 3 * S
    dz_base = dz_ptr + n.to(tl.int64) * S
    dz = tl.load(dz_base + offs_s, mask=s_ok, other=0.0)
    dk_row = dk_ptr + (n * tl.num_programs(1) + block) * 54
    d_max = tl.zeros([BLOCK_S], tl.float32)
    d_mean = tl.zeros([BLOCK_S], tl.float32)
    for kd in tl.static_range(3):
        for kh in tl.static_range(3):
            for kw in tl.static_range(3):
                tap = kd * 9 + kh * 3 + kw
                # the voxel this tap reads in the forward conv centred here
                nd = d + (kd - 1)
                nh = h + (kh - 1)
                nw = col + (kw - 1)
                ok = s_ok & (nd >= 0) & (nd < D) & (nh >= 0) & (nh < H) & (nw >= 0) & (nw < W)
                neighbour = (nd * H + nh) * W + nw
                tl.store(dk_row + tap, tl.sum(dz * tl.load(pool + neighbour, mask=ok, other=0.0)))
                tl.store(dk_row + 27 + tap, tl.sum(dz * tl.load(pool + S + neighbour, mask=ok, other=0.0)))
                # the conv centre whose tap reads this voxel
                md = d - (kd - 1)
                mh = h - (kh - 1)
                mw = col - (kw - 1)
                ok = s_ok & (md >= 0) & (md < D) & (mh >= 0) & (mh < H) & (mw >= 0) & (mw < W)
                source = tl.load(dz_base + (md * H + mh) * W + mw, mask=ok, other=0.0)
                d_max += tl.load(k_ptr + tap) * source
                d_mean += tl.load(k_ptr + 27 + tap) * source
    ties = tl.load(pool + 2 * S + offs_s, mask=s_ok, other=1.0)
    e = e_ptr + n.to(tl.int64) * 2 * S + offs_s
    tl.store(e, d_max / ties, mask=s_ok)
    tl.store(e + S, d_mean / C, mask=s_ok)


@_autotune(WEIGHT_GRAD_CONFIGS)
@triton.jit
def _weight_grad_kernel(x_ptr, dout_ptr, w_ptr, gate_ptr, pool_ptr, e_ptr, part_ptr, S, C, chunk, n_chunks,
                        RESIDUAL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (n, chunk, c): sum over voxels of dg * x, dg the gradient of g = x * w."""
    n = tl.program_id(0)
    p = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    w = tl.load(w_ptr + n * C + offs_c, mask=c_ok, other=0.0)
    x_base = x_ptr + n.to(tl.int64) * S * C
    dout_base = dout_ptr + n.to(tl.int64) * S * C
    pool = pool_ptr + n.to(tl.int64) * 3 * S
    e = e_ptr + n.to(tl.int64) * 2 * S
    start = p * chunk
    end = tl.minimum(start + chunk, S)
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < end
        mask = s_ok[:, None] & c_ok[None, :]
        offs = offs_s[:, None] * C + offs_c[None, :]
        x = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
        g_max = tl.load(pool + offs_s, mask=s_ok, other=0.0)
        e_max = tl.load(e + offs_s, mask=s_ok, other=0.0)
        e_mean = tl.load(e + S + offs_s, mask=s_ok, other=0.0)
        dg = e_mean[:, None] + tl.where(x * w[None, :] == g_max[:, None], e_max[:, None], 0.0)
        if not RESIDUAL:
            dout = tl.load(dout_base + offs, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + n.to(tl.int64) * S + offs_s, mask=s_ok, other=0.0)
            dg += gate[:, None] * dout
        acc += dg * x
    tl.store(part_ptr + (n * n_chunks + p) * C + offs_c, tl.sum(acc, axis=0), mask=c_ok)


@_autotune(INPUT_GRAD_CONFIGS)
@triton.jit
def _input_grad_kernel(x_ptr, dout_ptr, dx_ptr, w_ptr, cmax_ptr, dcmax_ptr, dcavg_ptr, gate_ptr, pool_ptr,
                       e_ptr, S, C, RESIDUAL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx, elementwise: the gate, spatial-pool and channel-pool terms (dcmax pre-divided by ties,
    dcavg by S)."""
    n = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ok = offs_s < S
    c_ok = offs_c < C
    mask = s_ok[:, None] & c_ok[None, :]
    offs = n.to(tl.int64) * S * C + offs_s[:, None] * C + offs_c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nc = n * C + offs_c
    w = tl.load(w_ptr + nc, mask=c_ok, other=0.0)
    c_max = tl.load(cmax_ptr + nc, mask=c_ok, other=0.0)
    dc_max = tl.load(dcmax_ptr + nc, mask=c_ok, other=0.0)
    dc_avg = tl.load(dcavg_ptr + nc, mask=c_ok, other=0.0)
    ns = n.to(tl.int64) * S + offs_s
    gate = tl.load(gate_ptr + ns, mask=s_ok, other=0.0)
    pool = pool_ptr + n.to(tl.int64) * 3 * S + offs_s
    e = e_ptr + n.to(tl.int64) * 2 * S + offs_s
    g_max = tl.load(pool, mask=s_ok, other=0.0)
    e_max = tl.load(e, mask=s_ok, other=0.0)
    e_mean = tl.load(e + S, mask=s_ok, other=0.0)
    dg = e_mean[:, None] + tl.where(x * w[None, :] == g_max[:, None], e_max[:, None], 0.0)
    if RESIDUAL:
        dx = dout * (gate[:, None] + 1.0) + dg * w[None, :]
    else:
        dx = (gate[:, None] * dout + dg) * w[None, :]
    dx += dc_avg[None, :] + tl.where(x == c_max[None, :], dc_max[None, :], 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------- host side


def _chunks(n: int, s: int) -> tuple[int, int]:
    """(voxels per chunk, chunks) for the per-channel reductions over voxels."""
    if _INTERPRET:
        return s, 1
    n_chunks = max(1, min(triton.cdiv(_TARGET_PROGRAMS, n), triton.cdiv(s, _MIN_CHUNK)))
    chunk = triton.cdiv(s, n_chunks)
    return chunk, triton.cdiv(s, chunk)


def _channel_weights(avg, cmax, fc1, fc2, residual: bool):
    """The (N, C) channel weights w and what their backward needs."""
    if residual:
        hidden = (avg + cmax) @ fc1.t()
        return torch.softmax(hidden @ fc2.t(), dim=1), hidden
    h_avg, h_max = avg @ fc1.t(), cmax @ fc1.t()
    hidden = torch.relu(h_avg) + torch.relu(h_max)
    return torch.sigmoid(hidden @ fc2.t()), (h_avg, h_max, hidden)


def _channel_weights_backward(dw, w, avg, cmax, fc1, fc2, residual: bool, saved):
    """d(avg), d(max), d(fc1), d(fc2) from dw; the (N, C) MLP's backward in torch."""
    if residual:
        hidden = saved
        dscores = w * (dw - (dw * w).sum(dim=1, keepdim=True))
        dhidden = dscores @ fc2
        dpooled = dhidden @ fc1
        return dpooled, dpooled, dhidden.t() @ (avg + cmax), dscores.t() @ hidden
    h_avg, h_max, hidden = saved
    dscores = dw * w * (1.0 - w)
    dhidden = dscores @ fc2
    dh_avg = dhidden * (h_avg > 0)
    dh_max = dhidden * (h_max > 0)
    dfc1 = dh_avg.t() @ avg + dh_max.t() @ cmax
    return dh_avg @ fc1, dh_max @ fc1, dfc1, dscores.t() @ hidden


def _spatial_grad_block() -> int:
    config = INTERPRETER_SPATIAL_GRAD_CONFIG if _INTERPRET else SPATIAL_GRAD_CONFIGS[0]
    return config.kwargs["BLOCK_S"]


class CBAMFunction(torch.autograd.Function):
    """Both CBAM variants; gradients for x, fc1.weight, fc2.weight and spatial_conv.weight."""

    @staticmethod
    @on_tensor_device
    def forward(ctx, x, fc1_weight, fc2_weight, spatial_weight, residual: bool):
        n, c, d, h, w_ = x.shape
        s = d * h * w_
        xl = x.contiguous(memory_format=torch.channels_last_3d)
        fc1 = fc1_weight.detach().float()
        fc2 = fc2_weight.detach().float()
        kernel = spatial_weight.detach().float().contiguous()
        f32 = dict(device=x.device, dtype=torch.float32)

        chunk, n_chunks = _chunks(n, s)
        sums, maxes, counts = (torch.empty((n, n_chunks, c), **f32) for _ in range(3))
        _channel_pool_kernel[lambda meta: (n, n_chunks, triton.cdiv(c, meta["BLOCK_C"]))](
            xl, sums, maxes, counts, s, c, chunk, n_chunks)
        cmax = maxes.amax(dim=1)
        cmax_count = (counts * (maxes == cmax[:, None])).sum(dim=1)
        avg = sums.sum(dim=1) / s
        weights, saved = _channel_weights(avg, cmax, fc1, fc2, residual)
        weights = weights.contiguous()

        pool = torch.empty((n, 3, s), **f32)
        _spatial_pool_kernel[lambda meta: (n, triton.cdiv(s, meta["BLOCK_S"]))](xl, weights, pool, s, c)
        gate = torch.empty((n, s), **f32)
        out = torch.empty_like(xl, memory_format=torch.channels_last_3d)
        _spatial_gate_kernel[lambda meta: (n, triton.cdiv(s, meta["BLOCK_S"]))](
            xl, weights, pool, kernel, gate, out, s, c, d, h, w_, RESIDUAL=residual)

        ctx.residual = residual
        ctx.saved = saved
        ctx.weight_dtypes = (fc1_weight.dtype, fc2_weight.dtype, spatial_weight.dtype)
        ctx.save_for_backward(xl, fc1, fc2, kernel, avg, cmax, cmax_count, weights, pool, gate)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @on_tensor_device
    def backward(ctx, dout):
        xl, fc1, fc2, kernel, avg, cmax, cmax_count, weights, pool, gate = ctx.saved_tensors
        residual = ctx.residual
        n, c, d, h, w_ = xl.shape
        s = d * h * w_
        dout = dout.contiguous(memory_format=torch.channels_last_3d)
        f32 = dict(device=xl.device, dtype=torch.float32)

        dz = torch.empty((n, s), **f32)
        _gate_grad_kernel[lambda meta: (n, triton.cdiv(s, meta["BLOCK_S"]))](
            xl, dout, weights, gate, dz, s, c, RESIDUAL=residual)

        block = _spatial_grad_block()
        n_blocks = triton.cdiv(s, block)
        e = torch.empty((n, 2, s), **f32)
        dk_rows = torch.empty((n * n_blocks, 54), **f32)
        _spatial_grad_kernel[(n, n_blocks)](dz, pool, kernel, e, dk_rows, s, c, d, h, w_, BLOCK_S=block,
                                            num_warps=4)

        chunk, n_chunks = _chunks(n, s)
        parts = torch.empty((n, n_chunks, c), **f32)
        _weight_grad_kernel[lambda meta: (n, n_chunks, triton.cdiv(c, meta["BLOCK_C"]))](
            xl, dout, weights, gate, pool, e, parts, s, c, chunk, n_chunks, RESIDUAL=residual)
        dweights = parts.sum(dim=1)
        davg, dcmax, dfc1, dfc2 = _channel_weights_backward(
            dweights, weights, avg, cmax, fc1, fc2, residual, ctx.saved)

        dx = torch.empty_like(xl, memory_format=torch.channels_last_3d)
        grid = lambda meta: (n, triton.cdiv(s, meta["BLOCK_S"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
        _input_grad_kernel[grid](xl, dout, dx, weights, cmax, (dcmax / cmax_count).contiguous(),
                                 (davg / s).contiguous(), gate, pool, e, s, c, RESIDUAL=residual)
        dk = dk_rows.sum(dim=0).view(1, 2, 3, 3, 3)
        fc1_dtype, fc2_dtype, k_dtype = ctx.weight_dtypes
        return dx, dfc1.to(fc1_dtype), dfc2.to(fc2_dtype), dk.to(k_dtype), None


def cbam(x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, spatial_weight: torch.Tensor,
         variant: str = "nas-lung") -> torch.Tensor:
    """`make_cbam(C, variant)` applied to x (N, C, D, H, W) with these weights; channels_last_3d out.

    fc1_weight (C//4, C), fc2_weight (C, C//4), spatial_weight (1, 2, 3, 3, 3), as in the module.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown CBAM variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if x.dim() != 5:
        raise ValueError(f"cbam expects (N, C, D, H, W) input, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if fc1_weight.shape != (c // 4, c) or fc2_weight.shape != (c, c // 4) or \
            spatial_weight.shape != (1, 2, 3, 3, 3):
        got = ", ".join(str(tuple(t.shape)) for t in (fc1_weight, fc2_weight, spatial_weight))
        raise ValueError(f"CBAM weights for {c} channels must be fc1 {(c // 4, c)}, fc2 {(c, c // 4)} and "
                         f"spatial (1, 2, 3, 3, 3); got {got}")
    return CBAMFunction.apply(x, fc1_weight, fc2_weight, spatial_weight, variant == "nas-lung")


# ------------------------------------------------------------------------------ compile proof

_COMPILED = (
    # name, kernel, configs, whether it has the RESIDUAL (variant) switch
    ("channel_pool", _channel_pool_kernel, CHANNEL_POOL_CONFIGS, False),
    ("spatial_pool", _spatial_pool_kernel, SPATIAL_POOL_CONFIGS, False),
    ("spatial_gate", _spatial_gate_kernel, SPATIAL_GATE_CONFIGS, True),
    ("gate_grad", _gate_grad_kernel, GATE_GRAD_CONFIGS, True),
    ("weight_grad", _weight_grad_kernel, WEIGHT_GRAD_CONFIGS, True),
    ("input_grad", _input_grad_kernel, INPUT_GRAD_CONFIGS, True),
    ("spatial_grad", _spatial_grad_kernel, SPATIAL_GRAD_CONFIGS, False),
)
_MAP_POINTERS = {"x_ptr", "dout_ptr", "dx_ptr", "out_ptr"}
"""Pointers to full-size maps, in the input's dtype; every other pointer is fp32."""
_ONE_CHUNK = {"channel_pool", "weight_grad"}
"""Kernels whose per-channel reduction is one chunk of voxels on small maps (n_chunks == 1,
which Triton makes a constant)."""


def compile_specs() -> list[KernelSpec]:
    """Every kernel x autotune config x input dtype (x variant where the kernel has one, x one
    chunk or several where it reduces over chunks); the spatial gradient works on fp32 maps only."""
    specs = []
    for name, kernel, configs, has_variant in _COMPILED:
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        dtypes = ("fp32",) if name == "spatial_grad" else ("fp32", "bf16")
        for dtype, residual, one_chunk, config in itertools.product(
                dtypes, (True, False) if has_variant else (None,),
                (False, True) if name in _ONE_CHUNK else (False,), configs):
            types = {arg: f"*{dtype}" if arg in _MAP_POINTERS else "*fp32" for arg in fn.arg_names
                     if arg.endswith("_ptr")}
            flags = {} if residual is None else {"RESIDUAL": residual}
            tile = "x".join(str(value) for value in config.kwargs.values())
            label = f"cbam.{name}{'' if residual is None else '-nas-lung' if residual else '-woo'}" \
                    f"{'-one-chunk' if one_chunk else ''}.{dtype}.{tile}.w{config.num_warps}"
            specs.append(make_spec(label, kernel, types, flags, config, ("n_chunks",) if one_chunk else ()))
    return specs
