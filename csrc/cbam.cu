// CBAM attention, both variants of naslung/models/cbam.py, forward and backward, on NCDHW maps
// (N, C, S), S = D*H*W, stored in fp32 or bf16 with fp32 arithmetic; weights fp32.
//
//   avg, max   x pooled over voxels, per channel
//   nas-lung   w = softmax_c(fc2 fc1 avg + fc2 fc1 max)                  out = s * x + x
//   woo        w = sigmoid(fc2 relu(fc1 avg) + fc2 relu(fc1 max))        out = s * g
//   g = x * w (per channel), s = sigmoid(conv3x3x3([max_c g, mean_c g])) (per voxel)
//
// Forward: x read 3 times, out written once.
//   1. channel_pool_kernel          per (n, c) and chunk of voxels: sum, max, ties at the max
//   2. channel_mlp_kernel           per sample: chunks combined, the MLP, softmax or sigmoid -> w
//   3. spatial_pool_kernel          per voxel: max, mean and ties at the max of g over channels
//   4. spatial_gate_kernel          per voxel: the conv and the sigmoid -> s, then out
// Backward: x read 3 times, dout 2 (nas-lung) or 3 (woo) times, dx written once.
//   1. gate_grad_kernel             per voxel: dz = sum_c dout * (x or g) * s * (1 - s)
//   2. pool_grad_kernel             on the (N, S) maps, not x: the transposed conv of dz ->
//                                   gradients of [max, mean], pre-divided by the ties and by C
//   3. conv_grad_kernel             on the (N, 3, S) maps: per-block sums of dz * [max, mean]
//   4. channel_grad_kernel          per (n, c) and chunk of voxels: sum of dg * x, dg = dL/dg
//   5. channel_mlp_backward_kernel  per sample: dL/dw back through softmax or sigmoid and the MLP
//   6. weight_grad_kernel           fc1, fc2 and conv weight gradients, summed in order
//   7. input_grad_kernel            dx, elementwise
//
// Max pooling follows torch.amax: a gradient is split evenly between tied maxima, over voxels
// for the channel pool and over channels for the spatial pool (ReLU outputs make ties common).
// The backward finds the maxima again with the forward's own fp32 arithmetic (x, and x * w with
// the saved w), so they match exactly. Partial results are combined in a fixed order, never with
// atomics: a result does not depend on scheduling, and the host and CUDA builds sum in the same
// order (they still differ in the last bits: nvcc contracts a * b + c into FMAs, and expf).
#include "cbam.h"

#include <cmath>

#include "portable.h"

namespace {

constexpr int kThreads = 256;                 // threads per block, except conv_grad_kernel
constexpr int kConvGradThreads = 128;         // conv_grad_kernel: 54 sums per thread in shared
constexpr int kMaxChannels = 512;
constexpr int kMaxHidden = kMaxChannels / 4;
constexpr int kTaps = 27;                     // a 3x3x3 kernel
constexpr int kConvWeights = 2 * kTaps;       // [max, mean] -> one map
constexpr long long kPerThread = 8;           // elements per thread of a channel reduction, at least
constexpr long long kTargetBlocks = 1024;     // channel reductions split voxels into chunks up to this
constexpr long long kMaxChunks = 64;
constexpr long long kConvGradPerThread = 16;  // voxels per thread of conv_grad_kernel, at least
constexpr long long kMaxConvGradBlocks = 256;
constexpr long long kMaxBatch = 65535;        // the grid's y and z limit
constexpr long long kMaxVoxels = 1LL << 24;   // ties are counted exactly in fp32

NL_HOST_DEVICE long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }
NL_HOST_DEVICE long long min_ll(long long a, long long b) { return a < b ? a : b; }

NL_HOST_DEVICE float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// The larger of two (max, ties) pairs; equal maxima add their ties.
NL_HOST_DEVICE void merge_max(float& best, float& ties, float other, float other_ties) {
    if (other > best) {
        best = other;
        ties = other_ties;
    } else if (other == best) {
        ties += other_ties;
    }
}

// Tree reductions of values[0 .. kThreads), one value per thread, into values[0]. Phases: a whole
// block calls them, after the phase that wrote the values.
NL_DEVICE void block_sum(float* values) {
    for (unsigned half = kThreads / 2; half > 0; half /= 2) {
        NL_THREADS {
            if (threadIdx.x < half) values[threadIdx.x] += values[threadIdx.x + half];
        }
        nl_sync();
    }
}

NL_DEVICE void block_max(float* values) {
    for (unsigned half = kThreads / 2; half > 0; half /= 2) {
        NL_THREADS {
            if (threadIdx.x < half)
                values[threadIdx.x] = fmaxf(values[threadIdx.x], values[threadIdx.x + half]);
        }
        nl_sync();
    }
}

// Whether voxel (d, h, w) lies outside the map: the conv's zero padding.
NL_HOST_DEVICE bool outside(long long d, long long h, long long w, long long depth, long long height,
                            long long width) {
    return d < 0 || d >= depth || h < 0 || h >= height || w < 0 || w >= width;
}

// One sample's channel weights into shared memory; a phase and its barrier, for a whole block.
NL_DEVICE void load_channel_weights(const float* sample_weights, long long channels, float* sh_w) {
    NL_THREADS {
        for (long long c = threadIdx.x; c < channels; c += kThreads) sh_w[c] = sample_weights[c];
    }
    nl_sync();
}

