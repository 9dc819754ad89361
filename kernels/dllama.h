/* dllama-mpi C kernels: the one header.
 *
 * Layout rules shared with Python (dllama_mpi/kernels.py) and with Distributed Llama's files:
 *   - q40 block: f16 scale d + 16 bytes; value j = ((j < 16 ? qs[j] & 15 : qs[j-16] >> 4) - 8) * d
 *   - q80 block: f16 scale d + 32 int8;  value j = qs[j] * d
 *   - matrices are row-major [rows, cols]; cols % 32 == 0 for quantized matrices;
 *     pointers into a memory-mapped .m file can be unaligned: kernels use unaligned loads.
 *   - batched calls: `batch` rows of input (x[b] stride = cols) and output (out[b] stride = rows).
 * Every public function dispatches at run time to the best path the CPU has (AVX-512, AVX2+FMA,
 * NEON with dotprod, NEON, scalar); dl_set_isa() forces one so tests can compare each path with the scalar one.
 */
#ifndef DLLAMA_H
#define DLLAMA_H
#include <stdint.h>
#include <stddef.h>

#define DL_QK 32

typedef struct { uint16_t d; uint8_t qs[16]; } dl_block_q40;  /* 18 bytes */
typedef struct { uint16_t d; int8_t  qs[32]; } dl_block_q80;  /* 34 bytes */

/* DL_ISA_NEON_DOTPROD: NEON plus the ARMv8.2 sdot instructions (Cortex-A55/A76+, Apple, Graviton 2+),
 * detected at run time (getauxval HWCAP_ASIMDDP on Linux); the same binary runs plain NEON elsewhere. */
enum { DL_ISA_SCALAR = 0, DL_ISA_AVX2 = 1, DL_ISA_AVX512 = 2, DL_ISA_NEON = 3, DL_ISA_NEON_DOTPROD = 4 };
enum { DL_ROPE_INTERLEAVED = 0, DL_ROPE_HALF = 1 };

/* ---- CPU features and dispatch ---- */
int  dl_isa_supported(int isa);       /* 1 if this CPU and build can run that path */
int  dl_get_isa(void);                /* the path in use */
int  dl_set_isa(int isa);             /* force a path; returns 0 (and changes nothing) if unsupported */
const char *dl_isa_name(int isa);

/* ---- thread pool (persistent, created once; 1 = run on the calling thread) ---- */
int  dl_pool_init(int nthreads);      /* (re)creates the pool; returns 0 on success */
int  dl_pool_nthreads(void);
void dl_pool_free(void);

/* ---- f16 ---- */
float    dl_f16_to_f32(uint16_t h);
uint16_t dl_f32_to_f16(float f);      /* round to nearest even */

/* ---- quantization (n % 32 == 0). q80 rounds half to even on every path. ---- */
void dl_quantize_q80(dl_block_q80 *y, const float *x, int64_t n);
void dl_dequantize_q80(float *y, const dl_block_q80 *x, int64_t n);
void dl_quantize_q40(dl_block_q40 *y, const float *x, int64_t n);   /* Distributed Llama converter rule */
void dl_dequantize_q40(float *y, const dl_block_q40 *x, int64_t n);

/* ---- weight types: the values of the .m per-matrix type table (dllama_mpi/FORMATS-EXT.md) are
 * Distributed Llama's 0-3, and 32 + the GGML type id for the other GGUF block types ---- */
enum { DL_T_F32 = 0, DL_T_F16 = 1, DL_T_Q40 = 2, DL_T_Q80 = 3, DL_T_GGML = 32,
       DL_T_Q4_1 = 35, DL_T_Q5_0 = 38, DL_T_Q5_1 = 39, DL_T_Q2_K = 42, DL_T_Q3_K = 43, DL_T_Q4_K = 44,
       DL_T_Q5_K = 45, DL_T_Q6_K = 46, DL_T_IQ4_NL = 52, DL_T_IQ4_XS = 55, DL_T_BF16 = 62 };
int    dl_type_block_values(int type);       /* values per block (1 for f32 / f16 / bf16); 0 = unknown */
int    dl_type_block_bytes(int type);
size_t dl_type_row_bytes(int type, int cols);   /* 0: unknown type, or cols not whole blocks */
/* out[i] = row ids[i] (ids NULL: row i) of a [*, cols] matrix of that type, dequantized as ggml and
 * gguf-py do (kernels/dequant.c); returns -1 for an unknown type */
int    dl_dequantize_rows(int type, float *out, const void *src, const int32_t *ids, int n, int cols);

/* ---- matmul: out[b, r] = sum_c w[r, c] * x[b, c] ---- */
void dl_matmul_q40_q80(float *out, const dl_block_q40 *w, const dl_block_q80 *x,
                       int rows, int cols, int batch);
