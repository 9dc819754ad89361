/* Every SIMD path of the C kernels against the scalar reference, in C, for any target: built
 * natively (x86: AVX2, AVX-512) or cross-compiled for aarch64 and run under qemu-aarch64 (NEON,
 * NEON dotprod); tests/test_neon.py builds and runs it.
 *
 * Table-driven: one entry per kernel (`TESTS` at the end) = a setup that makes the inputs of case
 * i (shapes, random and edge-case values), a run that calls the kernel, and how results compare.
 * For every case the scalar path on 1 thread gives the reference; then every supported ISA
 * (scalar too) on 1, 2 and 3 threads must
 *   - give the same bits on 2 and 3 threads as on 1 (results never depend on the thread count),
 *   - match the reference: bit for bit where the entry says so for that ISA (`exact`: a mask of
 *     ISAs), else |got - ref| <= tol * mag[e] (mag = the sum of |terms| of that output, made by
 *     the setup; a non-finite reference (an inf scale) wants a non-finite result: inf or NaN
 *     depends on how partial sums meet the inf),
 *   - leave the bytes past the output untouched (every output buffer has a guard tail),
 *   - matmuls: give every batch row the bits that row gets alone (batch invariance: continuous
 *     batching puts rows of different sequences in one call).
 * Adding a kernel: write its setup and run (a few lines with the helpers below), add a line.
 *
 *   kernel_harness [--only NAME] [--require ISA,..] [--forbid ISA,..]   run the tests
 *   kernel_harness --list             the kernel entries, one a line
 *   kernel_harness --print-isa        the ISA the dispatch picked (honours DLLAMA_ISA)
 *   kernel_harness --force-isa ISA    run the q40 and q80 matmuls on ISA even if unsupported (a probe:
 *                                     dotprod code on a CPU without it must die with SIGILL)
 * Exit status 0 when every comparison passed.
 */
#define _POSIX_C_SOURCE 200809L
#include "dl_internal.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_ISA (DL_ISA_NEON_DOTPROD + 1)
#define ALL_ISAS ((1u << N_ISA) - 1)
#define BIT(isa) (1u << (isa))
#define MAX_THREADS 3
#define GUARD 64                     /* guard bytes after every output */
#define SENTINEL 0xA5

/* ------------------------------------------------------------------------------------------ */
/* random numbers (xorshift64*), allocation of a case's buffers */

