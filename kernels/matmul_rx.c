/* The GGUF block types Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS, multiplied
 * as they are in the file ("rx").
 *
 * At load every rank repacks its slice of a matrix into groups of 16 rows (the last group padded
 * with zero rows), keeping every bit of the file's blocks but rearranged so that one SIMD pass
 * covers 16 rows (kernels/rx_engine.h, which holds the matmul written once for all of them):
 *   - the codes of each 32-value block: 4 chunks of 64 bytes, chunk i = [row r][m = 0..3] =
 *     value 4i + m of row r in the low nibble, value 16 + 4i + m in the high nibble (q40r's
 *     layout), plus the type's extra bits beside them (Q5_0, Q5_1, Q5_K: one bit, Q6_K: two);
 *     Q2_K's 2-bit codes four to a byte instead (2 chunks of 64 bytes); Q3_K's 3-bit codes take
 *     3 chunks, 8 values in 3 bytes;
 *   - the scales of the 16 rows side by side ahead of the codes they belong to, so a group's
 *     data, and a thread's run of groups, is one sequential stream.
 * A group's unit is 16 times the file's unit (a block, or a 256-value super-block: K types, IQ4_XS)
 * to the byte: a slice takes the memory of its file bytes plus at most 15 padding rows.
 *
 * Activations are q80 blocks of 32 (kernels/matmul.c), prepared once per call (rx_xprep): the int8
 * values, and per block the integer sums of each half and of the whole, its f32 scale dx, and
 * dx times each sum (exact in f32: a sum has at most 13 bits, dx 11).
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

typedef struct {
    int32_t xs0, xs1, xs;          /* sums of the block's values 0..15, 16..31, all */
    float dx, fx0, fx1, fx;        /* the block's scale, and dx times each sum */
    float pad;
} rx_xblock;

/* per batch row: cols int8 values, then one rx_xblock per block; stride a multiple of 64 bytes */
static inline size_t rx_xstride(int cols) {
    return ((size_t)cols + (size_t)(cols / DL_QK) * sizeof(rx_xblock) + 63) & ~(size_t)63;
}

static void rx_xprep(uint8_t *dst, const dl_block_q80 *x, int cols, int batch) {
    const int nb = cols / DL_QK;
    const size_t st = rx_xstride(cols);
    for (int b = 0; b < batch; b++) {
        uint8_t *qs = dst + (size_t)b * st;
        rx_xblock *xb = (rx_xblock *)(qs + cols);
        const dl_block_q80 *src = x + (size_t)b * nb;
        for (int k = 0; k < nb; k++) {
            int32_t s0 = 0, s1 = 0;
            for (int j = 0; j < 16; j++) {
                s0 += src[k].qs[j];
                s1 += src[k].qs[j + 16];
            }
            memcpy(qs + (size_t)k * DL_QK, src[k].qs, DL_QK);
            const float dx = dl_f16_to_f32_scalar(src[k].d);
            xb[k] = (rx_xblock){s0, s1, s0 + s1, dx, dx * (float)s0, dx * (float)s1, dx * (float)(s0 + s1), 0.0f};
        }
    }
}

typedef struct { const uint8_t *src; uint8_t *dst; int rows, cols; } rx_repack_ctx;

/* Matvec: groups read side by side per thread (set per call from rx_split). The rx kernels decode
 * more per byte than q40r, so one stream per thread leaves the core waiting on memory: measured on
 * an Intel Xeon (Sapphire Rapids class) VM, 2026-12-06, 1 thread, an 8192 x 2048 matrix, AVX2: Q4_K
 * 11.1 GB/s with 1 stream, 18.3 with 2, 19.8 with 4 (Q6_K 9.8 / 13.2 / 15.1; q40r 20.4 / 21.2 /
 * 20.1), and the Llama-3.2-1B shape's Q4_K_M decode 10.1-10.4 -> 14.4-14.7 tok/s; AVX-512 reads
 * 4 streams as q40r does. Default 4 on every x86 ISA; DLLAMA_RX_SPLIT (1..4) or dl_rx_split
 * override it. Results never depend on it. */
static int rx_streams = 4, rx_split_set = 0;
static size_t rx_pf = 0;   /* dl_weights_prefetch's distance, read per call like rx_streams */

static int rx_split_default(void) {
    static int env = -2;   /* -2: not read yet, 0: unset */
    if (env == -2) {
        const char *e = getenv("DLLAMA_RX_SPLIT");
        env = e && atoi(e) >= 1 && atoi(e) <= 4 ? atoi(e) : 0;
    }
    return env ? env : 4;
}

int dl_rx_split(int n) {
    if (n >= 0) rx_split_set = n > 4 ? 4 : n;
    return rx_split_set > 0 ? rx_split_set : rx_split_default();
}

/* A thread's buffer for one group's decoded blocks (batched calls: decoded once, used by every pass
 * of batch rows): per block RX_TILE_BLOCK bytes, 64-byte aligned. Its own, not dl_scratch: the
 * calling thread's scratch holds the prepared activations of the same call. */
#define RX_TILE_BLOCK (8 * 64 + 4 * 64)
static uint8_t *rx_tile(size_t bytes) {
    static _Thread_local uint8_t *buf = NULL;
    static _Thread_local size_t size = 0;
    if (bytes > size) {
        free(buf);
        buf = NULL;
        size = 0;
        if (posix_memalign((void **)&buf, 64, bytes) != 0) return NULL;
        size = bytes;
    }
    return buf;
}

static inline float rx_f16(const uint8_t *p) { return dl_f16_to_f32_scalar(dl_ld16(p)); }

/* q40r-style codes of 32 values v[0..31] (each < 16) of row r into a block's 4 x 64 bytes */
static inline void rx_put_nibbles(uint8_t *codes, int r, const uint8_t *v) {
    for (int i = 0; i < 4; i++)
        for (int m = 0; m < 4; m++) codes[64 * i + 4 * r + m] = (uint8_t)((v[4 * i + m] & 15) | (v[16 + 4 * i + m] & 15) << 4);
}

static inline void rx_get_nibbles(uint8_t *v, const uint8_t *codes, int r) {
    for (int i = 0; i < 4; i++)
        for (int m = 0; m < 4; m++) {
            const uint8_t b = codes[64 * i + 4 * r + m];
            v[4 * i + m] = b & 15;
            v[16 + 4 * i + m] = b >> 4;
        }
}

#if DL_X86
DL_INLINE DL_TARGET_AVX512 void rx_nibbles_avx512(const uint8_t *codes, __m512i *u) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < 4; i++) {
        const __m512i v = _mm512_loadu_si512((const void *)(codes + 64 * i));
        u[i] = _mm512_and_si512(v, m4);
        u[4 + i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    }
}

DL_INLINE DL_TARGET_AVX2 void rx_nibbles_avx2(const uint8_t *codes, int h, __m256i *u) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int i = 0; i < 4; i++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(codes + 64 * i + 32 * h));
        u[i] = _mm256_and_si256(v, m4);
        u[4 + i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
}
#endif

#if DL_NEON
static inline void rx_nibbles_neon(const uint8_t *codes, int q, int8x16_t *u) {
    for (int i = 0; i < 4; i++) {
        const uint8x16_t v = vld1q_u8(codes + 64 * i + 16 * q);
        u[i] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
        u[4 + i] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
    }
}

/* 4 bytes (one per row of a quad) widened to floats */
static inline float32x4_t rx_u8x4_f32(uint8x8_t v) { return vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(v)))); }
static inline float32x4_t rx_s8x4_f32(int8x8_t v) { return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(v)))); }
static inline uint8x8_t rx_ld4_u8(const uint8_t *p) { return vreinterpret_u8_u32(vdup_n_u32((uint32_t)dl_ld32(p))); }
#endif

/* 5-bit codes of a block (Q5_1, Q5_K): the low nibbles as rx_put_nibbles (256 bytes), then a plane
 * of the 5th bits (64 bytes): byte 4r + m, bit 4h + i = the 5th bit of value 16h + 4i + m of row r,
 * i.e. of byte 4r + m of code vector u[4h + i]. One load serves all 8 vectors; each takes its bit
 * by one shift (AVX2, NEON) or one vptestmb (AVX-512). */
