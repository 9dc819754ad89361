/* Log-probabilities of one rank's slice of a logits row, for a distributed log-softmax: every rank
 * summarises its slice in a few numbers, the root combines them (engine.Engine._stats), so no rank
 * sends its vocabulary slice.
 *
 * Of the scaled logits y = x * inv_t over the slice: out[0] = max y, out[1] = log sum exp y
 * (computed as max + log sum exp(y - max), in double), out[2] = y[target] (-inf when target is not in
 * [0, n)), then the k largest (value, index) pairs in decreasing value order, lowest index first among
 * equal values (the argmax rule of the sampler), -inf / -1 where the slice has fewer than k values.
 * One scalar path: it reads a row once and is bound by that read and the exps. A slice whose values
 * are all -inf (masked out by a grammar) has log sum exp -inf, not NaN. */
#include "dl_internal.h"
#include <math.h>
#include <string.h>

void dl_logit_stats(double *out, const float *x, int n, float inv_t, int target, int k) {
    const double neg_inf = -INFINITY;
    double *top_v = out + 3;
    for (int i = 0; i < k; i++) { top_v[2 * i] = neg_inf; top_v[2 * i + 1] = -1.0; }
    double m = neg_inf;
    for (int i = 0; i < n; i++) {
        const double y = (double)x[i] * inv_t;
        if (y > m) m = y;
        /* insertion into the top k (strictly greater keeps the lower index first on ties) */
        if (k > 0 && y > top_v[2 * (k - 1)]) {
            int j = k - 1;
            while (j > 0 && y > top_v[2 * (j - 1)]) {
                top_v[2 * j] = top_v[2 * (j - 1)];
                top_v[2 * j + 1] = top_v[2 * (j - 1) + 1];
                j--;
            }
            top_v[2 * j] = y;
            top_v[2 * j + 1] = (double)i;
        }
    }
    double s = 0.0;
    if (m > neg_inf)
        for (int i = 0; i < n; i++) s += exp((double)x[i] * inv_t - m);
    out[0] = m;
    out[1] = m > neg_inf ? m + log(s) : neg_inf;
    out[2] = target >= 0 && target < n ? (double)x[target] * inv_t : neg_inf;
}

/* A grammar's token mask on one rank's slice of a logits row: x[i] (token id0 + i) becomes -inf
 * unless bit (id0 + i) of `words` is set (bit j of the mask is bit j % 32 of word j / 32, llguidance's
 * layout). Applied before temperature, top-p, sampling and log-probabilities. */
void dl_apply_token_mask(float *x, int n, const uint32_t *words, int id0) {
    for (int i = 0; i < n; i++) {
        const unsigned id = (unsigned)(id0 + i);
        if (!((words[id >> 5] >> (id & 31)) & 1u)) x[i] = -INFINITY;
    }
}

/* Sampling from one rank's slice of a logits row, summarised so that the root samples exactly as it
 * would from the whole row, whatever the number of slices (dllama_mpi/sampler.py holds the rule).
 *
 * The weight of a logit x at 1 / temperature inv_t is 2^t, t = x * inv_t * log2(e) (in that order, in
 * double), held exactly as M * 2^(E - 40) with E = floor(t) and M = 2^(t - E) * 2^40 rounded to an
 * integer in [2^40, 2^41]: an integer per token, so sums of weights are exact and do not depend on
 * how the vocabulary is cut. 2^f is a fixed polynomial in plain double arithmetic (the build has
 * -ffp-contract=off), not libm's exp2, so every host and build computes the same M. The
 * normalisation keeps the weights of exponents E_max - 63 .. E_max (E_max: the row's largest E;
 * lighter ones, under 2^-63 of the largest, count as 0) in 64 integer buckets, one per exponent: a
 * slice sends its buckets from its own E_max down and the root drops those below the row's.
 *
 * out (int64): [0] E_max of the slice (INT64_MIN when it has no finite logit), [1] its finite logits,
 * [2] how many records follow (min(k, [1])), [3 .. 67) bucket j = sum of M over tokens with
 * E = E_max - j, then per record (the k largest x, decreasing, lowest id first among equals):
 * x as a double's bits, id0 + index, M, E. */
#define SAMPLE_BUCKETS 64
#define SAMPLE_CHUNK 256
#define SAMPLE_MAX_K 256

static inline double sample_t(float x, float inv_t) { return (double)x * (double)inv_t * 1.4426950408889634; }

/* nearest integer (ties to even) of |v| < 2^51, as a double */
static inline double round_near(double v) { return (v + 0x1.8p52) - 0x1.8p52; }

