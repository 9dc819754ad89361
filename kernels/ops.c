/* rmsnorm, silu_mul, add, add_q80, softmax, rope, attention (FORMATS.md §5). */
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
/* scalar reference (this file is built with -ffp-contract=off: no silent FMAs) */

/* rmsnorm: sum of squares accumulated in float, sequentially (SIMD paths: in float lanes). */
void dl_rmsnorm_scalar(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* exp as Distributed Llama's AVX2 kernels compute it (expf_avx2 in its nn-cpu-ops.cpp): 2^n times a
 * degree-4 polynomial of the fraction, relative error up to ~6e-5. SiLU and softmax use it on every
 * path so that q40/q80 outputs land on the same q80 rounding points as Distributed Llama's (its goldens
 * are reproduced to ~1e-6 instead of drifting after a few positions). Unlike the original, inputs
 * below -87 give 0 instead of a garbage exponent. Every SIMD path computes the same bits. */
#define DLX_LOG2E 1.4426950408889634f
#define DLX_C0 1.0f
#define DLX_C1 0.6931471805599453f
#define DLX_C2 0.2402265069591007f
#define DLX_C3 0.05550410866482158f
#define DLX_C4 0.009618129107628477f

float dl_exp_dllama_scalar(float x) {
    if (!(x >= -87.0f)) return 0.0f;      /* also NaN -> 0 */
    if (x > 88.0f) x = 88.0f;
    const float y = x * DLX_LOG2E;
    const float nf = nearbyintf(y);       /* cvtps_epi32: round to nearest even */
    const float f = y - nf;
    const float p = fmaf(fmaf(fmaf(fmaf(DLX_C4, f, DLX_C3), f, DLX_C2), f, DLX_C1), f, DLX_C0);
    union { uint32_t u; float f; } two_n = {(uint32_t)((int)nf + 127) << 23};
    return p * two_n.f;
}

void dl_silu_mul_scalar(float *out, const float *gate, const float *up, int64_t n) {
    /* Distributed Llama: the polynomial on groups of 8, libm expf on the n % 8 tail */
    const int64_t vec_end = n - n % 8;
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        const float e = i < vec_end ? dl_exp_dllama_scalar(-g) : expf(-g);
        out[i] = (g / (1.0f + e)) * up[i];
    }
}

void dl_add_scalar(float *out, const float *a, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] += a[i];
}

/* parts added one after the other: out = ((out + p0) + p1) + ..., value = (float)q * d */
void dl_add_q80_scalar(float *out, const dl_block_q80 *parts, int nparts, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int p = 0; p < nparts; p++) {
        const dl_block_q80 *x = parts + (size_t)p * nb;
        for (int64_t i = 0; i < nb; i++) {
            const float d = dl_f16_to_f32_scalar(x[i].d);
            for (int j = 0; j < DL_QK; j++) out[i * DL_QK + j] += (float)x[i].qs[j] * d;
        }
    }
}

float dl_dot_scalar(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void dl_axpy_scalar(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

#if DL_X86
/* ------------------------------------------------------------------------------------------ */
/* AVX2 + FMA */

DL_TARGET_AVX2 float dl_dot_avx2(const float *a, const float *b, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    float s = dl_hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

DL_TARGET_AVX2 void dl_axpy_avx2(float *y, float a, const float *x, int n) {
    const __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

DL_TARGET_AVX2 void dl_rmsnorm_avx2(float *out, const float *x, const float *w, int n, float eps) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    float ss = dl_hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    const __m256 vi = _mm256_set1_ps(inv);
    i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), vi)));
    for (; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* dl_exp_dllama_scalar on 8 lanes (same bits) */
DL_INLINE DL_TARGET_AVX2 __m256 exp_dllama256(__m256 x) {
    const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(DLX_LOG2E));
    const __m256i n = _mm256_cvtps_epi32(y);
    const __m256 f = _mm256_sub_ps(y, _mm256_cvtepi32_ps(n));
    __m256 p = _mm256_set1_ps(DLX_C4);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(DLX_C3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(DLX_C2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(DLX_C1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(DLX_C0));
    const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
    return _mm256_and_ps(_mm256_mul_ps(p, two_n), small);
}

DL_TARGET_AVX2 void dl_silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp_dllama256(_mm256_xor_ps(g, sign));
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = (gate[i] / (1.0f + expf(-gate[i]))) * up[i];
}

DL_TARGET_AVX2 void dl_add_avx2(float *out, const float *a, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_loadu_ps(a + i)));
    for (; i < n; i++) out[i] += a[i];
}

DL_TARGET_AVX2 void dl_add_q80_avx2(float *out, const dl_block_q80 *parts, int nparts, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int64_t i = 0; i < nb; i++) {
        float *o = out + i * DL_QK;
        __m256 v0 = _mm256_loadu_ps(o), v1 = _mm256_loadu_ps(o + 8);
        __m256 v2 = _mm256_loadu_ps(o + 16), v3 = _mm256_loadu_ps(o + 24);
        for (int p = 0; p < nparts; p++) {
            const dl_block_q80 *x = parts + (size_t)p * nb + i;
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(x->d));
            const __m128i q0 = _mm_loadu_si128((const __m128i *)x->qs);
            const __m128i q1 = _mm_loadu_si128((const __m128i *)(x->qs + 16));
            v0 = _mm256_add_ps(v0, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), d));
            v1 = _mm256_add_ps(v1, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))), d));
            v2 = _mm256_add_ps(v2, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), d));
            v3 = _mm256_add_ps(v3, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))), d));
        }
        _mm256_storeu_ps(o, v0); _mm256_storeu_ps(o + 8, v1);
        _mm256_storeu_ps(o + 16, v2); _mm256_storeu_ps(o + 24, v3);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512 */

/* The sum of a vector's 16 lanes in GCC's _mm512_reduce_add_ps order (lane i + lane i+8, then i + i+4,
 * then 0+2 and 1+3, then those two), written out: hsum512x16 sums 16 vectors at once by the same tree,
 * so a dot product has the same bits however many are reduced together, whatever the compiler. */
DL_INLINE DL_TARGET_AVX512 float hsum512(__m512 v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, _MM_SHUFFLE(1, 1, 1, 1))));
}

/* lane k = hsum512(v[k]), k < 16: each step adds the pairs of lanes hsum512 adds, for 2, 4, 8 and
 * then all 16 vectors at once (IEEE addition commutes: the operands' order does not matter), 46
 * instructions instead of 16 x 8 */
DL_INLINE DL_TARGET_AVX512 __m512 hsum512x16(const __m512 *v) {
    __m512 s[8], u[4], w[2];
    for (int k = 0; k < 8; k++)   /* lanes 0-7: v[2k]'s i + i+8; lanes 8-15: v[2k+1]'s */
        s[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 4; k++)   /* quarter m: v[4k+m]'s i + i+4 */
        u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int k = 0; k < 2; k++)   /* quarter m: v[8k+m]'s 0+2, 1+3, then v[8k+4+m]'s */
        w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* quarter m, lane j: the sum of v[4j+m]; into lane 4j+m */
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

DL_TARGET_AVX512 float dl_dot_avx512(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = dl_tailmask16(n - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return hsum512(acc);
}

DL_TARGET_AVX512 void dl_axpy_avx512(float *y, float a, const float *x, int n) {
    const __m512 va = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = dl_tailmask16(n - i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
}

DL_TARGET_AVX512 void dl_rmsnorm_avx512(float *out, const float *x, const float *w, int n, float eps) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(dl_tailmask16(n - i), x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float ss = _mm512_reduce_add_ps(acc);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    const __m512 vi = _mm512_set1_ps(inv);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = dl_tailmask16(n - i);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i),
                                                        _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vi)));
    }
}

