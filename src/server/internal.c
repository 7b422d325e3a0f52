/* internal.c: the instance side of a disaggregated request (DESIGN.md), behind the
 * /internal/... endpoints that only the router calls (http.c routes them here).
 *
 *   decode   /internal/reserve  kv_reserve: blocks from the engine's pool + a ticket, and
 *                               the prompt's ids (the router hands them to the prefill
 *                               instance; kept here for /internal/decode: the prompt is
 *                               tokenized once per disaggregated request)
 *            /internal/decode   kv_ticket_wait until the KV is here, kv_ticket_take, then
 *                               engine_submit_prefilled with the first token: from then
 *                               on it is an ordinary generation of http.c
 *            /internal/release  kv_ticket_cancel
 *   prefill  /internal/prefill  a prefill_only engine request; its prompt's KV is
 *                               shipped (kv_send_begin .. kv_send_finish) by a transfer
 *                               worker, which then gives the blocks back and answers
 *                               with the first token
 *
 * Two ways to ship, by --kv-transfer-mode:
 *   whole      at the request's end the engine hands over the prompt's blocks (the
 *              FINISHED event) and the worker ships them all after the pass.
 *   layerwise  streamed, overlapping the prefill's compute: when the step that computes
 *              the prompt's last chunk (the whole prompt if it fits one step) is about
 *              to run, the engine calls on_begin with every block of the prompt and the
 *              worker opens the transfer (kv_send_begin) while the pass starts; after
 *              each layer's kv_store the engine's per-layer hook says "layer l ready"
 *              and the worker ships layer l of every block (kv_send_layer) while the
 *              pass computes layer l+1..; the FINISHED event at the end of that step
 *              hands the blocks over and the worker closes the transfer
 *              (kv_send_finish). What is overlapped: the shipping of layer l of the
 *              whole prompt (earlier chunks' blocks included) with layers l+1..L-1 of
 *              the last chunk; what is not: earlier chunks' steps (their blocks wait for
 *              the last chunk, since a medium ships a layer of all blocks at once), the
 *              last layer, and the completion notice. docs/disaggregation.md.
 *
 * Threads: the engine thread only records events and queues work (it takes in->mu for
 * a few instructions per layer of a streaming step, never waits on the network); one
 * transfer worker does every blocking call, taking whichever job has work next, in
 * arrival order (a streaming job's next layer, a whole job's shipping); a ticker
 * thread enforces deadlines (aborting prefills that outlive their ticket) and calls
 * kv_connector_tick, which expires reservations nobody claimed. Whatever fails (the
 * decode side gone, a deadline, the router hanging up mid-stream), every block goes
 * back exactly once: the connector's on the decode side, ours (engine_kv_release, by
 * the worker once the transfer is over) on the prefill side. The engine must be
 * stopped before internal_free (serve's teardown order), so that no engine event
 * comes after the worker has gone. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kv/kv.h"
#include "server/server.h"
#include "util/util.h"

#define INTERNAL_TICK_MS 20
/* Decode side: reservations whose prompt ids are kept at once (beyond it the decode
 * call tokenizes again: slower, same result). */
#define INTERNAL_MAX_KEPT_PROMPTS 1024

typedef enum pj_stage { PJ_PREFILL, PJ_TRANSFER, PJ_DONE } pj_stage;

struct internal_prefill_job {
    internal_ctx *in;
    pthread_mutex_t mu;
    int refs;                   /* the pipeline's and the HTTP side's */
    kv_ticket ticket;
    int32_t *prompt;            /* [n_prompt] (owned) */
    int n_prompt;
    int logprobs;               /* the request's: how much of the first token to report */
    server_reply *reply;        /* answered once by the pipeline */
    uint64_t engine_id;
    pj_stage stage;             /* under in->mu */
    bool aborted_deadline;      /* under in->mu: the ticker aborted it */
    bool http_gone;             /* under mu */
    engine_first_token first;   /* engine thread, before FINISHED */
    bool got_token;
    int32_t *blocks;            /* [n_blocks] handed over by the engine (owned ids) */
    int n_blocks;
    double t_start, t_prefilled;
    double queue_s, compute_s;  /* the engine's: arrival .. first scheduled .. first token */
    internal_prefill_job *next_q;           /* the worker's list (in->mu) */
    internal_prefill_job *prev_a, *next_a;  /* active list (in->mu) */
    /* the engine thread's news for the worker (in->mu) */
    bool finish_ready;          /* the FINISHED event came (blocks handed over, or not) */
    bool streaming;             /* layerwise: on_begin accepted; the worker ships as layers come */
    int layers_ready;           /* layers the step's forward pass has written (streaming) */
    finish_reason fin;          /* the FINISHED event's (streaming) */
    char fin_err[200];
    int32_t *stream_blocks;     /* [n_stream_blocks] the prompt's block ids at on_begin (owned) */
    int n_stream_blocks;
    /* the worker's own (worker thread only) */
    bool begun;                 /* streaming: kv_send_begin tried */
    kv_send *send;              /* streaming: the open transfer */
    int layers_sent, layers_early; /* shipped; of which before the prefill's end */
    kv_status st;               /* streaming: the first failure (KV_OK: none) */
    char err[256];
    int fail_status;            /* streaming: HTTP status of that failure (0: from st) */
    const char *fail_code;
    double t_send0, busy_s;     /* kv_send_begin called; seconds spent inside kv_send_* */
};

/* Decode side: a reservation's prompt ids, kept from /internal/reserve for its
 * /internal/decode (internal_decode_prompt). */
typedef struct kept_prompt {
    uint64_t ticket_id, request_id, body_hash;
    int64_t deadline_ms;        /* the ticket's: dropped by the ticker after it */
    int32_t *ids;               /* [n] (owned) */
    int n;
    struct kept_prompt *next;
} kept_prompt;

