/* Interleaved ("repacked") q40 weights and their q40r x q80 matmul.
 *
 * The .m file keeps Distributed Llama's plain q40 blocks; at load time every rank repacks its slice
 * into a layout made for one SIMD pass over 16 rows at a time:
 *
 *   rows are cut into groups of DL_Q40R_ROWS = 16 (the last group padded with zero rows: scale 0,
 *   codes 0, so padded rows compute exact zeros and are never stored);
 *   per group, blocks in pairs (dl_internal.h, dl_r16_*): pair j = 64 bytes of scales (block 2j's
 *   16 rows' f16 scales, then block 2j+1's), then 256 bytes of codes per block: block k's codes
 *   hold [i = 0..3][row r = 0..15][m = 0..3] = qs[4 * i + m] of row r (one byte = two 4-bit
 *   codes: low nibble = value 4i+m, high nibble = value 16+4i+m).
 *   Group stride = 576 * ceil(nb / 2) (a multiple of 64), total = ceil(rows / 16) * stride bytes.
 *
 * So 64 bytes = 16 rows x 4 bytes: one 512-bit vpdpbusd per 4 columns (low nibbles) and one per the
 * 4 columns 16 further (high nibbles), with the activations' 4 int8 broadcast to every lane.
 * Unsigned codes 0..15 feed u8 x s8 directly; the accumulator starts at -8 * sum(block of x) which
 * turns sum(code * x) into sum((code - 8) * x) exactly. Then one f32 convert and one FMA per block
 * with the per-row f16 scale times the block's activation scale. A group's data is one contiguous
 * stream (scales inline), a thread's row range (whole groups) too: the hardware prefetcher sees
 * sequential reads.
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
#if DL_NEON
#include <arm_neon.h>
#endif

#define G DL_Q40R_ROWS

static inline size_t group_stride(int nb) { return dl_r16_stride(nb, 256); }
#define SCALES(k) dl_r16_scales((k), 256)   /* offsets in a group of block k's scales and codes */
#define CODES(k) dl_r16_codes((k), 256)

size_t dl_q40r_bytes(int rows, int cols) {
    if (rows <= 0 || cols <= 0) return 0;
    const int nb = cols / DL_QK;
    return (size_t)((rows + G - 1) / G) * group_stride(nb);
}

typedef struct { const dl_block_q40 *src; uint8_t *dst; int rows, nb; } repack_ctx;