// The 3^3 conv (zero padding) of the [max, mean] maps at voxel s: what s's gate is made of.
NL_HOST_DEVICE float conv_at(const float* max_map, const float* mean_map, const float* weights, long long s,
                             long long depth, long long height, long long width) {
    const long long d = s / (height * width), h = (s / width) % height, w = s % width;
    float z = 0.0f;
    for (int kd = 0; kd < 3; ++kd) {
        for (int kh = 0; kh < 3; ++kh) {
            for (int kw = 0; kw < 3; ++kw) {
                const long long nd = d + kd - 1, nh = h + kh - 1, nw = w + kw - 1;
                if (outside(nd, nh, nw, depth, height, width)) continue;
                const long long neighbour = (nd * height + nh) * width + nw;
                const int tap = kd * 9 + kh * 3 + kw;
                z += weights[tap] * max_map[neighbour] + weights[kTaps + tap] * mean_map[neighbour];
            }
        }
    }
    return z;
}

// The MLP's hidden layer for one sample, from its pooled vectors in shared memory: fc1 avg,
// fc1 max, and what fc2 takes (their sum; through ReLU for woo). One phase; a whole block calls it.
NL_DEVICE void mlp_hidden(const float* avg, const float* max, const float* fc1, long long channels,
                          long long hidden, int variant, float* h_avg, float* h_max, float* h_sum) {
    NL_THREADS {
        for (long long j = threadIdx.x; j < hidden; j += kThreads) {
            const float* row = fc1 + j * channels;
            float a = 0.0f, m = 0.0f;
            for (long long c = 0; c < channels; ++c) {
                a += row[c] * avg[c];
                m += row[c] * max[c];
            }
            h_avg[j] = a;
            h_max[j] = m;
            h_sum[j] = variant == NL_CBAM_WOO ? (a > 0.0f ? a : 0.0f) + (m > 0.0f ? m : 0.0f) : a + m;
        }
    }
    nl_sync();
}

// ------------------------------------------------------------------------------------ forward

// grid (row blocks, chunks), block kThreads, shared 3 x kThreads floats; reads x once.
// A row is one (n, c) channel's S voxels. A block takes kThreads / lanes rows, `lanes` threads
// each, over the p-th chunk of voxels: (sum, max, ties) into partials[(row * chunks + p) * 3 ...].
template <typename T>
NL_KERNEL void channel_pool_kernel(const T* NL_RESTRICT x, long long rows, long long voxels, long long lanes,
                                   long long chunk_len, float* NL_RESTRICT partials) {
    NL_SHARED float sh_sum[kThreads];
    NL_SHARED float sh_max[kThreads];
    NL_SHARED float sh_ties[kThreads];
    const long long chunks = gridDim.y, p = blockIdx.y;
    const long long first_row = static_cast<long long>(blockIdx.x) * (kThreads / lanes);
    const long long begin = p * chunk_len, end = min_ll(begin + chunk_len, voxels);
    NL_THREADS {
        const long long row = first_row + threadIdx.x / lanes, lane = threadIdx.x % lanes;
        float sum = 0.0f, best = -INFINITY, ties = 0.0f;
        if (row < rows) {
            for (long long j = begin + lane; j < end; j += lanes) {
                const float v = nl_load(x, row * voxels + j);
                sum += v;
                merge_max(best, ties, v, 1.0f);
            }
        }
        sh_sum[threadIdx.x] = sum;
        sh_max[threadIdx.x] = best;
        sh_ties[threadIdx.x] = ties;
    }
    nl_sync();
    for (long long half = lanes / 2; half > 0; half /= 2) {
        NL_THREADS {
            if (threadIdx.x % lanes < half) {
                const unsigned other = threadIdx.x + static_cast<unsigned>(half);
                sh_sum[threadIdx.x] += sh_sum[other];
                merge_max(sh_max[threadIdx.x], sh_ties[threadIdx.x], sh_max[other], sh_ties[other]);
            }
        }
        nl_sync();
    }
    NL_THREADS {
        const long long row = first_row + threadIdx.x / lanes;
        if (threadIdx.x % lanes == 0 && row < rows) {
            float* out = partials + (row * chunks + p) * 3;
            out[0] = sh_sum[threadIdx.x];
            out[1] = sh_max[threadIdx.x];
            out[2] = sh_ties[threadIdx.x];
        }
    }
}

// grid N, block kThreads, shared (3 x 512 + 3 x 128 + 2 x kThreads) floats; reads the channel
// pool partials once. One sample: its chunks combined in order into mean, max and ties
// (-> channel_stats), the MLP, then softmax (nas-lung) or sigmoid (woo) -> channel_weights.
NL_KERNEL void channel_mlp_kernel(const float* NL_RESTRICT partials, long long channels, long long hidden,
                                  long long voxels, long long chunks, int variant,
                                  const float* NL_RESTRICT fc1, const float* NL_RESTRICT fc2,
                                  float* NL_RESTRICT channel_stats, float* NL_RESTRICT channel_weights) {
    NL_SHARED float sh_avg[kMaxChannels];
    NL_SHARED float sh_max[kMaxChannels];
    NL_SHARED float sh_scores[kMaxChannels];
    NL_SHARED float sh_h_avg[kMaxHidden];
    NL_SHARED float sh_h_max[kMaxHidden];
    NL_SHARED float sh_hidden[kMaxHidden];
    NL_SHARED float sh_largest[kThreads];
    NL_SHARED float sh_total[kThreads];
    const long long n = blockIdx.x;
    float* stats = channel_stats + n * 3 * channels;
    float* weights = channel_weights + n * channels;
    NL_THREADS {
        for (long long c = threadIdx.x; c < channels; c += kThreads) {
            float sum = 0.0f, best = -INFINITY, ties = 0.0f;
            for (long long p = 0; p < chunks; ++p) {
                const float* part = partials + ((n * channels + c) * chunks + p) * 3;
                sum += part[0];
                merge_max(best, ties, part[1], part[2]);
            }
            sh_avg[c] = sum / static_cast<float>(voxels);
            sh_max[c] = best;
            stats[c] = sh_avg[c];
            stats[channels + c] = best;
            stats[2 * channels + c] = ties;
        }
    }
    nl_sync();
    mlp_hidden(sh_avg, sh_max, fc1, channels, hidden, variant, sh_h_avg, sh_h_max, sh_hidden);
    NL_THREADS {
        float largest = -INFINITY;
        for (long long c = threadIdx.x; c < channels; c += kThreads) {
            const float* row = fc2 + c * hidden;
            float score = 0.0f;
            for (long long j = 0; j < hidden; ++j) score += row[j] * sh_hidden[j];
            sh_scores[c] = score;
            largest = fmaxf(largest, score);
        }
        sh_largest[threadIdx.x] = largest;
    }
    nl_sync();
    if (variant == NL_CBAM_WOO) {
        NL_THREADS {
            for (long long c = threadIdx.x; c < channels; c += kThreads) weights[c] = sigmoid(sh_scores[c]);
        }
    } else {
        block_max(sh_largest);
        NL_THREADS {
            float total = 0.0f;
            for (long long c = threadIdx.x; c < channels; c += kThreads) {
                sh_scores[c] = expf(sh_scores[c] - sh_largest[0]);
                total += sh_scores[c];
            }
            sh_total[threadIdx.x] = total;
        }
        nl_sync();
        block_sum(sh_total);
        NL_THREADS {
            for (long long c = threadIdx.x; c < channels; c += kThreads)
                weights[c] = sh_scores[c] / sh_total[0];
        }
    }
}

