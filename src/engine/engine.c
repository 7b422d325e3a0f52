/* engine.c: one instance's serving loop (what vLLM V1's engine core does): a single
 * engine thread takes submissions and aborts from a mutex-protected inbox, plans a
 * step with the pure scheduler, runs model_forward on the plan, samples on the CPU
 * (or, where the backend can and the requests allow, on the device: only token ids
 * come back; model_forward_greedy / model_forward_sample),
 * appends tokens and emits TOKEN / FINISHED events. Sleeps on a condition variable
 * when there is nothing to do.
 *
 * Tuned for steady serving: everything per step is preallocated (plan arrays in the
 * scheduler, logits [max_num_seqs, V], sampler scratch); a request allocates its own
 * record, token buffer and timestamp array once, at submission. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "util/util.h"

/* A token event of the last step, and the request's end if it ended there. */
typedef struct emit_item {
    struct req *r;
    int li;                 /* logit index: e->step_tokens / e->results */
    int index;              /* output index */
    bool finish;
    finish_reason why;
    int32_t stop_token;
    int n_cached;
    int32_t *held;          /* a prefill-only end's blocks, handed over (owned) */
    int n_held;
} emit_item;

typedef struct req {
    uint64_t id;
    sampling_params sp;
    engine_event_fn on_event;
    void *user;
    int32_t *prompt;        /* [n_prompt] until admitted into the scheduler, then NULL */
    int n_prompt;
    int max_tokens;         /* resolved (>= 1) */
    pd_rng rng;
    request_times times;    /* token_times [max_tokens] owned */
    sched_seq *seq;         /* once admitted */
    int n_output;
    /* disaggregated serving */
    bool prefill_only;      /* finish after the first token; the prompt's blocks are handed over */
    bool prefilled;         /* engine_submit_prefilled: prompt KV in pre_blocks, first token given */
    bool recompute;         /* ... but its KV never came (corrupt): prompt + first token are
                               prefilled here, output 0 is the given first token */
    int32_t *pre_blocks;    /* [n_pre_blocks] until it joins the running batch (owned ids) */
    int n_pre_blocks;
    engine_first_token first;
    uint64_t cache_salt;    /* the request's prefix cache salt (0: none) */
    const engine_kv_stream *kv_stream; /* prefill_only: layer-wise KV hooks (not owned) */
} req;

struct engine {
    FILE *trace;            /* cfg.step_trace's file, or NULL */
    double trace_flushed;   /* when it was last flushed */
    model *m;               /* not owned */
    backend *be;            /* not owned (the model's) */
    engine_config cfg;
    int max_model_len;
    kv_cache *kv;           /* owned */
    fwd_ctx *fwd;           /* owned */
    sched sc;               /* engine thread only; its pool also under pool_mu */
    pthread_mutex_t pool_mu;/* the block pool: the engine thread's steps and finishes vs
                             * engine_kv_alloc / engine_kv_release from other threads.
                             * Lock order: pool_mu, then mu. */
    int n_external;         /* blocks held outside the scheduler (under pool_mu) */
    req **pending;          /* prefilled requests waiting for a seat in the running batch */
    int n_pending, cap_pending; /* (engine thread only) */
    sampler *smp;           /* engine thread only */
    float *logits;          /* [max_num_seqs, V] */
    int32_t *step_tokens;   /* [max_num_seqs] */
    sample_row *dev_rows;   /* [max_num_seqs]: rows for sampling on the device */
    float *dev_logprobs;    /* [max_num_seqs] */
    sample_result *results; /* [max_num_seqs] */
    req **streams;          /* [max_num_seqs] requests whose KV the running step streams */
    /* Token events of the last step not yet emitted (engine thread only): on an
     * asynchronous backend they are emitted while the next step runs on the device
     * (fwd_ctx_set_wait_hook), so that writing to clients overlaps the GPU; a request
     * that finished is already out of the scheduler, its FINISHED event and its free
     * wait here too. e->step_tokens and e->results keep the step's values until the
     * next pass returns. */
    struct emit_item *emits; /* [max_num_seqs] */
    int n_emits;
    bool defer_events;      /* asynchronous backend, unless PDSERVE_DEFER_EVENTS=0 */
    int n_streams;          /* (engine thread only) */
    pd_rng seed_rng;        /* seeds for requests without one (under mu) */

    pthread_t thread;
    bool started, stopping;
    bool reset_prefix_cache; /* engine_reset_prefix_cache asked; done before the next step */
    pthread_mutex_t mu;     /* guards everything below */
    pthread_cond_t cv;
    /* Double buffers: submitters fill inbox / aborts; the engine thread swaps them with
     * the *_work ones and reads those outside the lock (only the live ones grow). */
    req **inbox, **inbox_work;
    int n_inbox, inbox_cap, inbox_work_cap;
    uint64_t *aborts, *aborts_work;
    int n_aborts, aborts_cap, aborts_work_cap;
    uint64_t next_id;
    int sched_waiting;      /* mirror of sc.n_waiting for submit's queue check */
    engine_stats stats;
    prefix_cache_hooks tier_hooks; /* lower tiers (engine_set_prefix_cache_hooks); set while
                                    * the engine thread is stopped, read by any thread */
    cost_fit prefill_fit;   /* forward seconds = a + b * rows over steps that prefilled: b is
                             * the lower tiers' recompute estimate (engine thread only) */
};


/* ---- small things ------------------------------------------------------------------ */

void engine_config_default(engine_config *c) {
    memset(c, 0, sizeof(*c));
    c->block_size = 16;
    c->gpu_memory_utilization = 0.9;
    c->max_num_seqs = 256;
    c->max_num_batched_tokens = 2048;
    c->enable_chunked_prefill = true;
}

const char *finish_reason_name(finish_reason r) {
    switch (r) {
    case FINISH_LENGTH: return "length";
    case FINISH_STOP: return "stop";
    case FINISH_ABORT: return "abort";
    case FINISH_ERROR: return "error";
    default: return "none";
    }
}

const model_config *engine_model_config(const engine *e) { return &e->m->cfg; }
int engine_max_model_len(const engine *e) { return e->max_model_len; }

static void req_free(req *r) {
    if (!r) return;
    free(r->prompt);
    free(r->times.token_times);
    free(r->pre_blocks);
    free(r);
}

/* ---- creation: sizing the KV pool ----------------------------------------------------- */

static bool backend_is_cpu(const backend *be) { return strcmp(be->ops->name, "cpu") == 0; }

/* Bytes for the KV cache when the user gave none. CPU: enough for max_num_seqs full
 * sequences, capped at a quarter of the memory still free. GPU: vLLM's rule, what
 * gpu_memory_utilization of the card leaves once weights and activations are in. */
static size_t kv_bytes_default(const engine *e, size_t bytes_per_token) {
    backend *be = e->be;
    size_t free_now = be->ops->mem_free ? be->ops->mem_free(be) : 0;
    if (backend_is_cpu(be)) {
        double want = (double)e->cfg.max_num_seqs * e->max_model_len * (double)bytes_per_token;
        double cap = free_now ? 0.25 * (double)free_now : 1024.0 * 1024 * 1024;
        return (size_t)PD_MIN(want, cap);
    }
    double total = (double)free_now + (double)e->m->weight_bytes + (double)fwd_ctx_bytes(e->fwd);
    double keep = (1.0 - e->cfg.gpu_memory_utilization) * total;
    double kv = (double)free_now - keep - 64.0 * 1024 * 1024; /* leave room for the logits & co */
    return kv > 0 ? (size_t)kv : 0;
}

