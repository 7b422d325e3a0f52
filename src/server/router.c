/* router.c: the one public endpoint of a deployment (`pdserve serve --role router`).
 *
 * Two threads of its own besides libmicrohttpd's pool:
 *   - MHD workers read the client's request, check auth and the body (the server's own
 *     api_request_parse, so a bad request is refused here with the same message), hand a
 *     job to the curl thread and suspend the connection; when bytes come back they are
 *     resumed and copy them out (SSE streams chunk by chunk, full answers at once).
 *   - The curl thread runs every transfer toward instances on one libcurl multi handle
 *     (curl_multi_poll, woken by curl_multi_wakeup): proxied requests, the phases of a
 *     disaggregated request, fire-and-forget releases, and the /load polls that feed
 *     health and least-loaded choice. It never blocks on a client.
 *
 * A disaggregated request, phase by phase (the original body is sent verbatim each
 * time; the instances parse and tokenize it themselves, exactly as a colocated one):
 *   RESERVE  POST D/internal/reserve            -> {"ticket": "pdkv1;...", "prompt_ids": ...}
 *   PREFILL  POST P/internal/prefill  + ticket  -> {"first": "TOKEN[;LOGPROB[;ID:LP,...]]",
 *                                                   "cached_tokens": N}
 *   DECODE   POST D/internal/decode   + ticket + first + cached -> the OpenAI answer, streamed
 * Any failure before DECODE frees the reservation (POST D/internal/release) and answers
 * the client with an OpenAI-style error; a failure during DECODE ends the stream with an
 * error event. A transport failure (refused, reset, timed out) marks the instance
 * unhealthy until a poll reaches it again.
 *
 * Lifetime of a job: two references, the MHD side's (dropped when MHD completes the
 * client's request) and the curl side's (dropped when its last transfer ends). */
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <microhttpd.h>

#include "power/power.h"
#include "server/server.h"
#include "util/util.h"

#define ROUTER_MAX_BACKENDS 64
#define ROUTER_DEFAULT_BODY (8u << 20)
#define ROUTER_STREAM_BLOCK (16 * 1024)
#define ROUTER_CONNECT_MS 2000L

typedef enum backend_role { BACKEND_COLOCATED, BACKEND_PREFILL, BACKEND_DECODE } backend_role;
static const char *const ROLE_NAMES[] = {"colocated", "prefill", "decode"};

typedef struct backend_inst {
    char url[256];              /* "http://host:port", no trailing slash */
    backend_role role;
    int index;                  /* within its role */
    atomic_bool healthy;
    atomic_int inflight;        /* requests of this router on it now */
    atomic_int polled_load;     /* running + waiting at the last poll */
    /* curl thread only */
    CURL *poll;                 /* the poll in flight, or NULL */
    sbuf poll_buf;
    uint64_t n_failures;
    int slow_polls;             /* health checks in a row that timed out */
} backend_inst;

typedef enum rphase { PH_NONE, PH_PROXY, PH_RESERVE, PH_PREFILL, PH_DECODE } rphase;

typedef struct rjob rjob;
struct rjob {
    router *r;
    pthread_mutex_t mu;
    int refs;
    /* ---- set by the MHD side before submit, then read-only ---- */
    struct MHD_Connection *conn;
    char method[8];
    char path[64];
    sbuf body;
    bool stream;                /* the client asked for SSE */
    bool generation;            /* completions or chat */
    const char *endpoint;       /* "completions" | "chat" (static) */
    char rid[40];
    uint64_t akeys[64];         /* prefix-affinity: chained keys of the prompt's chunks */
    int n_akeys;
    /* ---- shared, under mu ---- */
    bool suspended;             /* the client connection waits for our resume */
    bool headers_ready;         /* status and content type known: answer the client */
    bool done;                  /* every byte of the answer is in out */
    bool cancelled;             /* the client went away */
    bool queued;                /* the MHD side has queued its response */
    int status;
    char ctype[96];
    char retry_after[16];
    sbuf out;
    size_t out_off;
    /* ---- curl thread only ---- */
    rphase phase;
    CURL *easy;
    struct curl_slist *hdrs;
    sbuf resp;                  /* a buffered phase's body (reserve, prefill) */
    char resp_ctype[96];
    backend_inst *pb, *db, *cb; /* prefill, decode, the one proxied to */
    char ticket[512];
    char first[2048];
    int cached;                 /* the prefill's "cached_tokens" (-1: not given) */
    sbuf pbody;                 /* the prefill's body: the reservation's prompt ids, then
                                 * the client's body (empty: the client's body alone) */
    size_t pbody_ids;           /* bytes of prompt ids that lead pbody */
    double deadline;            /* monotonic seconds */
    double t_start, t_reserved, t_prefilled, t_first; /* phases' ends (monotonic s; debug log) */
    char timing[192];       /* X-PD-Timing for the decode call (prefill_answer), or empty */
    bool counted_p, counted_d, counted_c;
    int tries;
    rjob *next;                 /* submit queue / active list */
};

/* A fire-and-forget POST (release of a reservation). */
typedef struct rrelease {
    struct curl_slist *hdrs;
    char ticket[512];
} rrelease;

/* What CURLOPT_PRIVATE points to. */
typedef enum xfer_kind { XFER_JOB, XFER_POLL, XFER_RELEASE } xfer_kind;
typedef struct xfer { xfer_kind kind; void *p; } xfer;

struct router {
    router_config cfg;
    char *host, *served_name, *api_key, *secret;
    size_t max_body;
    double kv_timeout_s, poll_interval_s;
    bool disaggregated;
    backend_inst backends[ROUTER_MAX_BACKENDS];
    int n_backends;
    atomic_uint rr[3];          /* round-robin cursors per role */
    struct MHD_Daemon *d;
    int port;
    int listen_fd;              /* the quiesced listening socket, closed after MHD_stop_daemon
                                   (MHD's threads may still use it until then); -1: none */
    atomic_bool shutting_down;
    atomic_uint_fast64_t n_ids;
    /* counters */
    atomic_uint_fast64_t n_requests, n_errors, n_disagg, n_kv_failures;
    /* curl thread */
    CURLM *multi;
    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;         /* guards queue, stop, n_jobs */
    pthread_cond_t drained;
    rjob *queue;                /* submitted, not yet started */
    bool stop;
    int n_jobs;                 /* jobs alive (either side) */
    rjob *active;               /* curl thread only: jobs with a transfer */
    struct affinity *aff;       /* prefix-affinity: [ROUTER_MAX_BACKENDS] tables (owned) */
};

/* ---- small helpers --------------------------------------------------------------------- */
int router_policy_parse(const char *s, router_policy *out) {
    if (!strcmp(s, "round-robin") || !strcmp(s, "rr")) *out = ROUTER_POLICY_ROUND_ROBIN;
    else if (!strcmp(s, "least-loaded")) *out = ROUTER_POLICY_LEAST_LOADED;
    else if (!strcmp(s, "prefix-affinity")) *out = ROUTER_POLICY_PREFIX_AFFINITY;
    else return -1;
    return 0;
}

static enum MHD_Result respond(struct MHD_Connection *conn, int status, const char *ctype,
                               const char *data, size_t len, const char *hname, const char *hval) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, (void *)data, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    if (ctype) MHD_add_response_header(r, "Content-Type", ctype);
    if (hname && hval && *hval) MHD_add_response_header(r, hname, hval);
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result respond_error(struct MHD_Connection *conn, const api_error *e,
                                     const char *hname, const char *hval) {
    sbuf b;
    sbuf_init(&b);
    api_error_json(&b, e);
    enum MHD_Result r = respond(conn, e->status, "application/json", b.p, b.len, hname, hval);
    sbuf_free(&b);
    return r;
}

static bool str_eq_ct(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = (unsigned char)(la != lb);
    for (size_t i = 0; i < la; i++) d |= (unsigned char)(a[i] ^ b[i % (lb ? lb : 1)]);
    return d == 0;
}

static const char *phase_name(rphase p) {
    switch (p) {
    case PH_PROXY: return "proxy";
    case PH_RESERVE: return "reserve";
    case PH_PREFILL: return "prefill";
    case PH_DECODE: return "decode";
    default: return "none";
    }
}

