/* q80 x q80 matmul (8-bit weights, GGUF Q8_0 / Distributed Llama Q80 blocks): out[b, r] =
 * sum_c w[r, c] * x[b, c].
 *
 * Per 32-block: the integer dot of the int8 values times f16(d_w) * f16(d_x) (as float), summed over
 * blocks in float, as the q40 kernel does. Every output element is computed by one thread with the
 * same operations whatever the tile it falls in, so results do not depend on the thread count.
 *
 * Activations come from dl_quantize_q80 and so lie in -127..127 (never -128); the AVX2 sign trick
 * relies on it, weights may hold any int8 value.
 *   AVX-512 VNNI: vpdpbusd multiplies u8 x s8, so the weights are read as w ^ 0x80 = w + 128 (u8) and
 *     the accumulator starts at -128 * (sum of each group of 4 x values) (16 x the -8 * sum
 *     corrections of dl_xprep): exact for every int8 value.
 *   AVX2: maddubs(|w|, sign(x, w)) (products of at most 128 * 127, pairs below 2^15), madd to int32.
 *   NEON: sdot where the CPU has it, else widening multiplies.
 *
 * Load-time repack (as q40r): measured not to pay on this layout (README, "8- and 16-bit weights"):
 * a q80 block is 34 bytes of which 32 are values, so the plain rows already stream at full width.
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

void dl_matmul_q80_q80_rows_scalar(float *out, const dl_block_q80 *w, const dl_block_q80 *x,
                                   const void *xprep, int r0, int r1, int rows, int cols, int batch) {
    (void)xprep;
    const int nb = cols / DL_QK;
    for (int r = r0; r < r1; r++) {
        const dl_block_q80 *wr = w + (size_t)r * nb;
        for (int b = 0; b < batch; b++) {
            const dl_block_q80 *xb = x + (size_t)b * nb;
            float sum = 0.0f;
            for (int k = 0; k < nb; k++) {
                int32_t idot = 0;
                for (int j = 0; j < DL_QK; j++) idot += (int32_t)wr[k].qs[j] * xb[k].qs[j];
                const float s = dl_f16_to_f32_scalar(wr[k].d) * dl_f16_to_f32_scalar(xb[k].d);
                sum += (float)idot * s;
            }
            out[(size_t)b * rows + r] = sum;
        }
    }
}

#if DL_X86
/* ------------------------------------------------------------------------------------------ */
/* AVX2 + FMA + F16C: R rows x B batch rows, one block per step */

DL_INLINE DL_TARGET_AVX2 float q80_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

DL_INLINE DL_TARGET_AVX2 void q80_tile_avx2(float *out, const uint8_t *w, size_t wstride,
                                            const void *xp, int cols, int rows, int r, int b,
                                            const int R, const int B) {
    const int nb = cols / DL_QK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm256_setzero_ps();
    const int8_t *xq[4];
    const float *xd[4];
    for (int j = 0; j < B; j++) {
        xq[j] = XP_QS(xp, cols, b + j);
        xd[j] = XP_DX(xp, cols, b + j);
    }
    for (int k = 0; k < nb; k++) {
        __m256i wv[4], wa[4];
        float dw[4];
        for (int i = 0; i < R; i++) {
            const uint8_t *p = w + (size_t)(r + i) * wstride + (size_t)k * sizeof(dl_block_q80);
            wv[i] = _mm256_loadu_si256((const __m256i *)(p + 2));
            wa[i] = _mm256_abs_epi8(wv[i]);
            dw[i] = _cvtsh_ss(dl_ld16(p));
        }
        for (int j = 0; j < B; j++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[j] + (size_t)k * DL_QK));
            const float dx = xd[j][k];
            for (int i = 0; i < R; i++) {
                const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[i], _mm256_sign_epi8(xv, wv[i])), ones);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(dw[i] * dx), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) out[(size_t)(b + j) * rows + r + i] = q80_hsum256(acc[i][j]);
}

DL_TARGET_AVX2 void dl_matmul_q80_q80_rows_avx2(float *out, const dl_block_q80 *w, const dl_block_q80 *x,
                                                const void *xprep, int r0, int r1, int rows, int cols,
                                                int batch) {
    (void)x;
    const size_t wstride = (size_t)cols / DL_QK * sizeof(dl_block_q80);
    const int BT = batch == 1 ? 1 : 2;   /* 16 ymm registers: at most 4 x 2 accumulators */
    for (int r = r0; r < r1; r += 4) {
        const int R = r1 - r < 4 ? r1 - r : 4;
        for (int b = 0; b < batch; b += BT) {
            const int B = batch - b < BT ? batch - b : BT;
            DL_TILE_SWITCH(q80_tile_avx2, R, B, out, (const uint8_t *)w, wstride, xprep, cols, rows, r, b);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512 (F, BW, VL, DQ, VNNI): two blocks per step, vpdpbusd on w ^ 0x80 */

DL_INLINE DL_TARGET_AVX512 void q80_tile_avx512(float *out, const uint8_t *w, size_t wstride,
                                                const void *xp, int cols, int rows, int r, int b,
                                                const int R, const int B) {
    const int nb = cols / DL_QK;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
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
            const uint8_t *p = w + (size_t)(r + i) * wstride + (size_t)k * sizeof(dl_block_q80);
            const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + 2))),
                                                 _mm256_loadu_si256((const __m256i *)(p + 36)), 1);
            wv[i] = _mm512_xor_si512(v, flip);
            dw[i] = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)dl_ld16(p) | ((uint32_t)dl_ld16(p + 34) << 16))));
        }
        for (int j = 0; j < B; j++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xq[j] + (size_t)k * DL_QK));
            const __m512i cv = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(xc[j] + (size_t)k * 8)), 4);
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
            const uint8_t *p = w + (size_t)(r + i) * wstride + (size_t)k * sizeof(dl_block_q80);
            wv[i] = _mm512_maskz_xor_epi32(0x00FF, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + 2))), flip);
            dw[i] = _mm_cvtph_ps(_mm_cvtsi32_si128((int)(uint32_t)dl_ld16(p)));
        }
        for (int j = 0; j < B; j++) {
            const __m512i xv = _mm512_maskz_loadu_epi32(0x00FF, (const void *)(xq[j] + (size_t)k * DL_QK));
            const __m512i cv = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(0x00FF, (const void *)(xc[j] + (size_t)k * 8)), 4);
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

