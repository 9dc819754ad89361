/* Internal declarations shared by the kernel files (not part of the cffi API). */
#ifndef DL_INTERNAL_H
#define DL_INTERNAL_H
#include "dllama.h"
#include <stdint.h>
#include <stddef.h>

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#define DL_X86 1
#define DL_TARGET_AVX2   __attribute__((target("avx2,fma,f16c")))
#define DL_TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#else
#define DL_X86 0
#endif
#if defined(__aarch64__)
#define DL_NEON 1
/* sdot (ARMv8.2 dotprod) on functions only: the rest of the build stays ARMv8.0. GCC's arm_neon.h
 * declares the intrinsics for any function with the target attribute; clang before 17 only when
 * the whole file is built for dotprod (then the paths are left out unless -march enables it). */
#if defined(__ARM_FEATURE_DOTPROD) || !defined(__clang__) || __clang_major__ >= 17
#define DL_HAVE_DOTPROD 1
#else
#define DL_HAVE_DOTPROD 0
#endif
#if defined(__clang__)
#define DL_TARGET_DOTPROD __attribute__((target("dotprod")))
#else
#define DL_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#else
#define DL_NEON 0
#endif

#define DL_INLINE static inline __attribute__((always_inline))

/* ---- thread pool ---- */
typedef void (*dl_range_fn)(void *ctx, int64_t start, int64_t end);
/* Splits [0, n) into one contiguous chunk per thread (chunk boundaries multiples of `align`,
 * align >= 1) and runs fn on each; returns when all chunks are done. */
void dl_parallel_for(int64_t n, int64_t align, dl_range_fn fn, void *ctx);
void dl_parallel_for_guided(int64_t n, int64_t align, dl_range_fn fn, void *ctx);

/* ---- per-call scratch on the calling thread (grows, never shrinks) ---- */
void *dl_scratch(size_t bytes);

/* ---- f16 helpers ---- */
float    dl_f16_to_f32_scalar(uint16_t h);
uint16_t dl_f32_to_f16_scalar(float f);

/* ---- kernels per ISA: the dispatch table ---- */
typedef struct {
    void (*quantize_q80)(dl_block_q80 *y, const float *x, int64_t n);
    /* prepared-x q40 x q80 matmul on a row range (see matmul.c) */
    void (*matmul_q40_q80_rows)(float *out, const dl_block_q40 *w, const dl_block_q80 *x,
                                const void *xprep, int r0, int r1, int rows, int cols, int batch);
    int needs_xprep;   /* 1: matmul_q40_q80_rows reads xprep (dl_xprep), else x */
    void (*matmul_f32_rows)(float *out, const float *w, const float *x,
                            int r0, int r1, int rows, int cols, int batch);
    void (*rmsnorm)(float *out, const float *x, const float *w, int n, float eps);
    void (*silu_mul)(float *out, const float *gate, const float *up, int64_t n);
    void (*add)(float *out, const float *a, int64_t n);
    void (*add_q80)(float *out, const dl_block_q80 *parts, int nparts, int64_t n);
    float (*dot)(const float *a, const float *b, int n);
    void (*axpy)(float *y, float a, const float *x, int n);      /* y += a * x */
    void (*gelu_mul)(float *out, const float *gate, const float *up, int64_t n);   /* Gemma's GeGLU */
    void (*scale)(float *x, float s, int64_t n);                 /* x *= s */
    /* q80 x q80 on a row range (matmul_q80.c); reads xprep when needs_xprep, like the q40 one */
    void (*matmul_q80_q80_rows)(float *out, const dl_block_q80 *w, const dl_block_q80 *x,
                                const void *xprep, int r0, int r1, int rows, int cols, int batch);
    void (*matmul_f16_rows)(float *out, const uint16_t *w, const float *x,
                            int r0, int r1, int rows, int cols, int batch);   /* matmul_f16.c */
    void (*softmax)(float *x, int n);                            /* the same bits on every path */
    /* the attention's: dot / axpy over n rows at `stride` floats, bits of dot / axpy row by row (ops.c) */
    void (*dot_rows)(float *out, const float *q, const float *rows, size_t stride, int n, int hd);
    void (*axpy_rows)(float *y, const float *a, const float *rows, size_t stride, int n, int hd);
    /* the same for two queries over the same rows at once, each with the bits of the one-query
     * kernels (NULL: call those twice); the grouped attention pairs the query heads of a row */
    void (*dot_rows2)(float *out0, float *out1, const float *q0, const float *q1, const float *rows,
                      size_t stride, int n, int hd);
    void (*axpy_rows2)(float *y0, float *y1, const float *a0, const float *a1, const float *rows,
                       size_t stride, int n, int hd);
    /* the sampler's exact weights M * 2^(E - 40) of c logits (logits.c), the same bits on every path */
    void (*sample_me_chunk)(double *m, double *e, const float *x, int c, float inv_t, double lo);
    /* the first index of x's largest value (a NaN counts as the largest), n >= 1 (logits.c) */
    int (*argmax_f32)(const float *x, int n);
} dl_kernels;

