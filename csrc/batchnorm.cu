// BatchNorm3d (training and eval) + ReLU (+ a residual added after the ReLU), forward and
// backward, on NCDHW maps (N, C, S) in fp32 or bf16 with fp32 statistics.
//
// Forward: one per-channel reduction pass over x, a finalize over C channels, one elementwise
// pass. Backward: one per-channel reduction pass over (x, dy), a finalize, one elementwise pass.
// Per-block partial results are combined in a fixed order, never with atomics, so a result
// does not depend on scheduling and the host and CUDA builds sum in the same order (their last
// bits still differ: nvcc contracts a * b + c into FMAs). The ReLU mask is computed by the same
// expression, (x - mean) * (invstd * weight) + bias, in every pass that needs it.
#include "batchnorm.h"
#include "portable.h"

namespace {

constexpr int kThreads = 256;          // threads per block of every kernel here
constexpr long long kPerThread = 8;    // elements per thread in a reduction block, at least

// Blocks per channel of a reduction pass: enough to fill a GPU at small C, none idle at large C.
long long reduction_blocks(long long n, long long s) {
    long long elements = n * s;
    long long blocks = (elements + kThreads * kPerThread - 1) / (kThreads * kPerThread);
    return blocks < 1 ? 1 : (blocks > 64 ? 64 : blocks);
}

// Threads per reduction block: a power of two from 32 to kThreads, about kPerThread values
// each, so a small map does not pay for a full block's tree reduction (on the CPU, every
// emulated thread of it).
unsigned reduction_threads(long long n, long long s, long long blocks) {
    long long per_block = (n * s + blocks - 1) / blocks;
    unsigned threads = 32;
    while (threads < kThreads && threads * kPerThread < per_block) threads *= 2;
    return threads;
}

// The next (sample, voxel) of a thread striding through a channel's N*S values by a step of
// step_samples * S + step_voxels (step_voxels < S): no division per value (a 64-bit division
// costs more than the rest of a value's work).
NL_HOST_DEVICE void advance(long long& sample, long long& voxel, long long step_samples, long long step_voxels,
                            long long s) {
    voxel += step_voxels;
    sample += step_samples;
    if (voxel >= s) {
        voxel -= s;
        ++sample;
    }
}

// [begin, end) of the p-th of ``blocks`` equal slices of a channel's ``elements`` values: the
// part of the channel one block of a reduction pass takes.
NL_HOST_DEVICE void channel_slice(long long elements, long long p, long long blocks, long long& begin,
                                  long long& end) {
    const long long chunk = (elements + blocks - 1) / blocks;
    begin = p * chunk;
    end = begin + chunk < elements ? begin + chunk : elements;
}

// Welford's (count, mean, m2) of two sets, combined (Chan et al.).
NL_HOST_DEVICE void welford_merge(float& count, float& mean, float& m2, float count_b, float mean_b,
                                  float m2_b) {
    float total = count + count_b;
    if (count_b == 0.0f) return;
    float delta = mean_b - mean;
    float share = count_b / total;
    mean += delta * share;
    m2 += m2_b + delta * delta * count * share;
    count = total;
}

// grid (C, P), block reduction_threads (<= kThreads, a power of two), shared 3 x kThreads
// floats; reads x once.
// Block (c, p) takes the p-th slice of channel c's N*S values: (count, mean, m2) into
// partials[(c * P + p) * 3 ...].
template <typename T>
NL_KERNEL void bn_stats_partials_kernel(const T* NL_RESTRICT x, long long n, long long channels,
                                        long long s, float* NL_RESTRICT partials) {
    NL_SHARED float sh_count[kThreads];
    NL_SHARED float sh_mean[kThreads];
    NL_SHARED float sh_m2[kThreads];
    const long long c = blockIdx.x, p = blockIdx.y, blocks = gridDim.y;
    long long begin, end;
    channel_slice(n * s, p, blocks, begin, end);
    const long long step_samples = blockDim.x / s, step_voxels = blockDim.x % s;
    NL_THREADS {
        // Sums of deviations from the thread's first value (no division per value, and no
        // cancellation while that value is near the channel's mean), then (count, mean, m2).
        float count = 0.0f, sum = 0.0f, sum_squares = 0.0f, origin = 0.0f;
        long long j = begin + threadIdx.x, sample = j / s, voxel = j % s;
        if (j < end) origin = nl_load(x, (sample * channels + c) * s + voxel);
        for (; j < end; j += blockDim.x, advance(sample, voxel, step_samples, step_voxels, s)) {
            float deviation = nl_load(x, (sample * channels + c) * s + voxel) - origin;
            count += 1.0f;
            sum += deviation;
            sum_squares += deviation * deviation;
        }
        sh_count[threadIdx.x] = count;
        sh_mean[threadIdx.x] = count > 0.0f ? origin + sum / count : 0.0f;
        sh_m2[threadIdx.x] = count > 0.0f ? fmaxf(sum_squares - sum * (sum / count), 0.0f) : 0.0f;
    }
    nl_sync();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        NL_THREADS {
            if (threadIdx.x < half) {
                unsigned other = threadIdx.x + half;
                welford_merge(sh_count[threadIdx.x], sh_mean[threadIdx.x], sh_m2[threadIdx.x],
                              sh_count[other], sh_mean[other], sh_m2[other]);
            }
        }
        nl_sync();
    }
    NL_THREADS {
        if (threadIdx.x == 0) {
            float* out = partials + (c * blocks + p) * 3;
            out[0] = sh_count[0];
            out[1] = sh_mean[0];
            out[2] = sh_m2[0];
        }
    }
}