struct internal_ctx {
    engine *eng;                /* not owned */
    kv_connector *kv;           /* not owned */
    server_role role;
    double timeout_s;
    int stall_ms;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    internal_prefill_job *q_head, *q_tail;  /* the transfer worker's list */
    internal_prefill_job *active;           /* every job not yet answered */
    int n_active;
    bool stop;
    kept_prompt *kept;          /* decode: prompts of open reservations (under mu) */
    int n_kept;
    pthread_t worker, ticker;
    bool worker_started, ticker_started;
    internal_kv_totals kv_totals; /* prefill: transfers answered (under mu) */
};

static int64_t wall_ms(void) { return (int64_t)(time_wall_s() * 1000.0); }

/* ---- prefill side ------------------------------------------------------------------------ */
static void pj_unref(internal_prefill_job *j) {
    pthread_mutex_lock(&j->mu);
    bool last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (!last) return;
    PD_ASSERT(!j->blocks && !j->send);
    pthread_mutex_destroy(&j->mu);
    free(j->stream_blocks);
    free(j->prompt);
    free(j);
}

/* Takes j off the active list and answers; drops the pipeline's reference. */
static void pj_answer(internal_prefill_job *j, int status, const sbuf *body) {
    internal_ctx *in = j->in;
    pthread_mutex_lock(&in->mu);
    j->stage = PJ_DONE;
    if (j->prev_a) j->prev_a->next_a = j->next_a;
    else in->active = j->next_a;
    if (j->next_a) j->next_a->prev_a = j->prev_a;
    j->prev_a = j->next_a = NULL;
    in->n_active--;
    pthread_mutex_unlock(&in->mu);
    server_reply_send(j->reply, status, body);
    j->reply = NULL;
    pj_unref(j);
}

