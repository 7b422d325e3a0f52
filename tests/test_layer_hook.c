/* test_layer_hook.c: the per-layer hook of the forward pass and the engine's
 * layer-wise KV streaming hooks (engine_kv_stream), on a dummy 6-layer tiny Llama on
 * the CPU backend:
 *   - fwd_ctx_set_layer_hook fires once per layer, in order, right after the layer's
 *     K/V is final (its cache bytes then equal those after the pass) and before the
 *     next layer's is written; the pass's logits are the same with and without it;
 *     cleared, it never fires (decode steps);
 *   - the engine calls on_begin once, in the step that computes a prefill_only
 *     request's last prompt chunk (a prompt chunked over 4 steps), with every block
 *     of the prompt (those the FINISHED event hands over), then on_layer 0..L-1 once
 *     each, before the request's TOKEN and FINISHED events; never in the earlier chunk
 *     steps nor in decode-only steps of other requests; a declined on_begin gets no
 *     on_layer; two streams in one step get each layer in layer order; the first token
 *     is the one of an unstreamed run; engine_kv_layer_wait returns on the CPU. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "test.h"
#include "util/util.h"

#define L_TEST 6
#define MAXCALLS 256

static model *g_model;
static backend *g_be;

static int setup(void) {
    model_files mf;
    char err[512];
    if (model_files_open("preset:tiny-llama", "dummy", &mf, err, sizeof err) != 0) {
        fprintf(stderr, "model_files_open: %s\n", err);
        return -1;
    }
    mf.config.n_layers = L_TEST; /* dummy weights: any depth */
    g_be = backend_cpu_create(2);
    g_model = model_load(g_be, &mf, 77, err, sizeof err);
    model_files_close(&mf);
    if (!g_model) fprintf(stderr, "model_load: %s\n", err);
    return g_model ? 0 : -1;
}

static void prompt_ids(int32_t *ids, int n, int seed) {
    for (int i = 0; i < n; i++) ids[i] = 3 + (int32_t)((i * 131 + seed * 17) % 400);
}

/* ---- the forward pass's hook ------------------------------------------------------- */

typedef struct fwd_rec {
    const kv_cache *kv;
    const int32_t *blocks;
    int n_blocks;
    int layers[MAXCALLS];
    uint64_t sum_at_hook[L_TEST];   /* checksum of layer l's blocks when hook(l) ran */
    bool next_untouched[L_TEST];    /* layer l+1's blocks still all zero then */
    int n;
} fwd_rec;

static uint64_t layer_sum(const kv_cache *kv, int l, const int32_t *blocks, int n) {
    uint64_t h = 0;
    for (int i = 0; i < n; i++) {
        h = hash_bytes((uint8_t *)kv->k[l] + (size_t)blocks[i] * kv->block_bytes, kv->block_bytes, h);
        h = hash_bytes((uint8_t *)kv->v[l] + (size_t)blocks[i] * kv->block_bytes, kv->block_bytes, h);
    }
    return h;
}

static bool layer_zero(const kv_cache *kv, int l, const int32_t *blocks, int n) {
    for (int i = 0; i < n; i++) {
        const uint8_t *k = (uint8_t *)kv->k[l] + (size_t)blocks[i] * kv->block_bytes;
        const uint8_t *v = (uint8_t *)kv->v[l] + (size_t)blocks[i] * kv->block_bytes;
        for (size_t j = 0; j < kv->block_bytes; j++)
            if (k[j] || v[j]) return false;
    }
    return true;
}

static void fwd_hook(void *user, int layer) {
    fwd_rec *r = user;
    if (r->n < MAXCALLS) r->layers[r->n] = layer;
    r->n++;
    if (layer >= 0 && layer < L_TEST) {
        r->sum_at_hook[layer] = layer_sum(r->kv, layer, r->blocks, r->n_blocks);
        r->next_untouched[layer] =
            layer + 1 == L_TEST || layer_zero(r->kv, layer + 1, r->blocks, r->n_blocks);
    }
}

/* One prefill step of n tokens into blocks (and a decode step after it when asked). */
static void run_prefill(fwd_ctx *f, kv_cache *kv, const int32_t *ids, int n, const int32_t *blocks,
                        float *logits) {
    int bs = kv->block_size, row = n - 1;
    int32_t pos[64], slots[64];
    for (int i = 0; i < n; i++) {
        pos[i] = i;
        slots[i] = blocks[i / bs] * bs + i % bs;
    }
    attn_seq s = {0, n, n, blocks, (n + bs - 1) / bs};
    fwd_batch b = {n, 1, ids, pos, slots, &s, &row, 1};
    model_forward(f, kv, &b, logits);
}