DL_INLINE DL_TARGET_AVX512 __m512 exp_dllama512(__m512 x) {
    const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(DLX_LOG2E));
    const __m512i n = _mm512_cvtps_epi32(y);
    const __m512 f = _mm512_sub_ps(y, _mm512_cvtepi32_ps(n));
    __m512 p = _mm512_set1_ps(DLX_C4);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(DLX_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(DLX_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(DLX_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(DLX_C0));
    const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
    return _mm512_maskz_mul_ps(ok, p, two_n);
}

DL_TARGET_AVX512 void dl_silu_mul_avx512(float *out, const float *gate, const float *up, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const int64_t vec_end = n - n % 8;   /* like Distributed Llama's 8-wide loop */
    int64_t i = 0;
    for (; i + 16 <= vec_end; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i);
        const __m512 e = exp_dllama512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, e));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
    }
    for (; i < n; i++) {
        const float g = gate[i];
        const float e = i < vec_end ? dl_exp_dllama_scalar(-g) : expf(-g);
        out[i] = (g / (1.0f + e)) * up[i];
    }
}

DL_TARGET_AVX512 void dl_add_avx512(float *out, const float *a, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = dl_tailmask16(n - i);
        _mm512_mask_storeu_ps(out + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, out + i), _mm512_maskz_loadu_ps(m, a + i)));
    }
}

DL_TARGET_AVX512 void dl_add_q80_avx512(float *out, const dl_block_q80 *parts, int nparts, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int64_t i = 0; i < nb; i++) {
        float *o = out + i * DL_QK;
        __m512 v0 = _mm512_loadu_ps(o), v1 = _mm512_loadu_ps(o + 16);
        for (int p = 0; p < nparts; p++) {
            const dl_block_q80 *x = parts + (size_t)p * nb + i;
            const __m512 d = _mm512_set1_ps(_cvtsh_ss(x->d));
            const __m128i q0 = _mm_loadu_si128((const __m128i *)x->qs);
            const __m128i q1 = _mm_loadu_si128((const __m128i *)(x->qs + 16));
            v0 = _mm512_add_ps(v0, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d));
            v1 = _mm512_add_ps(v1, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d));
        }
        _mm512_storeu_ps(o, v0); _mm512_storeu_ps(o + 16, v1);
    }
}
#endif /* DL_X86 */

#if DL_NEON
/* ------------------------------------------------------------------------------------------ */
/* NEON */

static inline float32x4_t exp_neon(float32x4_t x) {  /* dl_exp_dllama_scalar on 4 lanes */
    const uint32x4_t ok = vcgeq_f32(x, vdupq_n_f32(-87.0f));
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
    const float32x4_t y = vmulq_f32(x, vdupq_n_f32(DLX_LOG2E));
    const float32x4_t nf = vrndnq_f32(y);
    const float32x4_t f = vsubq_f32(y, nf);
    float32x4_t p = vfmaq_f32(vdupq_n_f32(DLX_C3), vdupq_n_f32(DLX_C4), f);
    p = vfmaq_f32(vdupq_n_f32(DLX_C2), p, f);
    p = vfmaq_f32(vdupq_n_f32(DLX_C1), p, f);
    p = vfmaq_f32(vdupq_n_f32(DLX_C0), p, f);
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(nf), vdupq_n_s32(127)), 23);
    const float32x4_t r = vmulq_f32(p, vreinterpretq_f32_s32(e));
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(r), ok));
}

float dl_dot_neon(const float *a, const float *b, int n) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 = vfmaq_f32(a0, vld1q_f32(a + i), vld1q_f32(b + i));
        a1 = vfmaq_f32(a1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void dl_axpy_neon(float *y, float a, const float *x, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

void dl_rmsnorm_neon(float *out, const float *x, const float *w, int n, float eps) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const float32x4_t v0 = vld1q_f32(x + i), v1 = vld1q_f32(x + i + 4);
        a0 = vfmaq_f32(a0, v0, v0);
        a1 = vfmaq_f32(a1, v1, v1);
    }
    float ss = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(out + i, vmulq_f32(vld1q_f32(w + i), vmulq_n_f32(vld1q_f32(x + i), inv)));
    for (; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

void dl_silu_mul_neon(float *out, const float *gate, const float *up, int64_t n) {
    const int64_t vec_end = n - n % 8;
    int64_t i = 0;
    for (; i + 4 <= vec_end; i += 4) {
        const float32x4_t g = vld1q_f32(gate + i);
        const float32x4_t s = vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), exp_neon(vnegq_f32(g))));
        vst1q_f32(out + i, vmulq_f32(s, vld1q_f32(up + i)));
    }
    for (; i < n; i++) out[i] = (gate[i] / (1.0f + expf(-gate[i]))) * up[i];
}

void dl_add_neon(float *out, const float *a, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, vaddq_f32(vld1q_f32(out + i), vld1q_f32(a + i)));
    for (; i < n; i++) out[i] += a[i];
}

void dl_add_q80_neon(float *out, const dl_block_q80 *parts, int nparts, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int64_t i = 0; i < nb; i++) {
        float *o = out + i * DL_QK;
        float32x4_t v[8];
        for (int j = 0; j < 8; j++) v[j] = vld1q_f32(o + 4 * j);
        for (int p = 0; p < nparts; p++) {
            const dl_block_q80 *x = parts + (size_t)p * nb + i;
            const float d = dl_f16_to_f32_scalar(x->d);
            for (int h = 0; h < 2; h++) {
                const int8x16_t q = vld1q_s8(x->qs + 16 * h);
                const int16x8_t lo = vmovl_s8(vget_low_s8(q)), hi = vmovl_s8(vget_high_s8(q));
                const int32x4_t w[4] = {vmovl_s16(vget_low_s16(lo)), vmovl_s16(vget_high_s16(lo)),
                                        vmovl_s16(vget_low_s16(hi)), vmovl_s16(vget_high_s16(hi))};
                for (int j = 0; j < 4; j++)
                    v[4 * h + j] = vaddq_f32(v[4 * h + j], vmulq_n_f32(vcvtq_f32_s32(w[j]), d));
            }
        }
        for (int j = 0; j < 8; j++) vst1q_f32(o + 4 * j, v[j]);
    }
}
#endif /* DL_NEON */

/* ------------------------------------------------------------------------------------------ */
/* public entry points */

void dl_rmsnorm(float *out, const float *x, const float *w, int n, float eps, int batch) {
    for (int b = 0; b < batch; b++) dl_k.rmsnorm(out + (size_t)b * n, x + (size_t)b * n, w, n, eps);
}

/* Per row: Distributed Llama's tail rule (libm exp on the last n % 8 values) applies to each row, so
 * a row's values do not depend on how many rows share the call (batch invariance). */
void dl_silu_mul(float *out, const float *gate, const float *up, int n, int batch) {
    for (int b = 0; b < batch; b++) {
        const size_t o = (size_t)b * n;
        dl_k.silu_mul(out + o, gate + o, up + o, n);
    }
}
void dl_add(float *out, const float *a, int64_t n) { dl_k.add(out, a, n); }
void dl_add_q80(float *out, const dl_block_q80 *parts, int nparts, int64_t n) { dl_k.add_q80(out, parts, nparts, n); }

/* Softmax as Distributed Llama's AVX2 softmax_F32 computes it: the polynomial exp on the first
 * n - n % 8 values, summed in 8 lanes and reduced like its horizontalSum, libm expf on the tail,
 * then one multiplication by 1/sum. The SIMD paths compute the same bits: the exp polynomial is
 * the same on every path, lane j of the 8 sums x[j], x[j + 8], ... in order either way, the
 * reduction and the tail are the scalar ones (the scalar exp costs libm calls for its
 * round-to-nearest and fmas: a third of the attention's time at short contexts). */
