/* bench_kernels_cuda.c: each CUDA backend op at Llama-3.1-8B shapes (C 4096, F 14336,
 * H 32, K 8, D 128, V 128256), against the card's two ceilings measured in the same
 * run:
 *   copy   device-to-device cudaMemcpy of 1 GiB (copy_d2d), in bytes read + written
 *          per second: the memory-bound ops' limit;
 *   gemm   cuBLAS bf16 GEMM 8192^3 (the matmul op with a square shape): the
 *          matrix-bound ops' limit.
 * Prints one row per op and shape: time per call, the achieved figure (GB/s of
 * bytes that must move, or TFLOP/s), the ceiling it is held against and the ratio.
 *
 * Method: inputs are random (never zeros), rotated among several copies where one
 * copy would fit in L2; each figure is the median of 5 timed batches of back-to-back
 * calls (events on the backend's stream), after a warm-up call. A program, never a
 * test (STYLE.md 9). Exits 77 when there is no GPU. --gemv: only the small-T matmul and
 * fused-op tables (GEMV vs cuBLAS at T = 1..8, fused vs separate decode ops).
 * --first-call ex|lt: a new row count's first matmul on each route (first_call below). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "util/util.h"

#if !PDSERVE_HAVE_CUDA
int main(void) {
    fprintf(stderr, "bench_kernels_cuda: pdserve was built without CUDA\n");
    return 77;
}
#else
#include "backend/cuda/backend_cuda.h"

enum { C_ = 4096, F_ = 14336, H_ = 32, K_ = 8, D_ = 128, V_ = 128256 };
#define QKV_ ((H_ + 2 * K_) * D_)
#define SETS_MAX 128
#define ROTATE_BYTES ((size_t)256 << 20) /* several L2s (50-60 MB on H100/H200) */

static backend *g;
static double copy_gbs;     /* ceiling: GB/s read + written */
static double gemm_tflops;  /* ceiling: TFLOP/s */

typedef void (*bench_fn)(void *ctx, int iter);

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median over 5 batches of the time of one call, in ms. Batches last about 20 ms. */
static double time_op(bench_fn fn, void *ctx) {
    fn(ctx, 0);
    g->ops->sync(g);
    backend_cuda_timer_start(g);
    fn(ctx, 1);
    double one = backend_cuda_timer_stop_ms(g);
    int iters = (int)(20.0 / (one > 1e-3 ? one : 1e-3));
    iters = PD_MAX(2, PD_MIN(iters, 500));
    double t[5];
    for (int r = 0; r < 5; r++) {
        backend_cuda_timer_start(g);
        for (int i = 0; i < iters; i++) fn(ctx, i);
        t[r] = backend_cuda_timer_stop_ms(g) / iters;
    }
    qsort(t, 5, sizeof t[0], cmp_double);
    return t[2];
}

static void *rand_buf(size_t n, float scale, uint64_t seed) {
    void *p = g->ops->alloc(g, n * 2);
    g->ops->fill_random(g, p, DTYPE_BF16, n, seed, scale);
    return p;
}

/* How many copies of a `bytes` input make the rotation larger than L2. */
static int sets_for(size_t bytes) {
    size_t s = (ROTATE_BYTES + bytes - 1) / bytes;
    return (int)PD_MAX(1, PD_MIN(s, SETS_MAX));
}

static void row_bw(const char *op, const char *shape, double ms, double bytes) {
    double gbs = bytes / (ms * 1e-3) / 1e9;
    printf("| %-13s | %-26s | %9.1f | %8.0f GB/s | %6.0f GB/s copy | %5.1f%% |\n", op, shape,
           ms * 1e3, gbs, copy_gbs, 100.0 * gbs / copy_gbs);
}

static void row_flops(const char *op, const char *shape, double ms, double flops) {
    double tf = flops / (ms * 1e-3) / 1e12;
    printf("| %-13s | %-26s | %9.1f | %6.1f TFLOP/s | %5.0f TFLOP/s gemm | %5.1f%% |\n", op, shape,
           ms * 1e3, tf, gemm_tflops, 100.0 * tf / gemm_tflops);
}

