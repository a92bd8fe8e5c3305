// LLM.int8() primitives: row-wise (vectorwise) quantisation with outliers, column statistics and codes
// for double quantisation, exact int8 GEMM with int32 accumulation, and the int32 -> float dequant.
//
// Numerics (SPEC.md §5, default mode of docs/architecture.md); every rounding step is an explicit
// *_rn intrinsic so the result equals the PyTorch reference bit for bit:
//   outlier(i,j) = threshold > 0 && |A_ij| >= threshold
//   row_stats[i] = max_j |A_ij| over non-outliers (NaN skipped unless nan_propagates != 0)
//   q_ij         = outlier ? 0 : rint_half_even(fl32(A_ij * scale_i)),
//   scale_i      = fl32(fl32(1 / row_stats[i]) * 127)   -- NOT the single rounding fl32(127 / r): the
//                  reference (like bitsandbytes) writes `127.0 / row_stats`, and torch evaluates a
//                  scalar divided by a tensor as `row_stats.reciprocal() * 127` (Tensor.__rdiv__);
//                  the two differ in ~1 of 4 rows by 1 ulp, enough to move a code across .5.
#include "common.cuh"

#define INT8_SCALE 127.0f

__device__ __forceinline__ bool is_outlier(float a, float threshold) {
    return threshold > 0.0f && fabsf(a) >= threshold;
}

// Round half to even and convert to int8 exactly like the reference's _round_int8: NaN (0 * Inf of an
// all-zero row, or a NaN input) -> 0, then saturate to ±127 (so ±Inf -> ±127).
__device__ __forceinline__ int8_t round_to_int8(float v) {
    if (is_nan_f(v)) return 0;
    float r = rintf(v);
    r = fminf(fmaxf(r, -127.0f), 127.0f);
    return (int8_t)(int)r;
}

// compat "bnb": bnb's CPU cast torch.round(v).to(int8) of ±Inf is 0 on x86 (a row whose absmax is below
// 127/FLT_MAX has scale Inf); NaN is 0 already (the reference's _round_int8 with inf_to_zero).
__device__ __forceinline__ int8_t round_to_int8_bnb(float v) {
    return (__float_as_uint(v) & 0x7fffffffu) >= 0x7f800000u ? (int8_t)0 : round_to_int8(v);
}

// One thread block per row (blockDim.x a multiple of 32). col_flags[j] is set to 1 for every column
// holding an outlier; zeroing whole outlier columns is a second pass (int8_zero_columns) because it
// needs the flags of all rows. nan_propagates = compat "bnb": NaN poisons the row absmax and a ±Inf product
// (a row absmax below 127/FLT_MAX) gives code 0 (round_to_int8_bnb).
template <typename T>
__global__ void int8_vectorwise_quant(const T* __restrict__ A, int8_t* __restrict__ q,
                                      float* __restrict__ row_stats, int* __restrict__ col_flags,
                                      long long rows, long long cols, float threshold, int nan_propagates) {
    __shared__ uint32_t s_red[32];
    const long long row = blockIdx.x;
    const T* a_row = A + row * cols;
    uint32_t local_max = 0u;
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
        const float a = to_float(a_row[j]);
        if (is_outlier(a, threshold)) {
            col_flags[j] = 1;                       // benign race: every writer stores the same 1
            continue;
        }
        if (!nan_propagates && is_nan_f(a)) continue;
        local_max = max_u32(local_max, abs_bits(a));
    }
    const float absmax = __uint_as_float(block_max_u32(local_max, s_red));
    if (threadIdx.x == 0) row_stats[row] = absmax;
    const float scale = __fmul_rn(__frcp_rn(absmax), INT8_SCALE);
    int8_t* q_row = q + row * cols;
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
        const float a = to_float(a_row[j]);
        const float v = __fmul_rn(a, scale);
        q_row[j] = is_outlier(a, threshold) ? (int8_t)0 : nan_propagates ? round_to_int8_bnb(v) : round_to_int8(v);
    }
}

// q[:, j] = 0 for every flagged column (rows x cols, row-major), grid-stride.
__global__ void int8_zero_columns(int8_t* __restrict__ q, const int* __restrict__ col_flags,
                                  long long rows, long long cols) {
    const long long n = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (col_flags[i % cols]) q[i] = 0;
    }
}