// grid (ceil(S / tile), N), block kThreads, shared (512 + 3 x kThreads) floats; reads x once.
// `tile` voxels per block and kThreads / tile threads per voxel, each over every
// (kThreads / tile)-th channel: max, mean and ties at the max of g = x * w -> spatial_stats.
template <typename T>
NL_KERNEL void spatial_pool_kernel(const T* NL_RESTRICT x, const float* NL_RESTRICT channel_weights,
                                   long long channels, long long voxels, long long tile,
                                   float* NL_RESTRICT spatial_stats) {
    NL_SHARED float sh_w[kMaxChannels];
    NL_SHARED float sh_sum[kThreads];
    NL_SHARED float sh_max[kThreads];
    NL_SHARED float sh_ties[kThreads];
    const long long n = blockIdx.y, groups = kThreads / tile;
    const long long first_voxel = static_cast<long long>(blockIdx.x) * tile;
    load_channel_weights(channel_weights + n * channels, channels, sh_w);
    NL_THREADS {
        const long long s = first_voxel + threadIdx.x % tile;
        float sum = 0.0f, best = -INFINITY, ties = 0.0f;
        if (s < voxels) {
            for (long long c = threadIdx.x / tile; c < channels; c += groups) {
                const float g = nl_load(x, (n * channels + c) * voxels + s) * sh_w[c];
                sum += g;
                merge_max(best, ties, g, 1.0f);
            }
        }
        sh_sum[threadIdx.x] = sum;
        sh_max[threadIdx.x] = best;
        sh_ties[threadIdx.x] = ties;
    }
    nl_sync();
    for (long long half = groups / 2; half > 0; half /= 2) {
        NL_THREADS {
            if (threadIdx.x < half * tile) {
                const unsigned other = threadIdx.x + static_cast<unsigned>(half * tile);
                sh_sum[threadIdx.x] += sh_sum[other];
                merge_max(sh_max[threadIdx.x], sh_ties[threadIdx.x], sh_max[other], sh_ties[other]);
            }
        }
        nl_sync();
    }
    NL_THREADS {
        const long long s = first_voxel + threadIdx.x;
        if (threadIdx.x < tile && s < voxels) {
            float* stats = spatial_stats + n * 3 * voxels;
            stats[s] = sh_max[threadIdx.x];
            stats[voxels + s] = sh_sum[threadIdx.x] / static_cast<float>(channels);
            stats[2 * voxels + s] = sh_ties[threadIdx.x];
        }
    }
}

// grid (ceil(S / tile), N), block kThreads, shared (512 + 54 + kThreads) floats; reads x once,
// writes out once. The first `tile` threads compute their voxel's gate s (-> gate), then every
// thread writes out = s * x + x (nas-lung) or s * x * w (woo) over its share of the channels.
template <typename T>
NL_KERNEL void spatial_gate_kernel(const T* NL_RESTRICT x, const float* NL_RESTRICT channel_weights,
                                   const float* NL_RESTRICT spatial_stats,
                                   const float* NL_RESTRICT conv_weight, long long channels, long long depth,
                                   long long height, long long width, long long tile, int variant,
                                   float* NL_RESTRICT gate, T* NL_RESTRICT out) {
    NL_SHARED float sh_w[kMaxChannels];
    NL_SHARED float sh_conv[kConvWeights];
    NL_SHARED float sh_gate[kThreads];
    const long long n = blockIdx.y, groups = kThreads / tile, voxels = depth * height * width;
    const long long first_voxel = static_cast<long long>(blockIdx.x) * tile;
    load_channel_weights(channel_weights + n * channels, channels, sh_w);
    NL_THREADS {
        if (threadIdx.x < kConvWeights) sh_conv[threadIdx.x] = conv_weight[threadIdx.x];
    }
    nl_sync();
    NL_THREADS {
        const long long s = first_voxel + threadIdx.x;
        if (threadIdx.x < tile && s < voxels) {
            const float* stats = spatial_stats + n * 3 * voxels;
            const float z = conv_at(stats, stats + voxels, sh_conv, s, depth, height, width);
            sh_gate[threadIdx.x] = sigmoid(z);
            gate[n * voxels + s] = sh_gate[threadIdx.x];
        }
    }
    nl_sync();
    NL_THREADS {
        const long long s = first_voxel + threadIdx.x % tile;
        if (s < voxels) {
            const float a = sh_gate[threadIdx.x % tile];
            for (long long c = threadIdx.x / tile; c < channels; c += groups) {
                const long long i = (n * channels + c) * voxels + s;
                const float v = nl_load(x, i);
                nl_store(out, i, variant == NL_CBAM_WOO ? a * (v * sh_w[c]) : a * v + v);
            }
        }
    }
}