static uint64_t rng_state;
static uint64_t rnd(void) {
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}
static int rnd_int(int lo, int hi) { return lo + (int)(rnd() % (uint64_t)(hi - lo + 1)); }   /* [lo, hi] */
static float rnd_unit(void) { return (float)((rnd() >> 11) * (1.0 / 9007199254740992.0)); }  /* [0, 1) */
static float rnd_normal(void) {   /* Box-Muller */
    const float u = rnd_unit() + 1e-7f, v = rnd_unit();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

#define MAX_ALLOCS 16
typedef struct {
    char desc[128];                   /* shape and flavour, printed on failure */
    int rows, cols, batch, n, flavour, opt;
    void *in[8];                     /* inputs (meaning per entry) */
    int prm[8];                      /* more shape parameters (meaning per entry) */
    size_t out_bytes;                /* bytes the kernel writes */
    size_t xrow_bytes;               /* matmuls: in[1] holds `batch` rows of x of this size, out is
                                        [batch][rows]: every output row must equal its row alone */
    double *mag;                     /* per output float: sum of |terms| (tolerance entries) */
    void *allocs[MAX_ALLOCS];
    int nallocs;
} tcase;

static void *case_alloc(tcase *c, size_t bytes) {   /* 64-byte aligned, zeroed; freed after the case */
    void *p = NULL;
    if (c->nallocs >= MAX_ALLOCS || posix_memalign(&p, 64, bytes + 64) != 0) { fprintf(stderr, "out of memory\n"); exit(2); }
    memset(p, 0, bytes + 64);
    c->allocs[c->nallocs++] = p;
    return p;
}

static void case_free(tcase *c) {
    for (int i = 0; i < c->nallocs; i++) free(c->allocs[i]);
    c->nallocs = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* input makers */

enum { FL_RANDOM, FL_EXTREME, FL_ZERO_SCALES, FL_MAX_CODES, FL_INF_SCALE, N_FLAVOURS };
static const char *flavour_name[] = {"random", "extreme-scales", "zero-scales", "max-codes", "inf-scale"};

static const uint16_t extreme_f16[] = {0x7BFF, 0x0001, 0x03FF, 0x0400, 0xFBFF, 0x8001, 0x3C00, 0x0000};

/* q40 weights [rows, cols]: random nibbles, scales by flavour */
static dl_block_q40 *make_q40(tcase *c, int rows, int cols, int flavour) {
    const int nb = cols / DL_QK;
    dl_block_q40 *w = case_alloc(c, sizeof(dl_block_q40) * (size_t)rows * nb);
    for (int64_t i = 0; i < (int64_t)rows * nb; i++) {
        for (int j = 0; j < 16; j++) w[i].qs[j] = (uint8_t)rnd();
        switch (flavour) {
        case FL_EXTREME:     w[i].d = extreme_f16[rnd() % 8]; break;
        case FL_ZERO_SCALES: w[i].d = rnd() % 3 ? 0 : dl_f32_to_f16(rnd_normal() * 0.01f); break;
        case FL_MAX_CODES:   /* code 0 (-8) or 15 (+7) everywhere, scale 1: large exact integer dots */
            memset(w[i].qs, rnd() & 1 ? 0x00 : 0xFF, 16); w[i].d = 0x3C00; break;
        default:             w[i].d = dl_f32_to_f16(rnd_normal() * 0.01f); break;
        }
    }
    if (flavour == FL_INF_SCALE) w[(rows / 2) * nb].d = 0x7C00;   /* one +inf scale: inf or NaN out */
    return w;
}

/* q80 activations [batch, cols] */
static dl_block_q80 *make_q80(tcase *c, int batch, int cols, int flavour) {
    const int nb = cols / DL_QK;
    dl_block_q80 *x = case_alloc(c, sizeof(dl_block_q80) * (size_t)batch * nb);
    for (int64_t i = 0; i < (int64_t)batch * nb; i++) {
        for (int j = 0; j < 32; j++) x[i].qs[j] = (int8_t)rnd();
        switch (flavour) {
        case FL_EXTREME:     x[i].d = extreme_f16[rnd() % 8]; break;
        case FL_ZERO_SCALES: x[i].d = rnd() % 3 ? dl_f32_to_f16(rnd_unit() * 0.1f) : 0; break;
        case FL_MAX_CODES:   memset(x[i].qs, rnd() & 1 ? 0x80 : 0x7F, 32); x[i].d = 0x3C00; break;
        default:             x[i].d = dl_f32_to_f16(rnd_unit() * 0.1f); break;
        }
    }
    return x;
}

/* q80 weights [rows, cols]: any int8 (-128 too), scales by flavour; x of the q80 matmuls comes from
 * make_q80 with -128 replaced (dl_quantize_q80 never makes it: the AVX2 sign trick relies on it) */
static dl_block_q80 *make_q80w(tcase *c, int rows, int cols, int flavour) {
    dl_block_q80 *w = make_q80(c, rows, cols, flavour);
    const int nb = cols / DL_QK;
    if (flavour == FL_MAX_CODES)   /* -128 or +127 everywhere */
        for (int64_t i = 0; i < (int64_t)rows * nb; i++) memset(w[i].qs, rnd() & 1 ? 0x80 : 0x7F, 32);
    if (flavour == FL_INF_SCALE) w[(rows / 2) * nb].d = 0x7C00;
    return w;
}

static void no_minus_128(dl_block_q80 *x, int64_t nblocks) {
    for (int64_t i = 0; i < nblocks; i++)
        for (int j = 0; j < 32; j++) if (x[i].qs[j] == -128) x[i].qs[j] = -127;
}

static float *make_f32(tcase *c, size_t n, float scale) {
    float *v = case_alloc(c, sizeof(float) * n);
    for (size_t i = 0; i < n; i++) v[i] = rnd_normal() * scale;
    return v;
}

/* magnitudes of q40 x q80 outputs: sum over all products of |(code - 8) * q| * |dw * dx| (the
 * error bound of any summation order: SIMD paths sum partial dots per lane); inf if a scale is */
static double *mag_q40_q80(tcase *c, const dl_block_q40 *w, const dl_block_q80 *x, int rows, int cols, int batch) {
    const int nb = cols / DL_QK;
    double *m = case_alloc(c, sizeof(double) * (size_t)rows * batch);
    for (int b = 0; b < batch; b++)
        for (int r = 0; r < rows; r++) {
            double s = 0;
            for (int k = 0; k < nb; k++) {
                const dl_block_q40 *wb = w + (size_t)r * nb + k;
                const dl_block_q80 *xb = x + (size_t)b * nb + k;
                int64_t adot = 0;
                for (int j = 0; j < 16; j++)
                    adot += llabs((int64_t)((wb->qs[j] & 15) - 8) * xb->qs[j]) +
                            llabs((int64_t)((wb->qs[j] >> 4) - 8) * xb->qs[j + 16]);
                s += (double)adot * fabs((double)dl_f16_to_f32(wb->d) * dl_f16_to_f32(xb->d));
            }
            m[(size_t)b * rows + r] = s;
        }
    return m;
}

static double *mag_q80_q80(tcase *c, const dl_block_q80 *w, const dl_block_q80 *x, int rows, int cols, int batch) {
    const int nb = cols / DL_QK;
    double *m = case_alloc(c, sizeof(double) * (size_t)rows * batch);
    for (int b = 0; b < batch; b++)
        for (int r = 0; r < rows; r++) {
            double s = 0;
            for (int k = 0; k < nb; k++) {
                const dl_block_q80 *wb = w + (size_t)r * nb + k, *xb = x + (size_t)b * nb + k;
                int64_t adot = 0;
                for (int j = 0; j < 32; j++) adot += llabs((int64_t)wb->qs[j] * xb->qs[j]);
                s += (double)adot * fabs((double)dl_f16_to_f32(wb->d) * dl_f16_to_f32(xb->d));
            }
            m[(size_t)b * rows + r] = s;
        }
    return m;
}

/* dense [rows, cols] x [batch, cols]: sum of |w x| per output */
static double *mag_dense(tcase *c, const float *w, const float *x, int rows, int cols, int batch) {
    double *m = case_alloc(c, sizeof(double) * (size_t)rows * batch);
    for (int b = 0; b < batch; b++)
        for (int r = 0; r < rows; r++) {
            double s = 0;
            for (int k = 0; k < cols; k++) s += fabs((double)w[(size_t)r * cols + k] * x[(size_t)b * cols + k]);
            m[(size_t)b * rows + r] = s;
        }
    return m;
}

/* ------------------------------------------------------------------------------------------ */
/* the kernels under test: setup(c, i) fills case i, run(c, out) calls the kernel */

static const int MM_SHAPES[][3] = {   /* rows, cols, batch: tails of every kind */
    {1, 32, 1}, {3, 64, 2}, {15, 96, 3}, {16, 32, 1}, {17, 2080, 1}, {33, 160, 7}, {37, 320, 9},
    {48, 2080, 5}, {5, 64, 17}, {64, 1024, 1}, {21, 64, 33}};
#define N_MM_SHAPES ((int)(sizeof(MM_SHAPES) / sizeof(MM_SHAPES[0])))

static void setup_mm(tcase *c, int i, int min_batch) {
    const int *s = MM_SHAPES[i % N_MM_SHAPES];
    c->rows = s[0]; c->cols = s[1]; c->batch = s[2] < min_batch ? min_batch : s[2];
    c->flavour = i / N_MM_SHAPES;
    c->in[0] = make_q40(c, c->rows, c->cols, c->flavour);
    c->in[1] = make_q80(c, c->batch, c->cols, c->flavour);
    c->mag = mag_q40_q80(c, c->in[0], c->in[1], c->rows, c->cols, c->batch);
    c->xrow_bytes = sizeof(dl_block_q80) * (size_t)(c->cols / DL_QK);
    c->out_bytes = sizeof(float) * (size_t)c->rows * c->batch;
    snprintf(c->desc, sizeof c->desc, "rows %d cols %d batch %d %s", c->rows, c->cols, c->batch, flavour_name[c->flavour]);
}

static void setup_q40(tcase *c, int i) { setup_mm(c, i, 1); }
static void run_q40(tcase *c, void *out) {
    dl_matmul_q40_q80(out, c->in[0], c->in[1], c->rows, c->cols, c->batch);
}

/* q40r: repacked once (scalar, 1 thread: the layout is the same on every ISA) */
static void setup_q40r(tcase *c, int i) {
    setup_mm(c, i, 1);
    const int isa = dl_get_isa();
    dl_set_isa(DL_ISA_SCALAR);
    dl_pool_init(1);
    c->in[2] = case_alloc(c, dl_q40r_bytes(c->rows, c->cols));
    dl_repack_q40(c->in[2], c->in[0], c->rows, c->cols);
    dl_set_isa(isa);
}
static void run_q40r(tcase *c, void *out) {
    dl_matmul_q40r_q80(out, c->in[2], c->in[1], c->rows, c->cols, c->batch);
}

/* q40r matvec with every stream split (x86 reads 1..4 groups side by side) and prefetch on/off */
static void setup_q40r_split(tcase *c, int i) {
    const int s = 1 + i % 4, pf = (i / 4) % 2;
    setup_q40r(c, 9 + (i / 8) % 2);   /* the matvec shapes 64x1024 and 21x64 of MM_SHAPES */
    c->batch = 1;
    c->out_bytes = sizeof(float) * (size_t)c->rows;
    c->opt = s + 8 * pf;
    snprintf(c->desc + strlen(c->desc), sizeof c->desc - strlen(c->desc), " split %d prefetch %d", s, pf);
}
static void run_q40r_split(tcase *c, void *out) {
    dl_q40r_split(c->opt & 7);
    dl_weights_prefetch(c->opt & 8 ? 1024 : 0);
    run_q40r(c, out);
    dl_q40r_split(0);          /* back to the defaults */
    dl_weights_prefetch(-2);
}

/* repack -> unpack gives the input back (bytes; repack runs over the pool) */
static void setup_repack(tcase *c, int i) {
    setup_mm(c, i, 1);
    c->xrow_bytes = 0;
    c->out_bytes = sizeof(dl_block_q40) * (size_t)c->rows * (c->cols / DL_QK);
}
static void run_repack(tcase *c, void *out) {
    void *r = malloc(dl_q40r_bytes(c->rows, c->cols));
    dl_repack_q40(r, c->in[0], c->rows, c->cols);
    dl_unpack_q40r(out, r, c->rows, c->cols);
    free(r);
}
static int check_repack(tcase *c, const void *ref) { return memcmp(ref, c->in[0], c->out_bytes) == 0; }

/* q80 quantization: random, tiny and huge values, zero blocks, exact halves (ties to even) */
static void setup_quant(tcase *c, int i) {
    static const int ns[] = {32, 64, 32 * 37};
    c->n = ns[i % 3];
    c->flavour = i / 3;
    float *x = make_f32(c, (size_t)c->n, 1.0f);
    for (int j = 0; j < c->n; j++) {
        switch (c->flavour) {
        case 1: x[j] *= 1e-30f; break;                       /* smallest scales where 1/d is finite */
        case 2: x[j] *= 1e30f; break;
        case 3: if ((j / 32) % 2) x[j] = 0.0f; break;        /* every other block all zeros */
        case 4: x[j] = (float)rnd_int(-254, 254) / 2; if (j % 32 == 0) x[j] = -127.0f; break;  /* d = 1 */
        case 5: x[j] = (float)(j % 32) - 16.0f + 0.5f; break;
        default: break;
        }
    }
    c->in[0] = x;
    c->out_bytes = sizeof(dl_block_q80) * (size_t)(c->n / DL_QK);
    snprintf(c->desc, sizeof c->desc, "n %d flavour %d", c->n, c->flavour);
}
static void run_quant(tcase *c, void *out) { dl_quantize_q80(out, c->in[0], c->n); }

/* q80 x q80, plain and repacked (q80r: repacked once by the scalar path, as q40r) */
static void setup_q80(tcase *c, int i) {
    const int *s = MM_SHAPES[i % N_MM_SHAPES];
    c->rows = s[0]; c->cols = s[1]; c->batch = s[2];
    c->flavour = i / N_MM_SHAPES;
    c->in[0] = make_q80w(c, c->rows, c->cols, c->flavour);
    c->in[1] = make_q80(c, c->batch, c->cols, c->flavour);
    no_minus_128(c->in[1], (int64_t)c->batch * (c->cols / DL_QK));
    c->mag = mag_q80_q80(c, c->in[0], c->in[1], c->rows, c->cols, c->batch);
    c->xrow_bytes = sizeof(dl_block_q80) * (size_t)(c->cols / DL_QK);
    c->out_bytes = sizeof(float) * (size_t)c->rows * c->batch;
    snprintf(c->desc, sizeof c->desc, "rows %d cols %d batch %d %s", c->rows, c->cols, c->batch, flavour_name[c->flavour]);
}
static void run_q80(tcase *c, void *out) { dl_matmul_q80_q80(out, c->in[0], c->in[1], c->rows, c->cols, c->batch); }

static void setup_q80r(tcase *c, int i) {
    setup_q80(c, i);
    c->in[2] = case_alloc(c, dl_q80r_bytes(c->rows, c->cols));
    dl_repack_q80(c->in[2], c->in[0], c->rows, c->cols);   /* the driver runs setups on scalar, 1 thread */
}
static void run_q80r(tcase *c, void *out) { dl_matmul_q80r_q80(out, c->in[2], c->in[1], c->rows, c->cols, c->batch); }

/* repack -> unpack gives the q80 input back */
static void setup_repack_q80(tcase *c, int i) {
    setup_q80(c, i);
    c->mag = NULL;
    c->xrow_bytes = 0;
    c->out_bytes = sizeof(dl_block_q80) * (size_t)c->rows * (c->cols / DL_QK);
}
static void run_repack_q80(tcase *c, void *out) {
    void *r = malloc(dl_q80r_bytes(c->rows, c->cols));
    dl_repack_q80(r, c->in[0], c->rows, c->cols);
    dl_unpack_q80r(out, r, c->rows, c->cols);
    free(r);
}
static int check_repack_q80(tcase *c, const void *ref) { return memcmp(ref, c->in[0], c->out_bytes) == 0; }

/* f16 x f32: any cols (tails of every vector width), weights from normals, some f16 subnormals */
static void setup_f16mm(tcase *c, int i) {
    static const int sh[][3] = {{1, 1, 1}, {3, 7, 2}, {17, 33, 3}, {33, 100, 7}, {16, 2080, 1}, {5, 264, 9}, {9, 64, 17}};
    const int *s = sh[i];
    c->rows = s[0]; c->cols = s[1]; c->batch = s[2];
    const size_t nw = (size_t)c->rows * c->cols;
    uint16_t *w = case_alloc(c, sizeof(uint16_t) * nw);
    float *wf = case_alloc(c, sizeof(float) * nw);
    for (size_t j = 0; j < nw; j++) {
        w[j] = j % 37 == 5 ? extreme_f16[rnd() % 8] & 0x83FF : dl_f32_to_f16(rnd_normal());   /* subnormals, zeros */
        wf[j] = dl_f16_to_f32(w[j]);
    }
    float *x = make_f32(c, (size_t)c->batch * c->cols, 1.0f);
    c->in[0] = w; c->in[1] = x;
    c->mag = mag_dense(c, wf, x, c->rows, c->cols, c->batch);
    c->xrow_bytes = sizeof(float) * (size_t)c->cols;
    c->out_bytes = sizeof(float) * (size_t)c->rows * c->batch;
    snprintf(c->desc, sizeof c->desc, "rows %d cols %d batch %d", c->rows, c->cols, c->batch);
}
static void run_f16mm(tcase *c, void *out) { dl_matmul_f16_f32(out, c->in[0], c->in[1], c->rows, c->cols, c->batch); }

/* f32 matmul: cols that are no multiple of any vector width */
static void setup_f32mm(tcase *c, int i) {
    static const int sh[][3] = {{1, 1, 1}, {3, 5, 2}, {17, 33, 3}, {33, 100, 7}, {16, 2080, 1}, {5, 257, 9}};
    const int *s = sh[i];
    c->rows = s[0]; c->cols = s[1]; c->batch = s[2];
    float *w = make_f32(c, (size_t)c->rows * c->cols, 1.0f), *x = make_f32(c, (size_t)c->batch * c->cols, 1.0f);
    c->in[0] = w; c->in[1] = x;
    c->mag = mag_dense(c, w, x, c->rows, c->cols, c->batch);
    c->xrow_bytes = sizeof(float) * (size_t)c->cols;
    c->out_bytes = sizeof(float) * (size_t)c->rows * c->batch;
    snprintf(c->desc, sizeof c->desc, "rows %d cols %d batch %d", c->rows, c->cols, c->batch);
}
static void run_f32mm(tcase *c, void *out) { dl_matmul_f32(out, c->in[0], c->in[1], c->rows, c->cols, c->batch); }

/* bf16 x f32: the f16 shapes, weights from normals (their top 16 bits), some tiny and zero ones */
static void setup_bf16mm(tcase *c, int i) {
    setup_f16mm(c, i);
    const size_t nw = (size_t)c->rows * c->cols;
    uint16_t *w = c->in[0];
    float *wf = case_alloc(c, sizeof(float) * nw);
    for (size_t j = 0; j < nw; j++) {
        float v = j % 29 == 3 ? 1e-39f * (float)(j % 5) : rnd_normal();   /* subnormals and zeros too */
        uint32_t u;
        memcpy(&u, &v, 4);
        w[j] = (uint16_t)(u >> 16);
        u = (uint32_t)w[j] << 16;
        memcpy(&wf[j], &u, 4);
    }
    c->mag = mag_dense(c, wf, c->in[1], c->rows, c->cols, c->batch);
}
static void run_bf16mm(tcase *c, void *out) { dl_matmul_bf16_f32(out, c->in[0], c->in[1], c->rows, c->cols, c->batch); }

/* ------------------------------------------------------------------------------------------ */
/* the GGUF block types on the rx layouts (kernels/matmul_rx.c): blocks of random bytes with finite
 * f16 scales (random, extreme or zero by flavour), repacked by the scalar path */

typedef struct {
    const char *name;
    int type, values, bytes;                 /* DL_T_*, values and bytes of one block (unit) */
    int f16_at[2];                           /* f16 scale fields of a block (-1: none) */
    int codes_at, codes_len;                 /* the code bytes: zeroed, they leave the block's offset */
    int affine;
    size_t (*nbytes)(int, int);
    void (*repack)(void *, const void *, int, int);
    void (*unpack)(void *, const void *, int, int);
    void (*matmul)(float *, const void *, const dl_block_q80 *, int, int, int);
} rx_type;

static const rx_type RX_TYPES[] = {
    {"q41", DL_T_Q4_1, 32, 20, {0, 2}, 4, 16, 1, dl_q41r_bytes, dl_repack_q41, dl_unpack_q41r, dl_matmul_q41r_q80},
    {"q50", DL_T_Q5_0, 32, 22, {0, -1}, 2, 20, 0, dl_q50r_bytes, dl_repack_q50, dl_unpack_q50r, dl_matmul_q50r_q80},
    {"q4k", DL_T_Q4_K, 256, 144, {0, 2}, 16, 128, 1, dl_q4kr_bytes, dl_repack_q4k, dl_unpack_q4kr, dl_matmul_q4kr_q80},
    {"q6k", DL_T_Q6_K, 256, 210, {208, -1}, 0, 192, 0, dl_q6kr_bytes, dl_repack_q6k, dl_unpack_q6kr, dl_matmul_q6kr_q80},
    {"q2k", DL_T_Q2_K, 256, 84, {80, 82}, 16, 64, 1, dl_q2kr_bytes, dl_repack_q2k, dl_unpack_q2kr, dl_matmul_q2kr_q80},
    {"iq4nl", DL_T_IQ4_NL, 32, 18, {0, -1}, 2, 16, 0, dl_iq4nlr_bytes, dl_repack_iq4nl, dl_unpack_iq4nlr, dl_matmul_iq4nlr_q80},
    {"iq4xs", DL_T_IQ4_XS, 256, 136, {0, -1}, 8, 128, 0, dl_iq4xsr_bytes, dl_repack_iq4xs, dl_unpack_iq4xsr, dl_matmul_iq4xsr_q80},
    {"q51", DL_T_Q5_1, 32, 24, {0, 2}, 4, 20, 1, dl_q51r_bytes, dl_repack_q51, dl_unpack_q51r, dl_matmul_q51r_q80},
    {"q3k", DL_T_Q3_K, 256, 110, {108, -1}, 0, 96, 0, dl_q3kr_bytes, dl_repack_q3k, dl_unpack_q3kr, dl_matmul_q3kr_q80},
    {"q5k", DL_T_Q5_K, 256, 176, {0, 2}, 16, 160, 1, dl_q5kr_bytes, dl_repack_q5k, dl_unpack_q5kr, dl_matmul_q5kr_q80},
};

static const int RX_SHAPES[][3] = {   /* rows, blocks per row, batch: group tails, matvec, batched */
    {1, 1, 1}, {3, 2, 2}, {16, 1, 1}, {17, 3, 3}, {33, 2, 9}, {40, 4, 1}, {5, 1, 17}, {48, 2, 5}};
#define N_RX_SHAPES ((int)(sizeof(RX_SHAPES) / sizeof(RX_SHAPES[0])))

static uint8_t *make_rx(tcase *c, const rx_type *t, int rows, int cols, int flavour) {
    const int64_t nb = (int64_t)rows * (cols / t->values);
    uint8_t *w = case_alloc(c, (size_t)nb * t->bytes);
    for (int64_t i = 0; i < nb; i++) {
        uint8_t *b = w + i * t->bytes;
        for (int j = 0; j < t->bytes; j++) b[j] = (uint8_t)rnd();
        for (int f = 0; f < 2; f++) {
            if (t->f16_at[f] < 0) continue;
            uint16_t d;
            switch (flavour) {
            case FL_EXTREME:     d = extreme_f16[rnd() % 8]; break;
            case FL_ZERO_SCALES: d = rnd() % 3 ? 0 : dl_f32_to_f16(rnd_normal() * 0.01f); break;
            case FL_MAX_CODES:   d = 0x3C00; memset(b + t->codes_at, 0xFF, (size_t)t->codes_len); break;
            default:             d = dl_f32_to_f16(rnd_normal() * 0.01f); break;
            }
            memcpy(b + t->f16_at[f], &d, 2);
        }
    }
    return w;
}

/* per output: sum over values of (|w| + 2 |offset|) * |x|, the offset being what the value is with its
 * code zeroed (the affine types' float term: SIMD and scalar round the two terms apart) */
static double *mag_rx(tcase *c, const rx_type *t, const uint8_t *w, const dl_block_q80 *x, int rows, int cols, int batch) {
    const size_t rb = (size_t)(cols / t->values) * t->bytes;
    float *wv = malloc(sizeof(float) * (size_t)cols), *ov = malloc(sizeof(float) * (size_t)cols), *xv = malloc(sizeof(float) * (size_t)cols);
    uint8_t *zero = malloc(rb);
    double *m = case_alloc(c, sizeof(double) * (size_t)rows * batch);
    for (int r = 0; r < rows; r++) {
        dl_dequantize_rows(t->type, wv, w + (size_t)r * rb, NULL, 1, cols);
        memcpy(zero, w + (size_t)r * rb, rb);
        for (int k = 0; k < cols / t->values; k++) memset(zero + (size_t)k * t->bytes + t->codes_at, 0, (size_t)t->codes_len);
        dl_dequantize_rows(t->type, ov, zero, NULL, 1, cols);
        for (int b = 0; b < batch; b++) {
            dl_dequantize_q80(xv, x + (size_t)b * (cols / DL_QK), cols);
            double s = 0;
            for (int j = 0; j < cols; j++)
                s += (fabs((double)wv[j]) + (t->affine ? 2 * fabs((double)ov[j]) : 0)) * fabs((double)xv[j]);
            m[(size_t)b * rows + r] = s;
        }
    }
    free(wv); free(ov); free(xv); free(zero);
    return m;
}

static void setup_rx(tcase *c, int i, const rx_type *t) {
    const int *s = RX_SHAPES[i % N_RX_SHAPES];
    c->rows = s[0]; c->cols = s[1] * (t->values > 32 ? t->values : 64); c->batch = s[2];
    c->flavour = i / N_RX_SHAPES;
    uint8_t *w = make_rx(c, t, c->rows, c->cols, c->flavour);
    c->in[0] = w;
    c->in[1] = make_q80(c, c->batch, c->cols, c->flavour);
    no_minus_128(c->in[1], (int64_t)c->batch * (c->cols / DL_QK));
    c->in[2] = case_alloc(c, t->nbytes(c->rows, c->cols));
    t->repack(c->in[2], w, c->rows, c->cols);          /* the driver runs setups on scalar, 1 thread */
    c->mag = mag_rx(c, t, w, c->in[1], c->rows, c->cols, c->batch);
    c->xrow_bytes = sizeof(dl_block_q80) * (size_t)(c->cols / DL_QK);
    c->out_bytes = sizeof(float) * (size_t)c->rows * c->batch;
    snprintf(c->desc, sizeof c->desc, "%s rows %d cols %d batch %d %s", t->name, c->rows, c->cols, c->batch,
             flavour_name[c->flavour]);
}

#define RX_ENTRY(k, T) \
    static void setup_##k(tcase *c, int i) { setup_rx(c, i, &RX_TYPES[T]); } \
    static void run_##k(tcase *c, void *out) { RX_TYPES[T].matmul(out, c->in[2], c->in[1], c->rows, c->cols, c->batch); } \
    static void setup_repack_##k(tcase *c, int i) { \
        setup_rx(c, i, &RX_TYPES[T]); \
        c->mag = NULL; \
        c->xrow_bytes = 0; \
        c->out_bytes = (size_t)c->rows * (c->cols / RX_TYPES[T].values) * RX_TYPES[T].bytes; \
    } \
    static void run_repack_##k(tcase *c, void *out) { \
        void *r = malloc(RX_TYPES[T].nbytes(c->rows, c->cols)); \
        RX_TYPES[T].repack(r, c->in[0], c->rows, c->cols); \
        RX_TYPES[T].unpack(out, r, c->rows, c->cols); \
        free(r); \
    } \
    static int check_repack_##k(tcase *c, const void *ref) { return memcmp(ref, c->in[0], c->out_bytes) == 0; }