/* ---- jobs: the client side's view --------------------------------------------------------- */
static void job_unref(rjob *j) {
    pthread_mutex_lock(&j->mu);
    bool last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (!last) return;
    router *r = j->r;
    pthread_mutex_destroy(&j->mu);
    sbuf_free(&j->body);
    sbuf_free(&j->out);
    sbuf_free(&j->resp);
    sbuf_free(&j->pbody);
    free(j);
    pthread_mutex_lock(&r->mu);
    if (--r->n_jobs == 0) pthread_cond_broadcast(&r->drained);
    pthread_mutex_unlock(&r->mu);
}

/* Under j->mu: resumes the client connection when it waits for us. */
static void job_wake_locked(rjob *j) {
    if (j->suspended) {
        j->suspended = false;
        MHD_resume_connection(j->conn);
    }
}

/* The answer is an error, and nothing was sent yet: status + OpenAI error body. When a
 * stream has started, an SSE error event ends it instead. Curl thread. */
static void job_fail(rjob *j, int status, const char *type, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void job_fail(rjob *j, int status, const char *type, const char *code, const char *fmt, ...) {
    api_error e;
    api_error_set(&e, status, type, NULL, "%s", "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    e.code = code;
    atomic_fetch_add(&j->r->n_errors, 1);
    log_info("router: request %s failed (%d): %s", j->rid, status, e.message);
    pthread_mutex_lock(&j->mu);
    if (!j->done) {
        if (j->headers_ready) {
            api_sse_error(&j->out, &e);
        } else {
            sbuf_reset(&j->out);
            j->out_off = 0;
            api_error_json(&j->out, &e);
            j->status = status;
            snprintf(j->ctype, sizeof j->ctype, "application/json");
            j->headers_ready = true;
        }
        j->done = true;
    }
    job_wake_locked(j);
    pthread_mutex_unlock(&j->mu);
}

/* ---- choosing instances ------------------------------------------------------------------- */
/* Least-loaded: the larger of this router's own count and the instance's last polled
 * running + waiting (the first is exact now, the second sees other clients); ties go
 * round-robin. Only healthy instances; NULL when none is. */
static backend_inst *pick(router *r, backend_role role, const backend_inst *avoid) {
    int idx[ROUTER_MAX_BACKENDS], n = 0;
    for (int i = 0; i < r->n_backends; i++) {
        backend_inst *b = &r->backends[i];
        if (b->role == role && atomic_load(&b->healthy) && b != avoid) idx[n++] = i;
    }
    if (n == 0) return NULL;
    unsigned start = atomic_fetch_add(&r->rr[role], 1);
    if (r->cfg.policy == ROUTER_POLICY_ROUND_ROBIN) return &r->backends[idx[start % (unsigned)n]];
    backend_inst *best = NULL;
    int best_load = INT_MAX;
    for (int k = 0; k < n; k++) {
        backend_inst *b = &r->backends[idx[(start + (unsigned)k) % (unsigned)n]];
        int load = PD_MAX(atomic_load(&b->inflight), atomic_load(&b->polled_load));
        if (load < best_load) best = b, best_load = load;
    }
    return best;
}

/* ---- prefix affinity ------------------------------------------------------------------------ *
 * The router has no tokenizer, so a prompt's prefixes are named by its bytes: keys
 * chained over chunks of AFFINITY_CHUNK bytes of the text (or AFFINITY_CHUNK / 4 token
 * ids, or the chat messages' roles and contents in order), about one KV block each, so
 * key i names the whole prefix up to chunk i. Each instance keeps the keys of prompts
 * routed to it in a direct-mapped table of AFFINITY_SLOTS (a newer key overwrites an
 * older one: bounded, recent prefixes win, as in the instance's LRU cache). A request
 * goes to the instance matching most leading keys, unless that is fewer than
 * AFFINITY_MIN_KEYS or the instance is overloaded (load above 2 x the least loaded's
 * + 4): then least-loaded. Curl thread only (the mutex is for safety, never contended). */
#define AFFINITY_CHUNK 64
#define AFFINITY_SLOTS 16384
#define AFFINITY_MIN_KEYS 2

struct affinity {
    pthread_mutex_t mu;
    uint64_t slot[AFFINITY_SLOTS];
};

typedef struct affinity_chain { uint64_t h; uint8_t buf[AFFINITY_CHUNK]; int fill; uint64_t *keys; int n, cap; } affinity_chain;

static void affinity_feed(affinity_chain *c, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n && c->n < c->cap; i++) {
        c->buf[c->fill++] = b[i];
        if (c->fill == AFFINITY_CHUNK) {
            c->h = hash_bytes(c->buf, AFFINITY_CHUNK, c->h) | 1; /* 0 marks an empty slot */
            c->keys[c->n++] = c->h;
            c->fill = 0;
        }
    }
}

/* The request's chained chunk keys into j->akeys (a partial last chunk names nothing). */
static void affinity_keys(rjob *j, const api_request *q) {
    affinity_chain c = {.h = 0x6166666eull, .keys = j->akeys, .cap = (int)PD_ARRAY_LEN(j->akeys)};
    if (q->prompt) affinity_feed(&c, q->prompt, q->prompt_len);
    else if (q->has_prompt_ids) affinity_feed(&c, q->prompt_ids, (size_t)q->n_prompt_ids * sizeof(int32_t));
    for (int i = 0; i < q->n_messages; i++) {
        const char *role = q->messages[i].role, *content = q->messages[i].content;
        if (role) affinity_feed(&c, role, strlen(role) + 1);
        if (content) affinity_feed(&c, content, strlen(content) + 1);
    }
    j->n_akeys = c.n;
}

static int affinity_match(struct affinity *a, const uint64_t *keys, int n) {
    int m = 0;
    while (m < n && a->slot[keys[m] & (AFFINITY_SLOTS - 1)] == keys[m]) m++;
    return m;
}

static int backend_load(backend_inst *b) { return PD_MAX(atomic_load(&b->inflight), atomic_load(&b->polled_load)); }

/* pick() for a job: prefix-affinity when on and the job has keys, else the policy's. */
static backend_inst *pick_for(router *r, rjob *j, backend_role role, const backend_inst *avoid) {
    backend_inst *least = pick(r, role, avoid);
    if (r->cfg.policy != ROUTER_POLICY_PREFIX_AFFINITY || !r->aff || !least || j->n_akeys == 0) return least;
    backend_inst *best = NULL;
    int best_m = 0;
    for (int i = 0; i < r->n_backends; i++) {
        backend_inst *b = &r->backends[i];
        if (b->role != role || b == avoid || !atomic_load(&b->healthy)) continue;
        struct affinity *a = &r->aff[i];
        pthread_mutex_lock(&a->mu);
        int m = affinity_match(a, j->akeys, j->n_akeys);
        pthread_mutex_unlock(&a->mu);
        if (m > best_m || (m == best_m && best && backend_load(b) < backend_load(best))) best = b, best_m = m;
    }
    backend_inst *to = least;
    if (best && best_m >= AFFINITY_MIN_KEYS && backend_load(best) <= 2 * backend_load(least) + 4) to = best;
    struct affinity *a = &r->aff[to - r->backends];
    pthread_mutex_lock(&a->mu);
    for (int k = 0; k < j->n_akeys; k++) a->slot[j->akeys[k] & (AFFINITY_SLOTS - 1)] = j->akeys[k];
    pthread_mutex_unlock(&a->mu);
    return to;
}

static void mark_unhealthy(backend_inst *b, const char *why) {
    if (atomic_exchange(&b->healthy, false))
        log_warn("router: %s instance %s is unhealthy: %s", ROLE_NAMES[b->role], b->url, why);
}

/* Whether a transfer result says the instance itself is unreachable or broken (as
 * opposed to an answer we did not like). */
static bool transport_failure(CURLcode rc) {
    return rc == CURLE_COULDNT_CONNECT || rc == CURLE_RECV_ERROR || rc == CURLE_SEND_ERROR ||
           rc == CURLE_GOT_NOTHING || rc == CURLE_PARTIAL_FILE || rc == CURLE_OPERATION_TIMEDOUT ||
           rc == CURLE_COULDNT_RESOLVE_HOST;
}

/* ---- curl callbacks (curl thread) ------------------------------------------------------------ */
static size_t on_header(char *buf, size_t size, size_t n, void *user) {
    rjob *j = user;
    size_t len = size * n;
    if (len > 13 && !strncasecmp(buf, "Content-Type:", 13)) {
        size_t a = 13, b = len;
        while (a < b && (buf[a] == ' ' || buf[a] == '\t')) a++;
        while (b > a && (buf[b - 1] == '\r' || buf[b - 1] == '\n' || buf[b - 1] == ' ')) b--;
        snprintf(j->resp_ctype, sizeof j->resp_ctype, "%.*s", (int)(b - a), buf + a);
    } else if (len > 12 && !strncasecmp(buf, "Retry-After:", 12)) {
        pthread_mutex_lock(&j->mu);
        snprintf(j->retry_after, sizeof j->retry_after, "%.*s", (int)strcspn(buf + 12, "\r\n"), buf + 12);
        pthread_mutex_unlock(&j->mu);
    }
    return len;
}

/* Body bytes. Buffered phases keep them in resp; streamed ones go to the client: at once
 * when the client streams and the instance said 200 (the headers go out with the first
 * bytes), else at the end. */
static size_t on_body(char *buf, size_t size, size_t n, void *user) {
    rjob *j = user;
    size_t len = size * n;
    if (j->phase == PH_RESERVE || j->phase == PH_PREFILL) {
        if (j->resp.len + len > (64u << 20)) return 0; /* absurd: fail the transfer */
        sbuf_append(&j->resp, buf, len);
        return len;
    }
    long code = 0;
    curl_easy_getinfo(j->easy, CURLINFO_RESPONSE_CODE, &code);
    pthread_mutex_lock(&j->mu);
    if (j->cancelled) {
        pthread_mutex_unlock(&j->mu);
        return 0;
    }
    sbuf_append(&j->out, buf, len);
    if (j->t_first == 0) j->t_first = time_now_s();
    if (!j->headers_ready && j->stream && code == 200) {
        j->status = 200;
        snprintf(j->ctype, sizeof j->ctype, "%s", j->resp_ctype[0] ? j->resp_ctype : "text/event-stream");
        j->headers_ready = true;
    }
    if (j->headers_ready) job_wake_locked(j);
    pthread_mutex_unlock(&j->mu);
    return len;
}

static size_t on_sink(char *buf, size_t size, size_t n, void *user) {
    sbuf *b = user;
    size_t len = size * n;
    if (b && b->len + len <= 65536) sbuf_append(b, buf, len);
    return len;
}

/* ---- starting transfers (curl thread) ------------------------------------------------------- */
static struct curl_slist *internal_headers(router *r, const rjob *j) {
    char h[700];
    struct curl_slist *l = NULL;
    l = curl_slist_append(l, "Content-Type: application/json");
    l = curl_slist_append(l, "Expect:");
    if (r->secret) {
        snprintf(h, sizeof h, "X-PD-Internal-Secret: %s", r->secret);
        l = curl_slist_append(l, h);
    }
    if (j) {
        snprintf(h, sizeof h, "X-PD-Request-Id: %s", j->rid);
        l = curl_slist_append(l, h);
        snprintf(h, sizeof h, "X-PD-Endpoint: %s", j->endpoint ? j->endpoint : "completions");
        l = curl_slist_append(l, h);
    }
    return l;
}

static void job_start_transfer(rjob *j, backend_inst *b, const char *path, long timeout_ms) {
    router *r = j->r;
    if (j->hdrs) curl_slist_free_all(j->hdrs);
    j->hdrs = internal_headers(r, j->phase == PH_PROXY ? NULL : j);
    char h[2200];
    if (j->phase == PH_PREFILL || j->phase == PH_DECODE) {
        snprintf(h, sizeof h, "X-PD-Ticket: %s", j->ticket);
        j->hdrs = curl_slist_append(j->hdrs, h);
        snprintf(h, sizeof h, "X-PD-Deadline-Ms: %ld", (long)((j->deadline - time_now_s()) * 1000));
        j->hdrs = curl_slist_append(j->hdrs, h);
    }
    if (j->phase == PH_DECODE) {
        snprintf(h, sizeof h, "X-PD-First: %s", j->first);
        j->hdrs = curl_slist_append(j->hdrs, h);
        if (j->cached >= 0) {
            snprintf(h, sizeof h, "X-PD-Cached-Tokens: %d", j->cached);
            j->hdrs = curl_slist_append(j->hdrs, h);
        }
        if (j->timing[0]) {
            snprintf(h, sizeof h, "X-PD-Timing: %s", j->timing);
            j->hdrs = curl_slist_append(j->hdrs, h);
        }
    }
    const sbuf *body = &j->body;
    if (j->phase == PH_PREFILL && j->pbody_ids) {
        snprintf(h, sizeof h, "X-PD-Prompt-Ids-Bytes: %zu", j->pbody_ids);
        j->hdrs = curl_slist_append(j->hdrs, h);
        body = &j->pbody;
    }
    if (j->phase == PH_RESERVE) {
        snprintf(h, sizeof h, "X-PD-Timeout-Ms: %ld", (long)(r->kv_timeout_s * 1000));
        j->hdrs = curl_slist_append(j->hdrs, h);
    }
    char url[512];
    snprintf(url, sizeof url, "%s%s", b->url, path);
    CURL *e = curl_easy_init();
    PD_ASSERT(e);
    xfer *x = xcalloc(1, sizeof *x);
    x->kind = XFER_JOB;
    x->p = j;
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, x);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, ROUTER_CONNECT_MS);
    if (timeout_ms > 0) curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, j->hdrs);
    if (!strcmp(j->method, "POST")) {
        curl_easy_setopt(e, CURLOPT_POST, 1L);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, body->p ? body->p : "");
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body->len);
    }
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, j);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, j);
    j->easy = e;
    j->resp_ctype[0] = 0;
    sbuf_reset(&j->resp);
    curl_multi_add_handle(r->multi, e);
}

