/* q40 x q80 and f32 matmuls: out[b, r] = sum_c w[r, c] * x[b, c].
 *
 * q40 x q80 per 32-block: integer dot of (code - 8) and q8, times f16(d_w) * f16(d_x) (as float),
 * summed over blocks in float. Every output element is computed by one thread with the same
 * sequence of operations whatever the tile it falls in, so results do not depend on the thread
 * count.
 *
 * x86 paths first "prepare" the q80 activations once per call (dl_xprep, on the calling thread):
 * per batch row, the int8 values of all blocks back to back (so 2 blocks = one 64-byte load),
 * per block 8 int32 "corrections" -8 * (sum of each group of 4 q8 values), and f32(d_x).
 * The weights' unsigned codes (0..15) then feed maddubs / vpdpbusd (u8 x s8) directly and the
 * correction, used as the accumulator's initial value, turns sum(code * q) into
 * sum((code - 8) * q) exactly.
 */
#define _POSIX_C_SOURCE 200809L
#include "dl_internal.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if DL_X86
#include <immintrin.h>
#endif
#if DL_NEON
#include <arm_neon.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* scratch memory of the calling thread */

static _Thread_local void *t_scratch = NULL;
static _Thread_local size_t t_scratch_size = 0;

void *dl_scratch(size_t bytes) {
    if (bytes > t_scratch_size) {
        free(t_scratch);
        size_t sz = bytes + bytes / 4 + 4096;
        t_scratch = NULL;
        t_scratch_size = 0;
        if (posix_memalign(&t_scratch, 64, sz) != 0) return NULL;
        t_scratch_size = sz;
    }
    return t_scratch;
}

/* ------------------------------------------------------------------------------------------ */
/* prepared x layout (macros in dl_internal.h) */

size_t dl_xprep_bytes(int cols, int batch) { return xprep_stride(cols) * (size_t)batch; }

