/* bench.h: the load generator behind `pdserve bench` (and, later, `pdserve sweep`),
 * as a library: workloads (datasets), arrival processes, the streaming HTTP client,
 * metrics, energy from the servers' /metrics, and the vLLM-style report.
 *
 * Tuned for: thousands of concurrent streaming requests from one thread (libcurl
 * multi + epoll), >100,000 streamed tokens/s on one core, so that the instrument's
 * own cost stays negligible beside what it measures. Nothing is allocated per token
 * on the hot path except amortised growth of a request's own buffers.
 *
 * The flow: bench_dataset_load() -> bench_arrivals() -> bench_run() -> bench_result
 * (per-request records + summary) -> bench_print_summary() / bench_result_save_json().
 *
 * Metric definitions follow vLLM's `bench serve` exactly (see bench_summarize). */
#ifndef PD_BENCH_H
#define PD_BENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---- tokenizer, as the bench sees it ------------------------------------------------
 * A table of callbacks, so the library does not depend on which tokenizer is linked
 * (cmd_bench.c adapts model/tokenizer.h; tests use a toy). NULL tokenizer = none:
 * random prompts are sent as token-id arrays, text lengths are estimated. */
typedef struct bench_tokenizer {
    void *ctx;
    int vocab_size;
    /* Raw encoding (no special tokens added). *ids malloc'd, caller frees. 0 or -1. */
    int (*encode)(void *ctx, const char *text, size_t len, int32_t **ids, int *n);
    /* Decoding without special tokens; malloc'd NUL-terminated text. */
    char *(*decode)(void *ctx, const int32_t *ids, int n, size_t *len);
    bool (*is_special)(void *ctx, int32_t id);  /* may be NULL */
} bench_tokenizer;

/* The model's tokenizer (model/tokenizer.h) as a bench_tokenizer; t stays owned by
 * the caller and must outlive out. */
struct tokenizer;
void bench_tokenizer_wrap(bench_tokenizer *out, const struct tokenizer *t);

/* ---- datasets -------------------------------------------------------------------- */
typedef enum bench_dataset_kind {
    BENCH_DATASET_RANDOM,
    BENCH_DATASET_SHAREGPT,
    BENCH_DATASET_AZURE,
    BENCH_DATASET_MOONCAKE,
    BENCH_DATASET_PREFIX_REPETITION,
    BENCH_DATASET_CUSTOM,
    BENCH_DATASET_MOONCAKE_SYNTHETIC,  /* Mooncake's model without a file (dataset_mooncake.c) */
} bench_dataset_kind;

/* "random" -> BENCH_DATASET_RANDOM ...; -1 when unknown. */
int bench_dataset_kind_parse(const char *name);
const char *bench_dataset_kind_name(bench_dataset_kind k);

/* Tokens per hash id in the Mooncake trace format. */
#define BENCH_MOONCAKE_BLOCK 512

/* The reuse ratio of requests given by block hash ids (Mooncake's format: equal ids,
 * equal blocks, and an id names its whole prefix): tokens of the full blocks whose id
 * an earlier request already had, over all prompt tokens. ids[i] holds n_ids[i] ids of
 * block tokens each for a prompt of lens[i] tokens (a last partial block never counts
 * as seen). Returns a fraction in [0, 1], or -1 when there are no prompt tokens. */
double bench_reuse_ratio_of_blocks(const long long *const *ids, const int *n_ids, const int *lens, int n,
                                   int block);
/* No single request may ask for more prompt tokens than this (a corrupt trace must
 * not make the bench allocate gigabytes); override in bench_dataset_opts. */
#define BENCH_MAX_REQUEST_TOKENS (1 << 21)

