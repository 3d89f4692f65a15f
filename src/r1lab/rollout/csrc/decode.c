/* The CPU engine's decode step between its matmuls, fused: fp32, one new token per row.
 *
 * PyTorch runs each of these as several small kernels with a pass over memory and a dispatch each
 * (RMSNorm alone is six); at decode shapes ([64, 256] activations) that overhead is as large as the
 * arithmetic. The matmuls stay in oneDNN (kernels.py); everything between them is here:
 *
 *   r1lab_attend     RoPE of q and k, the new k/v written into the cache, attention over the row's
 *                    own cached positions (no mask: rows never read past their length)
 *   r1lab_prefill_attend  the same for prompts packed back to back: every token's key and value,
 *                    and causal attention within each prompt
 *   r1lab_add_norm   x += delta, then RMSNorm or LayerNorm of x (residual add + the next norm)
 *   r1lab_swiglu     silu(gate) * up from the fused gate/up projection
 *   r1lab_gelu_tanh  GPT-2's tanh-approximated GELU
 *   r1lab_sample     one token per row by the Gumbel-max trick on counter-based noise, and its
 *                    log-prob (rollout/sampling.py's `sample` without top-p, same hash, same draws)
 *
 * bf16: an engine in bfloat16 keeps its weights and matmuls in bf16 and everything here in fp32 (the
 * residual stream, norms, attention, the KV cache). The matmuls' bf16 outputs are read, and their
 * bf16 inputs written, by these functions directly (`*_bf16` flags), so a bf16 step costs no extra
 * conversion passes. Rounding to bf16 is round-to-nearest-even, as torch's `.to(torch.bfloat16)`.
 *
 * Built at first use by r1lab/modeling/cbuild.py with the system C compiler (-O3 -march=native
 * -fopenmp) and checked by r1lab/rollout/native.py against the PyTorch path it replaces
 * (kernels.py); see that module.
 * OpenMP is PyTorch's own libgomp, so the thread pool is shared.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "r1lab_math.h"

/* Rotate one head (HF's rotate_half convention): out = [x1 c - x2 s, x2 c + x1 s] * mul. */
static inline void rope_head(const float *restrict x, const float *restrict c, const float *restrict s,
                             float *restrict out, int64_t half, float mul) {
    #pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
        const float x1 = x[j], x2 = x[j + half];
        out[j] = (x1 * c[j] - x2 * s[j]) * mul;
        out[j + half] = (x2 * c[j] + x1 * s[j]) * mul;
    }
}

/* out[t] = q . k[t, :] for t < n (rows cst apart), four keys at a time: four independent
 * accumulations instead of one long dependency chain per key. */
static inline __attribute__((always_inline)) void dot_rows(const float *restrict q, const float *restrict k,
                                                           int64_t cst, int64_t n, float *restrict out,
                                                           int64_t D) {
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const float *k0 = k + t * cst, *k1 = k0 + cst, *k2 = k1 + cst, *k3 = k2 + cst;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        #pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t d = 0; d < D; ++d) {
            a0 += q[d] * k0[d];
            a1 += q[d] * k1[d];
            a2 += q[d] * k2[d];
            a3 += q[d] * k3[d];
        }
        out[t] = a0, out[t + 1] = a1, out[t + 2] = a2, out[t + 3] = a3;
    }
    for (; t < n; ++t) {
        const float *kr = k + t * cst;
        float acc = 0.f;
        #pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += q[d] * kr[d];
        out[t] = acc;
    }
}

/* out[D] = sum_t w[t] v[t, :] (rows cst apart). With D a compile-time constant (attend_core) the
 * sum stays in registers across t instead of going through memory once per key. */
static inline __attribute__((always_inline)) void weighted_sum(const float *restrict w, const float *restrict v,
                                                               int64_t cst, int64_t n, float *restrict out,
                                                               int64_t D) {
    float acc[D];
    #pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
    for (int64_t t = 0; t < n; ++t) {
        const float wt = w[t], *restrict vr = v + t * cst;
        #pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += wt * vr[d];
    }
    memcpy(out, acc, sizeof(float) * (size_t)D);
}

/* Store one new key, rotated by the angles c, sn (D/2 each; NULL: no RoPE), and its value. */
static inline __attribute__((always_inline)) void write_kv(const float *ksrc, const float *vsrc, const float *c,
                                                           const float *sn, float *kdst, float *vdst, int64_t D) {
    if (c)
        rope_head(ksrc, c, sn, kdst, D / 2, 1.0f);
    else
        memcpy(kdst, ksrc, sizeof(float) * (size_t)D);
    memcpy(vdst, vsrc, sizeof(float) * (size_t)D);
}

