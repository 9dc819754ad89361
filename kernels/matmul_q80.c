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
 *   NEON: widening multiplies; sdot where the CPU has ARMv8.2 dotprod (run-time choice).
 *
 * q80r, the load-time repack (as q40r, kernels/repack.c): rows in groups of DL_Q80R_ROWS = 16 (the
 * last padded with zero rows: scale 0, never stored); per group blocks in pairs as in q40r
 * (dl_internal.h, dl_r16_*): 64 bytes of scales (the 16 rows' f16 d of block 2j, then 2j+1), then
 * 512 bytes of values per block: [i = 0..7][row r = 0..15][m = 0..3] = qs[4 * i + m] of row r, stored as
 * qs ^ 0x80 (= qs + 128 as u8). So one 64-byte load is 16 rows x 4 values: one vpdpbusd against 4
 * activations broadcast to every lane, the accumulator starting at -128 * sum(block of x); the
 * scales of 16 rows are one vector. Measured (scripts/bench_kernels.py --type q80,q80r): the plain
 * layout spends most of a batched call converting and scaling per (row, block); q80r amortizes it
 * over 16 rows (README, "8- and 16-bit weights").
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

static inline int32_t q80_block_dot_scalar(const dl_block_q80 *wb, const dl_block_q80 *xb) {
    int32_t idot = 0;
    for (int j = 0; j < DL_QK; j++) idot += (int32_t)wb->qs[j] * xb->qs[j];
    return idot;
}

/* the per (row, batch row) block loop of the scalar and NEON paths (same float summation order) */
DL_INLINE void q80_rows_loop(float *out, const dl_block_q80 *w, const dl_block_q80 *x, int r0, int r1,
                             int rows, int cols, int batch,
                             int32_t (*block_dot)(const dl_block_q80 *, const dl_block_q80 *)) {
    const int nb = cols / DL_QK;
    for (int r = r0; r < r1; r++) {
        const dl_block_q80 *wr = w + (size_t)r * nb;
        for (int b = 0; b < batch; b++) {
            const dl_block_q80 *xb = x + (size_t)b * nb;
            float sum = 0.0f;
            for (int k = 0; k < nb; k++) {
                const float s = dl_f16_to_f32_scalar(wr[k].d) * dl_f16_to_f32_scalar(xb[k].d);
                sum += (float)block_dot(wr + k, xb + k) * s;
            }
            out[(size_t)b * rows + r] = sum;
        }
    }
}

void dl_matmul_q80_q80_rows_scalar(float *out, const dl_block_q80 *w, const dl_block_q80 *x,
                                   const void *xprep, int r0, int r1, int rows, int cols, int batch) {
    (void)xprep;
    q80_rows_loop(out, w, x, r0, r1, rows, cols, batch, q80_block_dot_scalar);
}

#if DL_X86
/* ------------------------------------------------------------------------------------------ */
/* AVX2 + FMA + F16C: R rows x B batch rows, one block per step */

/* signed int8 w times int8 x, 32 bytes each, as 8 int32 sums of 4 products: maddubs(|w|, sign(x, w))
 * (each pair below 2^15, no saturation), then madd; wa = |w| is passed in, as callers reuse it */
DL_INLINE DL_TARGET_AVX2 __m256i q80_dot4_avx2(__m256i wa, __m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

DL_INLINE DL_TARGET_AVX2 void q80_tile_avx2(float *out, const uint8_t *w, size_t wstride,
                                            const void *xp, int cols, int rows, int r, int b,
                                            const int R, const int B) {
    const int nb = cols / DL_QK;
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
                const __m256i d = q80_dot4_avx2(wa[i], wv[i], xv);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(dw[i] * dx), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) out[(size_t)(b + j) * rows + r + i] = dl_hsum256(acc[i][j]);
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
/* NEON: per (row, batch row) block loop, the scalar path's float operations in its order (this file
 * is built without contraction): bit-identical to it. The dotprod variant (ARMv8.2 sdot, chosen at
 * run time) differs only in how the exact integer dot is formed. */

static inline int32_t q80_neon_block_dot(const dl_block_q80 *wb, const dl_block_q80 *xb) {
    const int8x16_t w0 = vld1q_s8(wb->qs), w1 = vld1q_s8(wb->qs + 16);
    const int8x16_t x0 = vld1q_s8(xb->qs), x1 = vld1q_s8(xb->qs + 16);
    /* pairs of products of at most 128 * 127: no int16 overflow (x is never -128) */
    int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    p0 = vmlal_high_s8(p0, w0, x0);
    int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
    p1 = vmlal_high_s8(p1, w1, x1);
    return vaddvq_s32(vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1)));
}