static void repack_range(void *vctx, int64_t g0, int64_t g1) {
    repack_ctx *c = (repack_ctx *)vctx;
    const int nb = c->nb;
    const size_t gs = group_stride(nb);
    for (int64_t g = g0; g < g1; g++) {
        uint8_t *dg = c->dst + (size_t)g * gs;
        memset(dg, 0, gs);
        for (int r = 0; r < G; r++) {
            const int64_t row = g * G + r;
            if (row >= c->rows) break;
            const dl_block_q40 *wr = c->src + (size_t)row * nb;
            for (int k = 0; k < nb; k++) {
                memcpy(dg + SCALES(k) + 2 * r, &wr[k].d, 2);
                uint8_t *nib = dg + CODES(k);
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
    const size_t gs = group_stride(nb);
    for (int row = 0; row < rows; row++) {
        const uint8_t *sg = (const uint8_t *)src + (size_t)(row / G) * gs;
        const int r = row % G;
        for (int k = 0; k < nb; k++) {
            dl_block_q40 *b = dst + (size_t)row * nb + k;
            memcpy(&b->d, sg + SCALES(k) + 2 * r, 2);
            for (int i = 0; i < 4; i++) memcpy(b->qs + 4 * i, sg + CODES(k) + i * 64 + r * 4, 4);
        }
    }
}

/* Software prefetch of the weights, `bytes` ahead of the block each stream reads, in the repacked
 * kernels' x86 paths (q40r, q80r, the rx types; results never change). Measured: on Zen 4
 * (2026-12-02, q40r with the pair layout, AVX-512) it cost 15-25 % on every split; on the Intel Xeon
 * VM of the README (2 cores, 480 MB L3, 2026-12-07; scripts/BENCHMARKS.md "Weights prefetched") 2048
 * bytes cut a one-row pass of the models the L3 holds 11-16 % with the AVX-512 kernels and 20-27 %
 * with the AVX2 ones; of the Llama-3.2-1B shape, read from memory, 3-5 % and 24 % (its second row
 * 40 % cheaper on AVX-512; 4096 and more lose there); on a Zen 3 VM (AVX2, 2 cores, 32 MB L3; "The
 * weights prefetched on Zen 3") one-row passes of SmolLM2 / Gemma 3 / the 1B shape's Q4_0 2-17 %
 * faster and two-row ones 6-18 %. Default: 2048 with the AVX2 kernels on any x86 CPU and with the
 * AVX-512 ones on Intel CPUs, else 0; DLLAMA_PREFETCH overrides it. */
static int weights_pf_set = -1;

static int weights_pf_default(int isa) {
    static int env = -2;   /* -2: not read yet, -1: unset */
    if (env == -2) {
        const char *e = getenv("DLLAMA_PREFETCH");
        env = e && atoi(e) >= 0 ? atoi(e) : -1;
    }
    if (env >= 0) return env;
#if DL_X86
    static int intel = -1;   /* the vendor, asked once: every matmul call reads the setting (only Zen 4's
                                AVX-512 was measured losing) */
    if (intel < 0) {
        __builtin_cpu_init();
        intel = __builtin_cpu_is("intel") != 0;
    }
    return isa == DL_ISA_AVX2 || (isa == DL_ISA_AVX512 && intel) ? 2048 : 0;
#else
    (void)isa;
    return 0;
#endif
}

/* the distance in effect for this ISA: the one set, else the default */
static int weights_pf(int isa) { return weights_pf_set >= 0 ? weights_pf_set : weights_pf_default(isa); }

int dl_weights_prefetch(int bytes) {
    if (bytes >= 0 || bytes == -2) weights_pf_set = bytes >= 0 ? bytes : -1;
    return weights_pf(dl_get_isa());
}

/* Matvec tuning. Settings: q40r_split_set (0: the ISA's default); the kernels read the values in
 * effect, fixed per call before the pool starts (q40r_tune). Defaults, measured on Zen 4
 * (2026-12-02) with the pair layout: AVX2 one stream per thread (at 2 threads 1 stream read at the
 * probe's rate, 4 streams 20-30 % below it; at 1 thread all within noise), AVX-512 4 streams (1, 2
 * and 4 within noise; at 2 ranks x 1 thread AVX2 with 1, 2 and 4 streams too). DLLAMA_Q40R_SPLIT
 * overrides the default. The earlier layout (scales in a region ahead of the codes) needed several
 * streams and a prefetch to hide its restarts. */
static int q40r_split_set = 0;
static int q40r_pf, q40r_split = 4, q40r_guided = 1;

static int q40r_split_default(int isa) {
    static int env = -2;   /* -2: not read yet, 0: unset */
    if (env == -2) {
        const char *e = getenv("DLLAMA_Q40R_SPLIT");
        env = e && atoi(e) >= 1 && atoi(e) <= 4 ? atoi(e) : 0;
    }
    if (env) return env;
    return isa == DL_ISA_AVX2 ? 1 : 4;
}

static void q40r_tune(int isa) {
    q40r_pf = weights_pf(isa);
    q40r_split = q40r_split_set > 0 ? q40r_split_set : q40r_split_default(isa);
}

int dl_q40r_split(int n) {
    if (n >= 0) q40r_split_set = n > 4 ? 4 : n;
    q40r_tune(dl_get_isa());
    return q40r_split;
}

/* ------------------------------------------------------------------------------------------ */
/* prepared activations (dl_r16_xprep): the codes are 0..15 for -8..7 */

void dl_r16_xprep(uint8_t *dst, const dl_block_q80 *x, int cols, int batch, int32_t bias) {
    const int nb = cols / DL_QK;
    const size_t st = dl_r16_xstride(cols);
    for (int b = 0; b < batch; b++) {
        int8_t *qs = (int8_t *)(dst + (size_t)b * st);
        int32_t *cd = (int32_t *)(dst + (size_t)b * st + cols);
        const dl_block_q80 *xb = x + (size_t)b * nb;
        for (int k = 0; k < nb; k++) {
            int32_t s = 0;
            for (int j = 0; j < DL_QK; j++) s += xb[k].qs[j];
            memcpy(qs + (size_t)k * DL_QK, xb[k].qs, DL_QK);
            const float d = dl_f16_to_f32_scalar(xb[k].d);
            cd[2 * k] = bias * s;
            memcpy(&cd[2 * k + 1], &d, 4);
        }
    }
}

static void xr_prep(uint8_t *dst, const dl_block_q80 *x, int cols, int batch) { dl_r16_xprep(dst, x, cols, batch, -8); }

/* ------------------------------------------------------------------------------------------ */
/* scalar reference (reads the plain q80 x; same arithmetic as dl_matmul_q40_q80_rows_scalar) */

static void q40r_groups_scalar(float *out, const uint8_t *w, const dl_block_q80 *x, const uint8_t *xp,
                               int g0, int g1, int rows, int cols, int batch) {
    (void)xp;
    const int nb = cols / DL_QK;
    const size_t gs = group_stride(nb);
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        for (int r = 0; r < G; r++) {
            const int row = g * G + r;
            if (row >= rows) break;
            for (int b = 0; b < batch; b++) {
                const dl_block_q80 *xb = x + (size_t)b * nb;
                float sum = 0.0f;
                for (int k = 0; k < nb; k++) {
                    const uint8_t *nib = wg + CODES(k) + r * 4;
                    int32_t idot = 0;
                    for (int i = 0; i < 4; i++)
                        for (int m = 0; m < 4; m++) {
                            const uint8_t q = nib[i * 64 + m];
                            idot += ((int32_t)(q & 15) - 8) * xb[k].qs[4 * i + m];
                            idot += ((int32_t)(q >> 4) - 8) * xb[k].qs[16 + 4 * i + m];
                        }
                    uint16_t dw;
                    memcpy(&dw, wg + SCALES(k) + 2 * r, 2);
                    sum += (float)idot * (dl_f16_to_f32_scalar(dw) * dl_f16_to_f32_scalar(xb[k].d));
                }
                out[(size_t)b * rows + row] = sum;
            }
        }
    }
}

#if DL_X86
/* matvec streams: a thread's groups [g0, g0 + NS * per) read as NS runs of `per` groups side by
 * side; step i of stream s is group g0 + s * per + i */
typedef struct { float *outs[4]; int valid[4]; const uint8_t *wgs[4]; } q40r_streams;

static inline void q40r_streams_at(q40r_streams *st, float *out, const uint8_t *w, size_t gs, int rows,
                                   int g_first, int per, int NS) {
    for (int s = 0; s < NS; s++) {
        const int g = g_first + s * per;
        st->outs[s] = out + (size_t)g * G;
        st->valid[s] = rows - g * G < G ? rows - g * G : G;
        st->wgs[s] = w + (size_t)g * gs;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512 VNNI: one group (16 rows) x B batch rows, all blocks */

/* a block's codes for 16 rows (256 bytes at p) as 4 low- and 4 high-nibble registers */
DL_INLINE DL_TARGET_AVX512 void q40r_unpack_avx512(const uint8_t *p, __m512i *lo, __m512i *hi) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < 4; i++) {
        const __m512i v = _mm512_loadu_si512((const void *)(p + 64 * i));
        lo[i] = _mm512_and_si512(v, m4);
        hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    }
}

/* acc + the block's 16 row dots with one batch row's q80 block (codes xq; correction and scale cd),
 * scaled by the rows' dw: the operation order of every batched q40r AVX-512 path */
DL_INLINE DL_TARGET_AVX512 __m512 q40r_fma_avx512(__m512 acc, const __m512i *lo, const __m512i *hi, __m512 dw,
                                                  const uint8_t *xq, const int32_t *cd) {
    __m512i s0 = _mm512_dpbusd_epi32(_mm512_set1_epi32(cd[0]), lo[0], _mm512_set1_epi32(dl_ld32(xq + 0)));
    __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], _mm512_set1_epi32(dl_ld32(xq + 16)));
    s0 = _mm512_dpbusd_epi32(s0, lo[1], _mm512_set1_epi32(dl_ld32(xq + 4)));
    s1 = _mm512_dpbusd_epi32(s1, hi[1], _mm512_set1_epi32(dl_ld32(xq + 20)));
    s0 = _mm512_dpbusd_epi32(s0, lo[2], _mm512_set1_epi32(dl_ld32(xq + 8)));
    s1 = _mm512_dpbusd_epi32(s1, hi[2], _mm512_set1_epi32(dl_ld32(xq + 24)));
    s0 = _mm512_dpbusd_epi32(s0, lo[3], _mm512_set1_epi32(dl_ld32(xq + 12)));
    s1 = _mm512_dpbusd_epi32(s1, hi[3], _mm512_set1_epi32(dl_ld32(xq + 28)));
    const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(((const float *)cd)[1]));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), s, acc);
}

