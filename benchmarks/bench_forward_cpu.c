/* bench_forward_cpu.c: how fast the CPU backend runs the forward pass, against the
 * machine's own limit.
 *
 * Model: the small-llama shape (L=4, C=256, F=768, H=8, K=4, D=32, V=2048), dummy
 * weights. Measures a 512-token prefill (one step) and decode steps of 1, 8 and 64
 * sequences with 256 tokens of context each, and prints for each: time per step,
 * tokens per second, the achieved GFLOP/s (matrix products + attention, counted
 * below), the ceiling (the best GFLOP/s of one large sgemm on this machine, with
 * the same threads) and the ratio.
 *
 * Usage: bench_forward_cpu [threads]   (0 or none: all cores)
 * A program, not a test: numbers depend on the machine and what else runs on it. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/forward.h"
#include "util/util.h"

#define BLOCK 16
#define PREFILL 512
#define CTX 256
#define DECODE_STEPS 16

static model_config small_llama(void) {
    model_config c;
    char err[256];
    if (model_preset("small-llama", &c, err, sizeof err) == 0) return c;
    memset(&c, 0, sizeof c); /* the same shape by hand, should the preset go */
    snprintf(c.architecture, sizeof c.architecture, "LlamaForCausalLM");
    c.n_layers = 4, c.dim = 256, c.ffn_dim = 768, c.n_heads = 8, c.n_kv_heads = 4;
    c.head_dim = 32, c.vocab_size = 2048, c.max_position_embeddings = 4096;
    c.norm_eps = 1e-5f, c.rope_theta = 500000, c.rope_type = ROPE_TYPE_DEFAULT;
    return c;
}

/* Multiply-adds x2 of the matrix products for one token (lm_head included: every
 * row below asks for logits, as prefill's last row and decode rows do). */
static double matmul_flops_per_token(const model_config *c) {
    double C = c->dim, F = c->ffn_dim, D = c->head_dim, H = c->n_heads, K = c->n_kv_heads;
    double layer = C * (H + 2 * K) * D + H * D * C + 2 * F * C + F * C;
    return 2.0 * (c->n_layers * layer);
}
static double lm_head_flops(const model_config *c) { return 2.0 * c->dim * c->vocab_size; }
/* q.k and p.v for one row over n_keys keys, every layer and head */
static double attn_flops(const model_config *c, double n_keys) {
    return 4.0 * c->n_layers * c->n_heads * c->head_dim * n_keys;
}