static inline void rx_put_q5(uint8_t *blk, int r, const uint8_t *v) {
    rx_put_nibbles(blk, r, v);
    for (int j = 0; j < 32; j++) blk[256 + 4 * r + j % 4] |= (uint8_t)((v[j] >> 4) << (4 * (j / 16) + (j % 16) / 4));
}

static inline void rx_get_q5(uint8_t *v, const uint8_t *blk, int r) {
    rx_get_nibbles(v, blk, r);
    for (int j = 0; j < 32; j++) v[j] |= (uint8_t)(((blk[256 + 4 * r + j % 4] >> (4 * (j / 16) + (j % 16) / 4)) & 1) << 4);
}

/* the plane shifted so that the bit of u[b] lands at bit 4 of each byte, for b = 0..7 (16-bit shifts
 * on AVX2: what crosses into a byte is masked off by the caller) */
#define RX_PLANE_AT4(sll, srl, p) {sll(p, 4), sll(p, 3), sll(p, 2), sll(p, 1), p, srl(p, 1), srl(p, 2), srl(p, 3)}

#if DL_X86
/* AVX-512: bit b of the plane's bytes as a mask (vptestmb), then 16 added under it: no shifts, which
 * would share port 0 with vpdpbusd */
DL_INLINE DL_TARGET_AVX512 void rx_q5_avx512(const uint8_t *blk, __m512i *u) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m10 = _mm512_set1_epi8(0x10);
    const __m512i p = _mm512_loadu_si512((const void *)(blk + 256));
    for (int i = 0; i < 4; i++) {
        const __m512i v = _mm512_loadu_si512((const void *)(blk + 64 * i));
        const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        u[i] = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(p, _mm512_set1_epi8((char)(1 << i))), lo, m10);
        u[4 + i] = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(p, _mm512_set1_epi8((char)(16 << i))), hi, m10);
    }
}

DL_INLINE DL_TARGET_AVX2 void rx_q5_avx2(const uint8_t *blk, int h, __m256i *u) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m10 = _mm256_set1_epi8(0x10);
    const __m256i p = _mm256_loadu_si256((const __m256i *)(blk + 256 + 32 * h));
    const __m256i sh[8] = RX_PLANE_AT4(_mm256_slli_epi16, _mm256_srli_epi16, p);
    for (int i = 0; i < 4; i++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 64 * i + 32 * h));
        u[i] = _mm256_or_si256(_mm256_and_si256(v, m4), _mm256_and_si256(sh[i], m10));
        u[4 + i] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), _mm256_and_si256(sh[4 + i], m10));
    }
}
#endif

#if DL_NEON
static inline void rx_q5_neon(const uint8_t *blk, int q, int8x16_t *u) {
    const uint8x16_t m10 = vdupq_n_u8(0x10), p = vld1q_u8(blk + 256 + 16 * q);
    const uint8x16_t sh[8] = RX_PLANE_AT4(vshlq_n_u8, vshrq_n_u8, p);
    for (int i = 0; i < 4; i++) {
        const uint8x16_t v = vld1q_u8(blk + 64 * i + 16 * q);
        u[i] = vreinterpretq_s8_u8(vbslq_u8(m10, sh[i], vandq_u8(v, vdupq_n_u8(0x0F))));
        u[4 + i] = vreinterpretq_s8_u8(vbslq_u8(m10, sh[4 + i], vshrq_n_u8(v, 4)));
    }
}
#endif

/* ========================================================================================== */
/* Q4_1: 32 values, d and m (f16), value = d * nibble + m.
 * unit (16 rows, 320 bytes): [0, 32) d of each row, [32, 64) m, [64, 320) codes */

static void q41_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r];
        uint8_t v[32];
        memcpy(dst + 2 * r, b, 2);
        memcpy(dst + 32 + 2 * r, b + 2, 2);
        for (int j = 0; j < 16; j++) {
            v[j] = b[4 + j] & 15;
            v[j + 16] = b[4 + j] >> 4;
        }
        rx_put_nibbles(dst + 64, r, v);
    }
}

static void q41_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r], v[32];
        memcpy(b, src + 2 * r, 2);
        memcpy(b + 2, src + 32 + 2 * r, 2);
        rx_get_nibbles(v, src + 64, r);
        for (int j = 0; j < 16; j++) b[4 + j] = (uint8_t)(v[j] | v[j + 16] << 4);
    }
}

static inline void q41_dec_scalar(const uint8_t *unit, int kk, int r, uint8_t *u, float *s, float *o) {
    (void)kk;
    s[0] = rx_f16(unit + 2 * r);
    o[0] = rx_f16(unit + 32 + 2 * r);
    rx_get_nibbles(u, unit + 64, r);
}

#if DL_X86
DL_INLINE DL_TARGET_AVX512 void q41_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    (void)kk;
    rx_nibbles_avx512(unit + 64, u);
    s[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit));
    o[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(unit + 32)));
}

DL_INLINE DL_TARGET_AVX2 void q41_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    (void)kk;
    rx_nibbles_avx2(unit + 64, h, u);
    s[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 16 * h)));
    o[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 32 + 16 * h)));
}
#endif

#if DL_NEON
static inline void q41_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    (void)kk;
    rx_nibbles_neon(unit + 64, q, u);
    s[0] = dl_ld_f16x4(unit + 8 * q);
    o[0] = dl_ld_f16x4(unit + 32 + 8 * q);
}
#endif

#define RX q41
#define RX_UNIT 20
#define RX_BPU 1
#define RX_HALVES 1
#define RX_AFFINE 1
#define RX_C 0
#include "rx_engine.h"

/* ========================================================================================== */
/* Q5_0: 32 values, d (f16), value = d * ((nibble | high bit << 4) - 16).
 * unit (16 rows, 352 bytes): [0, 32) d of each row; [32, 96) the high bits as 8 masks of 64 bits,
 * mask 4h + i holding bit 4r + m = high bit of value 16h + 4i + m of row r (one lane of a chunk
 * each: AVX-512 adds 16 under the mask); [96, 352) codes */

static void q50_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r];
        const uint32_t qh = (uint32_t)dl_ld32(b + 2);
        uint8_t v[32];
        memcpy(dst + 2 * r, b, 2);
        for (int j = 0; j < 16; j++) {
            v[j] = b[6 + j] & 15;
            v[j + 16] = b[6 + j] >> 4;
        }
        rx_put_nibbles(dst + 96, r, v);
        for (int j = 0; j < 32; j++)
            if ((qh >> j) & 1) {
                const int bit = 4 * r + j % 4;
                dst[32 + 8 * (4 * (j / 16) + (j % 16) / 4) + bit / 8] |= (uint8_t)(1u << (bit % 8));
            }
    }
}

static inline int q50_high_bit(const uint8_t *unit, int r, int j) {
    const int bit = 4 * r + j % 4;
    return (unit[32 + 8 * (4 * (j / 16) + (j % 16) / 4) + bit / 8] >> (bit % 8)) & 1;
}

static void q50_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r], v[32];
        uint32_t qh = 0;
        memcpy(b, src + 2 * r, 2);
        rx_get_nibbles(v, src + 96, r);
        for (int j = 0; j < 16; j++) b[6 + j] = (uint8_t)(v[j] | v[j + 16] << 4);
        for (int j = 0; j < 32; j++) qh |= (uint32_t)q50_high_bit(src, r, j) << j;
        memcpy(b + 2, &qh, 4);
    }
}

static inline void q50_dec_scalar(const uint8_t *unit, int kk, int r, uint8_t *u, float *s, float *o) {
    (void)kk;
    (void)o;
    s[0] = rx_f16(unit + 2 * r);
    rx_get_nibbles(u, unit + 96, r);
    for (int j = 0; j < 32; j++) u[j] |= (uint8_t)(q50_high_bit(unit, r, j) << 4);
}

#if DL_X86
DL_INLINE DL_TARGET_AVX512 void q50_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    (void)kk;
    (void)o;
    const __m512i bit4 = _mm512_set1_epi8(0x10);
    rx_nibbles_avx512(unit + 96, u);
    for (int i = 0; i < 8; i++) {
        uint64_t m;
        memcpy(&m, unit + 32 + 8 * i, 8);   /* mask 4h + i for u[4h + i] */
        u[i] = _mm512_mask_add_epi8(u[i], _cvtu64_mask64(m), u[i], bit4);
    }
    s[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit));
}

