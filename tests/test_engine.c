/* test_engine.c: the serving loop on a dummy tiny model on the CPU backend.
 * Greedy tokens are identical whether 16 requests run together or one at a time,
 * and under a KV pool so small that requests get preempted and recomputed; aborts
 * free every block; eos / stop ids / ignore_eos / min_tokens / max_tokens end
 * requests as vLLM does; timestamps are monotonic; bad requests fail at submit. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "test.h"
#include "test_waiter.h"
#include "test_device.h"
#include "util/util.h"

enum { NREQ = 16, MAXOUT = 64 };

/* ---- collecting events ---------------------------------------------------------- */

typedef struct result {
    uint64_t id;
    int32_t tokens[MAXOUT];
    float logprobs[MAXOUT];
    int n_top[MAXOUT];
    int n;
    bool done, index_ok;
    finish_reason finish;
    int32_t stop_token;
    int n_output, n_preemptions;
    double arrival, first_scheduled, first_token, finished;
    double token_times[MAXOUT];
    char error[256];
} result;

typedef struct collector {
    test_waiter w;
    result res[NREQ];
} collector;

typedef struct slot { collector *c; int i; } slot;

static void on_event(void *user, const engine_event *ev) {
    slot *s = user;
    result *r = &s->c->res[s->i];
    pthread_mutex_lock(&s->c->w.mu);
    if (ev->kind == ENGINE_EVENT_TOKEN) {
        if (ev->index != r->n || r->done) r->index_ok = false; /* in order, none after the end */
        if (r->n < MAXOUT) {
            r->tokens[r->n] = ev->token;
            r->logprobs[r->n] = ev->logprob;
            r->n_top[r->n] = ev->n_top;
        }
        r->n++;
        pthread_cond_broadcast(&s->c->w.cv); /* test_abort waits for tokens, not sleeps */
    } else {
        r->done = true;
        r->finish = ev->finish;
        r->stop_token = ev->stop_token;
        r->n_output = ev->n_output;
        r->n_preemptions = ev->times->n_preemptions;
        r->arrival = ev->times->arrival;
        r->first_scheduled = ev->times->first_scheduled;
        r->first_token = ev->times->first_token;
        r->finished = ev->times->finished;
        for (int i = 0; i < ev->n_output && i < MAXOUT; i++) r->token_times[i] = ev->times->token_times[i];
        if (ev->error) snprintf(r->error, sizeof r->error, "%s", ev->error);
        test_waiter_done_locked(&s->c->w);
    }
    pthread_mutex_unlock(&s->c->w.mu);
}

static collector *collector_new(void) {
    collector *c = calloc(1, sizeof(*c));
    test_waiter_init(&c->w);
    for (int i = 0; i < NREQ; i++) c->res[i].index_ok = true;
    return c;
}

static void collector_wait(collector *c, int n) { test_waiter_wait(&c->w, n); }

static void collector_free(collector *c) {
    test_waiter_destroy(&c->w);
    free(c);
}

/* ---- the model and prompts --------------------------------------------------------- */

static model *g_model;
static backend *g_be;
static int32_t g_prompts[NREQ][80];
static int g_prompt_len[NREQ];

static int setup(void) {
    model_files mf;
    char err[512];
    if (model_files_open("preset:tiny-llama", "dummy", &mf, err, sizeof err) != 0) {
        fprintf(stderr, "model_files_open: %s\n", err);
        return -1;
    }
    g_be = test_device_backend(2); /* PDSERVE_TEST_DEVICE: cpu (default) or cuda:N */
    g_model = model_load(g_be, &mf, 1234, err, sizeof err);
    model_files_close(&mf);
    if (!g_model) {
        fprintf(stderr, "model_load: %s\n", err);
        return -1;
    }
    pd_rng r;
    rng_seed(&r, 99);
    for (int i = 0; i < NREQ; i++) {
        g_prompt_len[i] = 3 + (int)(rng_next(&r) % 70);
        for (int j = 0; j < g_prompt_len[i]; j++)
            g_prompts[i][j] = 3 + (int32_t)(rng_next(&r) % (uint64_t)(g_model->cfg.vocab_size - 3));
    }
    return 0;
}