void dl_matmul_q80_q80_rows_neon(float *out, const dl_block_q80 *w, const dl_block_q80 *x,
                                 const void *xprep, int r0, int r1, int rows, int cols, int batch) {
    (void)xprep;
    q80_rows_loop(out, w, x, r0, r1, rows, cols, batch, q80_neon_block_dot);
}

#if DL_HAVE_DOTPROD
DL_INLINE DL_TARGET_DOTPROD int32_t q80_dotprod_block_dot(const dl_block_q80 *wb, const dl_block_q80 *xb) {
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), vld1q_s8(wb->qs), vld1q_s8(xb->qs));
    acc = vdotq_s32(acc, vld1q_s8(wb->qs + 16), vld1q_s8(xb->qs + 16));
    return vaddvq_s32(acc);
}

DL_TARGET_DOTPROD void dl_matmul_q80_q80_rows_neon_dotprod(float *out, const dl_block_q80 *w,
                                                           const dl_block_q80 *x, const void *xprep,
                                                           int r0, int r1, int rows, int cols, int batch) {
    (void)xprep;
    q80_rows_loop(out, w, x, r0, r1, rows, cols, batch, q80_dotprod_block_dot);
}
#endif
#endif

/* ------------------------------------------------------------------------------------------ */
/* q80r: layout, repack, reference and SIMD group kernels */

#define G80 DL_Q80R_ROWS

static inline size_t r80_group_stride(int nb) { return dl_r16_stride(nb, 512); }
#define SCALES80(k) dl_r16_scales((k), 512)   /* offsets in a group of block k's scales and codes */
#define CODES80(k) dl_r16_codes((k), 512)

size_t dl_q80r_bytes(int rows, int cols) {
    if (rows <= 0 || cols <= 0) return 0;
    return (size_t)((rows + G80 - 1) / G80) * r80_group_stride(cols / DL_QK);
}

typedef struct { const dl_block_q80 *src; uint8_t *dst; int rows, nb; } r80_repack_ctx;

static void r80_repack_range(void *vctx, int64_t g0, int64_t g1) {
    r80_repack_ctx *c = (r80_repack_ctx *)vctx;
    const int nb = c->nb;
    const size_t gs = r80_group_stride(nb);
    for (int64_t g = g0; g < g1; g++) {
        uint8_t *dg = c->dst + (size_t)g * gs;
        memset(dg, 0x80, gs);                    /* padded rows: value 0 (stored 0 ^ 0x80) */
        for (int k = 0; k < nb; k++) memset(dg + SCALES80(k), 0, 32);   /* ... and scale 0 */
        for (int r = 0; r < G80; r++) {
            const int64_t row = g * G80 + r;
            if (row >= c->rows) break;
            const dl_block_q80 *wr = c->src + (size_t)row * nb;
            for (int k = 0; k < nb; k++) {
                memcpy(dg + SCALES80(k) + 2 * r, &wr[k].d, 2);
                uint8_t *v = dg + CODES80(k) + r * 4;
                for (int i = 0; i < 8; i++)
                    for (int m = 0; m < 4; m++) v[i * 64 + m] = (uint8_t)wr[k].qs[4 * i + m] ^ 0x80;
            }
        }
    }
}

void dl_repack_q80(void *dst, const dl_block_q80 *src, int rows, int cols) {
    if (rows <= 0 || cols <= 0) return;
    r80_repack_ctx c = {src, (uint8_t *)dst, rows, cols / DL_QK};
    dl_parallel_for((rows + G80 - 1) / G80, 1, r80_repack_range, &c);
}