RX_ENTRY(q41, 0)
RX_ENTRY(q50, 1)
RX_ENTRY(q4k, 2)
RX_ENTRY(q6k, 3)
RX_ENTRY(q2k, 4)
RX_ENTRY(iq4nl, 5)
RX_ENTRY(iq4xs, 6)
RX_ENTRY(q51, 7)
RX_ENTRY(q3k, 8)
RX_ENTRY(q5k, 9)

/* elementwise: n with every tail length */
static const int EW_N[] = {1, 3, 7, 8, 17, 32, 100, 2080};
#define N_EW ((int)(sizeof(EW_N) / sizeof(EW_N[0])))

static void setup_ew(tcase *c, int i) {   /* a, b: n floats; out: n floats (mag: |a| + |b|) */
    c->n = EW_N[i % N_EW];
    c->batch = 1 + i / N_EW;
    float *a = make_f32(c, (size_t)c->n * c->batch, 3.0f), *b = make_f32(c, (size_t)c->n * c->batch, 1.0f);
    if (c->n >= 4) { a[0] = -100.0f; a[1] = 100.0f; a[2] = 0.0f; a[3] = -87.5f; }   /* exp range ends */
    c->in[0] = a; c->in[1] = b;
    c->out_bytes = sizeof(float) * (size_t)c->n * c->batch;
    snprintf(c->desc, sizeof c->desc, "n %d batch %d", c->n, c->batch);
}
static void run_add(tcase *c, void *out) {
    memcpy(out, c->in[1], c->out_bytes);
    dl_add(out, c->in[0], (int64_t)c->n * c->batch);
}
static void run_silu(tcase *c, void *out) { dl_silu_mul(out, c->in[0], c->in[1], c->n, c->batch); }