static void test_forward_hook(void) {
    char err[256];
    const model_config *c = &g_model->cfg;
    REQUIRE(c->n_layers == L_TEST);
    size_t bytes = model_kv_bytes_per_token(c, 4) * 16 * 8;
    kv_cache *kv = kv_cache_create(g_be, c, 16, bytes, err, sizeof err);
    kv_cache *kv2 = kv_cache_create(g_be, c, 16, bytes, err, sizeof err);
    REQUIRE(kv && kv2);
    fwd_ctx *f = fwd_ctx_create(g_model, 64, 4);
    int32_t ids[40], blocks[3] = {5, 2, 7};
    prompt_ids(ids, 40, 1);
    float *lg1 = xmalloc(sizeof(float) * (size_t)c->vocab_size);
    float *lg2 = xmalloc(sizeof(float) * (size_t)c->vocab_size);

    fwd_rec rec = {.kv = kv, .blocks = blocks, .n_blocks = 3};
    fwd_ctx_set_layer_hook(f, fwd_hook, &rec);
    run_prefill(f, kv, ids, 40, blocks, lg1);
    CHECK_EQ_INT(rec.n, L_TEST);
    for (int l = 0; l < L_TEST && l < rec.n; l++) {
        CHECK_EQ_INT(rec.layers[l], l);
        CHECKF(rec.sum_at_hook[l] == layer_sum(kv, l, blocks, 3), "layer %d not final at its hook", l);
        CHECKF(rec.next_untouched[l], "layer %d's hook came after layer %d was written", l, l + 1);
    }

    /* cleared: a decode step (one row) and a prefill run without any call */
    fwd_ctx_set_layer_hook(f, NULL, NULL);
    int32_t tok = 9, pos = 40, slot = blocks[2] * 16 + 8, row = 0;
    attn_seq s = {0, 1, 41, blocks, 3};
    fwd_batch dec = {1, 1, &tok, &pos, &slot, &s, &row, 1};
    model_forward(f, kv, &dec, lg1);
    CHECK_EQ_INT(rec.n, L_TEST);

    /* the same prompt without the hook, into another cache: same logits and KV */
    run_prefill(f, kv2, ids, 40, blocks, lg2);
    fwd_ctx_set_layer_hook(f, fwd_hook, &rec);
    rec.kv = kv;
    rec.n = 0;
    for (int l = 0; l < L_TEST; l++) { /* as new: the decode step wrote a row */
        memset(kv->k[l], 0, (size_t)kv->num_blocks * kv->block_bytes);
        memset(kv->v[l], 0, (size_t)kv->num_blocks * kv->block_bytes);
    }
    run_prefill(f, kv, ids, 40, blocks, lg1);
    fwd_ctx_set_layer_hook(f, NULL, NULL);
    CHECK_EQ_INT(rec.n, L_TEST);
    for (int l = 0; l < L_TEST; l++) CHECK(rec.next_untouched[l]);
    CHECK(memcmp(lg1, lg2, sizeof(float) * (size_t)c->vocab_size) == 0);
    for (int l = 0; l < L_TEST; l++) CHECK(layer_sum(kv, l, blocks, 3) == layer_sum(kv2, l, blocks, 3));

    free(lg1);
    free(lg2);
    fwd_ctx_free(f);
    kv_cache_free(g_be, kv);
    kv_cache_free(g_be, kv2);
}

/* ---- the engine's streaming hooks ----------------------------------------------------- */

typedef struct stream_rec {
    pthread_mutex_t *mu;
    pthread_cond_t *cv;
    int *order;                 /* shared log of (request tag * 100 + layer) calls */
    int *n_order;
    int tag;
    bool accept;
    int n_begin, n_layer;
    int layers[MAXCALLS];
    int32_t begin_blocks[64];
    int n_begin_blocks;
    bool event_before_layers_done; /* a TOKEN or FINISHED came before all L layers */
    int32_t token;
    int n_tokens;
    int32_t kv_blocks[64];
    int n_kv_blocks;
    finish_reason finish;
    bool done;
} stream_rec;

