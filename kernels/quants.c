/* f16 conversion and q40 / q80 (de)quantization (FORMATS.md §2). */
#include "dl_internal.h"
#include <math.h>
#include <string.h>
#if DL_X86
#include <immintrin.h>
#endif
#if DL_NEON
#include <arm_neon.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* f16 <-> f32, IEEE, round to nearest even, subnormals, inf, nan (after Maratyszcza's FP16). */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float dl_f16_to_f32_scalar(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float normalized = u2f((two_w >> 4) + exp_offset) * 0x1.0p-112f;
    const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized));
    return u2f(result);
}

uint16_t dl_f32_to_f16_scalar(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f2u(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f2u(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

float dl_f16_to_f32(uint16_t h) { return dl_f16_to_f32_scalar(h); }
uint16_t dl_f32_to_f16(float f) { return dl_f32_to_f16_scalar(f); }

/* ------------------------------------------------------------------------------------------ */
/* q80 quantization: amax, d = amax/127 (f32), stored f16(d), inv = 1/d (f32 d), q = rne(x*inv) */

void dl_quantize_q80_scalar(dl_block_q80 *y, const float *x, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + i * DL_QK;
        float amax = 0.0f;
        for (int j = 0; j < DL_QK; j++) {
            const float a = fabsf(xb[j]);
            if (a > amax) amax = a;
        }
        const float d = amax / 127.0f;
        const float inv = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = dl_f32_to_f16_scalar(d);
        for (int j = 0; j < DL_QK; j++) y[i].qs[j] = (int8_t)nearbyintf(xb[j] * inv);
    }
}

#if DL_X86
#define DL_ROUND_NEAREST (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)   /* a constant: clang wants one */

DL_TARGET_AVX2 void dl_quantize_q80_avx2(dl_block_q80 *y, const float *x, int64_t n) {
    const int64_t nb = n / DL_QK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + i * DL_QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f;
        const float inv = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = dl_f32_to_f16_scalar(d);
        const __m256 vi = _mm256_set1_ps(inv);
        __m256i i0 = _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vi), DL_ROUND_NEAREST));
        __m256i i1 = _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vi), DL_ROUND_NEAREST));
        __m256i i2 = _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vi), DL_ROUND_NEAREST));
        __m256i i3 = _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vi), DL_ROUND_NEAREST));
        i0 = _mm256_packs_epi32(i0, i1);
        i2 = _mm256_packs_epi32(i2, i3);
        i0 = _mm256_packs_epi16(i0, i2);
        i0 = _mm256_permutevar8x32_epi32(i0, perm);
        _mm256_storeu_si256((__m256i *)y[i].qs, i0);
    }
}

DL_TARGET_AVX512 void dl_quantize_q80_avx512(dl_block_q80 *y, const float *x, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + i * DL_QK;
        __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f;
        const float inv = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = dl_f32_to_f16_scalar(d);
        const __m512 vi = _mm512_set1_ps(inv);
        __m512i i0 = _mm512_cvttps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v0, vi), DL_ROUND_NEAREST));
        __m512i i1 = _mm512_cvttps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v1, vi), DL_ROUND_NEAREST));
        _mm_storeu_si128((__m128i *)y[i].qs, _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(y[i].qs + 16), _mm512_cvtsepi32_epi8(i1));
    }
}
#endif

#if DL_NEON
void dl_quantize_q80_neon(dl_block_q80 *y, const float *x, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + i * DL_QK;
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int j = 0; j < 8; j++) { v[j] = vld1q_f32(xb + 4 * j); m = vmaxq_f32(m, vabsq_f32(v[j])); }
        const float amax = vmaxvq_f32(m);
        const float d = amax / 127.0f;
        const float inv = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = dl_f32_to_f16_scalar(d);
        for (int j = 0; j < 8; j += 2) {
            int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(v[j], inv));      /* round to nearest even */
            int32x4_t b = vcvtnq_s32_f32(vmulq_n_f32(v[j + 1], inv));
            int16x8_t h = vcombine_s16(vqmovn_s32(a), vqmovn_s32(b));
            vst1_s8(y[i].qs + 4 * j, vqmovn_s16(h));
        }
    }
}
#endif

void dl_quantize_q80(dl_block_q80 *y, const float *x, int64_t n) { dl_k.quantize_q80(y, x, n); }

void dl_dequantize_q80(float *y, const dl_block_q80 *x, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = dl_f16_to_f32_scalar(x[i].d);
        for (int j = 0; j < DL_QK; j++) y[i * DL_QK + j] = (float)x[i].qs[j] * d;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* q40: Distributed Llama converter rule (numpy float32 arithmetic, no contraction: this file is
 * built with -ffp-contract=off). */

void dl_quantize_q40(dl_block_q40 *y, const float *x, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + i * DL_QK;
        float mx = xb[0], mn = xb[0];
        for (int j = 1; j < DL_QK; j++) {
            if (xb[j] > mx) mx = xb[j];
            if (xb[j] < mn) mn = xb[j];
        }
        const float m = (mx >= -mn) ? mx : mn;
        const float d = m / -8.0f;
        const float inv = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = dl_f32_to_f16_scalar(d);
        uint8_t codes[DL_QK];
        for (int j = 0; j < DL_QK; j++) {
            float v = xb[j] * inv;
            v = v + 8.5f;
            if (v < 0.0f) v = 0.0f;
            if (v > 15.0f) v = 15.0f;
            codes[j] = (uint8_t)(int)v;   /* truncation toward zero, v >= 0 */
        }
        for (int j = 0; j < 16; j++) y[i].qs[j] = (uint8_t)(codes[j] | (codes[j + 16] << 4));
    }
}

void dl_dequantize_q40(float *y, const dl_block_q40 *x, int64_t n) {
    const int64_t nb = n / DL_QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = dl_f16_to_f32_scalar(x[i].d);
        for (int j = 0; j < 16; j++) {
            y[i * DL_QK + j] = (float)((int)(x[i].qs[j] & 15) - 8) * d;
            y[i * DL_QK + j + 16] = (float)((int)(x[i].qs[j] >> 4) - 8) * d;
        }
    }
}
