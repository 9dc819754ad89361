/* Interleaved ("repacked") q40 weights and their q40r x q80 matmul.
 *
 * The .m file keeps Distributed Llama's plain q40 blocks; at load time every rank repacks its slice
 * into a layout made for one SIMD pass over 16 rows at a time:
 *
 *   rows are cut into groups of DL_Q40R_ROWS = 16 (the last group padded with zero rows: scale 0,
 *   codes 0, so padded rows compute exact zeros and are never stored);
 *   per group, SC = round_up(32 * nb, 64) bytes of scales: for block k, the 16 rows' f16 scales
 *   (32 bytes at 32 * k), then 256 * nb bytes of codes: block k at SC + 256 * k holds
 *   [i = 0..3][row r = 0..15][m = 0..3] = qs[4 * i + m] of row r (one byte = two 4-bit codes: low
 *   nibble = value 4i+m, high nibble = value 16+4i+m).
 *   Group stride = SC + 256 * nb (a multiple of 64), total = ceil(rows / 16) * stride bytes.
 *
 * So 64 bytes = 16 rows x 4 bytes: one 512-bit vpdpbusd per 4 columns (low nibbles) and one per the
 * 4 columns 16 further (high nibbles), with the activations' 4 int8 broadcast to every lane.
 * Unsigned codes 0..15 feed u8 x s8 directly; the accumulator starts at -8 * sum(block of x) which
 * turns sum(code * x) into sum((code - 8) * x) exactly. Then one f32 convert and one FMA per block
 * with the per-row f16 scale times the block's activation scale. A group's data is one contiguous
 * stream, a thread's row range (whole groups) too: the hardware prefetcher sees sequential reads.
 *
 * Results per output element: float sum over blocks of (float)idot * (d_w * d_x); the scalar path
 * does exactly what the plain scalar q40 x q80 kernel does (bit-identical), the SIMD paths sum in
 * the same order with FMA (one rounding less). Each output is computed by one thread with the same
 * operations whatever the thread count.
 */
#define _POSIX_C_SOURCE 200809L
#include "dl_internal.h"
#include <stdlib.h>
#include <string.h>
#if DL_X86
#include <immintrin.h>
#endif

#define G DL_Q40R_ROWS

static inline size_t sc_bytes(int nb) { return ((size_t)nb * 32 + 63) & ~(size_t)63; }
static inline size_t group_stride(int nb) { return sc_bytes(nb) + (size_t)nb * 256; }

size_t dl_q40r_bytes(int rows, int cols) {
    if (rows <= 0 || cols <= 0) return 0;
    const int nb = cols / DL_QK;
    return (size_t)((rows + G - 1) / G) * group_stride(nb);
}

typedef struct { const dl_block_q40 *src; uint8_t *dst; int rows, nb; } repack_ctx;

static void repack_range(void *vctx, int64_t g0, int64_t g1) {
    repack_ctx *c = (repack_ctx *)vctx;
    const int nb = c->nb;
    const size_t gs = group_stride(nb), sc = sc_bytes(nb);
    for (int64_t g = g0; g < g1; g++) {
        uint8_t *dg = c->dst + (size_t)g * gs;
        memset(dg, 0, gs);
        for (int r = 0; r < G; r++) {
            const int64_t row = g * G + r;
            if (row >= c->rows) break;
            const dl_block_q40 *wr = c->src + (size_t)row * nb;
            for (int k = 0; k < nb; k++) {
                memcpy(dg + (size_t)k * 32 + 2 * r, &wr[k].d, 2);
                uint8_t *nib = dg + sc + (size_t)k * 256;
                for (int i = 0; i < 4; i++) memcpy(nib + i * 64 + r * 4, wr[k].qs + 4 * i, 4);
            }
        }
    }
}

void dl_repack_q40(void *dst, const dl_block_q40 *src, int rows, int cols) {
    if (rows <= 0 || cols <= 0) return;
    repack_ctx c = {src, (uint8_t *)dst, rows, cols / DL_QK};
    dl_parallel_for((rows + G - 1) / G, 1, repack_range, &c);
}