typedef struct bench_dataset_opts {
    bench_dataset_kind kind;
    const char *path;             /* sharegpt, azure, mooncake, custom */
    int num_prompts;              /* requests wanted (files: first N usable rows) */
    uint64_t seed;
    /* random */
    int random_input_len, random_output_len, random_prefix_len;
    double random_range_ratio;    /* lengths uniform in [len*(1-r), len*(1+r)] */
    int random_vocab_size;        /* token ids drawn below this when no tokenizer */
    /* sharegpt / custom */
    int sharegpt_output_len;      /* > 0 overrides the gpt turn's length */
    int custom_output_len;        /* used when a line has no output_tokens; -1 = none */
    /* prefix-repetition */
    int prefix_len, suffix_len, num_prefixes, prefix_output_len;
    /* mooncake-synthetic (dataset_mooncake.c, docs/reuse.md) */
    int mooncake_block_size;      /* tokens per hash id (512, Mooncake's) */
    int mooncake_input_len;       /* mean prompt tokens (7590, the Mooncake trace's mean) */
    int mooncake_output_len;      /* mean output tokens (182, the trace's mean) */
    int mooncake_max_input_len;   /* prompts are cut to this (0: 8 x the mean) */
    double mooncake_len_sigma;    /* log-normal sigma of both lengths (0: every length the mean) */
    double mooncake_reuse_ratio;  /* expected fraction of prompt tokens in blocks seen before */
    double mooncake_zipf_s;       /* exponent of the popularity law over earlier requests (1) */
    /* traces */
    double trace_time_scale;      /* arrival = (t - t0) * scale */
    int max_request_tokens;       /* 0 = BENCH_MAX_REQUEST_TOKENS */
} bench_dataset_opts;

void bench_dataset_opts_default(bench_dataset_opts *o);

typedef struct bench_request {
    char *prompt;          /* text (owned), or NULL when prompt_ids is the prompt */
    int32_t *prompt_ids;   /* owned; sent as a token-id array (no tokenizer) */
    int prompt_len;        /* tokens; -1 when unknown (then the server's usage counts) */
    int output_len;        /* max_tokens; -1 = not sent (server decides) */
    double arrival_s;      /* trace timestamp relative to the first row; -1 if none */
    long long *hash_ids;   /* mooncake, mooncake-synthetic: the prompt's block ids (owned) */
    int n_hash_ids;
} bench_request;

typedef struct bench_dataset {
    bench_request *reqs;   /* n entries, owned */
    int n;
    bool has_timestamps;   /* every request carries arrival_s (azure, mooncake) */
    bool lengths_estimated;/* prompt lengths guessed from bytes (no tokenizer) */
    double reuse_ratio;    /* mooncake, mooncake-synthetic: prompt tokens in blocks that an
                            * earlier request also had / prompt tokens (by hash id); -1: unknown */
} bench_dataset;

/* Builds the dataset the options describe (reading o->path for file formats).
 * Returns 0, or -1 with err naming the file and line of the first bad row. */
int bench_dataset_load(const bench_dataset_opts *o, const bench_tokenizer *tok, bench_dataset *out,
                       char *err, size_t errlen);
/* Up to n warm-up requests for a run of the dataset o describes, of the same shape
 * (lengths, outputs) but with prompts of their own, from which no prefix cache or KV
 * store can then answer a measured request: synthetic datasets under another seed
 * (o->seed + 1000003), files the rows after the o->num_prompts measured ones (the same
 * seed, so the same shuffle). Returns 0, or -1 with err (a file without rows beyond
 * them). */
int bench_dataset_load_warmups(const bench_dataset_opts *o, const bench_tokenizer *tok, int n,
                               bench_dataset *out, char *err, size_t errlen);
/* Same for file formats, from text in memory; name is used in messages. */
int bench_dataset_parse(const bench_dataset_opts *o, const char *text, size_t len, const char *name,
                        const bench_tokenizer *tok, bench_dataset *out, char *err, size_t errlen);
void bench_dataset_free(bench_dataset *d);
/* The same over a dataset's requests (their hash_ids, prompt_len); -1 if any lacks them. */
double bench_dataset_reuse_ratio(const bench_dataset *d, int block);

/* Token-exact synthetic prompt: given n token ids, returns text that re-encodes to
 * exactly target tokens (decode, re-encode, truncate or pad with random ids, up to
 * 10 rounds, as vLLM does). *got = the final encoded length (== target unless the
 * tokenizer cannot be coaxed). Returns malloc'd text. */
char *bench_prompt_from_ids(const bench_tokenizer *tok, const int32_t *ids, int n, int target,
                            uint64_t seed, int *got);

/* ---- arrivals ------------------------------------------------------------------- *
 * out[i] = send time of request i in seconds after the start: 0 for every request
 * when rate is infinite; otherwise out[0] = 0 and gaps drawn from a gamma
 * distribution with shape burstiness and mean 1/rate (burstiness 1: Poisson). */
void bench_arrivals(double rate, double burstiness, int n, uint64_t seed, double *out);
/* One gamma(shape, scale) draw (Marsaglia-Tsang); exposed for tests. */
struct pd_rng;
double bench_gamma(struct pd_rng *r, double shape, double scale);

