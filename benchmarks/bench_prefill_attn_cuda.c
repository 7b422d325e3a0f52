/* bench_prefill_attn_cuda.c: the lab program of the tensor-core prefill attention
 * (src/backend/cuda/attention_prefill.cu and attention_prefill_sm90a.cu), one column
 * per kernel variant, picked by PDSERVE_CUDA_FA (v1, v2, v3) inside this one process.
 *
 * 0. Probe: v3 against v2 on a few small steps, first with every tile filled by hand
 *    (PDSERVE_CUDA_FA3_MANUAL=1), then with TMA copies, printing the relative L2
 *    error and the worst element; a failing case also prints its error by 16-row band
 *    and by 8-column group of the worst head, so that a layout mistake shows where it
 *    bites. Never fails the run by itself.
 * 1. Check: every variant against the CPU backend's attention op on fresh random
 *    inputs: chunks of 1..300 rows after cached prefixes of 0..2000 tokens, several
 *    sequences of different lengths in one call, GQA ratios 3 and 4, D 64 and 128,
 *    block sizes 16 and 7, over a shuffled block pool. Fails (exit 1) on a NaN or a
 *    row whose relative L2 error passes 1e-2. The variant column reads "v3>v2" where
 *    v3 could not run and v2 did (block size 7, a device other than sm_90).
 * 2. Time: causal prefill attention at the Llama-3.2-3B shape (H 24, K 8, D 128, bf16,
 *    block size 16): one sequence from position 0 with T = 2048, 8192, 16384, and a
 *    2048-row chunk after a 14336-token prefix. Prints ms, TFLOP/s (4 H D per (row,
 *    key) pair, the causal pairs only), the cuBLAS bf16 GEMM 8192^3 rate measured in
 *    the same run (the matmul op), the ratio, and the speed against v2.
 *
 * Method: the median of 5 timed batches of back-to-back calls (about 20 ms each, events
 * on the backend's stream) after a warm-up call. A program, never a test (STYLE.md 9).
 * Exits 77 when there is no GPU. Usage:
 *   bench_prefill_attn_cuda [--check-only | --probe-only] [--no-probe] [--variants=v2,v3]
 * (variants default to v1,v2,v3; the probe runs when v2 and v3 are both among them).
 * PDSERVE_LOG=info also prints each kernel's shared memory, registers and blocks per
 * SM. */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "util/util.h"

#if !PDSERVE_HAVE_CUDA
int main(void) {
    fprintf(stderr, "bench_prefill_attn_cuda: pdserve was built without CUDA\n");
    return 77;
}
#else
#include "backend/cuda/backend_cuda.h"

#define RTOL 1e-2
#define MAX_VARIANTS 3
static const char *ALL_VARIANTS[MAX_VARIANTS] = {"v1", "v2", "v3"};
static const char *VARIANTS[MAX_VARIANTS];
static int N_VARIANTS;

static backend *g, *cpu;
static pd_rng rng;
static double gemm_tflops; /* ceiling: TFLOP/s */

static void variant_set(const char *v) { setenv("PDSERVE_CUDA_FA", v, 1); }

/* The variant just asked for ("v3"), or "v3>v2" when v2 ran in its place; a step of
 * decode rows only (no prefill tile) keeps the name asked for. */
static const char *variant_label(const char *asked, char *buf, size_t n) {
    int ran = backend_cuda_prefill_variant_ran();
    if (ran == 0) snprintf(buf, n, "%s", asked);
    else if (ran == asked[1] - '0') snprintf(buf, n, "%s", asked);
    else snprintf(buf, n, "%s>v%d", asked, ran);
    return buf;
}

/* ---- timing (bench_kernels_cuda.c's method) ------------------------------------------- */