void dl_unpack_q40r(dl_block_q40 *dst, const void *src, int rows, int cols) {
    const int nb = cols / DL_QK;
    const size_t gs = group_stride(nb), sc = sc_bytes(nb);
    for (int row = 0; row < rows; row++) {
        const uint8_t *sg = (const uint8_t *)src + (size_t)(row / G) * gs;
        const int r = row % G;
        for (int k = 0; k < nb; k++) {
            dl_block_q40 *b = dst + (size_t)row * nb + k;
            memcpy(&b->d, sg + (size_t)k * 32 + 2 * r, 2);
            for (int i = 0; i < 4; i++) memcpy(b->qs + 4 * i, sg + sc + (size_t)k * 256 + i * 64 + r * 4, 4);
        }
    }
}

static int q40r_pf = -1;
int dl_q40r_prefetch(int bytes) { if (bytes >= 0) q40r_pf = bytes; return q40r_pf; }
static int q40r_split = 4;   /* matvec streams per thread (1..4); 4 measured best on Zen 4 */
int dl_q40r_split(int n) { if (n >= 0) q40r_split = n; return q40r_split; }

/* ------------------------------------------------------------------------------------------ */
/* prepared activations: per batch row, the int8 values of all blocks back to back, then per block
 * {int32 -8 * sum(q), float d}; stride rounded up to 64 bytes. */

static inline size_t xr_stride(int cols) {
    return ((size_t)cols + (size_t)(cols / DL_QK) * 8 + 63) & ~(size_t)63;
}

