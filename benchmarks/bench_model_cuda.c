/* bench_model_cuda.c: the whole forward pass on one GPU (forward.c over the CUDA
 * backend) against the card's ceilings measured in the same run, and against
 * Hugging Face transformers on the same card when its figures are given.
 *
 *   decode   Llama-3.1-8B shape (dummy weights), one step of B decode rows, each
 *            sequence with ctx tokens cached (KV filled with random values): the
 *            host wall time of model_forward_greedy (argmax on the GPU, B tokens
 *            back), median of the timed steps. Floor: the bytes a step must read
 *            (every weight but the embedding table, plus B * ctx tokens of K and V)
 *            over the device-to-device copy rate (bytes read + written per second,
 *            1 GiB cudaMemcpy). Targets: 1.2x the floor at B=1, 1.35x at B=64.
 *            Each case twice in the same run: decode graphs on (forward.h: padded to
 *            the batch bucket, captured, replayed) and off (op by op); also the
 *            same step with tokens drawn on the device (model_forward_sample:
 *            temperature 0.8, top-k 50, top-p 0.9) and with every logits row
 *            downloaded (the host sampler's path).
 *   prefill  Llama-3.2-3B shape, one prompt of 16,384 tokens in one step; model
 *            FLOPs = 2 * T * (linear weights of every layer) + 2 * C * V (the one
 *            logits row) + causal attention 4 * H * D * T(T+1)/2 per layer; as a
 *            fraction of the cuBLAS bf16 GEMM rate at 8192^3. Target >= 55%.
 *
 * Usage: bench_model_cuda [--no-prefill] [hf.json]
 * hf.json: benchmarks/hf_reference.py's output;
 * with it, the ratios to transformers are printed too (targets: decode >= 5x at B=1,
 * >= 3x at B=64; prefill >= 1.1x). A program, never a test; exits 77 without a GPU. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "engine/forward.h"
#include "model/model.h"
#include "util/util.h"

#if !PDSERVE_HAVE_CUDA
int main(void) {
    fprintf(stderr, "bench_model_cuda: pdserve was built without CUDA\n");
    return 77;
}
#else
#include "backend/cuda/backend_cuda.h"

#define BS 16 /* KV block size, the engine's default */

