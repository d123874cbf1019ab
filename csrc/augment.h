// The C ABI of augment.cu: a training batch cut from the int16 crop store and augmented in one
// launch, its random draws from Philox4x32-10 keyed by (seed, step). Conventions of every csrc/
// ABI in portable.h; naslung/native/augment.py declares the same signatures for ctypes.
//
// The draws of sample b of a batch (documented here because Python tests rebuild them): two
// Philox4x32-10 calls with key {seed low 32 bits, seed high 32 bits} and counters
// {step low, step high, b, 0} -> words a0..a3 and {step low, step high, b, 1} -> words c0..c3.
// With below(word, range) = floor(word * range / 2^32) (integer arithmetic):
//   shift on axis k (z, y, x)   offset_k = below(a_k, 2 * shift + 1) - shift;
//                               start_k = clamp((side_k - crop) / 2 + offset_k, 0, side_k - crop)
//   flip of axis k              flip_k = flip ? (a3 >> k) & 1 : 0
//   zeroed cube corner on k     corner_k = zero_out > 0 ? below(c_k, crop - zero_out + 1) : 0
// Each draw has its own word, so switching one augmentation off leaves the others unchanged.
//
// Output voxel (z, y, x) of sample b is, with z' = flip_z ? crop - 1 - z : z (same for y, x),
//   (clamp(store[indices[b], start_z + z', start_y + y', start_x + x'], hu_min, hu_max) - mean) / std
// in fp32, or 0 where (z, y, x) lies in the zero_out^3 cube at the corner; the output is stored
// as fp32 or bf16 (round to nearest even).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The per-sample draws above, (batch, 9) int32 in out's memory: start z, y, x, flip z, y, x,
// corner z, y, x. The same draws nl_augment_batch uses for the same arguments.
int nl_augment_draws(long long d, long long h, long long w, long long batch, int crop, int shift, int flip,
                     int zero_out, unsigned long long seed, unsigned long long step, int32_t* out,
                     void* stream);

// The augmented batch (batch, 1, crop, crop, crop) into out (dtype NL_FLOAT32 or NL_BFLOAT16) from
// volumes (store_n, d, h, w) int16 at indices (batch) int64. The host build returns
// NL_BAD_ARGUMENT for an index outside [0, store_n) before computing anything; the CUDA build
// cannot read device indices without waiting for the stream, so it fills such a sample with NaN
// instead of reading outside the store.
int nl_augment_batch(int out_dtype, const int16_t* volumes, long long store_n, long long d, long long h,
                     long long w, const long long* indices, long long batch, int crop, int shift, int flip,
                     int zero_out, float hu_min, float hu_max, float mean, float std, unsigned long long seed,
                     unsigned long long step, void* out, void* stream);

// Philox4x32-10 of counter[4] and key[2] into out[4], all host memory (the known-answer tests).
int nl_philox4x32_10_host(const uint32_t* counter, const uint32_t* key, uint32_t* out);

#ifdef __cplusplus
}
#endif