static void pj_fail(internal_prefill_job *j, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void pj_fail(internal_prefill_job *j, int status, const char *code, const char *fmt, ...) {
    api_error e;
    api_error_set(&e, status, "server_error", NULL, "%s", "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    e.code = code;
    log_info("prefill: request %llu failed: %s", (unsigned long long)j->ticket.request_id, e.message);
    if (j->blocks) {
        engine_kv_release(j->in->eng, j->blocks, j->n_blocks);
        free(j->blocks);
        j->blocks = NULL;
    }
    sbuf b;
    sbuf_init(&b);
    api_error_json(&b, &e);
    pj_answer(j, status, &b);
    sbuf_free(&b);
}

/* The first token as X-PD-First text: "TOKEN[;LOGPROB[;ID:LP,...]]". */
static void first_format(const internal_prefill_job *j, sbuf *out) {
    const engine_first_token *f = &j->first;
    sbuf_printf(out, "%d", (int)f->token);
    if (j->logprobs < 0) return;
    sbuf_printf(out, ";%.9g;", (double)f->logprob);
    for (int i = 0; i < f->n_top; i++)
        sbuf_printf(out, i ? ",%d:%.9g" : "%d:%.9g", (int)f->top[i].id, (double)f->top[i].logprob);
}

/* Puts j at the end of the worker's list and wakes it (under in->mu). */
static void pj_enqueue(internal_ctx *in, internal_prefill_job *j) {
    j->next_q = NULL;
    if (in->q_tail) in->q_tail->next_q = j;
    else in->q_head = j;
    in->q_tail = j;
    pthread_cond_broadcast(&in->cv);
}

/* Answers a job whose prefill itself did not end with the first token. */
static void pj_fail_prefill(internal_prefill_job *j, finish_reason why, const char *error) {
    internal_ctx *in = j->in;
    pthread_mutex_lock(&in->mu);
    bool deadline = j->aborted_deadline;
    pthread_mutex_unlock(&in->mu);
    if (deadline)
        pj_fail(j, 504, "kv_transfer_timeout", "the prefill did not finish before the request's deadline");
    else if (why == FINISH_ABORT)
        pj_fail(j, 503, "prefill_aborted", "the prefill was aborted (shutdown or the router went away)");
    else
        pj_fail(j, 500, "prefill_failed", "the prefill failed: %s", error ? error : "unknown error");
}

/* Engine thread: record, and hand the blocks to the transfer worker. Never blocks. */
static void pj_on_event(void *user, const engine_event *ev) {
    internal_prefill_job *j = user;
    internal_ctx *in = j->in;
    if (ev->kind == ENGINE_EVENT_TOKEN) {
        j->first.token = ev->token;
        j->first.logprob = ev->logprob;
        j->first.n_top = ev->top ? PD_MIN(ev->n_top, SAMPLING_MAX_LOGPROBS) : 0;
        if (j->first.n_top) memcpy(j->first.top, ev->top, sizeof(token_logprob) * (size_t)j->first.n_top);
        j->got_token = true;
        return;
    }
    j->first.n_cached = ev->n_cached;
    if (ev->n_kv_blocks > 0) {
        j->blocks = xmalloc(sizeof(int32_t) * (size_t)ev->n_kv_blocks);
        memcpy(j->blocks, ev->kv_blocks, sizeof(int32_t) * (size_t)ev->n_kv_blocks);
        j->n_blocks = ev->n_kv_blocks;
    }
    j->t_prefilled = time_now_s();
    if (ev->times && ev->times->first_scheduled >= 0 && ev->times->first_token >= 0) {
        j->queue_s = ev->times->first_scheduled - ev->times->arrival;
        j->compute_s = ev->times->first_token - ev->times->first_scheduled;
    }
    if (j->streaming) {
        /* already on the worker's list, maybe mid-transfer: the worker ends it */
        pthread_mutex_lock(&in->mu);
        j->fin = ev->finish;
        snprintf(j->fin_err, sizeof j->fin_err, "%s", ev->error ? ev->error : "unknown error");
        j->finish_ready = true;
        j->stage = PJ_TRANSFER;
        pthread_cond_broadcast(&in->cv);
        pthread_mutex_unlock(&in->mu);
        return;
    }
    if (ev->finish == FINISH_LENGTH && j->got_token && j->blocks) {
        pthread_mutex_lock(&in->mu);
        j->stage = PJ_TRANSFER;
        j->finish_ready = true;
        pj_enqueue(in, j);
        pthread_mutex_unlock(&in->mu);
        return;
    }
    pj_fail_prefill(j, ev->finish, ev->error);
}

/* Engine thread, layerwise (engine_kv_stream.on_begin): the step computing the
 * prompt's last chunk is about to run; blocks are every block of the prompt. The
 * worker opens the transfer now, so that it is ready when layer 0 is. */
static bool pj_on_kv_begin(void *user, const int32_t *blocks, int n_blocks) {
    internal_prefill_job *j = user;
    internal_ctx *in = j->in;
    PD_ASSERT(!j->streaming);
    if (n_blocks != j->ticket.n_blocks) return false; /* kv_send_begin after the pass says why */
    j->stream_blocks = xmalloc(sizeof(int32_t) * (size_t)n_blocks);
    memcpy(j->stream_blocks, blocks, sizeof(int32_t) * (size_t)n_blocks);
    j->n_stream_blocks = n_blocks;
    pthread_mutex_lock(&in->mu);
    j->streaming = true;
    pj_enqueue(in, j);
    pthread_mutex_unlock(&in->mu);
    return true;
}

/* Engine thread, layerwise (engine_kv_stream.on_layer): layer `layer` of every block
 * is written (or, on a device, queued: the worker waits for its event). */
static void pj_on_kv_layer(void *user, int layer) {
    internal_prefill_job *j = user;
    internal_ctx *in = j->in;
    pthread_mutex_lock(&in->mu);
    PD_ASSERT(j->streaming && layer == j->layers_ready);
    j->layers_ready = layer + 1;
    pthread_cond_broadcast(&in->cv);
    pthread_mutex_unlock(&in->mu);
}

static const engine_kv_stream PJ_KV_STREAM = {pj_on_kv_begin, pj_on_kv_layer};

static int kv_status_http(kv_status st) {
    switch (st) {
    case KV_ERR_DEADLINE: return 504;
    case KV_ERR_FULL:
    case KV_ERR_NOSPACE: return 507;
    default: return 502;
    }
}

/* Answers 200 with the first token and the transfer's figures, after giving the
 * blocks back. t0..t1: kv_send_begin called .. kv_send_finish returned. */
static void pj_succeed(internal_prefill_job *j, double t0, double t1, double busy, int early) {
    internal_ctx *in = j->in;
    pthread_mutex_lock(&in->mu);
    in->kv_totals.transfers++;
    in->kv_totals.transfer_s += t1 - t0;
    in->kv_totals.tail_s += PD_MAX(t1 - j->t_prefilled, 0);
    pthread_mutex_unlock(&in->mu);
    engine_kv_release(in->eng, j->blocks, j->n_blocks);
    free(j->blocks);
    j->blocks = NULL;
    sbuf b, f;
    sbuf_init(&b);
    sbuf_init(&f);
    first_format(j, &f);
    sbuf_puts(&b, "{\"first\":");
    sbuf_json_str(&b, f.p, f.len);
    /* prefill_s: arrival .. the prefill's end; kv_transfer_s: begin .. finish;
     * kv_busy_s: inside kv_send_* calls; kv_tail_s: the prefill's end .. finish (what
     * the transfer added to the request); kv_queue_s: the part of that tail before
     * begin, the blocks waiting for the transfer worker (behind other requests'
     * transfers; 0 when streamed, which begins before the prefill's end);
     * kv_layers_overlapped: layers shipped before the prefill's end; queue_s,
     * compute_s: the engine's arrival .. first scheduled .. first token */
    sbuf_printf(&b, ",\"cached_tokens\":%d", j->first.n_cached);
    sbuf_printf(&b, ",\"queue_s\":%.6f,\"compute_s\":%.6f", j->queue_s, j->compute_s);
    sbuf_printf(&b, ",\"n_prompt\":%d,\"prefill_s\":%.6f,\"kv_transfer_s\":%.6f,\"kv_busy_s\":%.6f,"
                "\"kv_tail_s\":%.6f,\"kv_queue_s\":%.6f,\"kv_layers_overlapped\":%d,\"kv_mode\":\"%s\","
                "\"medium\":\"%s\"}",
                j->n_prompt, j->t_prefilled - j->t_start, t1 - t0, busy, t1 - j->t_prefilled,
                PD_MAX(t0 - j->t_prefilled, 0), early,
                j->streaming ? "layerwise" : kv_transfer_mode_name(kv_connector_config(in->kv)->mode),
                kv_medium_name(j->ticket.medium));
    pj_answer(j, 200, &b);
    sbuf_free(&b);
    sbuf_free(&f);
}

/* --debug-stall-transfer-ms: holds the worker (fault tests) until the stall or the
 * request's deadline is over. */
static void pj_stall(internal_ctx *in, internal_prefill_job *j, const char *where) {
    if (in->stall_ms <= 0) return;
    int64_t until = wall_ms() + in->stall_ms;
    log_warn("prefill: --debug-stall-transfer-ms: stalling the transfer of request %llu for %d ms %s",
             (unsigned long long)j->ticket.request_id, in->stall_ms, where);
    while (wall_ms() < until && wall_ms() < j->ticket.deadline_ms) usleep(5000);
}

static bool pj_http_gone(internal_prefill_job *j) {
    pthread_mutex_lock(&j->mu);
    bool gone = j->http_gone;
    pthread_mutex_unlock(&j->mu);
    return gone;
}

/* Transfer worker, whole mode (or a prefill that was not streamed): sleeps (debug
 * stall) then ships one job's blocks after its pass. */
static void pj_transfer(internal_ctx *in, internal_prefill_job *j) {
    char err[256] = "";
    pj_stall(in, j, "before it starts");
    if (pj_http_gone(j)) {
        pj_fail(j, 499, "client_gone", "the router went away before the KV transfer");
        return;
    }
    if (wall_ms() >= j->ticket.deadline_ms) {
        pj_fail(j, 504, "kv_transfer_timeout", "the KV transfer did not start before the request's deadline");
        return;
    }
    kv_status st = KV_OK;
    double t0 = time_now_s();
    kv_send *s = kv_send_begin(in->kv, &j->ticket, j->blocks, j->n_blocks, j->prompt, j->n_prompt,
                               &st, err, sizeof err);
    if (!s) {
        pj_fail(j, kv_status_http(st), "kv_transfer_failed", "the KV transfer could not start (%s): %s",
                kv_status_name(st), err);
        return;
    }
    const kv_config *kc = kv_connector_config(in->kv);
    if (kc->mode == KV_TRANSFER_LAYERWISE) { /* not streamed: layer by layer after the pass */
        int L = engine_kv_cache(in->eng)->n_layers;
        for (int l = 0; l < L && st == KV_OK; l++) st = kv_send_layer(s, l, err, sizeof err);
        if (st != KV_OK) {
            kv_send_abort(s);
            pj_fail(j, kv_status_http(st), "kv_transfer_failed", "the KV transfer failed (%s): %s",
                    kv_status_name(st), err);
            return;
        }
    }
    st = kv_send_finish(s, err, sizeof err);
    if (st != KV_OK) {
        pj_fail(j, kv_status_http(st), "kv_transfer_failed", "the KV transfer failed (%s): %s",
                kv_status_name(st), err);
        return;
    }
    double t1 = time_now_s();
    pj_succeed(j, t0, t1, t1 - t0, 0);
}

/* ---- the streamed (layerwise) transfer: one call per worker turn ---------------------- */

/* Records the stream's first failure and closes the transfer (the medium tells the
 * receiver where it can); the blocks stay held until the FINISHED event, then
 * pj_stream_finish gives them back. */
static void pj_stream_failed(internal_prefill_job *j, kv_status st, int status, const char *code,
                             const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void pj_stream_failed(internal_prefill_job *j, kv_status st, int status, const char *code,
                             const char *fmt, ...) {
    if (j->st == KV_OK) {
        j->st = st;
        j->fail_status = status;
        j->fail_code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(j->err, sizeof j->err, fmt, ap);
        va_end(ap);
    }
    if (j->send) {
        kv_send_abort(j->send);
        j->send = NULL;
    }
}

/* Opens the transfer while the step's pass starts (kv_send_begin: connect, reserve
 * store entries...). */
static void pj_stream_begin(internal_ctx *in, internal_prefill_job *j, bool stop) {
    char err[256] = "";
    kv_status st = KV_OK;
    j->begun = true;
    if (stop) {
        pj_stream_failed(j, KV_ERR_ABORTED, 503, "shutting_down", "the prefill instance is shutting down");
        return;
    }
    if (pj_http_gone(j)) {
        pj_stream_failed(j, KV_ERR_ABORTED, 499, "client_gone", "the router went away before the KV transfer");
        return;
    }
    j->t_send0 = time_now_s();
    j->send = kv_send_begin(in->kv, &j->ticket, j->stream_blocks, j->n_stream_blocks, j->prompt,
                            j->n_prompt, &st, err, sizeof err);
    j->busy_s += time_now_s() - j->t_send0;
    if (!j->send)
        pj_stream_failed(j, st, 0, "kv_transfer_failed", "the KV transfer could not start (%s): %s",
                         kv_status_name(st), err);
}

/* Ships layer l of every block of the prompt, once the pass has written it. */
static void pj_stream_layer(internal_ctx *in, internal_prefill_job *j, int l, bool stop) {
    char err[256] = "";
    j->layers_sent = l + 1;
    if (stop) {
        pj_stream_failed(j, KV_ERR_ABORTED, 503, "shutting_down", "the prefill instance is shutting down");
        return;
    }
    if (pj_http_gone(j)) {
        pj_stream_failed(j, KV_ERR_ABORTED, 499, "client_gone", "the router went away during the KV transfer");
        return;
    }
    engine_kv_layer_wait(in->eng, l); /* CUDA: the layer's kv_store has run */
    double t0 = time_now_s();
    kv_status st = kv_send_layer(j->send, l, err, sizeof err);
    j->busy_s += time_now_s() - t0;
    if (st != KV_OK) {
        pj_stream_failed(j, st, 0, "kv_transfer_failed", "the KV transfer failed at layer %d (%s): %s",
                         l, kv_status_name(st), err);
        return;
    }
    pthread_mutex_lock(&in->mu);
    if (!j->finish_ready) j->layers_early++;
    pthread_mutex_unlock(&in->mu);
    if (l == 0) pj_stall(in, j, "after its first layer");
}

/* After the FINISHED event: closes the transfer (the layers not yet shipped and the
 * completion notice) and answers; on any failure the transfer is aborted and the
 * blocks go back. */
static void pj_stream_finish(internal_ctx *in, internal_prefill_job *j, bool stop) {
    char err[256] = "";
    if (j->fin != FINISH_LENGTH || !j->got_token || !j->blocks) {
        pj_stream_failed(j, KV_ERR_ABORTED, 0, NULL, "the prefill did not finish");
        pj_fail_prefill(j, j->fin, j->fin_err);
        return;
    }
    if (stop)
        pj_stream_failed(j, KV_ERR_ABORTED, 503, "shutting_down", "the prefill instance is shutting down");
    else if (j->send && pj_http_gone(j))
        pj_stream_failed(j, KV_ERR_ABORTED, 499, "client_gone", "the router went away during the KV transfer");
    if (j->send) {
        double t0 = time_now_s();
        kv_status st = kv_send_finish(j->send, err, sizeof err); /* frees the send */
        j->send = NULL;
        j->busy_s += time_now_s() - t0;
        if (st != KV_OK)
            pj_stream_failed(j, st, 0, "kv_transfer_failed", "the KV transfer failed (%s): %s",
                             kv_status_name(st), err);
    }
    if (j->st != KV_OK) {
        int status = j->fail_status ? j->fail_status : kv_status_http(j->st);
        const char *code = j->fail_code;
        if (j->st == KV_ERR_DEADLINE) code = "kv_transfer_timeout";
        pj_fail(j, status, code ? code : "kv_transfer_failed", "%s", j->err);
        return;
    }
    pj_succeed(j, j->t_send0, time_now_s(), j->busy_s, j->layers_early);
}

/* ---- the worker ------------------------------------------------------------------------- */

typedef enum pj_action { PJ_ACT_NONE, PJ_ACT_WHOLE, PJ_ACT_BEGIN, PJ_ACT_LAYER, PJ_ACT_FINISH } pj_action;

/* What the worker can do for j now (under in->mu); *layer for PJ_ACT_LAYER. Every
 * medium keeps several transfers open at once: two of one process writing the same
 * store key (prompts sharing a prefix) are separate writers (the cpu store's writer
 * ids, the disk store's per-writer tmp files; tests/test_kv_cpu.c, same_key_writers). */
static pj_action pj_next_action(const internal_ctx *in, const internal_prefill_job *j, int *layer) {
    (void)in;
    if (!j->streaming) return j->finish_ready ? PJ_ACT_WHOLE : PJ_ACT_NONE;
    if (!j->begun) return PJ_ACT_BEGIN;
    if (j->send && j->layers_sent < j->layers_ready) {
        *layer = j->layers_sent;
        return PJ_ACT_LAYER;
    }
    return j->finish_ready ? PJ_ACT_FINISH : PJ_ACT_NONE;
}

/* One thread for every blocking transfer call. Each turn it takes the first job on its
 * list (arrival order) that has work: a streaming job's begin, next layer or finish,
 * or a whole job's transfer; a job leaves the list when it is answered. On stop, what
 * is left is failed (the engine has stopped already: every job has its FINISHED). */
static void *worker_main(void *arg) {
    internal_ctx *in = arg;
    pthread_mutex_lock(&in->mu);
    for (;;) {
        internal_prefill_job *j = NULL, *prev = NULL;
        pj_action act = PJ_ACT_NONE;
        int layer = 0;
        for (internal_prefill_job *p = NULL, *x = in->q_head; x; p = x, x = x->next_q) {
            act = pj_next_action(in, x, &layer);
            if (act != PJ_ACT_NONE) {
                j = x;
                prev = p;
                break;
            }
        }
        if (!j) {
            if (in->stop) break;
            pthread_cond_wait(&in->cv, &in->mu);
            continue;
        }
        if (act == PJ_ACT_WHOLE || act == PJ_ACT_FINISH) { /* its last turn: off the list */
            if (prev) prev->next_q = j->next_q;
            else in->q_head = j->next_q;
            if (in->q_tail == j) in->q_tail = prev;
            j->next_q = NULL;
        }
        bool stop = in->stop;
        pthread_mutex_unlock(&in->mu);
        switch (act) {
        case PJ_ACT_WHOLE:
            if (stop) pj_fail(j, 503, "shutting_down", "the prefill instance is shutting down");
            else pj_transfer(in, j);
            break;
        case PJ_ACT_BEGIN: pj_stream_begin(in, j, stop); break;
        case PJ_ACT_LAYER: pj_stream_layer(in, j, layer, stop); break;
        case PJ_ACT_FINISH: pj_stream_finish(in, j, stop); break;
        default: PD_ASSERT(0);
        }
        pthread_mutex_lock(&in->mu);
    }
    pthread_mutex_unlock(&in->mu);
    return NULL;
}

/* Drops kept prompts whose reservation is past its deadline (under in->mu); every
 * one when now is INT64_MAX. */
static void kept_prune(internal_ctx *in, int64_t now) {
    for (kept_prompt **pp = &in->kept; *pp;) {
        kept_prompt *k = *pp;
        if (now < k->deadline_ms + 1000) {
            pp = &k->next;
            continue;
        }
        *pp = k->next;
        in->n_kept--;
        free(k->ids);
        free(k);
    }
}

/* Takes the kept prompt of ticket t off the list (under in->mu); NULL when none. */
static kept_prompt *kept_take(internal_ctx *in, const kv_ticket *t) {
    for (kept_prompt **pp = &in->kept; *pp; pp = &(*pp)->next) {
        kept_prompt *k = *pp;
        if (k->ticket_id == t->id && k->request_id == t->request_id) {
            *pp = k->next;
            in->n_kept--;
            return k;
        }
    }
    return NULL;
}

/* Takes off the worker's list every whole transfer that has not started and whose
 * deadline has passed (under in->mu): returned as a list (next_q), the caller's to fail.
 * The worker runs one transfer at a time, and a medium's operation in progress (a disk
 * put of a long prompt takes seconds) does not stop at another request's deadline, so a
 * job queued behind it would otherwise be answered only when the worker reached it,
 * late: its router would have given up on it by then. */
static internal_prefill_job *late_queued(internal_ctx *in, int64_t now) {
    internal_prefill_job *late = NULL, *prev = NULL;
    for (internal_prefill_job **pp = &in->q_head; *pp;) {
        internal_prefill_job *x = *pp;
        if (!x->streaming && x->finish_ready && now >= x->ticket.deadline_ms) {
            *pp = x->next_q;
            if (in->q_tail == x) in->q_tail = prev;
            x->next_q = late;
            late = x;
            continue;
        }
        prev = x;
        pp = &x->next_q;
    }
    return late;
}

/* Ticker: prefills past their deadline are aborted (their FINISHED event answers);
 * whole transfers still waiting for the worker past it are answered (late_queued); the
 * connector expires reservations and reclaims what dead peers left. */
static void *ticker_main(void *arg) {
    internal_ctx *in = arg;
    for (;;) {
        pthread_mutex_lock(&in->mu);
        if (in->stop) {
            pthread_mutex_unlock(&in->mu);
            break;
        }
        int64_t now = wall_ms();
        uint64_t late[64];
        int n_late = 0;
        for (internal_prefill_job *j = in->active; j && n_late < 64; j = j->next_a)
            if (j->stage == PJ_PREFILL && !j->aborted_deadline && now >= j->ticket.deadline_ms) {
                j->aborted_deadline = true;
                late[n_late++] = j->engine_id;
            }
        internal_prefill_job *waited = late_queued(in, now);
        kept_prune(in, now);
        pthread_mutex_unlock(&in->mu);
        for (int i = 0; i < n_late; i++) engine_abort(in->eng, late[i]);
        while (waited) {
            internal_prefill_job *n = waited->next_q;
            waited->next_q = NULL;
            pj_fail(waited, 504, "kv_transfer_timeout", "the KV transfer did not start before the "
                    "request's deadline (the transfer worker was busy with earlier requests' transfers)");
            waited = n;
        }
        if (in->kv) kv_connector_tick(in->kv);
        usleep(INTERNAL_TICK_MS * 1000);
    }
    return NULL;
}

internal_prefill_job *internal_prefill_start(internal_ctx *in, const engine_request *r,
                                             const char *ticket_text, server_reply *reply,
                                             uint64_t *id, api_error *e) {
    char err[256] = "";
    internal_prefill_job *j = xcalloc(1, sizeof *j);
    if (!ticket_text || kv_ticket_parse(ticket_text, &j->ticket, err, sizeof err)) {
        api_error_set(e, 400, "invalid_request_error", NULL, "bad or missing X-PD-Ticket: %s", err);
        free(j);
        return NULL;
    }
    int bs = engine_kv_cache(in->eng)->block_size;
    if (j->ticket.n_tokens != r->n_prompt || j->ticket.block_size != bs ||
        j->ticket.n_blocks != (r->n_prompt + bs - 1) / bs) {
        api_error_set(e, 400, "invalid_request_error", NULL,
                      "the ticket is for %d tokens in %d blocks of %d, but the prompt has %d tokens "
                      "and blocks here hold %d (different tokenizers or block sizes?)",
                      j->ticket.n_tokens, j->ticket.n_blocks, j->ticket.block_size, r->n_prompt, bs);
        free(j);
        return NULL;
    }
    j->in = in;
    pthread_mutex_init(&j->mu, NULL);
    j->refs = 2;
    j->prompt = xmalloc(sizeof(int32_t) * (size_t)r->n_prompt);
    memcpy(j->prompt, r->prompt, sizeof(int32_t) * (size_t)r->n_prompt);
    j->n_prompt = r->n_prompt;
    j->logprobs = r->sp.logprobs;
    j->reply = reply;
    j->t_start = time_now_s();
    j->stage = PJ_PREFILL;
    pthread_mutex_lock(&in->mu);
    j->next_a = in->active;
    if (in->active) in->active->prev_a = j;
    in->active = j;
    in->n_active++;
    pthread_mutex_unlock(&in->mu);

    engine_request er = *r;
    er.on_event = pj_on_event;
    er.user = j;
    er.prefill_only = true;
    if (kv_connector_config(in->kv)->mode == KV_TRANSFER_LAYERWISE) er.kv_stream = &PJ_KV_STREAM;
    /* Events may come before submit returns; the ticker reads engine_id under in->mu. */
    pthread_mutex_lock(&in->mu);
    uint64_t eid = engine_submit(in->eng, &er, err, sizeof err);
    j->engine_id = eid;
    pthread_mutex_unlock(&in->mu);
    if (eid == 0) {
        pthread_mutex_lock(&in->mu);
        if (j->prev_a) j->prev_a->next_a = j->next_a;
        else in->active = j->next_a;
        if (j->next_a) j->next_a->prev_a = j->prev_a;
        in->n_active--;
        pthread_mutex_unlock(&in->mu);
        api_error_set(e, strstr(err, "waiting") ? 503 : 400, strstr(err, "waiting") ? "server_error"
                      : "invalid_request_error", NULL, "%s", err);
        pthread_mutex_destroy(&j->mu);
        free(j->prompt);
        free(j);
        return NULL;
    }
    *id = eid;
    return j;
}

void internal_prefill_detach(internal_prefill_job *j) {
    if (!j) return;
    pthread_mutex_lock(&j->mu);
    j->http_gone = true;
    pthread_mutex_unlock(&j->mu);
    pj_unref(j);
}

/* ---- decode side ------------------------------------------------------------------------- */
int internal_reserve(internal_ctx *in, const char *rid, const int32_t *ids, int n,
                     double timeout_s, uint64_t body_hash, sbuf *out, api_error *e) {
    char err[256] = "";
    kv_ticket t;
    uint64_t req_id = hash_bytes(rid ? rid : "", rid ? strlen(rid) : 0, 0x70647276ull);
    if (timeout_s <= 0) timeout_s = in->timeout_s;
    kv_status st = kv_reserve(in->kv, req_id, ids, n, timeout_s, &t, err, sizeof err);
    if (st != KV_OK) {
        if (st == KV_ERR_FULL) {
            api_error_set(e, 503, "server_error", NULL,
                          "the decode instance has no room for the KV of %d prompt tokens now: %s", n, err);
            e->code = "kv_cache_full";
        } else {
            api_error_set(e, 500, "server_error", NULL, "KV reservation failed (%s): %s",
                          kv_status_name(st), err);
        }
        return -1;
    }
    char text[KV_TICKET_TEXT_MAX];
    if (kv_ticket_format(&t, text, sizeof text) < 0) {
        kv_ticket_cancel(in->kv, &t);
        api_error_set(e, 500, "server_error", NULL, "the KV ticket does not fit its text form");
        return -1;
    }
    kept_prompt *k = xcalloc(1, sizeof *k);
    k->ticket_id = t.id;
    k->request_id = t.request_id;
    k->body_hash = body_hash;
    k->deadline_ms = t.deadline_ms;
    k->ids = xmalloc(sizeof(int32_t) * (size_t)n);
    memcpy(k->ids, ids, sizeof(int32_t) * (size_t)n);
    k->n = n;
    pthread_mutex_lock(&in->mu);
    if (in->n_kept < INTERNAL_MAX_KEPT_PROMPTS) {
        k->next = in->kept;
        in->kept = k;
        in->n_kept++;
        k = NULL;
    }
    pthread_mutex_unlock(&in->mu);
    if (k) {
        free(k->ids);
        free(k);
    }
    sbuf_puts(out, "{\"ticket\":");
    sbuf_json_str(out, text, strlen(text));
    sbuf_printf(out, ",\"n_prompt\":%d,\"blocks\":%d,\"prompt_ids\":\"", n, t.n_blocks);
    prompt_ids_text_format(out, ids, n);
    sbuf_puts(out, "\"}");
    return 0;
}

void internal_release(internal_ctx *in, const char *ticket_text) {
    kv_ticket t;
    char err[128];
    if (!ticket_text || kv_ticket_parse(ticket_text, &t, err, sizeof err)) return;
    pthread_mutex_lock(&in->mu);
    kept_prompt *k = kept_take(in, &t);
    pthread_mutex_unlock(&in->mu);
    if (k) free(k->ids);
    free(k);
    kv_ticket_cancel(in->kv, &t);
}

int internal_decode_prompt(internal_ctx *in, const char *ticket_text, uint64_t body_hash,
                           int32_t **ids, int *n) {
    kv_ticket t;
    char err[128];
    if (!ticket_text || kv_ticket_parse(ticket_text, &t, err, sizeof err)) return -1;
    pthread_mutex_lock(&in->mu);
    kept_prompt *k = kept_take(in, &t);
    pthread_mutex_unlock(&in->mu);
    if (!k) return -1;
    int rc = -1;
    if (k->body_hash == body_hash && k->n == t.n_tokens) {
        *ids = k->ids;
        *n = k->n;
        k->ids = NULL;
        rc = 0;
    }
    free(k->ids);
    free(k);
    return rc;
}

/* Parses X-PD-First; -1 on anything malformed. */
static int first_parse(const char *s, int logprobs, engine_first_token *f) {
    memset(f, 0, sizeof *f);
    char *end;
    long tok = strtol(s, &end, 10);
    if (end == s || tok < 0 || tok > INT32_MAX) return -1;
    f->token = (int32_t)tok;
    if (*end == 0) return logprobs >= 0 ? -1 : 0;
    if (*end != ';') return -1;
    s = end + 1;
    f->logprob = strtof(s, &end);
    if (end == s || *end != ';') return -1;
    s = end + 1;
    while (*s && f->n_top < SAMPLING_MAX_LOGPROBS) {
        long id = strtol(s, &end, 10);
        if (end == s || *end != ':' || id < 0 || id > INT32_MAX) return -1;
        s = end + 1;
        float lp = strtof(s, &end);
        if (end == s) return -1;
        f->top[f->n_top].id = (int32_t)id;
        f->top[f->n_top].logprob = lp;
        f->n_top++;
        s = end;
        if (*s == ',') s++;
        else if (*s) return -1;
    }
    return *s ? -1 : 0;
}

bool internal_decode_reads(const char *ticket_text) {
    kv_ticket t;
    char err[128];
    if (!ticket_text || kv_ticket_parse(ticket_text, &t, err, sizeof err)) return false;
    return t.medium == KV_MEDIUM_CPU || t.medium == KV_MEDIUM_DISK;
}

uint64_t internal_decode_submit(internal_ctx *in, const engine_request *r, const char *ticket_text,
                                const char *first_text, const char *cached_text, double *waited_s,
                                api_error *e) {
    char err[256] = "";
    kv_ticket t;
    engine_first_token first;
    if (!ticket_text || kv_ticket_parse(ticket_text, &t, err, sizeof err)) {
        api_error_set(e, 400, "invalid_request_error", NULL, "bad or missing X-PD-Ticket: %s", err);
        return 0;
    }
    if (!first_text || first_parse(first_text, r->sp.logprobs, &first)) {
        kv_ticket_cancel(in->kv, &t);
        api_error_set(e, 400, "invalid_request_error", NULL, "bad or missing X-PD-First");
        return 0;
    }
    if (cached_text) {
        char *end;
        long c = strtol(cached_text, &end, 10);
        if (end == cached_text || *end || c < 0 || c > r->n_prompt) {
            kv_ticket_cancel(in->kv, &t);
            api_error_set(e, 400, "invalid_request_error", NULL, "bad X-PD-Cached-Tokens");
            return 0;
        }
        first.n_cached = (int)c;
    }
    if (t.n_tokens != r->n_prompt) {
        kv_ticket_cancel(in->kv, &t);
        api_error_set(e, 400, "invalid_request_error", NULL,
                      "the ticket is for %d prompt tokens but the request has %d", t.n_tokens, r->n_prompt);
        return 0;
    }
    double left = (double)(t.deadline_ms - wall_ms()) / 1000.0;
    double t0 = time_now_s();
    kv_status st = kv_ticket_wait(in->kv, &t, PD_MAX(left, 0.0) + 0.05, err, sizeof err);
    *waited_s = time_now_s() - t0;
    log_debug("internal: request %llu: KV waited for %.2f ms (%s)", (unsigned long long)t.request_id,
              *waited_s * 1e3, kv_status_name(st));
    if (st == KV_ERR_CORRUPT) {
        /* a block failed its checksum: never served; this instance recomputes the
         * prompt instead (its blocks are already back in the pool) */
        kv_ticket_cancel(in->kv, &t);
        log_warn("internal: request %llu: %s: recomputing its prompt here",
                 (unsigned long long)t.request_id, err);
        uint64_t id = engine_submit_prefilled(in->eng, r, NULL, 0, &first, err, sizeof err);
        if (id == 0) {
            bool busy = strstr(err, "waiting") != NULL;
            api_error_set(e, busy ? 503 : 400, busy ? "server_error" : "invalid_request_error", NULL, "%s", err);
        }
        return id;
    }
    if (st != KV_OK) {
        kv_ticket_cancel(in->kv, &t);
        api_error_set(e, st == KV_ERR_DEADLINE || st == KV_PENDING ? 504 : 502, "server_error", NULL,
                      "the prompt's KV did not arrive (%s)%s%s", kv_status_name(st), err[0] ? ": " : "", err);
        e->code = st == KV_ERR_DEADLINE || st == KV_PENDING ? "kv_transfer_timeout" : "kv_transfer_failed";
        return 0;
    }
    int32_t *blocks = xmalloc(sizeof(int32_t) * (size_t)PD_MAX(t.n_blocks, 1));
    int n = kv_ticket_take(in->kv, &t, blocks, t.n_blocks);
    if (n < 0) {
        free(blocks);
        kv_ticket_cancel(in->kv, &t);
        api_error_set(e, 500, "server_error", NULL, "the KV reservation ended before it could be taken");
        return 0;
    }
    uint64_t id = engine_submit_prefilled(in->eng, r, blocks, n, &first, err, sizeof err);
    free(blocks);
    if (id == 0) {
        bool busy = strstr(err, "waiting") != NULL;
        api_error_set(e, busy ? 503 : 400, busy ? "server_error" : "invalid_request_error", NULL, "%s", err);
    }
    return id;
}

/* ---- roles ------------------------------------------------------------------------------------ */
const char *server_role_name(server_role r) {
    switch (r) {
    case SERVER_ROLE_PREFILL: return "prefill";
    case SERVER_ROLE_DECODE: return "decode";
    case SERVER_ROLE_ROUTER: return "router";
    default: return "colocated";
    }
}

int server_role_parse(const char *s, server_role *out) {
    if (!strcmp(s, "colocated")) *out = SERVER_ROLE_COLOCATED;
    else if (!strcmp(s, "prefill")) *out = SERVER_ROLE_PREFILL;
    else if (!strcmp(s, "decode")) *out = SERVER_ROLE_DECODE;
    else if (!strcmp(s, "router")) *out = SERVER_ROLE_ROUTER;
    else return -1;
    return 0;
}

/* ---- life cycle ---------------------------------------------------------------------------- */
void internal_kv_totals_get(internal_ctx *in, internal_kv_totals *out) {
    pthread_mutex_lock(&in->mu);
    *out = in->kv_totals;
    pthread_mutex_unlock(&in->mu);
    kv_store_stats ps;
    kv_store_get_put_times(in->kv, &ps);
    out->store_sends = ps.sends;
    memcpy(out->put_s, ps.put_s, sizeof out->put_s);
    out->store_gets = ps.gets;
    memcpy(out->get_s, ps.get_s, sizeof out->get_s);
}

internal_ctx *internal_create(engine *e, kv_connector *kv, server_role role, double timeout_s,
                              int stall_ms) {
    internal_ctx *in = xcalloc(1, sizeof *in);
    in->eng = e;
    in->kv = kv;
    in->role = role;
    in->timeout_s = timeout_s > 0 ? timeout_s : 30.0;
    in->stall_ms = stall_ms;
    pthread_mutex_init(&in->mu, NULL);
    pthread_cond_init(&in->cv, NULL);
    if (role == SERVER_ROLE_PREFILL && pthread_create(&in->worker, NULL, worker_main, in) == 0)
        in->worker_started = true;
    if (pthread_create(&in->ticker, NULL, ticker_main, in) == 0) in->ticker_started = true;
    return in;
}

int internal_active(internal_ctx *in) {
    pthread_mutex_lock(&in->mu);
    int n = in->n_active;
    pthread_mutex_unlock(&in->mu);
    return n + (in->kv ? kv_connector_active(in->kv) : 0);
}

void internal_free(internal_ctx *in) {
    if (!in) return;
    pthread_mutex_lock(&in->mu);
    in->stop = true;
    pthread_cond_broadcast(&in->cv);
    pthread_mutex_unlock(&in->mu);
    if (in->worker_started) pthread_join(in->worker, NULL);
    if (in->ticker_started) pthread_join(in->ticker, NULL);
    kept_prune(in, INT64_MAX - 1000);
    pthread_mutex_destroy(&in->mu);
    pthread_cond_destroy(&in->cv);
    free(in);
}