void dl_matmul_f32(float *out, const float *w, const float *x, int rows, int cols, int batch);

/* ---- interleaved ("repacked") q40: groups of DL_Q40R_ROWS rows, layout in kernels/repack.c.
 * Repack a [rows, cols] q40 matrix once at load, then multiply with dl_matmul_q40r_q80 (same
 * result as dl_matmul_q40_q80 up to float summation order; the scalar path is bit-identical).
 * dst should be 64-byte aligned (not required for correctness). ---- */
#define DL_Q40R_ROWS 16
size_t dl_q40r_bytes(int rows, int cols);
void dl_repack_q40(void *dst, const dl_block_q40 *src, int rows, int cols);
void dl_unpack_q40r(dl_block_q40 *dst, const void *src, int rows, int cols);
void dl_matmul_q40r_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
/* n repacked matrices [rows[i], cols] times the same x in one parallel job (x prepared once):
 * out[i] as dl_matmul_q40r_q80(out[i], w[i], x, rows[i], cols, batch) gives it */
void dl_matmul_q40r_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);
/* matvec tuning (results never change): rows read as n side-by-side streams per thread (1..4; 0 =
 * back to the ISA's default; < 0 just queries); returns the value in effect for the current ISA */
int  dl_q40r_split(int n);
int  dl_q40r_guided(int n);
/* the GGUF block types' (rx) matvec: groups read as n side-by-side streams per thread (1..4; 0 = back
 * to the default, DLLAMA_RX_SPLIT or 4; < 0 just queries); returns the value in effect */
int  dl_rx_split(int n);
/* the repacked kernels' x86 paths (q40r, q80r, rx): software prefetch of the weights this many bytes
 * ahead of the block each stream reads (0 = off; -2 = back to the default: DLLAMA_PREFETCH, or 2048
 * on an Intel CPU running AVX2 or AVX-512, else 0; -1 just queries); returns the value in effect for
 * the current ISA. Results never change. */
int  dl_weights_prefetch(int bytes);
/* memory read bandwidth probe: reads n bytes (their whole 64-bit words) over the thread pool,
 * returns the sum of the words; dl_read_spans reads n buffers as one job, each thread's share as
 * `streams` runs side by side (1..8) with a software prefetch `prefetch` bytes ahead (0: none) */
uint64_t dl_read_bytes(const void *p, size_t n);
uint64_t dl_read_spans(const void *const *ptrs, const size_t *bytes, int n, int streams, int prefetch);

/* ---- 8- and 16-bit weights (kernels/matmul_q80.c, kernels/matmul_f16.c); same out/batch layout.
 * q80 x q80: per block integer dot times f16(d_w) * f16(d_x), summed in float; x from
 * dl_quantize_q80 (values -127..127). f16 x f32: any cols; w may be unaligned. ---- */
void dl_matmul_q80_q80(float *out, const dl_block_q80 *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_f16_f32(float *out, const uint16_t *w, const float *x, int rows, int cols, int batch);

/* ---- interleaved ("repacked") q80, layout in kernels/matmul_q80.c: as q40r, repack once at load,
 * then dl_matmul_q80r_q80 (same result as dl_matmul_q80_q80 up to float summation order; the
 * scalar path is bit-identical). ---- */
#define DL_Q80R_ROWS 16
size_t dl_q80r_bytes(int rows, int cols);
void dl_repack_q80(void *dst, const dl_block_q80 *src, int rows, int cols);
void dl_unpack_q80r(dl_block_q80 *dst, const void *src, int rows, int cols);
void dl_matmul_q80r_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_q80r_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);   /* as dl_matmul_q40r_q80_n */

/* ---- bf16 x f32 (kernels/matmul_f16.c): as dl_matmul_f16_f32, bf16 weights ---- */
void dl_matmul_bf16_f32(float *out, const uint16_t *w, const float *x, int rows, int cols, int batch);

/* ---- the GGUF block types as 16-row interleaved layouts ("rx", kernels/matmul_rx.c): repacked once
 * at load from the file's blocks (the same bytes, rearranged: a slice's size does not change beyond
 * padding its last group to 16 rows), multiplied by q80 activations. Per type NAME:
 *   dl_NAMEr_bytes(rows, cols), dl_repack_NAME(dst, src blocks, rows, cols), dl_unpack_NAMEr (the
 *   inverse, for tests), dl_matmul_NAMEr_q80 (as dl_matmul_q40r_q80) and its _n form (as
 *   dl_matmul_q40r_q80_n). cols: whole blocks (32 values; 256 for the K types and IQ4_XS). ---- */
