/* profiler.c: measures a simulator profile on the real backend. Each grid point is one
 * fwd_batch built here over the engine's paged KV layout (block tables, slots) and run
 * through model_forward exactly as the engine runs a step: prefill chunks of T tokens
 * after C cached tokens, decode batches of B sequences of context L, and a few mixed
 * steps to fit the overhead a mixed step shares. Each point is timed over a few repeats
 * after one warm-up and the median kept. The engine's own per-step and per-row costs
 * (planning, sampling, events) come from a short real engine run. Power is read
 * through src/power (NVML / RAPL) around each phase where a meter exists; on a GPU,
 * the power-cap model's inputs (enforced limit, serving-shape steps run back to back,
 * read-only NVML) after the grid. On the CPU,
 * forks of this process stepping at once give the contention curve of several
 * instances sharing the host's cores.
 *
 * Tuned for: the CPU grid of small-llama in well under a minute on two cores; the GPU
 * grid in a few minutes. Allocates the KV cache and scratch once for the largest point. */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "power/power.h"
#include "sim/sim.h"
#include "util/util.h"

static const int CPU_PT[] = {16, 64, 128, 256, 512, 1024, 2048};
static const int CPU_PC[] = {0, 256, 1024};
/* every decode batch up to 8 and more between: OpenBLAS's sgemm costs more at some row
 * counts than at the next larger one (docs/simulator.md, "How points are measured") */
static const int CPU_DB[] = {1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64};
static const int CPU_DC[] = {64, 128, 256, 512, 1024};
static const int GPU_PT[] = {16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384};
static const int GPU_PC[] = {0, 2048, 8192, 16384};
static const int GPU_DB[] = {1, 2, 4, 8, 16, 32, 64, 128, 256};
static const int GPU_DC[] = {128, 1024, 4096, 16384};

void sim_profile_opts_default(sim_profile_opts *o, bool cpu) {
    memset(o, 0, sizeof *o);
#define SET(field, arr) (o->field = arr, o->n_##field = (int)PD_ARRAY_LEN(arr))
    if (cpu) {
        SET(prefill_tokens, CPU_PT);
        SET(prefill_context, CPU_PC);
        SET(decode_batch, CPU_DB);
        SET(decode_context, CPU_DC);
    } else {
        SET(prefill_tokens, GPU_PT);
        SET(prefill_context, GPU_PC);
        SET(decode_batch, GPU_DB);
        SET(decode_context, GPU_DC);
    }
#undef SET
    o->repeats = 3;
    o->block_size = 16;
    o->measure_power = true;
    o->measure_power_cap = !cpu;
}

/* Everything one measurement needs, sized for the largest point. */
typedef struct prof {
    model *m;
    backend *be;
    kv_cache *kv;
    fwd_ctx *f;
    int bs;
    int32_t *tokens, *positions, *slots, *logit_rows, *out_tokens, *blocks;
    attn_seq *seqs;
    float *logits;
    int max_rows, max_seqs;
    pd_rng rng;
} prof;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Runs batch b once; returns its seconds. */
static double time_batch(prof *P, const fwd_batch *b) {
    double t0 = time_now_s();
    if (P->be->ops->argmax_rows) model_forward_greedy(P->f, P->kv, b, P->out_tokens);
    else model_forward(P->f, P->kv, b, P->logits);
    if (P->be->ops->sync) P->be->ops->sync(P->be);
    return time_now_s() - t0;
}

/* Appends one sequence computing rows [start, start + n) into a batch under
 * construction; its blocks are `first_block`, first_block + 1, ... */
static void add_seq(prof *P, fwd_batch *b, int first_block, int start, int n) {
    int V = P->m->cfg.vocab_size;
    attn_seq *a = &P->seqs[b->B];
    a->q_start = b->T;
    a->q_len = n;
    a->ctx_len = start + n;
    a->n_blocks = (a->ctx_len + P->bs - 1) / P->bs;
    a->block_table = P->blocks + first_block;
    for (int i = 0; i < n; i++) {
        int pos = start + i;
        P->tokens[b->T + i] = (int32_t)(rng_next(&P->rng) % (uint64_t)V);
        P->positions[b->T + i] = pos;
        P->slots[b->T + i] = a->block_table[pos / P->bs] * P->bs + pos % P->bs;
    }
    b->T += n;
    P->logit_rows[b->n_logits++] = b->T - 1;
    b->B++;
}

static void batch_begin(prof *P, fwd_batch *b) {
    memset(b, 0, sizeof *b);
    b->tokens = P->tokens;
    b->positions = P->positions;
    b->slots = P->slots;
    b->seqs = P->seqs;
    b->logit_rows = P->logit_rows;
}

/* The cache holds data, as a serving engine's does, not the zeros it was allocated
 * with: a step's time does not depend on what its KV reads return, but its power does
 * (HBM and the datapaths toggle with the data). Decode steps of Llama-3.2-3B at 16k
 * context on an H200 drew about 430 W reading a zeroed pool, against 600-630 W in a
 * deployment at the same batch and context (2026-11-28 14:47; docs/simulator.md, "The
 * decode power, measured again"). PDSERVE_PROFILE_KV_ZERO=1 keeps the zeros, to compare. */
static void fill_kv(prof *P) {
    const char *z = getenv("PDSERVE_PROFILE_KV_ZERO");
    if ((z && *z && strcmp(z, "0") != 0) || !P->be->ops->fill_random) return;
    kv_cache *kv = P->kv;
    size_t n = (size_t)kv->num_blocks * kv->block_bytes / dtype_size(kv->type);
    for (int l = 0; l < kv->n_layers; l++) {
        P->be->ops->fill_random(P->be, kv->k[l], kv->type, n, 0x6b76ull * 1000 + (uint64_t)l, 1.0f);
        P->be->ops->fill_random(P->be, kv->v[l], kv->type, n, 0x7676ull * 1000 + (uint64_t)l, 1.0f);
    }
    if (P->be->ops->sync) P->be->ops->sync(P->be);
}

static int blocks_for(int tokens, int bs) { return (tokens + bs - 1) / bs; }

/* Allocates P's cache (`blocks` logical blocks, at most half the backend's free memory:
 * logical blocks beyond what fits share physical ones, block i is i modulo the pool,
 * which times the same reads), filled as a serving engine's, its forward scratch for
 * max_rows rows of max_seqs sequences and logits for logit_rows; P's model, backend
 * and block size set. 0, or -1 with err and nothing held. */
static int prof_open(prof *P, int max_rows, int max_seqs, int logit_rows, int blocks, char *err, size_t errlen) {
    model *m = P->m;
    P->max_rows = max_rows;
    P->max_seqs = max_seqs;
    size_t bpt = model_kv_bytes_per_token(&m->cfg, dtype_size(m->be->ops->kv_type));
    size_t want = (size_t)blocks * P->bs * bpt, free_mem = m->be->ops->mem_free ? m->be->ops->mem_free(m->be) : 0;
    if (free_mem > 0 && want > free_mem / 2) want = free_mem / 2;
    P->kv = kv_cache_create(m->be, &m->cfg, P->bs, want, err, errlen);
    if (!P->kv) return -1;
    fill_kv(P);
    P->f = fwd_ctx_create(m, P->max_rows, P->max_seqs);
    if (!P->f) {
        pd_errorf(err, errlen, "profile: cannot allocate forward scratch for %d rows", P->max_rows);
        kv_cache_free(m->be, P->kv);
        return -1;
    }
    P->tokens = xmalloc(sizeof(int32_t) * (size_t)P->max_rows);
    P->positions = xmalloc(sizeof(int32_t) * (size_t)P->max_rows);
    P->slots = xmalloc(sizeof(int32_t) * (size_t)P->max_rows);
    P->logit_rows = xmalloc(sizeof(int32_t) * (size_t)P->max_seqs);
    P->out_tokens = xmalloc(sizeof(int32_t) * (size_t)P->max_seqs);
    P->seqs = xcalloc((size_t)P->max_seqs, sizeof(attn_seq));
    P->logits = xmalloc(sizeof(float) * (size_t)logit_rows * (size_t)m->cfg.vocab_size);
    P->blocks = xmalloc(sizeof(int32_t) * (size_t)blocks);
    for (int i = 0; i < blocks; i++) P->blocks[i] = i % P->kv->num_blocks;
    if (P->kv->num_blocks < blocks)
        log_warn("profile: KV pool of %d blocks for %d logical ones: the largest points share blocks",
                 P->kv->num_blocks, blocks);
    return 0;
}

static void prof_close(prof *P) {
    free(P->tokens);
    free(P->positions);
    free(P->slots);
    free(P->logit_rows);
    free(P->out_tokens);
    free(P->seqs);
    free(P->logits);
    free(P->blocks);
    fwd_ctx_free(P->f);
    kv_cache_free(P->m->be, P->kv);
}

static double measure_prefill(prof *P, int T, int C) {
    fwd_batch b;
    batch_begin(P, &b);
    add_seq(P, &b, 0, C, T);
    return time_batch(P, &b);
}

/* B sequences whose context is L once this step's token is written. */
static double measure_decode(prof *P, int B, int L, int prefill_T) {
    fwd_batch b;
    batch_begin(P, &b);
    int per = blocks_for(L, P->bs);
    if (prefill_T > 0) add_seq(P, &b, B * per, 0, prefill_T);
    for (int i = 0; i < B; i++) add_seq(P, &b, i * per, L - 1, 1);
    return time_batch(P, &b);
}

/* The short chunk of the deep mixed shapes (a prompt's last chunk, two budgets in) */
#define DEEP_T 64

/* A mixed step as the engine plans one under load: B decode rows of context L beside a
 * chunk of T rows after C cached tokens (its blocks after the decodes'). */
static double measure_mixed(prof *P, int T, int C, int B, int L) {
    fwd_batch b;
    batch_begin(P, &b);
    int per = blocks_for(L, P->bs);
    for (int i = 0; i < B; i++) add_seq(P, &b, i * per, L - 1, 1);
    add_seq(P, &b, B * per, C, T);
    return time_batch(P, &b);
}

/* Everything but attention: T rows as chunks of LIN_CHUNK tokens from position 0, so
 * that each row attends to at most LIN_CHUNK keys (about LIN_CHUNK / 2 on average). */
