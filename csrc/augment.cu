// A training batch in one launch: each sample's crop gathered from the int16 crop store at a
// random shift, flipped on the three axes at random, HU-windowed and standardised, a random
// cube zeroed, written straight into the (N, 1, crop, crop, crop) fp32 or bf16 batch.
//
// The randomness is Philox4x32-10 (philox.h) keyed by the seed, counted by (step, sample), and
// mapped to integers without floating point (the mapping is in augment.h); the normalisation
// is one fp32 subtraction and one IEEE division. So the host and CUDA builds of this file give
// the same bits for the same arguments, and a batch depends on (seed, step) alone, not on the
// order in which blocks run.
#include "augment.h"
#include "philox.h"
#include "portable.h"

namespace {

constexpr int kThreads = 256;            // threads per block of both kernels
constexpr long long kMaxGridY = 65535;   // CUDA's limit on gridDim.y
constexpr int kMaxCrop = 1290;           // the largest crop whose voxel count, rounded up to whole
                                         // blocks, fits in an int (1290^3 < 2^31 - 256)

// The store's spatial sides and the augmentation's sizes: all the draws depend on.
struct CropGeometry {
    long long side[3];  // d, h, w of every volume in the store
    int crop;           // side of the output cube
    int shift;          // largest displacement of the crop from the centre, per axis
    int flip;           // whether the three axes flip at random
    int zero_out;       // side of the zeroed cube; 0 for none
};

// HU window and training-set statistics: x' = (clamp(hu, hu_min, hu_max) - mean) / std.
struct Window {
    float hu_min, hu_max, mean, std;
};

// One sample's draws, per axis z, y, x: the crop's corner in its volume, whether the axis is
// flipped, the zeroed cube's corner in the output crop.
struct SampleDraws {
    int start[3];
    int flip[3];
    int corner[3];
};
constexpr int kDrawsPerSample = 9;

// What every thread of a block needs of the sample it fills, set by thread 0.
struct SampleSource {
    SampleDraws draws;
    long long volume_offset;  // where the sample's volume starts in the store; -1 for a bad index
};

// The draws of sample ``sample`` of the batch of (seed, step); the mapping is in augment.h.
NL_HOST_DEVICE SampleDraws draw_sample(const CropGeometry& geometry, unsigned long long seed,
                                       unsigned long long step, uint32_t sample) {
    const nl_uint32x2 key = {{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)}};
    const uint32_t step_low = static_cast<uint32_t>(step), step_high = static_cast<uint32_t>(step >> 32);
    const nl_uint32x4 placement = nl_philox4x32_10({{step_low, step_high, sample, 0u}}, key);
    const nl_uint32x4 cube = nl_philox4x32_10({{step_low, step_high, sample, 1u}}, key);
    const uint32_t shift_range = 2u * static_cast<uint32_t>(geometry.shift) + 1u;
    const uint32_t corner_range = static_cast<uint32_t>(geometry.crop - geometry.zero_out) + 1u;
    SampleDraws draws;
    for (int axis = 0; axis < 3; ++axis) {
        const long long room = geometry.side[axis] - geometry.crop;
        long long start = room / 2 + nl_random_below(placement.word[axis], shift_range) - geometry.shift;
        start = start < 0 ? 0 : (start > room ? room : start);
        draws.start[axis] = static_cast<int>(start);
        draws.flip[axis] = geometry.flip ? static_cast<int>((placement.word[3] >> axis) & 1u) : 0;
        draws.corner[axis] =
            geometry.zero_out > 0 ? static_cast<int>(nl_random_below(cube.word[axis], corner_range)) : 0;
    }
    return draws;
}

// grid ceil(batch / kThreads), block kThreads, no shared memory; one thread per sample writes
// its 9 draws (no pass over the store).
NL_KERNEL void augment_draws_kernel(CropGeometry geometry, long long batch, unsigned long long seed,
                                    unsigned long long step, int32_t* NL_RESTRICT out) {
    NL_THREADS {
        const long long sample = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
        if (sample < batch) {
            const SampleDraws draws = draw_sample(geometry, seed, step, static_cast<uint32_t>(sample));
            int32_t* row = out + sample * kDrawsPerSample;
            for (int axis = 0; axis < 3; ++axis) {
                row[axis] = draws.start[axis];
                row[3 + axis] = draws.flip[axis];
                row[6 + axis] = draws.corner[axis];
            }
        }
    }
}

