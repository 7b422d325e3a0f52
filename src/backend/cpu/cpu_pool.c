/* cpu_pool.c: a small persistent thread pool for the CPU backend's row-parallel ops.
 *
 * Tuned for many short jobs (one per op, a few hundred per forward pass): workers
 * are started once and sleep on a condition variable between jobs, so an idle pool
 * costs no CPU (OpenBLAS runs its own threads in between). A job is a range [0, n)
 * cut into chunks that the workers and the caller claim with an atomic counter. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "backend/cpu/cpu.h"
#include "util/util.h"

struct cpu_pool {
    int n_threads;           /* workers + the caller */
    pthread_t *workers;      /* [n_threads - 1] */
    pthread_mutex_t mu;
    pthread_cond_t wake;     /* a new job (or shutdown) */
    pthread_cond_t done;     /* the last worker left the job */
    uint64_t generation;     /* bumped per job, under mu */
    int busy;                /* workers still inside the current job, under mu */
    int shutdown;
    /* the current job */
    cpu_task_fn fn;
    void *ctx;
    int n, chunk;
    atomic_int next;         /* first item not yet claimed */
};

/* Claims chunks of the current job until none is left. */
static void pool_work(cpu_pool *p) {
    for (;;) {
        int begin = atomic_fetch_add(&p->next, p->chunk);
        if (begin >= p->n) return;
        int end = PD_MIN(begin + p->chunk, p->n);
        p->fn(p->ctx, begin, end);
    }
}

static void *pool_worker(void *arg) {
    cpu_pool *p = arg;
    uint64_t seen = 0;
    util_compute_thread();
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->shutdown && p->generation == seen) pthread_cond_wait(&p->wake, &p->mu);
        if (p->shutdown) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        pool_work(p);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

cpu_pool *cpu_pool_create(int n_threads) {
    PD_ASSERT(n_threads >= 1);
    cpu_pool *p = xcalloc(1, sizeof *p);
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->next, 0);
    p->workers = xcalloc((size_t)n_threads, sizeof(pthread_t));
    for (int i = 0; i < n_threads - 1; i++)
        if (pthread_create(&p->workers[i], NULL, pool_worker, p) != 0)
            pd_die("cpu backend: cannot start worker thread %d", i);
    return p;
}

void cpu_pool_free(cpu_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->shutdown = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_threads - 1; i++) pthread_join(p->workers[i], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    free(p->workers);
    free(p);
}

int cpu_pool_threads(const cpu_pool *p) { return p->n_threads; }

void cpu_pool_run(cpu_pool *p, int n, int grain, cpu_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    /* About 4 chunks per thread balances uneven rows (attention) without making
     * the atomic counter a hot spot. */
    int chunk = PD_MAX(grain, (n + 4 * p->n_threads - 1) / (4 * p->n_threads));
    if (p->n_threads == 1 || chunk >= n) {
        fn(ctx, 0, n);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    p->chunk = chunk;
    atomic_store(&p->next, 0);
    p->busy = p->n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    pool_work(p);

    pthread_mutex_lock(&p->mu);
    while (p->busy > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