#define LIN_CHUNK 32
static double measure_linear(prof *P, int T) {
    fwd_batch b;
    batch_begin(P, &b);
    int per = blocks_for(LIN_CHUNK, P->bs);
    for (int i = 0, k = 0; i < T; i += LIN_CHUNK, k++) add_seq(P, &b, k * per, 0, PD_MIN(LIN_CHUNK, T - i));
    b.logit_rows = P->logit_rows + b.n_logits - 1; /* one logits row, as a prefill chunk has */
    b.n_logits = 1;
    return time_batch(P, &b);
}

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* The sorted union of {1}, the prefill chunk sizes and the decode batch sizes. */
static int linear_axis(const sim_profile_opts *o, int *out) {
    int n = 0;
    out[n++] = 1;
    for (int i = 0; i < o->n_prefill_tokens; i++) out[n++] = o->prefill_tokens[i];
    for (int i = 0; i < o->n_decode_batch; i++) out[n++] = o->decode_batch[i];
    qsort(out, (size_t)n, sizeof(int), cmp_int);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (!m || out[i] != out[m - 1]) out[m++] = out[i];
    return m;
}

/* One grid point to time: kind 0 prefill (a = T, b = C), 1 decode (a = B, b = L),
 * 2 linear (a = T), 3 mixed (a = T prefill rows + b = B decodes at context c), 4 mixed
 * at a serving shape (a = T rows after d cached + b = B decodes at context c). */
typedef struct ppoint {
    int kind, a, b, c;
    double *out;            /* where the median goes */
    double s[64];           /* one sample per round */
    int d;
} ppoint;

static double run_point(prof *P, const ppoint *q) {
    switch (q->kind) {
    case 0: return measure_prefill(P, q->a, q->b);
    case 1: return measure_decode(P, q->a, q->b, 0);
    case 2: return measure_linear(P, q->a);
    case 4: return measure_mixed(P, q->a, q->d, q->b, q->c);
    default: return measure_decode(P, q->b, q->c, q->a);
    }
}

/* Points cheaper than this get a train of untimed runs right before each timed one:
 * PROFILE_WARM_RUNS of them, or as many as fit PROFILE_WARM_MAX_S. One warm-up run is
 * not enough: on a 2-core EPYC VM (small-llama, one thread, 2026-11-27) a batch-1
 * decode step after one warm-up run read 1.05-1.59 ms, after ten back-to-back runs
 * 0.96-0.98 ms, the engine's own inter-token gap at that shape (0.88-1.11 ms, median
 * 0.96, over 30 batch-1 points of three demo runs): the engine's steps run back to back,
 * so caches and predictors are in their steady state, which a single run after a large
 * point does not reach. */
#define PROFILE_WARM_BELOW_S 0.05
#define PROFILE_WARM_RUNS 10
#define PROFILE_WARM_MAX_S 0.1

/* Times every point once per round, one warm-up round first (discarded), and keeps each
 * point's median. Rounds rather than back-to-back repeats: a burst of load from another
 * process then spoils one sample of many points, not every sample of one point. */
static void run_rounds(prof *P, ppoint *pts, int n, int repeats) {
    repeats = PD_MIN(PD_MAX(repeats, 1), 64);
    /* PDSERVE_PROFILE_WARM_RUNS=N sets the train's length (1: the single warm-up run of
     * profiles before commit b3c58e2), for comparing the two on a device */
    const char *wr = getenv("PDSERVE_PROFILE_WARM_RUNS");
    int warm_runs = wr && atoi(wr) >= 1 ? PD_MIN(atoi(wr), 100) : PROFILE_WARM_RUNS;
    double *last = xcalloc((size_t)n, sizeof(double));
    for (int r = -1; r < repeats; r++)
        for (int i = 0; i < n; i++) {
            /* a cheap point right after a big one would find the weights evicted from the
             * caches, which the engine's back-to-back steps never do: warm it up first,
             * back to back, as the engine runs its steps */
            if (r >= 0 && last[i] < PROFILE_WARM_BELOW_S) {
                double spent = 0;
                for (int w = 0; w < warm_runs && (w == 0 || spent < PROFILE_WARM_MAX_S); w++)
                    spent += run_point(P, &pts[i]);
            }
            double t = run_point(P, &pts[i]);
            last[i] = t;
            if (r >= 0) pts[i].s[r] = t;
        }
    free(last);
    for (int i = 0; i < n; i++) *pts[i].out = sim_median(pts[i].s, repeats);
}

/* Contention only ever slows a run down, and cost never falls as context grows (nor,
 * with along_x, as rows grow): each value becomes the least of itself and every value
 * at larger or equal y (and x). Decode batches are left out of x: on the CPU a batch of
 * 7 rows measured 2.2 ms where 8 took 1.9 (OpenBLAS's sgemm kernels favour some row
 * counts), so a smaller batch may really cost more. */
static void lower_monotone_envelope(sim_grid *g, bool along_x) {
    for (int i = g->nx - 1; i >= 0; i--)
        for (int j = g->ny - 1; j >= 0; j--) {
            double *v = &g->v[i * g->ny + j];
            if (along_x && i + 1 < g->nx) *v = PD_MIN(*v, g->v[(i + 1) * g->ny + j]);
            if (j + 1 < g->ny) *v = PD_MIN(*v, g->v[i * g->ny + j + 1]);
        }
}

/* ---- the engine's own costs ----------------------------------------------------------- */

static double measure_sample_row(int V) {
    sampler *s = sampler_create(V);
    float *logits = xmalloc(sizeof(float) * (size_t)V);
    pd_rng r;
    rng_seed(&r, 3);
    sampling_params sp;
    sampling_params_default(&sp);
    sp.temperature = 0;
    sp.ignore_eos = true;
    sample_context c = {0};
    sample_result res;
    int n = 64;
    double t0 = 0, total = 0;
    for (int k = -4; k < n; k++) {
        for (int i = 0; i < V; i++) logits[i] = rng_normal(&r);
        t0 = time_now_s();
        sampler_sample(s, logits, &sp, &c, &r, &res);
        if (k >= 0) total += time_now_s() - t0;
    }
    free(logits);
    sampler_free(s);
    return total / n;
}

typedef struct eng_wait {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
} eng_wait;

static void eng_on_event(void *user, const engine_event *ev) {
    eng_wait *w = user;
    if (ev->kind != ENGINE_EVENT_FINISHED) return;
    pthread_mutex_lock(&w->mu);
    w->done++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* Per-step engine overhead beyond the forward and sampling, from a short real run:
 * (busy - forward - rows * sample_row) / steps. */
static double measure_step_overhead(model *m, int bs, double sample_row) {
    engine_config ec;
    engine_config_default(&ec);
    ec.block_size = bs;
    ec.max_num_seqs = 16;
    ec.max_model_len = 128;
    ec.kv_cache_memory = model_kv_bytes_per_token(&m->cfg, dtype_size(m->be->ops->kv_type)) * 16 * 128;
    char err[256];
    engine *e = engine_create(m, &ec, err, sizeof err);
    if (!e) return 0;
    engine_start(e);
    eng_wait w = {.done = 0};
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    int32_t prompt[32];
    for (int i = 0; i < 32; i++) prompt[i] = (int32_t)(i % m->cfg.vocab_size);
    int n = 8;
    for (int i = 0; i < n; i++) {
        engine_request q = {.prompt = prompt, .n_prompt = 32, .on_event = eng_on_event, .user = &w};
        sampling_params_default(&q.sp);
        q.sp.temperature = 0;
        q.sp.max_tokens = 24;
        q.sp.ignore_eos = true;
        if (!engine_submit(e, &q, err, sizeof err)) n = i;
    }
    pthread_mutex_lock(&w.mu);
    while (w.done < n) pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    engine_stats st;
    engine_get_stats(e, &st);
    engine_free(e);
    pthread_mutex_destroy(&w.mu);
    pthread_cond_destroy(&w.cv);
    if (!st.steps) return 0;
    double rows = (double)st.generation_tokens;
    double o = (st.busy_seconds - st.forward_seconds - rows * sample_row) / (double)st.steps;
    return o > 0 ? o : 0;
}

/* ---- contention for the host's cores (CPU backend) ------------------------------------- */

static int max_of(const int *v, int n);

/* How long each of the k processes measures, seconds. Long enough that the processes'
 * few-microsecond start skew is noise, short enough for four levels in two seconds. */
#define CONTENTION_WINDOW_S 0.4

static size_t role_bytes(const model *m, weight_role r) {
    int64_t shape[2];
    int nd = weight_role_shape(&m->cfg, r, shape);
    return (size_t)shape[0] * (nd == 2 ? (size_t)shape[1] : 1) * dtype_size(m->be->ops->weight_type);
}

/* Writes one byte of every page of [p, p + bytes) back as it is: a forked child's
 * copy-on-write pages become its own. */
static void touch_pages(void *p, size_t bytes) {
    volatile unsigned char *c = p;
    for (size_t i = 0; p && i < bytes; i += 4096) c[i] = c[i];
}

/* A forked child holds the parent's weights in the same physical pages (copy on write),
 * where instances are processes that each load their own: their caches would hold one
 * copy for all, and contention would read low. The child makes its weight matrices its
 * own first (host memory backends). */
static void unshare_weights(const model *m) {
    if (!m->be->ops->host_memory) return;
    touch_pages(m->embed, role_bytes(m, WEIGHT_EMBED));
    if (m->lm_head != m->embed) touch_pages(m->lm_head, role_bytes(m, WEIGHT_LM_HEAD));
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const layer_weights *w = &m->layers[l];
        touch_pages(w->wqkv, role_bytes(m, WEIGHT_Q) + role_bytes(m, WEIGHT_K) + role_bytes(m, WEIGHT_V));
        touch_pages(w->wo, role_bytes(m, WEIGHT_O));
        touch_pages(w->w_gate_up, role_bytes(m, WEIGHT_GATE) + role_bytes(m, WEIGHT_UP));
        touch_pages(w->w_down, role_bytes(m, WEIGHT_DOWN));
    }
}

/* What a forked child times over and over: the reference pair of steps (a prefill
 * chunk, then a decode batch), a prefill chunk alone, or a decode batch alone. */
enum { STEPS_PAIR, STEPS_PREFILL, STEPS_DECODE };

static void child_steps(prof *P, int kind, int T, int B, int L) {
    if (kind != STEPS_DECODE) measure_prefill(P, T, 0);
    if (kind != STEPS_PREFILL) measure_decode(P, B, L, 0);
}

/* k processes (forks of this one, each with its copy of the model, cache and scratch,
 * as k instances are k processes) run their steps (kinds[i], or the reference pair for
 * every one when kinds is NULL) over and over, all released at once; each reports its
 * mean time per round over CONTENTION_WINDOW_S. Returns the mean over the k processes
 * (*first: the first one's), or -1 when a fork or pipe failed. Call only while this
 * process runs one thread: a child gets the calling thread alone. */