// out = fl32(fl32(float(q) * stats[row]) * inv_127) in float32 (SPEC §5.2), rows x cols row-major.
__global__ void int8_vectorwise_dequant(const int8_t* __restrict__ q, const float* __restrict__ stats,
                                        float* __restrict__ out, long long rows, long long cols,
                                        float inv_127) {
    const long long n = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = __fmul_rn(__fmul_rn((float)q[i], stats[i / cols]), inv_127);
    }
}

// col_stats[j] = max_i |A_ij| over non-outliers, accumulated with atomicMax on the bit patterns into
// a zero-initialised buffer. Thread x of block (bx, by) owns column bx*blockDim.x + x and visits rows
// by, by + gridDim.y, ... so consecutive threads read consecutive addresses.
template <typename T>
__global__ void int8_col_stats(const T* __restrict__ A, float* __restrict__ col_stats,
                               long long rows, long long cols, float threshold, int nan_propagates) {
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    uint32_t local_max = 0u;
    for (long long i = blockIdx.y; i < rows; i += gridDim.y) {
        const float a = to_float(A[i * cols + j]);
        if (is_outlier(a, threshold)) continue;
        if (!nan_propagates && is_nan_f(a)) continue;
        local_max = max_u32(local_max, abs_bits(a));
    }
    atomicMax((unsigned int*)(col_stats + j), local_max);
}

// Column codes (default mode, SPEC §10 Q17): q_col = rint(fl32(fl32(A * 127) / col_stats[j])); only
// outlier ELEMENTS are zeroed.
template <typename T>
__global__ void int8_col_quant(const T* __restrict__ A, const float* __restrict__ col_stats,
                               int8_t* __restrict__ q, long long rows, long long cols, float threshold) {
    const long long n = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float a = to_float(A[i]);
        q[i] = is_outlier(a, threshold) ? (int8_t)0
                                        : round_to_int8(__fdiv_rn(__fmul_rn(a, INT8_SCALE), col_stats[i % cols]));
    }
}

// Y_ij = cast<T>( fl32( fl32( fl32(fl32(float(C_ij) * row_i) * col_j) * k ) + bias_j ) ),
// k = fl32(1/127^2) in default mode (the launcher passes it). bias may be null (has_bias == 0).
template <typename T>
__global__ void int8_mm_dequant(const int32_t* __restrict__ C, const float* __restrict__ row_stats,
                                const float* __restrict__ col_stats, const float* __restrict__ bias,
                                T* __restrict__ out, long long rows, long long cols, float k, int has_bias) {
    const long long n = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long r = i / cols;
        const long long c = i - r * cols;
        float y = __fmul_rn(__fmul_rn(__int2float_rn(C[i]), row_stats[r]), col_stats[c]);
        y = __fmul_rn(y, k);
        if (has_bias) y = __fadd_rn(y, bias[c]);
        out[i] = from_float<T>(y);
    }
}

// C[M, N] = A[M, K] . B[N, K]^T with exact int32 accumulation (wrapping mod 2^32 like cuBLAS/IMMA and
// torch._int_mm; the sum is done in uint32 because signed overflow is undefined in C++).
// 16 x 16 threads, one output each; K is staged through shared memory in tiles of 32.
#define MM_TILE 16
#define MM_TK 32
__global__ void int8_linear_matmul(const int8_t* __restrict__ A, const int8_t* __restrict__ B,
                                   int32_t* __restrict__ C, long long M, long long N, long long K) {
    __shared__ int As[MM_TILE][MM_TK + 1];     // +1 avoids shared-memory bank conflicts
    __shared__ int Bs[MM_TILE][MM_TK + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long m0 = (long long)blockIdx.x * MM_TILE;   // M on grid x: up to 2^31 - 1 blocks
    const long long n0 = (long long)blockIdx.y * MM_TILE;
    const int tid = ty * MM_TILE + tx;
    uint32_t acc = 0u;
    for (long long k0 = 0; k0 < K; k0 += MM_TK) {
        for (int l = tid; l < MM_TILE * MM_TK; l += MM_TILE * MM_TILE) {
            const int r = l / MM_TK, c = l % MM_TK;
            const long long kk = k0 + c;
            As[r][c] = (m0 + r < M && kk < K) ? (int)A[(m0 + r) * K + kk] : 0;
            Bs[r][c] = (n0 + r < N && kk < K) ? (int)B[(n0 + r) * K + kk] : 0;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < MM_TK; ++c) acc += (uint32_t)(As[ty][c] * Bs[tx][c]);
        __syncthreads();
    }
    const long long m = m0 + ty, n = n0 + tx;
    if (m < M && n < N) C[m * N + n] = (int32_t)acc;
}
