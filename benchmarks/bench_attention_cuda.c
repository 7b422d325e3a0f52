/* bench_attention_cuda.c: the lab program of the CUDA decode attention kernels
 * (attention.cu): every selectable variant checked against the CPU backend, then timed
 * over decode batches at Llama-3.1-8B shapes (H 32, K 8, D 128, block_size 16, bf16 K/V)
 * against the card's copy rate measured in the same run.
 *
 * Variants ("configs") are backends created under different environments, one backend
 * each in this one process, all on device 0 and sharing the same inputs:
 *   BENCH_ATTN_CONFIGS="v1 v2 v3 v3:stages=2 v3:split=2"   (default: "v1 v2 v3")
 * a config is PDSERVE_CUDA_ATTN's value (v1, v2, v3, basic), then optional
 * ":stages=N" (PDSERVE_CUDA_ATTN_STAGES) and ":split=N" (PDSERVE_CUDA_ATTN_SPLIT, 0 auto);
 * attention.cu reads them at the backend's first attention call, which happens here
 * right after the backend is made.
 *
 * (1) Check: for each config, several steps (GQA 4 and 1 and 7 and 16, D 128 and 64,
 *     block sizes 16, 7, 1, contexts not multiples of 16 nor of any tile, mixed lengths
 *     in one batch, rows of 2-15-token chunks, split-K boundaries) on fresh random
 *     inputs: |gpu - cpu| <= 1e-2 (|cpu| + rms of the output row), no NaN, every output
 *     element written (poisoned with NaN first). Any failure: exit 1.
 * (2) Time: decode, B in {1, 8, 32, 64, 128} x ctx in {512, 2048, 8192} (combos whose
 *     K/V exceed 40 GB skipped), each config: us per call (median of 5 batches of
 *     back-to-back calls, events on the backend's stream), GB/s of the K/V bytes that
 *     must be read (2 B ctx K D 2), the copy ceiling (1 GiB d2d, read + written) and the
 *     ratio; once op by op (host work per call included: at small B the host's launch
 *     rate, not the GPU, can set the time) and once replayed from a captured graph of
 *     GRAPH_REPS calls on the decode-step path (seqs NULL), the GPU's time alone. The
 *     K/V pool is rotated over copies when one would fit in L2; the metadata stays the
 *     same, so it is uploaded once, as in a model step. The ratio holds bytes read
 *     against a copy's bytes read + written, so a pure read stream can pass 100%.
 * BENCH_ATTN_QUICK=1 times only B=64 ctx=2048 and B=1 ctx=8192; BENCH_ATTN_CHECK=0 skips
 * (1) (for sweeps of settings already checked).
 * A program, never a test (STYLE.md 9). Exits 77 when there is no GPU. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "util/util.h"

#if !PDSERVE_HAVE_CUDA
int main(void) {
    fprintf(stderr, "bench_attention_cuda: pdserve was built without CUDA\n");
    return 77;
}
#else
#include "backend/cuda/backend_cuda.h"

enum { H_ = 32, K_ = 8, D_ = 128, BS_ = 16 };
#define MAX_CONFIGS 16
#define ROTATE_BYTES ((size_t)256 << 20) /* several L2s (50-60 MB on H100/H200) */
#define MAX_KV_BYTES 40e9
#define RTOL 1e-2

typedef struct config {
    char name[64];    /* as given, e.g. "v3:stages=2" */
    char variant[16]; /* PDSERVE_CUDA_ATTN */
    int stages;       /* 0: not set */
    int split;        /* -1: not set */
    backend *b;
} config;

static config cfgs[MAX_CONFIGS];
static int n_cfgs;
static backend *cpu;
static double copy_gbs;
static pd_rng rng;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* ---- configs ------------------------------------------------------------------------------ */

static void config_parse(config *c, const char *s) {
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", s);
    c->split = -1;
    char buf[64];
    snprintf(buf, sizeof buf, "%s", s);
    char *save = NULL, *tok = strtok_r(buf, ":", &save);
    snprintf(c->variant, sizeof c->variant, "%s", tok ? tok : "v3");
    while ((tok = strtok_r(NULL, ":", &save))) {
        if (strncmp(tok, "stages=", 7) == 0) c->stages = atoi(tok + 7);
        else if (strncmp(tok, "split=", 6) == 0) c->split = atoi(tok + 6);
        else fprintf(stderr, "bench_attention_cuda: config %s: unknown setting %s\n", s, tok);
    }
}