// ----------------------------------------------------------------------------------- backward

// grid (ceil(S / tile), N), block kThreads, shared (512 + kThreads) floats; reads x and dout
// once. Threads as in spatial_pool_kernel: dz = sum_c dout * (x or g) * s * (1 - s), the
// gradient of the conv's output -> gate_grads (N, S).
template <typename T>
NL_KERNEL void gate_grad_kernel(const T* NL_RESTRICT x, const T* NL_RESTRICT dout,
                                const float* NL_RESTRICT channel_weights, const float* NL_RESTRICT gate,
                                long long channels, long long voxels, long long tile, int variant,
                                float* NL_RESTRICT gate_grads) {
    NL_SHARED float sh_w[kMaxChannels];
    NL_SHARED float sh_sum[kThreads];
    const long long n = blockIdx.y, groups = kThreads / tile;
    const long long first_voxel = static_cast<long long>(blockIdx.x) * tile;
    load_channel_weights(channel_weights + n * channels, channels, sh_w);
    NL_THREADS {
        const long long s = first_voxel + threadIdx.x % tile;
        float sum = 0.0f;
        if (s < voxels) {
            for (long long c = threadIdx.x / tile; c < channels; c += groups) {
                const long long i = (n * channels + c) * voxels + s;
                const float v = nl_load(x, i);
                sum += nl_load(dout, i) * (variant == NL_CBAM_WOO ? v * sh_w[c] : v);
            }
        }
        sh_sum[threadIdx.x] = sum;
    }
    nl_sync();
    for (long long half = groups / 2; half > 0; half /= 2) {
        NL_THREADS {
            if (threadIdx.x < half * tile) sh_sum[threadIdx.x] += sh_sum[threadIdx.x + half * tile];
        }
        nl_sync();
    }
    NL_THREADS {
        const long long s = first_voxel + threadIdx.x;
        if (threadIdx.x < tile && s < voxels) {
            const float a = gate[n * voxels + s];
            gate_grads[n * voxels + s] = sh_sum[threadIdx.x] * a * (1.0f - a);
        }
    }
}

// grid (ceil(S / kThreads), N), block kThreads, shared 54 floats; reads the (N, S) maps, not x. Per voxel, the
// transposed conv of dz: the gradient of the max map divided by the voxel's ties, and of the
// mean map divided by C -> pool_grads (N, 2, S); what every channel at the max (resp. every
// channel) of g receives.
NL_KERNEL void pool_grad_kernel(const float* NL_RESTRICT gate_grads, const float* NL_RESTRICT spatial_stats,
                                const float* NL_RESTRICT conv_weight, long long channels, long long depth,
                                long long height, long long width, float* NL_RESTRICT pool_grads) {
    NL_SHARED float sh_conv[kConvWeights];
    const long long n = blockIdx.y, voxels = depth * height * width;
    NL_THREADS {
        if (threadIdx.x < kConvWeights) sh_conv[threadIdx.x] = conv_weight[threadIdx.x];
    }
    nl_sync();
    NL_THREADS {
        const long long s = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
        if (s < voxels) {
            const long long d = s / (height * width), h = (s / width) % height, w = s % width;
            const float* dz = gate_grads + n * voxels;
            float grad_max = 0.0f, grad_mean = 0.0f;
            for (int kd = 0; kd < 3; ++kd) {
                for (int kh = 0; kh < 3; ++kh) {
                    for (int kw = 0; kw < 3; ++kw) {
                        // the conv centre whose tap (kd, kh, kw) reads voxel s
                        const long long md = d - kd + 1, mh = h - kh + 1, mw = w - kw + 1;
                        if (outside(md, mh, mw, depth, height, width)) continue;
                        const float source = dz[(md * height + mh) * width + mw];
                        const int tap = kd * 9 + kh * 3 + kw;
                        grad_max += sh_conv[tap] * source;
                        grad_mean += sh_conv[kTaps + tap] * source;
                    }
                }
            }
            const float ties = spatial_stats[n * 3 * voxels + 2 * voxels + s];
            pool_grads[n * 2 * voxels + s] = grad_max / ties;
            pool_grads[n * 2 * voxels + voxels + s] = grad_mean / static_cast<float>(channels);
        }
    }
}

// grid conv blocks, block kConvGradThreads, shared 54 x kConvGradThreads floats; reads the
// (N, 3, S) pooled maps, not x.
// Block b takes the b-th chunk of the N*S voxels; each thread sums dz * [max, mean](neighbour)
// per tap over its voxels, then thread t < 54 sums weight t over the threads in order -> one
// row of 54 partial sums of the conv weight gradient per block.
NL_KERNEL void conv_grad_kernel(const float* NL_RESTRICT gate_grads, const float* NL_RESTRICT spatial_stats,
                                long long total, long long depth, long long height, long long width,
                                long long chunk_len, float* NL_RESTRICT rows) {
    NL_SHARED float sh_sums[kConvGradThreads * kConvWeights];
    const long long voxels = depth * height * width;
    const long long begin = static_cast<long long>(blockIdx.x) * chunk_len;
    const long long end = min_ll(begin + chunk_len, total);
    NL_THREADS {
        float sums[kConvWeights] = {};
        for (long long i = begin + threadIdx.x; i < end; i += kConvGradThreads) {
            const long long n = i / voxels, s = i % voxels;
            const long long d = s / (height * width), h = (s / width) % height, w = s % width;
            const float dz = gate_grads[i];
            const float* stats = spatial_stats + n * 3 * voxels;
            for (int kd = 0; kd < 3; ++kd) {
                for (int kh = 0; kh < 3; ++kh) {
                    for (int kw = 0; kw < 3; ++kw) {
                        const long long nd = d + kd - 1, nh = h + kh - 1, nw = w + kw - 1;
                        if (outside(nd, nh, nw, depth, height, width)) continue;
                        const long long neighbour = (nd * height + nh) * width + nw;
                        const int tap = kd * 9 + kh * 3 + kw;
                        sums[tap] += dz * stats[neighbour];
                        sums[kTaps + tap] += dz * stats[voxels + neighbour];
                    }
                }
            }
        }
        for (int k = 0; k < kConvWeights; ++k) sh_sums[threadIdx.x * kConvWeights + k] = sums[k];
    }
    nl_sync();
    NL_THREADS {
        if (threadIdx.x < kConvWeights) {
            float sum = 0.0f;
            for (int t = 0; t < kConvGradThreads; ++t) sum += sh_sums[t * kConvWeights + threadIdx.x];
            rows[static_cast<long long>(blockIdx.x) * kConvWeights + threadIdx.x] = sum;
        }
    }
}

