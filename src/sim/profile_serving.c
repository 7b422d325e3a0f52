/* profile_serving.c: `pdserve profile --serving`: the serving path of a request around
 * the engine, measured through the real server, router and connector in this process
 * (docs/simulator.md, "The serving path"). Three deployments are brought up in turn on
 * the profiled model, each on loopback:
 *
 *   colocated      one instance (server_start over an engine): the client's request,
 *                  its body parsed, the prompt tokenized, the engine woken, the first
 *                  token's SSE event written back;
 *   router         the same instance behind a router (router_start): its extra hop;
 *   disaggregated  a prefill and a decode instance, each with its engine, joined by the
 *                  cpu medium's connector, behind a router: reservation, prefill and
 *                  decode calls, their tokenizations, the connector's control messages.
 *
 * One request at a time, so that nothing queues: a request's serving path is its
 * time to first token at the client less the seconds its prefilling engine spent in
 * steps for it (the engine's own busy counter, read before and after) and, in the
 * disaggregated deployment, less the KV transfer over the cpu medium (which the
 * simulator prices from the medium's curve). Several prompt lengths, the median of
 * `repeats` requests each, a Theil-Sen line through them (sim_serving_fit). Then the
 * path's CPU: three runs of pdserve's bench client (per request, per streamed token,
 * per engine step), fitted. sim_profile_serving_processes measures the same through `pdserve
 * serve` / `pdserve up` children, as the sweep deploys them (their /metrics, /proc).
 *
 * Tuned for: a few dozen requests, well under a minute on two CPU cores; nothing here
 * is on a hot path. */
#include <arpa/inet.h>
#include <dirent.h>
#include <math.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench.h"
#include "kv/kv.h"
#include "model/tokenizer.h"
#include "server/server.h"
#include "sim/sim.h"
#include "study/study.h"
#include "util/util.h"

#define SERVE_MAX_LENGTHS 6
#define SERVE_MAX_REPEATS 16
#define SERVE_MAX_BIN 4096 /* steps a bin's median looks at */

/* A prompt of n_words plain words. */
static char *words_text(int n) {
    static const char *const words[] = {"the", "cat", "sat", "on", "a", "warm", "mat", "and", "looked", "at",
                                        "small", "birds", "over", "green", "hills", "while", "rain", "fell"};
    sbuf b;
    sbuf_init(&b);
    for (int i = 0; i < n; i++) {
        if (i) sbuf_puts(&b, " ");
        sbuf_puts(&b, words[(i * 7 + i / 18) % (int)PD_ARRAY_LEN(words)]);
    }
    char *s = xstrndup(b.p ? b.p : "", b.len);
    sbuf_free(&b);
    return s;
}

/* A prompt of n tokens of tok as the study's plans send them: the bench's random
 * dataset (random token ids, detokenized, token-exact on re-encoding). Its text costs
 * the server what a plan's prompts cost to tokenize: on a GPU host (H200 pair,
 * 2026-11-28) 3.7 ms for 4,096 tokens, where the same count of plain English words
 * took a fraction of it, and the serving path measured on words left those
 * milliseconds out of every simulated TTFT (docs/simulator.md, "The serving path").
 * Falls back to words when the random dataset cannot be made. */
static char *prompt_text(const tokenizer *tok, int n) {
    bench_tokenizer bt;
    bench_tokenizer_wrap(&bt, tok);
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.kind = BENCH_DATASET_RANDOM;
    o.num_prompts = 1;
    o.seed = 0x70726f66ull + (uint64_t)n;
    o.random_input_len = PD_MAX(n, 1);
    o.random_output_len = 1;
    o.random_range_ratio = 0;
    bench_dataset d;
    char e[256] = "";
    if (bench_dataset_load(&o, &bt, &d, e, sizeof e) == 0) {
        char *text = d.n == 1 && d.reqs[0].prompt ? xstrdup(d.reqs[0].prompt) : NULL;
        bench_dataset_free(&d);
        if (text) return text;
    }
    log_warn("profile: serving prompts of plain words (no random prompt of %d tokens: %s)", n, e);
    char *sample = words_text(256);
    int32_t *ids = NULL;
    int k = 0;
    double per_word = 1;
    if (tokenizer_encode(tok, sample, strlen(sample), false, &ids, &k, e, sizeof e) == 0 && k > 0) per_word = k / 256.0;
    free(ids);
    free(sample);
    return words_text(PD_MAX(1, (int)(n / per_word)));
}

/* One streamed completion to 127.0.0.1:port; *ttft: seconds from the write to the
 * first SSE data event; *prompt_tokens from the usage chunk (-1 when absent). 0, or -1
 * with err (connection failed, no [DONE]). */
static int stream_once(int port, const char *text, int max_tokens, double *ttft, int *prompt_tokens, char *err,
                       size_t errlen) {
    sbuf body, req;
    sbuf_init(&body);
    sbuf_init(&req);
    sbuf_puts(&body, "{\"prompt\":");
    sbuf_json_str(&body, text, strlen(text));
    sbuf_printf(&body, ",\"max_tokens\":%d,\"temperature\":0,\"ignore_eos\":true,\"stream\":true,"
                       "\"stream_options\":{\"include_usage\":true}}", max_tokens);
    sbuf_printf(&req, "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n", body.len);
    sbuf_append(&req, body.p, body.len);
    int rc = -1, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    *ttft = -1;
    *prompt_tokens = -1;
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        pd_errorf(err, errlen, "serving: cannot connect to port %d", port);
        goto out;
    }
    double t0 = time_now_s();
    if (write(fd, req.p, req.len) != (ssize_t)req.len) {
        pd_errorf(err, errlen, "serving: short write to port %d", port);
        goto out;
    }
    /* the whole answer is small (a few events): keep it all, search it as it grows */
    sbuf in;
    sbuf_init(&in);
    char buf[16384];
    for (;;) {
        ssize_t k = read(fd, buf, sizeof buf);
        if (k <= 0) break;
        sbuf_append(&in, buf, (size_t)k); /* kept NUL-terminated */
        if (*ttft < 0 && strstr(in.p, "data: {")) *ttft = time_now_s() - t0;
    }
    const char *u = in.p ? strstr(in.p, "\"prompt_tokens\":") : NULL;
    if (u) *prompt_tokens = atoi(u + 16);
    if (*ttft < 0 || !in.p || !strstr(in.p, "data: [DONE]"))
        pd_errorf(err, errlen, "serving: the answer from port %d did not stream to [DONE]: %.200s", port,
                  in.p ? in.p : "(nothing)");
    else
        rc = 0;
    sbuf_free(&in);
out:
    if (fd >= 0) close(fd);
    sbuf_free(&body);
    sbuf_free(&req);
    return rc;
}

static double busy_s(engine *e) {
    engine_stats s;
    engine_get_stats(e, &s);
    return s.busy_seconds;
}

/* The sum of a Prometheus series' samples (every label set) over comma-separated
 * /metrics URLs; 0 where none answers. */
