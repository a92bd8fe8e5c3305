/* fp8probe._fastpath: C99 CPU kernels for blockwise codebook quantise/dequantise, bit-exact with
 * fp8probe/backends/reference.py.
 *
 * Plain C (no torch headers): functions take raw addresses (tensor.data_ptr()) and sizes, release
 * the GIL and split the work over pthreads (not OpenMP: torch's wheel bundles its own libgomp and two
 * OpenMP runtimes in one process oversubscribe). Built with -ffp-contract=off so a*b+c is never fused
 * into an FMA; every float operation below is one IEEE binary32 operation, in the reference's order:
 *
 *   absmax = max |x| over the block      (done on the bit patterns: |x| bits ordered like |x|)
 *   s      = fl32(1 / absmax)
 *   xn     = fl32(x * s), except xn = x where x == ±0 (zero / tiny-absmax block: s = inf)
 *   q      = #{i : xn >= T_i}            (reference._search_tables: base[bits >> 16] + M compares)
 *   y      = cast(fl32(code[q] * absmax)) with a round-to-nearest-even cast to fp16 / bf16
 *
 * Non-finite inputs are not handled here: the quantiser returns 1 when a block holds NaN/±Inf
 * (and the dequantiser when absmax or code does) and the Python wrapper re-runs the reference.
 * x86-64 machines with AVX2+F16C get hand-written 8-wide loops, selected at run time; the scalar
 * loops compute exactly the same values everywhere else (and for the tails).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define FP_X86 1
#else
#define FP_X86 0
#endif

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define MAX_THREADS 256
/* Below this many elements one thread does everything. A pthread_create/join pair costs ~20-60 us (57-62 us on
 * a 2-core AMD EPYC VM), and the second thread then reads its half from the other core's caches. Measured there
 * (benchmarks/bench_threads.py: one process, the cutoff switched between 64K and this one; fused_scaled e4m3
 * per tensor / mxfp8 1x32, error_sums): at 74K-197K elements two threads took 1.0-2.2x one thread's time and up
 * to 2.7x its CPU time; at 332K-393K about the same time for ~1.5x the CPU; at 590K-885K they gain (mxfp8
 * 1.2-1.5x, error_sums 1.3-1.5x, the per-tensor cast 1.0-1.1x, in a run against a 1M cutoff). */
#define SERIAL_CUTOFF (1 << 19)
/* The cutoff in use: SERIAL_CUTOFF, or what serial_cutoff() set (tests run the threaded paths on small inputs). */
static size_t g_serial_cutoff = SERIAL_CUTOFF;

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#define NOINLINE __attribute__((noinline))
#else
#define INLINE static inline
#define NOINLINE
#endif

static int g_have_avx2 = 0;

/* A run_units work function NAME(ctx, unit) that runs the AVX2 instantiation AVX2_FN where the CPU has it
 * (g_have_avx2, decided at import) and the scalar one SCALAR_FN elsewhere; CTX: the context type. */
#if FP_X86
#define SIMD_WORK(NAME, CTX, AVX2_FN, SCALAR_FN)                                                 \
    static void NAME(void *vc, size_t u) {                                                       \
        if (g_have_avx2) AVX2_FN((CTX *)vc, u);                                                  \
        else SCALAR_FN((CTX *)vc, u);                                                            \
    }
#else
#define SIMD_WORK(NAME, CTX, AVX2_FN, SCALAR_FN)                                                 \
    static void NAME(void *vc, size_t u) { SCALAR_FN((CTX *)vc, u); }
#endif

/* ---------------------------------------------------------------------------------- conversions */
INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* fp16 -> fp32, exact (every fp16 value is a float32 value). */
INLINE float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return u2f(sign | 0x7f800000u | (m << 13));
    if (e == 0) return u2f(sign | f2u((float)m * 0x1p-24f)); /* subnormal: m * 2^-24, exact */
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

/* fp32 -> fp16, round to nearest even, subnormals kept, overflow to inf; NaN -> quiet NaN (never
 * reached: the dequantiser refuses non-finite inputs, and finite products never make NaN). */
INLINE uint16_t f2h(float f) {
    uint32_t u = f2u(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x47800000u) /* |f| >= 2^16, inf or NaN: fp16 max is 65504 */
        return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (a < 0x38800000u) { /* |f| < 2^-14: fp16 subnormal or zero */
        /* Adding 0.5 puts the 2^-24 grid at float32's last mantissa bit of [0.5, 1): the addition
         * itself rounds to nearest even, and the low bits are the fp16 subnormal mantissa. */
        float t = u2f(a) + 0.5f;
        return sign | (uint16_t)(f2u(t) - 0x3f000000u);
    }
    /* normal: rebias the exponent (127 -> 15), drop 13 bits with RNE; a carry into the exponent
     * (or to 0x7c00 = inf for 65520 <= |f| < 65536) is the right answer. */
    uint32_t odd = (a >> 13) & 1u;
    a += 0xc8000fffu + odd; /* (15 - 127) << 23 in two's complement, + 0xfff rounding bias */
    return sign | (uint16_t)(a >> 13);
}

/* fp32 -> bf16, round to nearest even (finite or inf input; NaN is never passed). */
INLINE uint16_t f2b(float f) {
    uint32_t u = f2u(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

INLINE float load1(const void *p, size_t i, int dt) {
    if (dt == DT_F32) return ((const float *)p)[i];
    if (dt == DT_F16) return h2f(((const uint16_t *)p)[i]);
    return u2f((uint32_t)((const uint16_t *)p)[i] << 16);
}

INLINE void store1(void *p, size_t i, float v, int dt) {
    if (dt == DT_F32) ((float *)p)[i] = v;
    else if (dt == DT_F16) ((uint16_t *)p)[i] = f2h(v);
    else ((uint16_t *)p)[i] = f2b(v);
}

/* ------------------------------------------------------------------------------------ threads */
/* Work is cut into units of about UNIT elements that threads claim from a shared counter: on this
 * shared 2-core box a thread that gets descheduled for a while just claims fewer units, instead of
 * holding up the join with a fixed half of the work. */
#define UNIT ((size_t)1 << 16)
typedef void (*unit_fn)(void *ctx, size_t u);
typedef struct { unit_fn fn; void *ctx; size_t nunits, next; } pool_t;

static void *pool_main(void *arg) {
    pool_t *p = (pool_t *)arg;
    size_t u;
    while ((u = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED)) < p->nunits) p->fn(p->ctx, u);
    return NULL;
}

/* Run main(arg) on the calling thread and on up to min(nt, nunits) - 1 fresh pthreads, which claim units
 * from a counter in arg (a pthread_create/join pair costs ~20-50 us, so they live for one call). If a
 * thread cannot be created the others take its units. */
static void run_threads(void *(*main_fn)(void *), void *arg, size_t nunits, int nt) {
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS];
    if ((size_t)nt > nunits) nt = (int)nunits;
    for (int t = 1; t < nt; t++) started[t] = pthread_create(&th[t], NULL, main_fn, arg) == 0;
    main_fn(arg);
    for (int t = 1; t < nt; t++)
        if (started[t]) pthread_join(th[t], NULL);
}

/* Run fn(ctx, u) for u = 0..nunits-1 on up to nt threads (run_threads). */
static void run_units(unit_fn fn, void *ctx, size_t nunits, int nt) {
    pool_t p = {fn, ctx, nunits, 0};
    run_threads(pool_main, &p, nunits, nt);
}

static int pick_threads(size_t n, int want) {
    if (want < 1) want = 1;
    if (want > MAX_THREADS) want = MAX_THREADS;
    return n < g_serial_cutoff ? 1 : want;
}

/* ------------------------------------------------------------------------ quantise: scalar */
typedef struct {
    const uint8_t *base; /* [65536 + 4] thresholds below each bucket (bucket = top 16 bits of xn) */
    const float *tval;   /* [255 + m] thresholds in ascending order, padded with NaN */
    int m;               /* at most m thresholds inside one bucket */
    /* m <= 1 only, else NULL: per bucket, base (bits 0-7) | 1 << 8 if the bucket holds a threshold |
     * the low 16 bits of that threshold's order key (bits 16-31). Inside one bucket the top 16 bits
     * of every key are equal, so xn >= T is a compare of the low 16 key bits: one gather per
     * element instead of two dependent ones. */
    const uint32_t *packed;
} tables_t;

INLINE uint8_t search1(float xn, const tables_t *T, int m) {
    uint32_t s = T->base[f2u(xn) >> 16];
    uint32_t idx = s;
    for (int t = 0; t < m; t++) idx += xn >= T->tval[s + t];
    return (uint8_t)idx;
}

/* The scalar loops are instantiated per input dtype (and per m for the search) through constant
 * arguments of always-inline bodies: a dtype switch inside the loop ran ~2x slower. */

/* max of the |x| bit patterns over [lo, hi): equals the bits of max |x|; >= 0x7f800000 iff a NaN/Inf. */
INLINE uint32_t absmax_bits_body(const void *x, size_t lo, size_t hi, int dt) {
    uint32_t mx = 0;
    for (size_t i = lo; i < hi; i++) {
        uint32_t a = f2u(load1(x, i, dt)) & 0x7fffffffu;
        mx = a > mx ? a : mx;
    }
    return mx;
}

static uint32_t absmax_bits_scalar(const void *x, size_t lo, size_t hi, int dt) {
    switch (dt) {
    case DT_F32: return absmax_bits_body(x, lo, hi, DT_F32);
    case DT_F16: return absmax_bits_body(x, lo, hi, DT_F16);
    default: return absmax_bits_body(x, lo, hi, DT_BF16);
    }
}

INLINE void quant_body(const void *x, size_t lo, size_t hi, int dt, float recip, uint8_t *q,
                       const tables_t *T, int m) {
    for (size_t i = lo; i < hi; i++) {
        float xi = load1(x, i, dt);
        float xn = xi * recip;
        if (xi == 0.0f) xn = xi; /* keeps ±0 when recip = inf (0 * inf would be NaN) */
        q[i] = search1(xn, T, m);
    }
}

#define QUANT_M(D)                                                                   \
    switch (T->m) {                                                                  \
    case 1: quant_body(x, lo, hi, D, recip, q, T, 1); break;                         \
    case 2: quant_body(x, lo, hi, D, recip, q, T, 2); break;                         \
    default: quant_body(x, lo, hi, D, recip, q, T, T->m); break;                     \
    }

static void quant_scalar(const void *x, size_t lo, size_t hi, int dt, float recip, uint8_t *q,
                         const tables_t *T) {
    switch (dt) {
    case DT_F32: QUANT_M(DT_F32) break;
    case DT_F16: QUANT_M(DT_F16) break;
    default: QUANT_M(DT_BF16) break;
    }
}

/* -------------------------------------------------------------------------- quantise: AVX2 */
#if FP_X86
/* Each AVX2 entry point ends with _mm256_zeroupper(): gcc emits no vzeroupper for target("avx2")
 * functions called from baseline code, and the legacy-SSE instructions that follow with dirty upper
 * YMM halves cost ~1000 cycles per call here (measured: dequant at blocksize 32 ran at 0.33 GB/s).
 * For the same reason the AVX2 functions never call the baseline scalar functions for their tails:
 * they inline the always-inline scalar bodies, which are then VEX-encoded. */
#define AVX2 __attribute__((target("avx2,f16c")))

AVX2 INLINE __m256 load8(const void *x, size_t i, int dt) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    if (dt == DT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2 static uint32_t absmax_bits_avx2(const void *x, size_t lo, size_t hi, int dt) {
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    __m256i m0 = _mm256_setzero_si256(), m1 = m0;
    size_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        m0 = _mm256_max_epi32(m0, _mm256_and_si256(_mm256_castps_si256(load8(x, i, dt)), mask));
        m1 = _mm256_max_epi32(m1, _mm256_and_si256(_mm256_castps_si256(load8(x, i + 8, dt)), mask));
    }
    m0 = _mm256_max_epi32(m0, m1);
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, m0);
    uint32_t mx = absmax_bits_body(x, i, hi, dt); /* inlined: VEX-encoded, see AVX2 note */
    for (int k = 0; k < 8; k++) mx = lanes[k] > mx ? lanes[k] : mx;
    _mm256_zeroupper();
    return mx;
}

AVX2 INLINE __m256i search8(__m256 xv, __m256 rv, const tables_t *T, int m) {
    __m256 xn = _mm256_mul_ps(xv, rv);
    xn = _mm256_blendv_ps(xn, xv, _mm256_cmp_ps(xv, _mm256_setzero_ps(), _CMP_EQ_OQ));
    __m256i bucket = _mm256_srli_epi32(_mm256_castps_si256(xn), 16);
    /* 4-byte gather from the byte table (padded by 4 bytes), low byte kept */
    __m256i s = _mm256_and_si256(_mm256_i32gather_epi32((const int *)T->base, bucket, 1),
                                 _mm256_set1_epi32(0xff));
    __m256i idx = s;
    for (int t = 0; t < m; t++) {
        __m256 th = _mm256_i32gather_ps(T->tval, t ? _mm256_add_epi32(s, _mm256_set1_epi32(t)) : s, 4);
        idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(xn, th, _CMP_GE_OQ)));
    }
    return idx;
}

AVX2 INLINE __m256i search8_packed(__m256 xv, __m256 rv, const tables_t *T) {
    __m256 xn = _mm256_mul_ps(xv, rv);
    xn = _mm256_blendv_ps(xn, xv, _mm256_cmp_ps(xv, _mm256_setzero_ps(), _CMP_EQ_OQ));
    __m256i bits = _mm256_castps_si256(xn);
    __m256i w = _mm256_i32gather_epi32((const int *)T->packed, _mm256_srli_epi32(bits, 16), 4);
    /* order key (reference._order_key): negative floats get their magnitude bits flipped */
    __m256i key = _mm256_xor_si256(bits, _mm256_and_si256(_mm256_srai_epi32(bits, 31), _mm256_set1_epi32(0x7fffffff)));
    __m256i below = _mm256_cmpgt_epi32(_mm256_srli_epi32(w, 16), _mm256_and_si256(key, _mm256_set1_epi32(0xffff)));
    __m256i has = _mm256_cmpeq_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x100)), _mm256_set1_epi32(0x100));
    __m256i ge = _mm256_andnot_si256(below, has); /* -1 where the bucket's threshold <= xn */
    return _mm256_sub_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0xff)), ge);
}

AVX2 INLINE void quant_avx2_packed(const void *x, size_t lo, size_t hi, int dt, float recip, uint8_t *q,
                                   const tables_t *T) {
    const __m256 rv = _mm256_set1_ps(recip);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        __m256i a = search8_packed(load8(x, i, dt), rv, T);
        __m256i b = search8_packed(load8(x, i + 8, dt), rv, T);
        __m256i c = search8_packed(load8(x, i + 16, dt), rv, T);
        __m256i d = search8_packed(load8(x, i + 24, dt), rv, T);
        __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, order));
    }
    quant_body(x, i, hi, dt, recip, q, T, T->m);
}

AVX2 INLINE void quant_avx2_m(const void *x, size_t lo, size_t hi, int dt, float recip, uint8_t *q,
                              const tables_t *T, int m) {
    const __m256 rv = _mm256_set1_ps(recip);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        __m256i a = search8(load8(x, i, dt), rv, T, m);
        __m256i b = search8(load8(x, i + 8, dt), rv, T, m);
        __m256i c = search8(load8(x, i + 16, dt), rv, T, m);
        __m256i d = search8(load8(x, i + 24, dt), rv, T, m);
        /* indices are 0..255: two saturating packs are exact; they interleave 128-bit lanes, the
         * dword permute restores element order */
        __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, order));
    }
    quant_body(x, i, hi, dt, recip, q, T, m);
}

AVX2 static void quant_avx2(const void *x, size_t lo, size_t hi, int dt, float recip, uint8_t *q,
                            const tables_t *T) {
    /* constant m lets the compiler unroll the threshold loop (m <= 2 for every named codebook) */
    if (T->packed && T->m <= 1) {
        switch (dt) {
        case DT_F32: quant_avx2_packed(x, lo, hi, DT_F32, recip, q, T); break;
        case DT_F16: quant_avx2_packed(x, lo, hi, DT_F16, recip, q, T); break;
        default: quant_avx2_packed(x, lo, hi, DT_BF16, recip, q, T); break;
        }
        _mm256_zeroupper();
        return;
    }
    switch (T->m) {
    case 0: quant_avx2_m(x, lo, hi, dt, recip, q, T, 0); break;
    case 1: quant_avx2_m(x, lo, hi, dt, recip, q, T, 1); break;
    case 2: quant_avx2_m(x, lo, hi, dt, recip, q, T, 2); break;
    default: quant_avx2_m(x, lo, hi, dt, recip, q, T, T->m); break;
    }
    _mm256_zeroupper();
}
#endif

static uint32_t absmax_bits(const void *x, size_t lo, size_t hi, int dt) {
#if FP_X86
    if (g_have_avx2) return absmax_bits_avx2(x, lo, hi, dt);
#endif
    return absmax_bits_scalar(x, lo, hi, dt);
}

static void quant_range(const void *x, size_t lo, size_t hi, int dt, float recip, uint8_t *q,
                        const tables_t *T) {
#if FP_X86
    if (g_have_avx2) { quant_avx2(x, lo, hi, dt, recip, q, T); return; }
#endif
    quant_scalar(x, lo, hi, dt, recip, q, T);
}

/* ---------------------------------------------------------------------- quantise: drivers */
/* Blocks up to FUSED_MAX elements (1 MiB of fp32, inside one core's L2) are quantised whole by one
 * thread: read once from memory for the absmax, re-read from cache for the search. Larger blocks
 * (global quantisation is one block) are cut into UNIT pieces: phase 1 reduces each piece's absmax
 * (max is exact in any order), phase 2 searches each piece with its block's reciprocal. */
#define FUSED_MAX ((size_t)1 << 18)

typedef struct {
    const void *x; int dt; size_t n, bs, nb;
    uint8_t *q; float *absmax; tables_t T;
    size_t per_unit;   /* fused: blocks per unit; pieces: pieces per block */
    uint32_t *partial; /* pieces: absmax bits of each piece */
    volatile int bad;  /* set when a NaN/Inf is seen; the wrapper then runs the reference */
} qctx_t;

/* Block b of a one-pass (fused) quantiser: its element range and absmax, stored in c->absmax[b]; 0 (and
 * c->bad set) when the block holds a NaN/Inf, so the caller stops and the wrapper runs the reference. */
INLINE int fused_block(qctx_t *c, size_t b, size_t *lo, size_t *hi, float *am) {
    *lo = b * c->bs;
    *hi = *lo + c->bs < c->n ? *lo + c->bs : c->n;
    uint32_t mb = absmax_bits(c->x, *lo, *hi, c->dt);
    if (mb >= 0x7f800000u) { c->bad = 1; return 0; }
    *am = c->absmax[b] = u2f(mb);
    return 1;
}

static void q_fused(void *vc, size_t u) {
    qctx_t *c = (qctx_t *)vc;
    size_t b0 = u * c->per_unit, b1 = b0 + c->per_unit < c->nb ? b0 + c->per_unit : c->nb;
    for (size_t b = b0; b < b1 && !c->bad; b++) {
        size_t lo, hi;
        float am;
        if (!fused_block(c, b, &lo, &hi, &am)) return;
        quant_range(c->x, lo, hi, c->dt, 1.0f / am, c->q, &c->T);
    }
}

/* element range of piece u (empty for the missing pieces of a partial last block) */
INLINE void piece(const qctx_t *c, size_t u, size_t *b, size_t *lo, size_t *hi) {
    *b = u / c->per_unit;
    size_t b_hi = (*b + 1) * c->bs < c->n ? (*b + 1) * c->bs : c->n;
    *lo = *b * c->bs + (u % c->per_unit) * UNIT;
    *hi = *lo + UNIT < b_hi ? *lo + UNIT : b_hi;
    if (*lo > *hi) *lo = *hi;
}

static void q_phase1(void *vc, size_t u) {
    qctx_t *c = (qctx_t *)vc;
    size_t b, lo, hi;
    piece(c, u, &b, &lo, &hi);
    uint32_t mb = absmax_bits(c->x, lo, hi, c->dt);
    c->partial[u] = mb;
    if (mb >= 0x7f800000u) c->bad = 1;
}

static void q_phase2(void *vc, size_t u) {
    qctx_t *c = (qctx_t *)vc;
    size_t b, lo, hi;
    piece(c, u, &b, &lo, &hi);
    quant_range(c->x, lo, hi, c->dt, 1.0f / c->absmax[b], c->q, &c->T);
}

static PyObject *py_quantize_blockwise(PyObject *self, PyObject *args) {
    unsigned long long xp, qp, ap, bp, tp, pp = 0;
    Py_ssize_t n, bs;
    int dt, m, want;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinnKKKKii|K", &xp, &dt, &n, &bs, &qp, &ap, &bp, &tp, &m, &want, &pp))
        return NULL;
    if (n < 0 || bs <= 0 || dt < 0 || dt > 2 || m < 0 || m > 8) {
        PyErr_Format(PyExc_ValueError, "quantize_blockwise: bad sizes (n=%zd, blocksize=%zd, dtype=%d, m=%d)",
                     n, bs, dt, m);
        return NULL;
    }
    qctx_t c;
    memset(&c, 0, sizeof c);
    c.x = (const void *)(uintptr_t)xp; c.dt = dt; c.n = (size_t)n; c.bs = (size_t)bs;
    c.nb = n ? ((size_t)n + (size_t)bs - 1) / (size_t)bs : 0;
    if (c.bs > c.n && c.n) c.bs = c.n; /* one block either way; keeps the piece count at n / UNIT */
    c.q = (uint8_t *)(uintptr_t)qp; c.absmax = (float *)(uintptr_t)ap;
    c.T.base = (const uint8_t *)(uintptr_t)bp; c.T.tval = (const float *)(uintptr_t)tp; c.T.m = m;
    c.T.packed = (const uint32_t *)(uintptr_t)pp;
    int nt = pick_threads((size_t)n, want);
    int nomem = 0;
    Py_BEGIN_ALLOW_THREADS
    if (c.bs <= FUSED_MAX) {
        c.per_unit = c.bs >= UNIT ? 1 : UNIT / c.bs;
        run_units(q_fused, &c, (c.nb + c.per_unit - 1) / c.per_unit, nt);
    } else {
        c.per_unit = (c.bs + UNIT - 1) / UNIT;
        size_t nunits = c.nb * c.per_unit;
        c.partial = (uint32_t *)malloc(nunits * sizeof(uint32_t)); /* 4 bytes per 64K elements */
        if (!c.partial) {
            nomem = 1;
        } else {
            run_units(q_phase1, &c, nunits, nt);
            if (!c.bad) {
                for (size_t b = 0; b < c.nb; b++) {
                    uint32_t mb = 0;
                    for (size_t k = b * c.per_unit; k < (b + 1) * c.per_unit; k++)
                        mb = c.partial[k] > mb ? c.partial[k] : mb;
                    c.absmax[b] = u2f(mb);
                }
                run_units(q_phase2, &c, nunits, nt);
            }
            free(c.partial);
        }
    }
    Py_END_ALLOW_THREADS
    if (nomem) return PyErr_NoMemory();
    return PyLong_FromLong(c.bad ? 1 : 0);
}

/* ---------------------------------------------------------------------------- dequantise */
typedef struct {
    const uint8_t *q; size_t n, bs; const float *absmax; const float *code; void *out; int dt;
} dctx_t;

INLINE void deq_body(const dctx_t *c, size_t lo, size_t hi, float am, int dt) {
    for (size_t i = lo; i < hi; i++) store1(c->out, i, c->code[c->q[i]] * am, dt);
}

static void deq_scalar(const dctx_t *c, size_t lo, size_t hi, float am) {
    switch (c->dt) {
    case DT_F32: deq_body(c, lo, hi, am, DT_F32); break;
    case DT_F16: deq_body(c, lo, hi, am, DT_F16); break;
    default: deq_body(c, lo, hi, am, DT_BF16); break;
    }
}

#if FP_X86
AVX2 INLINE void store8(void *out, size_t i, __m256 y, int dt) {
    if (dt == DT_F32) { _mm256_storeu_ps((float *)out + i, y); return; }
    __m128i h;
    if (dt == DT_F16) {
        h = _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT); /* IEEE RNE incl. subnormals and overflow */
    } else {
        __m256i u = _mm256_castps_si256(y);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
        h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    }
    _mm_storeu_si128((__m128i *)((uint16_t *)out + i), h);
}

AVX2 INLINE void deq_avx2_dt(const dctx_t *c, size_t lo, size_t hi, float am, int dt) {
    const __m256 av = _mm256_set1_ps(am);
    size_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        __m128i qb = _mm_loadu_si128((const __m128i *)(c->q + i));
        __m256 v0 = _mm256_i32gather_ps(c->code, _mm256_cvtepu8_epi32(qb), 4);
        __m256 v1 = _mm256_i32gather_ps(c->code, _mm256_cvtepu8_epi32(_mm_srli_si128(qb, 8)), 4);
        store8(c->out, i, _mm256_mul_ps(v0, av), dt);
        store8(c->out, i + 8, _mm256_mul_ps(v1, av), dt);
    }
    deq_body(c, i, hi, am, dt);
}

AVX2 static void deq_avx2(const dctx_t *c, size_t lo, size_t hi, float am) {
    switch (c->dt) {
    case DT_F32: deq_avx2_dt(c, lo, hi, am, DT_F32); break;
    case DT_F16: deq_avx2_dt(c, lo, hi, am, DT_F16); break;
    default: deq_avx2_dt(c, lo, hi, am, DT_BF16); break;
    }
    _mm256_zeroupper();
}
#endif

/* unit u is the element range [u*UNIT, (u+1)*UNIT); it walks the block segments inside it, so one
 * huge block and many small blocks split the same way. */
static void d_work(void *vc, size_t u) {
    const dctx_t *c = (const dctx_t *)vc;
    size_t lo = u * UNIT, hi = lo + UNIT < c->n ? lo + UNIT : c->n;
    while (lo < hi) {
        size_t b = lo / c->bs, end = (b + 1) * c->bs;
        if (end > hi) end = hi;
#if FP_X86
        if (g_have_avx2) deq_avx2(c, lo, end, c->absmax[b]);
        else
#endif
            deq_scalar(c, lo, end, c->absmax[b]);
        lo = end;
    }
}

static PyObject *py_dequantize_blockwise(PyObject *self, PyObject *args) {
    unsigned long long qp, ap, cp, op;
    Py_ssize_t n, bs;
    int dt, want;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnKKKii", &qp, &n, &bs, &ap, &cp, &op, &dt, &want)) return NULL;
    if (n < 0 || bs <= 0 || dt < 0 || dt > 2) {
        PyErr_Format(PyExc_ValueError, "dequantize_blockwise: bad sizes (n=%zd, blocksize=%zd, dtype=%d)", n, bs, dt);
        return NULL;
    }
    dctx_t c = {(const uint8_t *)(uintptr_t)qp, (size_t)n, (size_t)bs, (const float *)(uintptr_t)ap,
                (const float *)(uintptr_t)cp, (void *)(uintptr_t)op, dt};
    size_t nb = n ? ((size_t)n + (size_t)bs - 1) / (size_t)bs : 0;
    /* NaN/Inf in the scales or the codebook: the NaN bit patterns of torch's casts differ between its
     * scalar and vector loops, so such calls go to the reference instead */
    for (int j = 0; j < 256; j++)
        if ((f2u(c.code[j]) & 0x7fffffffu) >= 0x7f800000u) return PyLong_FromLong(1);
    for (size_t b = 0; b < nb; b++)
        if ((f2u(c.absmax[b]) & 0x7fffffffu) >= 0x7f800000u) return PyLong_FromLong(1);
    int nt = pick_threads((size_t)n, want);
    Py_BEGIN_ALLOW_THREADS
    run_units(d_work, &c, ((size_t)n + UNIT - 1) / UNIT, nt);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(0);
}

/* ------------------------------------------------------------------------ int8 row quantise */
/* LLM.int8() row-wise quantisation, default mode (reference.int8_vectorwise_quant):
 *   outlier = |a| >= thr (thr > 0 only); row_stats = max |a| over non-outlier, non-NaN elements;
 *   scale = fl32(fl32(1 / row_stats) * 127); q = clamp(rint(fl32(a * scale)), -127, 127), NaN -> 0;
 *   outlier elements -> 0 here, whole outlier columns are zeroed by the caller (colmask[j] = 1). */
typedef struct {
    const void *x; int dt; size_t rows, cols; float thr; int8_t *q; float *stats; uint8_t *colmask;
    size_t per_unit; /* rows per unit */
} i8ctx_t;

INLINE int8_t round_i8(float v) {
    if (v != v) return 0;
    v = rintf(v); /* round half to even in the default rounding mode */
    return (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
}

static uint32_t i8_stats_scalar(const i8ctx_t *c, size_t lo, size_t hi) {
    uint32_t mx = 0;
    for (size_t i = lo; i < hi; i++) {
        uint32_t a = f2u(load1(c->x, i, c->dt)) & 0x7fffffffu;
        if (a > 0x7f800000u) continue; /* NaN ignored (default mode) */
        if (c->thr > 0.0f && u2f(a) >= c->thr) { c->colmask[i - lo] = 1; continue; } /* lo: row start */
        mx = a > mx ? a : mx;
    }
    return mx;
}

INLINE void i8_quant_body(const i8ctx_t *c, size_t lo, size_t hi, float scale) {
    for (size_t i = lo; i < hi; i++) {
        float a = load1(c->x, i, c->dt);
        c->q[i] = (c->thr > 0.0f && fabsf(a) >= c->thr) ? 0 : round_i8(a * scale);
    }
}

static void i8_quant_scalar(const i8ctx_t *c, size_t lo, size_t hi, float scale) {
    i8_quant_body(c, lo, hi, scale);
}

#if FP_X86
AVX2 static uint32_t i8_stats_avx2(const i8ctx_t *c, size_t lo, size_t hi) {
    const __m256i mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256 thr = _mm256_set1_ps(c->thr);
    const int use_thr = c->thr > 0.0f;
    __m256i mx = _mm256_setzero_si256();
    size_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        __m256i a = _mm256_and_si256(_mm256_castps_si256(load8(c->x, i, c->dt)), mask);
        __m256i drop = _mm256_cmpgt_epi32(a, inf); /* NaN */
        if (use_thr) {
            __m256 out = _mm256_cmp_ps(_mm256_castsi256_ps(a), thr, _CMP_GE_OQ);
            int bits = _mm256_movemask_ps(out);
            if (bits) { /* rare: mark the outlier columns */
                for (int k = 0; k < 8; k++)
                    if (bits >> k & 1) c->colmask[i + k - lo] = 1;
                drop = _mm256_or_si256(drop, _mm256_castps_si256(out));
            }
        }
        mx = _mm256_max_epi32(mx, _mm256_andnot_si256(drop, a));
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, mx);
    uint32_t m = 0;
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
    for (; i < hi; i++) { /* tail, same rules as i8_stats_scalar */
        uint32_t a = f2u(load1(c->x, i, c->dt)) & 0x7fffffffu;
        if (a > 0x7f800000u) continue;
        if (use_thr && u2f(a) >= c->thr) { c->colmask[i - lo] = 1; continue; }
        m = a > m ? a : m;
    }
    _mm256_zeroupper();
    return m;
}

AVX2 INLINE __m256i i8_round8(__m256 a, __m256 sv, __m256 thr, int use_thr) {
    __m256 v = _mm256_mul_ps(a, sv);
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    __m256 zero = nan;
    if (use_thr) {
        __m256 absa = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);
        zero = _mm256_or_ps(zero, _mm256_cmp_ps(absa, thr, _CMP_GE_OQ));
    }
    r = _mm256_andnot_ps(zero, r); /* NaN and outliers -> +0 */
    return _mm256_cvtps_epi32(r);  /* exact: r is an integer in [-127, 127] */
}

AVX2 static void i8_quant_avx2(const i8ctx_t *c, size_t lo, size_t hi, float scale) {
    const __m256 sv = _mm256_set1_ps(scale), thr = _mm256_set1_ps(c->thr);
    const int use_thr = c->thr > 0.0f;
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        __m256i a = i8_round8(load8(c->x, i, c->dt), sv, thr, use_thr);
        __m256i b = i8_round8(load8(c->x, i + 8, c->dt), sv, thr, use_thr);
        __m256i d = i8_round8(load8(c->x, i + 16, c->dt), sv, thr, use_thr);
        __m256i e = i8_round8(load8(c->x, i + 24, c->dt), sv, thr, use_thr);
        /* values in [-127, 127]: signed saturating packs are exact */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(d, e));
        _mm256_storeu_si256((__m256i *)(c->q + i), _mm256_permutevar8x32_epi32(p, order));
    }
    i8_quant_body(c, i, hi, scale);
    _mm256_zeroupper();
}
#endif

static void i8_work(void *vc, size_t u) {
    const i8ctx_t *c = (const i8ctx_t *)vc;
    size_t r0 = u * c->per_unit, r1 = r0 + c->per_unit < c->rows ? r0 + c->per_unit : c->rows;
    for (size_t r = r0; r < r1; r++) {
        size_t lo = r * c->cols, hi = lo + c->cols;
        uint32_t mb;
#if FP_X86
        if (g_have_avx2) mb = i8_stats_avx2(c, lo, hi);
        else
#endif
            mb = i8_stats_scalar(c, lo, hi);
        float rs = u2f(mb);
        c->stats[r] = rs;
        float scale = (1.0f / rs) * 127.0f;
#if FP_X86
        if (g_have_avx2) i8_quant_avx2(c, lo, hi, scale);
        else
#endif
            i8_quant_scalar(c, lo, hi, scale);
    }
}

static PyObject *py_int8_vectorwise_quant(PyObject *self, PyObject *args) {
    unsigned long long xp, qp, sp, mp;
    Py_ssize_t rows, cols;
    int dt, want;
    double thr;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinndKKKi", &xp, &dt, &rows, &cols, &thr, &qp, &sp, &mp, &want)) return NULL;
    if (rows < 0 || cols <= 0 || dt < 0 || dt > 2 || !(thr >= 0.0)) {
        PyErr_Format(PyExc_ValueError, "int8_vectorwise_quant: bad sizes (rows=%zd, cols=%zd, dtype=%d)", rows, cols, dt);
        return NULL;
    }
    i8ctx_t c = {(const void *)(uintptr_t)xp, dt, (size_t)rows, (size_t)cols, (float)thr, (int8_t *)(uintptr_t)qp,
                 (float *)(uintptr_t)sp, (uint8_t *)(uintptr_t)mp, 1};
    c.per_unit = (size_t)cols >= UNIT ? 1 : UNIT / (size_t)cols;
    size_t n = (size_t)rows * (size_t)cols;
    int nt = pick_threads(n, want);
    Py_BEGIN_ALLOW_THREADS
    run_units(i8_work, &c, ((size_t)rows + c.per_unit - 1) / c.per_unit, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Fresh outputs of many MB are first touched by the kernels; with 4 KiB pages that is one page fault
 * per 4 KiB (dequantising into a new 64 MB tensor ran at 1.6-2.0 GB/s instead of 10 GB/s into out=).
 * Advising transparent huge pages for the 2 MiB-aligned interior halves that (3.6-3.9 GB/s measured).
 * Only an advice: no effect where THP is off, never an error for the caller. */
static PyObject *py_advise_hugepages(PyObject *self, PyObject *args) {
    unsigned long long p;
    Py_ssize_t nbytes;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kn", &p, &nbytes)) return NULL;
    int ok = 0;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const unsigned long long huge = 1ull << 21;
    unsigned long long lo = (p + huge - 1) & ~(huge - 1), hi = (p + (unsigned long long)nbytes) & ~(huge - 1);
    if (nbytes > 0 && hi > lo) ok = madvise((void *)(uintptr_t)lo, (size_t)(hi - lo), MADV_HUGEPAGE) == 0;
#endif
    return PyBool_FromLong(ok);
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    (void)self; (void)args;
    return PyUnicode_FromString(g_have_avx2 ? "avx2" : "scalar");
}

static PyObject *py_serial_cutoff(PyObject *self, PyObject *args) {
    Py_ssize_t n = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "|n", &n)) return NULL;
    size_t before = g_serial_cutoff;
    if (n >= 0) g_serial_cutoff = (size_t)n;
    return PyLong_FromSize_t(before);
}