/* ---- ceilings ------------------------------------------------------------------------ */

typedef struct copy_ctx {
    void *a, *b;
    size_t bytes;
} copy_ctx;

static void run_copy(void *c, int i) {
    copy_ctx *x = c;
    g->ops->copy_d2d(g, x->b, x->a, x->bytes);
}

typedef struct mm_ctx {
    void *x[SETS_MAX], *w[SETS_MAX], *out;
    int sets, T, Kd, N;
} mm_ctx;

static void run_mm(void *c, int i) {
    mm_ctx *m = c;
    int s = i % m->sets;
    g->ops->matmul(g, m->out, m->x[s], m->w[s], NULL, m->T, m->Kd, m->N);
}

static void measure_ceilings(void) {
    copy_ctx c = {NULL, NULL, (size_t)1 << 30};
    c.a = rand_buf(c.bytes / 2, 1, 1);
    c.b = g->ops->alloc(g, c.bytes);
    double ms = time_op(run_copy, &c);
    copy_gbs = 2.0 * c.bytes / (ms * 1e-3) / 1e9;
    g->ops->free(g, c.a);
    g->ops->free(g, c.b);

    int n = 8192;
    mm_ctx m = {{NULL}, {NULL}, NULL, 1, n, n, n};
    m.x[0] = rand_buf((size_t)n * n, 1, 2);
    m.w[0] = rand_buf((size_t)n * n, 0.01f, 3);
    m.out = g->ops->alloc(g, (size_t)n * n * 2);
    ms = time_op(run_mm, &m);
    gemm_tflops = 2.0 * n * n * (double)n / (ms * 1e-3) / 1e12;
    g->ops->free(g, m.x[0]);
    g->ops->free(g, m.w[0]);
    g->ops->free(g, m.out);
    printf("ceilings: copy %.0f GB/s (read+write, 1 GiB cudaMemcpy d2d); cuBLAS bf16 GEMM "
           "8192^3 %.0f TFLOP/s\n\n",
           copy_gbs, gemm_tflops);
}

/* ---- matmul ------------------------------------------------------------------------------ */

static void bench_matmul(const char *name, int T, int Kd, int N) {
    mm_ctx m = {{NULL}, {NULL}, NULL, 1, T, Kd, N};
    size_t wbytes = (size_t)N * Kd * 2;
    m.sets = T <= 64 ? sets_for(wbytes) : 1;
    for (int s = 0; s < m.sets; s++) {
        m.x[s] = rand_buf((size_t)T * Kd, 1, 10 + s);
        m.w[s] = rand_buf((size_t)N * Kd, 0.02f, 20 + s);
    }
    m.out = g->ops->alloc(g, (size_t)T * N * 2);
    double ms = time_op(run_mm, &m);
    char shape[64];
    snprintf(shape, sizeof shape, "%s T=%d %dx%d", name, T, N, Kd);
    if (T <= 64) row_bw("matmul (W)", shape, ms, (double)wbytes);
    row_flops("matmul", shape, ms, 2.0 * T * (double)Kd * N);
    for (int s = 0; s < m.sets; s++) {
        g->ops->free(g, m.x[s]);
        g->ops->free(g, m.w[s]);
    }
    g->ops->free(g, m.out);
}

/* ---- small-T matmul: the GEMV against cuBLAS --------------------------------------------
 * The same shape timed under PDSERVE_CUDA_GEMV=0 (cuBLAS) and =1 (the GEMV), as GB/s of
 * weights streamed against the copy ceiling; "auto" says which one the default rules
 * pick on this card (backend_cuda_gemv_auto_picks_on). */

static int32_t *dev_ints(const int32_t *h, int n);

/* This card's peak DRAM GB/s (memory clock x bus width, double data rate), as the
 * backend's auto route reads it. */