DL_INLINE DL_TARGET_AVX512 void q40r_group_avx512(float *out, const uint8_t *wg, const uint8_t *xp,
                                                  int nb, int cols, int rows, int row0, int b0,
                                                  const int B) {
    const size_t xs = dl_r16_xstride(cols);
    const int pf = q40r_pf;
    __m512 acc[8];
    for (int j = 0; j < B; j++) acc[j] = _mm512_setzero_ps();
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = wg + CODES(k);
        if (pf)
            dl_prefetch_span(p + pf, 256);
        __m512i lo[4], hi[4];
        q40r_unpack_avx512(p, lo, hi);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wg + SCALES(k))));
        for (int j = 0; j < B; j++) {
            const uint8_t *xr = xp + (size_t)(b0 + j) * xs;
            acc[j] = q40r_fma_avx512(acc[j], lo, hi, dw, xr + (size_t)k * DL_QK, (const int32_t *)(xr + cols) + 2 * k);
        }
    }
    const int valid = rows - row0 < G ? rows - row0 : G;
    const __mmask16 m = dl_tailmask16(valid);
    for (int j = 0; j < B; j++) _mm512_mask_storeu_ps(out + (size_t)(b0 + j) * rows + row0, m, acc[j]);
}

/* matvec: NG groups side by side (NG independent streams: more memory-level parallelism) */
DL_INLINE DL_TARGET_AVX512 __m512 q40r_block_b1_avx512(__m512 acc, const uint8_t *wg, const uint8_t *p, int k,
                                                       const uint8_t *xq, const int32_t *cd, __m512i m4) {
    const __m512i v0 = _mm512_loadu_si512((const void *)(p + 0));
    const __m512i v1 = _mm512_loadu_si512((const void *)(p + 64));
    const __m512i v2 = _mm512_loadu_si512((const void *)(p + 128));
    const __m512i v3 = _mm512_loadu_si512((const void *)(p + 192));
    __m512i s0 = _mm512_dpbusd_epi32(_mm512_set1_epi32(cd[0]), _mm512_and_si512(v0, m4), _mm512_set1_epi32(dl_ld32(xq + 0)));
    __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4), _mm512_set1_epi32(dl_ld32(xq + 16)));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v1, m4), _mm512_set1_epi32(dl_ld32(xq + 4)));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4), _mm512_set1_epi32(dl_ld32(xq + 20)));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v2, m4), _mm512_set1_epi32(dl_ld32(xq + 8)));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v2, 4), m4), _mm512_set1_epi32(dl_ld32(xq + 24)));
    s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v3, m4), _mm512_set1_epi32(dl_ld32(xq + 12)));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v3, 4), m4), _mm512_set1_epi32(dl_ld32(xq + 28)));
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wg + SCALES(k))));
    const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(((const float *)cd)[1]));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), s, acc);
}