size_t dl_q41r_bytes(int rows, int cols);
void dl_repack_q41(void *dst, const void *src, int rows, int cols);
void dl_unpack_q41r(void *dst, const void *src, int rows, int cols);
void dl_matmul_q41r_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_q41r_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);
size_t dl_q50r_bytes(int rows, int cols);
void dl_repack_q50(void *dst, const void *src, int rows, int cols);
void dl_unpack_q50r(void *dst, const void *src, int rows, int cols);
void dl_matmul_q50r_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_q50r_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);
size_t dl_q51r_bytes(int rows, int cols);
void dl_repack_q51(void *dst, const void *src, int rows, int cols);
void dl_unpack_q51r(void *dst, const void *src, int rows, int cols);
void dl_matmul_q51r_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_q51r_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);
size_t dl_q4kr_bytes(int rows, int cols);
void dl_repack_q4k(void *dst, const void *src, int rows, int cols);
void dl_unpack_q4kr(void *dst, const void *src, int rows, int cols);
void dl_matmul_q4kr_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_q4kr_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);
size_t dl_q5kr_bytes(int rows, int cols);
void dl_repack_q5k(void *dst, const void *src, int rows, int cols);
void dl_unpack_q5kr(void *dst, const void *src, int rows, int cols);
void dl_matmul_q5kr_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_q5kr_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);
size_t dl_q6kr_bytes(int rows, int cols);
void dl_repack_q6k(void *dst, const void *src, int rows, int cols);
void dl_unpack_q6kr(void *dst, const void *src, int rows, int cols);
void dl_matmul_q6kr_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_q6kr_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);
size_t dl_q2kr_bytes(int rows, int cols);
void dl_repack_q2k(void *dst, const void *src, int rows, int cols);
void dl_unpack_q2kr(void *dst, const void *src, int rows, int cols);
void dl_matmul_q2kr_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_q2kr_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);
size_t dl_iq4nlr_bytes(int rows, int cols);
void dl_repack_iq4nl(void *dst, const void *src, int rows, int cols);
void dl_unpack_iq4nlr(void *dst, const void *src, int rows, int cols);
void dl_matmul_iq4nlr_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_iq4nlr_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                            const dl_block_q80 *x, int cols, int batch);
size_t dl_iq4xsr_bytes(int rows, int cols);
void dl_repack_iq4xs(void *dst, const void *src, int rows, int cols);
void dl_unpack_iq4xsr(void *dst, const void *src, int rows, int cols);
void dl_matmul_iq4xsr_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_iq4xsr_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                            const dl_block_q80 *x, int cols, int batch);
size_t dl_q3kr_bytes(int rows, int cols);
void dl_repack_q3k(void *dst, const void *src, int rows, int cols);
void dl_unpack_q3kr(void *dst, const void *src, int rows, int cols);
void dl_matmul_q3kr_q80(float *out, const void *w, const dl_block_q80 *x, int rows, int cols, int batch);
void dl_matmul_q3kr_q80_n(int n, float *const *out, const void *const *w, const int *rows,
                          const dl_block_q80 *x, int cols, int batch);

/* ---- elementwise / norms (batch rows of n, contiguous) ---- */
void dl_rmsnorm(float *out, const float *x, const float *w, int n, float eps, int batch);
void dl_silu_mul(float *out, const float *gate, const float *up, int n, int batch); /* out = silu(gate) * up, rows of n */
void dl_add(float *out, const float *a, int64_t n);                           /* out += a */
void dl_softmax(float *x, int n);
/* out += sum_p dequant(parts[p]) for p = 0..nparts-1, parts are consecutive q80 arrays of n values */
void dl_add_q80(float *out, const dl_block_q80 *parts, int nparts, int64_t n);

/* ---- RoPE in place on x[batch][n_heads * head_dim]; row b is at position pos[b].
 * freqs[head_dim/2] are the (already scaled) inverse frequencies. ---- */
void dl_rope(float *x, int n_heads, int head_dim, const int32_t *pos, int batch, int rope_type, const float *freqs);

/* ---- paged KV cache.
 * K and V of one layer are each [n_pages * page_size][n_kv_heads * head_dim] rows ("cache rows").
 * A sequence's table (row `slot` of tables, table_stride entries) lists its pages: position t is
 * cache row tables[slot][t / page_size] * page_size + t % page_size; with ring_pages > 0 (a
 * sliding-window layer keeping only a ring of pages) the table index is (t / page_size) % ring_pages. */
typedef struct {
    const int32_t *tables;
    int table_stride, page_size, ring_pages;
} dl_kv_pages;

/* dst[rows[i]] = src[i] for rows of row_len floats (new K/V rows into their cache rows) */
void dl_scatter_rows(float *dst, const float *src, const int32_t *rows, int n, int row_len);