void dl_unpack_q80r(dl_block_q80 *dst, const void *src, int rows, int cols) {
    const int nb = cols / DL_QK;
    const size_t gs = r80_group_stride(nb);
    for (int row = 0; row < rows; row++) {
        const uint8_t *sg = (const uint8_t *)src + (size_t)(row / G80) * gs;
        const int r = row % G80;
        for (int k = 0; k < nb; k++) {
            dl_block_q80 *b = dst + (size_t)row * nb + k;
            memcpy(&b->d, sg + SCALES80(k) + 2 * r, 2);
            const uint8_t *v = sg + CODES80(k) + r * 4;
            for (int i = 0; i < 8; i++)
                for (int m = 0; m < 4; m++) b->qs[4 * i + m] = (int8_t)(v[i * 64 + m] ^ 0x80);
        }
    }
}

/* prepared activations (dl_r16_xprep, kernels/repack.c): the codes are q ^ 0x80 */
static void r80_xprep(uint8_t *dst, const dl_block_q80 *x, int cols, int batch) { dl_r16_xprep(dst, x, cols, batch, -128); }

/* scalar reference on the repacked layout: the same arithmetic as dl_matmul_q80_q80_rows_scalar */
static void q80r_groups_scalar(float *out, const uint8_t *w, const dl_block_q80 *x, const uint8_t *xp,
                               int g0, int g1, int rows, int cols, int batch) {
    (void)xp;
    const int nb = cols / DL_QK;
    const size_t gs = r80_group_stride(nb);
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        for (int r = 0; r < G80; r++) {
            const int row = g * G80 + r;
            if (row >= rows) break;
            for (int b = 0; b < batch; b++) {
                const dl_block_q80 *xb = x + (size_t)b * nb;
                float sum = 0.0f;
                for (int k = 0; k < nb; k++) {
                    const uint8_t *v = wg + CODES80(k) + r * 4;
                    int32_t idot = 0;
                    for (int i = 0; i < 8; i++)
                        for (int m = 0; m < 4; m++)
                            idot += (int32_t)(int8_t)(v[i * 64 + m] ^ 0x80) * xb[k].qs[4 * i + m];
                    const float s = dl_f16_to_f32_scalar(dl_ld16(wg + SCALES80(k) + 2 * r)) *
                                    dl_f16_to_f32_scalar(xb[k].d);
                    sum += (float)idot * s;
                }
                out[(size_t)b * rows + row] = sum;
            }
        }
    }
}

static size_t q80r_pf = 0;   /* dl_weights_prefetch's distance, read per call */

#if DL_X86
/* AVX-512 VNNI: one group (16 rows) x B batch rows, all blocks; with a prefetch distance, block
 * k's share of the group's bytes (pairs of 2 blocks: 1088 bytes) that far ahead */
