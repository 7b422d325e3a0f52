/* http.c: the OpenAI-compatible HTTP server of one instance, on libmicrohttpd.
 *
 * Threads and hand-offs (tuned for hundreds of concurrent SSE streams):
 *   - MHD worker threads (a small pool, epoll each) parse requests, tokenize, submit
 *     to the engine, and produce every byte of output (detokenisation, stop strings,
 *     JSON). A request waiting for tokens is *suspended* in MHD: no thread blocks on
 *     it and nothing polls it.
 *   - The engine thread's event callback only copies the event into the request's
 *     queue and, when the connection is suspended, resumes it (one mutex, no
 *     allocation in steady state, never blocks on the network).
 *   - A watcher thread epolls the sockets of running requests for a peer hang-up
 *     (EPOLLRDHUP) and calls engine_abort at once, so a client that goes away frees
 *     its KV blocks within a step even while its connection is suspended (MHD itself
 *     does not see disconnects of suspended connections).
 *
 * Lifetime of a generation (gen_req): two references, the HTTP side's (dropped in
 * MHD's request-completed callback) and the engine's (dropped on its FINISHED event);
 * whichever is last frees it. When the HTTP side goes first, it aborts the engine
 * request. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "power/power.h"
#include "server/server.h"
#include "util/util.h"

#define DEFAULT_MAX_BODY (8u << 20)
#define STREAM_BLOCK (16 * 1024)
/* Slow readers: a stream whose client has not taken this many engine events (tokens)
 * is aborted (its KV blocks go back at once) and ends with an error event, so one
 * connection holds at most about backlog * sizeof(gen_event) (~0.75 MiB at the default)
 * plus the socket buffers, however slowly it reads. A client that reads nothing at all
 * is also closed by MHD after the connection timeout (server_config.http_timeout_s).
 * A client that keeps up never comes near it: it takes the queue at every step. */
#define DEFAULT_STREAM_BACKLOG 2048
/* Kernel send buffer of each connection (the kernel doubles it): fixed rather than
 * autotuned up to tcp_wmem's 4 MiB, so that a client that does not read costs at most
 * this much kernel memory, and its backlog reaches the cap above instead of hiding in
 * the socket. Tokens are small; 128 KiB keeps a stream at full speed on any LAN. */
#define CONN_SNDBUF (128 * 1024)
#define DEFAULT_HTTP_TIMEOUT_S 60u

typedef enum route_id {
    ROUTE_HEALTH, ROUTE_METRICS, ROUTE_MODELS, ROUTE_VERSION, ROUTE_COMPLETIONS, ROUTE_CHAT,
    ROUTE_TOKENIZE, ROUTE_DETOKENIZE, ROUTE_LOAD, ROUTE_INT_RESERVE, ROUTE_INT_PREFILL,
    ROUTE_INT_DECODE, ROUTE_INT_RELEASE, ROUTE_POWER_SAMPLES
} route_id;

typedef struct route {
    const char *path;
    const char *method;
    route_id id;
    bool auth;              /* under --api-key: every /v1 path, /tokenize, /detokenize */
    int internal;           /* 0, or the role (server_role) that serves it: under --internal-secret */
} route;

static const route ROUTES[] = {
    {"/health", "GET", ROUTE_HEALTH, false, 0},
    {"/metrics", "GET", ROUTE_METRICS, false, 0},
    {"/version", "GET", ROUTE_VERSION, false, 0},
    {"/v1/models", "GET", ROUTE_MODELS, true, 0},
    {"/v1/completions", "POST", ROUTE_COMPLETIONS, true, 0},
    {"/v1/chat/completions", "POST", ROUTE_CHAT, true, 0},
    {"/tokenize", "POST", ROUTE_TOKENIZE, true, 0},     /* the model's tokenizer: public API */
    {"/detokenize", "POST", ROUTE_DETOKENIZE, true, 0},
    {"/load", "GET", ROUTE_LOAD, false, 0},
    /* the power sampler's rings (a sweep's per-point record): the internal secret or the
     * API key when either is set (power_samples_allowed) */
    {"/metrics/power-samples", "GET", ROUTE_POWER_SAMPLES, false, 0},
    /* disaggregated serving: called by the router only (internal.c) */
    {"/internal/reserve", "POST", ROUTE_INT_RESERVE, false, SERVER_ROLE_DECODE},
    {"/internal/decode", "POST", ROUTE_INT_DECODE, false, SERVER_ROLE_DECODE},
    {"/internal/release", "POST", ROUTE_INT_RELEASE, false, SERVER_ROLE_DECODE},
    {"/internal/prefill", "POST", ROUTE_INT_PREFILL, false, SERVER_ROLE_PREFILL},
};

/* A deferred answer (internal.c answers /internal/prefill when the KV is shipped). */
struct server_reply {
    pthread_mutex_t mu;
    int refs;                    /* the HTTP side's and the sender's */
    bool done, suspended, gone;
    int status;
    sbuf body;
    struct MHD_Connection *conn;
    server *srv;                 /* counts it in n_replies until it is sent */
};

/* One engine event as queued for the HTTP side (top copied only when asked for). */
typedef struct gen_event {
    engine_event_kind kind;
    int32_t token;
    float logprob;
    int n_top;
    token_logprob top[SAMPLING_MAX_LOGPROBS];
    finish_reason finish;
    int32_t stop_token;
    int n_prompt, n_output, n_cached;
    bool has_timing;
    api_timing timing;
    char error[160];
} gen_event;

typedef struct gen_req gen_req;

struct server {
    char *host, *served_name, *api_key;
    size_t max_body;
    int max_waiting;
    int stream_backlog;          /* tokens a stream's client may leave unread (see above) */
    engine *eng;                 /* not owned */
    const tokenizer *tok;        /* not owned */
    api_limits lim_gen;          /* token ids must fit the model */
    api_limits lim_tok;          /* detokenize: ids of the tokenizer */
    int max_model_len;
    int32_t eos[MODEL_MAX_EOS + 1];
    int n_eos;
    struct MHD_Daemon *d;
    int port;
    int listen_fd;               /* the quiesced listening socket, closed after MHD_stop_daemon
                                    (MHD's threads may still use it until then); -1: none */
    server_metrics *metrics;
    atomic_bool shutting_down;
    atomic_uint_fast64_t n_ids;
    uint64_t id_salt;
    pthread_mutex_t mu;          /* guards the active list */
    pthread_cond_t drained;      /* n_active + n_replies reached 0 */
    int n_replies;               /* deferred internal replies not yet sent (their
                                    connections may be suspended in MHD), under mu */
    int n_djobs;                 /* deferred /internal/decode waits running (decode_defer) */
    gen_req *active;             /* generations whose HTTP side is alive */
    int n_active;
    int epfd, wake_fd;           /* disconnect watcher */
    pthread_t watcher;
    bool watcher_started;
    bool stopped;
    server_role role;
    internal_ctx *in;            /* prefill / decode: owned */
    char *secret;                /* --internal-secret, or NULL */
    struct power_session *power; /* energy meters for /metrics (not owned) */
};

struct gen_req {
    /* ---- shared between the engine thread and the HTTP side, under mu ---- */
    pthread_mutex_t mu;
    int refs;
    gen_event *q, *q_spare;      /* engine appends to q; HTTP swaps and reads q_spare */
    int q_len, q_cap, q_spare_cap;
    bool suspended;              /* the connection waits in MHD for our resume */
    bool wake_per_token;         /* streams and stop strings: wake per token; else at end */
    bool http_gone;
    bool stop_aborted;           /* the HTTP side aborted it on a stop string */
    bool overflowed;             /* stream: the client fell srv->stream_backlog tokens behind */
    struct MHD_Connection *conn;
    server *srv;
    uint64_t engine_id;
    gen_req *prev, *next;        /* srv->active (under srv->mu) */
    /* set before the engine sees the request, read at its FINISHED (pdserve_timing) */
    double t_in;                 /* the handler's start (monotonic) */
    bool dis;                    /* /internal/decode: a disaggregated request */
    bool has_dis_timing;         /* ... whose router sent X-PD-Timing (dis_timing) */
    api_dis_timing dis_timing;
    double kv_wait_s;            /* ... and how long it waited here for its KV */

    /* ---- HTTP side only ---- */
    api_request req;
    char id[48];
    api_out_ctx oc;
    detok_stream ds;
    stop_filter sf;
    bool have_deferred;          /* a possible eos/stop token waiting for the next event */
    gen_event deferred;
    int n_out;                   /* output tokens consumed */
    api_lp_item *lps;            /* logprobs not yet sent (stream) or all (full) */
    int n_lps, cap_lps;
    sbuf pend;                   /* stream: text of the chunk being gathered */
    size_t text_sent;            /* stream: bytes of text sent so far */
    bool role_sent;
    bool final_queued;           /* every byte of the response is in out */
    int status;                  /* full: HTTP status of the final response */
    sbuf out;                    /* bytes not yet handed to MHD */
    size_t out_off;
};