void dl_softmax_scalar(float *x, int n) {
    if (n <= 0) return;
    float m = x[0];
    for (int i = 1; i < n; i++) if (x[i] > m) m = x[i];
    const int vec_end = n - n % 8;
    float lane[8] = {0};
    for (int i = 0; i < vec_end; i++) {
        x[i] = dl_exp_dllama_scalar(x[i] - m);
        lane[i % 8] += x[i];
    }
    const float h0 = lane[0] + lane[4], h1 = lane[1] + lane[5], h2 = lane[2] + lane[6], h3 = lane[3] + lane[7];
    float sum = (h0 + h2) + (h1 + h3);
    for (int i = vec_end; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    if (sum == 0.0f) sum = 0.000001f;
    const float inv = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

/* the scalar tail of the SIMD paths: expf on x[vec_end..n) added to sum in order, those values
 * scaled by 1/sum; returns 1/sum (the callers scale the vector part) */
static inline float softmax_tail(float *x, int vec_end, int n, float m, float sum) {
    for (int i = vec_end; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    if (sum == 0.0f) sum = 0.000001f;
    const float inv = 1.0f / sum;
    for (int i = vec_end; i < n; i++) x[i] *= inv;
    return inv;
}

static inline float max_tail(const float *x, int from, int n, float m) {
    for (int i = from; i < n; i++) if (x[i] > m) m = x[i];
    return m;
}

#if DL_X86
DL_INLINE DL_TARGET_AVX2 void softmax_avx2_body(float *x, int n) {
    if (n <= 0) return;
    const int vec_end = n - n % 8;
    float m = x[0];
    if (vec_end) {   /* the maximum does not depend on the order it is searched in */
        __m256 vm = _mm256_loadu_ps(x);
        for (int i = 8; i < vec_end; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
        float t[8];
        _mm256_storeu_ps(t, vm);
        m = max_tail(t, 0, 8, m);
    }
    m = max_tail(x, vec_end, n, m);
    const __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < vec_end; i += 8) {
        const __m256 e = exp_dllama256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));   /* h0..h3 */
    const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));                                     /* h0+h2, h1+h3 */
    const float sum = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
    const __m256 inv = _mm256_set1_ps(softmax_tail(x, vec_end, n, m, sum));
    for (int i = 0; i < vec_end; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
}

DL_TARGET_AVX2 void dl_softmax_avx2(float *x, int n) { softmax_avx2_body(x, n); }
/* 8 lanes on AVX-512 too: 16 would change the sums' order */
DL_TARGET_AVX512 void dl_softmax_avx512(float *x, int n) { softmax_avx2_body(x, n); }
#endif

#if DL_NEON
void dl_softmax_neon(float *x, int n) {   /* lanes 0-3 in lo, 4-7 in hi */
    if (n <= 0) return;
    const int vec_end = n - n % 8;
    float m = x[0];
    if (vec_end) {
        float32x4_t vm = vmaxq_f32(vld1q_f32(x), vld1q_f32(x + 4));
        for (int i = 8; i < vec_end; i += 8) vm = vmaxq_f32(vm, vmaxq_f32(vld1q_f32(x + i), vld1q_f32(x + i + 4)));
        m = vmaxvq_f32(vm);   /* x[0] is among them */
    }
    m = max_tail(x, vec_end, n, m);
    const float32x4_t vm = vdupq_n_f32(m);
    float32x4_t lo = vdupq_n_f32(0.0f), hi = vdupq_n_f32(0.0f);
    for (int i = 0; i < vec_end; i += 8) {
        const float32x4_t e0 = exp_neon(vsubq_f32(vld1q_f32(x + i), vm));
        const float32x4_t e1 = exp_neon(vsubq_f32(vld1q_f32(x + i + 4), vm));
        vst1q_f32(x + i, e0);
        vst1q_f32(x + i + 4, e1);
        lo = vaddq_f32(lo, e0);
        hi = vaddq_f32(hi, e1);
    }
    const float32x4_t h = vaddq_f32(lo, hi);   /* h0..h3 */
    const float sum = (vgetq_lane_f32(h, 0) + vgetq_lane_f32(h, 2)) + (vgetq_lane_f32(h, 1) + vgetq_lane_f32(h, 3));
    const float inv = softmax_tail(x, vec_end, n, m, sum);
    for (int i = 0; i < vec_end; i += 4) vst1q_f32(x + i, vmulq_n_f32(vld1q_f32(x + i), inv));
}
#endif

void dl_softmax(float *x, int n) { dl_k.softmax(x, n); }

/* ------------------------------------------------------------------------------------------ */
/* the attention's row kernels: out[i] = dot(q, rows[i * stride], hd) and y += a[i] * rows[i * stride]
 * for i in order, with each path's own dot / axpy arithmetic (so the bits of calling dot / axpy row
 * by row), but the axpy's y stays in registers over the rows: row by row, every row's axpy waited
 * for the previous one's stores of y (most of the attention's time at short contexts). */
void dl_dot_rows_scalar(float *out, const float *q, const float *rows, size_t stride, int n, int hd) {
    for (int i = 0; i < n; i++) out[i] = dl_dot_scalar(q, rows + (size_t)i * stride, hd);
}

void dl_axpy_rows_scalar(float *y, const float *a, const float *rows, size_t stride, int n, int hd) {
    for (int i = 0; i < n; i++) dl_axpy_scalar(y, a[i], rows + (size_t)i * stride, hd);
}

/* the fused paths: y[j] = fma(a[i], row_i[j], y[j]) for every element, whatever the vector width */
#if DL_X86
/* W registers (8 columns each) of y kept over all n rows: W independent FMA chains (the chains'
 * latency, not the FMA ports, bounds this loop: a 64-wide head in one pass of 8, not two of 4) */
DL_INLINE DL_TARGET_AVX2 void axpy_cols_avx2(float *y, const float *a, const float *rows, size_t stride, int n,
                                            const int W) {
    __m256 acc[8];
    for (int j = 0; j < W; j++) acc[j] = _mm256_loadu_ps(y + 8 * j);
    for (int i = 0; i < n; i++) {
        const float *r = rows + (size_t)i * stride;
        const __m256 va = _mm256_set1_ps(a[i]);
        for (int j = 0; j < W; j++) acc[j] = _mm256_fmadd_ps(va, _mm256_loadu_ps(r + 8 * j), acc[j]);
    }
    for (int j = 0; j < W; j++) _mm256_storeu_ps(y + 8 * j, acc[j]);
}

DL_INLINE DL_TARGET_AVX2 void axpy_rows_avx2_body(float *y, const float *a, const float *rows, size_t stride,
                                                  int n, int hd) {
    int c = 0;
    for (; c + 64 <= hd; c += 64) axpy_cols_avx2(y + c, a, rows + c, stride, n, 8);
    for (; c + 32 <= hd; c += 32) axpy_cols_avx2(y + c, a, rows + c, stride, n, 4);
    for (; c + 8 <= hd; c += 8) axpy_cols_avx2(y + c, a, rows + c, stride, n, 1);
    for (; c < hd; c++)
        for (int i = 0; i < n; i++) y[c] = fmaf(a[i], rows[(size_t)i * stride + c], y[c]);
}

/* 4 rows at a time, each with dl_dot_avx2's own accumulators and order (the same bits as calling it
 * per row): 8 independent chains instead of 2 */
DL_TARGET_AVX2 void dl_dot_rows_avx2(float *out, const float *q, const float *rows, size_t stride, int n, int hd) {
    int i = 0;
    if (hd % 16 == 0)
        for (; i + 4 <= n; i += 4) {
            const float *r0 = rows + (size_t)i * stride, *r1 = r0 + stride, *r2 = r1 + stride, *r3 = r2 + stride;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
            __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            for (int j = 0; j < hd; j += 16) {
                const __m256 q0 = _mm256_loadu_ps(q + j), q1 = _mm256_loadu_ps(q + j + 8);
                a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(r0 + j), a0);
                a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(r0 + j + 8), a1);
                b0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(r1 + j), b0);
                b1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(r1 + j + 8), b1);
                c0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(r2 + j), c0);
                c1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(r2 + j + 8), c1);
                d0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(r3 + j), d0);
                d1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(r3 + j + 8), d1);
            }
            out[i] = dl_hsum256(_mm256_add_ps(a0, a1));
            out[i + 1] = dl_hsum256(_mm256_add_ps(b0, b1));
            out[i + 2] = dl_hsum256(_mm256_add_ps(c0, c1));
            out[i + 3] = dl_hsum256(_mm256_add_ps(d0, d1));
        }
    for (; i < n; i++) out[i] = dl_dot_avx2(q, rows + (size_t)i * stride, hd);
}
DL_TARGET_AVX2 void dl_axpy_rows_avx2(float *y, const float *a, const float *rows, size_t stride, int n, int hd) {
    axpy_rows_avx2_body(y, a, rows, stride, n, hd);
}
/* 16 rows at a time (their sums reduced together), then 4, each with dl_dot_avx512's accumulator and
 * order (the same bits per row): at head size 64 a row's 4 FMAs would otherwise wait on a reduction
 * of twice as many instructions */