static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    int on;
    (void)self;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    int avail = 0;
#if FP_X86
    avail = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    g_have_avx2 = on && avail;
    return PyBool_FromLong(g_have_avx2);
}

/* ------------------------------------------------------------------ OCP FP8 / MX scaled casts */
/* quantize_scaled / dequantize_scaled of backends/reference.py, bit for bit. x is viewed as [R, C]
 * and cut into br x bc tiles (partial tiles at the ends); per tile:
 *
 *   amax  = max |x| over the tile's finite values          (on the bit patterns, like absmax above)
 *   scale = fl32(amax / fmax), 1 where that is not > 0       (e4m3 / e5m2)
 *         = 2**clamp(floor(log2 amax) - emax, -127, 127), 1 for amax = 0   (MX FLOOR: frexp/ldexp, exact;
 *           RCEIL +1 where frexp's mantissa > fmax / 2**(emax+1), EVEN +1 where it rounds up to 1 at
 *           mbits + 1 bits: mx_scale1)
 *         = e4m3(fl32(amax / fl32(6 g))), divisor fl32(scale * g)                (NVFP4)
 *   4/6-bit elements (MXFP6, MXFP4, NVFP4): sq_lowbit_run; a tile with a NaN/Inf gets a NaN scale.
 *   y     = fl32(x / scale), clamped to +-fmax when finite    (a true division, as torch does on CPU)
 *   data  = round-to-nearest-even fp8 bits of y: NaN -> 0x7f | sign, E4M3FN +-Inf -> +-448 (torch's
 *           cast saturates), E5M2 +-Inf -> +-Inf.
 *
 * The fp8 rounding: normal range by the usual integer rounding of the float32 bits (bias 0x7ffff
 * or 0xfffff plus the kept lsb, then rebias the exponent; a carry into the exponent is the right
 * answer); subnormal range by adding 2^14 (E4M3) or 2^7 (E5M2), whose float32 ulp is the fp8
 * subnormal step 2^-9 / 2^-16, so the float addition itself rounds to nearest even and the low
 * mantissa bits are the fp8 code (the smallest normal comes out as code 8 / 4, also right).
 * Branch-free, so the loops vectorise. Work units are row pieces inside one tile row, so a unit's
 * amax partials belong to one tile row and the reduction (a max: any order) is exact. */

/* A prefetch cursor over the input of the unit a thread runs next (sq_run_ahead, "scaled casts: memory order"):
 * row segments of seg bytes, stride bytes apart; p the next byte to prefetch, end the end of its segment. */
typedef struct { const char *p, *end; size_t rows_left, stride, seg; } pf_t;

/* Prefetch the next 128 bytes under the cursor (NULL: none). The AVX2 element loops call it once per 32
 * elements, the pace at which they consume a 4-byte input, so the next unit arrives in L2 while this one
 * computes (prefetches never fault: the last one may reach up to 127 bytes past the input). */
INLINE void pf_step(pf_t *pf) {
    if (pf == NULL) return;
    if (pf->p >= pf->end) {
        if (pf->rows_left == 0) return;
        pf->rows_left--;
        pf->p = pf->end - pf->seg + pf->stride;
        pf->end = pf->p + pf->seg;
    }
    __builtin_prefetch(pf->p, 0, 3);
    __builtin_prefetch(pf->p + 64, 0, 3);
    pf->p += 128;
}

typedef struct {
    const void *x; int dt;
    size_t R, C, br, bc, nbr, nbc;
    size_t rpu, sub;      /* rows per row piece (inside one tile row), row pieces per tile row */
    size_t k, cs, cw;     /* column pieces: k whole tiles each (cs = 1), or cs pieces of cw columns per tile */
    size_t ncp;           /* column pieces per row piece */
    int e5m2; float fmax;
    int lowbit;           /* 0: FP8 elements; 1 + k: the 4/6-bit element k (0 e2m1, 1 e2m3, 2 e3m2) */
    uint32_t *partial;    /* [row pieces][nbc * cs] amax bits */
    uint8_t *nonfin;      /* like partial: 1 where the piece holds a NaN/Inf (set where track) */
    int track;            /* the amax pass flags NaN/Inf per piece: the 4/6-bit scales need it, and fused_scaled's
                           * FP8 loops skip the NaN/Inf handling of a clean piece (quantize_scaled's gained
                           * nothing measurable from that: its loops are not bound by those operations) */
    float *scale; uint8_t *data;
    float *div;           /* 4/6-bit only: the per-tile divisor of the elements ([nbr * nbc]) */
    size_t units, np;     /* work units; partial slots ([row pieces][nbc * cs]) */
    int fmt, rule, has_g; float g;  /* format, MX scale rule, NVFP4 tensor scale (given when has_g) */
    pf_t *pf;             /* the calling thread's prefetch cursor (its own copy of the context), or NULL */
    int xt;               /* x is a transposed view: logical [R, C] stored as [C, R] (x.mT contiguous); the units
                           * then read it through bands ("scaled casts: transposed inputs") */
    size_t bh;            /* xt: row pieces per band */
    const char *band;     /* the calling thread's gathered band (its own copy of the context), or NULL: rows
                           * [band_r0, ..) x columns [band_c0, ..) of x, row-major with leading dimension band_ld */
    size_t band_r0, band_c0, band_ld;
    int sr;               /* 4/6-bit elements round stochastically ("stochastic rounding" at sr_mix32) */
    uint32_t sr_key;      /* mix32(seed ^ 0x9E3779B9), from the caller */
    size_t sr_period;     /* P: element (r, c) draws number (r mod P) * C + c */
    const float *grow;    /* NVFP4 with 1 x bc tiles: one tensor scale per row (else NULL: g) */
    float given, mult;    /* e4m3/e5m2 (fused_scaled only): given > 0 is every tile's scale; else the scale from
                           * amax is fl32(fl32(amax / fmax) * mult) (mult a power of two, 1 but for delayed
                           * scaling's margin), 1 where that is not > 0 */
} sq_t;

/* x as the runs of row r index it (flat index r * C + col): x itself, or, while a band is gathered, the address
 * that puts index r * C + col at band[(r - band_r0) * band_ld + col - band_c0]. That address is formed in
 * modular integer arithmetic and lies outside the band; only band elements are read through it. */
INLINE const void *sq_x(const sq_t *c, size_t r) {
    if (!c->band) return c->x;
    const size_t es = c->dt == DT_F32 ? 4 : 2;
    return (const void *)((uintptr_t)c->band + ((r - c->band_r0) * c->band_ld - c->band_c0 - r * c->C) * es);
}

INLINE uint8_t enc_fp8(float y, int e5m2, uint32_t fmax_bits) {
    uint32_t u = f2u(y), sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    /* Clamp finite values above the format max; integer compares only (a float compare that may see
     * NaN counts as a possible trap, which stops the compiler from vectorising the loop). */
    uint32_t b = (a > fmax_bits) & (a < 0x7f800000u) ? fmax_bits : a, r;
    float ay = u2f(b);
    if (!e5m2) {
        uint32_t nrm = ((b + 0x7ffffu + ((b >> 20) & 1u)) >> 20) - (120u << 3);
        uint32_t sub = f2u(ay + 16384.0f) - 0x46800000u;
        r = b < 0x3c800000u ? sub : nrm;          /* 2^-6: the smallest normal */
        r = a == 0x7f800000u ? 0x7eu : r;         /* +-Inf saturates to +-448 */
    } else {
        uint32_t nrm = ((b + 0xfffffu + ((b >> 21) & 1u)) >> 21) - (112u << 2);
        uint32_t sub = f2u(ay + 128.0f) - 0x43000000u;
        r = b < 0x38800000u ? sub : nrm;          /* 2^-14 */
        r = a == 0x7f800000u ? 0x7cu : r;
    }
    r = a > 0x7f800000u ? 0x7fu : r;               /* NaN */
    return (uint8_t)(sign | r);
}

/* The float32 value of an fp8 code (torch's decoding, bit for bit, for every non-NaN code; a NaN code
 * gives some NaN), branch-free like h2f_nb: the code's exponent and mantissa moved into float32's
 * fields and multiplied by 2^120 (E4M3, bias 7) or 2^112 (E5M2, bias 15), exact, subnormals included. */
INLINE float dec_fp8(uint32_t code, int e5m2) {
    uint32_t a = code & 0x7fu, sign = (code & 0x80u) << 24, vb;
    if (e5m2) {
        vb = f2u(u2f(a << 21) * 0x1p112f);
        vb = a >= 0x7cu ? 0x7f800000u | ((a & 3u) << 21) : vb;
    } else {
        vb = f2u(u2f(a << 20) * 0x1p120f);
        vb = a == 0x7fu ? 0x7fc00000u : vb;
    }
    return u2f(vb | sign);
}

/* fp16 -> fp32 without branches (h2f's result, bit for bit): the fp16 exponent and mantissa moved
 * into float32's fields and multiplied by 2^112 (rebias 15 -> 127; exact, subnormals included),
 * then Inf/NaN (exponent all ones) rebuilt with their payload. */
INLINE float h2f_nb(uint16_t h) {
    uint32_t a = (uint32_t)(h & 0x7fffu);
    float v = u2f(a << 13) * 0x1p112f;
    uint32_t vb = a >= 0x7c00u ? 0x7f800000u | ((a & 0x3ffu) << 13) : f2u(v);
    return u2f(vb | ((uint32_t)(h & 0x8000u) << 16));
}

INLINE float load1_nb(const void *p, size_t i, int dt) {
    if (dt == DT_F32) return ((const float *)p)[i];
    if (dt == DT_F16) return h2f_nb(((const uint16_t *)p)[i]);
    return u2f((uint32_t)((const uint16_t *)p)[i] << 16);
}

/* The two inner loops, on one contiguous run of one tile (vectorised by the compiler). The amax
 * works on the raw bit patterns of the input width (|x| bits order like |x| in fp32, fp16 and bf16;
 * finite iff below the Inf pattern), in signed ints, which the vectoriser reduces with max. */
/* track (a constant): also OR into *nf whether the run holds a NaN/Inf (the 4/6-bit formats need it). */
INLINE uint32_t sq_amax_run(const void *x, size_t lo, size_t hi, int dt, uint32_t mx, int track, uint8_t *nf) {
    if (dt == DT_F32) {
        const uint32_t *xb = (const uint32_t *)x;
        int32_t m = (int32_t)mx, bad = 0;
        for (size_t i = lo; i < hi; i++) {
            int32_t a = (int32_t)(xb[i] & 0x7fffffffu);
            if (track) bad |= a >= 0x7f800000;
            a = a < 0x7f800000 ? a : 0; /* only finite values set the scale */
            m = a > m ? a : m;
        }
        if (track) *nf |= (uint8_t)bad;
        return (uint32_t)m;
    }
    const uint16_t *xh = (const uint16_t *)x;
    const int32_t inf = dt == DT_F16 ? 0x7c00 : 0x7f80;
    int32_t m = 0, bad = 0;
    for (size_t i = lo; i < hi; i++) {
        int32_t a = (int32_t)(xh[i] & 0x7fffu);
        if (track) bad |= a >= inf;
        a = a < inf ? a : 0;
        m = a > m ? a : m;
    }
    if (track) *nf |= (uint8_t)bad;
    uint16_t mh = (uint16_t)m;
    uint32_t mb = f2u(load1_nb(&mh, 0, dt));
    return mb > mx ? mb : mx;
}

INLINE void sq_quant_run(const void *x, size_t lo, size_t hi, int dt, float s, int e5m2, uint32_t fmax_bits,
                         uint8_t *restrict data, pf_t *pf) {
    (void)pf; /* the AVX2 loops prefetch */
    for (size_t i = lo; i < hi; i++) data[i] = enc_fp8(load1_nb(x, i, dt) / s, e5m2, fmax_bits);
}

/* Unit u = (row piece, column piece): rows [r0, r1) inside one tile row, columns [c0, c1) made of
 * whole tiles or inside one tile; q = the column piece's index inside its tile (0 for whole tiles). */
typedef struct { size_t ru, r0, r1, c0, c1, q; } sq_unit_t;

INLINE sq_unit_t sq_unit(const sq_t *c, size_t u) {
    sq_unit_t w;
    w.ru = u / c->ncp;
    size_t cp = u % c->ncp, tr = w.ru / c->sub, p = w.ru % c->sub;
    size_t top = (tr + 1) * c->br < c->R ? (tr + 1) * c->br : c->R;
    w.r0 = tr * c->br + p * c->rpu;
    w.r1 = w.r0 + c->rpu < top ? w.r0 + c->rpu : top;
    if (c->cs == 1) {
        size_t t1 = (cp + 1) * c->k < c->nbc ? (cp + 1) * c->k : c->nbc;
        w.c0 = cp * c->k * c->bc;
        w.c1 = t1 * c->bc < c->C ? t1 * c->bc : c->C;
        w.q = 0;
    } else {
        size_t t = cp / c->cs, tend = (t + 1) * c->bc < c->C ? (t + 1) * c->bc : c->C;
        w.q = cp % c->cs;
        w.c0 = t * c->bc + w.q * c->cw;
        w.c1 = w.c0 + c->cw < tend ? w.c0 + c->cw : tend;
        if (w.c0 > w.c1) w.c0 = w.c1; /* a short last tile has fewer pieces: an empty one */
    }
    return w;
}

/* The element range [lo, hi) (flat indices) of tile t in row r of unit w. */
INLINE void sq_run_of(const sq_t *c, const sq_unit_t *w, size_t r, size_t t, size_t *lo, size_t *hi) {
    const size_t base = r * c->C;
    *lo = base + (t * c->bc > w->c0 ? t * c->bc : w->c0);
    *hi = base + ((t + 1) * c->bc < w->c1 ? (t + 1) * c->bc : w->c1);
}

/* The amax pass of unit u, with the run function RUN (sq_amax_run here, the AVX2 one at the end of the
 * file); ATTR: the target attribute of the instantiation. */
#define SQ_AMAX_BODY(NAME, RUN, ATTR)                                                             \
    ATTR INLINE void NAME##_t(const sq_t *c, size_t u, int dt, int track) {                     \
        sq_unit_t w = sq_unit(c, u);                                                            \
        if (w.c0 >= w.c1) return;                                                               \
        uint32_t *part = c->partial + w.ru * c->nbc * c->cs;                                    \
        uint8_t *nf = track ? c->nonfin + w.ru * c->nbc * c->cs : NULL;                         \
        size_t t0 = w.c0 / c->bc, t1 = (w.c1 - 1) / c->bc, lo, hi;                              \
        for (size_t t = t0; t <= t1; t++) {                                                     \
            part[t * c->cs + w.q] = 0;                                                          \
            if (track) nf[t * c->cs + w.q] = 0;                                                 \
        }                                                                                       \
        for (size_t r = w.r0; r < w.r1; r++)                                                    \
            for (size_t t = t0; t <= t1; t++) {                                                 \
                sq_run_of(c, &w, r, t, &lo, &hi);                                               \
                part[t * c->cs + w.q] = RUN(sq_x(c, r), lo, hi, dt, part[t * c->cs + w.q], track,\
                                            track ? nf + t * c->cs + w.q : NULL);               \
            }                                                                                   \
    }                                                                                           \
    ATTR INLINE void NAME(const sq_t *c, size_t u, int dt) {                                    \
        if (c->track) NAME##_t(c, u, dt, 1);                                                    \
        else NAME##_t(c, u, dt, 0);                                                             \
    }
SQ_AMAX_BODY(sq_amax_body, sq_amax_run, )

/* 4/6-bit element codes (reference.lowbit_encode after its NaN/Inf replacement and clamp), element
 * kind k: 0 e2m1, 1 e2m3, 2 e3m2 (constants after inlining). Per element:
 *   x' = 0 for NaN, +-fmax for +-Inf, else x;  y = fl32(x' / d) (d > 0), fl32(x' * 0) otherwise
 *   b  = min(|y| bits, fmax bits);  e = max(floor(log2 |y|), emin) from the float32 exponent field
 *        (a float32 subnormal or 0 gives -127, clamped to emin);  n = rne(|y| * 2^(mbits - e)), exact
 *        scaling, rounded by adding 2^23 (the float addition rounds to nearest even, n < 2^7);
 *   code = ((e - emin) << mbits) + n, sign bit of y at 1 << (ebits + mbits). */
/* The rounding of a 4/6-bit element (below): y's bits, the binade e and t = 2^23 + n as a float. */
typedef struct { uint32_t uy; int32_t e; float t; } lowbit_t;

/* lowbit_round before the rounding: t = |y| * 2^(mbits - e), exact (b clamped to fmax, p a power of two). */
INLINE lowbit_t lowbit_scaled(float xv, float d, int pos, int k) {
    const int mbits = k == 0 ? 1 : (k == 1 ? 3 : 2), emin = k == 2 ? -2 : 0;
    const uint32_t fmax_bits = k == 0 ? 0x40c00000u : (k == 1 ? 0x40f00000u : 0x41e00000u); /* 6, 7.5, 28 */
    uint32_t u = f2u(xv), a = u & 0x7fffffffu;
    uint32_t v = a == 0x7f800000u ? (u & 0x80000000u) | fmax_bits : u;
    v = a > 0x7f800000u ? 0u : v;
    float y = pos ? u2f(v) / d : u2f(v) * 0.0f;
    lowbit_t r;
    r.uy = f2u(y);
    uint32_t b = r.uy & 0x7fffffffu;
    b = b > fmax_bits ? fmax_bits : b;
    r.e = (int32_t)(b >> 23) - 127;
    r.e = r.e < emin ? emin : r.e;
    float p = u2f((uint32_t)(127 + mbits - r.e) << 23);
    r.t = u2f(b) * p;
    return r;
}

INLINE lowbit_t lowbit_round(float xv, float d, int pos, int k) {
    lowbit_t r = lowbit_scaled(xv, d, pos, k);
    r.t = r.t + 8388608.0f;
    return r;
}

/* Stochastic rounding (reference.lowbit_encode with uniform): n = floor(t) + (u < t - floor(t)), u the
 * element's number in [0, 1) (sr_uniform); t < 2^7, so the truncation is floor, t - floor(t) is exact and
 * the result again comes as 2^23 + n. */
INLINE lowbit_t lowbit_round_sr(float xv, float d, int pos, int k, float u) {
    lowbit_t r = lowbit_scaled(xv, d, pos, k);
    float lo = (float)(int32_t)r.t;
    r.t = (lo + (u < r.t - lo ? 1.0f : 0.0f)) + 8388608.0f;
    return r;
}

/* The code of a rounded element. */
INLINE uint8_t lowbit_code(lowbit_t r, int k) {
    const int ebits = k == 2 ? 3 : 2, mbits = k == 0 ? 1 : (k == 1 ? 3 : 2), emin = k == 2 ? -2 : 0;
    uint32_t n = f2u(r.t) - 0x4b000000u;
    uint32_t mag = ((uint32_t)(r.e - emin) << mbits) + n;
    return (uint8_t)(mag | ((r.uy >> 31) << (ebits + mbits)));
}

/* The value of a rounded element's code, without forming it: +-n * 2^(e - mbits) (exact: n < 2^5). */
INLINE float lowbit_code_value(lowbit_t r, int k) {
    const int mbits = k == 0 ? 1 : (k == 1 ? 3 : 2);
    float mag = (r.t - 8388608.0f) * u2f((uint32_t)(127 + r.e - mbits) << 23);
    return u2f(f2u(mag) | (r.uy & 0x80000000u));
}

INLINE uint8_t enc_lowbit(float xv, float d, int pos, int k) { return lowbit_code(lowbit_round(xv, d, pos, k), k); }

INLINE float lowbit_value(float xv, float d, int pos, int k) {
    return lowbit_code_value(lowbit_round(xv, d, pos, k), k);
}

/* The random numbers of stochastic rounding (reference.stochastic_uniform): element i of the [P, C] slice
 * draws (lowbias32(key + i mod 2^32) >> 8) * 2^-24 (24 bits, exact in float32); key = mix32(seed ^ 0x9E3779B9)
 * comes from the caller. Element (r, c) of x is i = (r mod P) * C + c: a function of the index only, so
 * threads, units and bands change nothing. */
INLINE uint32_t sr_mix32(uint32_t h) {
    h = (h ^ (h >> 16)) * 0x7feb352du;
    h = (h ^ (h >> 15)) * 0x846ca68bu;
    return h ^ (h >> 16);
}

INLINE float sr_uniform(uint32_t ctr) { return (float)(sr_mix32(ctr) >> 8) * 0x1p-24f; }

/* pos = d > 0 (the divisor of a tile whose NVFP4 scale rounded to 0 is 0: x * 0 instead) */
INLINE void sq_lowbit_run(const void *x, size_t lo, size_t hi, int dt, float d, int k, uint8_t *restrict data,
                          pf_t *pf) {
    (void)pf;
    const int pos = d > 0.0f;
    for (size_t i = lo; i < hi; i++) data[i] = enc_lowbit(load1_nb(x, i, dt), d, pos, k);
}

/* sq_lowbit_run with stochastic rounding; ctr: the counter (key + slice index) of element lo. */
INLINE void sq_sr_run(const void *x, size_t lo, size_t hi, int dt, float d, int k, uint8_t *restrict data, pf_t *pf,
                      uint32_t ctr) {
    (void)pf;
    const int pos = d > 0.0f;
    for (size_t i = lo; i < hi; i++, ctr++)
        data[i] = lowbit_code(lowbit_round_sr(load1_nb(x, i, dt), d, pos, k, sr_uniform(ctr)), k);
}

/* The counter of flat element i (row r) under stochastic rounding: key + (r mod P) * C + c, mod 2^32. */
INLINE uint32_t sr_counter(const sq_t *c, size_t r, size_t i) {
    return c->sr_key + (uint32_t)(i - (r / c->sr_period) * c->sr_period * c->C);
}

/* The 4/6-bit element pass of unit u with the run function RUN (sq_lowbit_run, or the AVX2 one), or SR_RUN
 * (sq_sr_run, or the AVX2 one) under stochastic rounding. */
#define SQ_LOWBIT_BODY(NAME, RUN, SR_RUN, ATTR)                                                   \
    ATTR INLINE void NAME(const sq_t *c, size_t u, int dt, int k) {                             \
        sq_unit_t w = sq_unit(c, u);                                                            \
        if (w.c0 >= w.c1) return;                                                               \
        size_t t0 = w.c0 / c->bc, t1 = (w.c1 - 1) / c->bc, lo, hi;                              \
        for (size_t r = w.r0; r < w.r1; r++) {                                                  \
            const float *drow = c->div + (r / c->br) * c->nbc;                                  \
            for (size_t t = t0; t <= t1; t++) {                                                 \
                sq_run_of(c, &w, r, t, &lo, &hi);                                               \
                if (c->sr) SR_RUN(sq_x(c, r), lo, hi, dt, drow[t], k, c->data, c->pf, sr_counter(c, r, lo)); \
                else RUN(sq_x(c, r), lo, hi, dt, drow[t], k, c->data, c->pf);                   \
            }                                                                                   \
        }                                                                                       \
    }
SQ_LOWBIT_BODY(sq_lowbit_body, sq_lowbit_run, sq_sr_run, )

/* The FP8 element pass of unit u with the run function RUN (sq_quant_run, or the AVX2 one). */
#define SQ_QUANT_BODY(NAME, RUN, ATTR)                                                            \
    ATTR INLINE void NAME(const sq_t *c, size_t u, int dt, int e5m2) {                          \
        sq_unit_t w = sq_unit(c, u);                                                            \
        if (w.c0 >= w.c1) return;                                                               \
        const uint32_t fmax_bits = f2u(c->fmax);                                                \
        size_t t0 = w.c0 / c->bc, t1 = (w.c1 - 1) / c->bc, lo, hi;                              \
        for (size_t r = w.r0; r < w.r1; r++) {                                                  \
            const float *srow = c->scale + (r / c->br) * c->nbc;                                \
            for (size_t t = t0; t <= t1; t++) {                                                 \
                sq_run_of(c, &w, r, t, &lo, &hi);                                               \
                RUN(sq_x(c, r), lo, hi, dt, srow[t], e5m2, fmax_bits, c->data, c->pf);          \
            }                                                                                   \
        }                                                                                       \
    }
SQ_QUANT_BODY(sq_quant_body, sq_quant_run, )

/* Dtype/format instantiations; the AVX2 copies are the same C compiled for AVX2+F16C (the compiler
 * vectorises the branch-free bodies; -ffp-contract=off still holds, so no FMA). */
#define SQ_DISPATCH(NAME, BODY_AMAX, BODY_QUANT, BODY_LOWBIT, ATTR, END)                                \
    ATTR static void NAME##_amax(const sq_t *c, size_t u) {                                   \
        switch (c->dt) { case DT_F32: BODY_AMAX(c, u, DT_F32); break;                         \
                         case DT_F16: BODY_AMAX(c, u, DT_F16); break;                         \
                         default: BODY_AMAX(c, u, DT_BF16); break; }                          \
        END                                                                                   \
    }                                                                                         \
    ATTR static void NAME##_quant(const sq_t *c, size_t u) {                                  \
        if (c->lowbit) {                                                                      \
            switch (c->dt * 3 + c->lowbit - 1) {                                              \
            case DT_F32 * 3: BODY_LOWBIT(c, u, DT_F32, 0); break;                          \
            case DT_F32 * 3 + 1: BODY_LOWBIT(c, u, DT_F32, 1); break;                      \
            case DT_F32 * 3 + 2: BODY_LOWBIT(c, u, DT_F32, 2); break;                      \
            case DT_F16 * 3: BODY_LOWBIT(c, u, DT_F16, 0); break;                          \
            case DT_F16 * 3 + 1: BODY_LOWBIT(c, u, DT_F16, 1); break;                      \
            case DT_F16 * 3 + 2: BODY_LOWBIT(c, u, DT_F16, 2); break;                      \
            case DT_BF16 * 3: BODY_LOWBIT(c, u, DT_BF16, 0); break;                        \
            case DT_BF16 * 3 + 1: BODY_LOWBIT(c, u, DT_BF16, 1); break;                    \
            default: BODY_LOWBIT(c, u, DT_BF16, 2); break; }                               \
            END                                                                               \
            return;                                                                           \
        }                                                                                     \
        switch (c->dt * 2 + c->e5m2) {                                                        \
        case DT_F32 * 2: BODY_QUANT(c, u, DT_F32, 0); break;                                  \
        case DT_F32 * 2 + 1: BODY_QUANT(c, u, DT_F32, 1); break;                              \
        case DT_F16 * 2: BODY_QUANT(c, u, DT_F16, 0); break;                                  \
        case DT_F16 * 2 + 1: BODY_QUANT(c, u, DT_F16, 1); break;                              \
        case DT_BF16 * 2: BODY_QUANT(c, u, DT_BF16, 0); break;                                \
        default: BODY_QUANT(c, u, DT_BF16, 1); break; }                                       \
        END                                                                                   \
    }
SQ_DISPATCH(sq_scalar, sq_amax_body, sq_quant_body, sq_lowbit_body, , )
#if FP_X86
/* The AVX2 instantiation (hand-written amax and FP8 loops) is in "scaled casts: AVX2 element loops" at the
 * end of the file. */
AVX2 static void sq_avx2_amax(const sq_t *c, size_t u);
AVX2 static void sq_avx2_quant(const sq_t *c, size_t u);
#endif

SIMD_WORK(sq_phase1, const sq_t, sq_avx2_amax, sq_scalar_amax)
SIMD_WORK(sq_phase2, const sq_t, sq_avx2_quant, sq_scalar_quant)

/* E4M3FN code -> float32 (NVFP4 block scales), as torch decodes it: 0x7f/0xff is the NaN with the
 * code's mantissa bits at the top of the payload (0x7ff00000 | sign). */
static float dec_e4m3(uint8_t c) {
    uint32_t e = (c >> 3) & 15u, m = c & 7u, sign = (uint32_t)(c & 0x80u) << 24;
    if ((c & 0x7fu) == 0x7fu) return u2f(sign | 0x7ff00000u);
    /* normal: exponent e - 7 rebiased to float32 (+120), mantissa moved up; subnormal: m * 2^-9, exact */
    uint32_t v = e == 0 ? f2u((float)m * 0x1p-9f) : ((e + 120u) << 23) | (m << 20);
    return u2f(sign | v);
}

/* Per-format constants: fmt 0 e4m3, 1 e5m2, 2 mxfp8-e4m3, 3 mxfp8-e5m2, 4 mxfp6-e2m3, 5 mxfp6-e3m2,
 * 6 mxfp4-e2m1, 7 nvfp4 (E2M1 codes, E4M3 block scales x a float32 tensor scale g). */
static const struct { float fmax; int emax, mbits, lowbit, mx; } SQ_FMT[8] = {
    {448.0f, 8, 3, 0, 0}, {57344.0f, 15, 2, 0, 0}, {448.0f, 8, 3, 0, 1}, {57344.0f, 15, 2, 0, 1},
    {7.5f, 2, 3, 2, 1}, {28.0f, 4, 2, 3, 1}, {6.0f, 2, 1, 1, 1}, {6.0f, 2, 1, 1, 0}};

/* MX E8M0 scale (reference.mx_scale): rule 0 floor, 1 rceil, 2 even; exact. With amax = m * 2^e,
 * m in [0.5, 1) (frexp): floor(log2 amax) = e - 1; EVEN adds 1 where m rounded (RNE) to mbits + 1 bits
 * is 1; RCEIL adds 1 where m > fmax / 2^(emax+1). Normal amax (the common case) reads e and m from the
 * bits (no libm call: this runs serially once per tile, 512K times for 16M elements at MX 32). */
static float mx_scale1(float amax, int fmt, int rule) {
    if (!(amax > 0.0f)) return 1.0f;
    const int mbits = SQ_FMT[fmt].mbits;
    uint32_t u = f2u(amax), frac = u & 0x7fffffu;
    int e;
    if (u >= 0x00800000u) {
        e = (int)(u >> 23) - 126;
    } else { /* float32 subnormal: normalise through frexpf */
        float mf = frexpf(amax, &e);
        frac = f2u(mf) & 0x7fffffu;
    }
    /* m = 0.5 * 1.frac: bits 0x3f000000 | frac */
    if (rule == 2) e += (frac + (1u << (22 - mbits)) - 1u + ((frac >> (23 - mbits)) & 1u)) >> 23;
    int ex = e - 1 - SQ_FMT[fmt].emax;
    if (rule == 1) ex += u2f(0x3f000000u | frac) > SQ_FMT[fmt].fmax / (float)(2 << SQ_FMT[fmt].emax);
    ex = ex < -127 ? -127 : (ex > 127 ? 127 : ex);
    return ex >= -126 ? u2f((uint32_t)(ex + 127) << 23) : u2f(0x00400000u);
}

/* Tile geometry and work units of a scaled cast of x [R, C] in br x bc tiles (1 <= br <= R, 1 <= bc <= C)
 * into fmt, and the partials (the caller sets c->data and runs sq_phase1, sq_tile_scales, then its
 * element pass; or, where sq_local, sq_local_scales and its element pass unit by unit). Returns 0, or -1 when out of memory (nothing then stays allocated). */
#define SQ_ROW_UNIT (8 * UNIT)

/* Transposed inputs: units at most SQ_T_COLS columns wide, bands of about SQ_T_ROWS rows (see "scaled casts:
 * transposed inputs"). */
#define SQ_T_COLS ((size_t)1024)
#define SQ_T_ROWS ((size_t)64)

static int sq_init(sq_t *c, const void *x, int dt, size_t R, size_t C, size_t br, size_t bc, int fmt, int rule,
                   int has_g, float g, float *scale, int xt) {
    memset(c, 0, sizeof *c);
    c->fmt = fmt; c->rule = rule; c->has_g = has_g; c->g = g;
    c->mult = 1.0f;
    c->x = x; c->dt = dt;
    c->R = R; c->C = C; c->br = br; c->bc = bc;
    c->nbr = (R + br - 1) / br; c->nbc = (C + bc - 1) / bc;
    c->e5m2 = fmt == 1 || fmt == 3; c->fmax = SQ_FMT[fmt].fmax;
    c->lowbit = SQ_FMT[fmt].lowbit;
    c->track = c->lowbit;
    /* pieces of about UNIT elements: rows first (inside one tile row), then columns. Where a whole tile fits in
     * a unit, all br rows of a tile row, so that units hold whole tiles and take the one-pass local mode
     * (sq_local); and whole tile rows up to SQ_ROW_UNIT elements (128x128 at C = 4096: units of 128 x 4096,
     * one contiguous 2 MiB run that sq_run_ahead prefetches, where 128 x 512 pieces ran 1.2x slower). */
    const size_t cmax = xt && C > SQ_T_COLS ? SQ_T_COLS : C; /* a transposed x: narrower units, more rows */
    c->rpu = cmax >= UNIT ? 1 : UNIT / cmax;
    if (c->rpu > br || br * bc <= UNIT) c->rpu = br;
    c->sub = (br + c->rpu - 1) / c->rpu;
    size_t cw = UNIT / c->rpu;
    if (cw < 1) cw = 1;
    if (c->rpu == br && br * C <= SQ_ROW_UNIT && !xt) cw = C;
    if (xt && cw > SQ_T_COLS) cw = SQ_T_COLS;
    c->xt = xt;
    /* a band of a transposed x: about UNIT elements (at least SQ_T_ROWS rows), so that each storage row (a column of x)
     * is read in runs of that many rows: G^T of a 128-token batch (128 columns) in bands of 512 rows, not 64 */
    const size_t band_rows = cmax >= UNIT / SQ_T_ROWS ? SQ_T_ROWS : UNIT / cmax;
    c->bh = xt && c->rpu < band_rows ? band_rows / c->rpu : 1;
    if (bc <= cw) {
        c->k = cw / bc; c->cs = 1; c->cw = 0;
        c->ncp = (c->nbc + c->k - 1) / c->k;
    } else {
        c->k = 1; c->cs = (bc + cw - 1) / cw; c->cw = (bc + c->cs - 1) / c->cs;
        c->ncp = c->nbc * c->cs;
    }
    size_t rows_units = c->nbr * c->sub;
    c->units = rows_units * c->ncp;
    c->np = rows_units * c->nbc * c->cs;
    /* calloc: a piece that turns out empty (short last tile) leaves its partial at 0, the max's identity */
    c->partial = (uint32_t *)calloc(c->np, sizeof(uint32_t));
    c->nonfin = (uint8_t *)calloc(c->np, 1);
    if (c->lowbit) c->div = (float *)malloc(c->nbr * c->nbc * sizeof(float));
    c->scale = scale;
    if (c->partial == NULL || c->nonfin == NULL || (c->lowbit && c->div == NULL)) {
        free(c->partial); free(c->nonfin); free(c->div);
        return -1;
    }
    return 0;
}

static void sq_free(sq_t *c) { free(c->partial); free(c->nonfin); free(c->div); }

/* Tiles per work unit of sq_tile_scales, and a tile's cost in elements' worth for pick_threads: a scale
 * costs ~10 ns (NVFP4's E4M3 encode/decode), about 16 elements of an element pass. */
#define SQ_SCALE_TILES ((size_t)4096)
#define SQ_SCALE_COST ((size_t)16)

/* One tile's scale (and, 4/6-bit, its element divisor) from its amax partials (c->fmt, c->rule, c->g). */
static void sq_scale1(sq_t *c, size_t tr, size_t tc) {
    const int fmt = c->fmt;
    uint32_t m = 0;
    int nf = 0;
    for (size_t p = 0; p < c->sub; p++)
        for (size_t q = 0; q < c->cs; q++) {
            size_t at = ((tr * c->sub + p) * c->nbc + tc) * c->cs + q;
            uint32_t v = c->partial[at];
            m = v > m ? v : m;
            if (c->lowbit) nf |= c->nonfin[at];
        }
    float amax = u2f(m), s, d;
    if (SQ_FMT[fmt].mx) {
        s = d = mx_scale1(amax, fmt, c->rule);
    } else if (fmt == 7) { /* E4M3 block scale: e4m3_rne_sat(fl32(amax / fl32(6 g))), divisor fl32(s g) */
        const float g = c->grow ? c->grow[tr] : c->g; /* grow: 1 x bc tiles, tile row tr = row tr */
        s = dec_e4m3(enc_fp8(amax / (6.0f * g), 0, 0x43e00000u));
        d = s * g;
    } else if (c->given > 0.0f) {
        s = d = c->given;
    } else {
        s = amax / c->fmax;
        if (c->mult != 1.0f) s = s * c->mult;
        s = d = s > 0.0f ? s : 1.0f;
    }
    if (c->lowbit) {
        c->div[tr * c->nbc + tc] = d;
        s = nf ? NAN : s; /* a tile with a NaN/Inf has no element code for it: NaN scale */
    }
    c->scale[tr * c->nbc + tc] = s;
}