/* Per-request state of MHD (its con_cls). */
typedef struct conn_ctx {
    const route *rt;
    bool rejected;               /* answer `reject` once the body has been read */
    api_error reject;
    const char *reject_hname, *reject_hval; /* static */
    bool too_big;
    sbuf body;
    gen_req *g;
    server_reply *reply;         /* /internal/prefill */
    internal_prefill_job *pjob;
    struct decode_job *dj;       /* /internal/decode waiting off the HTTP threads */
} conn_ctx;

/* ---- small helpers -------------------------------------------------------------------- */
static enum MHD_Result respond(struct MHD_Connection *conn, int status, const char *ctype,
                               const char *data, size_t len, const char *hname, const char *hval) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, (void *)data, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    if (ctype) MHD_add_response_header(r, "Content-Type", ctype);
    if (hname) MHD_add_response_header(r, hname, hval);
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result respond_json(struct MHD_Connection *conn, int status, const sbuf *b) {
    return respond(conn, status, "application/json", b->p ? b->p : "", b->len, NULL, NULL);
}

static enum MHD_Result respond_error_h(struct MHD_Connection *conn, const api_error *e,
                                       const char *hname, const char *hval) {
    sbuf b;
    sbuf_init(&b);
    api_error_json(&b, e);
    enum MHD_Result r = respond(conn, e->status, "application/json", b.p, b.len, hname, hval);
    sbuf_free(&b);
    return r;
}

static enum MHD_Result respond_error(struct MHD_Connection *conn, const api_error *e) {
    return respond_error_h(conn, e, NULL, NULL);
}

static char *token_text(void *user, int32_t id, size_t *len) {
    return tokenizer_decode((const tokenizer *)user, &id, 1, false, len);
}

static bool str_eq_ct(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = (unsigned char)(la != lb);
    for (size_t i = 0; i < la; i++) d |= (unsigned char)(a[i] ^ b[i % (lb ? lb : 1)]);
    return d == 0;
}

/* ---- the engine side ------------------------------------------------------------------ */
static void gen_free(gen_req *g) {
    pthread_mutex_destroy(&g->mu);
    free(g->q);
    free(g->q_spare);
    api_request_free(&g->req);
    if (g->ds.tok) detok_free(&g->ds);
    stop_filter_free(&g->sf);
    free(g->lps);
    sbuf_free(&g->pend);
    sbuf_free(&g->out);
    free(g);
}

static metrics_reason reason_of(finish_reason f, bool stop_aborted) {
    switch (f) {
    case FINISH_STOP: return METRICS_REASON_STOP;
    case FINISH_LENGTH: return METRICS_REASON_LENGTH;
    case FINISH_ABORT: return stop_aborted ? METRICS_REASON_STOP : METRICS_REASON_ABORT;
    default: return METRICS_REASON_ERROR;
    }
}

/* pdserve_timing of a finished request (engine thread; g's timing fields were set
 * before the engine saw it). Colocated: parse (the handler's start .. the engine's
 * arrival: body parse, tokenization), queue, prefill (first scheduled .. first token).
 * Disaggregated (this is the decode instance): the router's and the prefill instance's
 * phases from X-PD-Timing, then decode_wait (for the KV here) and decode (the handler's
 * start .. the first token out, less that wait). */
static void timing_of(const gen_req *g, const request_times *t, api_timing *o) {
    memset(o, 0, sizeof *o);
    o->ttft_s = t->first_token >= 0 ? t->first_token - t->arrival : -1;
    o->e2e_s = t->finished - t->arrival;
    o->queue_s = t->first_scheduled >= 0 ? t->first_scheduled - t->arrival : -1;
    o->n_preemptions = t->n_preemptions;
    if (!g->dis) {
        api_timing_add(o, "parse", t->arrival - g->t_in);
        if (t->first_scheduled >= 0) api_timing_add(o, "queue", t->first_scheduled - t->arrival);
        if (t->first_token >= 0 && t->first_scheduled >= 0)
            api_timing_add(o, "prefill", t->first_token - t->first_scheduled);
        return;
    }
    const api_dis_timing *d = &g->dis_timing;
    if (g->has_dis_timing) {
        api_timing_add(o, "reserve", d->reserve_s);
        api_timing_add(o, "prefill_hop", d->prefill_call_s - (d->queue_s + d->prefill_s + d->kv_queue_s + d->kv_s));
        api_timing_add(o, "queue", d->queue_s);
        api_timing_add(o, "prefill", d->prefill_s);
        if (d->has_kv_queue) api_timing_add(o, "kv_queue", d->kv_queue_s);
        api_timing_add(o, "kv", d->kv_s);
        o->queue_s = d->queue_s;
    }
    api_timing_add(o, "decode_wait", g->kv_wait_s);
    if (t->first_token >= 0) api_timing_add(o, "decode", t->first_token - g->t_in - g->kv_wait_s);
    if (g->has_dis_timing) {
        double before = d->reserve_s + d->prefill_call_s;
        o->ttft_s = t->first_token >= 0 ? before + t->first_token - g->t_in : -1;
        o->e2e_s = before + t->finished - g->t_in;
    }
}

/* Engine thread: copy the event, resume the connection if it waits for it. Never
 * blocks beyond the request's own mutex. */
static void on_engine_event(void *user, const engine_event *ev) {
    gen_req *g = user;
    bool finished = ev->kind == ENGINE_EVENT_FINISHED;
    bool wake = false, last = false, stop_aborted, overflow = false;
    struct MHD_Connection *conn;
    pthread_mutex_lock(&g->mu);
    if (!finished && g->req.stream && (g->overflowed || g->q_len >= g->srv->stream_backlog)) {
        overflow = !g->overflowed; /* drop the token; abort once (the FINISHED event still queues) */
        g->overflowed = true;
    } else if (!g->http_gone) {
        if (g->q_len == g->q_cap) {
            g->q_cap = g->q_cap ? g->q_cap * 2 : 16;
            g->q = xrealloc(g->q, sizeof(gen_event) * (size_t)g->q_cap);
        }
        gen_event *q = &g->q[g->q_len++];
        q->kind = ev->kind;
        if (finished) {
            q->finish = ev->finish;
            q->stop_token = ev->stop_token;
            q->n_prompt = ev->n_prompt;
            q->n_output = ev->n_output;
            q->n_cached = ev->n_cached;
            q->has_timing = ev->times != NULL && g->req.pdserve_timing; /* asked for (req is fixed by now) */
            if (q->has_timing) timing_of(g, ev->times, &q->timing);
            snprintf(q->error, sizeof q->error, "%s", ev->error ? ev->error : "");
        } else {
            q->token = ev->token;
            q->logprob = ev->logprob;
            q->n_top = g->req.sp.logprobs > 0 && ev->top ? PD_MIN(ev->n_top, SAMPLING_MAX_LOGPROBS) : 0;
            if (q->n_top) memcpy(q->top, ev->top, sizeof(token_logprob) * (size_t)q->n_top);
        }
        wake = g->suspended && (finished || g->wake_per_token);
        if (wake) g->suspended = false;
    }
    stop_aborted = g->stop_aborted;
    conn = g->conn;
    server_metrics *metrics = g->srv->metrics;
    engine *eng = g->srv->eng;
    int backlog = g->srv->stream_backlog;
    if (finished) last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    /* From here g may be gone (unless last): only locals. The connection is still
     * suspended in MHD until this call, so it cannot be gone. */
    if (wake) MHD_resume_connection(conn);
    if (overflow) {
        log_warn("serve: the client of request %llu fell %d tokens behind its stream: aborting it",
                 (unsigned long long)ev->request_id, backlog);
        engine_abort(eng, ev->request_id); /* safe: the engine holds no lock here */
    }
    if (finished) metrics_observe_request(metrics, ev->times, ev->n_output,
                                          reason_of(ev->finish, stop_aborted));
    if (last) gen_free(g);
}

/* ---- output processing (HTTP side) --------------------------------------------------------- */
static bool is_stopper(const gen_req *g, int32_t id) {
    const sampling_params *sp = &g->req.sp;
    for (int i = 0; i < sp->n_stop_token_ids; i++)
        if (sp->stop_token_ids[i] == id) return true;
    if (!sp->ignore_eos)
        for (int i = 0; i < g->srv->n_eos; i++)
            if (g->srv->eos[i] == id) return true;
    return false;
}