static int engine_size_kv(engine *e, bool explicit_len, char *err, size_t errlen) {
    size_t bpt = model_kv_bytes_per_token(&e->m->cfg, dtype_size(e->be->ops->kv_type));
    size_t bytes = e->cfg.kv_cache_memory ? e->cfg.kv_cache_memory : kv_bytes_default(e, bpt);
    e->kv = e->cfg.kv_shm_name
                ? kv_cache_create_shared(e->be, &e->m->cfg, e->cfg.block_size, bytes,
                                         e->cfg.kv_shm_name, err, errlen)
                : kv_cache_create(e->be, &e->m->cfg, e->cfg.block_size, bytes, err, errlen);
    if (!e->kv) return -1;
    if (!backend_is_cpu(e->be)) {
        /* the start-up memory budget of a GPU instance, as vLLM logs it */
        const double G = 1024.0 * 1024 * 1024;
        size_t left = e->be->ops->mem_free(e->be);
        double w = (double)e->m->weight_bytes, a = (double)fwd_ctx_bytes(e->fwd);
        double k = (double)e->kv->total_bytes;
        log_info("engine: %s memory budget: weights %.2f GiB + activations %.2f GiB + KV cache "
                 "%.2f GiB = %.2f GiB; gpu_memory_utilization %.2f of %.2f GiB seen; %.2f GiB "
                 "left free", e->be->ops->name, w / G, a / G, k / G, (w + a + k) / G,
                 e->cfg.gpu_memory_utilization, (w + a + k + (double)left) / G, (double)left / G);
    }
    int cap_tokens = e->kv->num_blocks * e->cfg.block_size;
    log_info("engine: KV cache %.1f MiB%s: %d blocks of %d tokens = %d tokens (%zu bytes/token)",
             (double)e->kv->total_bytes / (1024.0 * 1024), e->cfg.kv_cache_memory ? "" : " (derived)",
             e->kv->num_blocks, e->cfg.block_size, cap_tokens, bpt);
    if (cap_tokens < e->max_model_len) {
        if (explicit_len) {
            pd_errorf(err, errlen,
                      "The model's max seq len (%d) is larger than the maximum number of tokens "
                      "that can be stored in KV cache (%d). Try increasing the KV cache memory or "
                      "decreasing max_model_len.",
                      e->max_model_len, cap_tokens);
            return -1;
        }
        log_warn("engine: max_model_len lowered from %d to %d, what the KV cache holds",
                 e->max_model_len, cap_tokens);
        e->max_model_len = cap_tokens;
    }
    return 0;
}

/* The prefix cache salt of a model when the driver gives none: its shape, so that two
 * models of different shapes never share a key (same-shape checkpoints need the
 * driver's salt, e.g. a hash of the weights' path and revision). */
static uint64_t model_cache_salt(const model_config *c) {
    int64_t f[] = {c->family, c->n_layers, c->dim, c->ffn_dim, c->n_heads, c->n_kv_heads,
                   c->head_dim, c->vocab_size, c->rope_type, c->tie_word_embeddings,
                   c->attention_bias, c->qk_norm, (int64_t)(c->rope_theta * 1000.0f),
                   (int64_t)(c->norm_eps * 1e9f)};
    uint64_t h = hash_bytes(c->architecture, strnlen(c->architecture, sizeof c->architecture), 0x70726566);
    return hash_bytes(f, sizeof f, h);
}

/* ---- step trace -------------------------------------------------------------------- */

/* Opens the step trace at path ("%p": this process's id, "%%": a "%") and writes its
 * header. 0, or -1 with err naming the file. */
static int trace_open(engine *e, const char *path, char *err, size_t errlen) {
    char name[1024];
    size_t n = 0;
    for (const char *c = path; *c && n + 24 < sizeof name; c++) {
        if (c[0] == '%' && c[1] == 'p') n += (size_t)snprintf(name + n, sizeof name - n, "%d", (int)getpid()), c++;
        else if (c[0] == '%' && c[1] == '%') name[n++] = '%', c++;
        else name[n++] = *c;
    }
    name[n] = 0;
    e->trace = fopen(name, "w");
    if (!e->trace) return pd_errorf(err, errlen, "step trace %s: %s", name, strerror(errno)), -1;
    fprintf(e->trace, "# pdserve step trace v1: one line per engine step; times in seconds, t on the host's "
                      "monotonic clock at the step's start\n"
                      "# t busy sched forward sample rows prefill_rows decode_rows decode_ctx_sum logits "
                      "running waiting kv_blocks_used (after the step) chunks(n@start,...|-)\n");
    e->trace_flushed = time_now_s();
    log_info("engine: step trace in %s", name);
    return 0;
}

/* One step's line: its times, its rows and the chunks that prefilled (so that a price
 * per step can be recomputed: sim_work_add_chunk). Flushed at most every second. */
static void trace_step(engine *e, const sched_plan *p, double t0, double t1, double t2, double t4) {
    int decode_rows = 0;
    long long ctx_sum = 0;
    for (int i = 0; i < p->n_items; i++)
        if (!p->items[i].prefill) decode_rows += p->items[i].n, ctx_sum += p->items[i].start + p->items[i].n;
    fprintf(e->trace, "%.6f %.6f %.6f %.6f %.6f %d %d %d %lld %d %d %d %d ", t0, t4 - t0, t1 - t0, t2 - t1,
            t4 - t2, p->batch.T, p->n_prefill_tokens, decode_rows, ctx_sum, p->n_logits, e->sc.n_running,
            e->sc.n_waiting, e->stats.kv_blocks_used);
    int chunks = 0;
    for (int i = 0; i < p->n_items; i++)
        if (p->items[i].prefill)
            fprintf(e->trace, "%s%d@%d", chunks++ ? "," : "", p->items[i].n, p->items[i].start);
    fputs(chunks ? "\n" : "-\n", e->trace);
    if (t4 - e->trace_flushed >= 1.0) {
        fflush(e->trace);
        e->trace_flushed = t4;
    }
}