/* Gemma's GeGLU and scale: gate values across the exp range and its clamps */
static void setup_gelu(tcase *c, int i) {
    setup_ew(c, i);
    static const float special[] = {-100.0f, 100.0f, 0.0f, -10.0f, 10.0f, -3.5f, 1e-30f, -60.0f};
    float *g = c->in[0];
    for (int j = 0; j < c->n * c->batch; j++) g[j] *= 4.0f;
    for (int j = 0; j < c->n && j < 8; j++) g[j] = special[j];
}
static void run_gelu(tcase *c, void *out) { dl_gelu_mul(out, c->in[0], c->in[1], (int64_t)c->n * c->batch); }
static void run_scale(tcase *c, void *out) {
    memcpy(out, c->in[0], c->out_bytes);
    dl_scale(out, 25.298221f, (int64_t)c->n * c->batch);
}

/* softmax in place (dl_attention's; SIMD paths compute the scalar bits) */
static void run_softmax(tcase *c, void *out) {
    memcpy(out, c->in[0], c->out_bytes);
    for (int b = 0; b < c->batch; b++) dl_softmax((float *)out + (size_t)b * c->n, c->n);
}
static void setup_rmsnorm(tcase *c, int i) {
    setup_ew(c, i);
    c->mag = case_alloc(c, sizeof(double) * (size_t)c->n * c->batch);   /* relative to |out| */
    const float *x = c->in[0], *w = c->in[1];
    for (int b = 0; b < c->batch; b++) {
        double ss = 0;
        for (int j = 0; j < c->n; j++) ss += (double)x[b * c->n + j] * x[b * c->n + j];
        const double inv = 1.0 / sqrt(ss / c->n + 1e-5);
        for (int j = 0; j < c->n; j++) c->mag[b * c->n + j] = fabs(w[j] * x[b * c->n + j] * inv) + 1e-30;
    }
}
static void run_rmsnorm(tcase *c, void *out) { dl_rmsnorm(out, c->in[0], c->in[1], c->n, 1e-5f, c->batch); }

