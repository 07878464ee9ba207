/* _fp8cast: the CPU FP8 cast of shards.fp8.numerics.quantize as one pass over memory, and the
 * module (its max-abs reductions, for shards.fp8.scale_math.magnitude_max and the observers, are
 * in _fp8maxabs.c; what both use is in _fp8cast.h).
 *
 * codes = fp8(clamp(widen(x) / s, +-fullscale)), where s is one fp32 scale for the whole tensor or
 * one per row, the division is fp32 (x * (1/s) where s is a power of two: the same bits, cheaper),
 * and fp8() rounds to nearest even onto the e4m3fn or e5m2 grid (subnormals included).
 * Bit-identical to torch's path (fp32 widen, fp32 multiply/divide, clamp, c10's fp32->float8
 * conversion) for every input, NaN and -0.0 codes included.
 *
 * torch's CPU fp32->float8 conversion is scalar code (~1 ns/element); here every step is
 * branch-free integer/float arithmetic with fixed shifts, which gcc -O3 vectorizes. The loops are
 * compiled twice: for the baseline ISA (SSE2 on x86-64; no -march flags, clusters mix CPUs) and,
 * on x86 with gcc/clang, with AVX2 (8 lanes, integer min/max), picked at run time. Plain C (with
 * AVX2 intrinsics where gcc's vectorization fell short) and the CPython API only: tensors arrive
 * as (data_ptr, rows, cols) from Python, which checks dtypes, devices and contiguity
 * (shards/fp8/native_cast.py).
 *
 * bf16/fp16 rows with a power-of-two scale (maxabs_pow2, Gaudi's hardware scales: most weights)
 * take a 16-bit-lane path (below), measured at about 2x the fp32 route's speed with the SSE2 loops
 * and 4x with AVX2, that falls back to the fp32 route block by block, so its codes are the same.
 */
#include "_fp8cast.h"

/* The FP8 code of y. Non-negative floats order like their bit patterns, so the clamp and the
 * exponent floor below are integer min/max on |y|'s bits. The FP8 step at |y| is 2**(e - p), e =
 * max(exponent of |y|, smallest normal exponent), p = mantissa bits; adding big = 2**(e + 23 - p),
 * whose fp32 ulp is that step, makes the FPU round to nearest even (the default rounding mode,
 * which torch's own multiply and divide assume too), and q = bits(|y| + big) - bits(big) counts
 * whole steps. The code is q plus the exponent's offset: one formula for normals, subnormals and a
 * carry into the next binade. Selects are masks or min/max, never a ?: around a
 * float op: gcc turns those into branches, and a (trapping) float op in a branch is not vectorized. */
static inline __attribute__((always_inline)) uint32_t encode(float y, const uint32_t fs_bits, const int e5m2)
{
    const unsigned p = e5m2 ? 2u : 3u;
    const int32_t emin = e5m2 ? (127 - 14) << 23 : (127 - 6) << 23; /* smallest normal, fp32 bits */

    uint32_t b = to_bits(y);
    int32_t a = (int32_t)(b & 0x7fffffffu);
    int32_t m = a < (int32_t)fs_bits ? a : (int32_t)fs_bits; /* +inf saturates; NaN is fixed below */
    int32_t ex = m & 0x7f800000;
    ex = ex > emin ? ex : emin;
    uint32_t big = (uint32_t)ex + ((23u - p) << 23);
    uint32_t q = to_bits(from_bits((uint32_t)m) + from_bits(big)) - big;
    uint32_t code = q + ((uint32_t)(ex - emin) >> (23 - p));
    /* NaN: 0x7f, the code c10 gives both formats, with the sign. */
    code |= 0u - (uint32_t)(a > 0x7f800000);
    return (code & 0x7fu) | ((b >> 24) & 0x80u);
}

/* Elements per inner block: codes are computed as 32-bit lanes into a small buffer and narrowed
 * to bytes in a second loop. Narrowing inside the arithmetic loop makes gcc pack every
 * intermediate separately (about twice the instructions). */
#define BLOCK 512