/* 32 mask bits -> 32 bytes, 0x10 where the bit is set */
DL_INLINE DL_TARGET_AVX2 __m256i rx_bits_avx2(uint32_t m) {
    const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)m), idx), sel);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, sel), _mm256_set1_epi8(0x10));
}

DL_INLINE DL_TARGET_AVX2 void q50_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    (void)kk;
    (void)o;
    rx_nibbles_avx2(unit + 96, h, u);
    for (int i = 0; i < 8; i++) u[i] = _mm256_or_si256(u[i], rx_bits_avx2((uint32_t)dl_ld32(unit + 32 + 8 * i + 4 * h)));
    s[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 16 * h)));
}
#endif

#if DL_NEON
static inline void q50_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    (void)kk;
    (void)o;
    static const uint8_t sel_bytes[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t sel = vld1q_u8(sel_bytes);
    rx_nibbles_neon(unit + 96, q, u);
    for (int i = 0; i < 8; i++) {
        const uint8_t *m = unit + 32 + 8 * i + 2 * q;
        const uint8x16_t bits = vandq_u8(vtstq_u8(vcombine_u8(vdup_n_u8(m[0]), vdup_n_u8(m[1])), sel), vdupq_n_u8(0x10));
        u[i] = vreinterpretq_s8_u8(vorrq_u8(vreinterpretq_u8_s8(u[i]), bits));
    }
    s[0] = dl_ld_f16x4(unit + 8 * q);
}
#endif

#define RX q50
#define RX_UNIT 22
#define RX_BPU 1
#define RX_HALVES 1
#define RX_AFFINE 0
#define RX_C 16
#include "rx_engine.h"

/* ========================================================================================== */
/* Q5_1: 32 values, d and m (f16), value = d * (nibble | high bit << 4) + m (Q4_1's scale, Q5_0's
 * codes). unit (16 rows, 384 bytes): [0, 32) d of each row, [32, 64) m, [64, 384) the 5-bit codes
 * (rx_put_q5) */

static void q51_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r];
        const uint32_t qh = (uint32_t)dl_ld32(b + 4);
        uint8_t v[32];
        memcpy(dst + 2 * r, b, 2);
        memcpy(dst + 32 + 2 * r, b + 2, 2);
        for (int j = 0; j < 16; j++) {
            v[j] = (uint8_t)((b[8 + j] & 15) | ((qh >> j) & 1) << 4);
            v[j + 16] = (uint8_t)((b[8 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
        }
        rx_put_q5(dst + 64, r, v);
    }
}

static void q51_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r], v[32];
        uint32_t qh = 0;
        memcpy(b, src + 2 * r, 2);
        memcpy(b + 2, src + 32 + 2 * r, 2);
        rx_get_q5(v, src + 64, r);
        for (int j = 0; j < 16; j++) b[8 + j] = (uint8_t)((v[j] & 15) | (v[j + 16] & 15) << 4);
        for (int j = 0; j < 32; j++) qh |= (uint32_t)(v[j] >> 4) << j;
        memcpy(b + 4, &qh, 4);
    }
}

static inline void q51_dec_scalar(const uint8_t *unit, int kk, int r, uint8_t *u, float *s, float *o) {
    (void)kk;
    s[0] = rx_f16(unit + 2 * r);
    o[0] = rx_f16(unit + 32 + 2 * r);
    rx_get_q5(u, unit + 64, r);
}

#if DL_X86
DL_INLINE DL_TARGET_AVX512 void q51_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    (void)kk;
    rx_q5_avx512(unit + 64, u);
    s[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit));
    o[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(unit + 32)));
}

DL_INLINE DL_TARGET_AVX2 void q51_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    (void)kk;
    rx_q5_avx2(unit + 64, h, u);
    s[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 16 * h)));
    o[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 32 + 16 * h)));
}
#endif

#if DL_NEON
static inline void q51_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    (void)kk;
    rx_q5_neon(unit + 64, q, u);
    s[0] = dl_ld_f16x4(unit + 8 * q);
    o[0] = dl_ld_f16x4(unit + 32 + 8 * q);
}
#endif

#define RX q51
#define RX_UNIT 24
#define RX_BPU 1
#define RX_HALVES 1
#define RX_AFFINE 1
#define RX_C 0
#include "rx_engine.h"

/* ========================================================================================== */
/* Q4_K: 256-value super-blocks of 8 blocks, d and dmin (f16) and 6-bit scales sc[j] and mins m[j]
 * packed in 12 bytes; value = d * sc[j] * nibble - dmin * m[j].
 * unit (16 rows, 2304 bytes): [0, 32) d of each row, [32, 64) dmin, [64, 256) the 12 scale bytes,
 * byte b of row r at 64 + 16 b + r; [256 + 256 kk, ...) the codes of block kk */

static void q4k_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r], *qs = b + 16;
        memcpy(dst + 2 * r, b, 2);
        memcpy(dst + 32 + 2 * r, b + 2, 2);
        for (int k = 0; k < 12; k++) dst[64 + 16 * k + r] = b[4 + k];
        for (int kk = 0; kk < 8; kk++) {   /* block kk: the low (even kk) or high nibbles of qs[32 (kk / 2) ..] */
            uint8_t v[32];
            for (int l = 0; l < 32; l++) v[l] = (qs[32 * (kk / 2) + l] >> (4 * (kk % 2))) & 15;
            rx_put_nibbles(dst + 256 + 256 * kk, r, v);
        }
    }
}

static void q4k_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r], *qs = b + 16;
        memcpy(b, src + 2 * r, 2);
        memcpy(b + 2, src + 32 + 2 * r, 2);
        for (int k = 0; k < 12; k++) b[4 + k] = src[64 + 16 * k + r];
        memset(qs, 0, 128);
        for (int kk = 0; kk < 8; kk++) {
            uint8_t v[32];
            rx_get_nibbles(v, src + 256 + 256 * kk, r);
            for (int l = 0; l < 32; l++) qs[32 * (kk / 2) + l] |= (uint8_t)(v[l] << (4 * (kk % 2)));
        }
    }
}

/* Q4_K / Q5_K: block kk's scale d * sc and offset -dmin * m from a unit's [0, 256) (d, dmin, the
 * 12 scale bytes): row r (scalar), the 16 rows (AVX-512), half h (AVX2), quad q (NEON) */
static inline void q4k_scale_scalar(const uint8_t *unit, int kk, int r, float *s, float *o) {
    const uint8_t *sb = unit + 64 + r;   /* scale byte k at sb[16 k] */
    int sc, m;
    if (kk < 4) {
        sc = sb[16 * kk] & 63;
        m = sb[16 * (kk + 4)] & 63;
    } else {
        sc = (sb[16 * (kk + 4)] & 15) | (sb[16 * (kk - 4)] >> 6) << 4;
        m = (sb[16 * (kk + 4)] >> 4) | (sb[16 * kk] >> 6) << 4;
    }
    s[0] = rx_f16(unit + 2 * r) * (float)sc;
    o[0] = -(rx_f16(unit + 32 + 2 * r) * (float)m);
}

static inline void q4k_dec_scalar(const uint8_t *unit, int kk, int r, uint8_t *u, float *s, float *o) {
    q4k_scale_scalar(unit, kk, r, s, o);
    rx_get_nibbles(u, unit + 256 + 256 * kk, r);
}

#if DL_X86
/* the 6-bit scales and mins of block kk for the 16 rows (scale byte k of row r at sb + 16 k + r);
 * load(k) gives 16 (AVX-512) or 8 (AVX2) rows' byte k */
#define Q4K_SCALES(load, and_, or_, srl, set1, sc, m) do { \
    if (kk < 4) { \
        sc = and_(load(kk), set1(63)); \
        m = and_(load(kk + 4), set1(63)); \
    } else { \
        const __m128i hi = load(kk + 4); \
        sc = or_(and_(hi, set1(15)), and_(srl(load(kk - 4), 2), set1(0x30))); \
        m = or_(and_(srl(hi, 4), set1(15)), and_(srl(load(kk), 2), set1(0x30))); \
    } } while (0)

