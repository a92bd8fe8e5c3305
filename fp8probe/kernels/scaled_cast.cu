// OCP FP8 (E4M3FN / E5M2) scaled casts with per-tensor, per-row, per-tile and MX (1x32, E8M0) scales, and
// the 4/6-bit element formats of MXFP4 / MXFP6 / NVFP4 (codes in uint8; scales computed by the launcher).
//
// Every granularity is a tiling of the 2-D view x[rows, cols] (last dim = cols) into tiles of
// tile_r x tile_c elements (edge tiles may be partial), one scale per tile, tiles numbered row-major:
//   tensor = (rows, cols), row = (1, cols), block = (1,128) / (128,128), MX = (1, 32).
// Scale convention (docs/architecture.md): x_hp ~= float(data_lp) * scale, so the cast computes
// data = fp8_satfinite_rne(fl32(x / scale)) with IEEE division, and the dequant
// y = cast<T>(fl32(float(data) * scale)). The launcher derives the scales from the tile amax with the
// same torch expression the reference uses, so only the elementwise work lives here.
#include "common.cuh"

#define FMT_E4M3 0
#define FMT_E5M2 1

// fp32 -> fp8 bits with the semantics of the reference `fp8_saturate(y).to(float8)`: finite values
// round to nearest even and saturate to ±max; NaN -> 0x7f | sign (torch's encoding); ±Inf -> ±448
// for E4M3FN (it has no Inf) and ±Inf for E5M2 (checked against torch in tests/test_kernels_host.py).
__device__ __forceinline__ uint8_t float_to_e4m3_satfinite(float f) {
    const uint32_t x = __float_as_uint(f);
    const uint8_t sign = (uint8_t)((x >> 24) & 0x80u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint8_t)(sign | 0x7fu);                 // NaN
    if (ax >= 0x43e00000u) return (uint8_t)(sign | 0x7eu);                 // |f| >= 448 (and Inf) -> 448
    if (ax >= 0x3c800000u) {                                                // >= 2^-6: normal
        const uint32_t odd = (ax >> 20) & 1u;
        const uint32_t r = (ax - 0x3c000000u + 0x7ffffu + odd) >> 20;       // rebias 127 -> 7, RNE
        return (uint8_t)(sign | r);                                         // r <= 0x7e: 448 is exact
    }
    // subnormal: m * 2^-9; |f| * 2^9 is exact and rintf rounds half to even (8 = min normal 2^-6)
    return (uint8_t)(sign | (uint32_t)rintf(__fmul_rn(__uint_as_float(ax), 512.0f)));
}

__device__ __forceinline__ uint8_t float_to_e5m2_satfinite(float f) {
    const uint32_t x = __float_as_uint(f);
    const uint8_t sign = (uint8_t)((x >> 24) & 0x80u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint8_t)(sign | 0x7fu);
    if (ax == 0x7f800000u) return (uint8_t)(sign | 0x7cu);                 // ±Inf
    if (ax >= 0x47600000u) return (uint8_t)(sign | 0x7bu);                 // |f| >= 57344 -> 57344
    if (ax >= 0x38800000u) {                                                // >= 2^-14: normal
        const uint32_t odd = (ax >> 21) & 1u;
        const uint32_t r = (ax - 0x38000000u + 0xfffffu + odd) >> 21;       // rebias 127 -> 15, RNE
        return (uint8_t)(sign | r);
    }
    // subnormal: m * 2^-16
    return (uint8_t)(sign | (uint32_t)rintf(__fmul_rn(__uint_as_float(ax), 65536.0f)));
}

__device__ __forceinline__ float e4m3_to_float(uint8_t b) {
    const uint32_t sign = (uint32_t)(b & 0x80u) << 24;
    const uint32_t exp = (b >> 3) & 0xfu, man = b & 0x7u;
    if ((b & 0x7fu) == 0x7fu) return __uint_as_float(sign | 0x7fc00000u);  // the only NaN encoding
    if (exp == 0u) return __uint_as_float(sign | __float_as_uint((float)man * 0.001953125f));  // 2^-9
    return __uint_as_float(sign | ((exp + 120u) << 23) | (man << 20));
}

__device__ __forceinline__ float e5m2_to_float(uint8_t b) {
    const uint32_t sign = (uint32_t)(b & 0x80u) << 24;
    const uint32_t exp = (b >> 2) & 0x1fu, man = b & 0x3u;
    if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 21));    // Inf / NaN
    if (exp == 0u) return __uint_as_float(sign | __float_as_uint((float)man * 1.52587890625e-5f));  // 2^-16
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 21));
}