static backend *g;
static double copy_gbs, gemm_tflops;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *t, int n) {
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

/* ---- ceilings ---------------------------------------------------------------------- */

static void measure_ceilings(void) {
    size_t bytes = (size_t)1 << 30;
    void *a = g->ops->alloc(g, bytes), *b = g->ops->alloc(g, bytes);
    g->ops->fill_random(g, a, DTYPE_BF16, bytes / 2, 1, 1.0f);
    double t[7];
    g->ops->copy_d2d(g, b, a, bytes);
    for (int r = 0; r < 7; r++) {
        backend_cuda_timer_start(g);
        for (int i = 0; i < 5; i++) g->ops->copy_d2d(g, b, a, bytes);
        t[r] = backend_cuda_timer_stop_ms(g) / 5;
    }
    copy_gbs = 2.0 * (double)bytes / (median(t, 7) * 1e-3) / 1e9;
    g->ops->free(g, a);
    g->ops->free(g, b);

    int n = 8192;
    size_t nn = (size_t)n * n;
    void *x = g->ops->alloc(g, nn * 2), *w = g->ops->alloc(g, nn * 2), *o = g->ops->alloc(g, nn * 2);
    g->ops->fill_random(g, x, DTYPE_BF16, nn, 2, 1.0f);
    g->ops->fill_random(g, w, DTYPE_BF16, nn, 3, 0.01f);
    g->ops->matmul(g, o, x, w, NULL, n, n, n);
    for (int r = 0; r < 7; r++) {
        backend_cuda_timer_start(g);
        for (int i = 0; i < 5; i++) g->ops->matmul(g, o, x, w, NULL, n, n, n);
        t[r] = backend_cuda_timer_stop_ms(g) / 5;
    }
    gemm_tflops = 2.0 * n * n * (double)n / (median(t, 7) * 1e-3) / 1e12;
    g->ops->free(g, x);
    g->ops->free(g, w);
    g->ops->free(g, o);
    printf("ceilings: copy %.0f GB/s (read+write, 1 GiB cudaMemcpy d2d); cuBLAS bf16 GEMM "
           "8192^3 %.0f TFLOP/s (random inputs, medians of 7)\n\n", copy_gbs, gemm_tflops);
}

/* ---- a step of B sequences ------------------------------------------------------------ */

typedef struct step {
    int B, T;
    int32_t *tokens, *pos, *slots, *tables, *logit_rows, *out;
    attn_seq *seqs;
} step;

/* B sequences of ctx tokens each (contiguous block tables, sequence b from block
 * b * per_seq), computing q_len rows each: rows at positions ctx - q_len .. ctx - 1. */
static void step_make(step *s, int B, int ctx, int q_len, int vocab) {
    int per_seq = (ctx + BS - 1) / BS;
    s->B = B;
    s->T = B * q_len;
    s->tokens = xmalloc((size_t)s->T * 4);
    s->pos = xmalloc((size_t)s->T * 4);
    s->slots = xmalloc((size_t)s->T * 4);
    s->tables = xmalloc((size_t)B * per_seq * 4);
    s->logit_rows = xmalloc((size_t)B * 4);
    s->out = xmalloc((size_t)B * 4);
    s->seqs = xcalloc((size_t)B, sizeof *s->seqs);
    for (int b = 0; b < B; b++) {
        int32_t *tab = s->tables + (size_t)b * per_seq;
        for (int i = 0; i < per_seq; i++) tab[i] = b * per_seq + i;
        for (int i = 0; i < q_len; i++) {
            int r = b * q_len + i, p = ctx - q_len + i;
            s->tokens[r] = (int32_t)(hash_u64((uint64_t)r * 7919 + 17) % (uint64_t)vocab);
            s->pos[r] = p;
            s->slots[r] = tab[p / BS] * BS + p % BS;
        }
        s->seqs[b] = (attn_seq){b * q_len, q_len, ctx, tab, per_seq};
        s->logit_rows[b] = b * q_len + q_len - 1;
    }
}

static void step_free(step *s) {
    free(s->tokens), free(s->pos), free(s->slots), free(s->tables), free(s->logit_rows);
    free(s->out), free(s->seqs);
}

static fwd_batch step_batch(const step *s) {
    return (fwd_batch){s->T, s->B, s->tokens, s->pos, s->slots, s->seqs, s->logit_rows, s->B};
}

/* Median host wall time (ms) of n greedy steps after 3 warm-up steps. */
static double time_steps(fwd_ctx *f, kv_cache *kv, const step *s, int n) {
    fwd_batch bt = step_batch(s);
    for (int i = 0; i < 3; i++) model_forward_greedy(f, kv, &bt, s->out);
    double t[64];
    n = PD_MIN(n, 64);
    for (int i = 0; i < n; i++) {
        double t0 = time_now_s();
        model_forward_greedy(f, kv, &bt, s->out);
        t[i] = (time_now_s() - t0) * 1e3;
    }
    return median(t, n);
}

static model *load_preset(const char *name, model_files *mf) {
    char err[512];
    if (model_files_open(name, "dummy", mf, err, sizeof err) != 0) pd_die("%s", err);
    model *m = model_load(g, mf, 1234, err, sizeof err);
    if (!m) pd_die("%s", err);
    return m;
}

/* Random K and V in every block (the attention reads real values, never zeros). */
static void kv_fill(kv_cache *kv) {
    size_t n = (size_t)kv->num_blocks * kv->block_bytes / 2;
    for (int l = 0; l < kv->n_layers; l++) {
        g->ops->fill_random(g, kv->k[l], DTYPE_BF16, n, 100 + 2 * (uint64_t)l, 1.0f);
        g->ops->fill_random(g, kv->v[l], DTYPE_BF16, n, 101 + 2 * (uint64_t)l, 1.0f);
    }
    g->ops->sync(g);
}

/* ---- results --------------------------------------------------------------------------- */

typedef struct decode_row {
    int B, ctx;
    double ms, eager_ms, floor_ms, full_ms, sample_ms;
} decode_row;

static decode_row rows[8];
static int n_rows;
static double prefill_ms, prefill_tflop;

static void bench_decode(void) {
    model_files mf;
    model *m = load_preset("preset:llama-3.1-8b", &mf);
    const model_config *c = &m->cfg;
    size_t bpt = model_kv_bytes_per_token(c, 2);
    static const int cases[][2] = {{1, 128}, {1, 2048}, {8, 2048}, {48, 2048}, {64, 2048}};
    int blocks = 0;
    for (size_t i = 0; i < PD_ARRAY_LEN(cases); i++)
        blocks = PD_MAX(blocks, cases[i][0] * ((cases[i][1] + BS - 1) / BS));
    char err[256];
    kv_cache *kv = kv_cache_create(g, c, BS, (size_t)blocks * BS * bpt, err, sizeof err);
    if (!kv) pd_die("%s", err);
    kv_fill(kv);
    fwd_ctx *f = fwd_ctx_create(m, 64, 64);
    size_t embed = (size_t)c->vocab_size * c->dim * 2;
    double wread = (double)m->weight_bytes - (c->tie_word_embeddings ? 0.0 : (double)embed);
    for (size_t i = 0; i < PD_ARRAY_LEN(cases); i++) {
        int B = cases[i][0], ctx = cases[i][1];
        step s;
        step_make(&s, B, ctx, 1, c->vocab_size);
        decode_row *r = &rows[n_rows++];
        r->B = B;
        r->ctx = ctx;
        fwd_ctx_use_graphs(f, false);
        r->eager_ms = time_steps(f, kv, &s, 30);
        fwd_ctx_use_graphs(f, true);
        r->ms = time_steps(f, kv, &s, 30);
        double bytes = wread + (double)B * ctx * (double)bpt;
        r->floor_ms = bytes / (copy_gbs * 1e9) * 1e3;
        /* the same step with every logits row downloaded (the sampler's path) */
        fwd_batch bt = step_batch(&s);
        float *lg = xmalloc((size_t)B * c->vocab_size * sizeof(float));
        double t[9];
        model_forward(f, kv, &bt, lg);
        for (int k = 0; k < 9; k++) {
            double t0 = time_now_s();
            model_forward(f, kv, &bt, lg);
            t[k] = (time_now_s() - t0) * 1e3;
        }
        r->full_ms = median(t, 9);
        free(lg);
        /* the same step with tokens drawn on the device (graphs on) */
        sample_row sr[64];
        pd_rng rng;
        rng_seed(&rng, 99);
        for (int k = 0; k < 3; k++) {
            for (int b = 0; b < B; b++)
                sr[b] = (sample_row){0.8f, 0.9f, 0.0f, 50, rng_uniform(&rng)};
            model_forward_sample(f, kv, &bt, sr, s.out, NULL);
        }
        for (int k = 0; k < 9; k++) {
            for (int b = 0; b < B; b++)
                sr[b] = (sample_row){0.8f, 0.9f, 0.0f, 50, rng_uniform(&rng)};
            double t0 = time_now_s();
            model_forward_sample(f, kv, &bt, sr, s.out, NULL);
            t[k] = (time_now_s() - t0) * 1e3;
        }
        r->sample_ms = median(t, 9);
        step_free(&s);
    }
    long captured, replayed;
    fwd_ctx_graph_counts(f, &captured, &replayed);
    fprintf(stderr, "decode: %ld graphs captured, %ld replays\n", captured, replayed);
    fwd_ctx_free(f);
    kv_cache_free(g, kv);
    model_free(m);
    model_files_close(&mf);
}

static void bench_prefill(int T) {
    model_files mf;
    model *m = load_preset("preset:llama-3.2-3b", &mf);
    const model_config *c = &m->cfg;
    size_t bpt = model_kv_bytes_per_token(c, 2);
    char err[256];
    kv_cache *kv = kv_cache_create(g, c, BS, (size_t)((T + BS - 1) / BS) * BS * bpt, err, sizeof err);
    if (!kv) pd_die("%s", err);
    fwd_ctx *f = fwd_ctx_create(m, T, 1);
    step s;
    step_make(&s, 1, T, T, c->vocab_size);
    double C = c->dim, F = c->ffn_dim, H = c->n_heads, K = c->n_kv_heads, D = c->head_dim;
    double lin = C * (H + 2 * K) * D + H * D * C + C * 2 * F + F * C; /* weights per layer */
    double flops = 2.0 * T * lin * c->n_layers + 2.0 * C * c->vocab_size +
                   4.0 * H * D * ((double)T * (T + 1) / 2) * c->n_layers;
    prefill_tflop = flops / 1e12;
    double t[3];
    fwd_batch bt = step_batch(&s);
    model_forward_greedy(f, kv, &bt, s.out); /* warm-up */
    for (int i = 0; i < 3; i++) {
        double t0 = time_now_s();
        model_forward_greedy(f, kv, &bt, s.out);
        t[i] = (time_now_s() - t0) * 1e3;
    }
    prefill_ms = median(t, 3);
    step_free(&s);
    fwd_ctx_free(f);
    kv_cache_free(g, kv);
    model_free(m);
    model_files_close(&mf);
}

/* HF's figure for a key of hf.json, or 0 when absent. */
static double hf_get(cJSON *j, const char *key) {
    cJSON *v = j ? cJSON_GetObjectItem(j, key) : NULL;
    return cJSON_IsNumber(v) ? v->valuedouble : 0.0;
}

int main(int argc, char **argv) {
    char err[256] = "";
    log_set_level(LOG_LEVEL_WARN);
    g = backend_cuda_create(0, err, sizeof err);
    if (!g) {
        fprintf(stderr, "bench_model_cuda: %s\n", err);
        return 77;
    }
    cJSON *hf = NULL;
    bool prefill = true;
    for (int a = 1; a < argc; a++) {
        if (strcmp(argv[a], "--no-prefill") == 0) {
            prefill = false;
            continue;
        }
        size_t len;
        char *text = util_read_file(argv[a], &len, err, sizeof err);
        hf = text ? cJSON_Parse(text) : NULL;
        free(text);
        if (!hf) fprintf(stderr, "bench_model_cuda: %s: no transformers figures (%s)\n", argv[a], err);
    }
    backend_cuda_info info;
    backend_cuda_info_get(g, &info);
    char date[64];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    printf("card: %s (sm_%d%d, %d SMs, %.1f GiB, SM clock %d MHz as found)\n", info.name,
           info.cc_major, info.cc_minor, info.sm_count, (double)info.mem_total / (1 << 30),
           info.clock_khz / 1000);
    printf("driver: CUDA %d.%d, runtime %d.%d; date: %s\n", info.driver_version / 1000,
           info.driver_version % 1000 / 10, info.runtime_version / 1000,
           info.runtime_version % 1000 / 10, date);
    measure_ceilings();
    bench_decode();
    if (prefill) bench_prefill(16384);

    printf("| what                         | ours ms  | floor ms | x floor | target | graphs off ms "
           "| x floor off | sampled ms | full-logits ms | HF ms    | x HF  | target |\n");
    printf("|------------------------------|----------|----------|---------|--------|--------------"
           "-|-------------|------------|----------------|----------|-------|--------|\n");
    for (int i = 0; i < n_rows; i++) {
        decode_row *r = &rows[i];
        char key[64], what[64];
        snprintf(key, sizeof key, "decode_b%d_ctx%d_ms", r->B, r->ctx);
        snprintf(what, sizeof what, "decode 8B B=%d ctx=%d", r->B, r->ctx);
        double h = hf_get(hf, key);
        const char *tf = r->B == 1 ? (r->ctx == 128 ? "1.20" : "-") : r->B == 64 ? "1.35" : "-";
        const char *th = r->B == 1 ? ">=5" : r->B == 64 ? ">=3" : "-";
        printf("| %-28s | %8.3f | %8.3f | %7.2f | %6s | %13.3f | %11.2f | %10.3f | %14.3f | %8.3f | "
               "%5.2f | %6s |\n", what, r->ms, r->floor_ms, r->ms / r->floor_ms, tf, r->eager_ms,
               r->eager_ms / r->floor_ms, r->sample_ms, r->full_ms, h, h > 0 ? h / r->ms : 0.0, th);
    }
    printf("\nours = decode graphs on (default); graphs off = the same step op by op, same run\n");
    if (!prefill) {
        cJSON_Delete(hf);
        backend_destroy(g);
        return 0;
    }
    double rate = prefill_tflop / (prefill_ms * 1e-3);
    double h = hf_get(hf, "prefill_3b_16k_ms");
    printf("\n| what                         | ours ms  | floor ms | x floor | target | HF ms    | x HF  | target |\n");
    printf("|------------------------------|----------|----------|---------|--------|----------|-------|--------|\n");
    printf("| prefill 3B T=16384 (1 step)  | %8.1f | %8.1f | %7.2f | %6s | %8.1f | %5.2f | %6s |\n",
           prefill_ms, prefill_tflop / gemm_tflops * 1e3, prefill_ms / (prefill_tflop / gemm_tflops * 1e3),
           "<=1.82", h, h > 0 ? h / prefill_ms : 0.0, ">=1.1");
    printf("\nprefill: %.1f model TFLOP in %.1f ms = %.0f TFLOP/s = %.1f%% of the GEMM rate "
           "(target >= 55%%)\n", prefill_tflop, prefill_ms, rate, 100.0 * rate / gemm_tflops);
    printf("floor = (weights read + K/V read) / copy rate; prefill floor = model FLOPs / GEMM rate\n");
    cJSON_Delete(hf);
    backend_destroy(g);
    return 0;
}
#endif