DL_TARGET_AVX512 void dl_dot_rows_avx512(float *out, const float *q, const float *rows, size_t stride, int n, int hd) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const float *r0 = rows + (size_t)i * stride;
        __m512 acc[16];
        for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
        for (int j = 0; j < hd; j += 16) {
            const __mmask16 m = dl_tailmask16(hd - j);
            const __m512 qv = _mm512_maskz_loadu_ps(m, q + j);
            for (int r = 0; r < 16; r++)
                acc[r] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, r0 + (size_t)r * stride + j), acc[r]);
        }
        _mm512_storeu_ps(out + i, hsum512x16(acc));
    }
    for (; i + 4 <= n; i += 4) {
        const float *r0 = rows + (size_t)i * stride, *r1 = r0 + stride, *r2 = r1 + stride, *r3 = r2 + stride;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps(), c = _mm512_setzero_ps(), d = _mm512_setzero_ps();
        for (int j = 0; j < hd; j += 16) {
            const __mmask16 m = dl_tailmask16(hd - j);
            const __m512 qv = _mm512_maskz_loadu_ps(m, q + j);
            a = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, r0 + j), a);
            b = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, r1 + j), b);
            c = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, r2 + j), c);
            d = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, r3 + j), d);
        }
        out[i] = hsum512(a);
        out[i + 1] = hsum512(b);
        out[i + 2] = hsum512(c);
        out[i + 3] = hsum512(d);
    }
    for (; i < n; i++) out[i] = dl_dot_avx512(q, rows + (size_t)i * stride, hd);
}
DL_TARGET_AVX512 void dl_axpy_rows_avx512(float *y, const float *a, const float *rows, size_t stride, int n, int hd) {
    axpy_rows_avx2_body(y, a, rows, stride, n, hd);
}

/* Two queries over the same rows: each row's loads serve both, and twice the independent chains
 * (the one-query loops wait on their FMAs' latency). Per query the bits of dl_dot_rows_avx512 (each
 * position's dl_dot_avx512: one 16-lane accumulator over the head, then hsum512's tree) and of
 * dl_axpy_rows_avx512 (y = fma(a_i, row_i, y) per element in row order). */
DL_TARGET_AVX512 void dl_dot_rows2_avx512(float *out0, float *out1, const float *q0, const float *q1,
                                          const float *rows, size_t stride, int n, int hd) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {   /* 8 rows x 2 queries: 16 sums reduced together */
        const float *r0 = rows + (size_t)i * stride;
        __m512 acc[16];   /* [r]: q0 . row r; [8 + r]: q1 . row r */
        for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
        for (int j = 0; j < hd; j += 16) {
            const __mmask16 m = dl_tailmask16(hd - j);
            const __m512 u = _mm512_maskz_loadu_ps(m, q0 + j), v = _mm512_maskz_loadu_ps(m, q1 + j);
            for (int r = 0; r < 8; r++) {
                const __m512 x = _mm512_maskz_loadu_ps(m, r0 + (size_t)r * stride + j);
                acc[r] = _mm512_fmadd_ps(u, x, acc[r]);
                acc[8 + r] = _mm512_fmadd_ps(v, x, acc[8 + r]);
            }
        }
        const __m512 sums = hsum512x16(acc);
        _mm256_storeu_ps(out0 + i, _mm512_castps512_ps256(sums));
        _mm256_storeu_ps(out1 + i, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sums), 1)));
    }
    for (; i + 2 <= n; i += 2) {
        const float *r0 = rows + (size_t)i * stride, *r1 = r0 + stride;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        for (int j = 0; j < hd; j += 16) {
            const __mmask16 m = dl_tailmask16(hd - j);
            const __m512 x0 = _mm512_maskz_loadu_ps(m, r0 + j), x1 = _mm512_maskz_loadu_ps(m, r1 + j);
            const __m512 u = _mm512_maskz_loadu_ps(m, q0 + j), v = _mm512_maskz_loadu_ps(m, q1 + j);
            a0 = _mm512_fmadd_ps(u, x0, a0);
            a1 = _mm512_fmadd_ps(u, x1, a1);
            b0 = _mm512_fmadd_ps(v, x0, b0);
            b1 = _mm512_fmadd_ps(v, x1, b1);
        }
        out0[i] = hsum512(a0);
        out0[i + 1] = hsum512(a1);
        out1[i] = hsum512(b0);
        out1[i + 1] = hsum512(b1);
    }
    for (; i < n; i++) {
        out0[i] = dl_dot_avx512(q0, rows + (size_t)i * stride, hd);
        out1[i] = dl_dot_avx512(q1, rows + (size_t)i * stride, hd);
    }
}

DL_TARGET_AVX512 void dl_axpy_rows2_avx512(float *y0, float *y1, const float *a0, const float *a1,
                                           const float *rows, size_t stride, int n, int hd) {
    int c = 0;
    for (; c + 64 <= hd; c += 64) {   /* 4 registers of each query's y: 8 chains */
        __m512 u0 = _mm512_loadu_ps(y0 + c), u1 = _mm512_loadu_ps(y0 + c + 16);
        __m512 u2 = _mm512_loadu_ps(y0 + c + 32), u3 = _mm512_loadu_ps(y0 + c + 48);
        __m512 v0 = _mm512_loadu_ps(y1 + c), v1 = _mm512_loadu_ps(y1 + c + 16);
        __m512 v2 = _mm512_loadu_ps(y1 + c + 32), v3 = _mm512_loadu_ps(y1 + c + 48);
        for (int i = 0; i < n; i++) {
            const float *r = rows + (size_t)i * stride + c;
            const __m512 s = _mm512_set1_ps(a0[i]), t = _mm512_set1_ps(a1[i]);
            const __m512 x0 = _mm512_loadu_ps(r), x1 = _mm512_loadu_ps(r + 16);
            const __m512 x2 = _mm512_loadu_ps(r + 32), x3 = _mm512_loadu_ps(r + 48);
            u0 = _mm512_fmadd_ps(s, x0, u0); v0 = _mm512_fmadd_ps(t, x0, v0);
            u1 = _mm512_fmadd_ps(s, x1, u1); v1 = _mm512_fmadd_ps(t, x1, v1);
            u2 = _mm512_fmadd_ps(s, x2, u2); v2 = _mm512_fmadd_ps(t, x2, v2);
            u3 = _mm512_fmadd_ps(s, x3, u3); v3 = _mm512_fmadd_ps(t, x3, v3);
        }
        _mm512_storeu_ps(y0 + c, u0); _mm512_storeu_ps(y0 + c + 16, u1);
        _mm512_storeu_ps(y0 + c + 32, u2); _mm512_storeu_ps(y0 + c + 48, u3);
        _mm512_storeu_ps(y1 + c, v0); _mm512_storeu_ps(y1 + c + 16, v1);
        _mm512_storeu_ps(y1 + c + 32, v2); _mm512_storeu_ps(y1 + c + 48, v3);
    }
    for (; c < hd; c += 16) {
        const __mmask16 m = dl_tailmask16(hd - c);
        __m512 u = _mm512_maskz_loadu_ps(m, y0 + c), v = _mm512_maskz_loadu_ps(m, y1 + c);
        for (int i = 0; i < n; i++) {
            const __m512 x = _mm512_maskz_loadu_ps(m, rows + (size_t)i * stride + c);
            u = _mm512_fmadd_ps(_mm512_set1_ps(a0[i]), x, u);
            v = _mm512_fmadd_ps(_mm512_set1_ps(a1[i]), x, v);
        }
        _mm512_mask_storeu_ps(y0 + c, m, u);
        _mm512_mask_storeu_ps(y1 + c, m, v);
    }
}
#endif