/* out_g[0..15] for NS groups read side by side (NS independent sequential streams) */
DL_INLINE DL_TARGET_AVX512 void q40r_ngroups_b1_avx512(float *const *outs, const int *valid,
                                                       const uint8_t *const *wgs, const uint8_t *xp, int nb,
                                                       int cols, const int NS) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int pf = q40r_pf;
    __m512 acc[4];
    for (int s = 0; s < NS; s++) acc[s] = _mm512_setzero_ps();
    const int32_t *cd = (const int32_t *)(xp + cols);
    for (int k = 0; k < nb; k++) {
        for (int s = 0; s < NS; s++) {
            const uint8_t *p = wgs[s] + CODES(k);
            if (pf)
                dl_prefetch_span(p + pf, 256);
            acc[s] = q40r_block_b1_avx512(acc[s], wgs[s], p, k, xp + (size_t)k * DL_QK, cd + 2 * k, m4);
        }
    }
    for (int s = 0; s < NS; s++)
        _mm512_mask_storeu_ps(outs[s], dl_tailmask16(valid[s]), acc[s]);
}

/* a few batch rows (2..4): 2 groups read side by side as the matvec's streams are, each block's
 * codes unpacked once for the B rows. Per output the operations of q40r_group_avx512, in its
 * order: the same bits. (One stream of groups read the weights ~1.6x slower than the matvec: a
 * 2-row pass of SmolLM2 Q4_0's layers took 4.3 ms against 2.6 for one row.) */
DL_INLINE DL_TARGET_AVX512 void q40r_2groups_avx512(const q40r_streams *st, const uint8_t *xp, int nb, int cols,
                                                    int rows, const int B) {
    const size_t xs = dl_r16_xstride(cols);
    const int pf = q40r_pf;
    __m512 acc[2][4];
    for (int g = 0; g < 2; g++)
        for (int j = 0; j < B; j++) acc[g][j] = _mm512_setzero_ps();
    for (int k = 0; k < nb; k++)
        for (int g = 0; g < 2; g++) {
            const uint8_t *p = st->wgs[g] + CODES(k);
            if (pf)
                dl_prefetch_span(p + pf, 256);
            __m512i lo[4], hi[4];
            q40r_unpack_avx512(p, lo, hi);
            const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st->wgs[g] + SCALES(k))));
            for (int j = 0; j < B; j++) {
                const uint8_t *xr = xp + (size_t)j * xs;
                acc[g][j] = q40r_fma_avx512(acc[g][j], lo, hi, dw, xr + (size_t)k * DL_QK, (const int32_t *)(xr + cols) + 2 * k);
            }
        }
    for (int g = 0; g < 2; g++) {
        const __mmask16 m = dl_tailmask16(st->valid[g]);
        for (int j = 0; j < B; j++) _mm512_mask_storeu_ps(st->outs[g] + (size_t)j * rows, m, acc[g][j]);
    }
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
            q40r_streams st;
            q40r_streams_at(&st, out, w, gs, rows, g0 + i, per, NS);
            if (NS == 4) q40r_ngroups_b1_avx512(st.outs, st.valid, st.wgs, xp, nb, cols, 4);
            else if (NS == 3) q40r_ngroups_b1_avx512(st.outs, st.valid, st.wgs, xp, nb, cols, 3);
            else q40r_ngroups_b1_avx512(st.outs, st.valid, st.wgs, xp, nb, cols, 2);
        }
        g0 += NS * per;   /* the remainder below */
    }
    if (batch >= 2 && batch <= 4 && q40r_split > 1) {   /* from 5 rows on the arithmetic dominates */
        const int per = (g1 - g0) / 2;
        for (int i = 0; i < per; i++) {
            q40r_streams st;
            q40r_streams_at(&st, out, w, gs, rows, g0 + i, per, 2);
            if (batch == 2) q40r_2groups_avx512(&st, xp, nb, cols, rows, 2);
            else if (batch == 3) q40r_2groups_avx512(&st, xp, nb, cols, rows, 3);
            else q40r_2groups_avx512(&st, xp, nb, cols, rows, 4);
        }
        g0 += 2 * per;
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
/* 16-bit accumulate in program order: the empty asm stops GCC from reassociating the sums into
 * a tree of stack-spilled partial products */
DL_INLINE DL_TARGET_AVX2 __m256i add16_ordered(__m256i acc, __m256i v) {
    acc = _mm256_add_epi16(acc, v);
    __asm__("" : "+x"(acc));
    return acc;
}

/* AVX2: a group is two halves of 8 rows (32 bytes of every 64: 8 rows x 4 bytes per 256-bit
 * register); maddubs (u8 x s8 -> s16 pairs) summed in 16 bits over a block (8 products of at most
 * 15 * 128 * 2 = 3840 per lane: |sum| <= 30720, no saturation), then one madd to 32 bits.
 * Integer sums are exact, so the matvec and batched kernels below give the same bits per output
 * (same float operations per block: cvt, dw * dx, fma) whatever the loop order. */

/* matvec: one block (256 bytes of codes at p) of one group, both halves */
DL_INLINE DL_TARGET_AVX2 void q40r_block_b1_avx2(__m256 *acc0, __m256 *acc1, const uint8_t *wg,
                                                 const uint8_t *p, int k, const uint8_t *xq,
                                                 const int32_t *cd) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        const __m256i xl = _mm256_set1_epi32(dl_ld32(xq + 4 * i));
        const __m256i xh = _mm256_set1_epi32(dl_ld32(xq + 16 + 4 * i));
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(p + 64 * i));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 64 * i + 32));
        s0 = add16_ordered(s0, _mm256_maddubs_epi16(_mm256_and_si256(v0, m4), xl));
        s1 = add16_ordered(s1, _mm256_maddubs_epi16(_mm256_and_si256(v1, m4), xl));
        s0 = add16_ordered(s0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), xh));
        s1 = add16_ordered(s1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), xh));
    }
    const __m256i ones = _mm256_set1_epi16(1), corr = _mm256_set1_epi32(cd[0]);
    const __m256 dx = _mm256_set1_ps(((const float *)cd)[1]);
    const __m256i d0 = _mm256_add_epi32(_mm256_madd_epi16(s0, ones), corr);
    const __m256i d1 = _mm256_add_epi32(_mm256_madd_epi16(s1, ones), corr);
    const __m256 dw0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + SCALES(k))));
    const __m256 dw1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + SCALES(k) + 16)));
    *acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(dw0, dx), *acc0);
    *acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(dw1, dx), *acc1);
}