static double card_peak_gbs(void) {
    backend_cuda_info info;
    backend_cuda_info_get(g, &info);
    return 2.0 * info.mem_clock_khz * 1e3 * info.mem_bus_bits / 8 / 1e9;
}

static double time_mm_mode(mm_ctx *m, int mode) {
    int old = backend_cuda_gemv_mode(g, mode);
    double ms = time_op(run_mm, m);
    backend_cuda_gemv_mode(g, old);
    return ms;
}

static void bench_gemv(const char *name, int Kd, int N) {
    mm_ctx m = {{NULL}, {NULL}, NULL, 1, 8, Kd, N};
    size_t wbytes = (size_t)N * Kd * 2;
    m.sets = sets_for(wbytes);
    for (int s = 0; s < m.sets; s++) {
        m.x[s] = rand_buf((size_t)8 * Kd, 1, 10 + s);
        m.w[s] = rand_buf((size_t)N * Kd, 0.02f, 20 + s);
    }
    m.out = g->ops->alloc(g, (size_t)8 * N * 2);
    for (int T = 1; T <= 8; T *= 2) {
        m.T = T;
        double cb = time_mm_mode(&m, BACKEND_CUDA_GEMV_OFF), gv = time_mm_mode(&m, BACKEND_CUDA_GEMV_ON);
        double cbg = wbytes / (cb * 1e-3) / 1e9, gvg = wbytes / (gv * 1e-3) / 1e9;
        char shape[64];
        snprintf(shape, sizeof shape, "%s T=%d %dx%d", name, T, N, Kd);
        printf("| %-24s | %7.1f | %5.0f | %5.1f%% | %7.1f | %5.0f | %5.1f%% | %5.2fx | %-6s |\n", shape,
               cb * 1e3, cbg, 100.0 * cbg / copy_gbs, gv * 1e3, gvg, 100.0 * gvg / copy_gbs, cb / gv,
               backend_cuda_gemv_auto_picks_on(card_peak_gbs(), T, Kd, N) ? "gemv" : "cublas");
    }
    for (int s = 0; s < m.sets; s++) {
        g->ops->free(g, m.x[s]);
        g->ops->free(g, m.w[s]);
    }
    g->ops->free(g, m.out);
}

static void bench_gemv_all(void) {
    printf("small-T matmul, weights streamed (GB/s) against the copy ceiling %.0f GB/s\n\n", copy_gbs);
    printf("| shape                    | cuBLAS us | GB/s | %% copy | GEMV us | GB/s | %% copy | "
           "speedup | auto   |\n");
    printf("|--------------------------|-----------|------|--------|---------|------|--------|"
           "---------|--------|\n");
    bench_gemv("qkv", C_, QKV_);
    bench_gemv("o", H_ * D_, C_);
    bench_gemv("gate_up", C_, 2 * F_);
    bench_gemv("down", F_, C_);
    bench_gemv("lm_head", C_, V_);
    printf("\n");
}

/* ---- fused decode ops against the separate ones (default routing) ----------------------- */

typedef struct fused_ctx {
    void *x[SETS_MAX], *w[SETS_MAX], *gu, *out;
    void *qkv, *kc, *vc;
    int32_t *pos, *slots;
    int sets, T;
    rope_params rp;
} fused_ctx;

static void run_rope_then_store(void *c, int i) {
    fused_ctx *f = c;
    g->ops->rope(g, f->qkv, f->pos, &f->rp, f->T, H_, K_, D_);
    g->ops->kv_store(g, f->kc, f->vc, f->qkv, f->slots, f->T, H_, K_, D_);
}
static void run_rope_kv_store(void *c, int i) {
    fused_ctx *f = c;
    g->ops->rope_kv_store(g, f->qkv, f->kc, f->vc, f->pos, f->slots, &f->rp, f->T, H_, K_, D_);
}
static void run_gate_up_then_swiglu(void *c, int i) {
    fused_ctx *f = c;
    int s = i % f->sets;
    g->ops->matmul(g, f->gu, f->x[s], f->w[s], NULL, f->T, C_, 2 * F_);
    g->ops->swiglu(g, f->out, f->gu, f->T, F_);
}
static void run_matmul_swiglu(void *c, int i) {
    fused_ctx *f = c;
    int s = i % f->sets;
    g->ops->matmul_swiglu(g, f->out, f->gu, f->x[s], f->w[s], f->T, C_, F_);
}