/* One attention call of one decode row, so that the backend reads its settings now. */
static void config_latch(backend *b) {
    void *kc = b->ops->alloc(b, (size_t)BS_ * K_ * D_ * 2), *vc = b->ops->alloc(b, (size_t)BS_ * K_ * D_ * 2);
    void *qkv = b->ops->alloc(b, (size_t)(H_ + 2 * K_) * D_ * 2), *out = b->ops->alloc(b, (size_t)H_ * D_ * 2);
    int32_t table[1] = {0};
    attn_seq s = {0, 1, 1, table, 1};
    b->ops->attention(b, out, qkv, kc, vc, &s, 1, 1, H_, K_, D_, BS_, 0.088f);
    b->ops->sync(b);
    b->ops->free(b, kc);
    b->ops->free(b, vc);
    b->ops->free(b, qkv);
    b->ops->free(b, out);
}

/* Makes the config's backend under its environment; returns 0 or -1 (no GPU). */
static int config_open(config *c, char *err, size_t errlen) {
    char v[16];
    setenv("PDSERVE_CUDA_ATTN", c->variant, 1);
    if (c->stages > 0) {
        snprintf(v, sizeof v, "%d", c->stages);
        setenv("PDSERVE_CUDA_ATTN_STAGES", v, 1);
    } else {
        unsetenv("PDSERVE_CUDA_ATTN_STAGES");
    }
    if (c->split >= 0) {
        snprintf(v, sizeof v, "%d", c->split);
        setenv("PDSERVE_CUDA_ATTN_SPLIT", v, 1);
    } else {
        unsetenv("PDSERVE_CUDA_ATTN_SPLIT");
    }
    c->b = backend_cuda_create(0, err, errlen);
    if (!c->b) return -1;
    config_latch(c->b);
    return 0;
}

/* ---- ceiling ---------------------------------------------------------------------------- */

static double median_ms(backend *b, void (*fn)(void *, backend *, int), void *ctx) {
    fn(ctx, b, 0);
    b->ops->sync(b);
    backend_cuda_timer_start(b);
    fn(ctx, b, 1);
    double one = backend_cuda_timer_stop_ms(b);
    int iters = (int)(20.0 / (one > 1e-3 ? one : 1e-3));
    iters = PD_MAX(2, PD_MIN(iters, 500));
    double t[5];
    for (int r = 0; r < 5; r++) {
        backend_cuda_timer_start(b);
        for (int i = 0; i < iters; i++) fn(ctx, b, i);
        t[r] = backend_cuda_timer_stop_ms(b) / iters;
    }
    qsort(t, 5, sizeof t[0], cmp_double);
    return t[2];
}

typedef struct copy_ctx {
    void *a, *b;
    size_t bytes;
} copy_ctx;

static void run_copy(void *c, backend *b, int i) {
    copy_ctx *x = c;
    (void)i;
    b->ops->copy_d2d(b, x->b, x->a, x->bytes);
}

static void measure_copy(backend *b) {
    copy_ctx c = {NULL, NULL, (size_t)1 << 30};
    c.a = b->ops->alloc(b, c.bytes);
    b->ops->fill_random(b, c.a, DTYPE_BF16, c.bytes / 2, 1, 1.0f);
    c.b = b->ops->alloc(b, c.bytes);
    double ms = median_ms(b, run_copy, &c);
    copy_gbs = 2.0 * c.bytes / (ms * 1e-3) / 1e9;
    b->ops->free(b, c.a);
    b->ops->free(b, c.b);
}

/* ---- check against the CPU backend --------------------------------------------------------- */

typedef struct shape {
    int H, K, D, bs;
} shape;

static void shuffle(int32_t *a, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rng_next(&rng) % (uint64_t)(i + 1));
        int32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