/* The G query heads q (G * D) of one key head, at position p, attend to that head's keys and
 * values 0..p (rows cst apart in kb, vb); out o (G * D). Inlined with D a compile-time constant
 * (64, 128) where it can be, so its loops unroll and sums stay in registers. qs: G * D floats of
 * scratch, s: G * (p + 1). */
static inline __attribute__((always_inline)) void attend_core(
    const float *q, const float *cos_t, const float *sin_t, int64_t p, const float *kb, const float *vb,
    int64_t cst, float *o, int64_t G, float scale, float *qs, float *s, int64_t D) {
    const int64_t half = D / 2, n = p + 1;
    if (cos_t) {
        for (int64_t g = 0; g < G; ++g)
            rope_head(q + g * D, cos_t + p * half, sin_t + p * half, qs + g * D, half, scale);
    } else {
        for (int64_t i = 0; i < G * D; ++i) qs[i] = q[i] * scale;
    }
    for (int64_t g = 0; g < G; ++g) dot_rows(qs + g * D, kb, cst, n, s + g * n, D);
    for (int64_t g = 0; g < G; ++g) {
        float *sg = s + g * n, m = -INFINITY, z = 0.f;
        for (int64_t t = 0; t < n; ++t) m = sg[t] > m ? sg[t] : m;
        #pragma omp simd reduction(+ : z)
        for (int64_t t = 0; t < n; ++t) {
            sg[t] = fast_expf(sg[t] - m);
            z += sg[t];
        }
        const float inv = 1.f / z;
        #pragma omp simd
        for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
    }
    for (int64_t g = 0; g < G; ++g) weighted_sum(s + g * n, vb, cst, n, o + g * D, D);
}

#define ATTEND_CORE(q, p, kb, vb, cst, o)                                                       \
    do {                                                                                       \
        if (D == 64)                                                                           \
            attend_core(q, cos_t, sin_t, p, kb, vb, cst, o, G, scale, qs, s, 64);              \
        else if (D == 128)                                                                     \
            attend_core(q, cos_t, sin_t, p, kb, vb, cst, o, G, scale, qs, s, 128);             \
        else                                                                                   \
            attend_core(q, cos_t, sin_t, p, kb, vb, cst, o, G, scale, qs, s, D);               \
    } while (0)

/* Pointers to the q heads of key head hk (G * D), its new key and value (D each) in one row of the
 * fused projection, widened into wq (scratch of (G + 2) * D floats) when the row is bf16. */
static inline void qkv_parts(const void *qkv, int64_t n, int64_t qkv_sb, int bf16, int64_t H, int64_t Hkv,
                             int64_t hk, int64_t G, int64_t D, float *wq, const float **q, const float **k,
                             const float **v) {
    if (bf16) {
        const uint16_t *row = (const uint16_t *)qkv + n * qkv_sb;
        widen(row + hk * G * D, wq, G * D);
        widen(row + (H + hk) * D, wq + G * D, D);
        widen(row + (H + Hkv + hk) * D, wq + (G + 1) * D, D);
        *q = wq, *k = wq + G * D, *v = wq + (G + 1) * D;
    } else {
        const float *row = (const float *)qkv + n * qkv_sb;
        *q = row + hk * G * D, *k = row + (H + hk) * D, *v = row + (H + Hkv + hk) * D;
    }
}

/* qkv [B, (H + 2 Hkv) * D] with row stride qkv_sb (elements): the fused projection, q heads then k
 * then v, fp32, or bf16 when qkv_bf16. cos_t, sin_t [>= tmax, D/2] (NULL: no RoPE, as GPT-2).
 * pos[b]: row b's new position, 0 <= pos[b] < tmax (the caller passes the smaller of the cache's and
 * the table's lengths). kc, vc: this layer's fp32 cache [S, Hkv, tmax, D] with strides (csb, csh,
 * cst), unit on D. out [B, H * D], fp32 or bf16 when out_bf16. Row b's key/value go to position
 * pos[b]; its query (head hk*G + g) attends to positions 0..pos[b] of key head hk. Returns -1,
 * touching nothing, if a position is out of range, and -2 if scratch memory could not be
 * allocated. */