engine *engine_create(model *m, const engine_config *cfg_in, char *err, size_t errlen) {
    engine_config cfg = *cfg_in;
    if (cfg.block_size <= 0) cfg.block_size = 16;
    if (cfg.max_num_seqs <= 0) cfg.max_num_seqs = 256;
    if (cfg.max_num_batched_tokens <= 0) cfg.max_num_batched_tokens = 2048;
    int max_pos = m->cfg.max_position_embeddings;
    if (cfg.max_model_len > max_pos) {
        pd_errorf(err, errlen, "max_model_len %d is larger than the model's max_position_embeddings %d",
                  cfg.max_model_len, max_pos);
        return NULL;
    }
    engine *e = xcalloc(1, sizeof(*e));
    e->m = m;
    e->be = m->be;
    e->max_model_len = cfg.max_model_len > 0 ? cfg.max_model_len : max_pos;
    if (!cfg.enable_chunked_prefill && cfg.max_num_batched_tokens < e->max_model_len) {
        /* vLLM's rule: without chunking a whole prompt must fit one step */
        cfg.max_num_batched_tokens = e->max_model_len;
    }
    e->cfg = cfg;
    cost_fit_init(&e->prefill_fit, ENGINE_PREFILL_FIT_DECAY, ENGINE_PREFILL_FIT_PRIOR_W);
    e->fwd = fwd_ctx_create(m, cfg.max_num_batched_tokens, cfg.max_num_seqs);
    if (!e->fwd) {
        pd_errorf(err, errlen, "cannot allocate forward scratch for %d tokens", cfg.max_num_batched_tokens);
        engine_free(e);
        return NULL;
    }
    if (engine_size_kv(e, cfg_in->max_model_len > 0, err, errlen) != 0) {
        engine_free(e);
        return NULL;
    }
    if (cfg.step_trace && trace_open(e, cfg.step_trace, err, errlen) != 0) {
        engine_free(e);
        return NULL;
    }
    sched_config sc = {.num_blocks = e->kv->num_blocks, .block_size = cfg.block_size,
                       .max_num_seqs = cfg.max_num_seqs,
                       .max_num_batched_tokens = cfg.max_num_batched_tokens,
                       .enable_chunked_prefill = cfg.enable_chunked_prefill};
    sched_init(&e->sc, &sc);
    if (cfg.enable_prefix_caching)
        sched_enable_prefix_caching(&e->sc, cfg.prefix_cache_salt ? cfg.prefix_cache_salt
                                                                  : model_cache_salt(&m->cfg));
    int V = m->cfg.vocab_size;
    e->smp = sampler_create(V);
    e->logits = xmalloc((size_t)cfg.max_num_seqs * V * sizeof(float));
    e->step_tokens = xmalloc((size_t)cfg.max_num_seqs * sizeof(int32_t));
    e->results = xmalloc((size_t)cfg.max_num_seqs * sizeof(sample_result));
    e->dev_rows = xmalloc((size_t)cfg.max_num_seqs * sizeof(sample_row));
    e->dev_logprobs = xmalloc((size_t)cfg.max_num_seqs * sizeof(float));
    e->streams = xmalloc((size_t)cfg.max_num_seqs * sizeof(req *));
    e->emits = xmalloc((size_t)cfg.max_num_seqs * sizeof(emit_item));
    /* events overlap the next step where the backend's ops are asynchronous; on the
     * CPU backend the pass has run by the time the hook fires, so they would only wait
     * (PDSERVE_DEFER_EVENTS=1 forces it there, for tests; =0 turns it off) */
    const char *defer = getenv("PDSERVE_DEFER_EVENTS");
    e->defer_events = defer && *defer ? strcmp(defer, "0") != 0 : !backend_is_cpu(e->be);
    rng_seed(&e->seed_rng, time_now_ns() ^ (uint64_t)(uintptr_t)e);
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->pool_mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->inbox_cap = e->aborts_cap = e->inbox_work_cap = e->aborts_work_cap = 64;
    e->inbox = xmalloc((size_t)e->inbox_cap * sizeof(req *));
    e->inbox_work = xmalloc((size_t)e->inbox_cap * sizeof(req *));
    e->aborts = xmalloc((size_t)e->aborts_cap * sizeof(uint64_t));
    e->aborts_work = xmalloc((size_t)e->aborts_cap * sizeof(uint64_t));
    e->next_id = 1;
    e->stats.kv_blocks_total = e->kv->num_blocks;
    e->stats.prefix_caching = cfg.enable_prefix_caching;
    if (cfg.enable_prefix_caching) {
        const prefix_cache *pc = e->sc.pool.pc;
        size_t bytes = (size_t)pc->num_blocks * (25 + 4 * (size_t)pc->block_size) +
                       (size_t)pc->table_cap * 4;
        log_info("engine: prefix caching on: %d blocks, key table of %d slots, %.1f MiB host",
                 pc->num_blocks, pc->table_cap, (double)bytes / 1048576.0);
    }
    log_info("engine: max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d, chunked "
             "prefill %s; forward scratch %.1f MiB, logits %.1f MiB",
             e->max_model_len, cfg.max_num_seqs, cfg.max_num_batched_tokens,
             cfg.enable_chunked_prefill ? "on" : "off", (double)fwd_ctx_bytes(e->fwd) / 1048576.0,
             (double)cfg.max_num_seqs * V * 4 / 1048576.0);
    return e;
}

/* ---- events ------------------------------------------------------------------------ */

static void publish_stats(engine *e) {
    pthread_mutex_lock(&e->pool_mu);
    int used = kv_pool_used(&e->sc.pool);
    const prefix_cache *pc = e->sc.pool.pc; /* evictions may come from engine_kv_alloc */
    prefix_cache pcs = pc ? *pc : (prefix_cache){0};
    pthread_mutex_unlock(&e->pool_mu);
    pthread_mutex_lock(&e->mu);
    e->stats.running = e->sc.n_running;
    e->sched_waiting = e->sc.n_waiting;
    e->stats.kv_blocks_used = used;
    e->stats.preemptions = e->sc.n_preemptions;
    if (pc) {
        e->stats.prefix_cache_queries = pcs.queries;
        e->stats.prefix_cache_hits = pcs.hits;
        e->stats.prefix_cache_hit_rate = pcs.queries ? (double)pcs.hits / (double)pcs.queries : 0.0;
        e->stats.prefix_cache_evictions = pcs.evictions;
        e->stats.prefix_cache_blocks = pcs.n_cached;
    }
    pthread_mutex_unlock(&e->mu);
}

/* The scheduler's half of a request's end: its blocks go back (or, for a prefill-only
 * request, are handed over: *held, *n_held), the counters move. Returns its cached
 * prompt tokens. The request is not yet told, nor freed (req_end_emit). */
static int req_end_sched(engine *e, req *r, finish_reason why, int32_t **held_out, int *n_held_out) {
    r->times.finished = time_now_s();
    int n_cached = 0;
    int32_t *held = NULL;
    int n_held = 0;
    if (r->prefilled) n_cached = PD_MAX(r->first.n_cached, 0); /* found by the prefill side */
    if (r->seq) {
        n_cached = PD_MAX(n_cached, PD_MAX(r->seq->n_cached, 0));
        r->times.n_preemptions = r->seq->n_preemptions;
        pthread_mutex_lock(&e->pool_mu);
        if (r->prefill_only && why == FINISH_LENGTH) {
            /* the prompt's blocks outlive the request: the event hands them over */
            held = xmalloc(sizeof(int32_t) * (size_t)PD_MAX(r->seq->n_blocks, 1));
            n_held = r->seq->n_blocks;
            memcpy(held, r->seq->block_table, sizeof(int32_t) * (size_t)n_held);
            /* the receiver takes a reference of its own, so that sched_finish still
             * registers the prompt's full blocks in the prefix cache (later prompts of
             * this prefill instance reuse them, and its lower tiers get them) */
            for (int i = 0; i < n_held; i++) kv_pool_ref(&e->sc.pool, held[i]);
            e->n_external += n_held;
        }
        if (why == FINISH_ABORT) sched_abort(&e->sc, r->seq);
        else sched_finish(&e->sc, r->seq);
        pthread_mutex_unlock(&e->pool_mu);
        r->seq = NULL;
    }
    pthread_mutex_lock(&e->mu);
    if (why == FINISH_ABORT) e->stats.requests_aborted++;
    else e->stats.requests_finished++;
    pthread_mutex_unlock(&e->mu);
    publish_stats(e); /* blocks are back before the client hears of the end */
    *held_out = held;
    *n_held_out = n_held;
    return n_cached;
}