// grid ceil(C / kThreads), block kThreads, no shared memory; one thread per channel.
// Combines the channel's P partials in order into mean and 1/sqrt(var + eps), and updates the
// running statistics as torch does: biased variance to normalise, unbiased into running_var.
NL_KERNEL void bn_stats_finalize_kernel(const float* NL_RESTRICT partials, long long channels,
                                        long long blocks, float eps, float momentum,
                                        float* NL_RESTRICT running_mean, float* NL_RESTRICT running_var,
                                        float* NL_RESTRICT mean_out, float* NL_RESTRICT invstd_out) {
    NL_THREADS {
        long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
        if (c < channels) {
            float count = 0.0f, mean = 0.0f, m2 = 0.0f;
            for (long long p = 0; p < blocks; ++p) {
                const float* part = partials + (c * blocks + p) * 3;
                welford_merge(count, mean, m2, part[0], part[1], part[2]);
            }
            float var = m2 / count;
            mean_out[c] = mean;
            invstd_out[c] = 1.0f / sqrtf(var + eps);
            if (running_mean != nullptr) {
                float unbiased = count > 1.0f ? m2 / (count - 1.0f) : var;
                running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean;
                running_var[c] = (1.0f - momentum) * running_var[c] + momentum * unbiased;
            }
        }
    }
}

// grid (voxel blocks, C, N) (elementwise_grid), block kThreads; reads x (and the residual)
// once, writes y once: y = relu((x - mean) * invstd * w + b) [+ residual].
template <typename T>
NL_KERNEL void bn_relu_forward_kernel(const T* NL_RESTRICT x, const T* NL_RESTRICT residual,
                                      long long channels, long long s, const float* NL_RESTRICT mean,
                                      const float* NL_RESTRICT invstd, const float* NL_RESTRICT weight,
                                      const float* NL_RESTRICT bias, T* NL_RESTRICT y) {
    const long long c = blockIdx.y, base = (static_cast<long long>(blockIdx.z) * channels + c) * s;
    const float centre = mean[c], scale = invstd[c] * weight[c], shift = bias[c];
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    NL_THREADS {
        for (long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; v < s; v += stride) {
            float out = (nl_load(x, base + v) - centre) * scale + shift;
            out = fmaxf(out, 0.0f);
            if (residual != nullptr) out += nl_load(residual, base + v);
            nl_store(y, base + v, out);
        }
    }
}

// grid (C, P), block reduction_threads (<= kThreads, a power of two), shared 2 x kThreads
// floats; reads x and dy once.
// Per channel slice: sum of g and of g * xhat, g = dy where the ReLU passed (recomputed).
template <typename T>
NL_KERNEL void bn_relu_backward_partials_kernel(const T* NL_RESTRICT x, const T* NL_RESTRICT dy,
                                                long long n, long long channels, long long s,
                                                const float* NL_RESTRICT mean,
                                                const float* NL_RESTRICT invstd,
                                                const float* NL_RESTRICT weight,
                                                const float* NL_RESTRICT bias,
                                                float* NL_RESTRICT partials) {
    NL_SHARED float sh_g[kThreads];
    NL_SHARED float sh_gx[kThreads];
    const long long c = blockIdx.x, p = blockIdx.y, blocks = gridDim.y;
    const float centre = mean[c], inv = invstd[c], scale = inv * weight[c], shift = bias[c];
    long long begin, end;
    channel_slice(n * s, p, blocks, begin, end);
    const long long step_samples = blockDim.x / s, step_voxels = blockDim.x % s;
    NL_THREADS {
        float sum_g = 0.0f, sum_gx = 0.0f;
        long long j = begin + threadIdx.x, sample = j / s, voxel = j % s;
        for (; j < end; j += blockDim.x, advance(sample, voxel, step_samples, step_voxels, s)) {
            long long i = (sample * channels + c) * s + voxel;
            float centred = nl_load(x, i) - centre;
            float g = nl_keep_if(centred * scale + shift > 0.0f, nl_load(dy, i));
            float xhat = centred * inv;
            sum_g += g;
            sum_gx += g * xhat;
        }
        sh_g[threadIdx.x] = sum_g;
        sh_gx[threadIdx.x] = sum_gx;
    }
    nl_sync();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        NL_THREADS {
            if (threadIdx.x < half) {
                sh_g[threadIdx.x] += sh_g[threadIdx.x + half];
                sh_gx[threadIdx.x] += sh_gx[threadIdx.x + half];
            }
        }
        nl_sync();
    }
    NL_THREADS {
        if (threadIdx.x == 0) {
            partials[(c * blocks + p) * 2] = sh_g[0];
            partials[(c * blocks + p) * 2 + 1] = sh_gx[0];
        }
    }
}

