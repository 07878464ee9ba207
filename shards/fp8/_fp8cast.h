/* Shared by the two sources of the _fp8cast extension: _fp8cast.c (the FP8 cast and the module)
 * and _fp8maxabs.c (the max-abs reductions). */
#ifndef FP8CAST_H
#define FP8CAST_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

enum { SRC_F32 = 0, SRC_BF16 = 1, SRC_F16 = 2 };

static inline float from_bits(uint32_t b) { float f; memcpy(&f, &b, sizeof f); return f; }
static inline uint32_t to_bits(float f) { uint32_t b; memcpy(&b, &f, sizeof b); return b; }

/* The exact fp32 value of element i (bf16 and fp16 are subsets of fp32). */
static inline __attribute__((always_inline)) float widen(const void *restrict src, size_t i, const int kind)
{
    if (kind == SRC_F32)
        return ((const float *)src)[i];
    uint32_t h = ((const uint16_t *)src)[i];
    if (kind == SRC_BF16)
        return from_bits(h << 16);
    /* fp16: rebias the exponent (15 -> 127) and move the mantissa up 13 bits; inf/NaN need
     * exponent 255, and subnormals (exponent 0) are mantissa * 2**-24, exact in fp32. NaN payloads
     * keep their quiet bit, as in every other conversion. */
    uint32_t sign = (h & 0x8000u) << 16;
    uint32_t mag = h & 0x7fffu;
    uint32_t normal = (mag << 13) + ((127u - 15u) << 23);
    normal += (0u - (uint32_t)(mag >= 0x7c00u)) & ((128u - 16u) << 23);
    uint32_t sub = to_bits((float)(int32_t)mag * 0x1p-24f);
    uint32_t is_sub = 0u - (uint32_t)(mag < 0x0400u); /* a mask, see encode() in _fp8cast.c */
    return from_bits(sign | (sub & is_sub) | (normal & ~is_sub));
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define HAVE_AVX2 1
#define AVX2_TARGET __attribute__((target("avx2")))
#else
#define HAVE_AVX2 0
#define AVX2_TARGET
#endif

/* Rows of SPLIT_MIN elements or more are read as SPLIT_PARTS interleaved parts (the cast's 16-bit
 * path and the max-abs): a tensor that comes from DRAM is then read as four sequential streams,
 * which the hardware prefetchers follow at once. One thread reading one stream measured 16-20 GB/s,
 * four 22-26 GB/s (two less, eight no more); from cache both run alike. */
#define SPLIT_PARTS 4
#define SPLIT_MIN 16384

/* Names shared between the two sources, not exported from the extension. */
#define FP8_HIDDEN __attribute__((visibility("hidden")))

static const size_t ITEM_SIZE[3] = {4, 2, 2};
extern FP8_HIDDEN int best_isa; /* 1: the AVX2 loops are the default (set at import, _fp8cast.c) */

/* The max-abs functions of the module (_fp8maxabs.c). */
FP8_HIDDEN PyObject *maxabs(PyObject *self, PyObject *args);
FP8_HIDDEN PyObject *maxabs_value(PyObject *self, PyObject *args);
FP8_HIDDEN PyObject *maxabs_cols(PyObject *self, PyObject *args);
extern FP8_HIDDEN const char maxabs_doc[], maxabs_value_doc[], maxabs_cols_doc[];

#endif
