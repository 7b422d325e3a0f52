/* server.h: the OpenAI-compatible HTTP server of one colocated instance.
 *
 * Four parts, each in its own file, so that the ones fed by outside bytes can be
 * tested and fuzzed without a socket, an engine or a tokenizer:
 *   api_request.c   request body (JSON bytes) -> api_request with every field
 *                   validated, or an api_error (status + OpenAI-style message). Pure.
 *   api_response.c  api_* -> JSON bodies and server-sent events ("data: {...}\n\n"),
 *                   written by hand into a string builder (the per-token hot path).
 *   output.c        stop strings over streamed text: the text a client may see now,
 *                   the text held back because it could begin a stop string. Pure.
 *   metrics.c       Prometheus text: engine gauges and counters, TTFT / inter-token
 *                   latency histograms, finished requests by reason.
 *   http.c          libmicrohttpd glue: routes, auth, body cap, the engine bridge
 *                   (events -> per-request queue -> resume the suspended connection),
 *                   disconnect -> engine_abort, graceful shutdown.
 *
 * Load this is tuned for: many concurrent streams (hundreds) each receiving one small
 * event per engine step; the engine thread only enqueues token ids, detokenisation
 * and JSON happen on the HTTP worker threads. */
#ifndef PD_SERVER_H
#define PD_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"
#include "kv/kv.h"
#include "model/tokenizer.h"

/* ---- string builder (api_response.c) ------------------------------------------------ *
 * Growable byte buffer, always NUL-terminated after sbuf_* calls. Owns p. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

void sbuf_init(sbuf *b);
void sbuf_free(sbuf *b);
void sbuf_reset(sbuf *b);                         /* len = 0, keeps the memory */
void sbuf_reserve(sbuf *b, size_t extra);
void sbuf_append(sbuf *b, const void *p, size_t n);
void sbuf_puts(sbuf *b, const char *s);
void sbuf_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s[0..n) as a quoted JSON string. Control characters are escaped; invalid
 * UTF-8 becomes U+FFFD, so the output is always valid JSON. */
void sbuf_json_str(sbuf *b, const char *s, size_t n);
/* A JSON number for a float: finite values as %.9g, -inf/NaN as -9999.0 (vLLM). */
void sbuf_json_float(sbuf *b, double v);

/* ---- prompt ids as text (api_request.c) ---------------------------------------------
 * The disaggregated path's internal form of a tokenized prompt: decimal ids separated by
 * single spaces, no sign, no other bytes. The decode instance's /internal/reserve answer
 * carries it (its "prompt_ids"), and the router puts it before the prefill body
 * (X-PD-Prompt-Ids-Bytes), so that the prompt is tokenized once per request. */
void prompt_ids_text_format(sbuf *out, const int32_t *ids, int n);
/* ids of p[0..len) (owned) and *n, or NULL when the text is not exactly that form, holds
 * no id or more than max, or an id past INT32_MAX (outside input: never trusted) */
int32_t *prompt_ids_text_parse(const char *p, size_t len, int max, int *n);

/* ---- errors ------------------------------------------------------------------------- */
typedef struct api_error {
    int status;             /* HTTP status: 400, 401, 404, 405, 413, 500, 503 */
    const char *type;       /* static: "invalid_request_error", "authentication_error", ... */
    const char *code;       /* static or NULL: "model_not_found", "invalid_api_key", ... */
    char param[64];         /* the offending field, "" when none */
    char message[512];
} api_error;