static void push_lp(gen_req *g, const gen_event *ev) {
    if (g->req.sp.logprobs < 0) return;
    if (g->n_lps == g->cap_lps) {
        g->cap_lps = g->cap_lps ? g->cap_lps * 2 : 16;
        g->lps = xrealloc(g->lps, sizeof(api_lp_item) * (size_t)g->cap_lps);
    }
    api_lp_item *it = &g->lps[g->n_lps++];
    it->id = ev->token;
    it->logprob = ev->logprob;
    it->n_top = ev->n_top;
    if (ev->n_top) memcpy(it->top, ev->top, sizeof(token_logprob) * (size_t)ev->n_top);
}

/* Text from the detokenizer through the stop filter into the pending chunk. */
static void take_text(gen_req *g, const char *txt, size_t n, bool final) {
    const char *emit;
    size_t elen;
    if (stop_filter_push(&g->sf, txt, n, final, &emit, &elen)) {
        pthread_mutex_lock(&g->mu);
        g->stop_aborted = true;
        pthread_mutex_unlock(&g->mu);
        engine_abort(g->srv->eng, g->engine_id);
    }
    if (g->req.stream && elen) sbuf_append(&g->pend, emit, elen);
}

static void process_token(gen_req *g, const gen_event *ev) {
    if (g->sf.stopped) return;   /* tokens after a stop string are dropped */
    g->n_out++;
    push_lp(g, ev);
    char *txt = NULL;
    size_t n = 0;
    detok_push(&g->ds, ev->token, &txt, &n);
    take_text(g, txt ? txt : "", n, false);
    free(txt);
}

/* The deferred eos/stop token: dropped from the text when the FINISHED event says it
 * ended the request (as vLLM does), otherwise an ordinary token. */
static void flush_deferred(gen_req *g, const gen_event *fin) {
    if (!g->have_deferred) return;
    g->have_deferred = false;
    if (fin && fin->finish == FINISH_STOP && fin->stop_token == g->deferred.token) {
        if (!g->sf.stopped) {
            g->n_out++;
            push_lp(g, &g->deferred);
        }
        return;
    }
    process_token(g, &g->deferred);
}

static void stream_flush(gen_req *g, const char *finish) {
    if (!g->pend.len && !g->n_lps && !finish) return;
    api_sse_chunk(&g->out, &g->oc, g->pend.p ? g->pend.p : "", g->pend.len, g->lps, g->n_lps,
                  g->text_sent, finish, false);
    g->text_sent += g->pend.len;
    sbuf_reset(&g->pend);
    g->n_lps = 0;
}

static void process_finish(gen_req *g, const gen_event *ev) {
    flush_deferred(g, ev);
    api_error e;
    bool failed = false;
    const char *finish = "stop";
    pthread_mutex_lock(&g->mu);
    bool overflowed = g->overflowed; /* tokens were dropped: whatever the engine says, it failed */
    pthread_mutex_unlock(&g->mu);
    if (overflowed) {
        failed = true;
        api_error_set(&e, 408, "invalid_request_error", NULL,
                      "the client read the stream too slowly (%d tokens unread): aborted",
                      g->srv->stream_backlog);
        e.code = "client_too_slow";
    } else if (!g->sf.stopped) {
        if (ev->finish == FINISH_LENGTH || ev->finish == FINISH_STOP) {
            char *txt = NULL;
            size_t n = 0;
            detok_finish(&g->ds, &txt, &n);
            take_text(g, txt ? txt : "", n, true);
            free(txt);
            if (!g->sf.stopped) finish = ev->finish == FINISH_LENGTH ? "length" : "stop";
        } else if (ev->finish == FINISH_ABORT) {
            failed = true;
            if (atomic_load(&g->srv->shutting_down))
                api_error_set(&e, 503, "server_error", NULL, "the server is shutting down");
            else
                api_error_set(&e, 499, "invalid_request_error", NULL, "the request was aborted");
        } else {
            failed = true;
            api_error_set(&e, 500, "server_error", NULL, "the engine failed: %s",
                          ev->error[0] ? ev->error : "unknown error");
        }
    }
    api_usage u = {.prompt_tokens = ev->n_prompt,
                   .completion_tokens = g->sf.stopped ? g->n_out : ev->n_output,
                   .cached_tokens = ev->n_cached,
                   .timing = g->req.pdserve_timing && ev->has_timing ? &ev->timing : NULL};
    if (g->req.stream) {
        stream_flush(g, NULL);
        if (failed) {
            api_sse_error(&g->out, &e);
        } else {
            stream_flush(g, finish);
            if (g->req.include_usage) api_sse_usage(&g->out, &g->oc, &u);
            api_sse_done(&g->out);
        }
    } else if (failed) {
        api_error_json(&g->out, &e);
        g->status = e.status;
    } else {
        api_response_full(&g->out, &g->oc, g->sf.text.p, g->sf.text.len,
                          g->req.sp.logprobs >= 0 ? g->lps : NULL, g->n_lps, finish, &u);
        g->status = 200;
    }
    g->final_queued = true;
}

static void process_events(gen_req *g, const gen_event *evs, int n) {
    for (int i = 0; i < n && !g->final_queued; i++) {
        const gen_event *ev = &evs[i];
        if (ev->kind == ENGINE_EVENT_FINISHED) {
            process_finish(g, ev);
            continue;
        }
        flush_deferred(g, NULL);
        if (is_stopper(g, ev->token)) {
            g->deferred = *ev;
            g->have_deferred = true;
        } else {
            process_token(g, ev);
        }
    }
    if (g->req.stream && !g->final_queued) stream_flush(g, NULL);
}

/* Takes the queued events, or suspends the connection when there are none.
 * Returns the number taken (0: suspended, the caller returns to MHD). */
static int take_or_suspend(gen_req *g, gen_event **evs) {
    pthread_mutex_lock(&g->mu);
    int n = g->q_len;
    if (n == 0) {
        g->suspended = true;
        MHD_suspend_connection(g->conn);
    } else {
        gen_event *t = g->q;
        int tc = g->q_cap;
        g->q = g->q_spare;
        g->q_cap = g->q_spare_cap;
        g->q_spare = t;
        g->q_spare_cap = tc;
        g->q_len = 0;
        *evs = t;
    }
    pthread_mutex_unlock(&g->mu);
    return n;
}

/* MHD content reader of a streaming response. Returns bytes, end of stream, or 0
 * after suspending the connection until the engine has more. */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    gen_req *g = cls;
    for (;;) {
        if (g->out_off < g->out.len) {
            size_t n = PD_MIN(max, g->out.len - g->out_off);
            memcpy(buf, g->out.p + g->out_off, n);
            g->out_off += n;
            return (ssize_t)n;
        }
        sbuf_reset(&g->out);
        g->out_off = 0;
        if (g->final_queued) return MHD_CONTENT_READER_END_OF_STREAM;
        if (g->oc.chat && !g->role_sent) {
            g->role_sent = true;
            api_sse_chunk(&g->out, &g->oc, "", 0, NULL, 0, 0, NULL, true);
            continue;
        }
        gen_event *evs;
        int n = take_or_suspend(g, &evs);
        if (n == 0) return 0;
        process_events(g, evs, n);
    }
}

/* Non-streaming: called from the access handler until the response is complete. */
static enum MHD_Result full_continue(struct MHD_Connection *conn, gen_req *g) {
    while (!g->final_queued) {
        gen_event *evs;
        int n = take_or_suspend(g, &evs);
        if (n == 0) return MHD_YES;
        process_events(g, evs, n);
    }
    return respond(conn, g->status, "application/json", g->out.p, g->out.len, NULL, NULL);
}

/* ---- active list and the disconnect watcher ----------------------------------------------- */
static void active_add(server *s, gen_req *g) {
    pthread_mutex_lock(&s->mu);
    g->next = s->active;
    if (s->active) s->active->prev = g;
    s->active = g;
    s->n_active++;
    pthread_mutex_unlock(&s->mu);
}

static void active_remove(server *s, gen_req *g) {
    pthread_mutex_lock(&s->mu);
    if (g->prev) g->prev->next = g->next;
    else s->active = g->next;
    if (g->next) g->next->prev = g->prev;
    g->prev = g->next = NULL;
    if (--s->n_active == 0 && s->n_replies == 0) pthread_cond_broadcast(&s->drained);
    pthread_mutex_unlock(&s->mu);
}

/* Arms a one-shot hang-up watch on the connection's socket for this engine request.
 * A keep-alive socket is already registered from an earlier request: re-arm it. */
static void watch_connection(server *s, struct MHD_Connection *conn, uint64_t id) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return;
    struct epoll_event ev = {.events = EPOLLRDHUP | EPOLLONESHOT, .data.u64 = id};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, ci->connect_fd, &ev) != 0 && errno == EEXIST)
        epoll_ctl(s->epfd, EPOLL_CTL_MOD, ci->connect_fd, &ev);
}

static void *watcher_main(void *arg) {
    server *s = arg;
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(s->epfd, evs, 64, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) break;
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == 0) return NULL; /* the wake eventfd: shutting down */
            log_debug("serve: client of request %llu hung up: aborting it",
                      (unsigned long long)evs[i].data.u64);
            engine_abort(s->eng, evs[i].data.u64); /* unknown or finished ids are ignored */
        }
    }
    return NULL;
}