#if FP_X86
/* MX scales of tiles [t0, t1] of tile row tr, 8 at a time (AVX2; "scaled casts: AVX2 element loops");
 * returns the first tile it left to sq_scale1. */
AVX2 static size_t sqv_mx_scales(sq_t *c, size_t tr, size_t t0, size_t t1);
/* NVFP4 scales and divisors of tiles [t0, t1] of tile row tr, 8 at a time (AVX2, see there); returns the first
 * tile it left to sq_scale1. */
AVX2 static size_t sqv_nvfp4_scales(sq_t *c, size_t tr, size_t t0, size_t t1);
#endif

/* The scales of tiles [t0, t1] of tile row tr: 8 at a time where the AVX2 code applies (one partial per tile:
 * sub = cs = 1; MX or NVFP4), the rest through sq_scale1. */
static void sq_scales_row(sq_t *c, size_t tr, size_t t0, size_t t1) {
    size_t t = t0;
#if FP_X86
    if (g_have_avx2 && c->sub == 1 && c->cs == 1) {
        if (SQ_FMT[c->fmt].mx) t = sqv_mx_scales(c, tr, t0, t1);
        else if (c->fmt == 7) t = sqv_nvfp4_scales(c, tr, t0, t1);
    }
#endif
    for (; t <= t1; t++) sq_scale1(c, tr, t);
}

/* Tile rows [u * spu, (u + 1) * spu) of the scales (a run_units work function of sq_tile_scales). */
static void sq_scales_work(void *vc, size_t u) {
    sq_t *c = (sq_t *)vc;
    const size_t spu = SQ_SCALE_TILES / c->nbc > 0 ? SQ_SCALE_TILES / c->nbc : 1;
    for (size_t tr = u * spu; tr < (u + 1) * spu && tr < c->nbr; tr++) sq_scales_row(c, tr, 0, c->nbc - 1);
}

/* After sq_phase1 over all units: every tile's scale (sq_scale1), over nt threads (NVFP4 1x16 at 16M
 * elements has 1M tiles: ~10 ms serially). The NVFP4 tensor scale c->g is computed here from all
 * partials unless c->has_g. */
static void sq_tile_scales(sq_t *c, int nt) {
    if (c->fmt == 7 && !c->has_g) { /* reference.nvfp4_global_scale: fl32(tensor amax / 2688), 1 if not > 0 */
        uint32_t m = 0;
        for (size_t i = 0; i < c->np; i++) m = c->partial[i] > m ? c->partial[i] : m;
        c->g = u2f(m) / 2688.0f;
        c->g = c->g > 0.0f ? c->g : 1.0f;
    }
    const size_t spu = SQ_SCALE_TILES / c->nbc > 0 ? SQ_SCALE_TILES / c->nbc : 1;
    const size_t units = (c->nbr + spu - 1) / spu;
    run_units(sq_scales_work, c, units, pick_threads(c->nbr * c->nbc * SQ_SCALE_COST, nt));
}

/* A unit holds whole tiles (sub = cs = 1) and no scale waits for the whole tensor (NVFP4 without a
 * given g): the unit can take its tiles' amax, scales and elements in one go, while its rows are still
 * in cache, instead of two passes over x from memory. Same values: a tile's partials are all its own. */
static int sq_local(const sq_t *c) { return c->sub == 1 && c->cs == 1 && !(c->fmt == 7 && !c->has_g); }

/* The amax and scales of unit u's tiles (local mode: sub = cs = 1, tile row w.ru). */
static void sq_local_scales(sq_t *c, size_t u) {
    sq_phase1(c, u);
    sq_unit_t w = sq_unit(c, u);
    if (w.c0 >= w.c1) return;
    sq_scales_row(c, w.ru, w.c0 / c->bc, (w.c1 - 1) / c->bc);
}

static void sq_local_work(void *vc, size_t u) {
    sq_local_scales((sq_t *)vc, u);
    sq_phase2(vc, u);
}

/* The local mode's units over nt threads, each prefetching its next unit's input (same section): ctx the sq_t of
 * quantize_scaled, or the fq_job_t of fused_scaled (fused = 1). */
static void sq_run_ahead(const void *ctx, int fused, size_t nunits, int nt);

/* A transposed x's units over nt threads, band by band (same section as sq_run_ahead): the amax pass, the
 * element pass, or both unit by unit (local mode); ctx as sq_run_ahead's. Sets *nomem when a band buffer
 * could not be allocated (outputs then incomplete). */
#define SQ_BAND_AMAX 0
#define SQ_BAND_ELEMENTS 1
#define SQ_BAND_LOCAL 2
static void sq_run_bands(const void *ctx, int fused, int mode, int nt, int *nomem);

/* The argument checks of the scaled-cast entry points: 0, or -1 with a ValueError set. */
static int sq_check_args(const char *fn, Py_ssize_t R, Py_ssize_t C, Py_ssize_t br, Py_ssize_t bc, int dt, int fmt,
                         int rule) {
    if (R <= 0 || C <= 0 || br <= 0 || bc <= 0 || br > R || bc > C || dt < 0 || dt > 2 || fmt < 0 || fmt > 7
        || rule < 0 || rule > 2) {
        PyErr_Format(PyExc_ValueError, "%s: bad sizes (R=%zd, C=%zd, tile=%zdx%zd, dtype=%d, fmt=%d, rule=%d)",
                     fn, R, C, br, bc, dt, fmt, rule);
        return -1;
    }
    return 0;
}

/* The stochastic-rounding arguments of the scaled-cast entry points (sr, key, period_rows P, grow: the address of
 * float32 [R] per-row NVFP4 tensor scales or 0) checked and set on c: 0, or -1 with a ValueError set. */
static int sq_check_sr(const char *fn, sq_t *c, int sr, unsigned int key, Py_ssize_t period, unsigned long long grow) {
    if (sr && !c->lowbit) {
        PyErr_Format(PyExc_ValueError, "%s: expected a 4/6-bit format for stochastic rounding, got fmt=%d", fn, c->fmt);
        return -1;
    }
    if (period < 1 || (size_t)period > c->R || c->R % (size_t)period) {
        PyErr_Format(PyExc_ValueError, "%s: expected period_rows dividing the %zu rows, got %zd", fn, c->R, period);
        return -1;
    }
    if (grow && (c->fmt != 7 || c->br != 1)) {
        PyErr_Format(PyExc_ValueError, "%s: expected nvfp4 with 1 x bc tiles for per-row tensor scales, got fmt=%d, "
                     "tile=%zux%zu", fn, c->fmt, c->br, c->bc);
        return -1;
    }
    c->sr = sr; c->sr_key = (uint32_t)key; c->sr_period = (size_t)period;
    c->grow = (const float *)(uintptr_t)grow;
    if (grow) c->has_g = 1; /* no tensor scale to compute */
    return 0;
}

static PyObject *py_quantize_scaled(PyObject *self, PyObject *args) {
    unsigned long long xp, dp, sp, grow = 0;
    Py_ssize_t R, C, br, bc, period = 0;
    int dt, fmt, want, rule = 0, has_g = 0, xt = 0, nomem = 0, sr = 0;
    unsigned int key = 0;
    double gd = 1.0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinnnniKKi|iidppInK", &xp, &dt, &R, &C, &br, &bc, &fmt, &dp, &sp, &want, &rule, &has_g,
                          &gd, &xt, &sr, &key, &period, &grow))
        return NULL;
    if (sq_check_args("quantize_scaled", R, C, br, bc, dt, fmt, rule) < 0) return NULL;
    sq_t c;
    if (sq_init(&c, (const void *)(uintptr_t)xp, dt, (size_t)R, (size_t)C, (size_t)br, (size_t)bc, fmt, rule, has_g,
                (float)gd, (float *)(uintptr_t)sp, xt) < 0)
        return PyErr_NoMemory();
    if (sq_check_sr("quantize_scaled", &c, sr, key, period ? period : R, grow) < 0) {
        sq_free(&c);
        return NULL;
    }
    c.data = (uint8_t *)(uintptr_t)dp;
    int nt = pick_threads(c.R * c.C, want);
    Py_BEGIN_ALLOW_THREADS
    if (c.xt) {
        if (sq_local(&c)) {
            sq_run_bands(&c, 0, SQ_BAND_LOCAL, nt, &nomem);
        } else {
            sq_run_bands(&c, 0, SQ_BAND_AMAX, nt, &nomem);
            sq_tile_scales(&c, nt);
            sq_run_bands(&c, 0, SQ_BAND_ELEMENTS, nt, &nomem);
        }
    } else if (sq_local(&c)) {
        sq_run_ahead(&c, 0, c.units, nt);
    } else {
        run_units(sq_phase1, &c, c.units, nt);
        sq_tile_scales(&c, nt);
        run_units(sq_phase2, &c, c.units, nt);
    }
    Py_END_ALLOW_THREADS
    sq_free(&c);
    if (nomem) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Largest finite |x| over n elements (the NVFP4 tensor amax), from the bit patterns like the tile amax. */
typedef struct { const void *x; int dt; size_t n; uint32_t *partial; } fa_t;

INLINE void fa_body(const fa_t *c, size_t u, int dt) {
    size_t lo = u * UNIT, hi = lo + UNIT < c->n ? lo + UNIT : c->n;
    c->partial[u] = sq_amax_run(c->x, lo, hi, dt, 0, 0, NULL);
}

#define FA_DISPATCH(NAME, ATTR)                                                                 \
    ATTR static void NAME(const fa_t *c, size_t u) {                                          \
        switch (c->dt) { case DT_F32: fa_body(c, u, DT_F32); break;                           \
                         case DT_F16: fa_body(c, u, DT_F16); break;                           \
                         default: fa_body(c, u, DT_BF16); break; }                            \
    }
FA_DISPATCH(fa_scalar, )
#if FP_X86
FA_DISPATCH(fa_avx2, __attribute__((target("avx2,f16c"))))
#endif

SIMD_WORK(fa_work, const fa_t, fa_avx2, fa_scalar)

static PyObject *py_finite_amax(PyObject *self, PyObject *args) {
    unsigned long long xp;
    Py_ssize_t n;
    int dt, want;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kini", &xp, &dt, &n, &want)) return NULL;
    if (n <= 0 || dt < 0 || dt > 2) {
        PyErr_Format(PyExc_ValueError, "finite_amax: bad sizes (n=%zd, dtype=%d)", n, dt);
        return NULL;
    }
    size_t units = ((size_t)n + UNIT - 1) / UNIT;
    fa_t c = {(const void *)(uintptr_t)xp, dt, (size_t)n, (uint32_t *)calloc(units, sizeof(uint32_t))};
    if (c.partial == NULL) return PyErr_NoMemory();
    int nt = pick_threads((size_t)n, want);
    uint32_t m = 0;
    Py_BEGIN_ALLOW_THREADS
    run_units(fa_work, &c, units, nt);
    for (size_t u = 0; u < units; u++) m = c.partial[u] > m ? c.partial[u] : m;
    Py_END_ALLOW_THREADS
    free(c.partial);
    return PyFloat_FromDouble((double)u2f(m));
}

typedef struct {
    const uint8_t *data; const float *table; const float *scale;
    size_t R, C, br, bc, nbc, rpu; void *out; int dt; int bad;
    int has_g; float g;   /* NVFP4: y = fl32(fl32(value * scale) * g) */
    int dec;              /* the AVX2 loop's decoding: 0 table gather, 1 dec_fp8 e4m3, 2 dec_fp8 e5m2 (sd_decoding) */
} sd_t;

/* One run [lo, hi) of one tile (scale s): out = fl32(table[code] * s) [* g] in dt; 1 if some output is NaN. */
INLINE int sd_run(const sd_t *c, size_t lo, size_t hi, int dt, int has_g, float s) {
    int bad = 0;
    for (size_t i = lo; i < hi; i++) {
        float y = c->table[c->data[i]] * s;
        if (has_g) y = y * c->g;
        bad |= y != y;
        store1(c->out, i, y, dt);
    }
    return bad;
}

/* Unit u = rpu whole rows, with the run function RUN (sd_run, or the AVX2 one). */
#define SD_BODY(NAME, RUN, ATTR)                                                                  \
    ATTR INLINE int NAME##_g(const sd_t *c, size_t u, int dt, int has_g) {                      \
        size_t r0 = u * c->rpu, r1 = r0 + c->rpu < c->R ? r0 + c->rpu : c->R;                   \
        int bad = 0;                                                                            \
        for (size_t r = r0; r < r1; r++) {                                                      \
            const float *srow = c->scale + (r / c->br) * c->nbc;                                \
            for (size_t tc = 0; tc < c->nbc; tc++) {                                            \
                size_t lo = r * c->C + tc * c->bc;                                              \
                size_t hi = r * c->C + ((tc + 1) * c->bc < c->C ? (tc + 1) * c->bc : c->C);     \
                bad |= RUN(c, lo, hi, dt, has_g, srow[tc]);                                     \
            }                                                                                   \
        }                                                                                       \
        return bad;                                                                             \
    }                                                                                           \
    ATTR INLINE int NAME(const sd_t *c, size_t u, int dt) {                                     \
        return c->has_g ? NAME##_g(c, u, dt, 1) : NAME##_g(c, u, dt, 0);                        \
    }
SD_BODY(sd_body, sd_run, )

#define SD_DISPATCH(NAME, BODY, ATTR, END)                                                        \
    ATTR static int NAME(const sd_t *c, size_t u) {                                           \
        int bad;                                                                              \
        switch (c->dt) { case DT_F32: bad = BODY(c, u, DT_F32); break;                        \
                         case DT_F16: bad = BODY(c, u, DT_F16); break;                        \
                         default: bad = BODY(c, u, DT_BF16); break; }                         \
        END                                                                                   \
        return bad;                                                                           \
    }
SD_DISPATCH(sd_scalar, sd_body, , )
#if FP_X86
AVX2 static int sd_avx2(const sd_t *c, size_t u); /* "scaled casts: AVX2 element loops" */
#endif

static void sd_work(void *vc, size_t u) {
    sd_t *c = (sd_t *)vc;
    int bad;
#if FP_X86
    if (g_have_avx2) bad = sd_avx2(c, u);
    else
#endif
        bad = sd_scalar(c, u);
    if (bad) __atomic_store_n(&c->bad, 1, __ATOMIC_RELAXED);
}

/* Whether the 256-entry table is dec_fp8's decoding on every non-NaN entry: 1 e4m3, 2 e5m2, 0 neither (then
 * the AVX2 loop gathers from the table). A NaN entry gives a NaN output (the call falls back) either way. */
static int sd_decoding(const float *table) {
    for (int e5m2 = 0; e5m2 < 2; e5m2++) {
        int same = 1;
        for (uint32_t k = 0; k < 256 && same; k++) {
            float t = table[k], d = dec_fp8(k, e5m2);
            same = (t != t && d != d) || f2u(t) == f2u(d);
        }
        if (same) return 1 + e5m2;
    }
    return 0;
}

static PyObject *py_dequantize_scaled(PyObject *self, PyObject *args) {
    unsigned long long dp, tp, sp, op;
    Py_ssize_t R, C, br, bc;
    int dt, want, has_g = 0;
    double gd = 1.0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKnnnnKii|id", &dp, &tp, &sp, &R, &C, &br, &bc, &op, &dt, &want, &has_g, &gd))
        return NULL;
    if (R <= 0 || C <= 0 || br <= 0 || bc <= 0 || br > R || bc > C || dt < 0 || dt > 2) {
        PyErr_Format(PyExc_ValueError, "dequantize_scaled: bad sizes (R=%zd, C=%zd, tile=%zdx%zd, dtype=%d)",
                     R, C, br, bc, dt);
        return NULL;
    }
    sd_t c = {(const uint8_t *)(uintptr_t)dp, (const float *)(uintptr_t)tp, (const float *)(uintptr_t)sp,
              (size_t)R, (size_t)C, (size_t)br, (size_t)bc, ((size_t)C + (size_t)bc - 1) / (size_t)bc, 1,
              (void *)(uintptr_t)op, dt, 0, has_g, (float)gd, 0};
    c.dec = sd_decoding(c.table);
    c.rpu = c.C >= UNIT ? 1 : UNIT / c.C;
    int nt = pick_threads(c.R * c.C, want);
    Py_BEGIN_ALLOW_THREADS
    run_units(sd_work, &c, (c.R + c.rpu - 1) / c.rpu, nt);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(c.bad);
}

/* ========================================================================= metrics reductions
 * Part "metrics in one C pass" (fp8probe/analysis/metrics.py through backends/cpu.py): the sums,
 * counts and extremes of ErrorAccumulator, OperandAccumulator, TensorStats and OutlierCensus, each in
 * one pass over the tensors (TensorStats: two, the central moments need the mean first;
 * OperandAccumulator without a mask: two, |x| > max|q| needs the max first) instead of ~10 torch
 * passes with float64 temporaries.
 *
 * Inputs are read as doubles: float32/fp16/bf16 widen exactly (load1 then a float->double
 * conversion), float64 (DT_F64) is read as is. Products and differences are formed in double.
 *
 * Deterministic float64 sums (the same bits for any thread count or SIMD path): the flat index
 * range 0..n-1 is cut into consecutive blocks of SUM_BLOCK = 8192 elements (the last one partial);
 * inside a block 8 double lanes, element i (block-relative) added to lane i % 8 in index order;
 * at the end of the block the lanes combine as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)); the block
 * results are added in block order into a double starting at 0.0 (threads compute blocks into
 * per-block slots, the combine runs after the join). An element that a sum leaves out (a NaN/Inf,
 * or a pair with one) adds +0.0 to its lane, which changes no lane (lanes start at +0.0 and a
 * round-to-nearest sum is -0.0 only when both terms are), so "left out" and "adds zero" are the
 * same bits. max/min/counts are order-free. */
#define SUM_BLOCK ((size_t)8192)
#define SUM_LANES 8
#define BLOCKS_PER_UNIT (UNIT / SUM_BLOCK)
#define DT_F64 3

INLINE double loadd(const void *p, size_t i, int dt) {
    if (dt == DT_F64) return ((const double *)p)[i];
    return (double)load1(p, i, dt);
}