static float *rand_host(size_t n) {
    float *h = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) h[i] = bf16_to_f32(f32_to_bf16(rng_normal(&rng)));
    return h;
}

static void *up(backend *b, const float *h, size_t n, dtype t) {
    void *p = b->ops->alloc(b, n * dtype_size(t));
    b->ops->upload(b, p, t, 0, h, DTYPE_F32, n);
    return p;
}

/* One step of B sequences ({q_len, ctx_len} each) on config c and on the CPU; returns
 * the number of bad elements (printed). */
static int check_step(config *c, const shape *sh, const int (*qc)[2], int B, const char *what) {
    backend *g = c->b;
    int H = sh->H, K = sh->K, D = sh->D, bs = sh->bs, T = 0, nb = 3;
    for (int i = 0; i < B; i++) T += qc[i][0], nb += (qc[i][1] + bs - 1) / bs;
    int32_t *pool = xmalloc((size_t)nb * 4);
    for (int i = 0; i < nb; i++) pool[i] = i;
    shuffle(pool, nb);
    attn_seq *seqs = xcalloc((size_t)B, sizeof *seqs);
    for (int i = 0, row = 0, used = 0; i < B; i++) {
        int n = (qc[i][1] + bs - 1) / bs;
        seqs[i] = (attn_seq){row, qc[i][0], qc[i][1], pool + used, n};
        row += qc[i][0];
        used += n;
    }
    size_t cache_n = (size_t)nb * bs * K * D, qn = (size_t)T * (H + 2 * K) * D, on = (size_t)T * H * D;
    float *hk = rand_host(cache_n), *hv = rand_host(cache_n), *hq = rand_host(qn);
    void *gk = up(g, hk, cache_n, g->ops->kv_type), *gv = up(g, hv, cache_n, g->ops->kv_type);
    void *gq = up(g, hq, qn, g->ops->act_type), *go = g->ops->alloc(g, on * 2);
    void *ck = up(cpu, hk, cache_n, cpu->ops->kv_type), *cv = up(cpu, hv, cache_n, cpu->ops->kv_type);
    void *cq = up(cpu, hq, qn, cpu->ops->act_type);
    void *co = cpu->ops->alloc(cpu, on * dtype_size(cpu->ops->act_type));
    float scale = 1.0f / sqrtf((float)D);
    g->ops->fill(g, go, g->ops->act_type, on, NAN);
    g->ops->attention(g, go, gq, gk, gv, seqs, B, T, H, K, D, bs, scale);
    cpu->ops->attention(cpu, co, cq, ck, cv, seqs, B, T, H, K, D, bs, scale);
    float *a = xmalloc(on * sizeof(float)), *r = xmalloc(on * sizeof(float));
    g->ops->download_f32(g, a, go, g->ops->act_type, on);
    cpu->ops->download_f32(cpu, r, co, cpu->ops->act_type, on);
    int bad = 0;
    double worst = 0;
    size_t row_len = (size_t)H * D;
    for (size_t t = 0; t < (size_t)T; t++) {
        double ss = 0;
        for (size_t i = 0; i < row_len; i++) ss += (double)r[t * row_len + i] * r[t * row_len + i];
        double rms = sqrt(ss / (double)row_len);
        for (size_t i = t * row_len; i < (t + 1) * row_len; i++) {
            double d = fabs((double)a[i] - r[i]), tol = RTOL * (fabs(r[i]) + rms);
            if (!isfinite(a[i]) || d > tol) {
                if (bad < 3)
                    fprintf(stderr, "  %s %s: row %zu elem %zu gpu %g cpu %g\n", c->name, what, t,
                            i - t * row_len, a[i], r[i]);
                bad++;
            } else if (d / tol > worst) {
                worst = d / tol;
            }
        }
    }
    printf("check %-14s %-44s H%d K%d D%d bs%d B%d T%d: %s (worst %.2f of tolerance)\n", c->name,
           what, H, K, D, bs, B, T, bad ? "FAIL" : "ok", worst);
    free(a);
    free(r);
    free(hk);
    free(hv);
    free(hq);
    g->ops->free(g, gk);
    g->ops->free(g, gv);
    g->ops->free(g, gq);
    g->ops->free(g, go);
    cpu->ops->free(cpu, ck);
    cpu->ops->free(cpu, cv);
    cpu->ops->free(cpu, cq);
    cpu->ops->free(cpu, co);
    free(seqs);
    free(pool);
    return bad;
}

