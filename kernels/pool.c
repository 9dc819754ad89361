/* Persistent thread pool: created once by dl_pool_init(n); workers spin briefly on a generation
 * counter, then sleep on a condition variable. dl_parallel_for hands each thread one contiguous
 * chunk (thread 0 = the calling thread). Shared state lives on separate cache lines. */
#define _GNU_SOURCE
#include "dl_internal.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if DL_X86
#include <immintrin.h>
#define DL_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define DL_PAUSE() __asm__ __volatile__("yield")
#else
#define DL_PAUSE() do {} while (0)
#endif

#define DL_MAX_THREADS 256
#define CL 64

typedef struct {
    /* job, written by the caller before bumping `gen` */
    _Alignas(CL) dl_range_fn fn;
    void *ctx;
    int64_t n, align;
    int guided;                          /* 0: one static chunk per thread; 1: guided (next) */
    _Alignas(CL) atomic_llong next;      /* guided: the first unit not yet taken */
    _Alignas(CL) atomic_uint gen;        /* job generation */
    _Alignas(CL) atomic_int done;        /* workers finished with the current generation */
    _Alignas(CL) atomic_int sleepers;    /* workers waiting on the condvar */
    atomic_int stop;
    _Alignas(CL) atomic_flag busy;       /* a parallel_for is in flight */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int nthreads;
    pthread_t threads[DL_MAX_THREADS];
    long spin_us;
} dl_pool;

static dl_pool *g_pool = NULL;

static inline int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void run_chunk(dl_pool *p, int tid) {
    int64_t n = p->n, a = p->align, nt = p->nthreads;
    int64_t units = (n + a - 1) / a;
    if (p->guided) {   /* take remaining / (2 nt) units at a time (at least one): big, then small */
        for (;;) {
            long long cur = atomic_load_explicit(&p->next, memory_order_relaxed);
            if (cur >= units) return;
            int64_t take = (units - cur) / (2 * nt);
            if (take < 1) take = 1;
            if (!atomic_compare_exchange_weak_explicit(&p->next, &cur, cur + take, memory_order_relaxed,
                                                       memory_order_relaxed))
                continue;
            int64_t s = cur * a, e = (cur + take) * a;
            if (e > n) e = n;
            p->fn(p->ctx, s, e);
        }
    }
    int64_t u0 = units * tid / nt, u1 = units * (tid + 1) / nt;
    int64_t s = u0 * a, e = u1 * a;
    if (e > n) e = n;
    if (s < e) p->fn(p->ctx, s, e);
}

typedef struct { dl_pool *p; int tid; } worker_arg;

static void *worker_main(void *argp) {
    worker_arg wa = *(worker_arg *)argp;
    free(argp);
    dl_pool *p = wa.p;
    unsigned seen = 0;   /* a new pool starts at generation 0 (a job may be posted before we run) */
    for (;;) {
        /* spin, then sleep */
        unsigned g;
        int64_t t0 = now_us();
        int it = 0;
        while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen) {
            if (atomic_load_explicit(&p->stop, memory_order_relaxed)) return NULL;
            DL_PAUSE();
            if ((++it & 255) == 0 && now_us() - t0 > p->spin_us) {
                pthread_mutex_lock(&p->mu);
                atomic_fetch_add(&p->sleepers, 1);
                while ((g = atomic_load(&p->gen)) == seen &&
                       !atomic_load_explicit(&p->stop, memory_order_relaxed))
                    pthread_cond_wait(&p->cv, &p->mu);
                atomic_fetch_sub(&p->sleepers, 1);
                pthread_mutex_unlock(&p->mu);
                if (atomic_load_explicit(&p->stop, memory_order_relaxed)) return NULL;
                break;
            }
        }
        g = atomic_load_explicit(&p->gen, memory_order_acquire);
        seen = g;
        run_chunk(p, wa.tid);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_acq_rel);
    }
}

void dl_pool_free(void) {
    dl_pool *p = g_pool;
    if (!p) return;
    g_pool = NULL;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->nthreads; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}

int dl_pool_init(int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > DL_MAX_THREADS) nthreads = DL_MAX_THREADS;
    if (g_pool && g_pool->nthreads == nthreads) return 0;
    dl_pool_free();
    dl_pool *p;
    if (posix_memalign((void **)&p, CL, sizeof(dl_pool)) != 0) return -1;
    memset(p, 0, sizeof(*p));
    p->nthreads = nthreads;
    atomic_init(&p->gen, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->stop, 0);
    atomic_flag_clear(&p->busy);
    const char *env = getenv("DLLAMA_SPIN_US");
    p->spin_us = env ? atol(env) : 200;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (int i = 1; i < nthreads; i++) {
        worker_arg *wa = malloc(sizeof(*wa));
        if (!wa) { p->nthreads = i; g_pool = p; dl_pool_free(); return -1; }
        wa->p = p; wa->tid = i;
        if (pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
            free(wa); p->nthreads = i; g_pool = p; dl_pool_free(); return -1;
        }
    }
    g_pool = p;
    return 0;
}

int dl_pool_nthreads(void) { return g_pool ? g_pool->nthreads : 1; }

static void parallel_for(int64_t n, int64_t align, dl_range_fn fn, void *ctx, int guided);

void dl_parallel_for(int64_t n, int64_t align, dl_range_fn fn, void *ctx) { parallel_for(n, align, fn, ctx, 0); }

/* the same over units of `align`, handed out guided: each thread takes remaining / (2 nthreads)
 * units at a time, so a thread that runs slower (its core or memory busier) takes less of the
 * tail instead of holding the others at the join. For kernels whose output per unit does not
 * depend on which thread or range computes it. */
void dl_parallel_for_guided(int64_t n, int64_t align, dl_range_fn fn, void *ctx) { parallel_for(n, align, fn, ctx, 1); }

static void parallel_for(int64_t n, int64_t align, dl_range_fn fn, void *ctx, int guided) {
    if (n <= 0) return;
    if (align < 1) align = 1;
    dl_pool *p = g_pool;
    /* one thread, too little work, or a concurrent/nested call: run inline */
    if (!p || p->nthreads <= 1 || n <= align || atomic_flag_test_and_set(&p->busy)) {
        fn(ctx, 0, n);
        return;
    }
    p->fn = fn; p->ctx = ctx; p->n = n; p->align = align; p->guided = guided;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_fetch_add(&p->gen, 1);                      /* seq_cst: pairs with the sleeper check */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    run_chunk(p, 0);
    int need = p->nthreads - 1;
    unsigned it = 0;
    while (atomic_load_explicit(&p->done, memory_order_acquire) < need) {
        DL_PAUSE();
        if ((++it & 4095) == 0) sched_yield();
    }
    atomic_flag_clear(&p->busy);
}