static double concurrent_steps_s(prof *P, int k, const int *kinds, int T, int B, int L, double *first) {
    int ready[2], go[2], res[2];
    if (pipe(ready) != 0) return -1;
    if (pipe(go) != 0) {
        close(ready[0]), close(ready[1]);
        return -1;
    }
    if (pipe(res) != 0) {
        close(ready[0]), close(ready[1]), close(go[0]), close(go[1]);
        return -1;
    }
    int started = 0;
    for (; started < k; started++) {
        pid_t pid = fork();
        if (pid < 0) break;
        if (pid == 0) { /* the child: warm up, wait for the start, time, report, leave */
            int kind = kinds ? kinds[started] : STEPS_PAIR;
            sim_profile_unpin_fork();
            unshare_weights(P->m);
            child_steps(P, kind, T, B, L);
            char c = 1;
            double v[2] = {(double)started, -1};
            if (write(ready[1], &c, 1) == 1 && read(go[0], &c, 1) == 1) {
                double t0 = time_now_s(), t = t0;
                long n = 0;
                for (; t - t0 < CONTENTION_WINDOW_S; n++) {
                    child_steps(P, kind, T, B, L);
                    t = time_now_s();
                }
                v[1] = (t - t0) / (double)n;
            }
            ssize_t w = write(res[1], v, sizeof v);
            _exit(w == (ssize_t)sizeof v ? 0 : 1);
        }
    }
    close(ready[1]), close(go[0]), close(res[1]);
    char c;
    for (int i = 0; i < started; i++)
        if (read(ready[0], &c, 1) != 1) break;
    for (int i = 0; i < started; i++) {
        c = 1;
        if (write(go[1], &c, 1) != 1) break;
    }
    close(go[1]);
    double sum = 0;
    int got = 0;
    if (first) *first = -1;
    for (int i = 0; i < started; i++) {
        double v[2];
        if (read(res[0], v, sizeof v) == (ssize_t)sizeof v && v[1] > 0) {
            sum += v[1], got++;
            if (first && v[0] == 0) *first = v[1];
        }
    }
    close(ready[0]), close(res[0]);
    for (int i = 0; i < started; i++) waitpid(-1, NULL, 0);
    return started == k && got == k ? sum / got : -1;
}

/* The pairs of kinds (sim_contention.kinds): a prefill chunk of Tk rows, or a decode
 * batch, timed alone and while one other process runs the same or the other kind; the
 * first process's time over its time alone. Fills c->kinds and says so, or leaves
 * kinds_measured false. */
static void measure_contention_kinds(prof *P, sim_contention *c, int Tk, int B, int L) {
    double alone[2];
    for (int x = 0; x < 2; x++) {
        int kinds[1] = {x ? STEPS_DECODE : STEPS_PREFILL};
        if (concurrent_steps_s(P, 1, kinds, Tk, B, L, &alone[x]) <= 0 || !(alone[x] > 0)) return;
    }
    for (int x = 0; x < 2; x++)
        for (int y = 0; y < 2; y++) {
            int kinds[2] = {x ? STEPS_DECODE : STEPS_PREFILL, y ? STEPS_DECODE : STEPS_PREFILL};
            double t;
            if (concurrent_steps_s(P, 2, kinds, Tk, B, L, &t) <= 0 || !(t > 0)) return;
            c->kinds[x][y] = PD_MAX(t / alone[x], 1.0);
        }
    c->kinds_measured = true;
    log_info("profile: contention by kind (prefill %d rows %.2f ms alone, decode %dx%d %.2f ms alone): prefill "
             "beside prefill x%.2f, beside decode x%.2f; decode beside prefill x%.2f, beside decode x%.2f",
             Tk, alone[0] * 1e3, B, L, alone[1] * 1e3, c->kinds[0][0], c->kinds[0][1], c->kinds[1][0],
             c->kinds[1][1]);
}

/* The contention curve (sim_contention): the host's online cores, the backend's threads,
 * and, on a one-thread backend, the slowdown of 1..2 x cores processes stepping at once
 * (at most SIM_MAX_CONTENTION) against one alone: a prefill chunk of the demo's prompt
 * size and a small decode batch, the steps the CPU plans run. With more threads the
 * backend's pool workers would not survive the fork: then ideal sharing is kept. */
static void measure_contention(prof *P, const sim_profile_opts *o, sim_contention *c) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    c->cores = cores > 0 ? (int)cores : 1;
    c->threads = P->be->threads > 0 ? P->be->threads : 1;
    c->n_points = 0;
    if (c->threads > 1) {
        snprintf(c->source, sizeof c->source,
                 "ideal processor sharing (not measured: the backend runs %d threads, which a fork does not keep)",
                 c->threads);
        return;
    }
    int T = PD_MIN(128, max_of(o->prefill_tokens, o->n_prefill_tokens));
    int B = PD_MIN(8, max_of(o->decode_batch, o->n_decode_batch));
    int L = PD_MIN(256, max_of(o->decode_context, o->n_decode_context));
    int kmax = PD_MIN(2 * c->cores, SIM_MAX_CONTENTION);
    double t1 = -1;
    for (int k = 1; k <= kmax; k++) {
        double t = concurrent_steps_s(P, k, NULL, T, B, L, NULL);
        if (t <= 0) break;
        if (k == 1) t1 = t;
        c->procs[c->n_points] = k;
        c->slowdown[c->n_points++] = k == 1 ? 1.0 : PD_MAX(t / t1, 1.0);
        log_info("profile: contention: %d process%s stepping at once on %d cores: %.3f ms per prefill %d + decode "
                 "%dx%d, x%.2f", k, k > 1 ? "es" : "", c->cores, t * 1e3, T, B, L, c->slowdown[c->n_points - 1]);
    }
    int Tk = PD_MIN(512, max_of(o->prefill_tokens, o->n_prefill_tokens));
    if (c->n_points >= 2) measure_contention_kinds(P, c, Tk, B, L);
    char kinds[80] = "";
    if (c->kinds_measured) snprintf(kinds, sizeof kinds, "; by kind: prefill %d or the decode, beside one other", Tk);
    snprintf(c->source, sizeof c->source,
             "measured: 1 to %d forked processes each timing prefill %d + decode %dx%d for %.1f s at once%s",
             c->n_points, T, B, L, CONTENTION_WINDOW_S, kinds);
}

/* ---- power ------------------------------------------------------------------------------ */

typedef struct power_phase {
    power_session *s;
    bool on;
} power_phase;

static void phase_begin(power_phase *ph, const sim_profile_opts *o, bool cpu) {
    memset(ph, 0, sizeof *ph);
    if (!o->measure_power) return;
    power_config pc = {0};
    pc.idle_window_s = -1;
    pc.no_nvml = cpu;
    pc.nvml = o->nvml; /* --sm-clocks holds NVML open: share it (one per process) */
    if (!cpu) {
        pc.n_gpus = 1;
        pc.gpus[0] = o->clock_gpu; /* the profiled GPU (NVML index) */
    }
    char err[256];
    ph->s = power_session_open(&pc, err, sizeof err);
    if (ph->s && power_session_start(ph->s, err, sizeof err) == 0) ph->on = true;
}

static int cmp_u16(const void *a, const void *b) {
    return (int)*(const uint16_t *)a - (int)*(const uint16_t *)b;
}

/* Median SM clock of the GPU's samples taken while the phase ran, or 0. */
static double phase_sm_mhz(const power_session *s) {
    size_t n = 0;
    const power_sample *smp = power_session_samples(s, 0, &n);
    if (!smp || n == 0) return 0;
    uint16_t *v = xmalloc(sizeof *v * n);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (smp[i].t_s >= 0 && (smp[i].valid & POWER_SAMPLE_SM) && smp[i].sm_mhz > 0) v[k++] = smp[i].sm_mhz;
    double m = 0;
    if (k) {
        qsort(v, k, sizeof *v, cmp_u16);
        m = v[k / 2];
    }
    free(v);
    return m;
}

/* Mean watts of the phase (GPU when measured, else CPU package + DRAM), or -1; the
 * median SM clock the GPU ran at into *sm_mhz (0 when not sampled) when not NULL. */
static double phase_end(power_phase *ph, char *why, size_t cap, double *sm_mhz) {
    double w = -1;
    if (sm_mhz) *sm_mhz = 0;
    if (ph->on) {
        power_result r;
        memset(&r, 0, sizeof r);
        power_session_stop(ph->s, 0, 0, 0, &r);
        if (sm_mhz) *sm_mhz = phase_sm_mhz(ph->s);
        if (r.gpu_j.measured && r.duration_s > 0) w = r.gpu_j.value / r.duration_s;
        else if (r.component_j[POWER_COMP_CPU].measured && r.duration_s > 0) {
            double j = r.component_j[POWER_COMP_CPU].value;
            if (r.component_j[POWER_COMP_DRAM].measured) j += r.component_j[POWER_COMP_DRAM].value;
            w = j / r.duration_s;
        } else if (why) {
            snprintf(why, cap, "no meter: %s; %s", r.n_gpus ? "GPU energy unread" : r.gpu_reason, r.rapl_reason);
        }
    }
    power_session_free(ph->s);
    ph->s = NULL;
    return w;
}

/* Each decode point's own power: the point run back to back for DECODE_POWER_WINDOW_S
 * (after one warm run) in a session of its own sampling the GPU's instantaneous power
 * every DECODE_POWER_PERIOD_S; the mean of the samples after DECODE_POWER_SETTLE_S. NVML's
 * energy counter moves about every 100 ms, so over a window this short it is off by up
 * to a third (2x H200, 2026-11-28 14:47: two of 28 points read 40% above their
 * neighbours); it stands in only when the instantaneous field cannot be read. */
#define DECODE_POWER_WINDOW_S 0.4
#define DECODE_POWER_SETTLE_S 0.1
#define DECODE_POWER_PERIOD_S 0.01

/* A window's power as above: a session sampling the GPU's instantaneous power every
 * DECODE_POWER_PERIOD_S over about window_s (NULL where none opens) ... */
static power_session *instant_open(const sim_profile_opts *o, bool cpu, double window_s) {
    power_config pc = {0};
    pc.idle_window_s = -1;
    pc.no_nvml = cpu;
    pc.nvml = o->nvml;
    pc.sample_period_s = DECODE_POWER_PERIOD_S;
    pc.slow_every = 1000; /* power only */
    pc.sample_capacity = (size_t)(window_s / DECODE_POWER_PERIOD_S) * 2 + 64;
    if (!cpu) {
        pc.n_gpus = 1;
        pc.gpus[0] = o->clock_gpu;
    }
    char err[256];
    power_session *s = power_session_open(&pc, err, sizeof err);
    if (!s || power_session_start(s, err, sizeof err) != 0) {
        power_session_free(s);
        return NULL;
    }
    return s;
}

