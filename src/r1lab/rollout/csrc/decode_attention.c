/* Decode attention for the CPU engine: one new query per row against that row's cached keys/values.
 *
 * q [B, H, G, D] (G query heads share key head h), keys/vals [B, H, T, D] as strided views of the
 * engine's cache (unit stride on D), lens[b] = positions row b attends to (its keys 0..lens[b]-1).
 * out [B, H, G, D] contiguous. Per (row, key head), in one pass over its keys and one over its
 * values: scores = scale * q.k, softmax over the row's own length, out = probs . v. Rows never
 * read past their length, so no mask is built and nothing past it is touched.
 *
 * Built at first use by r1lab/rollout/native.py with the system C compiler (-O3 -march=native
 * -fopenmp); see that module for why it exists and how it is checked.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

void r1lab_decode_attention(const float *q, const float *keys, const float *vals, const int64_t *lens,
                            float *out, int64_t B, int64_t H, int64_t G, int64_t D, int64_t T,
                            int64_t qsb, int64_t qsh, int64_t qsg,
                            int64_t ksb, int64_t ksh, int64_t kst,
                            int64_t vsb, int64_t vsh, int64_t vst,
                            float scale, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(G * T));  /* scores of one (row, head) */
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            const int64_t b = bh / H, h = bh % H;
            const int64_t n = lens[b] < T ? lens[b] : T;
            const float *kb = keys + b * ksb + h * ksh, *vb = vals + b * vsb + h * vsh;
            const float *qb = q + b * qsb + h * qsh;
            for (int64_t t = 0; t < n; ++t) {
                const float *kr = kb + t * kst;
                for (int64_t g = 0; g < G; ++g) {
                    const float *qr = qb + g * qsg;
                    float acc = 0.f;
                    #pragma omp simd reduction(+ : acc)
                    for (int64_t d = 0; d < D; ++d) acc += qr[d] * kr[d];
                    s[g * T + t] = acc * scale;
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                float *sg = s + g * T, m = -INFINITY, z = 0.f;
                for (int64_t t = 0; t < n; ++t) m = sg[t] > m ? sg[t] : m;
                for (int64_t t = 0; t < n; ++t) { sg[t] = expf(sg[t] - m); z += sg[t]; }
                const float inv = 1.f / z;
                float *o = out + ((b * H + h) * G + g) * D;
                for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
                for (int64_t t = 0; t < n; ++t) {
                    const float w = sg[t] * inv, *vr = vb + t * vst;
                    #pragma omp simd
                    for (int64_t d = 0; d < D; ++d) o[d] += w * vr[d];
                }
            }
        }
        free(s);
    }
}