static void xr_prep(uint8_t *dst, const dl_block_q80 *x, int cols, int batch) {
    const int nb = cols / DL_QK;
    const size_t st = xr_stride(cols);
    for (int b = 0; b < batch; b++) {
        int8_t *qs = (int8_t *)(dst + (size_t)b * st);
        int32_t *cd = (int32_t *)(dst + (size_t)b * st + cols);
        const dl_block_q80 *xb = x + (size_t)b * nb;
        for (int k = 0; k < nb; k++) {
            int32_t s = 0;
            for (int j = 0; j < DL_QK; j++) s += xb[k].qs[j];
            memcpy(qs + (size_t)k * DL_QK, xb[k].qs, DL_QK);
            const float d = dl_f16_to_f32_scalar(xb[k].d);
            cd[2 * k] = -8 * s;
            memcpy(&cd[2 * k + 1], &d, 4);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* scalar reference (reads the plain q80 x; same arithmetic as dl_matmul_q40_q80_rows_scalar) */

static void q40r_groups_scalar(float *out, const uint8_t *w, const dl_block_q80 *x, const uint8_t *xp,
                               int g0, int g1, int rows, int cols, int batch) {
    (void)xp;
    const int nb = cols / DL_QK;
    const size_t gs = group_stride(nb), sc = sc_bytes(nb);
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        for (int r = 0; r < G; r++) {
            const int row = g * G + r;
            if (row >= rows) break;
            for (int b = 0; b < batch; b++) {
                const dl_block_q80 *xb = x + (size_t)b * nb;
                float sum = 0.0f;
                for (int k = 0; k < nb; k++) {
                    const uint8_t *nib = wg + sc + (size_t)k * 256 + r * 4;
                    int32_t idot = 0;
                    for (int i = 0; i < 4; i++)
                        for (int m = 0; m < 4; m++) {
                            const uint8_t q = nib[i * 64 + m];
                            idot += ((int32_t)(q & 15) - 8) * xb[k].qs[4 * i + m];
                            idot += ((int32_t)(q >> 4) - 8) * xb[k].qs[16 + 4 * i + m];
                        }
                    uint16_t dw;
                    memcpy(&dw, wg + (size_t)k * 32 + 2 * r, 2);
                    sum += (float)idot * (dl_f16_to_f32_scalar(dw) * dl_f16_to_f32_scalar(xb[k].d));
                }
                out[(size_t)b * rows + row] = sum;
            }
        }
    }
}

#if DL_X86
   /* bytes ahead to software-prefetch (0 = off); DLLAMA_Q40R_PF overrides */
static int q40r_prefetch(void) {
    if (q40r_pf < 0) {
        const char *e = getenv("DLLAMA_Q40R_PF");
        q40r_pf = e ? atoi(e) : 0;
    }
    return q40r_pf;
}

static inline int32_t ld32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* ------------------------------------------------------------------------------------------ */
/* AVX-512 VNNI: one group (16 rows) x B batch rows, all blocks */

DL_INLINE DL_TARGET_AVX512 void q40r_group_avx512(float *out, const uint8_t *wg, const uint8_t *xp,
                                                  int nb, int cols, int rows, int row0, int b0,
                                                  const int B) {
    const size_t sc = sc_bytes(nb), xs = xr_stride(cols);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int pf = q40r_pf;
    __m512 acc[8];
    for (int j = 0; j < B; j++) acc[j] = _mm512_setzero_ps();
    const uint8_t *nibs = wg + sc;
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = nibs + (size_t)k * 256;
        if (pf) {
            _mm_prefetch((const char *)p + pf, _MM_HINT_T0);
            _mm_prefetch((const char *)p + pf + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)p + pf + 128, _MM_HINT_T0);
            _mm_prefetch((const char *)p + pf + 192, _MM_HINT_T0);
        }
        const __m512i v0 = _mm512_loadu_si512((const void *)(p + 0));
        const __m512i v1 = _mm512_loadu_si512((const void *)(p + 64));
        const __m512i v2 = _mm512_loadu_si512((const void *)(p + 128));
        const __m512i v3 = _mm512_loadu_si512((const void *)(p + 192));
        const __m512i l0 = _mm512_and_si512(v0, m4), h0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
        const __m512i l1 = _mm512_and_si512(v1, m4), h1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
        const __m512i l2 = _mm512_and_si512(v2, m4), h2 = _mm512_and_si512(_mm512_srli_epi16(v2, 4), m4);
        const __m512i l3 = _mm512_and_si512(v3, m4), h3 = _mm512_and_si512(_mm512_srli_epi16(v3, 4), m4);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wg + (size_t)k * 32)));
        for (int j = 0; j < B; j++) {
            const uint8_t *xq = xp + (size_t)(b0 + j) * xs + (size_t)k * DL_QK;
            const int32_t *cd = (const int32_t *)(xp + (size_t)(b0 + j) * xs + cols) + 2 * k;
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_set1_epi32(cd[0]), l0, _mm512_set1_epi32(ld32(xq + 0)));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), h0, _mm512_set1_epi32(ld32(xq + 16)));
            s0 = _mm512_dpbusd_epi32(s0, l1, _mm512_set1_epi32(ld32(xq + 4)));
            s1 = _mm512_dpbusd_epi32(s1, h1, _mm512_set1_epi32(ld32(xq + 20)));
            s0 = _mm512_dpbusd_epi32(s0, l2, _mm512_set1_epi32(ld32(xq + 8)));
            s1 = _mm512_dpbusd_epi32(s1, h2, _mm512_set1_epi32(ld32(xq + 24)));
            s0 = _mm512_dpbusd_epi32(s0, l3, _mm512_set1_epi32(ld32(xq + 12)));
            s1 = _mm512_dpbusd_epi32(s1, h3, _mm512_set1_epi32(ld32(xq + 28)));
            const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(((const float *)cd)[1]));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), s, acc[j]);
        }
    }
    const int valid = rows - row0 < G ? rows - row0 : G;
    const __mmask16 m = valid == G ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
    for (int j = 0; j < B; j++) _mm512_mask_storeu_ps(out + (size_t)(b0 + j) * rows + row0, m, acc[j]);
}