extern dl_kernels dl_k;      /* the active table */
extern int dl_isa_active;

/* Tables per ISA (defined in dispatch.c from the per-family functions). */
void dl_fill_table(dl_kernels *k, int isa);

/* Preparation of q80 activations for the matmul kernels (x86 paths of matmul.c, matmul_q80.c).
 * Per batch row: the int8 values of all blocks back to back, per block 8 int32 corrections
 * -8 * (sum of each group of 4 values), per block f32(d); row stride rounded up to 64 bytes. */
size_t dl_xprep_bytes(int cols, int batch);
void   dl_xprep(void *dst, const dl_block_q80 *x, int cols, int batch);
static inline size_t xprep_stride(int cols) {
    size_t nb = (size_t)cols / DL_QK;
    size_t s = (size_t)cols + nb * 32 + nb * 4;
    return (s + 63) & ~(size_t)63;
}
#define XP_QS(base, cols, b)   ((const int8_t *)((const uint8_t *)(base) + (size_t)(b) * xprep_stride(cols)))
#define XP_CORR(base, cols, b) ((const int32_t *)((const uint8_t *)(base) + (size_t)(b) * xprep_stride(cols) + (size_t)(cols)))
#define XP_DX(base, cols, b)   ((const float *)((const uint8_t *)(base) + (size_t)(b) * xprep_stride(cols) + (size_t)(cols) + (size_t)(cols) / DL_QK * 32))

/* Rows per tile of an f32 / f16 matvec (batch 1) on x86. A tile of R rows reads R streams side by
 * side; when a row is shorter than a 4 KiB page but the tile spans more than 1 KiB, those streams
 * interleave inside one page and the hardware prefetcher loses them. On the Zen 4 VM of the README,
 * f16 4-row tiles read 8-12 GB/s at 256-1536 columns (Gemma 3's 640-column output matrix: 9 GB/s),
 * one row at a time 20-23 GB/s, and f32 the same between 128 and 1024 columns; at longer and
 * shorter rows the 4-row tile is as fast or faster. Each output is summed in the same order
 * whatever the tile, so the choice changes no bits. */
DL_INLINE int dl_matvec_tile_rows(size_t row_bytes) { return row_bytes > 256 && row_bytes < 4096 ? 1 : 4; }

/* The run-time tile-size switch of the matmul kernels: fn(args..., R, B) for R, B in 1..4, so that
 * each combination is compiled with constant bounds (registers, unrolled loops). */
#define DL_TILE_SWITCH(fn, R, B, ...) do { \
    switch ((R) * 8 + (B)) { \
    case 1 * 8 + 1: fn(__VA_ARGS__, 1, 1); break; case 1 * 8 + 2: fn(__VA_ARGS__, 1, 2); break; \
    case 1 * 8 + 3: fn(__VA_ARGS__, 1, 3); break; case 1 * 8 + 4: fn(__VA_ARGS__, 1, 4); break; \
    case 2 * 8 + 1: fn(__VA_ARGS__, 2, 1); break; case 2 * 8 + 2: fn(__VA_ARGS__, 2, 2); break; \
    case 2 * 8 + 3: fn(__VA_ARGS__, 2, 3); break; case 2 * 8 + 4: fn(__VA_ARGS__, 2, 4); break; \
    case 3 * 8 + 1: fn(__VA_ARGS__, 3, 1); break; case 3 * 8 + 2: fn(__VA_ARGS__, 3, 2); break; \
    case 3 * 8 + 3: fn(__VA_ARGS__, 3, 3); break; case 3 * 8 + 4: fn(__VA_ARGS__, 3, 4); break; \
    case 4 * 8 + 1: fn(__VA_ARGS__, 4, 1); break; case 4 * 8 + 2: fn(__VA_ARGS__, 4, 2); break; \
    case 4 * 8 + 3: fn(__VA_ARGS__, 4, 3); break; case 4 * 8 + 4: fn(__VA_ARGS__, 4, 4); break; \
    } } while (0)

