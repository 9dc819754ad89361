/* The rx engine: the 16-row group matmul of one GGUF block type over q80 activations, written once
 * and instantiated per type by kernels/matmul_rx.c, which defines before each #include:
 *
 *   RX         the type's short name (q41, q50, q51, q2k, q3k, q4k, q5k, q6k, iq4nl, iq4xs): prefix
 *              of every function made here
 *   RX_UNIT    bytes of one row's unit in the file: a 32-value block, or a 256-value super-block
 *   RX_BPU     32-value blocks per unit (1, or 8 for the 256-value types)
 *   RX_HALVES  1: one scale per 32 values; 2: one per 16 (Q6_K, Q3_K, Q2_K)
 *   RX_AFFINE  1: value = s * u + o (a float offset beside each scale: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K);
 *              0: value = s * (u - RX_C) (a symmetric type; RX_C is its code offset)
 *   RX_C       see RX_AFFINE (0 for the affine types)
 *   RX_SIGNED  optional, default 0. 1: the codes are signed values, -127..127 (IQ4_NL / IQ4_XS:
 *              their codebook entries), RX_C 0. The AVX-512 decoder gives them plus 128 (vpdpbusd
 *              takes unsigned weights; its int32 sums cannot saturate) and the engine subtracts 128
 *              times the x sum there; AVX2 multiplies |u| by x given u's sign (maddubs, as ggml's
 *              IQ4 dots do) and plain NEON widens every two products: codes this large overflow the
 *              16-bit sums the unsigned types use
 * and the type's functions, static, named RX_repack_unit, RX_unpack_unit and one decoder per path,
 * RX_dec_scalar / RX_dec_avx512 / RX_dec_avx2 / RX_dec_neon: each turns 32 values (block kk of a
 * unit) of the group's 16 rows (x86 AVX2: 8 rows, half h; NEON: 4 rows, quad q) into codes u
 * (unsigned, 0..63; or signed, RX_SIGNED) and float scales s[h] and offsets o[h]. In the vectors,
 * byte 4 r + m of u[i] is value 4 i + m of row r (the layout every type's codes are stored in, so a
 * 4-byte activation broadcast multiplies 16 rows at once: vpdpbusd, maddubs, sdot); lane r of s and
 * o is row r.
 *
 * Per output and block, integers are exact (isum = sum of u * x over a half, minus RX_C times the
 * sum of its x), then floats in this order, on every path (prep: fx = dx * (float)xsum, exact):
 *   RX_HALVES 1:  sum += (float)isum * (s * dx);   sum += o * fx        (RX_AFFINE)
 *   RX_HALVES 2:  sum += (float)isum0 * (s0 * dx); sum += (float)isum1 * (s1 * dx);
 *                 sum += o0 * fx0; sum += o1 * fx1                        (RX_AFFINE)
 * The scalar and NEON paths compute exactly that (NEON: the same bits as scalar); AVX2 and
 * AVX-512 fuse each multiply-add (one rounding less). Matvec and batched calls, and every thread
 * count, give every output the same bits: batch invariance.
 */

#ifndef RX_SIGNED
#define RX_SIGNED 0
#endif
#if RX_SIGNED
#define RX_CODE int8_t
#define RX_C512 128            /* the AVX-512 codes: u + 128 */
#else
#define RX_CODE uint8_t
#define RX_C512 RX_C
#endif

#define RX_PASTE2(a, b) a##_##b
#define RX_JOIN2(a, b) RX_PASTE2(a, b)
#define RXF(name) RX_JOIN2(RX, name)
#define RX_PASTE3(a, b, c) a##b##c
#define RX_JOIN3(a, b, c) RX_PASTE3(a, b, c)

static inline size_t RXF(group_stride)(int cols) { return (size_t)(cols / (32 * RX_BPU)) * 16 * RX_UNIT; }

/* ---- repack: each group's units from its 16 rows' units in the file ---- */

static void RXF(repack_range)(void *vctx, int64_t g0, int64_t g1) {
    const rx_repack_ctx *c = (const rx_repack_ctx *)vctx;
    const int nu = c->cols / (32 * RX_BPU);
    const size_t rb = (size_t)nu * RX_UNIT, us = (size_t)16 * RX_UNIT, gs = RXF(group_stride)(c->cols);
    for (int64_t g = g0; g < g1; g++) {
        const int valid = c->rows - (int)g * 16 < 16 ? c->rows - (int)g * 16 : 16;
        for (int k = 0; k < nu; k++) {
            const uint8_t *src[16];
            uint8_t *dst = c->dst + (size_t)g * gs + (size_t)k * us;
            for (int r = 0; r < valid; r++) src[r] = c->src + (size_t)(g * 16 + r) * rb + (size_t)k * RX_UNIT;
            memset(dst, 0, us);   /* rows past the matrix: all-zero units are zero values in every type */
            RXF(repack_unit)(dst, src, valid);
        }
    }
}

