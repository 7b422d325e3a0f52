/* cpu.h: the insides of the CPU backend, shared by the files of src/backend/cpu/.
 * Not a public interface: the rest of pdserve sees only backend_cpu_create().
 *
 * Tuned for correctness first (it is the oracle of every CUDA op) and then for a
 * small model on a few cores: matrix products go to OpenBLAS, which runs its own
 * threads; every other op is split over rows on a small persistent pool of our
 * own (cpu_pool). The two never run at once, so `threads` of each never
 * oversubscribe the cores: our workers sleep on a condition variable while
 * OpenBLAS computes. */
#ifndef PD_BACKEND_CPU_H
#define PD_BACKEND_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"

/* ---- thread pool ------------------------------------------------------------------ */

typedef struct cpu_pool cpu_pool;
/* Runs fn(ctx, begin, end) over disjoint ranges covering [0, n). */
typedef void (*cpu_task_fn)(void *ctx, int begin, int end);

/* n_threads >= 1 (the caller counts as one: n_threads - 1 workers are started). */
cpu_pool *cpu_pool_create(int n_threads);
void cpu_pool_free(cpu_pool *p);
int cpu_pool_threads(const cpu_pool *p);
/* Splits [0, n) into chunks of at least `grain` items, runs them on the pool and
 * the calling thread, returns when all are done. Not reentrant: one caller. */
void cpu_pool_run(cpu_pool *p, int n, int grain, cpu_task_fn fn, void *ctx);

/* ---- the backend's state ------------------------------------------------------------ */

typedef struct cpu_impl {
    cpu_pool *pool;
    size_t allocated; /* bytes handed out by ->alloc and not yet freed */
} cpu_impl;

static inline cpu_pool *cpu_pool_of(backend *b) { return ((cpu_impl *)b->impl)->pool; }

/* ---- ops (cpu_ops.c, cpu_rope.c, cpu_attention.c): the signatures of backend_ops ---- */

void cpu_embedding(backend *b, void *out, const void *table, const int32_t *ids, int T, int C);
void cpu_rmsnorm(backend *b, void *out, const void *x, const void *w, int T, int C, float eps);
void cpu_add_rmsnorm(backend *b, void *residual, void *out, const void *x, const void *w, int T,
                     int C, float eps);
void cpu_matmul(backend *b, void *out, const void *x, const void *w, const void *bias, int T,
                int Kd, int N);
void cpu_head_rmsnorm(backend *b, void *x, const void *w, int T, int row_stride, int head_offset,
                      int n_heads, int D, float eps);
void cpu_rope(backend *b, void *qkv, const int32_t *pos, const rope_params *rp, int T, int H,
              int K, int D);
void cpu_kv_store(backend *b, void *kcache, void *vcache, const void *qkv, const int32_t *slots,
                  int T, int H, int K, int D);
void cpu_attention(backend *b, void *out, const void *qkv, const void *kcache, const void *vcache,
                   const attn_seq *seqs, int B, int T, int H, int K, int D, int block_size,
                   float scale);
void cpu_swiglu(backend *b, void *out, const void *gu, int T, int F);
void cpu_gather_rows(backend *b, void *out, const void *x, const int32_t *rows, int n, int C);
/* fused ops (cpu_fused.c): the separate ops in sequence, so bit-identical to them */
void cpu_rope_kv_store(backend *b, void *qkv, void *kcache, void *vcache, const int32_t *pos,
                       const int32_t *slots, const rope_params *rp, int T, int H, int K, int D);
void cpu_matmul_swiglu(backend *b, void *out, void *gu, const void *x, const void *w, int T,
                       int Kd, int F);

#endif
