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

// Fused blockwise quantisation for blocksizes 1024..4096: one thread block per quantisation block of
// `blocksize` elements of the flattened input (the last block may be partial). blockDim.x = 256; each
// thread keeps blocksize / blockDim.x <= 16 items in registers so the input is read once. Both blockwise
// kernels set *nonfinite (zero-initialised) to 1 when they meet a NaN or ±Inf, so the launcher gathers
// the specials only when there are any (no separate isfinite pass over the input).
template <typename T>
__global__ void quantize_blockwise(const T* __restrict__ A, const float* __restrict__ code,
                                   uint8_t* __restrict__ q, float* __restrict__ absmax,
                                   int* __restrict__ nonfinite, long long n, int blocksize) {
    __shared__ float s_code[CODE_SIZE];
    __shared__ uint32_t s_red[32];
    load_code(code, s_code);
    const long long base = (long long)blockIdx.x * blocksize;
    const int items = blocksize / (int)blockDim.x;
    float vals[QB_MAX_ITEMS];
    uint32_t local_max = 0u;
    bool bad = false;
#pragma unroll
    for (int it = 0; it < QB_MAX_ITEMS; ++it) {
        if (it < items) {
            const long long i = base + (long long)it * blockDim.x + threadIdx.x;
            float a = 0.0f;                                   // out-of-range lanes load 0
            if (i < n) a = to_float(A[i]);
            vals[it] = a;
            if (is_finite_f(a)) local_max = max_u32(local_max, abs_bits(a));
            else bad = true;
        }
    }
    if (bad) atomicOr(nonfinite, 1);
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

// Largest items-per-lane of the warp kernel: blocksize 512 over 32 lanes (16 loads in flight per lane).
#define QW_MAX_ITEMS 16

// Fused blockwise quantisation for blocksizes 32..512: one warp per quantisation block (blocksize / 32
// <= 16 items per lane, loads coalesced across the warp), warps striding over the blocks, so a thread
// block loads the codebook once for many quantisation blocks and the absmax needs only shuffles. The
// block loop's trip count depends only on the warp, so all 32 lanes reach every full-mask shuffle.
template <typename T>
__global__ void quantize_blockwise_warp(const T* __restrict__ A, const float* __restrict__ code,
                                        uint8_t* __restrict__ q, float* __restrict__ absmax,
                                        int* __restrict__ nonfinite, long long n, int blocksize) {
    __shared__ float s_code[CODE_SIZE];
    load_code(code, s_code);
    const int lane = (int)(threadIdx.x & 31u);
    const int items = blocksize >> 5;
    const long long nb = (n + blocksize - 1) / blocksize;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    bool bad = false;
    for (long long b = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; b < nb; b += warps) {
        const long long base = b * blocksize + lane;
        float vals[QW_MAX_ITEMS];
        uint32_t m = 0u;
#pragma unroll
        for (int it = 0; it < QW_MAX_ITEMS; ++it) {
            if (it < items) {
                const long long i = base + 32LL * it;
                float a = 0.0f;                               // past the end: 0, as in quantize_blockwise
                if (i < n) a = to_float(A[i]);
                vals[it] = a;
                if (is_finite_f(a)) m = max_u32(m, abs_bits(a));
                else bad = true;
            }
        }
        for (int off = 16; off > 0; off >>= 1) m = max_u32(m, __shfl_xor_sync(0xffffffffu, m, off));
        const float amax = __uint_as_float(m);
        if (lane == 0) absmax[b] = amax;
        const float s = __frcp_rn(amax);
#pragma unroll
        for (int it = 0; it < QW_MAX_ITEMS; ++it) {
            if (it < items) {
                const long long i = base + 32LL * it;
                if (i < n) q[i] = quantize_one(s_code, vals[it], s);
            }
        }
    }
    if (bad) atomicOr(nonfinite, 1);
}

// Global absmax (finite elements only) accumulated with atomicMax into absmax[0], which the launcher
// zero-initialises; *nonfinite (zero-initialised) becomes 1 when any element is NaN or ±Inf. Grid-stride over the flattened tensor, 4 contiguous elements per thread and step
// (one vector load where aligned); the launcher caps the grid so few blocks meet at the atomic.
template <typename T>
__global__ void absmax_global(const T* __restrict__ A, float* __restrict__ absmax, int* __restrict__ nonfinite,
                              long long n) {
    __shared__ uint32_t s_red[32];
    uint32_t local_max = 0u;
    bool bad = false;
    const bool vec = pack4_aligned(A);
    const long long stride = (long long)gridDim.x * blockDim.x * 4;
    for (long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4; i0 < n; i0 += stride) {
        Pack4<T> src;
        const int count = n - i0 < 4 ? (int)(n - i0) : 4;
        if (vec && count == 4) {
            src = *reinterpret_cast<const Pack4<T>*>(A + i0);
        } else {
            for (int k = 0; k < count; ++k) src.v[k] = A[i0 + k];
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (k < count) {
                const float a = to_float(src.v[k]);
                if (is_finite_f(a)) local_max = max_u32(local_max, abs_bits(a));
                else bad = true;
            }
        }
    }
    if (bad) atomicOr(nonfinite, 1);
    const uint32_t m = block_max_u32(local_max, s_red);
    if (threadIdx.x == 0) atomicMax((unsigned int*)absmax, m);
}

// s = fl32(1 / absmax) once per run of elements sharing a block.
struct Reciprocal {
    __device__ __forceinline__ float operator()(float amax) const { return __frcp_rn(amax); }
};

// Elementwise quantisation with one precomputed absmax per `blocksize` elements (blocksize = n for
// the global quantiser): the flattened tensor as a [1, n] view in [1, blocksize] tiles (map_tiles).
template <typename T>
__global__ void quantize_with_absmax(const T* __restrict__ A, const float* __restrict__ code,
                                     const float* __restrict__ absmax, uint8_t* __restrict__ q,
                                     long long n, long long blocksize) {
    __shared__ float s_code[CODE_SIZE];
    load_code(code, s_code);
    const float* sc = s_code;
    map_tiles(A, absmax, q, 1LL, n, 1LL, blocksize, Reciprocal(),
              [=](T a, float s) -> uint8_t { return quantize_one(sc, to_float(a), s); });
}

// y = cast<T>(fl32(code[q] * absmax[i / blocksize])), RNE to the output type (blocksize = n: global);
// 4 codes per thread and step, the codebook in shared memory, absmax loaded once per block run.
template <typename T>
__global__ void dequantize_blockwise(const uint8_t* __restrict__ q, const float* __restrict__ code,
                                     const float* __restrict__ absmax, T* __restrict__ out,
                                     long long n, long long blocksize) {
    __shared__ float s_code[CODE_SIZE];
    load_code(code, s_code);
    const float* sc = s_code;
    map_tiles(q, absmax, out, 1LL, n, 1LL, blocksize, SameScale(),
              [=](uint8_t c, float s) -> T { return from_float<T>(__fmul_rn(sc[c], s)); });
}