static bool on_begin(void *user, const int32_t *blocks, int n) {
    stream_rec *r = user;
    pthread_mutex_lock(r->mu);
    r->n_begin++;
    r->n_begin_blocks = PD_MIN(n, 64);
    memcpy(r->begin_blocks, blocks, sizeof(int32_t) * (size_t)r->n_begin_blocks);
    pthread_mutex_unlock(r->mu);
    return r->accept;
}

static void on_layer(void *user, int layer) {
    stream_rec *r = user;
    pthread_mutex_lock(r->mu);
    if (r->n_layer < MAXCALLS) r->layers[r->n_layer] = layer;
    r->n_layer++;
    if (*r->n_order < MAXCALLS) r->order[(*r->n_order)++] = r->tag * 100 + layer;
    pthread_mutex_unlock(r->mu);
}

static const engine_kv_stream HOOKS = {on_begin, on_layer};

static void on_event(void *user, const engine_event *ev) {
    stream_rec *r = user;
    pthread_mutex_lock(r->mu);
    if (r->accept && r->n_layer < L_TEST) r->event_before_layers_done = true;
    if (ev->kind == ENGINE_EVENT_TOKEN) {
        if (ev->index == 0) r->token = ev->token;
        r->n_tokens++;
    } else {
        r->finish = ev->finish;
        r->n_kv_blocks = PD_MIN(ev->n_kv_blocks, 64);
        if (ev->kv_blocks) memcpy(r->kv_blocks, ev->kv_blocks, sizeof(int32_t) * (size_t)r->n_kv_blocks);
        r->done = true;
        pthread_cond_broadcast(r->cv);
    }
    pthread_mutex_unlock(r->mu);
}

static engine *make_engine(int budget) {
    engine_config cfg;
    engine_config_default(&cfg);
    cfg.kv_cache_memory = model_kv_bytes_per_token(&g_model->cfg, 4) * 16 * 64;
    cfg.max_num_seqs = 8;
    cfg.max_num_batched_tokens = budget;
    cfg.max_model_len = 256;
    char err[512];
    engine *e = engine_create(g_model, &cfg, err, sizeof err);
    if (!e) fprintf(stderr, "engine_create: %s\n", err);
    return e;
}

static uint64_t submit(engine *e, stream_rec *r, const int32_t *ids, int n, bool prefill_only,
                       bool hooks, int max_tokens) {
    engine_request q = {.prompt = ids, .n_prompt = n, .on_event = on_event, .user = r,
                        .prefill_only = prefill_only, .kv_stream = hooks ? &HOOKS : NULL};
    sampling_params_default(&q.sp);
    q.sp.temperature = 0;
    q.sp.max_tokens = max_tokens;
    q.sp.ignore_eos = true;
    char err[256];
    uint64_t id = engine_submit(e, &q, err, sizeof err);
    if (!id) fprintf(stderr, "submit: %s\n", err);
    return id;
}

static void wait_done(stream_rec *r) {
    pthread_mutex_lock(r->mu);
    while (!r->done) pthread_cond_wait(r->cv, r->mu);
    pthread_mutex_unlock(r->mu);
}

static void *waiter_main(void *arg) {
    engine *e = arg;
    for (int l = 0; l < L_TEST; l++) engine_kv_layer_wait(e, l);
    return NULL;
}

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static int g_order[MAXCALLS], g_n_order;

static stream_rec new_rec(int tag, bool accept) {
    return (stream_rec){.mu = &g_mu, .cv = &g_cv, .order = g_order, .n_order = &g_n_order,
                        .tag = tag, .accept = accept};
}