#if DL_NEON
void dl_dot_rows_neon(float *out, const float *q, const float *rows, size_t stride, int n, int hd) {
    for (int i = 0; i < n; i++) out[i] = dl_dot_neon(q, rows + (size_t)i * stride, hd);
}

void dl_axpy_rows_neon(float *y, const float *a, const float *rows, size_t stride, int n, int hd) {
    int c = 0;
    for (; c + 16 <= hd; c += 16) {
        float32x4_t y0 = vld1q_f32(y + c), y1 = vld1q_f32(y + c + 4), y2 = vld1q_f32(y + c + 8), y3 = vld1q_f32(y + c + 12);
        for (int i = 0; i < n; i++) {
            const float *r = rows + (size_t)i * stride + c;
            y0 = vfmaq_n_f32(y0, vld1q_f32(r), a[i]);
            y1 = vfmaq_n_f32(y1, vld1q_f32(r + 4), a[i]);
            y2 = vfmaq_n_f32(y2, vld1q_f32(r + 8), a[i]);
            y3 = vfmaq_n_f32(y3, vld1q_f32(r + 12), a[i]);
        }
        vst1q_f32(y + c, y0); vst1q_f32(y + c + 4, y1); vst1q_f32(y + c + 8, y2); vst1q_f32(y + c + 12, y3);
    }
    for (; c + 4 <= hd; c += 4) {
        float32x4_t y0 = vld1q_f32(y + c);
        for (int i = 0; i < n; i++) y0 = vfmaq_n_f32(y0, vld1q_f32(rows + (size_t)i * stride + c), a[i]);
        vst1q_f32(y + c, y0);
    }
    for (; c < hd; c++)
        for (int i = 0; i < n; i++) y[c] = fmaf(a[i], rows[(size_t)i * stride + c], y[c]);
}
#endif

float dl_dot(const float *a, const float *b, int n) { return dl_k.dot(a, b, n); }
void dl_dot_rows(float *out, const float *q, const float *rows, size_t stride, int n, int hd) {
    dl_k.dot_rows(out, q, rows, stride, n, hd);
}

/* RoPE; row b is at position pos[b]. cos/sin are computed per row from pos * freq, so a row's
 * result does not depend on the other rows of the call. */
void dl_rope(float *x, int n_heads, int head_dim, const int32_t *pos, int batch, int rope_type, const float *freqs) {
    const int half = head_dim / 2;
    float cbuf[256], sbuf[256];
    float *cs = half <= 256 ? cbuf : (float *)malloc(sizeof(float) * (size_t)half);
    float *sn = half <= 256 ? sbuf : (float *)malloc(sizeof(float) * (size_t)half);
    if (!cs || !sn) { if (cs != cbuf) free(cs); if (sn != sbuf) free(sn); return; }
    for (int b = 0; b < batch; b++) {
        const float p = (float)pos[b];
        for (int i = 0; i < half; i++) {
            const float a = p * freqs[i];
            cs[i] = cosf(a);
            sn[i] = sinf(a);
        }
        float *row = x + (size_t)b * n_heads * head_dim;
        for (int h = 0; h < n_heads; h++) {
            float *v = row + (size_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                float *p0, *p1;
                if (rope_type == DL_ROPE_HALF) { p0 = v + i; p1 = v + i + half; }
                else { p0 = v + 2 * i; p1 = v + 2 * i + 1; }
                const float x0 = *p0, x1 = *p1;
                *p0 = x0 * cs[i] - x1 * sn[i];
                *p1 = x0 * sn[i] + x1 * cs[i];
            }
        }
    }
    if (cs != cbuf) free(cs);
    if (sn != sbuf) free(sn);
}

/* ------------------------------------------------------------------------------------------ */
/* paged KV cache */

void dl_scatter_rows(float *dst, const float *src, const int32_t *rows, int n, int row_len) {
    for (int i = 0; i < n; i++)
        memcpy(dst + (size_t)rows[i] * row_len, src + (size_t)i * row_len, sizeof(float) * (size_t)row_len);
}

/* Causal attention over a paged KV cache, two passes like Distributed Llama's multiheadAtt:
 * scores = q.k_t / scale_div for the positions t the row sees, dl_softmax, then out = sum_t a_t v_t
 * in position order. Row b (at position pos[b], sequence table slot[b]) sees t = t0..pos[b] with
 * t0 = 0, or pos[b] - window + 1 with a sliding window. One (b, h) pair per task: a row's result
 * depends only on its own sequence's K/V rows, never on the other rows of the pass. */
typedef struct {
    float *out;
    const float *q, *k, *v;
    const int32_t *kv_of_q, *pos, *slot;
    const dl_kv_pages *kv;
    int n_q_heads, n_kv_heads, head_dim, window;
    float scale_div;
    void (*dot_rows)(float *, const float *, const float *, size_t, int, int);
    void (*axpy_rows)(float *, const float *, const float *, size_t, int, int);
} attn_ctx;

/* the first K/V row (cache row index) of the page holding position t of a sequence */
static inline size_t page_row(const dl_kv_pages *kv, const int32_t *table, int t) {
    int idx = t / kv->page_size;
    if (kv->ring_pages) idx %= kv->ring_pages;
    return (size_t)table[idx] * (size_t)kv->page_size;
}

static void attn_range(void *vctx, int64_t s, int64_t e) {
    const attn_ctx *c = (const attn_ctx *)vctx;
    const dl_kv_pages *kv = c->kv;
    const int hd = c->head_dim, ps = kv->page_size;
    const size_t kv_stride = (size_t)c->n_kv_heads * hd;
    float sbuf[4096];
    float *att = sbuf;
    int att_cap = 4096;
    for (int64_t task = s; task < e; task++) {
        const int b = (int)(task / c->n_q_heads), h = (int)(task % c->n_q_heads);
        const int pos = c->pos[b];
        const int t0 = c->window > 0 && pos - c->window + 1 > 0 ? pos - c->window + 1 : 0;
        const int n = pos - t0 + 1;
        if (n > att_cap) {
            if (att != sbuf) free(att);
            att = (float *)malloc(sizeof(float) * (size_t)n);
            if (!att) return;
            att_cap = n;
        }
        const int32_t *table = kv->tables + (size_t)c->slot[b] * kv->table_stride;
        const int kvh = c->kv_of_q[h];
        const float *qh = c->q + ((size_t)b * c->n_q_heads + h) * hd;
        const float *kb = c->k + (size_t)kvh * hd, *vb = c->v + (size_t)kvh * hd;
        for (int t = t0; t <= pos;) {     /* page by page: one table lookup per page */
            const size_t r0 = page_row(kv, table, t);
            const int end = (t / ps + 1) * ps - 1 < pos ? (t / ps + 1) * ps - 1 : pos;
            c->dot_rows(att + (t - t0), qh, kb + (r0 + (size_t)(t % ps)) * kv_stride, kv_stride, end - t + 1, hd);
            t = end + 1;
        }
        for (int i = 0; i < n; i++) att[i] /= c->scale_div;
        dl_softmax(att, n);
        float *o = c->out + ((size_t)b * c->n_q_heads + h) * hd;
        memset(o, 0, sizeof(float) * (size_t)hd);
        for (int t = t0; t <= pos;) {
            const size_t r0 = page_row(kv, table, t);
            const int end = (t / ps + 1) * ps - 1 < pos ? (t / ps + 1) * ps - 1 : pos;
            c->axpy_rows(o, att + (t - t0), vb + (r0 + (size_t)(t % ps)) * kv_stride, kv_stride, end - t + 1, hd);
            t = end + 1;
        }
    }
    if (att != sbuf) free(att);
}