DL_INLINE DL_TARGET_AVX512 void q80r_group_avx512(float *out, const uint8_t *wg, const uint8_t *xp,
                                                  int nb, int cols, int rows, int row0, int b0,
                                                  const int B) {
    const size_t xs = dl_r16_xstride(cols);
    __m512 acc[8];
    for (int j = 0; j < B; j++) acc[j] = _mm512_setzero_ps();
    const size_t pf = q80r_pf, per = dl_r16_pair(512) / 2;
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = wg + CODES80(k);
        if (pf) dl_prefetch_span(wg + (size_t)k * per + pf, per);
        __m512i v[8];
        for (int i = 0; i < 8; i++) v[i] = _mm512_loadu_si512((const void *)(p + 64 * i));
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wg + SCALES80(k))));
        for (int j = 0; j < B; j++) {
            const uint8_t *xq = xp + (size_t)(b0 + j) * xs + (size_t)k * DL_QK;
            const int32_t *cd = (const int32_t *)(xp + (size_t)(b0 + j) * xs + cols) + 2 * k;
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_set1_epi32(cd[0]), v[0], _mm512_set1_epi32(dl_ld32(xq + 0)));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[1], _mm512_set1_epi32(dl_ld32(xq + 4)));
            s0 = _mm512_dpbusd_epi32(s0, v[2], _mm512_set1_epi32(dl_ld32(xq + 8)));
            s1 = _mm512_dpbusd_epi32(s1, v[3], _mm512_set1_epi32(dl_ld32(xq + 12)));
            s0 = _mm512_dpbusd_epi32(s0, v[4], _mm512_set1_epi32(dl_ld32(xq + 16)));
            s1 = _mm512_dpbusd_epi32(s1, v[5], _mm512_set1_epi32(dl_ld32(xq + 20)));
            s0 = _mm512_dpbusd_epi32(s0, v[6], _mm512_set1_epi32(dl_ld32(xq + 24)));
            s1 = _mm512_dpbusd_epi32(s1, v[7], _mm512_set1_epi32(dl_ld32(xq + 28)));
            const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(((const float *)cd)[1]));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), s, acc[j]);
        }
    }
    const int valid = rows - row0 < G80 ? rows - row0 : G80;
    const __mmask16 m = dl_tailmask16(valid);
    for (int j = 0; j < B; j++) _mm512_mask_storeu_ps(out + (size_t)(b0 + j) * rows + row0, m, acc[j]);
}

static DL_TARGET_AVX512 void q80r_groups_avx512(float *out, const uint8_t *w, const dl_block_q80 *x,
                                                const uint8_t *xp, int g0, int g1, int rows, int cols,
                                                int batch) {
    (void)x;
    const int nb = cols / DL_QK;
    const size_t gs = r80_group_stride(nb);
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        for (int b = 0; b < batch; b += 8) {
            const int B = batch - b < 8 ? batch - b : 8;
            switch (B) {
            case 1: q80r_group_avx512(out, wg, xp, nb, cols, rows, g * G80, b, 1); break;
            case 2: q80r_group_avx512(out, wg, xp, nb, cols, rows, g * G80, b, 2); break;
            case 3: q80r_group_avx512(out, wg, xp, nb, cols, rows, g * G80, b, 3); break;
            case 4: q80r_group_avx512(out, wg, xp, nb, cols, rows, g * G80, b, 4); break;
            case 5: q80r_group_avx512(out, wg, xp, nb, cols, rows, g * G80, b, 5); break;
            case 6: q80r_group_avx512(out, wg, xp, nb, cols, rows, g * G80, b, 6); break;
            case 7: q80r_group_avx512(out, wg, xp, nb, cols, rows, g * G80, b, 7); break;
            default: q80r_group_avx512(out, wg, xp, nb, cols, rows, g * G80, b, 8); break;
            }
        }
    }
}

/* 32-bit accumulate in program order: without the empty asm GCC reassociates a block's int32 sums
 * into a tree and spills every partial product to the stack first (as repack.c's add16_ordered) */
DL_INLINE DL_TARGET_AVX2 __m256i add32_ordered(__m256i acc, __m256i v) {
    acc = _mm256_add_epi32(acc, v);
    __asm__("" : "+x"(acc));
    return acc;
}

/* AVX2: each group as two halves of 8 rows (32 bytes of every 64); w = stored ^ 0x80, then
 * maddubs(|w|, sign(x, w)) (pairs below 2^15), madd to int32 per 4 values; no correction needed.
 * One half of a group x B batch rows per call, half after half (the second reads the group's lines
 * from L1): the live values are the B int32 sums and float accumulators, one code vector and its
 * |w|, so nothing spills (both halves' 16 code vectors at once spilled half of them per batch row:
 * 2026-12-07, Zen 3, classifier rows 2.0-2.5 ms each for Gemma 3). Per output the same exact
 * integer per block and the same float operations (cvt, dw * dx, fma) as before: the same bits.
 * Here and in the matvec and 2-row kernels each block's scales are loaded before its codes: loaded
 * after the products (2c99eed), Gemma 3's 1-thread decode fell from ~66 to ~53 tok/s on Zen 3, a
 * loss a microbenchmark streaming the classifier alone did not show (scripts/BENCHMARKS.md). */