/* Frees a reservation on decode instance b: fire and forget (the decode side also
 * frees it at its deadline should this be lost). */
static void send_release(router *r, backend_inst *b, const char *ticket) {
    rrelease *rel = xcalloc(1, sizeof *rel);
    snprintf(rel->ticket, sizeof rel->ticket, "%s", ticket);
    rel->hdrs = internal_headers(r, NULL);
    char h[600];
    snprintf(h, sizeof h, "X-PD-Ticket: %s", ticket);
    rel->hdrs = curl_slist_append(rel->hdrs, h);
    char url[512];
    snprintf(url, sizeof url, "%s/internal/release", b->url);
    xfer *x = xcalloc(1, sizeof *x);
    x->kind = XFER_RELEASE;
    x->p = rel;
    CURL *e = curl_easy_init();
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, x);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, ROUTER_CONNECT_MS);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 5000L);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, rel->hdrs);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, "{}");
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_sink);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, NULL);
    curl_multi_add_handle(r->multi, e);
}

static void job_count(rjob *j, backend_inst *b, bool *flag, bool on) {
    if (!b || *flag == on) return;
    *flag = on;
    atomic_fetch_add(&b->inflight, on ? 1 : -1);
}

static void job_uncount_all(rjob *j) {
    job_count(j, j->pb, &j->counted_p, false);
    job_count(j, j->db, &j->counted_d, false);
    job_count(j, j->cb, &j->counted_c, false);
}

static void job_remove_active(router *r, rjob *j) {
    for (rjob **pp = &r->active; *pp; pp = &(*pp)->next)
        if (*pp == j) {
            *pp = j->next;
            j->next = NULL;
            return;
        }
}

/* The curl side is done with j: no transfer left. */
static void job_end(rjob *j) {
    router *r = j->r;
    job_uncount_all(j);
    if (j->hdrs) curl_slist_free_all(j->hdrs);
    j->hdrs = NULL;
    job_remove_active(r, j);
    j->phase = PH_NONE;
    job_unref(j);
}

static void job_start_reserve(rjob *j) {
    router *r = j->r;
    j->db = pick(r, BACKEND_DECODE, j->db);
    if (!j->db) {
        job_fail(j, 503, "server_error", "no_instance", "no healthy decode instance is available");
        job_end(j);
        return;
    }
    job_count(j, j->db, &j->counted_d, true);
    j->phase = PH_RESERVE;
    job_start_transfer(j, j->db, "/internal/reserve", 10000L);
}