static int check_config(config *c) {
    static const shape llama = {32, 8, 128, 16}, d64 = {8, 2, 64, 16}, mha = {8, 8, 128, 16},
                       g7 = {28, 4, 128, 7}, g16 = {16, 1, 128, 32}, bs1 = {8, 8, 64, 1},
                       g2 = {8, 4, 128, 16};
    static const int decode[][2] = {{1, 1}, {1, 17}, {1, 130}, {1, 2048}, {1, 777}, {1, 64}, {1, 65}};
    static const int chunks[][2] = {{5, 261}, {1, 300}, {15, 15}, {2, 1000}, {1, 129}};
    static const int long1[][2] = {{1, 8192}};
    static const int long2[][2] = {{1, 5000}, {1, 3}};
    int bad = 0;
    const shape *all[] = {&llama, &d64, &mha, &g7, &g16, &bs1, &g2};
    for (size_t k = 0; k < PD_ARRAY_LEN(all); k++) {
        bad += check_step(c, all[k], decode, PD_ARRAY_LEN(decode), "decode mix");
        bad += check_step(c, all[k], chunks, PD_ARRAY_LEN(chunks), "short chunks + decode");
        bad += check_step(c, all[k], long2, PD_ARRAY_LEN(long2), "split-K: 5000 + 3");
    }
    bad += check_step(c, &llama, long1, 1, "split-K: one of 8192");
    /* many rows of random lengths: the large-B path, and a mixed batch */
    int (*many)[2] = xmalloc(96 * sizeof *many);
    for (int i = 0; i < 96; i++) {
        many[i][0] = 1;
        many[i][1] = 1 + (int)(rng_next(&rng) % 2500);
    }
    bad += check_step(c, &llama, (const int(*)[2])many, 64, "B=64, random ctx 1..2500");
    bad += check_step(c, &llama, (const int(*)[2])many, 96, "B=96, random ctx 1..2500");
    bad += check_step(c, &d64, (const int(*)[2])many, 40, "B=40, random ctx 1..2500");
    free(many);
    return bad;
}

/* ---- timing ------------------------------------------------------------------------------ */

typedef struct att_ctx {
    uint8_t *kc, *vc; /* sets copies of the pool, cache_bytes apart */
    void *qkv, *out;
    attn_seq *seqs;
    int B, sets;
    size_t cache_bytes;
} att_ctx;

static void run_attention(void *c, backend *b, int i) {
    att_ctx *a = c;
    size_t off = (size_t)(i % a->sets) * a->cache_bytes;
    b->ops->attention(b, a->out, a->qkv, a->kc + off, a->vc + off, a->seqs, a->B, a->B, H_, K_, D_,
                      BS_, 0.08838834764831845f);
}

/* ---- the graph path: what a model step runs ------------------------------------------------ */

#define GRAPH_REPS 20 /* attention calls per captured graph */

typedef struct graph_ctx {
    void *g;
} graph_ctx;

static void run_graph(void *c, backend *b, int i) {
    graph_ctx *x = c;
    (void)i;
    if (!b->ops->graph_launch(b, x->g)) {
        fprintf(stderr, "bench_attention_cuda: a captured graph went stale\n");
        exit(1);
    }
}

/* ms per attention call of the decode-graph path (seqs NULL, metadata put in place by
 * decode_upload), GRAPH_REPS calls over the rotated pools captured in one graph and
 * replayed: the GPU's time without the host's per-call work. -1 when the backend runs
 * without graphs (PDSERVE_CUDA_GRAPHS=0). */