/* ---- SSE parsing (incremental, chunks split anywhere) --------------------------- */
#define BENCH_PHASES_MAX 1024         /* longest "phases" object kept per request */
#define BENCH_SSE_MAX_EVENT (1 << 20)  /* larger events are an error, not a realloc storm */

typedef struct bench_sse {
    char *buf;             /* current line (partial) + the event's data so far (owned) */
    size_t line_len, cap;  /* bytes of the partial line at buf[data_len..] */
    size_t data_len;       /* bytes of event data at buf[0..] */
    bool has_data;         /* a data: field was seen in this event */
    bool last_cr;          /* previous byte was '\r' (so a following '\n' is no new line) */
} bench_sse;

/* Called once per complete event with its data (fields joined by '\n'); returns 0 to
 * go on, nonzero to stop parsing (returned by bench_sse_feed). */
typedef int (*bench_sse_cb)(void *ctx, const char *data, size_t len);

void bench_sse_init(bench_sse *p);
void bench_sse_reset(bench_sse *p);
void bench_sse_free(bench_sse *p);
/* Feeds bytes; calls cb for each event completed. Returns 0, the callback's nonzero
 * value, or -1 when an event exceeds BENCH_SSE_MAX_EVENT. */
int bench_sse_feed(bench_sse *p, const char *s, size_t n, bench_sse_cb cb, void *ctx);

/* One OpenAI streaming event (completions or chat), scanned without allocating.
 * Spans point into the event data; text is still JSON-escaped. */
typedef struct bench_event {
    bool done;                 /* data was "[DONE]" */
    bool valid;                /* parsed as a JSON object */
    const char *text;          /* choices[0].text, or delta.content / reasoning_content */
    size_t text_len;           /* escaped length; 0 = no text */
    bool finished;             /* choices[0].finish_reason is not null */
    int prompt_tokens;         /* usage.prompt_tokens, -1 if absent */
    int completion_tokens;     /* usage.completion_tokens, -1 if absent */
    int cached_tokens;         /* usage.prompt_tokens_details.cached_tokens, -1 if absent */
    const char *error;         /* error.message / message of an error object */
    size_t error_len;
    bool is_error;
    bool has_server_timing;    /* "pdserve_timing" object seen (pdserve extension) */
    double server_ttft_s, server_e2e_s;  /* its ttft_s / e2e_s, -1 if absent */
    const char *server_phases; /* its "phases" object as sent (points into data), or NULL */
    size_t server_phases_len;
} bench_event;

/* Scans one event's data. Always fills ev; returns 0 or -1 on malformed JSON. */
int bench_event_scan(const char *data, size_t len, bench_event *ev);
/* Unescapes a JSON string body (without quotes) into out (cap bytes, NUL added);
 * returns the unescaped length, or -1 on a bad escape. Output never exceeds len. */
long bench_json_unescape(const char *s, size_t len, char *out, size_t cap);
/* Skips one JSON value starting at p (whitespace first); returns the byte after it,
 * or NULL when malformed, truncated or nested deeper than 64. */
const char *bench_json_skip(const char *p, const char *end);

/* ---- energy from Prometheus /metrics ----------------------------------------------
 * Every sample whose metric name ends in "_energy_joules" is an energy counter of one
 * meter (src/power/power.h, power_live_prometheus, writes them), except the derived
 * sums pdserve_role_/component_/gpu_active_energy_joules, which are skipped; the
 * label role="..." (if any) says which role it belongs to. A series read through
 * several servers with identical name and labels (one host's CPU seen by two
 * instances) is one meter: counted once. pdserve_gpu_idle_power_watts gives a GPU's
 * idle baseline (same host and gpu labels), for idle-subtracted energy, and
 * pdserve_energy_measured{component} 0|1 says what a server measures. */
#define BENCH_ENERGY_MAX_SERIES 64
#define BENCH_ENERGY_MAX_COMPONENTS 8
typedef struct bench_energy_series {
    char key[192];         /* metric name + labels, as written (identifies the series) */
    char role[32];         /* role label, or "" */
    double before, after;  /* joules */
    bool has_before, has_after;
    bool dup;              /* the same meter already read through another server */
    bool has_idle;         /* idle_w known (a GPU of a pdserve instance) */
    double idle_w;         /* idle baseline, watts */
} bench_energy_series;