DL_INLINE DL_TARGET_AVX2 void q80r_half_avx2(float *out, const uint8_t *wg, const uint8_t *xp, int nb, int cols,
                                             int rows, int row0, int h, int b0, const int B) {
    const size_t xs = dl_r16_xstride(cols);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[4];
    const uint8_t *xr[4];
    for (int j = 0; j < B; j++) {
        acc[j] = _mm256_setzero_ps();
        xr[j] = xp + (size_t)(b0 + j) * xs;
    }
    const size_t pf = h == 0 ? q80r_pf : 0, per = dl_r16_pair(512) / 2;
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = wg + CODES80(k) + 32 * h;
        if (pf) dl_prefetch_span(wg + (size_t)k * per + pf, per);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + SCALES80(k) + 16 * h)));
        __m256i s32[4];
        for (int j = 0; j < B; j++) s32[j] = _mm256_setzero_si256();
        for (int i = 0; i < 8; i++) {
            const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 64 * i)), flip);
            const __m256i wa = _mm256_abs_epi8(wv);
            for (int j = 0; j < B; j++) {
                const __m256i xv = _mm256_set1_epi32(dl_ld32(xr[j] + (size_t)k * DL_QK + 4 * i));
                s32[j] = add32_ordered(s32[j], q80_dot4_avx2(wa, wv, xv));
            }
        }
        for (int j = 0; j < B; j++) {
            const __m256 dx = _mm256_set1_ps(((const float *)(xr[j] + cols))[2 * k + 1]);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[j]), _mm256_mul_ps(dw, dx), acc[j]);
        }
    }
    dl_store_half8(out, rows, row0 + 8 * h, b0, B, rows - row0 - 8 * h, acc);
}

/* the matvec: per block the 8 code vectors of a half loaded first, then the products: the most
 * loads in flight while the bytes stream in (interleaving loads and products per code vector, as the
 * 2-row kernel below does, left the Gemma 3 classifier's matvec 15 % slower on Zen 3) */
DL_INLINE DL_TARGET_AVX2 void q80r_matvec_avx2(float *out, const uint8_t *wg, const uint8_t *xp, int nb, int cols,
                                               int rows, int row0) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    const size_t pf = q80r_pf, per = dl_r16_pair(512) / 2;
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = wg + CODES80(k);
        if (pf) dl_prefetch_span(wg + (size_t)k * per + pf, per);
        const __m256 dx = _mm256_set1_ps(((const float *)(xp + cols))[2 * k + 1]);
        const __m256 dw[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + SCALES80(k)))),
                              _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + SCALES80(k) + 16)))};
        for (int h = 0; h < 2; h++) {
            __m256i wv[8], wa[8];
            for (int i = 0; i < 8; i++) {
                wv[i] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 64 * i + 32 * h)), flip);
                wa[i] = _mm256_abs_epi8(wv[i]);
            }
            __m256i s32 = _mm256_setzero_si256();
            for (int i = 0; i < 8; i++) {
                const __m256i xv = _mm256_set1_epi32(dl_ld32(xp + (size_t)k * DL_QK + 4 * i));
                s32 = _mm256_add_epi32(s32, q80_dot4_avx2(wa[i], wv[i], xv));
            }
            acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(dw[h], dx), acc[h]);
        }
    }
    dl_store16(out + row0, acc[0], acc[1], rows - row0);
}

/* 2 batch rows, which still wait on memory: both halves per block as the group's bytes stream in
 * (one half after the other left 1-2-row calls 20-40 % slower); each code vector's |w| serves both */