DL_INLINE DL_TARGET_AVX512 void q4k_scale_avx512(const uint8_t *unit, int kk, __m512 *s, __m512 *o) {
    __m128i sc, m;
#define Q4K_LD(k) _mm_loadu_si128((const __m128i *)(unit + 64 + 16 * (k)))
    Q4K_SCALES(Q4K_LD, _mm_and_si128, _mm_or_si128, _mm_srli_epi16, _mm_set1_epi8, sc, m);
#undef Q4K_LD
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(unit + 32)));
    s[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
    o[0] = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)))),
                                                _mm512_set1_epi32((int)0x80000000u)));
}

DL_INLINE DL_TARGET_AVX2 void q4k_scale_avx2(const uint8_t *unit, int kk, int h, __m256 *s, __m256 *o) {
    __m128i sc, m;
#define Q4K_LD(k) _mm_loadl_epi64((const __m128i *)(unit + 64 + 16 * (k) + 8 * h))
    Q4K_SCALES(Q4K_LD, _mm_and_si128, _mm_or_si128, _mm_srli_epi16, _mm_set1_epi8, sc, m);
#undef Q4K_LD
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 16 * h)));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 32 + 16 * h)));
    s[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
    o[0] = _mm256_xor_ps(_mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m))), _mm256_set1_ps(-0.0f));
}
#undef Q4K_SCALES

DL_INLINE DL_TARGET_AVX512 void q4k_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    q4k_scale_avx512(unit, kk, s, o);
    rx_nibbles_avx512(unit + 256 + 256 * kk, u);
}

DL_INLINE DL_TARGET_AVX2 void q4k_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    q4k_scale_avx2(unit, kk, h, s, o);
    rx_nibbles_avx2(unit + 256 + 256 * kk, h, u);
}
#endif

#if DL_NEON
static inline void q4k_scale_neon(const uint8_t *unit, int kk, int q, float32x4_t *s, float32x4_t *o) {
#define Q4K_LD(k) rx_ld4_u8(unit + 64 + 16 * (k) + 4 * q)
    uint8x8_t sc, m;
    if (kk < 4) {
        sc = vand_u8(Q4K_LD(kk), vdup_n_u8(63));
        m = vand_u8(Q4K_LD(kk + 4), vdup_n_u8(63));
    } else {
        const uint8x8_t hi = Q4K_LD(kk + 4);
        sc = vorr_u8(vand_u8(hi, vdup_n_u8(15)), vshl_n_u8(vshr_n_u8(Q4K_LD(kk - 4), 6), 4));
        m = vorr_u8(vshr_n_u8(hi, 4), vshl_n_u8(vshr_n_u8(Q4K_LD(kk), 6), 4));
    }
#undef Q4K_LD
    s[0] = vmulq_f32(dl_ld_f16x4(unit + 8 * q), rx_u8x4_f32(sc));
    o[0] = vnegq_f32(vmulq_f32(dl_ld_f16x4(unit + 32 + 8 * q), rx_u8x4_f32(m)));
}

static inline void q4k_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    q4k_scale_neon(unit, kk, q, s, o);
    rx_nibbles_neon(unit + 256 + 256 * kk, q, u);
}
#endif

#define RX q4k
#define RX_UNIT 144
#define RX_BPU 8
#define RX_HALVES 1
#define RX_AFFINE 1
#define RX_C 0
#include "rx_engine.h"

/* ========================================================================================== */
/* Q5_K: Q4_K with a 5th bit per value (qh: bit kk of qh[l] for value l of block kk).
 * unit (16 rows, 2816 bytes): [0, 256) as Q4_K's; [256 + 320 kk, ...) the 5-bit codes of block kk
 * (rx_put_q5: 256 bytes of nibbles, 64 of 5th bits) */

static void q5k_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r], *qh = b + 16, *qs = b + 48;
        memcpy(dst + 2 * r, b, 2);
        memcpy(dst + 32 + 2 * r, b + 2, 2);
        for (int k = 0; k < 12; k++) dst[64 + 16 * k + r] = b[4 + k];
        for (int kk = 0; kk < 8; kk++) {
            uint8_t v[32];
            for (int l = 0; l < 32; l++)
                v[l] = (uint8_t)(((qs[32 * (kk / 2) + l] >> (4 * (kk % 2))) & 15) | ((qh[l] >> kk) & 1) << 4);
            rx_put_q5(dst + 256 + 320 * kk, r, v);
        }
    }
}

static void q5k_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r], *qh = b + 16, *qs = b + 48;
        memcpy(b, src + 2 * r, 2);
        memcpy(b + 2, src + 32 + 2 * r, 2);
        for (int k = 0; k < 12; k++) b[4 + k] = src[64 + 16 * k + r];
        memset(qh, 0, 160);
        for (int kk = 0; kk < 8; kk++) {
            uint8_t v[32];
            rx_get_q5(v, src + 256 + 320 * kk, r);
            for (int l = 0; l < 32; l++) {
                qs[32 * (kk / 2) + l] |= (uint8_t)((v[l] & 15) << (4 * (kk % 2)));
                qh[l] |= (uint8_t)((v[l] >> 4) << kk);
            }
        }
    }
}

static inline void q5k_dec_scalar(const uint8_t *unit, int kk, int r, uint8_t *u, float *s, float *o) {
    q4k_scale_scalar(unit, kk, r, s, o);
    rx_get_q5(u, unit + 256 + 320 * kk, r);
}

#if DL_X86
DL_INLINE DL_TARGET_AVX512 void q5k_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    q4k_scale_avx512(unit, kk, s, o);
    rx_q5_avx512(unit + 256 + 320 * kk, u);
}

DL_INLINE DL_TARGET_AVX2 void q5k_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    q4k_scale_avx2(unit, kk, h, s, o);
    rx_q5_avx2(unit + 256 + 320 * kk, h, u);
}
#endif

#if DL_NEON
static inline void q5k_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    q4k_scale_neon(unit, kk, q, s, o);
    rx_q5_neon(unit + 256 + 320 * kk, q, u);
}
#endif

#define RX q5k
#define RX_UNIT 176
#define RX_BPU 8
#define RX_HALVES 1
#define RX_AFFINE 1
#define RX_C 0
#include "rx_engine.h"

/* ========================================================================================== */
/* Q6_K: 256-value super-blocks, d (f16) and an int8 scale per 16 values; value = d * sc * (q - 32)
 * with q = 6 bits (4 low in ql, 2 high in qh).
 * unit (16 rows, 3360 bytes): [0, 32) d of each row, [32, 288) the 16 scales, scale j of row r at
 * 32 + 16 j + r; then per block kk at 288 + 384 kk: the codes of the low 4 bits (256 bytes), then
 * two 64-byte chunks of high bits: byte 4r + m of chunk h holds, at bits 2i and 2i + 1, the high
 * bits of value 16h + 4i + m of row r */

static inline int q6k_value(const uint8_t *b, int v) {   /* the 6-bit code of value v of a super-block */
    const int n = v / 128, t = (v % 128) / 32, l = v % 32;
    const int lo = (b[64 * n + l + 32 * (t & 1)] >> (4 * (t >> 1))) & 15;
    const int hi = (b[128 + 32 * n + l] >> (2 * t)) & 3;
    return lo | hi << 4;
}

static void q6k_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r];
        memcpy(dst + 2 * r, b + 208, 2);
        for (int j = 0; j < 16; j++) dst[32 + 16 * j + r] = b[192 + j];
        for (int kk = 0; kk < 8; kk++) {
            uint8_t *blk = dst + 288 + 384 * kk, v[32];
            for (int l = 0; l < 32; l++) v[l] = (uint8_t)q6k_value(b, 32 * kk + l);
            rx_put_nibbles(blk, r, v);
            for (int h = 0; h < 2; h++)
                for (int m = 0; m < 4; m++) {
                    uint8_t hb = 0;
                    for (int i = 0; i < 4; i++) hb |= (uint8_t)((v[16 * h + 4 * i + m] >> 4) << (2 * i));
                    blk[256 + 64 * h + 4 * r + m] = hb;
                }
        }
    }
}