/* ... stopped and freed: the mean of its instantaneous samples after settle_s; where
 * fewer than 5, its energy over its time (the GPU's, else the CPU's and DRAM's); -1
 * when nothing could be read. */
static double instant_watts(power_session *s, bool cpu, double settle_s) {
    if (!s) return -1;
    power_result r;
    memset(&r, 0, sizeof r);
    power_session_stop(s, 0, 0, 0, &r);
    double w = -1, sum = 0;
    int k = 0;
    size_t n = 0;
    const power_sample *smp = cpu ? NULL : power_session_samples(s, 0, &n);
    for (size_t i = 0; smp && i < n; i++)
        if (smp[i].t_s >= settle_s && (smp[i].valid & POWER_SAMPLE_INSTANT) && (smp[i].valid & POWER_SAMPLE_POWER))
            sum += smp[i].power_w, k++;
    if (k >= 5) w = sum / k;
    else if (r.gpu_j.measured && r.duration_s > 0) w = r.gpu_j.value / r.duration_s;
    else if (r.component_j[POWER_COMP_CPU].measured && r.duration_s > 0) {
        double j = r.component_j[POWER_COMP_CPU].value;
        if (r.component_j[POWER_COMP_DRAM].measured) j += r.component_j[POWER_COMP_DRAM].value;
        w = j / r.duration_s;
    }
    power_session_free(s);
    return w;
}

/* One decode point's watts as above, or -1 when nothing could be read. */
static double decode_point_watts(prof *P, const sim_profile_opts *o, bool cpu, const ppoint *q) {
    run_point(P, q);
    power_session *s = instant_open(o, cpu, DECODE_POWER_WINDOW_S);
    if (!s) return -1;
    double t0 = time_now_s();
    do run_point(P, q);
    while (time_now_s() - t0 < DECODE_POWER_WINDOW_S);
    return instant_watts(s, cpu, DECODE_POWER_SETTLE_S);
}

/* Power of every decode grid point (dec[n], in the grid's order) into
 * out->power.decode_grid on the decode grid's axes. A decode step's power grows with its
 * context (its KV reads), which one mean over the whole grid hides. A point whose phase
 * reads no power leaves the grid out (the sim then uses decode_w alone). */
static void measure_decode_watts(prof *P, const sim_profile_opts *o, bool cpu, const ppoint *dec, int n,
                                 sim_profile *out) {
    sim_grid *g = &out->power.decode_grid;
    PD_ASSERT(n == out->decode.nx * out->decode.ny);
    sim_grid_init(g, out->decode.nx, out->decode.x, out->decode.ny, out->decode.y);
    for (int k = 0; k < n; k++) {
        double w = decode_point_watts(P, o, cpu, &dec[k]);
        if (!(w > 0)) {
            log_warn("profile: decode %dx%d: no power read; the profile keeps one decode power", dec[k].a, dec[k].b);
            sim_grid_free(g);
            return;
        }
        g->v[k] = w;
    }
}

/* A GPU's decode power, fitted to its HBM traffic (sim_profile_fit_decode_watts). */
static void fit_decode_watts(prof *P, sim_profile *out) {
    int n = out->power.decode_grid.nx * out->power.decode_grid.ny;
    if (sim_profile_fit_decode_watts(out, (double)P->m->weight_bytes))
        log_info("profile: decode power = %.0f W + %.1f W per TB/s of HBM traffic (rms %.0f W over %d points)",
                 out->power.fit_base_w, out->power.fit_w_per_tbps, out->power.fit_rms_w, n);
    else
        log_info("profile: decode power does not grow with HBM traffic here: kept as measured");
}

/* ---- the power cap's inputs ------------------------------------------------------------- */

/* Sampling period while a shape runs: the resolution of the clock's onset. A tick reads
 * power, SM and memory clocks, utilisation and temperature (about a millisecond each on
 * an H100), well under the period. */
#define POWER_CAP_PERIOD_S 0.02
/* A sample this far below the reference clock counts as the clock's drop (H100 / H200
 * clocks move in 15 MHz steps). */
#define POWER_CAP_DROP_MHZ 15

typedef struct cap_shape {
    bool decode;
    int rows, context;
} cap_shape;

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* One shape run back to back: run_s seconds after idle_s idle (the session's idle
 * window, which gives the idle power), the GPU sampled every POWER_CAP_PERIOD_S and its
 * clock event reasons read every 50 ms. Fills q (settled: the second half of the run);
 * *idle_w the idle power before it; *tau the controller's window as its onset implies
 * (exponential average: onset = tau ln((P - idle) / (P - limit)), P the power before
 * the drop), 0 when the clock did not drop or the power was not above the limit.
 * 0, or -1 (err) when the GPU's meter cannot run. */
static int power_cap_run(prof *P, const sim_profile_opts *o, const cap_shape *sh, double ref_mhz, double limit_w,
                         sim_power_point *q, double *idle_w, double *tau, char *err, size_t errlen) {
    double run_s = o->power_cap_run_s > 0 ? o->power_cap_run_s : 2.0;
    double idle_s = o->power_cap_idle_s > 0 ? o->power_cap_idle_s : 1.5;
    ppoint pt = {.kind = sh->decode ? 1 : 0, .a = sh->rows, .b = sh->context};
    run_point(P, &pt); /* first-run costs (graph capture) stay out of the sampled run */
    power_config pc = {0};
    pc.sample_period_s = POWER_CAP_PERIOD_S;
    pc.slow_every = 1;
    pc.idle_window_s = idle_s;
    pc.n_gpus = 1;
    pc.gpus[0] = o->clock_gpu;
    pc.no_rapl = true;
    pc.nvml = o->nvml;
    pc.sample_capacity = (size_t)((run_s + idle_s) / POWER_CAP_PERIOD_S) * 2 + 256;
    power_session *s = power_session_open(&pc, err, errlen);
    power_nvml *nv = power_session_nvml(s);
    if (!s || !nv || power_session_start(s, err, errlen) != 0) {
        if (s && !nv) pd_errorf(err, errlen, "no NVML GPU %d", o->clock_gpu);
        power_session_free(s);
        return -1;
    }
    uint64_t mask = 0;
    double t0 = time_now_s(), t = t0, half_t = -1, last_r = -1;
    long n = 0, half_n = 0;
    for (; t - t0 < run_s; n++) {
        run_point(P, &pt);
        t = time_now_s();
        if (half_t < 0 && t - t0 >= run_s / 2) half_t = t, half_n = n + 1;
        if (t - last_r >= 0.05) {
            uint64_t m = 0;
            if (power_nvml_clock_reasons(nv, o->clock_gpu, &m) == 0) mask |= m;
            last_r = t;
        }
    }
    power_result r;
    memset(&r, 0, sizeof r);
    power_session_stop(s, 0, 0, 0, &r);
    *idle_w = r.gpu[0].idle_power_w.measured ? r.gpu[0].idle_power_w.value : 0;
    memset(q, 0, sizeof *q);
    q->decode = sh->decode;
    q->rows = sh->rows;
    q->context = sh->context;
    q->seconds = n > half_n && half_t > 0 ? (t - half_t) / (double)(n - half_n) : (t - t0) / (double)PD_MAX(n, 1);
    q->onset_s = -1;
    power_clock_reasons_str(mask & ~(uint64_t)POWER_CLOCK_GPU_IDLE, q->reasons, sizeof q->reasons);
    size_t ns = 0;
    const power_sample *smp = power_session_samples(s, 0, &ns);
    float *mhz = xmalloc(sizeof(float) * (ns + 1));
    double wsum = 0, pre_max = 0;
    int nw = 0, nm = 0;
    double settle = run_s / 2;
    for (size_t i = 0; i < ns; i++) {
        const power_sample *x = &smp[i];
        if (x->t_s < 0) continue;
        bool has_sm = (x->valid & POWER_SAMPLE_SM) && x->sm_mhz > 0, has_w = x->valid & POWER_SAMPLE_POWER;
        if (has_sm && q->first_mhz == 0) q->first_mhz = x->sm_mhz;
        double ref = ref_mhz > 0 ? ref_mhz : q->first_mhz;
        if (q->onset_s < 0 && has_w) pre_max = PD_MAX(pre_max, x->power_w);
        if (q->onset_s < 0 && has_sm && ref > 0 && x->sm_mhz < ref - POWER_CAP_DROP_MHZ) q->onset_s = x->t_s;
        if (x->t_s < settle) continue;
        if (has_w) wsum += x->power_w, nw++;
        if (has_sm) mhz[nm++] = x->sm_mhz;
    }
    if (nw) q->watts = wsum / nw;
    if (nm) {
        qsort(mhz, (size_t)nm, sizeof(float), cmp_float);
        q->mhz = mhz[nm / 2];
    }
    free(mhz);
    power_session_free(s);
    *tau = 0;
    if (q->onset_s >= 0 && limit_w > *idle_w && pre_max > limit_w)
        *tau = PD_MAX(q->onset_s, POWER_CAP_PERIOD_S) / log((pre_max - *idle_w) / (pre_max - limit_w));
    return nw > 0 ? 0 : (pd_errorf(err, errlen, "no power sample while the shape ran"), -1);
}

/* The power cap's inputs into out->power.cap: the enforced limit, then each shape. Read-only
 * NVML: nothing here sets a clock or a limit. */