size_t RX_JOIN3(dl_, RX, r_bytes)(int rows, int cols) {
    if (rows <= 0 || cols <= 0) return 0;
    return (size_t)((rows + 15) / 16) * RXF(group_stride)(cols);
}

void RX_JOIN3(dl_repack_, RX, )(void *dst, const void *src, int rows, int cols) {
    if (rows <= 0 || cols <= 0) return;
    rx_repack_ctx c = {(const uint8_t *)src, (uint8_t *)dst, rows, cols};
    dl_parallel_for((rows + 15) / 16, 1, RXF(repack_range), &c);
}

void RX_JOIN3(dl_unpack_, RX, r)(void *dst, const void *src, int rows, int cols) {
    const int nu = cols / (32 * RX_BPU);
    const size_t rb = (size_t)nu * RX_UNIT, us = (size_t)16 * RX_UNIT, gs = RXF(group_stride)(cols);
    for (int g = 0; g * 16 < rows; g++) {
        const int valid = rows - g * 16 < 16 ? rows - g * 16 : 16;
        for (int k = 0; k < nu; k++) {
            uint8_t *out[16];
            for (int r = 0; r < valid; r++) out[r] = (uint8_t *)dst + (size_t)(g * 16 + r) * rb + (size_t)k * RX_UNIT;
            RXF(unpack_unit)(out, (const uint8_t *)src + (size_t)g * gs + (size_t)k * us, valid);
        }
    }
}

/* ---- scalar reference (reads the plain q80 x) ---- */

static void RXF(groups_scalar)(float *out, const uint8_t *w, const dl_block_q80 *x, const uint8_t *xp,
                               int g0, int g1, int rows, int cols, int batch) {
    (void)xp;
    const int nb = cols / DL_QK;
    const size_t us = (size_t)16 * RX_UNIT, gs = RXF(group_stride)(cols);
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        for (int r = 0; r < 16 && g * 16 + r < rows; r++) {
            for (int b = 0; b < batch; b++) {
                const dl_block_q80 *xb = x + (size_t)b * nb;
                float sum = 0.0f;
                for (int k = 0; k < nb; k++) {
                    RX_CODE u[32];
                    float s[2] = {0.0f, 0.0f}, o[2] = {0.0f, 0.0f};
                    RXF(dec_scalar)(wg + (size_t)(k / RX_BPU) * us, k % RX_BPU, r, u, s, o);
                    int32_t d0 = 0, d1 = 0, x0 = 0, x1 = 0;
                    for (int j = 0; j < 16; j++) {
                        d0 += (int32_t)u[j] * xb[k].qs[j];
                        d1 += (int32_t)u[j + 16] * xb[k].qs[j + 16];
                        x0 += xb[k].qs[j];
                        x1 += xb[k].qs[j + 16];
                    }
                    const float dx = dl_f16_to_f32_scalar(xb[k].d);
#if RX_HALVES == 1
                    sum += (float)(d0 + d1 - RX_C * (x0 + x1)) * (s[0] * dx);
#if RX_AFFINE
                    sum += o[0] * (dx * (float)(x0 + x1));
#endif
#else
                    sum += (float)(d0 - RX_C * x0) * (s[0] * dx);
                    sum += (float)(d1 - RX_C * x1) * (s[1] * dx);
#if RX_AFFINE
                    sum += o[0] * (dx * (float)x0);
                    sum += o[1] * (dx * (float)x1);
#endif
#endif
                }
                out[(size_t)b * rows + g * 16 + r] = sum;
            }
        }
    }
}

/* a matvec's groups [g0, g1) as NS side-by-side streams (each stream `per` groups apart; the NS
 * template argument a constant), then g0 moved past them: the rest goes the batched way */
#define RX_STREAMS(fn) do { \
    if (batch == 1 && rx_streams > 1) { \
        const int NS = rx_streams > 4 ? 4 : rx_streams, per = (g1 - g0) / NS; \
        for (int i = 0; i < per; i++) { \
            if (NS == 4) fn(out, w, xp, g0 + i, per, nb, cols, rows, 4); \
            else if (NS == 3) fn(out, w, xp, g0 + i, per, nb, cols, rows, 3); \
            else fn(out, w, xp, g0 + i, per, nb, cols, rows, 2); \
        } \
        g0 += NS * per; \
    } } while (0)

#if DL_X86
/* ---- AVX-512 (VNNI): a group's 16 rows x B batch rows; the codes of a block decoded once ---- */