static inline void q6k_codes(uint8_t *v, const uint8_t *blk, int r) {
    rx_get_nibbles(v, blk, r);
    for (int j = 0; j < 32; j++) {
        const int h = j / 16, i = (j % 16) / 4, m = j % 4;
        v[j] |= (uint8_t)(((blk[256 + 64 * h + 4 * r + m] >> (2 * i)) & 3) << 4);
    }
}

static void q6k_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r];
        memset(b, 0, 192);
        memcpy(b + 208, src + 2 * r, 2);
        for (int j = 0; j < 16; j++) b[192 + j] = src[32 + 16 * j + r];
        for (int kk = 0; kk < 8; kk++) {
            uint8_t v[32];
            q6k_codes(v, src + 288 + 384 * kk, r);
            for (int l = 0; l < 32; l++) {
                const int vv = 32 * kk + l, n = vv / 128, t = (vv % 128) / 32, ll = vv % 32;
                b[64 * n + ll + 32 * (t & 1)] |= (uint8_t)((v[l] & 15) << (4 * (t >> 1)));
                b[128 + 32 * n + ll] |= (uint8_t)((v[l] >> 4) << (2 * t));
            }
        }
    }
}

static inline void q6k_dec_scalar(const uint8_t *unit, int kk, int r, uint8_t *u, float *s, float *o) {
    (void)o;
    const float d = rx_f16(unit + 2 * r);
    s[0] = d * (float)(int8_t)unit[32 + 16 * (2 * kk) + r];
    s[1] = d * (float)(int8_t)unit[32 + 16 * (2 * kk + 1) + r];
    q6k_codes(u, unit + 288 + 384 * kk, r);
}

#if DL_X86
DL_INLINE DL_TARGET_AVX512 void q6k_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    (void)o;
    const uint8_t *blk = unit + 288 + 384 * kk;
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    const __m512i h0 = _mm512_loadu_si512((const void *)(blk + 256)), h1 = _mm512_loadu_si512((const void *)(blk + 320));
    /* the two high bits of step i at bits 4-5: shifted by 4 - 2i (16-bit shifts: what crosses a byte is masked off) */
    const __m512i sh0[4] = {_mm512_slli_epi16(h0, 4), _mm512_slli_epi16(h0, 2), h0, _mm512_srli_epi16(h0, 2)};
    const __m512i sh1[4] = {_mm512_slli_epi16(h1, 4), _mm512_slli_epi16(h1, 2), h1, _mm512_srli_epi16(h1, 2)};
    for (int i = 0; i < 4; i++) {
        const __m512i v = _mm512_loadu_si512((const void *)(blk + 64 * i));
        /* (a & c) | b: the high bits under the 0x30 mask, or the low nibble */
        u[i] = _mm512_ternarylogic_epi32(sh0[i], _mm512_and_si512(v, m4), m30, 0xEC);
        u[4 + i] = _mm512_ternarylogic_epi32(sh1[i], _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), m30, 0xEC);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit));
    s[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(unit + 32 + 32 * kk)))));
    s[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(unit + 48 + 32 * kk)))));
}

DL_INLINE DL_TARGET_AVX2 void q6k_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    (void)o;
    const uint8_t *blk = unit + 288 + 384 * kk;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    const __m256i h0 = _mm256_loadu_si256((const __m256i *)(blk + 256 + 32 * h));
    const __m256i h1 = _mm256_loadu_si256((const __m256i *)(blk + 320 + 32 * h));
    const __m256i sh0[4] = {_mm256_slli_epi16(h0, 4), _mm256_slli_epi16(h0, 2), h0, _mm256_srli_epi16(h0, 2)};
    const __m256i sh1[4] = {_mm256_slli_epi16(h1, 4), _mm256_slli_epi16(h1, 2), h1, _mm256_srli_epi16(h1, 2)};
    for (int i = 0; i < 4; i++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 64 * i + 32 * h));
        u[i] = _mm256_or_si256(_mm256_and_si256(v, m4), _mm256_and_si256(sh0[i], m30));
        u[4 + i] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), _mm256_and_si256(sh1[i], m30));
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 16 * h)));
    s[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(unit + 32 + 32 * kk + 8 * h)))));
    s[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(unit + 48 + 32 * kk + 8 * h)))));
}
#endif

#if DL_NEON
static inline void q6k_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    (void)o;
    const uint8_t *blk = unit + 288 + 384 * kk;
    const uint8x16_t m30 = vdupq_n_u8(0x30);
    const uint8x16_t h0 = vld1q_u8(blk + 256 + 16 * q), h1 = vld1q_u8(blk + 320 + 16 * q);
    const uint8x16_t sh0[4] = {vshlq_n_u8(h0, 4), vshlq_n_u8(h0, 2), h0, vshrq_n_u8(h0, 2)};
    const uint8x16_t sh1[4] = {vshlq_n_u8(h1, 4), vshlq_n_u8(h1, 2), h1, vshrq_n_u8(h1, 2)};
    for (int i = 0; i < 4; i++) {
        const uint8x16_t v = vld1q_u8(blk + 64 * i + 16 * q);
        u[i] = vreinterpretq_s8_u8(vbslq_u8(m30, sh0[i], vandq_u8(v, vdupq_n_u8(0x0F))));
        u[4 + i] = vreinterpretq_s8_u8(vbslq_u8(m30, sh1[i], vshrq_n_u8(v, 4)));
    }
    const float32x4_t d = dl_ld_f16x4(unit + 8 * q);
    s[0] = vmulq_f32(d, rx_s8x4_f32(vreinterpret_s8_u8(rx_ld4_u8(unit + 32 + 32 * kk + 4 * q))));
    s[1] = vmulq_f32(d, rx_s8x4_f32(vreinterpret_s8_u8(rx_ld4_u8(unit + 48 + 32 * kk + 4 * q))));
}
#endif

#define RX q6k
#define RX_UNIT 210
#define RX_BPU 8
#define RX_HALVES 2
#define RX_AFFINE 0
#define RX_C 32
#include "rx_engine.h"

/* ========================================================================================== */
/* Q2_K: 256-value super-blocks, a scale and a min (4 bits each) per 16 values, d and dmin (f16);
 * value = d * sc * q - dmin * m with q = 2 bits.
 * unit (16 rows, 1344 bytes): [0, 32) d of each row, [32, 64) dmin, [64, 320) the 16 scale bytes,
 * byte j of row r at 64 + 16 j + r; then per block kk at 320 + 128 kk two 64-byte chunks of codes:
 * byte 4r + m of chunk h holds, at bits 2i and 2i + 1, value 16h + 4i + m of row r (as Q6_K's high
 * bits) */

static inline int q2k_value(const uint8_t *b, int v) {   /* the 2-bit code of value v of a super-block */
    return (b[16 + 32 * (v / 128) + v % 32] >> (2 * ((v % 128) / 32))) & 3;
}

static void q2k_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r];
        memcpy(dst + 2 * r, b + 80, 2);
        memcpy(dst + 32 + 2 * r, b + 82, 2);
        for (int j = 0; j < 16; j++) dst[64 + 16 * j + r] = b[j];
        for (int kk = 0; kk < 8; kk++)
            for (int h = 0; h < 2; h++)
                for (int m = 0; m < 4; m++) {
                    uint8_t c = 0;
                    for (int i = 0; i < 4; i++) c |= (uint8_t)(q2k_value(b, 32 * kk + 16 * h + 4 * i + m) << (2 * i));
                    dst[320 + 128 * kk + 64 * h + 4 * r + m] = c;
                }
    }
}

static inline int q2k_code(const uint8_t *unit, int kk, int r, int j) {   /* value j of block kk of row r */
    return (unit[320 + 128 * kk + 64 * (j / 16) + 4 * r + j % 4] >> (2 * ((j % 16) / 4))) & 3;
}

static void q2k_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r];
        for (int j = 0; j < 16; j++) b[j] = src[64 + 16 * j + r];
        memset(b + 16, 0, 64);
        for (int v = 0; v < 256; v++)
            b[16 + 32 * (v / 128) + v % 32] |= (uint8_t)(q2k_code(src, v / 32, r, v % 32) << (2 * ((v % 128) / 32)));
        memcpy(b + 80, src + 2 * r, 2);
        memcpy(b + 82, src + 32 + 2 * r, 2);
    }
}