static void measure_power_cap(prof *P, const sim_profile_opts *o, const cap_shape *shapes, int n_shapes,
                              sim_profile *out) {
    sim_power_cap_data *d = &out->power.cap;
    memset(d, 0, sizeof *d);
    double run_s = o->power_cap_run_s > 0 ? o->power_cap_run_s : 2.0;
    double idle_s = o->power_cap_idle_s > 0 ? o->power_cap_idle_s : 1.5;
    char err[256] = "", lim_why[160] = "";
    power_nvml *nv = o->nvml ? o->nvml : power_nvml_open(err, sizeof err);
    if (!nv) {
        snprintf(d->source, sizeof d->source, "not measured (%s)", err);
        return;
    }
    int rc = o->clock_gpu < power_nvml_count(nv) ? power_nvml_power_limit_w(nv, o->clock_gpu, &d->limit_w) : 2;
    if (rc != 0) snprintf(lim_why, sizeof lim_why, "; enforced power limit not read: %s", power_nvml_error(nv, rc));
    if (nv != o->nvml) power_nvml_close(nv); /* each run's session opens its own */
    double idles[SIM_MAX_POWER_POINTS], taus[SIM_MAX_POWER_POINTS];
    int n_tau = 0;
    for (int k = 0; k < n_shapes && d->n_points < SIM_MAX_POWER_POINTS; k++) {
        sim_power_point *q = &d->points[d->n_points];
        double tau = 0;
        if (power_cap_run(P, o, &shapes[k], out->clock.base_mhz, d->limit_w, q, &idles[d->n_points], &tau, err,
                          sizeof err) != 0) {
            log_warn("profile: power cap: %s %d x %d not measured: %s", shapes[k].decode ? "decode" : "prefill",
                     shapes[k].rows, shapes[k].context, err);
            continue;
        }
        if (tau > 0) taus[n_tau++] = tau;
        log_info("profile: power cap: %s %d rows at context %d back to back: %.0f W (idle %.0f W), SM %.0f MHz "
                 "(first %.0f MHz), %.3f ms a step, clock drop %s%.2f s, reasons [%s]",
                 q->decode ? "decode" : "prefill", (int)q->rows, (int)q->context, q->watts, idles[d->n_points],
                 q->mhz, q->first_mhz, q->seconds * 1e3, q->onset_s >= 0 ? "after " : "none", PD_MAX(q->onset_s, 0),
                 q->reasons);
        d->n_points++;
    }
    if (d->n_points > 0) d->idle_w = sim_median(idles, d->n_points);
    if (n_tau > 0) {
        d->window_s = sim_median(taus, n_tau);
        snprintf(d->window_source, sizeof d->window_source,
                 "estimated: median of %d runs' clock onset as an exponential average's, tau = onset / ln((P - "
                 "idle) / (P - limit)), P the highest power before the drop (resolution %.0f ms)",
                 n_tau, POWER_CAP_PERIOD_S * 1e3);
    }
    snprintf(d->source, sizeof d->source,
             "measured: NVML GPU %d, read-only; enforced limit, then each shape back to back %.1f s after %.1f s "
             "idle, sampled every %.0f ms; watts and mhz over the second half%s",
             o->clock_gpu, run_s, idle_s, POWER_CAP_PERIOD_S * 1e3, lim_why);
    log_info("profile: power cap: enforced limit %.0f W, %d shape(s) measured%s", d->limit_w, d->n_points,
             d->window_s > 0 ? "" : "; window not estimated (no clock drop above the limit)");
}

/* ---- a GPU shared by two processes ------------------------------------------------------ */

/* A kind's step at the pairs' shape (T rows after C cached tokens; B decodes at L). */
static void share_step(prof *P, int kind, const int shape[4]) {
    if (kind == 0) measure_prefill(P, shape[0], shape[1]);
    else measure_decode(P, shape[2], shape[3], 0);
}

/* Seconds a pair's step is timed over: long enough for tens of steps of either kind
 * and many of the driver's time slices, short enough for six windows in seconds. */
static double share_window_s(const prof *P) { return strcmp(P->be->ops->name, "cpu") ? 1.0 : 0.3; }

/* The mean time of kind's steps back to back over the window, after one warm-up. */
static double share_time(prof *P, int kind, const int shape[4]) {
    share_step(P, kind, shape);
    double t0 = time_now_s(), t = t0, w = share_window_s(P);
    long n = 0;
    for (; t - t0 < w; n++) {
        share_step(P, kind, shape);
        t = time_now_s();
    }
    return (t - t0) / (double)n;
}

/* One line from standard input (unbuffered: the peer polls it between steps), its
 * newline dropped; false at the end of input. */
static bool peer_line(char *buf, size_t cap) {
    size_t n = 0;
    for (;;) {
        char c;
        ssize_t r = read(0, &c, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            buf[n] = 0;
            return n > 0;
        }
        if (c == '\n') break;
        if (n + 1 < cap) buf[n++] = c;
    }
    buf[n] = 0;
    return true;
}

int sim_profile_step_peer(model *m, int block_size, const int shape[4], char *err, size_t errlen) {
    prof P = {.m = m, .be = m->be, .bs = block_size > 0 ? block_size : 16};
    rng_seed(&P.rng, 54321);
    int T = shape[0], C = shape[1], B = shape[2], L = shape[3];
    if (T < 1 || C < 0 || B < 1 || L < 1)
        return pd_errorf(err, errlen, "--step-peer: T,C,B,L with T, B, L >= 1 and C >= 0"), -1;
    int blocks = PD_MAX(blocks_for(T + C, P.bs), B * blocks_for(L, P.bs));
    if (prof_open(&P, PD_MAX(T, B), B + 1, B + 1, blocks, err, errlen) != 0) return -1;
    for (int k = 0; k < 2; k++) share_step(&P, k, shape); /* warm-up: graphs captured, kernels loaded */
    char line[128];
    while (peer_line(line, sizeof line)) {
        int k = -1;
        char cmd[16];
        int f = sscanf(line, "%15s %d", cmd, &k);
        bool kind = f == 2 && (k == 0 || k == 1);
        if (f >= 1 && !strcmp(cmd, "hello")) {
            printf("ok\n");
        } else if (kind && !strcmp(cmd, "time")) {
            printf("ok %.9f\n", share_time(&P, k, shape));
        } else if (kind && !strcmp(cmd, "run")) {
            share_step(&P, k, shape);
            printf("ok\n");
            fflush(stdout);
            double t0 = time_now_s();
            long n = 0;
            struct pollfd pfd = {.fd = 0, .events = POLLIN};
            do {
                share_step(&P, k, shape);
                n++;
            } while (poll(&pfd, 1, 0) == 0);
            double t = time_now_s() - t0;
            if (!peer_line(line, sizeof line) || strcmp(line, "stop") != 0) break;
            printf("ok %ld %.9f\n", n, t / (double)n);
        } else {
            printf("err unknown command\n");
        }
        fflush(stdout);
    }
    prof_close(&P);
    return 0;
}

/* The peer's steps of kind y back to back from now (peer_run) until peer_stop, which
 * gives their mean seconds. 0, or -1 with err. */
static int peer_run(sim_peer *pr, int y, char *err, size_t errlen) {
    char ans[64];
    return sim_peer_cmd(pr, ans, sizeof ans, err, errlen, "run %d", y);
}

static int peer_stop(sim_peer *pr, double *mean, char *err, size_t errlen) {
    char ans[64];
    long n = 0;
    if (sim_peer_cmd(pr, ans, sizeof ans, err, errlen, "stop") != 0) return -1;
    if (sscanf(ans, "%ld %lf", &n, mean) != 2 || n < 1 || !(*mean > 0))
        return pd_errorf(err, errlen, "the step peer answered \"%s\" to stop", ans), -1;
    return 0;
}

/* A copy between device memory and pinned host memory as a cpu-medium put (dir 0:
 * device to host) or get (1: host to device) moves a request: one batch of items of
 * one layer's block each (`item` bytes), which the CUDA backend's batched copy kernel
 * moves (the SMs over PCIe into mapped host memory, time-sliced with the other
 * context's kernels as any kernel; one large item would go to the copy engines, which
 * are not). The mean seconds of one batch over the share window, after one warm-up. */
static double share_copy_time(prof *P, const backend_copy *items, int n_items, int dir) {
    const backend_copy *c = items + (dir ? n_items : 0); /* items: n_items each way */
    P->be->ops->copy_batch(P->be, c, n_items);
    double t0 = time_now_s(), t = t0, w = share_window_s(P);
    long n = 0;
    for (; t - t0 < w; n++) {
        P->be->ops->copy_batch(P->be, c, n_items);
        t = time_now_s();
    }
    return (t - t0) / (double)n;
}

/* A thread of this process copying batches back to back until stop, as a deployment's
 * connector thread moves a store's KV beside its engine thread's steps. */
typedef struct copy_loop {
    prof *P;
    const backend_copy *items;
    int n_items;
    atomic_bool stop;
    long n;
    double t0, t1;
} copy_loop;

static void *copy_loop_main(void *arg) {
    copy_loop *c = arg;
    c->t0 = time_now_s();
    do {
        c->P->be->ops->copy_batch(c->P->be, c->items, c->n_items);
        c->n++;
    } while (!atomic_load(&c->stop));
    c->t1 = time_now_s();
    return NULL;
}

/* The copies beside this process's own steps (sim_gpu_share.own_steps, own_copies): for
 * each direction and kind, a thread copies back to back while this one times the kind's
 * steps over the share window; each over its own alone (alone[x], copy_alone[d]). 0, or
 * -1 with err. */
static int measure_own_copies(prof *P, sim_gpu_share *g, const backend_copy *items, int n_items, const double alone[2],
                              const double copy_alone[2], const int shape[4], char *err, size_t errlen) {
    for (int d = 0; d < 2; d++)
        for (int x = 0; x < 2; x++) {
            copy_loop c = {.P = P, .items = items + (d ? n_items : 0), .n_items = n_items};
            atomic_init(&c.stop, false);
            pthread_t th;
            if (pthread_create(&th, NULL, copy_loop_main, &c) != 0)
                return pd_errorf(err, errlen, "no thread for the copies"), -1;
            double t = share_time(P, x, shape);
            atomic_store(&c.stop, true);
            pthread_join(th, NULL);
            if (!(alone[x] > 0) || !(copy_alone[d] > 0) || c.n < 1 || !(t > 0))
                return pd_errorf(err, errlen, "a copy or a step timed at zero beside the other"), -1;
            g->own_steps[x][d] = PD_MAX(t / alone[x], 1.0);
            g->own_copies[d][x] = PD_MAX((c.t1 - c.t0) / (double)c.n / copy_alone[d], 1.0);
        }
    g->own_measured = true;
    g->own_host_ctas = P->be->ops->copy_host_ctas ? P->be->ops->copy_host_ctas(P->be) : -1;
    char cap[48];
    log_info("profile: copies beside this process's own steps (another thread; host copies' CTAs: %s): prefill beside "
             "device to host x%.2f, beside host to device x%.2f; decode x%.2f / x%.2f; device to host beside prefill "
             "x%.2f, beside decode x%.2f; host to device x%.2f / x%.2f",
             sim_host_ctas_text(g->own_host_ctas, cap, sizeof cap),
             g->own_steps[0][0], g->own_steps[0][1], g->own_steps[1][0], g->own_steps[1][1], g->own_copies[0][0],
             g->own_copies[0][1], g->own_copies[1][0], g->own_copies[1][1]);
    return 0;
}

