/* f16 x f32 and bf16 x f32 matmuls (16-bit weights, f32 activations):
 * out[b, r] = sum_c f32(w[r, c]) * x[b, c].
 *
 * The weights are converted to f32 as they are read (f16: F16C vcvtph2ps on x86, fcvtl on NEON,
 * dl_f16_to_f32_scalar on the scalar path; bf16: the 16 bits shifted into the top of an f32, exact)
 * and multiplied in f32. One set of tiles serves both (`bf16` is a constant of each call).
 * Any cols (no block constraint).
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

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float w16(const uint16_t *p, const int bf16) {
    return bf16 ? bf16_to_f32(dl_ld16(p)) : dl_f16_to_f32_scalar(dl_ld16(p));
}

DL_INLINE void w16_rows_scalar(float *out, const uint16_t *w, const float *x, int r0, int r1, int rows, int cols,
                               int batch, const int bf16) {
    for (int r = r0; r < r1; r++) {
        const uint16_t *wr = w + (size_t)r * cols;
        for (int b = 0; b < batch; b++) {
            const float *xb = x + (size_t)b * cols;
            float sum = 0.0f;
            for (int c = 0; c < cols; c++) sum += w16(wr + c, bf16) * xb[c];
            out[(size_t)b * rows + r] = sum;
        }
    }
}

void dl_matmul_f16_rows_scalar(float *out, const uint16_t *w, const float *x,
                               int r0, int r1, int rows, int cols, int batch) {
    w16_rows_scalar(out, w, x, r0, r1, rows, cols, batch, 0);
}

static void bf16_rows_scalar(float *out, const uint16_t *w, const float *x, int r0, int r1, int rows, int cols,
                             int batch) {
    w16_rows_scalar(out, w, x, r0, r1, rows, cols, batch, 1);
}

#if DL_X86
/* ------------------------------------------------------------------------------------------ */
/* AVX2 + FMA + F16C: R rows x B batch rows, 8 columns per step */

DL_INLINE DL_TARGET_AVX2 __m256 w16x8_avx2(const uint16_t *p, const int bf16) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

DL_INLINE DL_TARGET_AVX2 void f16_tile_avx2(float *out, const uint16_t *w, const float *x, int cols,
                                           int rows, int r, int b, const int bf16, const int R, const int B) {
    __m256 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= cols; c += 8) {
        __m256 wv[4];
        for (int i = 0; i < R; i++)
            wv[i] = w16x8_avx2(w + (size_t)(r + i) * cols + c, bf16);
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
            for (int cc = c; cc < cols; cc++) s += (bf16 ? bf16_to_f32(dl_ld16(wr + cc)) : _cvtsh_ss(dl_ld16(wr + cc))) * xb[cc];
            out[(size_t)(b + j) * rows + r + i] = s;
        }
}

DL_INLINE DL_TARGET_AVX2 void w16_rows_avx2(float *out, const uint16_t *w, const float *x, int r0, int r1, int rows,
                                            int cols, int batch, const int bf16) {
    const int BT = batch == 1 ? 1 : 2, RT = batch == 1 ? dl_matvec_tile_rows((size_t)cols * 2) : 4;
    for (int r = r0; r < r1; r += RT) {
        const int R = r1 - r < RT ? r1 - r : RT;
        for (int b = 0; b < batch; b += BT) {
            const int B = batch - b < BT ? batch - b : BT;
            DL_TILE_SWITCH(f16_tile_avx2, R, B, out, w, x, cols, rows, r, b, bf16);
        }
    }
}

DL_TARGET_AVX2 void dl_matmul_f16_rows_avx2(float *out, const uint16_t *w, const float *x,
                                            int r0, int r1, int rows, int cols, int batch) {
    w16_rows_avx2(out, w, x, r0, r1, rows, cols, batch, 0);
}