static inline __attribute__((always_inline)) void
cast_row(const void *restrict src, uint8_t *restrict dst, size_t n, float v, float fs,
         const int kind, const int divide, const int e5m2)
{
    const uint32_t fs_bits = to_bits(fs);
    uint32_t codes[BLOCK];
    for (size_t start = 0; start < n; start += BLOCK) {
        size_t len = n - start < BLOCK ? n - start : BLOCK;
        for (size_t i = 0; i < len; i++) {
            float x = widen(src, start + i, kind);
            codes[i] = encode(divide ? x / v : x * v, fs_bits, e5m2);
        }
        for (size_t i = 0; i < len; i++)
            dst[start + i] = (uint8_t)codes[i];
    }
}

/* ---- The 16-bit fast path: bf16/fp16 sources, power-of-two scales ------------------------------
 *
 * x * 2**m of a 16-bit float is exact, and when the result is a normal FP8 value at most the full
 * scale, its code needs no float arithmetic: with a = |x|'s 15 bits, c = a + D (D moves the
 * exponent by m and rebiases it to the FP8 format's) holds the FP8 exponent and the mantissa's
 * extra bits below the kept ones, and round-to-nearest-even is (c + half - 1 + lsb) >> shift, a
 * carry into the exponent included. Everything stays in 16-bit lanes: twice the elements per
 * vector of the fp32 route above, and about half its instructions per lane. Zeros are exact too
 * (code 0 with the sign). Elements outside [lo, hi] (an FP8 subnormal or a saturating result, a
 * 16-bit subnormal, inf or NaN) are rare in weights; a block of FAST_BLOCK elements holding one
 * is recomputed by the fp32 route, so the codes are the fp32 route's in every case. */
#define FAST_BLOCK 64

typedef struct {
    uint16_t lo, span; /* fast when (uint16_t)(a - lo) <= span, i.e. lo <= a <= lo + span */
    uint16_t d;        /* D, modulo 2**16 */
} fast_params;

static inline __attribute__((always_inline)) int
fast_block(const uint16_t *restrict src, uint8_t *restrict dst, size_t n, const fast_params fp,
           const unsigned shift)
{
    const uint16_t half = (uint16_t)((1u << (shift - 1)) - 1u);
    uint16_t codes[FAST_BLOCK];
    uint16_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = src[i];
        uint16_t a = h & 0x7fffu;
        /* Outside [lo, hi] and not zero: over = a - hi' > 0 (saturating) with the range shifted to
         * start at 0, and min(over, a) is nonzero exactly then. Integer min/max and saturating
         * subtracts only: one instruction each on 16-bit lanes. */
        uint16_t t = (uint16_t)(a - fp.lo);
        uint16_t over = t > fp.span ? (uint16_t)(t - fp.span) : 0;
        bad |= over < a ? over : a;
        uint16_t c = (uint16_t)(a + fp.d);
        uint16_t q = (uint16_t)((uint16_t)(c + half + ((c >> shift) & 1u)) >> shift);
        /* In range q <= 0x7e < lo <= a, so min(q, a) is q there and 0 for a zero. */
        q = q < a ? q : a;
        codes[i] = (uint16_t)(q | ((h >> 8) & 0x80u));
    }
    for (size_t i = 0; i < n; i++)
        dst[i] = (uint8_t)codes[i];
    return bad != 0;
}

typedef void (*row_fn)(const void *restrict, uint8_t *restrict, size_t, float, float);


/* One specialized loop per (input dtype, multiply/divide, format): constants fold, loops vectorize.
 * Each exists for the baseline ISA (prefix b_) and, where available, for AVX2 (prefix a_). */
#define ROW_FN(isa_attr, name, kind, divide, e5m2) \
    static isa_attr void name(const void *restrict s, uint8_t *restrict d, size_t n, float v, float fs) \
    { cast_row(s, d, n, v, fs, kind, divide, e5m2); }