static void job_start(rjob *j) {
    router *r = j->r;
    j->next = r->active;
    r->active = j;
    if (r->disaggregated && j->generation) {
        atomic_fetch_add(&r->n_disagg, 1);
        j->t_start = time_now_s();
        j->deadline = j->t_start + r->kv_timeout_s;
        job_start_reserve(j);
        return;
    }
    backend_role role = r->disaggregated ? BACKEND_DECODE : BACKEND_COLOCATED;
    j->cb = pick_for(r, j, role, NULL);
    if (!j->cb) {
        job_fail(j, 503, "server_error", "no_instance", "no healthy %s instance is available",
                 ROLE_NAMES[role]);
        job_end(j);
        return;
    }
    job_count(j, j->cb, &j->counted_c, true);
    j->t_start = time_now_s();
    j->phase = PH_PROXY;
    job_start_transfer(j, j->cb, j->path, 0);
}

/* Copies a JSON error answer of an instance (status >= 400) to the client as is: the
 * instances phrase request errors exactly as a colocated server. */
static void job_relay_error(rjob *j, long code) {
    pthread_mutex_lock(&j->mu);
    if (!j->done) {
        sbuf_reset(&j->out);
        j->out_off = 0;
        sbuf_append(&j->out, j->resp.p ? j->resp.p : "", j->resp.len);
        j->status = (int)code;
        snprintf(j->ctype, sizeof j->ctype, "application/json");
        j->headers_ready = j->done = true;
    }
    job_wake_locked(j);
    pthread_mutex_unlock(&j->mu);
    atomic_fetch_add(&j->r->n_errors, 1);
}

/* The "message" of an instance's error body, for a sentence of ours. */
static void error_message(const sbuf *b, char *out, size_t cap) {
    snprintf(out, cap, "%.*s", (int)PD_MIN(b->len, 200), b->p ? b->p : "");
    cJSON *root = cJSON_ParseWithLength(b->p ? b->p : "", b->len);
    cJSON *err = root ? cJSON_GetObjectItemCaseSensitive(root, "error") : NULL;
    cJSON *msg = err ? cJSON_GetObjectItemCaseSensitive(err, "message") : NULL;
    if (cJSON_IsString(msg)) snprintf(out, cap, "%s", msg->valuestring);
    cJSON_Delete(root);
}

/* A string field of the buffered phase's JSON answer into out; -1 when absent. */
static int resp_field(const sbuf *b, const char *name, char *out, size_t cap) {
    cJSON *root = cJSON_ParseWithLength(b->p ? b->p : "", b->len);
    cJSON *v = root ? cJSON_GetObjectItemCaseSensitive(root, name) : NULL;
    int rc = -1;
    if (cJSON_IsString(v) && strlen(v->valuestring) < cap && !strpbrk(v->valuestring, "\r\n")) {
        snprintf(out, cap, "%s", v->valuestring);
        rc = 0;
    }
    cJSON_Delete(root);
    return rc;
}

/* A non-negative number field of a JSON answer; -1 when absent. */
static double resp_num(const cJSON *root, const char *name) {
    const cJSON *v = root ? cJSON_GetObjectItemCaseSensitive(root, name) : NULL;
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < 1e6 ? v->valuedouble : -1;
}

/* The prefill instance's answer, parsed once: its cached tokens (-1 when absent) and
 * X-PD-Timing for the decode instance (api_dis_timing): this router's reservation and
 * prefill calls, and the prefill instance's queue, compute and KV tail; empty when the
 * answer lacks them (an instance of an older build). */
static void prefill_answer(rjob *j) {
    j->timing[0] = '\0';
    cJSON *root = cJSON_ParseWithLength(j->resp.p ? j->resp.p : "", j->resp.len);
    double cached = resp_num(root, "cached_tokens");
    j->cached = cached >= 0 && cached <= INT32_MAX ? (int)cached : -1;
    double q = resp_num(root, "queue_s"), c = resp_num(root, "compute_s"), kv = resp_num(root, "kv_tail_s"),
           kq = resp_num(root, "kv_queue_s");
    cJSON_Delete(root);
    if (q >= 0 && c >= 0 && kv >= 0) {
        int n = snprintf(j->timing, sizeof j->timing, "reserve=%.6f,prefill_call=%.6f,queue=%.6f,prefill=%.6f",
                         j->t_reserved - j->t_start, j->t_prefilled - j->t_reserved, q, c);
        if (kq >= 0 && kq <= kv) /* the tail split: waiting for the transfer worker, then the transfer */
            snprintf(j->timing + n, sizeof j->timing - (size_t)n, ",kv_queue=%.6f,kv=%.6f", kq, kv - kq);
        else
            snprintf(j->timing + n, sizeof j->timing - (size_t)n, ",kv=%.6f", kv);
    }
}

/* The prefill's body: the prompt ids of the reservation's answer (the decode instance
 * tokenized the body; the prefill instance then need not), then the client's body.
 * Without them (an instance of an older build), the client's body alone. */
static void prefill_body(rjob *j) {
    sbuf_reset(&j->pbody);
    j->pbody_ids = 0;
    cJSON *root = cJSON_ParseWithLength(j->resp.p ? j->resp.p : "", j->resp.len);
    cJSON *v = root ? cJSON_GetObjectItemCaseSensitive(root, "prompt_ids") : NULL;
    if (cJSON_IsString(v) && v->valuestring[0]) {
        size_t n = strlen(v->valuestring);
        sbuf_append(&j->pbody, v->valuestring, n);
        sbuf_append(&j->pbody, j->body.p ? j->body.p : "", j->body.len);
        j->pbody_ids = n;
    }
    cJSON_Delete(root);
}

static void on_reserve_done(rjob *j, CURLcode rc, long code) {
    router *r = j->r;
    if (rc != CURLE_OK) {
        mark_unhealthy(j->db, curl_easy_strerror(rc));
        job_count(j, j->db, &j->counted_d, false);
        if (++j->tries < 2 && time_now_s() < j->deadline) { /* nothing was reserved: another one */
            job_start_reserve(j);
            return;
        }
        job_fail(j, 502, "server_error", "decode_unavailable",
                 "the decode instance could not be reached: %s", curl_easy_strerror(rc));
        job_end(j);
        return;
    }
    if (code != 200) { /* a request error (400) or an overloaded instance (503): as is */
        job_relay_error(j, code);
        job_end(j);
        return;
    }
    if (resp_field(&j->resp, "ticket", j->ticket, sizeof j->ticket)) {
        job_fail(j, 502, "server_error", "bad_instance_answer", "the decode instance gave no ticket");
        job_end(j);
        return;
    }
    prefill_body(j);
    j->pb = pick_for(r, j, BACKEND_PREFILL, NULL);
    if (!j->pb) {
        send_release(r, j->db, j->ticket);
        job_fail(j, 503, "server_error", "no_instance", "no healthy prefill instance is available");
        job_end(j);
        return;
    }
    job_count(j, j->pb, &j->counted_p, true);
    j->t_reserved = time_now_s();
    j->phase = PH_PREFILL;
    long left = (long)((j->deadline - time_now_s()) * 1000) + 500; /* P answers by its deadline */
    job_start_transfer(j, j->pb, "/internal/prefill", PD_MAX(left, 1L));
}

static void poll_start(router *r, backend_inst *b);