/* dot and axpy: the attention's inner kernels (internal: through the dispatch table) */
static void setup_dot(tcase *c, int i) {
    setup_ew(c, i % N_EW);
    const float *a = c->in[0], *b = c->in[1];
    c->mag = case_alloc(c, sizeof(double) * (size_t)c->n);
    double m = 0;
    for (int j = 0; j < c->n; j++) m += fabs((double)a[j] * b[j]);
    c->mag[0] = m;
    for (int j = 0; j < c->n; j++) c->mag[j] = fabs((double)a[j] * 0.37) + fabs(b[j]) + (j ? 0 : m);
    c->out_bytes = sizeof(float) * (size_t)c->n;
}
static void run_dot(tcase *c, void *out) {
    float *o = out;
    memcpy(o, c->in[1], c->out_bytes);
    dl_k.axpy(o, 0.37f, c->in[0], c->n);          /* o = b + 0.37 a ... */
    o[0] = dl_k.dot(c->in[0], c->in[1], c->n);    /* ... and o[0] = a . b */
}

/* the attention's row kernels: n rows at a stride (head_dim floats out of a wider cache row).
 * They must give the bits of dot / axpy called row by row on the same ISA: run() computes both
 * and poisons the output with NaN where they differ, so any ISA fails its comparison then. */
static void setup_rows(tcase *c, int i) {
    static const int sh[][3] = {{1, 1, 1}, {5, 7, 9}, {16, 64, 512}, {3, 100, 128}, {17, 128, 256}, {2, 33, 40},
                                {9, 40, 64}, {4, 17, 20}, {6, 76, 80}};   /* n, hd, stride: every width's tail */
    const int *s = sh[i];
    c->n = s[0]; c->rows = s[1]; c->opt = s[2];
    c->in[0] = make_f32(c, (size_t)c->rows, 1.0f);                    /* q */
    c->in[1] = make_f32(c, (size_t)c->n * c->opt, 1.0f);              /* rows */
    c->in[2] = make_f32(c, (size_t)c->n, 0.3f);                       /* a */
    c->in[3] = make_f32(c, (size_t)c->rows, 1.0f);                    /* y start */
    c->out_bytes = sizeof(float) * (size_t)(c->n + c->rows);          /* n dots, then y */
    c->mag = case_alloc(c, sizeof(double) * (size_t)(c->n + c->rows));
    const float *q = c->in[0], *r = c->in[1], *a = c->in[2], *y = c->in[3];
    for (int j = 0; j < c->n; j++) {
        double m = 0;
        for (int k = 0; k < c->rows; k++) m += fabs((double)q[k] * r[(size_t)j * c->opt + k]);
        c->mag[j] = m;
    }
    for (int k = 0; k < c->rows; k++) {
        double m = fabs(y[k]);
        for (int j = 0; j < c->n; j++) m += fabs((double)a[j] * r[(size_t)j * c->opt + k]);
        c->mag[c->n + k] = m;
    }
    snprintf(c->desc, sizeof c->desc, "n %d hd %d stride %d", c->n, c->rows, c->opt);
}
static void run_rows(tcase *c, void *out) {
    float *o = out, *y = o + c->n, *yr = malloc(sizeof(float) * (size_t)c->rows);
    const float *q = c->in[0], *r = c->in[1], *a = c->in[2];
    dl_k.dot_rows(o, q, r, (size_t)c->opt, c->n, c->rows);
    memcpy(y, c->in[3], sizeof(float) * (size_t)c->rows);
    memcpy(yr, c->in[3], sizeof(float) * (size_t)c->rows);
    dl_k.axpy_rows(y, a, r, (size_t)c->opt, c->n, c->rows);
    for (int j = 0; j < c->n; j++) {
        const float d = dl_k.dot(q, r + (size_t)j * c->opt, c->rows);
        if (memcmp(&d, o + j, 4)) o[j] = NAN;
        dl_k.axpy(yr, a[j], r + (size_t)j * c->opt, c->rows);
    }
    for (int k = 0; k < c->rows; k++) if (memcmp(yr + k, y + k, 4)) y[k] = NAN;
    free(yr);
}
static int check_rows(tcase *c, const void *ref) {   /* the scalar reference was not poisoned */
    for (size_t e = 0; e < c->out_bytes / 4; e++) if (isnan(((const float *)ref)[e])) return 0;
    return 1;
}

/* q80 parts added into f32 */
static void setup_add_q80(tcase *c, int i) {
    static const int ns[] = {32, 96, 2080};
    c->n = ns[i % 3];
    c->opt = 1 + i / 3;   /* parts */
    float *x = make_f32(c, (size_t)c->n * c->opt, 1.0f);
    dl_block_q80 *q = case_alloc(c, sizeof(dl_block_q80) * (size_t)(c->n / DL_QK) * c->opt);
    const int isa = dl_get_isa();
    dl_set_isa(DL_ISA_SCALAR);
    dl_quantize_q80(q, x, (int64_t)c->n * c->opt);
    dl_set_isa(isa);
    c->in[0] = q;
    c->in[1] = make_f32(c, (size_t)c->n, 1.0f);
    c->out_bytes = sizeof(float) * (size_t)c->n;
    snprintf(c->desc, sizeof c->desc, "n %d parts %d", c->n, c->opt);
}
static void run_add_q80(tcase *c, void *out) {
    memcpy(out, c->in[1], c->out_bytes);
    dl_add_q80(out, c->in[0], c->opt, c->n);
}

/* paged attention: rows of several sequences (decode rows, a prefill run of consecutive positions),
 * pages listed out of order, GQA, sliding windows over a ring of pages, a row longer than the
 * kernel's 4096-score stack buffer. Scalar code calling dl_k.dot / axpy: tolerance relative to
 * max |v| (scores move by the dot's rounding). */