typedef struct bench_energy {
    bench_energy_series s[BENCH_ENERGY_MAX_SERIES];
    int n;
    double t_before, t_after;  /* CLOCK_MONOTONIC seconds of the two readings (0: unknown) */
    /* pdserve_energy_measured lines: a component is measured when every server that
     * reports it says 1 (both readings) */
    struct { char name[32]; bool measured; } comp[BENCH_ENERGY_MAX_COMPONENTS];
    int n_comp;
} bench_energy;

/* Adds the samples of one /metrics text (after = false: the "before" reading).
 * prefix distinguishes servers ("" for one). Returns the number of energy samples. */
int bench_energy_parse(bench_energy *e, const char *text, size_t len, const char *prefix, bool after);
/* Joules consumed (after - before) over series read both times; role NULL = all.
 * Returns -1 when no series was read both times (energy not measured). */
double bench_energy_joules(const bench_energy *e, const char *role);
/* GPU meters only (pdserve_gpu_energy_joules): joules over series read both times,
 * net: minus each GPU's idle watts x seconds (the window between the two readings
 * when seconds <= 0). NAN when not measured: nothing read both times, or (net) a GPU
 * of the selection without an idle baseline (never a partial sum). May be < 0 net. */
double bench_energy_gpu_joules(const bench_energy *e, const char *role, bool net, double seconds);
/* Idle watts summed over those GPUs; NAN when one has no baseline or there is none. */
double bench_energy_gpu_idle_w(const bench_energy *e, const char *role);
/* Whether the servers said the component ("gpu", "cpu" ...) is measured: 1, 0, or -1
 * when no server reported it. */
int bench_energy_component_measured(const bench_energy *e, const char *component);

/* ---- metrics ----------------------------------------------------------------------- */
#define BENCH_MAX_PERCENTILES 16

typedef struct bench_stat {
    int n;
    double mean, median, std;                 /* ms */
    double pct[BENCH_MAX_PERCENTILES];        /* ms, at bench_config.percentiles */
} bench_stat;

/* Percentile of sorted x[0..n) as numpy's default (linear interpolation); 0 if n=0. */
double bench_percentile(const double *sorted, int n, double p);
/* Fills s from x[0..n) (values in ms; x is sorted in place). */
void bench_stat_compute(bench_stat *s, double *x, int n, const double *pcts, int n_pcts);

/* One request's outcome. Times are seconds. */
typedef struct bench_record {
    bool success;
    char *error;           /* owned, NULL on success: "HTTP 500: ...", "connection dropped ..." */
    int prompt_len;        /* dataset's count, or the server's usage when the dataset had none */
    int output_len;        /* usage.completion_tokens when given, else text-bearing events */
    int expected_output_len;
    double start_s;        /* send time relative to the benchmark start */
    double ttft_s, e2el_s; /* first text event, last byte; relative to start_s */
    double *token_s;       /* n_tokens times of text events relative to start_s (owned) */
    int n_tokens, cap_tokens;
    char *text;            /* generated text, unescaped (owned) */
    size_t text_len, text_cap;
    bool has_server_timing;            /* the server's own view (--server-timing) */
    double server_ttft_s, server_e2e_s;
    char *server_phases;   /* where its TTFT went, the server's "phases" JSON object (owned),
                              or NULL */
    bool has_cached;       /* the server's usage gave prompt_tokens_details.cached_tokens */
    int cached_tokens;     /* prompt tokens it took from its prefix cache (any KV tier) */
} bench_record;

typedef enum bench_metric { BENCH_METRIC_TTFT = 1, BENCH_METRIC_TPOT = 2, BENCH_METRIC_ITL = 4,
                            BENCH_METRIC_E2EL = 8 } bench_metric;

typedef struct bench_summary {
    int completed, failed;
    long long total_input, total_output;
    long long total_cached;    /* prompt tokens served from the prefix cache (completed requests) */
    int n_cached_known;        /* completed requests whose usage gave cached_tokens */
    double duration_s;
    double request_throughput, output_throughput, total_token_throughput;
    int good;                  /* requests meeting every goodput SLO */
    double goodput;            /* good / duration; -1 when no SLO was given */
    double max_output_tokens_per_s;   /* peak over 1-second windows */
    int max_concurrent;               /* peak requests in flight */
    bench_stat ttft, tpot, itl, e2el;
    /* energy: joules over the timed part; -1 = not measured */
    double energy_j;
    /* --server-timing: median |client - server| over requests that carried it; -1 none */
    int n_server_timing;
    double server_ttft_diff_ms_median, server_e2e_diff_ms_median;
} bench_summary;

