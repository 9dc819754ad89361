/* f16 x f32 matmul (16-bit weights, f32 activations): out[b, r] = sum_c f32(w[r, c]) * x[b, c].
 *
 * The weights are converted to f32 as they are read (F16C vcvtph2ps on x86, fcvtl on NEON; the
 * scalar path uses dl_f16_to_f32_scalar) and multiplied in f32. Any cols (no block constraint).
 * Summation order: scalar sums columns in order; SIMD paths keep 8 / 16 / 4 partial sums, so they
 * agree with the scalar one up to float rounding. Each output is computed by one thread with the
 * same operations whatever the thread count.
 */
#include "dl_internal.h"
#include <string.h>
#if DL_X86
#include <immintrin.h>
#endif
#if DL_NEON
#include <arm_neon.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* scalar reference */

void dl_matmul_f16_rows_scalar(float *out, const uint16_t *w, const float *x,
                               int r0, int r1, int rows, int cols, int batch) {
    for (int r = r0; r < r1; r++) {
        const uint16_t *wr = w + (size_t)r * cols;
        for (int b = 0; b < batch; b++) {
            const float *xb = x + (size_t)b * cols;
            float sum = 0.0f;
            for (int c = 0; c < cols; c++) sum += dl_f16_to_f32_scalar(dl_ld16(wr + c)) * xb[c];
            out[(size_t)b * rows + r] = sum;
        }
    }
}

#if DL_X86
/* ------------------------------------------------------------------------------------------ */
/* AVX2 + FMA + F16C: R rows x B batch rows, 8 columns per step */

DL_INLINE DL_TARGET_AVX2 void f16_tile_avx2(float *out, const uint16_t *w, const float *x, int cols,
                                           int rows, int r, int b, const int R, const int B) {
    __m256 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= cols; c += 8) {
        __m256 wv[4];
        for (int i = 0; i < R; i++)
            wv[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + (size_t)(r + i) * cols + c)));
        for (int j = 0; j < B; j++) {
            const __m256 xv = _mm256_loadu_ps(x + (size_t)(b + j) * cols + c);
            for (int i = 0; i < R; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) {
            float s = dl_hsum256(acc[i][j]);
            const uint16_t *wr = w + (size_t)(r + i) * cols;
            const float *xb = x + (size_t)(b + j) * cols;
            for (int cc = c; cc < cols; cc++) s += _cvtsh_ss(dl_ld16(wr + cc)) * xb[cc];
            out[(size_t)(b + j) * rows + r + i] = s;
        }
}

DL_TARGET_AVX2 void dl_matmul_f16_rows_avx2(float *out, const uint16_t *w, const float *x,
                                            int r0, int r1, int rows, int cols, int batch) {
    const int BT = batch == 1 ? 1 : 2, RT = batch == 1 ? dl_matvec_tile_rows((size_t)cols * 2) : 4;
    for (int r = r0; r < r1; r += RT) {
        const int R = r1 - r < RT ? r1 - r : RT;
        for (int b = 0; b < batch; b += BT) {
            const int B = batch - b < BT ? batch - b : BT;
            DL_TILE_SWITCH(f16_tile_avx2, R, B, out, w, x, cols, rows, r, b);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512: 16 columns per step, masked tail */

DL_INLINE DL_TARGET_AVX512 void f16_tile_avx512(float *out, const uint16_t *w, const float *x, int cols,
                                               int rows, int r, int b, const int R, const int B) {
    __m512 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm512_setzero_ps();
    for (int c = 0; c < cols; c += 16) {
        const __mmask16 m = cols - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - c)) - 1);
        __m512 wv[4];
        for (int i = 0; i < R; i++)
            wv[i] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const void *)(w + (size_t)(r + i) * cols + c)));
        for (int j = 0; j < B; j++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + (size_t)(b + j) * cols + c);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) out[(size_t)(b + j) * rows + r + i] = _mm512_reduce_add_ps(acc[i][j]);
}

DL_TARGET_AVX512 void dl_matmul_f16_rows_avx512(float *out, const uint16_t *w, const float *x,
                                                int r0, int r1, int rows, int cols, int batch) {
    const int RT = batch == 1 ? dl_matvec_tile_rows((size_t)cols * 2) : 4;
    for (int r = r0; r < r1; r += RT) {
        const int R = r1 - r < RT ? r1 - r : RT;
        for (int b = 0; b < batch; b += 4) {
            const int B = batch - b < 4 ? batch - b : 4;
            DL_TILE_SWITCH(f16_tile_avx512, R, B, out, w, x, cols, rows, r, b);
        }
    }
}
#endif /* DL_X86 */

#if DL_NEON
/* ------------------------------------------------------------------------------------------ */
/* NEON: 8 columns per step (two fcvtl of 4 halves), per (row, batch row) */

void dl_matmul_f16_rows_neon(float *out, const uint16_t *w, const float *x,
                             int r0, int r1, int rows, int cols, int batch) {
    for (int r = r0; r < r1; r++) {
        const uint16_t *wr = w + (size_t)r * cols;
        for (int b = 0; b < batch; b++) {
            const float *xb = x + (size_t)b * cols;
            float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
            int c = 0;
            for (; c + 8 <= cols; c += 8) {
                const uint16x8_t h = vld1q_u16(wr + c);
                const float32x4_t w0 = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
                const float32x4_t w1 = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)));
                a0 = vfmaq_f32(a0, w0, vld1q_f32(xb + c));
                a1 = vfmaq_f32(a1, w1, vld1q_f32(xb + c + 4));
            }
            float sum = vaddvq_f32(vaddq_f32(a0, a1));
            for (; c < cols; c++) sum += dl_f16_to_f32_scalar(dl_ld16(wr + c)) * xb[c];
            out[(size_t)b * rows + r] = sum;
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* public entry point: split rows over the pool */

typedef struct {
    float *out;
    const uint16_t *w;
    const float *x;
    int rows, cols, batch;
    void (*fn)(float *, const uint16_t *, const float *, int, int, int, int, int);
} f16_ctx;

static void f16_range(void *vctx, int64_t s, int64_t e) {
    f16_ctx *c = (f16_ctx *)vctx;
    c->fn(c->out, c->w, c->x, (int)s, (int)e, c->rows, c->cols, c->batch);
}

void dl_matmul_f16_f32(float *out, const uint16_t *w, const float *x, int rows, int cols, int batch) {
    if (rows <= 0 || batch <= 0) return;
    f16_ctx c = {out, w, x, rows, cols, batch, dl_k.matmul_f16_rows};
    dl_parallel_for(rows, 4, f16_range, &c);
}