// grid ceil(C / kThreads), block kThreads; one thread per channel: the bias and weight
// gradients, the P partials summed in order.
NL_KERNEL void bn_backward_finalize_kernel(const float* NL_RESTRICT partials, long long channels,
                                           long long blocks, float* NL_RESTRICT grad_bias,
                                           float* NL_RESTRICT grad_weight) {
    NL_THREADS {
        long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
        if (c < channels) {
            float sum_g = 0.0f, sum_gx = 0.0f;
            for (long long p = 0; p < blocks; ++p) {
                sum_g += partials[(c * blocks + p) * 2];
                sum_gx += partials[(c * blocks + p) * 2 + 1];
            }
            grad_bias[c] = sum_g;
            grad_weight[c] = sum_gx;
        }
    }
}

// grid (voxel blocks, C, N) (elementwise_grid), block kThreads; reads x and dy once, writes
// dx once. Training: dx = w * invstd * (g - sum_g / M - xhat * sum_gx / M), M = N*S; eval (the
// statistics are constants): dx = w * invstd * g.
template <typename T>
NL_KERNEL void bn_relu_backward_input_kernel(const T* NL_RESTRICT x, const T* NL_RESTRICT dy,
                                             long long channels, long long s, float count, int training,
                                             const float* NL_RESTRICT mean,
                                             const float* NL_RESTRICT invstd,
                                             const float* NL_RESTRICT weight,
                                             const float* NL_RESTRICT bias,
                                             const float* NL_RESTRICT grad_bias,
                                             const float* NL_RESTRICT grad_weight, T* NL_RESTRICT dx) {
    const long long c = blockIdx.y, base = (static_cast<long long>(blockIdx.z) * channels + c) * s;
    const float centre = mean[c], inv = invstd[c], w = weight[c], b = bias[c], scale = inv * w;
    const float mean_g = training ? grad_bias[c] / count : 0.0f;
    const float mean_gx = training ? grad_weight[c] / count : 0.0f;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    NL_THREADS {
        for (long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; v < s; v += stride) {
            float centred = nl_load(x, base + v) - centre;
            float g = nl_keep_if(centred * scale + b > 0.0f, nl_load(dy, base + v));
            float xhat = centred * inv;
            nl_store(dx, base + v, w * inv * (g - mean_g - xhat * mean_gx));
        }
    }
}

// (ceil(S / kThreads) capped, C, N): one block row per (sample, channel), so a block reads its
// channel's constants once and no thread divides to find its channel.
dim3 elementwise_grid(long long n, long long c, long long s) {
    long long voxel_blocks = (s + kThreads - 1) / kThreads;
    return dim3(static_cast<unsigned>(voxel_blocks > 65535 ? 65535 : voxel_blocks), static_cast<unsigned>(c),
                static_cast<unsigned>(n));
}

unsigned channel_blocks(long long channels) {
    return static_cast<unsigned>((channels + kThreads - 1) / kThreads);
}

// Batch and channels within a grid's y and z (65,535), as elementwise_grid needs.
bool bad_shape(long long n, long long c, long long s) {
    return n < 1 || c < 1 || s < 1 || n > 65535 || c > 65535;
}