/* The client's half: emits FINISHED (handing over held blocks), frees the request. */
static void req_end_emit(req *r, finish_reason why, int32_t stop_token, const char *error, int n_cached,
                         int32_t *held, int n_held) {
    engine_event ev = {.kind = ENGINE_EVENT_FINISHED, .request_id = r->id, .finish = why,
                       .stop_token = stop_token, .error = error, .n_prompt = r->n_prompt,
                       .n_output = r->n_output, .n_cached = n_cached, .times = &r->times,
                       .kv_blocks = held, .n_kv_blocks = n_held};
    r->on_event(r->user, &ev);
    free(held);
    req_free(r);
}

/* Ends a request: releases its blocks, emits FINISHED, frees it. */
static void req_finish(engine *e, req *r, finish_reason why, int32_t stop_token, const char *error) {
    int32_t *held = NULL;
    int n_held = 0;
    int n_cached = req_end_sched(e, r, why, &held, &n_held);
    req_end_emit(r, why, stop_token, error, n_cached, held, n_held);
}

static bool id_in(int32_t t, const int32_t *ids, int n) {
    for (int i = 0; i < n; i++) if (ids[i] == t) return true;
    return false;
}

/* vLLM's check_stop, after token t became output number r->n_output. */
static finish_reason req_check_stop(const engine *e, const req *r, int32_t t, int32_t *stop_token) {
    const model_config *mc = &e->m->cfg;
    *stop_token = -1;
    if (r->n_output < r->sp.min_tokens) return FINISH_NONE;
    if ((!r->sp.ignore_eos && id_in(t, mc->eos_token_ids, mc->n_eos)) ||
        id_in(t, r->sp.stop_token_ids, r->sp.n_stop_token_ids)) {
        *stop_token = t;
        return FINISH_STOP;
    }
    if (r->n_output >= r->max_tokens || r->n_prompt + r->n_output >= e->max_model_len)
        return FINISH_LENGTH;
    return FINISH_NONE;
}

/* ---- the step ---------------------------------------------------------------------- */

static void engine_sample(engine *e, const sched_plan *p) {
    const model_config *mc = &e->m->cfg;
    int V = mc->vocab_size;
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        if (!it->logits) continue;
        const sched_seq *q = it->seq;
        req *r = q->user;
        sample_context c = {.prompt = q->tokens, .n_prompt = q->n_prompt,
                            .output = q->tokens + q->n_prompt, .n_output = q->n_tokens - q->n_prompt,
                            .eos_ids = mc->eos_token_ids, .n_eos = mc->n_eos};
        float *row = e->logits + (size_t)it->logit_index * V;
        e->step_tokens[it->logit_index] =
            sampler_sample(e->smp, row, &r->sp, &c, &r->rng, &e->results[it->logit_index]);
    }
}

/* Emits the token events (and the ends) queued by engine_emit, in order, and frees the
 * requests that ended. */
static void engine_flush_events(engine *e) {
    for (int i = 0; i < e->n_emits; i++) {
        const emit_item *m = &e->emits[i];
        req *r = m->r;
        const sample_result *sr = &e->results[m->li];
        engine_event ev = {.kind = ENGINE_EVENT_TOKEN, .request_id = r->id, .token = e->step_tokens[m->li],
                           .index = m->index, .logprob = sr->logprob, .top = sr->top,
                           .n_top = sr->n_top, .stop_token = -1, .times = &r->times};
        r->on_event(r->user, &ev);
        if (m->finish) req_end_emit(r, m->why, m->stop_token, NULL, m->n_cached, m->held, m->n_held);
    }
    e->n_emits = 0;
}

/* The wait hook of the next forward pass (fwd_ctx_set_wait_hook): the last step's
 * events, written while the device runs this one. */
static void engine_emit_hook(void *user) { engine_flush_events(user); }

/* Takes the step's tokens: times and counts them, ends the requests that are done
 * (their blocks go back now, before the next step is planned) and queues their events;
 * emits the queue at once unless this engine defers events and no request of the step
 * hands its KV over (a prefill-only end is never held back). */
static void engine_emit(engine *e, const sched_plan *p, double t) {
    /* counters first, so that whoever hears of an end sees them up to date */
    uint64_t prompt_tokens = 0;
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        if (it->logits && ((req *)it->seq->user)->n_output == 0) prompt_tokens += (uint64_t)it->seq->n_prompt;
    }
    pthread_mutex_lock(&e->mu);
    e->stats.prompt_tokens += prompt_tokens;
    e->stats.generation_tokens += (uint64_t)p->n_logits;
    pthread_mutex_unlock(&e->mu);
    PD_ASSERT(e->n_emits == 0);
    bool now = !e->defer_events;
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        if (!it->logits) continue;
        req *r = it->seq->user;
        int32_t tok = e->step_tokens[it->logit_index];
        if (r->n_output == 0) r->times.first_token = t;
        r->times.token_times[r->n_output] = t;
        emit_item *m = &e->emits[e->n_emits++];
        *m = (emit_item){.r = r, .li = it->logit_index, .index = r->n_output++, .stop_token = -1};
        int32_t stop_token;
        finish_reason why = req_check_stop(e, r, tok, &stop_token);
        if (r->prefill_only) {
            /* the decode side decides; its KV is handed over in the FINISHED event, so
             * the step's events go out now */
            why = FINISH_LENGTH, stop_token = -1;
            now = true;
        }
        if (why == FINISH_NONE) continue;
        m->finish = true;
        m->why = why;
        m->stop_token = stop_token;
        m->n_cached = req_end_sched(e, r, why, &m->held, &m->n_held);
    }
    if (now) engine_flush_events(e);
}

/* Whether every token of the step is a plain greedy argmax (no logprobs, penalties
 * or min_tokens suppression), so that a backend with argmax_rows can pick them on the
 * device and the logits rows never come back to the host. */
static bool plan_is_greedy(const engine *e, const sched_plan *p) {
    if (!e->be->ops->argmax_rows || p->n_logits == 0) return false;
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        if (!it->logits) continue;
        const req *r = it->seq->user;
        const sampling_params *sp = &r->sp;
        if (sp->temperature >= 1e-5f || sp->logprobs >= 0 || sp->repetition_penalty != 1.0f ||
            sp->presence_penalty != 0.0f || sp->frequency_penalty != 0.0f ||
            r->n_output < sp->min_tokens)
            return false;
    }
    return true;
}

/* Whether every token of the step can be drawn on the device (backend op sample_rows:
 * only ids and chosen-token logprobs come back); if so, fills e->dev_rows (drawing each
 * request's uniform) and sets *logprobs when some request wants its token's logprob. */