static engine *make_engine(size_t kv_bytes, int max_seqs, int budget) {
    engine_config cfg;
    engine_config_default(&cfg);
    /* 0: the default sizing; on a GPU that would be 90% of the card, so a fixed 64 MiB */
    cfg.kv_cache_memory = kv_bytes || g_be->ops->host_memory ? kv_bytes : (size_t)64 << 20;
    cfg.max_num_seqs = max_seqs;
    cfg.max_num_batched_tokens = budget;
    cfg.max_model_len = 128;
    char err[512];
    engine *e = engine_create(g_model, &cfg, err, sizeof err);
    if (!e) fprintf(stderr, "engine_create: %s\n", err);
    return e;
}

static sampling_params greedy(int max_tokens) {
    sampling_params sp;
    sampling_params_default(&sp);
    sp.temperature = 0;
    sp.max_tokens = max_tokens;
    sp.ignore_eos = true;
    return sp;
}

/* Submits prompt `pi` as result slot i of c. */
static uint64_t submit_prompt(engine *e, collector *c, slot *sl, int i, int pi, const sampling_params *sp) {
    sl[i].c = c;
    sl[i].i = i;
    engine_request q = {.prompt = g_prompts[pi], .n_prompt = g_prompt_len[pi], .sp = *sp,
                        .on_event = on_event, .user = &sl[i]};
    char err[512];
    uint64_t id = engine_submit(e, &q, err, sizeof err);
    if (!id) fprintf(stderr, "submit: %s\n", err);
    c->res[i].id = id;
    return id;
}

static uint64_t submit(engine *e, collector *c, slot *sl, int i, const sampling_params *sp) {
    return submit_prompt(e, c, sl, i, i, sp);
}

/* Runs NREQ greedy requests, all at once or one after the other. */
static collector *run_all(engine *e, bool together, int max_tokens) {
    collector *c = collector_new();
    static slot sl[NREQ];
    sampling_params sp = greedy(max_tokens);
    for (int i = 0; i < NREQ; i++) {
        submit(e, c, sl, i, &sp);
        if (!together) collector_wait(c, i + 1);
    }
    collector_wait(c, NREQ);
    return c;
}

static void check_times(const result *r) {
    CHECK(r->arrival > 0);
    CHECK(r->first_scheduled >= r->arrival);
    CHECK(r->first_token >= r->first_scheduled);
    CHECK(r->token_times[0] == r->first_token);
    for (int i = 1; i < r->n_output && i < MAXOUT; i++) CHECK(r->token_times[i] >= r->token_times[i - 1]);
    CHECK(r->finished >= r->token_times[PD_MIN(r->n_output, MAXOUT) - 1]);
}

static void check_empty(engine *e) {
    engine_stats st;
    engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    CHECK_EQ_INT(st.running, 0);
    CHECK_EQ_INT(st.waiting, 0);
}

/* ---- cases ------------------------------------------------------------------------ */

static collector *g_ref; /* one at a time, roomy pool */

static void test_batch_invariance(void) {
    engine *e = make_engine(0, 8, 64); /* chunked prefill: prompts up to 72 > 64 */
    REQUIRE(e);
    engine_start(e);
    if (g_ref) collector_free(g_ref); /* the previous run's (main runs the cases twice) */
    g_ref = run_all(e, false, 24);
    collector *c = run_all(e, true, 24);
    for (int i = 0; i < NREQ; i++) {
        const result *a = &g_ref->res[i], *b = &c->res[i];
        CHECK_EQ_INT(a->finish, FINISH_LENGTH);
        CHECK_EQ_INT(a->n, 24);
        CHECK(a->index_ok && b->index_ok);
        CHECK_EQ_INT(b->n, 24);
        CHECKF(memcmp(a->tokens, b->tokens, sizeof(int32_t) * 24) == 0, "request %d differs", i);
        check_times(a);
        check_times(b);
    }
    engine_stats st;
    engine_get_stats(e, &st);
    CHECK_EQ_INT(st.requests_finished, 2 * NREQ);
    CHECK_EQ_INT(st.generation_tokens, 2 * NREQ * 24);
    CHECK(st.steps > 0 && st.busy_seconds > 0);
    check_empty(e);
    engine_free(e);
    collector_free(c);
}