/* matvec: NS groups read side by side (NS independent sequential streams, as on AVX-512), KC
 * blocks of one stream at a time: only that stream's two accumulators are live, so 4 streams do
 * not spill AVX2's 16 ymm registers (each switch stores and reloads two of them) */
DL_INLINE DL_TARGET_AVX2 void q40r_ngroups_b1_avx2(float *const *outs, const int *valid,
                                                   const uint8_t *const *wgs, const uint8_t *xp, int nb,
                                                   int cols, const int NS) {
    const int pf = q40r_pf, KC = 2;   /* blocks of a stream per turn */
    __m256 acc[4][2];
    for (int s = 0; s < NS; s++) acc[s][0] = acc[s][1] = _mm256_setzero_ps();
    const int32_t *cd = (const int32_t *)(xp + cols);
    for (int k0 = 0; k0 < nb; k0 += KC) {
        const int k1 = k0 + KC < nb ? k0 + KC : nb;
        for (int s = 0; s < NS; s++) {
            __m256 a0 = acc[s][0], a1 = acc[s][1];
            for (int k = k0; k < k1; k++) {
                const uint8_t *p = wgs[s] + CODES(k);
                if (pf)
                    dl_prefetch_span(p + pf, 256);
                q40r_block_b1_avx2(&a0, &a1, wgs[s], p, k, xp + (size_t)k * DL_QK, cd + 2 * k);
            }
            acc[s][0] = a0;
            acc[s][1] = a1;
        }
    }
    for (int s = 0; s < NS; s++) dl_store16(outs[s], acc[s][0], acc[s][1], valid[s]);
}

/* batched: half h (8 rows) of one group x B batch rows. Each 32-byte register of codes is split
 * into nibbles once and used for all B rows (the group's codes are re-read per half and per chunk
 * of B rows from L1/L2: prefill is compute-bound). 2 + 2B registers live: B = 6 (measured best of
 * 2..6; the 16-bit sums stay in order, see add16_ordered). */
DL_INLINE DL_TARGET_AVX2 void q40r_half_avx2(float *out, const uint8_t *wg, const uint8_t *xp, int nb,
                                             int cols, int rows, int row0, int h, int b0, const int B) {
    const size_t xs = dl_r16_xstride(cols);
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[6];
    const uint8_t *xq[6];
    const int32_t *cd[6];
    for (int j = 0; j < B; j++) {
        acc[j] = _mm256_setzero_ps();
        xq[j] = xp + (size_t)(b0 + j) * xs;
        cd[j] = (const int32_t *)(xq[j] + cols);
    }
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = wg + CODES(k) + 32 * h;
        __m256i s[6];
        for (int j = 0; j < B; j++) s[j] = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 64 * i));
            const __m256i lo = _mm256_and_si256(v, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            for (int j = 0; j < B; j++) {
                const uint8_t *x = xq[j] + (size_t)k * DL_QK + 4 * i;
                s[j] = add16_ordered(s[j], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(dl_ld32(x))));
                s[j] = add16_ordered(s[j], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(dl_ld32(x + 16))));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wg + SCALES(k) + 16 * h)));
        for (int j = 0; j < B; j++) {
            const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(s[j], ones), _mm256_set1_epi32(cd[j][2 * k]));
            const __m256 dx = _mm256_set1_ps(((const float *)cd[j])[2 * k + 1]);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(dw, dx), acc[j]);
        }
    }
    dl_store_half8(out, rows, row0 + 8 * h, b0, B, rows - row0 - 8 * h, acc);
}

