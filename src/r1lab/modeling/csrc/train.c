/* The training forward's work between its matmuls, with the backward of each: r1lab's own forward
 * of Llama-family models (modeling/fused.py) calls these.
 *
 * PyTorch's autograd runs RMSNorm as ~6 kernels forward and ~10 backward, RoPE as a dozen (slices,
 * a concatenation, products) and SwiGLU as 3 forward and 5 backward, each a pass over memory; under
 * bf16 autocast every projection also casts its input again. Here each is one pass each way:
 *
 *   r1lab_norm_fwd   RMSNorm (HF's order of operations) or LayerNorm; out fp32 or bf16
 *   r1lab_norm_bwd   dx and per-thread partial sums of dw (and db), from x, w, the saved statistics
 *                    and dy (fp32 or bf16)
 *   r1lab_swiglu     silu(gate) * up from the fused [gate | up] projection, forward or backward
 *   r1lab_gelu       GPT-2's tanh GELU, forward or backward
 *   r1lab_rope_move  RoPE of the q and k heads of each token's fused q|k|v projection, the row
 *                    copied to slot[t] of the attention layout (rows of packed sequences); or its
 *                    backward: row slot[t] gathered back and rotated by -angle
 *
 * Arithmetic is fp32 whatever the dtype of the tensors read or written (bf16 rows are widened into a
 * per-thread fp32 buffer); bf16 is rounded to nearest even, as torch's `.to(torch.bfloat16)`.
 * Built by r1lab/modeling/cbuild.py; probed against PyTorch by r1lab/modeling/fused.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "r1lab_math.h"

/* row i of a [n, cols] tensor of fp32 (bf16 == 0) or bf16 into/out of an fp32 buffer */
static inline void get_row(const void *src, int bf16, int64_t i, int64_t cols, float *restrict buf) {
    if (bf16) widen((const uint16_t *)src + i * cols, buf, cols);
    else memcpy(buf, (const float *)src + i * cols, (size_t)cols * sizeof(float));
}
static inline void put_row(void *dst, int bf16, int64_t i, int64_t cols, const float *restrict buf) {
    if (bf16) narrow(buf, (uint16_t *)dst + i * cols, cols);
    else memcpy((float *)dst + i * cols, buf, (size_t)cols * sizeof(float));
}

/* The loop every kernel here runs: BODY for each row t in [0, T), rows split over `threads` OpenMP
 * threads (one thread when `par` is false: too little work), each thread with an fp32 scratch
 * buffer `buf` of n floats; the function then returns 0, or -1 when a buffer could not be allocated
 * (its rows are skipped). */
#define FOR_ROWS(T, n, par, ...)                                                 \
    int failed = 0;                                                              \
    const int parallel = (par);                                                  \
    _Pragma("omp parallel num_threads(threads) if (parallel)")                   \
    {                                                                            \
        float *buf = malloc((size_t)(n) * sizeof(float));                        \
        if (!buf) {                                                              \
            _Pragma("omp atomic write")                                          \
            failed = 1;                                                          \
        }                                                                        \
        _Pragma("omp for schedule(static)")                                      \
        for (int64_t t = 0; t < (T); ++t) {                                      \
            if (!buf) continue;                                                  \
            __VA_ARGS__                                                          \
        }                                                                        \
        free(buf);                                                               \
    }                                                                            \
    return failed ? -1 : 0

/* x [T, d] fp32 -> out [T, d] (fp32 or bf16). RMSNorm (layer_norm 0): out = w * (x * rstd),
 * rstd = 1 / sqrt(mean(x^2) + eps), HF's order of operations. LayerNorm (layer_norm 1): out =
 * (x - mean) * rstd * w + b (biased variance; b may be NULL), mean [T] written too. Returns -1 when a
 * thread could not allocate its buffer. */