template <typename T>
int stats(const void* x, long long n, long long c, long long s, float eps, float momentum,
          float* running_mean, float* running_var, float* workspace, float* mean, float* invstd,
          void* stream) {
    long long blocks = reduction_blocks(n, s);
    NL_LAUNCH(bn_stats_partials_kernel<T>, dim3(static_cast<unsigned>(c), static_cast<unsigned>(blocks)),
              dim3(reduction_threads(n, s, blocks)), stream, static_cast<const T*>(x), n, c, s, workspace);
    NL_LAUNCH(bn_stats_finalize_kernel, dim3(channel_blocks(c)), dim3(kThreads), stream, workspace, c,
              blocks, eps, momentum, running_mean, running_var, mean, invstd);
    return NL_OK;
}

template <typename T>
int forward(const void* x, const void* residual, long long n, long long c, long long s, const float* mean,
            const float* invstd, const float* weight, const float* bias, void* y, void* stream) {
    NL_LAUNCH(bn_relu_forward_kernel<T>, elementwise_grid(n, c, s), dim3(kThreads), stream,
              static_cast<const T*>(x), static_cast<const T*>(residual), c, s, mean, invstd, weight, bias,
              static_cast<T*>(y));
    return NL_OK;
}

template <typename T>
int backward(const void* x, const void* dy, long long n, long long c, long long s, int training,
             const float* mean, const float* invstd, const float* weight, const float* bias,
             float* workspace, float* grad_weight, float* grad_bias, void* dx, void* stream) {
    long long blocks = reduction_blocks(n, s);
    NL_LAUNCH(bn_relu_backward_partials_kernel<T>,
              dim3(static_cast<unsigned>(c), static_cast<unsigned>(blocks)), dim3(reduction_threads(n, s, blocks)),
              stream, static_cast<const T*>(x), static_cast<const T*>(dy), n, c, s, mean, invstd, weight, bias,
              workspace);
    NL_LAUNCH(bn_backward_finalize_kernel, dim3(channel_blocks(c)), dim3(kThreads), stream, workspace, c,
              blocks, grad_bias, grad_weight);
    NL_LAUNCH(bn_relu_backward_input_kernel<T>, elementwise_grid(n, c, s), dim3(kThreads), stream,
              static_cast<const T*>(x), static_cast<const T*>(dy), c, s, static_cast<float>(n * s), training,
              mean, invstd, weight, bias, grad_bias, grad_weight, static_cast<T*>(dx));
    return NL_OK;
}

}  // namespace

extern "C" {

long long nl_bn_workspace_floats(long long n, long long c, long long s) {
    return c * reduction_blocks(n, s) * 3;
}

int nl_bn_stats(int dtype, const void* x, long long n, long long c, long long s, float eps, float momentum,
                float* running_mean, float* running_var, float* workspace, float* mean, float* invstd,
                void* stream) {
    if (bad_shape(n, c, s) || (running_mean == nullptr) != (running_var == nullptr)) return NL_BAD_ARGUMENT;
    if (dtype == NL_FLOAT32)
        return stats<float>(x, n, c, s, eps, momentum, running_mean, running_var, workspace, mean, invstd,
                            stream);
    if (dtype == NL_BFLOAT16)
        return stats<nl_bf16>(x, n, c, s, eps, momentum, running_mean, running_var, workspace, mean, invstd,
                              stream);
    return NL_BAD_ARGUMENT;
}

int nl_bn_relu_forward(int dtype, const void* x, const void* residual, long long n, long long c, long long s,
                       const float* mean, const float* invstd, const float* weight, const float* bias, void* y,
                       void* stream) {
    if (bad_shape(n, c, s)) return NL_BAD_ARGUMENT;
    if (dtype == NL_FLOAT32) return forward<float>(x, residual, n, c, s, mean, invstd, weight, bias, y, stream);
    if (dtype == NL_BFLOAT16)
        return forward<nl_bf16>(x, residual, n, c, s, mean, invstd, weight, bias, y, stream);
    return NL_BAD_ARGUMENT;
}

int nl_bn_relu_backward(int dtype, const void* x, const void* dy, long long n, long long c, long long s,
                        int training, const float* mean, const float* invstd, const float* weight,
                        const float* bias, float* workspace, float* grad_weight, float* grad_bias, void* dx,
                        void* stream) {
    if (bad_shape(n, c, s)) return NL_BAD_ARGUMENT;
    if (dtype == NL_FLOAT32)
        return backward<float>(x, dy, n, c, s, training, mean, invstd, weight, bias, workspace, grad_weight,
                               grad_bias, dx, stream);
    if (dtype == NL_BFLOAT16)
        return backward<nl_bf16>(x, dy, n, c, s, training, mean, invstd, weight, bias, workspace,
                                 grad_weight, grad_bias, dx, stream);
    return NL_BAD_ARGUMENT;
}

}  // extern "C"