static DL_TARGET_AVX2 void bf16_rows_avx2(float *out, const uint16_t *w, const float *x, int r0, int r1, int rows,
                                          int cols, int batch) {
    w16_rows_avx2(out, w, x, r0, r1, rows, cols, batch, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512: 16 columns per step, masked tail */

DL_INLINE DL_TARGET_AVX512 __m512 w16x16_avx512(const uint16_t *p, __mmask16 m, const int bf16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const void *)p);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

DL_INLINE DL_TARGET_AVX512 void f16_tile_avx512(float *out, const uint16_t *w, const float *x, int cols,
                                               int rows, int r, int b, const int bf16, const int R, const int B) {
    __m512 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm512_setzero_ps();
    for (int c = 0; c < cols; c += 16) {
        const __mmask16 m = dl_tailmask16(cols - c);
        __m512 wv[4];
        for (int i = 0; i < R; i++)
            wv[i] = w16x16_avx512(w + (size_t)(r + i) * cols + c, m, bf16);
        for (int j = 0; j < B; j++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + (size_t)(b + j) * cols + c);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) out[(size_t)(b + j) * rows + r + i] = _mm512_reduce_add_ps(acc[i][j]);
}

DL_INLINE DL_TARGET_AVX512 void w16_rows_avx512(float *out, const uint16_t *w, const float *x, int r0, int r1,
                                                int rows, int cols, int batch, const int bf16) {
    const int RT = batch == 1 ? dl_matvec_tile_rows((size_t)cols * 2) : 4;
    for (int r = r0; r < r1; r += RT) {
        const int R = r1 - r < RT ? r1 - r : RT;
        for (int b = 0; b < batch; b += 4) {
            const int B = batch - b < 4 ? batch - b : 4;
            DL_TILE_SWITCH(f16_tile_avx512, R, B, out, w, x, cols, rows, r, b, bf16);
        }
    }
}

DL_TARGET_AVX512 void dl_matmul_f16_rows_avx512(float *out, const uint16_t *w, const float *x,
                                                int r0, int r1, int rows, int cols, int batch) {
    w16_rows_avx512(out, w, x, r0, r1, rows, cols, batch, 0);
}

static DL_TARGET_AVX512 void bf16_rows_avx512(float *out, const uint16_t *w, const float *x, int r0, int r1,
                                              int rows, int cols, int batch) {
    w16_rows_avx512(out, w, x, r0, r1, rows, cols, batch, 1);
}
#endif /* DL_X86 */

#if DL_NEON
/* ------------------------------------------------------------------------------------------ */
/* NEON: 8 columns per step (two fcvtl of 4 halves), per (row, batch row) */

static inline float32x4_t w16x4_neon(uint16x4_t h, const int bf16) {
    return bf16 ? vreinterpretq_f32_u32(vshll_n_u16(h, 16)) : vcvt_f32_f16(vreinterpret_f16_u16(h));
}

static inline void w16_rows_neon(float *out, const uint16_t *w, const float *x, int r0, int r1, int rows, int cols,
                                 int batch, const int bf16) {
    for (int r = r0; r < r1; r++) {
        const uint16_t *wr = w + (size_t)r * cols;
        for (int b = 0; b < batch; b++) {
            const float *xb = x + (size_t)b * cols;
            float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
            int c = 0;
            for (; c + 8 <= cols; c += 8) {
                const uint16x8_t h = vld1q_u16(wr + c);
                const float32x4_t w0 = w16x4_neon(vget_low_u16(h), bf16);
                const float32x4_t w1 = w16x4_neon(vget_high_u16(h), bf16);
                a0 = vfmaq_f32(a0, w0, vld1q_f32(xb + c));
                a1 = vfmaq_f32(a1, w1, vld1q_f32(xb + c + 4));
            }
            float sum = vaddvq_f32(vaddq_f32(a0, a1));
            for (; c < cols; c++) sum += w16(wr + c, bf16) * xb[c];
            out[(size_t)b * rows + r] = sum;
        }
    }
}

void dl_matmul_f16_rows_neon(float *out, const uint16_t *w, const float *x,
                             int r0, int r1, int rows, int cols, int batch) {
    w16_rows_neon(out, w, x, r0, r1, rows, cols, batch, 0);
}

static void bf16_rows_neon(float *out, const uint16_t *w, const float *x, int r0, int r1, int rows, int cols,
                           int batch) {
    w16_rows_neon(out, w, x, r0, r1, rows, cols, batch, 1);
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

void dl_matmul_bf16_f32(float *out, const uint16_t *w, const float *x, int rows, int cols, int batch) {
    if (rows <= 0 || batch <= 0) return;
    f16_ctx c = {out, w, x, rows, cols, batch, bf16_rows_scalar};
    switch (dl_get_isa()) {
#if DL_X86
    case DL_ISA_AVX2: c.fn = bf16_rows_avx2; break;
    case DL_ISA_AVX512: c.fn = bf16_rows_avx512; break;
#endif
#if DL_NEON
    case DL_ISA_NEON: case DL_ISA_NEON_DOTPROD: c.fn = bf16_rows_neon; break;
#endif
    default: break;
    }
    dl_parallel_for(rows, 4, f16_range, &c);
}