DL_INLINE DL_TARGET_AVX512 __m512 RXF(block_avx512)(__m512 acc, const __m512i *u, const __m512 *s, const __m512 *o,
                                                    const uint8_t *xq, const rx_xblock *xb) {
#define RX_BC(p) _mm512_set1_epi32(dl_ld32(p))
#if RX_HALVES == 1
    __m512i a = _mm512_dpbusd_epi32(_mm512_set1_epi32(-RX_C512 * xb->xs), u[0], RX_BC(xq));
    __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[1], RX_BC(xq + 4));
    a = _mm512_dpbusd_epi32(a, u[2], RX_BC(xq + 8));
    b = _mm512_dpbusd_epi32(b, u[3], RX_BC(xq + 12));
    a = _mm512_dpbusd_epi32(a, u[4], RX_BC(xq + 16));
    b = _mm512_dpbusd_epi32(b, u[5], RX_BC(xq + 20));
    a = _mm512_dpbusd_epi32(a, u[6], RX_BC(xq + 24));
    b = _mm512_dpbusd_epi32(b, u[7], RX_BC(xq + 28));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, b)), _mm512_mul_ps(s[0], _mm512_set1_ps(xb->dx)), acc);
#if RX_AFFINE
    acc = _mm512_fmadd_ps(o[0], _mm512_set1_ps(xb->fx), acc);
#endif
#else
    __m512i a = _mm512_dpbusd_epi32(_mm512_set1_epi32(-RX_C512 * xb->xs0), u[0], RX_BC(xq));
    __m512i b = _mm512_dpbusd_epi32(_mm512_set1_epi32(-RX_C512 * xb->xs1), u[4], RX_BC(xq + 16));
    a = _mm512_dpbusd_epi32(a, u[1], RX_BC(xq + 4));
    b = _mm512_dpbusd_epi32(b, u[5], RX_BC(xq + 20));
    a = _mm512_dpbusd_epi32(a, u[2], RX_BC(xq + 8));
    b = _mm512_dpbusd_epi32(b, u[6], RX_BC(xq + 24));
    a = _mm512_dpbusd_epi32(a, u[3], RX_BC(xq + 12));
    b = _mm512_dpbusd_epi32(b, u[7], RX_BC(xq + 28));
    const __m512 dx = _mm512_set1_ps(xb->dx);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(s[0], dx), acc);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), _mm512_mul_ps(s[1], dx), acc);
#if RX_AFFINE
    acc = _mm512_fmadd_ps(o[0], _mm512_set1_ps(xb->fx0), acc);
    acc = _mm512_fmadd_ps(o[1], _mm512_set1_ps(xb->fx1), acc);
#endif
#endif
#undef RX_BC
    return acc;
}

/* software prefetch (dl_weights_prefetch): the cache lines of block k's share of a group's bytes,
 * pf bytes ahead; each block's share starts where the previous one's ends, so a stream of groups
 * is prefetched whole (a unit of RX_BPU blocks: 1/RX_BPU of it per block) */
DL_INLINE void RXF(prefetch)(const uint8_t *wg, int k, size_t pf) {
    const size_t per = (size_t)16 * RX_UNIT / RX_BPU;
    dl_prefetch_span(wg + (size_t)k * per + pf, per);
}

/* a group's blocks decoded once for several passes of batch rows (tile: per block 8 code vectors, then
 * s0, s1, o0, o1; the thread's own buffer, rx_tile) or, tile NULL, decoded as they are used */
DL_INLINE DL_TARGET_AVX512 void RXF(group_avx512)(float *out, const uint8_t *wg, const uint8_t *xp, int nb, int cols,
                                                  int rows, int row0, int b0, const uint8_t *tile, const int B) {
    const size_t xs = rx_xstride(cols), us = (size_t)16 * RX_UNIT;
    __m512 acc[8];
    for (int j = 0; j < B; j++) acc[j] = _mm512_setzero_ps();
    for (int k = 0; k < nb; k++) {
        __m512i u[8];
        __m512 s[2], o[2];
        if (tile) {
            const uint8_t *t = tile + (size_t)k * RX_TILE_BLOCK;
            for (int i = 0; i < 8; i++) u[i] = _mm512_load_si512((const void *)(t + 64 * i));
            s[0] = _mm512_load_ps(t + 512);
            s[1] = _mm512_load_ps(t + 576);
            o[0] = _mm512_load_ps(t + 640);
            o[1] = _mm512_load_ps(t + 704);
        } else {
            if (rx_pf) RXF(prefetch)(wg, k, rx_pf);
            RXF(dec_avx512)(wg + (size_t)(k / RX_BPU) * us, k % RX_BPU, u, s, o);
        }
        for (int j = 0; j < B; j++) {
            const uint8_t *xr = xp + (size_t)(b0 + j) * xs;
            acc[j] = RXF(block_avx512)(acc[j], u, s, o, xr + (size_t)k * DL_QK, (const rx_xblock *)(xr + cols) + k);
        }
    }
    const int valid = rows - row0 < 16 ? rows - row0 : 16;
    const __mmask16 m = valid == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
    for (int j = 0; j < B; j++) _mm512_mask_storeu_ps(out + (size_t)(b0 + j) * rows + row0, m, acc[j]);
}

/* matvec: NS groups read side by side (g_first + s * per, s < NS): independent sequential streams,
 * which keep more reads in flight than one (rx_streams: dl_rx_split) */