static DL_TARGET_AVX2 void q40r_groups_avx2(float *out, const uint8_t *w, const dl_block_q80 *x,
                                            const uint8_t *xp, int g0, int g1, int rows, int cols,
                                            int batch) {
    (void)x;
    const int nb = cols / DL_QK;
    const size_t gs = group_stride(nb);
    if (batch == 1) {
        const int NS = q40r_split > 4 ? 4 : q40r_split < 1 ? 1 : q40r_split;
        const int per = (g1 - g0) / NS;
        if (NS > 1) {   /* the range cut into NS parts read side by side */
            for (int i = 0; i < per; i++) {
                q40r_streams st;
                q40r_streams_at(&st, out, w, gs, rows, g0 + i, per, NS);
                if (NS == 4) q40r_ngroups_b1_avx2(st.outs, st.valid, st.wgs, xp, nb, cols, 4);
                else if (NS == 3) q40r_ngroups_b1_avx2(st.outs, st.valid, st.wgs, xp, nb, cols, 3);
                else q40r_ngroups_b1_avx2(st.outs, st.valid, st.wgs, xp, nb, cols, 2);
            }
            g0 += NS * per;
        }
        for (int g = g0; g < g1; g++) {   /* the remainder, one group at a time */
            float *o = out + (size_t)g * G;
            const int valid = rows - g * G;
            const uint8_t *wg = w + (size_t)g * gs;
            q40r_ngroups_b1_avx2(&o, &valid, &wg, xp, nb, cols, 1);
        }
        return;
    }
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        const int halves = rows - g * G > 8 ? 2 : 1;   /* a padded half computes nothing */
        for (int b = 0; b < batch; b += 6) {
            const int B = batch - b < 6 ? batch - b : 6;
            for (int h = 0; h < halves; h++) {
                switch (B) {
                case 1: q40r_half_avx2(out, wg, xp, nb, cols, rows, g * G, h, b, 1); break;
                case 2: q40r_half_avx2(out, wg, xp, nb, cols, rows, g * G, h, b, 2); break;
                case 3: q40r_half_avx2(out, wg, xp, nb, cols, rows, g * G, h, b, 3); break;
                case 4: q40r_half_avx2(out, wg, xp, nb, cols, rows, g * G, h, b, 4); break;
                case 5: q40r_half_avx2(out, wg, xp, nb, cols, rows, g * G, h, b, 5); break;
                default: q40r_half_avx2(out, wg, xp, nb, cols, rows, g * G, h, b, 6); break;
                }
            }
        }
    }
}
#endif /* DL_X86 */

#if DL_NEON
/* ------------------------------------------------------------------------------------------ */
/* NEON: a group is 4 quads of 4 rows (16 bytes of every 64: 4 rows x 4 bytes per 128-bit
 * register). Unsigned codes 0..15 are valid non-negative int8, so signed products with the
 * -8 * sum(x) correction give the exact (code - 8) dot, as on x86. Per output the float
 * operations are the scalar path's (cvt, dw * dx, multiply, add: no FMA), so every NEON q40r
 * result is bit-identical to the scalar reference, matvec or batched, whatever the thread count.
 *
 * Plain NEON (ARMv8.0): smull/smlal of 8 bytes into 16 bits (8 products of at most 15 * 128 per
 * lane over a block: |sum| <= 15360, no overflow), pairwise widened to one int32 per row.
 * Dotprod (ARMv8.2): sdot by element, the block's 16 + 16 activations held in two registers. */

/* integer dots of quad q's 4 rows with one block of x (codes of the block at p) */
DL_INLINE int32x4_t q40r_quad_neon(const uint8_t *p, int q, const uint8_t *xq, int32_t corr) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    int16x8_t a01 = vdupq_n_s16(0), a23 = vdupq_n_s16(0);
    for (int i = 0; i < 4; i++) {
        const int8x16_t xl = vreinterpretq_s8_s32(vdupq_n_s32(dl_ld32(xq + 4 * i)));
        const int8x16_t xh = vreinterpretq_s8_s32(vdupq_n_s32(dl_ld32(xq + 16 + 4 * i)));
        const uint8x16_t v = vld1q_u8(p + 64 * i + 16 * q);
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, m4));
        const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        a01 = vmlal_s8(a01, vget_low_s8(lo), vget_low_s8(xl));
        a23 = vmlal_high_s8(a23, lo, xl);
        a01 = vmlal_s8(a01, vget_low_s8(hi), vget_low_s8(xh));
        a23 = vmlal_high_s8(a23, hi, xh);
    }
    return vaddq_s32(vpaddq_s32(vpaddlq_s16(a01), vpaddlq_s16(a23)), vdupq_n_s32(corr));
}