void api_error_set(api_error *e, int status, const char *type, const char *param,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* {"error":{"message":...,"type":...,"param":...|null,"code":...|null}} */
void api_error_json(sbuf *out, const api_error *e);

/* ---- requests (api_request.c) ------------------------------------------------------- */
typedef enum api_endpoint {
    API_ENDPOINT_COMPLETIONS,   /* POST /v1/completions */
    API_ENDPOINT_CHAT,          /* POST /v1/chat/completions */
    API_ENDPOINT_TOKENIZE,      /* POST /tokenize */
    API_ENDPOINT_DETOKENIZE,    /* POST /detokenize */
} api_endpoint;

#define API_MAX_STOP 16         /* stop strings per request */
#define API_MAX_STOP_LEN 256    /* bytes per stop string */
#define API_MAX_MESSAGES 4096
#define API_MAX_TOKENS_CAP (1 << 24) /* any max_tokens above this is absurd whatever the model */

/* What the parser checks numbers against (the serving instance's facts). */
typedef struct api_limits {
    int vocab_size;             /* token ids must be in [0, vocab_size) */
    int max_model_len;          /* max_tokens above it is rejected outright */
} api_limits;

/* A validated request. Every pointer is owned (api_request_free). Exactly one of
 * prompt / prompt_ids / messages is set for completions, chat and tokenize;
 * detokenize sets prompt_ids. */
typedef struct api_request {
    api_endpoint endpoint;
    char *model;                /* NULL when not given */
    char *prompt;               /* text prompt (not empty), NUL-terminated */
    size_t prompt_len;
    int32_t *prompt_ids;        /* token ids (not empty for completions) */
    int n_prompt_ids;
    bool has_prompt_ids;
    chat_message *messages;     /* [n_messages]; role and content owned */
    int n_messages;
    bool add_special_tokens;    /* completions/tokenize-prompt: true; chat/messages: false */
    bool add_generation_prompt; /* chat and tokenize-messages: true */
    bool stream;
    bool include_usage;         /* stream_options.include_usage */
    bool pdserve_timing;        /* pdserve extension: server-side timing beside usage */
    bool has_max_tokens;        /* else the server fills max_model_len - prompt */
    sampling_params sp;         /* sp.logprobs >= 0 when logprobs are asked for */
    char *stop[API_MAX_STOP];   /* stop strings, each 1..API_MAX_STOP_LEN bytes */
    size_t stop_len[API_MAX_STOP];
    int n_stop;
} api_request;

/* Parses and validates one request body of `len` bytes (need not be NUL-terminated).
 * Returns 0 with *out filled (free with api_request_free), or -1 with *err filled
 * (status 400 with the field named in param) and *out holding nothing to free.
 * Never allocates more than a constant times len; never crashes (fuzzed:
 * fuzz/fuzz_api_request.c). */
int api_request_parse(api_endpoint ep, const char *body, size_t len, const api_limits *lim,
                      api_request *out, api_error *err);
void api_request_free(api_request *r);

/* ---- responses (api_response.c) ----------------------------------------------------- */
/* Server-side view of one request (engine clock, seconds from arrival; HTTP parsing
 * before arrival is not included), and where its time to first token went: phases in
 * the order they happen, each measured on one process's monotonic clock (names are
 * static strings; docs/results-database.md, "Where the TTFT went"). A disaggregated
 * request's phases come from the router, the prefill instance and the decode instance;
 * its ttft_s / e2e_s are then the router's arrival to the decode instance's first token
 * (the decode instance's answer to the router and the router's relay excluded). */
#define API_TIMING_PHASES 10
typedef struct api_timing {
    double ttft_s, e2e_s, queue_s;
    int n_preemptions;
    int n_phases;
    const char *phase_name[API_TIMING_PHASES];
    double phase_s[API_TIMING_PHASES];
} api_timing;

/* A disaggregated request's phases before the decode instance, as the router hands them
 * over in X-PD-Timing ("reserve=S,prefill_call=S,queue=S,prefill=S,kv=S", seconds):
 * the router's reservation and prefill calls (its clock), and the prefill instance's
 * engine queue, compute (first scheduled .. first token) and KV tail (the prefill's end
 * .. the transfer's end). */
typedef struct api_dis_timing {
    double reserve_s, prefill_call_s, queue_s, prefill_s, kv_s;
    double kv_queue_s;  /* the prefill side's blocks waiting for its transfer worker (has_kv_queue) */
    bool has_kv_queue;  /* kv_queue sent (then kv_s is the tail after it), else kv_s is the whole tail */
} api_dis_timing;
/* 0 and *out filled, or -1 (malformed: the request goes on without it). */
int api_dis_timing_parse(const char *text, api_dis_timing *out);
void api_timing_add(api_timing *t, const char *name, double s);

typedef struct api_usage {
    int prompt_tokens, completion_tokens, cached_tokens;
    const api_timing *timing;   /* non-NULL: "pdserve_timing" follows "usage" */
} api_usage;

/* One output token's logprobs, as the engine gave them. */
typedef struct api_lp_item {
    int32_t id;
    float logprob;
    int n_top;
    token_logprob top[SAMPLING_MAX_LOGPROBS];
} api_lp_item;

/* Text of one token for logprobs output: malloc'd (caller frees), length in *len. */
typedef char *(*api_token_text_fn)(void *user, int32_t id, size_t *len);

/* What every response of one request shares. */
typedef struct api_out_ctx {
    bool chat;
    const char *id;             /* "cmpl-..." or "chatcmpl-..." */
    const char *model;
    int64_t created;            /* unix seconds */
    api_token_text_fn token_text;
    void *token_text_user;
} api_out_ctx;

/* Appends one SSE event with a streaming chunk: text (may be empty), the logprobs of
 * the tokens it covers (NULL/0 when not asked), finish ("stop"/"length") or NULL.
 * text_offset: bytes of output text before this chunk (completions logprobs).
 * For chat, role_only emits the opening {"role":"assistant","content":""} delta. */
void api_sse_chunk(sbuf *out, const api_out_ctx *c, const char *text, size_t len,
                   const api_lp_item *lps, int n_lps, size_t text_offset, const char *finish,
                   bool role_only);
/* The closing usage chunk (stream_options.include_usage): "choices":[] + usage. */
void api_sse_usage(sbuf *out, const api_out_ctx *c, const api_usage *u);
/* data: {"error":{...}} */
void api_sse_error(sbuf *out, const api_error *e);
void api_sse_done(sbuf *out);   /* data: [DONE] */
/* The whole non-streaming response body. */
void api_response_full(sbuf *out, const api_out_ctx *c, const char *text, size_t len,
                       const api_lp_item *lps, int n_lps, const char *finish, const api_usage *u);
void api_usage_json(sbuf *out, const api_usage *u);

/* ---- stop strings (output.c) --------------------------------------------------------- *
 * Keeps the whole output text of one request; text becomes visible to the client only
 * when no stop string could still begin inside it. Pure: no tokenizer, no I/O. */
typedef struct stop_filter {
    char *const *stop;          /* not owned (the api_request's) */
    const size_t *stop_len;
    int n_stop;
    size_t max_stop_len;
    sbuf text;                  /* all text so far, cut at the stop string once found */
    size_t emitted;             /* bytes of text already handed out */
    bool stopped;               /* a stop string was found; nothing more is accepted */
} stop_filter;

void stop_filter_init(stop_filter *f, char *const *stop, const size_t *stop_len, int n_stop);
void stop_filter_free(stop_filter *f);
/* Appends newly decoded text (complete UTF-8). *emit and *emit_len get the text that can
 * be shown now (a view into f->text, valid until the next call). Returns true when a
 * stop string completed: the text is cut before it and f->stopped is set. With
 * final (no more text will come), nothing is held back. */
bool stop_filter_push(stop_filter *f, const char *s, size_t n, bool final, const char **emit,
                      size_t *emit_len);

/* ---- metrics (metrics.c) ------------------------------------------------------------- */
#define METRICS_MAX_BUCKETS 32

typedef struct histogram {
    const double *bounds;       /* upper bounds (le), ascending; +Inf implied */
    int n_bounds;
    uint64_t counts[METRICS_MAX_BUCKETS]; /* non-cumulative, [n_bounds + 1] */
    double sum;
    uint64_t count;
} histogram;

void histogram_init(histogram *h, const double *bounds, int n_bounds);
void histogram_observe(histogram *h, double v);

typedef enum metrics_reason {
    METRICS_REASON_STOP, METRICS_REASON_LENGTH, METRICS_REASON_ABORT, METRICS_REASON_ERROR,
    METRICS_REASON_COUNT
} metrics_reason;

typedef struct server_metrics server_metrics; /* opaque: has its own lock */

server_metrics *metrics_create(void);
void metrics_free(server_metrics *m);
/* Called once per finished request (any thread): TTFT, inter-token latencies and e2e
 * latency from the engine's timestamps (times may be NULL: then only the reason). */
void metrics_observe_request(server_metrics *m, const request_times *t, int n_output,
                             metrics_reason reason);
/* Prometheus text exposition (version 0.0.4) of everything. */
void metrics_render(server_metrics *m, const engine_stats *st, const char *model_name, sbuf *out);
struct power_session;
/* Energy lines of a running power session, read now (src/power/power.h,
 * power_live_prometheus: GPU energy counters, idle and current power, clocks,
 * pdserve_energy_measured{component}); p NULL: every component "not measured". Each
 * NVML energy-counter read costs milliseconds: scrape time only, never per token. */
void metrics_render_energy(struct power_session *p, sbuf *out);
/* The prefill side's KV transfer counters (internal_kv_totals_get), labelled as
 * metrics_render labels. */
struct internal_kv_totals;
void metrics_render_kv_sends(const struct internal_kv_totals *k, const char *model_name, sbuf *out);
/* Decode: the store's gets and their time by part (nothing where the medium counts none). */
void metrics_render_kv_gets(const struct internal_kv_totals *k, const char *model_name, sbuf *out);

/* ---- roles of an instance ------------------------------------------------------------------ */
typedef enum server_role {
    SERVER_ROLE_COLOCATED,      /* prefill and decode here (the default) */
    SERVER_ROLE_PREFILL,        /* + POST /internal/prefill */
    SERVER_ROLE_DECODE,         /* + POST /internal/reserve, /internal/decode, /internal/release */
    SERVER_ROLE_ROUTER,         /* no engine: router.c */
} server_role;
const char *server_role_name(server_role r);
int server_role_parse(const char *s, server_role *out); /* 0, or -1 */

struct kv_connector;

/* ---- the server (http.c) -------------------------------------------------------------- */
typedef struct server_config {
    const char *host;           /* "127.0.0.1" */
    int port;                   /* 0: any free port (see server_port) */
    const char *served_model_name;
    const char *api_key;        /* NULL: no auth */
    size_t max_body_bytes;      /* 0: 4 MiB */
    int http_threads;           /* 0: 2 */
    int http_timeout_s;         /* close a connection idle (or not reading) this long (0: 60) */
    int max_stream_backlog;     /* abort a stream whose client leaves this many tokens unread (0: 2048) */
    int max_waiting_requests;   /* the engine's limit, for 503 before submit (0: none) */
    server_role role;           /* colocated (0), prefill or decode */
    struct kv_connector *kv;    /* prefill / decode: the KV medium (not owned) */
    const char *internal_secret;/* non-NULL: /internal/... needs X-PD-Internal-Secret */
    double kv_timeout_s;        /* default deadline of reservations (0: 30 s) */
    int debug_stall_transfer_ms;/* prefill: wait this long before shipping KV (fault tests) */
    struct power_session *power;/* energy meters shown on /metrics (not owned; NULL: none) */
} server_config;

typedef struct server server;

/* Starts listening and serving with the given engine (started, not owned) and
 * tokenizer (not owned). NULL with err (port taken, bad host ...). */
server *server_start(const server_config *cfg, engine *e, const tokenizer *t, char *err,
                     size_t errlen);
int server_port(const server *s);
/* Graceful stop: no new connections, every running request aborted (streams end with
 * an error event), waits up to timeout_s for them to drain, stops the HTTP threads.
 * The engine is left to the caller (engine_stop after this). */
void server_shutdown(server *s, double timeout_s);
void server_free(server *s);    /* after server_shutdown; NULL is a no-op */

/* ---- internal endpoints of prefill and decode instances (internal.c) ------------------------ *
 * What http.c calls for /internal/...; the router (router.c) is the only caller of those.
 * Tickets travel as kv_ticket_format text in the X-PD-Ticket header; the first token as
 * "TOKEN[;LOGPROB[;ID:LP,ID:LP...]]" in X-PD-First; the client's body is sent verbatim. */
typedef struct internal_ctx internal_ctx;
/* A deferred answer of http.c: the internal side sends it once, from any thread. */
typedef struct server_reply server_reply;
void server_reply_send(server_reply *r, int status, const sbuf *json);

internal_ctx *internal_create(engine *e, struct kv_connector *kv, server_role role,
                              double timeout_s, int stall_ms);
/* Stops the threads; fails what is queued (its blocks go back). Engine still alive. */
void internal_free(internal_ctx *in);
/* Active reservations and transfers (for /load). */
int internal_active(internal_ctx *in);
/* Prefill: the KV transfers answered so far (GET /metrics): their number, their seconds
 * from the first send call to the transfer's end, and the seconds from each prompt's
 * prefill end to its transfer's end, a wait for the transfer thread included (what the
 * transfers added to their requests' TTFT; layer-wise, less than the transfer). */
typedef struct internal_kv_totals {
    uint64_t transfers;
    double transfer_s, tail_s;
    uint64_t store_sends;              /* a store's puts (disk), and where their time went */
    double put_s[KV_PUT_PARTS];
    uint64_t store_gets;               /* decode: a store's gets (disk), and where their polls'
                                          time went */
    double get_s[KV_GET_PARTS];
} internal_kv_totals;
void internal_kv_totals_get(internal_ctx *in, internal_kv_totals *out);
/* Decode: reserves blocks for the prompt ids[n] and writes {"ticket":...} to out.
 * -1 with e (503 when the pool is full). The ids are kept (copied) with the
 * reservation under body_hash, the hash of the request's body, for
 * internal_decode_prompt. */
int internal_reserve(internal_ctx *in, const char *rid, const int32_t *ids, int n,
                     double timeout_s, uint64_t body_hash, sbuf *out, api_error *e);
/* Decode: the prompt ids that /internal/reserve kept for this ticket, when the body's
 * hash is the one it had there (the router sends the same body to both): 0 with
 * *ids (owned by the caller) and *n, the entry dropped; -1 when there is none (the
 * caller tokenizes). Saves a second tokenization on a disaggregated request's path. */
int internal_decode_prompt(internal_ctx *in, const char *ticket_text, uint64_t body_hash,
                           int32_t **ids, int *n);
/* Decode: gives up a reservation (unknown or ended ones are ignored). */
void internal_release(internal_ctx *in, const char *ticket_text);
/* Decode: whether internal_decode_submit may block for long on this ticket: a store's
 * (cpu, disk), whose get copies or reads the whole prompt's KV inside the wait. A link's
 * KV (gpu, nccl, tcp) is here by the time the router calls /internal/decode. */
bool internal_decode_reads(const char *ticket_text);
/* Decode: waits (bounded by the ticket's deadline) for the ticket's KV, takes its
 * blocks and submits r as a prefilled request with the given first token. cached_text
 * (X-PD-Cached-Tokens, may be NULL): the prompt tokens the prefill side found cached,
 * reported as the request's cached tokens. *waited_s: how long it waited for the KV
 * (left alone when it never waited). Returns the engine id, or 0 with e (the
 * reservation is given up). */
uint64_t internal_decode_submit(internal_ctx *in, const engine_request *r, const char *ticket_text,
                                const char *first_text, const char *cached_text, double *waited_s,
                                api_error *e);
/* Prefill: runs the prompt of r (its callback is replaced), ships the KV per the ticket
 * and answers reply with {"first":...}; or an error answer. Returns a handle for
 * internal_prefill_detach (the HTTP side is done with it) and the engine id in *id, or
 * NULL with e (reply untouched). */
typedef struct internal_prefill_job internal_prefill_job;
internal_prefill_job *internal_prefill_start(internal_ctx *in, const engine_request *r,
                                             const char *ticket_text, server_reply *reply,
                                             uint64_t *id, api_error *e);
void internal_prefill_detach(internal_prefill_job *j);

/* ---- the router (router.c) ----------------------------------------------------------------- *
 * The public endpoint of a deployment: the same OpenAI API, served by proxying to
 * instances over HTTP (libcurl multi, one thread) and streaming their answers back
 * through libmicrohttpd. Over colocated instances (`instances`) it is a load balancer;
 * over prefill and decode instances it drives the disaggregated request (DESIGN.md):
 * reserve on a decode instance, prefill with the ticket on a prefill instance, then
 * stream the decode instance's answer. Instances are polled (GET /load) every
 * poll_interval_s: running + waiting for least-loaded, reachability for health. */
/* prefix-affinity: to the instance whose cache most likely holds the prompt's longest
 * prefix (router.c: a bounded table per instance of the prompt prefixes routed to it),
 * least-loaded when the match is short or that instance is overloaded (docs/reuse.md). */
typedef enum router_policy {
    ROUTER_POLICY_ROUND_ROBIN, ROUTER_POLICY_LEAST_LOADED, ROUTER_POLICY_PREFIX_AFFINITY
} router_policy;
int router_policy_parse(const char *s, router_policy *out); /* 0, or -1 */

typedef struct router_config {
    const char *host;           /* "127.0.0.1" */
    int port;                   /* 0: any free port */
    const char *served_model_name;
    const char *api_key;        /* NULL: no auth on /v1 */
    const char *const *instances; int n_instances; /* colocated backends: "http://H:P" */
    const char *const *prefill; int n_prefill;     /* disaggregated: both lists given */
    const char *const *decode; int n_decode;
    router_policy policy;
    double kv_timeout_s;        /* deadline of a disaggregated request's reservation +
                                 * prefill + transfer (0: 30 s) */
    const char *internal_secret;/* sent as X-PD-Internal-Secret (NULL: none) */
    double poll_interval_s;     /* 0: 0.1 s */
    size_t max_body_bytes;      /* 0: 8 MiB */
    int http_threads;           /* 0: 2 */
} router_config;

typedef struct router router;
router *router_start(const router_config *cfg, char *err, size_t errlen);
int router_port(const router *r);
/* Stops accepting, fails requests in flight (streams end with an error event), waits
 * up to timeout_s, stops both threads. */
void router_shutdown(router *r, double timeout_s);
void router_free(router *r);    /* NULL is a no-op */

#endif