// grid (ceil(crop^3 / kThreads), min(batch, 65535)), block kThreads, shared memory one
// SampleSource (48 bytes); reads each output voxel's source voxel once and writes each output
// voxel once. Block (x, y) fills voxels [x * kThreads, (x + 1) * kThreads) of samples y,
// y + 65535, ... : per sample, thread 0 draws and finds the volume, then each thread fills one
// voxel. A sample whose index is outside [0, store_n) comes out NaN (the host build rejects it
// before the launch).
template <typename T>
NL_KERNEL void augment_batch_kernel(const int16_t* NL_RESTRICT volumes, long long store_n,
                                    const long long* NL_RESTRICT indices, long long batch,
                                    CropGeometry geometry, Window window, unsigned long long seed,
                                    unsigned long long step, T* NL_RESTRICT out) {
    NL_SHARED SampleSource sh_sample;
    const int crop = geometry.crop;
    const int voxels = crop * crop * crop;
    const long long row = geometry.side[2], plane = geometry.side[1] * geometry.side[2];
    for (long long sample = blockIdx.y; sample < batch; sample += gridDim.y) {
        NL_THREADS {
            if (threadIdx.x == 0) {
                const long long index = indices[sample];
                sh_sample.draws = draw_sample(geometry, seed, step, static_cast<uint32_t>(sample));
                sh_sample.volume_offset = index >= 0 && index < store_n ? index * geometry.side[0] * plane : -1;
            }
        }
        nl_sync();
        NL_THREADS {
            const int voxel = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
            if (voxel < voxels) {
                const int at[3] = {voxel / (crop * crop), (voxel / crop) % crop, voxel % crop};
                bool in_cube = geometry.zero_out > 0;
                const SampleDraws& draws = sh_sample.draws;
                long long source = sh_sample.volume_offset;
                const long long strides[3] = {plane, row, 1};
                for (int axis = 0; axis < 3; ++axis) {
                    const int corner = draws.corner[axis];
                    in_cube = in_cube && at[axis] >= corner && at[axis] < corner + geometry.zero_out;
                    const int inside = draws.flip[axis] ? crop - 1 - at[axis] : at[axis];
                    source += (draws.start[axis] + inside) * strides[axis];
                }
                float value;
                if (sh_sample.volume_offset < 0) {
                    value = nanf("");
                } else if (in_cube) {
                    value = 0.0f;
                } else {
                    const float hu = static_cast<float>(volumes[source]);
                    value = (fminf(fmaxf(hu, window.hu_min), window.hu_max) - window.mean) / window.std;
                }
                nl_store(out, sample * voxels + voxel, value);
            }
        }
        nl_sync();  // every thread is done with sh_sample before the next sample's is set
    }
}

// Sizes the kernels cannot take: a crop larger than a side or than kMaxCrop, negative sizes, a
// zeroed cube larger than the crop, or more samples than the counter's 32-bit sample word.
bool bad_geometry(const CropGeometry& geometry, long long batch) {
    for (long long side : geometry.side)
        if (side < geometry.crop || side > 0x7FFFFFFFLL) return true;
    return geometry.crop < 1 || geometry.crop > kMaxCrop || geometry.shift < 0 || geometry.zero_out < 0 ||
           geometry.zero_out > geometry.crop || batch < 0 || batch > 0xFFFFFFFFLL;
}

template <typename T>
int augment(const int16_t* volumes, long long store_n, const long long* indices, long long batch,
            const CropGeometry& geometry, const Window& window, unsigned long long seed,
            unsigned long long step, void* out, void* stream) {
    const long long voxels = static_cast<long long>(geometry.crop) * geometry.crop * geometry.crop;
    const long long blocks_per_sample = (voxels + kThreads - 1) / kThreads;
    const long long sample_blocks = batch < kMaxGridY ? batch : kMaxGridY;
    NL_LAUNCH(augment_batch_kernel<T>,
              dim3(static_cast<unsigned>(blocks_per_sample), static_cast<unsigned>(sample_blocks)),
              dim3(kThreads), stream, volumes, store_n, indices, batch, geometry, window, seed, step,
              static_cast<T*>(out));
    return NL_OK;
}

}  // namespace

extern "C" {

int nl_augment_draws(long long d, long long h, long long w, long long batch, int crop, int shift, int flip,
                     int zero_out, unsigned long long seed, unsigned long long step, int32_t* out,
                     void* stream) {
    const CropGeometry geometry = {{d, h, w}, crop, shift, flip != 0, zero_out};
    if (bad_geometry(geometry, batch)) return NL_BAD_ARGUMENT;
    if (batch == 0) return NL_OK;
    NL_LAUNCH(augment_draws_kernel, dim3(static_cast<unsigned>((batch + kThreads - 1) / kThreads)),
              dim3(kThreads), stream, geometry, batch, seed, step, out);
    return NL_OK;
}

int nl_augment_batch(int out_dtype, const int16_t* volumes, long long store_n, long long d, long long h,
                     long long w, const long long* indices, long long batch, int crop, int shift, int flip,
                     int zero_out, float hu_min, float hu_max, float mean, float std, unsigned long long seed,
                     unsigned long long step, void* out, void* stream) {
    const CropGeometry geometry = {{d, h, w}, crop, shift, flip != 0, zero_out};
    const Window window = {hu_min, hu_max, mean, std};
    const bool known_dtype = out_dtype == NL_FLOAT32 || out_dtype == NL_BFLOAT16;
    if (bad_geometry(geometry, batch) || store_n < 1 || !(std > 0.0f) || !known_dtype) return NL_BAD_ARGUMENT;
#if !defined(__CUDACC__)
    for (long long sample = 0; sample < batch; ++sample)
        if (indices[sample] < 0 || indices[sample] >= store_n) return NL_BAD_ARGUMENT;
#endif
    if (batch == 0) return NL_OK;
    if (out_dtype == NL_FLOAT32)
        return augment<float>(volumes, store_n, indices, batch, geometry, window, seed, step, out, stream);
    return augment<nl_bf16>(volumes, store_n, indices, batch, geometry, window, seed, step, out, stream);
}

int nl_philox4x32_10_host(const uint32_t* counter, const uint32_t* key, uint32_t* out) {
    const nl_uint32x4 result = nl_philox4x32_10({{counter[0], counter[1], counter[2], counter[3]}},
                                                {{key[0], key[1]}});
    for (int i = 0; i < 4; ++i) out[i] = result.word[i];
    return NL_OK;
}

}  // extern "C"