/* The 16-row interleaved layouts (q40r: kernels/repack.c, q80r: kernels/matmul_q80.c): a group of
 * 16 rows holds its blocks in pairs, pair j = [64 bytes: block 2j's 16 f16 scales, then block
 * 2j+1's][bb bytes of block 2j's codes][bb bytes of block 2j+1's] (bb = 256 for q40r, 512 for
 * q80r; an odd last block leaves its pair's second half zero). Scales inline with the codes
 * make each group, and a run of groups, one sequential stream: with all scales in a region
 * ahead of the codes (the earlier layout), every group started two streams that the hardware
 * prefetcher had to pick up again, and a 2048-column matvec read 14 GB/s where 2048 x 8192
 * read 21 (one Zen 4 core, 2026-12-02; a read-only replay of the access order: 11-16 vs 20-24). */
static inline size_t dl_r16_pair(size_t bb) { return 64 + 2 * bb; }
static inline size_t dl_r16_stride(int nb, size_t bb) { return (size_t)((nb + 1) / 2) * dl_r16_pair(bb); }
static inline size_t dl_r16_scales(int k, size_t bb) { return (size_t)(k >> 1) * dl_r16_pair(bb) + (size_t)(k & 1) * 32; }
static inline size_t dl_r16_codes(int k, size_t bb) { return (size_t)(k >> 1) * dl_r16_pair(bb) + 64 + (size_t)(k & 1) * bb; }

/* One parallel job over the groups of n repacked matrices that multiply the same x (q, k and v;
 * gate and up; more than DL_R16_MAX_N run as several jobs), handed out guided or static
 * (kernels/repack.c). `scalar` / `simd` compute groups [g0, g1) of one matrix; with `simd` set, x
 * is first prepared into a scratch buffer of xp_bytes by `prep` and `simd` runs instead of `scalar`
 * (scratch out of memory: the scalar reference). */
#define DL_R16_MAX_N 4
typedef void (*dl_r16_group_fn)(float *, const uint8_t *, const dl_block_q80 *, const uint8_t *, int, int, int,
                                int, int);
typedef void (*dl_r16_prep_fn)(uint8_t *, const dl_block_q80 *, int, int);

/* The q40r and q80r kernels' prepared activations: per batch row the int8 values of all blocks back
 * to back, then per block {int32 bias * sum(q), float d}, bias minus the weights' code offset (q40r
 * -8: codes 0..15 for -8..7; q80r -128: codes q ^ 0x80); each row's stride rounded up to 64 bytes. */
static inline size_t dl_r16_xstride(int cols) { return ((size_t)cols + (size_t)(cols / DL_QK) * 8 + 63) & ~(size_t)63; }
void dl_r16_xprep(uint8_t *dst, const dl_block_q80 *x, int cols, int batch, int32_t bias);
void dl_r16_matmul_n(int n, float *const *out, const void *const *w, const int *rows, const dl_block_q80 *x,
                     int cols, int batch, dl_r16_group_fn scalar, dl_r16_group_fn simd, dl_r16_prep_fn prep,
                     size_t xp_bytes, int guided);

static inline uint16_t dl_ld16(const void *p) { uint16_t v; __builtin_memcpy(&v, p, 2); return v; }
static inline int32_t dl_ld32(const void *p) { int32_t v; __builtin_memcpy(&v, p, 4); return v; }

#if DL_X86
#include <immintrin.h>
/* horizontal sum of 8 floats (the AVX2 tiles of matmul_q80.c / matmul_f16.c) */
DL_INLINE DL_TARGET_AVX2 float dl_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* a 16-row group's outputs from its two 8-row halves' accumulators: the first `valid` (<= 16) */
DL_INLINE DL_TARGET_AVX2 void dl_store16(float *o, __m256 a0, __m256 a1, int valid) {
    if (valid >= 16) {
        _mm256_storeu_ps(o, a0);
        _mm256_storeu_ps(o + 8, a1);
    } else {
        float tmp[16];
        _mm256_storeu_ps(tmp, a0);
        _mm256_storeu_ps(tmp + 8, a1);
        for (int r = 0; r < valid; r++) o[r] = tmp[r];
    }
}

/* the AVX2 batched kernels' results for one 8-row half of a group: acc[j] holds outputs row0..row0+7
 * of batch row b0 + j (out is batch x rows); only the first `valid` when the matrix ends inside */