/* ---- endpoints ----------------------------------------------------------------------------- */
static bool check_model(const server *s, const api_request *r, api_error *e) {
    if (!r->model || !strcmp(r->model, s->served_name)) return true;
    api_error_set(e, 404, "invalid_request_error", "model", "The model `%.200s` does not exist.",
                  r->model);
    e->code = "model_not_found";
    return false;
}

/* The prompt of a parsed request as token ids (malloc'd), or -1 with e. */
static int prompt_ids(const server *s, const api_request *r, int32_t **ids, int *n, api_error *e) {
    char err[256] = "";
    if (r->has_prompt_ids) {
        *ids = xmalloc(sizeof(int32_t) * (size_t)(r->n_prompt_ids ? r->n_prompt_ids : 1));
        if (r->n_prompt_ids) memcpy(*ids, r->prompt_ids, sizeof(int32_t) * (size_t)r->n_prompt_ids);
        *n = r->n_prompt_ids;
        return 0;
    }
    const char *text = r->prompt;
    size_t len = r->prompt_len;
    char *rendered = NULL;
    if (r->messages) {
        rendered = chat_apply(s->tok, r->messages, r->n_messages, r->add_generation_prompt, err,
                              sizeof err);
        if (!rendered) {
            api_error_set(e, 400, "invalid_request_error", "messages", "%s", err);
            return -1;
        }
        text = rendered;
        len = strlen(rendered);
    }
    int rc = tokenizer_encode(s->tok, text, len, r->add_special_tokens, ids, n, err, sizeof err);
    free(rendered);
    if (rc != 0) {
        api_error_set(e, 400, "invalid_request_error", r->messages ? "messages" : "prompt",
                      "the prompt could not be tokenized: %s", err);
        return -1;
    }
    return 0;
}

static enum MHD_Result handle_tokenize(server *s, struct MHD_Connection *conn, const sbuf *body) {
    api_request r;
    api_error e;
    if (api_request_parse(API_ENDPOINT_TOKENIZE, body->p, body->len, &s->lim_tok, &r, &e))
        return respond_error(conn, &e);
    int32_t *ids = NULL;
    int n = 0;
    if (!check_model(s, &r, &e) || prompt_ids(s, &r, &ids, &n, &e)) {
        api_request_free(&r);
        return respond_error(conn, &e);
    }
    sbuf b;
    sbuf_init(&b);
    sbuf_puts(&b, "{\"tokens\":[");
    for (int i = 0; i < n; i++) sbuf_printf(&b, i ? ",%d" : "%d", ids[i]);
    sbuf_printf(&b, "],\"count\":%d,\"max_model_len\":%d}", n, s->max_model_len);
    enum MHD_Result ret = respond_json(conn, 200, &b);
    sbuf_free(&b);
    free(ids);
    api_request_free(&r);
    return ret;
}

static enum MHD_Result handle_detokenize(server *s, struct MHD_Connection *conn, const sbuf *body) {
    api_request r;
    api_error e;
    if (api_request_parse(API_ENDPOINT_DETOKENIZE, body->p, body->len, &s->lim_tok, &r, &e))
        return respond_error(conn, &e);
    if (!check_model(s, &r, &e)) {
        api_request_free(&r);
        return respond_error(conn, &e);
    }
    size_t len = 0;
    char *text = tokenizer_decode(s->tok, r.prompt_ids, r.n_prompt_ids, false, &len);
    sbuf b;
    sbuf_init(&b);
    sbuf_puts(&b, "{\"prompt\":");
    sbuf_json_str(&b, text ? text : "", text ? len : 0);
    sbuf_puts(&b, "}");
    enum MHD_Result ret = respond_json(conn, 200, &b);
    sbuf_free(&b);
    free(text);
    api_request_free(&r);
    return ret;
}

static enum MHD_Result handle_models(server *s, struct MHD_Connection *conn) {
    sbuf b;
    sbuf_init(&b);
    sbuf_puts(&b, "{\"object\":\"list\",\"data\":[{\"id\":");
    sbuf_json_str(&b, s->served_name, strlen(s->served_name));
    sbuf_printf(&b, ",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"pdserve\",\"root\":",
                (long long)time(NULL));
    sbuf_json_str(&b, s->served_name, strlen(s->served_name));
    sbuf_printf(&b, ",\"parent\":null,\"max_model_len\":%d}]}", s->max_model_len);
    enum MHD_Result ret = respond_json(conn, 200, &b);
    sbuf_free(&b);
    return ret;
}

static enum MHD_Result handle_metrics(server *s, struct MHD_Connection *conn) {
    engine_stats st;
    engine_get_stats(s->eng, &st);
    sbuf b;
    sbuf_init(&b);
    metrics_render(s->metrics, &st, s->served_name, &b);
    if (s->in && (s->role == SERVER_ROLE_PREFILL || s->role == SERVER_ROLE_DECODE)) {
        internal_kv_totals kt;
        internal_kv_totals_get(s->in, &kt);
        if (s->role == SERVER_ROLE_PREFILL) metrics_render_kv_sends(&kt, s->served_name, &b);
        else metrics_render_kv_gets(&kt, s->served_name, &b);
    }
    metrics_render_energy(s->power, &b);
    enum MHD_Result ret = respond(conn, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.len,
                                  NULL, NULL);
    sbuf_free(&b);
    return ret;
}

/* GET /metrics/power-samples?since=T[&max=N]: the power sampler's rings newer than T
 * (the samples' own clock: seconds since the session started; default: everything
 * held), at most N (default 6000) per GPU and for RAPL. JSON, power_samples_json's
 * format. A sweep fetches it per point and pages on "more". */
static enum MHD_Result handle_power_samples(server *s, struct MHD_Connection *conn) {
    api_error e;
    const char *since_txt = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "since");
    const char *max_txt = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "max");
    double since = -1e18;
    long long max = 0;
    char *end = NULL;
    if (since_txt) {
        since = strtod(since_txt, &end);
        if (end == since_txt || *end || !isfinite(since)) {
            api_error_set(&e, 400, "invalid_request_error", "since", "since must be a number of seconds");
            return respond_error(conn, &e);
        }
    }
    if (max_txt) {
        max = strtoll(max_txt, &end, 10);
        if (end == max_txt || *end || max < 1 || max > 100000) {
            api_error_set(&e, 400, "invalid_request_error", "max", "max must be an integer from 1 to 100000");
            return respond_error(conn, &e);
        }
    }
    size_t len = 0;
    char *text = power_samples_json(s->power, since, (size_t)max, server_role_name(s->role), NULL, &len);
    if (!text) {
        api_error_set(&e, 404, "invalid_request_error", NULL, "this instance runs no power sampler");
        e.code = "not_found";
        return respond_error(conn, &e);
    }
    enum MHD_Result ret = respond(conn, 200, "application/json", text, len, NULL, NULL);
    free(text);
    return ret;
}

/* Checks the prompt against max_model_len and fills max_tokens (vLLM's wording). */
static int check_length(const server *s, api_request *r, int n, api_error *e) {
    const char *what = r->endpoint == API_ENDPOINT_CHAT ? "messages" : "prompt";
    int M = s->max_model_len;
    if (n >= M) {
        api_error_set(e, 400, "invalid_request_error", what,
                      "This model's maximum context length is %d tokens. However, you requested "
                      "%d tokens in the %s, Please reduce the length of the %s.", M, n, what, what);
        e->code = "context_length_exceeded";
        return -1;
    }
    if (r->has_max_tokens && (long long)n + r->sp.max_tokens > M) {
        api_error_set(e, 400, "invalid_request_error", what,
                      "This model's maximum context length is %d tokens. However, you requested "
                      "%d tokens (%d in the %s, %d in the completion). Please reduce the length "
                      "of the %s or completion.", M, n + r->sp.max_tokens, n, what,
                      r->sp.max_tokens, what);
        e->code = "context_length_exceeded";
        return -1;
    }
    if (!r->has_max_tokens) r->sp.max_tokens = M - n;
    if (r->sp.min_tokens > r->sp.max_tokens) r->sp.min_tokens = r->sp.max_tokens;
    return 0;
}

static void set_overloaded(api_error *e, const char *why) {
    api_error_set(e, 503, "server_error", NULL, "%s", why);
    e->code = "server_overloaded";
}

/* The endpoint of a request: its route's, or for /internal/... the X-PD-Endpoint header's
 * (the client's original route, whose body is forwarded verbatim). */