static void test_preemption_identical(void) {
    REQUIRE(g_ref);
    size_t bpt = model_kv_bytes_per_token(&g_model->cfg, dtype_size(g_be->ops->kv_type));
    engine *e = make_engine(bpt * 16 * 12, 16, 64); /* 12 blocks: 192 tokens for 16 requests */
    REQUIRE(e);
    engine_start(e);
    collector *c = run_all(e, true, 24);
    int preempted = 0;
    for (int i = 0; i < NREQ; i++) {
        const result *a = &g_ref->res[i], *b = &c->res[i];
        CHECK_EQ_INT(b->n, 24);
        CHECKF(memcmp(a->tokens, b->tokens, sizeof(int32_t) * 24) == 0, "request %d differs", i);
        preempted += b->n_preemptions;
        check_times(b);
    }
    engine_stats st;
    engine_get_stats(e, &st);
    CHECK(st.preemptions > 0);
    CHECK_EQ_INT((int)st.preemptions, preempted);
    CHECK_EQ_INT(st.kv_blocks_total, 12);
    fprintf(stderr, "  %d preemptions\n", preempted);
    check_empty(e);
    engine_free(e);
    collector_free(c);
}

static void test_abort(void) {
    engine *e = make_engine(0, 8, 64);
    REQUIRE(e);
    engine_start(e);
    collector *c = collector_new();
    static slot sl[NREQ];
    sampling_params sp = greedy(50);
    for (int i = 0; i < 4; i++) submit(e, c, sl, i, &sp);
    /* wait until every one has produced a few tokens: woken at each token (a sleep of
     * 1 ms could let a loaded machine finish requests 1 and 2 before their abort) */
    pthread_mutex_lock(&c->w.mu);
    for (;;) {
        int ready = 0;
        for (int i = 0; i < 4; i++) ready += c->res[i].n >= 3;
        if (ready == 4) break;
        pthread_cond_wait(&c->w.cv, &c->w.mu);
    }
    pthread_mutex_unlock(&c->w.mu);
    engine_abort(e, c->res[1].id);
    engine_abort(e, c->res[2].id);
    engine_abort(e, 987654); /* unknown: ignored */
    collector_wait(c, 4);
    CHECK_EQ_INT(c->res[1].finish, FINISH_ABORT);
    CHECK_EQ_INT(c->res[2].finish, FINISH_ABORT);
    for (int i = 0; i < 4; i++) CHECK(c->res[i].index_ok);
    CHECK(c->res[1].n < 50);
    CHECK_EQ_INT(c->res[0].finish, FINISH_LENGTH);
    CHECK_EQ_INT(c->res[3].n, 50);
    engine_stats st;
    engine_get_stats(e, &st);
    CHECK_EQ_INT(st.requests_aborted, 2);
    check_empty(e);
    /* engine_stop aborts what is still running */
    collector *d = collector_new();
    for (int i = 0; i < 3; i++) submit(e, d, sl, i, &sp);
    engine_stop(e);
    collector_wait(d, 3);
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(d->res[i].finish, FINISH_ABORT);
    char err[256];
    engine_request q = {.prompt = g_prompts[0], .n_prompt = 4, .sp = sp, .on_event = on_event, .user = &sl[0]};
    CHECK(engine_submit(e, &q, err, sizeof err) == 0);
    check_empty(e);
    engine_free(e);
    collector_free(c);
    collector_free(d);
}