#define ROW_FNS_FOR(isa_attr, p) \
    ROW_FN(isa_attr, p##f32_mul_e4, SRC_F32, 0, 0) ROW_FN(isa_attr, p##f32_mul_e5, SRC_F32, 0, 1) \
    ROW_FN(isa_attr, p##f32_div_e4, SRC_F32, 1, 0) ROW_FN(isa_attr, p##f32_div_e5, SRC_F32, 1, 1) \
    ROW_FN(isa_attr, p##bf16_mul_e4, SRC_BF16, 0, 0) ROW_FN(isa_attr, p##bf16_mul_e5, SRC_BF16, 0, 1) \
    ROW_FN(isa_attr, p##bf16_div_e4, SRC_BF16, 1, 0) ROW_FN(isa_attr, p##bf16_div_e5, SRC_BF16, 1, 1) \
    ROW_FN(isa_attr, p##f16_mul_e4, SRC_F16, 0, 0) ROW_FN(isa_attr, p##f16_mul_e5, SRC_F16, 0, 1) \
    ROW_FN(isa_attr, p##f16_div_e4, SRC_F16, 1, 0) ROW_FN(isa_attr, p##f16_div_e5, SRC_F16, 1, 1)
#define TABLE_FOR(p) { \
    {{p##f32_mul_e4, p##f32_mul_e5}, {p##f32_div_e4, p##f32_div_e5}}, \
    {{p##bf16_mul_e4, p##bf16_mul_e5}, {p##bf16_div_e4, p##bf16_div_e5}}, \
    {{p##f16_mul_e4, p##f16_mul_e5}, {p##f16_div_e4, p##f16_div_e5}}}

ROW_FNS_FOR(, b_)
#if HAVE_AVX2
ROW_FNS_FOR(AVX2_TARGET, a_)
static const row_fn ROW_FNS[2][3][2][2] = {TABLE_FOR(b_), TABLE_FOR(a_)};
#else
static const row_fn ROW_FNS[1][3][2][2] = {TABLE_FOR(b_)};
#endif
/* The fast rows: 16-bit blocks, a block with an element outside the fast range redone by the fp32
 * route's multiply loop of the same ISA. A full block has a constant length, so it is unrolled. */
typedef void (*fast_fn)(const void *restrict, uint8_t *restrict, size_t, fast_params, float, float);
#define FAST_FN(isa_attr, name, shift, generic) \
    static isa_attr void name(const void *restrict s, uint8_t *restrict d, size_t n, fast_params fp, float v, \
                              float fs) \
    { \
        const uint16_t *src = (const uint16_t *)s; \
        size_t start = 0; \
        for (; start + FAST_BLOCK <= n; start += FAST_BLOCK) \
            if (fast_block(src + start, d + start, FAST_BLOCK, fp, shift)) \
                generic(src + start, d + start, FAST_BLOCK, v, fs); \
        if (start < n && fast_block(src + start, d + start, n - start, fp, shift)) \
            generic(src + start, d + start, n - start, v, fs); \
    }
/* shift = the source's mantissa bits - the format's: bf16 7, fp16 10; e4m3 3, e5m2 2. */
#define FAST_FNS_FOR(isa_attr, p) \
    FAST_FN(isa_attr, p##fast_bf16_e4, 4, p##bf16_mul_e4) FAST_FN(isa_attr, p##fast_bf16_e5, 5, p##bf16_mul_e5) \
    FAST_FN(isa_attr, p##fast_f16_e4, 7, p##f16_mul_e4) FAST_FN(isa_attr, p##fast_f16_e5, 8, p##f16_mul_e5)
#define FAST_TABLE_FOR(p) {{p##fast_bf16_e4, p##fast_bf16_e5}, {p##fast_f16_e4, p##fast_f16_e5}}
FAST_FNS_FOR(, b_)
#if HAVE_AVX2
#include <immintrin.h>

/* The AVX2 fast rows, written with intrinsics: gcc's vectorization of fast_block() above keeps
 * codes[] as 16-bit lanes in memory and reduces `bad` across the vector every block; here 32
 * elements become 32 code bytes in registers (packus to bytes, the signs taken by packs from the
 * inputs' top bits, one permute to undo the lane interleave) and are stored at once, about 1.8x
 * faster. The range check keeps two running extremes per block: the max of |x| against hi and the
 * min against lo. A zero also sets min |x| below lo, so a block that fails only that check is
 * checked again with zeros excluded (exact_check()) before it goes to the fp32 route: SmolLM2's
 * weights hold zeros in 0.5% of blocks, and the cheap check takes one instruction less per vector.
 * Zeros take code 0 from an arithmetic shift where D + half is negative (packus saturates the
 * negative lane to 0; bf16 at any scale above 2**-112), else from min(q, a) as in fast_block().
 * Codes are stored as they are made; a block that fails the check is then overwritten by the fp32
 * route. */
_Static_assert(FAST_BLOCK % 32 == 0, "the AVX2 rows take 32 elements at a time");

typedef struct {
    __m256i mag, hi, lo, lo_minus_1, dh, one, sign;
} fast_vecs;

static AVX2_TARGET inline __attribute__((always_inline)) __m256i
fast32_avx2(const uint16_t *src, const fast_vecs *k, const unsigned shift, const int neg_zero, __m256i *top,
            __m256i *low)
{
    const __m256i h0 = _mm256_loadu_si256((const __m256i *)src);
    const __m256i h1 = _mm256_loadu_si256((const __m256i *)(src + 16));
    const __m256i a0 = _mm256_and_si256(h0, k->mag), a1 = _mm256_and_si256(h1, k->mag);
    *top = _mm256_max_epu16(*top, _mm256_max_epu16(a0, a1));
    *low = _mm256_min_epu16(*low, _mm256_min_epu16(a0, a1));
    /* (a + D + half + lsb) >> shift, lsb = bit `shift` of a (D's low bits are zero) */
    __m256i q0 = _mm256_add_epi16(_mm256_add_epi16(a0, k->dh), _mm256_and_si256(_mm256_srli_epi16(a0, shift), k->one));
    __m256i q1 = _mm256_add_epi16(_mm256_add_epi16(a1, k->dh), _mm256_and_si256(_mm256_srli_epi16(a1, shift), k->one));
    if (neg_zero) {
        q0 = _mm256_srai_epi16(q0, shift);
        q1 = _mm256_srai_epi16(q1, shift);
    } else {
        q0 = _mm256_min_epu16(_mm256_srli_epi16(q0, shift), a0);
        q1 = _mm256_min_epu16(_mm256_srli_epi16(q1, shift), a1);
    }
    const __m256i codes = _mm256_packus_epi16(q0, q1);
    const __m256i signs = _mm256_and_si256(_mm256_packs_epi16(h0, h1), k->sign);
    return _mm256_permute4x64_epi64(_mm256_or_si256(codes, signs), 0xd8);
}

/* Whether every element of the block is in [lo, hi] or zero: min(a - 1) sends zeros to 0xffff. */
static AVX2_TARGET __attribute__((noinline)) int exact_check(const uint16_t *src, const fast_vecs *k)
{
    __m256i top = _mm256_setzero_si256(), low = _mm256_set1_epi16(-1);
    for (int j = 0; j < FAST_BLOCK; j += 16) {
        const __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(src + j)), k->mag);
        top = _mm256_max_epu16(top, a);
        low = _mm256_min_epu16(low, _mm256_sub_epi16(a, k->one));
    }
    const __m256i bad = _mm256_or_si256(_mm256_subs_epu16(top, k->hi), _mm256_subs_epu16(k->lo_minus_1, low));
    return _mm256_testz_si256(bad, bad);
}

/* One block: its codes stored, then overwritten by the fp32 route if an element is outside the range. */
static AVX2_TARGET inline __attribute__((always_inline)) void
fast_block_avx2(const uint16_t *src, uint8_t *dst, const fast_vecs *k, float v, float fs, const unsigned shift,
                const int neg_zero, const row_fn generic)
{
    __m256i top = _mm256_setzero_si256(), low = _mm256_set1_epi16(-1);
    for (int j = 0; j < FAST_BLOCK; j += 32)
        _mm256_storeu_si256((__m256i *)(dst + j), fast32_avx2(src + j, k, shift, neg_zero, &top, &low));
    const __m256i bad = _mm256_or_si256(_mm256_subs_epu16(top, k->hi), _mm256_subs_epu16(k->lo, low));
    if (!_mm256_testz_si256(bad, bad) && !exact_check(src, k))
        generic(src, dst, FAST_BLOCK, v, fs);
}

/* A row of SPLIT_MIN elements or more goes in SPLIT_PARTS parts of whole blocks, a block of each
 * in turn (see _fp8cast.h). Where the source comes from DRAM (convert takes every weight's max-abs
 * first, then casts them) the SmolLM2 weights' casts measured ~18 ms in one part, ~13 ms in four;
 * from cache ~2% slower. */
static AVX2_TARGET inline __attribute__((always_inline)) void
fast_row_avx2(const uint16_t *src, uint8_t *dst, size_t n, const fast_params fp, float v, float fs,
              const unsigned shift, const int neg_zero, const row_fn generic)
{
    const fast_vecs k = {_mm256_set1_epi16(0x7fff), _mm256_set1_epi16((short)(fp.lo + fp.span)),
                         _mm256_set1_epi16((short)fp.lo), _mm256_set1_epi16((short)(fp.lo - 1)),
                         _mm256_set1_epi16((short)(uint16_t)(fp.d + (1u << (shift - 1)) - 1u)),
                         _mm256_set1_epi16(1), _mm256_set1_epi8((char)0x80)};
    size_t start = 0;
    if (n >= SPLIT_MIN) {
        const size_t part = n / SPLIT_PARTS / FAST_BLOCK * FAST_BLOCK;
        for (size_t i = 0; i < part; i += FAST_BLOCK)
            for (size_t q = 0; q < SPLIT_PARTS; q++)
                fast_block_avx2(src + q * part + i, dst + q * part + i, &k, v, fs, shift, neg_zero, generic);
        start = SPLIT_PARTS * part;
    }
    for (; start + FAST_BLOCK <= n; start += FAST_BLOCK)
        fast_block_avx2(src + start, dst + start, &k, v, fs, shift, neg_zero, generic);
    if (start < n && fast_block(src + start, dst + start, n - start, fp, shift))
        generic(src + start, dst + start, n - start, v, fs);
}

/* One row function per (source, format), each with both zero treatments (picked per row). */
#define FAST_FN_AVX2(name, shift, generic) \
    static AVX2_TARGET void name(const void *restrict s, uint8_t *restrict d, size_t n, fast_params fp, float v, \
                                 float fs) \
    { \
        if ((int16_t)(uint16_t)(fp.d + (1u << (shift - 1)) - 1u) < 0) \
            fast_row_avx2(s, d, n, fp, v, fs, shift, 1, generic); \
        else \
            fast_row_avx2(s, d, n, fp, v, fs, shift, 0, generic); \
    }
FAST_FN_AVX2(a_fast_bf16_e4, 4, a_bf16_mul_e4) FAST_FN_AVX2(a_fast_bf16_e5, 5, a_bf16_mul_e5)
FAST_FN_AVX2(a_fast_f16_e4, 7, a_f16_mul_e4) FAST_FN_AVX2(a_fast_f16_e5, 8, a_f16_mul_e5)
static const fast_fn FAST_FNS[2][2][2] = {FAST_TABLE_FOR(b_), FAST_TABLE_FOR(a_)};
#else
static const fast_fn FAST_FNS[1][2][2] = {FAST_TABLE_FOR(b_)};
#endif

/* The 16-bit pattern of a positive float in bf16 (kind SRC_BF16) or fp16 (SRC_F16) when it is a
 * normal value of that type, else -1. */
static int32_t normal16(float f, int kind)
{
    uint32_t b = to_bits(f);
    int32_t e = (int32_t)(b >> 23) - 127;
    if (b >> 31 || e < -126 || e > 127)
        return -1;
    if (kind == SRC_BF16)
        return (b & 0xffffu) ? -1 : (int32_t)(b >> 16);
    if (e < -14 || e > 15 || (b & 0x1fffu))
        return -1;
    return ((e + 15) << 10) | (int32_t)((b >> 13) & 0x3ffu);
}

/* The fast path's parameters for a 16-bit source multiplied by inv = 2**m (exact_inverse's result),
 * or 0 where no element could take it (then the fp32 route does the whole row). */
static int fast_setup(int kind, float inv, float fs, int e5m2, fast_params *out)
{
    const int32_t ms = kind == SRC_BF16 ? 7 : 10, sbias = kind == SRC_BF16 ? 127 : 15;
    const int32_t normal_min = 1 << ms, finite_max = kind == SRC_BF16 ? 0x7f7f : 0x7bff;
    const int32_t bias8 = e5m2 ? 15 : 7;
    const int32_t m = (int32_t)(to_bits(inv) >> 23) - 127;
    const int32_t fs16 = normal16(fs, kind);
    if (fs16 < 0)
        return 0;
    /* c = a + D: the FP8 exponent field from bit ms up, the mantissa below. */
    const int32_t d = (m - sbias + bias8) * (1 << ms);
    const int32_t c_fs = fs16 + (bias8 - sbias) * (1 << ms); /* c of the full scale itself */
    int32_t lo = normal_min - d, hi = c_fs - d;              /* FP8 normal .. full scale */
    lo = lo > normal_min ? lo : normal_min;                  /* a normal 16-bit source */
    hi = hi < finite_max ? hi : finite_max;
    if (lo > hi)
        return 0;
    out->lo = (uint16_t)lo;
    out->span = (uint16_t)(hi - lo);
    out->d = (uint16_t)(uint32_t)d;
    return 1;
}

FP8_HIDDEN int best_isa = 0; /* index into ROW_FNS: 1 = AVX2, set at import from the CPU's flags */

/* 1/s when s is a positive power of two whose inverse is a normal fp32 (then x * (1/s) == x / s bit
 * for bit, and a multiply is cheaper than a divide), else 0 (divide). */
static float exact_inverse(float s)
{
    uint32_t b = to_bits(s), e = b >> 23; /* a set sign bit makes e > 255 */
    return (b & 0x7fffffu) == 0 && e >= 1 && e <= 253 ? from_bits((254u - e) << 23) : 0.0f;
}

PyDoc_STRVAR(cast_doc,
"cast(src_ptr, src_kind, dst_ptr, rows, cols, scale_ptr, scale, e5m2, fullscale, baseline=False)\n\n"
"Write rows*cols FP8 codes (uint8) of the contiguous source (src_kind 0 fp32, 1 bf16, 2 fp16):\n"
"clamp(x / s, +-fullscale) in fp32, rounded to nearest even on the e4m3fn (e5m2=False) or e5m2\n"
"grid. s is scale (an fp32 value) for every row when scale_ptr is 0, else the fp32 scale_ptr[row].\n"
"Rows whose s is a power of two are multiplied by 1/s (bit-identical). baseline=True runs the\n"
"baseline-ISA loops even where AVX2 is available (tests). Runs without the GIL; the caller keeps\n"
"the buffers alive and unchanged.");

static PyObject *cast(PyObject *self, PyObject *args)
{
    unsigned long long src, dst, scales;
    int kind, e5m2, baseline = 0;
    Py_ssize_t rows, cols;
    double scale, fullscale;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKnnKdpd|p:cast", &src, &kind, &dst, &rows, &cols, &scales, &scale, &e5m2,
                          &fullscale, &baseline))
        return NULL;
    if (kind < 0 || kind > 2)
        return PyErr_Format(PyExc_ValueError, "src_kind must be 0 (fp32), 1 (bf16) or 2 (fp16), got %d", kind);
    if (rows < 0 || cols < 0)
        return PyErr_Format(PyExc_ValueError, "rows and cols must be >= 0, got %zd x %zd", rows, cols);
    /* Above the format's largest finite value the rounding would leave the grid. */
    if (!(fullscale > 0.0 && fullscale <= (e5m2 ? 57344.0 : 448.0)))
        return PyErr_Format(PyExc_ValueError, "fullscale must be in (0, %s], got %R", e5m2 ? "57344" : "448",
                            PyTuple_GET_ITEM(args, 8));
    if (rows > 0 && cols > 0 && (src == 0 || dst == 0))
        return PyErr_Format(PyExc_ValueError, "null src or dst pointer for %zd x %zd elements", rows, cols);

    const row_fn(*fns)[2][2] = ROW_FNS[baseline ? 0 : best_isa];
    const char *sp = (const char *)(uintptr_t)src;
    uint8_t *dp = (uint8_t *)(uintptr_t)dst;
    const float *sv = (const float *)(uintptr_t)scales;
    const float one = (float)scale, fs = (float)fullscale;
    const size_t row_bytes = (size_t)cols * ITEM_SIZE[kind];
    const fast_fn(*fast)[2] = FAST_FNS[baseline ? 0 : best_isa];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        float s = sv ? sv[r] : one, inv = exact_inverse(s);
        fast_params fp;
        if (kind != SRC_F32 && inv != 0.0f && fast_setup(kind, inv, fs, e5m2, &fp)) {
            fast[kind - 1][e5m2](sp + (size_t)r * row_bytes, dp + (size_t)r * (size_t)cols, (size_t)cols, fp, inv, fs);
            continue;
        }
        fns[kind][inv == 0.0f][e5m2](sp + (size_t)r * row_bytes, dp + (size_t)r * (size_t)cols, (size_t)cols,
                                     inv == 0.0f ? s : inv, fs);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(fast_range_doc,
"fast_range(src_kind, scale, fullscale, e5m2) -> (lo, hi) or None\n\n"
"The |x| bit patterns (15 bits) of the bf16 (src_kind 1) or fp16 (2) elements that cast() encodes\n"
"on its 16-bit path when every row is scaled by scale: lo <= |x| <= hi, plus zeros. None when\n"
"the scale is not a power of two, or the full scale not a normal value of the source type, and\n"
"cast() takes the fp32 route for every element (tests check the range against the formats).");

static PyObject *fast_range(PyObject *self, PyObject *args)
{
    int kind, e5m2;
    double scale, fullscale;
    fast_params fp;
    (void)self;
    if (!PyArg_ParseTuple(args, "iddp:fast_range", &kind, &scale, &fullscale, &e5m2))
        return NULL;
    if (kind != SRC_BF16 && kind != SRC_F16)
        return PyErr_Format(PyExc_ValueError, "src_kind must be 1 (bf16) or 2 (fp16), got %d", kind);
    float inv = exact_inverse((float)scale);
    if (inv == 0.0f || !fast_setup(kind, inv, (float)fullscale, e5m2, &fp))
        Py_RETURN_NONE;
    return Py_BuildValue("(ii)", (int)fp.lo, (int)fp.lo + (int)fp.span);
}

static PyMethodDef METHODS[] = {
    {"cast", cast, METH_VARARGS, cast_doc},
    {"maxabs", maxabs, METH_VARARGS, maxabs_doc},
    {"fast_range", fast_range, METH_VARARGS, fast_range_doc},
    {"maxabs_value", maxabs_value, METH_VARARGS, maxabs_value_doc},
    {"maxabs_cols", maxabs_cols, METH_VARARGS, maxabs_cols_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, "_fp8cast",
    "Saturating round-to-nearest-even fp32/bf16/fp16 -> FP8 cast and max |x| (see shards.fp8.native_cast).", -1,
    METHODS,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fp8cast(void)
{
    PyObject *m = PyModule_Create(&MODULE);
    if (m == NULL)
        return NULL;
#if HAVE_AVX2
    __builtin_cpu_init();
    best_isa = __builtin_cpu_supports("avx2") ? 1 : 0;
#endif
    /* Which loops cast() and maxabs() run by default: "avx2" or "baseline". */
    if (PyModule_AddStringConstant(m, "ISA", best_isa ? "avx2" : "baseline") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