/* matvec: NG groups side by side (NG independent streams: more memory-level parallelism) */
DL_INLINE DL_TARGET_AVX512 __m512 q40r_block_b1_avx512(__m512 acc, const uint8_t *wg, const uint8_t *p, int k,
                                                       const uint8_t *xq, const int32_t *cd, __m512i m4) {
    const __m512i v0 = _mm512_loadu_si512((const void *)(p + 0));
    const __m512i v1 = _mm512_loadu_si512((const void *)(p + 64));
    const __m512i v2 = _mm512_loadu_si512((const void *)(p + 128));
    const __m512i v3 = _mm512_loadu_si512((const void *)(p + 192));
    __m512i s0 = _mm512_dpbusd_epi32(_mm512_set1_epi32(cd[0]), _mm512_and_si512(v0, m4), _mm512_set1_epi32(ld32(xq + 0)));
    __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4), _mm512_set1_epi32(ld32(xq + 16)));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v1, m4), _mm512_set1_epi32(ld32(xq + 4)));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4), _mm512_set1_epi32(ld32(xq + 20)));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v2, m4), _mm512_set1_epi32(ld32(xq + 8)));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v2, 4), m4), _mm512_set1_epi32(ld32(xq + 24)));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v3, m4), _mm512_set1_epi32(ld32(xq + 12)));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v3, 4), m4), _mm512_set1_epi32(ld32(xq + 28)));
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wg + (size_t)k * 32)));
    const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(((const float *)cd)[1]));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), s, acc);
}

/* out_g[0..15] for NS groups read side by side (NS independent sequential streams) */
DL_INLINE DL_TARGET_AVX512 void q40r_ngroups_b1_avx512(float *const *outs, const int *valid,
                                                       const uint8_t *const *wgs, const uint8_t *xp, int nb,
                                                       int cols, const int NS) {
    const size_t sc = sc_bytes(nb);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int pf = q40r_pf;
    __m512 acc[4];
    for (int s = 0; s < NS; s++) acc[s] = _mm512_setzero_ps();
    const int32_t *cd = (const int32_t *)(xp + cols);
    for (int k = 0; k < nb; k++) {
        for (int s = 0; s < NS; s++) {
            const uint8_t *p = wgs[s] + sc + (size_t)k * 256;
            if (pf)
                for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)p + pf + l, _MM_HINT_T0);
            acc[s] = q40r_block_b1_avx512(acc[s], wgs[s], p, k, xp + (size_t)k * DL_QK, cd + 2 * k, m4);
        }
    }
    for (int s = 0; s < NS; s++)
        _mm512_mask_storeu_ps(outs[s], valid[s] == G ? (__mmask16)0xFFFF : (__mmask16)((1u << valid[s]) - 1), acc[s]);
}