static bool plan_on_device(engine *e, const sched_plan *p, bool *logprobs) {
    if (!e->be->ops->sample_rows || p->n_logits == 0) return false;
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        if (!it->logits) continue;
        const req *r = it->seq->user;
        sample_context c = {.n_output = r->n_output};
        if (!sampler_device_ok(&r->sp, &c)) return false;
    }
    *logprobs = false;
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        if (!it->logits) continue;
        req *r = it->seq->user;
        sampler_device_row(&r->sp, &r->rng, &e->dev_rows[it->logit_index]);
        *logprobs = *logprobs || r->sp.logprobs == 0;
    }
    return true;
}

/* ---- layer-wise KV streaming (engine_kv_stream) ------------------------------------ */

/* The forward pass's per-layer hook while a step streams KV: fans layer l out. */
static void engine_layer_hook(void *user, int layer) {
    engine *e = user;
    for (int i = 0; i < e->n_streams; i++) {
        req *r = e->streams[i];
        r->kv_stream->on_layer(r->user, layer);
    }
}

/* Offers the step's last prompt chunks of prefill_only requests with stream hooks to
 * their on_begin; those that accept get on_layer during the pass. Returns how many. */
static int plan_kv_streams(engine *e, const sched_plan *p) {
    e->n_streams = 0;
    for (int i = 0; i < p->n_items; i++) {
        const sched_item *it = &p->items[i];
        req *r = it->seq->user;
        if (!it->logits || !r->prefill_only || !r->kv_stream || r->n_output > 0) continue;
        if (r->kv_stream->on_begin(r->user, it->seq->block_table, it->seq->n_blocks))
            e->streams[e->n_streams++] = r;
    }
    return e->n_streams;
}

void engine_kv_layer_wait(engine *e, int layer) {
    const backend_ops *o = e->be->ops;
    PD_ASSERT(layer >= 0 && layer < e->m->cfg.n_layers);
    if (o->layer_event_wait) o->layer_event_wait(e->be, layer);
}

static void engine_step(engine *e) {
    double t0 = time_now_s();
    sched_plan p;
    pthread_mutex_lock(&e->pool_mu);
    sched_step(&e->sc, t0, &p);
    /* the step's evictions: one staging copy before the forward pass writes the blocks,
     * or (on_offload_flush_step) copies that overlap it, when a pass follows */
    if (p.batch.T > 0) prefix_cache_flush_step(&e->sc.pool);
    else prefix_cache_flush(&e->sc.pool);
    int external = e->n_external;
    pthread_mutex_unlock(&e->pool_mu);
    if (p.n_items == 0 && p.n_preempted == 0) {
        /* Work pending never stalls, unless blocks held outside the scheduler (KV
         * reservations, blocks being shipped) are what it waits for: until they come
         * back (engine_kv_release signals cv) or 10 ms pass. */
        PD_ASSERT(external > 0);
        engine_flush_events(e);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 10 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_mutex_lock(&e->mu);
        pthread_cond_timedwait(&e->cv, &e->mu, &ts);
        pthread_mutex_unlock(&e->mu);
        return;
    }
    for (int i = 0; i < p.n_items; i++) {
        req *r = p.items[i].seq->user;
        if (r->times.first_scheduled < 0) r->times.first_scheduled = t0;
    }
    double t1 = time_now_s();
    /* only steps with prompt rows can stream KV: decode-only steps skip even the scan */
    bool streaming = p.n_prefill_tokens > 0 && p.batch.T > 0 && plan_kv_streams(e, &p) > 0;
    if (streaming) fwd_ctx_set_layer_hook(e->fwd, engine_layer_hook, e);
    bool greedy = p.batch.T > 0 && plan_is_greedy(e, &p), want_lp = false;
    bool on_device = !greedy && p.batch.T > 0 && plan_on_device(e, &p, &want_lp);
    /* the last step's events go out while this one runs on the device */
    if (e->n_emits) fwd_ctx_set_wait_hook(e->fwd, engine_emit_hook, e);
    if (greedy) /* row i of the step's logits is logit_index i: tokens land where sampling puts them */
        model_forward_greedy(e->fwd, e->kv, &p.batch, e->step_tokens);
    else if (on_device)
        model_forward_sample(e->fwd, e->kv, &p.batch, e->dev_rows, e->step_tokens,
                             want_lp ? e->dev_logprobs : NULL);
    else if (p.batch.T > 0)
        model_forward(e->fwd, e->kv, &p.batch, e->logits);
    fwd_ctx_set_wait_hook(e->fwd, NULL, NULL);
    engine_flush_events(e); /* when the pass did not call the hook; before results move */
    if (greedy)
        for (int i = 0; i < p.n_logits; i++) e->results[i] = (sample_result){.token = e->step_tokens[i]};
    else if (on_device)
        for (int i = 0; i < p.n_logits; i++)
            e->results[i] = (sample_result){.token = e->step_tokens[i],
                                            .logprob = want_lp ? e->dev_logprobs[i] : 0.0f};
    if (streaming) {
        fwd_ctx_set_layer_hook(e->fwd, NULL, NULL);
        e->n_streams = 0;
    }
    double t2 = time_now_s();
    if (p.n_prefill_tokens > 0 && e->sc.pool.pc) {
        /* the lower tiers' load-or-recompute rule needs what one more prefill token
         * costs: the slope of forward seconds against the step's rows (prompt and
         * decode rows: each is a row of every matmul), fitted over the steps that
         * prefilled, so a step's fixed cost (the weights are read whatever the rows)
         * is not charged to its few tokens (the engine thread alone reads it) */
        prefix_cache_hooks *h = &e->sc.pool.pc->hooks;
        cost_fit_add(&e->prefill_fit, p.batch.T, t2 - t1);
        cost_fit_line(&e->prefill_fit, &h->recompute_s_per_step, &h->recompute_s_per_token);
    }
    if (!greedy && !on_device) engine_sample(e, &p);
    sched_on_tokens(&e->sc, &p, e->step_tokens);
    double t3 = time_now_s();
    engine_emit(e, &p, t3);
    double t4 = time_now_s();
    pthread_mutex_lock(&e->mu);
    e->stats.steps++;
    e->stats.batched_tokens += (uint64_t)p.batch.T;
    e->stats.busy_seconds += t4 - t0;
    e->stats.sched_seconds += t1 - t0;
    e->stats.forward_seconds += t2 - t1;
    e->stats.sample_seconds += t4 - t2;
    pthread_mutex_unlock(&e->mu);
    publish_stats(e);
    if (e->trace) trace_step(e, &p, t0, t1, t2, t4); /* after: its kv_blocks_used is this step's */
}

/* ---- the engine thread --------------------------------------------------------------- */

/* A prefilled request joins the running batch directly (its prompt KV is in its blocks,
 * its first token known): sched_add queues it at the back of waiting, from where it is
 * moved to the end of running with the scheduler's invariants (n_blocks covers
 * n_computed = n_prompt; n_tokens = n_prompt + 1, the next step decodes). Then its first
 * token is emitted as output 0. Returns false, changing nothing, while the batch is
 * full (it stays pending). */