/* The copies' half of the pairs (sim_gpu_share.copies, beside_copy): each direction
 * timed alone, then beside this process's own steps (measure_own_copies), then while
 * the peer steps each kind, whose mean step over its own alone gives the step beside
 * the copies. Needs the backend's copy_batch and pinned host memory; 0, or -1 with err
 * (nothing measured). */
static int measure_share_copies(prof *P, sim_peer *pr, sim_gpu_share *g, const double alone_here[2],
                                const double peer_alone[2], const int shape[4], char *err, size_t errlen) {
    const backend_ops *ops = P->be->ops;
    if (!ops->copy_batch || !ops->host_alloc || !ops->alloc) return pd_errorf(err, errlen, "no device copies"), -1;
    size_t bytes = (size_t)256 << 20;
    void *host = ops->host_alloc(P->be, bytes);
    if (!host) return pd_errorf(err, errlen, "no pinned host memory for the copies"), -1;
    void *dev = ops->alloc(P->be, bytes);
    size_t item = P->kv->block_bytes >= 4096 && P->kv->block_bytes <= ((size_t)1 << 20) ? P->kv->block_bytes
                                                                                         : (size_t)64 << 10;
    int n_items = (int)(bytes / item);
    backend_copy *items = xmalloc(sizeof(backend_copy) * 2 * (size_t)n_items);
    for (int i = 0; i < n_items; i++) {
        uint8_t *h = (uint8_t *)host + (size_t)i * item, *g = (uint8_t *)dev + (size_t)i * item;
        items[i] = (backend_copy){.dst = h, .src = g, .bytes = item};
        items[n_items + i] = (backend_copy){.dst = g, .src = h, .bytes = item};
    }
    int rc = 0;
    double alone[2];
    for (int d = 0; d < 2; d++) alone[d] = share_copy_time(P, items, n_items, d);
    char oerr[160] = "";
    if (measure_own_copies(P, g, items, n_items, alone_here, alone, shape, oerr, sizeof oerr) != 0)
        log_info("profile: copies beside this process's own steps not timed (%s)", oerr);
    for (int d = 0; d < 2 && rc == 0; d++)
        for (int y = 0; y < 2 && rc == 0; y++) {
            double mean = 0, t = 0;
            rc = peer_run(pr, y, err, errlen);
            if (rc == 0) t = share_copy_time(P, items, n_items, d);
            if (rc == 0) rc = peer_stop(pr, &mean, err, errlen);
            if (rc == 0 && (!(alone[d] > 0) || !(peer_alone[y] > 0))) {
                pd_errorf(err, errlen, "a copy or a step timed at zero");
                rc = -1;
            }
            if (rc != 0) break;
            g->copies[d][y] = PD_MAX(t / alone[d], 1.0);
            g->beside_copy[y][d] = PD_MAX(mean / peer_alone[y], 1.0);
        }
    free(items);
    ops->free(P->be, dev);
    if (ops->host_free) ops->host_free(P->be, host);
    if (rc != 0) return -1;
    g->copies_measured = true;
    g->copy_bytes = (double)bytes;
    log_info("profile: shared device, copies of %zu MiB in %d items (%.2f GB/s device to host, %.2f GB/s host to device alone): "
             "device to host beside prefill x%.2f, beside decode x%.2f; host to device beside prefill x%.2f, beside "
             "decode x%.2f; prefill beside them x%.2f / x%.2f, decode x%.2f / x%.2f",
             bytes >> 20, n_items, bytes / alone[0] / 1e9, bytes / alone[1] / 1e9, g->copies[0][0], g->copies[0][1],
             g->copies[1][0], g->copies[1][1], g->beside_copy[0][0], g->beside_copy[0][1], g->beside_copy[1][0],
             g->beside_copy[1][1]);
    return 0;
}

/* The shared-GPU pairs (sim_gpu_share): with a peer process on the same device (its
 * own context, as a second instance has), each kind timed alone here and while the
 * peer runs each kind back to back; kinds[x][y] = x beside y over x alone. The peer's
 * own times (alone, and while this process ran the other kind) are logged as the check
 * from its side. Leaves g->measured false, with the reason in its source, when the
 * peer cannot run. */
/* Kind x timed over the share window with the device's mean power over it (*watts,
 * -1 where no meter): its instantaneous samples after the first SHARE_POWER_SETTLE_S (the
 * warm-up step, the peer's first steps), as a decode point's. The energy counter over a
 * 1 s window moves in steps of about 100 ms: two profiles 25 minutes apart (H200,
 * 2026-11-29) read the pairs' excess over the pricing at -3..65 W and 57..123 W. */
#define SHARE_POWER_SETTLE_S 0.2
static double share_time_w(prof *P, const sim_profile_opts *o, int kind, const int shape[4], double *watts) {
    bool cpu = !strcmp(P->be->ops->name, "cpu");
    power_session *s = o->measure_power ? instant_open(o, cpu, share_window_s(P) + 0.5) : NULL;
    double t = share_time(P, kind, shape);
    *watts = instant_watts(s, cpu, SHARE_POWER_SETTLE_S);
    return t;
}

/* kinds_only: the pairs' factors alone (a lighter shape's): no copies, no power. */
static void measure_gpu_share(prof *P, const sim_profile_opts *o, sim_gpu_share *g, const int shape[4],
                              double idle_w, bool kinds_only) {
    char dev[16], bs[16], sh[64], th[16], err[512] = "", ans[64];
    snprintf(dev, sizeof dev, "%d", o->device);
    if (o->device < 0) snprintf(dev, sizeof dev, "cpu");
    snprintf(bs, sizeof bs, "%d", P->bs);
    snprintf(sh, sizeof sh, "%d,%d,%d,%d", shape[0], shape[1], shape[2], shape[3]);
    snprintf(th, sizeof th, "%d", PD_MAX(P->be->threads, 0)); /* the CPU's threads, as this one's (0: all) */
    char *argv[] = {"pdserve", "profile", "--model", (char *)(o->model_name ? o->model_name : ""), "--load-format",
                    "dummy", "--device", dev, "--block-size", bs, "--threads", th, "--step-peer", sh, NULL};
    memcpy(g->shape, shape, sizeof g->shape);
    sim_peer pr;
    double alone[2], peer_alone[2], beside[2][2], peer_beside[2][2], alone_w[2], pair_w[2][2];
    if (!o->model_name || sim_peer_start(&pr, "step peer", argv, err, sizeof err) != 0) {
        if (!o->model_name) snprintf(err, sizeof err, "no model argument for the peer");
        goto fail;
    }
    for (int x = 0; x < 2; x++) {
        alone[x] = share_time_w(P, o, x, shape, &alone_w[x]);
        if (sim_peer_cmd(&pr, ans, sizeof ans, err, sizeof err, "time %d", x) != 0) goto fail_peer;
        peer_alone[x] = atof(ans);
    }
    for (int x = 0; x < 2; x++)
        for (int y = 0; y < 2; y++) {
            if (peer_run(&pr, y, err, sizeof err) != 0) goto fail_peer;
            beside[x][y] = share_time_w(P, o, x, shape, &pair_w[x][y]);
            if (peer_stop(&pr, &peer_beside[y][x], err, sizeof err) != 0) goto fail_peer;
        }
    char cerr[256] = "";
    if (!kinds_only && measure_share_copies(P, &pr, g, alone, peer_alone, shape, cerr, sizeof cerr) != 0)
        log_info("profile: shared device: copies not timed (%s)", cerr);
    sim_peer_stop(&pr);
    for (int x = 0; x < 2; x++)
        for (int y = 0; y < 2; y++) {
            if (!(alone[x] > 0) || !(beside[x][y] > 0)) {
                snprintf(err, sizeof err, "a step timed at zero");
                goto fail;
            }
            g->kinds[x][y] = PD_MAX(beside[x][y] / alone[x], 1.0);
        }
    g->measured = true;
    snprintf(g->source, sizeof g->source,
             "measured: pdserve profile, a peer process on the same device, each pair %.1f s; prefill %d after %d, "
             "decode %dx%d%s%s", share_window_s(P), shape[0], shape[1], shape[2], shape[3],
             g->copies_measured ? "; copies of 256 MiB between the device and pinned host memory, a layer's block an item" : "",
             g->own_measured ? ", beside own steps too" : "");
    log_info("profile: shared device (prefill %d after %d: %.2f ms alone, decode %dx%d: %.2f ms alone): prefill beside "
             "prefill x%.2f, beside decode x%.2f; decode beside prefill x%.2f, beside decode x%.2f",
             shape[0], shape[1], alone[0] * 1e3, shape[2], shape[3], alone[1] * 1e3, g->kinds[0][0], g->kinds[0][1],
             g->kinds[1][0], g->kinds[1][1]);
    /* the pairs' power against what the simulator prices for them: each step's power
     * alone over its share of the time, idle power over the rest; the simulator adds the
     * difference while steps overlap on a shared GPU (sim_gpu_share_extra_w). All four
     * or none. */
    memset(g->power_w, 0, sizeof g->power_w);
    memset(g->priced_w, 0, sizeof g->priced_w);
    for (int x = 0; x < 2 && idle_w > 0; x++)
        for (int y = 0; y < 2; y++) {
            if (!(pair_w[x][y] > 0) || !(alone_w[x] > 0) || !(alone_w[y] > 0)) continue;
            double fx = beside[x][y] / alone[x], fy = peer_beside[y][x] / peer_alone[y];
            double priced = alone_w[x] / fx + alone_w[y] / fy - idle_w * (1 / fx + 1 / fy - 1);
            g->power_w[x][y] = pair_w[x][y];
            g->priced_w[x][y] = priced;
            log_info("profile: shared device, %s beside %s: %.0f W measured, %.0f W as priced (%.0f W and %.0f W "
                     "alone, idle %.0f W; %+.1f%%)", x ? "decode" : "prefill", y ? "decode" : "prefill", pair_w[x][y],
                     priced, alone_w[x], alone_w[y], idle_w, 100 * (priced / pair_w[x][y] - 1));
        }
    g->power_measured = true;
    for (int x = 0; x < 2; x++)
        for (int y = 0; y < 2; y++)
            if (!(g->power_w[x][y] > 0) || !(g->priced_w[x][y] > 0)) g->power_measured = false;
    log_info("profile: shared device, from the peer's side (%.2f / %.2f ms alone): prefill beside prefill x%.2f, "
             "beside decode x%.2f; decode beside prefill x%.2f, beside decode x%.2f",
             peer_alone[0] * 1e3, peer_alone[1] * 1e3, peer_beside[0][0] / peer_alone[0],
             peer_beside[0][1] / peer_alone[0], peer_beside[1][0] / peer_alone[1], peer_beside[1][1] / peer_alone[1]);
    return;
fail_peer:
    sim_peer_stop(&pr);
fail:
    g->measured = false;
    snprintf(g->source, sizeof g->source, "not measured: %.170s", err);
    log_warn("profile: shared device: %s", err);
}