static inline void q2k_dec_scalar(const uint8_t *unit, int kk, int r, uint8_t *u, float *s, float *o) {
    const float d = rx_f16(unit + 2 * r), dmin = rx_f16(unit + 32 + 2 * r);
    for (int h = 0; h < 2; h++) {
        const int sc = unit[64 + 16 * (2 * kk + h) + r];
        s[h] = d * (float)(sc & 15);
        o[h] = -(dmin * (float)(sc >> 4));
    }
    for (int j = 0; j < 32; j++) u[j] = (uint8_t)q2k_code(unit, kk, r, j);
}

#if DL_X86
DL_INLINE DL_TARGET_AVX512 void q2k_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    const uint8_t *blk = unit + 320 + 128 * kk;
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        const __m512i c = _mm512_loadu_si512((const void *)(blk + 64 * h));
        u[4 * h] = _mm512_and_si512(c, m3);
        u[4 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(c, 2), m3);
        u[4 * h + 2] = _mm512_and_si512(_mm512_srli_epi16(c, 4), m3);
        u[4 * h + 3] = _mm512_and_si512(_mm512_srli_epi16(c, 6), m3);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(unit + 32)));
    const __m128i m4 = _mm_set1_epi8(15);
    for (int h = 0; h < 2; h++) {
        const __m128i sc = _mm_loadu_si128((const __m128i *)(unit + 64 + 16 * (2 * kk + h)));
        s[h] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(sc, m4))));
        o[h] = _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(_mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(sc, 4), m4))))),
            _mm512_set1_epi32((int)0x80000000u)));
    }
}

DL_INLINE DL_TARGET_AVX2 void q2k_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    const uint8_t *blk = unit + 320 + 128 * kk;
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int c2 = 0; c2 < 2; c2++) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)(blk + 64 * c2 + 32 * h));
        u[4 * c2] = _mm256_and_si256(c, m3);
        u[4 * c2 + 1] = _mm256_and_si256(_mm256_srli_epi16(c, 2), m3);
        u[4 * c2 + 2] = _mm256_and_si256(_mm256_srli_epi16(c, 4), m3);
        u[4 * c2 + 3] = _mm256_and_si256(_mm256_srli_epi16(c, 6), m3);
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 16 * h)));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 32 + 16 * h)));
    const __m128i m4 = _mm_set1_epi8(15);
    for (int j = 0; j < 2; j++) {
        const __m128i sc = _mm_loadl_epi64((const __m128i *)(unit + 64 + 16 * (2 * kk + j) + 8 * h));
        s[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(sc, m4))));
        o[j] = _mm256_xor_ps(_mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(sc, 4), m4)))),
                             _mm256_set1_ps(-0.0f));
    }
}
#endif

#if DL_NEON
static inline void q2k_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    const uint8_t *blk = unit + 320 + 128 * kk;
    const uint8x16_t m3 = vdupq_n_u8(3);
    for (int h = 0; h < 2; h++) {
        const uint8x16_t c = vld1q_u8(blk + 64 * h + 16 * q);
        u[4 * h] = vreinterpretq_s8_u8(vandq_u8(c, m3));
        u[4 * h + 1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(c, 2), m3));
        u[4 * h + 2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(c, 4), m3));
        u[4 * h + 3] = vreinterpretq_s8_u8(vshrq_n_u8(c, 6));
    }
    const float32x4_t d = dl_ld_f16x4(unit + 8 * q), dmin = dl_ld_f16x4(unit + 32 + 8 * q);
    for (int h = 0; h < 2; h++) {
        const uint8x8_t sc = rx_ld4_u8(unit + 64 + 16 * (2 * kk + h) + 4 * q);
        s[h] = vmulq_f32(d, rx_u8x4_f32(vand_u8(sc, vdup_n_u8(15))));
        o[h] = vnegq_f32(vmulq_f32(dmin, rx_u8x4_f32(vshr_n_u8(sc, 4))));
    }
}
#endif

#define RX q2k
#define RX_UNIT 84
#define RX_BPU 8
#define RX_HALVES 2
#define RX_AFFINE 1
#define RX_C 0
#include "rx_engine.h"

/* ========================================================================================== */
/* IQ4_NL and IQ4_XS: 4-bit indices into a 16-entry codebook of int8 values (ggml's kvalues_iq4nl),
 * value = scale * book[q]. Their codes are the book's values (RX_SIGNED): a table lookup of the
 * nibbles (pshufb / tbl), which on AVX-512 gives the values plus 128 (rx_engine.h). */

static const int8_t RX_IQ4_BOOK[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static inline void rx_iq4_codes(int8_t *u, const uint8_t *codes, int r) {
    uint8_t v[32];
    rx_get_nibbles(v, codes, r);
    for (int j = 0; j < 32; j++) u[j] = RX_IQ4_BOOK[v[j]];
}

#if DL_X86
static const uint8_t RX_IQ4_BOOK_U[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};   /* + 128 */

DL_INLINE DL_TARGET_AVX512 void rx_iq4_avx512(const uint8_t *codes, __m512i *u) {
    const __m512i book = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)RX_IQ4_BOOK_U));
    rx_nibbles_avx512(codes, u);
    for (int i = 0; i < 8; i++) u[i] = _mm512_shuffle_epi8(book, u[i]);
}

DL_INLINE DL_TARGET_AVX2 void rx_iq4_avx2(const uint8_t *codes, int h, __m256i *u) {
    const __m256i book = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)RX_IQ4_BOOK));
    rx_nibbles_avx2(codes, h, u);
    for (int i = 0; i < 8; i++) u[i] = _mm256_shuffle_epi8(book, u[i]);
}
#endif

#if DL_NEON
static inline void rx_iq4_neon(const uint8_t *codes, int q, int8x16_t *u) {
    const int8x16_t book = vld1q_s8(RX_IQ4_BOOK);
    rx_nibbles_neon(codes, q, u);
    for (int i = 0; i < 8; i++) u[i] = vqtbl1q_s8(book, vreinterpretq_u8_s8(u[i]));
}
#endif

/* IQ4_NL: 32 values, d (f16), then the nibbles as Q4_0's.
 * unit (16 rows, 288 bytes): [0, 32) d of each row, [32, 288) codes */

static void iq4nl_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r];
        uint8_t v[32];
        memcpy(dst + 2 * r, b, 2);
        for (int j = 0; j < 16; j++) {
            v[j] = b[2 + j] & 15;
            v[j + 16] = b[2 + j] >> 4;
        }
        rx_put_nibbles(dst + 32, r, v);
    }
}

static void iq4nl_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r], v[32];
        memcpy(b, src + 2 * r, 2);
        rx_get_nibbles(v, src + 32, r);
        for (int j = 0; j < 16; j++) b[2 + j] = (uint8_t)(v[j] | v[j + 16] << 4);
    }
}

static inline void iq4nl_dec_scalar(const uint8_t *unit, int kk, int r, int8_t *u, float *s, float *o) {
    (void)kk;
    (void)o;
    s[0] = rx_f16(unit + 2 * r);
    rx_iq4_codes(u, unit + 32, r);
}

#if DL_X86
DL_INLINE DL_TARGET_AVX512 void iq4nl_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    (void)kk;
    (void)o;
    rx_iq4_avx512(unit + 32, u);
    s[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit));
}

DL_INLINE DL_TARGET_AVX2 void iq4nl_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    (void)kk;
    (void)o;
    rx_iq4_avx2(unit + 32, h, u);
    s[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 16 * h)));
}
#endif

#if DL_NEON
static inline void iq4nl_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    (void)kk;
    (void)o;
    rx_iq4_neon(unit + 32, q, u);
    s[0] = dl_ld_f16x4(unit + 8 * q);
}
#endif

#define RX iq4nl
#define RX_UNIT 18
#define RX_BPU 1
#define RX_HALVES 1
#define RX_AFFINE 0
#define RX_C 0
#define RX_SIGNED 1
#include "rx_engine.h"

/* IQ4_XS: 256-value super-blocks, d (f16) and a 6-bit scale ls per 32 values (the low 4 bits in
 * scales_l[4], nibble kk; the high 2 in the u16 scales_h, bits 2 kk and 2 kk + 1); value =
 * d * (ls - 32) * book[q], block kk's nibbles laid out as IQ4_NL's.
 * unit (16 rows, 2176 bytes): [0, 32) d of each row, [32, 64) scales_h, byte b of row r at
 * 32 + 16 b + r; [64, 128) scales_l, byte b of row r at 64 + 16 b + r; [128 + 256 kk, ...) the
 * codes of block kk */