static void row_fused(const char *op, const char *shape, double sep_ms, double fused_ms,
                      double bytes) {
    double gbs = bytes / (fused_ms * 1e-3) / 1e9;
    printf("| %-28s | %-18s | %8.1f | %8.1f | %5.2fx | %6.0f GB/s | %5.1f%% |\n", op, shape,
           sep_ms * 1e3, fused_ms * 1e3, sep_ms / fused_ms, gbs, 100.0 * gbs / copy_gbs);
}

static void bench_fused(void) {
    printf("fused decode ops against the separate ops (default routing); GB/s of the fused op "
           "against the copy ceiling\n\n");
    printf("| op                           | shape              | sep us   | fused us | speedup "
           "| achieved    | ratio  |\n");
    printf("|------------------------------|--------------------|----------|----------|---------"
           "|-------------|--------|\n");
    int Ts[4] = {1, 8, 64, 512};
    for (int k = 0; k < 4; k++) {
        fused_ctx f = {0};
        f.T = Ts[k];
        f.rp = (rope_params){ROPE_TYPE_LLAMA3, 500000.0f, 8.0f, 1.0f, 4.0f, 8192};
        size_t cache_n = (size_t)2 * f.T * K_ * D_;
        f.qkv = rand_buf((size_t)f.T * QKV_, 1, 40);
        f.kc = g->ops->alloc(g, cache_n * 2);
        f.vc = g->ops->alloc(g, cache_n * 2);
        int32_t *h = xmalloc((size_t)f.T * 4);
        for (int t = 0; t < f.T; t++) h[t] = t;
        f.pos = dev_ints(h, f.T);
        for (int t = 0; t < f.T; t++) h[t] = 2 * t + (int32_t)(hash_u64((uint64_t)t) % 2);
        f.slots = dev_ints(h, f.T);
        free(h);
        double bytes = 2.0 * f.T * (H_ + K_) * D_ * 2 + 2.0 * f.T * K_ * D_ * 2;
        char shape[64];
        snprintf(shape, sizeof shape, "T=%d H=%d K=%d D=%d", f.T, H_, K_, D_);
        row_fused("rope+kv_store vs fused", shape, time_op(run_rope_then_store, &f),
                  time_op(run_rope_kv_store, &f), bytes);
        g->ops->free(g, f.qkv), g->ops->free(g, f.kc), g->ops->free(g, f.vc);
        g->ops->free(g, f.pos), g->ops->free(g, f.slots);
    }
    for (int T = 1; T <= 8; T *= 2) {
        fused_ctx f = {0};
        f.T = T;
        size_t wbytes = (size_t)2 * F_ * C_ * 2;
        f.sets = sets_for(wbytes);
        for (int s = 0; s < f.sets; s++) {
            f.x[s] = rand_buf((size_t)T * C_, 1, 50 + s);
            f.w[s] = rand_buf((size_t)2 * F_ * C_, 0.02f, 60 + s);
        }
        f.gu = g->ops->alloc(g, (size_t)T * 2 * F_ * 2);
        f.out = g->ops->alloc(g, (size_t)T * F_ * 2);
        char shape[64];
        snprintf(shape, sizeof shape, "T=%d %dx%d", T, 2 * F_, C_);
        row_fused("gate_up+swiglu vs fused", shape, time_op(run_gate_up_then_swiglu, &f),
                  time_op(run_matmul_swiglu, &f), (double)wbytes);
        /* the two routes against each other: cuBLAS + swiglu, the GEMV's epilogue */
        int old = backend_cuda_gemv_mode(g, BACKEND_CUDA_GEMV_OFF);
        double sep = time_op(run_matmul_swiglu, &f);
        backend_cuda_gemv_mode(g, BACKEND_CUDA_GEMV_ON);
        double fused = time_op(run_matmul_swiglu, &f);
        backend_cuda_gemv_mode(g, old);
        row_fused("cublas+swiglu vs gemv epilogue", shape, sep, fused, (double)wbytes);
        for (int s = 0; s < f.sets; s++) g->ops->free(g, f.x[s]), g->ops->free(g, f.w[s]);
        g->ops->free(g, f.gu), g->ops->free(g, f.out);
    }
    printf("\n");
}

