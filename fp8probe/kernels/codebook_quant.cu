// 8-bit codebook quantisation (global and blockwise) and dequantisation, default fp8probe rules.
//
// Numerics: identical float32 operations to fp8probe/backends/reference.py (default mode), which
// follows SPEC.md §2.1, §4.2 and docs/architecture.md "Decisions":
//  * absmax of a block = max |x| over its FINITE elements (NaN/±Inf excluded); 0 if there are none.
//  * s = fl32(1/absmax) (IEEE reciprocal, __frcp_rn; +Inf for a zero block), x_norm = fl32(x * s),
//    except x = ±0 which stays ±0 (so a zero block never computes 0 * Inf = NaN).
//  * non-finite x: NaN * s = NaN -> index 0, +Inf -> 255, -Inf -> 0 (the launcher records their
//    positions and values in torch; the codes here are the placeholders the reference writes).
//  * nearest code: CUDA even-index rule, 7-step binary search over the 127 odd indices + 3-way
//    midpoint test with midpoints fl32(fl32(a + b) * 0.5f); exact midpoints go to the even index.
// Compile without fast-math: every rounding step uses an explicit *_rn intrinsic anyway.
#include "common.cuh"

#define CODE_SIZE 256

__device__ __forceinline__ void load_code(const float* __restrict__ code, float* s_code) {
    for (int i = threadIdx.x; i < CODE_SIZE; i += blockDim.x) s_code[i] = code[i];
    __syncthreads();
}

// Index of the nearest code for a normalised value x (SPEC §2.1 closed form).
__device__ __forceinline__ int search_even(const float* s_code, float x) {
    // k = number of odd j in {1, 3, ..., 253} with x > code[j]; the predicate is monotone because the
    // codebook is sorted ascending, so binary lifting over 127 items needs exactly 7 steps. NaN
    // compares false everywhere -> k = 0.
    int k = 0;
#pragma unroll
    for (int step = 64; step >= 1; step >>= 1) {
        const int i = k + step - 1;
        if (i < 127 && x > s_code[2 * i + 1]) k += step;
    }
    const int p = 2 * k;
    if (x > s_code[p]) {
        const float mid = __fmul_rn(__fadd_rn(s_code[p], s_code[p + 1]), 0.5f);
        return x > mid ? p + 1 : p;
    }
    const int lo = p > 0 ? p - 1 : 0;
    const float mid = __fmul_rn(__fadd_rn(s_code[lo], s_code[p]), 0.5f);
    return x < mid ? lo : p;
}

__device__ __forceinline__ uint8_t quantize_one(const float* s_code, float a, float s) {
    const float x = (a == 0.0f) ? a : __fmul_rn(a, s);
    return (uint8_t)search_even(s_code, x);
}

// Largest items-per-thread: blocksize 4096 over 256 threads.
#define QB_MAX_ITEMS 16

// Fused blockwise quantisation: one thread block per quantisation block of `blocksize` elements of the
// flattened input (the last block may be partial). blockDim.x = min(blocksize, 256), a multiple of 32;
// each thread keeps blocksize / blockDim.x <= 16 items in registers so the input is read once.
template <typename T>
__global__ void quantize_blockwise(const T* __restrict__ A, const float* __restrict__ code,
                                   uint8_t* __restrict__ q, float* __restrict__ absmax,
                                   long long n, int blocksize) {
    __shared__ float s_code[CODE_SIZE];
    __shared__ uint32_t s_red[32];
    load_code(code, s_code);
    const long long base = (long long)blockIdx.x * blocksize;
    const int items = blocksize / (int)blockDim.x;
    float vals[QB_MAX_ITEMS];
    uint32_t local_max = 0u;
#pragma unroll
    for (int it = 0; it < QB_MAX_ITEMS; ++it) {
        if (it < items) {
            const long long i = base + (long long)it * blockDim.x + threadIdx.x;
            float a = 0.0f;                                   // out-of-range lanes load 0
            if (i < n) a = to_float(A[i]);
            vals[it] = a;
            if (is_finite_f(a)) local_max = max_u32(local_max, abs_bits(a));
        }
    }
    const float amax = __uint_as_float(block_max_u32(local_max, s_red));
    if (threadIdx.x == 0) absmax[blockIdx.x] = amax;
    const float s = __frcp_rn(amax);
#pragma unroll
    for (int it = 0; it < QB_MAX_ITEMS; ++it) {
        if (it < items) {
            const long long i = base + (long long)it * blockDim.x + threadIdx.x;
            if (i < n) q[i] = quantize_one(s_code, vals[it], s);
        }
    }
}

// Global absmax (finite elements only) accumulated with atomicMax into absmax[0], which the launcher
// zero-initialises. Grid-stride over the flattened tensor.
template <typename T>
__global__ void absmax_global(const T* __restrict__ A, float* __restrict__ absmax, long long n) {
    __shared__ uint32_t s_red[32];
    uint32_t local_max = 0u;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float a = to_float(A[i]);
        if (is_finite_f(a)) local_max = max_u32(local_max, abs_bits(a));
    }
    const uint32_t m = block_max_u32(local_max, s_red);
    if (threadIdx.x == 0) atomicMax((unsigned int*)absmax, m);
}

// Elementwise quantisation with one precomputed absmax per `blocksize` elements (blocksize = n for
// the global quantiser). 64-bit indexing, grid-stride.
template <typename T>
__global__ void quantize_with_absmax(const T* __restrict__ A, const float* __restrict__ code,
                                     const float* __restrict__ absmax, uint8_t* __restrict__ q,
                                     long long n, long long blocksize) {
    __shared__ float s_code[CODE_SIZE];
    load_code(code, s_code);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float s = __frcp_rn(absmax[i / blocksize]);
        q[i] = quantize_one(s_code, to_float(A[i]), s);
    }
}

// y = cast<T>(fl32(code[q] * absmax[i / blocksize])), RNE to the output type (blocksize = n: global).
template <typename T>
__global__ void dequantize_blockwise(const uint8_t* __restrict__ q, const float* __restrict__ code,
                                     const float* __restrict__ absmax, T* __restrict__ out,
                                     long long n, long long blocksize) {
    __shared__ float s_code[CODE_SIZE];
    load_code(code, s_code);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = from_float<T>(__fmul_rn(s_code[q[i]], absmax[i / blocksize]));
    }
}