// Where a walk over the elements start, start + step, start + 2 * step, ... (row-major order) of a tile
// w wide begins (er, ec) and how far each step moves it (sq rows, sr columns): two divisions per tile
// width, none per element.
template <typename I>
struct TileStride { I er, ec, sq, sr; };

template <typename I>
__device__ __forceinline__ TileStride<I> tile_stride(I start, I step, I w) {
    TileStride<I> p;
    p.er = start / w;
    p.ec = start - p.er * w;
    p.sq = step / w;
    p.sr = step - p.sq * w;
    return p;
}

// Elements per lane loaded before any is reduced in tile_maxima (independent loads in flight).
#define AMAX_UNROLL 4

// Folds the magnitudes of the walk p over the h x w tile whose first element is x[r0, c0] of the view
// (`cols` wide) into two maxima: `finite` over finite values (the reference's amax) and `all` over every
// value (a NaN magnitude then wins the bit-pattern max, like torch.amax; Inf is 0x7f800000). Past the
// tile's end a lane folds +0, which changes neither maximum.
template <typename T, typename I>
__device__ __forceinline__ void tile_maxima(const T* __restrict__ x, I cols, I r0, I c0, I h, I w,
                                            TileStride<I> p, uint32_t& finite, uint32_t& all) {
    I er = p.er, ec = p.ec;
    while (er < h) {
        float v[AMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < AMAX_UNROLL; ++u) {
            v[u] = 0.0f;
            if (er < h) {
                v[u] = to_float(x[(r0 + er) * cols + c0 + ec]);
                er += p.sq;
                ec += p.sr;
                if (ec >= w) { ec -= w; ++er; }
            }
        }
#pragma unroll
        for (int u = 0; u < AMAX_UNROLL; ++u) {
            all = max_u32(all, abs_bits(v[u]));
            if (is_finite_f(v[u])) finite = max_u32(finite, abs_bits(v[u]));
        }
    }
}

// Tile t's corner (r0, c0) and extent h x w, partial at the bottom/right edges.
template <typename I>
__device__ __forceinline__ void tile_box(I t, I rows, I cols, I tile_r, I tile_c, I tiles_c,
                                         I& r0, I& c0, I& h, I& w) {
    const I tr = t / tiles_c, tc = t - tr * tiles_c;
    r0 = tr * tile_r;
    c0 = tc * tile_c;
    h = min(tile_r, rows - r0);
    w = min(tile_c, cols - c0);
}

template <typename T, typename I>
__device__ __forceinline__ void amax_tiles_body(const T* __restrict__ x, float* __restrict__ amax,
                                                float* __restrict__ amax_all, I rows, I cols, I tile_r,
                                                I tile_c, int with_all, uint32_t* s_red) {
    const I tiles_c = (cols + tile_c - 1) / tile_c;
    const I t = (I)blockIdx.x;
    I r0, c0, h, w;
    tile_box(t, rows, cols, tile_r, tile_c, tiles_c, r0, c0, h, w);
    const I start = (I)blockIdx.y * blockDim.x + threadIdx.x, step = (I)gridDim.y * blockDim.x;
    uint32_t finite = 0u, all = 0u;
    tile_maxima(x, cols, r0, c0, h, w, tile_stride(start, step, w), finite, all);
    finite = block_max_u32(finite, s_red);
    if (threadIdx.x == 0) atomicMax((unsigned int*)(amax + t), finite);
    if (with_all) {                                       // uniform: every thread reaches the barriers
        all = block_max_u32(all, s_red);
        if (threadIdx.x == 0) atomicMax((unsigned int*)(amax_all + t), all);
    }
}

// Large tiles (rows, per-tensor, 128x128): block (bx, by) reduces elements by * blockDim.x + threadIdx.x,
// stepping gridDim.y * blockDim.x, of tile bx, so a single huge tile is still spread over many blocks;
// partial maxima meet in atomicMax on the bit patterns of zero-initialised buffers. amax[t] = max |x|
// over tile t's finite elements; amax_all[t] (written only when with_all) = max over all of them.
// Clamping the tile to the view (here and below) changes no tile number and keeps 32-bit math in range.
template <typename T>
__global__ void amax_tiles(const T* __restrict__ x, float* __restrict__ amax, float* __restrict__ amax_all,
                           long long rows, long long cols, long long tile_r, long long tile_c, int with_all) {
    __shared__ uint32_t s_red[32];
    tile_r = min(tile_r, rows);
    tile_c = min(tile_c, cols);
    if (rows * cols <= INDEX32_MAX) {
        amax_tiles_body<T, unsigned>(x, amax, amax_all, (unsigned)rows, (unsigned)cols, (unsigned)tile_r,
                                     (unsigned)tile_c, with_all, s_red);
    } else {
        amax_tiles_body<T, long long>(x, amax, amax_all, rows, cols, tile_r, tile_c, with_all, s_red);
    }
}