typedef void (*bench_fn)(void *ctx);

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median over 5 batches of the time of one call, in ms. Batches last about 20 ms. */
static double time_op(bench_fn fn, void *ctx) {
    fn(ctx);
    g->ops->sync(g);
    backend_cuda_timer_start(g);
    fn(ctx);
    double one = backend_cuda_timer_stop_ms(g);
    int iters = (int)(20.0 / (one > 1e-3 ? one : 1e-3));
    iters = PD_MAX(2, PD_MIN(iters, 500));
    double t[5];
    for (int r = 0; r < 5; r++) {
        backend_cuda_timer_start(g);
        for (int i = 0; i < iters; i++) fn(ctx);
        t[r] = backend_cuda_timer_stop_ms(g) / iters;
    }
    qsort(t, 5, sizeof t[0], cmp_double);
    return t[2];
}

typedef struct mm_ctx {
    void *x, *w, *out;
    int n;
} mm_ctx;

static void run_mm(void *c) {
    mm_ctx *m = c;
    g->ops->matmul(g, m->out, m->x, m->w, NULL, m->n, m->n, m->n);
}

static void measure_gemm(void) {
    mm_ctx m = {NULL, NULL, NULL, 8192};
    size_t nn = (size_t)m.n * m.n;
    m.x = g->ops->alloc(g, nn * 2);
    m.w = g->ops->alloc(g, nn * 2);
    m.out = g->ops->alloc(g, nn * 2);
    g->ops->fill_random(g, m.x, DTYPE_BF16, nn, 2, 1.0f);
    g->ops->fill_random(g, m.w, DTYPE_BF16, nn, 3, 0.01f);
    double ms = time_op(run_mm, &m);
    gemm_tflops = 2.0 * m.n * m.n * (double)m.n / (ms * 1e-3) / 1e12;
    g->ops->free(g, m.x);
    g->ops->free(g, m.w);
    g->ops->free(g, m.out);
    printf("ceiling: cuBLAS bf16 GEMM 8192^3 (matmul op) %.0f TFLOP/s\n\n", gemm_tflops);
}

/* ---- one attention step on both backends ----------------------------------------------- */

typedef struct attn_shape {
    int H, K, D, bs;
} attn_shape;

/* A step of B sequences, qc[b] = {q_len, ctx_len}, every sequence's blocks drawn from
 * one shuffled pool (plus spares nobody uses); the data lives on the GPU and, when
 * with_cpu, as the same values on the CPU backend. */
typedef struct attn_step {
    attn_shape s;
    int B, T, nb;
    attn_seq *seqs;
    int32_t *pool;
    void *qkv, *kc, *vc, *out;         /* GPU */
    void *qkv_c, *kc_c, *vc_c, *out_c; /* CPU (NULL without with_cpu) */
} attn_step;

/* n host floats ~ normal(0, 1), each exactly representable in bf16 */
static float *rand_bf16(size_t n) {
    float *h = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) h[i] = bf16_to_f32(f32_to_bf16(rng_normal(&rng)));
    return h;
}

/* Same random values into a buffer of each backend, in each one's activation (kv
 * false) or KV-cache type; the CPU side is skipped when dc is NULL. */
static void fill_both(void *dg, void *dc, size_t n, uint64_t seed, bool kv) {
    if (!dc) { /* timing only: the GPU's own generator is much faster */
        g->ops->fill_random(g, dg, kv ? g->ops->kv_type : g->ops->act_type, n, seed, 1.0f);
        return;
    }
    float *h = rand_bf16(n);
    g->ops->upload(g, dg, kv ? g->ops->kv_type : g->ops->act_type, 0, h, DTYPE_F32, n);
    cpu->ops->upload(cpu, dc, kv ? cpu->ops->kv_type : cpu->ops->act_type, 0, h, DTYPE_F32, n);
    free(h);
}

