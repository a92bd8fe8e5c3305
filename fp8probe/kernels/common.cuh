// Shared device helpers for the fp8probe kernels: 16-bit storage types, exact conversions, reductions.
//
// Why no <cuda_fp16.h>/<cuda_bf16.h>/<cuda_fp8.h>: NVRTC from the pip wheel has no CUDA headers and a
// fresh CI machine has no toolkit, so every conversion is written from the bit layout here. All
// conversions are round-to-nearest-even (RNE), exactly like torch's `.to(dtype)` on finite values.
// Every float operation that the PyTorch reference performs as a separate rounded op is written with
// an explicit `__f*_rn` intrinsic so that FMA contraction can never merge two roundings into one.

typedef unsigned char uint8_t;
typedef signed char int8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;

// Storage-only 16-bit float types: the kernels read/write raw bits and compute in fp32.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));   // Inf / NaN
    if (exp == 0u) {
        // subnormal: man * 2^-24 is exact in fp32 (man < 2^10, 2^-24 is a normal fp32 number)
        const float mag = (float)man * 5.9604644775390625e-8f;
        return __uint_as_float(sign | __float_as_uint(mag));
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));           // 112 = 127 - 15
}

__device__ __forceinline__ uint16_t float_to_half_bits_rn(float f) {
    const uint32_t x = __float_as_uint(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);                     // NaN -> quiet NaN
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                    // >= 65520 rounds to Inf
    if (ax >= 0x38800000u) {                                                     // >= 2^-14: normal half
        const uint32_t odd = (ax >> 13) & 1u;
        ax = ax - 0x38000000u + 0xfffu + odd;                                    // rebias 127->15, RNE
        return (uint16_t)(sign | (ax >> 13));
    }
    // subnormal half: |f| * 2^24 is exact; rintf rounds half to even; 1024 encodes the min normal
    const float scaled = __fmul_rn(__uint_as_float(ax), 16777216.0f);
    return (uint16_t)(sign | (uint32_t)rintf(scaled));
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) {
    return __uint_as_float((uint32_t)b << 16);
}

__device__ __forceinline__ uint16_t float_to_bf16_bits_rn(float f) {
    const uint32_t x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((x >> 16) & 0x8000u) | 0x7fc0u);  // NaN
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);                   // RNE, overflow -> Inf
}

// Load any supported input type as fp32 (exact for all three), store fp32 as that type (RNE).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half_t v) { return half_bits_to_float(v.bits); }
__device__ __forceinline__ float to_float(bf16_t v) { return bf16_bits_to_float(v.bits); }

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float f) {
    half_t h; h.bits = float_to_half_bits_rn(f); return h;
}
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float f) {
    bf16_t h; h.bits = float_to_bf16_bits_rn(f); return h;
}

__device__ __forceinline__ bool is_finite_f(float f) {
    return (__float_as_uint(f) & 0x7f800000u) != 0x7f800000u;
}

__device__ __forceinline__ bool is_nan_f(float f) {
    return (__float_as_uint(f) & 0x7fffffffu) > 0x7f800000u;
}

// Magnitudes are reduced as the bit patterns of fabsf(x): for non-negative floats (incl. +Inf) the
// unsigned order equals the float order, and a NaN magnitude (0x7f800001 and up) is larger than
// everything, so a max over bits PROPAGATES NaN exactly like torch.amax. Kernels that must ignore NaN
// skip those elements before reducing. Max is exact and order-independent, so the reduction order
// cannot change any result (unlike a sum).
__device__ __forceinline__ uint32_t abs_bits(float f) { return __float_as_uint(f) & 0x7fffffffu; }

__device__ __forceinline__ uint32_t max_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }

// Block-wide max of uint32 values; every thread gets the result. blockDim.x must be a multiple of 32;
// `smem` holds >= 32 words.
__device__ __forceinline__ uint32_t block_max_u32(uint32_t v, uint32_t* smem) {
    for (int off = 16; off > 0; off >>= 1) v = max_u32(v, __shfl_xor_sync(0xffffffffu, v, off));
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (int)((blockDim.x + 31) >> 5);   // launches use multiples of 32; the
                                                       // round-up keeps 1-thread host emulation exact
    __syncthreads();                      // smem may still be read by a previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < nwarps) ? smem[lane] : 0u;
        for (int off = 16; off > 0; off >>= 1) v = max_u32(v, __shfl_xor_sync(0xffffffffu, v, off));
        if (lane == 0) smem[0] = v;
    }
    __syncthreads();
    return smem[0];
}