void dl_xprep(void *dst, const dl_block_q80 *x, int cols, int batch) {
    const int nb = cols / DL_QK;
    for (int b = 0; b < batch; b++) {
        int8_t *qs = (int8_t *)XP_QS(dst, cols, b);
        int32_t *corr = (int32_t *)XP_CORR(dst, cols, b);
        float *dx = (float *)XP_DX(dst, cols, b);
        const dl_block_q80 *xb = x + (size_t)b * nb;
        for (int k = 0; k < nb; k++) {
            memcpy(qs + (size_t)k * DL_QK, xb[k].qs, DL_QK);
            for (int l = 0; l < 8; l++) {
                const int8_t *q = xb[k].qs + 4 * l;
                corr[k * 8 + l] = -8 * ((int32_t)q[0] + q[1] + q[2] + q[3]);
            }
            dx[k] = dl_f16_to_f32_scalar(xb[k].d);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* scalar reference */

void dl_matmul_q40_q80_rows_scalar(float *out, const dl_block_q40 *w, const dl_block_q80 *x,
                                   const void *xprep, int r0, int r1, int rows, int cols, int batch) {
    (void)xprep;
    const int nb = cols / DL_QK;
    for (int r = r0; r < r1; r++) {
        const dl_block_q40 *wr = w + (size_t)r * nb;
        for (int b = 0; b < batch; b++) {
            const dl_block_q80 *xb = x + (size_t)b * nb;
            float sum = 0.0f;
            for (int k = 0; k < nb; k++) {
                int32_t idot = 0;
                for (int j = 0; j < 16; j++) {
                    idot += ((int32_t)(wr[k].qs[j] & 15) - 8) * xb[k].qs[j];
                    idot += ((int32_t)(wr[k].qs[j] >> 4) - 8) * xb[k].qs[j + 16];
                }
                const float s = dl_f16_to_f32_scalar(wr[k].d) * dl_f16_to_f32_scalar(xb[k].d);
                sum += (float)idot * s;
            }
            out[(size_t)b * rows + r] = sum;
        }
    }
}

void dl_matmul_f32_rows_scalar(float *out, const float *w, const float *x,
                               int r0, int r1, int rows, int cols, int batch) {
    for (int r = r0; r < r1; r++) {
        const float *wr = w + (size_t)r * cols;
        for (int b = 0; b < batch; b++) {
            const float *xb = x + (size_t)b * cols;
            float sum = 0.0f;
            for (int c = 0; c < cols; c++) sum += wr[c] * xb[c];
            out[(size_t)b * rows + r] = sum;
        }
    }
}

#if DL_X86
/* ------------------------------------------------------------------------------------------ */
/* AVX2 + FMA + F16C */

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

DL_INLINE DL_TARGET_AVX2 float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* R rows x B batch rows, one block per step */
DL_INLINE DL_TARGET_AVX2 void q40_tile_avx2(float *out, const uint8_t *w, size_t wstride,
                                            const void *xp, int cols, int rows, int r, int b,
                                            const int R, const int B) {
    const int nb = cols / DL_QK;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm256_setzero_ps();
    const int8_t *xq[4];
    const int32_t *xc[4];
    const float *xd[4];
    for (int j = 0; j < B; j++) {
        xq[j] = XP_QS(xp, cols, b + j);
        xc[j] = XP_CORR(xp, cols, b + j);
        xd[j] = XP_DX(xp, cols, b + j);
    }
    for (int k = 0; k < nb; k++) {
        __m256i wv[4];
        float dw[4];
        for (int i = 0; i < R; i++) {
            const uint8_t *p = w + (size_t)(r + i) * wstride + (size_t)k * 18;
            const __m128i q = _mm_loadu_si128((const __m128i *)(p + 2));
            const __m256i qq = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
            wv[i] = _mm256_and_si256(qq, m4);
            dw[i] = _cvtsh_ss(ld16(p));
        }
        for (int j = 0; j < B; j++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[j] + (size_t)k * DL_QK));
            const __m256i cv = _mm256_loadu_si256((const __m256i *)(xc[j] + (size_t)k * 8));
            const float dx = xd[j][k];
            for (int i = 0; i < R; i++) {
                __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(wv[i], xv), ones);
                d = _mm256_add_epi32(d, cv);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(dw[i] * dx), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) out[(size_t)(b + j) * rows + r + i] = hsum256(acc[i][j]);
}

DL_TARGET_AVX2 void dl_matmul_q40_q80_rows_avx2(float *out, const dl_block_q40 *w, const dl_block_q80 *x,
                                                const void *xprep, int r0, int r1, int rows, int cols,
                                                int batch) {
    (void)x;
    const size_t wstride = (size_t)cols / DL_QK * 18;
    const int BT = batch == 1 ? 1 : 2;   /* 16 ymm registers: at most 4 x 2 accumulators */
    for (int r = r0; r < r1; r += 4) {
        const int R = r1 - r < 4 ? r1 - r : 4;
        for (int b = 0; b < batch; b += BT) {
            const int B = batch - b < BT ? batch - b : BT;
            DL_TILE_SWITCH(q40_tile_avx2, R, B, out, (const uint8_t *)w, wstride, xprep, cols, rows, r, b);
        }
    }
}

DL_INLINE DL_TARGET_AVX2 void f32_tile_avx2(float *out, const float *w, const float *x, int cols,
                                           int rows, int r, int b, const int R, const int B) {
    __m256 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= cols; c += 8) {
        __m256 wv[4];
        for (int i = 0; i < R; i++) wv[i] = _mm256_loadu_ps(w + (size_t)(r + i) * cols + c);
        for (int j = 0; j < B; j++) {
            const __m256 xv = _mm256_loadu_ps(x + (size_t)(b + j) * cols + c);
            for (int i = 0; i < R; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) {
            float s = hsum256(acc[i][j]);
            const float *wr = w + (size_t)(r + i) * cols, *xb = x + (size_t)(b + j) * cols;
            for (int cc = c; cc < cols; cc++) s += wr[cc] * xb[cc];
            out[(size_t)(b + j) * rows + r + i] = s;
        }
}

DL_TARGET_AVX2 void dl_matmul_f32_rows_avx2(float *out, const float *w, const float *x,
                                            int r0, int r1, int rows, int cols, int batch) {
    const int BT = batch == 1 ? 1 : 2, RT = batch == 1 ? dl_matvec_tile_rows((size_t)cols * 4) : 4;
    for (int r = r0; r < r1; r += RT) {
        const int R = r1 - r < RT ? r1 - r : RT;
        for (int b = 0; b < batch; b += BT) {
            const int B = batch - b < BT ? batch - b : BT;
            DL_TILE_SWITCH(f32_tile_avx2, R, B, out, w, x, cols, rows, r, b);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512 (F, BW, VL, DQ, VNNI): two blocks per step, vpdpbusd */

DL_INLINE DL_TARGET_AVX512 void q40_tile_avx512(float *out, const uint8_t *w, size_t wstride,
                                                const void *xp, int cols, int rows, int r, int b,
                                                const int R, const int B) {
    const int nb = cols / DL_QK;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i bidx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm512_setzero_ps();
    const int8_t *xq[4];
    const int32_t *xc[4];
    const float *xd[4];
    for (int j = 0; j < B; j++) {
        xq[j] = XP_QS(xp, cols, b + j);
        xc[j] = XP_CORR(xp, cols, b + j);
        xd[j] = XP_DX(xp, cols, b + j);
    }
    int k = 0;
    for (; k + 2 <= nb; k += 2) {
        __m512i wv[4];
        __m128 dw[4];
        for (int i = 0; i < R; i++) {
            const uint8_t *p = w + (size_t)(r + i) * wstride + (size_t)k * 18;
            /* [qs_k, qs_k, qs_k+1, qs_k+1] with two broadcast loads (no shuffle-port inserts) */
            __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p + 2)));
            v = _mm512_mask_broadcast_i32x4(v, 0xFF00, _mm_loadu_si128((const __m128i *)(p + 20)));
            v = _mm512_mask_srli_epi16(v, 0xFF00FF00u, v, 4);
            wv[i] = _mm512_and_si512(v, m4);
            dw[i] = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)ld16(p) | ((uint32_t)ld16(p + 18) << 16))));
        }
        for (int j = 0; j < B; j++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xq[j] + (size_t)k * DL_QK));
            const __m512i cv = _mm512_loadu_si512((const void *)(xc[j] + (size_t)k * 8));
            const __m128 dx = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(xd[j] + k)));
            for (int i = 0; i < R; i++) {
                const __m512i d = _mm512_dpbusd_epi32(cv, wv[i], xv);
                const __m512 s = _mm512_permutexvar_ps(bidx, _mm512_castps128_ps512(_mm_mul_ps(dw[i], dx)));
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[i][j]);
            }
        }
    }
    if (k < nb) {   /* odd last block: upper half zero */
        __m512i wv[4];
        __m128 dw[4];
        for (int i = 0; i < R; i++) {
            const uint8_t *p = w + (size_t)(r + i) * wstride + (size_t)k * 18;
            const __m128i q0 = _mm_loadu_si128((const __m128i *)(p + 2));
            __m512i v = _mm512_castsi128_si512(q0);
            v = _mm512_inserti32x4(v, _mm_srli_epi16(q0, 4), 1);
            wv[i] = _mm512_maskz_and_epi32(0x00FF, v, m4);
            dw[i] = _mm_cvtph_ps(_mm_cvtsi32_si128((int)(uint32_t)ld16(p)));
        }
        for (int j = 0; j < B; j++) {
            const __m512i xv = _mm512_maskz_loadu_epi32(0x00FF, (const void *)(xq[j] + (size_t)k * DL_QK));
            const __m512i cv = _mm512_maskz_loadu_epi32(0x00FF, (const void *)(xc[j] + (size_t)k * 8));
            const __m128 dx = _mm_load_ss(xd[j] + k);
            for (int i = 0; i < R; i++) {
                const __m512i d = _mm512_dpbusd_epi32(cv, wv[i], xv);
                const __m512 s = _mm512_permutexvar_ps(bidx, _mm512_castps128_ps512(_mm_mul_ps(dw[i], dx)));
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) out[(size_t)(b + j) * rows + r + i] = _mm512_reduce_add_ps(acc[i][j]);
}

DL_TARGET_AVX512 void dl_matmul_q40_q80_rows_avx512(float *out, const dl_block_q40 *w, const dl_block_q80 *x,
                                                    const void *xprep, int r0, int r1, int rows, int cols,
                                                    int batch) {
    (void)x;
    const size_t wstride = (size_t)cols / DL_QK * 18;
    for (int r = r0; r < r1; r += 4) {
        const int R = r1 - r < 4 ? r1 - r : 4;
        for (int b = 0; b < batch; b += 4) {
            const int B = batch - b < 4 ? batch - b : 4;
            DL_TILE_SWITCH(q40_tile_avx512, R, B, out, (const uint8_t *)w, wstride, xprep, cols, rows, r, b);
        }
    }
}

DL_INLINE DL_TARGET_AVX512 void f32_tile_avx512(float *out, const float *w, const float *x, int cols,
                                               int rows, int r, int b, const int R, const int B) {
    __m512 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm512_setzero_ps();
    for (int c = 0; c < cols; c += 16) {
        const __mmask16 m = dl_tailmask16(cols - c);
        __m512 wv[4];
        for (int i = 0; i < R; i++) wv[i] = _mm512_maskz_loadu_ps(m, w + (size_t)(r + i) * cols + c);
        for (int j = 0; j < B; j++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + (size_t)(b + j) * cols + c);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) out[(size_t)(b + j) * rows + r + i] = _mm512_reduce_add_ps(acc[i][j]);
}

DL_TARGET_AVX512 void dl_matmul_f32_rows_avx512(float *out, const float *w, const float *x,
                                                int r0, int r1, int rows, int cols, int batch) {
    const int RT = batch == 1 ? dl_matvec_tile_rows((size_t)cols * 4) : 4;
    for (int r = r0; r < r1; r += RT) {
        const int R = r1 - r < RT ? r1 - r : RT;
        for (int b = 0; b < batch; b += 4) {
            const int B = batch - b < 4 ? batch - b : 4;
            DL_TILE_SWITCH(f32_tile_avx512, R, B, out, w, x, cols, rows, r, b);
        }
    }
}
#endif /* DL_X86 */

#if DL_NEON
/* ------------------------------------------------------------------------------------------ */
/* NEON: per (row, batch row) block loop; the same float operations in the same order as the scalar
 * path (multiply, then add: this file is built without contraction), so the results are
 * bit-identical to it. The dotprod variant differs only in the integer dot (exact either way). */

static inline int32_t neon_block_dot(const dl_block_q40 *wb, const dl_block_q80 *xb) {
    const uint8x16_t q = vld1q_u8(wb->qs);
    const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), vdupq_n_s8(8));
    const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
    const int8x16_t x0 = vld1q_s8(xb->qs), x1 = vld1q_s8(xb->qs + 16);
    int16x8_t p0 = vmull_s8(vget_low_s8(lo), vget_low_s8(x0));
    p0 = vmlal_high_s8(p0, lo, x0);
    int16x8_t p1 = vmull_s8(vget_low_s8(hi), vget_low_s8(x1));
    p1 = vmlal_high_s8(p1, hi, x1);
    return vaddvq_s32(vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1)));
}