int r1lab_attend(const void *qkv, int64_t qkv_sb, int qkv_bf16, const float *cos_t, const float *sin_t,
                 const int64_t *pos, float *kc, float *vc, int64_t csb, int64_t csh, int64_t cst,
                 void *out, int out_bf16, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t tmax,
                 float scale, int threads) {
    const int64_t G = H / Hkv;
    int failed = 0;
    for (int64_t b = 0; b < B; ++b)
        if (pos[b] < 0 || pos[b] >= tmax) return -1;
    #pragma omp parallel num_threads(threads)
    {
        /* per thread: the G rotated, pre-scaled queries, the scores of one (row, key head), the
         * widened q, k, v of that pair (bf16 only) and its fp32 output (bf16 only) */
        float *buf = (float *)malloc(sizeof(float) * (size_t)(G * D + G * tmax + (G + 2) * D + G * D));
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * Hkv; ++bh) {
            const int64_t b = bh / Hkv, hk = bh % Hkv;
            if (!buf) {
                #pragma omp atomic write
                failed = 1;
                continue;
            }
            float *qs = buf, *s = qs + G * D, *wq = s + G * tmax, *ob = wq + (G + 2) * D;
            float *kb = kc + b * csb + hk * csh, *vb = vc + b * csb + hk * csh;
            const float *q, *ksrc, *vsrc;
            qkv_parts(qkv, b, qkv_sb, qkv_bf16, H, Hkv, hk, G, D, wq, &q, &ksrc, &vsrc);
            const int64_t p = pos[b], half = D / 2;
            write_kv(ksrc, vsrc, cos_t ? cos_t + p * half : NULL, sin_t ? sin_t + p * half : NULL, kb + p * cst,
                     vb + p * cst, D);
            /* the G heads of this key head are adjacent in the output */
            float *o = out_bf16 ? ob : (float *)out + b * H * D + hk * G * D;
            ATTEND_CORE(q, p, kb, vb, cst, o);
            if (out_bf16) narrow(o, (uint16_t *)out + b * H * D + hk * G * D, G * D);
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

/* Causal attention over prompts packed back to back (the prefill): token n sits at position pos[n]
 * of its prompt, which starts at token n - pos[n], and attends to that prompt's tokens up to itself.
 * qkv as in r1lab_attend, [N, (H + 2 Hkv) * D]. k_out, v_out [N, Hkv, D] fp32 receive every token's
 * rotated key and its value (what the engine caches); out [N, H * D] (fp32, or bf16 when out_bf16).
 * Returns -1, touching nothing, unless every pos[n] is 0 or pos[n - 1] + 1 and below tmax; -2 without
 * memory. */
int r1lab_prefill_attend(const void *qkv, int64_t qkv_sb, int qkv_bf16, const float *cos_t, const float *sin_t,
                         const int64_t *pos, float *k_out, float *v_out, void *out, int out_bf16, int64_t N,
                         int64_t H, int64_t Hkv, int64_t D, int64_t tmax, float scale, int threads) {
    const int64_t G = H / Hkv, cst = Hkv * D;
    int64_t longest = 0;
    int failed = 0;
    for (int64_t n = 0; n < N; ++n) {
        /* a prompt starts at 0 and counts up by one: nothing else keeps tokens inside their prompt */
        if (pos[n] >= tmax || (pos[n] != 0 && (n == 0 || pos[n] != pos[n - 1] + 1))) return -1;
        longest = pos[n] + 1 > longest ? pos[n] + 1 : longest;
    }
    #pragma omp parallel num_threads(threads)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(G * D + G * longest + (G + 2) * D + G * D));
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        /* every key and value first: a token's attention reads those of the tokens before it */
        #pragma omp for schedule(static)
        for (int64_t nh = 0; nh < N * Hkv; ++nh) {
            const int64_t n = nh / Hkv, hk = nh % Hkv;
            if (!buf) continue;
            const float *q, *ksrc, *vsrc;
            qkv_parts(qkv, n, qkv_sb, qkv_bf16, H, Hkv, hk, G, D, buf + G * D + G * longest, &q, &ksrc, &vsrc);
            const int64_t p = pos[n], half = D / 2;
            write_kv(ksrc, vsrc, cos_t ? cos_t + p * half : NULL, sin_t ? sin_t + p * half : NULL,
                     k_out + n * cst + hk * D, v_out + n * cst + hk * D, D);
        }
        #pragma omp for schedule(static)
        for (int64_t nh = 0; nh < N * Hkv; ++nh) {
            const int64_t n = nh / Hkv, hk = nh % Hkv;
            if (!buf) continue;
            float *qs = buf, *s = qs + G * D, *wq = s + G * longest, *ob = wq + (G + 2) * D;
            const float *q, *ksrc, *vsrc;
            qkv_parts(qkv, n, qkv_sb, qkv_bf16, H, Hkv, hk, G, D, wq, &q, &ksrc, &vsrc);
            const int64_t start = n - pos[n];
            const float *kb = k_out + start * cst + hk * D, *vb = v_out + start * cst + hk * D;
            float *o = out_bf16 ? ob : (float *)out + n * H * D + hk * G * D;
            ATTEND_CORE(q, pos[n], kb, vb, cst, o);
            if (out_bf16) narrow(o, (uint16_t *)out + n * H * D + hk * G * D, G * D);
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

/* x [B, d] fp32 += delta (if not NULL; fp32, or bf16 when delta_bf16), then out [B, d] = norm(x) * w
 * (+ bias), fp32 or bf16 when out_bf16: RMSNorm when bias is NULL and layer_norm is 0, LayerNorm
 * (biased variance, optional bias) when layer_norm is 1. */
void r1lab_add_norm(float *x, const void *delta, int delta_bf16, const float *w, const float *bias, void *out,
                    int out_bf16, int64_t B, int64_t d, float eps, int layer_norm, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (B * d >= 65536)
    for (int64_t b = 0; b < B; ++b) {
        float *restrict xr = x + b * d;
        if (delta && delta_bf16) {
            const uint16_t *restrict dr = (const uint16_t *)delta + b * d;
            #pragma omp simd
            for (int64_t i = 0; i < d; ++i) xr[i] += bf16_to_f32(dr[i]);
        } else if (delta) {
            const float *restrict dr = (const float *)delta + b * d;
            #pragma omp simd
            for (int64_t i = 0; i < d; ++i) xr[i] += dr[i];
        }
        float mean = 0.f, ss = 0.f;
        if (layer_norm) {
            #pragma omp simd reduction(+ : mean)
            for (int64_t i = 0; i < d; ++i) mean += xr[i];
            mean /= (float)d;
        }
        #pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; ++i) ss += (xr[i] - mean) * (xr[i] - mean);
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        if (out_bf16) {
            uint16_t *restrict o = (uint16_t *)out + b * d;
            #pragma omp simd
            for (int64_t i = 0; i < d; ++i)
                o[i] = f32_to_bf16((xr[i] - mean) * r * w[i] + (bias ? bias[i] : 0.f));
        } else if (bias) {
            float *restrict o = (float *)out + b * d;
            #pragma omp simd
            for (int64_t i = 0; i < d; ++i) o[i] = (xr[i] - mean) * r * w[i] + bias[i];
        } else {
            float *restrict o = (float *)out + b * d;
            #pragma omp simd
            for (int64_t i = 0; i < d; ++i) o[i] = (xr[i] - mean) * r * w[i];
        }
    }
}

static inline __attribute__((always_inline)) float silu_mul(float gate, float up) {
    return gate / (1.0f + fast_expf(-gate)) * up;
}

/* u [B, 2F] = [gate | up] -> out [B, F] = silu(gate) * up; u and out each fp32 or bf16. */
void r1lab_swiglu(const void *u, int in_bf16, void *out, int out_bf16, int64_t B, int64_t F, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (B * F >= 65536)
    for (int64_t b = 0; b < B; ++b) {
        if (in_bf16 && out_bf16) {
            const uint16_t *restrict gate = (const uint16_t *)u + b * 2 * F, *restrict up = gate + F;
            uint16_t *restrict o = (uint16_t *)out + b * F;
            #pragma omp simd
            for (int64_t i = 0; i < F; ++i) o[i] = f32_to_bf16(silu_mul(bf16_to_f32(gate[i]), bf16_to_f32(up[i])));
        } else if (in_bf16) {
            const uint16_t *restrict gate = (const uint16_t *)u + b * 2 * F, *restrict up = gate + F;
            float *restrict o = (float *)out + b * F;
            #pragma omp simd
            for (int64_t i = 0; i < F; ++i) o[i] = silu_mul(bf16_to_f32(gate[i]), bf16_to_f32(up[i]));
        } else if (out_bf16) {
            const float *restrict gate = (const float *)u + b * 2 * F, *restrict up = gate + F;
            uint16_t *restrict o = (uint16_t *)out + b * F;
            #pragma omp simd
            for (int64_t i = 0; i < F; ++i) o[i] = f32_to_bf16(silu_mul(gate[i], up[i]));
        } else {
            const float *restrict gate = (const float *)u + b * 2 * F, *restrict up = gate + F;
            float *restrict o = (float *)out + b * F;
            #pragma omp simd
            for (int64_t i = 0; i < F; ++i) o[i] = silu_mul(gate[i], up[i]);
        }
    }
}

static inline __attribute__((always_inline)) float gelu_tanh1(float v) {
    const float y = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (2.0f - 2.0f / (fast_expf(2.0f * y) + 1.0f));
}

/* x [n] in place (fp32, or bf16 when bf16): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with
 * tanh(y) = 1 - 2/(e^{2y}+1). */
void r1lab_gelu_tanh(void *x, int bf16, int64_t n, int threads) {
    if (bf16) {
        uint16_t *h = (uint16_t *)x;
        #pragma omp parallel for simd num_threads(threads) schedule(static) if (n >= 65536)
        for (int64_t i = 0; i < n; ++i) h[i] = f32_to_bf16(gelu_tanh1(bf16_to_f32(h[i])));
    } else {
        float *f = (float *)x;
        #pragma omp parallel for simd num_threads(threads) schedule(static) if (n >= 65536)
        for (int64_t i = 0; i < n; ++i) f[i] = gelu_tanh1(f[i]);
    }
}

/* log(x) for normal, positive float x, vectorisable: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
 * log(m) by Cephes' logf polynomial. Relative error ~1e-7. */
static inline __attribute__((always_inline)) float fast_logf(float x) {
    union { float f; int32_t i; } v = {.f = x};
    float e = (float)(((v.i >> 23) & 0xff) - 126);
    v.i = (v.i & 0x807fffff) | 0x3f000000; /* mantissa in [0.5, 1) */
    float m = v.f;
    const int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = fmaf(y, m, -1.1514610310e-1f);
    y = fmaf(y, m, 1.1676998740e-1f);
    y = fmaf(y, m, -1.2420140846e-1f);
    y = fmaf(y, m, 1.4249322787e-1f);
    y = fmaf(y, m, -1.6668057665e-1f);
    y = fmaf(y, m, 2.0000714765e-1f);
    y = fmaf(y, m, -2.4999993993e-1f);
    y = fmaf(y, m, 3.3333331174e-1f);
    y = y * m * z;
    y = fmaf(e, -2.12194440e-4f, y);
    y = fmaf(-0.5f, z, y);
    return fmaf(e, 0.693359375f, m + y);
}

/* lowbias32 (C. Wellons): sampling.py's `_mix32` on uint32. */
static inline __attribute__((always_inline)) uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

/* logits [B, V] -> tokens [B], logp [B] (log-softmax of the raw logits at the token). Row b with
 * temperature[b] == 0 takes the argmax; else argmax(logits / T + g) with g = -log(-log u) and u
 * the uniform that sampling.uniform gives for (keys[b], counters[b], token id). Ties go to the
 * lowest id, as torch.argmax. Returns -2 if scratch memory could not be allocated, else 0. */
int r1lab_sample(const float *logits, int64_t B, int64_t V, const float *temperature, const int64_t *keys,
                  const int64_t *counters, int64_t *tokens, float *logp, int threads) {
    uint32_t *col = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)V); /* the token ids' half of the hash */
    if (!col) return -2;
    #pragma omp simd
    for (int64_t v = 0; v < V; ++v) col[v] = mix32((uint32_t)v + 0x5BD1E995u);
    #pragma omp parallel for num_threads(threads) schedule(static) if (B * V >= 16384)
    for (int64_t b = 0; b < B; ++b) {
        const float *l = logits + b * V;
        float m = -INFINITY;
        for (int64_t v = 0; v < V; ++v) m = l[v] > m ? l[v] : m;
        float z = 0.f;
        #pragma omp simd reduction(+ : z)
        for (int64_t v = 0; v < V; ++v) z += fast_expf(l[v] - m);
        const float lse = m + logf(z);
        const float temp = temperature[b];
        int64_t best = 0;
        if (temp == 0.f) {
            for (int64_t v = 1; v < V; ++v)
                if (l[v] > l[best]) best = v;
        } else {
            const uint32_t row = mix32((uint32_t)keys[b] ^ mix32((uint32_t)counters[b] * 0x9E3779B1u));
            const float t = temp > 1e-6f ? temp : 1e-6f;
            float top = -INFINITY;
            for (int64_t v0 = 0; v0 < V; v0 += 64) {
                float sc[64];
                const int64_t nv = V - v0 < 64 ? V - v0 : 64;
                #pragma omp simd
                for (int64_t j = 0; j < nv; ++j) {
                    const uint32_t bits = mix32(row ^ col[v0 + j]);
                    const float u = ((float)(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
                    sc[j] = l[v0 + j] / t - fast_logf(-fast_logf(u));
                }
                for (int64_t j = 0; j < nv; ++j)
                    if (sc[j] > top) top = sc[j], best = v0 + j;
            }
        }
        tokens[b] = best;
        logp[b] = l[best] - lse;
    }
    free(col);
    return 0;
}