static void test_stops(void) {
    REQUIRE(g_ref);
    const result *ref = &g_ref->res[0];
    int32_t t3 = ref->tokens[3];
    int first = 0; /* first index where t3 appears */
    while (ref->tokens[first] != t3) first++;
    /* eos through the model config (read by the engine thread: set before it starts) */
    int saved_eos = g_model->cfg.eos_token_ids[0];
    g_model->cfg.eos_token_ids[0] = t3;
    engine *e = make_engine(0, 8, 64);
    REQUIRE(e);
    engine_start(e);
    static slot sl[NREQ];
    /* stop_token_ids */
    collector *c = collector_new();
    sampling_params sp = greedy(24);
    sp.stop_token_ids[0] = t3;
    sp.n_stop_token_ids = 1;
    submit_prompt(e, c, sl, 0, 0, &sp);
    /* eos, ignore_eos off */
    sampling_params se = greedy(24);
    se.ignore_eos = false;
    submit_prompt(e, c, sl, 1, 0, &se);
    /* ignore_eos: runs to max_tokens */
    sampling_params si = greedy(24);
    submit_prompt(e, c, sl, 2, 0, &si);
    /* min_tokens past the first eos: no stop before it */
    sampling_params sm = se;
    sm.min_tokens = first + 2;
    submit_prompt(e, c, sl, 3, 0, &sm);
    /* max_tokens 1 */
    sampling_params s1 = greedy(1);
    submit_prompt(e, c, sl, 4, 0, &s1);
    collector_wait(c, 5);
    CHECK_EQ_INT(c->res[0].finish, FINISH_STOP);
    CHECK_EQ_INT(c->res[0].stop_token, t3);
    CHECK_EQ_INT(c->res[0].n, first + 1); /* the stop token is part of the output */
    CHECK_EQ_INT(c->res[1].finish, FINISH_STOP);
    CHECK_EQ_INT(c->res[1].n, first + 1);
    CHECK_EQ_INT(c->res[2].finish, FINISH_LENGTH);
    CHECK_EQ_INT(c->res[2].n, 24);
    CHECK(c->res[3].n >= first + 2);
    for (int i = 0; i < c->res[3].n - 1 && i < first + 1; i++) CHECK(c->res[3].tokens[i] != t3);
    CHECK_EQ_INT(c->res[4].n, 1);
    CHECK_EQ_INT(c->res[4].finish, FINISH_LENGTH);
    CHECK_EQ_INT(c->res[4].tokens[0], ref->tokens[0]);
    check_empty(e);
    engine_free(e);
    g_model->cfg.eos_token_ids[0] = saved_eos;
    collector_free(c);
}

/* A seeded sampled request gets the same tokens alone or amid others; logprobs come. */
static void test_seeded_in_batch(void) {
    engine *e = make_engine(0, 8, 64);
    REQUIRE(e);
    engine_start(e);
    static slot sl[NREQ];
    sampling_params sp;
    sampling_params_default(&sp);
    sp.temperature = 1.0f;
    sp.top_p = 0.95f;
    sp.top_k = 5; /* the draw among a few tokens: batched matmuls' last bits (M rows vs 1)
                   * must not flip it, which over a near-flat vocabulary they might */
    sp.seed = 42;
    sp.has_seed = true;
    sp.max_tokens = 20;
    sp.ignore_eos = true;
    sp.logprobs = 2;
    collector *a = collector_new();
    submit(e, a, sl, 5, &sp);
    collector_wait(a, 1);
    collector *b = collector_new();
    sampling_params other = sp;
    other.seed = 7;
    for (int i = 0; i < 8; i++) submit(e, b, sl, i, i == 5 ? &sp : &other);
    collector_wait(b, 8);
    CHECK_EQ_INT(a->res[5].n, 20);
    CHECK(memcmp(a->res[5].tokens, b->res[5].tokens, sizeof(int32_t) * 20) == 0);
    for (int i = 0; i < 20; i++) {
        CHECK(a->res[5].logprobs[i] <= 0);
        CHECK_EQ_INT(a->res[5].n_top[i], 2);
    }
    engine_free(e);
    collector_free(a);
    collector_free(b);
}