/* ---- memory-bound ops ------------------------------------------------------------------- */

typedef struct ew_ctx {
    void *in[SETS_MAX], *in2[SETS_MAX], *out[SETS_MAX], *w;
    int32_t *idx;
    int sets, T;
    rope_params rp;
} ew_ctx;

static void run_rmsnorm(void *c, int i) {
    ew_ctx *e = c;
    int s = i % e->sets;
    g->ops->rmsnorm(g, e->out[s], e->in[s], e->w, e->T, C_, 1e-5f);
}
static void run_add_rmsnorm(void *c, int i) {
    ew_ctx *e = c;
    int s = i % e->sets;
    g->ops->add_rmsnorm(g, e->in2[s], e->out[s], e->in[s], e->w, e->T, C_, 1e-5f);
}
static void run_rope(void *c, int i) {
    ew_ctx *e = c;
    g->ops->rope(g, e->in[i % e->sets], e->idx, &e->rp, e->T, H_, K_, D_);
}
static void run_swiglu(void *c, int i) {
    ew_ctx *e = c;
    int s = i % e->sets;
    g->ops->swiglu(g, e->out[s], e->in[s], e->T, F_);
}
static void run_embedding(void *c, int i) {
    ew_ctx *e = c;
    g->ops->embedding(g, e->out[i % e->sets], e->w, e->idx, e->T, C_);
}
static void run_kv_store(void *c, int i) {
    ew_ctx *e = c;
    int s = i % e->sets;
    g->ops->kv_store(g, e->out[s], e->in2[s], e->in[s], e->idx, e->T, H_, K_, D_);
}

/* Allocates `sets` rotations of in (n_in), in2 (n_in2) and out (n_out) elements. */
static void ew_alloc(ew_ctx *e, int T, size_t n_in, size_t n_in2, size_t n_out) {
    memset(e, 0, sizeof *e);
    e->T = T;
    e->sets = sets_for((n_in + n_in2 + n_out) * 2);
    for (int s = 0; s < e->sets; s++) {
        e->in[s] = rand_buf(n_in, 1, 100 + s);
        e->in2[s] = n_in2 ? rand_buf(n_in2, 1, 200 + s) : NULL;
        e->out[s] = n_out ? g->ops->alloc(g, n_out * 2) : NULL;
    }
}

static void ew_free(ew_ctx *e) {
    for (int s = 0; s < e->sets; s++) {
        g->ops->free(g, e->in[s]);
        g->ops->free(g, e->in2[s]);
        g->ops->free(g, e->out[s]);
    }
    g->ops->free(g, e->w);
    g->ops->free(g, e->idx);
}

static int32_t *dev_ints(const int32_t *h, int n) {
    int32_t *d = g->ops->alloc(g, (size_t)n * 4);
    g->ops->copy_h2d(g, d, h, (size_t)n * 4);
    return d;
}