INLINE uint64_t f2u_d(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

/* finite as one compare (NaN compares false), so the loops stay branch-free and vectorise */
INLINE int fin_d(double v) { return fabs(v) <= 0x1.fffffffffffffp+1023; }

INLINE double lanes_combine(const double *l) {
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* Σ over blocks in block order: slot[b * stride + k] for b = 0..nb-1 */
static double blocks_total(const double *slot, size_t nb, size_t stride, size_t k) {
    double t = 0.0;
    for (size_t b = 0; b < nb; b++) t += slot[b * stride + k];
    return t;
}

static size_t n_sum_blocks(size_t n) { return (n + SUM_BLOCK - 1) / SUM_BLOCK; }

/* Dispatch BODY(c, u, dt_a, dt_b) on two dtype codes, so each of the 16 pairs is compiled with
 * constant dtypes (the loads inline to one conversion). */
#define DT_INNER(BODY, A, dtb)                                                                  \
    switch (dtb) { case DT_F32: BODY(c, u, A, DT_F32); break; case DT_F16: BODY(c, u, A, DT_F16); break; \
                   case DT_BF16: BODY(c, u, A, DT_BF16); break; default: BODY(c, u, A, DT_F64); break; }
#define DT_PAIR(BODY, dta, dtb)                                                                 \
    switch (dta) { case DT_F32: DT_INNER(BODY, DT_F32, dtb) break; case DT_F16: DT_INNER(BODY, DT_F16, dtb) break; \
                   case DT_BF16: DT_INNER(BODY, DT_BF16, dtb) break; default: DT_INNER(BODY, DT_F64, dtb) break; }

/* ------------------------------------------------- transposed views, read block by block (no full copy)
 * The replay hands the reductions transposed views: wgrad's result (A^T G^T)^T, the OCP/MX casts' G^T,
 * A^T and W^T. Such an operand is a tensor read flat in the C order of its logical shape [.., rows, cols]
 * whose storage is [.., cols, rows] (x.mT contiguous). Copying it whole cost a second tensor (108 MiB at
 * a 49152x576 LM head); instead each SUM_BLOCK of logical elements is gathered into a per-unit buffer
 * and the block loop reads that buffer. Every value and its place in the summation order are unchanged,
 * so the results are the bits of copying first. A tview_t with rows == 0 is a contiguous operand. */
typedef struct { size_t rows, cols; } tview_t;

INLINE void tv_copy(char *d, const char *s, size_t es) {
    if (es == 8) memcpy(d, s, 8);
    else if (es == 4) memcpy(d, s, 4);
    else if (es == 2) memcpy(d, s, 2);
    else *d = *s;
}

/* dst[i * ldd + j] = src[j * lds + i] for i < nr, j < nc: a transpose between two leading dimensions, in 8x8
 * tiles (both sides touch 8 cache lines per tile); element size ES constant after inlining. */
INLINE void tv_transpose_es(const char *src, size_t lds, char *dst, size_t ldd, size_t nr, size_t nc, size_t es) {
    for (size_t j0 = 0; j0 < nc; j0 += 8) {
        size_t j1 = j0 + 8 < nc ? j0 + 8 : nc;
        for (size_t i0 = 0; i0 < nr; i0 += 8) {
            size_t i1 = i0 + 8 < nr ? i0 + 8 : nr;
            for (size_t j = j0; j < j1; j++)
                for (size_t i = i0; i < i1; i++) tv_copy(dst + (i * ldd + j) * es, src + (j * lds + i) * es, es);
        }
    }
}

#if FP_X86
/* d[k * ldd + j] = s[j * lds + k] for k, j < 8 (float32 bits), by register shuffles */
AVX2 INLINE void tr8x8_ps(const float *s, size_t lds, float *d, size_t ldd) {
    __m256 r[8], t[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(s + k * lds);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        r[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xee);
        r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xee);
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(d + k * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(d + (k + 4) * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
}

/* the same for 4x4 float64 */
AVX2 INLINE void tr4x4_pd(const double *s, size_t lds, double *d, size_t ldd) {
    __m256d r0 = _mm256_loadu_pd(s), r1 = _mm256_loadu_pd(s + lds), r2 = _mm256_loadu_pd(s + 2 * lds),
            r3 = _mm256_loadu_pd(s + 3 * lds);
    __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1), t2 = _mm256_unpacklo_pd(r2, r3),
            t3 = _mm256_unpackhi_pd(r2, r3);
    _mm256_storeu_pd(d, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(d + ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(d + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(d + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
}

/* tv_transpose_es for 4- and 8-byte elements: register tiles, the edges by the scalar loop */
AVX2 static void tv_transpose_avx2(const char *src, size_t lds, char *dst, size_t ldd, size_t nr, size_t nc,
                                   size_t es) {
    const size_t t = es == 4 ? 8 : 4, nr_t = nr - nr % t, nc_t = nc - nc % t;
    for (size_t j = 0; j < nc_t; j += t)
        for (size_t i = 0; i < nr_t; i += t) {
            if (es == 4) tr8x8_ps((const float *)src + j * lds + i, lds, (float *)dst + i * ldd + j, ldd);
            else tr4x4_pd((const double *)src + j * lds + i, lds, (double *)dst + i * ldd + j, ldd);
        }
    tv_transpose_es(src + nr_t * es, lds, dst + nr_t * ldd * es, ldd, nr - nr_t, nc, es); /* last rows */
    tv_transpose_es(src + nc_t * lds * es, lds, dst + nc_t * es, ldd, nr_t, nc - nc_t, es); /* last cols */
    _mm256_zeroupper();
}
#endif

static void tv_transpose(const char *src, size_t lds, char *dst, size_t ldd, size_t nr, size_t nc, size_t es) {
#if FP_X86
    if (g_have_avx2 && (es == 4 || es == 8)) { tv_transpose_avx2(src, lds, dst, ldd, nr, nc, es); return; }
#endif
    switch (es) {
    case 8: tv_transpose_es(src, lds, dst, ldd, nr, nc, 8); break;
    case 4: tv_transpose_es(src, lds, dst, ldd, nr, nc, 4); break;
    case 2: tv_transpose_es(src, lds, dst, ldd, nr, nc, 2); break;
    default: tv_transpose_es(src, lds, dst, ldd, nr, nc, 1); break;
    }
}

/* buf[0 .. hi-lo) = the logical elements lo..hi-1 of a transposed view at src, element size es. Per
 * [rows, cols] matrix: the logical rows the range covers whole are one tv_transpose (each storage row
 * is read in runs of consecutive logical rows, ~range/cols elements); a partial first or last row
 * is read along it (one element per storage row). */
static void tv_gather(const void *srcv, size_t es, tview_t v, size_t lo, size_t hi, void *bufv) {
    const char *src = (const char *)srcv;
    char *buf = (char *)bufv;
    const size_t R = v.rows, C = v.cols, mat = R * C;
    while (lo < hi) {
        size_t b = lo / mat, l0 = lo - b * mat, l1 = hi - b * mat < mat ? hi - b * mat : mat;
        const char *m = src + b * mat * es;
        size_t r0 = l0 / C, r1 = (l1 - 1) / C, c0 = l0 % C, c1 = (l1 - 1) % C; /* first, last (inclusive) */
        size_t ra = r0 + (c0 > 0), rb = r1 + (c1 == C - 1);                      /* whole rows [ra, rb) */
        for (size_t r = r0; r <= r1; r++) {
            if (r >= ra && r < rb) continue;
            size_t cs = r == r0 ? c0 : 0, ce = r == r1 ? c1 + 1 : C;
            char *d = buf + (r * C + cs - l0) * es;
            for (size_t c = cs; c < ce; c++, d += es) tv_copy(d, m + (c * R + r) * es, es);
        }
        if (rb > ra) tv_transpose(m + ra * es, R, buf + (ra * C - l0) * es, C, rb - ra, C, es);
        buf += (l1 - l0) * es;
        lo = b * mat + l1;
    }
}

static size_t sum_dt_size(int dt) { return dt == DT_F64 ? 8 : dt == DT_F32 ? 4 : 2; }

/* Where element lo + j of the logical range [lo, hi) lives (at index j): src itself offset by lo (contiguous)
 * or buf after gathering the range into it. The reductions gather a whole work unit (UNIT elements, 256 KiB
 * of float32, L2-sized) at once: a 49152x576 float32 view gathered per SUM_BLOCK (~14-element runs per
 * storage row) took 56 ms single-threaded, per UNIT (~114-element runs) 17 ms; its full copy 24 ms. */
static const void *tv_range(const void *src, size_t es, tview_t v, size_t lo, size_t hi, void *buf) {
    if (!v.rows) return (const char *)src + lo * es;
    tv_gather(src, es, v, lo, hi, buf);
    return buf;
}

/* Parse one operand's (rows, cols) layout argument: (0, 0) contiguous, else a transposed view whose
 * logical [.., rows, cols] tiles n elements. */
static int tv_check(const char *fn, const char *name, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t n, tview_t *v) {
    if (rows == 0 && cols == 0) { v->rows = v->cols = 0; return 0; }
    if (rows <= 0 || cols <= 0 || n % (rows * cols)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %s's transposed layout to tile n=%zd elements, got rows=%zd, cols=%zd",
                     fn, name, n, rows, cols);
        return -1;
    }
    v->rows = (size_t)rows; v->cols = (size_t)cols;
    return 0;
}

/* ------------------------------------------- the reductions' 8-element steps in AVX2 (error_sums, operand_sums)
 * Element i + k of a step goes to lane k as in the scalar loops (ES_ELEM, OS_ELEM): two 4-lane float64
 * halves, lanes 0..3 and 4..7. Each lane is formed as the scalar loop forms it (values widened exactly,
 * differences and products in float64, one mul then one add: no FMA), so the lanes hold its bits; counts
 * and maxima are order-free. The block loops call these for a block's whole steps and run the last m % 8
 * elements through the scalar element code. Measured (one thread, AVX2 EPYC, in-cache [1536, 576]):
 * see benchmarks/RESULTS.md "Metrics reductions". */
#if FP_X86
AVX2 INLINE void ld8d(const void *p, size_t i, int dt, __m256d *lo, __m256d *hi) {
    if (dt == DT_F64) {
        *lo = _mm256_loadu_pd((const double *)p + i);
        *hi = _mm256_loadu_pd((const double *)p + i + 4);
        return;
    }
    __m256 v = load8(p, i, dt); /* exact: float32 holds every f16/bf16 value */
    *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
}

AVX2 INLINE __m256d abs4d(__m256d v) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), v); }

/* fin_d on 4 lanes: all-ones where finite (NaN compares false) */
AVX2 INLINE __m256d fin4d(__m256d v) { return _mm256_cmp_pd(abs4d(v), _mm256_set1_pd(0x1.fffffffffffffp+1023), _CMP_LE_OQ); }

/* count += mask (all-ones lanes are -1 as int64) */
AVX2 INLINE __m256i cnt4(__m256i count, __m256d mask) { return _mm256_sub_epi64(count, _mm256_castpd_si256(mask)); }
#endif

/* ------------------------------------------------------------------ error_sums (ErrorAccumulator) */
#define ES_K 4 /* Σr², Σ(r-q)², Σq², Σr·q */
typedef struct {
    const void *r, *q; int rdt, qdt; size_t n;
    tview_t rv, qv;               /* layouts of r and q (rows == 0: contiguous) */
    int *nomem;                   /* set when a unit cannot get its gather buffer */
    double *slot;                 /* [blocks][ES_K] */
    double *umax;                 /* [units] max |r-q| */
    int64_t *ucount;              /* [units][3]: compared, nonfinite, excluded */
} es_t;

#if FP_X86
/* ES_ELEM over the block's first m8 elements (m8 a multiple of 8), into the block's lane arrays. A first pass
 * leaves out the finite checks: with every r and q finite, ES_ELEM's selects keep r and q, and that pass is
 * ES_ELEM itself. A NaN or ±Inf among them makes one of the four sums non-finite (r² or q² is), so the pass is
 * redone from the same lanes with the checks (so is a block whose finite sums overflowed: it gets the same
 * bits). */
AVX2 INLINE void es_steps_t(const void *rb, const void *qb, size_t m8, int rdt, int qdt, double *r2, double *e2,
                            double *q2, double *rq, double *lmx, int64_t *lok, int64_t *lokr) {
    __m256d R2[2], E2[2], Q2[2], RQ[2], MX[2];
    __m256i OK[2], OKR[2];
    for (int checked = 0; checked < 2; checked++) {
        for (int h = 0; h < 2; h++) {
            R2[h] = _mm256_loadu_pd(r2 + 4 * h); E2[h] = _mm256_loadu_pd(e2 + 4 * h);
            Q2[h] = _mm256_loadu_pd(q2 + 4 * h); RQ[h] = _mm256_loadu_pd(rq + 4 * h);
            MX[h] = _mm256_loadu_pd(lmx + 4 * h);
            OK[h] = _mm256_loadu_si256((const __m256i *)(lok + 4 * h));
            OKR[h] = _mm256_loadu_si256((const __m256i *)(lokr + 4 * h));
        }
        for (size_t i = 0; i < m8; i += SUM_LANES) {
            __m256d r[2], q[2];
            ld8d(rb, i, rdt, &r[0], &r[1]);
            ld8d(qb, i, qdt, &q[0], &q[1]);
            for (int h = 0; h < 2; h++) {
                __m256d r0 = r[h], q0 = q[h];
                if (checked) {
                    __m256d okr = fin4d(r0), ok = _mm256_and_pd(okr, fin4d(q0));
                    r0 = _mm256_and_pd(r0, ok);
                    q0 = _mm256_and_pd(q0, ok);
                    OK[h] = cnt4(OK[h], ok);
                    OKR[h] = cnt4(OKR[h], okr);
                }
                __m256d e = _mm256_sub_pd(r0, q0);
                R2[h] = _mm256_add_pd(R2[h], _mm256_mul_pd(r0, r0));
                E2[h] = _mm256_add_pd(E2[h], _mm256_mul_pd(e, e));
                Q2[h] = _mm256_add_pd(Q2[h], _mm256_mul_pd(q0, q0));
                RQ[h] = _mm256_add_pd(RQ[h], _mm256_mul_pd(r0, q0));
                MX[h] = _mm256_max_pd(abs4d(e), MX[h]); /* ae > lmx ? ae : lmx */
            }
        }
        if (!checked) {
            /* all-ones where a lane's four sums are finite */
            __m256d fin = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_setzero_si256(), _mm256_setzero_si256()));
            for (int h = 0; h < 2; h++)
                fin = _mm256_and_pd(fin, _mm256_and_pd(_mm256_and_pd(fin4d(R2[h]), fin4d(E2[h])),
                                                       _mm256_and_pd(fin4d(Q2[h]), fin4d(RQ[h]))));
            if (_mm256_movemask_pd(fin) != 0xf) continue;
            /* every pair finite: each lane compared m8 / 8 pairs, all with a finite r */
            const int64_t per_lane = (int64_t)(m8 / SUM_LANES);
            for (int h = 0; h < 2; h++) {
                OK[h] = _mm256_add_epi64(OK[h], _mm256_set1_epi64x(per_lane));
                OKR[h] = _mm256_add_epi64(OKR[h], _mm256_set1_epi64x(per_lane));
            }
        }
        break;
    }
    for (int h = 0; h < 2; h++) {
        _mm256_storeu_pd(r2 + 4 * h, R2[h]); _mm256_storeu_pd(e2 + 4 * h, E2[h]);
        _mm256_storeu_pd(q2 + 4 * h, Q2[h]); _mm256_storeu_pd(rq + 4 * h, RQ[h]);
        _mm256_storeu_pd(lmx + 4 * h, MX[h]);
        _mm256_storeu_si256((__m256i *)(lok + 4 * h), OK[h]);
        _mm256_storeu_si256((__m256i *)(lokr + 4 * h), OKR[h]);
    }
}

/* es_steps_t with the dtypes constant; out of line, so the baseline (scalar) instantiation of es_body can
 * hold the call (it never makes it) without inlining AVX2 code. */
AVX2 NOINLINE static void es_steps_avx2(const void *rb, const void *qb, size_t m8, int rdt, int qdt, double *r2,
                                        double *e2, double *q2, double *rq, double *lmx, int64_t *lok, int64_t *lokr) {
#define ES_STEPS(c_, u_, A, B) es_steps_t(rb, qb, m8, A, B, r2, e2, q2, rq, lmx, lok, lokr) /* (DT_PAIR's c, u unused) */
    DT_PAIR(ES_STEPS, rdt, qdt)
#undef ES_STEPS
    _mm256_zeroupper();
}
#endif

INLINE void es_body(const es_t *c, size_t u, int rdt, int qdt, int vec) {
    size_t b0 = u * BLOCKS_PER_UNIT, nb = n_sum_blocks(c->n);
    size_t b1 = b0 + BLOCKS_PER_UNIT < nb ? b0 + BLOCKS_PER_UNIT : nb;
    const size_t rsz = sum_dt_size(rdt), qsz = sum_dt_size(qdt);
    char *buf = NULL;
    if (c->rv.rows || c->qv.rows) {
        buf = (char *)malloc(UNIT * (rsz + qsz));
        if (!buf) { __atomic_store_n(c->nomem, 1, __ATOMIC_RELAXED); return; }
    }
    const size_t ulo = b0 * SUM_BLOCK, uhi = b1 * SUM_BLOCK < c->n ? b1 * SUM_BLOCK : c->n;
    const char *ru = (const char *)tv_range(c->r, rsz, c->rv, ulo, uhi, buf);
    const char *qu = (const char *)tv_range(c->q, qsz, c->qv, ulo, uhi, buf + UNIT * rsz);
    double mx = 0.0;
    int64_t cnt = 0, nonfin = 0, excl = 0;
    for (size_t b = b0; b < b1; b++) {
        size_t lo = b * SUM_BLOCK, hi = lo + SUM_BLOCK < c->n ? lo + SUM_BLOCK : c->n;
        const void *rb = ru + (lo - ulo) * rsz;
        const void *qb = qu + (lo - ulo) * qsz;
        double r2[SUM_LANES] = {0}, e2[SUM_LANES] = {0}, q2[SUM_LANES] = {0}, rq[SUM_LANES] = {0};
        double lmx[SUM_LANES] = {0};
        int64_t lok[SUM_LANES] = {0}, lokr[SUM_LANES] = {0};
        size_t i = 0, m = hi - lo; /* block-relative */
#if FP_X86
        if (vec && m >= SUM_LANES) {
            i = m - m % SUM_LANES;
            es_steps_avx2(rb, qb, i, rdt, qdt, r2, e2, q2, rq, lmx, lok, lokr);
        }
#else
        (void)vec;
#endif
#define ES_ELEM(I, K)                                                                          \
    {                                                                                          \
        double r = loadd(rb, (I), rdt), q = loadd(qb, (I), qdt);                               \
        int okr = fin_d(r), ok = okr & fin_d(q);                                               \
        double r0 = ok ? r : 0.0, q0 = ok ? q : 0.0, e = r0 - q0, ae = fabs(e);                \
        r2[K] += r0 * r0; e2[K] += e * e; q2[K] += q0 * q0; rq[K] += r0 * q0;                  \
        lmx[K] = ae > lmx[K] ? ae : lmx[K];                                                    \
        lok[K] += ok; lokr[K] += okr;                                                          \
    }
        for (; i + SUM_LANES <= m; i += SUM_LANES)
            for (int k = 0; k < SUM_LANES; k++) ES_ELEM(i + k, k)
        for (int k = 0; i < m; i++, k++) ES_ELEM(i, k)
#undef ES_ELEM
        double *s = c->slot + b * ES_K;
        s[0] = lanes_combine(r2); s[1] = lanes_combine(e2); s[2] = lanes_combine(q2); s[3] = lanes_combine(rq);
        int64_t ok = 0, okr = 0;
        for (int k = 0; k < SUM_LANES; k++) {
            mx = lmx[k] > mx ? lmx[k] : mx;
            ok += lok[k]; okr += lokr[k];
        }
        cnt += ok; nonfin += okr - ok; excl += (int64_t)(hi - lo) - okr;
    }
    free(buf);
    c->umax[u] = mx;
    c->ucount[3 * u] = cnt; c->ucount[3 * u + 1] = nonfin; c->ucount[3 * u + 2] = excl;
}

/* The AVX2 entry points end with _mm256_zeroupper(), as the quantisers do (see "quantise: AVX2"). */
INLINE void es_body_scalar(const es_t *c, size_t u, int rdt, int qdt) { es_body(c, u, rdt, qdt, 0); }
INLINE void es_body_vec(const es_t *c, size_t u, int rdt, int qdt) { es_body(c, u, rdt, qdt, 1); }
#define ES_DISPATCH(NAME, BODY, ATTR, END)                                                      \
    ATTR static void NAME(const es_t *c, size_t u) { DT_PAIR(BODY, c->rdt, c->qdt) END }
ES_DISPATCH(es_scalar, es_body_scalar, , )
#if FP_X86
ES_DISPATCH(es_avx2, es_body_vec, AVX2, _mm256_zeroupper();)
#endif

SIMD_WORK(es_work, const es_t, es_avx2, es_scalar)

static int bad_dt(int dt) { return dt < DT_F32 || dt > DT_F64; }

static PyObject *py_error_sums(PyObject *self, PyObject *args) {
    unsigned long long rp, qp;
    int rdt, qdt, want, nomem = 0;
    Py_ssize_t n, rrows = 0, rcols = 0, qrows = 0, qcols = 0;
    tview_t rv, qv;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKini|nnnn", &rp, &rdt, &qp, &qdt, &n, &want, &rrows, &rcols, &qrows, &qcols))
        return NULL;
    if (n <= 0 || bad_dt(rdt) || bad_dt(qdt)) {
        PyErr_Format(PyExc_ValueError, "error_sums: expected n > 0 and dtype codes 0..3, got n=%zd, dtypes %d, %d",
                     n, rdt, qdt);
        return NULL;
    }
    if (tv_check("error_sums", "ref", rrows, rcols, n, &rv) || tv_check("error_sums", "lp", qrows, qcols, n, &qv))
        return NULL;
    size_t nb = n_sum_blocks((size_t)n), units = (nb + BLOCKS_PER_UNIT - 1) / BLOCKS_PER_UNIT;
    es_t c = {(const void *)(uintptr_t)rp, (const void *)(uintptr_t)qp, rdt, qdt, (size_t)n, rv, qv, &nomem,
              (double *)malloc(nb * ES_K * sizeof(double)), (double *)malloc(units * sizeof(double)),
              (int64_t *)malloc(units * 3 * sizeof(int64_t))};
    if (!c.slot || !c.umax || !c.ucount) {
        free(c.slot); free(c.umax); free(c.ucount);
        return PyErr_NoMemory();
    }
    int nt = pick_threads((size_t)n, want);
    double s[ES_K], mx = 0.0;
    int64_t cnt[3] = {0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    run_units(es_work, &c, units, nt);
    for (int k = 0; k < ES_K; k++) s[k] = blocks_total(c.slot, nb, ES_K, (size_t)k);
    for (size_t u = 0; u < units; u++) {
        mx = c.umax[u] > mx ? c.umax[u] : mx;
        for (int k = 0; k < 3; k++) cnt[k] += c.ucount[3 * u + k];
    }
    Py_END_ALLOW_THREADS
    free(c.slot); free(c.umax); free(c.ucount);
    if (nomem) return PyErr_NoMemory();
    return Py_BuildValue("(dddddLLL)", s[0], s[1], s[2], s[3], mx, (long long)cnt[0], (long long)cnt[1],
                         (long long)cnt[2]);
}

/* -------------------------------------------------------------- operand_sums (OperandAccumulator) */
#define OS_K 2 /* Σx², Σ(x-q)² over pairs where both are finite */
#define OS_C 6 /* finite x, non-zero finite x, underflow, saturated, excluded x, finite x with q not */
typedef struct {
    const void *x, *q; int xdt, qdt; size_t n;
    const uint8_t *sat;           /* saturation mask, or NULL: |x| > qmax */
    tview_t xv, qv, sv;           /* layouts of x, q and the mask (rows == 0: contiguous) */
    int *nomem;                   /* set when a unit cannot get its gather buffer */
    double qmax;
    double *slot;                 /* [blocks][OS_K] */
    int64_t *ucount;              /* [units][OS_C] */
    double *uqmax;                /* [units] max |q| over finite pairs (phase 1) */
} os_t;

INLINE int os_needs_buffer(const os_t *c) { return c->xv.rows || c->qv.rows || (c->sat && c->sv.rows); }

/* a unit's gather buffer (UNIT elements of x, q and the mask) when an operand is a transposed view;
 * NULL when none is, or when malloc failed (then *nomem is set) */
static char *os_buffer(const os_t *c, size_t xsz, size_t qsz) {
    if (!os_needs_buffer(c)) return NULL;
    char *buf = (char *)malloc(UNIT * (xsz + qsz + 1));
    if (!buf) __atomic_store_n(c->nomem, 1, __ATOMIC_RELAXED);
    return buf;
}

INLINE void os_qmax_body(const os_t *c, size_t u, int xdt, int qdt) {
    const size_t xsz = sum_dt_size(xdt), qsz = sum_dt_size(qdt);
    char *buf = os_buffer(c, xsz, qsz);
    if (!buf && os_needs_buffer(c)) return;
    size_t lo = u * UNIT, hi = lo + UNIT < c->n ? lo + UNIT : c->n;
    const void *xu = tv_range(c->x, xsz, c->xv, lo, hi, buf);
    const void *qu = tv_range(c->q, qsz, c->qv, lo, hi, buf + UNIT * xsz);
    int64_t m = 0; /* max of the bit patterns of |q| (non-negative doubles order like them): vectorises */
    for (size_t i = 0; i < hi - lo; i++) {
        double x = loadd(xu, i, xdt), q = loadd(qu, i, qdt);
        int64_t bits = fin_d(x) & fin_d(q) ? (int64_t)f2u_d(fabs(q)) : 0;
        m = bits > m ? bits : m;
    }
    free(buf);
    double d;
    memcpy(&d, &m, 8);
    c->uqmax[u] = d;
}

#if FP_X86
/* OS_ELEM over the block's first m8 elements (m8 a multiple of 8), into the block's lanes x2, e2 and counts
 * cn[OS_C][SUM_LANES]; the first pass without the finite checks, redone with them when a sum is not finite,
 * as es_steps_t (a NaN/±Inf x makes x² so, a NaN/±Inf q with a finite x makes (x-q)² so). */
AVX2 INLINE void os_steps_t(const void *xb, const void *qb, size_t m8, int xdt, int qdt, int has_sat, double qmax,
                            double *x2, double *e2, int64_t (*cn)[SUM_LANES]) {
    __m256d X2[2], E2[2];
    __m256i CN[OS_C][2];
    const __m256d zero = _mm256_setzero_pd(), qmaxv = _mm256_set1_pd(qmax);
    for (int checked = 0; checked < 2; checked++) {
        for (int h = 0; h < 2; h++) {
            X2[h] = _mm256_loadu_pd(x2 + 4 * h);
            E2[h] = _mm256_loadu_pd(e2 + 4 * h);
            for (int j = 0; j < OS_C; j++) CN[j][h] = _mm256_loadu_si256((const __m256i *)(cn[j] + 4 * h));
        }
        for (size_t i = 0; i < m8; i += SUM_LANES) {
            __m256d xv[2], qv[2];
            ld8d(xb, i, xdt, &xv[0], &xv[1]);
            ld8d(qb, i, qdt, &qv[0], &qv[1]);
            for (int h = 0; h < 2; h++) {
                __m256d x = xv[h], q = qv[h], okx = zero, nz = _mm256_cmp_pd(x, zero, _CMP_NEQ_UQ);
                if (checked) {
                    __m256d okq = fin4d(q), ok;
                    okx = fin4d(x);
                    ok = _mm256_and_pd(okx, okq);
                    nz = _mm256_and_pd(nz, okx);
                    x = _mm256_and_pd(x, ok);
                    q = _mm256_and_pd(q, ok);
                    CN[0][h] = cnt4(CN[0][h], okx);
                    CN[5][h] = cnt4(CN[5][h], _mm256_andnot_pd(okq, okx));
                }
                __m256d e = _mm256_sub_pd(x, q);
                X2[h] = _mm256_add_pd(X2[h], _mm256_mul_pd(x, x));
                E2[h] = _mm256_add_pd(E2[h], _mm256_mul_pd(e, e));
                CN[1][h] = cnt4(CN[1][h], nz);
                CN[2][h] = cnt4(CN[2][h], _mm256_and_pd(nz, _mm256_cmp_pd(qv[h], zero, _CMP_EQ_OQ)));
                if (!has_sat) {
                    __m256d sat = _mm256_cmp_pd(abs4d(xv[h]), qmaxv, _CMP_GT_OQ); /* NaN x: false */
                    CN[3][h] = cnt4(CN[3][h], checked ? _mm256_and_pd(sat, okx) : sat);
                }
            }
        }
        if (!checked) {
            __m256d fin = _mm256_and_pd(_mm256_and_pd(fin4d(X2[0]), fin4d(E2[0])),
                                        _mm256_and_pd(fin4d(X2[1]), fin4d(E2[1])));
            if (_mm256_movemask_pd(fin) != 0xf) continue;
            const int64_t per_lane = (int64_t)(m8 / SUM_LANES); /* every x finite */
            for (int h = 0; h < 2; h++) CN[0][h] = _mm256_add_epi64(CN[0][h], _mm256_set1_epi64x(per_lane));
        }
        break;
    }
    for (int h = 0; h < 2; h++) {
        _mm256_storeu_pd(x2 + 4 * h, X2[h]);
        _mm256_storeu_pd(e2 + 4 * h, E2[h]);
        for (int j = 0; j < OS_C; j++) _mm256_storeu_si256((__m256i *)(cn[j] + 4 * h), CN[j][h]);
    }
}

/* os_steps_t with the dtypes and has_sat constant, out of line as es_steps_avx2. */
AVX2 NOINLINE static void os_steps_avx2(const void *xb, const void *qb, size_t m8, int xdt, int qdt, int has_sat,
                                        double qmax, double *x2, double *e2, int64_t (*cn)[SUM_LANES]) {
#define OS_STEPS(c_, u_, A, B) /* (DT_PAIR's c, u unused) */                               \
    if (has_sat) os_steps_t(xb, qb, m8, A, B, 1, qmax, x2, e2, cn);                             \
    else os_steps_t(xb, qb, m8, A, B, 0, qmax, x2, e2, cn)
    DT_PAIR(OS_STEPS, xdt, qdt)
#undef OS_STEPS
    _mm256_zeroupper();
}
#endif

INLINE void os_body_s(const os_t *c, size_t u, int xdt, int qdt, int has_sat, int vec) {
    size_t b0 = u * BLOCKS_PER_UNIT, nb = n_sum_blocks(c->n);
    size_t b1 = b0 + BLOCKS_PER_UNIT < nb ? b0 + BLOCKS_PER_UNIT : nb;
    const size_t xsz = sum_dt_size(xdt), qsz = sum_dt_size(qdt);
    char *buf = os_buffer(c, xsz, qsz);
    if (!buf && os_needs_buffer(c)) return;
    int64_t tot[OS_C] = {0};
    const double qmax = c->qmax;
    const size_t ulo = b0 * SUM_BLOCK, uhi = b1 * SUM_BLOCK < c->n ? b1 * SUM_BLOCK : c->n;
    const char *xu = (const char *)tv_range(c->x, xsz, c->xv, ulo, uhi, buf);
    const char *qu = (const char *)tv_range(c->q, qsz, c->qv, ulo, uhi, buf + UNIT * xsz);
    const uint8_t *satu = has_sat ? (const uint8_t *)tv_range(c->sat, 1, c->sv, ulo, uhi, buf + UNIT * (xsz + qsz))
                                  : NULL;
    for (size_t b = b0; b < b1; b++) {
        size_t lo = b * SUM_BLOCK, hi = lo + SUM_BLOCK < c->n ? lo + SUM_BLOCK : c->n;
        const void *xb = xu + (lo - ulo) * xsz, *qb = qu + (lo - ulo) * qsz;
        const uint8_t *sat = has_sat ? satu + (lo - ulo) : NULL;
        double x2[SUM_LANES] = {0}, e2[SUM_LANES] = {0};
        int64_t cn[OS_C][SUM_LANES] = {{0}};
        size_t i = 0, m = hi - lo; /* block-relative */
#if FP_X86
        if (vec && m >= SUM_LANES) {
            i = m - m % SUM_LANES;
            os_steps_avx2(xb, qb, i, xdt, qdt, has_sat, qmax, x2, e2, cn);
        }
#else
        (void)vec;
#endif
#define OS_ELEM(I, K)                                                                          \
    {                                                                                          \
        double x = loadd(xb, (I), xdt), q = loadd(qb, (I), qdt);                               \
        int okx = fin_d(x), okq = fin_d(q), ok = okx & okq, nz = okx & (x != 0.0);             \
        double x0 = ok ? x : 0.0, e = x0 - (ok ? q : 0.0);                                     \
        x2[K] += x0 * x0; e2[K] += e * e;                                                      \
        int s = has_sat ? 0 : fabs(x) > qmax; /* a mask is counted below */                   \
        cn[0][K] += okx; cn[1][K] += nz; cn[2][K] += nz & (q == 0.0); cn[3][K] += okx & s;     \
        cn[5][K] += okx & !okq;                                                                \
    }
        for (; i + SUM_LANES <= m; i += SUM_LANES)
            for (int k = 0; k < SUM_LANES; k++) OS_ELEM(i + k, k)
        for (int k = 0; i < m; i++, k++) OS_ELEM(i, k)
#undef OS_ELEM
        c->slot[b * OS_K] = lanes_combine(x2);
        c->slot[b * OS_K + 1] = lanes_combine(e2);
        int64_t fin_x = 0;
        for (int k = 0; k < SUM_LANES; k++) fin_x += cn[0][k];
        if (has_sat) {
            /* the mask in a loop of its own (bytes only: vectorises; inside the loop above it kept
             * that loop scalar), minus the masked NaN/Inf x, which only a block holding one has */
            uint32_t ns = 0;
            for (size_t j = 0; j < m; j++) ns += sat[j] != 0;
            if (fin_x != (int64_t)m)
                for (size_t j = 0; j < m; j++) ns -= (sat[j] != 0) & !fin_d(loadd(xb, j, xdt));
            tot[3] += ns;
        }
        for (int j = 0; j < OS_C; j++)
            for (int k = 0; k < SUM_LANES; k++) tot[j] += cn[j][k];
        tot[4] += (int64_t)(hi - lo);
    }
    free(buf);
    tot[4] -= tot[0]; /* excluded = elements - finite x */
    for (int j = 0; j < OS_C; j++) c->ucount[u * OS_C + j] = tot[j];
}

INLINE void os_body(const os_t *c, size_t u, int xdt, int qdt, int vec) {
    if (c->sat) os_body_s(c, u, xdt, qdt, 1, vec);
    else os_body_s(c, u, xdt, qdt, 0, vec);
}
INLINE void os_body_scalar(const os_t *c, size_t u, int xdt, int qdt) { os_body(c, u, xdt, qdt, 0); }
INLINE void os_body_vec(const os_t *c, size_t u, int xdt, int qdt) { os_body(c, u, xdt, qdt, 1); }

#define OS_DISPATCH(NAME, BODY, ATTR, END)                                                      \
    ATTR static void NAME(const os_t *c, size_t u) { DT_PAIR(BODY, c->xdt, c->qdt) END }
OS_DISPATCH(os_scalar, os_body_scalar, , )
OS_DISPATCH(osq_scalar, os_qmax_body, , )
#if FP_X86
OS_DISPATCH(os_avx2, os_body_vec, AVX2, _mm256_zeroupper();)
OS_DISPATCH(osq_avx2, os_qmax_body, AVX2, _mm256_zeroupper();)
#endif

SIMD_WORK(os_work, const os_t, os_avx2, os_scalar)
SIMD_WORK(osq_work, const os_t, osq_avx2, osq_scalar)

static PyObject *py_operand_sums(PyObject *self, PyObject *args) {
    unsigned long long xp, qp, sp;
    int xdt, qdt, want, nomem = 0;
    Py_ssize_t n, xrows = 0, xcols = 0, qrows = 0, qcols = 0, srows = 0, scols = 0;
    tview_t xv, qv, sv;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKiKni|nnnnnn", &xp, &xdt, &qp, &qdt, &sp, &n, &want, &xrows, &xcols, &qrows,
                          &qcols, &srows, &scols))
        return NULL;
    if (n <= 0 || bad_dt(xdt) || bad_dt(qdt)) {
        PyErr_Format(PyExc_ValueError, "operand_sums: expected n > 0 and dtype codes 0..3, got n=%zd, dtypes %d, %d",
                     n, xdt, qdt);
        return NULL;
    }
    if (tv_check("operand_sums", "x", xrows, xcols, n, &xv) || tv_check("operand_sums", "q", qrows, qcols, n, &qv)
        || tv_check("operand_sums", "saturated", srows, scols, n, &sv))
        return NULL;
    size_t nb = n_sum_blocks((size_t)n), units = ((size_t)n + UNIT - 1) / UNIT;
    os_t c = {(const void *)(uintptr_t)xp, (const void *)(uintptr_t)qp, xdt, qdt, (size_t)n,
              (const uint8_t *)(uintptr_t)sp, xv, qv, sv, &nomem, 0.0, (double *)malloc(nb * OS_K * sizeof(double)),
              (int64_t *)malloc(units * OS_C * sizeof(int64_t)), (double *)malloc(units * sizeof(double))};
    if (!c.slot || !c.ucount || !c.uqmax) {
        free(c.slot); free(c.ucount); free(c.uqmax);
        return PyErr_NoMemory();
    }
    int nt = pick_threads((size_t)n, want);
    double s[OS_K];
    int64_t cnt[OS_C] = {0};
    Py_BEGIN_ALLOW_THREADS
    if (c.sat == NULL) {
        run_units(osq_work, &c, units, nt);
        for (size_t u = 0; u < units; u++) c.qmax = c.uqmax[u] > c.qmax ? c.uqmax[u] : c.qmax;
    }
    run_units(os_work, &c, units, nt);
    for (int k = 0; k < OS_K; k++) s[k] = blocks_total(c.slot, nb, OS_K, (size_t)k);
    for (size_t u = 0; u < units; u++)
        for (int k = 0; k < OS_C; k++) cnt[k] += c.ucount[u * OS_C + k];
    Py_END_ALLOW_THREADS
    free(c.slot); free(c.ucount); free(c.uqmax);
    if (nomem) return PyErr_NoMemory();
    return Py_BuildValue("(ddLLLLLL)", s[0], s[1], (long long)cnt[0], (long long)cnt[1], (long long)cnt[2],
                         (long long)cnt[3], (long long)cnt[4], (long long)cnt[5]);
}

/* -------------------------------------------------------------------- tensor_stats (TensorStats) */
/* Phase 1: Σx (finite x, deterministic order), the special-value counts, finite amax and smallest
 * non-zero |x|, the log2 histogram (floor(log2|x|) from the double's exponent field: exact, and
 * float32 subnormals are normal doubles; float64 subnormals go through ilogb) and the absmax of every
 * 1 x seg row segment of the [rows, cols] view (NaN/Inf count as 0). Phase 2: with mean = Σx / n
 * (double), the central power sums Σd², Σd²·d, Σd²·d² of d = x - mean (double, d² = d·d). */
#define TS_NLIM 3
#define TS_C (5 + TS_NLIM + 1) /* nan, +inf, -inf, zeros, subnormal, over limit j, finite */
#define TS_MAXBINS 255 /* bins are uint8 indices, nbins itself the spare bin */
#define TS_SUBH 4
typedef struct {
    const void *x; int dt; size_t n, cols, seg, nseg;
    double tiny, lim[TS_NLIM]; int hlo, nbins;
    double mean;
    double *slot;       /* [blocks][4]: Σx (phase 1); Σd², Σd³, Σd⁴ (phase 2) */
    int64_t *ucount;    /* [units][TS_C] */
    double *uamax, *umin;
    int64_t *uhist;     /* [units][nbins] */
    uint64_t *segmax;   /* [rows * nseg]: bits of the (non-negative double) segment absmax, zeroed by the caller */
    tview_t xv;         /* layout of x (rows == 0: contiguous) */
    int *nomem;         /* set when a unit cannot get its gather buffer */
} ts_t;

/* x's elements of unit u, [*ulo, *uhi), at xu[i - *ulo]: x itself, or gathered into *buf (malloc'd, UNIT
 * elements; the caller frees it) for a transposed view; NULL when that allocation failed (*nomem set). */