#if DL_HAVE_DOTPROD
#define Q40R_SDOT(acc, v, xlo, xhi, i) do { \
    acc = vdotq_laneq_s32(acc, vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))), xlo, i); \
    acc = vdotq_laneq_s32(acc, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), xhi, i); } while (0)

DL_INLINE DL_TARGET_DOTPROD int32x4_t q40r_quad_dotprod(const uint8_t *p, int q, const uint8_t *xq, int32_t corr) {
    const int8x16_t xlo = vld1q_s8((const int8_t *)xq), xhi = vld1q_s8((const int8_t *)xq + 16);
    int32x4_t acc = vdupq_n_s32(corr);
    Q40R_SDOT(acc, vld1q_u8(p + 0 + 16 * q), xlo, xhi, 0);
    Q40R_SDOT(acc, vld1q_u8(p + 64 + 16 * q), xlo, xhi, 1);
    Q40R_SDOT(acc, vld1q_u8(p + 128 + 16 * q), xlo, xhi, 2);
    Q40R_SDOT(acc, vld1q_u8(p + 192 + 16 * q), xlo, xhi, 3);
    return acc;
}
#endif

static void q40r_groups_neon(float *out, const uint8_t *w, const dl_block_q80 *x, const uint8_t *xp,
                             int g0, int g1, int rows, int cols, int batch) {
    DL_R16_NEON_GROUPS(q40r_quad_neon, 256);
}

#if DL_HAVE_DOTPROD
static DL_TARGET_DOTPROD void q40r_groups_dotprod(float *out, const uint8_t *w, const dl_block_q80 *x,
                                                  const uint8_t *xp, int g0, int g1, int rows, int cols,
                                                  int batch) {
    DL_R16_NEON_GROUPS(q40r_quad_dotprod, 256);
}
#endif
#endif /* DL_NEON */

/* ------------------------------------------------------------------------------------------ */
/* entry point: whole groups per thread (16 rows = 64 bytes of output per batch row: with a 64-byte
 * aligned `out` no two threads write the same cache line) */

typedef struct {
    float *out[DL_R16_MAX_N];
    const uint8_t *w[DL_R16_MAX_N];
    int rows[DL_R16_MAX_N];
    int64_t first[DL_R16_MAX_N + 1];   /* matrix i holds groups [first[i], first[i + 1]) of the job */
    int n, cols, batch;
    const dl_block_q80 *x;
    const uint8_t *xp;
    dl_r16_group_fn fn;
} r16_job;

static void r16_range(void *vctx, int64_t s, int64_t e) {
    r16_job *c = (r16_job *)vctx;
    for (int i = 0; i < c->n && s < e; i++) {
        const int64_t a = s > c->first[i] ? s : c->first[i];
        const int64_t b = e < c->first[i + 1] ? e : c->first[i + 1];
        if (a < b)
            c->fn(c->out[i], c->w[i], c->x, c->xp, (int)(a - c->first[i]), (int)(b - c->first[i]), c->rows[i],
                  c->cols, c->batch);
    }
}

void dl_r16_matmul_n(int n, float *const *out, const void *const *w, const int *rows, const dl_block_q80 *x,
                     int cols, int batch, dl_r16_group_fn scalar, dl_r16_group_fn simd, dl_r16_prep_fn prep,
                     size_t xp_bytes, int guided) {
    if (n <= 0 || batch <= 0) return;
    if (n > DL_R16_MAX_N) {   /* in parts */
        dl_r16_matmul_n(DL_R16_MAX_N, out, w, rows, x, cols, batch, scalar, simd, prep, xp_bytes, guided);
        dl_r16_matmul_n(n - DL_R16_MAX_N, out + DL_R16_MAX_N, w + DL_R16_MAX_N, rows + DL_R16_MAX_N, x, cols,
                        batch, scalar, simd, prep, xp_bytes, guided);
        return;
    }
    r16_job c = {.n = n, .cols = cols, .batch = batch, .x = x, .xp = NULL, .fn = scalar};
    c.first[0] = 0;
    for (int i = 0; i < n; i++) {
        c.out[i] = out[i];
        c.w[i] = (const uint8_t *)w[i];
        c.rows[i] = rows[i] > 0 ? rows[i] : 0;
        c.first[i + 1] = c.first[i] + (c.rows[i] + G - 1) / G;
    }
    if (c.first[n] == 0) return;
    if (simd) {
        uint8_t *xp = (uint8_t *)dl_scratch(xp_bytes);
        if (xp) {
            prep(xp, x, cols, batch);
            c.xp = xp;
            c.fn = simd;
        }
    }
    (guided ? dl_parallel_for_guided : dl_parallel_for)(c.first[n], 1, r16_range, &c);
}

/* n matrices with the same input x (q, k and v; gate and up): one parallel job over all their
 * groups, x prepared once. Each output is what dl_matmul_q40r_q80 gives for its matrix alone. */