DL_INLINE DL_TARGET_AVX2 void dl_store_half8(float *out, int rows, int row0, int b0, int B, int valid,
                                             const __m256 *acc) {
    for (int j = 0; j < B; j++) {
        float *o = out + (size_t)(b0 + j) * rows + row0;
        if (valid >= 8) {
            _mm256_storeu_ps(o, acc[j]);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, acc[j]);
            for (int r = 0; r < valid; r++) o[r] = tmp[r];
        }
    }
}

/* software prefetch of the cache lines of [p, p + bytes) (dl_weights_prefetch's kernels: a block's
 * share of its group, that distance ahead) */
DL_INLINE void dl_prefetch_span(const void *p, size_t bytes) {
    for (size_t l = 0; l < bytes; l += 64) _mm_prefetch((const char *)p + l, _MM_HINT_T0);
}

/* the AVX-512 lane mask of the first `left` of 16 lanes (all 16 when left >= 16) */
static inline __mmask16 dl_tailmask16(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}
#endif

#if DL_NEON
#include <arm_neon.h>
#include <string.h>
/* NEON pieces of the 16-row repacked layouts, q40r (repack.c) and q80r (matmul_q80.c). Both keep,
 * per group of 16 rows, round_up(32 * nb, 64) bytes of scales (block k: the 16 rows' f16 at
 * 32 * k) then BLOCK_BYTES per block of values in 64-byte runs of 16 rows x 4 bytes, so a 16-byte
 * load at 64 * i + 16 * q holds quad q (rows 4q..4q+3) x 4 bytes. Prepared activations (both files
 * prepare them the same way): per batch row the int8 values of all blocks, then per block
 * {int32 correction, float d}, stride round_up(cols + 8 * nb, 64). */