static api_endpoint route_endpoint(struct MHD_Connection *conn, const conn_ctx *c) {
    if (c->rt->id == ROUTE_CHAT) return API_ENDPOINT_CHAT;
    if (c->rt->id == ROUTE_COMPLETIONS) return API_ENDPOINT_COMPLETIONS;
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Endpoint");
    return h && !strcmp(h, "chat") ? API_ENDPOINT_CHAT : API_ENDPOINT_COMPLETIONS;
}

/* The hash under which /internal/reserve keeps a body's prompt ids for its
 * /internal/decode (internal_decode_prompt). */
static uint64_t body_hash(const char *body, size_t len) {
    return hash_bytes(body ? body : "", len, 0x7064626f6479ull);
}

/* Parses, validates and tokenizes a generation request body[len]: 0 with *req (free
 * with api_request_free) and ids[n] (free), or -1 with e and nothing to free. given
 * (owned; NULL: tokenize): the prompt's ids[n_given] as the decode instance's
 * reservation tokenized this same body (a disaggregated request is tokenized once,
 * at its reservation; the router brings them to the prefill instance, the decode one
 * kept them); the checks of the ids and the length still apply. */
static int gen_prepare(server *s, api_endpoint ep, const char *body, size_t len, int32_t *given,
                       int n_given, api_request *req, int32_t **ids_out, int *n_out,
                       api_error *e_out) {
    api_error e;
    double t0 = time_now_s();
    if (api_request_parse(ep, body, len, &s->lim_gen, req, e_out)) {
        free(given);
        return -1;
    }
    int32_t *ids = given;
    int n = given ? n_given : 0;
    double t1 = time_now_s();
    bool ok = check_model(s, req, &e) && (given || prompt_ids(s, req, &ids, &n, &e) == 0);
    log_debug("serve: request of %zu bytes parsed in %.2f ms, %d tokens %s in %.2f ms", len,
              (t1 - t0) * 1e3, n, given ? "given by the reservation" : "tokenized",
              (time_now_s() - t1) * 1e3);
    if (ok && n == 0) {
        api_error_set(&e, 400, "invalid_request_error", "prompt", "The prompt cannot be empty");
        ok = false;
    }
    for (int i = 0; ok && i < n; i++) {
        if (ids[i] < 0 || ids[i] >= s->lim_gen.vocab_size) {
            api_error_set(&e, 400, "invalid_request_error", "prompt",
                          "the prompt encodes to token id %d, outside the model's vocabulary of %d",
                          ids[i], s->lim_gen.vocab_size);
            ok = false;
        }
    }
    if (ok && check_length(s, req, n, &e)) ok = false;
    if (ok && atomic_load(&s->shutting_down)) {
        api_error_set(&e, 503, "server_error", NULL, "the server is shutting down");
        ok = false;
    }
    if (ok && s->max_waiting > 0) {
        engine_stats st;
        engine_get_stats(s->eng, &st);
        if (st.waiting >= s->max_waiting) {
            set_overloaded(&e, "the server is overloaded: too many requests are waiting; retry later");
            ok = false;
        }
    }
    if (!ok) {
        free(ids);
        api_request_free(req);
        *e_out = e;
        return -1;
    }
    *ids_out = ids;
    *n_out = n;
    return 0;
}

static enum MHD_Result generate_submitted(server *s, struct MHD_Connection *conn, conn_ctx *c, gen_req *g,
                                          uint64_t id, bool prefilled, api_error *ep, const char *err);

/* /internal/decode for a store's ticket (internal_decode_reads): the store's get copies
 * or reads the whole prompt's KV inside internal_decode_submit's wait, up to seconds
 * for a disk store. On an HTTP thread that wait held the thread, and with a few of
 * them waiting, reservations and health checks queued behind (2x H200, dis-disk at
 * batch 16: 2.58 s of `reserve`, a health check timed out). So the connection is
 * suspended and a thread of its own waits and submits; the connection resumes with
 * the result (decode_resumed). Counted in n_replies until that thread is done, so a
 * stopping server waits for it (the wait is bounded by the ticket's deadline). */
typedef struct decode_job {
    pthread_mutex_t mu;
    int refs;                    /* the waiting thread's and the connection's */
    bool done, suspended, gone;
    server *s;
    struct MHD_Connection *conn;
    gen_req *g;
    engine_request er;
    int32_t *ids;                /* er.prompt */
    char *ticket, *first, *cached;
    uint64_t id;
    api_error e;
} decode_job;

static void decode_job_unref(decode_job *j) {
    pthread_mutex_lock(&j->mu);
    bool last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (!last) return;
    pthread_mutex_destroy(&j->mu);
    free(j->ids);
    free(j->ticket);
    free(j->first);
    free(j->cached);
    free(j);
}

/* A deferred request whose connection is gone: ends g (id 0: the engine never had it). */
static void decode_orphan(server *s, gen_req *g, uint64_t id) {
    if (id == 0) {
        gen_free(g);
        return;
    }
    pthread_mutex_lock(&g->mu);
    g->http_gone = true;
    bool last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    engine_abort(s->eng, id);
    if (last) gen_free(g);
}

/* A deferred wait's thread has ended (or never started): the drain counts. */
static void decode_job_ended(server *s) {
    pthread_mutex_lock(&s->mu);
    s->n_replies--;
    s->n_djobs--;
    pthread_cond_broadcast(&s->drained);
    pthread_mutex_unlock(&s->mu);
}

static void *decode_job_main(void *arg) {
    decode_job *j = arg;
    server *s = j->s;
    api_error e;
    memset(&e, 0, sizeof e);
    uint64_t id = internal_decode_submit(s->in, &j->er, j->ticket, j->first, j->cached, &j->g->kv_wait_s, &e);
    pthread_mutex_lock(&j->mu);
    j->id = id;
    j->e = e;
    j->done = true;
    bool gone = j->gone;
    if (j->suspended && !gone) {
        j->suspended = false;
        MHD_resume_connection(j->conn);
    }
    pthread_mutex_unlock(&j->mu);
    if (gone) decode_orphan(s, j->g, id); /* the connection ended first (a server stopping) */
    decode_job_unref(j);
    decode_job_ended(s);
    return NULL;
}

/* Hands r (prompt ids, owned from here on when this returns 0) to a waiting thread and
 * suspends the connection; -1 when no thread could be started (the caller waits). */
static int decode_defer(server *s, struct MHD_Connection *conn, conn_ctx *c, gen_req *g,
                        const engine_request *r, int32_t *ids, const char *ticket) {
    decode_job *j = xcalloc(1, sizeof *j);
    pthread_mutex_init(&j->mu, NULL);
    j->refs = 2;
    j->s = s;
    j->conn = conn;
    j->g = g;
    j->er = *r;
    j->ids = ids;
    const char *f = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-First"),
               *k = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Cached-Tokens");
    j->ticket = ticket ? xstrdup(ticket) : NULL;
    j->first = f ? xstrdup(f) : NULL;
    j->cached = k ? xstrdup(k) : NULL;
    pthread_mutex_lock(&s->mu);
    s->n_replies++;
    s->n_djobs++;
    pthread_mutex_unlock(&s->mu);
    c->dj = j;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    pthread_mutex_lock(&j->mu); /* the thread resumes the connection under it: suspended first */
    int rc = pthread_create(&th, &at, decode_job_main, j);
    if (rc == 0) {
        j->suspended = true;
        MHD_suspend_connection(conn);
    }
    pthread_mutex_unlock(&j->mu);
    pthread_attr_destroy(&at);
    if (rc == 0) return 0;
    log_warn("serve: no thread for a KV wait (%s): waiting on the HTTP thread", strerror(rc));
    c->dj = NULL;
    j->ids = NULL; /* the caller's again */
    j->refs = 1;
    decode_job_unref(j);
    decode_job_ended(s);
    return -1;
}

/* The connection of a deferred /internal/decode, resumed: the submit's result. */
static enum MHD_Result decode_resumed(server *s, struct MHD_Connection *conn, conn_ctx *c) {
    decode_job *j = c->dj;
    pthread_mutex_lock(&j->mu);
    if (!j->done) { /* resumed early: wait on */
        j->suspended = true;
        MHD_suspend_connection(conn);
        pthread_mutex_unlock(&j->mu);
        return MHD_YES;
    }
    uint64_t id = j->id;
    api_error e = j->e;
    gen_req *g = j->g;
    pthread_mutex_unlock(&j->mu);
    c->dj = NULL;
    decode_job_unref(j);
    return generate_submitted(s, conn, c, g, id, true, &e, "");
}