static double time_graph(backend *b, att_ctx *a, const int32_t *tok, const int32_t *pos,
                         const int32_t *slot) {
    if (!b->ops->decode_upload || !b->ops->graph_begin) return -1;
    int variant;
    if (!b->ops->decode_upload(b, tok, pos, slot, a->seqs, a->B, a->B, BS_, &variant)) return -1;
    const float scale = 0.08838834764831845f;
    /* op by op first: sizes the split-K scratch outside the capture */
    b->ops->attention(b, a->out, a->qkv, a->kc, a->vc, NULL, a->B, a->B, H_, K_, D_, BS_, scale);
    b->ops->sync(b);
    b->ops->graph_begin(b);
    for (int r = 0; r < GRAPH_REPS; r++) {
        size_t off = (size_t)(r % a->sets) * a->cache_bytes;
        b->ops->attention(b, a->out, a->qkv, a->kc + off, a->vc + off, NULL, a->B, a->B, H_, K_,
                          D_, BS_, scale);
    }
    graph_ctx gc = {b->ops->graph_end(b)};
    double ms = median_ms(b, run_graph, &gc) / GRAPH_REPS;
    b->ops->graph_free(b, gc.g);
    return ms;
}

static void time_shape(int B, int ctx) {
    backend *g = cfgs[0].b;
    att_ctx a = {0};
    a.B = B;
    int per = (ctx + BS_ - 1) / BS_, nb = B * per;
    int32_t *pool = xmalloc((size_t)nb * 4);
    for (int i = 0; i < nb; i++) pool[i] = i;
    shuffle(pool, nb);
    a.seqs = xcalloc((size_t)B, sizeof *a.seqs);
    for (int b = 0; b < B; b++) a.seqs[b] = (attn_seq){b, 1, ctx, pool + (size_t)b * per, per};
    a.cache_bytes = (size_t)nb * BS_ * K_ * D_ * 2;
    a.sets = (int)PD_MAX(1, PD_MIN((ROTATE_BYTES + 2 * a.cache_bytes - 1) / (2 * a.cache_bytes), 64));
    a.kc = g->ops->alloc(g, a.cache_bytes * a.sets);
    a.vc = g->ops->alloc(g, a.cache_bytes * a.sets);
    g->ops->fill_random(g, a.kc, DTYPE_BF16, a.cache_bytes * a.sets / 2, 31, 1.0f);
    g->ops->fill_random(g, a.vc, DTYPE_BF16, a.cache_bytes * a.sets / 2, 32, 1.0f);
    a.qkv = g->ops->alloc(g, (size_t)B * (H_ + 2 * K_) * D_ * 2);
    g->ops->fill_random(g, a.qkv, DTYPE_BF16, (size_t)B * (H_ + 2 * K_) * D_, 33, 1.0f);
    a.out = g->ops->alloc(g, (size_t)B * H_ * D_ * 2);
    g->ops->sync(g);
    int32_t *tok = xcalloc((size_t)B, 4), *pos = xmalloc((size_t)B * 4), *slot = xmalloc((size_t)B * 4);
    for (int b = 0; b < B; b++) {
        pos[b] = ctx - 1;
        slot[b] = a.seqs[b].block_table[pos[b] / BS_] * BS_ + pos[b] % BS_;
    }
    double bytes = 2.0 * B * (double)ctx * K_ * D_ * 2;
    for (int k = 0; k < n_cfgs; k++) {
        double ms = median_ms(cfgs[k].b, run_attention, &a);
        double gms = time_graph(cfgs[k].b, &a, tok, pos, slot);
        double gbs = bytes / (ms * 1e-3) / 1e9, ggbs = gms > 0 ? bytes / (gms * 1e-3) / 1e9 : 0;
        printf("| %-16s | %4d | %5d | %9.1f | %7.0f GB/s |  %5.1f%% | %9.1f | %7.0f GB/s |  %5.1f%% | "
               "%5.0f GB/s |\n",
               cfgs[k].name, B, ctx, ms * 1e3, gbs, 100.0 * gbs / copy_gbs, gms * 1e3, ggbs,
               100.0 * ggbs / copy_gbs, copy_gbs);
    }
    fflush(stdout);
    free(tok);
    free(pos);
    free(slot);
    g->ops->free(g, a.kc);
    g->ops->free(g, a.vc);
    g->ops->free(g, a.qkv);
    g->ops->free(g, a.out);
    free(a.seqs);
    free(pool);
}