static void test_validation(void) {
    engine_config cfg;
    engine_config_default(&cfg);
    cfg.max_model_len = 128;
    cfg.max_waiting_requests = 3;
    char err[512];
    engine *e = engine_create(g_model, &cfg, err, sizeof err);
    REQUIRE(e);
    CHECK_EQ_INT(engine_max_model_len(e), 128);
    CHECK_EQ_INT(engine_model_config(e)->vocab_size, g_model->cfg.vocab_size);
    static slot sl[NREQ];
    collector *c = collector_new();
    sl[0].c = c;
    sampling_params sp = greedy(10);
    int32_t p[200] = {5};
    engine_request q = {.prompt = p, .n_prompt = 0, .sp = sp, .on_event = on_event, .user = &sl[0]};
    CHECK(engine_submit(e, &q, err, sizeof err) == 0);
    CHECK_STR_CONTAINS(err, "empty");
    q.n_prompt = 120;
    q.sp.max_tokens = 20;
    CHECK(engine_submit(e, &q, err, sizeof err) == 0);
    CHECK_STR_CONTAINS(err, "This model's maximum context length is 128 tokens. However, you "
                            "requested 140 tokens (120 in the messages, 20 in the completion).");
    q.n_prompt = 10;
    p[3] = g_model->cfg.vocab_size;
    CHECK(engine_submit(e, &q, err, sizeof err) == 0);
    CHECK_STR_CONTAINS(err, "out of vocabulary");
    p[3] = 1;
    q.sp.temperature = -1;
    CHECK(engine_submit(e, &q, err, sizeof err) == 0);
    q.sp.temperature = 0;
    /* not started: the queue fills up */
    for (int i = 0; i < 3; i++) CHECK(engine_submit(e, &q, err, sizeof err) > 0);
    CHECK(engine_submit(e, &q, err, sizeof err) == 0);
    CHECK_STR_CONTAINS(err, "Too many requests waiting");
    engine_stats st;
    engine_get_stats(e, &st);
    CHECK_EQ_INT(st.waiting, 3);
    engine_start(e);
    collector_wait(c, 3);
    /* max_tokens 0: up to max_model_len */
    q.sp.max_tokens = 0;
    q.n_prompt = 100;
    CHECK(engine_submit(e, &q, err, sizeof err) > 0);
    collector_wait(c, 4);
    CHECK_EQ_INT(c->res[0].n_output, 28);
    engine_free(e);
    collector_free(c);
    /* an explicit max_model_len the pool cannot hold is refused */
    size_t bpt = model_kv_bytes_per_token(&g_model->cfg, dtype_size(g_be->ops->kv_type));
    cfg.kv_cache_memory = bpt * 64;
    CHECK(engine_create(g_model, &cfg, err, sizeof err) == NULL);
    CHECK_STR_CONTAINS(err, "larger than the maximum number of tokens");
}
/* A disaggregated request whose KV arrived corrupt: the decode side recomputes prompt +
 * first token (engine_submit_prefilled with no blocks) and its output equals the
 * colocated run's, the given first token as output 0; max_tokens 1 ends at once. */
static void test_prefilled_recompute(void) {
    engine *e = make_engine(0, 8, 64);
    REQUIRE(e);
    engine_start(e);
    collector *c = collector_new();
    static slot sl[NREQ];
    int n_req = 4;
    for (int i = 0; i < n_req; i++) {
        sl[i].c = c;
        sl[i].i = i;
        int mt = i == n_req - 1 ? 1 : 24; /* g_ref ran 24 tokens */
        sampling_params sp = greedy(mt);
        engine_request q = {.prompt = g_prompts[i], .n_prompt = g_prompt_len[i], .sp = sp,
                            .on_event = on_event, .user = &sl[i]};
        engine_first_token first = {.token = g_ref->res[i].tokens[0]};
        char err[512];
        c->res[i].id = engine_submit_prefilled(e, &q, NULL, 0, &first, err, sizeof err);
        CHECKF(c->res[i].id != 0, "%s", err);
    }
    collector_wait(c, n_req);
    for (int i = 0; i < n_req; i++) {
        const result *r = &c->res[i];
        int want = i == n_req - 1 ? 1 : 24;
        CHECK_EQ_INT(r->n, want);
        CHECK(r->index_ok);
        CHECK(r->finish == FINISH_LENGTH);
        CHECKF(memcmp(r->tokens, g_ref->res[i].tokens, sizeof(int32_t) * (size_t)want) == 0,
               "request %d: recomputed output differs from the colocated one", i);
    }
    collector_free(c);
    check_empty(e);
    engine_stop(e);
    engine_free(e);
}

/* The step trace: a header, then one line per step (as many as the engine's steps),
 * whose rows add up to the engine's batched tokens, whose chunks add up to its prefill
 * rows and whose times nest (sched + forward + sample = busy); "%p" becomes the pid. A
 * path that cannot be opened fails engine_create with the file named. */
