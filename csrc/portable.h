// One source, two builds: the CUDA execution model, as these kernels use it, for nvcc and for a
// plain C++ compiler.
//
// Under nvcc the macros are CUDA itself. Under a C++ compiler (the host build, what CI tests
// under AddressSanitizer and UBSan) a launch runs every block of the grid, blocks in parallel
// with OpenMP, and each block runs its threads one after another, phase by phase:
//
//   NL_THREADS { ... }   a phase: the body runs once for every thread of the block, with
//                        threadIdx set; under nvcc it runs once on each hardware thread.
//   nl_sync();           __syncthreads(): the boundary between two phases. Every write of one
//                        phase is seen by every thread in the next, as on the GPU.
//
// The rules that make the two builds agree:
//   * code outside NL_THREADS runs once per block on the CPU and once per thread on the GPU, so
//     it holds only what is the same for every thread of a block (loop bounds, shared arrays);
//   * nothing a thread computes survives from one phase to the next except through shared
//     memory (NL_SHARED arrays, one per block) or global memory;
//   * no warp intrinsics; atomics only through nl_atomic_add;
//   * blocks are one-dimensional (blockDim.x); grids are up to three-dimensional.
// A kernel that breaks them computes something else on the CPU, and the host parity tests fail.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define NL_KERNEL __global__
#define NL_DEVICE __device__ __forceinline__
#define NL_HOST_DEVICE __host__ __device__ __forceinline__
#define NL_SHARED __shared__
#define NL_THREADS
#define NL_RESTRICT __restrict__

using nl_stream = cudaStream_t;
using nl_bf16 = __nv_bfloat16;

NL_DEVICE void nl_sync() { __syncthreads(); }
NL_DEVICE float nl_atomic_add(float* address, float value) { return atomicAdd(address, value); }
NL_HOST_DEVICE float nl_to_float(nl_bf16 v) { return __bfloat162float(v); }
NL_HOST_DEVICE nl_bf16 nl_bf16_from(float v) { return __float2bfloat16_rn(v); }

// The launch, on the stream torch passes down; a launch error is returned as the C ABI's status.
#define NL_LAUNCH(kernel, grid, block, stream, ...)                                         \
    do {                                                                                    \
        kernel<<<(grid), (block), 0, static_cast<nl_stream>(stream)>>>(__VA_ARGS__);        \
        if (cudaPeekAtLastError() != cudaSuccess) return static_cast<int>(cudaGetLastError()); \
    } while (0)

#else  // the host build

#include <cmath>

#define NL_KERNEL static
#define NL_DEVICE static inline
#define NL_HOST_DEVICE static inline
#define NL_SHARED
#define NL_THREADS for (unsigned nl_thread = 0; nl_thread < blockDim.x; ++nl_thread)
// A phase's thread index is its loop variable: a register, so a phase's loop can be vectorised,
// and a use of threadIdx outside a phase (where no thread is meant) does not compile.
#define threadIdx (dim3(nl_thread))
#define NL_RESTRICT __restrict__

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Each OpenMP thread runs one block at a time, so the block's built-in variables are per OS
// thread.
// initial-exec TLS: a plain fs-relative load per use, not a __tls_get_addr call in every loop.
#define NL_TLS thread_local __attribute__((tls_model("initial-exec")))
inline NL_TLS dim3 blockIdx;
inline NL_TLS dim3 blockDim;
inline NL_TLS dim3 gridDim;

using nl_stream = void*;

// bfloat16 storage as the GPU has it: the high half of an fp32, rounded to nearest even.
struct nl_bf16 {
    uint16_t bits;
};

NL_HOST_DEVICE float nl_to_float(nl_bf16 v) {
    uint32_t wide = static_cast<uint32_t>(v.bits) << 16;
    float out;
    std::memcpy(&out, &wide, sizeof out);
    return out;
}

NL_HOST_DEVICE nl_bf16 nl_bf16_from(float v) {
    uint32_t wide;
    std::memcpy(&wide, &v, sizeof wide);
    if (std::isnan(v)) return nl_bf16{0x7FFFu};  // the canonical NaN CUDA's conversion returns
    wide += 0x7FFFu + ((wide >> 16) & 1u);
    return nl_bf16{static_cast<uint16_t>(wide >> 16)};
}

NL_DEVICE void nl_sync() {}  // the end of an NL_THREADS loop is the barrier

NL_DEVICE float nl_atomic_add(float* address, float value) {
    float old;
#pragma omp atomic capture
    {
        old = *address;
        *address += value;
    }
    return old;
}

// Every block of the grid, in parallel; within a block the kernel's NL_THREADS phases loop over
// its threads. A launch on the CPU cannot fail once its arguments are checked.
template <typename Kernel, typename... Args>
static int nl_launch_blocks(Kernel kernel, dim3 grid, dim3 block, Args... args) {
    const long long blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
#pragma omp parallel for schedule(static)
    for (long long b = 0; b < blocks; ++b) {
        gridDim = grid;
        blockDim = block;
        blockIdx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                        static_cast<unsigned>(b / (static_cast<long long>(grid.x) * grid.y)));
        kernel(args...);
    }
    return 0;
}

#define NL_LAUNCH(kernel, grid, block, stream, ...)                        \
    do {                                                                   \
        (void)(stream);                                                    \
        nl_launch_blocks(kernel, (grid), (block), __VA_ARGS__);            \
    } while (0)

#endif

// ``value`` where ``keep``, else 0, without a branch: a mask (ReLU's, say) over random data
// would mispredict half the time on a CPU; the GPU predicates the select either way. Unlike
// value * keep, an infinite value that is not kept gives 0, as torch's masked gradients do.
NL_HOST_DEVICE float nl_keep_if(bool keep, float value) {
#if defined(__CUDA_ARCH__)
    return keep ? value : 0.0f;
#else
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    bits &= 0u - static_cast<uint32_t>(keep);
    std::memcpy(&value, &bits, sizeof bits);
    return value;
#endif
}

// Storage types: fp32 and bf16 in memory, fp32 in registers.
NL_HOST_DEVICE float nl_load(const float* p, long long i) { return p[i]; }
NL_HOST_DEVICE float nl_load(const nl_bf16* p, long long i) { return nl_to_float(p[i]); }
NL_HOST_DEVICE void nl_store(float* p, long long i, float v) { p[i] = v; }
NL_HOST_DEVICE void nl_store(nl_bf16* p, long long i, float v) { p[i] = nl_bf16_from(v); }

// The C ABI every csrc/ file exports (declared in its header, loaded from Python with ctypes):
// raw pointers, sizes in elements, a stream (a cudaStream_t in the CUDA build, ignored by the
// host build). A function returns NL_OK once its kernels are launched, NL_BAD_ARGUMENT for
// sizes or dtypes it cannot take, or CUDA's own error code.
enum nl_status : int { NL_OK = 0, NL_BAD_ARGUMENT = -1 };

// Storage dtypes of feature maps; statistics, weights and partial sums are always fp32.
enum nl_dtype : int { NL_FLOAT32 = 0, NL_BFLOAT16 = 1 };