static double metrics_sum(const char *urls, const char *name) {
    double total = 0;
    size_t nl = strlen(name);
    for (const char *p = urls; p && *p;) {
        size_t n = strcspn(p, ",");
        char url[512], e[256];
        snprintf(url, sizeof url, "%.*s", (int)PD_MIN(n, sizeof url - 1), p);
        p += n + (p[n] == ',');
        long status = 0;
        char *body = bench_http_get(url, NULL, 10, &status, e, sizeof e);
        for (char *line = body; line && *line;) {
            char *end = strchr(line, '\n');
            if (end) *end = 0;
            if (!strncmp(line, name, nl) && (line[nl] == ' ' || line[nl] == '{')) {
                const char *v = strrchr(line, ' ');
                if (v) total += atof(v + 1);
            }
            line = end ? end + 1 : NULL;
        }
        free(body);
    }
    return total;
}

/* One deployment under measurement: requests go to `port`; the prefilling engine is
 * `pe` (`de` the decode one, disaggregated); `medium` (disaggregated) prices the
 * transfer that is not serving path. */
typedef struct serve_target {
    int port;
    engine *pe, *de;
    /* a deployment of child processes (sim_profile_serving_processes) instead of
     * in-process engines: the prefilling engine's busy seconds and every instance's
     * steps from these /metrics URLs (comma-separated), the CPU from the processes of
     * pid (the deployment's top process and its children) */
    const char *busy_urls, *steps_urls;
    int pid;
    /* disaggregated: the prefill instance's /metrics, whose transfer seconds
     * (pdserve_kv_transfer_seconds_total: first send call to the end; whole transfers
     * here, so none overlaps the prefill) are each request's transfer as it ran; NULL:
     * priced from `medium`'s curve instead. The hand-over to the transfer thread before
     * it stays in the path. */
    const char *kv_urls;
    const sim_medium *medium;
    size_t kv_bytes_per_token;
    int max_tokens;
    const tokenizer *tok;
    const sim_profile *prof; /* prices the engines' steps (sim_step_factor); NULL: not */
} serve_target;

static double target_busy_s(const serve_target *t) {
    return t->busy_urls ? metrics_sum(t->busy_urls, "pdserve_engine_busy_seconds_total") : busy_s(t->pe);
}

/* Every engine's busy seconds in the deployment. */
static double target_busy_all_s(const serve_target *t) {
    if (t->steps_urls) return metrics_sum(t->steps_urls, "pdserve_engine_busy_seconds_total");
    return busy_s(t->pe) + (t->de ? busy_s(t->de) : 0);
}

/* ---- the engines' steps inside the deployment (sim_step_factor) ---------------------- */

/* The engine's token budget per step (engine_config_default; `pdserve serve` and `up`
 * keep it): a longer lone prompt is prefilled in chunks of this many. */
#define SERVE_STEP_TOKENS 2048

static bool can_price(const sim_profile *p) { return p && p->prefill.nx > 0 && p->decode.nx > 0; }

/* The profile's price of the steps of a lone prompt of n tokens, its one token sampled
 * at the last chunk: forward seconds and the rest (sampling, the step's overhead). */
static void price_prefill(const sim_profile *p, int n, double *fwd, double *host) {
    sim_cost c;
    sim_cost_init(&c, p, 0);
    *fwd = *host = 0;
    for (int done = 0; done < n;) {
        int k = PD_MIN(n - done, SERVE_STEP_TOKENS);
        sim_work w;
        sim_work_begin(&w, p);
        sim_work_add_chunk(&w, k, done);
        w.n_logits = done + k == n;
        sim_step_cost sc;
        sim_cost_step(&c, &w, &sc);
        *fwd += sc.prefill_s + sc.decode_s;
        *host += sc.seconds - sc.prefill_s - sc.decode_s;
        done += k;
    }
}

/* The same for decode steps of one sequence, contexts from+1 .. from+n. */
static void price_decode(const sim_profile *p, int from, int n, double *fwd, double *host) {
    sim_cost c;
    sim_cost_init(&c, p, 0);
    *fwd = *host = 0;
    for (int j = 1; j <= n; j++) {
        sim_work w;
        sim_work_begin(&w, p);
        sim_work_add_decode(&w, from + j);
        w.n_logits = 1;
        sim_step_cost sc;
        sim_cost_step(&c, &w, &sc);
        *fwd += sc.prefill_s + sc.decode_s;
        *host += sc.seconds - sc.prefill_s - sc.decode_s;
    }
}

/* A lone request's prefill inside the deployment against its price: the engine's busy
 * seconds less the priced host part, over the priced forward; 0 where not priced. */
static double prefill_factor(const sim_profile *p, int n_tok, double engine_s) {
    if (!can_price(p) || n_tok <= 0) return 0;
    double fwd, host;
    price_prefill(p, n_tok, &fwd, &host);
    return fwd > 0 ? PD_MAX(engine_s - host, 0) / fwd : 0;
}

/* Fills path's points: per length, the median over repeats of TTFT - the engine's busy
 * seconds - the transfer (as the prefill instance measured it, where it says; else as
 * the medium's curve prices it); then the fitted line. One untimed request first (the
 * deployment's first request opens connections and maps peers). */
static int measure_path(const serve_target *t, const int *lens, int n_lens, int repeats, sim_serving_path *path,
                        char *err, size_t errlen) {
    double ttft;
    int pt;
    char *warm = prompt_text(t->tok, lens[0]);
    int rc = stream_once(t->port, warm, t->max_tokens, &ttft, &pt, err, errlen);
    free(warm);
    if (rc) return -1;
    memset(path, 0, sizeof *path);
    sim_step_factor *sf = &path->steps;
    for (int li = 0; li < n_lens; li++) {
        char *text = prompt_text(t->tok, lens[li]);
        double v[SERVE_MAX_REPEATS], f[SERVE_MAX_REPEATS];
        int n_tok = lens[li], n_f = 0;
        for (int r = 0; r < repeats; r++) {
            double b0 = target_busy_s(t);
            double k0 = t->kv_urls ? metrics_sum(t->kv_urls, "pdserve_kv_transfer_seconds_total") : 0;
            if (stream_once(t->port, text, t->max_tokens, &ttft, &pt, err, errlen)) {
                free(text);
                return -1;
            }
            double engine_s = target_busy_s(t) - b0;
            if (pt > 0) n_tok = pt;
            double transfer = t->kv_urls ? metrics_sum(t->kv_urls, "pdserve_kv_transfer_seconds_total") - k0
                              : t->medium ? sim_cost_transfer(t->medium, (double)n_tok * (double)t->kv_bytes_per_token)
                                          : 0;
            v[r] = ttft - engine_s - transfer;
            double fr = prefill_factor(t->prof, n_tok, engine_s);
            if (fr > 0) f[n_f++] = fr;
            log_debug("profile: serving, port %d, %d tokens: ttft %.3f ms, engine busy %.3f ms (x%.3f of its price), "
                      "transfer %.3f ms", t->port, n_tok, ttft * 1e3, engine_s * 1e3, fr, transfer * 1e3);
        }
        free(text);
        path->tokens[path->n_points] = n_tok;
        path->seconds[path->n_points++] = PD_MAX(sim_median(v, repeats), 0);
        /* lengths come out increasing; one that tokenized no longer than the last is skipped */
        if (n_f > 0 && (sf->n_prefill == 0 || n_tok > sf->prefill_tokens[sf->n_prefill - 1])) {
            sf->prefill_tokens[sf->n_prefill] = n_tok;
            sf->prefill[sf->n_prefill++] = sim_median(f, n_f);
        }
    }
    sim_serving_fit(path);
    sf->measured = sf->n_prefill > 0;
    sf->decode = 1;
    return 0;
}