static const char *ts_unit_x(const ts_t *c, size_t u, size_t *ulo, size_t *uhi, char **buf) {
    const size_t es = sum_dt_size(c->dt);
    *ulo = u * UNIT;
    *uhi = *ulo + UNIT < c->n ? *ulo + UNIT : c->n;
    *buf = NULL;
    if (c->xv.rows && !(*buf = (char *)malloc(UNIT * es))) {
        __atomic_store_n(c->nomem, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    return (const char *)tv_range(c->x, es, c->xv, *ulo, *uhi, *buf);
}

/* max into a non-negative double held as its bits (non-negative doubles order like their bits) */
static void atomic_max_bits(uint64_t *p, uint64_t v) {
    uint64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v > cur && !__atomic_compare_exchange_n(p, &cur, v, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

INLINE void ts1_body(const ts_t *c, size_t u, int dt, int unused) {
    (void)unused;
    size_t b0 = u * BLOCKS_PER_UNIT, nb = n_sum_blocks(c->n);
    size_t b1 = b0 + BLOCKS_PER_UNIT < nb ? b0 + BLOCKS_PER_UNIT : nb;
    int64_t tot[TS_C] = {0};
    int64_t *hist = c->uhist + u * (size_t)c->nbins;
    const double tiny = c->tiny, l0 = c->lim[0], l1 = c->lim[1], l2 = c->lim[2];
    const int hlo = c->hlo, hhi = c->hlo + c->nbins - 1;
    const int nbins = c->nbins;
    double amax = 0.0, mn = INFINITY;
    uint32_t sub[TS_SUBH][TS_MAXBINS + 1]; /* a unit has 65536 elements: uint32 counts cannot overflow */
    uint8_t bin[SUM_BLOCK];
    size_t ulo, uhi;
    char *buf;
    const char *xu = ts_unit_x(c, u, &ulo, &uhi, &buf);
    if (!xu) return;
    memset(sub, 0, sizeof(sub));
    for (int j = 0; j < nbins; j++) hist[j] = 0;
    for (size_t b = b0; b < b1; b++) {
        size_t lo = b * SUM_BLOCK, hi = lo + SUM_BLOCK < c->n ? lo + SUM_BLOCK : c->n;
        double sx[SUM_LANES] = {0}, lmx[SUM_LANES] = {0};
        double lmn[SUM_LANES] = {INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY};
        int64_t cn[TS_C][SUM_LANES] = {{0}};
        size_t i = lo;
#define TS_ELEM(I, K)                                                                          \
    {                                                                                          \
        double v = loadd(xu, (I) - ulo, dt), a = fabs(v);                                      \
        int fin = fin_d(v), nzf = fin & (a > 0.0);                                             \
        sx[K] += fin ? v : 0.0;                                                                \
        double a0 = fin ? a : 0.0, am = nzf ? a : INFINITY;                                    \
        lmx[K] = a0 > lmx[K] ? a0 : lmx[K];                                                    \
        lmn[K] = am < lmn[K] ? am : lmn[K];                                                    \
        cn[0][K] += v != v; cn[1][K] += v == INFINITY; cn[2][K] += v == -INFINITY;             \
        cn[3][K] += a == 0.0; cn[4][K] += nzf & (a < tiny);                                    \
        cn[5][K] += fin & (a > l0); cn[6][K] += fin & (a > l1); cn[7][K] += fin & (a > l2);    \
        cn[8][K] += fin;                                                                       \
    }
        for (; i + SUM_LANES <= hi; i += SUM_LANES)
            for (int k = 0; k < SUM_LANES; k++) TS_ELEM(i + k, k)
        for (int k = 0; i < hi; i++, k++) TS_ELEM(i, k)
#undef TS_ELEM
        c->slot[b * 4] = lanes_combine(sx);
        for (int k = 0; k < SUM_LANES; k++) {
            amax = lmx[k] > amax ? lmx[k] : amax;
            mn = lmn[k] < mn ? lmn[k] : mn;
            for (int j = 0; j < TS_C; j++) tot[j] += cn[j][k];
        }
        /* histogram and row-segment absmaxes: the block again (in cache). The bin of each element
         * first (vectorised: an element that is not counted goes to the spare bin nbins), then the
         * increments, element i into sub-histogram i % TS_SUBH so that runs of one bin (most values
         * share a few binades) do not wait on the previous increment of the same counter. */
        for (size_t j = lo; j < hi; j++) {
            double a = fabs(loadd(xu, j - ulo, dt));
            int ok = fin_d(a) & (a > 0.0);
            /* float32/fp16/bf16 values are normal doubles: the exponent field is exact; float64
             * subnormals need ilogb */
            int e = (int)((f2u_d(a) >> 52) & 0x7ff) - 1023;
            if (dt == DT_F64 && e == -1023 && ok) e = ilogb(a);
            e = e < hlo ? hlo : e > hhi ? hhi : e;
            bin[j - lo] = (uint8_t)(ok ? e - hlo : nbins);
        }
        size_t m8 = (hi - lo) & ~(size_t)(TS_SUBH - 1);
        for (size_t j = 0; j < m8; j += TS_SUBH)
            for (int h = 0; h < TS_SUBH; h++) sub[h][bin[j + h]]++;
        for (size_t j = m8; j < hi - lo; j++) sub[0][bin[j]]++;
        /* row-segment absmax pieces: a max of the bit patterns (non-negative doubles order like them) */
        for (i = lo; i < hi;) {
            size_t row = i / c->cols, col = i - row * c->cols, sg = col / c->seg;
            size_t send = (sg + 1) * c->seg < c->cols ? (sg + 1) * c->seg : c->cols;
            size_t pe = i + (send - col) < hi ? i + (send - col) : hi;
            int64_t m = 0;
            for (; i < pe; i++) {
                double a = fabs(loadd(xu, i - ulo, dt));
                int64_t bits = fin_d(a) ? (int64_t)f2u_d(a) : 0;
                m = bits > m ? bits : m;
            }
            if (m) atomic_max_bits(c->segmax + row * c->nseg + sg, (uint64_t)m);
        }
    }
    free(buf);
    for (int j = 0; j < nbins; j++)
        for (int h = 0; h < TS_SUBH; h++) hist[j] += sub[h][j];
    for (int j = 0; j < TS_C; j++) c->ucount[u * TS_C + j] = tot[j];
    c->uamax[u] = amax;
    c->umin[u] = mn;
}

INLINE void ts2_body(const ts_t *c, size_t u, int dt, int unused) {
    (void)unused;
    size_t b0 = u * BLOCKS_PER_UNIT, nb = n_sum_blocks(c->n);
    size_t b1 = b0 + BLOCKS_PER_UNIT < nb ? b0 + BLOCKS_PER_UNIT : nb;
    const double mean = c->mean;
    size_t ulo, uhi;
    char *buf;
    const char *xu = ts_unit_x(c, u, &ulo, &uhi, &buf);
    if (!xu) return;
    for (size_t b = b0; b < b1; b++) {
        size_t lo = b * SUM_BLOCK, hi = lo + SUM_BLOCK < c->n ? lo + SUM_BLOCK : c->n;
        double m2[SUM_LANES] = {0}, m3[SUM_LANES] = {0}, m4[SUM_LANES] = {0};
        size_t i = lo;
#define TS2_ELEM(I, K)                                                                         \
    {                                                                                          \
        double v = loadd(xu, (I) - ulo, dt), d = fin_d(v) ? v - mean : 0.0, d2 = d * d;        \
        m2[K] += d2; m3[K] += d2 * d; m4[K] += d2 * d2;                                        \
    }
        for (; i + SUM_LANES <= hi; i += SUM_LANES)
            for (int k = 0; k < SUM_LANES; k++) TS2_ELEM(i + k, k)
        for (int k = 0; i < hi; i++, k++) TS2_ELEM(i, k)
#undef TS2_ELEM
        double *s = c->slot + b * 4;
        s[1] = lanes_combine(m2); s[2] = lanes_combine(m3); s[3] = lanes_combine(m4);
    }
    free(buf);
}

#define TS_DISPATCH(NAME, BODY, ATTR, END)                                                      \
    ATTR static void NAME(const ts_t *c, size_t u) {                                          \
        switch (c->dt) { case DT_F32: BODY(c, u, DT_F32, 0); break; case DT_F16: BODY(c, u, DT_F16, 0); break; \
                         case DT_BF16: BODY(c, u, DT_BF16, 0); break; default: BODY(c, u, DT_F64, 0); break; } \
        END                                                                                    \
    }
TS_DISPATCH(ts1_scalar, ts1_body, , )
TS_DISPATCH(ts2_scalar, ts2_body, , )
#if FP_X86
TS_DISPATCH(ts1_avx2, ts1_body, AVX2, _mm256_zeroupper();)
TS_DISPATCH(ts2_avx2, ts2_body, AVX2, _mm256_zeroupper();)
#endif

SIMD_WORK(ts1_work, const ts_t, ts1_avx2, ts1_scalar)
SIMD_WORK(ts2_work, const ts_t, ts2_avx2, ts2_scalar)

static PyObject *py_tensor_stats(PyObject *self, PyObject *args) {
    unsigned long long xp, hp, sp;
    int dt, hlo, nbins, want, nomem = 0, xt = 0;
    Py_ssize_t n, cols, seg;
    double tiny, l0, l1, l2;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinnnddddiiKKi|p", &xp, &dt, &n, &cols, &seg, &tiny, &l0, &l1, &l2, &hlo,
                          &nbins, &hp, &sp, &want, &xt))
        return NULL;
    if (n <= 0 || cols <= 0 || n % cols != 0 || seg <= 0 || bad_dt(dt) || nbins <= 0 || nbins > TS_MAXBINS) {
        PyErr_Format(PyExc_ValueError,
                     "tensor_stats: expected n > 0 a multiple of cols > 0, seg > 0, dtype code 0..3 and 1..%d bins, "
                     "got n=%zd, cols=%zd, seg=%zd, dtype %d, %d bins", TS_MAXBINS, n, cols, seg, dt, nbins);
        return NULL;
    }
    size_t nb = n_sum_blocks((size_t)n), units = ((size_t)n + UNIT - 1) / UNIT;
    ts_t c = {(const void *)(uintptr_t)xp, dt, (size_t)n, (size_t)cols, (size_t)seg,
              ((size_t)cols + (size_t)seg - 1) / (size_t)seg, tiny, {l0, l1, l2}, hlo, nbins, 0.0,
              (double *)malloc(nb * 4 * sizeof(double)), (int64_t *)malloc(units * TS_C * sizeof(int64_t)),
              (double *)malloc(units * sizeof(double)), (double *)malloc(units * sizeof(double)),
              (int64_t *)malloc(units * (size_t)nbins * sizeof(int64_t)), (uint64_t *)(uintptr_t)sp,
              {xt ? (size_t)n / (size_t)cols : 0, xt ? (size_t)cols : 0}, &nomem}; /* xt: x stored as [cols, rows] */
    if (!c.slot || !c.ucount || !c.uamax || !c.umin || !c.uhist) {
        free(c.slot); free(c.ucount); free(c.uamax); free(c.umin); free(c.uhist);
        return PyErr_NoMemory();
    }
    int64_t *hist = (int64_t *)(uintptr_t)hp;
    int nt = pick_threads((size_t)n, want);
    int64_t cnt[TS_C] = {0};
    double sum = 0.0, amax = 0.0, mn = INFINITY, m[3] = {0.0, 0.0, 0.0};
    Py_BEGIN_ALLOW_THREADS
    run_units(ts1_work, &c, units, nt);
    sum = blocks_total(c.slot, nb, 4, 0);
    for (int j = 0; j < nbins; j++) hist[j] = 0;
    for (size_t u = 0; u < units; u++) {
        for (int j = 0; j < TS_C; j++) cnt[j] += c.ucount[u * TS_C + j];
        for (int j = 0; j < nbins; j++) hist[j] += c.uhist[u * (size_t)nbins + j];
        amax = c.uamax[u] > amax ? c.uamax[u] : amax;
        mn = c.umin[u] < mn ? c.umin[u] : mn;
    }
    if (cnt[TS_C - 1] > 0) {
        c.mean = sum / (double)cnt[TS_C - 1];
        run_units(ts2_work, &c, units, nt);
        for (int k = 0; k < 3; k++) m[k] = blocks_total(c.slot, nb, 4, (size_t)k + 1);
    }
    Py_END_ALLOW_THREADS
    free(c.slot); free(c.ucount); free(c.uamax); free(c.umin); free(c.uhist);
    if (nomem) return PyErr_NoMemory();
    return Py_BuildValue("{s:L,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:L,s:L,s:L,s:L,s:L,s:(LLL)}",
                         "n", (long long)cnt[8], "sum", sum, "mean", c.mean, "m2", m[0], "m3", m[1], "m4", m[2],
                         "amax", amax, "min_nonzero", mn, "nan", (long long)cnt[0], "pos_inf", (long long)cnt[1],
                         "neg_inf", (long long)cnt[2], "zeros", (long long)cnt[3], "subnormal", (long long)cnt[4],
                         "over", (long long)cnt[5], (long long)cnt[6], (long long)cnt[7]);
}
/* --------------------------------------------------------------- outlier_census (OutlierCensus) */
/* Per column of x [rows, cols]: the amax of |x| (NaN read as 0, +-Inf as Inf) and the number of rows
 * with |x| >= t; and the number of rows holding any such element. |x| >= t is decided in double,
 * i.e. in real numbers (the values widen exactly). Work units are row ranges with their own column
 * arrays, merged after the join (a max and integer sums: exact in any order). */
typedef struct {
    const void *x; int dt; size_t rows, cols, rpu; double t;
    double *amax;       /* [units][cols] */
    int64_t *hits;      /* [units][cols] */
    int64_t *touched;   /* [units] */
} oc_t;

INLINE void oc_body(const oc_t *c, size_t u, int dt, int unused) {
    (void)unused;
    size_t r0 = u * c->rpu, r1 = r0 + c->rpu < c->rows ? r0 + c->rpu : c->rows, C = c->cols;
    double *amax = c->amax + u * C;
    int64_t *hits = c->hits + u * C, touched = 0;
    const double t = c->t;
    for (size_t j = 0; j < C; j++) { amax[j] = 0.0; hits[j] = 0; }
    for (size_t r = r0; r < r1; r++) {
        int64_t any = 0;
        for (size_t j = 0; j < C; j++) {
            double a = fabs(loadd(c->x, r * C + j, dt));
            a = a == a ? a : 0.0;
            int64_t h = a >= t;
            amax[j] = a > amax[j] ? a : amax[j];
            hits[j] += h;
            any |= h;
        }
        touched += any != 0;
    }
    c->touched[u] = touched;
}

#define OC_DISPATCH(NAME, ATTR, END)                                                            \
    ATTR static void NAME(const oc_t *c, size_t u) {                                          \
        switch (c->dt) { case DT_F32: oc_body(c, u, DT_F32, 0); break; case DT_F16: oc_body(c, u, DT_F16, 0); break; \
                         case DT_BF16: oc_body(c, u, DT_BF16, 0); break; default: oc_body(c, u, DT_F64, 0); break; } \
        END                                                                                    \
    }
OC_DISPATCH(oc_scalar, , )
#if FP_X86
OC_DISPATCH(oc_avx2, AVX2, _mm256_zeroupper();)
#endif

SIMD_WORK(oc_work, const oc_t, oc_avx2, oc_scalar)

/* at most this many row ranges (and column arrays): enough to balance the threads of a shared box */
#define OC_MAX_UNITS 64

static PyObject *py_outlier_census(PyObject *self, PyObject *args) {
    unsigned long long xp, ap, hp;
    int dt, want;
    Py_ssize_t rows, cols;
    double t;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinndKKi", &xp, &dt, &rows, &cols, &t, &ap, &hp, &want)) return NULL;
    if (rows <= 0 || cols <= 0 || bad_dt(dt)) {
        PyErr_Format(PyExc_ValueError, "outlier_census: expected rows, cols > 0 and dtype code 0..3, got %zd, %zd, %d",
                     rows, cols, dt);
        return NULL;
    }
    size_t R = (size_t)rows, C = (size_t)cols, rpu = C >= UNIT ? 1 : UNIT / C;
    if ((R + rpu - 1) / rpu > OC_MAX_UNITS) rpu = (R + OC_MAX_UNITS - 1) / OC_MAX_UNITS;
    size_t units = (R + rpu - 1) / rpu;
    oc_t c = {(const void *)(uintptr_t)xp, dt, R, C, rpu, t, (double *)malloc(units * C * sizeof(double)),
              (int64_t *)malloc(units * C * sizeof(int64_t)), (int64_t *)malloc(units * sizeof(int64_t))};
    if (!c.amax || !c.hits || !c.touched) {
        free(c.amax); free(c.hits); free(c.touched);
        return PyErr_NoMemory();
    }
    double *amax = (double *)(uintptr_t)ap;
    int64_t *hits = (int64_t *)(uintptr_t)hp, touched = 0;
    int nt = pick_threads(R * C, want);
    Py_BEGIN_ALLOW_THREADS
    run_units(oc_work, &c, units, nt);
    for (size_t j = 0; j < C; j++) { amax[j] = 0.0; hits[j] = 0; }
    for (size_t u = 0; u < units; u++) {
        for (size_t j = 0; j < C; j++) {
            double a = c.amax[u * C + j];
            amax[j] = a > amax[j] ? a : amax[j];
            hits[j] += c.hits[u * C + j];
        }
        touched += c.touched[u];
    }
    Py_END_ALLOW_THREADS
    free(c.amax); free(c.hits); free(c.touched);
    return PyLong_FromLongLong((long long)touched);
}

/* ===================================================================== end of metrics reductions */
/* ============================================================================================
 * bnb part: fused codebook fake-quantisation (functional.fake_quantize, backends/cpu.py)
 *
 * y = cast(fl32(code[q] * absmax[b])) with q = the blockwise quantiser's index of x: exactly
 * quantize_blockwise followed by dequantize_blockwise, because it runs their own loops (absmax_bits,
 * quant_range, deq_avx2 / deq_scalar) on chunks of FQ_CHUNK elements: the chunk's codes go to a
 * stack buffer that stays in L1 and are dequantised from there, so the uint8 tensor and the second
 * pass over memory disappear. Output dtype = input dtype. out == 0: only the absmax is written (the
 * block-scale records need it without the codes). Returns 1 when a block holds NaN/Inf (the caller
 * then runs the two-step path, which records the specials); the outputs are then incomplete.
 * counts != 0 (needs out): int64 [3, nb], per block the records of analysis/block_scales._codebook_records,
 * counted on each chunk while it is in L1: non-zero x (all finite here), of those the ones with y == 0
 * (underflow), and the ones with |y| >= absmax and |x| > |y| (clipped; a codebook in [-1, 1] never
 * clips, the count says so from the data), compared in float32 like the Python records.
 * ============================================================================================ */
#define FQ_CHUNK 4096

typedef struct {
    qctx_t qc;          /* x, dt, n, bs, nb, absmax, tables, per_unit, partial, bad (q unused) */
    const float *code;  /* [256] */
    void *out;          /* dequantised output, dtype qc.dt; NULL: absmax only */
    int64_t *counts;    /* [3, nb] block records, or NULL */
    int64_t *part;      /* pieces path with counts: [3, pieces] per-piece counts, summed per block after */
} fqctx_t;

static size_t dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

INLINE void fq_count_body(const void *x, const void *y, size_t n, int dt, float am, int64_t *acc) {
    int64_t nz = 0, un = 0, cl = 0;
    for (size_t i = 0; i < n; i++) {
        float xv = load1(x, i, dt), yv = fabsf(load1(y, i, dt));
        int nzi = xv != 0.0f;
        nz += nzi;
        un += nzi & (yv == 0.0f);
        cl += (yv >= am) & (fabsf(xv) > yv);
    }
    acc[0] += nz; acc[1] += un; acc[2] += cl;
}

static void fq_count(const void *x, const void *y, size_t n, int dt, float am, int64_t *acc) {
    switch (dt) {
    case DT_F32: fq_count_body(x, y, n, DT_F32, am, acc); break;
    case DT_F16: fq_count_body(x, y, n, DT_F16, am, acc); break;
    default: fq_count_body(x, y, n, DT_BF16, am, acc); break;
    }
}

/* quantise + dequantise [lo, hi) of one block with reciprocal `recip` and scale `am`, chunk by chunk;
 * acc (or NULL): the chunk counts are added to it */
static void fq_range(const fqctx_t *c, size_t lo, size_t hi, float recip, float am, int64_t *acc) {
    uint8_t q[FQ_CHUNK];
    size_t es = dt_size(c->qc.dt);
    for (size_t s = lo; s < hi; s += FQ_CHUNK) {
        size_t len = hi - s < FQ_CHUNK ? hi - s : FQ_CHUNK;
        const char *xs = (const char *)c->qc.x + s * es;
        char *ys = (char *)c->out + s * es;
        quant_range(xs, 0, len, c->qc.dt, recip, q, &c->qc.T);
        dctx_t d = {q, len, len, NULL, c->code, ys, c->qc.dt};
#if FP_X86
        if (g_have_avx2) deq_avx2(&d, 0, len, am);
        else
#endif
            deq_scalar(&d, 0, len, am);
        if (acc) fq_count(xs, ys, len, c->qc.dt, am, acc);
    }
}

static void fq_fused(void *vc, size_t u) {
    fqctx_t *c = (fqctx_t *)vc;
    qctx_t *qc = &c->qc;
    size_t b0 = u * qc->per_unit, b1 = b0 + qc->per_unit < qc->nb ? b0 + qc->per_unit : qc->nb;
    for (size_t b = b0; b < b1 && !qc->bad; b++) {
        size_t lo, hi;
        float am;
        if (!fused_block(qc, b, &lo, &hi, &am)) return;
        int64_t acc[3] = {0, 0, 0};
        if (c->out) fq_range(c, lo, hi, 1.0f / am, am, c->counts ? acc : NULL);
        if (c->counts) for (int k = 0; k < 3; k++) c->counts[k * qc->nb + b] = acc[k];
    }
}

static void fq_phase2(void *vc, size_t u) {
    fqctx_t *c = (fqctx_t *)vc;
    size_t b, lo, hi;
    piece(&c->qc, u, &b, &lo, &hi);
    float am = c->qc.absmax[b];
    int64_t acc[3] = {0, 0, 0};
    fq_range(c, lo, hi, 1.0f / am, am, c->part ? acc : NULL);
    if (c->part) {
        size_t np = c->qc.nb * c->qc.per_unit;
        for (int k = 0; k < 3; k++) c->part[k * np + u] = acc[k];
    }
}

static PyObject *py_fake_quantize_blockwise(PyObject *self, PyObject *args) {
    unsigned long long xp, op, ap, bp, tp, cp, pp = 0, kp = 0;
    Py_ssize_t n, bs;
    int dt, m, want;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinnKKKKKii|KK", &xp, &dt, &n, &bs, &op, &ap, &cp, &bp, &tp, &m, &want, &pp, &kp))
        return NULL;
    if (n < 0 || bs <= 0 || dt < 0 || dt > 2 || m < 0 || m > 8 || (kp && !op)) {
        PyErr_Format(PyExc_ValueError, "fake_quantize_blockwise: bad sizes (n=%zd, blocksize=%zd, dtype=%d, m=%d)",
                     n, bs, dt, m);
        return NULL;
    }
    fqctx_t c;
    memset(&c, 0, sizeof c);
    qctx_t *qc = &c.qc;
    qc->x = (const void *)(uintptr_t)xp; qc->dt = dt; qc->n = (size_t)n; qc->bs = (size_t)bs;
    qc->nb = n ? ((size_t)n + (size_t)bs - 1) / (size_t)bs : 0;
    if (qc->bs > qc->n && qc->n) qc->bs = qc->n;
    qc->absmax = (float *)(uintptr_t)ap;
    qc->T.base = (const uint8_t *)(uintptr_t)bp; qc->T.tval = (const float *)(uintptr_t)tp; qc->T.m = m;
    qc->T.packed = (const uint32_t *)(uintptr_t)pp;
    c.code = (const float *)(uintptr_t)cp;
    c.out = (void *)(uintptr_t)op;
    c.counts = (int64_t *)(uintptr_t)kp;
    int nt = pick_threads((size_t)n, want);
    int nomem = 0;
    Py_BEGIN_ALLOW_THREADS
    if (qc->bs <= FUSED_MAX) {
        qc->per_unit = qc->bs >= UNIT ? 1 : UNIT / qc->bs;
        run_units(fq_fused, &c, (qc->nb + qc->per_unit - 1) / qc->per_unit, nt);
    } else {
        /* one large block (global quantisation): the absmax over UNIT pieces (q_phase1), then each
         * piece quantised and dequantised with its block's scale */
        qc->per_unit = (qc->bs + UNIT - 1) / UNIT;
        size_t nunits = qc->nb * qc->per_unit;
        qc->partial = (uint32_t *)malloc(nunits * sizeof(uint32_t));
        if (c.counts) c.part = (int64_t *)malloc(3 * nunits * sizeof(int64_t));
        if (!qc->partial || (c.counts && !c.part)) {
            nomem = 1;
        } else {
            run_units(q_phase1, qc, nunits, nt);
            if (!qc->bad) {
                for (size_t b = 0; b < qc->nb; b++) {
                    uint32_t mb = 0;
                    for (size_t k = b * qc->per_unit; k < (b + 1) * qc->per_unit; k++)
                        mb = qc->partial[k] > mb ? qc->partial[k] : mb;
                    qc->absmax[b] = u2f(mb);
                }
                if (c.out) run_units(fq_phase2, &c, nunits, nt);
                if (c.counts) /* the pieces' counts, summed per block (integers: any order) */
                    for (size_t b = 0; b < qc->nb; b++)
                        for (int k = 0; k < 3; k++) {
                            int64_t t = 0;
                            for (size_t p = b * qc->per_unit; p < (b + 1) * qc->per_unit; p++) t += c.part[k * nunits + p];
                            c.counts[k * qc->nb + b] = t;
                        }
            }
            free(qc->partial);
            free(c.part);
        }
    }
    Py_END_ALLOW_THREADS
    if (nomem) return PyErr_NoMemory();
    return PyLong_FromLong(qc->bad ? 1 : 0);
}

/* ---------------------------------------------------------------- bnb part: LLM.int8 dequantisation
 * Default-mode LLM.int8 ops of reference.py, in its float32 order (one IEEE operation each, no FMA):
 *   int8_vectorwise_dequant: y = fl32(fl32(float(q) * stats[r]) * INV_127)            float32 output
 *   int8_mm_dequant:         y = fl32(fl32(fl32(float(C) * row[r]) * col[j]) * INV_127_SQ) [+ bias[j]],
 *                            float(C) = RNE int32 -> float32 (or C given as those float32 values:
 *                            int8_gemm.int8_gemm_float), then the RNE cast to fp32/fp16/bf16
 *   int8_double_quant (column half): col_stats[j] = max |a| over rows of the non-outlier, non-NaN
 *                            elements; q_col = round_i8(fl32(fl32(a * 127) / col_stats[j])), outliers -> 0
 * Scales are passed as float32 in the ops' own rounding (fl32(1/127), fl32(1/127^2)). The dequantisers
 * return 1 (the caller then runs the reference) for a NaN/±Inf scale or bias, or a NaN result: torch's
 * NaN casts to bf16 and NaN payloads are not reproduced here. */
typedef struct {
    const void *src; int kind; /* 0: int8 q (vectorwise_dequant), 1: int32 C (mm_dequant), 2: float32 C (mm_dequant) */
    size_t rows, cols; const float *row; const float *col; const void *bias; int bias_dt; float k;
    void *out; int dt; size_t per_unit; volatile int bad;
} i8dctx_t;

/* row r from column j0 on (the whole row, or the AVX2 loop's tail); returns 1 for a NaN result */
INLINE int i8d_row_body(const i8dctx_t *c, size_t r, size_t j0) {
    float rs = c->row[r];
    size_t base = r * c->cols;
    if (c->kind == 0) {
        const int8_t *q = (const int8_t *)c->src + base;
        float *y = (float *)c->out + base;
        for (size_t j = j0; j < c->cols; j++) y[j] = ((float)q[j] * rs) * c->k;
        return 0;
    }
    const int32_t *C = (const int32_t *)c->src + base;
    const float *Cf = (const float *)c->src + base;
    int bad = 0;
    for (size_t j = j0; j < c->cols; j++) {
        float v = (((c->kind == 1 ? (float)C[j] : Cf[j]) * rs) * c->col[j]) * c->k;
        if (c->bias) v = v + load1(c->bias, j, c->bias_dt);
        bad |= v != v;
        store1(c->out, base + j, v, c->dt);
    }
    return bad;
}

#if FP_X86
/* The same operations 8 columns at a time: int8/int32 -> float32 conversions are exact / RNE like the
 * scalar casts, then the same multiplications in the same order; store8 rounds like store1. */
AVX2 static int i8d_row_avx2(const i8dctx_t *c, size_t r) {
    const __m256 rs = _mm256_set1_ps(c->row[r]), k = _mm256_set1_ps(c->k);
    size_t base = r * c->cols, j = 0;
    __m256 nan = _mm256_setzero_ps();
    if (c->kind == 0) {
        const int8_t *q = (const int8_t *)c->src + base;
        float *y = (float *)c->out + base;
        for (; j + 8 <= c->cols; j += 8) {
            __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + j))));
            _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_mul_ps(v, rs), k));
        }
    } else {
        for (; j + 8 <= c->cols; j += 8) {
            __m256 v = c->kind == 1
                ? _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)((const int32_t *)c->src + base + j)))
                : _mm256_loadu_ps((const float *)c->src + base + j);
            v = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(v, rs), _mm256_loadu_ps(c->col + j)), k);
            if (c->bias) v = _mm256_add_ps(v, load8(c->bias, j, c->bias_dt));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            store8(c->out, base + j, v, c->dt);
        }
    }
    int bad = _mm256_movemask_ps(nan) != 0;
    bad |= i8d_row_body(c, r, j); /* inlined: VEX-encoded, see the AVX2 note */
    _mm256_zeroupper();
    return bad;
}
#endif

static void i8d_work(void *vc, size_t u) {
    i8dctx_t *c = (i8dctx_t *)vc;
    size_t r0 = u * c->per_unit, r1 = r0 + c->per_unit < c->rows ? r0 + c->per_unit : c->rows;
    int bad = 0;
    for (size_t r = r0; r < r1; r++) {
#if FP_X86
        if (g_have_avx2) bad |= i8d_row_avx2(c, r);
        else
#endif
            bad |= i8d_row_body(c, r, 0);
    }
    if (bad) c->bad = 1;
}

static int all_finite(const float *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((f2u(p[i]) & 0x7fffffffu) >= 0x7f800000u) return 0;
    return 1;
}

static int bias_finite(const void *p, int dt, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((f2u(load1(p, i, dt)) & 0x7fffffffu) >= 0x7f800000u) return 0;
    return 1;
}

/* int8_dequant(kind, src_ptr, rows, cols, row_ptr, col_ptr, bias_ptr, bias_dtype, k, out_ptr, dtype, threads) */
static PyObject *py_int8_dequant(PyObject *self, PyObject *args) {
    unsigned long long sp, rp, cp, bp, op;
    Py_ssize_t rows, cols;
    int kind, bdt, dt, want;
    double k;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKnnKKKidKii", &kind, &sp, &rows, &cols, &rp, &cp, &bp, &bdt, &k, &op, &dt, &want))
        return NULL;
    if (rows < 0 || cols <= 0 || kind < 0 || kind > 2 || dt < 0 || dt > 2 || bdt < 0 || bdt > 2 || (kind == 0 && dt)) {
        PyErr_Format(PyExc_ValueError, "int8_dequant: bad arguments (kind=%d, rows=%zd, cols=%zd, dtype=%d)",
                     kind, rows, cols, dt);
        return NULL;
    }
    i8dctx_t c = {(const void *)(uintptr_t)sp, kind, (size_t)rows, (size_t)cols, (const float *)(uintptr_t)rp,
                  (const float *)(uintptr_t)cp, (const void *)(uintptr_t)bp, bdt, (float)k, (void *)(uintptr_t)op,
                  dt, 1, 0};
    if (!all_finite(c.row, c.rows) || (kind != 0 && !all_finite(c.col, c.cols))
        || (c.bias && !bias_finite(c.bias, bdt, c.cols)))
        return PyLong_FromLong(1);
    c.per_unit = c.cols >= UNIT ? 1 : UNIT / c.cols;
    int nt = pick_threads(c.rows * c.cols, want);
    Py_BEGIN_ALLOW_THREADS
    run_units(i8d_work, &c, (c.rows + c.per_unit - 1) / c.per_unit, nt);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(c.bad);
}

/* column half of int8_double_quant: units of I8C_COLS columns walk every row (stats), then units of
 * rows quantise (each element needs only its column's stat) */
#define I8C_COLS 64
typedef struct {
    const void *x; int dt; size_t rows, cols; float thr; int8_t *q; float *stats; size_t per_unit;
} i8cctx_t;

/* columns [j0, j1) of row r into the running maxima mx (bits of |a|: ordered like |a| for non-NaN) */
INLINE void i8c_stats_body(const i8cctx_t *c, size_t r, size_t j0, size_t j1, uint32_t *mx, size_t m0) {
    size_t base = r * c->cols;
    for (size_t j = j0; j < j1; j++) {
        uint32_t a = f2u(load1(c->x, base + j, c->dt)) & 0x7fffffffu;
        if (a > 0x7f800000u || (c->thr > 0.0f && u2f(a) >= c->thr)) continue; /* NaN ignored, outliers masked */
        if (a > mx[j - m0]) mx[j - m0] = a;
    }
}

/* row r's columns from j0 on, one code each */
INLINE void i8c_quant_body(const i8cctx_t *c, size_t r, size_t j0) {
    size_t base = r * c->cols;
    for (size_t j = j0; j < c->cols; j++) {
        float a = load1(c->x, base + j, c->dt);
        c->q[base + j] = (c->thr > 0.0f && fabsf(a) >= c->thr) ? 0 : round_i8((a * 127.0f) / c->stats[j]);
    }
}

#if FP_X86
/* 8 columns at a time: the same |a| bits, NaN / outlier rules and maxima as i8c_stats_body */
AVX2 static void i8c_stats_avx2(const i8cctx_t *c, size_t j0, size_t j1, uint32_t *mx) {
    const __m256i mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256 thr = _mm256_set1_ps(c->thr);
    const int use_thr = c->thr > 0.0f;
    size_t nv = (j1 - j0) / 8, jt = j0 + nv * 8;
    __m256i acc[I8C_COLS / 8];
    for (size_t v = 0; v < nv; v++) acc[v] = _mm256_setzero_si256();
    for (size_t r = 0; r < c->rows; r++) {
        size_t base = r * c->cols + j0;
        for (size_t v = 0; v < nv; v++) {
            __m256i a = _mm256_and_si256(_mm256_castps_si256(load8(c->x, base + 8 * v, c->dt)), mask);
            __m256i drop = _mm256_cmpgt_epi32(a, inf);
            if (use_thr) drop = _mm256_or_si256(drop, _mm256_castps_si256(_mm256_cmp_ps(_mm256_castsi256_ps(a), thr,
                                                                                         _CMP_GE_OQ)));
            acc[v] = _mm256_max_epi32(acc[v], _mm256_andnot_si256(drop, a));
        }
        i8c_stats_body(c, r, jt, j1, mx, j0); /* inlined: VEX-encoded, see the AVX2 note */
    }
    for (size_t v = 0; v < nv; v++) _mm256_storeu_si256((__m256i *)(mx + 8 * v), acc[v]);
    _mm256_zeroupper();
}

/* 8 codes at a time: fl32(fl32(a * 127) / stat) rounded half-even, clamped to ±127, NaN and outliers -> 0 */
AVX2 INLINE __m256i i8c_round8(__m256 a, __m256 st, __m256 thr, int use_thr) {
    __m256 v = _mm256_div_ps(_mm256_mul_ps(a, _mm256_set1_ps(127.0f)), st);
    __m256 zero = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    if (use_thr) zero = _mm256_or_ps(zero, _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a), thr, _CMP_GE_OQ));
    return _mm256_cvtps_epi32(_mm256_andnot_ps(zero, r)); /* exact: an integer in [-127, 127] */
}

AVX2 static void i8c_quant_avx2(const i8cctx_t *c, size_t r) {
    const __m256 thr = _mm256_set1_ps(c->thr);
    const int use_thr = c->thr > 0.0f;
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t base = r * c->cols, j = 0;
    for (; j + 32 <= c->cols; j += 32) {
        __m256i p[4];
        for (int k = 0; k < 4; k++)
            p[k] = i8c_round8(load8(c->x, base + j + 8 * k, c->dt), _mm256_loadu_ps(c->stats + j + 8 * k), thr, use_thr);
        __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(p[0], p[1]), _mm256_packs_epi32(p[2], p[3]));
        _mm256_storeu_si256((__m256i *)(c->q + base + j), _mm256_permutevar8x32_epi32(q, order));
    }
    i8c_quant_body(c, r, j);
    _mm256_zeroupper();
}
#endif

static void i8c_stats(void *vc, size_t u) {
    const i8cctx_t *c = (const i8cctx_t *)vc;
    size_t j0 = u * I8C_COLS, j1 = j0 + I8C_COLS < c->cols ? j0 + I8C_COLS : c->cols;
    uint32_t mx[I8C_COLS] = {0};
#if FP_X86
    if (g_have_avx2) i8c_stats_avx2(c, j0, j1, mx);
    else
#endif
        for (size_t r = 0; r < c->rows; r++) i8c_stats_body(c, r, j0, j1, mx, j0);
    for (size_t j = j0; j < j1; j++) c->stats[j] = u2f(mx[j - j0]);
}

static void i8c_quant(void *vc, size_t u) {
    const i8cctx_t *c = (const i8cctx_t *)vc;
    size_t r0 = u * c->per_unit, r1 = r0 + c->per_unit < c->rows ? r0 + c->per_unit : c->rows;
    for (size_t r = r0; r < r1; r++) {
#if FP_X86
        if (g_have_avx2) i8c_quant_avx2(c, r);
        else
#endif
            i8c_quant_body(c, r, 0);
    }
}