static void step_init(attn_step *st, attn_shape s, const int (*qc)[2], int B, bool with_cpu) {
    memset(st, 0, sizeof *st);
    st->s = s;
    st->B = B;
    for (int b = 0; b < B; b++) st->T += qc[b][0], st->nb += (qc[b][1] + s.bs - 1) / s.bs;
    st->nb += 5;
    st->pool = xmalloc((size_t)st->nb * 4);
    for (int i = 0; i < st->nb; i++) st->pool[i] = i;
    for (int i = st->nb - 1; i > 0; i--) {
        int j = (int)(rng_next(&rng) % (uint64_t)(i + 1));
        int32_t t = st->pool[i];
        st->pool[i] = st->pool[j];
        st->pool[j] = t;
    }
    st->seqs = xcalloc((size_t)B, sizeof *st->seqs);
    int row = 0, used = 0;
    for (int b = 0; b < B; b++) {
        int nblk = (qc[b][1] + s.bs - 1) / s.bs;
        st->seqs[b] = (attn_seq){row, qc[b][0], qc[b][1], st->pool + used, nblk};
        used += nblk;
        row += qc[b][0];
    }
    size_t cache_n = (size_t)st->nb * s.bs * s.K * s.D, qkv_n = (size_t)st->T * (s.H + 2 * s.K) * s.D;
    size_t out_n = (size_t)st->T * s.H * s.D;
    size_t kv_sz = dtype_size(g->ops->kv_type), act_sz = dtype_size(g->ops->act_type);
    st->kc = g->ops->alloc(g, cache_n * kv_sz);
    st->vc = g->ops->alloc(g, cache_n * kv_sz);
    st->qkv = g->ops->alloc(g, qkv_n * act_sz);
    st->out = g->ops->alloc(g, out_n * act_sz);
    if (with_cpu) {
        st->kc_c = cpu->ops->alloc(cpu, cache_n * dtype_size(cpu->ops->kv_type));
        st->vc_c = cpu->ops->alloc(cpu, cache_n * dtype_size(cpu->ops->kv_type));
        st->qkv_c = cpu->ops->alloc(cpu, qkv_n * dtype_size(cpu->ops->act_type));
        st->out_c = cpu->ops->alloc(cpu, out_n * dtype_size(cpu->ops->act_type));
    }
    fill_both(st->kc, st->kc_c, cache_n, 11, true);
    fill_both(st->vc, st->vc_c, cache_n, 12, true);
    fill_both(st->qkv, st->qkv_c, qkv_n, 13, false);
}

static void step_free(attn_step *st) {
    g->ops->free(g, st->kc), g->ops->free(g, st->vc), g->ops->free(g, st->qkv), g->ops->free(g, st->out);
    if (st->kc_c) {
        cpu->ops->free(cpu, st->kc_c), cpu->ops->free(cpu, st->vc_c);
        cpu->ops->free(cpu, st->qkv_c), cpu->ops->free(cpu, st->out_c);
    }
    free(st->seqs);
    free(st->pool);
}

static void run_gpu(void *c) {
    attn_step *st = c;
    g->ops->attention(g, st->out, st->qkv, st->kc, st->vc, st->seqs, st->B, st->T, st->s.H, st->s.K,
                      st->s.D, st->s.bs, 1.0f / sqrtf((float)st->s.D));
}

/* ---- 0. probe: v3 against v2 ----------------------------------------------------------- */

/* Downloads st's output after running the variant v (NaN-poisoned first). */
static float *run_variant(attn_step *st, const char *v) {
    size_t n = (size_t)st->T * st->s.H * st->s.D;
    variant_set(v);
    g->ops->fill(g, st->out, g->ops->act_type, n, NAN);
    run_gpu(st);
    float *a = xmalloc(n * sizeof(float));
    g->ops->download_f32(g, a, st->out, g->ops->act_type, n);
    return a;
}

/* Relative L2 error of a against r over the rows and columns selected (row in
 * [r0, r1), column index c of the head-dim with c / cg == cgi when cgi >= 0), in the
 * q head h (all heads when h < 0). */