/* ---- causal attention with GQA over the paged KV cache.
 * q, out: [batch][n_q_heads * head_dim]; row b is at position pos[b] of the sequence whose table is
 * slot[b], and attends to its positions 0..pos[b] (window > 0: the last `window` of them), whose K/V
 * rows are already in the cache. kv_of_q[h] = local kv head used by local query head h.
 * Scores are q.k / scale_div (sqrt(head_dim) for Llama). Each KV head's rows are read once for a
 * group of queries (its query heads over a run of rows of one sequence at consecutive positions),
 * with every row's and head's arithmetic that of dl_attention_rows below. ---- */
void dl_attention(float *out, const float *q, const float *k_cache, const float *v_cache,
                  const int32_t *kv_of_q, int n_q_heads, int n_kv_heads, int head_dim,
                  const int32_t *pos, const int32_t *slot, int batch, const dl_kv_pages *kv,
                  int window, float scale_div);
/* the same, one task per (row, query head), each reading its K/V rows itself: dl_attention's
 * reference (the same bits; tests and scripts/bench_attention.py) */
void dl_attention_rows(float *out, const float *q, const float *k_cache, const float *v_cache,
                       const int32_t *kv_of_q, int n_q_heads, int n_kv_heads, int head_dim,
                       const int32_t *pos, const int32_t *slot, int batch, const dl_kv_pages *kv,
                       int window, float scale_div);

/* ---- log-probabilities (kernels/logits.c): one rank's summary of its slice of a logits row.
 * out[3 + 2k]: max of y = x * inv_t, log-sum-exp of y, y[target] (-inf if target is outside [0, n)),
 * then the k largest (y, index) pairs, largest first, lower index first among equals. ---- */
void dl_logit_stats(double *out, const float *x, int n, float inv_t, int target, int k);
/* the attention's dot products through the active ISA (tests): out[i] = dot(q, rows[i * stride]),
 * each with dl_dot's bits */
float dl_dot(const float *a, const float *b, int n);
void dl_dot_rows(float *out, const float *q, const float *rows, size_t stride, int n, int hd);
/* ---- sampling summaries (kernels/logits.c): one slice's exact sampling weights in 64 exponent buckets
 * and its k largest logits as (x bits, id, M, E) records; and a whole row's probabilities. ---- */
void dl_sample_summary(int64_t *out, const float *x, int n, float inv_t, int id0, int k);
void dl_sample_probs(double *p, const float *x, int n, float inv_t, int64_t e_max, double z);
/* the summaries of rows rows[0..n_rows) of x (rows `stride` floats apart; inv_t per row) into
 * out + i * len, over the thread pool */
void dl_sample_summaries(int64_t *out, size_t len, const float *x, size_t stride, const int32_t *rows,
                         const float *inv_t, int n_rows, int n, int id0, int k);
/* greedy decoding: per row rows[k] of x (rows `stride` floats apart) the largest of its n values and
 * id0 + its first index (a NaN counts as the largest) as out[2k], out[2k + 1], over the thread pool;
 * n = 0: (-inf, id0). dl_argmax_f32: one row through the active ISA (-1 when n = 0). */
void dl_argmax_rows(double *out, const float *x, size_t stride, const int32_t *rows, int n_rows, int n, int id0);
int dl_argmax_f32(const float *x, int n);
/* a grammar's token mask on a slice of a logits row: x[i] = -inf unless bit id0 + i of words is set */
void dl_apply_token_mask(float *x, int n, const uint32_t *words, int id0);

/* ---- Gemma 3 ----
 * GeGLU: out = gelu_tanh(gate) * up (transformers' gelu_pytorch_tanh), any n; out may alias gate.
 * scale: x *= s (the embedding's sqrt(dim); q when query_pre_attn_scalar != head_dim). ---- */
void dl_gelu_mul(float *out, const float *gate, const float *up, int64_t n);

/* two kernels the engine calls back to back, in one call (the same bits as the two calls):
 * rmsnorm then q80 of its output; silu_mul (gelu_mul) then q80 of its output; x += q80 round trip of partial
 * (one rank's residual sync, tmp: n / 32 blocks); rope of q and of k; K and V rows into the cache */
void dl_rmsnorm_q80(dl_block_q80 *yq, float *out, const float *x, const float *w, int n, float eps, int batch);
void dl_silu_mul_q80(dl_block_q80 *yq, float *out, const float *gate, const float *up, int n, int batch);
void dl_gelu_mul_q80(dl_block_q80 *yq, float *out, const float *gate, const float *up, int64_t n);
void dl_add_via_q80(float *x, dl_block_q80 *tmp, const float *partial, int64_t n);
void dl_rope_qk(float *q, int n_q_heads, float *k, int n_kv_heads, int head_dim, const int32_t *pos, int batch,
                int rope_type, const float *freqs);
void dl_scatter_kv(float *k_dst, float *v_dst, const float *k, const float *v, const int32_t *rows, int n, int row_len);
void dl_scale(float *x, float s, int64_t n);

#endif