// grid (row blocks, chunks), block kThreads, shared kThreads floats; reads x once (and dout for
// woo). Rows and lanes as in channel_pool_kernel: the sum of dg * x over the p-th chunk of a
// channel's voxels, dg = dL/dg = pool grads (+ s * dout for woo) -> partials[row * chunks + p].
template <typename T>
NL_KERNEL void channel_grad_kernel(const T* NL_RESTRICT x, const T* NL_RESTRICT dout,
                                   const float* NL_RESTRICT channel_weights,
                                   const float* NL_RESTRICT spatial_stats,
                                   const float* NL_RESTRICT pool_grads, const float* NL_RESTRICT gate,
                                   long long channels, long long rows,
                                   long long voxels, long long lanes, long long chunk_len, int variant,
                                   float* NL_RESTRICT partials) {
    NL_SHARED float sh_sum[kThreads];
    const long long chunks = gridDim.y, p = blockIdx.y;
    const long long first_row = static_cast<long long>(blockIdx.x) * (kThreads / lanes);
    const long long begin = p * chunk_len, end = min_ll(begin + chunk_len, voxels);
    NL_THREADS {
        const long long row = first_row + threadIdx.x / lanes, lane = threadIdx.x % lanes;
        float sum = 0.0f;
        if (row < rows) {
            const long long n = row / channels;
            const float w = channel_weights[row];
            const float* g_max = spatial_stats + n * 3 * voxels;
            const float* grad_max = pool_grads + n * 2 * voxels;
            const float* grad_mean = grad_max + voxels;
            for (long long j = begin + lane; j < end; j += lanes) {
                const float v = nl_load(x, row * voxels + j);
                float dg = grad_mean[j] + (v * w == g_max[j] ? grad_max[j] : 0.0f);
                if (variant == NL_CBAM_WOO) dg += gate[n * voxels + j] * nl_load(dout, row * voxels + j);
                sum += dg * v;
            }
        }
        sh_sum[threadIdx.x] = sum;
    }
    nl_sync();
    for (long long half = lanes / 2; half > 0; half /= 2) {
        NL_THREADS {
            if (threadIdx.x % lanes < half) sh_sum[threadIdx.x] += sh_sum[threadIdx.x + half];
        }
        nl_sync();
    }
    NL_THREADS {
        const long long row = first_row + threadIdx.x / lanes;
        if (threadIdx.x % lanes == 0 && row < rows) partials[row * chunks + p] = sh_sum[threadIdx.x];
    }
}

// grid N, block kThreads, shared (4 x 512 + 5 x 128 + kThreads) floats; reads the channel grad
// partials once. One sample: dL/dw (its chunks summed in order), back through softmax or
// sigmoid (-> score_grads), fc2 and the ReLU (-> hidden_grads for avg and max, and the hidden
// layer itself -> hidden_values, for the weight gradients), and fc1 -> channel_grads (N, 2, C):
// the gradients of the mean divided by S, of the max divided by its ties.
NL_KERNEL void channel_mlp_backward_kernel(const float* NL_RESTRICT partials, long long channels,
                                           long long hidden, long long voxels, long long chunks, int variant,
                                           const float* NL_RESTRICT fc1, const float* NL_RESTRICT fc2,
                                           const float* NL_RESTRICT channel_weights,
                                           const float* NL_RESTRICT channel_stats,
                                           float* NL_RESTRICT channel_grads,
                                           float* NL_RESTRICT score_grads, float* NL_RESTRICT hidden_grads,
                                           float* NL_RESTRICT hidden_values) {
    NL_SHARED float sh_avg[kMaxChannels];
    NL_SHARED float sh_max[kMaxChannels];
    NL_SHARED float sh_w[kMaxChannels];
    NL_SHARED float sh_dscores[kMaxChannels];
    NL_SHARED float sh_h_avg[kMaxHidden];
    NL_SHARED float sh_h_max[kMaxHidden];
    NL_SHARED float sh_hidden[kMaxHidden];
    NL_SHARED float sh_dh_avg[kMaxHidden];
    NL_SHARED float sh_dh_max[kMaxHidden];
    NL_SHARED float sh_dot[kThreads];
    const long long n = blockIdx.x;
    const float* stats = channel_stats + n * 3 * channels;
    NL_THREADS {
        float dot = 0.0f;
        for (long long c = threadIdx.x; c < channels; c += kThreads) {
            float dw = 0.0f;
            for (long long p = 0; p < chunks; ++p) dw += partials[(n * channels + c) * chunks + p];
            const float w = channel_weights[n * channels + c];
            sh_w[c] = w;
            sh_avg[c] = stats[c];
            sh_max[c] = stats[channels + c];
            sh_dscores[c] = variant == NL_CBAM_WOO ? dw * w * (1.0f - w) : dw;
            dot += dw * w;
        }
        sh_dot[threadIdx.x] = dot;
    }
    nl_sync();
    mlp_hidden(sh_avg, sh_max, fc1, channels, hidden, variant, sh_h_avg, sh_h_max, sh_hidden);
    if (variant == NL_CBAM_NAS_LUNG) {  // softmax: dscore_c = w_c (dw_c - sum_k dw_k w_k)
        block_sum(sh_dot);
        NL_THREADS {
            for (long long c = threadIdx.x; c < channels; c += kThreads)
                sh_dscores[c] = sh_w[c] * (sh_dscores[c] - sh_dot[0]);
        }
        nl_sync();
    }
    NL_THREADS {
        for (long long c = threadIdx.x; c < channels; c += kThreads)
            score_grads[n * channels + c] = sh_dscores[c];
        for (long long j = threadIdx.x; j < hidden; j += kThreads) {
            float dh = 0.0f;
            for (long long c = 0; c < channels; ++c) dh += sh_dscores[c] * fc2[c * hidden + j];
            const bool woo = variant == NL_CBAM_WOO;
            sh_dh_avg[j] = !woo || sh_h_avg[j] > 0.0f ? dh : 0.0f;
            sh_dh_max[j] = !woo || sh_h_max[j] > 0.0f ? dh : 0.0f;
            hidden_grads[n * 2 * hidden + j] = sh_dh_avg[j];
            hidden_grads[n * 2 * hidden + hidden + j] = sh_dh_max[j];
            hidden_values[n * hidden + j] = sh_hidden[j];
        }
    }
    nl_sync();
    NL_THREADS {
        for (long long c = threadIdx.x; c < channels; c += kThreads) {
            float grad_avg = 0.0f, grad_max = 0.0f;
            for (long long j = 0; j < hidden; ++j) {
                grad_avg += sh_dh_avg[j] * fc1[j * channels + c];
                grad_max += sh_dh_max[j] * fc1[j * channels + c];
            }
            channel_grads[n * 2 * channels + c] = grad_avg / static_cast<float>(voxels);
            channel_grads[n * 2 * channels + channels + c] = grad_max / stats[2 * channels + c];
        }
    }
}

