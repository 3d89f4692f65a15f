/* Inline helpers shared by r1lab's C kernels (rollout/csrc/decode.c, modeling/csrc/train.c):
 * bf16 <-> fp32 conversion with torch's rounding, and a vectorisable exp. */
#ifndef R1LAB_MATH_H
#define R1LAB_MATH_H

#include <math.h>
#include <stdint.h>

/* exp(x) for float, vectorisable (libm's expf is a scalar call): x = n ln2 + r, |r| <= ln2/2,
 * exp(r) by Cephes' degree-7 polynomial, 2^n by building the exponent bits. Relative error ~2e-7
 * over the range used here; inputs are clamped to [-87.3, 88.0] (finite output, no denormals:
 * above ~88.4 the exponent 2^n would overflow).
 * Only arithmetic and comparisons, so it inlines into the vectorised loops that call it. */
static inline __attribute__((always_inline)) float fast_expf(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to the nearest integer */
    const float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

/* bf16 <-> fp32, vectorisable. A bf16 is the top half of an fp32, so widening is a shift; narrowing
 * rounds to nearest even, and NaN stays a (quiet) NaN, as c10::BFloat16 does. */
static inline __attribute__((always_inline)) float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}
static inline __attribute__((always_inline)) uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    const uint32_t rounded = (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16;
    return (v.u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}
static inline void widen(const uint16_t *restrict src, float *restrict dst, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}
static inline void narrow(const float *restrict src, uint16_t *restrict dst, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

#endif