static void setup_attn(tcase *c, int i) {
    static const int sh[][8] = {   /* hd, nq, nkv, page size, ring pages, window, batch, max pos */
        {16, 3, 1, 4, 0, 0, 1, 0}, {32, 4, 2, 16, 0, 0, 3, 40}, {64, 6, 3, 4, 0, 0, 5, 77},
        {128, 2, 2, 16, 0, 0, 4, 100}, {8, 8, 2, 4, 0, 0, 6, 30}, {64, 4, 2, 4, 3, 8, 4, 60},
        {32, 2, 1, 16, 2, 17, 3, 200}, {8, 1, 1, 16, 0, 0, 2, 4500}};
    const int *s = sh[i];
    const int hd = s[0], nq = s[1], nkv = s[2], ps = s[3], ring = s[4], window = s[5], batch = s[6], maxpos = s[7];
    const int nseq = 3, stride = ring ? ring : maxpos / ps + 1, npages = nseq * stride + 2;
    const size_t kvrow = (size_t)nkv * hd, cache = (size_t)npages * ps * kvrow;
    int32_t *tables = case_alloc(c, sizeof(int32_t) * (size_t)nseq * stride);
    int32_t *perm = case_alloc(c, sizeof(int32_t) * (size_t)npages);
    for (int j = 0; j < npages; j++) perm[j] = j;
    for (int j = npages - 1; j > 0; j--) { const int k = rnd_int(0, j), t = perm[j]; perm[j] = perm[k]; perm[k] = t; }
    for (int j = 0; j < nseq * stride; j++) tables[j] = perm[j];   /* distinct pages, shuffled */
    int32_t *pos = case_alloc(c, sizeof(int32_t) * (size_t)batch), *slot = case_alloc(c, sizeof(int32_t) * (size_t)batch);
    const int run = batch / 2, p0 = rnd_int(0, maxpos - run > 0 ? maxpos - run : 0);
    for (int b = 0; b < batch; b++) {
        if (b < run) { slot[b] = 0; pos[b] = p0 + b; }                 /* a prefill chunk of sequence 0 */
        else { slot[b] = rnd_int(0, nseq - 1); pos[b] = b == batch - 1 ? maxpos : rnd_int(0, maxpos); }
    }
    int32_t *kv_of_q = case_alloc(c, sizeof(int32_t) * (size_t)nq);
    for (int h = 0; h < nq; h++) kv_of_q[h] = h * nkv / nq;
    dl_kv_pages *kv = case_alloc(c, sizeof(dl_kv_pages));
    kv->tables = tables; kv->table_stride = stride; kv->page_size = ps; kv->ring_pages = ring;
    float *v = make_f32(c, cache, 1.0f);
    c->in[0] = make_f32(c, (size_t)batch * nq * hd, 2.0f);
    c->in[1] = make_f32(c, cache, 1.0f);
    c->in[2] = v; c->in[3] = kv_of_q; c->in[4] = pos; c->in[5] = slot; c->in[6] = kv;
    c->rows = hd; c->cols = nq; c->n = nkv; c->batch = batch; c->opt = window;
    float vmax = 0;
    for (size_t j = 0; j < cache; j++) vmax = fabsf(v[j]) > vmax ? fabsf(v[j]) : vmax;
    c->out_bytes = sizeof(float) * (size_t)batch * nq * hd;
    c->mag = case_alloc(c, sizeof(double) * (size_t)batch * nq * hd);
    for (int j = 0; j < batch * nq * hd; j++) c->mag[j] = vmax;
    snprintf(c->desc, sizeof c->desc, "hd %d nq %d nkv %d page %d ring %d window %d batch %d pos <= %d",
             hd, nq, nkv, ps, ring, window, batch, maxpos);
}
static void run_attn(tcase *c, void *out) {
    dl_attention(out, c->in[0], c->in[1], c->in[2], c->in[3], c->cols, c->n, c->rows, c->in[4], c->in[5],
                 c->batch, c->in[6], c->opt, sqrtf((float)c->rows));
}

/* RoPE with per-row positions (both layouts; head_dim 512 takes the heap path) */
static void setup_rope(tcase *c, int i) {
    static const int sh[][3] = {{2, 1, 1}, {8, 3, 4}, {64, 4, 3}, {128, 2, 5}, {512, 1, 2}};   /* hd, heads, batch */
    const int *s = sh[i % 5];
    c->rows = s[0]; c->cols = s[1]; c->batch = s[2]; c->opt = i / 5 ? DL_ROPE_HALF : DL_ROPE_INTERLEAVED;
    c->in[0] = make_f32(c, (size_t)c->batch * c->cols * c->rows, 1.0f);
    int32_t *pos = case_alloc(c, sizeof(int32_t) * (size_t)c->batch);
    for (int b = 0; b < c->batch; b++) pos[b] = b == 0 ? 0 : rnd_int(0, 131071);
    float *freqs = case_alloc(c, sizeof(float) * (size_t)c->rows / 2);
    for (int j = 0; j < c->rows / 2; j++) freqs[j] = powf(500000.0f, -2.0f * j / c->rows);
    c->in[1] = pos; c->in[2] = freqs;
    c->out_bytes = sizeof(float) * (size_t)c->batch * c->cols * c->rows;
    snprintf(c->desc, sizeof c->desc, "hd %d heads %d batch %d %s", c->rows, c->cols, c->batch, c->opt ? "half" : "interleaved");
}
static void run_rope(tcase *c, void *out) {
    memcpy(out, c->in[0], c->out_bytes);
    dl_rope(out, c->cols, c->rows, c->in[1], c->batch, c->opt, c->in[2]);
}

/* log-probability summary of a logits slice (doubles out): ties, a target inside and outside */
static void setup_logits(tcase *c, int i) {
    static const int ns[] = {1, 7, 100, 2081};
    c->n = ns[i % 4];
    c->opt = (int[]){0, 1, 5, 20}[i % 4];   /* k */
    float *x = make_f32(c, (size_t)c->n, 3.0f);
    for (int j = 0; j + 3 < c->n; j += 7) x[j + 3] = x[j];   /* equal values */
    c->in[0] = x;
    c->prm[0] = i < 4 ? rnd_int(0, c->n - 1) : c->n + 3;    /* target */
    c->out_bytes = sizeof(double) * (size_t)(3 + 2 * c->opt);
    snprintf(c->desc, sizeof c->desc, "n %d k %d target %d", c->n, c->opt, c->prm[0]);
}
static void run_logits(tcase *c, void *out) { dl_logit_stats(out, c->in[0], c->n, 0.7f, c->prm[0], c->opt); }

/* greedy decoding's argmax over rows (dl_argmax_rows): every tail length, ties, NaNs, -inf rows,
 * signed zeros, the maximum in the tail; rows read in another order than stored */
static void setup_argmax(tcase *c, int i) {
    c->n = EW_N[i % N_EW];
    c->flavour = (i / N_EW) % 6;
    c->batch = 3;
    float *x = make_f32(c, (size_t)c->n * c->batch, 3.0f);
    for (int j = 0; j < c->n * c->batch; j++) {
        if (c->flavour == 1) x[j] = roundf(x[j]);                           /* ties */
        if (c->flavour == 2 && rnd_int(0, 40) == 0) x[j] = NAN;
        if (c->flavour == 3) x[j] = -INFINITY;
        if (c->flavour == 4) x[j] = rnd_int(0, 2) == 0 ? -1.0f : (rnd_int(0, 1) ? 0.0f : -0.0f);
    }
    if (c->flavour == 5)
        for (int b = 0; b < c->batch; b++) x[(size_t)b * c->n + c->n - 1] = 1e30f;   /* the tail's */
    int32_t *rows = case_alloc(c, sizeof(int32_t) * 4);
    rows[0] = 2; rows[1] = 0; rows[2] = 2; rows[3] = 1;
    c->in[0] = x; c->in[1] = rows;
    c->out_bytes = sizeof(double) * 2 * 4;
    snprintf(c->desc, sizeof c->desc, "n %d flavour %d", c->n, c->flavour);
}
static void run_argmax(tcase *c, void *out) {
    dl_argmax_rows(out, c->in[0], (size_t)c->n, c->in[1], 4, c->n, 7);
}

/* the pool's read-bandwidth probe: a checksum */
static void setup_readbytes(tcase *c, int i) {
    c->n = (i + 1) * 4099 * 8;
    uint64_t *a = case_alloc(c, (size_t)c->n);
    for (int j = 0; j < c->n / 8; j++) a[j] = rnd();
    c->in[0] = a;
    c->out_bytes = 8;
    snprintf(c->desc, sizeof c->desc, "bytes %d", c->n);
}
static void run_readbytes(tcase *c, void *out) {
    const uint64_t s = dl_read_bytes(c->in[0], (size_t)c->n);
    memcpy(out, &s, 8);
}
static int check_readbytes(tcase *c, const void *ref) {
    uint64_t s = 0, r;
    for (int j = 0; j < c->n / 8; j++) s += ((const uint64_t *)c->in[0])[j];
    memcpy(&r, ref, 8);
    return s == r;
}

/* the probe over several spans (the benchmark's weights): every stream count 1..8 (and out of
 * range), prefetch on and off; spans of odd word counts, one empty */
static void setup_readspans(tcase *c, int i) {
    static const int words[5] = {4099, 1, 0, 777, 10007};
    c->n = 0;
    for (int k = 0; k < 5; k++) {
        uint64_t *a = case_alloc(c, sizeof(uint64_t) * (size_t)(words[k] + 1));
        for (int j = 0; j < words[k]; j++) a[j] = rnd();
        c->in[k] = a;
        c->prm[k] = words[k];
        c->n += words[k];
    }
    c->opt = i;   /* streams = i % 10 (0 and 9: clamped to 1 and 8), prefetch on for odd i */
    c->out_bytes = 8;
    snprintf(c->desc, sizeof c->desc, "5 spans streams %d prefetch %d", i % 10, i & 1 ? 512 : 0);
}
static void run_readspans(tcase *c, void *out) {
    const void *p[5];
    size_t n[5];
    for (int k = 0; k < 5; k++) { p[k] = c->in[k]; n[k] = (size_t)c->prm[k] * 8; }
    const uint64_t s = dl_read_spans(p, n, 5, c->opt % 10, c->opt & 1 ? 512 : 0);
    memcpy(out, &s, 8);
}
static int check_readspans(tcase *c, const void *ref) {
    uint64_t s = 0, r;
    for (int k = 0; k < 5; k++)
        for (int j = 0; j < c->prm[k]; j++) s += ((const uint64_t *)c->in[k])[j];
    memcpy(&r, ref, 8);
    return s == r;
}