static DL_TARGET_AVX512 void q40r_groups_avx512(float *out, const uint8_t *w, const dl_block_q80 *x,
                                                const uint8_t *xp, int g0, int g1, int rows, int cols,
                                                int batch) {
    (void)x;
    const int nb = cols / DL_QK;
    const size_t gs = group_stride(nb);
    if (batch == 1 && q40r_split > 1) {   /* matvec: the range cut into NS parts read side by side */
        const int NS = q40r_split > 4 ? 4 : q40r_split;
        const int per = (g1 - g0) / NS;
        for (int i = 0; i < per; i++) {
            float *outs[4];
            int valid[4];
            const uint8_t *wgs[4];
            for (int s = 0; s < NS; s++) {
                const int g = g0 + s * per + i;
                outs[s] = out + (size_t)g * G;
                valid[s] = rows - g * G < G ? rows - g * G : G;
                wgs[s] = w + (size_t)g * gs;
            }
            if (NS == 4) q40r_ngroups_b1_avx512(outs, valid, wgs, xp, nb, cols, 4);
            else if (NS == 3) q40r_ngroups_b1_avx512(outs, valid, wgs, xp, nb, cols, 3);
            else q40r_ngroups_b1_avx512(outs, valid, wgs, xp, nb, cols, 2);
        }
        g0 += NS * per;   /* the remainder below */
    }
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        for (int b = 0; b < batch; b += 8) {
            const int B = batch - b < 8 ? batch - b : 8;
            switch (B) {
            case 1: q40r_group_avx512(out, wg, xp, nb, cols, rows, g * G, b, 1); break;
            case 2: q40r_group_avx512(out, wg, xp, nb, cols, rows, g * G, b, 2); break;
            case 3: q40r_group_avx512(out, wg, xp, nb, cols, rows, g * G, b, 3); break;
            case 4: q40r_group_avx512(out, wg, xp, nb, cols, rows, g * G, b, 4); break;
            case 5: q40r_group_avx512(out, wg, xp, nb, cols, rows, g * G, b, 5); break;
            case 6: q40r_group_avx512(out, wg, xp, nb, cols, rows, g * G, b, 6); break;
            case 7: q40r_group_avx512(out, wg, xp, nb, cols, rows, g * G, b, 7); break;
            default: q40r_group_avx512(out, wg, xp, nb, cols, rows, g * G, b, 8); break;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX2: each group as two halves of 8 rows (32 bytes of every 64); maddubs (u8 x s8 -> s16) summed
 * in 16 bits over a block (8 products of at most 15 * 128 * 2 = 3840: |sum| <= 30720, no
 * saturation), then one madd to 32 bits. */

DL_INLINE DL_TARGET_AVX2 void q40r_group_avx2(float *out, const uint8_t *wg, const uint8_t *xp,
                                              int nb, int cols, int rows, int row0, int b0,
                                              const int B) {
    const size_t sc = sc_bytes(nb), xs = xr_stride(cols);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][4];
    for (int j = 0; j < B; j++) acc[0][j] = acc[1][j] = _mm256_setzero_ps();
    const uint8_t *nibs = wg + sc;
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = nibs + (size_t)k * 256;
        const __m256 dw0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + (size_t)k * 32)));
        const __m256 dw1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + (size_t)k * 32 + 16)));
        for (int j = 0; j < B; j++) {
            const uint8_t *xq = xp + (size_t)(b0 + j) * xs + (size_t)k * DL_QK;
            const int32_t *cd = (const int32_t *)(xp + (size_t)(b0 + j) * xs + cols) + 2 * k;
            __m256i s16[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int i = 0; i < 4; i++) {
                const __m256i xl = _mm256_set1_epi32(ld32(xq + 4 * i));
                const __m256i xh = _mm256_set1_epi32(ld32(xq + 16 + 4 * i));
                for (int h = 0; h < 2; h++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 64 * i + 32 * h));
                    s16[h] = _mm256_add_epi16(s16[h], _mm256_maddubs_epi16(_mm256_and_si256(v, m4), xl));
                    s16[h] = _mm256_add_epi16(s16[h], _mm256_maddubs_epi16(
                        _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), xh));
                }
            }
            const __m256i corr = _mm256_set1_epi32(cd[0]);
            const __m256 dx = _mm256_set1_ps(((const float *)cd)[1]);
            const __m256i d0 = _mm256_add_epi32(_mm256_madd_epi16(s16[0], ones), corr);
            const __m256i d1 = _mm256_add_epi32(_mm256_madd_epi16(s16[1], ones), corr);
            acc[0][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(dw0, dx), acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(dw1, dx), acc[1][j]);
        }
    }
    const int valid = rows - row0 < G ? rows - row0 : G;
    for (int j = 0; j < B; j++) {
        float *o = out + (size_t)(b0 + j) * rows + row0;
        if (valid == G) {
            _mm256_storeu_ps(o, acc[0][j]);
            _mm256_storeu_ps(o + 8, acc[1][j]);
        } else {
            float tmp[16];
            _mm256_storeu_ps(tmp, acc[0][j]);
            _mm256_storeu_ps(tmp + 8, acc[1][j]);
            for (int r = 0; r < valid; r++) o[r] = tmp[r];
        }
    }
}