DL_INLINE DL_TARGET_AVX2 void q80r_pair_avx2(float *out, const uint8_t *wg, const uint8_t *xp, int nb, int cols,
                                             int rows, int row0) {
    const size_t xs = dl_r16_xstride(cols);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[2][2];
    for (int h = 0; h < 2; h++) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
    const size_t pf = q80r_pf, per = dl_r16_pair(512) / 2;
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = wg + CODES80(k);
        if (pf) dl_prefetch_span(wg + (size_t)k * per + pf, per);
        const __m256 dw[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + SCALES80(k)))),
                              _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + SCALES80(k) + 16)))};
        __m256i s32[2][2];
        for (int h = 0; h < 2; h++) s32[h][0] = s32[h][1] = _mm256_setzero_si256();
        for (int i = 0; i < 8; i++) {
            const __m256i x0 = _mm256_set1_epi32(dl_ld32(xp + (size_t)k * DL_QK + 4 * i));
            const __m256i x1 = _mm256_set1_epi32(dl_ld32(xp + xs + (size_t)k * DL_QK + 4 * i));
            for (int h = 0; h < 2; h++) {
                const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 64 * i + 32 * h)), flip);
                const __m256i wa = _mm256_abs_epi8(wv);
                s32[h][0] = add32_ordered(s32[h][0], q80_dot4_avx2(wa, wv, x0));
                s32[h][1] = add32_ordered(s32[h][1], q80_dot4_avx2(wa, wv, x1));
            }
        }
        for (int h = 0; h < 2; h++) {
            for (int j = 0; j < 2; j++) {
                const __m256 dx = _mm256_set1_ps(((const float *)(xp + (size_t)j * xs + cols))[2 * k + 1]);
                acc[h][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[h][j]), _mm256_mul_ps(dw[h], dx), acc[h][j]);
            }
        }
    }
    for (int j = 0; j < 2; j++) dl_store16(out + (size_t)j * rows + row0, acc[0][j], acc[1][j], rows - row0);
}

static DL_TARGET_AVX2 void q80r_groups_avx2(float *out, const uint8_t *w, const dl_block_q80 *x,
                                            const uint8_t *xp, int g0, int g1, int rows, int cols,
                                            int batch) {
    (void)x;
    const int nb = cols / DL_QK;
    const size_t gs = r80_group_stride(nb);
    if (batch <= 2) {
        for (int g = g0; g < g1; g++)
            if (batch == 1) q80r_matvec_avx2(out, w + (size_t)g * gs, xp, nb, cols, rows, g * G80);
            else q80r_pair_avx2(out, w + (size_t)g * gs, xp, nb, cols, rows, g * G80);
        return;
    }
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        const int halves = rows - g * G80 > 8 ? 2 : 1;   /* a padded half computes nothing */
        for (int b = 0; b < batch; b += 4) {
            const int B = batch - b < 4 ? batch - b : 4;
            for (int h = 0; h < halves; h++) {
                switch (B) {
                case 1: q80r_half_avx2(out, wg, xp, nb, cols, rows, g * G80, h, b, 1); break;
                case 2: q80r_half_avx2(out, wg, xp, nb, cols, rows, g * G80, h, b, 2); break;
                case 3: q80r_half_avx2(out, wg, xp, nb, cols, rows, g * G80, h, b, 3); break;
                default: q80r_half_avx2(out, wg, xp, nb, cols, rows, g * G80, h, b, 4); break;
                }
            }
        }
    }
}
#endif /* DL_X86 */

#if DL_NEON
/* NEON: quads of 4 rows as in q40r (DL_R16_NEON_GROUPS, dl_internal.h): a 16-byte load at
 * 64 * i + 16 * q is 4 rows x values 4i..4i+3, stored w ^ 0x80 and flipped back to int8 (sdot and
 * smull are signed x signed; no correction). Plain NEON: smull + smlal of two value groups (each
 * product |w x| <= 128 * 127, two below 2^15), then pairwise accumulated into int32 (sadalp).
 * Dotprod: sdot by element, the block's 32 activations in two registers. */