void dl_attention_rows(float *out, const float *q, const float *k_cache, const float *v_cache,
                       const int32_t *kv_of_q, int n_q_heads, int n_kv_heads, int head_dim,
                       const int32_t *pos, const int32_t *slot, int batch, const dl_kv_pages *kv,
                       int window, float scale_div) {
    attn_ctx c = {out, q, k_cache, v_cache, kv_of_q, pos, slot, kv, n_q_heads, n_kv_heads, head_dim,
                  window, scale_div, dl_k.dot_rows, dl_k.axpy_rows};
    dl_parallel_for((int64_t)batch * n_q_heads, 1, attn_range, &c);
}

/* The same attention with the K/V rows read once per group of queries instead of once per (row,
 * head): a group is some query heads of one KV head (GQA: SmolLM2 3 per KV head, Gemma 3 4) over
 * a run of rows of one sequence at consecutive positions (a speculative verify pass, a prompt
 * chunk). Page segment by page segment, every query of the group takes its dot products (and later
 * its axpys) over the segment's rows while they are in L1, so the cache is streamed once per group;
 * per row and head it is the per-row path's arithmetic: dot_rows gives each position dl_dot's bits
 * however the positions are cut, the axpy is one FMA chain per element in position order, and the
 * softmax sees the same scores. So dl_attention gives dl_attention_rows' bits (tests/test_kernels.py)
 * and a row's result still depends only on its own sequence. */
#define ATTN_MAX_QUERIES 16   /* queries per group task: their score rows and the K/V segment stay in L1/L2 */
#define ATTN_STREAM_QUERIES 0.5   /* a task's fixed cost (its K/V rows streamed once more), in queries: small */
#define ATTN_MAX_PARTS 256

/* the first position a row at `pos` sees */
static inline int attn_t0(int pos, int window) { return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0; }

typedef struct {
    int b0, nb;     /* rows b0 .. b0 + nb - 1: one sequence, consecutive positions */
    int kvh;        /* their KV head ... */
    int j0, nj;     /* ... and query heads heads[kvh][j0 .. j0 + nj - 1] */
} attn_group;

typedef struct {
    const attn_ctx *c;
    const attn_group *groups;
    const int32_t *heads;     /* [n_kv_heads][heads_per_kv]: the query heads of each KV head */
    const int32_t *n_heads;   /* [n_kv_heads] */
    int heads_per_kv;
    const int64_t *cut;       /* part p: tasks cut[p] .. cut[p + 1] - 1 */
} attn_grouped_ctx;

static _Thread_local float *t_attn_buf = NULL;
static _Thread_local size_t t_attn_cap = 0;

/* one group task's queries: query i is a row's head, sees positions t0[i] .. pos[i]; its score of
 * position t is sc[i * span + t - T0] */
typedef struct {
    int nq, T0, T1, span;
    const float *q[ATTN_MAX_QUERIES];
    float *out[ATTN_MAX_QUERIES];
    int t0[ATTN_MAX_QUERIES], pos[ATTN_MAX_QUERIES];
    float *sc;
} attn_queries;

/* A sweep over the group's positions, page segment by page segment (each segment's K or V rows stay
 * in L1 while every query takes its part of them): scores = dots against K, or out += scores x V.
 * Two queries over the same positions (a row's heads) go through the ISA's pair kernel if it has one. */
static void attn_sweep(const attn_ctx *c, const attn_queries *aq, const int32_t *table, const float *base,
                       int values) {
    const dl_kv_pages *kv = c->kv;
    const int hd = c->head_dim, ps = kv->page_size;
    const size_t kv_stride = (size_t)c->n_kv_heads * hd;
    const int paired = values ? dl_k.axpy_rows2 != NULL : dl_k.dot_rows2 != NULL;
    for (int t = aq->T0; t <= aq->T1;) {
        const size_t r0 = page_row(kv, table, t);
        const int end = (t / ps + 1) * ps - 1 < aq->T1 ? (t / ps + 1) * ps - 1 : aq->T1;
        for (int i = 0; i < aq->nq; i++) {
            const int lo = t > aq->t0[i] ? t : aq->t0[i], hi = end < aq->pos[i] ? end : aq->pos[i];
            if (lo > hi) continue;
            const float *rows = base + (r0 + (size_t)(lo % ps)) * kv_stride;
            float *si = aq->sc + (size_t)i * aq->span + (lo - aq->T0);
            const int two = paired && i + 1 < aq->nq && aq->t0[i + 1] == aq->t0[i] && aq->pos[i + 1] == aq->pos[i];
            float *sj = two ? si + aq->span : NULL;
            if (values && two) dl_k.axpy_rows2(aq->out[i], aq->out[i + 1], si, sj, rows, kv_stride, hi - lo + 1, hd);
            else if (values) c->axpy_rows(aq->out[i], si, rows, kv_stride, hi - lo + 1, hd);
            else if (two) dl_k.dot_rows2(si, sj, aq->q[i], aq->q[i + 1], rows, kv_stride, hi - lo + 1, hd);
            else c->dot_rows(si, aq->q[i], rows, kv_stride, hi - lo + 1, hd);
            i += two;
        }
        t = end + 1;
    }
}

static void attn_group_range(void *vctx, int64_t s, int64_t e) {
    const attn_grouped_ctx *g = (const attn_grouped_ctx *)vctx;
    const attn_ctx *c = g->c;
    const int hd = c->head_dim;
    for (int64_t task = g->cut[s]; task < g->cut[e]; task++) {
        const attn_group *gr = &g->groups[task];
        attn_queries aq;
        aq.nq = gr->nb * gr->nj;
        for (int i = 0; i < aq.nq; i++) {
            const int b = gr->b0 + i / gr->nj;
            const int h = g->heads[(size_t)gr->kvh * g->heads_per_kv + gr->j0 + i % gr->nj];
            const int p = c->pos[b];
            aq.pos[i] = p;
            aq.t0[i] = attn_t0(p, c->window);
            aq.q[i] = c->q + ((size_t)b * c->n_q_heads + h) * hd;
            aq.out[i] = c->out + ((size_t)b * c->n_q_heads + h) * hd;
        }
        /* rows are in position order, so the first row starts the group's span and the last ends it */
        aq.T0 = aq.t0[0];
        aq.T1 = aq.pos[aq.nq - 1];
        aq.span = aq.T1 - aq.T0 + 1;
        const size_t need = (size_t)aq.nq * (size_t)aq.span;
        if (need > t_attn_cap) {
            float *nb = (float *)realloc(t_attn_buf, sizeof(float) * need);
            if (!nb) return;
            t_attn_buf = nb;
            t_attn_cap = need;
        }
        aq.sc = t_attn_buf;
        const int32_t *table = c->kv->tables + (size_t)c->slot[gr->b0] * c->kv->table_stride;
        attn_sweep(c, &aq, table, c->k + (size_t)gr->kvh * hd, 0);
        for (int i = 0; i < aq.nq; i++) {
            float *att = aq.sc + (size_t)i * aq.span + (aq.t0[i] - aq.T0);
            const int n = aq.pos[i] - aq.t0[i] + 1;
            for (int k = 0; k < n; k++) att[k] /= c->scale_div;
            dl_softmax(att, n);
            memset(aq.out[i], 0, sizeof(float) * (size_t)hd);
        }
        attn_sweep(c, &aq, table, c->v + (size_t)gr->kvh * hd, 1);
    }
}

/* the end of the run of rows from b: one sequence at consecutive positions */
static int run_end(const int32_t *slot, const int32_t *pos, int batch, int b) {
    int e = b + 1;
    while (e < batch && slot[e] == slot[b] && pos[e] == pos[e - 1] + 1) e++;
    return e;
}