static void on_prefill_done(rjob *j, CURLcode rc, long code) {
    router *r = j->r;
    job_count(j, j->pb, &j->counted_p, false);
    if (rc != CURLE_OK || code != 200 || resp_field(&j->resp, "first", j->first, sizeof j->first)) {
        send_release(r, j->db, j->ticket);
        atomic_fetch_add(&r->n_kv_failures, 1);
        if (rc == CURLE_OPERATION_TIMEDOUT) {
            /* late, not necessarily dead: a saturated instance whose medium is slow
             * (a disk put in progress runs past other requests' deadlines) answers
             * late and is otherwise well. A health check now decides (poll_done: two
             * slow answers in a row, or a refused or bad one, mark it unhealthy). */
            log_warn("router: prefill instance %s did not answer within the deadline + 0.5 s; "
                     "checking its health", j->pb->url);
            poll_start(r, j->pb);
            job_fail(j, 504, "server_error", "kv_transfer_timeout",
                     "the prefill instance did not finish the prompt and its KV transfer within "
                     "the %.0f s deadline", r->kv_timeout_s);
        } else if (rc != CURLE_OK) {
            if (transport_failure(rc)) mark_unhealthy(j->pb, curl_easy_strerror(rc));
            job_fail(j, 502, "server_error", "prefill_failed",
                     "the prefill instance failed during the request: %s", curl_easy_strerror(rc));
        } else if (code >= 400 && code < 500) {
            job_relay_error(j, code);
        } else {
            char msg[300];
            error_message(&j->resp, msg, sizeof msg);
            job_fail(j, code == 504 ? 504 : 502, "server_error",
                     code == 504 ? "kv_transfer_timeout" : "prefill_failed",
                     "the prefill instance failed: %s", msg);
        }
        job_end(j);
        return;
    }
    j->t_prefilled = time_now_s();
    prefill_answer(j);
    log_debug("router: %s: reserve %.2f ms, prefill %.2f ms; prefill instance: %.*s", j->rid,
              (j->t_reserved - j->t_start) * 1e3, (j->t_prefilled - j->t_reserved) * 1e3,
              (int)PD_MIN(j->resp.len, 300), j->resp.p ? j->resp.p : "");
    j->phase = PH_DECODE;
    job_start_transfer(j, j->db, "/internal/decode", 0);
}

/* The end of a streamed phase (proxy or decode). */
static void on_stream_done(rjob *j, CURLcode rc, long code) {
    backend_inst *b = j->phase == PH_DECODE ? j->db : j->cb;
    if (j->phase == PH_PROXY && j->t_first > 0)
        log_debug("router: %s: first bytes %.2f ms after arrival", j->rid, (j->t_first - j->t_start) * 1e3);
    if (j->phase == PH_DECODE && j->t_first > 0)
        log_debug("router: %s: decode's first bytes %.2f ms after the prefill's answer, %.2f ms "
                  "after arrival", j->rid, (j->t_first - j->t_prefilled) * 1e3, (j->t_first - j->t_start) * 1e3);
    if (rc != CURLE_OK) {
        if (transport_failure(rc)) mark_unhealthy(b, curl_easy_strerror(rc));
        job_fail(j, 502, "server_error", j->phase == PH_DECODE ? "decode_failed" : "instance_failed",
                 "the %s instance failed during the request: %s", ROLE_NAMES[b->role],
                 curl_easy_strerror(rc));
    } else {
        pthread_mutex_lock(&j->mu);
        if (!j->headers_ready) {
            j->status = (int)code;
            snprintf(j->ctype, sizeof j->ctype, "%s", j->resp_ctype[0] ? j->resp_ctype : "application/json");
            j->headers_ready = true;
        }
        j->done = true;
        job_wake_locked(j);
        pthread_mutex_unlock(&j->mu);
        if (code >= 400) atomic_fetch_add(&j->r->n_errors, 1);
    }
    job_end(j);
}

static void on_job_transfer_done(rjob *j, CURLcode rc) {
    long code = 0;
    curl_easy_getinfo(j->easy, CURLINFO_RESPONSE_CODE, &code);
    curl_multi_remove_handle(j->r->multi, j->easy);
    curl_easy_cleanup(j->easy);
    j->easy = NULL;
    pthread_mutex_lock(&j->mu);
    bool cancelled = j->cancelled;
    pthread_mutex_unlock(&j->mu);
    if (cancelled && (j->phase == PH_RESERVE || j->phase == PH_PREFILL)) {
        if (j->phase == PH_PREFILL || (rc == CURLE_OK && code == 200 &&
                                       !resp_field(&j->resp, "ticket", j->ticket, sizeof j->ticket)))
            send_release(j->r, j->db, j->ticket);
        job_end(j);
        return;
    }
    switch (j->phase) {
    case PH_RESERVE: on_reserve_done(j, rc, code); break;
    case PH_PREFILL: on_prefill_done(j, rc, code); break;
    case PH_PROXY:
    case PH_DECODE: on_stream_done(j, rc, code); break;
    default: PD_ASSERT(0);
    }
}

/* The client went away: stop its transfer now (closing the connection to the instance
 * makes it abort the engine request), free a reservation it holds. */
static void job_cancel_transfer(rjob *j) {
    router *r = j->r;
    if (!j->easy) return;
    xfer *x = NULL;
    curl_easy_getinfo(j->easy, CURLINFO_PRIVATE, (char **)&x);
    curl_multi_remove_handle(r->multi, j->easy);
    curl_easy_cleanup(j->easy);
    free(x);
    j->easy = NULL;
    if (j->phase == PH_PREFILL) send_release(r, j->db, j->ticket);
    log_debug("router: client of %s went away during %s", j->rid, phase_name(j->phase));
    job_end(j);
}

/* ---- polls: health and load ---------------------------------------------------------------- */
/* Health checks in a row that may time out (2 s each) before the instance is marked
 * unhealthy; a refused connection or a bad answer marks it at once. */
#define POLL_SLOW_LIMIT 2

static void poll_start(router *r, backend_inst *b) {
    if (b->poll) return;
    char url[512];
    snprintf(url, sizeof url, "%s/load", b->url);
    xfer *x = xcalloc(1, sizeof *x);
    x->kind = XFER_POLL;
    x->p = b;
    CURL *e = curl_easy_init();
    sbuf_reset(&b->poll_buf);
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, x);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 1000L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 2000L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_sink);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &b->poll_buf);
    b->poll = e;
    curl_multi_add_handle(r->multi, e);
}

static void poll_done(router *r, backend_inst *b, CURLcode rc) {
    long code = 0;
    curl_easy_getinfo(b->poll, CURLINFO_RESPONSE_CODE, &code);
    curl_multi_remove_handle(r->multi, b->poll);
    curl_easy_cleanup(b->poll);
    b->poll = NULL;
    if (rc == CURLE_OPERATION_TIMEDOUT && ++b->slow_polls < POLL_SLOW_LIMIT) {
        /* a busy instance (a long step, a loaded host) may answer late once: only a
         * second slow answer in a row, or a refused or broken one, marks it */
        b->n_failures++;
        log_warn("router: %s instance %s: health check timed out (%d in a row)", ROLE_NAMES[b->role], b->url,
                 b->slow_polls);
        return;
    }
    if (rc != CURLE_OK || code != 200) {
        b->n_failures++;
        char why[128];
        if (rc != CURLE_OK) snprintf(why, sizeof why, "health check: %s", curl_easy_strerror(rc));
        else snprintf(why, sizeof why, "health check: HTTP %ld", code);
        mark_unhealthy(b, why);
        return;
    }
    b->slow_polls = 0;
    cJSON *root = cJSON_ParseWithLength(b->poll_buf.p ? b->poll_buf.p : "", b->poll_buf.len);
    cJSON *run = root ? cJSON_GetObjectItemCaseSensitive(root, "running") : NULL;
    cJSON *wait = root ? cJSON_GetObjectItemCaseSensitive(root, "waiting") : NULL;
    if (cJSON_IsNumber(run) && cJSON_IsNumber(wait))
        atomic_store(&b->polled_load, (int)(run->valuedouble + wait->valuedouble));
    cJSON_Delete(root);
    if (!atomic_exchange(&b->healthy, true))
        log_info("router: %s instance %s is healthy", ROLE_NAMES[b->role], b->url);
}