DL_TARGET_AVX512 void dl_matmul_q80_q80_rows_avx512(float *out, const dl_block_q80 *w, const dl_block_q80 *x,
                                                    const void *xprep, int r0, int r1, int rows, int cols,
                                                    int batch) {
    (void)x;
    const size_t wstride = (size_t)cols / DL_QK * sizeof(dl_block_q80);
    for (int r = r0; r < r1; r += 4) {
        const int R = r1 - r < 4 ? r1 - r : 4;
        for (int b = 0; b < batch; b += 4) {
            const int B = batch - b < 4 ? batch - b : 4;
            DL_TILE_SWITCH(q80_tile_avx512, R, B, out, (const uint8_t *)w, wstride, xprep, cols, rows, r, b);
        }
    }
}
#endif /* DL_X86 */

#if DL_NEON
/* ------------------------------------------------------------------------------------------ */
/* NEON: per (row, batch row) block loop; same float summation order as the scalar path. */

static inline int32_t q80_neon_block_dot(const dl_block_q80 *wb, const dl_block_q80 *xb) {
    const int8x16_t w0 = vld1q_s8(wb->qs), w1 = vld1q_s8(wb->qs + 16);
    const int8x16_t x0 = vld1q_s8(xb->qs), x1 = vld1q_s8(xb->qs + 16);
#if defined(__ARM_FEATURE_DOTPROD)
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), w0, x0);
    acc = vdotq_s32(acc, w1, x1);
    return vaddvq_s32(acc);
#else
    /* pairs of products of at most 128 * 127: no int16 overflow (x is never -128) */
    int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    p0 = vmlal_s8(p0, vget_high_s8(w0), vget_high_s8(x0));
    int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
    p1 = vmlal_s8(p1, vget_high_s8(w1), vget_high_s8(x1));
    return vaddvq_s32(vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1)));
#endif
}

void dl_matmul_q80_q80_rows_neon(float *out, const dl_block_q80 *w, const dl_block_q80 *x,
                                 const void *xprep, int r0, int r1, int rows, int cols, int batch) {
    (void)xprep;
    const int nb = cols / DL_QK;
    for (int r = r0; r < r1; r++) {
        const dl_block_q80 *wr = w + (size_t)r * nb;
        for (int b = 0; b < batch; b++) {
            const dl_block_q80 *xb = x + (size_t)b * nb;
            float sum = 0.0f;
            for (int k = 0; k < nb; k++) {
                const float s = dl_f16_to_f32_scalar(wr[k].d) * dl_f16_to_f32_scalar(xb[k].d);
                sum += (float)q80_neon_block_dot(wr + k, xb + k) * s;
            }
            out[(size_t)b * rows + r] = sum;
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* public entry point: split rows over the pool */

typedef struct {
    float *out;
    const dl_block_q80 *w;
    const dl_block_q80 *x;
    const void *xprep;
    int rows, cols, batch;
    void (*fn)(float *, const dl_block_q80 *, const dl_block_q80 *, const void *, int, int, int, int, int);
} q80_ctx;

static void q80_range(void *vctx, int64_t s, int64_t e) {
    q80_ctx *c = (q80_ctx *)vctx;
    c->fn(c->out, c->w, c->x, c->xprep, (int)s, (int)e, c->rows, c->cols, c->batch);
}

void dl_matmul_q80_q80(float *out, const dl_block_q80 *w, const dl_block_q80 *x,
                       int rows, int cols, int batch) {
    if (rows <= 0 || batch <= 0) return;
    q80_ctx c = {out, w, x, NULL, rows, cols, batch, dl_k.matmul_q80_q80_rows};
    if (dl_k.needs_xprep) {
        void *xp = dl_scratch(dl_xprep_bytes(cols, batch));
        if (!xp) {  /* out of memory: fall back to the scalar path */
            c.fn = dl_matmul_q80_q80_rows_scalar;
        } else {
            dl_xprep(xp, x, cols, batch);
            c.xprep = xp;
        }
    }
    dl_parallel_for(rows, 4, q80_range, &c);
}