static double rel_err(const attn_step *st, const float *a, const float *r, int r0, int r1, int h,
                      int cg, int cgi) {
    int H = st->s.H, D = st->s.D;
    double num = 0, den = 0;
    for (int t = r0; t < r1 && t < st->T; t++)
        for (int hh = 0; hh < H; hh++) {
            if (h >= 0 && hh != h) continue;
            for (int c = 0; c < D; c++) {
                if (cgi >= 0 && c / cg != cgi) continue;
                size_t i = ((size_t)t * H + hh) * D + c;
                double d = isfinite(a[i]) ? (double)a[i] - r[i] : 1e30;
                num += d * d, den += (double)r[i] * r[i];
            }
        }
    return sqrt(num / (den > 1e-30 ? den : 1e-30));
}

/* One step: v2's output, then v3's with TMA copies (manual false) or with every tile
 * filled by hand (PDSERVE_CUDA_FA3_MANUAL=1), compared. */
static void probe_case(attn_shape s, const int (*qc)[2], int B, bool manual) {
    attn_step st;
    step_init(&st, s, qc, B, false);
    char name[96];
    int len = snprintf(name, sizeof name, "H%d K%d D%d bs%d", s.H, s.K, s.D, s.bs);
    for (int b = 0; b < B && len < (int)sizeof name; b++)
        len += snprintf(name + len, sizeof name - len, " %d@%d", qc[b][0], qc[b][1] - qc[b][0]);
    float *r = run_variant(&st, "v2");
    size_t n = (size_t)st.T * s.H * s.D;
    {
        if (manual) setenv("PDSERVE_CUDA_FA3_MANUAL", "1", 1);
        float *a = run_variant(&st, "v3");
        unsetenv("PDSERVE_CUDA_FA3_MANUAL");
        char label[16];
        variant_label("v3", label, sizeof label);
        double worst = 0;
        size_t wi = 0;
        int nan = 0;
        for (size_t i = 0; i < n; i++) {
            double d = isfinite(a[i]) ? fabs((double)a[i] - r[i]) : INFINITY;
            if (!isfinite(a[i])) nan++;
            if (d > worst) worst = d, wi = i;
        }
        double e = rel_err(&st, a, r, 0, st.T, -1, 1, -1);
        int wrow = (int)(wi / ((size_t)s.H * s.D)), wh = (int)(wi / s.D % s.H);
        int wc = (int)(wi % s.D);
        bool ok = nan == 0 && e < RTOL;
        printf("| %-34s | %-6s | %-6s | %9.2e | %8.2e | %5d | r%d h%d c%d: %.4f vs %.4f | %-4s |\n",
               name, label, manual ? "manual" : "tma", e, worst, nan, wrow, wh, wc, a[wi], r[wi],
               ok ? "ok" : "BAD");
        if (!ok) { /* where the errors sit, for the worst element's head and 128-row tile */
            int t0 = wrow / 128 * 128;
            printf("    rows %d.. by 16: ", t0);
            for (int b = 0; b < 8; b++)
                printf(" %.1e", rel_err(&st, a, r, t0 + 16 * b, t0 + 16 * b + 16, wh, 1, -1));
            printf("\n    cols by 8:       ");
            for (int cg = 0; cg < s.D / 8; cg++)
                printf(" %.1e", rel_err(&st, a, r, t0, t0 + 128, wh, 8, cg));
            printf("\n");
        }
        free(a);
    }
    free(r);
    step_free(&st);
}