/* ---- the curl thread ---------------------------------------------------------------------- */
static void *curl_main(void *arg) {
    router *r = arg;
    double next_poll = 0;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        bool stop = r->stop;
        rjob *q = r->queue;
        r->queue = NULL;
        pthread_mutex_unlock(&r->mu);
        /* new jobs, in arrival order */
        rjob *rev = NULL;
        while (q) {
            rjob *n = q->next;
            q->next = rev;
            rev = q;
            q = n;
        }
        while (rev) {
            rjob *n = rev->next;
            rev->next = NULL;
            job_start(rev);
            rev = n;
        }
        /* clients that went away, and (stopping) everything */
        for (rjob *j = r->active, *n; j; j = n) {
            n = j->next;
            pthread_mutex_lock(&j->mu);
            bool c = j->cancelled;
            pthread_mutex_unlock(&j->mu);
            if (c || stop) {
                if (stop && !c) job_fail(j, 503, "server_error", NULL, "the router is shutting down");
                job_cancel_transfer(j);
            }
        }
        if (stop && !r->active) break;
        double now = time_now_s();
        if (now >= next_poll && !stop) {
            for (int i = 0; i < r->n_backends; i++) poll_start(r, &r->backends[i]);
            next_poll = now + r->poll_interval_s;
        }
        int running = 0;
        curl_multi_perform(r->multi, &running);
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(r->multi, &left))) {
            if (m->msg != CURLMSG_DONE) continue;
            xfer *x = NULL;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&x);
            CURLcode rc = m->data.result;
            CURL *easy = m->easy_handle;
            if (x->kind == XFER_JOB) {
                on_job_transfer_done(x->p, rc);
            } else if (x->kind == XFER_POLL) {
                poll_done(r, x->p, rc);
            } else {
                rrelease *rel = x->p;
                if (rc != CURLE_OK) log_warn("router: releasing %s failed: %s", rel->ticket, curl_easy_strerror(rc));
                curl_multi_remove_handle(r->multi, easy);
                curl_easy_cleanup(easy);
                curl_slist_free_all(rel->hdrs);
                free(rel);
            }
            free(x);
        }
        int wait_ms = (int)PD_MAX(1.0, PD_MIN(100.0, (next_poll - time_now_s()) * 1000));
        curl_multi_poll(r->multi, NULL, 0, wait_ms, NULL);
    }
    /* polls and releases still in flight: let releases finish briefly, then drop all */
    double until = time_now_s() + 1.0;
    int running = 1;
    while (running && time_now_s() < until) {
        curl_multi_perform(r->multi, &running);
        if (running) curl_multi_poll(r->multi, NULL, 0, 20, NULL);
    }
    for (int i = 0; i < r->n_backends; i++)
        if (r->backends[i].poll) {
            xfer *x = NULL;
            curl_easy_getinfo(r->backends[i].poll, CURLINFO_PRIVATE, (char **)&x);
            free(x);
            curl_multi_remove_handle(r->multi, r->backends[i].poll);
            curl_easy_cleanup(r->backends[i].poll);
            r->backends[i].poll = NULL;
        }
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(r->multi, &left))) (void)m;
    return NULL;
}

static void submit(router *r, rjob *j) {
    pthread_mutex_lock(&r->mu);
    j->next = r->queue;
    r->queue = j;
    pthread_mutex_unlock(&r->mu);
    curl_multi_wakeup(r->multi);
}

/* ---- the client side (MHD) -------------------------------------------------------------------- */
typedef enum rroute { RR_HEALTH, RR_METRICS, RR_VERSION, RR_MODELS, RR_COMPLETIONS, RR_CHAT,
                      RR_TOKENIZE, RR_DETOKENIZE } rroute;

typedef struct rroute_def {
    const char *path, *method;
    rroute id;
    bool auth;
} rroute_def;

static const rroute_def RROUTES[] = {
    {"/health", "GET", RR_HEALTH, false},
    {"/metrics", "GET", RR_METRICS, false},
    {"/version", "GET", RR_VERSION, false},
    {"/v1/models", "GET", RR_MODELS, true},
    {"/v1/completions", "POST", RR_COMPLETIONS, true},
    {"/v1/chat/completions", "POST", RR_CHAT, true},
    {"/tokenize", "POST", RR_TOKENIZE, true},
    {"/detokenize", "POST", RR_DETOKENIZE, true},
};

typedef struct rconn {
    const rroute_def *rt;
    bool rejected, too_big;
    api_error reject;
    const char *reject_hname, *reject_hval;
    sbuf body;
    rjob *job;
} rconn;

/* Content reader of a streamed answer: bytes, the end, or 0 after suspending. */
static ssize_t job_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    rjob *j = cls;
    pthread_mutex_lock(&j->mu);
    ssize_t ret;
    if (j->out_off < j->out.len) {
        size_t n = PD_MIN(max, j->out.len - j->out_off);
        memcpy(buf, j->out.p + j->out_off, n);
        j->out_off += n;
        if (j->out_off == j->out.len) {
            sbuf_reset(&j->out);
            j->out_off = 0;
        }
        ret = (ssize_t)n;
    } else if (j->done) {
        ret = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        j->suspended = true;
        MHD_suspend_connection(j->conn);
        ret = 0;
    }
    pthread_mutex_unlock(&j->mu);
    return ret;
}

/* Called on the first pass and on every resume: answers once the headers are known. */
static enum MHD_Result job_continue(struct MHD_Connection *conn, rjob *j) {
    pthread_mutex_lock(&j->mu);
    if (!j->headers_ready) {
        j->suspended = true;
        MHD_suspend_connection(conn);
        pthread_mutex_unlock(&j->mu);
        return MHD_YES;
    }
    if (j->queued) {
        pthread_mutex_unlock(&j->mu);
        return MHD_YES;
    }
    j->queued = true;
    struct MHD_Response *resp;
    if (j->done) { /* complete: one buffer, with a Content-Length */
        resp = MHD_create_response_from_buffer(j->out.len - j->out_off, j->out.p ? j->out.p + j->out_off : "",
                                               MHD_RESPMEM_MUST_COPY);
        j->out_off = j->out.len;
    } else {
        resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, ROUTER_STREAM_BLOCK, job_reader, j, NULL);
    }
    int status = j->status;
    char ctype[96], retry[16];
    snprintf(ctype, sizeof ctype, "%s", j->ctype);
    snprintf(retry, sizeof retry, "%s", j->retry_after);
    pthread_mutex_unlock(&j->mu);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", ctype);
    if (!strncmp(ctype, "text/event-stream", 17)) MHD_add_response_header(resp, "Cache-Control", "no-cache");
    if (retry[0]) MHD_add_response_header(resp, "Retry-After", retry);
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static size_t metrics_body(char *ptr, size_t size, size_t nmemb, void *user) {
    sbuf *b = user;
    size_t n = size * nmemb;
    if (b->len + n > (8u << 20)) return 0; /* a /metrics text past 8 MiB: give up on it */
    sbuf_printf(b, "%.*s", (int)n, ptr);
    return n;
}

/* The deployment's energy: every instance's /metrics, summed by GPU and role
 * (power_metrics_aggregate counts a meter read through two instances once). Blocking
 * fetches with a 2 s timeout on this scrape's thread: scrapes are rare and never on a
 * token's path. Nothing is added when no instance reports an energy line. */
static void append_energy(router *r, sbuf *out) {
    char *texts[ROUTER_MAX_BACKENDS] = {0};
    for (int i = 0; i < r->n_backends; i++) {
        char url[600];
        snprintf(url, sizeof url, "%s/metrics", r->backends[i].url);
        CURL *e = curl_easy_init();
        if (!e) continue;
        sbuf b;
        sbuf_init(&b);
        curl_easy_setopt(e, CURLOPT_URL, url);
        curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 2000L);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, metrics_body);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, &b);
        long code = 0;
        if (curl_easy_perform(e) == CURLE_OK && curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code) == CURLE_OK &&
            code == 200 && b.p)
            texts[i] = xstrndup(b.p, b.len);
        curl_easy_cleanup(e);
        sbuf_free(&b);
    }
    power_agg *agg = xcalloc(1, sizeof *agg);
    if (power_metrics_aggregate((const char *const *)texts, r->n_backends, agg) == 0) {
        size_t need = power_agg_prometheus(agg, NULL, 0);
        char *buf = xmalloc(need + 1);
        power_agg_prometheus(agg, buf, need + 1);
        sbuf_puts(out, buf);
        free(buf);
    }
    free(agg);
    for (int i = 0; i < r->n_backends; i++) free(texts[i]);
}