DL_INLINE DL_TARGET_AVX512 void RXF(streams_avx512)(float *out, const uint8_t *w, const uint8_t *xp, int g_first,
                                                    int per, int nb, int cols, int rows, const int NS) {
    const size_t us = (size_t)16 * RX_UNIT, gs = RXF(group_stride)(cols);
    const rx_xblock *xb = (const rx_xblock *)(xp + cols);
    __m512 acc[4];
    const uint8_t *wg[4];
    for (int s = 0; s < NS; s++) {
        acc[s] = _mm512_setzero_ps();
        wg[s] = w + (size_t)(g_first + s * per) * gs;
    }
    const size_t pf = rx_pf;
    for (int k = 0; k < nb; k++)
        for (int s = 0; s < NS; s++) {
            __m512i u[8];
            __m512 sc[2], o[2];
            if (pf) RXF(prefetch)(wg[s], k, pf);
            RXF(dec_avx512)(wg[s] + (size_t)(k / RX_BPU) * us, k % RX_BPU, u, sc, o);
            acc[s] = RXF(block_avx512)(acc[s], u, sc, o, xp + (size_t)k * DL_QK, xb + k);
        }
    for (int s = 0; s < NS; s++) {
        const int row0 = (g_first + s * per) * 16, valid = rows - row0 < 16 ? rows - row0 : 16;
        _mm512_mask_storeu_ps(out + row0, valid == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1), acc[s]);
    }
}

/* a few batch rows (2..4: verify rows, a handful of streams): 2 groups read side by side as the
 * matvec does, each block decoded once for the B rows. The per-output operations are
 * group_avx512's, in the same order: the same bits. One stream of groups left the weights' read
 * ~1.4x slower than the matvec's (SmolLM2 Q4_1 layers: 3.2 ms at 1 row, 4.7 at 2). */
DL_INLINE DL_TARGET_AVX512 void RXF(streams_rows_avx512)(float *out, const uint8_t *w, const uint8_t *xp, int g_first,
                                                         int per, int nb, int cols, int rows, const int B) {
    const size_t us = (size_t)16 * RX_UNIT, gs = RXF(group_stride)(cols), xs = rx_xstride(cols);
    __m512 acc[2][4];
    const uint8_t *wg[2] = {w + (size_t)g_first * gs, w + (size_t)(g_first + per) * gs};
    for (int s = 0; s < 2; s++)
        for (int j = 0; j < B; j++) acc[s][j] = _mm512_setzero_ps();
    const size_t pf = rx_pf;
    for (int k = 0; k < nb; k++)
        for (int s = 0; s < 2; s++) {
            __m512i u[8];
            __m512 sc[2], o[2];
            if (pf) RXF(prefetch)(wg[s], k, pf);
            RXF(dec_avx512)(wg[s] + (size_t)(k / RX_BPU) * us, k % RX_BPU, u, sc, o);
            for (int j = 0; j < B; j++) {
                const uint8_t *xr = xp + (size_t)j * xs;
                acc[s][j] = RXF(block_avx512)(acc[s][j], u, sc, o, xr + (size_t)k * DL_QK, (const rx_xblock *)(xr + cols) + k);
            }
        }
    for (int s = 0; s < 2; s++) {
        const int row0 = (g_first + s * per) * 16, valid = rows - row0 < 16 ? rows - row0 : 16;
        const __mmask16 m = valid == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
        for (int j = 0; j < B; j++) _mm512_mask_storeu_ps(out + (size_t)j * rows + row0, m, acc[s][j]);
    }
}