static bool admit_prefilled(engine *e, req *r) {
    sched *s = &e->sc;
    if (s->n_running >= s->cfg.max_num_seqs) return false;
    char err[256];
    sched_seq *q = NULL;
    if (r->recompute) {
        /* prompt + first token as a prompt of its own, prefilled by this engine; what
         * it samples after it is output 1 */
        int mt = r->max_tokens - 1;
        if (mt > 0) {
            int32_t *p2 = xmalloc(sizeof(int32_t) * (size_t)(r->n_prompt + 1));
            memcpy(p2, r->prompt, sizeof(int32_t) * (size_t)r->n_prompt);
            p2[r->n_prompt] = r->first.token;
            q = sched_add(s, r->id, p2, r->n_prompt + 1, mt, r->times.arrival, r, err, sizeof err);
            free(p2);
        }
        free(r->prompt);
        r->prompt = NULL;
        if (mt > 0 && !q) {
            req_finish(e, r, FINISH_ERROR, -1, err);
            return true;
        }
        if (q && r->cache_salt) q->salt = hash_u64(q->salt ^ hash_u64(r->cache_salt));
        r->seq = q; /* NULL when the first token was the only one asked for */
    } else {
        q = sched_add(s, r->id, r->prompt, r->n_prompt, r->max_tokens, r->times.arrival, r, err, sizeof err);
        free(r->prompt);
        r->prompt = NULL;
        pthread_mutex_lock(&e->pool_mu);
        e->n_external -= r->n_pre_blocks;
        if (!q) kv_pool_release(&s->pool, r->pre_blocks, r->n_pre_blocks);
        pthread_mutex_unlock(&e->pool_mu);
        if (!q) {
            req_finish(e, r, FINISH_ERROR, -1, err);
            return true;
        }
        PD_ASSERT(s->n_waiting > 0 &&
                  s->waiting[(s->waiting_head + s->n_waiting - 1) & (s->waiting_cap - 1)] == q);
        PD_ASSERT(r->n_pre_blocks == (r->n_prompt + s->cfg.block_size - 1) / s->cfg.block_size);
        PD_ASSERT(r->n_pre_blocks <= q->cap_blocks && q->n_tokens < q->cap_tokens);
        if (r->cache_salt) q->salt = hash_u64(q->salt ^ hash_u64(r->cache_salt));
        s->n_waiting--;
        q->status = SCHED_RUNNING;
        s->running[s->n_running++] = q;
        memcpy(q->block_table, r->pre_blocks, sizeof(int32_t) * (size_t)r->n_pre_blocks);
        q->n_blocks = r->n_pre_blocks;
        q->n_computed = r->n_prompt;
        q->tokens[q->n_tokens++] = r->first.token;
        q->n_cached = 0;
        r->seq = q;
        free(r->pre_blocks);
        r->pre_blocks = NULL;
        r->n_pre_blocks = 0;
    }

    double t = time_now_s();
    r->times.first_scheduled = r->times.first_token = t;
    if (q) q->first_scheduled = t;
    r->times.token_times[0] = t;
    r->n_output = 1;
    engine_event ev = {.kind = ENGINE_EVENT_TOKEN, .request_id = r->id, .token = r->first.token,
                       .index = 0, .logprob = r->first.logprob, .top = r->first.top,
                       .n_top = r->first.n_top, .stop_token = -1, .times = &r->times};
    r->on_event(r->user, &ev);
    int32_t stop_token;
    finish_reason why = req_check_stop(e, r, r->first.token, &stop_token);
    if (why != FINISH_NONE) req_finish(e, r, why, stop_token, NULL);
    return true;
}

/* Seats pending prefilled requests, oldest first, while the batch has room. */
static void admit_pending(engine *e) {
    int k = 0;
    while (k < e->n_pending && admit_prefilled(e, e->pending[k])) k++;
    memmove(e->pending, e->pending + k, sizeof(req *) * (size_t)(e->n_pending - k));
    e->n_pending -= k;
}

/* Ends pending prefilled requests: the one of this id (or every one when id is 0). */
static void abort_pending(engine *e, uint64_t id) {
    for (int i = 0; i < e->n_pending;) {
        req *r = e->pending[i];
        if (id && r->id != id) { i++; continue; }
        memmove(e->pending + i, e->pending + i + 1, sizeof(req *) * (size_t)(e->n_pending - i - 1));
        e->n_pending--;
        pthread_mutex_lock(&e->pool_mu);
        e->n_external -= r->n_pre_blocks;
        kv_pool_release(&e->sc.pool, r->pre_blocks, r->n_pre_blocks);
        pthread_mutex_unlock(&e->pool_mu);
        r->n_pre_blocks = 0;
        req_finish(e, r, FINISH_ABORT, -1, NULL);
    }
}

static void admit(engine *e, req *r) {
    char err[256];
    if (r->prefilled) {
        if (e->n_pending == e->cap_pending) {
            e->cap_pending = e->cap_pending ? 2 * e->cap_pending : 16;
            e->pending = xrealloc(e->pending, sizeof(req *) * (size_t)e->cap_pending);
        }
        e->pending[e->n_pending++] = r;
        admit_pending(e);
        return;
    }
    r->seq = sched_add(&e->sc, r->id, r->prompt, r->n_prompt, r->prefill_only ? 1 : r->max_tokens,
                       r->times.arrival, r, err, sizeof err);
    free(r->prompt);
    r->prompt = NULL;
    if (!r->seq) req_finish(e, r, FINISH_ERROR, -1, err);
    else if (r->cache_salt) r->seq->salt = hash_u64(r->seq->salt ^ hash_u64(r->cache_salt));
}

static void abort_all(engine *e) {
    engine_flush_events(e);
    abort_pending(e, 0);
    while (e->sc.n_running) req_finish(e, e->sc.running[e->sc.n_running - 1]->user, FINISH_ABORT, -1, NULL);
    while (e->sc.n_waiting) {
        sched_seq *q = e->sc.waiting[e->sc.waiting_head & (e->sc.waiting_cap - 1)];
        req_finish(e, q->user, FINISH_ABORT, -1, NULL);
    }
}