static void probe_all(void) {
    printf("probe: v3 against v2 (relative L2 over the step, worst element: row, q head, column, "
           "v3 vs v2); informative only\n\n");
    printf("| case                               | ran    | copies | rel L2    | max abs  | NaN   "
           "| worst                        | ok   |\n");
    printf("|------------------------------------|--------|--------|-----------|----------|-------"
           "|------------------------------|------|\n");
    static const int p_a[][2] = {{128, 128}};   /* one tile of rows and of keys */
    static const int p_b[][2] = {{64, 64}};     /* one consumer warpgroup, a partial tile */
    static const int p_c[][2] = {{128, 256}};   /* two key tiles: the pipelined loop once */
    static const int p_d[][2] = {{300, 1300}};  /* many tiles, a partial last one */
    static const int p_e[][2] = {{200, 1200}, {45, 45}};
    static const int p_f[][2] = {{150, 850}};
    static const struct {
        attn_shape s;
        const int (*qc)[2];
        int B;
    } cases[] = {
        {{24, 8, 128, 16}, p_a, 1}, {{24, 8, 128, 16}, p_b, 1}, {{24, 8, 128, 16}, p_c, 1},
        {{24, 8, 128, 16}, p_d, 1}, {{32, 8, 128, 16}, p_e, 2}, {{8, 2, 64, 16}, p_d, 1},
        {{24, 8, 128, 8}, p_f, 1},  {{24, 8, 128, 256}, p_f, 1},
    };
    /* copies by hand first: were TMA to fault, the wgmma side has been seen already */
    for (int manual = 1; manual >= 0; manual--)
        for (size_t i = 0; i < PD_ARRAY_LEN(cases); i++)
            probe_case(cases[i].s, cases[i].qc, cases[i].B, manual);
    printf("\n");
}

/* ---- 1. check against the CPU ---------------------------------------------------------- */

/* Runs the GPU op (NaN-poisoned output first) and compares it with the CPU's result r
 * row by row; returns whether every row is within RTOL (relative L2) and NaN-free. */
static bool check_variant(attn_step *st, const float *r, const char *name, const char *variant) {
    size_t row = (size_t)st->s.H * st->s.D, n = (size_t)st->T * row;
    g->ops->fill(g, st->out, g->ops->act_type, n, NAN);
    (void)backend_cuda_prefill_variant_ran();
    run_gpu(st);
    char label[16];
    variant = variant_label(variant, label, sizeof label);
    float *a = xmalloc(n * sizeof(float));
    g->ops->download_f32(g, a, st->out, g->ops->act_type, n);
    double worst = 0, num_all = 0, den_all = 0;
    int nan = 0, worst_row = 0;
    for (int t = 0; t < st->T; t++) {
        double num = 0, den = 0;
        for (size_t i = t * row; i < (t + 1) * row; i++) {
            if (!isfinite(a[i])) {
                nan++;
                continue;
            }
            double d = (double)a[i] - r[i];
            num += d * d, den += (double)r[i] * r[i];
        }
        num_all += num, den_all += den;
        double e = sqrt(num / (den > 1e-30 ? den : 1e-30));
        if (e > worst) worst = e, worst_row = t;
    }
    bool ok = nan == 0 && worst < RTOL;
    printf("| %-46s | %-7s | %9.2e | %9.2e | %5d | %-4s |\n", name, variant, sqrt(num_all / den_all),
           worst, nan, ok ? "ok" : "FAIL");
    if (!ok) printf("    worst row %d\n", worst_row);
    free(a);
    return ok;
}

static bool check_case(attn_shape s, const int (*qc)[2], int B) {
    attn_step st;
    step_init(&st, s, qc, B, true);
    char name[128];
    int len = snprintf(name, sizeof name, "H%d K%d D%d bs%d", s.H, s.K, s.D, s.bs);
    for (int b = 0; b < B && len < (int)sizeof name; b++)
        len += snprintf(name + len, sizeof name - len, " %d@%d", qc[b][0], qc[b][1] - qc[b][0]);
    size_t n = (size_t)st.T * s.H * s.D;
    cpu->ops->attention(cpu, st.out_c, st.qkv_c, st.kc_c, st.vc_c, st.seqs, B, st.T, s.H, s.K, s.D,
                        s.bs, 1.0f / sqrtf((float)s.D));
    float *r = xmalloc(n * sizeof(float));
    cpu->ops->download_f32(cpu, r, st.out_c, cpu->ops->act_type, n);
    bool ok = true;
    for (int v = 0; v < N_VARIANTS; v++) {
        variant_set(VARIANTS[v]);
        ok &= check_variant(&st, r, name, VARIANTS[v]);
    }
    free(r);
    step_free(&st);
    return ok;
}