static DL_TARGET_AVX512 void RXF(groups_avx512)(float *out, const uint8_t *w, const dl_block_q80 *x,
                                                const uint8_t *xp, int g0, int g1, int rows, int cols, int batch) {
    (void)x;
    const int nb = cols / DL_QK;
    const size_t gs = RXF(group_stride)(cols);
    RX_STREAMS(RXF(streams_avx512));   /* g0 moves past what the streams computed */
    if (batch >= 2 && batch <= 4 && rx_streams > 1) {   /* from 5 rows on the decoding dominates */
        const int per = (g1 - g0) / 2;
        for (int i = 0; i < per; i++) {
            if (batch == 2) RXF(streams_rows_avx512)(out, w, xp, g0 + i, per, nb, cols, rows, 2);
            else if (batch == 3) RXF(streams_rows_avx512)(out, w, xp, g0 + i, per, nb, cols, rows, 3);
            else RXF(streams_rows_avx512)(out, w, xp, g0 + i, per, nb, cols, rows, 4);
        }
        g0 += 2 * per;
    }
    /* more than one pass of 8 batch rows: decode each block once into the thread's tile */
    uint8_t *tile = batch > 8 ? rx_tile((size_t)nb * RX_TILE_BLOCK) : NULL;
    const size_t us = (size_t)16 * RX_UNIT;
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        if (tile)
            for (int k = 0; k < nb; k++) {
                __m512i u[8];
                __m512 s[2], o[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
                uint8_t *t = tile + (size_t)k * RX_TILE_BLOCK;
                if (rx_pf) RXF(prefetch)(wg, k, rx_pf);
                RXF(dec_avx512)(wg + (size_t)(k / RX_BPU) * us, k % RX_BPU, u, s, o);
                for (int i = 0; i < 8; i++) _mm512_store_si512((void *)(t + 64 * i), u[i]);
                _mm512_store_ps(t + 512, s[0]);
                _mm512_store_ps(t + 576, RX_HALVES == 2 ? s[1] : s[0]);
                _mm512_store_ps(t + 640, o[0]);
                _mm512_store_ps(t + 704, RX_HALVES == 2 ? o[1] : o[0]);
            }
        for (int b = 0; b < batch; b += 8) {
            switch (batch - b < 8 ? batch - b : 8) {
            case 1: RXF(group_avx512)(out, wg, xp, nb, cols, rows, g * 16, b, tile, 1); break;
            case 2: RXF(group_avx512)(out, wg, xp, nb, cols, rows, g * 16, b, tile, 2); break;
            case 3: RXF(group_avx512)(out, wg, xp, nb, cols, rows, g * 16, b, tile, 3); break;
            case 4: RXF(group_avx512)(out, wg, xp, nb, cols, rows, g * 16, b, tile, 4); break;
            case 5: RXF(group_avx512)(out, wg, xp, nb, cols, rows, g * 16, b, tile, 5); break;
            case 6: RXF(group_avx512)(out, wg, xp, nb, cols, rows, g * 16, b, tile, 6); break;
            case 7: RXF(group_avx512)(out, wg, xp, nb, cols, rows, g * 16, b, tile, 7); break;
            default: RXF(group_avx512)(out, wg, xp, nb, cols, rows, g * 16, b, tile, 8); break;
            }
        }
    }
}

/* ---- AVX2: each group as two halves of 8 rows; maddubs (u <= 63: a pair of products is at most
 * 2 * 63 * 128 and two pairs add below 2^15), then madd to one int32 per row. Signed codes
 * (RX_SIGNED): maddubs(|u|, x signed as u), a pair at most 2 * 127 * 127 < 2^15 (q80 x is
 * -127..127), each madd'ed alone ---- */

DL_INLINE DL_TARGET_AVX2 __m256 RXF(block_avx2)(__m256 acc, const __m256i *u, const __m256 *s, const __m256 *o,
                                                const uint8_t *xq, const rx_xblock *xb) {
    const __m256i ones = _mm256_set1_epi16(1);
#if RX_SIGNED
#define RX_MB(i) _mm256_maddubs_epi16(_mm256_sign_epi8(u[i], u[i]), \
                                      _mm256_sign_epi8(_mm256_set1_epi32(dl_ld32(xq + 4 * (i))), u[i]))
#define RX_PAIR(i) _mm256_add_epi32(_mm256_madd_epi16(RX_MB(i), ones), _mm256_madd_epi16(RX_MB((i) + 1), ones))
#else
#define RX_MB(i) _mm256_maddubs_epi16(u[i], _mm256_set1_epi32(dl_ld32(xq + 4 * (i))))
#define RX_PAIR(i) _mm256_madd_epi16(_mm256_add_epi16(RX_MB(i), RX_MB((i) + 1)), ones)
#endif
    const __m256 dx = _mm256_set1_ps(xb->dx);
#if RX_HALVES == 1
    __m256i a = _mm256_add_epi32(RX_PAIR(0), RX_PAIR(2));
    const __m256i b = _mm256_add_epi32(RX_PAIR(4), RX_PAIR(6));
    a = _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_set1_epi32(-RX_C * xb->xs));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(s[0], dx), acc);
#if RX_AFFINE
    acc = _mm256_fmadd_ps(o[0], _mm256_set1_ps(xb->fx), acc);
#endif
#else
    const __m256i a = _mm256_add_epi32(_mm256_add_epi32(RX_PAIR(0), RX_PAIR(2)), _mm256_set1_epi32(-RX_C * xb->xs0));
    const __m256i b = _mm256_add_epi32(_mm256_add_epi32(RX_PAIR(4), RX_PAIR(6)), _mm256_set1_epi32(-RX_C * xb->xs1));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(s[0], dx), acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), _mm256_mul_ps(s[1], dx), acc);
#if RX_AFFINE
    acc = _mm256_fmadd_ps(o[0], _mm256_set1_ps(xb->fx0), acc);
    acc = _mm256_fmadd_ps(o[1], _mm256_set1_ps(xb->fx1), acc);
#endif
#endif
#undef RX_PAIR
#undef RX_MB
    return acc;
}

/* half h of a group x B batch rows; the blocks from the thread's tile (decoded once per group, as
 * on AVX-512: per block and half 8 code vectors, then s0, s1, o0, o1) or, tile NULL, decoded here */
