/* _fp8cast's max-abs reductions: shards.fp8.scale_math.magnitude_max (per tensor or per row) and the
 * observers' per-tensor and per-channel statistics (shards.fp8.native_cast). The FP8 cast and the
 * module itself are in _fp8cast.c; shared definitions in _fp8cast.h.
 */
#include "_fp8cast.h"

/* ---- max |x| per tensor or per row (shards.fp8.scale_math.magnitude_max) ----------------------
 *
 * On the bit patterns: with the sign bit cleared, IEEE floats order like their patterns as integers
 * (+0 < subnormals < normals < inf < NaNs), so the float max-abs is an integer max. That vectorizes
 * without NaN handling (a NaN pattern is above inf, so one NaN makes the result NaN; -0.0 gives +0)
 * and reads each element once, with no temporary. The cleared patterns are non-negative as signed
 * integers, so a signed max does: SSE2 has one for 16-bit lanes (pmaxsw; the unsigned pmaxuw is
 * SSE4.1); 32-bit lanes are a compare and select there, one vpmaxsd with AVX2. */
/* One loop per lane width, as a macro so that both widths read the same. Rows of LANES elements or
 * more keep LANES independent running maxima (64 x 16 or 32 x 32 bits: 4 AVX2 / 8 SSE2 registers):
 * one accumulator chains every max on the previous one and measured at about half the speed. The
 * maxima start as the first block (no zeroing, so short rows pay little), and what is left after
 * the last whole block goes through a plain loop, which gcc vectorizes with its own shorter tails. */
#define MAXABS_ROW(name, T, U, MASK, LANES) \
    static inline __attribute__((always_inline)) uint32_t name(const void *restrict src, size_t n) \
    { \
        const U *s = (const U *)src; \
        T m = 0; \
        size_t i = 0; \
        if (n >= LANES) { \
            T acc[LANES]; \
            for (size_t j = 0; j < LANES; j++) \
                acc[j] = (T)(s[j] & MASK); \
            for (i = LANES; i + LANES <= n; i += LANES) \
                for (size_t j = 0; j < LANES; j++) { \
                    T v = (T)(s[i + j] & MASK); \
                    acc[j] = v > acc[j] ? v : acc[j]; \
                } \
            for (size_t j = 0; j < LANES; j++) \
                m = acc[j] > m ? acc[j] : m; \
        } \
        for (; i < n; i++) { \
            T v = (T)(s[i] & MASK); \
            m = v > m ? v : m; \
        } \
        return (uint32_t)(U)m; \
    }
MAXABS_ROW(maxabs16_one, int16_t, uint16_t, 0x7fffu, 64)
MAXABS_ROW(maxabs32_one, int32_t, uint32_t, 0x7fffffffu, 32)

/* Rows of SPLIT_MIN elements or more: SPLIT_PARTS parts (_fp8cast.h) of a whole number of
 * W-element blocks each (W = 64 bytes), one running maximum per lane and part, and a tail. */
#define MAXABS_PARTS_ROW(name, one, T, U, MASK, W) \
    static inline __attribute__((always_inline)) uint32_t name(const void *restrict src, size_t n) \
    { \
        const U *s = (const U *)src; \
        if (n < SPLIT_MIN) \
            return one(src, n); \
        const size_t part = n / SPLIT_PARTS / W * W; \
        T acc[SPLIT_PARTS][W]; \
        for (size_t q = 0; q < SPLIT_PARTS; q++) \
            for (size_t j = 0; j < W; j++) \
                acc[q][j] = (T)(s[q * part + j] & MASK); \
        for (size_t i = W; i < part; i += W) \
            for (size_t q = 0; q < SPLIT_PARTS; q++) \
                for (size_t j = 0; j < W; j++) { \
                    T v = (T)(s[q * part + i + j] & MASK); \
                    acc[q][j] = v > acc[q][j] ? v : acc[q][j]; \
                } \
        T m = 0; \
        for (size_t q = 0; q < SPLIT_PARTS; q++) \
            for (size_t j = 0; j < W; j++) \
                m = acc[q][j] > m ? acc[q][j] : m; \
        const uint32_t rest = one(s + SPLIT_PARTS * part, n - SPLIT_PARTS * part); \
        return rest > (uint32_t)(U)m ? rest : (uint32_t)(U)m; \
    }