static void *engine_main(void *arg) {
    engine *e = arg;
    /* named so that its CPU can be told from the serving threads' (top -H, /proc, the
     * profiler's serving-path CPU: profile_serving.c) */
    pthread_setname_np(pthread_self(), "pd-engine");
    util_compute_thread(); /* `pdserve serve --cpus`: the steps on the instance's CPUs */
    for (;;) {
        /* the last step's events, held back for the next step's pass, go out before the
         * thread may sleep */
        if (e->n_emits && !sched_has_work(&e->sc)) engine_flush_events(e);
        pthread_mutex_lock(&e->mu);
        while (!e->stopping && e->n_inbox == 0 && e->n_aborts == 0 && !e->reset_prefix_cache &&
               !sched_has_work(&e->sc))
            pthread_cond_wait(&e->cv, &e->mu);
        bool stopping = e->stopping;
        req **in = e->inbox;
        int n_in = e->n_inbox, cap = e->inbox_cap;
        e->inbox = e->inbox_work;
        e->inbox_cap = e->inbox_work_cap;
        e->inbox_work = in;
        e->inbox_work_cap = cap;
        e->n_inbox = 0;
        uint64_t *ab = e->aborts;
        int n_ab = e->n_aborts;
        cap = e->aborts_cap;
        e->aborts = e->aborts_work;
        e->aborts_cap = e->aborts_work_cap;
        e->aborts_work = ab;
        e->aborts_work_cap = cap;
        e->n_aborts = 0;
        bool reset_pc = e->reset_prefix_cache;
        e->reset_prefix_cache = false;
        pthread_mutex_unlock(&e->mu);

        /* ... and before an abort or the stop ends a request whose tokens they hold */
        if (e->n_emits && (n_ab || stopping)) engine_flush_events(e);
        for (int i = 0; i < n_in; i++) admit(e, in[i]);
        for (int i = 0; i < n_ab; i++) {
            sched_seq *q = sched_find(&e->sc, ab[i]);
            if (q) req_finish(e, q->user, FINISH_ABORT, -1, NULL);
            else abort_pending(e, ab[i]);
        }
        if (stopping) break;
        if (reset_pc) {
            pthread_mutex_lock(&e->pool_mu);
            int dropped = sched_reset_prefix_cache(&e->sc);
            pthread_mutex_unlock(&e->pool_mu);
            log_info("engine: prefix cache reset: %d blocks forgotten", dropped);
        }
        if (n_in || n_ab || reset_pc) publish_stats(e);
        if (e->n_pending) admit_pending(e);
        if (sched_has_work(&e->sc)) engine_step(e);
    }
    abort_all(e);
    return NULL;
}

void engine_start(engine *e) {
    PD_ASSERT(!e->started);
    e->started = true;
    if (pthread_create(&e->thread, NULL, engine_main, e) != 0) pd_die("engine: cannot start thread");
}

void engine_stop(engine *e) {
    if (!e || !e->started) return;
    pthread_mutex_lock(&e->mu);
    bool was = e->stopping;
    e->stopping = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (!was) pthread_join(e->thread, NULL);
}

void engine_free(engine *e) {
    if (!e) return;
    if (e->smp) { /* fully created */
        engine_stop(e);
        /* requests still queued (never started, or submitted during the stop) */
        for (int i = 0; i < e->n_inbox; i++) req_free(e->inbox[i]);
        abort_all(e);
        sched_destroy(&e->sc);
        pthread_mutex_destroy(&e->mu);
        pthread_cond_destroy(&e->cv);
    }
    sampler_free(e->smp);
    free(e->logits);
    free(e->step_tokens);
    free(e->results);
    free(e->dev_rows);
    free(e->dev_logprobs);
    free(e->emits);
    free(e->streams);
    free(e->inbox);
    free(e->inbox_work);
    free(e->aborts);
    free(e->aborts_work);
    free(e->pending);
    if (e->kv) kv_cache_free(e->be, e->kv);
    fwd_ctx_free(e->fwd);
    if (e->trace) fclose(e->trace);
    free(e);
}

/* ---- submission --------------------------------------------------------------------- */

static int validate(const engine *e, const engine_request *q, int *max_tokens, char *err, size_t errlen) {
    const sampling_params *sp = &q->sp;
    int V = e->m->cfg.vocab_size;
    if (q->n_prompt <= 0 || !q->prompt) return pd_errorf(err, errlen, "The prompt is empty."), -1;
    for (int i = 0; i < q->n_prompt; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= V)
            return pd_errorf(err, errlen, "Token id %d at prompt position %d is out of vocabulary (size %d).",
                             (int)q->prompt[i], i, V), -1;
    int mt = sp->max_tokens > 0 ? sp->max_tokens : e->max_model_len - q->n_prompt;
    if (q->n_prompt + PD_MAX(mt, 1) > e->max_model_len)
        return pd_errorf(err, errlen,
                         "This model's maximum context length is %d tokens. However, you requested "
                         "%d tokens (%d in the messages, %d in the completion). Please reduce the "
                         "length of the messages or completion.",
                         e->max_model_len, q->n_prompt + PD_MAX(mt, 1), q->n_prompt, PD_MAX(mt, 1)), -1;
    if (!(sp->temperature >= 0) || !isfinite(sp->temperature))
        return pd_errorf(err, errlen, "temperature must be non-negative, got %g.", sp->temperature), -1;
    if (!(sp->top_p > 0 && sp->top_p <= 1))
        return pd_errorf(err, errlen, "top_p must be in (0, 1], got %g.", sp->top_p), -1;
    if (sp->top_k < -1) return pd_errorf(err, errlen, "top_k must be -1 (disable), or at least 1, got %d.", sp->top_k), -1;
    if (!(sp->min_p >= 0 && sp->min_p <= 1))
        return pd_errorf(err, errlen, "min_p must be in [0, 1], got %g.", sp->min_p), -1;
    if (!(sp->presence_penalty >= -2 && sp->presence_penalty <= 2))
        return pd_errorf(err, errlen, "presence_penalty must be in [-2, 2], got %g.", sp->presence_penalty), -1;
    if (!(sp->frequency_penalty >= -2 && sp->frequency_penalty <= 2))
        return pd_errorf(err, errlen, "frequency_penalty must be in [-2, 2], got %g.", sp->frequency_penalty), -1;
    if (!(sp->repetition_penalty > 0) || !isfinite(sp->repetition_penalty))
        return pd_errorf(err, errlen, "repetition_penalty must be greater than zero, got %g.", sp->repetition_penalty), -1;
    if (sp->min_tokens < 0 || sp->min_tokens > mt)
        return pd_errorf(err, errlen, "min_tokens must be in [0, max_tokens=%d], got %d.", mt, sp->min_tokens), -1;
    if (sp->logprobs > SAMPLING_MAX_LOGPROBS)
        return pd_errorf(err, errlen, "logprobs must be at most %d, got %d.", SAMPLING_MAX_LOGPROBS, sp->logprobs), -1;
    if (sp->n_stop_token_ids < 0 || sp->n_stop_token_ids > SAMPLING_MAX_STOP_IDS)
        return pd_errorf(err, errlen, "at most %d stop token ids.", SAMPLING_MAX_STOP_IDS), -1;
    if (!q->on_event) return pd_errorf(err, errlen, "request without an event callback."), -1;
    *max_tokens = mt;
    return 0;
}

static uint64_t inbox_push(engine *e, req *r, char *err, size_t errlen);

uint64_t engine_submit(engine *e, const engine_request *q, char *err, size_t errlen) {
    int max_tokens;
    if (validate(e, q, &max_tokens, err, errlen) != 0) return 0;
    req *r = xcalloc(1, sizeof(*r));
    r->sp = q->sp;
    r->on_event = q->on_event;
    r->user = q->user;
    r->n_prompt = q->n_prompt;
    r->prompt = xmalloc((size_t)q->n_prompt * sizeof(int32_t));
    memcpy(r->prompt, q->prompt, (size_t)q->n_prompt * sizeof(int32_t));
    r->max_tokens = max_tokens;
    r->cache_salt = q->cache_salt;
    r->times.token_times = xmalloc((size_t)max_tokens * sizeof(double));
    r->times.first_scheduled = r->times.first_token = r->times.finished = -1;
    r->times.arrival = time_now_s();
    r->prefill_only = q->prefill_only;
    r->kv_stream = q->prefill_only ? q->kv_stream : NULL;
    return inbox_push(e, r, err, errlen);
}