// grid ceil((2 H C + 54) / kThreads), block kThreads, no shared memory; one thread per weight:
// fc1[j, c] = sum_n (dh_avg[n, j] avg[n, c] + dh_max[n, j] max[n, c]) and
// fc2[c, j] = sum_n dscore[n, c] hidden[n, j], the samples in order; the conv weights, the
// conv_grad_kernel rows in order.
NL_KERNEL void weight_grad_kernel(const float* NL_RESTRICT channel_stats,
                                  const float* NL_RESTRICT score_grads, const float* NL_RESTRICT hidden_grads,
                                  const float* NL_RESTRICT hidden_values,
                                  const float* NL_RESTRICT conv_rows, long long batch, long long channels,
                                  long long hidden, long long conv_blocks, float* NL_RESTRICT grad_fc1,
                                  float* NL_RESTRICT grad_fc2, float* NL_RESTRICT grad_conv) {
    NL_THREADS {
        const long long e = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
        const long long fc = hidden * channels;
        float sum = 0.0f;
        if (e < fc) {
            const long long j = e / channels, c = e % channels;
            for (long long n = 0; n < batch; ++n) {
                const float* stats = channel_stats + n * 3 * channels;
                const float* dh = hidden_grads + n * 2 * hidden;
                sum += dh[j] * stats[c] + dh[hidden + j] * stats[channels + c];
            }
            grad_fc1[e] = sum;
        } else if (e < 2 * fc) {
            const long long c = (e - fc) / hidden, j = (e - fc) % hidden;
            for (long long n = 0; n < batch; ++n)
                sum += score_grads[n * channels + c] * hidden_values[n * hidden + j];
            grad_fc2[e - fc] = sum;
        } else if (e < 2 * fc + kConvWeights) {
            const long long k = e - 2 * fc;
            for (long long b = 0; b < conv_blocks; ++b) sum += conv_rows[b * kConvWeights + k];
            grad_conv[k] = sum;
        }
    }
}

// grid (ceil(S / kThreads), C, N), block kThreads, no shared memory; reads x and dout once,
// writes dx once: the gate's, the spatial pool's and the channel pool's terms.
template <typename T>
NL_KERNEL void input_grad_kernel(const T* NL_RESTRICT x, const T* NL_RESTRICT dout,
                                 const float* NL_RESTRICT channel_weights,
                                 const float* NL_RESTRICT channel_stats,
                                 const float* NL_RESTRICT channel_grads,
                                 const float* NL_RESTRICT spatial_stats,
                                 const float* NL_RESTRICT pool_grads,
                                 const float* NL_RESTRICT gate,
                                 long long channels, long long voxels, int variant, T* NL_RESTRICT dx) {
    const long long c = blockIdx.y, n = blockIdx.z, row = n * channels + c;
    NL_THREADS {
        const long long s = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
        if (s < voxels) {
            const long long i = row * voxels + s;
            const float v = nl_load(x, i), dy = nl_load(dout, i), w = channel_weights[row];
            const float a = gate[n * voxels + s];
            const float* grad_pool = pool_grads + n * 2 * voxels;
            const float dg = grad_pool[voxels + s] +
                             (v * w == spatial_stats[n * 3 * voxels + s] ? grad_pool[s] : 0.0f);
            float grad = variant == NL_CBAM_WOO ? (a * dy + dg) * w : dy * (a + 1.0f) + dg * w;
            const float* grad_channel = channel_grads + n * 2 * channels;
            grad += grad_channel[c];
            if (v == channel_stats[n * 3 * channels + channels + c]) grad += grad_channel[channels + c];
            nl_store(dx, i, grad);
        }
    }
}