MAXABS_PARTS_ROW(maxabs16_row, maxabs16_one, int16_t, uint16_t, 0x7fffu, 32)
MAXABS_PARTS_ROW(maxabs32_row, maxabs32_one, int32_t, uint32_t, 0x7fffffffu, 16)

typedef uint32_t (*maxabs_fn)(const void *restrict, size_t);

/* Index [isa][wide], like ROW_FNS: 16-bit (bf16 and fp16 alike) and 32-bit lanes. */
#define MAXABS_FNS_FOR(isa_attr, p) \
    static isa_attr uint32_t p##maxabs16(const void *restrict s, size_t n) { return maxabs16_row(s, n); } \
    static isa_attr uint32_t p##maxabs32(const void *restrict s, size_t n) { return maxabs32_row(s, n); }
MAXABS_FNS_FOR(, b_)
#if HAVE_AVX2
MAXABS_FNS_FOR(AVX2_TARGET, a_)
static const maxabs_fn MAXABS_FNS[2][2] = {{b_maxabs16, b_maxabs32}, {a_maxabs16, a_maxabs32}};
#else
static const maxabs_fn MAXABS_FNS[1][2] = {{b_maxabs16, b_maxabs32}};
#endif

FP8_HIDDEN const char maxabs_doc[] = PyDoc_STR(
"maxabs(src_ptr, src_kind, dst_ptr, rows, cols, baseline=False)\n\n"
"Write max |x| of each of the rows (cols elements each) of the contiguous source (src_kind 0 fp32,\n"
"1 bf16, 2 fp16) to dst_ptr[row], in the source's dtype: NaN if the row holds a NaN, +inf if it\n"
"holds an infinity and no NaN, +0.0 for a row of zeros. A NaN result is, for bf16/fp16, the row's\n"
"largest sign-cleared NaN pattern (what the int16 amax of the torch route gives), for fp32 the\n"
"default quiet NaN 0x7fc00000 (what torch's fp32 amax gives for any NaN input). baseline=True runs\n"
"the baseline-ISA loops even where AVX2 is available (tests). Runs without the GIL; the caller\n"
"keeps the buffers alive and unchanged.");