static void iq4xs_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r];
        memcpy(dst + 2 * r, b, 2);
        for (int k = 0; k < 6; k++) dst[32 + 16 * k + r] = b[2 + k];   /* scales_h, then scales_l */
        for (int kk = 0; kk < 8; kk++) {
            uint8_t v[32];
            for (int j = 0; j < 16; j++) {
                v[j] = b[8 + 16 * kk + j] & 15;
                v[j + 16] = b[8 + 16 * kk + j] >> 4;
            }
            rx_put_nibbles(dst + 128 + 256 * kk, r, v);
        }
    }
}

static void iq4xs_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r];
        memcpy(b, src + 2 * r, 2);
        for (int k = 0; k < 6; k++) b[2 + k] = src[32 + 16 * k + r];
        for (int kk = 0; kk < 8; kk++) {
            uint8_t v[32];
            rx_get_nibbles(v, src + 128 + 256 * kk, r);
            for (int j = 0; j < 16; j++) b[8 + 16 * kk + j] = (uint8_t)(v[j] | v[j + 16] << 4);
        }
    }
}

static inline void iq4xs_dec_scalar(const uint8_t *unit, int kk, int r, int8_t *u, float *s, float *o) {
    (void)o;
    const int lo = (unit[64 + 16 * (kk / 2) + r] >> (4 * (kk % 2))) & 15;
    const int hi = (unit[32 + 16 * (kk / 4) + r] >> (2 * (kk % 4))) & 3;
    s[0] = rx_f16(unit + 2 * r) * (float)((lo | hi << 4) - 32);
    rx_iq4_codes(u, unit + 128 + 256 * kk, r);
}

#if DL_X86
/* the 6-bit scales of block kk, as bytes, from 16-byte loads of the rows' scales_l / scales_h byte
 * (16-bit shifts: what crosses a byte is masked off) */
#define IQ4XS_LS(lo, hi) _mm_or_si128(_mm_and_si128(_mm_srl_epi16(lo, _mm_cvtsi32_si128(4 * (kk % 2))), _mm_set1_epi8(15)), \
                                      _mm_slli_epi16(_mm_and_si128(_mm_srl_epi16(hi, _mm_cvtsi32_si128(2 * (kk % 4))), _mm_set1_epi8(3)), 4))

DL_INLINE DL_TARGET_AVX512 void iq4xs_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    (void)o;
    const __m128i ls = IQ4XS_LS(_mm_loadu_si128((const __m128i *)(unit + 64 + 16 * (kk / 2))),
                                _mm_loadu_si128((const __m128i *)(unit + 32 + 16 * (kk / 4))));
    const __m512i sc = _mm512_sub_epi32(_mm512_cvtepu8_epi32(ls), _mm512_set1_epi32(32));
    s[0] = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit)), _mm512_cvtepi32_ps(sc));
    rx_iq4_avx512(unit + 128 + 256 * kk, u);
}

DL_INLINE DL_TARGET_AVX2 void iq4xs_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    (void)o;
    const __m128i ls = IQ4XS_LS(_mm_loadl_epi64((const __m128i *)(unit + 64 + 16 * (kk / 2) + 8 * h)),
                                _mm_loadl_epi64((const __m128i *)(unit + 32 + 16 * (kk / 4) + 8 * h)));
    const __m256i sc = _mm256_sub_epi32(_mm256_cvtepu8_epi32(ls), _mm256_set1_epi32(32));
    s[0] = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 16 * h))), _mm256_cvtepi32_ps(sc));
    rx_iq4_avx2(unit + 128 + 256 * kk, h, u);
}
#undef IQ4XS_LS
#endif

#if DL_NEON
static inline void iq4xs_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    (void)o;
    const uint8x8_t lo = vand_u8(vshl_u8(rx_ld4_u8(unit + 64 + 16 * (kk / 2) + 4 * q), vdup_n_s8((int8_t)(-4 * (kk % 2)))), vdup_n_u8(15));
    const uint8x8_t hi = vand_u8(vshl_u8(rx_ld4_u8(unit + 32 + 16 * (kk / 4) + 4 * q), vdup_n_s8((int8_t)(-2 * (kk % 4)))), vdup_n_u8(3));
    const int32x4_t ls = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vorr_u8(lo, vshl_n_u8(hi, 4))))));
    s[0] = vmulq_f32(dl_ld_f16x4(unit + 8 * q), vcvtq_f32_s32(vsubq_s32(ls, vdupq_n_s32(32))));
    rx_iq4_neon(unit + 128 + 256 * kk, q, u);
}
#endif

#define RX iq4xs
#define RX_UNIT 136
#define RX_BPU 8
#define RX_HALVES 1
#define RX_AFFINE 0
#define RX_C 0
#define RX_SIGNED 1
#include "rx_engine.h"

/* Q3_K: 256-value super-blocks, d (f16) and a 6-bit scale per 16 values (12 bytes: low 4 bits of
 * scale j in byte j % 8 at bit 4 (j / 8), high 2 in byte 8 + j % 4 at bit 2 (j / 4)); value =
 * d * (sc - 32) * (q - 4), q = 2 low bits (qs) | the hmask bit << 2.
 * unit (16 rows, 1760 bytes): [0, 32) d of each row, [32, 224) the 12 scale bytes, byte b of row r
 * at 32 + 16 b + r; then per block kk at 224 + 192 kk the 3-bit codes in three 64-byte chunks A, B,
 * C: byte 4r + m of each holds those of byte 4r + m of the code vectors u[0..7] (value 16h + 4i + m
 * of row r in u[4h + i]) whole where they fit, u[7] split:
 *   A = u0 | u1 << 3 | (u6 & 3) << 6,  B = u2 | u3 << 3 | (u7 & 3) << 6,
 *   C = u4 | u5 << 3 | (u6 >> 2) << 6 | (u7 >> 2) << 7,
 * so six vectors take an and (and a shift), the last two four operations: 20 per block on AVX-512
 * where a plane of high bits beside 2-bit chunks took 30 */

static inline void rx_put_q3(uint8_t *blk, int r, const uint8_t *v) {
    for (int j = 0; j < 32; j++) {
        const int b = 4 * (j / 16) + (j % 16) / 4, at = 4 * r + j % 4;
        if (b < 6) {
            blk[64 * (b / 2) + at] |= (uint8_t)(v[j] << (3 * (b % 2)));
        } else {
            blk[64 * (b - 6) + at] |= (uint8_t)((v[j] & 3) << 6);
            blk[128 + at] |= (uint8_t)((v[j] >> 2) << b);
        }
    }
}

static inline void rx_get_q3(uint8_t *v, const uint8_t *blk, int r) {
    for (int j = 0; j < 32; j++) {
        const int b = 4 * (j / 16) + (j % 16) / 4, at = 4 * r + j % 4;
        if (b < 6)
            v[j] = (blk[64 * (b / 2) + at] >> (3 * (b % 2))) & 7;
        else
            v[j] = (uint8_t)((blk[64 * (b - 6) + at] >> 6) | ((blk[128 + at] >> b) & 1) << 2);
    }
}

static void q3k_repack_unit(uint8_t *dst, const uint8_t *const *src, int valid) {
    for (int r = 0; r < valid; r++) {
        const uint8_t *b = src[r], *hm = b, *qs = b + 32;
        memcpy(dst + 2 * r, b + 108, 2);
        for (int k = 0; k < 12; k++) dst[32 + 16 * k + r] = b[96 + k];
        for (int kk = 0; kk < 8; kk++) {
            uint8_t v[32];
            for (int l = 0; l < 32; l++)
                v[l] = (uint8_t)(((qs[32 * (kk / 4) + l] >> (2 * (kk % 4))) & 3) | ((hm[l] >> kk) & 1) << 2);
            rx_put_q3(dst + 224 + 192 * kk, r, v);
        }
    }
}