/* A 50-token prompt over 4 steps of 16 tokens, beside a request that is decoding. */
static void test_engine_chunked_stream(void) {
    engine *e = make_engine(16);
    REQUIRE(e);
    engine_start(e);
    int32_t pa[50], pb[10];
    prompt_ids(pa, 50, 2);
    prompt_ids(pb, 10, 3);
    g_n_order = 0;
    stream_rec b = new_rec(2, true), a = new_rec(1, true);
    /* b: a plain request (hooks are ignored unless prefill_only) decoding 40 tokens */
    REQUIRE(submit(e, &b, pb, 10, false, true, 40));
    REQUIRE(submit(e, &a, pa, 50, true, true, 8));
    wait_done(&a);
    wait_done(&b);
    engine_stats st;
    engine_get_stats(e, &st);
    /* a's prompt took 4 steps; b decoded 40 tokens, mostly in decode-only steps */
    CHECKF(st.steps >= 30, "only %llu steps", (unsigned long long)st.steps);
    CHECK_EQ_INT(b.n_tokens, 40);
    CHECK_EQ_INT(a.n_begin, 1);
    CHECK_EQ_INT(a.n_begin_blocks, 4);   /* ceil(50 / 16): the earlier chunks' blocks too */
    CHECK_EQ_INT(a.n_layer, L_TEST);     /* not once per chunk step */
    for (int l = 0; l < L_TEST && l < a.n_layer; l++) CHECK_EQ_INT(a.layers[l], l);
    CHECK(!a.event_before_layers_done);
    CHECK_EQ_INT(a.finish, FINISH_LENGTH);
    CHECK_EQ_INT(a.n_kv_blocks, 4);
    CHECK(memcmp(a.kv_blocks, a.begin_blocks, sizeof(int32_t) * 4) == 0);
    CHECK_EQ_INT(b.n_begin, 0);          /* not prefill_only: no streaming */
    CHECK_EQ_INT(b.n_layer, 0);
    CHECK_EQ_INT(g_n_order, L_TEST);     /* nothing in decode-only steps */
    pthread_t w; /* the transfer thread's wait: at once on the CPU */
    REQUIRE(pthread_create(&w, NULL, waiter_main, e) == 0);
    pthread_join(w, NULL);
    engine_kv_release(e, a.kv_blocks, a.n_kv_blocks);
    engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);

    /* the same prompt unstreamed, and with on_begin declining: same first token */
    stream_rec c = new_rec(3, false), d = new_rec(4, true);
    REQUIRE(submit(e, &c, pa, 50, true, true, 8));
    wait_done(&c);
    REQUIRE(submit(e, &d, pa, 50, true, false, 8));
    wait_done(&d);
    CHECK_EQ_INT(c.n_begin, 1);
    CHECK_EQ_INT(c.n_layer, 0);
    CHECK_EQ_INT(d.n_begin, 0);
    CHECK_EQ_INT(c.token, a.token);
    CHECK_EQ_INT(d.token, a.token);
    engine_kv_release(e, c.kv_blocks, c.n_kv_blocks);
    engine_kv_release(e, d.kv_blocks, d.n_kv_blocks);
    engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    engine_stop(e);
    engine_free(e);
}

/* Two streamed prompts in one step: every layer reaches both before the next layer. */
static void test_engine_two_streams(void) {
    engine *e = make_engine(256);
    REQUIRE(e);
    int32_t p1[30], p2[45];
    prompt_ids(p1, 30, 4);
    prompt_ids(p2, 45, 5);
    g_n_order = 0;
    stream_rec a = new_rec(1, true), b = new_rec(2, true);
    /* submitted before the thread starts: both are admitted into the same first step */
    REQUIRE(submit(e, &a, p1, 30, true, true, 4));
    REQUIRE(submit(e, &b, p2, 45, true, true, 4));
    engine_start(e);
    wait_done(&a);
    wait_done(&b);
    CHECK_EQ_INT(a.n_layer, L_TEST);
    CHECK_EQ_INT(b.n_layer, L_TEST);
    CHECK_EQ_INT(g_n_order, 2 * L_TEST);
    for (int i = 1; i < g_n_order; i++)
        CHECKF(g_order[i] % 100 >= g_order[i - 1] % 100, "call %d: layer %d after layer %d", i,
               g_order[i] % 100, g_order[i - 1] % 100);
    CHECK_EQ_INT(a.n_begin_blocks, 2);
    CHECK_EQ_INT(b.n_begin_blocks, 3);
    engine_kv_release(e, a.kv_blocks, a.n_kv_blocks);
    engine_kv_release(e, b.kv_blocks, b.n_kv_blocks);
    engine_stats st;
    engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    engine_stop(e);
    engine_free(e);
}

int main(void) {
    if (setup() != 0) return 1;
    TEST_RUN(test_forward_hook);
    TEST_RUN(test_engine_chunked_stream);
    TEST_RUN(test_engine_two_streams);
    model_free(g_model);
    backend_destroy(g_be);
    return TEST_END();
}