static inline float32x4_t dl_ld_f16x4(const uint8_t *p) {   /* 4 f16 scales -> f32 (exact) */
    uint16_t h[4];
    memcpy(h, p, 8);
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

static inline void dl_store4_neon(float *o, float32x4_t v, int valid) {
    if (valid >= 4) {
        vst1q_f32(o, v);
    } else {
        float tmp[4];
        vst1q_f32(tmp, v);
        for (int r = 0; r < valid; r++) o[r] = tmp[r];
    }
}

/* The group loop, written once for every integer dot: QUAD(p, q, xq, corr) gives quad q's 4 exact
 * int32 dots with one block of x (values at xq, the block's correction corr). Per output the float
 * operations are the scalar references' (cvt, dw * dx, multiply, add, blocks in order: no FMA), so
 * results are bit-identical to them, matvec or batched, whatever the thread count.
 * Matvec: one group per pass, all 4 quads per block (one sequential stream). Batched: quad q of
 * one group x up to 8 batch rows per pass (the group's values re-read from cache per quad).
 * Expects out, w, x, xp, g0, g1, rows, cols, batch in scope. */
#define DL_R16_NEON_GROUPS(QUAD, BLOCK_BYTES) do { \
    (void)x; \
    const int nb = cols / DL_QK; \
    const size_t gs = dl_r16_stride(nb, (BLOCK_BYTES)); \
    const size_t xs = ((size_t)cols + (size_t)nb * 8 + 63) & ~(size_t)63; \
    for (int g = g0; g < g1; g++) { \
        const uint8_t *wg = w + (size_t)g * gs; \
        const int row0 = g * 16; \
        if (batch == 1) { \
            const int32_t *cd = (const int32_t *)(xp + cols); \
            float32x4_t sum[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; \
            for (int k = 0; k < nb; k++) { \
                const uint8_t *p = wg + dl_r16_codes(k, (BLOCK_BYTES)); \
                float dx; \
                memcpy(&dx, cd + 2 * k + 1, 4); \
                for (int q = 0; q < 4; q++) { \
                    const int32x4_t d = QUAD(p, q, xp + (size_t)k * DL_QK, cd[2 * k]); \
                    const float32x4_t s = vmulq_n_f32(dl_ld_f16x4(wg + dl_r16_scales(k, (BLOCK_BYTES)) + 8 * q), dx); \
                    sum[q] = vaddq_f32(sum[q], vmulq_f32(vcvtq_f32_s32(d), s)); \
                } \
            } \
            for (int q = 0; q < 4; q++) dl_store4_neon(out + row0 + 4 * q, sum[q], rows - row0 - 4 * q); \
            continue; \
        } \
        for (int b0 = 0; b0 < batch; b0 += 8) { \
            const int B = batch - b0 < 8 ? batch - b0 : 8; \
            for (int q = 0; q < 4 && row0 + 4 * q < rows; q++) { \
                float32x4_t sum[8]; \
                for (int j = 0; j < B; j++) sum[j] = vdupq_n_f32(0.0f); \
                for (int k = 0; k < nb; k++) { \
                    const uint8_t *p = wg + dl_r16_codes(k, (BLOCK_BYTES)); \
                    const float32x4_t dw = dl_ld_f16x4(wg + dl_r16_scales(k, (BLOCK_BYTES)) + 8 * q); \
                    for (int j = 0; j < B; j++) { \
                        const uint8_t *xb = xp + (size_t)(b0 + j) * xs; \
                        const int32_t *cd = (const int32_t *)(xb + cols) + 2 * k; \
                        float dx; \
                        memcpy(&dx, cd + 1, 4); \
                        const int32x4_t d = QUAD(p, q, xb + (size_t)k * DL_QK, cd[0]); \
                        sum[j] = vaddq_f32(sum[j], vmulq_f32(vcvtq_f32_s32(d), vmulq_n_f32(dw, dx))); \
                    } \
                } \
                for (int j = 0; j < B; j++) \
                    dl_store4_neon(out + (size_t)(b0 + j) * rows + row0 + 4 * q, sum[j], rows - row0 - 4 * q); \
            } \
        } \
    } } while (0)
#endif

#define DL_DECL_ALL(sfx) \
    void dl_quantize_q80_##sfx(dl_block_q80 *y, const float *x, int64_t n); \
    void dl_matmul_q40_q80_rows_##sfx(float *out, const dl_block_q40 *w, const dl_block_q80 *x, \
                                      const void *xprep, \
                                      int r0, int r1, int rows, int cols, int batch); \
    void dl_matmul_f32_rows_##sfx(float *out, const float *w, const float *x, \
                                  int r0, int r1, int rows, int cols, int batch); \
    void dl_rmsnorm_##sfx(float *out, const float *x, const float *w, int n, float eps); \
    void dl_silu_mul_##sfx(float *out, const float *gate, const float *up, int64_t n); \
    void dl_add_##sfx(float *out, const float *a, int64_t n); \
    void dl_add_q80_##sfx(float *out, const dl_block_q80 *parts, int nparts, int64_t n); \
    float dl_dot_##sfx(const float *a, const float *b, int n); \
    void dl_axpy_##sfx(float *y, float a, const float *x, int n); \
    void dl_gelu_mul_##sfx(float *out, const float *gate, const float *up, int64_t n); \
    void dl_scale_##sfx(float *x, float s, int64_t n); \
    void dl_matmul_q80_q80_rows_##sfx(float *out, const dl_block_q80 *w, const dl_block_q80 *x, \
                                      const void *xprep, \
                                      int r0, int r1, int rows, int cols, int batch); \
    void dl_matmul_f16_rows_##sfx(float *out, const uint16_t *w, const float *x, \
                                  int r0, int r1, int rows, int cols, int batch); \
    void dl_softmax_##sfx(float *x, int n); \
    void dl_dot_rows_##sfx(float *out, const float *q, const float *rows, size_t stride, int n, int hd); \
    void dl_axpy_rows_##sfx(float *y, const float *a, const float *rows, size_t stride, int n, int hd); \
    void dl_sample_me_chunk_##sfx(double *m, double *e, const float *x, int c, float inv_t, double lo); \
    int dl_argmax_f32_##sfx(const float *x, int n); \

DL_DECL_ALL(scalar)
#if DL_X86
DL_DECL_ALL(avx2)
DL_DECL_ALL(avx512)
void dl_dot_rows2_avx512(float *out0, float *out1, const float *q0, const float *q1, const float *rows,
                         size_t stride, int n, int hd);
void dl_axpy_rows2_avx512(float *y0, float *y1, const float *a0, const float *a1, const float *rows,
                          size_t stride, int n, int hd);
#endif
#if DL_NEON
DL_DECL_ALL(neon)
/* the dotprod ISA = the NEON table with these replaced */
void dl_matmul_q40_q80_rows_neon_dotprod(float *out, const dl_block_q40 *w, const dl_block_q80 *x,
                                         const void *xprep, int r0, int r1, int rows, int cols, int batch);
void dl_matmul_q80_q80_rows_neon_dotprod(float *out, const dl_block_q80 *w, const dl_block_q80 *x,
                                         const void *xprep, int r0, int r1, int rows, int cols, int batch);
#endif

#endif
