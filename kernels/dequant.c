/* The GGUF block types: their sizes and the dequantization of whole rows.
 *
 * Used where a row is needed as floats: the token embedding (one row per token, in the file's own
 * type: no f32 copy of the table), and the tests. Each type's float arithmetic is ggml's and
 * gguf-py's reference dequantization, operation for operation (this file is built without
 * contraction), so the values are those numpy's `gguf.quants.dequantize` gives, bit for bit.
 * The matmuls never dequantize: they multiply the codes (kernels/matmul_rx.c, repack.c, ...).
 */
#include "dl_internal.h"
#include <string.h>

typedef struct { int values, bytes; } dl_type_shape;

/* values and bytes of one block; 0 = not a weight type this build knows */
static dl_type_shape type_shape(int type) {
    switch (type) {
    case DL_T_F32:    return (dl_type_shape){1, 4};
    case DL_T_F16:    return (dl_type_shape){1, 2};
    case DL_T_BF16:   return (dl_type_shape){1, 2};
    case DL_T_Q40:    return (dl_type_shape){32, 18};
    case DL_T_Q80:    return (dl_type_shape){32, 34};
    case DL_T_Q4_1:   return (dl_type_shape){32, 20};
    case DL_T_Q5_0:   return (dl_type_shape){32, 22};
    case DL_T_Q5_1:   return (dl_type_shape){32, 24};
    case DL_T_Q2_K:   return (dl_type_shape){256, 84};
    case DL_T_Q3_K:   return (dl_type_shape){256, 110};
    case DL_T_Q4_K:   return (dl_type_shape){256, 144};
    case DL_T_Q5_K:   return (dl_type_shape){256, 176};
    case DL_T_Q6_K:   return (dl_type_shape){256, 210};
    case DL_T_IQ4_NL: return (dl_type_shape){32, 18};
    case DL_T_IQ4_XS: return (dl_type_shape){256, 136};
    default:          return (dl_type_shape){0, 0};
    }
}

int dl_type_block_values(int type) { return type_shape(type).values; }
int dl_type_block_bytes(int type) { return type_shape(type).bytes; }

size_t dl_type_row_bytes(int type, int cols) {
    const dl_type_shape s = type_shape(type);
    if (s.values == 0 || cols < 0 || cols % s.values) return 0;
    return (size_t)(cols / s.values) * (size_t)s.bytes;
}

static inline float f16(const uint8_t *p) { return dl_f16_to_f32_scalar(dl_ld16(p)); }