int main(void) {
    char err[256] = "";
    log_set_level(LOG_LEVEL_WARN);
    rng_seed(&rng, (uint64_t)time(NULL));
    const char *list = getenv("BENCH_ATTN_CONFIGS");
    char buf[512];
    snprintf(buf, sizeof buf, "%s", list && *list ? list : "v1 v2 v3");
    char *save = NULL;
    for (char *tok = strtok_r(buf, " ,", &save); tok && n_cfgs < MAX_CONFIGS;
         tok = strtok_r(NULL, " ,", &save))
        config_parse(&cfgs[n_cfgs++], tok);
    for (int k = 0; k < n_cfgs; k++) {
        if (config_open(&cfgs[k], err, sizeof err) != 0) {
            fprintf(stderr, "bench_attention_cuda: %s\n", err);
            return 77;
        }
    }
    cpu = backend_cpu_create(0);
    backend_cuda_info info;
    backend_cuda_info_get(cfgs[0].b, &info);
    char date[64];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    printf("card: %s (sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MiB, SM clock %d MHz as found)\n",
           info.name, info.cc_major, info.cc_minor, info.sm_count,
           (double)info.mem_total / (1 << 30), (double)info.l2_bytes / (1 << 20),
           info.clock_khz / 1000);
    printf("date: %s; configs:", date);
    for (int k = 0; k < n_cfgs; k++)
        printf(" [%s: PDSERVE_CUDA_ATTN=%s PDSERVE_CUDA_ATTN_STAGES=%d PDSERVE_CUDA_ATTN_SPLIT=%d]",
               cfgs[k].name, cfgs[k].variant, cfgs[k].stages, PD_MAX(cfgs[k].split, 0));
    printf("\n(stages 0: the default, 3; split 0: automatic)\n\n");

    int bad = 0;
    const char *check = getenv("BENCH_ATTN_CHECK");
    if (check && strcmp(check, "0") == 0) {
        printf("check: skipped (BENCH_ATTN_CHECK=0)\n\n");
    } else {
        for (int k = 0; k < n_cfgs; k++) bad += check_config(&cfgs[k]);
        printf("\ncheck: %s (%d bad elements)\n\n", bad ? "FAILED" : "all ok", bad);
    }

    measure_copy(cfgs[0].b);
    printf("ceiling: copy %.0f GB/s (read+write, 1 GiB cudaMemcpy d2d)\n", copy_gbs);
    printf("decode attention, H=%d K=%d D=%d block_size=%d, bf16 K/V; GB/s of K/V read "
           "(2 B ctx K D 2 bytes)\n\n",
           H_, K_, D_, BS_);
    printf("op: one attention op per call, host work included (metadata built and compared, "
           "launches); graph: %d calls captured in a graph and replayed, GPU time only (the "
           "decode-step path: seqs NULL, split count from B alone)\n\n",
           GRAPH_REPS);
    printf("| config           |    B |   ctx |     op us |       op K/V | op/copy |  graph us |  "
           "graph K/V   | gr/copy |  copy ceil |\n");
    printf("|------------------|------|-------|-----------|--------------|---------|-----------|--"
           "------------|---------|------------|\n");
    const char *quick = getenv("BENCH_ATTN_QUICK");
    static const int Bs[] = {1, 8, 32, 64, 128}, ctxs[] = {512, 2048, 8192};
    for (size_t i = 0; i < PD_ARRAY_LEN(Bs); i++)
        for (size_t j = 0; j < PD_ARRAY_LEN(ctxs); j++) {
            double kv = 2.0 * Bs[i] * (double)ctxs[j] * K_ * D_ * 2;
            if (kv > MAX_KV_BYTES) continue;
            if (quick && strcmp(quick, "1") == 0 &&
                !((Bs[i] == 64 && ctxs[j] == 2048) || (Bs[i] == 1 && ctxs[j] == 8192)))
                continue;
            time_shape(Bs[i], ctxs[j]);
        }
    for (int k = 0; k < n_cfgs; k++) backend_destroy(cfgs[k].b);
    backend_destroy(cpu);
    return bad ? 1 : 0;
}
#endif