static enum MHD_Result handle_generate(server *s, struct MHD_Connection *conn, conn_ctx *c) {
    api_endpoint ep = route_endpoint(conn, c);
    api_error e;
    memset(&e, 0, sizeof e);
    gen_req *g = xcalloc(1, sizeof *g);
    g->t_in = time_now_s();
    int32_t *ids = NULL;
    int n = 0;
    int32_t *given = NULL;
    int n_given = 0;
    if (c->rt->id == ROUTE_INT_DECODE) /* the ids the reservation kept, if any */
        internal_decode_prompt(s->in, MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Ticket"),
                               body_hash(c->body.p, c->body.len), &given, &n_given);
    if (gen_prepare(s, ep, c->body.p, c->body.len, given, n_given, &g->req, &ids, &n, &e)) {
        free(g);
        if (c->rt->id == ROUTE_INT_DECODE) internal_release(s->in, MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Ticket"));
        return respond_error_h(conn, &e, e.status == 503 ? "Retry-After" : NULL, "1");
    }

    pthread_mutex_init(&g->mu, NULL);
    g->refs = 2;
    g->srv = s;
    g->conn = conn;
    g->wake_per_token = g->req.stream || g->req.n_stop > 0;
    snprintf(g->id, sizeof g->id, "%s-%016llx", ep == API_ENDPOINT_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)hash_u64(s->id_salt ^ atomic_fetch_add(&s->n_ids, 1)));
    g->oc = (api_out_ctx){.chat = ep == API_ENDPOINT_CHAT, .id = g->id, .model = s->served_name,
                          .created = (int64_t)time(NULL), .token_text = token_text,
                          .token_text_user = (void *)s->tok};
    detok_init(&g->ds, s->tok, true);
    stop_filter_init(&g->sf, g->req.stop, g->req.stop_len, g->req.n_stop);
    sbuf_init(&g->pend);
    sbuf_init(&g->out);

    engine_request er = {.prompt = ids, .n_prompt = n, .sp = g->req.sp, .on_event = on_engine_event,
                         .user = g};
    char err[256] = "";
    /* Events may arrive before submit returns: they only queue (nothing reads
     * engine_id before this thread sets it below). */
    bool prefilled = c->rt->id == ROUTE_INT_DECODE;
    if (prefilled) {
        g->dis = true;
        g->has_dis_timing = api_dis_timing_parse(MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                                             "X-PD-Timing"),
                                                 &g->dis_timing) == 0;
    }
    const char *ticket = prefilled ? MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Ticket") : NULL;
    if (prefilled && internal_decode_reads(ticket) && decode_defer(s, conn, c, g, &er, ids, ticket) == 0)
        return MHD_YES; /* suspended until the KV is read */
    uint64_t id = prefilled
        ? internal_decode_submit(s->in, &er, ticket, MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-First"),
                                 MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Cached-Tokens"),
                                 &g->kv_wait_s, &e)
        : engine_submit(s->eng, &er, err, sizeof err);
    free(ids);
    return generate_submitted(s, conn, c, g, id, prefilled, &e, err);
}

/* The rest of handle_generate once the engine has the request (id), or has refused it
 * (0: e for a prefilled request, err otherwise). */
static enum MHD_Result generate_submitted(server *s, struct MHD_Connection *conn, conn_ctx *c, gen_req *g,
                                          uint64_t id, bool prefilled, api_error *ep, const char *err) {
    api_error e = *ep;
    pthread_mutex_lock(&g->mu);
    g->engine_id = id;
    pthread_mutex_unlock(&g->mu);
    if (id == 0 && prefilled) {
        gen_free(g);
        return respond_error_h(conn, &e, e.status == 503 ? "Retry-After" : NULL, "1");
    }
    if (id == 0) {
        if (strstr(err, "queue") || strstr(err, "full") || strstr(err, "waiting")) set_overloaded(&e, err);
        else api_error_set(&e, 400, "invalid_request_error", NULL, "%s", err[0] ? err : "rejected by the engine");
        gen_free(g);
        return respond_error_h(conn, &e, e.status == 503 ? "Retry-After" : NULL, "1");
    }
    c->g = g;
    active_add(s, g);
    watch_connection(s, conn, id);

    if (!g->req.stream) return full_continue(conn, g);
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, STREAM_BLOCK, stream_reader, g, NULL);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", "text/event-stream; charset=utf-8");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    enum MHD_Result ret = MHD_queue_response(conn, 200, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* ---- internal endpoints (disaggregated serving; the router is the only caller) ------------------ */
void server_reply_send(server_reply *r, int status, const sbuf *json) {
    pthread_mutex_lock(&r->mu);
    PD_ASSERT(!r->done);
    r->done = true;
    r->status = status;
    sbuf_append(&r->body, json->p ? json->p : "", json->len);
    if (r->suspended && !r->gone) {
        r->suspended = false;
        MHD_resume_connection(r->conn);
    }
    bool last = --r->refs == 0;
    server *srv = r->srv;
    pthread_mutex_unlock(&r->mu);
    pthread_mutex_lock(&srv->mu);
    if (--srv->n_replies == 0 && srv->n_active == 0) pthread_cond_broadcast(&srv->drained);
    pthread_mutex_unlock(&srv->mu);
    if (last) {
        pthread_mutex_destroy(&r->mu);
        sbuf_free(&r->body);
        free(r);
    }
}

/* Answers a deferred reply once it is done; suspends the connection until then. */
static enum MHD_Result reply_continue(struct MHD_Connection *conn, server_reply *r) {
    pthread_mutex_lock(&r->mu);
    if (!r->done) {
        r->suspended = true;
        MHD_suspend_connection(conn);
        pthread_mutex_unlock(&r->mu);
        return MHD_YES;
    }
    pthread_mutex_unlock(&r->mu);
    return respond(conn, r->status, "application/json", r->body.p ? r->body.p : "", r->body.len, NULL, NULL);
}

static double header_ms(struct MHD_Connection *conn, const char *name) {
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, name);
    return h ? strtod(h, NULL) / 1000.0 : 0.0;
}

static enum MHD_Result handle_reserve(server *s, struct MHD_Connection *conn, conn_ctx *c) {
    api_request req;
    api_error e;
    int32_t *ids = NULL;
    int n = 0;
    if (gen_prepare(s, route_endpoint(conn, c), c->body.p, c->body.len, NULL, 0, &req, &ids, &n, &e))
        return respond_error_h(conn, &e, e.status == 503 ? "Retry-After" : NULL, "1");
    sbuf b;
    sbuf_init(&b);
    enum MHD_Result ret;
    if (internal_reserve(s->in, MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Request-Id"),
                         ids, n, header_ms(conn, "X-PD-Timeout-Ms"), body_hash(c->body.p, c->body.len),
                         &b, &e))
        ret = respond_error_h(conn, &e, e.status == 503 ? "Retry-After" : NULL, "1");
    else
        ret = respond_json(conn, 200, &b);
    sbuf_free(&b);
    free(ids);
    api_request_free(&req);
    return ret;
}