static DL_TARGET_AVX2 void q40r_groups_avx2(float *out, const uint8_t *w, const dl_block_q80 *x,
                                            const uint8_t *xp, int g0, int g1, int rows, int cols,
                                            int batch) {
    (void)x;
    const int nb = cols / DL_QK;
    const size_t gs = group_stride(nb);
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        for (int b = 0; b < batch; b += 4) {
            const int B = batch - b < 4 ? batch - b : 4;
            switch (B) {
            case 1: q40r_group_avx2(out, wg, xp, nb, cols, rows, g * G, b, 1); break;
            case 2: q40r_group_avx2(out, wg, xp, nb, cols, rows, g * G, b, 2); break;
            case 3: q40r_group_avx2(out, wg, xp, nb, cols, rows, g * G, b, 3); break;
            default: q40r_group_avx2(out, wg, xp, nb, cols, rows, g * G, b, 4); break;
            }
        }
    }
}
#endif /* DL_X86 */

/* ------------------------------------------------------------------------------------------ */
/* entry point: whole groups per thread (16 rows = 64 bytes of output per batch row: with a 64-byte
 * aligned `out` no two threads write the same cache line) */

typedef void (*q40r_fn)(float *, const uint8_t *, const dl_block_q80 *, const uint8_t *, int, int, int, int, int);

typedef struct {
    float *out;
    const uint8_t *w;
    const dl_block_q80 *x;
    const uint8_t *xp;
    int rows, cols, batch;
    q40r_fn fn;
} q40r_ctx;

static void q40r_range(void *vctx, int64_t s, int64_t e) {
    q40r_ctx *c = (q40r_ctx *)vctx;
    c->fn(c->out, c->w, c->x, c->xp, (int)s, (int)e, c->rows, c->cols, c->batch);
}

void dl_matmul_q40r_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch) {
    if (rows <= 0 || batch <= 0) return;
    q40r_ctx c = {out, (const uint8_t *)w, x, NULL, rows, cols, batch, q40r_groups_scalar};
    const int isa = dl_get_isa();
#if DL_X86
    if (isa == DL_ISA_AVX512 || isa == DL_ISA_AVX2) {
        uint8_t *xp = (uint8_t *)dl_scratch(xr_stride(cols) * (size_t)batch);
        if (xp) {
            xr_prep(xp, x, cols, batch);
            c.xp = xp;
            c.fn = isa == DL_ISA_AVX512 ? q40r_groups_avx512 : q40r_groups_avx2;
            q40r_prefetch();
        }
    }
#else
    (void)isa;   /* NEON and others: the scalar reference on the repacked layout */
#endif
    dl_parallel_for((rows + G - 1) / G, 1, q40r_range, &c);
}

/* ------------------------------------------------------------------------------------------ */
/* read bandwidth probe: sums n bytes (64-bit words) over the pool; returns the sum so the reads
 * cannot be optimised away */

typedef struct { const uint64_t *p; _Alignas(64) uint64_t part[256 * 8]; } bw_ctx;

static void bw_range(void *vctx, int64_t s, int64_t e) {
    bw_ctx *c = (bw_ctx *)vctx;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int64_t i = s;
    for (; i + 4 <= e; i += 4) { a0 += c->p[i]; a1 += c->p[i + 1]; a2 += c->p[i + 2]; a3 += c->p[i + 3]; }
    for (; i < e; i++) a0 += c->p[i];
    const int slot = (int)((s * 256) / (e > 0 ? e : 1)) & 255;   /* any slot: only the total matters */
    __atomic_fetch_add(&c->part[slot * 8], a0 + a1 + a2 + a3, __ATOMIC_RELAXED);
}

uint64_t dl_read_bytes(const void *p, size_t n) {
    static bw_ctx c;
    memset(c.part, 0, sizeof(c.part));
    c.p = (const uint64_t *)p;
    dl_parallel_for((int64_t)(n / 8), 512, bw_range, &c);
    uint64_t t = 0;
    for (int i = 0; i < 256; i++) t += c.part[i * 8];
    return t;
}