/* int8_col_quant(x_ptr, dtype, rows, cols, threshold, q_ptr, stats_ptr, threads) */
static PyObject *py_int8_col_quant(PyObject *self, PyObject *args) {
    unsigned long long xp, qp, sp;
    Py_ssize_t rows, cols;
    int dt, want;
    double thr;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinndKKi", &xp, &dt, &rows, &cols, &thr, &qp, &sp, &want)) return NULL;
    if (rows < 0 || cols <= 0 || dt < 0 || dt > 2 || !(thr >= 0.0)) {
        PyErr_Format(PyExc_ValueError, "int8_col_quant: bad sizes (rows=%zd, cols=%zd, dtype=%d)", rows, cols, dt);
        return NULL;
    }
    i8cctx_t c = {(const void *)(uintptr_t)xp, dt, (size_t)rows, (size_t)cols, (float)thr, (int8_t *)(uintptr_t)qp,
                  (float *)(uintptr_t)sp, 1};
    c.per_unit = c.cols >= UNIT ? 1 : UNIT / c.cols;
    int nt = pick_threads(c.rows * c.cols, want);
    Py_BEGIN_ALLOW_THREADS
    run_units(i8c_stats, &c, (c.cols + I8C_COLS - 1) / I8C_COLS, nt);
    run_units(i8c_quant, &c, (c.rows + c.per_unit - 1) / c.per_unit, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ============================================================================================
 * Fused scaled fake-quantisation (issue 15, the OCP/MX/NVFP4 replay: strategies._fq_scaled)
 * ============================================================================================
 * fused_scaled = quantize_scaled + dequantize_scaled to float32 + the saturation mask + per-tile counts,
 * in one pass over x after the amax pass (sq_phase1 and sq_tile_scales above, or unit by unit with
 * sq_local_scales: shared with py_quantize_scaled). Per element, with s the tile's scale and d its
 * divisor (s itself but for the 4/6-bit formats, see sq_scale1):
 *
 *   code = enc_fp8(fl32(x / d)) | enc_lowbit(x, d)         (what quantize_scaled stores)
 *   v    = value(code)                                     (what dequantize_scaled reads: torch's fp8
 *                                                           decoding, dec_fp8 / the 4/6-bit value, lowbit_value)
 *   q    = fl32(v * s), NVFP4 then fl32(q * g)             (dequantize_scaled's float32 output)
 *   sat  = |v| == fmt max and |x| > |q|                    (False where x or q is NaN)
 *
 * and per tile (row-major, quantize_scaled's scale layout) three int64 counts: finite nonzero x, of
 * those q == 0 (underflow), saturated elements. Counts are sums of integers: any order gives the
 * same. NaN outputs are only reported (return value): their payload bits after torch's casts are
 * the reference's business, so the caller then runs the unfused path. Compares run on the bit
 * patterns (|a| bits order like |a| for non-NaN values), branch-free, so the loop vectorises. */
typedef struct {
    sq_t sq;
    float *q; uint8_t *sat;
    int64_t *cnt;         /* [3][ncnt] slots: per partial slot of sq (ncnt = sq.np) */
    size_t ncnt;
    uint32_t vmax_bits;
    int *bad;
} fq_t;

/* kind: 0 e4m3, 1 e5m2 (FP8 elements), 2 + k the 4/6-bit element k of sq_lowbit_run; has_g: NVFP4. */
INLINE int fq_run(const fq_t *c, size_t lo, size_t hi, int dt, int kind, int has_g, float s, float d,
                  int64_t *slot, int clean) {
    (void)clean; /* clean: the run's amax piece holds no NaN/Inf (nonfin 0); the AVX2 loop (fqv_step) uses it */
    float *restrict q = c->q;
    uint8_t *restrict sat = c->sat;
    const void *x = c->sq.x;
    const float g = c->sq.g;
    const uint32_t vmax = c->vmax_bits, fmax_bits = f2u(c->sq.fmax);
    const int pos = d > 0.0f;
    uint32_t nnz = 0, nun = 0, nsat = 0, bad = 0;
    for (size_t i = lo; i < hi; i++) {
        float xv = load1_nb(x, i, dt);
        float v = kind < 2 ? dec_fp8(enc_fp8(xv / d, kind, fmax_bits), kind) : lowbit_value(xv, d, pos, kind - 2);
        float qv = v * s;
        if (has_g) qv = qv * g;
        q[i] = qv;
        uint32_t ax = f2u(xv) & 0x7fffffffu, aq = f2u(qv) & 0x7fffffffu, av = f2u(v) & 0x7fffffffu;
        uint32_t st = (av == vmax) & (ax > aq) & (aq <= 0x7f800000u) & (ax <= 0x7f800000u);
        uint32_t nz = (ax - 1u) < 0x7f7fffffu; /* 0 < |x| < Inf */
        sat[i] = (uint8_t)st;
        nnz += nz; nun += nz & (aq == 0u); nsat += st;
        bad |= aq > 0x7f800000u;
    }
    slot[0] += nnz; slot[c->ncnt] += nun; slot[2 * c->ncnt] += nsat;
    return (int)bad;
}

/* fq_run of the 4/6-bit kinds (kind 2 + k) under stochastic rounding: the counter of each element from its flat
 * index (sr_counter), and, with per-row NVFP4 tensor scales (sq.grow), the row's g. */
INLINE int fq_sr_run(const fq_t *c, size_t lo, size_t hi, int dt, int kind, int has_g, float s, float d,
                     int64_t *slot, int clean) {
    (void)clean;
    float *restrict q = c->q;
    uint8_t *restrict sat = c->sat;
    const void *x = c->sq.x;
    const size_t r = lo / c->sq.C;
    const float g = c->sq.grow ? c->sq.grow[r] : c->sq.g;
    const uint32_t vmax = c->vmax_bits;
    const int pos = d > 0.0f;
    uint32_t nnz = 0, nun = 0, nsat = 0, bad = 0, ctr = sr_counter(&c->sq, r, lo);
    for (size_t i = lo; i < hi; i++, ctr++) {
        float xv = load1_nb(x, i, dt);
        float v = lowbit_code_value(lowbit_round_sr(xv, d, pos, kind - 2, sr_uniform(ctr)), kind - 2);
        float qv = v * s;
        if (has_g) qv = qv * g;
        q[i] = qv;
        uint32_t ax = f2u(xv) & 0x7fffffffu, aq = f2u(qv) & 0x7fffffffu, av = f2u(v) & 0x7fffffffu;
        uint32_t st = (av == vmax) & (ax > aq) & (aq <= 0x7f800000u) & (ax <= 0x7f800000u);
        uint32_t nz = (ax - 1u) < 0x7f7fffffu;
        sat[i] = (uint8_t)st;
        nnz += nz; nun += nz & (aq == 0u); nsat += st;
        bad |= aq > 0x7f800000u;
    }
    slot[0] += nnz; slot[c->ncnt] += nun; slot[2 * c->ncnt] += nsat;
    return (int)bad;
}

/* The element pass of unit u with the run function RUN (fq_run, or the AVX2 one). */
#define FQ_BODY(NAME, RUN, ATTR)                                                                  \
    ATTR INLINE void NAME(const fq_t *c, size_t u, int dt, int kind, int has_g) {               \
        const sq_t *sq = &c->sq;                                                                \
        sq_unit_t w = sq_unit(sq, u);                                                           \
        if (w.c0 >= w.c1) return;                                                               \
        size_t t0 = w.c0 / sq->bc, t1 = (w.c1 - 1) / sq->bc, lo, hi;                            \
        int64_t *slots = c->cnt + w.ru * sq->nbc * sq->cs + w.q; /* the amax partial's slot */  \
        const uint8_t *nf = sq->nonfin + w.ru * sq->nbc * sq->cs + w.q;                         \
        int bad = 0;                                                                            \
        /* a gathered band: the runs of each row read x through sq_x; per-row NVFP4 tensor      \
         * scales (grow): the runs of row r multiply by grow[r] as their g */                   \
        fq_t banded;                                                                            \
        const fq_t *cr = c;                                                                     \
        if (sq->band || sq->grow) { banded = *c; cr = &banded; }                                \
        for (size_t r = w.r0; r < w.r1; r++) {                                                  \
            const size_t tr = r / sq->br;                                                       \
            const float *srow = sq->scale + tr * sq->nbc;                                       \
            const float *drow = sq->lowbit ? sq->div + tr * sq->nbc : srow;                     \
            if (sq->band) banded.sq.x = sq_x(sq, r);                                            \
            if (sq->grow) banded.sq.g = sq->grow[r];                                            \
            for (size_t t = t0; t <= t1; t++) {                                                 \
                sq_run_of(sq, &w, r, t, &lo, &hi);                                              \
                bad |= RUN(cr, lo, hi, dt, kind, has_g, srow[t], drow[t], slots + t * sq->cs,   \
                           sq->track && !nf[t * sq->cs]);                                       \
            }                                                                                   \
        }                                                                                       \
        if (bad) __atomic_store_n(c->bad, 1, __ATOMIC_RELAXED);                                 \
    }
FQ_BODY(fq_body, fq_run, )

/* kind 0..4 as fq_run, 5 NVFP4 (E2M1 elements times the tensor scale g). */
#define FQ_CASES(BODY, DT)                                                                      \
    case DT * 6 + 0: BODY(c, u, DT, 0, 0); break;                                             \
    case DT * 6 + 1: BODY(c, u, DT, 1, 0); break;                                             \
    case DT * 6 + 2: BODY(c, u, DT, 2, 0); break;                                             \
    case DT * 6 + 3: BODY(c, u, DT, 3, 0); break;                                             \
    case DT * 6 + 4: BODY(c, u, DT, 4, 0); break;                                             \
    case DT * 6 + 5: BODY(c, u, DT, 2, 1); break;
/* NAME(c, u, sel): BODY for sel = dt * 6 + kind over the cases CASES (FQ_CASES, or FQ_SR_CASES below). */
#define FQ_DISPATCH_OF(CASES, NAME, BODY, ATTR, END)                                            \
    ATTR static void NAME(const fq_t *c, size_t u, int sel) {                                 \
        switch (sel) { CASES(BODY, DT_F32) CASES(BODY, DT_F16) CASES(BODY, DT_BF16)           \
                       default: break; }                                                      \
        END                                                                                   \
    }
#define FQ_DISPATCH(NAME, BODY, ATTR, END) FQ_DISPATCH_OF(FQ_CASES, NAME, BODY, ATTR, END)
FQ_DISPATCH(fq_scalar, fq_body, , )
#if FP_X86
AVX2 static void fq_avx2(const fq_t *c, size_t u, int sel); /* "scaled casts: AVX2 element loops" */
#endif

/* The stochastic element pass (4/6-bit kinds only: sel = dt * 6 + kind, kind 2..4, 5 NVFP4). */
#define FQ_SR_CASES(BODY, DT)                                                                   \
    case DT * 6 + 2: BODY(c, u, DT, 2, 0); break;                                             \
    case DT * 6 + 3: BODY(c, u, DT, 3, 0); break;                                             \
    case DT * 6 + 4: BODY(c, u, DT, 4, 0); break;                                             \
    case DT * 6 + 5: BODY(c, u, DT, 2, 1); break;
#define FQ_SR_DISPATCH(NAME, BODY, ATTR, END) FQ_DISPATCH_OF(FQ_SR_CASES, NAME, BODY, ATTR, END)
FQ_BODY(fq_sr_body, fq_sr_run, )
FQ_SR_DISPATCH(fq_sr_scalar, fq_sr_body, , )
#if FP_X86
AVX2 static void fq_sr_avx2(const fq_t *c, size_t u, int sel); /* "scaled casts: stochastic rounding, AVX2" */
#endif

typedef struct { const fq_t *c; int sel; } fq_job_t;

static void fq_work(void *vj, size_t u) {
    const fq_job_t *j = (const fq_job_t *)vj;
    if (j->c->sq.sr) {
#if FP_X86
        if (g_have_avx2) { fq_sr_avx2(j->c, u, j->sel); return; }
#endif
        fq_sr_scalar(j->c, u, j->sel);
        return;
    }
#if FP_X86
    if (g_have_avx2) { fq_avx2(j->c, u, j->sel); return; }
#endif
    fq_scalar(j->c, u, j->sel);
}

static void fq_local_work(void *vj, size_t u) {
    sq_local_scales((sq_t *)&((const fq_job_t *)vj)->c->sq, u);
    fq_work(vj, u);
}

static PyObject *py_fused_scaled(PyObject *self, PyObject *args) {
    unsigned long long xp, qp, satp, sp, cp, grow = 0;
    Py_ssize_t R, C, br, bc, period = 0;
    int dt, fmt, want, rule, xt = 0, nomem = 0, sr = 0;
    unsigned int key = 0;
    float given = 0.0f, mult = 1.0f;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinnnniKKKKii|ppInKff", &xp, &dt, &R, &C, &br, &bc, &fmt, &qp, &satp, &sp, &cp, &want,
                          &rule, &xt, &sr, &key, &period, &grow, &given, &mult))
        return NULL;
    if (sq_check_args("fused_scaled", R, C, br, bc, dt, fmt, rule) < 0) return NULL;
    /* a given scale or multiplier: the per-tensor OCP formats only (delayed scaling), finite and positive */
    if ((given != 0.0f || mult != 1.0f)
        && (fmt > 1 || !(given >= 0.0f && given <= 0x1.fffffep127f) || !(mult > 0.0f && mult <= 0x1.fffffep127f))) {
        PyErr_Format(PyExc_ValueError, "fused_scaled: expected a given scale >= 0 and a multiplier > 0 (finite) "
                     "with fmt 0 or 1 (e4m3, e5m2), got scale %g, multiplier %g, fmt %d", (double)given,
                     (double)mult, fmt);
        return NULL;
    }
    fq_t c;
    memset(&c, 0, sizeof c);
    if (sq_init(&c.sq, (const void *)(uintptr_t)xp, dt, (size_t)R, (size_t)C, (size_t)br, (size_t)bc, fmt, rule, 0,
                1.0f, (float *)(uintptr_t)sp, xt) < 0)
        return PyErr_NoMemory();
    if (sq_check_sr("fused_scaled", &c.sq, sr, key, period ? period : R, grow) < 0) {
        sq_free(&c.sq);
        return NULL;
    }
    c.sq.given = given; c.sq.mult = mult;
    const size_t ntiles = c.sq.nbr * c.sq.nbc;
    int64_t *counts = (int64_t *)(uintptr_t)cp;
    /* one piece per tile (sub = cs = 1): the slots are the tiles, counted straight into counts */
    const int direct = c.sq.np == ntiles;
    c.ncnt = c.sq.np;
    c.cnt = direct ? counts : (int64_t *)calloc(3 * c.sq.np, sizeof(int64_t));
    if (c.cnt == NULL) {
        sq_free(&c.sq);
        return PyErr_NoMemory();
    }
    if (direct) memset(counts, 0, 3 * ntiles * sizeof(int64_t));
    c.q = (float *)(uintptr_t)qp; c.sat = (uint8_t *)(uintptr_t)satp;
    c.vmax_bits = f2u(c.sq.fmax);
    c.sq.track = 1; /* the fused FP8 loops skip the NaN/Inf handling of clean pieces (fq_t) */
    int bad = 0;
    c.bad = &bad;
    const int kind = c.sq.lowbit ? 1 + c.sq.lowbit : c.sq.e5m2;
    fq_job_t job = {&c, dt * 6 + (fmt == 7 ? 5 : kind)};
    int nt = pick_threads(c.sq.R * c.sq.C, want);
    float g;
    uint32_t amax_bits = 0; /* the tensor's largest finite |x|: the max of the amax partials */
    Py_BEGIN_ALLOW_THREADS
    if (c.sq.xt) {
        if (sq_local(&c.sq)) {
            sq_run_bands(&job, 1, SQ_BAND_LOCAL, nt, &nomem);
        } else {
            sq_run_bands(&c.sq, 0, SQ_BAND_AMAX, nt, &nomem);
            sq_tile_scales(&c.sq, nt);
            sq_run_bands(&job, 1, SQ_BAND_ELEMENTS, nt, &nomem);
        }
    } else if (sq_local(&c.sq)) {
        sq_run_ahead(&job, 1, c.sq.units, nt);
    } else {
        run_units(sq_phase1, &c.sq, c.sq.units, nt);
        sq_tile_scales(&c.sq, nt);
        run_units(fq_work, &job, c.sq.units, nt);
    }
    g = c.sq.g;
    for (size_t i = 0; i < c.sq.np; i++) amax_bits = c.sq.partial[i] > amax_bits ? c.sq.partial[i] : amax_bits;
    if (!direct) {
        for (size_t tr = 0; tr < c.sq.nbr; tr++)
            for (size_t tc = 0; tc < c.sq.nbc; tc++)
                for (int k = 0; k < 3; k++) {
                    int64_t sum = 0;
                    for (size_t p = 0; p < c.sq.sub; p++)
                        for (size_t q = 0; q < c.sq.cs; q++)
                            sum += c.cnt[k * c.sq.np + ((tr * c.sq.sub + p) * c.sq.nbc + tc) * c.sq.cs + q];
                    counts[k * ntiles + tr * c.sq.nbc + tc] = sum;
                }
        free(c.cnt);
    }
    Py_END_ALLOW_THREADS
    sq_free(&c.sq);
    if (nomem) return PyErr_NoMemory();
    return Py_BuildValue("(did)", (double)g, bad, (double)u2f(amax_bits));
}

/* ================================================================ scaled casts: AVX2 element loops
 * Part "scaled casts at copy bandwidth" (issue 15): hand-written 8-wide loops for the tile amax, the FP8
 * encode of quantize_scaled / fused_scaled and the decode of dequantize_scaled / fused_scaled. The
 * compiler's vectorisation of the branch-free scalar bodies above unrolled them 4x with most vectors
 * spilled to the stack (~2.4 cycles per element); these loops do the same integer and float32 operations
 * lane by lane (enc_fp8, dec_fp8, sq_amax_run), with three formulations that differ from the scalar code
 * and give the same bits:
 *
 *  - y = x * r instead of x / s where r = fl32(1 / s) is exact and a normal float (s a power of two:
 *    every MX scale; exact_recip checks it per run): IEEE multiplication and division both round the
 *    exact real result once, and x * (1/s) is the same real number as x / s, so the two give the same
 *    float for every x: subnormal, overflowing, zero, Inf and NaN results included (a normal r keeps
 *    it so even with denormals-are-zero set). A vdivps costs ~4 vmulps; other scales still divide.
 *  - enc: b = min(|y| bits, fmax bits) instead of clamping finite values only: the Inf and NaN lanes get
 *    their codes from the two overrides at the end, whatever b was.
 *  - dequantize_scaled decodes FP8 codes with dec_fp8 instead of a table gather where the table equals
 *    dec_fp8 on every non-NaN code (sd_decoding, per call; torch's fp8 decoding does): a NaN code gives
 *    a NaN output either way, and the call then falls back to the reference.
 *
 * The 4/6-bit element passes stay the compiler-vectorised bodies above (compiled for AVX2 here). Every
 * entry point ends with _mm256_zeroupper() (see "quantise: AVX2"); the tails of each run go through the
 * always-inline scalar bodies (VEX-encoded here). */
#if FP_X86
/* fl32(1 / s) when it is exact and a normal float, else 0 (the caller then divides by s). A float times a
 * float is exact in double, so r * s == 1 there means r is exactly 1 / s. */
INLINE float exact_recip(float s) {
    /* Only +-2^k has an exact reciprocal (1 / (m 2^k) with an odd m > 1 has no finite binary expansion). A
     * normal +-2^k (mantissa field 0, biased exponent E <= 253) has the normal reciprocal +-2^-k: biased
     * exponent 254 - E, from the bits (MX: one per 32 elements, where the division and the check cost ~0.6
     * cycles an element); other normal or non-finite s have none; zero and subnormal s take the check. */
    uint32_t u = f2u(s), e = (u >> 23) & 0xffu;
    if ((u & 0x7fffffu) == 0 && e >= 1 && e <= 253) return u2f((u & 0x80000000u) | ((254u - e) << 23));
    if (e != 0) return 0.0f;
    float r = 1.0f / s;
    e = (f2u(r) >> 23) & 0xffu;
    return e != 0 && e != 0xffu && (double)r * (double)s == 1.0 ? r : 0.0f;
}

/* Horizontal max of 8 signed int32 lanes. */
AVX2 INLINE int32_t hmax8(__m256i m) {
    __m128i v = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    v = _mm_max_epi32(v, _mm_shuffle_epi32(v, 0x4e));
    v = _mm_max_epi32(v, _mm_shuffle_epi32(v, 0xb1));
    return _mm_cvtsi128_si32(v);
}

/* sq_amax_run over [lo, hi): the max finite |x| bits merged into mx; track: OR a NaN/Inf into *nf. fp16 and
 * bf16 compare their own 16-bit patterns, 16 lanes a vector (as the scalar loop does before widening). */
AVX2 INLINE uint32_t sqv_amax_run(const void *x, size_t lo, size_t hi, int dt, uint32_t mx, int track, uint8_t *nf) {
    size_t i = lo;
    __m256i m = _mm256_setzero_si256(), bad = m;
    if (dt == DT_F32) {
        const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
        for (; i + 8 <= hi; i += 8) {
            __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)((const uint32_t *)x + i)), abs);
            __m256i fin = _mm256_cmpgt_epi32(inf, a);
            if (track) bad = _mm256_or_si256(bad, _mm256_andnot_si256(fin, abs));
            m = _mm256_max_epi32(m, _mm256_and_si256(a, fin));
        }
        uint32_t mv = (uint32_t)hmax8(m);
        mx = mv > mx ? mv : mx;
    } else {
        const __m256i abs = _mm256_set1_epi16(0x7fff), inf = _mm256_set1_epi16(dt == DT_F16 ? 0x7c00 : 0x7f80);
        for (; i + 16 <= hi; i += 16) {
            __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i)), abs);
            __m256i fin = _mm256_cmpgt_epi16(inf, a);
            if (track) bad = _mm256_or_si256(bad, _mm256_andnot_si256(fin, abs));
            m = _mm256_max_epi16(m, _mm256_and_si256(a, fin));
        }
        /* the 16-bit lanes are >= 0: their max is the max of the int32 lanes' two halves */
        int32_t m32 = hmax8(_mm256_max_epi32(_mm256_srli_epi32(m, 16), _mm256_and_si256(m, _mm256_set1_epi32(0xffff))));
        uint16_t mh = (uint16_t)m32;
        uint32_t mb = f2u(load1_nb(&mh, 0, dt));
        mx = mb > mx ? mb : mx;
    }
    if (track && !_mm256_testz_si256(bad, bad)) *nf = 1;
    return sq_amax_run(x, i, hi, dt, mx, track, nf);
}

/* enc_fp8 of 8 lanes without the sign: the code's low 7 bits (0..0x7f) in each int32 lane. The normal-range
 * rebias is folded into the rounding constant: (b + bias + lsb - (K << sh)) >> sh is enc_fp8's
 * ((b + bias + lsb) >> sh) - K for b >= the smallest normal (>= K << sh, so no wrap); the lanes below take
 * the subnormal code. */
AVX2 INLINE __m256i sqv_enc_fp8_mag(__m256 y, int e5m2, __m256i fmaxv) {
    const __m256i inf = _mm256_set1_epi32(0x7f800000);
    const int sh = e5m2 ? 21 : 20;
    __m256i a = _mm256_and_si256(_mm256_castps_si256(y), _mm256_set1_epi32(0x7fffffff));
    __m256i b = _mm256_min_epi32(a, fmaxv);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, sh), _mm256_set1_epi32(1));
    __m256i nrm = _mm256_add_epi32(b, _mm256_set1_epi32(e5m2 ? 0xfffff - (112 << 23) : 0x7ffff - (120 << 23)));
    nrm = _mm256_srli_epi32(_mm256_add_epi32(nrm, lsb), sh);
    __m256 t = _mm256_add_ps(_mm256_castsi256_ps(b), _mm256_set1_ps(e5m2 ? 128.0f : 16384.0f));
    __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(e5m2 ? 0x43000000 : 0x46800000));
    __m256i r = _mm256_blendv_epi8(nrm, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(e5m2 ? 0x38800000 : 0x3c800000), b));
    /* +-Inf: E5M2 keeps it (0x7c); E4M3's clamp already made it min(Inf, 448) = 448, code 0x7e */
    if (e5m2) r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7c), _mm256_cmpeq_epi32(a, inf));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7f), _mm256_cmpgt_epi32(a, inf));
}

/* enc_fp8 of 8 lanes (codes in the low byte of each int32 lane). */
AVX2 INLINE __m256i sqv_enc_fp8(__m256 y, int e5m2, __m256i fmaxv) {
    __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(y), 24), _mm256_set1_epi32(0x80));
    return _mm256_or_si256(sqv_enc_fp8_mag(y, e5m2, fmaxv), sign);
}

/* dec_fp8 of 8 codes (one per int32 lane). */
AVX2 INLINE __m256 sqv_dec_fp8(__m256i code, int e5m2) {
    __m256i a = _mm256_and_si256(code, _mm256_set1_epi32(0x7f));
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(0x80)), 24);
    __m256 v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, e5m2 ? 21 : 20)),
                             _mm256_set1_ps(e5m2 ? 0x1p112f : 0x1p120f));
    __m256i vb = _mm256_castps_si256(v);
    if (e5m2) {
        __m256i special = _mm256_or_si256(_mm256_set1_epi32(0x7f800000),
                                          _mm256_slli_epi32(_mm256_and_si256(a, _mm256_set1_epi32(3)), 21));
        vb = _mm256_blendv_epi8(vb, special, _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7b)));
    } else {
        vb = _mm256_blendv_epi8(vb, _mm256_set1_epi32(0x7fc00000), _mm256_cmpeq_epi32(a, _mm256_set1_epi32(0x7f)));
    }
    return _mm256_castsi256_ps(_mm256_or_si256(vb, sign));
}

/* y = x / s of 8 elements, as x * r when mul (r = exact_recip(s), see the section comment). */
AVX2 INLINE __m256 sqv_scaled8(const void *x, size_t i, int dt, __m256 sv, int mul) {
    __m256 xv = load8(x, i, dt);
    return mul ? _mm256_mul_ps(xv, sv) : _mm256_div_ps(xv, sv);
}

/* The low bytes of 8 int32 lanes (each 0..255) stored to p[0..7]. */
AVX2 INLINE void sqv_store8_u8(uint8_t *p, __m256i v) {
    __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packus_epi16(w, w));
}

/* The FP8 codes of the 32 values ya..yd (8 lanes each, in order) stored to p[0..31]. */
AVX2 INLINE void sqv_store32_fp8(uint8_t *p, __m256 ya, __m256 yb, __m256 yc, __m256 yd, int e5m2, __m256i fmaxv) {
    __m256i a = sqv_enc_fp8_mag(ya, e5m2, fmaxv), b = sqv_enc_fp8_mag(yb, e5m2, fmaxv);
    __m256i c = sqv_enc_fp8_mag(yc, e5m2, fmaxv), d = sqv_enc_fp8_mag(yd, e5m2, fmaxv);
    /* codes 0..0x7f: two saturating packs are exact. The signs: signed saturating packs of y's bits keep
     * each lane's sign in its byte's top bit (a negative int32 packs to a negative int16, then int8), in
     * the same byte order; the dword permute undoes the packs' lane interleave of both. */
    __m256i v = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
    __m256i sg = _mm256_packs_epi16(_mm256_packs_epi32(_mm256_castps_si256(ya), _mm256_castps_si256(yb)),
                                    _mm256_packs_epi32(_mm256_castps_si256(yc), _mm256_castps_si256(yd)));
    v = _mm256_or_si256(v, _mm256_and_si256(sg, _mm256_set1_epi8((char)0x80)));
    _mm256_storeu_si256((__m256i *)p, _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

AVX2 INLINE void sqv_quant_run_m(const void *x, size_t lo, size_t hi, int dt, float s, float r, int mul, int e5m2,
                                 uint32_t fmax_bits, uint8_t *restrict data, pf_t *pf) {
    const __m256 sv = _mm256_set1_ps(mul ? r : s);
    const __m256i fmaxv = _mm256_set1_epi32((int32_t)fmax_bits);
    size_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        pf_step(pf);
        __m256 ya = sqv_scaled8(x, i, dt, sv, mul), yb = sqv_scaled8(x, i + 8, dt, sv, mul);
        __m256 yc = sqv_scaled8(x, i + 16, dt, sv, mul), yd = sqv_scaled8(x, i + 24, dt, sv, mul);
        sqv_store32_fp8(data + i, ya, yb, yc, yd, e5m2, fmaxv);
    }
    for (; i + 8 <= hi; i += 8) sqv_store8_u8(data + i, sqv_enc_fp8(sqv_scaled8(x, i, dt, sv, mul), e5m2, fmaxv));
    sq_quant_run(x, i, hi, dt, s, e5m2, fmax_bits, data, NULL);
}

AVX2 INLINE void sqv_quant_run(const void *x, size_t lo, size_t hi, int dt, float s, int e5m2, uint32_t fmax_bits,
                               uint8_t *restrict data, pf_t *pf) {
    float r = exact_recip(s);
    if (r != 0.0f) sqv_quant_run_m(x, lo, hi, dt, s, r, 1, e5m2, fmax_bits, data, pf);
    else sqv_quant_run_m(x, lo, hi, dt, s, r, 0, e5m2, fmax_bits, data, pf);
}

SQ_AMAX_BODY(sqv_amax_body, sqv_amax_run, AVX2)
SQ_QUANT_BODY(sqv_quant_body, sqv_quant_run, AVX2)

/* Narrow tiles (MX 1x32, e4m3/e5m2 1x8..1x64 blocks): one call of sqv_quant_run per tile spent more on the call
 * (the reciprocal, the branches, the tails) than on its 32 elements (MX 1x32 quantize 10.9 ms against 7.0 ms
 * per row at 16M float32, one thread). Where every scale of the row's tiles is +2^k with a normal reciprocal
 * (all MX scales but 2^127; exact_recip's first case), a row runs 32 elements a step, each 8 lanes inside one
 * tile (bc a multiple of 8) times that tile's reciprocal, formed from the scale's bits: (254 << 23) - bits(2^k)
 * = bits(2^-k). Same products as sqv_quant_run_m's mul case, same bits. */
#define SQV_NARROW_MAX ((size_t)64)

/* Whether tiles of width bc take the narrow loops (bc in 8, 16, 32, 64) and whole tiles make the units (cs 1). */
INLINE int sqv_narrow(const sq_t *c) { return c->cs == 1 && c->bc >= 8 && c->bc <= SQV_NARROW_MAX && !(c->bc & (c->bc - 1)); }

/* 1 when every s[0..n) is +2^k with k in [-126, 126] (biased exponent 1..253, mantissa and sign 0). */
INLINE int sqv_pow2_scales(const float *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = f2u(s[i]), e = u >> 23;
        if ((u & 0x7fffffu) || e < 1 || e > 253) return 0;
    }
    return 1;
}

/* 1 when every d[0..n) is > 0 (not NaN). */
INLINE int sqv_positive(const float *d, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!(d[i] > 0.0f)) return 0;
    return 1;
}

/* bits(1 / s) of the +2^k scale at p, in 8 lanes. */
AVX2 INLINE __m256 sqv_recip_pow2(const float *p) {
    return _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_set1_epi32(254 << 23), _mm256_set1_epi32((int32_t)f2u(*p))));
}

/* The FP8 codes of [lo, hi), a run of whole tiles of 2^sh elements starting at lo (the last may be short) whose
 * scales st[0..] are all +2^k (sqv_pow2_scales). */
AVX2 INLINE void sqv_quant_narrow(const void *x, size_t lo, size_t hi, int dt, const float *st, unsigned sh, int e5m2,
                                  uint32_t fmax_bits, uint8_t *restrict data, pf_t *pf) {
    const __m256i fmaxv = _mm256_set1_epi32((int32_t)fmax_bits);
    size_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        pf_step(pf);
        const size_t o = i - lo;
        __m256 ya = _mm256_mul_ps(load8(x, i, dt), sqv_recip_pow2(st + (o >> sh)));
        __m256 yb = _mm256_mul_ps(load8(x, i + 8, dt), sqv_recip_pow2(st + ((o + 8) >> sh)));
        __m256 yc = _mm256_mul_ps(load8(x, i + 16, dt), sqv_recip_pow2(st + ((o + 16) >> sh)));
        __m256 yd = _mm256_mul_ps(load8(x, i + 24, dt), sqv_recip_pow2(st + ((o + 24) >> sh)));
        sqv_store32_fp8(data + i, ya, yb, yc, yd, e5m2, fmaxv);
    }
    while (i < hi) { /* the last < 32 elements, tile by tile */
        const size_t t = (i - lo) >> sh, end = lo + ((t + 1) << sh) < hi ? lo + ((t + 1) << sh) : hi;
        sqv_quant_run(x, i, end, dt, st[t], e5m2, fmax_bits, data, NULL);
        i = end;
    }
}

/* The FP8 element pass of unit u of narrow tiles: rows through sqv_quant_narrow (a row whose scales are not all
 * +2^k: tile by tile). */
AVX2 INLINE void sqv_quant_narrow_t(const sq_t *c, size_t u, int dt, int e5m2) {
    sq_unit_t w = sq_unit(c, u);
    if (w.c0 >= w.c1) return;
    const uint32_t fmax_bits = f2u(c->fmax);
    const size_t t0 = w.c0 / c->bc, nt = (w.c1 - 1) / c->bc - t0 + 1;
    const unsigned sh = (unsigned)__builtin_ctzll(c->bc);
    for (size_t r = w.r0; r < w.r1; r++) {
        const float *st = c->scale + (r / c->br) * c->nbc + t0;
        const size_t lo = r * c->C + w.c0, hi = r * c->C + w.c1;
        if (sqv_pow2_scales(st, nt)) {
            sqv_quant_narrow(sq_x(c, r), lo, hi, dt, st, sh, e5m2, fmax_bits, c->data, c->pf);
        } else {
            for (size_t t = 0; t < nt; t++) {
                const size_t a = lo + (t << sh), b = a + c->bc < hi ? a + c->bc : hi;
                sqv_quant_run(sq_x(c, r), a, b, dt, st[t], e5m2, fmax_bits, c->data, c->pf);
            }
        }
    }
}

/* FN(c, u, dt, e5m2) with dt and e5m2 as constants (one inlined copy per FP8 format and dtype). */
#define SQ_FP8_CASES(FN)                                                                          \
    switch (dt * 2 + e5m2) {                                                                      \
    case DT_F32 * 2: FN(c, u, DT_F32, 0); break;                                                  \
    case DT_F32 * 2 + 1: FN(c, u, DT_F32, 1); break;                                              \
    case DT_F16 * 2: FN(c, u, DT_F16, 0); break;                                                  \
    case DT_F16 * 2 + 1: FN(c, u, DT_F16, 1); break;                                              \
    case DT_BF16 * 2: FN(c, u, DT_BF16, 0); break;                                                \
    default: FN(c, u, DT_BF16, 1); break;                                                         \
    }

/* Out of line, so that the per-tile loops inlined into sq_avx2_quant keep their code (inlined side by side with
 * these, the row and tensor passes ran ~10 % slower). */
AVX2 NOINLINE static void sqv_quant_narrow_unit(const sq_t *c, size_t u, int dt, int e5m2) {
    SQ_FP8_CASES(sqv_quant_narrow_t);
}

/* The tile-by-tile FP8 element pass, out of line too: its register allocation then no longer depends on what else
 * is inlined into sq_avx2_quant (the 4/6-bit passes; with the narrow loops beside it the row pass ran 7.0 -> 7.6 ms). */
AVX2 NOINLINE static void sqv_quant_tiles_unit(const sq_t *c, size_t u, int dt, int e5m2) {
    SQ_FP8_CASES(sqv_quant_body);
}

AVX2 INLINE void sqv_quant_body_n(const sq_t *c, size_t u, int dt, int e5m2) {
    if (sqv_narrow(c)) sqv_quant_narrow_unit(c, u, dt, e5m2);
    else sqv_quant_tiles_unit(c, u, dt, e5m2);
}

/* Tile amax of narrow float32 tiles (sqv_narrow), 8 tiles a step: each tile's 8-lane max over its bc / 8 vectors,
 * then one transposing reduction of the 8 maxima (sqv_hmax8x8) instead of a horizontal max and a call per tile.
 * A max of the same values: the same partials. A group holding a NaN/Inf where they are tracked goes tile by tile
 * through sqv_amax_run (it sets the tile's nonfin flag). */
/* Lane t = the max of the 8 lanes of m[t] (signed int32 lanes). */
AVX2 INLINE __m256i sqv_hmax8x8(const __m256i *m) {
    __m256i a0 = _mm256_max_epi32(_mm256_unpacklo_epi32(m[0], m[1]), _mm256_unpackhi_epi32(m[0], m[1]));
    __m256i a1 = _mm256_max_epi32(_mm256_unpacklo_epi32(m[2], m[3]), _mm256_unpackhi_epi32(m[2], m[3]));
    __m256i a2 = _mm256_max_epi32(_mm256_unpacklo_epi32(m[4], m[5]), _mm256_unpackhi_epi32(m[4], m[5]));
    __m256i a3 = _mm256_max_epi32(_mm256_unpacklo_epi32(m[6], m[7]), _mm256_unpackhi_epi32(m[6], m[7]));
    /* per 128-bit half: a0 = [m0, m1, m0, m1] partial maxima; then [m0, m1, m2, m3] of the half */
    __m256i b0 = _mm256_max_epi32(_mm256_unpacklo_epi64(a0, a1), _mm256_unpackhi_epi64(a0, a1));
    __m256i b1 = _mm256_max_epi32(_mm256_unpacklo_epi64(a2, a3), _mm256_unpackhi_epi64(a2, a3));
    return _mm256_max_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

AVX2 INLINE void sqv_amax_narrow_t(const sq_t *c, size_t u, int track) {
    sq_unit_t w = sq_unit(c, u);
    if (w.c0 >= w.c1) return;
    uint32_t *part = c->partial + w.ru * c->nbc; /* cs = 1: slot t of the tile row */
    uint8_t *nf = c->nonfin + w.ru * c->nbc;
    const size_t bc = c->bc, nv = bc / 8, t0 = w.c0 / bc, t1 = (w.c1 - 1) / bc;
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    for (size_t t = t0; t <= t1; t++) {
        part[t] = 0;
        if (track) nf[t] = 0;
    }
    for (size_t r = w.r0; r < w.r1; r++) {
        const uint32_t *x = (const uint32_t *)sq_x(c, r) + r * c->C;
        size_t t = t0;
        for (; t + 8 <= t1 + 1 && (t + 8) * bc <= w.c1; t += 8) {
            __m256i m[8], bad = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                const uint32_t *p = x + (t + (size_t)j) * bc;
                __m256i mj = _mm256_setzero_si256();
                for (size_t v = 0; v < nv; v++) {
                    __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + 8 * v)), abs);
                    __m256i fin = _mm256_cmpgt_epi32(inf, a);
                    if (track) bad = _mm256_or_si256(bad, _mm256_andnot_si256(fin, abs));
                    mj = _mm256_max_epi32(mj, _mm256_and_si256(a, fin));
                }
                m[j] = mj;
            }
            if (track && !_mm256_testz_si256(bad, bad)) break; /* this group and the rest tile by tile */
            __m256i old = _mm256_loadu_si256((const __m256i *)(part + t));
            _mm256_storeu_si256((__m256i *)(part + t), _mm256_max_epi32(old, sqv_hmax8x8(m)));
        }
        for (; t <= t1; t++) {
            const size_t lo = r * c->C + (t * bc > w.c0 ? t * bc : w.c0);
            const size_t hi = r * c->C + ((t + 1) * bc < w.c1 ? (t + 1) * bc : w.c1);
            part[t] = sqv_amax_run(sq_x(c, r), lo, hi, DT_F32, part[t], track, track ? nf + t : NULL);
        }
    }
}

/* sqv_amax_body, narrow float32 tiles through sqv_amax_narrow_t. */
AVX2 NOINLINE static void sqv_amax_narrow(const sq_t *c, size_t u) {
    if (c->track) sqv_amax_narrow_t(c, u, 1);
    else sqv_amax_narrow_t(c, u, 0);
}

AVX2 INLINE void sqv_amax_body_n(const sq_t *c, size_t u, int dt) {
    if (dt == DT_F32 && sqv_narrow(c)) sqv_amax_narrow(c, u);
    else sqv_amax_body(c, u, dt);
}

/* mx_scale1 of 8 tiles at a time (its bit formulas for a normal amax, 1 for amax 0; a float32-subnormal
 * amax leaves its group and the rest to sq_scale1), in local mode (sub = cs = 1: a tile's partial
 * is its amax). 4/6-bit MX formats also store the divisor and the NaN scale of a tile with a NaN/Inf. */
AVX2 static size_t sqv_mx_scales(sq_t *c, size_t tr, size_t t0, size_t t1) {
    const int fmt = c->fmt, mbits = SQ_FMT[fmt].mbits, emax = SQ_FMT[fmt].emax;
    const __m256i one = _mm256_set1_epi32(1), fracm = _mm256_set1_epi32(0x7fffff);
    const __m256 lim = _mm256_set1_ps(SQ_FMT[fmt].fmax / (float)(2 << emax));
    size_t t = t0;
    for (; t + 8 <= t1 + 1; t += 8) {
        const size_t at = tr * c->nbc + t;
        __m256i u = _mm256_loadu_si256((const __m256i *)(c->partial + at));
        __m256i zero = _mm256_cmpeq_epi32(u, _mm256_setzero_si256());
        __m256i tiny = _mm256_andnot_si256(zero, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), u));
        if (!_mm256_testz_si256(tiny, tiny)) break; /* a float32-subnormal amax: frexpf in mx_scale1 */
        __m256i frac = _mm256_and_si256(u, fracm);
        __m256i ex = _mm256_sub_epi32(_mm256_srli_epi32(u, 23), _mm256_set1_epi32(126 + 1 + emax));
        if (c->rule == 2) { /* EVEN: + 1 where frac rounds (RNE) up to 2^23 at mbits + 1 bits */
            __m256i odd = _mm256_and_si256(_mm256_srli_epi32(frac, 23 - mbits), one);
            __m256i up = _mm256_add_epi32(_mm256_add_epi32(frac, _mm256_set1_epi32((1 << (22 - mbits)) - 1)), odd);
            ex = _mm256_add_epi32(ex, _mm256_srli_epi32(up, 23));
        } else if (c->rule == 1) { /* RCEIL: + 1 where the mantissa 0.5 * 1.frac > fmax / 2^(emax+1) */
            __m256 m = _mm256_castsi256_ps(_mm256_or_si256(frac, _mm256_set1_epi32(0x3f000000)));
            ex = _mm256_sub_epi32(ex, _mm256_castps_si256(_mm256_cmp_ps(m, lim, _CMP_GT_OQ)));
        }
        ex = _mm256_min_epi32(_mm256_max_epi32(ex, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
        __m256i sb = _mm256_slli_epi32(_mm256_add_epi32(ex, _mm256_set1_epi32(127)), 23);
        sb = _mm256_blendv_epi8(sb, _mm256_set1_epi32(0x00400000), _mm256_cmpeq_epi32(ex, _mm256_set1_epi32(-127)));
        sb = _mm256_blendv_epi8(sb, _mm256_set1_epi32(0x3f800000), zero); /* amax 0: scale 1 */
        if (c->lowbit) {
            _mm256_storeu_si256((__m256i *)(c->div + at), sb);
            __m256i nf = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c->nonfin + at)));
            sb = _mm256_blendv_epi8(sb, _mm256_set1_epi32(0x7fc00000), _mm256_cmpgt_epi32(nf, _mm256_setzero_si256()));
        }
        _mm256_storeu_si256((__m256i *)(c->scale + at), sb);
    }
    _mm256_zeroupper();
    return t;
}

/* sq_scale1's NVFP4 case for 8 tiles at a time (sub = cs = 1: a tile's partial is its amax), where the tile row's
 * tensor scale g is finite and > 0: then amax / fl32(6 g) is >= 0 and not NaN, its E4M3 code (enc_fp8 saturating,
 * sqv_enc_fp8) is at most 0x7e and its value (sqv_dec_fp8, dec_e4m3's value on every non-NaN code) s >= 0 finite;
 * the divisor fl32(s g), the scale NaN where the tile holds a NaN/Inf. The same float32 operations lane by lane
 * (1M tiles at NVFP4 1x16 and 16M elements: ~8 ms one at a time). */
AVX2 static size_t sqv_nvfp4_scales(sq_t *c, size_t tr, size_t t0, size_t t1) {
    const float g = c->grow ? c->grow[tr] : c->g;
    if (!(g > 0.0f && g < INFINITY)) return t0;
    const __m256 g6 = _mm256_set1_ps(6.0f * g), gv = _mm256_set1_ps(g);
    const __m256i fmaxv = _mm256_set1_epi32(0x43e00000);
    size_t t = t0;
    for (; t + 8 <= t1 + 1; t += 8) {
        const size_t at = tr * c->nbc + t;
        __m256 amax = _mm256_loadu_ps((const float *)(c->partial + at));
        __m256 s = sqv_dec_fp8(sqv_enc_fp8(_mm256_div_ps(amax, g6), 0, fmaxv), 0);
        _mm256_storeu_ps(c->div + at, _mm256_mul_ps(s, gv));
        __m256i nf = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c->nonfin + at)));
        s = _mm256_blendv_ps(s, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),
                             _mm256_castsi256_ps(_mm256_cmpgt_epi32(nf, _mm256_setzero_si256())));
        _mm256_storeu_ps(c->scale + at, s);
    }
    _mm256_zeroupper();
    return t;
}

/* lowbit_round of 8 lanes (element kind k, see there): y = x' / d as x' * r when mul, x' * 0 when !pos
 * (d not > 0); returns t = |y| rounded at mbits plus 2^23 and sets *uy (y's bits) and *e (the binade).
 * The same integer and float32 operations, lane by lane. */
AVX2 INLINE __m256 sqv_lowbit_scaled(__m256 xv, __m256 dv, int pos, int mul, int k, __m256i *uy, __m256i *e) {
    const int mbits = k == 0 ? 1 : (k == 1 ? 3 : 2), emin = k == 2 ? -2 : 0;
    const __m256i fmaxv = _mm256_set1_epi32(k == 0 ? 0x40c00000 : (k == 1 ? 0x40f00000 : 0x41e00000));
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    __m256i u = _mm256_castps_si256(xv), a = _mm256_and_si256(u, abs);
    __m256i v = _mm256_blendv_epi8(u, _mm256_or_si256(_mm256_andnot_si256(abs, u), fmaxv), _mm256_cmpeq_epi32(a, inf));
    v = _mm256_andnot_si256(_mm256_cmpgt_epi32(a, inf), v); /* NaN -> +0 */
    __m256 vf = _mm256_castsi256_ps(v);
    __m256 y = !pos ? _mm256_mul_ps(vf, _mm256_setzero_ps()) : (mul ? _mm256_mul_ps(vf, dv) : _mm256_div_ps(vf, dv));
    *uy = _mm256_castps_si256(y);
    __m256i b = _mm256_min_epi32(_mm256_and_si256(*uy, abs), fmaxv);
    *e = _mm256_max_epi32(_mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(127)), _mm256_set1_epi32(emin));
    __m256 p = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(127 + mbits), *e), 23));
    return _mm256_mul_ps(_mm256_castsi256_ps(b), p);
}

