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
    double r2 = 0.0, e2 = 0.0, q2 = 0.0, rq = 0.0, mx = 0.0;
    long long ok_n = 0, okr_n = 0;
    if (b < nb) {
        const long long lo = b * SUM_BLOCK, hi = lo + SUM_BLOCK < n ? lo + SUM_BLOCK : n;
        for (long long i = lo + g % SUM_LANES; i < hi; i += SUM_LANES) {
            const double rv = to_double(r[i]), qv = to_double(q[i]);
            const bool okr = finite_d(rv), ok = okr && finite_d(qv);
            const double r0 = ok ? rv : 0.0, q0 = ok ? qv : 0.0, e = __dsub_rn(r0, q0), ae = fabs(e);
            r2 = __dadd_rn(r2, __dmul_rn(r0, r0));
            e2 = __dadd_rn(e2, __dmul_rn(e, e));
            q2 = __dadd_rn(q2, __dmul_rn(q0, q0));
            rq = __dadd_rn(rq, __dmul_rn(r0, q0));
            mx = ae > mx ? ae : mx;
            ok_n += ok;
            okr_n += okr;
        }
    }
    r2 = lanes_sum(r2);
    e2 = lanes_sum(e2);
    q2 = lanes_sum(q2);
    rq = lanes_sum(rq);
    mx = lanes_max(mx);
    ok_n = lanes_count(ok_n);
    okr_n = lanes_count(okr_n);
    if (b < nb && g % SUM_LANES == 0) {
        double* s = slot + 5 * b;
        s[0] = r2; s[1] = e2; s[2] = q2; s[3] = rq; s[4] = mx;
        counts[2 * b] = ok_n;
        counts[2 * b + 1] = okr_n;
    }
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
    double x2 = 0.0, e2 = 0.0;
    long long c_fin = 0, c_nz = 0, c_under = 0, c_sat = 0, c_qbad = 0;
    if (b < nb) {
        const long long lo = b * SUM_BLOCK, hi = lo + SUM_BLOCK < n ? lo + SUM_BLOCK : n;
        for (long long i = lo + g % SUM_LANES; i < hi; i += SUM_LANES) {
            const double xv = to_double(x[i]), qv = to_double(q[i]);
            const bool okx = finite_d(xv), okq = finite_d(qv), ok = okx && okq, nz = okx && xv != 0.0;
            const double x0 = ok ? xv : 0.0, e = __dsub_rn(x0, ok ? qv : 0.0);
            x2 = __dadd_rn(x2, __dmul_rn(x0, x0));
            e2 = __dadd_rn(e2, __dmul_rn(e, e));
            const bool s = has_sat ? sat[i] != 0 : fabs(xv) > qmax;
            c_fin += okx;
            c_nz += nz;
            c_under += nz && qv == 0.0;
            c_sat += okx && s;
            c_qbad += okx && !okq;
        }
    }
    x2 = lanes_sum(x2);
    e2 = lanes_sum(e2);
    c_fin = lanes_count(c_fin);
    c_nz = lanes_count(c_nz);
    c_under = lanes_count(c_under);
    c_sat = lanes_count(c_sat);
    c_qbad = lanes_count(c_qbad);
    if (b < nb && g % SUM_LANES == 0) {
        slot[2 * b] = x2;
        slot[2 * b + 1] = e2;
        long long* c = counts + 5 * b;
        c[0] = c_fin; c[1] = c_nz; c[2] = c_under; c[3] = c_sat; c[4] = c_qbad;
    }
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
