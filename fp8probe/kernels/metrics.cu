// The analysis' error and operand statistics (fp8probe/analysis/metrics.py: ErrorAccumulator.update,
// OperandAccumulator.update) on the GPU: each in one pass over the tensors plus a short finishing kernel, the
// result in one float64 vector that reaches the host in one copy. The torch path they replace ran ~25 small
// operations per call, each a launch and an allocation, and the GPU analysis was bound by that host work
// (benchmarks/RESULTS.md § GPU).
//
// Summation order: the one of the C fast path (fp8probe/_fastpath.c, "metrics in one C pass"), so a CUDA tensor
// and the same tensor on the CPU give the same bits. The flat index range is cut into SUM_BLOCKs of 8192
// elements (the last one partial); inside a block element i (block-relative) is added to lane i % 8 in index
// order, each step one float64 multiply then one float64 add (no FMA: the explicit __d*_rn intrinsics and
// --fmad=false); the lanes combine as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)); the block results are added in
// block order to 0.0 (sums_finish). An element left out (a NaN/±Inf, or a pair holding one) adds +0.0 to its
// lane, which changes no lane. Maxima and counts are order-free.
//
// Here one SUM_BLOCK is 8 consecutive threads of a warp, thread k its lane k: each thread forms its lane with the
// C loop's sequence of operations, and three xor-shuffles (1, 2, 4) form the lanes' tree; IEEE addition is
// commutative, so every lane of the group ends with the tree's bits.
#include "common.cuh"

#define SUM_BLOCK 8192LL
#define SUM_LANES 8
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(float v) { return (double)v; }
__device__ __forceinline__ double to_double(half_t v) { return (double)to_float(v); }
__device__ __forceinline__ double to_double(bf16_t v) { return (double)to_float(v); }

// finite as one compare (NaN compares false), as the C path's fin_d
__device__ __forceinline__ bool finite_d(double v) { return fabs(v) <= 1.7976931348623157e308; }

// ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)) of the 8 lanes of this thread's group, in every lane
__device__ __forceinline__ double lanes_sum(double v) {
    v = __dadd_rn(v, __shfl_xor_sync(FULL_MASK, v, 1));
    v = __dadd_rn(v, __shfl_xor_sync(FULL_MASK, v, 2));
    return __dadd_rn(v, __shfl_xor_sync(FULL_MASK, v, 4));
}

__device__ __forceinline__ long long lanes_count(long long v) {
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    v += __shfl_xor_sync(FULL_MASK, v, 2);
    return v + __shfl_xor_sync(FULL_MASK, v, 4);
}

__device__ __forceinline__ double lanes_max(double v) {   // of non-negative, non-NaN values
    for (int off = 1; off < SUM_LANES; off <<= 1) {
        const double o = __shfl_xor_sync(FULL_MASK, v, off);
        v = o > v ? o : v;
    }
    return v;
}

// End of a summation block's pass: the lanes of v[0 .. S) combine as sums, of v[S .. W) as maxima, of c[0 .. C) as
// counts; lane 0 of the block b (< nb) writes slot[W b + k] and counts[C b + k]. Every thread of the warp calls it.
template <int S, int W, int C>
__device__ __forceinline__ void store_block(double (&v)[W], long long (&c)[C], long long g, long long nb,
                                            double* __restrict__ slot, long long* __restrict__ counts) {
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = k < S ? lanes_sum(v[k]) : lanes_max(v[k]);
#pragma unroll
    for (int k = 0; k < C; ++k) c[k] = lanes_count(c[k]);
    const long long b = g / SUM_LANES;
    if (b < nb && g % SUM_LANES == 0) {
#pragma unroll
        for (int k = 0; k < W; ++k) slot[W * b + k] = v[k];
#pragma unroll
        for (int k = 0; k < C; ++k) counts[C * b + k] = c[k];
    }
}

// Per SUM_BLOCK b of ref r and result q (n elements each, contiguous): slot[5 b .. 5 b + 4] = Σr², Σ(r−q)², Σq²,
// Σr·q over the pairs where both are finite, and max|r−q| over them; counts[2 b], counts[2 b + 1] = those pairs,
// and the elements with a finite r. One thread per lane: grid × block = 8 × the number of SUM_BLOCKs, rounded up
// to whole thread blocks (threads past the end take part in the shuffles with zeros).
template <typename TR, typename TQ>
__global__ void error_sums_blocks(const TR* __restrict__ r, const TQ* __restrict__ q, long long n,
                                  double* __restrict__ slot, long long* __restrict__ counts) {
    const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long b = g / SUM_LANES;
    const long long nb = (n + SUM_BLOCK - 1) / SUM_BLOCK;
    double v[5] = {0.0, 0.0, 0.0, 0.0, 0.0};   // Σr², Σ(r−q)², Σq², Σr·q; max|r−q|
    long long c[2] = {0, 0};                    // pairs compared, finite r
    if (b < nb) {
        const long long lo = b * SUM_BLOCK, hi = lo + SUM_BLOCK < n ? lo + SUM_BLOCK : n;
        for (long long i = lo + g % SUM_LANES; i < hi; i += SUM_LANES) {
            const double rv = to_double(r[i]), qv = to_double(q[i]);
            const bool okr = finite_d(rv), ok = okr && finite_d(qv);
            const double r0 = ok ? rv : 0.0, q0 = ok ? qv : 0.0, e = __dsub_rn(r0, q0), ae = fabs(e);
            v[0] = __dadd_rn(v[0], __dmul_rn(r0, r0));
            v[1] = __dadd_rn(v[1], __dmul_rn(e, e));
            v[2] = __dadd_rn(v[2], __dmul_rn(q0, q0));
            v[3] = __dadd_rn(v[3], __dmul_rn(r0, q0));
            v[4] = ae > v[4] ? ae : v[4];
            c[0] += ok;
            c[1] += okr;
        }
    }
    store_block<4>(v, c, g, nb, slot, counts);
}