/* ------------------------------------------------------------------------------------------ */
/* the table */

#define NEON_ISAS (BIT(DL_ISA_NEON) | BIT(DL_ISA_NEON_DOTPROD))
typedef struct {
    const char *name;
    int ncases;
    void (*setup)(tcase *c, int i);
    void (*run)(tcase *c, void *out);
    unsigned exact;                  /* ISAs whose results must equal the reference bit for bit */
    double tol;                      /* others: |got - ref| <= tol * mag[e] (float outputs) */
    int (*check_ref)(tcase *c, const void *ref);   /* optional: the reference against the inputs */
} ktest;

static const ktest TESTS[] = {
    /* name            cases                   setup              run             exact          tol */
    {"quantize_q80",   3 * 6,                  setup_quant,       run_quant,      ALL_ISAS,      0, NULL},
    {"matmul_q40_q80", N_MM_SHAPES * N_FLAVOURS, setup_q40,       run_q40,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_q40r_q80", N_MM_SHAPES * N_FLAVOURS, setup_q40r,     run_q40r,       BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"q40r_matvec_split", 16,                  setup_q40r_split,  run_q40r_split, BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"repack_q40",     N_MM_SHAPES,            setup_repack,      run_repack,     ALL_ISAS,      0, check_repack},
    {"matmul_q80_q80", N_MM_SHAPES * N_FLAVOURS, setup_q80,       run_q80,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_q80r_q80", N_MM_SHAPES * N_FLAVOURS, setup_q80r,     run_q80r,       BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"repack_q80",     N_MM_SHAPES,            setup_repack_q80,  run_repack_q80, ALL_ISAS,      0, check_repack_q80},
    {"matmul_f16_f32", 7,                      setup_f16mm,       run_f16mm,      BIT(DL_ISA_SCALAR), 2e-6, NULL},
    {"matmul_bf16_f32", 7,                     setup_bf16mm,      run_bf16mm,     BIT(DL_ISA_SCALAR), 2e-6, NULL},
    {"matmul_q41r_q80", N_RX_SHAPES * N_FLAVOURS, setup_q41,      run_q41,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_q50r_q80", N_RX_SHAPES * N_FLAVOURS, setup_q50,      run_q50,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_q4kr_q80", N_RX_SHAPES * N_FLAVOURS, setup_q4k,      run_q4k,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_q6kr_q80", N_RX_SHAPES * N_FLAVOURS, setup_q6k,      run_q6k,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_q2kr_q80", N_RX_SHAPES * N_FLAVOURS, setup_q2k,      run_q2k,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_iq4nlr_q80", N_RX_SHAPES * N_FLAVOURS, setup_iq4nl,  run_iq4nl,      BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_iq4xsr_q80", N_RX_SHAPES * N_FLAVOURS, setup_iq4xs,  run_iq4xs,      BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_q51r_q80", N_RX_SHAPES * N_FLAVOURS, setup_q51,      run_q51,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_q3kr_q80", N_RX_SHAPES * N_FLAVOURS, setup_q3k,      run_q3k,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"matmul_q5kr_q80", N_RX_SHAPES * N_FLAVOURS, setup_q5k,      run_q5k,        BIT(DL_ISA_SCALAR) | NEON_ISAS, 1e-5, NULL},
    {"repack_q41",     N_RX_SHAPES,            setup_repack_q41,  run_repack_q41, ALL_ISAS,      0, check_repack_q41},
    {"repack_q50",     N_RX_SHAPES,            setup_repack_q50,  run_repack_q50, ALL_ISAS,      0, check_repack_q50},
    {"repack_q4k",     N_RX_SHAPES,            setup_repack_q4k,  run_repack_q4k, ALL_ISAS,      0, check_repack_q4k},
    {"repack_q6k",     N_RX_SHAPES,            setup_repack_q6k,  run_repack_q6k, ALL_ISAS,      0, check_repack_q6k},
    {"repack_q2k",     N_RX_SHAPES,            setup_repack_q2k,  run_repack_q2k, ALL_ISAS,      0, check_repack_q2k},
    {"repack_iq4nl",   N_RX_SHAPES,            setup_repack_iq4nl, run_repack_iq4nl, ALL_ISAS,  0, check_repack_iq4nl},
    {"repack_iq4xs",   N_RX_SHAPES,            setup_repack_iq4xs, run_repack_iq4xs, ALL_ISAS,  0, check_repack_iq4xs},
    {"repack_q51",     N_RX_SHAPES,            setup_repack_q51,  run_repack_q51, ALL_ISAS,      0, check_repack_q51},
    {"repack_q3k",     N_RX_SHAPES,            setup_repack_q3k,  run_repack_q3k, ALL_ISAS,      0, check_repack_q3k},
    {"repack_q5k",     N_RX_SHAPES,            setup_repack_q5k,  run_repack_q5k, ALL_ISAS,      0, check_repack_q5k},
    {"matmul_f32",     6,                      setup_f32mm,       run_f32mm,      BIT(DL_ISA_SCALAR), 2e-6, NULL},
    {"rmsnorm",        2 * N_EW,               setup_rmsnorm,     run_rmsnorm,    BIT(DL_ISA_SCALAR), 2e-6, NULL},
    {"add",            N_EW,                   setup_ew,          run_add,        ALL_ISAS,      0, NULL},
    {"add_q80",        3 * 3,                  setup_add_q80,     run_add_q80,    ALL_ISAS,      0, NULL},
    {"dot_axpy",       N_EW,                   setup_dot,         run_dot,        BIT(DL_ISA_SCALAR), 2e-6, NULL},
    {"dot_axpy_rows",  9,                      setup_rows,        run_rows,       BIT(DL_ISA_SCALAR), 2e-6, check_rows},
    {"silu_mul",       2 * N_EW,               setup_ew,          run_silu,       ALL_ISAS,      0, NULL},
    {"gelu_mul",       2 * N_EW,               setup_gelu,        run_gelu,       ALL_ISAS,      0, NULL},
    {"scale",          N_EW,                   setup_ew,          run_scale,      ALL_ISAS,      0, NULL},
    {"softmax",        2 * N_EW,               setup_ew,          run_softmax,    ALL_ISAS,      0, NULL},
    /* scalar code on every ISA (attention through dl_k.dot_rows / axpy_rows / softmax) */
    {"attention",      8,                      setup_attn,        run_attn,       BIT(DL_ISA_SCALAR), 1e-5, NULL},
    {"rope",           10,                     setup_rope,        run_rope,       ALL_ISAS,      0, NULL},
    {"logit_stats",    8,                      setup_logits,      run_logits,     ALL_ISAS,      0, NULL},
    {"argmax_rows",    6 * N_EW,               setup_argmax,      run_argmax,     ALL_ISAS,      0, NULL},
    {"read_bytes",     3,                      setup_readbytes,   run_readbytes,  ALL_ISAS,      0, check_readbytes},
    {"read_spans",     20,                     setup_readspans,   run_readspans,  ALL_ISAS,      0, check_readspans},
};
#define N_TESTS ((int)(sizeof(TESTS) / sizeof(TESTS[0])))

/* ------------------------------------------------------------------------------------------ */
/* driver */

static int isa_by_name(const char *s, size_t len) {
    for (int i = 0; i < N_ISA; i++)
        if (strlen(dl_isa_name(i)) == len && strncmp(dl_isa_name(i), s, len) == 0) return i;
    fprintf(stderr, "error: unknown ISA '%.*s'\n", (int)len, s);
    exit(2);
}

static unsigned isa_list(const char *s) {
    unsigned m = 0;
    while (*s) {
        const char *e = strchr(s, ',');
        const size_t len = e ? (size_t)(e - s) : strlen(s);
        if (len) m |= BIT(isa_by_name(s, len));
        s += len + (e ? 1 : 0);
    }
    return m;
}

/* first difference between got and ref, or -1; floats compare with tolerance unless exact */
static int64_t compare(const ktest *t, const tcase *c, const uint8_t *got, const uint8_t *ref, int exact,
                       double *worst) {
    for (size_t j = c->out_bytes; j < c->out_bytes + GUARD; j++)
        if (got[j] != SENTINEL) return (int64_t)j;
    if (exact || !c->mag) {
        for (size_t j = 0; j < c->out_bytes; j++)
            if (got[j] != ref[j]) return (int64_t)j / (c->mag ? 4 : 1);
        return -1;
    }
    const float *g = (const float *)got, *r = (const float *)ref;
    for (size_t e = 0; e < c->out_bytes / 4; e++) {
        if (!isfinite(r[e]) || !isfinite(g[e])) {   /* an inf scale: inf or NaN, by summation order */
            if (isfinite(r[e]) || isfinite(g[e])) return (int64_t)e;
            continue;
        }
        const double err = fabs((double)g[e] - r[e]), lim = t->tol * c->mag[e] + 1e-30;
        if (!(err <= lim)) return (int64_t)e;
        if (c->mag[e] > 0 && err / c->mag[e] > *worst) *worst = err / c->mag[e];
    }
    return -1;
}

/* batch invariance (continuous batching relies on it): each batch row of a matmul run alone gives
 * the bits that row got in the batched call */
static int check_rows_alone(const ktest *t, tcase *c, const uint8_t *got, int isa) {
    if (!c->xrow_bytes || c->batch < 2) return 0;
    const int batch = c->batch;
    const size_t row_out = c->out_bytes / (size_t)batch;
    uint8_t *x0 = c->in[1], *alone = malloc(row_out);
    int fails = 0;
    c->batch = 1;
    for (int b = 0; b < batch && !fails; b++) {
        c->in[1] = x0 + (size_t)b * c->xrow_bytes;
        t->run(c, alone);
        if (memcmp(alone, got + (size_t)b * row_out, row_out) != 0) {
            printf("FAIL %-18s %-12s %s: batch row %d differs from the row alone\n", t->name, dl_isa_name(isa), c->desc, b);
            fails++;
        }
    }
    c->batch = batch;
    c->in[1] = x0;
    free(alone);
    return fails;
}

static int run_test(const ktest *t, unsigned isas) {
    int fails = 0;
    unsigned ran = 0;
    double worst[N_ISA] = {0};
    for (int i = 0; i < t->ncases; i++) {
        tcase c;
        memset(&c, 0, sizeof c);
        rng_state = 0x9E3779B97F4A7C15ull ^ ((uint64_t)(t - TESTS) << 32) ^ (uint64_t)(i + 1);
        dl_set_isa(DL_ISA_SCALAR);
        dl_pool_init(1);
        t->setup(&c, i);
        uint8_t *ref = case_alloc(&c, c.out_bytes + GUARD), *first = case_alloc(&c, c.out_bytes + GUARD);
        uint8_t *got = case_alloc(&c, c.out_bytes + GUARD);
        memset(ref, SENTINEL, c.out_bytes + GUARD);
        dl_set_isa(DL_ISA_SCALAR);
        dl_pool_init(1);
        t->run(&c, ref);
        if (t->check_ref && !t->check_ref(&c, ref)) {
            printf("FAIL %-18s scalar reference wrong: %s\n", t->name, c.desc);
            fails++;
        }
        for (int isa = 0; isa < N_ISA; isa++) {
            if (!(isas & BIT(isa))) continue;
            ran |= BIT(isa);
            for (int th = 1; th <= MAX_THREADS; th++) {
                if (!dl_set_isa(isa) || dl_pool_init(th) != 0) { printf("FAIL cannot select %s / %d threads\n", dl_isa_name(isa), th); return 1; }
                memset(got, SENTINEL, c.out_bytes + GUARD);
                t->run(&c, got);
                int64_t bad;
                if (th == 1) {
                    memcpy(first, got, c.out_bytes + GUARD);
                    bad = compare(t, &c, got, ref, (t->exact >> isa) & 1, &worst[isa]);
                    if (bad >= 0) {
                        const int fl = c.mag && bad * 4 < (int64_t)c.out_bytes;
                        printf("FAIL %-18s %-12s %s: output %lld", t->name, dl_isa_name(isa), c.desc, (long long)bad);
                        if (fl) printf(" got %.9g want %.9g (tol %.3g x mag %.6g)", ((float *)got)[bad], ((float *)ref)[bad], t->tol, c.mag[bad]);
                        printf("\n");
                        fails++;
                    }
                    fails += check_rows_alone(t, &c, got, isa);
                } else if (memcmp(got, first, c.out_bytes + GUARD) != 0) {
                    printf("FAIL %-18s %-12s %s: %d threads differ from 1 thread\n", t->name, dl_isa_name(isa), c.desc, th);
                    fails++;
                }
            }
        }
        case_free(&c);
    }
    for (int isa = 0; isa < N_ISA; isa++)
        if (ran & BIT(isa))
            printf("%s %-18s %-12s %3d cases x 1-%d threads, %s\n", fails ? "----" : "ok  ", t->name, dl_isa_name(isa),
                   t->ncases, MAX_THREADS, (t->exact >> isa) & 1 ? "bit-identical" : "within tolerance");
    (void)worst;
    return fails;
}

int main(int argc, char **argv) {
    const char *only = NULL;
    unsigned require = 0, forbid = 0;
    for (int a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "--list")) {   /* the kernels, one name a line */
            for (int i = 0; i < N_TESTS; i++) printf("%s\n", TESTS[i].name);
            return 0;
        }
        if (!strcmp(argv[a], "--print-isa")) { printf("%s\n", dl_isa_name(dl_get_isa())); return 0; }
        if (!strcmp(argv[a], "--force-isa") && a + 1 < argc) {   /* probe: skips the support check */
            const char *s = argv[++a];
            const int isa = isa_by_name(s, strlen(s));
            dl_fill_table(&dl_k, isa);
            dl_isa_active = isa;
            tcase c;
            memset(&c, 0, sizeof c);
            rng_state = 1;
            setup_q40r(&c, 4);
            dl_fill_table(&dl_k, isa);
            dl_isa_active = isa;
            float *out = case_alloc(&c, c.out_bytes);
            run_q40r(&c, out);
            run_q40(&c, out);
            tcase c8;
            memset(&c8, 0, sizeof c8);
            setup_q80r(&c8, 4);
            dl_fill_table(&dl_k, isa);
            dl_isa_active = isa;
            float *out8 = case_alloc(&c8, c8.out_bytes);
            run_q80r(&c8, out8);
            run_q80(&c8, out8);
            printf("ran %s\n", s);
            return 0;
        }
        if (!strcmp(argv[a], "--only") && a + 1 < argc) { only = argv[++a]; continue; }
        if (!strcmp(argv[a], "--require") && a + 1 < argc) { require = isa_list(argv[++a]); continue; }
        if (!strcmp(argv[a], "--forbid") && a + 1 < argc) { forbid = isa_list(argv[++a]); continue; }
        fprintf(stderr, "usage: %s [--only NAME] [--require ISA,..] [--forbid ISA,..] | --list | --print-isa | --force-isa ISA\n", argv[0]);
        return 2;
    }
    unsigned isas = 0;
    printf("supported:");
    for (int isa = 0; isa < N_ISA; isa++)
        if (dl_isa_supported(isa)) { isas |= BIT(isa); printf(" %s", dl_isa_name(isa)); }
    printf("\n");
    int fails = 0;
    for (int isa = 0; isa < N_ISA; isa++) {
        if ((require & BIT(isa)) && !(isas & BIT(isa))) { printf("FAIL required ISA %s not supported\n", dl_isa_name(isa)); fails++; }
        if ((forbid & BIT(isa)) && (isas & BIT(isa))) { printf("FAIL ISA %s supported but should not be\n", dl_isa_name(isa)); fails++; }
    }
    int ntests = 0;
    for (int i = 0; i < N_TESTS; i++) {
        if (only && strcmp(only, TESTS[i].name)) continue;
        fails += run_test(&TESTS[i], isas);
        ntests++;
    }
    if (only && !ntests) { fprintf(stderr, "error: no test named %s\n", only); return 2; }
    dl_pool_free();
    printf("%s: %d kernels, %d failures\n", fails ? "FAILED" : "PASSED", ntests, fails);
    return fails ? 1 : 0;
}