static void bench_memory_ops(int T) {
    ew_ctx e;
    char shape[64];
    size_t TC = (size_t)T * C_;
    int32_t *h = xmalloc((size_t)T * 4);

    ew_alloc(&e, T, TC, 0, TC);
    e.w = rand_buf(C_, 1, 7);
    snprintf(shape, sizeof shape, "T=%d C=%d", T, C_);
    row_bw("rmsnorm", shape, time_op(run_rmsnorm, &e), 2.0 * TC * 2 + C_ * 2);
    ew_free(&e);

    ew_alloc(&e, T, TC, TC, TC);
    e.w = rand_buf(C_, 1, 7);
    row_bw("add_rmsnorm", shape, time_op(run_add_rmsnorm, &e), 4.0 * TC * 2 + C_ * 2);
    ew_free(&e);

    ew_alloc(&e, T, (size_t)T * QKV_, 0, 0);
    for (int t = 0; t < T; t++) h[t] = t;
    e.idx = dev_ints(h, T);
    e.rp = (rope_params){ROPE_TYPE_LLAMA3, 500000.0f, 8.0f, 1.0f, 4.0f, 8192};
    snprintf(shape, sizeof shape, "T=%d H=%d K=%d D=%d", T, H_, K_, D_);
    row_bw("rope", shape, time_op(run_rope, &e), 2.0 * T * (H_ + K_) * D_ * 2 + T * 4.0);
    ew_free(&e);

    ew_alloc(&e, T, (size_t)T * 2 * F_, 0, (size_t)T * F_);
    snprintf(shape, sizeof shape, "T=%d F=%d", T, F_);
    row_bw("swiglu", shape, time_op(run_swiglu, &e), 3.0 * T * F_ * 2);
    ew_free(&e);

    ew_alloc(&e, T, 8, 0, TC);
    e.w = rand_buf((size_t)V_ * C_, 1, 8);
    for (int t = 0; t < T; t++) h[t] = (int32_t)(hash_u64((uint64_t)t) % V_);
    e.idx = dev_ints(h, T);
    snprintf(shape, sizeof shape, "T=%d C=%d", T, C_);
    row_bw("embedding", shape, time_op(run_embedding, &e), 2.0 * TC * 2 + T * 4.0);
    ew_free(&e);

    /* kv_store into a cache of 2T slots, scattered */
    size_t cache_n = (size_t)2 * T * K_ * D_;
    ew_alloc(&e, T, (size_t)T * QKV_, cache_n, cache_n);
    for (int t = 0; t < T; t++) h[t] = (int32_t)((hash_u64((uint64_t)t) % 2) + 2 * (size_t)t);
    e.idx = dev_ints(h, T);
    snprintf(shape, sizeof shape, "T=%d K=%d D=%d", T, K_, D_);
    row_bw("kv_store", shape, time_op(run_kv_store, &e), 2.0 * 2 * T * K_ * D_ * 2 + T * 4.0);
    ew_free(&e);
    free(h);
}

/* ---- attention ----------------------------------------------------------------------------- */

typedef struct att_ctx {
    void *qkv, *kc, *vc, *out;
    attn_seq *seqs;
    int B, T, bs;
} att_ctx;

static void run_attention(void *c, int i) {
    att_ctx *a = c;
    g->ops->attention(g, a->out, a->qkv, a->kc, a->vc, a->seqs, a->B, a->T, H_, K_, D_, a->bs,
                      0.08838834764831845f);
}

/* B sequences of ctx tokens each, computing q_len rows each (1: decode; ctx: a whole
 * prefill), over a block pool in shuffled order. */