/* dl_attention's tasks, and their costs; returns how many. Runs of rows (one sequence, consecutive
 * positions) are cut into chunks of at most rows_per rows, as many as fit from the start (greedy) or
 * of equal sizes (6 rows at 5 per chunk: 5 + 1, or 3 + 3); per chunk, each KV head's query heads in
 * `split` parts. Chunk by chunk (KV head by KV head instead, Gemma 3's attention over 12 rows took
 * 11 % longer: a thread then holds one head of every row, rows 4 KB apart). */
static int64_t attn_tasks(attn_group *groups, double *cost, int split, int even, const int32_t *n_heads,
                          int n_kv_heads, int rows_per, const int32_t *pos, const int32_t *slot, int batch, int window) {
    int64_t k = 0;
    for (int b = 0; b < batch;) {
        const int e = run_end(slot, pos, batch, b), m = (e - b + rows_per - 1) / rows_per;
        for (int ch = 0; ch < m; ch++) {
            const int c0 = even ? b + (e - b) * ch / m : b + ch * rows_per;
            const int c1 = even ? b + (e - b) * (ch + 1) / m : (c0 + rows_per < e ? c0 + rows_per : e);
            double q = 0.0;
            for (int r = c0; r < c1; r++) q += (double)(pos[r] - attn_t0(pos[r], window) + 1);
            const double span = (double)(pos[c1 - 1] - attn_t0(pos[c0], window) + 1);
            for (int kvh = 0; kvh < n_kv_heads; kvh++) {
                for (int sp = 0; sp < split; sp++) {
                    const int j0 = (int)((int64_t)n_heads[kvh] * sp / split);
                    const int j1 = (int)((int64_t)n_heads[kvh] * (sp + 1) / split);
                    if (j1 <= j0) continue;
                    cost[k] = q * (j1 - j0) + ATTN_STREAM_QUERIES * span;
                    groups[k++] = (attn_group){c0, c1 - c0, kvh, j0, j1 - j0};
                }
            }
        }
        b = e;
    }
    return k;
}

/* cut tasks 0..k-1 into `parts` runs of consecutive tasks of about equal cost (part p: cut[p] ..
 * cut[p + 1] - 1, at least one task each); returns the costliest part's cost */
static double attn_cut(int64_t *cut, const double *cost, int64_t k, int parts) {
    double total = 0.0;
    for (int64_t i = 0; i < k; i++) total += cost[i];
    double acc = 0.0, busiest = 0.0, part = 0.0;
    int64_t i = 0;
    cut[0] = 0;
    for (int p = 1; p < parts; p++) {   /* end part p - 1 where the cost so far comes nearest p shares */
        const double target = total * p / parts;
        part = 0.0;
        do { acc += cost[i]; part += cost[i]; i++; }
        while (i < k - (parts - p) && acc + cost[i] / 2 < target);
        cut[p] = i;
        if (part > busiest) busiest = part;
    }
    cut[parts] = k;
    part = 0.0;
    for (; i < k; i++) part += cost[i];
    return part > busiest ? part : busiest;
}

void dl_attention(float *out, const float *q, const float *k_cache, const float *v_cache,
                  const int32_t *kv_of_q, int n_q_heads, int n_kv_heads, int head_dim,
                  const int32_t *pos, const int32_t *slot, int batch, const dl_kv_pages *kv,
                  int window, float scale_div) {
    if (batch <= 0 || n_q_heads <= 0) return;
    attn_ctx c = {out, q, k_cache, v_cache, kv_of_q, pos, slot, kv, n_q_heads, n_kv_heads, head_dim,
                  window, scale_div, dl_k.dot_rows, dl_k.axpy_rows};
    /* the query heads of each KV head */
    int32_t hbuf[512], nbuf[128];
    int per = 0;
    int ok = n_kv_heads > 0 && n_kv_heads <= 128;
    for (int kvh = 0; ok && kvh < n_kv_heads; kvh++) nbuf[kvh] = 0;
    for (int h = 0; ok && h < n_q_heads; h++) {
        const int kvh = kv_of_q[h];
        ok = kvh >= 0 && kvh < n_kv_heads;
        if (ok && ++nbuf[kvh] > per) per = nbuf[kvh];
    }
    if (!ok || (size_t)n_kv_heads * (size_t)per > 512) {   /* (no such model) */
        dl_parallel_for((int64_t)batch * n_q_heads, 1, attn_range, &c);
        return;
    }
    for (int kvh = 0; kvh < n_kv_heads; kvh++) nbuf[kvh] = 0;
    for (int h = 0; h < n_q_heads; h++) {
        const int kvh = kv_of_q[h];
        hbuf[kvh * per + nbuf[kvh]++] = h;
    }
    /* The plan: chunks of rows (attn_tasks) times parts of each KV head's query heads, and each
     * thread one run of consecutive tasks of about equal cost (attn_cut: a task costs its queries'
     * positions, plus a little for streaming its K/V rows once more), not an equal number of tasks:
     * a pass of 6 rows of SmolLM2 as chunks of 5 + 1 rows gave one thread 5 times the other's rows.
     * The greedy chunks, or the equal ones (3 + 3) where those leave the busiest thread less. Where
     * the costs are equal, the threads get what equal task counts gave them. */
    const int rows_per = ATTN_MAX_QUERIES / per > 0 ? ATTN_MAX_QUERIES / per : 1;
    int64_t n_chunks = 0;
    int uneven = 0;   /* some run's greedy chunks differ in size */
    for (int b = 0; b < batch;) {
        const int e = run_end(slot, pos, batch, b);
        n_chunks += (e - b + rows_per - 1) / rows_per;
        uneven |= e - b > rows_per && (e - b) % rows_per != 0;
        b = e;
    }
    const int threads = dl_pool_nthreads() < ATTN_MAX_PARTS ? dl_pool_nthreads() : ATTN_MAX_PARTS;
    int split = (per + ATTN_MAX_QUERIES - 1) / ATTN_MAX_QUERIES;   /* nj <= ATTN_MAX_QUERIES */
    for (;;) {   /* the fewest splits that give every thread the same number of tasks, or two each
                  * (a task of one query head loses the kernels that take two) */
        const int64_t n = n_chunks * n_kv_heads * split;
        if (split >= per || n % threads == 0 || n >= 2 * (int64_t)threads) break;
        split++;
    }
    const int64_t n_max = n_chunks * n_kv_heads * split;
    attn_group gbuf[256];
    double cbuf[256];
    attn_group *groups = n_max <= 256 ? gbuf : (attn_group *)malloc(sizeof(attn_group) * (size_t)n_max);
    double *cost = n_max <= 256 ? cbuf : (double *)malloc(sizeof(double) * (size_t)n_max);
    if (!groups || !cost) {
        if (groups != gbuf) free(groups);
        if (cost != cbuf) free(cost);
        dl_parallel_for((int64_t)batch * n_q_heads, 1, attn_range, &c);
        return;
    }
    int64_t cut[ATTN_MAX_PARTS + 1];
    const int64_t k = attn_tasks(groups, cost, split, 0, nbuf, n_kv_heads, rows_per, pos, slot, batch, window);
    const int parts = (int)(threads < k ? threads : k);
    const double busiest = attn_cut(cut, cost, k, parts);
    if (uneven && parts > 1) {   /* equal chunks: as many per run, so as many tasks */
        attn_tasks(groups, cost, split, 1, nbuf, n_kv_heads, rows_per, pos, slot, batch, window);
        if (attn_cut(cut, cost, k, parts) >= busiest) {   /* the greedy chunks, after all */
            attn_tasks(groups, cost, split, 0, nbuf, n_kv_heads, rows_per, pos, slot, batch, window);
            attn_cut(cut, cost, k, parts);
        }
    }
    attn_grouped_ctx g = {&c, groups, hbuf, nbuf, per, cut};
    dl_parallel_for(parts, 1, attn_group_range, &g);
    if (cost != cbuf) free(cost);
    if (groups != gbuf) free(groups);
}