/* ---- the serving path's CPU ---------------------------------------------------------- */

/* The CPU runs of one deployment: {requests, max_tokens, concurrent}. One request at a
 * time with one output token each (per request), one at a time with many (per token and
 * per step alike: one token a step), several at once (several tokens a step): three
 * runs that tell the three terms apart. */
#define SERVE_CPU_PROMPT 128
#define SERVE_CPU_TOKENS 64
static const int SERVE_CPU_RUNS[3][3] = {{8, 2, 1}, {3, SERVE_CPU_TOKENS, 1}, {16, SERVE_CPU_TOKENS, 8}};

static double clock_s(clockid_t id) {
    struct timespec ts;
    if (clock_gettime(id, &ts) != 0) return 0;
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* On-CPU seconds of this process's engine threads (named "pd-engine" by engine.c). */
static double engine_threads_cpu_s(void) { return time_threads_cpu_s("pd-engine", true); }

static uint64_t steps_of(engine *e) {
    engine_stats s;
    if (!e) return 0;
    engine_get_stats(e, &s);
    return s.steps;
}

/* On-CPU seconds of process pid and its children (`pdserve up`'s router and instances),
 * every thread but the engines' ("pd-engine"), from the scheduler's account. */
static double thread_cpu_of(int pid, const char *tid) {
    char path[320], comm[32] = "";
    snprintf(path, sizeof path, "/proc/%d/task/%s/comm", pid, tid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
    fclose(f);
    if (!strncmp(comm, "pd-engine", 9)) return 0;
    snprintf(path, sizeof path, "/proc/%d/task/%s/schedstat", pid, tid);
    f = fopen(path, "r");
    unsigned long long ns = 0;
    if (f && fscanf(f, "%llu", &ns) != 1) ns = 0;
    if (f) fclose(f);
    return (double)ns * 1e-9;
}

static double process_cpu_s(int pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d) return 0;
    double total = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        if (de->d_name[0] != '.') total += thread_cpu_of(pid, de->d_name);
    closedir(d);
    return total;
}

static double procs_cpu_s(int pid) {
    double total = process_cpu_s(pid);
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", pid, pid);
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = 0;
    for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n")) total += process_cpu_s(atoi(tok));
    return total;
}

static double target_steps(const serve_target *t) {
    return t->steps_urls ? metrics_sum(t->steps_urls, "pdserve_engine_steps_total")
                         : (double)(steps_of(t->pe) + steps_of(t->de));
}

/* One CPU run: n requests of the prompt `text`, max_tokens each, `conc` at a time,
 * through pdserve's own bench client (the client the demo's sweep streams with), in this
 * thread. The serving CPU is this process's CPU less its engine threads' less this
 * thread's outside the client's timed part (dataset and connection set-up, which the
 * real client does before its clock starts). Fills pt = {requests, tokens, steps, cpu}. */
static int cpu_run(const serve_target *t, const char *text, int n, int max_tokens, int conc, double pt[4],
                   double *busy, char *err, size_t errlen) {
    bench_dataset d = {0};
    d.n = n;
    d.reqs = xcalloc((size_t)n, sizeof *d.reqs);
    for (int i = 0; i < n; i++) {
        d.reqs[i].prompt = xstrdup(text);
        d.reqs[i].prompt_len = -1;
        d.reqs[i].output_len = max_tokens;
        d.reqs[i].arrival_s = -1;
    }
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", t->port);
    bench_config bc;
    bench_config_default(&bc);
    bc.base_url = url;
    bc.model = t->pid ? NULL : "profile"; /* children serve their model's name: asked from /v1/models */
    bc.request_rate = INFINITY;
    bc.max_concurrency = conc;
    bc.ignore_eos = true;
    bc.stream_usage = true;
    bc.temperature = 0;
    bc.metrics_urls = "";
    bc.progress = false;
    double s0 = target_steps(t), c0 = t->pid ? procs_cpu_s(t->pid) : 0, b0 = target_busy_all_s(t);
    double p0 = clock_s(CLOCK_PROCESS_CPUTIME_ID), e0 = engine_threads_cpu_s(), m0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
    bench_result *r = NULL;
    int rc = bench_run(&bc, &d, &r, err, errlen);
    double m1 = clock_s(CLOCK_THREAD_CPUTIME_ID), e1 = engine_threads_cpu_s(), p1 = clock_s(CLOCK_PROCESS_CPUTIME_ID);
    double s1 = target_steps(t), c1 = t->pid ? procs_cpu_s(t->pid) : 0;
    *busy = target_busy_all_s(t) - b0;
    bench_dataset_free(&d);
    if (rc) return -1;
    long long tokens = 0;
    int ok = 0;
    for (int i = 0; i < r->n; i++)
        if (r->recs[i].success) ok++, tokens += r->recs[i].output_len;
    /* in process: all but the engines and the client's set-up; deployed: the
     * deployment's processes but their engines, and the client's timed part */
    double cpu = t->pid ? (c1 - c0) + r->client_cpu_s : (p1 - p0) - (e1 - e0) - (m1 - m0) + r->client_cpu_s;
    bench_result_free(r);
    if (ok != n) {
        pd_errorf(err, errlen, "serving cpu: %d of %d requests to port %d failed", n - ok, n, t->port);
        return -1;
    }
    pt[0] = n;
    pt[1] = (double)tokens;
    pt[2] = s1 - s0;
    pt[3] = PD_MAX(cpu, 0);
    log_debug("profile: serving cpu, port %d: %d requests x %d tokens, %d at once: %.0f tokens, %.0f steps, %.3f ms",
              t->port, n, max_tokens, conc, pt[1], pt[2], pt[3] * 1e3);
    return 0;
}

/* ---- the engines' steps from their step traces (engine_config.step_trace) ----------- */

/* One step of a trace: its start, busy seconds, instance (file), rows and chunks (pairs
 * n, start in the chunk pool). */
typedef struct tstep {
    double t, busy, ctx_sum;
    int inst, prefill, decode, logits, chunk0, n_chunks;
    double overlap;  /* the part of it another instance was in a step too (0-1) */
    int other_kind;  /* that step's kind (the longest such): 0 prefill rows, 1 decode */
} tstep;

typedef struct traces {
    tstep *s;
    int n, cap;
    int *chunks; /* n, start, n, start, ... */
    int n_chunks, chunks_cap;
    int n_inst;
} traces;

/* Appends every step line of the trace at path as instance tr->n_inst. */
static void traces_read(traces *tr, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        if (line[0] == '#') continue;
        tstep q = {.inst = tr->n_inst};
        double sched, fwd, smp;
        int rows, running, waiting, used, off = 0;
        long long ctx;
        if (sscanf(line, "%lf %lf %lf %lf %lf %d %d %d %lld %d %d %d %d %n", &q.t, &q.busy, &sched, &fwd, &smp, &rows,
                   &q.prefill, &q.decode, &ctx, &q.logits, &running, &waiting, &used, &off) != 13 || off <= 0)
            continue;
        q.ctx_sum = (double)ctx;
        q.chunk0 = tr->n_chunks;
        for (char *c = line + off; *c && *c != '-' && *c != '\n';) {
            int n, at, k = 0;
            if (sscanf(c, "%d@%d%n", &n, &at, &k) != 2 || k <= 0) break;
            if (tr->n_chunks + 2 > tr->chunks_cap) {
                tr->chunks_cap = tr->chunks_cap ? 2 * tr->chunks_cap : 256;
                tr->chunks = xrealloc(tr->chunks, sizeof *tr->chunks * (size_t)tr->chunks_cap);
            }
            tr->chunks[tr->n_chunks++] = n;
            tr->chunks[tr->n_chunks++] = at;
            q.n_chunks++;
            c += k;
            if (*c == ',') c++;
        }
        if (tr->n == tr->cap) {
            tr->cap = tr->cap ? 2 * tr->cap : 256;
            tr->s = xrealloc(tr->s, sizeof *tr->s * (size_t)tr->cap);
        }
        tr->s[tr->n++] = q;
    }
    free(line);
    fclose(f);
    tr->n_inst++;
}