DL_INLINE DL_TARGET_AVX2 void RXF(half_avx2)(float *out, const uint8_t *wg, const uint8_t *xp, int nb, int cols,
                                             int rows, int row0, int h, int b0, const uint8_t *tile, const int B) {
    const size_t xs = rx_xstride(cols), us = (size_t)16 * RX_UNIT;
    __m256 acc[7];
    for (int j = 0; j < B; j++) acc[j] = _mm256_setzero_ps();
    for (int k = 0; k < nb; k++) {
        __m256i u[8];
        __m256 s[2], o[2];
        if (tile) {
            const uint8_t *t = tile + (size_t)k * RX_TILE_BLOCK + (size_t)h * (RX_TILE_BLOCK / 2);
            for (int i = 0; i < 8; i++) u[i] = _mm256_load_si256((const __m256i *)(t + 32 * i));
            s[0] = _mm256_load_ps((const float *)(t + 256));
            s[1] = _mm256_load_ps((const float *)(t + 288));
            o[0] = _mm256_load_ps((const float *)(t + 320));
            o[1] = _mm256_load_ps((const float *)(t + 352));
        } else {
            if (rx_pf && h == 0) RXF(prefetch)(wg, k, rx_pf);
            RXF(dec_avx2)(wg + (size_t)(k / RX_BPU) * us, k % RX_BPU, h, u, s, o);
        }
        for (int j = 0; j < B; j++) {
            const uint8_t *xr = xp + (size_t)(b0 + j) * xs;
            acc[j] = RXF(block_avx2)(acc[j], u, s, o, xr + (size_t)k * DL_QK, (const rx_xblock *)(xr + cols) + k);
        }
    }
    dl_store_half8(out, rows, row0 + 8 * h, b0, B, rows - row0 - 8 * h, acc);
}

/* matvec: as streams_avx512, each group's two halves one after the other per block */
DL_INLINE DL_TARGET_AVX2 void RXF(streams_avx2)(float *out, const uint8_t *w, const uint8_t *xp, int g_first,
                                                int per, int nb, int cols, int rows, const int NS) {
    const size_t us = (size_t)16 * RX_UNIT, gs = RXF(group_stride)(cols);
    const rx_xblock *xb = (const rx_xblock *)(xp + cols);
    __m256 acc[4][2];
    const uint8_t *wg[4];
    for (int s = 0; s < NS; s++) {
        acc[s][0] = acc[s][1] = _mm256_setzero_ps();
        wg[s] = w + (size_t)(g_first + s * per) * gs;
    }
    const size_t pf = rx_pf;
    for (int k = 0; k < nb; k++)
        for (int s = 0; s < NS; s++)
            for (int h = 0; h < 2; h++) {
                __m256i u[8];
                __m256 sc[2], o[2];
                if (pf && h == 0) RXF(prefetch)(wg[s], k, pf);
                RXF(dec_avx2)(wg[s] + (size_t)(k / RX_BPU) * us, k % RX_BPU, h, u, sc, o);
                acc[s][h] = RXF(block_avx2)(acc[s][h], u, sc, o, xp + (size_t)k * DL_QK, xb + k);
            }
    for (int s = 0; s < NS; s++) {
        const int row0 = (g_first + s * per) * 16;
        dl_store16(out + row0, acc[s][0], acc[s][1], rows - row0);
    }
}