#if DL_HAVE_DOTPROD
DL_INLINE DL_TARGET_DOTPROD int32_t neon_block_dot_dotprod(const dl_block_q40 *wb, const dl_block_q80 *xb) {
    const uint8x16_t q = vld1q_u8(wb->qs);
    const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), vdupq_n_s8(8));
    const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(xb->qs));
    acc = vdotq_s32(acc, hi, vld1q_s8(xb->qs + 16));
    return vaddvq_s32(acc);
}

#endif

#define DL_NEON_Q40_ROWS(DOT) do { \
    const int nb = cols / DL_QK; \
    for (int r = r0; r < r1; r++) { \
        const dl_block_q40 *wr = w + (size_t)r * nb; \
        for (int b = 0; b < batch; b++) { \
            const dl_block_q80 *xb = x + (size_t)b * nb; \
            float sum = 0.0f; \
            for (int k = 0; k < nb; k++) { \
                const float s = dl_f16_to_f32_scalar(wr[k].d) * dl_f16_to_f32_scalar(xb[k].d); \
                sum += (float)DOT(wr + k, xb + k) * s; \
            } \
            out[(size_t)b * rows + r] = sum; \
        } \
    } } while (0)

void dl_matmul_q40_q80_rows_neon(float *out, const dl_block_q40 *w, const dl_block_q80 *x,
                                 const void *xprep, int r0, int r1, int rows, int cols, int batch) {
    (void)xprep;
    DL_NEON_Q40_ROWS(neon_block_dot);
}