static enum MHD_Result handle_metrics(router *r, struct MHD_Connection *conn) {
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "# HELP pdserve_router_requests_total Requests proxied by the router.\n"
                    "# TYPE pdserve_router_requests_total counter\npdserve_router_requests_total %llu\n",
                (unsigned long long)atomic_load(&r->n_requests));
    sbuf_printf(&b, "# HELP pdserve_router_errors_total Requests answered with an error.\n"
                    "# TYPE pdserve_router_errors_total counter\npdserve_router_errors_total %llu\n",
                (unsigned long long)atomic_load(&r->n_errors));
    sbuf_printf(&b, "# HELP pdserve_router_disaggregated_total Requests served disaggregated.\n"
                    "# TYPE pdserve_router_disaggregated_total counter\npdserve_router_disaggregated_total %llu\n",
                (unsigned long long)atomic_load(&r->n_disagg));
    sbuf_printf(&b, "# HELP pdserve_router_kv_failures_total Disaggregated requests failed before decode.\n"
                    "# TYPE pdserve_router_kv_failures_total counter\npdserve_router_kv_failures_total %llu\n",
                (unsigned long long)atomic_load(&r->n_kv_failures));
    sbuf_puts(&b, "# HELP pdserve_router_instance_healthy 1 when the last health check passed.\n"
                  "# TYPE pdserve_router_instance_healthy gauge\n");
    for (int i = 0; i < r->n_backends; i++)
        sbuf_printf(&b, "pdserve_router_instance_healthy{role=\"%s\",url=\"%s\"} %d\n",
                    ROLE_NAMES[r->backends[i].role], r->backends[i].url,
                    atomic_load(&r->backends[i].healthy) ? 1 : 0);
    sbuf_puts(&b, "# HELP pdserve_router_instance_inflight Requests of this router on the instance.\n"
                  "# TYPE pdserve_router_instance_inflight gauge\n");
    for (int i = 0; i < r->n_backends; i++)
        sbuf_printf(&b, "pdserve_router_instance_inflight{role=\"%s\",url=\"%s\"} %d\n",
                    ROLE_NAMES[r->backends[i].role], r->backends[i].url,
                    atomic_load(&r->backends[i].inflight));
    append_energy(r, &b);
    enum MHD_Result ret = respond(conn, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.len, NULL, NULL);
    sbuf_free(&b);
    return ret;
}

/* Healthy when every role it needs has a healthy instance. */
static bool router_healthy(router *r) {
    bool have[3] = {false, false, false};
    for (int i = 0; i < r->n_backends; i++)
        if (atomic_load(&r->backends[i].healthy)) have[r->backends[i].role] = true;
    return r->disaggregated ? have[BACKEND_PREFILL] && have[BACKEND_DECODE] : have[BACKEND_COLOCATED];
}

static void rfirst_call(router *r, struct MHD_Connection *conn, const char *url, const char *method,
                        rconn *c) {
    api_error *e = &c->reject;
    const rroute_def *rt = NULL;
    bool known = false, head = !strcmp(method, "HEAD");
    for (size_t i = 0; i < PD_ARRAY_LEN(RROUTES); i++) {
        if (strcmp(url, RROUTES[i].path)) continue;
        known = true;
        if (!strcmp(method, RROUTES[i].method) || (head && !strcmp(RROUTES[i].method, "GET"))) rt = &RROUTES[i];
    }
    c->rejected = true;
    if (!known) {
        api_error_set(e, 404, "invalid_request_error", NULL, "no route for %.16s %.200s", method, url);
        e->code = "not_found";
        return;
    }
    if (!rt) {
        const char *allow = "GET";
        for (size_t i = 0; i < PD_ARRAY_LEN(RROUTES); i++)
            if (!strcmp(url, RROUTES[i].path)) allow = RROUTES[i].method;
        api_error_set(e, 405, "invalid_request_error", NULL, "method %.16s is not allowed on %s; use %s",
                      method, url, allow);
        e->code = "method_not_allowed";
        c->reject_hname = "Allow";
        c->reject_hval = allow;
        return;
    }
    c->rt = rt;
    if (rt->auth && r->api_key) {
        const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
        if (!h || strncmp(h, "Bearer ", 7) || !str_eq_ct(h + 7, r->api_key)) {
            api_error_set(e, 401, "invalid_request_error", NULL,
                          "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.");
            e->code = "invalid_api_key";
            c->reject_hname = "WWW-Authenticate";
            c->reject_hval = "Bearer";
            return;
        }
    }
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
    if (cl && strtoull(cl, NULL, 10) > r->max_body) {
        api_error_set(e, 413, "invalid_request_error", NULL,
                      "the request body is %.20s bytes, more than the limit of %zu bytes", cl, r->max_body);
        e->code = "request_too_large";
        return;
    }
    c->rejected = false;
}

/* A request for an instance: check it here where we can, then hand it to the curl
 * thread and wait (suspended) for its answer. */