static DL_TARGET_AVX2 void RXF(groups_avx2)(float *out, const uint8_t *w, const dl_block_q80 *x,
                                            const uint8_t *xp, int g0, int g1, int rows, int cols, int batch) {
    (void)x;
    const int nb = cols / DL_QK;
    const size_t gs = RXF(group_stride)(cols);
    RX_STREAMS(RXF(streams_avx2));
    /* up to 7 batch rows in one call per half, decoding inline (their accumulators spill to L1); from
     * 8 rows on, the tile and 4 rows a call. Calls of SmolLM2's and Gemma 3's matrices on Zen 3, the
     * two builds side by side: 5-6 rows 0.98-1.42x as fast as a tile and 4 + 1 / 4 + 2 rows a call (Q6_K
     * the least), 7 rows 0.93-1.21x; 8 rows this way 0.90-1.11x, and chunks of 8 from the tile at 12-16
     * rows 0.74-0.95x (scripts/BENCHMARKS.md) */
    uint8_t *tile = batch > 7 ? rx_tile((size_t)nb * RX_TILE_BLOCK) : NULL;
    const size_t us = (size_t)16 * RX_UNIT;
    for (int g = g0; g < g1; g++) {
        const uint8_t *wg = w + (size_t)g * gs;
        const int halves = rows - g * 16 > 8 ? 2 : 1;   /* a padded half computes nothing */
        if (tile)
            for (int k = 0; k < nb; k++)
                for (int h = 0; h < halves; h++) {
                    __m256i u[8];
                    __m256 s[2], o[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
                    uint8_t *t = tile + (size_t)k * RX_TILE_BLOCK + (size_t)h * (RX_TILE_BLOCK / 2);
                    if (rx_pf && h == 0) RXF(prefetch)(wg, k, rx_pf);
                    RXF(dec_avx2)(wg + (size_t)(k / RX_BPU) * us, k % RX_BPU, h, u, s, o);
                    for (int i = 0; i < 8; i++) _mm256_store_si256((__m256i *)(t + 32 * i), u[i]);
                    _mm256_store_ps((float *)(t + 256), s[0]);
                    _mm256_store_ps((float *)(t + 288), RX_HALVES == 2 ? s[1] : s[0]);
                    _mm256_store_ps((float *)(t + 320), o[0]);
                    _mm256_store_ps((float *)(t + 352), RX_HALVES == 2 ? o[1] : o[0]);
                }
        const int chunk = tile ? 4 : 7;
        for (int b = 0; b < batch; b += chunk) {
            const int B = batch - b < chunk ? batch - b : chunk;
            for (int h = 0; h < halves; h++) {
                switch (B) {
                case 1: RXF(half_avx2)(out, wg, xp, nb, cols, rows, g * 16, h, b, tile, 1); break;
                case 2: RXF(half_avx2)(out, wg, xp, nb, cols, rows, g * 16, h, b, tile, 2); break;
                case 3: RXF(half_avx2)(out, wg, xp, nb, cols, rows, g * 16, h, b, tile, 3); break;
                case 4: RXF(half_avx2)(out, wg, xp, nb, cols, rows, g * 16, h, b, tile, 4); break;
                case 5: RXF(half_avx2)(out, wg, xp, nb, cols, rows, g * 16, h, b, tile, 5); break;
                case 6: RXF(half_avx2)(out, wg, xp, nb, cols, rows, g * 16, h, b, tile, 6); break;
                default: RXF(half_avx2)(out, wg, xp, nb, cols, rows, g * 16, h, b, tile, 7); break;
                }
            }
        }
    }
}
#endif /* DL_X86 */

#if DL_NEON
/* ---- NEON: a group as 4 quads of 4 rows. Plain NEON: smull / smlal into 16 bits over 4 steps (4
 * products of at most 63 * 128 per lane), pairwise widened to one int32 per row; dotprod: sdot by
 * element. Floats as the scalar path (multiply, then add; no FMA): the same bits. ---- */

static inline int32x4_t RXF(dot4_neon)(const int8x16_t *u, const uint8_t *xq) {   /* u[0..3] x 16 values */
#define RX_XV(i) vreinterpretq_s8_s32(vdupq_n_s32(dl_ld32(xq + 4 * (i))))
#if RX_SIGNED   /* codes up to 127: two products per 16-bit lane (2 * 127 * 128 < 2^15), then widened */
    int32x4_t a01 = vdupq_n_s32(0), a23 = vdupq_n_s32(0);
    for (int i = 0; i < 4; i += 2) {
        const int8x16_t x0 = RX_XV(i), x1 = RX_XV(i + 1);
        a01 = vpadalq_s16(a01, vmlal_s8(vmull_s8(vget_low_s8(u[i]), vget_low_s8(x0)), vget_low_s8(u[i + 1]), vget_low_s8(x1)));
        a23 = vpadalq_s16(a23, vmlal_high_s8(vmull_high_s8(u[i], x0), u[i + 1], x1));
    }
    return vpaddq_s32(a01, a23);
#else
    int16x8_t a01 = vdupq_n_s16(0), a23 = vdupq_n_s16(0);
    for (int i = 0; i < 4; i++) {
        const int8x16_t xv = RX_XV(i);
        a01 = vmlal_s8(a01, vget_low_s8(u[i]), vget_low_s8(xv));
        a23 = vmlal_high_s8(a23, u[i], xv);
    }
    return vpaddq_s32(vpaddlq_s16(a01), vpaddlq_s16(a23));
#endif
#undef RX_XV
}

#if DL_HAVE_DOTPROD
DL_INLINE DL_TARGET_DOTPROD int32x4_t RXF(dot4_dotprod)(const int8x16_t *u, const uint8_t *xq) {
    const int8x16_t xv = vld1q_s8((const int8_t *)xq);
    int32x4_t acc = vdotq_laneq_s32(vdupq_n_s32(0), u[0], xv, 0);
    acc = vdotq_laneq_s32(acc, u[1], xv, 1);
    acc = vdotq_laneq_s32(acc, u[2], xv, 2);
    return vdotq_laneq_s32(acc, u[3], xv, 3);
}
#endif

#define RX_NEON_GROUPS(DOT4) do { \
    (void)x; \
    const int nb = cols / DL_QK; \
    const size_t us = (size_t)16 * RX_UNIT, gs = RXF(group_stride)(cols), xs = rx_xstride(cols); \
    for (int g = g0; g < g1; g++) { \
        const uint8_t *wg = w + (size_t)g * gs; \
        for (int b0 = 0; b0 < batch; b0 += 8) { \
            const int B = batch - b0 < 8 ? batch - b0 : 8; \
            for (int q = 0; q < 4 && g * 16 + 4 * q < rows; q++) { \
                float32x4_t sum[8]; \
                for (int j = 0; j < B; j++) sum[j] = vdupq_n_f32(0.0f); \
                for (int k = 0; k < nb; k++) { \
                    int8x16_t u[8]; \
                    float32x4_t s[2], o[2]; \
                    RXF(dec_neon)(wg + (size_t)(k / RX_BPU) * us, k % RX_BPU, q, u, s, o); \
                    for (int j = 0; j < B; j++) { \
                        const uint8_t *xr = xp + (size_t)(b0 + j) * xs, *xq = xr + (size_t)k * DL_QK; \
                        const rx_xblock *xb = (const rx_xblock *)(xr + cols) + k; \
                        RX_NEON_BLOCK(DOT4); \
                    } \
                } \
                for (int j = 0; j < B; j++) \
                    dl_store4_neon(out + (size_t)(b0 + j) * rows + g * 16 + 4 * q, sum[j], rows - g * 16 - 4 * q); \
            } \
        } \
    } } while (0)