/* M and E (as doubles, both exact integers) of t >= lo, where lo bounds t from below (a lower t is
 * taken as lo: its weight falls below the buckets) */
static inline void sample_me(double t, double lo, double *m, double *e) {
    t = t > lo ? t : lo;                 /* also -inf and NaN logits */
    double fl = round_near(t);
    fl -= fl > t ? 1.0 : 0.0;            /* floor */
    const double r = (t - fl - 0.5) * 0.6931471805599453;   /* 2^f = sqrt(2) e^r, |r| <= ln(2) / 2 */
    double p = 1.0 / 479001600.0;        /* e^r's Taylor series to r^12 / 12!: error under 1e-15 */
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    *m = round_near(p * 1.4142135623730951 * 1099511627776.0);   /* x 2^40 */
    *e = fl;
}

/* M and E of a chunk of logits: one loop of IEEE operations without contraction, which the compiler
 * vectorises per ISA (the same bits in every lane width; tests/test_kernels.py compares them) */
#define SAMPLE_ME_CHUNK_BODY \
    for (int j = 0; j < c; j++) sample_me(sample_t(x[j], inv_t), lo, &m[j], &e[j]);
void dl_sample_me_chunk_scalar(double *m, double *e, const float *x, int c, float inv_t, double lo) {
    SAMPLE_ME_CHUNK_BODY
}
#if DL_X86
DL_TARGET_AVX2 void dl_sample_me_chunk_avx2(double *m, double *e, const float *x, int c, float inv_t, double lo) {
    SAMPLE_ME_CHUNK_BODY
}
DL_TARGET_AVX512 void dl_sample_me_chunk_avx512(double *m, double *e, const float *x, int c, float inv_t,
                                                double lo) {
    SAMPLE_ME_CHUNK_BODY
}
#endif
#if DL_NEON
void dl_sample_me_chunk_neon(double *m, double *e, const float *x, int c, float inv_t, double lo) {
    SAMPLE_ME_CHUNK_BODY
}
#endif

/* the k >= 1 largest finite x of x[0..n) by insertion, decreasing, lower index first among equals
 * (strictly greater enters): blocks of 16 that hold nothing above the k-th are passed over with one
 * vectorised test; returns how many (min(k, finite)) and counts the finite values */
static int sample_top(const float *x, int n, int k, float *top_x, int *top_i, int *finite) {
    int sent = 0, fin = 0;
    float thr = -INFINITY;      /* what enters: more than the k-th, once there are k */
    for (int i0 = 0; i0 < n; i0 += 16) {
        const int c = n - i0 < 16 ? n - i0 : 16;
        int any = 0, f = 0;
        for (int q = 0; q < c; q++) { any |= x[i0 + q] > thr; f += x[i0 + q] > -INFINITY; }
        fin += f;
        if (!any) continue;
        for (int q = 0; q < c; q++) {
            const float v = x[i0 + q];
            if (!(v > thr)) continue;
            int t = sent < k ? sent++ : sent - 1;
            while (t > 0 && v > top_x[t - 1]) { top_x[t] = top_x[t - 1]; top_i[t] = top_i[t - 1]; t--; }
            top_x[t] = v;
            top_i[t] = i0 + q;
            if (sent == k) thr = top_x[k - 1];
        }
    }
    *finite = fin;
    return sent;
}