static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4) */
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* one row of `cols` values from its blocks at p */
static void dequant_row(int type, float *y, const uint8_t *p, int cols) {
    switch (type) {
    case DL_T_F32:
        memcpy(y, p, sizeof(float) * (size_t)cols);
        return;
    case DL_T_F16:
        for (int c = 0; c < cols; c++) y[c] = f16(p + 2 * c);
        return;
    case DL_T_BF16:
        for (int c = 0; c < cols; c++) {
            const uint32_t u = (uint32_t)dl_ld16(p + 2 * c) << 16;
            memcpy(y + c, &u, 4);
        }
        return;
    default:
        break;
    }
    const dl_type_shape s = type_shape(type);
    const int nb = cols / s.values;
    for (int b = 0; b < nb; b++, p += s.bytes, y += s.values) {
        switch (type) {
        case DL_T_Q40: {             /* d, qs[16]: (nibble - 8) * d */
            const float d = f16(p);
            for (int j = 0; j < 16; j++) {
                y[j] = d * (float)((int)(p[2 + j] & 15) - 8);
                y[j + 16] = d * (float)((int)(p[2 + j] >> 4) - 8);
            }
            break;
        }
        case DL_T_Q80: {             /* d, qs[32] */
            const float d = f16(p);
            for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)p[2 + j] * d;
            break;
        }
        case DL_T_Q4_1: {            /* d, m, qs[16]: nibble * d + m */
            const float d = f16(p), m = f16(p + 2);
            for (int j = 0; j < 16; j++) {
                y[j] = d * (float)(p[4 + j] & 15) + m;
                y[j + 16] = d * (float)(p[4 + j] >> 4) + m;
            }
            break;
        }
        case DL_T_Q5_0:              /* d, qh[4], qs[16]: (nibble | bit << 4) - 16, times d */
        case DL_T_Q5_1: {            /* d, m, qh[4], qs[16]: (nibble | bit << 4) * d + m */
            const int q51 = type == DL_T_Q5_1;
            const float d = f16(p), m = q51 ? f16(p + 2) : 0.0f;
            const uint8_t *qh = p + (q51 ? 4 : 2), *qs = qh + 4;
            const uint32_t h = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
            for (int j = 0; j < 16; j++) {
                const int lo = (qs[j] & 15) | (int)((h >> j) & 1) << 4;
                const int hi = (qs[j] >> 4) | (int)((h >> (j + 16)) & 1) << 4;
                if (q51) {
                    y[j] = d * (float)lo + m;
                    y[j + 16] = d * (float)hi + m;
                } else {
                    y[j] = d * (float)(lo - 16);
                    y[j + 16] = d * (float)(hi - 16);
                }
            }
            break;
        }
        case DL_T_IQ4_NL: {          /* d, qs[16]: a 16-entry non-linear table */
            const float d = f16(p);
            for (int j = 0; j < 16; j++) {
                y[j] = d * (float)IQ4_VALUES[p[2 + j] & 15];
                y[j + 16] = d * (float)IQ4_VALUES[p[2 + j] >> 4];
            }
            break;
        }
        case DL_T_Q2_K: {            /* scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin */
            const uint8_t *sc = p, *qs = p + 16;
            const float d = f16(p + 80), dmin = f16(p + 82);
            for (int v = 0; v < 256; v++) {
                const int sb = v / 16, n = v / 128, t = (v % 128) / 32, l = v % 32;
                const float dl = d * (float)(sc[sb] & 15), ml = dmin * (float)(sc[sb] >> 4);
                y[v] = dl * (float)((qs[32 * n + l] >> (2 * t)) & 3) - ml;
            }
            break;
        }
        case DL_T_Q3_K: {            /* hmask[32], qs[64], scales[12] (6-bit, - 32), d */
            const uint8_t *hm = p, *qs = p + 32, *s = p + 96;
            const float d = f16(p + 108);
            for (int v = 0; v < 256; v++) {
                const int sb = v / 16, n = v / 128, t = (v % 128) / 32, l = v % 32;
                const int ls = (s[sb % 8] >> (4 * (sb / 8))) & 15, hs = (s[8 + sb % 4] >> (2 * (sb / 4))) & 3;
                const float dl = d * (float)((ls | hs << 4) - 32);
                const int q = ((qs[32 * n + l] >> (2 * t)) & 3) - (((hm[l] >> (4 * n + t)) & 1) ? 0 : 4);
                y[v] = dl * (float)q;
            }
            break;
        }
        case DL_T_Q4_K:              /* d, dmin, scales[12], qs[128] */
        case DL_T_Q5_K: {            /* d, dmin, scales[12], qh[32], qs[128] */
            const int q5 = type == DL_T_Q5_K;
            const float d = f16(p), dmin = f16(p + 2);
            const uint8_t *scales = p + 4, *qh = p + 16, *qs = p + (q5 ? 48 : 16);
            for (int j = 0; j < 8; j++) {
                uint8_t sc, m;
                scale_min_k4(j, scales, &sc, &m);
                const float d1 = d * (float)sc, m1 = dmin * (float)m;
                for (int l = 0; l < 32; l++) {
                    int q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
                    if (q5) q |= ((qh[l] >> j) & 1) << 4;
                    y[32 * j + l] = d1 * (float)q - m1;
                }
            }
            break;
        }
        case DL_T_Q6_K: {            /* ql[128], qh[64], scales[16] (int8), d */
            const uint8_t *ql = p, *qh = p + 128;
            const int8_t *sc = (const int8_t *)(p + 192);
            const float d = f16(p + 208);
            for (int v = 0; v < 256; v++) {
                const int n = v / 128, t = (v % 128) / 32, l = v % 32;
                const int lo = (ql[64 * n + l + 32 * (t & 1)] >> (4 * (t >> 1))) & 15;
                const int hi = (qh[32 * n + l] >> (2 * t)) & 3;
                y[v] = (d * (float)sc[v / 16]) * (float)((lo | hi << 4) - 32);
            }
            break;
        }
        case DL_T_IQ4_XS: {          /* d, scales_h (u16), scales_l[4], qs[128] */
            const float d = f16(p);
            const unsigned sh = dl_ld16(p + 2);
            const uint8_t *sl = p + 4, *qs = p + 8;
            for (int j = 0; j < 8; j++) {
                const int ls = ((sl[j / 2] >> (4 * (j % 2))) & 15) | (int)((sh >> (2 * j)) & 3) << 4;
                const float dl = d * (float)(ls - 32);
                for (int l = 0; l < 16; l++) {
                    y[32 * j + l] = dl * (float)IQ4_VALUES[qs[16 * j + l] & 15];
                    y[32 * j + l + 16] = dl * (float)IQ4_VALUES[qs[16 * j + l] >> 4];
                }
            }
            break;
        }
        default:
            return;
        }
    }
}

int dl_dequantize_rows(int type, float *out, const void *src, const int32_t *ids, int n, int cols) {
    const size_t rb = dl_type_row_bytes(type, cols);
    if (rb == 0) return -1;
    for (int i = 0; i < n; i++)
        dequant_row(type, out + (size_t)i * cols, (const uint8_t *)src + (size_t)(ids ? ids[i] : i) * rb, cols);
    return 0;
}
