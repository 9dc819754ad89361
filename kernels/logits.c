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
 * The weight of a scaled logit y = x * inv_t is 2^t, t = y * log2(e), held exactly as M * 2^(E - 40)
 * with E = floor(t) and M = rint(exp2(t - E) * 2^40) in [2^40, 2^41]: an integer per token, so sums
 * of weights are exact and do not depend on how the vocabulary is cut. The normalisation keeps the
 * weights of exponents E_max - 63 .. E_max (E_max: the row's largest E; lighter ones, under 2^-63 of
 * the largest, count as 0) in 64 integer buckets, one per exponent: a slice sends its buckets from
 * its own E_max down and the root drops those below the row's.
 *
 * out (int64): [0] E_max of the slice (INT64_MIN when it has no finite logit), [1] its finite logits,
 * [2] how many records follow (min(k, [1])), [3 .. 67) bucket j = sum of M over tokens with
 * E = E_max - j, then per record (the k largest x, decreasing, lowest id first among equals):
 * x as a double's bits, id0 + index, M, E. */
#define SAMPLE_BUCKETS 64

static inline void sample_weight(double y, int64_t *m, int64_t *e) {
    const double t = y * 1.4426950408889634;    /* log2(e) */
    const double fl = floor(t);
    *e = (int64_t)fl;
    *m = (int64_t)llrint(exp2(t - fl) * 1099511627776.0);   /* 2^40 */
}

void dl_sample_summary(int64_t *out, const float *x, int n, float inv_t, int id0, int k) {
    int64_t *bucket = out + 3, *rec = out + 3 + SAMPLE_BUCKETS;
    for (int j = 0; j < SAMPLE_BUCKETS; j++) bucket[j] = 0;
    /* the k largest finite x by insertion (strictly greater keeps the lower index first on ties) */
    int sent = 0, finite = 0;
    float top_x[256];
    int top_i[256];
    if (k > 256) k = 256;
    float xmax = -INFINITY;
    for (int i = 0; i < n; i++) {
        const float v = x[i];
        if (!(v > -INFINITY)) continue;
        finite++;
        if (v > xmax) xmax = v;
        if (sent < k || v > top_x[sent - 1]) {
            int j = sent < k ? sent++ : sent - 1;
            while (j > 0 && v > top_x[j - 1]) { top_x[j] = top_x[j - 1]; top_i[j] = top_i[j - 1]; j--; }
            top_x[j] = v;
            top_i[j] = i;
        }
    }
    out[1] = finite;
    out[2] = sent;
    if (!finite) { out[0] = INT64_MIN; return; }
    int64_t m, e_max;
    sample_weight((double)xmax * inv_t, &m, &e_max);
    out[0] = e_max;
    for (int i = 0; i < n; i++) {
        if (!(x[i] > -INFINITY)) continue;
        int64_t e;
        sample_weight((double)x[i] * inv_t, &m, &e);
        if (e_max - e < SAMPLE_BUCKETS) bucket[e_max - e] += m;
    }
    for (int j = 0; j < sent; j++) {
        const double v = (double)top_x[j];
        memcpy(&rec[4 * j], &v, sizeof v);
        rec[4 * j + 1] = id0 + top_i[j];
        sample_weight(v * inv_t, &rec[4 * j + 2], &rec[4 * j + 3]);
    }
}

/* Every token's probability from a whole row, as the summaries' root computes it for its candidates:
 * M * 2^(E - e_max + 63) / z (z: the row's exact bucket sum, scaled so, rounded once to a double);
 * 0 for -inf logits and for weights below the buckets. */
void dl_sample_probs(double *p, const float *x, int n, float inv_t, int64_t e_max, double z) {
    for (int i = 0; i < n; i++) {
        if (!(x[i] > -INFINITY)) { p[i] = 0.0; continue; }
        int64_t m, e;
        sample_weight((double)x[i] * inv_t, &m, &e);
        p[i] = e_max - e < SAMPLE_BUCKETS ? ldexp((double)m, (int)(e - e_max + 63)) / z : 0.0;
    }
}