/* ---- the profile --------------------------------------------------------------------------- */

static int max_of(const int *v, int n) {
    int m = 0;
    for (int i = 0; i < n; i++) m = PD_MAX(m, v[i]);
    return m;
}

static void fill_axis(double *dst, const int *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = src[i];
}

static int check_axis(const int *v, int n, int lo, const char *what, char *err, size_t errlen) {
    if (n < 1 || n > 256) return pd_errorf(err, errlen, "profile: %s needs 1 to 256 values", what), -1;
    for (int i = 0; i < n; i++)
        if (v[i] < lo || (i && v[i] <= v[i - 1]))
            return pd_errorf(err, errlen, "profile: %s must increase and be at least %d", what, lo), -1;
    return 0;
}

static void meta(const sim_profile_opts *o, model *m, prof *P, sim_profile *out) {
    snprintf(out->model, sizeof out->model, "%s", o->model_name ? o->model_name : m->cfg.model_type);
    snprintf(out->backend, sizeof out->backend, "%s", m->be->ops->name);
    if (o->device_name) snprintf(out->device, sizeof out->device, "%s", o->device_name);
    else snprintf(out->device, sizeof out->device, "%s (%d threads)", m->be->ops->name, m->be->threads);
    if (gethostname(out->host, sizeof out->host) != 0) snprintf(out->host, sizeof out->host, "unknown");
    out->host[sizeof out->host - 1] = 0;
    time_t now = time(NULL);
    struct tm tmv;
    gmtime_r(&now, &tmv);
    strftime(out->date, sizeof out->date, "%Y-%m-%dT%H:%M:%SZ", &tmv);
    out->block_size = P->bs;
    out->kv_bytes_per_token = model_kv_bytes_per_token(&m->cfg, dtype_size(m->be->ops->kv_type));
    out->n_layers = m->cfg.n_layers;
    out->repeats = o->repeats;
    out->clock.base_mhz = o->clock_mhz;
}

/* The clock points: lock each clock in turn, time two reference points against the
 * grid's own values at the base clock, read busy power; restore; fit. */
static int profile_clocks(prof *P, const sim_profile_opts *o, sim_profile *out, bool cpu, double idle_w, char *err,
                          size_t errlen) {
    if (!o->nvml) {
        pd_errorf(err, errlen, "profile: clock points need NVML, which is not available here");
        return -1;
    }
    if (o->n_clocks > SIM_MAX_CLOCKS) {
        pd_errorf(err, errlen, "profile: at most %d clock points", SIM_MAX_CLOCKS);
        return -1;
    }
    int ip = o->n_prefill_tokens - 1, id = o->n_decode_batch - 1, jd = o->n_decode_context - 1;
    double base_pre = out->prefill.v[ip * out->prefill.ny], base_dec = out->decode.v[id * out->decode.ny + jd];
    double t[2];
    ppoint ref[2] = {{0, o->prefill_tokens[ip], o->prefill_context[0], 0, &t[0], {0}, 0},
                     {1, o->decode_batch[id], o->decode_context[jd], 0, &t[1], {0}, 0}};
    int rc = 0;
    out->clock.n_points = 0;
    for (int k = 0; k < o->n_clocks; k++) {
        unsigned mhz = o->clocks_mhz[k];
        int gpu = o->clock_gpu;
        if (power_clocks_lock(o->nvml, &gpu, &mhz, 1, o->allow_clock_control, err, errlen) != 0) {
            rc = -1;
            break;
        }
        power_phase ph;
        phase_begin(&ph, o, cpu);
        run_rounds(P, ref, 2, o->repeats);
        double w = phase_end(&ph, NULL, 0, NULL);
        out->clock.points[out->clock.n_points++] =
            (sim_clock_point){mhz, t[0] / base_pre, t[1] / base_dec, w > 0 ? w : 0};
        log_info("profile: SM clock %u MHz: prefill x%.3f, decode x%.3f of the base, %s", mhz, t[0] / base_pre,
                 t[1] / base_dec, w > 0 ? "power measured" : "power not measured");
    }
    int n = power_clocks_restore();
    log_info("profile: %d GPU clock lock(s) reset", n);
    if (rc == 0 && out->clock.n_points >= 2 && out->clock.base_mhz > 0) {
        sim_clock_fit(&out->clock, idle_w > 0 ? idle_w : 0);
        size_t l = strlen(out->clock.source);
        snprintf(out->clock.source + l, sizeof out->clock.source - l, "%sfitted to %d profiled clocks",
                 l ? "; " : "", out->clock.n_points);
    }
    return rc;
}