// ------------------------------------------------------------------------------------ host side

// Launch geometry and workspace layout of one (N, C, D, H, W).
struct Plan {
    long long batch, channels, hidden, depth, height, width, voxels;
    long long lanes, row_blocks, chunks, chunk_len;  // channel_pool_kernel, channel_grad_kernel
    long long tile;                                  // voxels per block of the per-voxel kernels
    long long conv_blocks, conv_chunk_len;           // conv_grad_kernel
};

long long power_of_two_at_least(long long v, long long cap) {
    long long p = 1;
    while (p < v && p < cap) p *= 2;
    return p;
}

bool bad_shape(long long n, long long c, long long d, long long h, long long w) {
    if (n < 1 || n > kMaxBatch || c < 1 || c > kMaxChannels || d < 1 || h < 1 || w < 1) return true;
    // d * h first: each side may be up to 2^24, and d * h * w could overflow before the test.
    return d > kMaxVoxels || h > kMaxVoxels || w > kMaxVoxels || d * h > kMaxVoxels || d * h * w > kMaxVoxels;
}

Plan make_plan(long long n, long long c, long long d, long long h, long long w) {
    Plan plan{};
    plan.batch = n;
    plan.channels = c;
    plan.hidden = c / 4;
    plan.depth = d;
    plan.height = h;
    plan.width = w;
    plan.voxels = d * h * w;
    // Channel reductions: about kPerThread voxels per thread, several channels per block on
    // small maps, chunks of voxels until about kTargetBlocks blocks run.
    plan.lanes = power_of_two_at_least(ceil_div(plan.voxels, kPerThread), kThreads);
    plan.row_blocks = ceil_div(n * c, kThreads / plan.lanes);
    long long chunks = min_ll(ceil_div(plan.voxels, plan.lanes * kPerThread),
                              ceil_div(kTargetBlocks, plan.row_blocks));
    chunks = chunks < 1 ? 1 : min_ll(chunks, kMaxChunks);
    plan.chunk_len = ceil_div(plan.voxels, chunks);
    plan.chunks = ceil_div(plan.voxels, plan.chunk_len);
    plan.tile = power_of_two_at_least(plan.voxels, kThreads);
    long long conv_blocks = ceil_div(n * plan.voxels, kConvGradThreads * kConvGradPerThread);
    conv_blocks = min_ll(conv_blocks, kMaxConvGradBlocks);
    plan.conv_chunk_len = ceil_div(n * plan.voxels, conv_blocks);
    plan.conv_blocks = ceil_div(n * plan.voxels, plan.conv_chunk_len);
    return plan;
}

// Where each of the backward's workspace arrays starts, in floats, and the total.
struct BackwardWorkspace {
    long long gate_grads;     // (N, S)
    long long pool_grads;     // (N, 2, S)
    long long conv_rows;      // (conv blocks, 54)
    long long partials;       // (N * C, chunks)
    long long channel_grads;  // (N, 2, C)
    long long score_grads;    // (N, C)
    long long hidden_grads;   // (N, 2, H)
    long long hidden_values;  // (N, H)
    long long total;
};

BackwardWorkspace backward_workspace(const Plan& plan) {
    const long long ns = plan.batch * plan.voxels, nc = plan.batch * plan.channels;
    const long long nh = plan.batch * plan.hidden;
    BackwardWorkspace ws{};
    ws.gate_grads = 0;
    ws.pool_grads = ws.gate_grads + ns;
    ws.conv_rows = ws.pool_grads + 2 * ns;
    ws.partials = ws.conv_rows + plan.conv_blocks * kConvWeights;
    ws.channel_grads = ws.partials + nc * plan.chunks;
    ws.score_grads = ws.channel_grads + 2 * nc;
    ws.hidden_grads = ws.score_grads + nc;
    ws.hidden_values = ws.hidden_grads + 2 * nh;
    ws.total = ws.hidden_values + nh;
    return ws;
}

unsigned u32(long long v) { return static_cast<unsigned>(v); }

template <typename T>
int forward(const Plan& p, int variant, const void* x_in, const float* fc1, const float* fc2,
            const float* conv_weight, float* workspace, float* channel_weights, float* channel_stats,
            float* spatial_stats, float* gate, void* out, void* stream) {
    const T* x = static_cast<const T*>(x_in);
    const dim3 voxel_grid(u32(ceil_div(p.voxels, p.tile)), u32(p.batch));
    NL_LAUNCH(channel_pool_kernel<T>, dim3(u32(p.row_blocks), u32(p.chunks)), dim3(kThreads), stream, x,
              p.batch * p.channels, p.voxels, p.lanes, p.chunk_len, workspace);
    NL_LAUNCH(channel_mlp_kernel, dim3(u32(p.batch)), dim3(kThreads), stream, workspace, p.channels, p.hidden,
              p.voxels, p.chunks, variant, fc1, fc2, channel_stats, channel_weights);
    NL_LAUNCH(spatial_pool_kernel<T>, voxel_grid, dim3(kThreads), stream, x, channel_weights, p.channels,
              p.voxels, p.tile, spatial_stats);
    NL_LAUNCH(spatial_gate_kernel<T>, voxel_grid, dim3(kThreads), stream, x, channel_weights, spatial_stats,
              conv_weight, p.channels, p.depth, p.height, p.width, p.tile, variant, gate,
              static_cast<T*>(out));
    return NL_OK;
}