AVX2 INLINE __m256 sqv_lowbit_round(__m256 xv, __m256 dv, int pos, int mul, int k, __m256i *uy, __m256i *e) {
    return _mm256_add_ps(sqv_lowbit_scaled(xv, dv, pos, mul, k, uy, e), _mm256_set1_ps(8388608.0f));
}

/* lowbit_code of 8 lanes (t = 2^23 + n, uy, e from sqv_lowbit_round or sqv_lowbit_round_sr). */
AVX2 INLINE __m256i sqv_lowbit_code(__m256 t, __m256i uy, __m256i e, int k) {
    const int ebits = k == 2 ? 3 : 2, mbits = k == 0 ? 1 : (k == 1 ? 3 : 2), emin = k == 2 ? -2 : 0;
    __m256i n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4b000000));
    __m256i mag = _mm256_add_epi32(_mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(emin)), mbits), n);
    return _mm256_or_si256(mag, _mm256_slli_epi32(_mm256_srli_epi32(uy, 31), ebits + mbits));
}

/* enc_lowbit of 8 lanes. */
AVX2 INLINE __m256i sqv_enc_lowbit(__m256 xv, __m256 dv, int pos, int mul, int k) {
    __m256i uy, e;
    __m256 t = sqv_lowbit_round(xv, dv, pos, mul, k, &uy, &e);
    return sqv_lowbit_code(t, uy, e, k);
}

/* lowbit_code_value of 8 lanes: +-(t - 2^23) * 2^(e - mbits). */
AVX2 INLINE __m256 sqv_lowbit_code_value(__m256 t, __m256i uy, __m256i e, int k) {
    const int mbits = k == 0 ? 1 : (k == 1 ? 3 : 2);
    __m256 step = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127 - mbits)), 23));
    __m256 mag = _mm256_mul_ps(_mm256_sub_ps(t, _mm256_set1_ps(8388608.0f)), step);
    return _mm256_or_ps(mag, _mm256_castsi256_ps(_mm256_and_si256(uy, _mm256_set1_epi32((int32_t)0x80000000u))));
}

/* lowbit_value of 8 lanes. */
AVX2 INLINE __m256 sqv_lowbit_value(__m256 xv, __m256 dv, int pos, int mul, int k) {
    __m256i uy, e;
    __m256 t = sqv_lowbit_round(xv, dv, pos, mul, k, &uy, &e);
    return sqv_lowbit_code_value(t, uy, e, k);
}

AVX2 INLINE void sqv_lowbit_run_m(const void *x, size_t lo, size_t hi, int dt, float d, float r, int pos, int mul,
                                  int k, uint8_t *restrict data, pf_t *pf) {
    const __m256 dv = _mm256_set1_ps(mul ? r : d);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        pf_step(pf);
        __m256i a = sqv_enc_lowbit(load8(x, i, dt), dv, pos, mul, k);
        __m256i b = sqv_enc_lowbit(load8(x, i + 8, dt), dv, pos, mul, k);
        __m256i c = sqv_enc_lowbit(load8(x, i + 16, dt), dv, pos, mul, k);
        __m256i e = sqv_enc_lowbit(load8(x, i + 24, dt), dv, pos, mul, k);
        __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, e));
        _mm256_storeu_si256((__m256i *)(data + i), _mm256_permutevar8x32_epi32(p, order));
    }
    for (; i + 8 <= hi; i += 8) sqv_store8_u8(data + i, sqv_enc_lowbit(load8(x, i, dt), dv, pos, mul, k));
    sq_lowbit_run(x, i, hi, dt, d, k, data, NULL);
}

AVX2 INLINE void sqv_lowbit_run(const void *x, size_t lo, size_t hi, int dt, float d, int k, uint8_t *restrict data,
                                pf_t *pf) {
    if (!(d > 0.0f)) { sqv_lowbit_run_m(x, lo, hi, dt, d, 0.0f, 0, 0, k, data, pf); return; }
    float r = exact_recip(d);
    if (r != 0.0f) sqv_lowbit_run_m(x, lo, hi, dt, d, r, 1, 1, k, data, pf);
    else sqv_lowbit_run_m(x, lo, hi, dt, d, r, 1, 0, k, data, pf);
}

/* ------------------------------------------------------- scaled casts: stochastic rounding, AVX2
 * The stochastically rounded 4/6-bit element passes of quantize_scaled (sqv_sr_run) and fused_scaled
 * (fqv_sr_run), 8 lanes at a time: the scalar code's integer and float32 operations lane by lane (sr_uniform,
 * lowbit_round_sr, lowbit_code / lowbit_code_value, fq_sr_run's compares), y = x * r for an exact
 * reciprocal as sqv_lowbit_run. The floor of t (>= 0, < 2^7) by _mm256_round_ps toward -Inf. */

/* sr_uniform of the 8 counters ctr, ctr + 1, .., ctr + 7. */
AVX2 INLINE __m256 sqv_uniform(uint32_t ctr) {
    __m256i h = _mm256_add_epi32(_mm256_set1_epi32((int32_t)ctr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    h = _mm256_mullo_epi32(_mm256_xor_si256(h, _mm256_srli_epi32(h, 16)), _mm256_set1_epi32(0x7feb352d));
    h = _mm256_mullo_epi32(_mm256_xor_si256(h, _mm256_srli_epi32(h, 15)), _mm256_set1_epi32((int32_t)0x846ca68bu));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0x1p-24f));
}

/* lowbit_round_sr of 8 lanes (numbers from counter ctr on). */
AVX2 INLINE __m256 sqv_lowbit_round_sr(__m256 xv, __m256 dv, int pos, int mul, int k, uint32_t ctr, __m256i *uy,
                                       __m256i *e) {
    __m256 t = sqv_lowbit_scaled(xv, dv, pos, mul, k, uy, e);
    __m256 lo = _mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m256 up = _mm256_and_ps(_mm256_cmp_ps(sqv_uniform(ctr), _mm256_sub_ps(t, lo), _CMP_LT_OQ), _mm256_set1_ps(1.0f));
    return _mm256_add_ps(_mm256_add_ps(lo, up), _mm256_set1_ps(8388608.0f));
}

AVX2 INLINE __m256i sqv_enc_lowbit_sr(__m256 xv, __m256 dv, int pos, int mul, int k, uint32_t ctr) {
    __m256i uy, e;
    __m256 t = sqv_lowbit_round_sr(xv, dv, pos, mul, k, ctr, &uy, &e);
    return sqv_lowbit_code(t, uy, e, k);
}

AVX2 INLINE void sqv_sr_run_m(const void *x, size_t lo, size_t hi, int dt, float d, float r, int pos, int mul, int k,
                              uint8_t *restrict data, pf_t *pf, uint32_t ctr) {
    const __m256 dv = _mm256_set1_ps(mul ? r : d);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t i = lo;
    for (; i + 32 <= hi; i += 32, ctr += 32) {
        pf_step(pf);
        __m256i a = sqv_enc_lowbit_sr(load8(x, i, dt), dv, pos, mul, k, ctr);
        __m256i b = sqv_enc_lowbit_sr(load8(x, i + 8, dt), dv, pos, mul, k, ctr + 8);
        __m256i c = sqv_enc_lowbit_sr(load8(x, i + 16, dt), dv, pos, mul, k, ctr + 16);
        __m256i e = sqv_enc_lowbit_sr(load8(x, i + 24, dt), dv, pos, mul, k, ctr + 24);
        __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, e));
        _mm256_storeu_si256((__m256i *)(data + i), _mm256_permutevar8x32_epi32(p, order));
    }
    for (; i + 8 <= hi; i += 8, ctr += 8)
        sqv_store8_u8(data + i, sqv_enc_lowbit_sr(load8(x, i, dt), dv, pos, mul, k, ctr));
    sq_sr_run(x, i, hi, dt, d, k, data, NULL, ctr);
}

AVX2 INLINE void sqv_sr_run(const void *x, size_t lo, size_t hi, int dt, float d, int k, uint8_t *restrict data,
                            pf_t *pf, uint32_t ctr) {
    if (!(d > 0.0f)) { sqv_sr_run_m(x, lo, hi, dt, d, 0.0f, 0, 0, k, data, pf, ctr); return; }
    float r = exact_recip(d);
    if (r != 0.0f) sqv_sr_run_m(x, lo, hi, dt, d, r, 1, 1, k, data, pf, ctr);
    else sqv_sr_run_m(x, lo, hi, dt, d, r, 1, 0, k, data, pf, ctr);
}

/* 8 lanes of fq_sr_run from element i (counter ctr): q stored, the -1/0 saturation mask returned, counts and
 * the largest |q| bits (> Inf bits iff some q is NaN) accumulated. */
AVX2 INLINE __m256i fqv_sr_step(const fq_t *c, size_t i, int dt, int k, int has_g, __m256 dv, __m256 sv, __m256 gv,
                                int pos, int mul, uint32_t ctr, __m256i vmaxv, __m256i *nnz, __m256i *nun,
                                __m256i *nsat, __m256i *aqmax) {
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    __m256 xv = load8(c->sq.x, i, dt);
    __m256i uy, e;
    __m256 t = sqv_lowbit_round_sr(xv, dv, pos, mul, k, ctr, &uy, &e);
    __m256 v = sqv_lowbit_code_value(t, uy, e, k);
    __m256 qv = _mm256_mul_ps(v, sv);
    if (has_g) qv = _mm256_mul_ps(qv, gv);
    _mm256_storeu_ps(c->q + i, qv);
    __m256i ax = _mm256_and_si256(_mm256_castps_si256(xv), abs);
    __m256i aq = _mm256_and_si256(_mm256_castps_si256(qv), abs);
    __m256i av = _mm256_and_si256(_mm256_castps_si256(v), abs);
    /* |v| == vmax makes v finite and x not NaN (see fqv_step); a NaN q is reported through aqmax */
    __m256i st = _mm256_and_si256(_mm256_cmpeq_epi32(av, vmaxv), _mm256_cmpgt_epi32(ax, aq));
    __m256i nz = _mm256_andnot_si256(_mm256_cmpeq_epi32(ax, _mm256_setzero_si256()), _mm256_cmpgt_epi32(inf, ax));
    *nnz = _mm256_sub_epi32(*nnz, nz);
    *nun = _mm256_sub_epi32(*nun, _mm256_and_si256(nz, _mm256_cmpeq_epi32(aq, _mm256_setzero_si256())));
    *nsat = _mm256_sub_epi32(*nsat, st);
    *aqmax = _mm256_max_epi32(*aqmax, aq);
    return st;
}

/* The run's counts: slot[0], slot[ncnt], slot[2 ncnt] += the lane sums of nnz, nun, nsat (at most UNIT / 8 per
 * lane, no overflow: two horizontal adds leave, per 128-bit half, [nnz, nun, nsat, 0] partial sums). */
AVX2 INLINE void fqv_add_lane_counts(const fq_t *c, int64_t *slot, __m256i nnz, __m256i nun, __m256i nsat) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(nnz, nun), _mm256_hadd_epi32(nsat, _mm256_setzero_si256()));
    __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    slot[0] += _mm_extract_epi32(sum, 0);
    slot[c->ncnt] += _mm_extract_epi32(sum, 1);
    slot[2 * c->ncnt] += _mm_extract_epi32(sum, 2);
}

AVX2 INLINE int fqv_sr_run_m(const fq_t *c, size_t lo, size_t hi, int dt, int kind, int has_g, float s, float d,
                             float r, int pos, int mul, int64_t *slot) {
    const size_t row = lo / c->sq.C;
    const float g = c->sq.grow ? c->sq.grow[row] : c->sq.g;
    const __m256 dv = _mm256_set1_ps(mul ? r : d), sv = _mm256_set1_ps(s), gv = _mm256_set1_ps(g);
    const __m256i vmaxv = _mm256_set1_epi32((int32_t)c->vmax_bits), one = _mm256_set1_epi32(1);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const int k = kind - 2;
    __m256i nnz = _mm256_setzero_si256(), nun = nnz, nsat = nnz, aqmax = nnz;
    uint32_t ctr = sr_counter(&c->sq, row, lo);
    size_t i = lo;
    for (; i + 32 <= hi; i += 32, ctr += 32) {
        pf_step(c->sq.pf);
        __m256i s[4];
        for (int j = 0; j < 4; j++)
            s[j] = fqv_sr_step(c, i + 8 * j, dt, k, has_g, dv, sv, gv, pos, mul, ctr + 8 * j, vmaxv, &nnz, &nun, &nsat,
                               &aqmax);
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(s[0], s[1]), _mm256_packs_epi32(s[2], s[3]));
        p = _mm256_and_si256(_mm256_permutevar8x32_epi32(p, order), _mm256_set1_epi8(1));
        _mm256_storeu_si256((__m256i *)(c->sat + i), p);
    }
    for (; i + 8 <= hi; i += 8, ctr += 8)
        sqv_store8_u8(c->sat + i, _mm256_and_si256(fqv_sr_step(c, i, dt, k, has_g, dv, sv, gv, pos, mul, ctr, vmaxv,
                                                               &nnz, &nun, &nsat, &aqmax), one));
    fqv_add_lane_counts(c, slot, nnz, nun, nsat);
    int bad = hmax8(aqmax) > 0x7f800000;
    return bad | fq_sr_run(c, i, hi, dt, kind, has_g, s, d, slot, 0);
}

AVX2 INLINE int fqv_sr_run(const fq_t *c, size_t lo, size_t hi, int dt, int kind, int has_g, float s, float d,
                           int64_t *slot, int clean) {
    (void)clean;
    if (!(d > 0.0f)) return fqv_sr_run_m(c, lo, hi, dt, kind, has_g, s, d, 0.0f, 0, 0, slot);
    float r = exact_recip(d);
    return r != 0.0f ? fqv_sr_run_m(c, lo, hi, dt, kind, has_g, s, d, r, 1, 1, slot)
                     : fqv_sr_run_m(c, lo, hi, dt, kind, has_g, s, d, r, 1, 0, slot);
}

FQ_BODY(fqv_sr_body, fqv_sr_run, AVX2)
FQ_SR_DISPATCH(fq_sr_avx2, fqv_sr_body, AVX2, _mm256_zeroupper();)

SQ_LOWBIT_BODY(sqv_lowbit_body, sqv_lowbit_run, sqv_sr_run, AVX2)

/* The 4/6-bit element pass of quantize_scaled over narrow tiles (sqv_narrow: MX 1x32, NVFP4 1x16, 1x8..1x64), as
 * the FP8 one (sqv_quant_narrow) and fused_scaled's (fqv_narrow_tiles): tile by tile, the call and its branches
 * cost more than 16 or 32 elements (mxfp4 1x32 quantize ~15 ms for 16M float32, one thread, against ~9 ms for the
 * same codes a row at a time). Where a row's divisors are all +2^k (sqv_pow2_scales: every MX divisor but 2^127)
 * the row runs 32 elements a step, each 8 lanes inside one tile times that tile's reciprocal from the divisor's
 * bits (sqv_recip_pow2: sqv_lowbit_run's mul case); where they are all > 0 (NVFP4: E4M3 block scale x tensor
 * scale) each 8 lanes divided by their tile's divisor (its division case). Same operations per lane, same bits.
 * Stochastic rounding: element i of the row draws counter ctr(lo) + (i - lo) (sr_counter is linear along a row).
 * Other rows (a divisor 0, NaN or 2^127) and the row's last < 32 elements go tile by tile (sqv_lowbit_run /
 * sqv_sr_run). */
AVX2 INLINE __m256 sqv_tile_div(const float *dd, size_t t, int mul) {
    return mul ? sqv_recip_pow2(dd + t) : _mm256_set1_ps(dd[t]);
}

AVX2 INLINE __m256i sqv_enc_lowbit_any(__m256 xv, __m256 dv, int mul, int k, int sr, uint32_t ctr) {
    return sr ? sqv_enc_lowbit_sr(xv, dv, 1, mul, k, ctr) : sqv_enc_lowbit(xv, dv, 1, mul, k);
}

/* The codes of row run [lo, hi): whole tiles of 2^sh elements from lo (the last may be short), divisors dd[0..]
 * (all +2^k when mul, else all > 0); ctr: the counter of element lo (sr). */
AVX2 INLINE void sqv_lowbit_narrow(const void *x, size_t lo, size_t hi, int dt, const float *dd, unsigned sh, int k,
                                   int mul, int sr, uint32_t ctr, uint8_t *restrict data, pf_t *pf) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t i = lo;
    for (; i + 32 <= hi; i += 32, ctr += 32) {
        pf_step(pf);
        const size_t o = i - lo;
        __m256i a = sqv_enc_lowbit_any(load8(x, i, dt), sqv_tile_div(dd, o >> sh, mul), mul, k, sr, ctr);
        __m256i b = sqv_enc_lowbit_any(load8(x, i + 8, dt), sqv_tile_div(dd, (o + 8) >> sh, mul), mul, k, sr, ctr + 8);
        __m256i c = sqv_enc_lowbit_any(load8(x, i + 16, dt), sqv_tile_div(dd, (o + 16) >> sh, mul), mul, k, sr,
                                       ctr + 16);
        __m256i e = sqv_enc_lowbit_any(load8(x, i + 24, dt), sqv_tile_div(dd, (o + 24) >> sh, mul), mul, k, sr,
                                       ctr + 24);
        __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, e));
        _mm256_storeu_si256((__m256i *)(data + i), _mm256_permutevar8x32_epi32(p, order));
    }
    while (i < hi) { /* the last < 32 elements, tile by tile */
        const size_t t = (i - lo) >> sh, end = lo + ((t + 1) << sh) < hi ? lo + ((t + 1) << sh) : hi;
        if (sr) sqv_sr_run(x, i, end, dt, dd[t], k, data, NULL, ctr);
        else sqv_lowbit_run(x, i, end, dt, dd[t], k, data, NULL);
        ctr += (uint32_t)(end - i);
        i = end;
    }
}

AVX2 INLINE void sqv_lowbit_narrow_t(const sq_t *c, size_t u, int dt, int k) {
    sq_unit_t w = sq_unit(c, u);
    if (w.c0 >= w.c1) return;
    const size_t t0 = w.c0 / c->bc, nt = (w.c1 - 1) / c->bc - t0 + 1;
    const unsigned sh = (unsigned)__builtin_ctzll(c->bc);
    for (size_t r = w.r0; r < w.r1; r++) {
        const float *dd = c->div + (r / c->br) * c->nbc + t0;
        const size_t lo = r * c->C + w.c0, hi = r * c->C + w.c1;
        const void *x = sq_x(c, r);
        const int mul = sqv_pow2_scales(dd, nt);
        if (!mul && !sqv_positive(dd, nt)) {
            for (size_t t = 0; t < nt; t++) {
                const size_t a = lo + (t << sh), b = a + c->bc < hi ? a + c->bc : hi;
                if (c->sr) sqv_sr_run(x, a, b, dt, dd[t], k, c->data, c->pf, sr_counter(c, r, a));
                else sqv_lowbit_run(x, a, b, dt, dd[t], k, c->data, c->pf);
            }
        } else if (c->sr) {
            const uint32_t ctr = sr_counter(c, r, lo);
            if (mul) sqv_lowbit_narrow(x, lo, hi, dt, dd, sh, k, 1, 1, ctr, c->data, c->pf);
            else sqv_lowbit_narrow(x, lo, hi, dt, dd, sh, k, 0, 1, ctr, c->data, c->pf);
        } else {
            if (mul) sqv_lowbit_narrow(x, lo, hi, dt, dd, sh, k, 1, 0, 0, c->data, c->pf);
            else sqv_lowbit_narrow(x, lo, hi, dt, dd, sh, k, 0, 0, 0, c->data, c->pf);
        }
    }
}

/* Out of line, one copy per dtype and element kind (see sqv_quant_tiles_unit). */
AVX2 NOINLINE static void sqv_lowbit_narrow_unit(const sq_t *c, size_t u, int dt, int k) {
    switch (dt * 3 + k) {
    case DT_F32 * 3: sqv_lowbit_narrow_t(c, u, DT_F32, 0); break;
    case DT_F32 * 3 + 1: sqv_lowbit_narrow_t(c, u, DT_F32, 1); break;
    case DT_F32 * 3 + 2: sqv_lowbit_narrow_t(c, u, DT_F32, 2); break;
    case DT_F16 * 3: sqv_lowbit_narrow_t(c, u, DT_F16, 0); break;
    case DT_F16 * 3 + 1: sqv_lowbit_narrow_t(c, u, DT_F16, 1); break;
    case DT_F16 * 3 + 2: sqv_lowbit_narrow_t(c, u, DT_F16, 2); break;
    case DT_BF16 * 3: sqv_lowbit_narrow_t(c, u, DT_BF16, 0); break;
    case DT_BF16 * 3 + 1: sqv_lowbit_narrow_t(c, u, DT_BF16, 1); break;
    default: sqv_lowbit_narrow_t(c, u, DT_BF16, 2); break;
    }
}

AVX2 INLINE void sqv_lowbit_body_n(const sq_t *c, size_t u, int dt, int k) {
    if (sqv_narrow(c)) sqv_lowbit_narrow_unit(c, u, dt, k);
    else sqv_lowbit_body(c, u, dt, k);
}
SQ_DISPATCH(sq_avx2, sqv_amax_body_n, sqv_quant_body_n, sqv_lowbit_body_n, AVX2, _mm256_zeroupper();)

/* sd_run: the decode of 8 codes by dec (sd_t.dec: 0 gather from the table, 1/2 dec_fp8 e4m3/e5m2). */
AVX2 INLINE __m256 sqv_decode8(const sd_t *c, __m256i code, int dec) {
    return dec ? sqv_dec_fp8(code, dec - 1) : _mm256_i32gather_ps(c->table, code, 4);
}

AVX2 INLINE int sdv_run_d(const sd_t *c, size_t lo, size_t hi, int dt, int has_g, float s, int dec) {
    const __m256 sv = _mm256_set1_ps(s), gv = _mm256_set1_ps(c->g);
    __m256 nan = _mm256_setzero_ps();
    size_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        __m256i code = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c->data + i)));
        __m256 y = _mm256_mul_ps(sqv_decode8(c, code, dec), sv);
        if (has_g) y = _mm256_mul_ps(y, gv);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
        store8(c->out, i, y, dt);
    }
    int bad = !_mm256_testz_ps(nan, nan);
    return bad | sd_run(c, i, hi, dt, has_g, s);
}

AVX2 INLINE int sdv_run(const sd_t *c, size_t lo, size_t hi, int dt, int has_g, float s) {
    switch (c->dec) {
    case 1: return sdv_run_d(c, lo, hi, dt, has_g, s, 1);
    case 2: return sdv_run_d(c, lo, hi, dt, has_g, s, 2);
    default: return sdv_run_d(c, lo, hi, dt, has_g, s, 0);
    }
}

SD_BODY(sdv_body, sdv_run, AVX2)
SD_DISPATCH(sd_avx2, sdv_body, AVX2, _mm256_zeroupper();)

/* dec_fp8(enc_fp8(y)) of 8 lanes without forming the code: the float32 bits of y rounded to 3 (E4M3) or 2
 * (E5M2) mantissa bits, as enc_fp8 rounds (the same integer rounding of b, kept in place instead of
 * shifted down to a code: a carry into the exponent is again the right value), below the smallest
 * normal fl32(b + 2^14) - 2^14 (E4M3; 2^7 for E5M2): the addition rounds b to the subnormal step and the
 * subtraction is exact (a multiple of the step below 2^-6 / 2^-14), which is the value of the code the
 * addition gave enc_fp8. Inf: E4M3 gets min(Inf, 448) = 448 from the clamp, E5M2 keeps Inf; NaN stays a
 * NaN (its payload is never used: a NaN q sends the call to the unfused ops). */
AVX2 INLINE __m256 sqv_round_fp8(__m256 y, int e5m2, __m256i fmaxv, int clean) {
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const int sh = e5m2 ? 21 : 20;
    __m256i u = _mm256_castps_si256(y);
    __m256i a = _mm256_and_si256(u, abs);
    __m256i b = _mm256_min_epi32(a, fmaxv);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, sh), _mm256_set1_epi32(1));
    __m256i nrm = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(e5m2 ? 0xfffff : 0x7ffff)), lsb);
    nrm = _mm256_and_si256(nrm, _mm256_set1_epi32(e5m2 ? (int32_t)0xffe00000u : (int32_t)0xfff00000u));
    const __m256 bias = _mm256_set1_ps(e5m2 ? 128.0f : 16384.0f);
    __m256 sub = _mm256_sub_ps(_mm256_add_ps(_mm256_castsi256_ps(b), bias), bias);
    __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(e5m2 ? 0x38800000 : 0x3c800000), b);
    __m256i v = _mm256_blendv_epi8(nrm, _mm256_castps_si256(sub), small);
    /* A clean run has no NaN/Inf x, so no NaN/Inf y: |x| <= the tile's finite amax, and y = x / s stays below
     * 2^(emax+1) for MX scales, near fmax for amax / fmax (below 2^23 where that scale is subnormal). */
    if (!clean) {
        if (e5m2) v = _mm256_blendv_epi8(v, inf, _mm256_cmpeq_epi32(a, inf));
        v = _mm256_blendv_epi8(v, a, _mm256_cmpgt_epi32(a, inf)); /* NaN */
    }
    return _mm256_castsi256_ps(_mm256_or_si256(v, _mm256_andnot_si256(abs, u)));
}

/* One 8-lane step of fqv_run_m: q stored, the -1/0 saturation mask returned, the counts and the NaN
 * test accumulated. sat = |v| == vmax and |x| > |q| needs no NaN test here: |v| == vmax makes v finite,
 * so x is not NaN (a NaN x gives a NaN v for FP8, v = 0 for 4/6-bit) and q = v * s is not NaN for a finite
 * scale; a NaN scale (4/6-bit tile with a NaN/Inf) makes q NaN, and the caller discards the call. */
/* clean (FP8 kinds only): the run holds no NaN/Inf x, so every x is finite (nonzero test alone) and no q is NaN. */
AVX2 INLINE __m256i fqv_step(const fq_t *c, size_t i, int dt, int kind, int has_g, __m256 dv, __m256 sv, int pos,
                             int mul, int clean, __m256i fmaxv, __m256i *nnz, __m256i *nun, __m256i *nsat,
                             __m256i *aqmax) {
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    __m256 xv = load8(c->sq.x, i, dt);
    __m256 v = kind < 2 ? sqv_round_fp8(mul ? _mm256_mul_ps(xv, dv) : _mm256_div_ps(xv, dv), kind, fmaxv, clean)
                        : sqv_lowbit_value(xv, dv, pos, mul, kind - 2);
    __m256 qv = _mm256_mul_ps(v, sv);
    if (has_g) qv = _mm256_mul_ps(qv, _mm256_set1_ps(c->sq.g));
    _mm256_storeu_ps(c->q + i, qv);
    __m256i ax = _mm256_and_si256(_mm256_castps_si256(xv), abs);
    __m256i aq = _mm256_and_si256(_mm256_castps_si256(qv), abs);
    __m256i av = _mm256_and_si256(_mm256_castps_si256(v), abs);
    __m256i st = _mm256_and_si256(_mm256_cmpeq_epi32(av, fmaxv), _mm256_cmpgt_epi32(ax, aq));
    __m256i z = _mm256_cmpeq_epi32(ax, _mm256_setzero_si256());
    __m256i nz = clean ? _mm256_xor_si256(z, _mm256_set1_epi32(-1)) : _mm256_andnot_si256(z, _mm256_cmpgt_epi32(inf, ax));
    *nnz = _mm256_sub_epi32(*nnz, nz);
    *nun = _mm256_sub_epi32(*nun, _mm256_and_si256(nz, _mm256_cmpeq_epi32(aq, _mm256_setzero_si256())));
    *nsat = _mm256_sub_epi32(*nsat, st);
    if (!clean) *aqmax = _mm256_max_epi32(*aqmax, aq); /* > Inf bits iff some q is NaN */
    return st;
}

/* fq_run 32 and 8 lanes at a time (fq_run's values: the element value from sqv_round_fp8 for the FP8 kinds,
 * sqv_lowbit_value for the 4/6-bit ones; vmax = the format's fmax); the tail runs fq_run itself. */
AVX2 INLINE int fqv_run_m(const fq_t *c, size_t lo, size_t hi, int dt, int kind, int has_g, float s, float d, float r,
                          int pos, int mul, int clean, int64_t *slot) {
    const __m256 dv = _mm256_set1_ps(mul ? r : d), sv = _mm256_set1_ps(s);
    const __m256i fmaxv = _mm256_set1_epi32((int32_t)c->vmax_bits), one = _mm256_set1_epi32(1);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i nnz = _mm256_setzero_si256(), nun = nnz, nsat = nnz, aqmax = nnz;
    size_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        pf_step(c->sq.pf);
        __m256i s0 = fqv_step(c, i, dt, kind, has_g, dv, sv, pos, mul, clean, fmaxv, &nnz, &nun, &nsat, &aqmax);
        __m256i s1 = fqv_step(c, i + 8, dt, kind, has_g, dv, sv, pos, mul, clean, fmaxv, &nnz, &nun, &nsat, &aqmax);
        __m256i s2 = fqv_step(c, i + 16, dt, kind, has_g, dv, sv, pos, mul, clean, fmaxv, &nnz, &nun, &nsat, &aqmax);
        __m256i s3 = fqv_step(c, i + 24, dt, kind, has_g, dv, sv, pos, mul, clean, fmaxv, &nnz, &nun, &nsat, &aqmax);
        /* -1/0 masks: signed packs keep them -1/0 bytes, the permute undoes the lane interleave */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(s0, s1), _mm256_packs_epi32(s2, s3));
        p = _mm256_and_si256(_mm256_permutevar8x32_epi32(p, order), _mm256_set1_epi8(1));
        _mm256_storeu_si256((__m256i *)(c->sat + i), p);
    }
    for (; i + 8 <= hi; i += 8)
        sqv_store8_u8(c->sat + i, _mm256_and_si256(fqv_step(c, i, dt, kind, has_g, dv, sv, pos, mul, clean, fmaxv, &nnz, &nun, &nsat,
                                                            &aqmax), one));
    fqv_add_lane_counts(c, slot, nnz, nun, nsat);
    int bad = hmax8(aqmax) > 0x7f800000;
    return bad | fq_run(c, i, hi, dt, kind, has_g, s, d, slot, clean);
}

AVX2 INLINE int fqv_run(const fq_t *c, size_t lo, size_t hi, int dt, int kind, int has_g, float s, float d,
                        int64_t *slot, int clean) {
    if (kind >= 2 && !(d > 0.0f)) return fqv_run_m(c, lo, hi, dt, kind, has_g, s, d, 0.0f, 0, 0, 0, slot);
    float r = exact_recip(d);
    if (kind < 2 && clean)
        return r != 0.0f ? fqv_run_m(c, lo, hi, dt, kind, has_g, s, d, r, 1, 1, 1, slot)
                         : fqv_run_m(c, lo, hi, dt, kind, has_g, s, d, r, 1, 0, 1, slot);
    return r != 0.0f ? fqv_run_m(c, lo, hi, dt, kind, has_g, s, d, r, 1, 1, 0, slot)
                     : fqv_run_m(c, lo, hi, dt, kind, has_g, s, d, r, 1, 0, 0, slot);
}

FQ_BODY(fqv_body, fqv_run, AVX2)

/* Lane t = the sum of the 8 lanes of m[t] (int32 lanes, no overflow: counts of at most a tile). */
AVX2 INLINE __m256i sqv_hsum8x8(const __m256i *m) {
    __m256i a0 = _mm256_hadd_epi32(m[0], m[1]), a1 = _mm256_hadd_epi32(m[2], m[3]);
    __m256i a2 = _mm256_hadd_epi32(m[4], m[5]), a3 = _mm256_hadd_epi32(m[6], m[7]);
    __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3); /* per half: [m0, m1, m2, m3] */
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

/* slot[0..n) += the first n int32 lanes of v (int64 slots). */
AVX2 INLINE void fqv_add_counts(int64_t *slot, __m256i v, size_t n) {
    if (n == 8) {
        __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)), hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1));
        _mm256_storeu_si256((__m256i *)slot, _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)slot), lo));
        _mm256_storeu_si256((__m256i *)(slot + 4), _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(slot + 4)), hi));
        return;
    }
    int32_t lane[8];
    _mm256_storeu_si256((__m256i *)lane, v);
    for (size_t j = 0; j < n; j++) slot[j] += lane[j];
}

/* The fused element pass over narrow tiles (sqv_narrow: bc 8..64, whole tiles; MX 1x32, NVFP4 1x16, small
 * blocks): one call of fqv_run per tile spent about as much on the call and its per-tile count reduction as on the
 * tile's elements. Where a row's tiles are all clean (no NaN/Inf: nonfin 0) and their divisors all +2^k
 * (sqv_pow2_scales: x times the reciprocal from the divisor's bits, sqv_recip_pow2) or all > 0 (x divided by
 * the tile's divisor), the tiles run 8 lanes at a time through fqv_step with the tile's divisor and scale (its
 * clean case: the same operations per lane as fqv_run's), each tile's three count vectors kept aside and summed
 * 8 tiles at a time (sqv_hsum8x8). Counts are integer sums: the same in any order. Other rows and short last tiles
 * go tile by tile (fqv_run, as fqv_body). */
AVX2 INLINE void fqv_narrow_tiles(const fq_t *c, size_t r, size_t t0, size_t nfull, const float *st, const float *dd,
                                  int dt, int kind, int has_g, int mul, int64_t *slots) {
    const sq_t *sq = &c->sq;
    const size_t bc = sq->bc;
    const __m256i fmaxv = _mm256_set1_epi32((int32_t)c->vmax_bits), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i one = _mm256_set1_epi32(1);
    for (size_t done = 0; done < nfull; done += 8) {
        const size_t n = nfull - done < 8 ? nfull - done : 8;
        __m256i acc[3][8];
        for (size_t j = 0; j < n; j++) {
            const size_t t = done + j, lo = r * sq->C + (t0 + t) * bc;
            const __m256 dv = sqv_tile_div(dd, t, mul), sv = _mm256_set1_ps(st[t]);
            __m256i nnz = _mm256_setzero_si256(), nun = nnz, nsat = nnz, aqmax = nnz;
            if (bc >= 32) {
                for (size_t i = lo; i < lo + bc; i += 32) {
                    pf_step(sq->pf);
                    __m256i s0 = fqv_step(c, i, dt, kind, has_g, dv, sv, 1, mul, 1, fmaxv, &nnz, &nun, &nsat, &aqmax);
                    __m256i s1 = fqv_step(c, i + 8, dt, kind, has_g, dv, sv, 1, mul, 1, fmaxv, &nnz, &nun, &nsat, &aqmax);
                    __m256i s2 = fqv_step(c, i + 16, dt, kind, has_g, dv, sv, 1, mul, 1, fmaxv, &nnz, &nun, &nsat, &aqmax);
                    __m256i s3 = fqv_step(c, i + 24, dt, kind, has_g, dv, sv, 1, mul, 1, fmaxv, &nnz, &nun, &nsat, &aqmax);
                    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(s0, s1), _mm256_packs_epi32(s2, s3));
                    p = _mm256_and_si256(_mm256_permutevar8x32_epi32(p, order), _mm256_set1_epi8(1));
                    _mm256_storeu_si256((__m256i *)(c->sat + i), p);
                }
            } else {
                if (((lo - r * sq->C) & 31) == 0) pf_step(sq->pf);
                for (size_t i = lo; i < lo + bc; i += 8)
                    sqv_store8_u8(c->sat + i, _mm256_and_si256(fqv_step(c, i, dt, kind, has_g, dv, sv, 1, mul, 1, fmaxv,
                                                                        &nnz, &nun, &nsat, &aqmax), one));
            }
            acc[0][j] = nnz; acc[1][j] = nun; acc[2][j] = nsat;
        }
        for (size_t j = n; j < 8; j++) acc[0][j] = acc[1][j] = acc[2][j] = _mm256_setzero_si256();
        for (int k = 0; k < 3; k++) fqv_add_counts(slots + k * c->ncnt + t0 + done, sqv_hsum8x8(acc[k]), n);
    }
}