DL_INLINE int32x4_t q80r_quad_neon(const uint8_t *p, int q, const uint8_t *xq, int32_t corr) {
    (void)corr;
    const int8x16_t flip = vdupq_n_s8(-128);
    int32x4_t a01 = vdupq_n_s32(0), a23 = vdupq_n_s32(0);
    for (int i = 0; i < 8; i += 2) {
        const int8x16_t v0 = veorq_s8(vld1q_s8((const int8_t *)p + 64 * i + 16 * q), flip);
        const int8x16_t v1 = veorq_s8(vld1q_s8((const int8_t *)p + 64 * (i + 1) + 16 * q), flip);
        const int8x16_t x0 = vreinterpretq_s8_s32(vdupq_n_s32(dl_ld32(xq + 4 * i)));
        const int8x16_t x1 = vreinterpretq_s8_s32(vdupq_n_s32(dl_ld32(xq + 4 * i + 4)));
        a01 = vpadalq_s16(a01, vmlal_s8(vmull_s8(vget_low_s8(v0), vget_low_s8(x0)), vget_low_s8(v1), vget_low_s8(x1)));
        a23 = vpadalq_s16(a23, vmlal_high_s8(vmull_high_s8(v0, x0), v1, x1));
    }
    return vpaddq_s32(a01, a23);   /* [row 4q .. 4q+3] */
}

static void q80r_groups_neon(float *out, const uint8_t *w, const dl_block_q80 *x, const uint8_t *xp,
                             int g0, int g1, int rows, int cols, int batch) {
    DL_R16_NEON_GROUPS(q80r_quad_neon, 512);
}

#if DL_HAVE_DOTPROD
#define Q80R_SDOT(acc, i, xv, lane) \
    acc = vdotq_laneq_s32(acc, veorq_s8(vld1q_s8((const int8_t *)p + 64 * (i) + 16 * q), flip), xv, lane)

DL_INLINE DL_TARGET_DOTPROD int32x4_t q80r_quad_dotprod(const uint8_t *p, int q, const uint8_t *xq, int32_t corr) {
    (void)corr;
    const int8x16_t flip = vdupq_n_s8(-128);
    const int8x16_t xlo = vld1q_s8((const int8_t *)xq), xhi = vld1q_s8((const int8_t *)xq + 16);
    int32x4_t a = vdupq_n_s32(0), b = vdupq_n_s32(0);   /* two chains: sdot latency */
    Q80R_SDOT(a, 0, xlo, 0); Q80R_SDOT(b, 1, xlo, 1); Q80R_SDOT(a, 2, xlo, 2); Q80R_SDOT(b, 3, xlo, 3);
    Q80R_SDOT(a, 4, xhi, 0); Q80R_SDOT(b, 5, xhi, 1); Q80R_SDOT(a, 6, xhi, 2); Q80R_SDOT(b, 7, xhi, 3);
    return vaddq_s32(a, b);
}

static DL_TARGET_DOTPROD void q80r_groups_dotprod(float *out, const uint8_t *w, const dl_block_q80 *x,
                                                  const uint8_t *xp, int g0, int g1, int rows, int cols,
                                                  int batch) {
    DL_R16_NEON_GROUPS(q80r_quad_dotprod, 512);
}
#endif
#endif /* DL_NEON */

/* as dl_matmul_q40r_q80_n (kernels/repack.c): n matrices with the same x in one guided job */
void dl_matmul_q80r_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch) {
    const int isa = dl_get_isa();
    dl_r16_group_fn fn = NULL;
    q80r_pf = (size_t)dl_weights_prefetch(-1);
#if DL_X86
    if (isa == DL_ISA_AVX512) fn = q80r_groups_avx512;
    if (isa == DL_ISA_AVX2) fn = q80r_groups_avx2;
#endif
#if DL_NEON
    if (isa == DL_ISA_NEON) fn = q80r_groups_neon;
#if DL_HAVE_DOTPROD
    if (isa == DL_ISA_NEON_DOTPROD) fn = q80r_groups_dotprod;
#endif
#endif
    dl_r16_matmul_n(n, out, w, rows, x, cols, batch, q80r_groups_scalar, fn, r80_xprep,
                    dl_r16_xstride(cols) * (size_t)(batch > 0 ? batch : 0), 1);
}

void dl_matmul_q80r_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch) {
    dl_matmul_q80r_q80_n(1, &out, &w, &rows, x, cols, batch);
}

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