void dl_sample_summary(int64_t *out, const float *x, int n, float inv_t, int id0, int k) {
    int64_t bucket[4][SAMPLE_BUCKETS + 1] = {{0}};   /* [.][SAMPLE_BUCKETS]: weights below the buckets */
    int64_t *rec = out + 3 + SAMPLE_BUCKETS;
    float top_x[SAMPLE_MAX_K];
    int top_i[SAMPLE_MAX_K];
    if (k > SAMPLE_MAX_K) k = SAMPLE_MAX_K;
    int finite;
    const int found = sample_top(x, n, k > 0 ? k : 1, top_x, top_i, &finite);   /* top_x[0]: the max */
    const int sent = found < k ? found : k;
    out[1] = finite;
    out[2] = sent;
    if (!found) {
        out[0] = INT64_MIN;
        for (int j = 0; j < SAMPLE_BUCKETS; j++) out[3 + j] = 0;
        return;
    }
    double m1, e_max;
    sample_me(sample_t(top_x[0], inv_t), -INFINITY, &m1, &e_max);
    const double lo = e_max - SAMPLE_BUCKETS;   /* E <= e_max - 64: the extra bucket */
    double mv[SAMPLE_CHUNK], ev[SAMPLE_CHUNK];
    for (int i0 = 0; i0 < n; i0 += SAMPLE_CHUNK) {
        const int c = n - i0 < SAMPLE_CHUNK ? n - i0 : SAMPLE_CHUNK;
        dl_k.sample_me_chunk(mv, ev, x + i0, c, inv_t, lo);
        /* four bucket sets: neighbours mostly share an exponent, and one set would chain their adds */
        int j = 0;
        for (; j + 4 <= c; j += 4)
            for (int q = 0; q < 4; q++) bucket[q][(int)(e_max - ev[j + q])] += (int64_t)mv[j + q];
        for (; j < c; j++) bucket[0][(int)(e_max - ev[j])] += (int64_t)mv[j];
    }
    out[0] = (int64_t)e_max;
    for (int j = 0; j < SAMPLE_BUCKETS; j++) out[3 + j] = bucket[0][j] + bucket[1][j] + bucket[2][j] + bucket[3][j];
    for (int j = 0; j < sent; j++) {
        const double v = (double)top_x[j];
        double m, e;
        sample_me(sample_t(top_x[j], inv_t), -INFINITY, &m, &e);
        memcpy(&rec[4 * j], &v, sizeof v);
        rec[4 * j + 1] = id0 + top_i[j];
        rec[4 * j + 2] = (int64_t)m;
        rec[4 * j + 3] = (int64_t)e;
    }
}

/* dl_sample_summary of several rows of logits_local (row rows[i] of x, `stride` floats apart, at
 * 1 / temperature inv_t[i]) into out[i * len]: the rows shared out over the thread pool, each row's
 * summary the one call's */
typedef struct {
    int64_t *out;
    const float *x;
    const int32_t *rows;
    const float *inv_t;
    size_t stride, len;
    int n, id0, k;
} summary_ctx;

static void summary_range(void *vctx, int64_t s, int64_t e) {
    const summary_ctx *c = (const summary_ctx *)vctx;
    for (int64_t i = s; i < e; i++)
        dl_sample_summary(c->out + (size_t)i * c->len, c->x + (size_t)c->rows[i] * c->stride, c->n, c->inv_t[i],
                          c->id0, c->k);
}

void dl_sample_summaries(int64_t *out, size_t len, const float *x, size_t stride, const int32_t *rows,
                         const float *inv_t, int n_rows, int n, int id0, int k) {
    summary_ctx c = {out, x, rows, inv_t, stride, len, n, id0, k};
    dl_parallel_for(n_rows, 1, summary_range, &c);   /* (one row runs inline) */
}

/* Every token's probability from a whole row, as the summaries' root computes it for its candidates:
 * M * 2^(E - e_max + 63) / z (z: the row's exact bucket sum, scaled so, rounded once to a double);
 * 0 for -inf logits and for weights below the buckets. */