// *qmax_bits = max of the bit patterns of |q| over the pairs where x and q are finite (non-negative doubles order
// like their bits), for OperandAccumulator's |x| > max|q| saturation test. *qmax_bits starts at 0. Grid-stride.
template <typename TX, typename TQ>
__global__ void operand_qmax(const TX* __restrict__ x, const TQ* __restrict__ q, long long n,
                             unsigned long long* __restrict__ qmax_bits) {
    unsigned long long m = 0ull;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double xv = to_double(x[i]), qv = to_double(q[i]);
        if (finite_d(xv) && finite_d(qv)) {
            const unsigned long long bits = (unsigned long long)__double_as_longlong(fabs(qv));
            m = bits > m ? bits : m;
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const unsigned long long o = __shfl_xor_sync(FULL_MASK, m, off);
        m = o > m ? o : m;
    }
    if ((threadIdx.x & 31) == 0 && m) atomicMax(qmax_bits, m);
}

// Per SUM_BLOCK b of an operand x and its dequantised value q: slot[2 b], slot[2 b + 1] = Σx², Σ(x−q)² over the
// pairs where both are finite; counts[5 b .. 5 b + 4] = finite x, finite non-zero x, those with q == 0 (underflow),
// finite x saturated (has_sat: sat[i] != 0; else |x| > max|q|, *qmax_bits from operand_qmax), finite x with a
// NaN/±Inf q. Threads as error_sums_blocks.
template <typename TX, typename TQ>
__global__ void operand_sums_blocks(const TX* __restrict__ x, const TQ* __restrict__ q,
                                    const uint8_t* __restrict__ sat, int has_sat,
                                    const unsigned long long* __restrict__ qmax_bits, long long n,
                                    double* __restrict__ slot, long long* __restrict__ counts) {
    const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long b = g / SUM_LANES;
    const long long nb = (n + SUM_BLOCK - 1) / SUM_BLOCK;
    const double qmax = __longlong_as_double((long long)*qmax_bits);
    double v[2] = {0.0, 0.0};                   // Σx², Σ(x−q)²
    long long c[5] = {0, 0, 0, 0, 0};           // finite x, non-zero, underflow, saturated, q not finite
    if (b < nb) {
        const long long lo = b * SUM_BLOCK, hi = lo + SUM_BLOCK < n ? lo + SUM_BLOCK : n;
        for (long long i = lo + g % SUM_LANES; i < hi; i += SUM_LANES) {
            const double xv = to_double(x[i]), qv = to_double(q[i]);
            const bool okx = finite_d(xv), okq = finite_d(qv), ok = okx && okq, nz = okx && xv != 0.0;
            const double x0 = ok ? xv : 0.0, e = __dsub_rn(x0, ok ? qv : 0.0);
            v[0] = __dadd_rn(v[0], __dmul_rn(x0, x0));
            v[1] = __dadd_rn(v[1], __dmul_rn(e, e));
            const bool s = has_sat ? sat[i] != 0 : fabs(xv) > qmax;
            c[0] += okx;
            c[1] += nz;
            c[2] += nz && qv == 0.0;
            c[3] += okx && s;
            c[4] += okx && !okq;
        }
    }
    store_block<2>(v, c, g, nb, slot, counts);
}

// out = [Σ_b slot[b][k] for k < nsums, in block order from 0.0; max_b slot[b][k] for nsums <= k < width;
// Σ_b counts[b][c] for c < ncounts, as doubles (exact below 2^53)] over nb blocks. One thread per output
// (a single block of >= width + ncounts threads).
__global__ void sums_finish(const double* __restrict__ slot, int width, int nsums,
                            const long long* __restrict__ counts, int ncounts, long long nb,
                            double* __restrict__ out) {
    const int t = threadIdx.x;
    if (t < nsums) {
        double s = 0.0;
        for (long long b = 0; b < nb; ++b) s = __dadd_rn(s, slot[b * width + t]);
        out[t] = s;
    } else if (t < width) {
        double m = 0.0;
        for (long long b = 0; b < nb; ++b) m = slot[b * width + t] > m ? slot[b * width + t] : m;
        out[t] = m;
    } else if (t < width + ncounts) {
        long long c = 0;
        for (long long b = 0; b < nb; ++b) c += counts[b * ncounts + (t - width)];
        out[t] = (double)c;
    }
}