AVX2 INLINE void fqv_narrow_t(const fq_t *c, size_t u, int dt, int kind, int has_g) {
    const sq_t *sq = &c->sq;
    sq_unit_t w = sq_unit(sq, u);
    if (w.c0 >= w.c1) return;
    const size_t bc = sq->bc, t0 = w.c0 / bc, t1 = (w.c1 - 1) / bc, nfull = (w.c1 - w.c0) / bc;
    int64_t *slots = c->cnt + w.ru * sq->nbc;
    const uint8_t *nf = sq->nonfin + w.ru * sq->nbc;
    int bad = 0;
    fq_t rc = *c; /* x as the runs of each row index it (sq_x) */
    for (size_t r = w.r0; r < w.r1; r++) {
        const float *st = sq->scale + (r / sq->br) * sq->nbc + t0;
        const float *dd = sq->lowbit ? sq->div + (r / sq->br) * sq->nbc + t0 : st;
        rc.sq.x = sq_x(sq, r);
        if (sq->grow) rc.sq.g = sq->grow[r]; /* per-row NVFP4 tensor scales (1 x bc tiles) */
        size_t clean = 0;
        while (clean < nfull && !nf[t0 + clean]) clean++;
        size_t done = 0;
        if (clean == nfull) {
            if (sqv_pow2_scales(dd, nfull)) {
                fqv_narrow_tiles(&rc, r, t0, nfull, st, dd, dt, kind, has_g, 1, slots);
                done = nfull;
            } else if (sqv_positive(dd, nfull)) {
                fqv_narrow_tiles(&rc, r, t0, nfull, st, dd, dt, kind, has_g, 0, slots);
                done = nfull;
            }
        }
        /* the rest tile by tile: rows that did not qualify, a short last tile */
        for (size_t t = t0 + done; t <= t1; t++) {
            const size_t lo = r * sq->C + t * bc, hi = r * sq->C + ((t + 1) * bc < w.c1 ? (t + 1) * bc : w.c1);
            bad |= fqv_run(&rc, lo, hi, dt, kind, has_g, st[t - t0], dd[t - t0], slots + t, sq->track && !nf[t]);
        }
    }
    if (bad) __atomic_store_n(c->bad, 1, __ATOMIC_RELAXED);
}

/* Out of line, one copy per dtype and kind (see sqv_quant_tiles_unit). */
AVX2 NOINLINE static void fqv_narrow(const fq_t *c, size_t u, int sel) {
    switch (sel) { FQ_CASES(fqv_narrow_t, DT_F32) FQ_CASES(fqv_narrow_t, DT_F16) FQ_CASES(fqv_narrow_t, DT_BF16)
                   default: break; }
}

AVX2 INLINE void fqv_body_n(const fq_t *c, size_t u, int dt, int kind, int has_g) {
    if (sqv_narrow(&c->sq)) fqv_narrow(c, u, dt * 6 + (has_g ? 5 : kind));
    else fqv_body(c, u, dt, kind, has_g);
}
FQ_DISPATCH(fq_avx2, fqv_body_n, AVX2, _mm256_zeroupper();)
#endif

/* Transposed copy for the scaled casts' inputs: the replay hands them many transposed views (G^T and A^T of
 * wgrad), which the C casts read in C order; torch's x.contiguous() of a 256x576 float32 transpose took
 * 0.15 ms, 4x the copy of the same bytes. dst [cols, rows] = transpose(src [rows, cols]), both contiguous, elements
 * of 2 or 4 bytes moved as bits (no value changes). Work units: strips of destination rows (source
 * columns), 8x8 blocks inside (AVX2 register transposes for 4-byte elements). */
typedef struct { const void *src; void *dst; size_t rows, cols, esz, strip; } tc_t;

INLINE void tc_block(const tc_t *c, size_t i0, size_t i1, size_t j0, size_t j1) {
    if (c->esz == 4) {
        const uint32_t *s = (const uint32_t *)c->src;
        uint32_t *d = (uint32_t *)c->dst;
        for (size_t j = j0; j < j1; j++)
            for (size_t i = i0; i < i1; i++) d[j * c->rows + i] = s[i * c->cols + j];
    } else {
        const uint16_t *s = (const uint16_t *)c->src;
        uint16_t *d = (uint16_t *)c->dst;
        for (size_t j = j0; j < j1; j++)
            for (size_t i = i0; i < i1; i++) d[j * c->rows + i] = s[i * c->cols + j];
    }
}

static void tc_scalar(const tc_t *c, size_t u) {
    size_t j0 = u * c->strip, j1 = j0 + c->strip < c->cols ? j0 + c->strip : c->cols;
    for (size_t i0 = 0; i0 < c->rows; i0 += 8)
        for (size_t j = j0; j < j1; j += 8)
            tc_block(c, i0, i0 + 8 < c->rows ? i0 + 8 : c->rows, j, j + 8 < j1 ? j + 8 : j1);
}

#if FP_X86
AVX2 static void tc_avx2(const tc_t *c, size_t u) {
    if (c->esz != 4) { tc_scalar(c, u); return; } /* baseline code: no dirty upper halves yet */
    size_t j0 = u * c->strip, j1 = j0 + c->strip < c->cols ? j0 + c->strip : c->cols;
    const float *s = (const float *)c->src;
    float *d = (float *)c->dst;
    size_t i0 = 0;
    for (; i0 + 8 <= c->rows; i0 += 8) {
        size_t j = j0;
        for (; j + 8 <= j1; j += 8) tr8x8_ps(s + i0 * c->cols + j, c->cols, d + j * c->rows + i0, c->rows);
        tc_block(c, i0, i0 + 8, j, j1);
    }
    tc_block(c, i0, c->rows, j0, j1);
    _mm256_zeroupper();
}
#endif

SIMD_WORK(tc_work, const tc_t, tc_avx2, tc_scalar)

static PyObject *py_transpose_copy(PyObject *self, PyObject *args) {
    unsigned long long sp, dp;
    Py_ssize_t rows, cols, esz;
    int want;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnni", &sp, &dp, &rows, &cols, &esz, &want)) return NULL;
    if (rows <= 0 || cols <= 0 || (esz != 2 && esz != 4)) {
        PyErr_Format(PyExc_ValueError, "transpose_copy: bad sizes (rows=%zd, cols=%zd, element bytes=%zd)", rows, cols,
                     esz);
        return NULL;
    }
    tc_t c = {(const void *)(uintptr_t)sp, (void *)(uintptr_t)dp, (size_t)rows, (size_t)cols, (size_t)esz, 0};
    size_t strip = UNIT / c.rows; /* about UNIT elements a unit, a multiple of 8 columns */
    c.strip = strip < 8 ? 8 : strip & ~(size_t)7;
    int nt = pick_threads(c.rows * c.cols, want);
    Py_BEGIN_ALLOW_THREADS
    run_units(tc_work, &c, (c.cols + c.strip - 1) / c.strip, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}


/* ---------------------------------------------------------------- random Hadamard transform (reference.hadamard_transform)
 * out [B, R, Cp] float32 (Cp = ceil(C / n) n) from x [B, R, C] (xt: each slice stored transposed, [B, C, R]: the
 * wgrad operands G^T and A^T read in place): every run of n elements (x zero-padded) times the signs s, log2 n
 * butterfly stages (h = 1, 2, .., n / 2) of a + b and a - b of elements h apart, then times 1 / sqrt(n) (exact, n a
 * power of four): the reference's float32 operations in its order, the same bits. NaN: torch's a + b and a - b
 * (a + alpha b: fmadd(b, alpha, a)) return b's NaN (quieted) where b is one, else a's; ht_add/ht_sub take b's
 * explicitly, so the result does not depend on the operand order the compiler picks; x * s and the final
 * product keep x's NaN (quieted) whatever the order (s is never NaN). AVX2 (n = 16): 8 rows at a time in column
 * form (vector i = element i of the 8 rows' runs: loaded as is from a transposed x, through two 8x8 transposes
 * from a row-major one), the stages vector against vector, two transposes back; padded runs and the last < 8 rows
 * of a slice run one at a time (ht_run). */
#define HT_NMAX ((size_t)256)
#define HT_T_ROWS ((size_t)64)
typedef struct {
    const void *x; float *out; const float *signs; float scale;
    int dt, xt; size_t B, R, C, Cp, n, rpu, ups; /* rows per unit (a multiple of 8), units per slice */
} ht_t;

INLINE float ht_quiet(float b) { return u2f(f2u(b) | 0x00400000u); }
INLINE float ht_add(float a, float b) { return isnan(b) ? ht_quiet(b) : a + b; }
INLINE float ht_sub(float a, float b) { return isnan(b) ? ht_quiet(b) : a - b; }

/* The flat index of element (b, r, col) of x. */
INLINE size_t ht_at(const ht_t *c, size_t b, size_t r, size_t col) {
    return b * c->R * c->C + (c->xt ? col * c->R + r : r * c->C + col);
}

/* The run of row r of slice b starting at column c0. */
INLINE void ht_run(const ht_t *c, size_t b, size_t r, size_t c0) {
    float v[HT_NMAX];
    const size_t n = c->n;
    for (size_t i = 0; i < n; i++) {
        const float xv = c0 + i < c->C ? load1_nb(c->x, ht_at(c, b, r, c0 + i), c->dt) : 0.0f;
        v[i] = xv * c->signs[i];
    }
    for (size_t h = 1; h < n; h *= 2)
        for (size_t j = 0; j < n; j += 2 * h)
            for (size_t k = j; k < j + h; k++) {
                const float a = v[k], bb = v[k + h];
                v[k] = ht_add(a, bb);
                v[k + h] = ht_sub(a, bb);
            }
    float *o = c->out + (b * c->R + r) * c->Cp + c0;
    for (size_t i = 0; i < n; i++) o[i] = v[i] * c->scale;
}

static void ht_scalar(const ht_t *c, size_t u) {
    const size_t b = u / c->ups, r0 = (u % c->ups) * c->rpu, r1 = r0 + c->rpu < c->R ? r0 + c->rpu : c->R;
    for (size_t r = r0; r < r1; r++)
        for (size_t c0 = 0; c0 < c->C; c0 += c->n) ht_run(c, b, r, c0);
}

#if FP_X86
/* y, or b quieted in the lanes where b is NaN (ht_add / ht_sub: torch's a ± b returns b's NaN) */
AVX2 INLINE __m256 htv_nan_of_b(__m256 y, __m256 b) {
    return _mm256_blendv_ps(y, _mm256_or_ps(b, _mm256_castsi256_ps(_mm256_set1_epi32(0x00400000))),
                            _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
}
AVX2 INLINE __m256 htv_add(__m256 a, __m256 b) { return htv_nan_of_b(_mm256_add_ps(a, b), b); }
AVX2 INLINE __m256 htv_sub(__m256 a, __m256 b) { return htv_nan_of_b(_mm256_sub_ps(a, b), b); }

/* Rows r..r+7 of slice b, the 16-element runs at c0 (whole, inside the row). */
AVX2 INLINE void htv_block(const ht_t *c, size_t b, size_t r, size_t c0) {
    float tmp[128], rowbuf[128];
    __m256 v[16];
    if (c->xt) {
        for (int i = 0; i < 16; i++) v[i] = load8(c->x, ht_at(c, b, r, c0 + (size_t)i), c->dt);
    } else {
        const size_t at = ht_at(c, b, r, c0);
        if (c->dt == DT_F32) {
            tr8x8_ps((const float *)c->x + at, c->C, tmp, 8);
            tr8x8_ps((const float *)c->x + at + 8, c->C, tmp + 64, 8);
        } else {
            for (size_t k = 0; k < 8; k++) {
                _mm256_storeu_ps(rowbuf + 16 * k, load8(c->x, at + k * c->C, c->dt));
                _mm256_storeu_ps(rowbuf + 16 * k + 8, load8(c->x, at + k * c->C + 8, c->dt));
            }
            tr8x8_ps(rowbuf, 16, tmp, 8);
            tr8x8_ps(rowbuf + 8, 16, tmp + 64, 8);
        }
        for (int i = 0; i < 16; i++) v[i] = _mm256_loadu_ps(tmp + 8 * i);
    }
    for (int i = 0; i < 16; i++) v[i] = _mm256_mul_ps(v[i], _mm256_set1_ps(c->signs[i]));
    for (int h = 1; h < 16; h *= 2)
        for (int j = 0; j < 16; j += 2 * h)
            for (int k = j; k < j + h; k++) {
                const __m256 a = v[k], bb = v[k + h];
                v[k] = htv_add(a, bb);
                v[k + h] = htv_sub(a, bb);
            }
    const __m256 sc = _mm256_set1_ps(c->scale);
    for (int i = 0; i < 16; i++) _mm256_storeu_ps(tmp + 8 * i, _mm256_mul_ps(v[i], sc));
    float *o = c->out + (b * c->R + r) * c->Cp + c0;
    tr8x8_ps(tmp, 8, o, c->Cp);
    tr8x8_ps(tmp + 64, 8, o + 8, c->Cp);
}

AVX2 static void ht_avx2(const ht_t *c, size_t u) {
    const size_t b = u / c->ups, r0 = (u % c->ups) * c->rpu, r1 = r0 + c->rpu < c->R ? r0 + c->rpu : c->R;
    size_t r = r0;
    if (c->n == 16 && c->xt) { /* runs outer: each of the 16 source rows read as rpu contiguous elements */
        const size_t r8 = r0 + (r1 - r0) / 8 * 8;
        size_t c0 = 0;
        for (; c0 + 16 <= c->C; c0 += 16)
            for (r = r0; r < r8; r += 8) htv_block(c, b, r, c0);
        for (r = r0; r < r8 && c0 < c->C; r++) ht_run(c, b, r, c0);
        r = r8;
    } else if (c->n == 16) {
        for (; r + 8 <= r1; r += 8) {
            size_t c0 = 0;
            for (; c0 + 16 <= c->C; c0 += 16) htv_block(c, b, r, c0);
            for (size_t k = 0; k < 8 && c0 < c->C; k++) ht_run(c, b, r + k, c0);
        }
    }
    for (; r < r1; r++)
        for (size_t c0 = 0; c0 < c->C; c0 += c->n) ht_run(c, b, r, c0);
    _mm256_zeroupper();
}
#endif

SIMD_WORK(ht_work, const ht_t, ht_avx2, ht_scalar)

static PyObject *py_hadamard(PyObject *self, PyObject *args) {
    unsigned long long xp, sp, op;
    Py_ssize_t B, R, C, n;
    int dt, xt, want;
    float scale;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinnnnKfKpi", &xp, &dt, &B, &R, &C, &n, &sp, &scale, &op, &xt, &want)) return NULL;
    if (B <= 0 || R <= 0 || C <= 0 || n <= 0 || (size_t)n > HT_NMAX || (n & (n - 1)) || dt < DT_F32 || dt > DT_BF16) {
        PyErr_Format(PyExc_ValueError, "hadamard: bad arguments (B=%zd, R=%zd, C=%zd, n=%zd, dtype=%d)", B, R, C, n,
                     dt);
        return NULL;
    }
    ht_t c;
    memset(&c, 0, sizeof c);
    c.x = (const void *)(uintptr_t)xp; c.out = (float *)(uintptr_t)op; c.signs = (const float *)(uintptr_t)sp;
    c.scale = scale; c.dt = dt; c.xt = xt;
    c.B = (size_t)B; c.R = (size_t)R; c.C = (size_t)C; c.n = (size_t)n;
    c.Cp = (c.C + c.n - 1) / c.n * c.n;
    size_t rpu = UNIT / c.Cp;
    c.rpu = rpu < 8 ? 8 : rpu & ~(size_t)7;
    if (c.xt && c.rpu < HT_T_ROWS) c.rpu = HT_T_ROWS; /* transposed: runs of 64 rows from each source row */
    c.ups = (c.R + c.rpu - 1) / c.rpu;
    int nt = pick_threads(c.B * c.R * c.Cp, want);
    Py_BEGIN_ALLOW_THREADS
    run_units(ht_work, &c, c.B * c.ups, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- block-scale statistics (block_scales._batch_stats)
 * One pass over a batch of block records (scale float32, zero_block bool, nonzero/underflow int64, clipped bool):
 * the counts, extremes and exponent histogram of BlockScaleStats, and Σlog2 s, Σ(log2 s)² over the "good" blocks
 * (not a zero block, scale not NaN and not 0), each a float64 sum from 0.0 in index order. log2 is libm's; floor(log2 s) is frexp's exponent - 1 (exact; ±Inf: frexp gives 0, as torch). */
#define BS_ELO (-160)
#define BS_EHI 140
static PyObject *py_block_stats(PyObject *self, PyObject *args) {
    unsigned long long sp, zp, np_, up, cp;
    Py_ssize_t n;
    double sum1 = 0.0, sum2 = 0.0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKn", &sp, &zp, &np_, &up, &cp, &n)) return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "block_stats: expected n >= 0, got %zd", n);
        return NULL;
    }
    const float *scale = (const float *)(uintptr_t)sp;
    const uint8_t *zero = (const uint8_t *)(uintptr_t)zp, *clip = (const uint8_t *)(uintptr_t)cp;
    const int64_t *nz = (const int64_t *)(uintptr_t)np_, *un = (const int64_t *)(uintptr_t)up;
    long long n_zero = 0, n_nan = 0, n_zscale = 0, n_clip = 0, n_ublocks = 0, n_nonzero = 0, n_under = 0, n_good = 0;
    double max_frac = 0.0, smin = INFINITY, smax = -INFINITY;
    long long hist[BS_EHI - BS_ELO + 1];
    memset(hist, 0, sizeof hist);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        double s = (double)scale[i];
        int isnan_ = s != s, zb = zero[i] != 0;
        n_zero += zb && !isnan_;
        n_nan += isnan_;
        n_clip += clip[i] != 0;
        n_ublocks += un[i] > 0;
        n_nonzero += nz[i];
        n_under += un[i];
        if (nz[i] > 0) {
            double f = (double)un[i] / (double)nz[i];
            if (f > max_frac) max_frac = f;
        }
        if (zb || isnan_) continue;
        if (s == 0.0) { n_zscale++; continue; }
        n_good++;
        if (s < smin) smin = s;
        if (s > smax) smax = s;
        double lg = log2(s);
        sum1 += lg;
        sum2 += lg * lg;
        int e = 0;
        if (isfinite(s)) frexp(s, &e);
        e -= 1;
        hist[(e < BS_ELO ? BS_ELO : e > BS_EHI ? BS_EHI : e) - BS_ELO]++;
    }
    Py_END_ALLOW_THREADS
    int lo = 0, hi = -1;
    for (int k = 0; k <= BS_EHI - BS_ELO; k++)
        if (hist[k]) { if (hi < lo) lo = k; hi = k; }
    PyObject *counts = PyList_New(hi >= lo ? hi - lo + 1 : 0);
    if (!counts) return NULL;
    for (int k = lo; k <= hi; k++) PyList_SET_ITEM(counts, k - lo, PyLong_FromLongLong(hist[k]));
    return Py_BuildValue("(LLLLLLLLdddddiN)", n_zero, n_nan, n_zscale, n_clip, n_ublocks, n_nonzero, n_under, n_good,
                         max_frac, smin, smax, sum1, sum2, lo + BS_ELO, counts);
}

/* ================================================================== scaled casts: memory order
 * Part "scaled casts at copy bandwidth" (issue 15, second round): the order in which the scaled casts
 * (quantize_scaled, fused_scaled) read x. It changes no value: every unit writes only its own outputs,
 * scales and partial slots, and the tile amax is a max (any order).
 *
 * Local mode (sq_local: units of whole tiles) reads each unit's input twice in a row, the amax pass from
 * memory, then the element pass from L2. Single-threaded at 16M float32 the amax pass from memory took a
 * third of the time (9.2 ms against 6.3 ms with x in cache), the core waiting on memory, then computing with
 * the memory idle. sq_run_ahead overlaps the two: each thread claims its next unit before it runs the current
 * one, and the current one's element loops prefetch the next one's input (pf_step, 128 bytes a 32-element
 * step), so that the next amax pass reads from L2.
 *
 * Two-pass mode (per-tensor scales; NVFP4 without a given tensor scale) reads all of x for the amax, then
 * again for the elements, in unit order. Running the element pass last unit first (the end of x, read last,
 * still in the 32 MiB L3) measured no different (per-tensor 16M float32: 9.02 against 8.90 ms CPU, within the
 * noise), so it was left out. */
/* The input of unit v under the cursor: its rows' column segments (one segment where they are whole rows);
 * nothing when v is past the last unit. */
static void pf_unit(pf_t *pf, const sq_t *c, size_t v) {
    memset(pf, 0, sizeof *pf);
    if (v >= c->units) return;
    sq_unit_t w = sq_unit(c, v);
    if (w.c0 >= w.c1) return;
    const size_t es = c->dt == DT_F32 ? 4 : 2;
    const char *x = (const char *)c->x;
    if (w.c0 == 0 && w.c1 == c->C) {
        pf->p = x + w.r0 * c->C * es;
        pf->end = x + w.r1 * c->C * es;
        return;
    }
    pf->seg = (w.c1 - w.c0) * es;
    pf->stride = c->C * es;
    pf->rows_left = w.r1 - w.r0 - 1;
    pf->p = x + (w.r0 * c->C + w.c0) * es;
    pf->end = pf->p + pf->seg;
}

/* ctx: the sq_t of quantize_scaled, or the fq_job_t of fused_scaled (fused). */
typedef struct { const void *ctx; int fused; size_t nunits, next; } ahead_t;

static size_t ahead_claim(ahead_t *a) { return __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED); }

/* One thread of sq_run_ahead: its own copy of the context (sharing every output array) holding its cursor. */
static void *ahead_main(void *arg) {
    ahead_t *a = (ahead_t *)arg;
    pf_t pf;
    if (a->fused) {
        const fq_job_t *job = (const fq_job_t *)a->ctx;
        fq_t c = *job->c;
        c.sq.pf = &pf;
        fq_job_t j = {&c, job->sel};
        for (size_t u = ahead_claim(a), v; u < a->nunits; u = v) {
            v = ahead_claim(a);
            pf_unit(&pf, &c.sq, v);
            fq_local_work(&j, u);
        }
    } else {
        sq_t c = *(const sq_t *)a->ctx;
        c.pf = &pf;
        for (size_t u = ahead_claim(a), v; u < a->nunits; u = v) {
            v = ahead_claim(a);
            pf_unit(&pf, &c, v);
            sq_local_work(&c, u);
        }
    }
    return NULL;
}

static void sq_run_ahead(const void *ctx, int fused, size_t nunits, int nt) {
    ahead_t a = {ctx, fused, nunits, 0};
    run_threads(ahead_main, &a, nunits, nt);
}

/* ================================================================== scaled casts: transposed inputs
 * The replay quantises G^T and A^T (wgrad) and W^T (dgrad) along their contraction dimension: transposed
 * views, x.mT contiguous. Copying x first cost a second x-sized tensor (108 MiB at a 49152x576 LM head) and
 * a pass over memory. Instead the units read x in bands: a band is bh consecutive row pieces of one column
 * piece (about SQ_T_ROWS rows x at most SQ_T_COLS columns, ~64K elements), gathered into a per-band buffer
 * by tv_transpose (each storage row, a column of x, read as one run of the band's rows), and the unit
 * functions run on it unchanged, reading x through sq_x. It changes no value: the units and their outputs
 * are the same as on a contiguous x, only the order in which they run differs (scales and counts of a
 * unit's own tiles; the amax a max). sq_init makes units of a transposed x at most SQ_T_COLS columns wide,
 * so a band holds ~SQ_T_ROWS rows: 1x128 tiles on a 576x49152 view, units of 1 x 1024, bands of 64 x 1024. */
typedef struct { const void *ctx; int fused, mode; int *nomem; } band_job_t;

static void band_work(void *vj, size_t b) {
    const band_job_t *j = (const band_job_t *)vj;
    const fq_job_t *fj = j->fused ? (const fq_job_t *)j->ctx : NULL;
    const sq_t *c0 = fj ? &fj->c->sq : (const sq_t *)j->ctx;
    const size_t nrp = c0->nbr * c0->sub, cp = b % c0->ncp, h0 = (b / c0->ncp) * c0->bh;
    const size_t h1 = h0 + c0->bh < nrp ? h0 + c0->bh : nrp;
    sq_unit_t first = sq_unit(c0, h0 * c0->ncp + cp), last = sq_unit(c0, (h1 - 1) * c0->ncp + cp);
    if (first.c0 >= first.c1) return; /* an empty piece of a short last tile (its partials stay 0) */
    const size_t es = c0->dt == DT_F32 ? 4 : 2, rows = last.r1 - first.r0, cols = first.c1 - first.c0;
    /* band rows 32 bytes longer than their columns: with a leading dimension of 1024 floats (4 KiB) the 8 rows an
     * 8x8 tile writes would share one L1 set (the usual transpose aliasing; the difference was within the noise
     * of the shared 2-core test machine) */
    const size_t ld = cols + 32 / es;
    char *band = (char *)malloc(rows * ld * es);
    if (!band) { __atomic_store_n(j->nomem, 1, __ATOMIC_RELAXED); return; }
    /* x[r][col] is stored at col * R + r */
    tv_transpose((const char *)c0->x + (first.c0 * c0->R + first.r0) * es, c0->R, band, ld, rows, cols, es);
    fq_t fc;
    sq_t sc;
    sq_t *c = fj ? &fc.sq : &sc;
    if (fj) fc = *fj->c; else sc = *c0;
    c->band = band; c->band_r0 = first.r0; c->band_c0 = first.c0; c->band_ld = ld;
    fq_job_t job = {&fc, fj ? fj->sel : 0};
    for (size_t h = h0; h < h1; h++) {
        size_t u = h * c0->ncp + cp;
        if (j->mode == SQ_BAND_AMAX) sq_phase1(c, u);
        else if (j->mode == SQ_BAND_ELEMENTS) { if (fj) fq_work(&job, u); else sq_phase2(c, u); }
        else if (fj) fq_local_work(&job, u);
        else sq_local_work(c, u);
    }
    free(band);
}

static void sq_run_bands(const void *ctx, int fused, int mode, int nt, int *nomem) {
    const sq_t *c = fused ? &((const fq_job_t *)ctx)->c->sq : (const sq_t *)ctx;
    band_job_t j = {ctx, fused, mode, nomem};
    const size_t nrp = c->nbr * c->sub;
    run_units(band_work, &j, (nrp + c->bh - 1) / c->bh * c->ncp, nt);
}

static PyMethodDef methods[] = {
    {"quantize_blockwise", py_quantize_blockwise, METH_VARARGS,
     "quantize_blockwise(x_ptr, dtype, n, blocksize, q_ptr, absmax_ptr, base_ptr, tval_ptr, m, threads[, packed_ptr]) "
     "-> 0, "
     "or 1 when a block holds NaN/Inf (outputs then incomplete). dtype: 0 fp32, 1 fp16, 2 bf16."},
    {"dequantize_blockwise", py_dequantize_blockwise, METH_VARARGS,
     "dequantize_blockwise(q_ptr, n, blocksize, absmax_ptr, code_ptr, out_ptr, dtype, threads) -> 0, "
     "or 1 (nothing written) when absmax or code holds NaN/Inf."},
    {"int8_vectorwise_quant", py_int8_vectorwise_quant, METH_VARARGS,
     "int8_vectorwise_quant(x_ptr, dtype, rows, cols, threshold, q_ptr, stats_ptr, colmask_ptr, threads): "
     "default-mode LLM.int8() row quantisation; colmask[j] = 1 for outlier columns (threshold > 0), "
     "which the caller zeroes in q."},
    {"quantize_scaled", py_quantize_scaled, METH_VARARGS,
     "quantize_scaled(x_ptr, dtype, R, C, block_rows, block_cols, fmt, data_ptr, scale_ptr, threads[, rule, has_g, g, "
     "transposed, stochastic, key, period_rows, g_rows_ptr]): transposed: x is stored as [C, R] (x.mT contiguous); "
     "stochastic (4/6-bit formats): element (r, c) rounds with the number lowbias32(key + (r mod period_rows) * C + c) "
     ">> 8 * 2^-24 (key = mix32(seed ^ 0x9E3779B9); period_rows 0: R); g_rows_ptr: float32 [R] NVFP4 tensor scales, "
     "one per row (1 x bc tiles), or 0; "
     "fmt 0 e4m3, 1 e5m2, 2 mxfp8-e4m3, 3 mxfp8-e5m2, 4 mxfp6-e2m3, 5 mxfp6-e3m2, 6 mxfp4-e2m1, 7 nvfp4; "
     "rule 0 floor, 1 rceil, 2 even (MX); g: the NVFP4 tensor scale (computed when has_g is 0); "
     "data uint8 [R*C], scale float32 [ceil(R/br), ceil(C/bc)]."},
    {"dequantize_scaled", py_dequantize_scaled, METH_VARARGS,
     "dequantize_scaled(data_ptr, table_ptr, scale_ptr, R, C, block_rows, block_cols, out_ptr, dtype, threads"
     "[, has_g, g]) -> 0, or 1 when an output is NaN (the caller then runs the reference: torch's NaN casts differ)."},
    {"finite_amax", py_finite_amax, METH_VARARGS,
     "finite_amax(x_ptr, dtype, n, threads) -> float: the largest finite |x| (0.0 when none)."},
    {"advise_hugepages", py_advise_hugepages, METH_VARARGS,
     "advise_hugepages(addr, nbytes) -> bool: madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior (Linux)."},
    /* bnb part: fused codebook fake-quantisation */
    {"fake_quantize_blockwise", py_fake_quantize_blockwise, METH_VARARGS,
     "fake_quantize_blockwise(x_ptr, dtype, n, blocksize, out_ptr, absmax_ptr, code_ptr, base_ptr, tval_ptr, m, "
     "threads[, packed_ptr[, counts_ptr]]) -> 0, or 1 when a block holds NaN/Inf (outputs then incomplete): "
     "dequantize_blockwise(quantize_blockwise(x)) in x's dtype; out_ptr 0 writes the absmax only; counts_ptr: "
     "int64 [3, nblocks] per block non-zero x, underflow (y == 0), clipped (|y| >= absmax and |x| > |y|)."},
    {"int8_dequant", py_int8_dequant, METH_VARARGS,
     "int8_dequant(kind, src_ptr, rows, cols, row_ptr, col_ptr, bias_ptr, bias_dtype, k, out_ptr, dtype, threads) "
     "-> 0, or 1 (use the reference) for a non-finite scale/bias or a NaN result. kind 0: int8 q -> float32 "
     "q*row*k; kind 1: int32 C -> ((C*row)*col)*k [+ bias] in dtype; kind 2: the same from float32 C."},
    {"int8_col_quant", py_int8_col_quant, METH_VARARGS,
     "int8_col_quant(x_ptr, dtype, rows, cols, threshold, q_ptr, stats_ptr, threads): the column codes and "
     "stats of int8_double_quant (default mode)."},
    {"simd", py_simd, METH_NOARGS, "The vector ISA in use: 'avx2' or 'scalar'."},
    {"serial_cutoff", py_serial_cutoff, METH_VARARGS,
     "serial_cutoff([n]) -> int: the element count below which a call runs on one thread (the one before; n >= 0 "
     "sets it: tests run the threaded paths on small inputs)."},
    {"set_simd", py_set_simd, METH_VARARGS,
     "set_simd(on) -> bool: use AVX2 when on and the CPU has it (tests compare both paths)."},
    /* metrics reductions (analysis/metrics.py) */
    {"error_sums", py_error_sums, METH_VARARGS,
     "error_sums(ref_ptr, ref_dtype, lp_ptr, lp_dtype, n, threads[, ref_rows, ref_cols, lp_rows, lp_cols]) -> "
     "(sum_ref2, sum_err2, sum_lp2, sum_dot, "
     "max_abs_err, compared, nonfinite, excluded); dtype 0 fp32, 1 fp16, 2 bf16, 3 fp64; sums in the "
     "deterministic block order (see 'metrics reductions'); rows, cols > 0: that operand is a transposed view, "
     "logical [.., rows, cols] stored as [.., cols, rows] (0, 0: contiguous)."},
    {"operand_sums", py_operand_sums, METH_VARARGS,
     "operand_sums(x_ptr, x_dtype, q_ptr, q_dtype, sat_ptr_or_0, n, threads[, x_rows, x_cols, q_rows, q_cols, "
     "sat_rows, sat_cols]) -> (sum_x2, sum_err2, finite, nonzero, underflow, saturated, excluded, nonfinite); "
     "sat 0: saturated = |x| > max|q| over the finite pairs; layouts as error_sums."},
    {"tensor_stats", py_tensor_stats, METH_VARARGS,
     "tensor_stats(x_ptr, dtype, n, cols, seg, tiny, lim0, lim1, lim2, hist_lo, nbins, hist_ptr, segmax_ptr, "
     "threads[, transposed]) -> dict; hist int64 [nbins] and segmax float64 [n / cols * ceil(cols / seg)] (zeroed) "
     "written; transposed: x is stored as [cols, n / cols]."},
    {"outlier_census", py_outlier_census, METH_VARARGS,
     "outlier_census(x_ptr, dtype, rows, cols, threshold, amax_ptr, hits_ptr, threads) -> rows touched; writes "
     "amax float64 [cols] (max |x|, NaN as 0) and hits int64 [cols] (rows with |x| >= threshold)."},
    /* fused scaled fake-quantisation */
    {"fused_scaled", py_fused_scaled, METH_VARARGS,
     "fused_scaled(x_ptr, dtype, R, C, block_rows, block_cols, fmt, q_ptr, sat_ptr, scale_ptr, counts_ptr, "
     "threads, rule[, transposed, stochastic, key, period_rows, g_rows_ptr, scale, multiplier]) -> (g, bad, amax): q float32 [R*C] = dequantize_scaled(quantize_scaled(x)), sat uint8 "
     "[R*C], scale float32 [ceil(R/br)*ceil(C/bc)], counts int64 [3][tiles] (finite nonzero, underflow, "
     "saturated); fmt/rule, the stochastic arguments and g_rows (nvfp4, 1 x bc tiles) as quantize_scaled; g: the "
     "NVFP4 tensor scale "
     "(1.0 otherwise); bad 1 when some q is NaN (q then unreliable); amax: x's largest finite |x|. e4m3/e5m2 only: "
     "scale > 0 is every tile's scale, else the scales from amax are fl32(fl32(amax / fmax) * multiplier)."},
    /* scaled casts: transposed inputs */
    {"transpose_copy", py_transpose_copy, METH_VARARGS,
     "transpose_copy(src_ptr, dst_ptr, rows, cols, element_bytes, threads): dst [cols, rows] = transpose(src [rows, cols]) "
     "(both contiguous; 2- or 4-byte elements copied as bits)."},
    /* random Hadamard transform */
    {"hadamard", py_hadamard, METH_VARARGS,
     "hadamard(x_ptr, dtype, B, R, C, n, signs_f32_ptr, scale, out_ptr, transposed, threads): out float32 [B, R, "
     "ceil(C/n)*n] = reference.hadamard_transform of x [B, R, C] (transposed: each slice stored [C, R]); n a power of "
     "two <= 256, signs float32 [n], scale 1/sqrt(n)."},
    /* block-scale statistics */
    {"block_stats", py_block_stats, METH_VARARGS,
     "block_stats(scale_f32_ptr, zero_block_ptr, nonzero_i64_ptr, underflow_i64_ptr, clipped_ptr, n): (zero blocks, NaN scales, zero scales, clipped blocks, underflow blocks, nonzero, underflow, "
     "scales, max block underflow fraction (0 if no block has a nonzero), scale min, scale max, sum_log2, sum_log2_sq, exp_lo, "
     "exp counts) of block_scales._batch_stats in one pass, the sums in index order."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "fp8probe._fastpath",
                                    "C CPU kernels for blockwise quantise/dequantise (see fp8probe/backends/cpu.py).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastpath(void) {
#if FP_X86
    __builtin_cpu_init();
    g_have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    return PyModule_Create(&moddef);
}