/* Gives the new request r (owned) to the engine thread: its id, or 0 with err (r freed). */
static uint64_t inbox_push(engine *e, req *r, char *err, size_t errlen) {
    pthread_mutex_lock(&e->mu);
    const char *refuse = NULL;
    if (e->stopping) refuse = "The engine is shutting down.";
    else if (e->cfg.max_waiting_requests > 0 &&
             e->n_inbox + e->sched_waiting >= e->cfg.max_waiting_requests)
        refuse = "full";
    if (refuse) {
        int limit = e->cfg.max_waiting_requests;
        pthread_mutex_unlock(&e->mu);
        if (strcmp(refuse, "full") == 0)
            pd_errorf(err, errlen, "Too many requests waiting (the limit is %d); try again later.", limit);
        else
            pd_errorf(err, errlen, "%s", refuse);
        req_free(r);
        return 0;
    }
    r->id = e->next_id++;
    rng_seed(&r->rng, r->sp.has_seed ? r->sp.seed : rng_next(&e->seed_rng));
    /* the first token's draw was made by the prefill side's generator, seeded alike */
    if (r->prefilled && r->sp.temperature >= 1e-5f) rng_next(&r->rng);
    if (e->n_inbox == e->inbox_cap) {
        e->inbox_cap *= 2;
        e->inbox = xrealloc(e->inbox, (size_t)e->inbox_cap * sizeof(req *));
    }
    e->inbox[e->n_inbox++] = r;
    uint64_t id = r->id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return id;
}

void engine_abort(engine *e, uint64_t id) {
    pthread_mutex_lock(&e->mu);
    if (e->n_aborts == e->aborts_cap) {
        e->aborts_cap *= 2;
        e->aborts = xrealloc(e->aborts, (size_t)e->aborts_cap * sizeof(uint64_t));
    }
    e->aborts[e->n_aborts++] = id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void engine_reset_prefix_cache(engine *e) {
    pthread_mutex_lock(&e->mu);
    if (e->cfg.enable_prefix_caching) {
        e->reset_prefix_cache = true;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
}

void engine_get_stats(engine *e, engine_stats *out) {
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    out->waiting = e->sched_waiting + e->n_inbox;
    pthread_mutex_unlock(&e->mu);
    if (e->tier_hooks.tier_stats) e->tier_hooks.tier_stats(e->tier_hooks.lookup_user, &out->tiers);
}

int engine_set_prefix_cache_hooks(engine *e, const prefix_cache_hooks *h) {
    if (!e->sc.pool.pc) return -1;
    PD_ASSERT(!e->started || e->stopping); /* the engine thread reads them unlocked */
    pthread_mutex_lock(&e->pool_mu);
    double est = e->sc.pool.pc->hooks.recompute_s_per_token;
    double est_step = e->sc.pool.pc->hooks.recompute_s_per_step;
    e->tier_hooks = h ? *h : (prefix_cache_hooks){0};
    e->tier_hooks.recompute_s_per_token = est;
    e->tier_hooks.recompute_s_per_step = est_step;
    e->sc.pool.pc->hooks = e->tier_hooks;
    pthread_mutex_unlock(&e->pool_mu);
    return 0;
}

/* ---- disaggregated serving ------------------------------------------------------------ */

kv_cache *engine_kv_cache(engine *e) { return e->kv; }

int engine_kv_alloc(engine *e, int n, int32_t *out) {
    pthread_mutex_lock(&e->pool_mu);
    int rc = kv_pool_alloc(&e->sc.pool, n, out);
    prefix_cache_flush(&e->sc.pool); /* before the caller writes the blocks */
    if (rc == 0) e->n_external += n;
    int used = kv_pool_used(&e->sc.pool);
    pthread_mutex_unlock(&e->pool_mu);
    pthread_mutex_lock(&e->mu);
    e->stats.kv_blocks_used = used;
    pthread_mutex_unlock(&e->mu);
    return rc;
}

void engine_kv_release(engine *e, const int32_t *blocks, int n) {
    if (n <= 0) return;
    pthread_mutex_lock(&e->pool_mu);
    kv_pool_release(&e->sc.pool, blocks, n);
    e->n_external -= n;
    PD_ASSERT(e->n_external >= 0);
    int used = kv_pool_used(&e->sc.pool);
    pthread_mutex_unlock(&e->pool_mu);
    pthread_mutex_lock(&e->mu);
    e->stats.kv_blocks_used = used;
    pthread_cond_signal(&e->cv); /* a step may be waiting for blocks */
    pthread_mutex_unlock(&e->mu);
}

uint64_t engine_submit_prefilled(engine *e, const engine_request *q, const int32_t *blocks,
                                 int n_blocks, const engine_first_token *first, char *err,
                                 size_t errlen) {
    int max_tokens;
    int bs = e->cfg.block_size;
    bool ok = validate(e, q, &max_tokens, err, errlen) == 0;
    bool recompute = !blocks && n_blocks == 0;
    if (ok && ((!recompute && n_blocks != (q->n_prompt + bs - 1) / bs) || first->token < 0 ||
               first->token >= e->m->cfg.vocab_size)) {
        pd_errorf(err, errlen, "prefilled request: %d blocks for %d prompt tokens, first token %d",
                  n_blocks, q->n_prompt, (int)first->token);
        ok = false;
    }
    if (!ok) {
        engine_kv_release(e, blocks, n_blocks);
        return 0;
    }
    req *r = xcalloc(1, sizeof(*r));
    r->sp = q->sp;
    r->on_event = q->on_event;
    r->user = q->user;
    r->n_prompt = q->n_prompt;
    r->prompt = xmalloc((size_t)q->n_prompt * sizeof(int32_t));
    memcpy(r->prompt, q->prompt, (size_t)q->n_prompt * sizeof(int32_t));
    r->max_tokens = max_tokens;
    r->cache_salt = q->cache_salt;
    r->times.token_times = xmalloc((size_t)max_tokens * sizeof(double));
    r->times.first_scheduled = r->times.first_token = r->times.finished = -1;
    r->times.arrival = time_now_s();
    r->prefilled = true;
    r->recompute = recompute;
    r->first = *first;
    r->first.n_top = PD_MAX(0, PD_MIN(first->n_top, SAMPLING_MAX_LOGPROBS));
    r->pre_blocks = xmalloc(sizeof(int32_t) * (size_t)PD_MAX(n_blocks, 1));
    if (n_blocks) memcpy(r->pre_blocks, blocks, sizeof(int32_t) * (size_t)n_blocks);
    r->n_pre_blocks = n_blocks;
    /* inbox_push frees r on refusal; the blocks go back first */
    int32_t *copy = xmalloc(sizeof(int32_t) * (size_t)PD_MAX(n_blocks, 1));
    if (n_blocks) memcpy(copy, blocks, sizeof(int32_t) * (size_t)n_blocks);
    uint64_t id = inbox_push(e, r, err, errlen);
    if (id == 0) engine_kv_release(e, copy, n_blocks);
    free(copy);
    return id;
}