static void q3k_unpack_unit(uint8_t *const *dst, const uint8_t *src, int valid) {
    for (int r = 0; r < valid; r++) {
        uint8_t *b = dst[r], *hm = b, *qs = b + 32;
        memset(b, 0, 96);
        memcpy(b + 108, src + 2 * r, 2);
        for (int k = 0; k < 12; k++) b[96 + k] = src[32 + 16 * k + r];
        for (int kk = 0; kk < 8; kk++) {
            uint8_t v[32];
            rx_get_q3(v, src + 224 + 192 * kk, r);
            for (int l = 0; l < 32; l++) {
                qs[32 * (kk / 4) + l] |= (uint8_t)((v[l] & 3) << (2 * (kk % 4)));
                hm[l] |= (uint8_t)((v[l] >> 2) << kk);
            }
        }
    }
}

static inline void q3k_dec_scalar(const uint8_t *unit, int kk, int r, uint8_t *u, float *s, float *o) {
    (void)o;
    const uint8_t *sb = unit + 32 + r;   /* scale byte k at sb[16 k] */
    const float d = rx_f16(unit + 2 * r);
    for (int hh = 0; hh < 2; hh++) {   /* the scale of values 16 hh.. of the block: sub-block 2 kk + hh */
        const int j = 2 * kk + hh;
        const int lo = (sb[16 * (j % 8)] >> (4 * (kk / 4))) & 15, hi = (sb[16 * (8 + j % 4)] >> (2 * (kk / 2))) & 3;
        s[hh] = d * (float)((lo | hi << 4) - 32);
    }
    rx_get_q3(u, unit + 224 + 192 * kk, r);
}

#if DL_X86
/* block kk's two scales (sc - 32, int8) of 16 rows (AVX-512) or 8 (AVX2: the low 8 bytes), from
 * the scale bytes at sb (byte k of a row at sb + 16 k) */
DL_INLINE DL_TARGET_AVX2 void q3k_scales_x86(const uint8_t *sb, int kk, __m128i *sc) {
    const __m128i ls = _mm_cvtsi32_si128(4 * (kk / 4)), hs = _mm_cvtsi32_si128(2 * (kk / 2));
    for (int hh = 0; hh < 2; hh++) {
        const int j = 2 * kk + hh;
        const __m128i bl = _mm_loadu_si128((const __m128i *)(sb + 16 * (j % 8)));
        const __m128i bh = _mm_loadu_si128((const __m128i *)(sb + 16 * (8 + j % 4)));
        const __m128i lo = _mm_and_si128(_mm_srl_epi16(bl, ls), _mm_set1_epi8(15));
        const __m128i hi = _mm_and_si128(_mm_srl_epi16(bh, hs), _mm_set1_epi8(3));
        sc[hh] = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32));
    }
}

DL_INLINE DL_TARGET_AVX512 void q3k_dec_avx512(const uint8_t *unit, int kk, __m512i *u, __m512 *s, __m512 *o) {
    (void)o;
    const uint8_t *blk = unit + 224 + 192 * kk;
    const __m512i m7 = _mm512_set1_epi8(7), m3 = _mm512_set1_epi8(3), m4 = _mm512_set1_epi8(4);
    const __m512i a = _mm512_loadu_si512((const void *)blk), b = _mm512_loadu_si512((const void *)(blk + 64));
    const __m512i c = _mm512_loadu_si512((const void *)(blk + 128));
    u[0] = _mm512_and_si512(a, m7);
    u[1] = _mm512_and_si512(_mm512_srli_epi16(a, 3), m7);
    u[2] = _mm512_and_si512(b, m7);
    u[3] = _mm512_and_si512(_mm512_srli_epi16(b, 3), m7);
    u[4] = _mm512_and_si512(c, m7);
    u[5] = _mm512_and_si512(_mm512_srli_epi16(c, 3), m7);
    /* u6, u7: the low 2 bits, plus 4 under C's bit 6 / 7 as a mask (no third shift on port 0) */
    const __m512i l6 = _mm512_and_si512(_mm512_srli_epi16(a, 6), m3), l7 = _mm512_and_si512(_mm512_srli_epi16(b, 6), m3);
    u[6] = _mm512_mask_add_epi8(l6, _mm512_test_epi8_mask(c, _mm512_set1_epi8(0x40)), l6, m4);
    u[7] = _mm512_mask_add_epi8(l7, _mm512_test_epi8_mask(c, _mm512_set1_epi8((char)0x80)), l7, m4);
    __m128i sc[2];
    q3k_scales_x86(unit + 32, kk, sc);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit));
    s[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc[0])));
    s[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc[1])));
}

DL_INLINE DL_TARGET_AVX2 void q3k_dec_avx2(const uint8_t *unit, int kk, int h, __m256i *u, __m256 *s, __m256 *o) {
    (void)o;
    const uint8_t *blk = unit + 224 + 192 * kk + 32 * h;
    const __m256i m7 = _mm256_set1_epi8(7), m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
    const __m256i a = _mm256_loadu_si256((const __m256i *)blk), b = _mm256_loadu_si256((const __m256i *)(blk + 64));
    const __m256i c = _mm256_loadu_si256((const __m256i *)(blk + 128));
    u[0] = _mm256_and_si256(a, m7);
    u[1] = _mm256_and_si256(_mm256_srli_epi16(a, 3), m7);
    u[2] = _mm256_and_si256(b, m7);
    u[3] = _mm256_and_si256(_mm256_srli_epi16(b, 3), m7);
    u[4] = _mm256_and_si256(c, m7);
    u[5] = _mm256_and_si256(_mm256_srli_epi16(c, 3), m7);
    u[6] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 6), m3), _mm256_and_si256(_mm256_srli_epi16(c, 4), m4));
    u[7] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 6), m3), _mm256_and_si256(_mm256_srli_epi16(c, 5), m4));
    __m128i sc[2];
    q3k_scales_x86(unit + 32 + 8 * h, kk, sc);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(unit + 16 * h)));
    s[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc[0])));
    s[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc[1])));
}
#endif

#if DL_NEON
static inline void q3k_dec_neon(const uint8_t *unit, int kk, int q, int8x16_t *u, float32x4_t *s, float32x4_t *o) {
    (void)o;
    const uint8_t *blk = unit + 224 + 192 * kk + 16 * q;
    const uint8x16_t m7 = vdupq_n_u8(7), m4 = vdupq_n_u8(4);
    const uint8x16_t a = vld1q_u8(blk), b = vld1q_u8(blk + 64), c = vld1q_u8(blk + 128);
    const uint8x16_t v[8] = {vandq_u8(a, m7), vandq_u8(vshrq_n_u8(a, 3), m7), vandq_u8(b, m7), vandq_u8(vshrq_n_u8(b, 3), m7),
                             vandq_u8(c, m7), vandq_u8(vshrq_n_u8(c, 3), m7),
                             vbslq_u8(m4, vshrq_n_u8(c, 4), vshrq_n_u8(a, 6)), vbslq_u8(m4, vshrq_n_u8(c, 5), vshrq_n_u8(b, 6))};
    for (int i = 0; i < 8; i++) u[i] = vreinterpretq_s8_u8(v[i]);
    const int8x8_t ls = vdup_n_s8((int8_t)(-4 * (kk / 4))), hs = vdup_n_s8((int8_t)(-2 * (kk / 2)));
    const float32x4_t d = dl_ld_f16x4(unit + 8 * q);
    for (int hh = 0; hh < 2; hh++) {
        const int j = 2 * kk + hh;
        const uint8x8_t lo = vand_u8(vshl_u8(rx_ld4_u8(unit + 32 + 16 * (j % 8) + 4 * q), ls), vdup_n_u8(15));
        const uint8x8_t hi = vand_u8(vshl_u8(rx_ld4_u8(unit + 32 + 16 * (8 + j % 4) + 4 * q), hs), vdup_n_u8(3));
        const int8x8_t sc = vsub_s8(vreinterpret_s8_u8(vorr_u8(lo, vshl_n_u8(hi, 4))), vdup_n_s8(32));
        s[hh] = vmulq_f32(d, rx_s8x4_f32(sc));
    }
}
#endif

#define RX q3k
#define RX_UNIT 110
#define RX_BPU 8
#define RX_HALVES 2
#define RX_AFFINE 0
#define RX_C 4
#include "rx_engine.h"