template <typename T, typename I>
__device__ __forceinline__ void amax_tiles_small_body(const T* __restrict__ x, float* __restrict__ amax,
                                                      float* __restrict__ amax_all, I rows, I cols, I tile_r,
                                                      I tile_c, int group, int with_all) {
    const I tiles_c = (cols + tile_c - 1) / tile_c;
    const I ntiles = (rows + tile_r - 1) / tile_r * tiles_c;
    const int lane = (int)(threadIdx.x & 31u);
    const I start = (I)(lane % group), per_warp = (I)(32 / group);
    const TileStride<I> full = tile_stride(start, (I)group, tile_c);   // every tile but the right edge's
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long t0 = (((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * per_warp; t0 < ntiles;
         t0 += warps * per_warp) {
        const I t = (I)t0 + (I)(lane / group);
        uint32_t finite = 0u, all = 0u;
        if (t < ntiles) {
            I r0, c0, h, w;
            tile_box(t, rows, cols, tile_r, tile_c, tiles_c, r0, c0, h, w);
            tile_maxima(x, cols, r0, c0, h, w, w == tile_c ? full : tile_stride(start, (I)group, w), finite, all);
        }
        for (int off = group >> 1; off > 0; off >>= 1) {  // xor < group stays inside the lane group
            finite = max_u32(finite, __shfl_xor_sync(0xffffffffu, finite, off));
            all = max_u32(all, __shfl_xor_sync(0xffffffffu, all, off));
        }
        if (t < ntiles && start == 0) {
            amax[t] = __uint_as_float(finite);
            if (with_all) amax_all[t] = __uint_as_float(all);
        }
    }
}

// Small tiles (1x16, 1x32, 1x128, 16x16, short rows): a group of `group` lanes (a power of two <= 32;
// the launcher picks ~4 elements per lane, e.g. 4 lanes per 1x16 tile) reduces one whole tile, 32 / group
// tiles per warp, warps striding over the tiles; each tile's maxima are written once (no atomics, no
// zero-initialisation). The tile loop's trip count depends only on the warp, so all 32 lanes reach every
// full-mask shuffle; lanes without a tile reduce zeros. blockDim.x is a multiple of 32. Outputs as
// amax_tiles.
template <typename T>
__global__ void amax_tiles_small(const T* __restrict__ x, float* __restrict__ amax, float* __restrict__ amax_all,
                                 long long rows, long long cols, long long tile_r, long long tile_c, int group,
                                 int with_all) {
    tile_r = min(tile_r, rows);
    tile_c = min(tile_c, cols);
    if (rows * cols <= INDEX32_MAX) {
        amax_tiles_small_body<T, unsigned>(x, amax, amax_all, (unsigned)rows, (unsigned)cols, (unsigned)tile_r,
                                           (unsigned)tile_c, group, with_all);
    } else {
        amax_tiles_small_body<T, long long>(x, amax, amax_all, rows, cols, tile_r, tile_c, group, with_all);
    }
}

// data[i] = fp8(fl32(x[i] / scale[tile(i)])), saturating, RNE.
template <typename T>
__global__ void cast_to_fp8(const T* __restrict__ x, const float* __restrict__ scale,
                            uint8_t* __restrict__ data, long long rows, long long cols,
                            long long tile_r, long long tile_c, int fmt) {
    map_tiles(x, scale, data, rows, cols, tile_r, tile_c, SameScale(), [=](T xv, float s) -> uint8_t {
        const float v = __fdiv_rn(to_float(xv), s);
        return fmt == FMT_E4M3 ? float_to_e4m3_satfinite(v) : float_to_e5m2_satfinite(v);
    });
}

// out[i] = cast<T>(fl32(float(data[i]) * scale[tile(i)])).
template <typename T>
__global__ void cast_from_fp8(const uint8_t* __restrict__ data, const float* __restrict__ scale,
                              T* __restrict__ out, long long rows, long long cols,
                              long long tile_r, long long tile_c, int fmt) {
    map_tiles(data, scale, out, rows, cols, tile_r, tile_c, SameScale(), [=](uint8_t b, float s) -> T {
        const float v = fmt == FMT_E4M3 ? e4m3_to_float(b) : e5m2_to_float(b);
        return from_float<T>(__fmul_rn(v, s));
    });
}

// ---------------------------------------------------------------------------------------------
// OCP MX 4/6-bit element formats (no Inf/NaN codes), one code per uint8: sign bit at 2^(ebits+mbits),
// then exponent and mantissa fields. FMT_E2M1 (2,1, bias 1) for MXFP4 and NVFP4, FMT_E2M3 (2,3,1) and
// FMT_E3M2 (3,2,3) for MXFP6. Same float32 steps as reference.lowbit_encode / quantize_scaled.
#define FMT_E2M1 2
#define FMT_E2M3 3
#define FMT_E3M2 4

__device__ __forceinline__ void lowbit_fields(int fmt, int& ebits, int& mbits, int& bias) {
    ebits = fmt == FMT_E3M2 ? 3 : 2;
    mbits = fmt == FMT_E2M1 ? 1 : fmt == FMT_E2M3 ? 3 : 2;
    bias = fmt == FMT_E3M2 ? 3 : 1;
}

// 2^k for |k| <= 126, built from its bit pattern: ldexpf/exp2f compile to the approximate,
// flush-to-zero ex2.approx.ftz instruction.
__device__ __forceinline__ float pow2f(int k) {
    return __uint_as_float((uint32_t)(127 + k) << 23);
}

// y finite with |y| <= the format max: e = max(floor(log2|y|), emin), n = rne(|y| * 2^(mbits - e))
// (an exact power-of-two scaling; rintf rounds half to even), code = (e - emin) * 2^mbits + n, which
// covers subnormals and the carry into the next binade alike.
__device__ __forceinline__ uint8_t float_to_lowbit(float y, int fmt) {
    int ebits, mbits, bias;
    lowbit_fields(fmt, ebits, mbits, bias);
    const int emin = 1 - bias;
    const float a = fabsf(y);
    // floor(log2 a) from the biased exponent field; fp32 subnormals (and 0) lie far below every emin
    const int e = max((int)((__float_as_uint(a) >> 23) & 0xffu) - 127, emin);
    const float n = rintf(__fmul_rn(a, pow2f(mbits - e)));
    const uint32_t sign = (__float_as_uint(y) >> 31) << (ebits + mbits);
    return (uint8_t)(sign | (uint32_t)(((e - emin) << mbits) + (int)n));
}

__device__ __forceinline__ float lowbit_to_float(uint8_t c, int fmt) {
    int ebits, mbits, bias;
    lowbit_fields(fmt, ebits, mbits, bias);
    const int e = (c >> mbits) & ((1 << ebits) - 1), m = c & ((1 << mbits) - 1);
    // small integers times powers of two: exact in float32
    const float mag = e == 0 ? __fmul_rn((float)m, pow2f(1 - bias - mbits))
                             : __fmul_rn((float)((1 << mbits) + m), pow2f(e - bias - mbits));
    return (c >> (ebits + mbits)) & 1 ? -mag : mag;
}

// data[i] = code(clamp(fl32(v / divisor[tile(i)]), ±fmax)) with v = x[i], NaN -> 0, ±Inf -> ±fmax; a
// zero divisor (NVFP4 block scale flushed to 0) encodes v * 0.
template <typename T>
__global__ void cast_to_lowbit(const T* __restrict__ x, const float* __restrict__ divisor,
                               uint8_t* __restrict__ data, long long rows, long long cols,
                               long long tile_r, long long tile_c, int fmt, float fmax) {
    map_tiles(x, divisor, data, rows, cols, tile_r, tile_c, SameScale(), [=](T xv, float d) -> uint8_t {
        float v = to_float(xv);
        if (v != v) v = 0.0f;
        else if (!is_finite_f(v)) v = copysignf(fmax, v);
        float y = d > 0.0f ? __fdiv_rn(v, d) : __fmul_rn(v, 0.0f);
        y = fminf(fmaxf(y, -fmax), fmax);
        return float_to_lowbit(y, fmt);
    });
}

// out[i] = cast<T>(fl32(fl32(value(data[i]) * scale[tile(i)]) * post)), post = *post_ptr: NVFP4's tensor scale,
// else 1. A device pointer, not a float argument: the host would have to wait for the GPU to read the scale.
template <typename T>
__global__ void cast_from_lowbit(const uint8_t* __restrict__ data, const float* __restrict__ scale,
                                 T* __restrict__ out, long long rows, long long cols,
                                 long long tile_r, long long tile_c, int fmt, const float* __restrict__ post_ptr) {
    const float post = *post_ptr;
    map_tiles(data, scale, out, rows, cols, tile_r, tile_c, SameScale(), [=](uint8_t c, float s) -> T {
        return from_float<T>(__fmul_rn(__fmul_rn(lowbit_to_float(c, fmt), s), post));
    });
}