template <typename T>
int backward(const Plan& p, int variant, const void* x_in, const void* dout_in, const float* fc1,
             const float* fc2, const float* conv_weight, const float* channel_weights,
             const float* channel_stats, const float* spatial_stats, const float* gate, float* workspace,
             float* grad_fc1, float* grad_fc2, float* grad_conv_weight, void* dx, void* stream) {
    const T* x = static_cast<const T*>(x_in);
    const T* dout = static_cast<const T*>(dout_in);
    const BackwardWorkspace at = backward_workspace(p);
    float* gate_grads = workspace + at.gate_grads;
    float* pool_grads = workspace + at.pool_grads;
    float* conv_rows = workspace + at.conv_rows;
    float* partials = workspace + at.partials;
    float* channel_grads = workspace + at.channel_grads;
    float* score_grads = workspace + at.score_grads;
    float* hidden_grads = workspace + at.hidden_grads;
    float* hidden_values = workspace + at.hidden_values;
    const dim3 voxel_grid(u32(ceil_div(p.voxels, p.tile)), u32(p.batch));
    NL_LAUNCH(gate_grad_kernel<T>, voxel_grid, dim3(kThreads), stream, x, dout, channel_weights, gate,
              p.channels, p.voxels, p.tile, variant, gate_grads);
    NL_LAUNCH(pool_grad_kernel, dim3(u32(ceil_div(p.voxels, kThreads)), u32(p.batch)), dim3(kThreads), stream,
              gate_grads, spatial_stats, conv_weight, p.channels, p.depth, p.height, p.width, pool_grads);
    NL_LAUNCH(conv_grad_kernel, dim3(u32(p.conv_blocks)), dim3(kConvGradThreads), stream, gate_grads,
              spatial_stats, p.batch * p.voxels, p.depth, p.height, p.width, p.conv_chunk_len, conv_rows);
    NL_LAUNCH(channel_grad_kernel<T>, dim3(u32(p.row_blocks), u32(p.chunks)), dim3(kThreads), stream, x, dout,
              channel_weights, spatial_stats, pool_grads, gate, p.channels, p.batch * p.channels, p.voxels,
              p.lanes, p.chunk_len, variant, partials);
    NL_LAUNCH(channel_mlp_backward_kernel, dim3(u32(p.batch)), dim3(kThreads), stream, partials, p.channels,
              p.hidden, p.voxels, p.chunks, variant, fc1, fc2, channel_weights, channel_stats, channel_grads,
              score_grads, hidden_grads, hidden_values);
    NL_LAUNCH(weight_grad_kernel, dim3(u32(ceil_div(2 * p.hidden * p.channels + kConvWeights, kThreads))),
              dim3(kThreads), stream, channel_stats, score_grads, hidden_grads, hidden_values,
              conv_rows, p.batch, p.channels, p.hidden, p.conv_blocks, grad_fc1, grad_fc2, grad_conv_weight);
    NL_LAUNCH(input_grad_kernel<T>, dim3(u32(ceil_div(p.voxels, kThreads)), u32(p.channels), u32(p.batch)),
              dim3(kThreads), stream, x, dout, channel_weights, channel_stats, channel_grads, spatial_stats,
              pool_grads, gate, p.channels, p.voxels, variant, static_cast<T*>(dx));
    return NL_OK;
}

bool bad_variant(int variant) { return variant != NL_CBAM_NAS_LUNG && variant != NL_CBAM_WOO; }

}  // namespace

extern "C" {

long long nl_cbam_forward_workspace_floats(long long n, long long c, long long d, long long h, long long w) {
    if (bad_shape(n, c, d, h, w)) return 0;
    const Plan plan = make_plan(n, c, d, h, w);
    return n * c * plan.chunks * 3;
}

long long nl_cbam_backward_workspace_floats(long long n, long long c, long long d, long long h, long long w) {
    if (bad_shape(n, c, d, h, w)) return 0;
    return backward_workspace(make_plan(n, c, d, h, w)).total;
}

int nl_cbam_forward(int dtype, int variant, const void* x, long long n, long long c, long long d,
                    long long h, long long w, const float* fc1, const float* fc2, const float* conv_weight,
                    float* workspace, float* channel_weights, float* channel_stats, float* spatial_stats,
                    float* gate, void* out, void* stream) {
    if (bad_shape(n, c, d, h, w) || bad_variant(variant)) return NL_BAD_ARGUMENT;
    const Plan plan = make_plan(n, c, d, h, w);
    if (dtype == NL_FLOAT32)
        return forward<float>(plan, variant, x, fc1, fc2, conv_weight, workspace, channel_weights,
                              channel_stats, spatial_stats, gate, out, stream);
    if (dtype == NL_BFLOAT16)
        return forward<nl_bf16>(plan, variant, x, fc1, fc2, conv_weight, workspace, channel_weights,
                                channel_stats, spatial_stats, gate, out, stream);
    return NL_BAD_ARGUMENT;
}

int nl_cbam_backward(int dtype, int variant, const void* x, const void* dout, long long n, long long c,
                     long long d, long long h, long long w, const float* fc1, const float* fc2,
                     const float* conv_weight, const float* channel_weights, const float* channel_stats,
                     const float* spatial_stats, const float* gate, float* workspace, float* grad_fc1,
                     float* grad_fc2, float* grad_conv_weight, void* dx, void* stream) {
    if (bad_shape(n, c, d, h, w) || bad_variant(variant)) return NL_BAD_ARGUMENT;
    const Plan plan = make_plan(n, c, d, h, w);
    if (dtype == NL_FLOAT32)
        return backward<float>(plan, variant, x, dout, fc1, fc2, conv_weight, channel_weights,
                               channel_stats, spatial_stats, gate, workspace, grad_fc1, grad_fc2,
                               grad_conv_weight, dx, stream);
    if (dtype == NL_BFLOAT16)
        return backward<nl_bf16>(plan, variant, x, dout, fc1, fc2, conv_weight, channel_weights,
                                 channel_stats, spatial_stats, gate, workspace, grad_fc1, grad_fc2,
                                 grad_conv_weight, dx, stream);
    return NL_BAD_ARGUMENT;
}

}  // extern "C"