int r1lab_norm_fwd(const float *x, const float *w, const float *b, float eps, int layer_norm, void *out,
                   int out_bf16, float *mean, float *rstd, int64_t T, int64_t d, int threads) {
    FOR_ROWS(T, d, T * d >= 32768, {
        const float *restrict xr = x + t * d;
        float mu = 0.f, ss = 0.f;
        if (layer_norm) {
            _Pragma("omp simd reduction(+ : mu)")
            for (int64_t i = 0; i < d; ++i) mu += xr[i];
            mu /= (float)d;
            mean[t] = mu;
        }
        _Pragma("omp simd reduction(+ : ss)")
        for (int64_t i = 0; i < d; ++i) ss += (xr[i] - mu) * (xr[i] - mu);
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        rstd[t] = r;
        if (layer_norm) {
            _Pragma("omp simd")
            for (int64_t i = 0; i < d; ++i) buf[i] = (xr[i] - mu) * r * w[i] + (b ? b[i] : 0.f);
        } else {
            _Pragma("omp simd")
            for (int64_t i = 0; i < d; ++i) buf[i] = w[i] * (xr[i] * r);
        }
        put_row(out, out_bf16, t, d, buf);
    });
}

/* The backward of r1lab_norm_fwd, with xhat = (x - mean) * rstd (mean 0 for RMSNorm) and g = dy * w:
 * dx [T, d] fp32 = rstd * (g - [mean(g)] - xhat * mean(g * xhat)), the bracket for LayerNorm only.
 * dw_part [threads, d] gets each thread's sum of dy * xhat and db_part (unless NULL) its sum of dy;
 * the caller sums the rows. dy fp32 or bf16. */
int r1lab_norm_bwd(const float *x, const float *w, const float *mean, const float *rstd, int layer_norm,
                   const void *dy, int dy_bf16, float *dx, float *dw_part, float *db_part, int64_t T, int64_t d,
                   int threads) {
    memset(dw_part, 0, (size_t)threads * (size_t)d * sizeof(float));
    if (db_part) memset(db_part, 0, (size_t)threads * (size_t)d * sizeof(float));
    FOR_ROWS(T, d, 1, {
        const int64_t tid = omp_get_thread_num();
        float *restrict dw = dw_part + tid * d;
        float *restrict db = db_part ? db_part + tid * d : NULL;
        const float *restrict xr = x + t * d;
        float *restrict dxr = dx + t * d;
        const float r = rstd[t], mu = layer_norm ? mean[t] : 0.f;
        get_row(dy, dy_bf16, t, d, buf);
        float dot = 0.f, gsum = 0.f;
        _Pragma("omp simd reduction(+ : dot, gsum)")
        for (int64_t i = 0; i < d; ++i) {
            const float xh = (xr[i] - mu) * r, g = buf[i] * w[i];
            dot += g * xh;
            gsum += g;
            dw[i] += buf[i] * xh;
        }
        if (db) {
            _Pragma("omp simd")
            for (int64_t i = 0; i < d; ++i) db[i] += buf[i];
        }
        const float c = dot / (float)d, m = layer_norm ? gsum / (float)d : 0.f;
        _Pragma("omp simd")
        for (int64_t i = 0; i < d; ++i) dxr[i] = r * (buf[i] * w[i] - m - (xr[i] - mu) * r * c);
    });
}

/* gu [T, 2F] = [gate | up] -> out [T, F] = silu(gate) * up (dy NULL), or its backward (dy [T, F]
 * given): out [T, 2F] = [dy * up * s * (1 + gate * (1 - s)) | dy * silu(gate)], s = sigmoid(gate).
 * Each tensor fp32 or bf16. */
int r1lab_swiglu(const void *gu, int in_bf16, const void *dy, int dy_bf16, void *out, int out_bf16, int64_t T,
                 int64_t F, int threads) {
    FOR_ROWS(T, 5 * F, T * F >= 32768, {
        float *restrict g = buf, *restrict dyr = buf + 2 * F, *restrict o = buf + 3 * F;
        get_row(gu, in_bf16, t, 2 * F, g);
        if (dy) {
            get_row(dy, dy_bf16, t, F, dyr);
            _Pragma("omp simd")
            for (int64_t i = 0; i < F; ++i) {
                const float s = 1.0f / (1.0f + fast_expf(-g[i]));
                o[i] = dyr[i] * g[F + i] * s * (1.0f + g[i] * (1.0f - s));
                o[F + i] = dyr[i] * g[i] * s;
            }
            put_row(out, out_bf16, t, 2 * F, o);
        } else {
            _Pragma("omp simd")
            for (int64_t i = 0; i < F; ++i) o[i] = g[i] / (1.0f + fast_expf(-g[i])) * g[F + i];
            put_row(out, out_bf16, t, F, o);
        }
    });
}