#if RX_HALVES == 1
#define RX_NEON_BLOCK(DOT4) do { \
    const int32x4_t isum = vaddq_s32(vaddq_s32(DOT4(u, xq), DOT4(u + 4, xq + 16)), vdupq_n_s32(-RX_C * xb->xs)); \
    sum[j] = vaddq_f32(sum[j], vmulq_f32(vcvtq_f32_s32(isum), vmulq_n_f32(s[0], xb->dx))); \
    if (RX_AFFINE) sum[j] = vaddq_f32(sum[j], vmulq_n_f32(o[0], xb->fx)); } while (0)
#else
#define RX_NEON_BLOCK(DOT4) do { \
    const int32x4_t i0 = vaddq_s32(DOT4(u, xq), vdupq_n_s32(-RX_C * xb->xs0)); \
    const int32x4_t i1 = vaddq_s32(DOT4(u + 4, xq + 16), vdupq_n_s32(-RX_C * xb->xs1)); \
    sum[j] = vaddq_f32(sum[j], vmulq_f32(vcvtq_f32_s32(i0), vmulq_n_f32(s[0], xb->dx))); \
    sum[j] = vaddq_f32(sum[j], vmulq_f32(vcvtq_f32_s32(i1), vmulq_n_f32(s[1], xb->dx))); \
    if (RX_AFFINE) { \
        sum[j] = vaddq_f32(sum[j], vmulq_n_f32(o[0], xb->fx0)); \
        sum[j] = vaddq_f32(sum[j], vmulq_n_f32(o[1], xb->fx1)); \
    } } while (0)
#endif

static void RXF(groups_neon)(float *out, const uint8_t *w, const dl_block_q80 *x, const uint8_t *xp,
                             int g0, int g1, int rows, int cols, int batch) {
    RX_NEON_GROUPS(RXF(dot4_neon));
}

#if DL_HAVE_DOTPROD
static DL_TARGET_DOTPROD void RXF(groups_dotprod)(float *out, const uint8_t *w, const dl_block_q80 *x,
                                                  const uint8_t *xp, int g0, int g1, int rows, int cols, int batch) {
    RX_NEON_GROUPS(RXF(dot4_dotprod));
}
#endif
#undef RX_NEON_BLOCK
#undef RX_NEON_GROUPS
#endif /* DL_NEON */

/* ---- entry points ---- */

void RX_JOIN3(dl_matmul_, RX, r_q80_n)(int n, float *const *out, const void *const *w, const int *rows,
                                        const dl_block_q80 *x, int cols, int batch) {
    const int isa = dl_get_isa();
    dl_r16_group_fn fn = NULL;
    rx_streams = dl_rx_split(-1);   /* the matvec's streams per thread (DLLAMA_RX_SPLIT) */
    rx_pf = (size_t)dl_weights_prefetch(-1);
#if DL_X86
    if (isa == DL_ISA_AVX512) fn = RXF(groups_avx512);
    if (isa == DL_ISA_AVX2) fn = RXF(groups_avx2);
#endif
#if DL_NEON
    if (isa == DL_ISA_NEON) fn = RXF(groups_neon);
#if DL_HAVE_DOTPROD
    if (isa == DL_ISA_NEON_DOTPROD) fn = RXF(groups_dotprod);
#endif
#endif
    (void)isa;
    dl_r16_matmul_n(n, out, w, rows, x, cols, batch, RXF(groups_scalar), fn, rx_xprep,
                    rx_xstride(cols) * (size_t)(batch > 0 ? batch : 0), 1);
}

void RX_JOIN3(dl_matmul_, RX, r_q80)(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch) {
    RX_JOIN3(dl_matmul_, RX, r_q80_n)(1, &out, &w, &rows, x, cols, batch);
}

#undef RX
#undef RX_UNIT
#undef RX_BPU
#undef RX_HALVES
#undef RX_AFFINE
#undef RX_C
#undef RX_SIGNED
#undef RX_CODE
#undef RX_C512
#undef RX_STREAMS