void dl_matmul_q40r_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch) {
    const int isa = dl_get_isa();
    dl_r16_group_fn fn = NULL;
#if DL_X86
    if (isa == DL_ISA_AVX512) fn = q40r_groups_avx512;
    if (isa == DL_ISA_AVX2) fn = q40r_groups_avx2;
#endif
#if DL_NEON
    if (isa == DL_ISA_NEON) fn = q40r_groups_neon;
#if DL_HAVE_DOTPROD
    if (isa == DL_ISA_NEON_DOTPROD) fn = q40r_groups_dotprod;
#endif
#endif
    if (fn) q40r_tune(isa);   /* SIMD paths read prepared activations */
    dl_r16_matmul_n(n, out, w, rows, x, cols, batch, q40r_groups_scalar, fn, xr_prep,
                    dl_r16_xstride(cols) * (size_t)(batch > 0 ? batch : 0), q40r_guided);
}

void dl_matmul_q40r_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch) {
    dl_matmul_q40r_q80_n(1, &out, &w, &rows, x, cols, batch);
}

int dl_q40r_guided(int n) { if (n >= 0) q40r_guided = n; return q40r_guided; }

/* ------------------------------------------------------------------------------------------ */
/* read bandwidth probe: sums a set of buffers ("spans") as 256-bit words over the pool, one job cut
 * into equal byte ranges per thread; returns the sum so the reads cannot be optimised away. Each
 * thread reads its range as `streams` runs side by side (1..8), with a software prefetch
 * `prefetch` bytes ahead (0: none). Which pattern reads fastest depends on the machine (on the
 * Xeon VM of the README's 2026-12-01 numbers 4 streams with a 1 KiB prefetch; on the Zen 4 VM of
 * 2026-12-02 2 streams without), so the benchmark tries several and keeps the best: a ceiling
 * no access pattern it knows beats. It reads the weight buffers themselves: on these VMs a
 * buffer's read bandwidth depends on where its pages landed (one core: 14 to 26 GB/s over fresh
 * buffers of 384-896 MB, not monotonic in size). */

typedef uint64_t dl_u64x4 __attribute__((vector_size(32), aligned(8)));

typedef struct {
    const uint64_t *const *p;
    const int64_t *start;   /* span i holds words [start[i], start[i + 1]) of the whole */
    int n, streams, prefetch;
    _Alignas(64) uint64_t part[256 * 8];
} bw_ctx;

/* n words at p: whole 64-byte lines as `ns` runs side by side, then the rest one word at a time */
static uint64_t bw_piece(const uint64_t *p, int64_t n, int ns, int pf) {
    const int64_t per = n / 8 / ns;   /* lines per run */
    dl_u64x4 a[8];
    memset(a, 0, sizeof(a));
    for (int64_t o = 0; o < per; o++)
        for (int st = 0; st < ns; st++) {
            const uint64_t *q = p + (st * per + o) * 8;
            if (pf) __builtin_prefetch((const char *)q + pf);
            dl_u64x4 v0, v1;
            memcpy(&v0, q, 32);
            memcpy(&v1, q + 4, 32);
            a[st] += v0 + v1;
        }
    uint64_t t = 0;
    for (int64_t i = (int64_t)ns * per * 8; i < n; i++) t += p[i];
    for (int st = 0; st < ns; st++) t += a[st][0] + a[st][1] + a[st][2] + a[st][3];
    return t;
}

static void bw_range(void *vctx, int64_t s, int64_t e) {
    bw_ctx *c = (bw_ctx *)vctx;
    uint64_t t = 0;
    for (int i = 0; i < c->n && s < e; i++) {
        const int64_t a = s > c->start[i] ? s : c->start[i];
        const int64_t b = e < c->start[i + 1] ? e : c->start[i + 1];
        if (a < b) t += bw_piece(c->p[i] + (a - c->start[i]), b - a, c->streams, c->prefetch);
    }
    const int slot = (int)((s * 256) / (e > 0 ? e : 1)) & 255;   /* any slot: only the total matters */
    __atomic_fetch_add(&c->part[slot * 8], t, __ATOMIC_RELAXED);
}

uint64_t dl_read_spans(const void *const *ptrs, const size_t *bytes, int n, int streams, int prefetch) {
    static bw_ctx c;
    int64_t *start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n + 1));
    if (!start) return 0;
    start[0] = 0;
    for (int i = 0; i < n; i++) start[i + 1] = start[i] + (int64_t)(bytes[i] / 8);   /* whole words */
    memset(c.part, 0, sizeof(c.part));
    c.p = (const uint64_t *const *)ptrs;
    c.start = start;
    c.n = n;
    c.streams = streams < 1 ? 1 : streams > 8 ? 8 : streams;
    c.prefetch = prefetch < 0 ? 0 : prefetch;
    dl_parallel_for(start[n], 512, bw_range, &c);
    free(start);
    uint64_t t = 0;
    for (int i = 0; i < 256; i++) t += c.part[i * 8];
    return t;
}

uint64_t dl_read_bytes(const void *p, size_t n) { return dl_read_spans(&p, &n, 1, 4, 1024); }
