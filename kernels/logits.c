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