#if DL_HAVE_DOTPROD
DL_TARGET_DOTPROD void dl_matmul_q40_q80_rows_neon_dotprod(float *out, const dl_block_q40 *w,
                                                           const dl_block_q80 *x, const void *xprep,
                                                           int r0, int r1, int rows, int cols, int batch) {
    (void)xprep;
    DL_NEON_Q40_ROWS(neon_block_dot_dotprod);
}
#endif

void dl_matmul_f32_rows_neon(float *out, const float *w, const float *x,
                             int r0, int r1, int rows, int cols, int batch) {
    for (int r = r0; r < r1; r++) {
        const float *wr = w + (size_t)r * cols;
        for (int b = 0; b < batch; b++) {
            const float *xb = x + (size_t)b * cols;
            float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
            int c = 0;
            for (; c + 8 <= cols; c += 8) {
                a0 = vfmaq_f32(a0, vld1q_f32(wr + c), vld1q_f32(xb + c));
                a1 = vfmaq_f32(a1, vld1q_f32(wr + c + 4), vld1q_f32(xb + c + 4));
            }
            float sum = vaddvq_f32(vaddq_f32(a0, a1));
            for (; c < cols; c++) sum += wr[c] * xb[c];
            out[(size_t)b * rows + r] = sum;
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* public entry points: split rows over the pool */

typedef struct {
    float *out;
    const dl_block_q40 *w;
    const dl_block_q80 *x;
    const void *xprep;
    int rows, cols, batch;
    void (*fn)(float *, const dl_block_q40 *, const dl_block_q80 *, const void *, int, int, int, int, int);
} q40_ctx;

static void q40_range(void *vctx, int64_t s, int64_t e) {
    q40_ctx *c = (q40_ctx *)vctx;
    c->fn(c->out, c->w, c->x, c->xprep, (int)s, (int)e, c->rows, c->cols, c->batch);
}

void dl_matmul_q40_q80(float *out, const dl_block_q40 *w, const dl_block_q80 *x,
                       int rows, int cols, int batch) {
    if (rows <= 0 || batch <= 0) return;
    q40_ctx c = {out, w, x, NULL, rows, cols, batch, dl_k.matmul_q40_q80_rows};
    if (dl_k.needs_xprep) {
        void *xp = dl_scratch(dl_xprep_bytes(cols, batch));
        if (!xp) {  /* out of memory: fall back to the scalar path */
            c.fn = dl_matmul_q40_q80_rows_scalar;
        } else {
            dl_xprep(xp, x, cols, batch);
            c.xprep = xp;
        }
    }
    dl_parallel_for(rows, 4, q40_range, &c);
}

typedef struct {
    float *out;
    const float *w, *x;
    int rows, cols, batch;
    void (*fn)(float *, const float *, const float *, int, int, int, int, int);
} f32_ctx;

static void f32_range(void *vctx, int64_t s, int64_t e) {
    f32_ctx *c = (f32_ctx *)vctx;
    c->fn(c->out, c->w, c->x, (int)s, (int)e, c->rows, c->cols, c->batch);
}

void dl_matmul_f32(float *out, const float *w, const float *x, int rows, int cols, int batch) {
    if (rows <= 0 || batch <= 0) return;
    f32_ctx c = {out, w, x, rows, cols, batch, dl_k.matmul_f32_rows};
    dl_parallel_for(rows, 4, f32_range, &c);
}