/* GPT-2's GELU, 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi), with tanh(y) = 1 - 2/(e^{2y}+1);
 * its derivative 0.5 (1 + tanh) + 0.5 x (1 - tanh^2) k (1 + 3 * 0.044715 x^2). */
static inline __attribute__((always_inline)) float tanh_of(float y) { return 1.0f - 2.0f / (fast_expf(2.0f * y) + 1.0f); }
static inline __attribute__((always_inline)) float gelu1(float x) {
    return 0.5f * x * (1.0f + tanh_of(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
static inline __attribute__((always_inline)) float gelu_grad1(float x) {
    const float th = tanh_of(0.7978845608028654f * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * 0.7978845608028654f * (1.0f + 0.134145f * x * x);
}

/* u [T, F] -> out [T, F] = gelu(u) (mode 0), or the backward dx = dy * gelu'(u) (mode 1, dy given);
 * each tensor fp32 or bf16. */
int r1lab_gelu(const void *u, int in_bf16, const void *dy, int dy_bf16, void *out, int out_bf16, int64_t T,
               int64_t F, int threads) {
    FOR_ROWS(T, 2 * F, T * F >= 32768, {
        float *restrict x = buf, *restrict g = buf + F;
        get_row(u, in_bf16, t, F, x);
        if (dy) {
            get_row(dy, dy_bf16, t, F, g);
            _Pragma("omp simd")
            for (int64_t i = 0; i < F; ++i) x[i] = g[i] * gelu_grad1(x[i]);
        } else {
            _Pragma("omp simd")
            for (int64_t i = 0; i < F; ++i) x[i] = gelu1(x[i]);
        }
        put_row(out, out_bf16, t, F, x);
    });
}

/* Rotate the first nrot heads (of D each) of row x in place by the angle's cos c and sin s [D/2]
 * (HF's rotate_half convention; sign -1 rotates back: the transpose, for the backward). */
static inline void rotate_heads(float *restrict x, int64_t nrot, int64_t D, const float *restrict c,
                                const float *restrict s, float sign) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < nrot; ++h) {
        float *restrict xh = x + h * D;
        #pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
            const float x1 = xh[j], x2 = xh[j + half], sn = sign * s[j];
            xh[j] = x1 * c[j] - x2 * sn;
            xh[j + half] = x2 * c[j] + x1 * sn;
        }
    }
}

/* src [T, C] (C = (H + 2 Hkv) D, the fused q|k|v projection; fp32 or bf16) -> dst [S, C] (same
 * dtype, rows not in slot untouched): dst[slot[t]] = src[t] with its H + Hkv q and k heads rotated
 * by position pos[t] (cos/sin tables [P, D/2] fp32, row p = angle p; NULL: no rotation, a plain
 * scatter, for models with learned positions). inverse = 1 is its backward, from [S, C] to [T, C]:
 * dst[t] = src[slot[t]] rotated by -angle (the transpose). Returns -1 when out of memory, -2 when a
 * position or slot is out of range (nothing written then). */
int r1lab_rope_move(const void *src, int bf16, const float *cos_t, const float *sin_t, const int64_t *pos,
                    const int64_t *slot, void *dst, int inverse, int64_t T, int64_t S, int64_t P, int64_t H,
                    int64_t Hkv, int64_t D, int threads) {
    for (int64_t t = 0; t < T; ++t)
        if (pos[t] < 0 || pos[t] >= P || slot[t] < 0 || slot[t] >= S) return -2;
    const int64_t C = (H + 2 * Hkv) * D, half = D / 2;
    FOR_ROWS(T, C, T * C >= 32768, {
        get_row(src, bf16, inverse ? slot[t] : t, C, buf);
        if (cos_t)
            rotate_heads(buf, H + Hkv, D, cos_t + pos[t] * half, sin_t + pos[t] * half, inverse ? -1.0f : 1.0f);
        put_row(dst, bf16, inverse ? t : slot[t], C, buf);
    });
}