static bool check_all(void) {
    printf("check against the CPU backend (rows \"q@prefix\": a chunk of q rows after a cached "
           "prefix), relative L2 error, limit %.0e per row\n\n", RTOL);
    printf("| case                                           | variant | all rows  | worst row | NaN   "
           "| ok   |\n");
    printf("|------------------------------------------------|---------|-----------|-----------|------"
           "-|------|\n");
    /* {q_len, ctx_len}; ctx_len - q_len is the cached prefix */
    static const int one_a[][2] = {{300, 300}};
    static const int one_b[][2] = {{16, 16}};
    static const int one_c[][2] = {{17, 2017}};
    static const int one_d[][2] = {{128, 1128}};
    static const int one_e[][2] = {{129, 2129}};
    static const int one_f[][2] = {{1, 2001}}; /* below ATT_FA_MIN_Q: the decode kernel */
    static const int one_g[][2] = {{255, 319}};
    static const int two_a[][2] = {{200, 1200}, {45, 45}};
    static const int two_b[][2] = {{64, 64}, {300, 2300}};
    static const int mix[][2] = {{33, 97}, {1, 500}, {150, 150}, {20, 1043}};
    static const struct {
        const int (*qc)[2];
        int B;
    } steps[] = {{one_a, 1}, {one_b, 1}, {one_c, 1}, {one_d, 1}, {one_e, 1},
                 {one_f, 1}, {one_g, 1}, {two_a, 2}, {two_b, 2}, {mix, 4}};
    static const attn_shape shapes[] = {
        {24, 8, 128, 16}, /* Llama-3.2-3B: G = 3 */
        {32, 8, 128, 16}, /* G = 4 */
        {8, 2, 64, 16},   /* D = 64, G = 4 */
        {12, 4, 64, 7},   /* D = 64, G = 3, a block size that is not a power of two */
    };
    bool ok = true;
    for (size_t k = 0; k < PD_ARRAY_LEN(shapes); k++)
        for (size_t i = 0; i < PD_ARRAY_LEN(steps); i++)
            ok &= check_case(shapes[k], steps[i].qc, steps[i].B);
    printf("\n%s\n\n", ok ? "check: every variant within the limit" : "check: FAILED");
    return ok;
}

/* ---- 2. timing at the 3B shape ---------------------------------------------------------- */

static void time_case(int q_len, int prefix) {
    attn_shape s = {24, 8, 128, 16};
    int qc[1][2] = {{q_len, prefix + q_len}};
    attn_step st;
    step_init(&st, s, (const int(*)[2])qc, 1, false);
    /* (row, key) pairs: each row attends to the prefix and causally within the chunk */
    double pairs = (double)q_len * prefix + (double)q_len * (q_len + 1) / 2.0;
    double flops = 4.0 * pairs * s.H * s.D;
    char shape[64];
    snprintf(shape, sizeof shape, "T=%d after %d", q_len, prefix);
    double ms[MAX_VARIANTS], ms_v2 = 0;
    for (int v = 0; v < N_VARIANTS; v++) {
        variant_set(VARIANTS[v]);
        ms[v] = time_op(run_gpu, &st);
        if (strcmp(VARIANTS[v], "v2") == 0) ms_v2 = ms[v];
    }
    for (int v = 0; v < N_VARIANTS; v++) {
        double tf = flops / (ms[v] * 1e-3) / 1e12;
        char label[16];
        variant_set(VARIANTS[v]);
        (void)backend_cuda_prefill_variant_ran();
        run_gpu(&st);
        variant_label(VARIANTS[v], label, sizeof label);
        printf("| %-18s | %-7s | %9.3f | %8.1f | %7.1f | %6.0f | %5.1f%% | ", shape, label, ms[v],
               28 * ms[v], tf, gemm_tflops, 100.0 * tf / gemm_tflops);
        if (ms_v2 > 0) printf("%5.2fx |\n", ms_v2 / ms[v]);
        else printf("   -   |\n");
    }
    step_free(&st);
}