// Block-wide logical OR; every thread gets the result.
__device__ __forceinline__ int block_or(int v, int* smem) {
    __syncthreads();
    if (threadIdx.x == 0) smem[0] = 0;
    __syncthreads();
    if (v) atomicOr(smem, 1);
    __syncthreads();
    return smem[0];
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels over a tiled 2-D view: 4 contiguous elements per thread, vector loads/stores
// where aligned, 32-bit index math where the tensor allows it, no division per element.

// Largest element count for which the kernels use `unsigned` indices: every index, tile number and
// row/column product is then < 2^31, and i + a grid stride (<= 2^30: at most 2^20 blocks of 256 threads,
// 4 elements each, the launchers' cap) stays below 2^32.
#define INDEX32_MAX 0x7fffffffLL

// Four contiguous elements as one aligned load/store (ld.global.v4.f32 for float, one 64-bit access for
// 16-bit types, one 32-bit access for bytes).
template <typename T> struct alignas(4 * sizeof(T)) Pack4 { T v[4]; };

template <typename T>
__device__ __forceinline__ bool pack4_aligned(const T* p) {
    return (reinterpret_cast<unsigned long long>(p) % sizeof(Pack4<T>)) == 0;
}

// Tile bookkeeping while stepping through consecutive elements of the row-major [rows, cols] view cut
// into tile_r x tile_c tiles (numbered row-major, tiles_c per tile row): one set of divisions where a
// segment starts, then increments. All sizes are pre-clamped (tile_r <= rows, tile_c <= cols).
template <typename I>
struct TileCursor {
    I r, c, tile, left;   // current element's row, column, tile, and elements left in its tile's row span
    __device__ __forceinline__ TileCursor(I i, I cols, I tile_r, I tile_c, I tiles_c) {
        r = i / cols;
        c = i - r * cols;
        const I tc = c / tile_c;
        tile = (r / tile_r) * tiles_c + tc;
        const I end = tile_c * (tc + 1);                 // <= cols + tile_c <= 2 * cols: fits I
        left = (end < cols ? end : cols) - c;
    }
    // Step to the next element (which must exist); true when it lies in another tile.
    __device__ __forceinline__ bool next(I cols, I tile_r, I tile_c, I tiles_c) {
        ++c;
        if (c == cols) {
            c = 0;
            ++r;
            tile = (r / tile_r) * tiles_c;
            left = tile_c;
            return true;
        }
        if (--left == 0) {
            ++tile;
            left = tile_c < cols - c ? tile_c : cols - c;
            return true;
        }
        return false;
    }
};

// out[i] = f(in[i], prep(scale[tile(i)])) for all n = rows * cols elements; each thread takes 4
// contiguous elements per grid-stride step and loads (and prepares) a tile's scale once per run of
// elements in that tile. Vector accesses need both pointers aligned to a Pack4 (torch allocations are;
// a view with an odd storage offset takes the scalar path) and a full group of 4 (the tail is scalar).
template <typename I, typename In, typename Out, typename P, typename F>
__device__ __forceinline__ void map_tiles_n(const In* __restrict__ in, const float* __restrict__ scale,
                                            Out* __restrict__ out, I n, I cols, I tile_r, I tile_c,
                                            I tiles_c, P prep, F f) {
    const bool vec = pack4_aligned(in) && pack4_aligned(out);
    const I stride = (I)gridDim.x * blockDim.x * 4;
    for (I i0 = ((I)blockIdx.x * blockDim.x + threadIdx.x) * 4; i0 < n; i0 += stride) {
        const bool full = vec && n - i0 >= 4;
        Pack4<In> src;
        if (full) {
            src = *reinterpret_cast<const Pack4<In>*>(in + i0);
        } else {
            for (int k = 0; k < 4; ++k) if (i0 + k < n) src.v[k] = in[i0 + k];
        }
        Pack4<Out> dst;
        TileCursor<I> cur(i0, cols, tile_r, tile_c, tiles_c);
        float s = prep(scale[cur.tile]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (i0 + k >= n) break;
            if (k > 0 && cur.next(cols, tile_r, tile_c, tiles_c)) s = prep(scale[cur.tile]);
            dst.v[k] = f(src.v[k], s);
        }
        if (full) {
            *reinterpret_cast<Pack4<Out>*>(out + i0) = dst;
        } else {
            for (int k = 0; k < 4; ++k) if (i0 + k < n) out[i0 + k] = dst.v[k];
        }
    }
}

// The identity `prep` of map_tiles: kernels whose per-tile value is used as loaded.
struct SameScale {
    __device__ __forceinline__ float operator()(float s) const { return s; }
};

// map_tiles_n over the [rows, cols] view with 32-bit indices when rows * cols <= INDEX32_MAX. Clamping
// the tile to the view changes no tile number (a tile at least as tall/wide as the view covers it).
// Any grid of at most 2^20 blocks of <= 256 threads works: the loop is grid-stride.
template <typename In, typename Out, typename P, typename F>
__device__ __forceinline__ void map_tiles(const In* __restrict__ in, const float* __restrict__ scale,
                                          Out* __restrict__ out, long long rows, long long cols,
                                          long long tile_r, long long tile_c, P prep, F f) {
    tile_r = min(tile_r, rows);
    tile_c = min(tile_c, cols);
    const long long tiles_c = (cols + tile_c - 1) / tile_c;
    if (rows * cols <= INDEX32_MAX) {
        map_tiles_n<unsigned>(in, scale, out, (unsigned)(rows * cols), (unsigned)cols, (unsigned)tile_r,
                              (unsigned)tile_c, (unsigned)tiles_c, prep, f);
    } else {
        map_tiles_n<long long>(in, scale, out, rows * cols, cols, tile_r, tile_c, tiles_c, prep, f);
    }
}