static enum MHD_Result handle_prefill(server *s, struct MHD_Connection *conn, conn_ctx *c) {
    api_request req;
    api_error e;
    int32_t *ids = NULL;
    int n = 0;
    const char *body = c->body.p;
    size_t len = c->body.len;
    int32_t *given = NULL;
    int n_given = 0;
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Prompt-Ids-Bytes");
    if (h) {
        char *end;
        long long k = strtoll(h, &end, 10);
        if (end != h && !*end && k > 0 && (size_t)k <= len)
            given = prompt_ids_text_parse(body, (size_t)k, s->max_model_len, &n_given);
        if (!given) {
            api_error_set(&e, 400, "invalid_request_error", NULL, "bad X-PD-Prompt-Ids-Bytes or prompt ids");
            return respond_error(conn, &e);
        }
        body += k;
        len -= (size_t)k;
    }
    if (gen_prepare(s, route_endpoint(conn, c), body, len, given, n_given, &req, &ids, &n, &e))
        return respond_error_h(conn, &e, e.status == 503 ? "Retry-After" : NULL, "1");
    server_reply *r = xcalloc(1, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    r->refs = 2;
    r->conn = conn;
    r->srv = s;
    sbuf_init(&r->body);
    engine_request er = {.prompt = ids, .n_prompt = n, .sp = req.sp};
    uint64_t id = 0;
    pthread_mutex_lock(&s->mu); /* counted before the pipeline can answer it */
    s->n_replies++;
    pthread_mutex_unlock(&s->mu);
    internal_prefill_job *j = internal_prefill_start(
        s->in, &er, MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Ticket"), r, &id, &e);
    free(ids);
    api_request_free(&req);
    if (!j) {
        pthread_mutex_lock(&s->mu);
        if (--s->n_replies == 0 && s->n_active == 0) pthread_cond_broadcast(&s->drained);
        pthread_mutex_unlock(&s->mu);
        pthread_mutex_destroy(&r->mu);
        sbuf_free(&r->body);
        free(r);
        return respond_error_h(conn, &e, e.status == 503 ? "Retry-After" : NULL, "1");
    }
    c->reply = r;
    c->pjob = j;
    watch_connection(s, conn, id); /* the router hangs up: abort the prefill */
    return reply_continue(conn, r);
}

static enum MHD_Result handle_load(server *s, struct MHD_Connection *conn) {
    engine_stats st;
    engine_get_stats(s->eng, &st);
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "{\"role\":\"%s\",\"running\":%d,\"waiting\":%d,\"kv_blocks_used\":%d,"
                    "\"kv_blocks_total\":%d,\"kv_active\":%d}",
                server_role_name(s->role), st.running, st.waiting, st.kv_blocks_used,
                st.kv_blocks_total, s->in ? internal_active(s->in) : 0);
    enum MHD_Result ret = respond_json(conn, 200, &b);
    sbuf_free(&b);
    return ret;
}

/* ---- MHD callbacks -------------------------------------------------------------------------- */
/* First call of a request: route, method, auth, declared size. A rejection is kept in
 * c and answered after the body has been read (and dropped): answering before it and
 * closing with unread bytes makes the kernel reset the connection, and the client may
 * lose the answer. Only an oversized body announced with "Expect: 100-continue" is
 * answered at once, since the client then waits before sending it. */
static void first_call(server *s, struct MHD_Connection *conn, const char *url, const char *method,
                       conn_ctx *c) {
    api_error *e = &c->reject;
    const route *rt = NULL;
    bool path_known = false;
    bool head = !strcmp(method, "HEAD");
    for (size_t i = 0; i < PD_ARRAY_LEN(ROUTES); i++) {
        if (strcmp(url, ROUTES[i].path)) continue;
        path_known = true;
        if (!strcmp(method, ROUTES[i].method) || (head && !strcmp(ROUTES[i].method, "GET")))
            rt = &ROUTES[i];
    }
    c->rejected = true;
    if (!path_known) {
        api_error_set(e, 404, "invalid_request_error", NULL, "no route for %.16s %.200s", method, url);
        e->code = "not_found";
        return;
    }
    if (!rt) {
        const char *allow = "GET";
        for (size_t i = 0; i < PD_ARRAY_LEN(ROUTES); i++)
            if (!strcmp(url, ROUTES[i].path)) allow = ROUTES[i].method;
        api_error_set(e, 405, "invalid_request_error", NULL, "method %.16s is not allowed on %s; use %s",
                      method, url, allow);
        e->code = "method_not_allowed";
        c->reject_hname = "Allow";
        c->reject_hval = allow;
        return;
    }
    c->rt = rt;
    if (rt->internal && (int)s->role != rt->internal) {
        api_error_set(e, 404, "invalid_request_error", NULL, "%s is served by %s instances; this one is %s",
                      url, server_role_name((server_role)rt->internal), server_role_name(s->role));
        e->code = "not_found";
        return;
    }
    if (rt->internal && s->secret) {
        const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Internal-Secret");
        if (!h || !str_eq_ct(h, s->secret)) {
            api_error_set(e, 401, "invalid_request_error", NULL,
                          "internal endpoints need the deployment's secret in X-PD-Internal-Secret");
            e->code = "invalid_internal_secret";
            return;
        }
    }
    if (rt->id == ROUTE_POWER_SAMPLES && (s->secret || s->api_key)) {
        /* either credential: the deployment's tools hold the secret, an operator the key */
        const char *sec = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Internal-Secret");
        const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
        bool ok = (s->secret && sec && str_eq_ct(sec, s->secret)) ||
                  (s->api_key && h && !strncmp(h, "Bearer ", 7) && str_eq_ct(h + 7, s->api_key));
        if (!ok) {
            api_error_set(e, 401, "invalid_request_error", NULL,
                          "%s needs the deployment's secret in X-PD-Internal-Secret or the API key "
                          "as 'Authorization: Bearer KEY'", url);
            e->code = "invalid_api_key";
            c->reject_hname = "WWW-Authenticate";
            c->reject_hval = "Bearer";
            return;
        }
    }
    if (rt->auth && s->api_key) {
        const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
        if (!h || strncmp(h, "Bearer ", 7) || !str_eq_ct(h + 7, s->api_key)) {
            api_error_set(e, 401, "invalid_request_error", NULL,
                          "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.");
            e->code = "invalid_api_key";
            c->reject_hname = "WWW-Authenticate";
            c->reject_hval = "Bearer";
            return;
        }
    }
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
    if (cl && strtoull(cl, NULL, 10) > s->max_body) {
        api_error_set(e, 413, "invalid_request_error", NULL,
                      "the request body is %.20s bytes, more than the limit of %zu bytes", cl,
                      s->max_body);
        e->code = "request_too_large";
        return;
    }
    c->rejected = false;
}

static bool expects_continue(struct MHD_Connection *conn) {
    const char *x = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Expect");
    return x && !strcasecmp(x, "100-continue");
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls) {
    server *s = cls;
    conn_ctx *c = *con_cls;
    if (!c) {
        c = xcalloc(1, sizeof *c);
        sbuf_init(&c->body);
        *con_cls = c;
        first_call(s, conn, url, method, c);
        if (c->rejected && c->reject.status == 413 && expects_continue(conn))
            return respond_error(conn, &c->reject);
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (c->body.len + *upload_data_size > s->max_body) c->too_big = true;
        if (!c->too_big && !c->rejected) sbuf_append(&c->body, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (c->rejected) return respond_error_h(conn, &c->reject, c->reject_hname, c->reject_hval);
    if (c->dj) return decode_resumed(s, conn, c); /* a deferred /internal/decode */
    if (c->g) return full_continue(conn, c->g); /* resumed non-streaming generation */
    if (c->reply) return reply_continue(conn, c->reply);
    if (c->too_big) {
        api_error e;
        api_error_set(&e, 413, "invalid_request_error", NULL,
                      "the request body is more than the limit of %zu bytes", s->max_body);
        e.code = "request_too_large";
        return respond_error(conn, &e);
    }
    if (!c->body.p) sbuf_reserve(&c->body, 0);
    switch (c->rt->id) {
    case ROUTE_HEALTH:
        if (atomic_load(&s->shutting_down)) return respond(conn, 503, NULL, "", 0, NULL, NULL);
        return respond(conn, 200, NULL, "", 0, NULL, NULL);
    case ROUTE_METRICS: return handle_metrics(s, conn);
    case ROUTE_VERSION: {
        const char *v = "{\"version\":\"" PDSERVE_VERSION "\"}";
        return respond(conn, 200, "application/json", v, strlen(v), NULL, NULL);
    }
    case ROUTE_MODELS: return handle_models(s, conn);
    case ROUTE_TOKENIZE: return handle_tokenize(s, conn, &c->body);
    case ROUTE_DETOKENIZE: return handle_detokenize(s, conn, &c->body);
    case ROUTE_COMPLETIONS:
    case ROUTE_CHAT:
    case ROUTE_INT_DECODE: return handle_generate(s, conn, c);
    case ROUTE_LOAD: return handle_load(s, conn);
    case ROUTE_POWER_SAMPLES: return handle_power_samples(s, conn);
    case ROUTE_INT_RESERVE: return handle_reserve(s, conn, c);
    case ROUTE_INT_PREFILL: return handle_prefill(s, conn, c);
    case ROUTE_INT_RELEASE:
        internal_release(s->in, MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-PD-Ticket"));
        return respond(conn, 200, "application/json", "{}", 2, NULL, NULL);
    }
    return MHD_NO;
}

/* MHD: the request is over (sent, failed, or the client went away). */
static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    server *s = cls;
    conn_ctx *c = *con_cls;
    if (!c) return;
    if (c->dj) { /* ended while its KV wait runs: that thread disposes of the request */
        decode_job *j = c->dj;
        pthread_mutex_lock(&j->mu);
        j->gone = true;
        bool done = j->done;
        gen_req *jg = j->g;
        uint64_t jid = j->id;
        pthread_mutex_unlock(&j->mu);
        if (done) decode_orphan(s, jg, jid); /* its thread finished, the connection never resumed */
        decode_job_unref(j);
        c->dj = NULL;
    }
    gen_req *g = c->g;
    if (g) {
        active_remove(s, g);
        pthread_mutex_lock(&g->mu);
        g->http_gone = true;
        bool engine_running = g->refs > 1;
        bool last = --g->refs == 0;
        uint64_t id = g->engine_id;
        pthread_mutex_unlock(&g->mu);
        if (engine_running) {
            if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
                log_debug("serve: connection of request %llu ended early: aborting it",
                          (unsigned long long)id);
            engine_abort(s->eng, id);
        }
        if (last) gen_free(g);
    }
    if (c->reply) {
        server_reply *r = c->reply;
        pthread_mutex_lock(&r->mu);
        r->gone = true;
        bool last = --r->refs == 0;
        pthread_mutex_unlock(&r->mu);
        if (last) {
            pthread_mutex_destroy(&r->mu);
            sbuf_free(&r->body);
            free(r);
        }
        internal_prefill_detach(c->pjob);
    }
    sbuf_free(&c->body);
    free(c);
    *con_cls = NULL;
}

/* MHD: a connection was accepted. Bounds its kernel send buffer (CONN_SNDBUF). */
static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
    (void)cls;
    (void)socket_context;
    if (toe != MHD_CONNECTION_NOTIFY_STARTED) return;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    int sz = CONN_SNDBUF;
    if (ci) (void)setsockopt(ci->connect_fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
}

/* ---- start and stop ------------------------------------------------------------------------- */
static int resolve(const char *host, int port, struct sockaddr_storage *ss, bool *v6, char *err,
                   size_t errlen) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0 || !res) {
        pd_errorf(err, errlen, "cannot resolve host '%s': %s", host, gai_strerror(rc));
        return -1;
    }
    memset(ss, 0, sizeof *ss);
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *v6 = res->ai_family == AF_INET6;
    if (*v6) ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
    else ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    freeaddrinfo(res);
    return 0;
}

server *server_start(const server_config *cfg, engine *e, const tokenizer *t, char *err,
                     size_t errlen) {
    if (cfg->port < 0 || cfg->port > 65535) {
        pd_errorf(err, errlen, "port %d is out of range", cfg->port);
        return NULL;
    }
    struct sockaddr_storage ss;
    bool v6 = false;
    const char *host = cfg->host ? cfg->host : "127.0.0.1";
    if (resolve(host, cfg->port, &ss, &v6, err, errlen)) return NULL;

    server *s = xcalloc(1, sizeof *s);
    s->listen_fd = -1;
    s->host = xstrdup(host);
    s->served_name = xstrdup(cfg->served_model_name ? cfg->served_model_name : "pdserve");
    s->api_key = cfg->api_key && *cfg->api_key ? xstrdup(cfg->api_key) : NULL;
    s->max_body = cfg->max_body_bytes ? cfg->max_body_bytes : DEFAULT_MAX_BODY;
    s->max_waiting = cfg->max_waiting_requests;
    s->stream_backlog = cfg->max_stream_backlog > 0 ? cfg->max_stream_backlog : DEFAULT_STREAM_BACKLOG;
    s->eng = e;
    s->tok = t;
    const model_config *mc = engine_model_config(e);
    s->max_model_len = engine_max_model_len(e);
    s->lim_gen = (api_limits){.vocab_size = mc->vocab_size, .max_model_len = s->max_model_len};
    s->lim_tok = (api_limits){.vocab_size = tokenizer_vocab_size(t), .max_model_len = s->max_model_len};
    for (int i = 0; i < mc->n_eos && s->n_eos < MODEL_MAX_EOS; i++) s->eos[s->n_eos++] = mc->eos_token_ids[i];
    int te = tokenizer_eos_id(t);
    bool have = false;
    for (int i = 0; i < s->n_eos; i++) have |= s->eos[i] == te;
    if (te >= 0 && !have) s->eos[s->n_eos++] = te;
    s->metrics = metrics_create();
    s->role = cfg->role;
    s->power = cfg->power;
    s->secret = cfg->internal_secret && *cfg->internal_secret ? xstrdup(cfg->internal_secret) : NULL;
    if (s->role == SERVER_ROLE_PREFILL || s->role == SERVER_ROLE_DECODE) {
        if (!cfg->kv) {
            pd_errorf(err, errlen, "a %s instance needs a KV connector", server_role_name(s->role));
            free(s->secret);
            metrics_free(s->metrics);
            free(s->host);
            free(s->served_name);
            free(s->api_key);
            free(s);
            return NULL;
        }
        s->in = internal_create(e, cfg->kv, s->role, cfg->kv_timeout_s, cfg->debug_stall_transfer_ms);
    }
    atomic_init(&s->shutting_down, false);
    atomic_init(&s->n_ids, 1);
    s->id_salt = hash_u64((uint64_t)time_now_ns() ^ (uint64_t)getpid());
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->drained, NULL);

    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event wev = {.events = EPOLLIN, .data.u64 = 0};
    if (s->epfd < 0 || s->wake_fd < 0 || epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->wake_fd, &wev)) {
        pd_errorf(err, errlen, "cannot create the disconnect watcher: %s", strerror(errno));
        server_free(s);
        return NULL;
    }
    if (pthread_create(&s->watcher, NULL, watcher_main, s) == 0) s->watcher_started = true;

    /* Connections: bounded by open files (pdserve serve raises its soft limit to the hard
     * one at start-up), leaving 256 for the model files, KV stores, sockets to peers and
     * logs; at most 65536. Beyond the limit MHD closes new connections at accept. Idle,
     * half-sent or unread connections are closed after http_timeout_s without a byte in
     * either direction; suspended ones (waiting for the engine) never time out. */
    struct rlimit rl;
    unsigned limit = 65536;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < 65536 + 256)
        limit = rl.rlim_cur > 512 ? (unsigned)rl.rlim_cur - 256 : 64;
    unsigned timeout = cfg->http_timeout_s > 0 ? (unsigned)cfg->http_timeout_s : DEFAULT_HTTP_TIMEOUT_S;
    unsigned threads = cfg->http_threads > 0 ? (unsigned)cfg->http_threads : 2;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME |
                     (v6 ? MHD_USE_IPv6 : 0);
    s->d = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, on_request, s,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                            MHD_OPTION_NOTIFY_CONNECTION, on_connection, s,
                            MHD_OPTION_THREAD_POOL_SIZE, threads,
                            MHD_OPTION_CONNECTION_LIMIT, limit,
                            MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024u,
                            MHD_OPTION_CONNECTION_TIMEOUT, timeout,
                            MHD_OPTION_END);
    if (!s->d) {
        pd_errorf(err, errlen, "cannot listen on %s:%d (in use, or not an address of this machine?)",
                  host, cfg->port);
        server_free(s);
        return NULL;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : cfg->port;
    log_info("serve: up to %u connections, %u HTTP threads, idle connections closed after %u s",
             limit, threads, timeout);
    return s;
}