static int cmp_tstep(const void *a, const void *b) {
    double x = ((const tstep *)a)->t, y = ((const tstep *)b)->t;
    return (x > y) - (x < y);
}

/* Sorts by start and measures how much of each step shared time with other instances'
 * steps (every instance of a host writes the same monotonic clock), and their kind. */
static void traces_mark_overlaps(traces *tr) {
    qsort(tr->s, (size_t)tr->n, sizeof *tr->s, cmp_tstep);
    double *longest = xcalloc((size_t)PD_MAX(tr->n, 1), sizeof *longest);
    for (int i = 0; i < tr->n; i++) {
        tstep *a = &tr->s[i];
        for (int j = i + 1; j < tr->n && tr->s[j].t < a->t + a->busy; j++) {
            tstep *b = &tr->s[j];
            if (b->inst == a->inst) continue;
            double both = PD_MIN(a->t + a->busy, b->t + b->busy) - b->t;
            if (!(both > 0)) continue;
            a->overlap += both;
            b->overlap += both;
            if (both > longest[i]) longest[i] = both, a->other_kind = b->prefill >= b->decode ? 0 : 1;
            if (both > longest[j]) longest[j] = both, b->other_kind = a->prefill >= a->decode ? 0 : 1;
        }
    }
    for (int i = 0; i < tr->n; i++)
        tr->s[i].overlap = tr->s[i].busy > 0 ? PD_MIN(tr->s[i].overlap / tr->s[i].busy, 1.0) : 0;
    free(longest);
}

/* The profile's price of a traced step: its forward's prefill and decode parts and its
 * host part (sampling, the step's overhead). */
static void price_step(const sim_profile *p, const traces *tr, const tstep *q, double *pf, double *df, double *host) {
    sim_cost c;
    sim_cost_init(&c, p, 0);
    sim_work w;
    sim_work_begin(&w, p);
    const int *ch = tr->chunks + q->chunk0;
    for (int k = 0; k < q->n_chunks; k++) sim_work_add_chunk(&w, ch[2 * k], ch[2 * k + 1]);
    for (int k = 0; k < q->decode; k++) sim_work_add_decode(&w, 0);
    w.decode_ctx = q->ctx_sum;
    w.n_logits = q->logits;
    sim_step_cost sc;
    sim_cost_step(&c, &w, &sc);
    *pf = sc.prefill_s;
    *df = sc.decode_s;
    *host = sc.seconds - sc.prefill_s - sc.decode_s;
}

static int cmp_pair(const void *a, const void *b) {
    const double *x = a, *y = b;
    return (x[0] > y[0]) - (x[0] < y[0]);
}

/* The step factor from the traces (sim_step_factor): each step's busy seconds less the
 * priced host part, over its priced forward, over what the simulator's contention model
 * makes of the time it shared with another instance's step (1 + (slowdown - 1) x the
 * shared part, the slowdown of its kind beside the other's where the profile has kinds,
 * else slowdown(2)), so that the two are not counted twice. A step whose priced prefill
 * part is at least four times its decode part counts as a prefill of its prompt rows,
 * in half-octave bins (at least 3 steps each: the bin's median factor at its median
 * rows); one whose decode part is four times its prefill part, towards the decode
 * factor (the median); the others are left out (their parts cannot be told apart).
 * Leaves sf as it is where the traces hold too few steps. */
/* Half-octave bins of (rows, factor) pairs, sorted here: each bin of 3 or more its median
 * factor at its median rows, into tok / fac (at most SIM_MAX_POINTS). Returns how many. */
static int bin_factors(double (*pre)[2], int n_pre, double *tok, double *fac) {
    qsort(pre, (size_t)n_pre, sizeof *pre, cmp_pair);
    int n = 0;
    for (int i = 0; i < n_pre && n < SIM_MAX_POINTS;) {
        int bin = (int)floor(2 * log2(pre[i][0])), j = i;
        while (j < n_pre && (int)floor(2 * log2(pre[j][0])) == bin) j++;
        if (j - i >= 3) {
            double rows[SERVE_MAX_BIN], fs[SERVE_MAX_BIN];
            int m = PD_MIN(j - i, SERVE_MAX_BIN);
            for (int k = 0; k < m; k++) rows[k] = pre[i + k][0], fs[k] = pre[i + k][1];
            double r = sim_median(rows, m);
            if (n == 0 || r > tok[n - 1]) {
                tok[n] = r;
                fac[n++] = sim_median(fs, m);
            }
        }
        i = j;
    }
    return n;
}