static void time_all(void) {
    printf("causal prefill attention, Llama-3.2-3B shape (H=24 K=8 D=128, bf16, block size 16); "
           "TFLOP/s = 4*H*D*pairs / time; x28: the model's 28 layers\n\n");
    printf("| shape              | variant | ms        | x28 ms   | TFLOP/s | gemm   | ratio  | vs v2  |\n");
    printf("|--------------------|---------|-----------|----------|---------|--------|--------|--------|\n");
    time_case(2048, 0);
    time_case(8192, 0);
    time_case(16384, 0);
    time_case(2048, 14336);
    printf("\n");
}

/* --variants=LIST: a comma-separated subset of v1, v2, v3 (default: all three) */
static bool parse_variants(const char *list) {
    N_VARIANTS = 0;
    for (int v = 0; v < MAX_VARIANTS; v++) {
        const char *p = strstr(list, ALL_VARIANTS[v]);
        if (p && (p == list || p[-1] == ',') && (p[2] == ',' || p[2] == 0))
            VARIANTS[N_VARIANTS++] = ALL_VARIANTS[v];
    }
    return N_VARIANTS > 0;
}

static bool has_variant(const char *v) {
    for (int i = 0; i < N_VARIANTS; i++)
        if (strcmp(VARIANTS[i], v) == 0) return true;
    return false;
}

int main(int argc, char **argv) {
    char err[256] = "";
    bool check_only = false, probe_only = false, no_probe = false;
    parse_variants("v1,v2,v3");
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--check-only") == 0) {
            check_only = true;
        } else if (strcmp(argv[i], "--probe-only") == 0) {
            probe_only = true;
        } else if (strcmp(argv[i], "--no-probe") == 0) {
            no_probe = true;
        } else if (strncmp(argv[i], "--variants=", 11) == 0 && parse_variants(argv[i] + 11)) {
        } else {
            fprintf(stderr,
                    "usage: bench_prefill_attn_cuda [--check-only | --probe-only] [--no-probe] "
                    "[--variants=v1,v2,v3]\n");
            return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0); /* lines survive an abort (a kernel fault) */
    if (!getenv("PDSERVE_LOG")) log_set_level(LOG_LEVEL_WARN); /* info: blocks per SM */
    g = backend_cuda_create(0, err, sizeof err);
    if (!g) {
        fprintf(stderr, "bench_prefill_attn_cuda: %s\n", err);
        return 77;
    }
    cpu = backend_cpu_create(0);
    rng_seed(&rng, (uint64_t)time(NULL)); /* fresh inputs every run */
    backend_cuda_info info;
    backend_cuda_info_get(g, &info);
    char date[64];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    printf("card: %s (sm_%d%d, %d SMs, SM clock %d MHz as found); date: %s\n\n", info.name,
           info.cc_major, info.cc_minor, info.sm_count, info.clock_khz / 1000, date);
    if (has_variant("v3") && has_variant("v2") && !no_probe) probe_all();
    if (probe_only) {
        backend_destroy(cpu);
        backend_destroy(g);
        return 0;
    }
    bool ok = check_all();
    if (ok && !check_only) {
        measure_gemm();
        time_all();
    }
    unsetenv("PDSERVE_CUDA_FA");
    backend_destroy(cpu);
    backend_destroy(g);
    return ok ? 0 : 1;
}
#endif