/* Best GFLOP/s of an n x n x n sgemm over a few runs. */
static double sgemm_ceiling(int n) {
    float *a = malloc((size_t)n * n * 4), *b = malloc((size_t)n * n * 4), *c = malloc((size_t)n * n * 4);
    for (size_t i = 0; i < (size_t)n * n; i++) a[i] = (float)(i % 7) * 0.1f, b[i] = (float)(i % 5) * 0.1f;
    double best = 0;
    for (int r = 0; r < 8; r++) {
        double t0 = time_now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        double dt = time_now_s() - t0;
        if (r > 0) best = PD_MAX(best, 2.0 * n * n * n / dt / 1e9);
    }
    free(a), free(b), free(c);
    return best;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct bench {
    model *m;
    kv_cache *kv;
    fwd_ctx *f;
    float *logits;
} bench;

/* n_seq sequences, each with q_len rows ending at ctx_len; sequence s owns blocks
 * [s * per, (s + 1) * per). Returns seconds per step (median of `reps`). */
static double time_step(bench *bn, int n_seq, int q_len, int ctx_len, int reps) {
    int T = n_seq * q_len, per = (CTX + DECODE_STEPS + PREFILL) / BLOCK + 1;
    int32_t *tok = calloc((size_t)T, 4), *pos = calloc((size_t)T, 4), *slots = calloc((size_t)T, 4);
    int32_t *rows = calloc((size_t)n_seq, 4), *tables = calloc((size_t)n_seq * per, 4);
    attn_seq *seqs = calloc((size_t)n_seq, sizeof *seqs);
    for (int s = 0; s < n_seq; s++) {
        for (int i = 0; i < per; i++) tables[s * per + i] = s * per + i;
        seqs[s] = (attn_seq){s * q_len, q_len, ctx_len, tables + s * per, (ctx_len + BLOCK - 1) / BLOCK};
        for (int i = 0; i < q_len; i++) {
            int t = s * q_len + i, p = ctx_len - q_len + i;
            tok[t] = (int32_t)((t * 131 + 7) % bn->m->cfg.vocab_size);
            pos[t] = p;
            slots[t] = tables[s * per + p / BLOCK] * BLOCK + p % BLOCK;
        }
        rows[s] = s * q_len + q_len - 1;
    }
    fwd_batch b = {T, n_seq, tok, pos, slots, seqs, rows, n_seq};
    double times[32];
    model_forward(bn->f, bn->kv, &b, bn->logits); /* warm-up */
    for (int r = 0; r < reps; r++) {
        double t0 = time_now_s();
        model_forward(bn->f, bn->kv, &b, bn->logits);
        times[r] = time_now_s() - t0;
    }
    qsort(times, (size_t)reps, sizeof(double), cmp_double);
    free(tok), free(pos), free(slots), free(rows), free(tables), free(seqs);
    return times[reps / 2];
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 0;
    log_set_level(LOG_LEVEL_WARN);
    backend *be = backend_cpu_create(threads);
    model_files mf = {0};
    mf.config = small_llama();
    const model_config *c = &mf.config;
    char err[256];
    bench bn = {0};
    bn.m = model_load(be, &mf, 1, err, sizeof err);
    if (!bn.m) pd_die("%s", err);
    int per = (CTX + DECODE_STEPS + PREFILL) / BLOCK + 1;
    bn.kv = kv_cache_create(be, c, BLOCK, model_kv_bytes_per_token(c, 4) * BLOCK * per * 64, err, sizeof err);
    if (!bn.kv) pd_die("%s", err);
    bn.f = fwd_ctx_create(bn.m, PREFILL, 64);
    bn.logits = malloc((size_t)64 * c->vocab_size * 4);

    double ceiling = sgemm_ceiling(1024);
    char shape[256];
    model_config_describe(c, shape, sizeof shape);
    printf("bench_forward_cpu: %s\n", shape);
    printf("threads %d (ours and OpenBLAS's); ceiling: sgemm 1024^3 at %.1f GFLOP/s\n\n", be->threads, ceiling);
    printf("%-22s %8s %12s %12s %10s %10s %7s\n", "case", "rows", "ms/step", "tokens/s", "GFLOP/s",
           "ceiling", "ratio");

    /* prefill: one sequence of PREFILL tokens from empty */
    double t = time_step(&bn, 1, PREFILL, PREFILL, 5);
    double fl = matmul_flops_per_token(c) * PREFILL + lm_head_flops(c) +
                attn_flops(c, (double)PREFILL * (PREFILL + 1) / 2);
    printf("%-22s %8d %12.2f %12.0f %10.2f %10.1f %6.1f%%\n", "prefill 512", PREFILL, t * 1e3,
           PREFILL / t, fl / t / 1e9, ceiling, 100 * fl / t / 1e9 / ceiling);

    int batches[3] = {1, 8, 64};
    for (int i = 0; i < 3; i++) {
        int B = batches[i];
        t = time_step(&bn, B, 1, CTX + 1, DECODE_STEPS);
        fl = B * (matmul_flops_per_token(c) + lm_head_flops(c) + attn_flops(c, CTX + 1));
        char name[64];
        snprintf(name, sizeof name, "decode B=%d ctx=%d", B, CTX);
        printf("%-22s %8d %12.3f %12.0f %10.2f %10.1f %6.1f%%\n", name, B, t * 1e3, B / t,
               fl / t / 1e9, ceiling, 100 * fl / t / 1e9 / ceiling);
    }
    free(bn.logits);
    fwd_ctx_free(bn.f);
    kv_cache_free(be, bn.kv);
    model_free(bn.m);
    backend_destroy(be);
    return 0;
}