void dl_sample_probs(double *p, const float *x, int n, float inv_t, int64_t e_max, double z) {
    double pow2[SAMPLE_BUCKETS + 1];
    pow2[SAMPLE_BUCKETS] = 0.0;
    for (int j = 0; j < SAMPLE_BUCKETS; j++) pow2[j] = ldexp(1.0, 63 - j);
    const double em = (double)e_max, lo = em - SAMPLE_BUCKETS;
    double mv[SAMPLE_CHUNK], ev[SAMPLE_CHUNK];
    for (int i0 = 0; i0 < n; i0 += SAMPLE_CHUNK) {
        const int c = n - i0 < SAMPLE_CHUNK ? n - i0 : SAMPLE_CHUNK;
        dl_k.sample_me_chunk(mv, ev, x + i0, c, inv_t, lo);
        for (int j = 0; j < c; j++) p[i0 + j] = mv[j] * pow2[(int)(em - ev[j])] / z;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Greedy decoding's distributed argmax: per logit row its largest value and that value's first
 * index (numpy's argmax: the lowest index among equal values; a NaN counts as the largest, the
 * first NaN wins). Two passes: the row's maximum (and whether it holds a NaN) in vectors, then
 * the first index holding it, a read that stops there. No arithmetic: every path gives the same
 * index (tests/test_kernels.py against np.argmax). Replaces a numpy copy of the rows and an
 * argmax over them (Gemma 3's 262144-token rows: ~0.15 ms a row, a tenth of a verify row's cost). */
static int first_nan(const float *x, int n) {
    for (int i = 0; i < n; i++) if (x[i] != x[i]) return i;
    return -1;
}

int dl_argmax_f32_scalar(const float *x, int n) {
    int best = 0;
    for (int i = 0; i < n; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}

#if DL_X86
DL_TARGET_AVX2 int dl_argmax_f32_avx2(const float *x, int n) {
    if (n < 8) return dl_argmax_f32_scalar(x, n);
    __m256 vm = _mm256_loadu_ps(x), un = _mm256_cmp_ps(vm, vm, _CMP_UNORD_Q);
    int i = 8;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        un = _mm256_or_ps(un, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vm = _mm256_max_ps(vm, v);
    }
    if (_mm256_movemask_ps(un)) return first_nan(x, n);
    float lanes[8];
    _mm256_storeu_ps(lanes, vm);
    float m = lanes[0];
    for (int j = 1; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (; i < n; i++) {
        if (x[i] != x[i]) return first_nan(x, n);
        m = x[i] > m ? x[i] : m;
    }
    const __m256 vt = _mm256_set1_ps(m);
    for (i = 0; i + 8 <= n; i += 8) {
        const int eq = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vt, _CMP_EQ_OQ));
        if (eq) return i + __builtin_ctz((unsigned)eq);
    }
    for (; i < n; i++) if (x[i] == m) return i;
    return 0;
}

DL_TARGET_AVX512 int dl_argmax_f32_avx512(const float *x, int n) {
    if (n < 16) return dl_argmax_f32_scalar(x, n);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 vm = ninf;
    __mmask16 un = 0;
    int i = 0;
    for (; i < n; i += 16) {   /* the tail's missing lanes read as -inf */
        const __mmask16 k = dl_tailmask16(n - i);
        const __m512 v = _mm512_mask_loadu_ps(ninf, k, x + i);
        un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vm = _mm512_max_ps(vm, v);
    }
    if (un) return first_nan(x, n);
    const __m512 vt = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
    for (i = 0; i < n; i += 16) {
        const __mmask16 k = dl_tailmask16(n - i);
        const __mmask16 eq = _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, x + i), vt, _CMP_EQ_OQ);
        if (eq) return i + __builtin_ctz((unsigned)eq);
    }
    return 0;
}
#endif

#if DL_NEON
int dl_argmax_f32_neon(const float *x, int n) {
    if (n < 4) return dl_argmax_f32_scalar(x, n);
    float32x4_t vm = vld1q_f32(x);
    uint32x4_t ord = vceqq_f32(vm, vm);   /* all ones where not NaN */
    int i = 4;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        ord = vandq_u32(ord, vceqq_f32(v, v));
        vm = vmaxq_f32(vm, v);
    }
    if (vminvq_u32(ord) == 0) return first_nan(x, n);
    float m = vmaxvq_f32(vm);
    for (; i < n; i++) {
        if (x[i] != x[i]) return first_nan(x, n);
        m = x[i] > m ? x[i] : m;
    }
    const float32x4_t vt = vdupq_n_f32(m);
    for (i = 0; i + 4 <= n; i += 4)
        if (vmaxvq_u32(vceqq_f32(vld1q_f32(x + i), vt))) break;
    for (; i < n; i++) if (x[i] == m) return i;
    return 0;
}
#endif

typedef struct {
    double *out;
    const float *x;
    const int32_t *rows;
    size_t stride;
    int n, id0;
} argmax_ctx;

static void argmax_range(void *vctx, int64_t s, int64_t e) {
    const argmax_ctx *c = (const argmax_ctx *)vctx;
    for (int64_t k = s; k < e; k++) {
        const float *row = c->x + (size_t)c->rows[k] * c->stride;
        const int i = dl_k.argmax_f32(row, c->n);
        c->out[2 * k] = (double)row[i];
        c->out[2 * k + 1] = (double)(c->id0 + i);
    }
}

void dl_argmax_rows(double *out, const float *x, size_t stride, const int32_t *rows, int n_rows, int n, int id0) {
    if (n <= 0) {   /* an empty slice: nothing to offer the root */
        for (int k = 0; k < n_rows; k++) { out[2 * k] = -INFINITY; out[2 * k + 1] = (double)id0; }
        return;
    }
    argmax_ctx c = {out, x, rows, stride, n, id0};
    dl_parallel_for(n_rows, 1, argmax_range, &c);   /* (one row runs inline) */
}

int dl_argmax_f32(const float *x, int n) { return n > 0 ? dl_k.argmax_f32(x, n) : -1; }
