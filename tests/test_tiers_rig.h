/* test_tiers_rig.h: an engine with prefix caching and KV tiers behind it, for the
 * engine-level tier tests (tests/test_kv_tiers.c, tests/test_kv_offload_async.c): the
 * engine and its tiers made and freed together, greedy requests submitted to it, and
 * prompts on two shared stems, so that the tiers have blocks to keep and give back, and
 * a collector of what each request gave (tokens, cached tokens, times). */
#ifndef PD_TEST_TIERS_RIG_H
#define PD_TEST_TIERS_RIG_H

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "test_waiter.h"
#include "kv/kv.h"
#include "model/model.h"
#include "test.h"
#include "util/util.h"

typedef struct tiers_rig {
    engine *e;   /* owned */
    kv_tiers *t; /* owned; NULL: no tiers */
} tiers_rig;

typedef struct tiers_rig_opts {
    size_t kv_bytes;             /* the engine's kv_cache_memory (0: its default) */
    bool caching;                /* prefix caching */
    const char *list;            /* tiers as --kv-tiers names them; NULL: none */
    int cpu_images;              /* the cpu tier holds this many block images ... */
    size_t cpu_extra;            /* ... and these bytes more */
    int disk_images;             /* the disk tier: this many images with 64 pages of room each */
    const char *dir;             /* the disk tier's directory */
    kv_tiers_load_policy policy;
    double delay_ms;             /* debug_load_delay_ms */
    bool async;                  /* offload_async */
} tiers_rig_opts;

/* Makes and starts an engine of 4 sequences, 64-token steps and 128-token requests on
 * m, with tiers per o hooked into its prefix cache. 0, or -1 with the cause on stderr
 * (what was made so far is in g for tiers_rig_free only when e was made). */
static inline int tiers_rig_make(tiers_rig *g, model *m, const tiers_rig_opts *o) {
    engine_config cfg;
    engine_config_default(&cfg);
    cfg.kv_cache_memory = o->kv_bytes;
    cfg.max_num_seqs = 4;
    cfg.max_num_batched_tokens = 64;
    cfg.max_model_len = 128;
    cfg.enable_prefix_caching = o->caching;
    char err[512];
    g->t = NULL;
    g->e = engine_create(m, &cfg, err, sizeof err);
    if (!g->e) {
        fprintf(stderr, "engine_create: %s\n", err);
        return -1;
    }
    if (o->list) {
        kv_tiers_config tc;
        kv_tiers_config_default(&tc);
        if (kv_tiers_parse(o->list, &tc, err, sizeof err)) return -1;
        size_t img = kv_store_image_bytes(engine_kv_cache(g->e));
        tc.cpu_bytes = (size_t)o->cpu_images * img + o->cpu_extra;
        tc.disk_bytes = (size_t)o->disk_images * (img + 64 * 4096);
        snprintf(tc.disk_dir, sizeof tc.disk_dir, "%s", o->dir);
        tc.load_policy = o->policy;
        tc.debug_load_delay_ms = o->delay_ms;
        tc.offload_async = o->async;
        g->t = kv_tiers_create(&tc, engine_kv_cache(g->e), err, sizeof err);
        if (!g->t) {
            fprintf(stderr, "kv_tiers_create: %s\n", err);
            return -1;
        }
        prefix_cache_hooks h;
        kv_tiers_hooks(g->t, &h);
        if (engine_set_prefix_cache_hooks(g->e, &h) != 0) return -1;
    }
    engine_start(g->e);
    return 0;
}

static inline void tiers_rig_free(tiers_rig *g) {
    engine_stop(g->e);
    if (g->t) engine_set_prefix_cache_hooks(g->e, NULL);
    kv_tiers_free(g->t);
    engine_free(g->e);
}

/* Submits a greedy request of max_tokens (EOS ignored) for the n tokens of prompt;
 * its events go to on_event(user). A refusal is said on stderr. */
static inline void tiers_rig_submit(tiers_rig *g, const int32_t *prompt, int n, int max_tokens,
                                    engine_event_fn on_event, void *user) {
    sampling_params sp;
    sampling_params_default(&sp);
    sp.temperature = 0;
    sp.max_tokens = max_tokens;
    sp.ignore_eos = true;
    engine_request q = {.prompt = prompt, .n_prompt = n, .sp = sp, .on_event = on_event, .user = user};
    char err[512];
    if (!engine_submit(g->e, &q, err, sizeof err)) fprintf(stderr, "submit: %s\n", err);
}