/* ------------------------------------------------------------------------------------------ */
/* Gemma 3: GeGLU (gelu_mul) and scale. Appended as new functions; the ops above are untouched.
 *
 * gelu_mul: out = gelu_tanh(gate) * up, with transformers' gelu_pytorch_tanh
 *   gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) = x / (1 + exp(-2 sqrt(2/pi) (x + 0.044715 x^3)))
 * (the sigmoid form: no cancellation for negative x, no tanh needed). exp is Cephes' expf
 * (Cody-Waite reduction by ln 2, degree-5 polynomial, relative error about 1e-7): much closer than
 * Distributed Llama's degree-4 exp, which Gemma has no reason to reproduce. Every path runs the same
 * operation sequence with explicit fused multiply-adds, so all paths compute the same bits. */
#define GX_LOG2E 1.44269504088896341f
#define GX_LN2_HI 0.693359375f
#define GX_LN2_LO -2.12194440e-4f
#define GX_P0 1.9875691500e-4f
#define GX_P1 1.3981999507e-3f
#define GX_P2 8.3334519073e-3f
#define GX_P3 4.1665795894e-2f
#define GX_P4 1.6666665459e-1f
#define GX_P5 5.0000001201e-1f
#define GX_K0 1.5957691216057308f          /* 2 sqrt(2/pi) */
#define GX_K1 0.071354816272869f           /* 2 sqrt(2/pi) * 0.044715 */

static float dl_exp_cephes_scalar(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    const float n = nearbyintf(x * GX_LOG2E);
    float r = fmaf(n, -GX_LN2_HI, x);
    r = fmaf(n, -GX_LN2_LO, r);
    float p = fmaf(GX_P0, r, GX_P1);
    p = fmaf(p, r, GX_P2);
    p = fmaf(p, r, GX_P3);
    p = fmaf(p, r, GX_P4);
    p = fmaf(p, r, GX_P5);
    const float y = fmaf(p, r * r, r) + 1.0f;
    union { uint32_t u; float f; } two_n = {(uint32_t)((int)n + 127) << 23};
    return y * two_n.f;
}

void dl_gelu_mul_scalar(float *out, const float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        const float z = -(g * fmaf(GX_K1, g * g, GX_K0));
        out[i] = (g / (1.0f + dl_exp_cephes_scalar(z))) * up[i];
    }
}

void dl_scale_scalar(float *x, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}

#if DL_X86
DL_INLINE DL_TARGET_AVX2 __m256 exp_cephes256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(GX_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-GX_LN2_HI), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-GX_LN2_LO), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(GX_P0), r, _mm256_set1_ps(GX_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(GX_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(GX_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(GX_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(GX_P5));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

DL_TARGET_AVX2 void dl_gelu_mul_avx2(float *out, const float *gate, const float *up, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), k0 = _mm256_set1_ps(GX_K0), k1 = _mm256_set1_ps(GX_K1);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 z = _mm256_xor_ps(_mm256_mul_ps(g, _mm256_fmadd_ps(k1, _mm256_mul_ps(g, g), k0)), sign);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp_cephes256(z)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    if (i < n) dl_gelu_mul_scalar(out + i, gate + i, up + i, n - i);
}

DL_TARGET_AVX2 void dl_scale_avx2(float *x, float s, int64_t n) {
    const __m256 v = _mm256_set1_ps(s);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), v));
    for (; i < n; i++) x[i] *= s;
}

DL_INLINE DL_TARGET_AVX512 __m512 exp_cephes512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(GX_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-GX_LN2_HI), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-GX_LN2_LO), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(GX_P0), r, _mm512_set1_ps(GX_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(GX_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(GX_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(GX_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(GX_P5));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

DL_TARGET_AVX512 void dl_gelu_mul_avx512(float *out, const float *gate, const float *up, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f), k0 = _mm512_set1_ps(GX_K0), k1 = _mm512_set1_ps(GX_K1);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = dl_tailmask16(n - i);
        const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        const __m512 z = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(g, _mm512_fmadd_ps(k1, _mm512_mul_ps(g, g), k0)));
        const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp_cephes512(z)));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, up + i)));
    }
}

DL_TARGET_AVX512 void dl_scale_avx512(float *x, float s, int64_t n) {
    const __m512 v = _mm512_set1_ps(s);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = dl_tailmask16(n - i);
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), v));
    }
}
#endif /* DL_X86 */

#if DL_NEON
static inline float32x4_t exp_cephes_neon(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(GX_LOG2E)));
    float32x4_t r = vfmaq_f32(x, n, vdupq_n_f32(-GX_LN2_HI));         /* x + n * -ln2_hi */
    r = vfmaq_f32(r, n, vdupq_n_f32(-GX_LN2_LO));
    float32x4_t p = vfmaq_f32(vdupq_n_f32(GX_P1), vdupq_n_f32(GX_P0), r);
    p = vfmaq_f32(vdupq_n_f32(GX_P2), p, r);
    p = vfmaq_f32(vdupq_n_f32(GX_P3), p, r);
    p = vfmaq_f32(vdupq_n_f32(GX_P4), p, r);
    p = vfmaq_f32(vdupq_n_f32(GX_P5), p, r);
    const float32x4_t y = vaddq_f32(vfmaq_f32(r, p, vmulq_f32(r, r)), vdupq_n_f32(1.0f));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

void dl_gelu_mul_neon(float *out, const float *gate, const float *up, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t g = vld1q_f32(gate + i);
        const float32x4_t z = vnegq_f32(vmulq_f32(g, vfmaq_f32(vdupq_n_f32(GX_K0), vdupq_n_f32(GX_K1), vmulq_f32(g, g))));
        const float32x4_t s = vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), exp_cephes_neon(z)));
        vst1q_f32(out + i, vmulq_f32(s, vld1q_f32(up + i)));
    }
    if (i < n) dl_gelu_mul_scalar(out + i, gate + i, up + i, n - i);
}

void dl_scale_neon(float *x, float s, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, vmulq_n_f32(vld1q_f32(x + i), s));
    for (; i < n; i++) x[i] *= s;
}
#endif /* DL_NEON */

void dl_gelu_mul(float *out, const float *gate, const float *up, int64_t n) { dl_k.gelu_mul(out, gate, up, n); }
void dl_scale(float *x, float s, int64_t n) { dl_k.scale(x, s, n); }

/* ------------------------------------------------------------------------------------------ */
/* Pairs the engine always calls back to back, one call each: the same kernels in the same order
 * (the same bits), one Python -> C crossing instead of two (at ~2.5 us each, a decode token of
 * the 1B shape made ~320 of them). */
void dl_rmsnorm_q80(dl_block_q80 *yq, float *out, const float *x, const float *w, int n, float eps, int batch) {
    dl_rmsnorm(out, x, w, n, eps, batch);
    dl_quantize_q80(yq, out, (int64_t)n * batch);
}

void dl_silu_mul_q80(dl_block_q80 *yq, float *out, const float *gate, const float *up, int n, int batch) {
    dl_silu_mul(out, gate, up, n, batch);
    dl_quantize_q80(yq, out, (int64_t)n * batch);
}

void dl_gelu_mul_q80(dl_block_q80 *yq, float *out, const float *gate, const float *up, int64_t n) {
    dl_gelu_mul(out, gate, up, n);
    dl_quantize_q80(yq, out, n);
}

void dl_add_via_q80(float *x, dl_block_q80 *tmp, const float *partial, int64_t n) {
    dl_quantize_q80(tmp, partial, n);
    dl_add_q80(x, tmp, 1, n);
}

void dl_rope_qk(float *q, int n_q_heads, float *k, int n_kv_heads, int head_dim, const int32_t *pos, int batch,
                int rope_type, const float *freqs) {
    dl_rope(q, n_q_heads, head_dim, pos, batch, rope_type, freqs);
    dl_rope(k, n_kv_heads, head_dim, pos, batch, rope_type, freqs);
}

void dl_scatter_kv(float *k_dst, float *v_dst, const float *k, const float *v, const int32_t *rows, int n, int row_len) {
    dl_scatter_rows(k_dst, k, rows, n, row_len);
    dl_scatter_rows(v_dst, v, rows, n, row_len);
}