int sim_profile_measure(model *m, const sim_profile_opts *o, sim_profile *out, char *err, size_t errlen) {
    sim_profile_init(out);
    if (check_axis(o->prefill_tokens, o->n_prefill_tokens, 1, "prefill tokens", err, errlen) ||
        check_axis(o->prefill_context, o->n_prefill_context, 0, "prefill context", err, errlen) ||
        check_axis(o->decode_batch, o->n_decode_batch, 1, "decode batch", err, errlen) ||
        check_axis(o->decode_context, o->n_decode_context, 1, "decode context", err, errlen))
        return -1;
    bool cpu = !strcmp(m->be->ops->name, "cpu");
    prof P = {.m = m, .be = m->be, .bs = o->block_size > 0 ? o->block_size : 16};
    rng_seed(&P.rng, 12345);
    int maxT = max_of(o->prefill_tokens, o->n_prefill_tokens), maxC = max_of(o->prefill_context, o->n_prefill_context);
    int maxB = max_of(o->decode_batch, o->n_decode_batch), maxL = max_of(o->decode_context, o->n_decode_context);
    int mixT = PD_MIN(maxT, 256);
    int mixB = PD_MIN(maxB, 16);
    /* mixed steps at serving shapes: the engine's default budget (2048 rows, or the
     * largest chunk profiled) shared by B decode rows of context sL and a chunk of the
     * rest, at chunk starts 0 and one budget. On a CPU 256 rows: a 2048-row chunk takes
     * seconds there, and the CPU's mixed steps cost the sum of their parts (within 3% on
     * two cores: docs/simulator.md) */
    int sT = PD_MIN(maxT, cpu ? 256 : 2048), sL = o->decode_context[0];
    for (int i = 0; i < o->n_decode_context; i++)
        if (o->decode_context[i] <= 4096) sL = PD_MAX(sL, o->decode_context[i]);
    static const int SERVE_B[] = {1, 4, 16};
    int n_sb = 0, sB[3];
    for (int i = 0; i < 3; i++)
        if (SERVE_B[i] <= maxB && SERVE_B[i] < sT) sB[n_sb++] = SERVE_B[i];
    int blocks = PD_MAX(blocks_for(maxT + maxC, P.bs), maxB * blocks_for(maxL, P.bs) + blocks_for(mixT, P.bs));
    /* on a device, also a short chunk deep into its prompt (DEEP_T rows after two
     * budgets) beside the same decode rows: a prompt's last chunk; on an H200 such steps
     * cost 5-16 ms more than their parts (docs/simulator.md, "steady-quick on the
     * current engine") */
    int n_starts = cpu ? 2 : 3;
    blocks = PD_MAX(blocks, 16 * blocks_for(sL, P.bs) + blocks_for(2 * sT + DEEP_T, P.bs));
    if (prof_open(&P, PD_MAX(PD_MAX(maxT, maxB + mixT), sT), PD_MAX(maxB + 1, (maxT + LIN_CHUNK - 1) / LIN_CHUNK),
                  maxB + 1, blocks, err, errlen) != 0)
        return -1;
    meta(o, m, &P, out);
    double t_start = time_now_s();

    double *ax = xmalloc(sizeof(double) * 4096), *ay = xmalloc(sizeof(double) * 4096);
    fill_axis(ax, o->prefill_tokens, o->n_prefill_tokens);
    fill_axis(ay, o->prefill_context, o->n_prefill_context);
    sim_grid_init(&out->prefill, o->n_prefill_tokens, ax, o->n_prefill_context, ay);
    fill_axis(ax, o->decode_batch, o->n_decode_batch);
    fill_axis(ay, o->decode_context, o->n_decode_context);
    sim_grid_init(&out->decode, o->n_decode_batch, ax, o->n_decode_context, ay);
    free(ax);
    free(ay);

    /* idle power first, while nothing runs: the instantaneous samples of 1 s after the
     * first 0.2 (the energy counter's 100 ms steps are a tenth of such a window), else
     * the energy over it, where a meter says why it cannot */
    char why[POWER_REASON_LEN * 2 + 32] = "";
    power_phase ph;
    double idle_w = -1;
    power_session *is = o->measure_power ? instant_open(o, cpu, 1.2) : NULL;
    if (is) {
        usleep(1200 * 1000);
        idle_w = instant_watts(is, cpu, 0.2);
    }
    if (!(idle_w > 0)) {
        phase_begin(&ph, o, cpu);
        if (ph.on) usleep(1000 * 1000);
        idle_w = phase_end(&ph, why, sizeof why, NULL);
    }

    int n_pre = o->n_prefill_tokens * o->n_prefill_context, n_dec = o->n_decode_batch * o->n_decode_context;
    ppoint *pts = xcalloc((size_t)(n_pre + n_dec + 2 * 256 + 1 + 4 + 9), sizeof(ppoint));
    for (int i = 0; i < o->n_prefill_tokens; i++)
        for (int j = 0; j < o->n_prefill_context; j++)
            pts[i * o->n_prefill_context + j] = (ppoint){0, o->prefill_tokens[i], o->prefill_context[j], 0,
                                                         &out->prefill.v[i * out->prefill.ny + j], {0}, 0};
    for (int i = 0; i < o->n_decode_batch; i++)
        for (int j = 0; j < o->n_decode_context; j++)
            pts[n_pre + i * o->n_decode_context + j] = (ppoint){1, o->decode_batch[i], o->decode_context[j], 0,
                                                                &out->decode.v[i * out->decode.ny + j], {0}, 0};
    /* With a meter, prefill and decode points run in separate phases (one mean power
     * each); without one, every point shares the same rounds, so that a burst of load
     * from elsewhere cannot spoil a whole phase. */
    bool metered = idle_w > 0;
    double prefill_w = -1, decode_w = -1, prefill_mhz = 0, decode_mhz = 0;
    if (metered) {
        phase_begin(&ph, o, cpu);
        run_rounds(&P, pts, n_pre, o->repeats);
        prefill_w = phase_end(&ph, NULL, 0, &prefill_mhz);
        phase_begin(&ph, o, cpu);
        run_rounds(&P, pts + n_pre, n_dec, o->repeats);
        decode_w = phase_end(&ph, NULL, 0, &decode_mhz);
        if (decode_w > 0) measure_decode_watts(&P, o, cpu, pts + n_pre, n_dec, out);
    }

    int lin[2 * 256 + 1];
    int n_lin = linear_axis(o, lin);
    double *lx = xmalloc(sizeof(double) * (size_t)n_lin);
    fill_axis(lx, lin, n_lin);
    static const double one = 1;
    sim_grid_init(&out->linear, n_lin, lx, 1, &one);
    free(lx);
    ppoint *lp = pts + n_pre + n_dec;
    for (int i = 0; i < n_lin; i++) lp[i] = (ppoint){2, lin[i], 0, 0, &out->linear.v[i], {0}, 0};
    /* mixed steps: T prefill rows + B decodes, to check the model and fit the overhead */
    double tmix[4];
    int mix_L = o->decode_context[0], mT[4], mB[4];
    for (int k = 0; k < 4; k++) {
        mT[k] = PD_MAX(1, mixT >> (2 * (k / 2)));
        mB[k] = PD_MAX(1, mixB >> (2 * (k % 2)));
        lp[n_lin + k] = (ppoint){3, mT[k], mB[k], mix_L, &tmix[k], {0}, 0};
    }
    double tserve[9];
    int n_serve = 0, shape[9][4]; /* T, C, B, L */
    for (int ci = 0; ci < n_starts; ci++)
        for (int k = 0; k < n_sb; k++, n_serve++) {
            int *q = shape[n_serve];
            q[0] = ci < 2 ? sT - sB[k] : DEEP_T, q[1] = ci * sT, q[2] = sB[k], q[3] = sL;
            lp[n_lin + 4 + n_serve] = (ppoint){.kind = 4, .a = q[0], .b = q[2], .c = q[3], .d = q[1], .out = &tserve[n_serve]};
        }
    if (metered) run_rounds(&P, lp, n_lin + 4 + n_serve, o->repeats);
    else run_rounds(&P, pts, n_pre + n_dec + n_lin + 4 + n_serve, o->repeats);
    if (o->verbose) {
        for (int i = 0; i < n_pre + n_dec; i++)
            log_info("profile: %s %s=%d %s=%d: %.3f ms", pts[i].kind ? "decode" : "prefill", pts[i].kind ? "B" : "T",
                     pts[i].a, pts[i].kind ? "L" : "C", pts[i].b, *pts[i].out * 1e3);
    }
    lower_monotone_envelope(&out->prefill, true);
    lower_monotone_envelope(&out->decode, false);
    lower_monotone_envelope(&out->linear, true);
    free(pts);
    if (o->verbose)
        for (int i = 0; i < n_lin; i++) log_info("profile: linear T=%d: %.3f ms", lin[i], out->linear.v[i] * 1e3);

    /* the overhead prefill and decode share without a linear curve: median of tp + td - tmix */
    double ov[4];
    int n_ov = 0;
    for (int k = 0; k < 4; k++) {
        int T = mT[k], B = mB[k];
        double tm = tmix[k];
        double tp = sim_grid_eval(&out->prefill, T, 0), td = sim_grid_eval(&out->decode, B, mix_L);
        ov[n_ov++] = tp + td - tm;
        sim_work w;
        sim_work_begin(&w, out);
        sim_work_add_chunk(&w, T, 0);
        for (int b = 0; b < B; b++) sim_work_add_decode(&w, mix_L);
        sim_cost c;
        sim_cost_init(&c, out, 0);
        sim_step_cost sc;
        sim_cost_step(&c, &w, &sc);
        log_info("profile: mixed step T=%d + B=%d at L=%d: %.3f ms measured, %.3f ms modelled (%+.1f%%)", T, B,
                 mix_L, tm * 1e3, sc.seconds * 1e3, 100.0 * (sc.seconds / tm - 1));
    }
    qsort(ov, (size_t)n_ov, sizeof(double), cmp_double);
    out->mixed_overhead_s = PD_MAX(0.5 * (ov[1] + ov[2]), 0);
    /* the serving-shape mixed steps, stored: the cost model prices what they cost
     * beyond their parts (sim_cost_mixed_excess) */
    sim_cost cm;
    sim_cost_init(&cm, out, 0);
    for (int k = 0; k < n_serve; k++) {
        const int *q = shape[k];
        sim_work w;
        sim_work_begin(&w, out);
        sim_work_add_chunk(&w, q[0], q[1]);
        for (int b = 0; b < q[2]; b++) sim_work_add_decode(&w, q[3]);
        w.n_logits = 1 + q[2];
        sim_step_cost sc;
        sim_cost_step(&cm, &w, &sc);
        out->mixed[out->n_mixed++] = (sim_mixed_point){q[0], q[1], q[2], q[3], tserve[k]};
        log_info("profile: mixed step T=%d after C=%d + B=%d at L=%d: %.3f ms measured, %.3f ms as the sum of its "
                 "parts (%+.1f%%)", q[0], q[1], q[2], q[3], tserve[k] * 1e3, sc.seconds * 1e3,
                 100.0 * (tserve[k] / sc.seconds - 1));
    }
    if (n_serve > 0)
        snprintf(out->mixed_source, sizeof out->mixed_source,
                 "measured: pdserve profile, a %d-row budget shared by B decode rows of context %d and a chunk, "
                 "median of %d%s", sT, sL, o->repeats, n_starts > 2 ? "; and a 64-row chunk after two budgets" : "");

    out->sample_s_per_row = P.be->ops->argmax_rows ? 0 : measure_sample_row(m->cfg.vocab_size);
    out->step_overhead_s = measure_step_overhead(m, P.bs, out->sample_s_per_row);
    if (cpu) measure_contention(&P, o, &out->contention);
    if (o->measure_share) {
        /* the serving budget's chunk after one budget (a long prompt's second chunk) and
         * 16 decodes at the largest context profiled (the peer's cache, as this one's, at
         * most half the free memory) */
        int shape[4] = {sT, sT, PD_MIN(16, maxB), maxL};
        sim_gpu_share *g = &out->gpu_share;
        measure_gpu_share(&P, o, g, shape, idle_w, false);
        /* and with a decode a quarter as long in context: the factors with a decode in
         * them move with its step's weight (sim_gpu_share_kind) */
        int light[4] = {sT, sT, shape[2], maxL / 4};
        if (g->measured && light[3] >= 16) {
            sim_gpu_share t;
            memset(&t, 0, sizeof t);
            measure_gpu_share(&P, o, &t, light, 0, true);
            if (t.measured) {
                memcpy(g->lighter_shape[0], light, sizeof light);
                memcpy(g->lighter_kinds[0], t.kinds, sizeof t.kinds);
                g->n_lighter = 1;
                size_t n = strlen(g->source);
                snprintf(g->source + n, sizeof g->source - n, "; again with decode %dx%d", light[2], light[3]);
            }
        }
    }

    if (idle_w > 0 && prefill_w > 0 && decode_w > 0) {
        out->power.measured = true;
        out->power.idle_w = idle_w;
        out->power.prefill_w = prefill_w;
        out->power.decode_w = decode_w;
        if (!cpu && out->power.decode_grid.nx > 0) fit_decode_watts(&P, out);
        snprintf(out->power.source, sizeof out->power.source, "measured: %s over each phase%s%s",
                 cpu ? "RAPL package + DRAM" : "NVML energy counter",
                 out->power.decode_grid.nx > 0 ? "; decode_watts: each decode point back to back, instantaneous power over 0.3 s" : "",
                 out->power.decode_grid_measured.nx > 0 ? ", fitted to HBM traffic (decode_watts_fit)" : "");
    } else {
        snprintf(out->power.source, sizeof out->power.source, "not measured (%s)",
                 o->measure_power ? (why[0] ? why : "no meter readable") : "--no-power");
    }
    /* The clock the grid was measured at: given (--clock-mhz), else what NVML saw the
     * GPU run at while the prefill points ran (median of the 100 ms samples). */
    if (!(out->clock.base_mhz > 0) && prefill_mhz > 0) {
        out->clock.base_mhz = prefill_mhz;
        size_t n = strlen(out->clock.source);
        snprintf(out->clock.source + n, sizeof out->clock.source - n,
                 "%sbase clock measured: median SM clock %.0f MHz while prefill ran, %.0f MHz while decode ran",
                 n ? "; " : "", prefill_mhz, decode_mhz);
        log_info("profile: the GPU ran at %.0f MHz (prefill) and %.0f MHz (decode): base clock %.0f MHz",
                 prefill_mhz, decode_mhz, prefill_mhz);
    }
    snprintf(out->mediums_note, sizeof out->mediums_note,
             "not profiled (pdserve profile --medium LIST times them); sim uses the documented defaults");
    if (o->measure_power_cap) {
        /* serving shapes: the budget's chunk and an eighth of it (a prompt's last chunk),
         * and decode batches of 16 and the largest at the serving context */
        cap_shape sh[4];
        int n_sh = 0;
        sh[n_sh++] = (cap_shape){false, sT, 0};
        if (sT / 8 >= 1 && sT / 8 < sT) sh[n_sh++] = (cap_shape){false, sT / 8, 0};
        if (PD_MIN(16, maxB) < maxB) sh[n_sh++] = (cap_shape){true, PD_MIN(16, maxB), sL};
        sh[n_sh++] = (cap_shape){true, maxB, sL};
        measure_power_cap(&P, o, sh, n_sh, out);
    }

    int rc = 0;
    if (o->n_clocks > 0) rc = profile_clocks(&P, o, out, cpu, idle_w, err, errlen);
    log_info("profile: %d prefill + %d decode points in %.1f s", o->n_prefill_tokens * o->n_prefill_context,
             o->n_decode_batch * o->n_decode_context, time_now_s() - t_start);

    long captured = 0, replayed = 0;
    fwd_ctx_graph_counts(P.f, &captured, &replayed);
    out->decode_buckets = captured > 0; /* the decode points ran as graphs, padded to buckets */
    prof_close(&P);
    return rc;
}