/* np prompts of plen tokens (prompts[i * plen + j]) on two stems drawn from seed:
 * prompts 0, 3, 6, ... share the first stem's first 64 tokens, 1, 4, 7, ... the second
 * stem's first 48 (plen >= 64); the rest, and every token after the shared part, are
 * random ids from 3 to vocab - 1. */
static inline void tiers_rig_prompts(int32_t *prompts, int np, int plen, int vocab, uint64_t seed) {
    pd_rng r;
    rng_seed(&r, seed);
    int32_t *stem = xmalloc(sizeof(int32_t) * 2 * (size_t)plen);
    for (int i = 0; i < 2 * plen; i++) stem[i] = 3 + (int32_t)(rng_next(&r) % (uint64_t)(vocab - 3));
    for (int i = 0; i < np; i++) {
        int share = i % 3 == 0 ? 64 : i % 3 == 1 ? 48 : 0;
        for (int j = 0; j < plen; j++)
            prompts[(size_t)i * plen + j] =
                j < share ? stem[(i % 3) * plen + j] : 3 + (int32_t)(rng_next(&r) % (uint64_t)(vocab - 3));
    }
    free(stem);
}

/* ---- what the requests of a test gave: TIERS_RIG_NP requests of up to TIERS_RIG_MAXOUT
 * tokens each, filled by on_event (its user a slot: the collector and the request's
 * index) ------------------------------------------------------------------------------ */
enum { TIERS_RIG_NP = 12, TIERS_RIG_MAXOUT = 8 };

typedef struct result {
    int32_t tokens[TIERS_RIG_MAXOUT];
    int n, n_cached;
    finish_reason finish;
    double arrival, first_token;
} result;

typedef struct collector {
    test_waiter w;
    result res[TIERS_RIG_NP];
} collector;

typedef struct slot { collector *c; int i; } slot;

static inline void on_event(void *user, const engine_event *ev) {
    slot *s = user;
    result *r = &s->c->res[s->i];
    pthread_mutex_lock(&s->c->w.mu);
    if (ev->kind == ENGINE_EVENT_TOKEN) {
        if (r->n < TIERS_RIG_MAXOUT) r->tokens[r->n] = ev->token;
        r->n++;
    } else {
        r->finish = ev->finish;
        r->n_cached = ev->n_cached;
        r->arrival = ev->times->arrival;
        r->first_token = ev->times->first_token;
        test_waiter_done_locked(&s->c->w);
    }
    pthread_mutex_unlock(&s->c->w.mu);
}

static inline collector *collector_new(void) {
    collector *c = calloc(1, sizeof(*c));
    test_waiter_init(&c->w);
    return c;
}

static inline void collector_wait(collector *c, int n) { test_waiter_wait(&c->w, n); }

static inline void collector_free(collector *c) {
    test_waiter_destroy(&c->w);
    free(c);
}

/* The tier tests' common start: preset:tiny-llama (dummy weights, seed 1234) on be into
 * *m, and a fresh directory for tiers and stores in dir (cap bytes): under the build
 * directory when its path is short (a real disk: O_DIRECT), else $TMPDIR; `name` starts
 * its name. 0, or -1 with the reason on stderr. */
static inline int tiers_rig_setup(backend *be, model **m, char *dir, size_t cap, const char *name) {
    model_files mf;
    char err[512];
    if (model_files_open("preset:tiny-llama", "dummy", &mf, err, sizeof err) != 0) {
        fprintf(stderr, "model_files_open: %s\n", err);
        return -1;
    }
    *m = model_load(be, &mf, 1234, err, sizeof err);
    model_files_close(&mf);
    if (!*m) {
        fprintf(stderr, "model_load: %s\n", err);
        return -1;
    }
    const char *tmp = getenv("TMPDIR");
    int n = snprintf(dir, cap, "%s/%s-XXXXXX", test_build_dir(), name);
    if (n < 0 || (size_t)n >= cap) snprintf(dir, cap, "%s/%s-XXXXXX", tmp && strlen(tmp) < 64 ? tmp : "/tmp", name);
    if (!mkdtemp(dir)) {
        fprintf(stderr, "cannot make %s: %s\n", dir, strerror(errno));
        return -1;
    }
    return 0;
}

#endif