/* ---- the run ------------------------------------------------------------------------ */
typedef struct bench_config {
    const char *base_url;      /* "http://127.0.0.1:8000" */
    const char *endpoint;      /* "/v1/completions" or "/v1/chat/completions" */
    const char *model;         /* NULL: first id from GET /v1/models */
    const char *api_key;       /* NULL: none */
    const char *backend;       /* label for results ("openai", "openai-chat") */
    double request_rate;       /* requests/s; INFINITY = all at once */
    double burstiness;
    bool use_trace_times;      /* send at the dataset's timestamps (traces) */
    int max_concurrency;       /* 0 = unlimited */
    int num_warmups;
    const bench_dataset *warmups; /* their requests (bench_dataset_load_warmups), i % n; NULL:
                                   * the dataset's first requests (prefix caches may then
                                   * answer those from the warm-up's work) */
    uint64_t seed;
    bool ignore_eos;
    bool stream_usage;         /* ask for stream_options.include_usage */
    bool server_timing;        /* send "pdserve_timing": true (pdserve extension) */
    double temperature;
    double request_timeout_s;  /* per request, whole stream */
    double goodput_ttft_ms, goodput_tpot_ms, goodput_e2el_ms;  /* <= 0: no SLO */
    double percentiles[BENCH_MAX_PERCENTILES];
    int n_percentiles;
    unsigned percentile_metrics;   /* bench_metric bits */
    const char *metrics_urls;  /* comma-separated /metrics URLs; NULL: base_url + "/metrics"; "" none */
    bool progress;             /* progress bar on stderr */
} bench_config;

void bench_config_default(bench_config *c);

typedef struct bench_result {
    char model[256];
    char date[32];             /* "%Y%m%d-%H%M%S" local time at start */
    bench_record *recs;        /* one per dataset request, in dataset order (owned) */
    int n;
    bench_summary sum;
    bench_energy energy;
    uint64_t start_ns;         /* CLOCK_MONOTONIC at the timed start (start_s = 0) */
    double client_cpu_s;       /* CPU the client thread spent during the timed part */
    long long events;          /* SSE events handled during the timed part */
} bench_result;

/* Runs one benchmark: warmups (excluded), energy "before", every request of d at its
 * arrival time (bounded by max_concurrency), energy "after", then the summary.
 * Returns 0 (individual request failures are in the records), or -1 with err when
 * the run could not start (bad URL, no model found, curl init). *out owned by the
 * caller: bench_result_free. */
int bench_run(const bench_config *c, const bench_dataset *d, bench_result **out, char *err,
              size_t errlen);
void bench_result_free(bench_result *r);

/* Metrics from records (vLLM definitions): TTFT; TPOT = (e2el - ttft)/(out - 1) over
 * requests with out > 1; ITL = gaps between text events; E2EL; throughputs over
 * duration_s; goodput. Fills r->sum (energy untouched). */
void bench_summarize(const bench_config *c, bench_result *r, double duration_s);

/* The vLLM-style table ("============ Serving Benchmark Result ============"). */
void bench_print_summary(FILE *f, const bench_config *c, const bench_result *r);
/* JSON with vLLM's key names plus ours (token timestamps, energy). 0 or -1 with err. */
int bench_result_save_json(const bench_config *c, const bench_dataset_opts *o,
                           const bench_result *r, const char *path, char *err, size_t errlen);
/* "openai-infqps-concurrency64-MODEL-20250101-120000.json" as vLLM names it. */
void bench_result_default_filename(const bench_config *c, const bench_result *r, char *out, size_t cap);

/* Parses "ttft:300 tpot:50" / "ttft:300,e2el:2000" into c; -1 with err. */
int bench_parse_goodput(bench_config *c, const char *spec, char *err, size_t errlen);
/* Parses "50,90,95,99" and "ttft,tpot,itl,e2el" into c; -1 with err. */
int bench_parse_percentiles(bench_config *c, const char *spec, char *err, size_t errlen);
int bench_parse_percentile_metrics(bench_config *c, const char *spec, char *err, size_t errlen);

/* GET url into a malloc'd NUL-terminated body (caller frees); NULL with err. */
char *bench_http_get(const char *url, const char *api_key, double timeout_s, long *status,
                     char *err, size_t errlen);

#endif