static enum MHD_Result start_job(router *r, struct MHD_Connection *conn, rconn *c, const char *url,
                                 const char *method) {
    rjob *j = xcalloc(1, sizeof *j);
    j->r = r;
    j->conn = conn;
    j->cached = -1;
    snprintf(j->method, sizeof j->method, "%s", !strcmp(method, "HEAD") ? "GET" : method);
    snprintf(j->path, sizeof j->path, "%s", url);
    sbuf_init(&j->body);
    sbuf_init(&j->out);
    sbuf_init(&j->resp);
    sbuf_init(&j->pbody);
    if (c->rt->id == RR_COMPLETIONS || c->rt->id == RR_CHAT) {
        api_endpoint ep = c->rt->id == RR_CHAT ? API_ENDPOINT_CHAT : API_ENDPOINT_COMPLETIONS;
        api_limits lim = {.vocab_size = INT_MAX, .max_model_len = 0};
        api_request req;
        api_error e;
        if (api_request_parse(ep, c->body.p ? c->body.p : "", c->body.len, &lim, &req, &e)) {
            sbuf_free(&j->body);
            sbuf_free(&j->out);
            sbuf_free(&j->resp);
            free(j);
            return respond_error(conn, &e, NULL, NULL);
        }
        j->stream = req.stream;
        j->generation = true;
        j->endpoint = ep == API_ENDPOINT_CHAT ? "chat" : "completions";
        if (r->cfg.policy == ROUTER_POLICY_PREFIX_AFFINITY) affinity_keys(j, &req);
        api_request_free(&req);
    }
    if (atomic_load(&r->shutting_down)) {
        api_error e;
        api_error_set(&e, 503, "server_error", NULL, "the router is shutting down");
        sbuf_free(&j->body);
        sbuf_free(&j->out);
        sbuf_free(&j->resp);
        free(j);
        return respond_error(conn, &e, NULL, NULL);
    }
    sbuf_append(&j->body, c->body.p ? c->body.p : "", c->body.len);
    snprintf(j->rid, sizeof j->rid, "rtr-%d-%llu", (int)getpid(),
             (unsigned long long)atomic_fetch_add(&r->n_ids, 1));
    pthread_mutex_init(&j->mu, NULL);
    j->refs = 2;
    pthread_mutex_lock(&r->mu);
    r->n_jobs++;
    pthread_mutex_unlock(&r->mu);
    atomic_fetch_add(&r->n_requests, 1);
    c->job = j;
    submit(r, j);
    return job_continue(conn, j);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls) {
    router *r = cls;
    rconn *c = *con_cls;
    if (!c) {
        c = xcalloc(1, sizeof *c);
        sbuf_init(&c->body);
        *con_cls = c;
        rfirst_call(r, conn, url, method, c);
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (c->body.len + *upload_data_size > r->max_body) c->too_big = true;
        if (!c->too_big && !c->rejected) sbuf_append(&c->body, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (c->rejected) return respond_error(conn, &c->reject, c->reject_hname, c->reject_hval);
    if (c->job) return job_continue(conn, c->job);
    if (c->too_big) {
        api_error e;
        api_error_set(&e, 413, "invalid_request_error", NULL,
                      "the request body is more than the limit of %zu bytes", r->max_body);
        e.code = "request_too_large";
        return respond_error(conn, &e, NULL, NULL);
    }
    switch (c->rt->id) {
    case RR_HEALTH: {
        bool ok = !atomic_load(&r->shutting_down) && router_healthy(r);
        return respond(conn, ok ? 200 : 503, NULL, "", 0, NULL, NULL);
    }
    case RR_METRICS: return handle_metrics(r, conn);
    case RR_VERSION: {
        const char *v = "{\"version\":\"" PDSERVE_VERSION "\"}";
        return respond(conn, 200, "application/json", v, strlen(v), NULL, NULL);
    }
    default: return start_job(r, conn, c, url, method);
    }
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    router *r = cls;
    rconn *c = *con_cls;
    if (!c) return;
    rjob *j = c->job;
    if (j) {
        pthread_mutex_lock(&j->mu);
        bool wake = !j->done;
        j->cancelled = !j->done;
        pthread_mutex_unlock(&j->mu);
        if (wake) curl_multi_wakeup(r->multi);
        job_unref(j);
    }
    sbuf_free(&c->body);
    free(c);
    *con_cls = NULL;
}

/* ---- start and stop ---------------------------------------------------------------------------- */
static int add_backends(router *r, const char *const *urls, int n, backend_role role, char *err,
                        size_t errlen) {
    for (int i = 0; i < n; i++) {
        if (r->n_backends == ROUTER_MAX_BACKENDS) {
            pd_errorf(err, errlen, "router: more than %d instances", ROUTER_MAX_BACKENDS);
            return -1;
        }
        const char *u = urls[i];
        if (strncmp(u, "http://", 7) || strlen(u) >= sizeof r->backends[0].url - 1 || strlen(u) < 8) {
            pd_errorf(err, errlen, "router: instance '%s' is not an http://HOST:PORT address", u);
            return -1;
        }
        backend_inst *b = &r->backends[r->n_backends++];
        snprintf(b->url, sizeof b->url, "%s", u);
        size_t l = strlen(b->url);
        while (l > 7 && b->url[l - 1] == '/') b->url[--l] = 0;
        b->role = role;
        b->index = i;
        atomic_init(&b->healthy, true); /* until a check says otherwise */
        atomic_init(&b->inflight, 0);
        atomic_init(&b->polled_load, 0);
        sbuf_init(&b->poll_buf);
    }
    return 0;
}

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

static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

router *router_start(const router_config *cfg, char *err, size_t errlen) {
    bool dis = cfg->n_prefill > 0 || cfg->n_decode > 0;
    if (dis && (cfg->n_prefill == 0 || cfg->n_decode == 0)) {
        pd_errorf(err, errlen, "router: a disaggregated deployment needs both --prefill and --decode instances");
        return NULL;
    }
    if (dis && cfg->n_instances) {
        pd_errorf(err, errlen, "router: give either --instances (colocated) or --prefill and --decode");
        return NULL;
    }
    if (!dis && cfg->n_instances == 0) {
        pd_errorf(err, errlen, "router: no instances: pass --instances URL,... or --prefill URL,... --decode URL,...");
        return NULL;
    }
    if (cfg->port < 0 || cfg->port > 65535) {
        pd_errorf(err, errlen, "port %d is out of range", cfg->port);
        return NULL;
    }
    const char *host = cfg->host ? cfg->host : "127.0.0.1";
    struct sockaddr_storage ss;
    bool v6 = false;
    if (resolve(host, cfg->port, &ss, &v6, err, errlen)) return NULL;
    static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
    pthread_once(&curl_once, curl_init_once);

    router *r = xcalloc(1, sizeof *r);
    r->listen_fd = -1;
    r->cfg = *cfg;
    r->host = xstrdup(host);
    r->served_name = xstrdup(cfg->served_model_name ? cfg->served_model_name : "pdserve");
    r->api_key = cfg->api_key && *cfg->api_key ? xstrdup(cfg->api_key) : NULL;
    r->secret = cfg->internal_secret && *cfg->internal_secret ? xstrdup(cfg->internal_secret) : NULL;
    r->max_body = cfg->max_body_bytes ? cfg->max_body_bytes : ROUTER_DEFAULT_BODY;
    r->kv_timeout_s = cfg->kv_timeout_s > 0 ? cfg->kv_timeout_s : 30.0;
    r->poll_interval_s = cfg->poll_interval_s > 0 ? cfg->poll_interval_s : 0.1;
    r->disaggregated = dis;
    if (cfg->policy == ROUTER_POLICY_PREFIX_AFFINITY) {
        r->aff = xcalloc(ROUTER_MAX_BACKENDS, sizeof *r->aff); /* 128 KiB per instance */
        for (int i = 0; i < ROUTER_MAX_BACKENDS; i++) pthread_mutex_init(&r->aff[i].mu, NULL);
    }
    atomic_init(&r->shutting_down, false);
    atomic_init(&r->n_ids, 1);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->drained, NULL);
    if (add_backends(r, cfg->instances, cfg->n_instances, BACKEND_COLOCATED, err, errlen) ||
        add_backends(r, cfg->prefill, cfg->n_prefill, BACKEND_PREFILL, err, errlen) ||
        add_backends(r, cfg->decode, cfg->n_decode, BACKEND_DECODE, err, errlen)) {
        router_free(r);
        return NULL;
    }
    r->multi = curl_multi_init();
    curl_multi_setopt(r->multi, CURLMOPT_MAX_HOST_CONNECTIONS, 0L);
    if (pthread_create(&r->thread, NULL, curl_main, r) != 0) {
        pd_errorf(err, errlen, "router: cannot start the curl thread");
        router_free(r);
        return NULL;
    }
    r->thread_started = true;
    unsigned threads = cfg->http_threads > 0 ? (unsigned)cfg->http_threads : 2;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME |
                     (v6 ? MHD_USE_IPv6 : 0);
    r->d = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, on_request, r,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, r,
                            MHD_OPTION_THREAD_POOL_SIZE, threads,
                            MHD_OPTION_CONNECTION_LIMIT, 4096u,
                            MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024u,
                            MHD_OPTION_CONNECTION_TIMEOUT, 600u,
                            MHD_OPTION_END);
    if (!r->d) {
        pd_errorf(err, errlen, "cannot listen on %s:%d (in use, or not an address of this machine?)",
                  host, cfg->port);
        router_free(r);
        return NULL;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(r->d, MHD_DAEMON_INFO_BIND_PORT);
    r->port = di ? di->port : cfg->port;
    log_info("router: %s, %d instance(s), policy %s, KV deadline %.1f s",
             dis ? "disaggregated" : "colocated load balancer", r->n_backends,
             cfg->policy == ROUTER_POLICY_LEAST_LOADED ? "least-loaded"
             : cfg->policy == ROUTER_POLICY_PREFIX_AFFINITY ? "prefix-affinity" : "round-robin", r->kv_timeout_s);
    return r;
}

int router_port(const router *r) { return r->port; }

void router_shutdown(router *r, double timeout_s) {
    if (!r || atomic_exchange(&r->shutting_down, true)) return;
    if (r->d) {
        /* closed in router_free once MHD has stopped (as server_shutdown's) */
        MHD_socket lfd = MHD_quiesce_daemon(r->d);
        if (lfd != MHD_INVALID_SOCKET) r->listen_fd = lfd;
    }
    /* stop the curl thread: it fails what is in flight (clients get an error) */
    if (r->thread_started) {
        pthread_mutex_lock(&r->mu);
        r->stop = true;
        pthread_mutex_unlock(&r->mu);
        curl_multi_wakeup(r->multi);
        pthread_join(r->thread, NULL);
        r->thread_started = false;
    }
    /* then let the clients read their last bytes */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)timeout_s;
    pthread_mutex_lock(&r->mu);
    while (r->n_jobs > 0)
        if (pthread_cond_timedwait(&r->drained, &r->mu, &ts) == ETIMEDOUT) break;
    pthread_mutex_unlock(&r->mu);
}

void router_free(router *r) {
    if (!r) return;
    router_shutdown(r, 5.0);
    if (r->d) {
        pthread_mutex_lock(&r->mu);
        int left = r->n_jobs;
        pthread_mutex_unlock(&r->mu);
        /* stopping MHD with suspended connections is undefined: leave it to exit */
        if (left) {
            log_warn("router: %d request(s) still open at exit; not stopping HTTP threads", left);
            return;
        }
        MHD_stop_daemon(r->d);
        if (r->listen_fd >= 0) close(r->listen_fd);
    }
    if (r->multi) curl_multi_cleanup(r->multi);
    for (int i = 0; i < r->n_backends; i++) sbuf_free(&r->backends[i].poll_buf);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->drained);
    free(r->host);
    free(r->served_name);
    free(r->api_key);
    free(r->secret);
    free(r->aff);
    free(r);
}