/* "13 rows x1.411, ..." of n points into buf. */
static void points_text(const double *tok, const double *fac, int n, char *buf, size_t cap) {
    size_t len = 0;
    buf[0] = 0;
    for (int k = 0; k < n && len < cap; k++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%.0f rows x%.3f", k ? ", " : "", tok[k], fac[k]);
}

static void traces_factor(const traces *tr, const sim_profile *p, sim_step_factor *sf, const char *what) {
    if (!can_price(p) || tr->n == 0) return;
    double(*pre)[2] = xmalloc(sizeof *pre * (size_t)tr->n), *dec = xmalloc(sizeof *dec * (size_t)tr->n);
    double(*aft)[2] = xmalloc(sizeof *aft * (size_t)tr->n), (*fst)[2] = xmalloc(sizeof *fst * (size_t)tr->n);
    int n_pre = 0, n_dec = 0, n_over = 0, n_aft = 0, n_fst = 0;
    const sim_contention *ct = &p->contention;
    for (int i = 0; i < tr->n; i++) {
        const tstep *q = &tr->s[i];
        if (q->prefill + q->decode <= 0) continue;
        double pf, df, host;
        price_step(p, tr, q, &pf, &df, &host);
        double fwd = pf + df;
        if (!(fwd > 0)) continue;
        int kind = pf >= 4 * df ? 0 : df >= 4 * pf ? 1 : -1;
        if (kind < 0) continue;
        double slow = 1;
        if (q->overlap > 0 && ct->cores > 0) {
            double c2 = ct->kinds_measured ? ct->kinds[kind][q->other_kind] : sim_contention_slowdown(ct, 2);
            slow = 1 + (c2 - 1) * q->overlap;
            n_over++;
        }
        double f = PD_MAX(q->busy - host, 0) / fwd / slow;
        if (kind == 0) {
            pre[n_pre][0] = q->prefill, pre[n_pre++][1] = f;
            /* chunks that continue a prompt (a cached prefix, an earlier chunk) are also
             * binned apart: their rows-weighted mean start */
            const int *ch = tr->chunks + q->chunk0;
            double rows = 0, st = 0;
            for (int k = 0; k < q->n_chunks; k++) rows += ch[2 * k], st += (double)ch[2 * k] * ch[2 * k + 1];
            if (rows > 0 && st / rows >= SIM_STEP_AFTER_START) aft[n_aft][0] = q->prefill, aft[n_aft++][1] = f;
            else fst[n_fst][0] = q->prefill, fst[n_fst++][1] = f;
        } else {
            dec[n_dec++] = f;
        }
    }
    sim_step_factor got = {.decode = 1};
    got.n_prefill = bin_factors(pre, n_pre, got.prefill_tokens, got.prefill);
    got.n_after = bin_factors(aft, n_aft, got.after_tokens, got.after);
    got.n_first = got.n_after > 0 ? bin_factors(fst, n_fst, got.first_tokens, got.first) : 0;
    if (n_dec >= 5) {
        double d = sim_median(dec, PD_MIN(n_dec, SERVE_MAX_BIN));
        if (d >= 0.25 && d <= 4) got.decode = d;
        else n_dec = 0;
    }
    char pts[256], apts[256], fpts[256];
    points_text(got.prefill_tokens, got.prefill, got.n_prefill, pts, sizeof pts);
    points_text(got.after_tokens, got.after, got.n_after, apts, sizeof apts);
    points_text(got.first_tokens, got.first, got.n_first, fpts, sizeof fpts);
    log_info("profile: serving, %s engine steps from their traces (%d steps, %d of them partly beside another "
             "instance's): prefill %s; of which continuing a prompt %s, the others %s; decode x%.3f over %d "
             "steps",
             what, tr->n, n_over, got.n_prefill ? pts : "(too few)", got.n_after ? apts : "(too few)",
             got.n_first ? fpts : "(not apart)", got.decode, n_dec);
    if (got.n_prefill > 0) {
        sf->n_prefill = got.n_prefill;
        memcpy(sf->prefill_tokens, got.prefill_tokens, sizeof got.prefill_tokens);
        memcpy(sf->prefill, got.prefill, sizeof got.prefill);
        sf->n_after = got.n_after;
        memcpy(sf->after_tokens, got.after_tokens, sizeof got.after_tokens);
        memcpy(sf->after, got.after, sizeof got.after);
        sf->n_first = got.n_first;
        memcpy(sf->first_tokens, got.first_tokens, sizeof got.first_tokens);
        memcpy(sf->first, got.first, sizeof got.first);
        sf->measured = true;
    }
    if (n_dec >= 5 && sf->measured) sf->decode = got.decode;
    free(pre);
    free(aft);
    free(fst);
    free(dec);
}

void sim_step_factor_from_traces(const char *dir, const char *prefix, const sim_profile *p, sim_step_factor *sf,
                                 const char *what, bool consume) {
    traces tr = {0};
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *de;
    size_t pl = strlen(prefix);
    while ((de = readdir(d))) {
        if (strncmp(de->d_name, prefix, pl) != 0) continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        traces_read(&tr, path);
        if (consume) unlink(path);
    }
    closedir(d);
    traces_mark_overlaps(&tr);
    traces_factor(&tr, p, sf, what);
    free(tr.s);
    free(tr.chunks);
}

/* The decode factor of sf (its prefill points measured): the one-at-a-time run of
 * SERVE_CPU_RUNS[1], n requests of a prompt of n_prompt tokens and tokens in all, every
 * engine's busy seconds `busy` (the mean of the rounds): what the run's decode steps
 * took beyond its prefills at their factor and the priced host parts, over their priced
 * forwards. Left 1 where the run does not price (a factor outside 0.25-4 says the run
 * was disturbed or is not what it was taken for). */
static void decode_factor(const sim_profile *p, int n, int n_prompt, double tokens, double busy, sim_step_factor *sf) {
    int per = (int)lround(tokens / PD_MAX(n, 1));
    if (!sf->measured || !can_price(p) || n < 1 || per < 2) return;
    double pf, ph, df, dh;
    price_prefill(p, n_prompt, &pf, &ph);
    price_decode(p, n_prompt, per - 1, &df, &dh);
    double fp = sim_step_factor_prefill(sf, n_prompt);
    double f = (busy / n - fp * pf - ph - dh) / df;
    log_info("profile: serving, engine steps: %d requests of %d tokens, %d out, one at a time: %.2f ms busy per "
             "request, priced %.2f ms prefill x%.3f + %.2f ms decode: decode x%.3f", n, n_prompt, per, busy / n * 1e3,
             (pf + ph) * 1e3, fp, (df + dh) * 1e3, f);
    if (f >= 0.25 && f <= 4) sf->decode = f;
    else log_warn("profile: serving: decode steps at x%.3f of their price: not kept", f);
}

/* The serving path's CPU of the deployment behind t: each of SERVE_CPU_RUNS twice, the
 * second round kept where it used less (a burst of load elsewhere only adds), fitted.
 * With a step factor to complete (sf, its prefill measured), its decode factor from the
 * engines' busy seconds in the same runs. */
static int measure_cpu(const serve_target *t, sim_serving_cpu *out, sim_step_factor *sf, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    char *text = prompt_text(t->tok, SERVE_CPU_PROMPT);
    int rc = 0;
    double busy1 = 0, tokens1 = 0;
    for (int round = 0; round < 2 && rc == 0; round++)
        for (int k = 0; k < 3 && rc == 0; k++) {
            double pt[4], busy;
            int mt = PD_MAX(SERVE_CPU_RUNS[k][1], t->max_tokens);
            rc = cpu_run(t, text, SERVE_CPU_RUNS[k][0], mt, SERVE_CPU_RUNS[k][2], pt, &busy, err, errlen);
            if (rc == 0 && (round == 0 || pt[3] / PD_MAX(pt[1], 1) < out->points[k][3] / PD_MAX(out->points[k][1], 1)))
                memcpy(out->points[k], pt, sizeof pt);
            if (rc == 0 && k == 1) busy1 += busy / 2, tokens1 += pt[1] / 2;
        }
    int32_t *ids = NULL;
    int n_prompt = 0;
    char e[128];
    if (rc == 0 && sf && tokenizer_encode(t->tok, text, strlen(text), true, &ids, &n_prompt, e, sizeof e) == 0)
        decode_factor(t->prof, SERVE_CPU_RUNS[1][0], n_prompt, tokens1, busy1, sf);
    free(ids);
    free(text);
    if (rc) return -1;
    out->n_points = 3;
    sim_serving_cpu_fit(out);
    return 0;
}

/* The router's CPU: what the same runs took through it beyond the direct path, the
 * difference of the two fits (never negative). */
static void cpu_hop(const sim_serving_cpu *through, const sim_serving_cpu *direct, sim_serving_cpu *hop) {
    memset(hop, 0, sizeof *hop);
    hop->n_points = through->n_points;
    for (int k = 0; k < through->n_points; k++) {
        memcpy(hop->points[k], through->points[k], sizeof hop->points[k]);
        hop->points[k][3] = PD_MAX(through->points[k][3] - direct->points[k][3], 0);
    }
    sim_serving_cpu_fit(hop);
}

/* The router's hop: what the same requests took through it beyond the direct path,
 * time and CPU (never negative). */
static void path_hop(const sim_serving_path *through, const sim_serving_path *direct, sim_serving_path *hop) {
    memset(hop, 0, sizeof *hop);
    for (int i = 0; i < through->n_points; i++) {
        hop->tokens[i] = through->tokens[i];
        hop->seconds[i] = PD_MAX(through->seconds[i] - direct->seconds[i], 0);
    }
    hop->n_points = through->n_points;
    sim_serving_fit(hop);
    cpu_hop(&through->cpu, &direct->cpu, &hop->cpu);
}

/* The engine config of one instance: a pool for a few of the longest prompts. */
static void instance_config(model *m, int max_len, int block_size, engine_config *ec) {
    engine_config_default(ec);
    ec->block_size = block_size;
    ec->max_model_len = max_len + max_len / 4 + 64; /* a prompt may come out a little longer */
    ec->kv_cache_memory = (size_t)(4 * (ec->max_model_len + block_size)) *
                          model_kv_bytes_per_token(&m->cfg, dtype_size(m->be->ops->kv_type));
}

static server *start_server(engine *e, const tokenizer *tok, server_role role, kv_connector *kv, char *err,
                            size_t errlen) {
    server_config sc = {.host = "127.0.0.1", .port = 0, .served_model_name = "profile", .role = role, .kv = kv};
    return server_start(&sc, e, tok, err, errlen);
}

static void stop_server(server *s, engine *e) {
    if (s) server_shutdown(s, 5);
    if (e) engine_stop(e);
    server_free(s);
}

static int alloc_blocks(void *user, int n, int32_t *out) { return engine_kv_alloc(user, n, out); }
static void release_blocks(void *user, const int32_t *blocks, int n) { engine_kv_release(user, blocks, n); }

static const char *trace_dir(void) { return getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp"; }

/* An in-process engine's step trace: prefix "trace-<kind>-<pid>-", the file that prefix
 * and `inst` (the instances of one process need names of their own). */
static void trace_name(char *prefix, size_t pcap, char *path, size_t cap, const char *kind, const char *inst) {
    snprintf(prefix, pcap, "trace-%s-%d-", kind, (int)getpid());
    snprintf(path, cap, "%s/%s%s.txt", trace_dir(), prefix, inst);
}

/* colocated and router: one instance, first directly, then behind a router */
static int measure_colocated(model *m, const tokenizer *tok, const sim_profile *prof, const int *lens, int n_lens,
                             int repeats, int bs, sim_serving *out, char *err, size_t errlen) {
    engine_config ec;
    instance_config(m, lens[n_lens - 1], bs, &ec);
    char trace[600], prefix[64];
    trace_name(prefix, sizeof prefix, trace, sizeof trace, "co", "0");
    ec.step_trace = trace;
    engine *e = engine_create(m, &ec, err, errlen);
    if (!e) return -1;
    engine_start(e);
    server *s = start_server(e, tok, SERVER_ROLE_COLOCATED, NULL, err, errlen);
    int rc = -1;
    router *rt = NULL;
    if (!s) goto out;
    serve_target t = {.port = server_port(s), .pe = e, .max_tokens = 1, .tok = tok, .prof = prof};
    if (measure_path(&t, lens, n_lens, repeats, &out->colocated, err, errlen)) goto out;
    if (measure_cpu(&t, &out->colocated.cpu, &out->colocated.steps, err, errlen)) goto out;
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", server_port(s));
    const char *inst[1] = {url};
    router_config rc_ = {.host = "127.0.0.1", .port = 0, .served_model_name = "profile", .instances = inst,
                         .n_instances = 1};
    rt = router_start(&rc_, err, errlen);
    if (!rt) goto out;
    t.port = router_port(rt);
    sim_serving_path through;
    if (measure_path(&t, lens, n_lens, repeats, &through, err, errlen)) goto out;
    if (measure_cpu(&t, &through.cpu, NULL, err, errlen)) goto out;
    path_hop(&through, &out->colocated, &out->router);
    rc = 0;
out:
    if (rt) router_shutdown(rt, 5);
    router_free(rt);
    stop_server(s, e);
    engine_free(e);
    if (rc == 0) sim_step_factor_from_traces(trace_dir(), prefix, prof, &out->colocated.steps, "colocated", true);
    return rc;
}

/* disaggregated: a prefill and a decode instance over the cpu medium, behind a router */
static int measure_disaggregated(model *m, model *md, const tokenizer *tok, const sim_profile *prof, const int *lens, int n_lens,
                                 int repeats, int bs, const sim_medium *cpu, sim_serving *out, char *err,
                                 size_t errlen) {
    engine_config ec;
    instance_config(m, lens[n_lens - 1], bs, &ec);
    char tp[600], td[600], prefix[64];
    trace_name(prefix, sizeof prefix, tp, sizeof tp, "dis", "p");
    trace_name(prefix, sizeof prefix, td, sizeof td, "dis", "d");
    ec.step_trace = tp;
    engine *pe = engine_create(m, &ec, err, errlen), *de = NULL;
    ec.step_trace = td;
    if (pe) de = engine_create(md, &ec, err, errlen);
    kv_connector *pk = NULL, *dk = NULL;
    server *ps = NULL, *ds = NULL;
    router *rt = NULL;
    int rc = -1;
    if (!de) goto out;
    kv_config dc, pc;
    kv_config_default(&dc);
    dc.medium = KV_MEDIUM_CPU;
    dc.role = KV_ROLE_DECODE;
    dc.mode = KV_TRANSFER_WHOLE;
    snprintf(dc.name, sizeof dc.name, "serve%d", (int)getpid());
    dc.capacity_bytes = ec.kv_cache_memory * 2 + ((size_t)16 << 20);
    dc.create_store = true;
    pc = dc;
    pc.role = KV_ROLE_PREFILL;
    pc.create_store = false;
    kv_block_allocator al = {.alloc = alloc_blocks, .release = release_blocks, .user = de};
    dk = kv_connector_create(&dc, engine_kv_cache(de), &al, err, errlen);
    pk = dk ? kv_connector_create(&pc, engine_kv_cache(pe), NULL, err, errlen) : NULL;
    if (!pk) goto out;
    engine_start(pe);
    engine_start(de);
    ps = start_server(pe, tok, SERVER_ROLE_PREFILL, pk, err, errlen);
    ds = ps ? start_server(de, tok, SERVER_ROLE_DECODE, dk, err, errlen) : NULL;
    if (!ds) goto out;
    char purl[64], durl[64];
    snprintf(purl, sizeof purl, "http://127.0.0.1:%d", server_port(ps));
    snprintf(durl, sizeof durl, "http://127.0.0.1:%d", server_port(ds));
    const char *pl[1] = {purl}, *dl[1] = {durl};
    router_config rc_ = {.host = "127.0.0.1", .port = 0, .served_model_name = "profile", .prefill = pl,
                         .n_prefill = 1, .decode = dl, .n_decode = 1};
    rt = router_start(&rc_, err, errlen);
    if (!rt) goto out;
    /* max_tokens 2: a request of one token would end on the prefill side */
    char pmetrics[80];
    snprintf(pmetrics, sizeof pmetrics, "%s/metrics", purl);
    serve_target t = {.port = router_port(rt), .pe = pe, .de = de, .medium = cpu, .kv_urls = pmetrics,
                      .kv_bytes_per_token = model_kv_bytes_per_token(&m->cfg, dtype_size(m->be->ops->kv_type)),
                      .max_tokens = 2, .tok = tok, .prof = prof};
    if (measure_path(&t, lens, n_lens, repeats, &out->disaggregated, err, errlen)) goto out;
    if (measure_cpu(&t, &out->disaggregated.cpu, &out->disaggregated.steps, err, errlen)) goto out;
    rc = 0;
out:
    if (rt) router_shutdown(rt, 5);
    router_free(rt);
    stop_server(ds, de);
    stop_server(ps, pe);
    kv_connector_free(pk);
    kv_connector_free(dk);
    engine_free(de);
    engine_free(pe);
    if (rc == 0) sim_step_factor_from_traces(trace_dir(), prefix, prof, &out->disaggregated.steps, "disaggregated", true);
    return rc;
}

/* What both serving profiles measure over. */
typedef struct serving_plan {
    int lens[SERVE_MAX_LENGTHS], n_lens; /* the latency points' prompt lengths */
    int repeats;                         /* requests per length */
    int bs;                              /* KV block size */
    sim_medium mstore;                   /* cpu's storage when the profile has no cpu medium */
    const sim_medium *cpu;               /* prices a disaggregated request's transfer */
    bool cpu_measured;                   /* cpu is the profile's measured medium, not the default */
} serving_plan;

/* Fills sp in place (sp->cpu may point into it): prompt lengths 64 to 4096 tokens up to
 * max_len, repeats clamped to 3..SERVE_MAX_REPEATS, the profile's block size (else 16),
 * and the transfer inside a disaggregated request's time: the profile's cpu medium,
 * else its documented default (then said in the source). */
static void serving_plan_make(const sim_profile *out, int max_len, int repeats, serving_plan *sp) {
    /* 128 and 256: the demo's prompts, where a lone step's excess over its price is the
     * largest part of it (the step factor between 64 and 512 is far from linear) */
    static const int all[SERVE_MAX_LENGTHS] = {64, 128, 256, 512, 2048, 4096};
    sp->n_lens = 0;
    for (int i = 0; i < SERVE_MAX_LENGTHS; i++)
        if (all[i] <= max_len || i == 0) sp->lens[sp->n_lens++] = all[i];
    sp->repeats = PD_MIN(PD_MAX(repeats, 3), SERVE_MAX_REPEATS);
    sp->bs = out->block_size > 0 ? out->block_size : 16;
    sp->cpu = sim_medium_find(out, "cpu", &sp->mstore);
    sp->cpu_measured = sp->cpu && !strncmp(sp->cpu->source, "measured", 8);
}

static void log_serving(const sim_serving *sv) {
    const struct { const char *name; const sim_serving_path *p; } paths[] = {
        {"colocated", &sv->colocated}, {"router hop", &sv->router}, {"disaggregated", &sv->disaggregated}};
    for (size_t i = 0; i < PD_ARRAY_LEN(paths); i++) {
        const sim_serving_path *p = paths[i].p;
        char pts[256] = "";
        size_t n = 0;
        for (int k = 0; k < p->n_points && n < sizeof pts; k++)
            n += (size_t)snprintf(pts + n, sizeof pts - n, "%s%.0f tok %.3f ms", k ? ", " : "", p->tokens[k],
                                  p->seconds[k] * 1e3);
        log_info("profile: serving path, %s: %.3f ms + %.3f us/token (%s)", paths[i].name, p->fixed_s * 1e3,
                 p->s_per_token * 1e6, pts);
        const sim_serving_cpu *c = &p->cpu;
        if (c->measured)
            log_info("profile: serving path, %s: CPU %.1f us per request + %.1f us per streamed token + %.1f us per "
                     "engine step (%d runs: %.0f/%.0f/%.0f requests/tokens/steps %.2f ms, %.0f/%.0f/%.0f %.2f ms, "
                     "%.0f/%.0f/%.0f %.2f ms)", paths[i].name, c->request_s * 1e6, c->token_s * 1e6, c->step_s * 1e6,
                     c->n_points, c->points[0][0], c->points[0][1], c->points[0][2], c->points[0][3] * 1e3,
                     c->points[1][0], c->points[1][1], c->points[1][2], c->points[1][3] * 1e3, c->points[2][0],
                     c->points[2][1], c->points[2][2], c->points[2][3] * 1e3);
    }
}

int sim_profile_serving(model *m, model *m_decode, const tokenizer *tok, int max_len, int repeats,
                        sim_profile *out, char *err, size_t errlen) {
    serving_plan sp;
    serving_plan_make(out, max_len, repeats, &sp);
    double t0 = time_now_s();
    sim_serving sv;
    memset(&sv, 0, sizeof sv);
    if (measure_colocated(m, tok, out, sp.lens, sp.n_lens, sp.repeats, sp.bs, &sv, err, errlen) ||
        measure_disaggregated(m, m_decode ? m_decode : m, tok, out, sp.lens, sp.n_lens, sp.repeats, sp.bs, sp.cpu, &sv, err, errlen))
        return -1;
    snprintf(sv.source, sizeof sv.source,
             "measured: pdserve profile --serving, in-process server, router and cpu-medium connector on %s, "
             "%d prompt lengths up to %d tokens, median of %d requests each, one at a time; transfer priced by "
             "the %s cpu medium; cpu: pdserve's bench client, prompts of %d tokens, 3 runs (fitted)",
             m->be->ops->name, sp.n_lens, sp.lens[sp.n_lens - 1], sp.repeats, sp.cpu_measured ? "measured" : "default",
             SERVE_CPU_PROMPT);
    out->serving = sv;
    log_serving(&sv);
    log_info("profile: serving path measured in %.1f s", time_now_s() - t0);
    return 0;
}

/* ---- the same through processes ------------------------------------------------------ */

/* The URL "[name] ... listening on http://H:P" of a `pdserve up` log, or "" . */
static void log_instance_url(const char *log_path, const char *name, char *out, size_t cap) {
    size_t len;
    char e[64];
    char *text = util_read_file(log_path, &len, e, sizeof e);
    out[0] = 0;
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        const char *at = strstr(line, "listening on http://");
        if (!strncmp(line, name, strlen(name)) && at) {
            at += strlen("listening on ");
            snprintf(out, cap, "%.*s", (int)strcspn(at, " )"), at);
            break;
        }
        line = nl ? nl + 1 : NULL;
    }
    free(text);
}

/* Brings setup `name` up as the sweep does (this program's `serve` or `up`), on the CPU
 * with o's threads and a pool for a few of the longest prompts. 0 or -1. */
static int deploy(const sim_serving_deploy_opts *o, const char *name, size_t kv_bytes_per_token, int bs,
                  const char *trace, study_deployment *d, char *log_path, size_t cap, char *err, size_t errlen) {
    char threads[16], mml[16], kvm[32];
    int max_model_len = o->max_len + o->max_len / 4 + 64;
    snprintf(threads, sizeof threads, "%d", PD_MAX(o->threads, 1));
    snprintf(mml, sizeof mml, "%d", max_model_len);
    size_t kv = (size_t)(4 * (max_model_len + bs)) * kv_bytes_per_token;
    snprintf(kvm, sizeof kvm, "%zuMiB", PD_MAX(kv >> 20, (size_t)1) + 1);
    study_kv args[6] = {{"device", "cpu"}, {"threads", threads}, {"max-model-len", mml}, {"kv-cache-memory", kvm}};
    int n_args = 4;
    if (trace) args[n_args++] = (study_kv){"step-trace", (char *)trace};
    if (o->cpu_list) args[n_args++] = (study_kv){"cpu-list", (char *)o->cpu_list};
    study_setup s = {.label = (char *)name, .name = (char *)name};
    snprintf(log_path, cap, "%s/serving-%s-%d.log", o->log_dir ? o->log_dir : "/tmp", name, (int)getpid());
    study_deploy_opts so = {.model = o->model, .tokenizer = o->tokenizer, .pdserve_bin = o->pdserve_bin,
                            .log_path = log_path, .args = args, .n_args = n_args,
                            .start_timeout_s = 120};
    if (study_deploy_up(&s, &so, d, err, errlen)) return -1;
    log_info("profile: serving path through %s (%s, log %s)", name, d->base_url, log_path);
    return 0;
}

static int url_port(const char *url) {
    const char *c = strrchr(url, ':');
    return c ? atoi(c + 1) : 0;
}

int sim_profile_serving_processes(const sim_serving_deploy_opts *o, const tokenizer *tok, sim_profile *out,
                                  char *err, size_t errlen) {
    serving_plan sp;
    serving_plan_make(out, o->max_len, o->repeats, &sp);
    double t0 = time_now_s();
    sim_serving sv;
    memset(&sv, 0, sizeof sv);
    study_deployment d;
    char log_path[640], murl[320];
    int rc = -1;
    /* every instance writes a step trace (its pid in the name), read after each
     * deployment is down: the steps inside it (traces_factor) */
    const char *dir = o->log_dir ? o->log_dir : "/tmp";
    char tco[600], tdis[600], pco[96], pdis[96];
    snprintf(pco, sizeof pco, "trace-co-%d-", (int)getpid());
    snprintf(pdis, sizeof pdis, "trace-dis-%d-", (int)getpid());
    snprintf(tco, sizeof tco, "%s/%s%%p.txt", dir, pco);
    snprintf(tdis, sizeof tdis, "%s/%s%%p.txt", dir, pdis);
    /* colocated: `pdserve serve` */
    if (deploy(o, "co-1gpu", out->kv_bytes_per_token, sp.bs, tco, &d, log_path, sizeof log_path, err, errlen))
        return -1;
    snprintf(murl, sizeof murl, "%s/metrics", d.base_url);
    serve_target t = {.port = url_port(d.base_url), .max_tokens = 1, .tok = tok, .busy_urls = murl,
                      .steps_urls = murl, .pid = d.pids[0], .prof = out};
    rc = measure_path(&t, sp.lens, sp.n_lens, sp.repeats, &sv.colocated, err, errlen) ||
         measure_cpu(&t, &sv.colocated.cpu, &sv.colocated.steps, err, errlen) ? -1 : 0;
    study_deploy_down(&d);
    if (rc) return -1;
    sim_step_factor_from_traces(dir, pco, out, &sv.colocated.steps, "colocated", true);
    /* the router's hop: two instances behind it (`pdserve up --setup co-2gpus`), less
     * the direct path */
    if (deploy(o, "co-2gpus", out->kv_bytes_per_token, sp.bs, NULL, &d, log_path, sizeof log_path, err, errlen))
        return -1;
    sim_serving_path through;
    t = (serve_target){.port = url_port(d.base_url), .max_tokens = 1, .tok = tok, .busy_urls = d.metrics_urls,
                       .steps_urls = d.metrics_urls, .pid = d.pids[0]};
    rc = measure_path(&t, sp.lens, sp.n_lens, sp.repeats, &through, err, errlen) ||
         measure_cpu(&t, &through.cpu, NULL, err, errlen) ? -1 : 0;
    study_deploy_down(&d);
    if (rc) return -1;
    path_hop(&through, &sv.colocated, &sv.router);
    /* disaggregated over the cpu medium (`pdserve up --setup dis-cpu`): the prefill
     * instance's busy seconds, every instance's steps */
    if (deploy(o, "dis-cpu", out->kv_bytes_per_token, sp.bs, tdis, &d, log_path, sizeof log_path, err, errlen))
        return -1;
    log_instance_url(log_path, "[prefill0]", murl, sizeof murl - 8);
    strcat(murl, "/metrics");
    t = (serve_target){.port = url_port(d.base_url), .max_tokens = 2, .tok = tok, .busy_urls = murl,
                       .steps_urls = d.metrics_urls, .pid = d.pids[0], .medium = sp.cpu, .kv_urls = murl,
                       .kv_bytes_per_token = out->kv_bytes_per_token, .prof = out};
    rc = murl[0] == '/' ? (pd_errorf(err, errlen, "serving: no prefill instance in %s", log_path), -1)
         : measure_path(&t, sp.lens, sp.n_lens, sp.repeats, &sv.disaggregated, err, errlen) ||
                 measure_cpu(&t, &sv.disaggregated.cpu, &sv.disaggregated.steps, err, errlen)
             ? -1
             : 0;
    study_deploy_down(&d);
    if (rc) return -1;
    sim_step_factor_from_traces(dir, pdis, out, &sv.disaggregated.steps, "disaggregated", true);
    snprintf(sv.source, sizeof sv.source,
             "measured: pdserve profile --serving-processes, `pdserve serve` and `pdserve up --setup co-2gpus / "
             "dis-cpu` children on the CPU, %d prompt lengths up to %d tokens, median of %d requests each, one at "
             "a time; transfer priced by the %s cpu medium; cpu: their threads but the engines' and pdserve's bench "
             "client, prompts of %d tokens, 3 runs (fitted)", sp.n_lens, sp.lens[sp.n_lens - 1], sp.repeats,
             sp.cpu_measured ? "measured" : "default", SERVE_CPU_PROMPT);
    out->serving = sv;
    log_serving(&sv);
    log_info("profile: serving path through processes measured in %.1f s", time_now_s() - t0);
    return 0;
}