FP8_HIDDEN PyObject *maxabs(PyObject *self, PyObject *args)
{
    unsigned long long src, dst;
    int kind, baseline = 0;
    Py_ssize_t rows, cols;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKnn|p:maxabs", &src, &kind, &dst, &rows, &cols, &baseline))
        return NULL;
    if (kind < 0 || kind > 2)
        return PyErr_Format(PyExc_ValueError, "src_kind must be 0 (fp32), 1 (bf16) or 2 (fp16), got %d", kind);
    /* An empty row has no max (torch's amax raises): the caller declines empty tensors. */
    if (rows < 0 || cols < 1)
        return PyErr_Format(PyExc_ValueError, "rows must be >= 0 and cols >= 1, got %zd x %zd", rows, cols);
    if (rows > 0 && (src == 0 || dst == 0))
        return PyErr_Format(PyExc_ValueError, "null src or dst pointer for %zd x %zd elements", rows, cols);

    const int wide = kind == SRC_F32;
    const maxabs_fn fn = MAXABS_FNS[baseline ? 0 : best_isa][wide];
    const char *sp = (const char *)(uintptr_t)src;
    const size_t row_bytes = (size_t)cols * ITEM_SIZE[kind];
    Py_BEGIN_ALLOW_THREADS
    if (wide) {
        uint32_t *dp = (uint32_t *)(uintptr_t)dst;
        for (Py_ssize_t r = 0; r < rows; r++) {
            uint32_t m = fn(sp + (size_t)r * row_bytes, (size_t)cols);
            dp[r] = m > 0x7f800000u ? 0x7fc00000u : m;
        }
    } else {
        uint16_t *dp = (uint16_t *)(uintptr_t)dst;
        for (Py_ssize_t r = 0; r < rows; r++)
            dp[r] = (uint16_t)fn(sp + (size_t)r * row_bytes, (size_t)cols);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The float value of a max-abs pattern of the source's width (NaN patterns give NaN). */
static double pattern_value(uint32_t m, int kind)
{
    if (kind == SRC_F32)
        return (double)from_bits(m);
    if (kind == SRC_BF16)
        return (double)from_bits(m << 16);
    return (double)widen(&(uint16_t){(uint16_t)m}, 0, SRC_F16);
}

FP8_HIDDEN const char maxabs_value_doc[] = PyDoc_STR(
"maxabs_value(src_ptr, src_kind, n, baseline=False) -> float\n\n"
"max |x| over the n >= 1 contiguous elements (src_kind 0 fp32, 1 bf16, 2 fp16) as a Python float:\n"
"NaN if one is NaN, inf if one is infinite and none NaN. maxabs() with one row, without the\n"
"output tensor: the observers' per-call path (shards.measuring.observers).");

FP8_HIDDEN PyObject *maxabs_value(PyObject *self, PyObject *args)
{
    unsigned long long src;
    int kind, baseline = 0;
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kin|p:maxabs_value", &src, &kind, &n, &baseline))
        return NULL;
    if (kind < 0 || kind > 2)
        return PyErr_Format(PyExc_ValueError, "src_kind must be 0 (fp32), 1 (bf16) or 2 (fp16), got %d", kind);
    if (n < 1 || src == 0)
        return PyErr_Format(PyExc_ValueError, "need n >= 1 elements at a non-null pointer, got %zd", n);
    const maxabs_fn fn = MAXABS_FNS[baseline ? 0 : best_isa][kind == SRC_F32];
    uint32_t m;
    Py_BEGIN_ALLOW_THREADS
    m = fn((const void *)(uintptr_t)src, (size_t)n);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(pattern_value(m, kind));
}

/* ---- max |x| per column: per-channel activation statistics ------------------------------------
 *
 * Activations are (tokens, channels) row-major; their per-channel max runs down the columns, so each
 * row is folded into one running maximum per column (sign-cleared patterns, integer max again), and
 * the row loop vectorizes along the channels. The maxima are written as fp32 (bf16 and fp16 widen
 * exactly), which is what the observers keep. */
#define MAXCOLS_ROW(name, T, U, MASK) \
    static inline __attribute__((always_inline)) void name(const void *restrict src, size_t rows, size_t cols, \
                                                             T *restrict acc) \
    { \
        const U *s = (const U *)src; \
        for (size_t j = 0; j < cols; j++) \
            acc[j] = (T)(s[j] & MASK); \
        for (size_t r = 1; r < rows; r++) { \
            const U *row = s + r * cols; \
            for (size_t j = 0; j < cols; j++) { \
                T v = (T)(row[j] & MASK); \
                acc[j] = v > acc[j] ? v : acc[j]; \
            } \
        } \
    }
MAXCOLS_ROW(maxcols16_rows, int16_t, uint16_t, 0x7fffu)
MAXCOLS_ROW(maxcols32_rows, int32_t, uint32_t, 0x7fffffffu)

typedef void (*maxcols16_fn)(const void *restrict, size_t, size_t, int16_t *restrict);
typedef void (*maxcols32_fn)(const void *restrict, size_t, size_t, int32_t *restrict);
#define MAXCOLS_FNS_FOR(isa_attr, p) \
    static isa_attr void p##maxcols16(const void *restrict s, size_t r, size_t c, int16_t *restrict a) \
    { maxcols16_rows(s, r, c, a); } \
    static isa_attr void p##maxcols32(const void *restrict s, size_t r, size_t c, int32_t *restrict a) \
    { maxcols32_rows(s, r, c, a); }
MAXCOLS_FNS_FOR(, b_)
#if HAVE_AVX2
MAXCOLS_FNS_FOR(AVX2_TARGET, a_)
static const maxcols16_fn MAXCOLS16[2] = {b_maxcols16, a_maxcols16};
static const maxcols32_fn MAXCOLS32[2] = {b_maxcols32, a_maxcols32};
#else
static const maxcols16_fn MAXCOLS16[1] = {b_maxcols16};
static const maxcols32_fn MAXCOLS32[1] = {b_maxcols32};
#endif

FP8_HIDDEN const char maxabs_cols_doc[] = PyDoc_STR(
"maxabs_cols(src_ptr, src_kind, rows, cols, dst_ptr, fold=False, baseline=False) -> bool\n\n"
"max |x| of each of the cols columns of the contiguous rows x cols source (src_kind 0 fp32, 1 bf16,\n"
"2 fp16; rows, cols >= 1), as fp32. True when every maximum is finite (no element is NaN or\n"
"infinite). fold=False: the maxima are written to dst_ptr[col] (the raw ones, NaN for a column\n"
"holding a NaN, when not finite). fold=True: dst_ptr holds a running maximum (finite, >= 0) and\n"
"takes the elementwise max with these, only when they are all finite; else it is left as it was\n"
"(the observers' per-call fold, with no tensor op). Runs without the GIL; the caller keeps the\n"
"buffers alive.");

FP8_HIDDEN PyObject *maxabs_cols(PyObject *self, PyObject *args)
{
    unsigned long long src, dst;
    int kind, fold = 0, baseline = 0;
    Py_ssize_t rows, cols;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinnK|pp:maxabs_cols", &src, &kind, &rows, &cols, &dst, &fold, &baseline))
        return NULL;
    if (kind < 0 || kind > 2)
        return PyErr_Format(PyExc_ValueError, "src_kind must be 0 (fp32), 1 (bf16) or 2 (fp16), got %d", kind);
    if (rows < 1 || cols < 1 || src == 0 || dst == 0)
        return PyErr_Format(PyExc_ValueError, "need rows, cols >= 1 and non-null pointers, got %zd x %zd", rows,
                            cols);
    const void *sp = (const void *)(uintptr_t)src;
    uint32_t *dp = (uint32_t *)(uintptr_t)dst; /* fp32 patterns */
    const int isa = baseline ? 0 : best_isa;
    /* One scratch row of maxima: 32-bit patterns (16-bit sources widen after the pass). */
    int32_t *acc = PyMem_RawMalloc((size_t)cols * sizeof *acc);
    if (acc == NULL)
        return PyErr_NoMemory();
    int finite = 1;
    Py_BEGIN_ALLOW_THREADS
    if (kind == SRC_F32) {
        MAXCOLS32[isa](sp, (size_t)rows, (size_t)cols, acc);
    } else {
        int16_t *acc16 = (int16_t *)acc; /* the first half of the scratch row, widened from the end down */
        MAXCOLS16[isa](sp, (size_t)rows, (size_t)cols, acc16);
        for (Py_ssize_t j = cols - 1; j >= 0; j--)
            acc[j] = (int32_t)to_bits((float)pattern_value((uint32_t)(uint16_t)acc16[j], kind));
    }
    for (Py_ssize_t j = 0; j < cols; j++)
        finite &= (acc[j] & 0x7fffffff) < 0x7f800000;
    if (!fold)
        memcpy(dp, acc, (size_t)cols * sizeof *acc);
    else if (finite) /* non-negative finite floats order like their patterns */
        for (Py_ssize_t j = 0; j < cols; j++)
            dp[j] = (uint32_t)acc[j] > dp[j] ? (uint32_t)acc[j] : dp[j];
    Py_END_ALLOW_THREADS
    PyMem_RawFree(acc);
    return PyBool_FromLong(finite);
}