int server_port(const server *s) { return s->port; }

/* Waits until no generation is active or the deadline passes. */
static void wait_drained(server *s, double timeout_s) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double end = ts.tv_sec + ts.tv_nsec * 1e-9 + timeout_s;
    pthread_mutex_lock(&s->mu);
    while (s->n_active + s->n_replies > 0) {
        struct timespec dl = {.tv_sec = (time_t)end, .tv_nsec = (long)((end - floor(end)) * 1e9)};
        if (pthread_cond_timedwait(&s->drained, &s->mu, &dl) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&s->mu);
}

void server_shutdown(server *s, double timeout_s) {
    if (!s || s->stopped) return;
    atomic_store(&s->shutting_down, true);
    /* MHD's pool threads take the quiesced socket out of their epoll sets on their own
     * time: closing it now races them (MHD aborts: "Failed to remove listen FD from epoll
     * set"); server_free closes it once MHD has stopped */
    MHD_socket lfd = MHD_quiesce_daemon(s->d);
    if (lfd != MHD_INVALID_SOCKET) s->listen_fd = lfd;
    pthread_mutex_lock(&s->mu);
    int n = s->n_active;
    for (gen_req *g = s->active; g; g = g->next) engine_abort(s->eng, g->engine_id);
    pthread_mutex_unlock(&s->mu);
    if (n) log_info("serve: shutting down: aborted %d running request(s)", n);
    wait_drained(s, timeout_s);
}

void server_free(server *s) {
    if (!s) return;
    if (s->d) {
        atomic_store(&s->shutting_down, true);
        wait_drained(s, 5.0);
        pthread_mutex_lock(&s->mu);
        /* a deferred KV wait uses the engine and the connector, which go after this:
         * wait for it to end (its ticket's deadline bounds it) */
        while (s->n_djobs > 0) pthread_cond_wait(&s->drained, &s->mu);
        int left = s->n_active + s->n_replies;
        pthread_mutex_unlock(&s->mu);
        /* Stopping MHD with suspended connections is undefined (MHD panics): leave it
         * to exit. Internal replies count: a prefill waits for its transfer suspended. */
        if (left == 0) {
            MHD_stop_daemon(s->d);
            if (s->listen_fd >= 0) close(s->listen_fd);
        } else {
            log_warn("serve: %d request(s) still suspended at exit; not stopping HTTP threads", left);
        }
        s->d = NULL;
        if (left) return;
    }
    if (s->watcher_started) {
        uint64_t one = 1;
        if (write(s->wake_fd, &one, sizeof one) < 0) log_warn("serve: cannot wake the watcher");
        pthread_join(s->watcher, NULL);
    }
    if (s->epfd >= 0) close(s->epfd);
    if (s->wake_fd >= 0) close(s->wake_fd);
    metrics_free(s->metrics);
    internal_free(s->in);
    free(s->secret);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->drained);
    free(s->host);
    free(s->served_name);
    free(s->api_key);
    free(s);
}