static void bench_attention(int B, int ctx, int q_len) {
    att_ctx a = {0};
    a.B = B;
    a.T = B * q_len;
    a.bs = 16;
    int per = (ctx + a.bs - 1) / a.bs, nb = B * per;
    int32_t *pool = xmalloc((size_t)nb * 4);
    for (int i = 0; i < nb; i++) pool[i] = i;
    for (int i = nb - 1; i > 0; i--) {
        int j = (int)(hash_u64((uint64_t)i * 7919u) % (uint64_t)(i + 1));
        int32_t t = pool[i];
        pool[i] = pool[j];
        pool[j] = t;
    }
    a.seqs = xcalloc((size_t)B, sizeof *a.seqs);
    for (int b = 0; b < B; b++)
        a.seqs[b] = (attn_seq){b * q_len, q_len, ctx, pool + (size_t)b * per, per};
    size_t cache_n = (size_t)nb * a.bs * K_ * D_;
    a.kc = rand_buf(cache_n, 1, 31);
    a.vc = rand_buf(cache_n, 1, 32);
    a.qkv = rand_buf((size_t)a.T * QKV_, 1, 33);
    a.out = g->ops->alloc(g, (size_t)a.T * H_ * D_ * 2);
    double ms = time_op(run_attention, &a);
    char shape[64];
    if (q_len == 1) {
        snprintf(shape, sizeof shape, "decode B=%d ctx=%d", B, ctx);
        row_bw("attention", shape, ms, 2.0 * B * (double)ctx * K_ * D_ * 2);
    } else {
        snprintf(shape, sizeof shape, "prefill B=%d T=%d causal", B, q_len);
        double pairs = (double)B * q_len * (q_len + 1) / 2.0; /* (row, key) pairs */
        row_flops("attention", shape, ms, 4.0 * pairs * H_ * D_);
    }
    g->ops->free(g, a.kc);
    g->ops->free(g, a.vc);
    g->ops->free(g, a.qkv);
    g->ops->free(g, a.out);
    free(a.seqs);
    free(pool);
}

/* ---- --first-call ROUTE: what a matmul of a row count never seen before costs --------
 * At Llama-3.2-3B's shapes (C 3072, F 8192, 24 q / 8 kv heads of 128, V 128256), in a
 * process that has run no matmul yet: ROUTE "ex" sends every matmul to cublasGemmEx
 * (PDSERVE_CUDA_GEMM=ex), "lt" to cuBLASLt by row bucket after the start-up warm-up
 * (backend.h matmul_warm up to 2,048 rows, timed). For each shape and row count: the
 * first call's wall time (host, synchronised before and after), the same again, and the
 * steady time (median of timed batches, events). The two routes' steady columns side by
 * side are what one algorithm per bucket costs against cuBLAS's own pick for each T. */
static int first_call(const char *route) {
    bool lt = strcmp(route, "lt") == 0;
    if (!lt && strcmp(route, "ex") != 0) {
        fprintf(stderr, "bench_kernels_cuda: --first-call takes ex or lt\n");
        return 2;
    }
    backend_cuda_gemm_lt(g, lt);
    enum { C3 = 3072, F3 = 8192, V3 = 128256, TMAX = 2048 };
    static const struct {
        const char *name;
        int N, Kd, tmax;
    } mm[] = {{"qkv", 5120, C3, TMAX}, {"o", C3, C3, TMAX}, {"gate_up", 2 * F3, C3, TMAX},
              {"down", C3, F3, TMAX}, {"lm_head", V3, C3, 256}};
    size_t xmax = (size_t)TMAX * F3, omax = (size_t)256 * V3;
    void *x = rand_buf(xmax, 1, 1), *out = g->ops->alloc(g, omax * 2), *w[5];
    for (int k = 0; k < 5; k++) w[k] = rand_buf((size_t)mm[k].N * mm[k].Kd, 0.02f, 2 + k);
    g->ops->sync(g);
    if (lt) {
        double t0 = time_now_s();
        for (int k = 0; k < 5; k++)
            g->ops->matmul_warm(g, out, x, w[k], mm[k].tmax, mm[k].Kd, mm[k].N);
        g->ops->sync(g);
        printf("warm-up (matmul_warm, 5 shapes up to 2,048 rows; lm_head to 256): %.3f s\n\n",
               time_now_s() - t0);
    }
    static const int Ts[] = {62, 63, 97, 129, 193, 234, 319, 320, 433, 513, 640, 641, 769, 1000, 1001, 1025, 1537, 2047};
    static const int Tl[] = {1, 3, 5, 8, 13, 62, 200};
    printf("route %s: | shape | T | first call ms | second call ms | steady ms |\n", route);
    for (int k = 0; k < 5; k++) {
        const int *ts = k == 4 ? Tl : Ts;
        int nt = k == 4 ? (int)PD_ARRAY_LEN(Tl) : (int)PD_ARRAY_LEN(Ts);
        for (int i = 0; i < nt; i++) {
            int T = ts[i];
            double first[2];
            for (int r = 0; r < 2; r++) {
                double t0 = time_now_s();
                g->ops->matmul(g, out, x, w[k], NULL, T, mm[k].Kd, mm[k].N);
                g->ops->sync(g);
                first[r] = (time_now_s() - t0) * 1e3;
            }
            mm_ctx m = {{x}, {w[k]}, out, 1, T, mm[k].Kd, mm[k].N};
            double ms = time_op(run_mm, &m);
            printf("| %s %dx%d | %d | %.3f | %.3f | %.4f |\n", mm[k].name, mm[k].N, mm[k].Kd, T, first[0],
                   first[1], ms);
        }
    }
    long n_lt, n_ex;
    int n_entries, n_tuned;
    backend_cuda_gemm_counts(g, &n_lt, &n_ex, &n_entries, &n_tuned);
    printf("\nmatmul calls: %ld through cuBLASLt, %ld on cublasGemmEx; %d bucket entries, %d tuned\n",
           n_lt, n_ex, n_entries, n_tuned);
    for (int k = 0; k < 5; k++) g->ops->free(g, w[k]);
    g->ops->free(g, x);
    g->ops->free(g, out);
    backend_destroy(g);
    return 0;
}