static void test_step_trace(void) {
    char pat[256], path[256], err[512];
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(pat, sizeof pat, "%s/pd-trace-%%p.txt", tmp);
    snprintf(path, sizeof path, "%s/pd-trace-%d.txt", tmp, (int)getpid());
    engine_config cfg;
    engine_config_default(&cfg);
    cfg.kv_cache_memory = (size_t)64 << 20;
    cfg.max_num_seqs = 4;
    cfg.max_num_batched_tokens = 64; /* several prompts are chunked */
    cfg.max_model_len = 128;
    cfg.step_trace = pat;
    engine *e = engine_create(g_model, &cfg, err, sizeof err);
    REQUIRE(e);
    engine_start(e);
    collector *c = run_all(e, true, 6);
    engine_stop(e); /* the last step's counters land after its events */
    engine_stats st;
    engine_get_stats(e, &st);
    engine_free(e);
    collector_free(c);
    FILE *f = fopen(path, "r");
    REQUIRE(f);
    char line[4096];
    int n_lines = 0, n_header = 0;
    long long rows = 0, prompt_rows = 0;
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#') {
            n_header++;
            continue;
        }
        double t, busy, sched, fwd, smp;
        int T, pre, dec, logits, running, waiting, used, off = 0;
        long long ctx;
        char chunks[2048];
        int k = sscanf(line, "%lf %lf %lf %lf %lf %d %d %d %lld %d %d %d %d %2047s%n", &t, &busy, &sched, &fwd, &smp,
                       &T, &pre, &dec, &ctx, &logits, &running, &waiting, &used, chunks, &off);
        CHECKF(k == 14, "line %d: %d fields: %s", n_lines, k, line);
        if (k != 14) break;
        CHECK(t > 0 && busy > 0 && fwd > 0 && sched >= 0 && smp >= 0 && fabs(sched + fwd + smp - busy) < 1e-5);
        CHECKF(T == pre + dec && logits >= 0 && logits <= T && used >= 0 && running >= 0 && waiting >= 0, "line %d: %s", n_lines, line);
        CHECK(dec == 0 || ctx >= dec);
        int sum = 0;
        if (strcmp(chunks, "-") != 0)
            for (char *tok = strtok(chunks, ","); tok; tok = strtok(NULL, ",")) {
                int n, at;
                CHECK(sscanf(tok, "%d@%d", &n, &at) == 2 && n > 0 && at >= 0 && at + n <= 128);
                sum += n;
            }
        CHECKF(sum == pre, "chunks %d rows, prefill %d", sum, pre);
        rows += T;
        prompt_rows += pre;
        n_lines++;
    }
    fclose(f);
    CHECK_EQ_INT(n_header, 2);
    CHECKF(n_lines == (int)st.steps, "%d lines, %llu steps", n_lines, (unsigned long long)st.steps);
    CHECK(rows == (long long)st.batched_tokens);
    long long prompts = 0;
    for (int i = 0; i < NREQ; i++) prompts += g_prompt_len[i];
    CHECKF(prompt_rows == prompts, "%lld prefill rows for %lld prompt tokens", prompt_rows, prompts);
    unlink(path);
    /* a directory that is not there */
    snprintf(pat, sizeof pat, "%s/pd-no-such-dir-%d/trace.txt", tmp, (int)getpid());
    cfg.step_trace = pat;
    CHECK(engine_create(g_model, &cfg, err, sizeof err) == NULL);
    CHECK_STR_CONTAINS(err, "pd-no-such-dir");
}

int main(void) {
    if (setup() != 0) return 1;
    TEST_RUN(test_step_trace);
    TEST_RUN(test_batch_invariance);
    TEST_RUN(test_preemption_identical);
    TEST_RUN(test_abort);
    TEST_RUN(test_stops);
    TEST_RUN(test_seeded_in_batch);
    TEST_RUN(test_validation);
    TEST_RUN(test_prefilled_recompute);
    /* again with each step's events held back and written during the next step's pass
     * (what an asynchronous backend does; engine.c, fwd_ctx_set_wait_hook) */
    setenv("PDSERVE_DEFER_EVENTS", "1", 1);
    TEST_RUN(test_batch_invariance);
    TEST_RUN(test_preemption_identical);
    TEST_RUN(test_abort);
    TEST_RUN(test_stops);
    TEST_RUN(test_seeded_in_batch);
    TEST_RUN(test_prefilled_recompute);
    unsetenv("PDSERVE_DEFER_EVENTS");
    collector_free(g_ref);
    model_free(g_model);
    backend_destroy(g_be);
    return TEST_END();
}
