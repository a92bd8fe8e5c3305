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
/* Below this many elements one thread does everything: a pthread_create/join pair costs ~20-50 us,
 * about what one core needs for 64K elements. */
#define SERIAL_CUTOFF (1 << 16)

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

static int g_have_avx2 = 0;

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

/* Run fn(ctx, u) for u = 0..nunits-1 on the calling thread and up to nt-1 fresh pthreads (a
 * pthread_create/join pair costs ~20-50 us, so they live for one call). If a thread cannot be
 * created the others take its units. */
static void run_units(unit_fn fn, void *ctx, size_t nunits, int nt) {
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS];
    pool_t p = {fn, ctx, nunits, 0};
    if ((size_t)nt > nunits) nt = (int)nunits;
    for (int t = 1; t < nt; t++) started[t] = pthread_create(&th[t], NULL, pool_main, &p) == 0;
    pool_main(&p);
    for (int t = 1; t < nt; t++)
        if (started[t]) pthread_join(th[t], NULL);
}

static int pick_threads(size_t n, int want) {
    if (want < 1) want = 1;
    if (want > MAX_THREADS) want = MAX_THREADS;
    return n < SERIAL_CUTOFF ? 1 : want;
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

static void q_fused(void *vc, size_t u) {
    qctx_t *c = (qctx_t *)vc;
    size_t b0 = u * c->per_unit, b1 = b0 + c->per_unit < c->nb ? b0 + c->per_unit : c->nb;
    for (size_t b = b0; b < b1 && !c->bad; b++) {
        size_t lo = b * c->bs, hi = lo + c->bs < c->n ? lo + c->bs : c->n;
        uint32_t mb = absmax_bits(c->x, lo, hi, c->dt);
        if (mb >= 0x7f800000u) { c->bad = 1; return; }
        float am = u2f(mb);
        c->absmax[b] = am;
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
    {"advise_hugepages", py_advise_hugepages, METH_VARARGS,
     "advise_hugepages(addr, nbytes) -> bool: madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior (Linux)."},
    {"simd", py_simd, METH_NOARGS, "The vector ISA in use: 'avx2' or 'scalar'."},
    {"set_simd", py_set_simd, METH_VARARGS,
     "set_simd(on) -> bool: use AVX2 when on and the CPU has it (tests compare both paths)."},
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