int main(int argc, char **argv) {
    char err[256] = "";
    log_set_level(LOG_LEVEL_WARN);
    g = backend_cuda_create(0, err, sizeof err);
    if (!g) {
        fprintf(stderr, "bench_kernels_cuda: %s\n", err);
        return 77;
    }
    backend_cuda_info info;
    backend_cuda_info_get(g, &info);
    char date[64];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    printf("card: %s (sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MiB, SM clock %d MHz as found)\n",
           info.name, info.cc_major, info.cc_minor, info.sm_count,
           (double)info.mem_total / (1 << 30), (double)info.l2_bytes / (1 << 20),
           info.clock_khz / 1000);
    printf("driver: CUDA %d.%d, runtime %d.%d; date: %s\n", info.driver_version / 1000,
           info.driver_version % 1000 / 10, info.runtime_version / 1000,
           info.runtime_version % 1000 / 10, date);
    printf("model shapes: Llama-3.1-8B (C=%d F=%d H=%d K=%d D=%d V=%d), bf16\n\n", C_, F_, H_, K_,
           D_, V_);
    if (argc > 2 && strcmp(argv[1], "--first-call") == 0) return first_call(argv[2]);
    measure_ceilings();
    bench_gemv_all();
    bench_fused();
    if (argc > 1 && strcmp(argv[1], "--gemv") == 0) { /* the small-T tables only */
        backend_destroy(g);
        return 0;
    }

    printf("| op            | shape                      |   time us | achieved         | ceiling "
           "           | ratio  |\n");
    printf("|---------------|----------------------------|-----------|------------------|-------"
           "-------------|--------|\n");
    static const struct {
        const char *name;
        int N, Kd;
    } mm[] = {{"qkv", QKV_, C_}, {"o", C_, H_ * D_}, {"gate_up", 2 * F_, C_}, {"down", C_, F_},
              {"lm_head", V_, C_}};
    int Ts[3] = {1, 64, 4096};
    for (int ti = 0; ti < 3; ti++)
        for (size_t k = 0; k < PD_ARRAY_LEN(mm); k++) bench_matmul(mm[k].name, Ts[ti], mm[k].Kd, mm[k].N);
    bench_memory_ops(64);
    bench_memory_ops(4096);
    bench_attention(64, 2048, 1);
    bench_attention(8, 8192, 1);
    bench_attention(1, 8192, 1);
    bench_attention(1, 4096, 4096);
    backend_destroy(g);
    return 0;
}
#endif
