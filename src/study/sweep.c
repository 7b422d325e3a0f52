/* sweep.c: runs a plan, point by point, into the results database.
 *
 * Per point: deploy up -> (idle power window) -> (clocks) -> warm-up + bench_run ->
 * deploy down -> (clocks back) -> record (one transaction) -> cool down. A point whose
 * key is already in the database with status "ok" is skipped, so a sweep stopped at
 * any moment resumes where it was; failed and skipped points are tried again (a setup
 * may have become available, clock control may now be allowed) and their rows
 * replaced. Whatever goes wrong with one point is recorded as its reason, and the
 * sweep goes on. Tuned for points minutes long: nothing here is fast, everything is
 * written down. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "study/study.h"
#include "util/util.h"

/* A growing byte buffer for fetched bodies. */
typedef struct sbuf_t {
    char *p;
    size_t len, cap;
} sbuf_t;

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* ^C / SIGTERM during a sweep: stop the deployment's children, then die of the signal
 * (the database holds whole points only, so nothing else needs cleaning). */
static void on_signal(int sig) {
    study_deploy_kill_all();
    signal(sig, SIG_DFL);
    raise(sig);
}

static void fmt_duration(double s, char *out, size_t cap) {
    if (s < 90) snprintf(out, cap, "%.0f s", s);
    else if (s < 5400) snprintf(out, cap, "%.0f min", s / 60);
    else snprintf(out, cap, "%.1f h", s / 3600);
}

/* The deployment's /metrics URLs into urls[cap]: its instances' (metrics_urls), else
 * BASE_URL/metrics. Returns how many. */
#define SWEEP_URLS_MAX 64
typedef char sweep_url[512];
static int deployment_metrics_urls(const study_deployment *d, sweep_url *urls, int cap) {
    int n = 0;
    if (!d->metrics_urls[0]) {
        snprintf(urls[n++], sizeof *urls, "%s/metrics", d->base_url);
        return n;
    }
    for (const char *p = d->metrics_urls; *p && n < cap;) {
        size_t k = strcspn(p, ",");
        snprintf(urls[n++], sizeof *urls, "%.*s", (int)PD_MIN(k, sizeof *urls - 1), p);
        p += k + (p[k] == ',');
    }
    return n;
}

/* Reads the energy counters at every metrics URL (before: after = false). */
static void read_counters(const study_deployment *d, bench_energy *e, bool after) {
    sweep_url urls[SWEEP_URLS_MAX];
    int n = deployment_metrics_urls(d, urls, SWEEP_URLS_MAX);
    for (int i = 0; i < n; i++) {
        char err[256];
        long status = 0;
        char *body = bench_http_get(urls[i], NULL, 10, &status, err, sizeof err);
        if (body && status == 200) bench_energy_parse(e, body, strlen(body), n > 1 ? urls[i] : "", after);
        free(body);
    }
}

/* The prefix cache and KV tier series at every metrics URL, appended to m[cap] (*n
 * advanced); "URL " before each where the deployment has several. */
#define SWEEP_METRICS_MAX 512
static void read_reuse(const study_deployment *d, study_metric *m, int *n) {
    sweep_url urls[SWEEP_URLS_MAX];
    int n_urls = deployment_metrics_urls(d, urls, SWEEP_URLS_MAX);
    *n = 0;
    for (int i = 0; i < n_urls; i++) {
        char err[256];
        long status = 0;
        char *body = bench_http_get(urls[i], NULL, 10, &status, err, sizeof err);
        if (body && status == 200) study_metrics_parse(body, n_urls > 1 ? urls[i] : "", m, SWEEP_METRICS_MAX, n);
        free(body);
    }
}

/* Power of the deployment while a point runs, into the power_samples table:
 *   - ring: each instance's own sampler (every 100 ms: power, clocks, utilisation and
 *     temperature per GPU, RAPL per domain), fetched from GET /metrics/power-samples
 *     every RING_FETCH_S and once more at the end of the point, each fetch from where
 *     the last one stopped, so a ring (one hour by default) never wraps between two;
 *   - scrape: an instance without that endpoint (an external or older server) is
 *     scraped on /metrics every 0.5 s instead (power and clocks at scrape time).
 * Times: an instance's samples are in its own clock; with its "uptime_s" at the answer
 * they map onto this process's monotonic clock (t_recv - (uptime - t)), so no clock of
 * two hosts needs to agree. A meter seen through two instances of one host (RAPL, or a
 * GPU two instances both name) is stored once, from the first instance. */
#define RING_FETCH_S 30.0
#define POWER_POLL_MAX 1000000
#define RING_MAX_SERIES 40

typedef struct ring_src {
    char url[560];              /* .../metrics/power-samples */
    char scrape_url[520];       /* .../metrics */
    int mode;                   /* 0 not tried, 1 ring, 2 scrape */
    int n_series;
    char series[RING_MAX_SERIES][64];   /* "gpu:0", "rapl:package-0" */
    double last_t[RING_MAX_SERIES];     /* newest stored, in the instance's clock */
    bool warned_lost;
} ring_src;

typedef struct power_poll {
    const study_deployment *d;
    double period_s;
    pthread_t th;
    bool started;
    atomic_bool stop;
    study_power_sample *s;
    int n, cap;
    int n_src;
    ring_src src[32];
    int n_claims;               /* meters already stored: "host|gpu:0" -> instance */
    char claims[128][128];
    int claim_owner[128];
    bool full_warned;
} power_poll;

static size_t fetch_body(char *ptr, size_t size, size_t nmemb, void *user) {
    sbuf_t *b = user;
    size_t n = size * nmemb;
    if (b->len + n > (256u << 20)) return 0;
    if (b->len + n + 1 > b->cap) {
        b->cap = PD_MAX(b->cap * 2, b->len + n + 1);
        b->p = xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, ptr, n);
    b->len += n;
    b->p[b->len] = 0;
    return n;
}

/* GET url with the deployment's internal secret ($PDSERVE_INTERNAL_SECRET, which the
 * sweep gives its deployments) and API key ($OPENAI_API_KEY) when set. The body
 * (malloc'd, NUL-terminated) or NULL; *status the HTTP status (0: no answer). */
static char *fetch(const char *url, double timeout_s, long *status) {
    *status = 0;
    CURL *e = curl_easy_init();
    if (!e) return NULL;
    sbuf_t b = {0};
    struct curl_slist *h = NULL;
    char line[320];
    const char *secret = getenv("PDSERVE_INTERNAL_SECRET"), *key = getenv("OPENAI_API_KEY");
    if (secret && *secret) {
        snprintf(line, sizeof line, "X-PD-Internal-Secret: %.280s", secret);
        h = curl_slist_append(h, line);
    }
    if (key && *key) {
        snprintf(line, sizeof line, "Authorization: Bearer %.280s", key);
        h = curl_slist_append(h, line);
    }
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(timeout_s * 1000));
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, fetch_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &b);
    if (curl_easy_perform(e) == CURLE_OK) curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, status);
    curl_easy_cleanup(e);
    curl_slist_free_all(h);
    if (*status == 0) {
        free(b.p);
        return NULL;
    }
    if (!b.p) b.p = xcalloc(1, 1);
    return b.p;
}

static void poll_push(power_poll *pp, const study_power_sample *x) {
    if (pp->n >= POWER_POLL_MAX) {
        if (!pp->full_warned) log_warn("sweep: more than %d power samples in one point; the rest are dropped", POWER_POLL_MAX);
        pp->full_warned = true;
        return;
    }
    if (pp->n == pp->cap) {
        pp->cap = pp->cap ? pp->cap * 2 : 1024;
        pp->s = xrealloc(pp->s, sizeof *pp->s * (size_t)pp->cap);
    }
    pp->s[pp->n++] = *x;
}

/* Whether instance k stores meter `what` of host: the first instance to show it does. */
static bool claim(power_poll *pp, int k, const char *host, const char *what) {
    char key[128];
    snprintf(key, sizeof key, "%.60s|%.60s", host, what);
    for (int i = 0; i < pp->n_claims; i++)
        if (!strcmp(pp->claims[i], key)) return pp->claim_owner[i] == k;
    if (pp->n_claims == (int)PD_ARRAY_LEN(pp->claims)) return false;
    snprintf(pp->claims[pp->n_claims], sizeof pp->claims[0], "%s", key);
    pp->claim_owner[pp->n_claims++] = k;
    return true;
}

static int series_index(ring_src *src, const char *name) {
    for (int i = 0; i < src->n_series; i++)
        if (!strcmp(src->series[i], name)) return i;
    if (src->n_series == RING_MAX_SERIES) return -1;
    snprintf(src->series[src->n_series], sizeof src->series[0], "%s", name);
    src->last_t[src->n_series] = -1e18;
    return src->n_series++;
}

static double since_of(const ring_src *src) {
    double t = INFINITY;
    for (int i = 0; i < src->n_series; i++) t = PD_MIN(t, src->last_t[i]);
    return isfinite(t) ? t : -1e18;
}

static int json_int(const cJSON *a, int i) {
    const cJSON *v = cJSON_GetArrayItem(a, i);
    return cJSON_IsNumber(v) ? (int)v->valuedouble : -1;
}

/* One series of an answer into the samples; *more when the instance has newer ones. */
static void ring_series(power_poll *pp, int k, ring_src *src, const cJSON *ser, bool gpu, const char *host,
                        const char *inst_role, double clock_shift, bool *more) {
    char name[64], dev[48], role[16];
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(ser, gpu ? "gpu" : "domain");
    if (gpu && cJSON_IsNumber(g)) snprintf(dev, sizeof dev, "%d", g->valueint);
    else if (!gpu && cJSON_IsString(g)) snprintf(dev, sizeof dev, "%.47s", g->valuestring);
    else return;
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(ser, "role");
    snprintf(role, sizeof role, "%s", gpu && cJSON_IsString(r) ? r->valuestring : inst_role);
    snprintf(name, sizeof name, "%s:%s", gpu ? "gpu" : "rapl", dev);
    int si = series_index(src, name);
    if (si < 0) return;
    bool owned = claim(pp, k, host, name); /* not: only advance last_t, so it is not fetched again */
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(ser, "more"))) *more = true;
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(ser, "lost")) && !src->warned_lost) {
        log_warn("sweep: %s: samples of %s were overwritten before they were fetched", src->url, name);
        src->warned_lost = true;
    }
    const cJSON *smp;
    cJSON_ArrayForEach(smp, cJSON_GetObjectItemCaseSensitive(ser, "samples")) {
        const cJSON *t = cJSON_GetArrayItem(smp, 0), *w = cJSON_GetArrayItem(smp, 1);
        if (!cJSON_IsNumber(t) || t->valuedouble <= src->last_t[si]) continue;
        src->last_t[si] = t->valuedouble;
        if (!owned) continue;
        study_power_sample x;
        memset(&x, 0, sizeof x);
        x.t_s = t->valuedouble + clock_shift;
        snprintf(x.component, sizeof x.component, "%s", gpu ? "gpu" : !strncmp(dev, "dram", 4) ? "dram" : "cpu");
        snprintf(x.device, sizeof x.device, "%s", dev);
        snprintf(x.role, sizeof x.role, "%s", role);
        snprintf(x.host, sizeof x.host, "%s", host);
        snprintf(x.source, sizeof x.source, "ring");
        x.power_w = cJSON_IsNumber(w) ? w->valuedouble : NAN;
        x.sm_mhz = gpu ? json_int(smp, 2) : -1;
        x.mem_mhz = gpu ? json_int(smp, 3) : -1;
        x.util_gpu = gpu ? json_int(smp, 4) : -1;
        x.util_mem = gpu ? json_int(smp, 5) : -1;
        x.temp_c = gpu ? json_int(smp, 6) : -1;
        poll_push(pp, &x);
    }
}

/* Fetches instance k's rings from where the last fetch stopped (paging on "more").
 * 0, or -1 when the instance has no ring endpoint (answer not 200 or not the format). */
static int ring_fetch(power_poll *pp, int k) {
    ring_src *src = &pp->src[k];
    for (int page = 0; page < 64; page++) {
        char url[700];
        snprintf(url, sizeof url, "%s?since=%.4f&max=20000", src->url, since_of(src));
        long status;
        char *body = fetch(url, 20, &status);
        double t_recv = time_now_s();
        cJSON *root = body && status == 200 ? cJSON_Parse(body) : NULL;
        free(body);
        const cJSON *up = cJSON_GetObjectItemCaseSensitive(root, "uptime_s");
        const cJSON *host = cJSON_GetObjectItemCaseSensitive(root, "host");
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(root, "role");
        if (!cJSON_IsNumber(up) || !cJSON_IsString(host) || !cJSON_IsString(role)) {
            cJSON_Delete(root);
            return -1;
        }
        double shift = t_recv - up->valuedouble;
        bool more = false;
        const cJSON *ser;
        cJSON_ArrayForEach(ser, cJSON_GetObjectItemCaseSensitive(root, "gpus"))
            ring_series(pp, k, src, ser, true, host->valuestring, role->valuestring, shift, &more);
        cJSON_ArrayForEach(ser, cJSON_GetObjectItemCaseSensitive(root, "rapl"))
            ring_series(pp, k, src, ser, false, host->valuestring, role->valuestring, shift, &more);
        cJSON_Delete(root);
        if (!more) break;
    }
    return 0;
}

static void scrape_once(power_poll *pp, ring_src *src) {
    long status = 0;
    char *body = fetch(src->scrape_url, 5, &status);
    double t = time_now_s();
    if (body && status == 200) {
        study_power_sample tmp[16];
        int k = study_power_samples_parse(body, t, tmp, 16);
        for (int i = 0; i < k; i++) poll_push(pp, &tmp[i]);
    }
    free(body);
}

static void *power_poll_main(void *arg) {
    power_poll *pp = arg;
    double next_ring = 0;
    while (!atomic_load(&pp->stop)) {
        double now = time_now_s(), next = now + pp->period_s;
        bool ring_due = now >= next_ring;
        for (int k = 0; k < pp->n_src; k++) {
            ring_src *src = &pp->src[k];
            if (src->mode == 0) { /* first pass: does it have a ring? */
                src->mode = ring_fetch(pp, k) == 0 ? 1 : 2;
                if (src->mode == 2) log_info("sweep: %s has no power-sample ring; scraping /metrics", src->scrape_url);
            } else if (src->mode == 1 && ring_due) {
                ring_fetch(pp, k); /* a failed fetch is retried at the next one */
            }
            if (src->mode == 2) scrape_once(pp, src);
        }
        if (ring_due) next_ring = now + RING_FETCH_S;
        while (!atomic_load(&pp->stop) && time_now_s() < next) sleep_s(0.02);
    }
    return NULL;
}

static void power_poll_start(power_poll *pp, const study_deployment *d) {
    memset(pp, 0, sizeof *pp);
    pp->d = d;
    pp->period_s = 0.5;
    sweep_url urls[SWEEP_URLS_MAX];
    int n = deployment_metrics_urls(d, urls, SWEEP_URLS_MAX);
    for (int i = 0; i < n && pp->n_src < (int)PD_ARRAY_LEN(pp->src); i++) {
        ring_src *src = &pp->src[pp->n_src++];
        snprintf(src->scrape_url, sizeof src->scrape_url, "%.511s", urls[i]);
        snprintf(src->url, sizeof src->url, "%.511s/power-samples", urls[i]);
    }
    atomic_store(&pp->stop, false);
    pp->started = pthread_create(&pp->th, NULL, power_poll_main, pp) == 0;
}

/* Stops the poll and fetches what the rings gained since the last fetch (the
 * deployment is still up). */
static void power_poll_stop(power_poll *pp) {
    if (!pp->started) return;
    atomic_store(&pp->stop, true);
    pthread_join(pp->th, NULL);
    pp->started = false;
    for (int k = 0; k < pp->n_src; k++)
        if (pp->src[k].mode == 1) ring_fetch(pp, k);
}

typedef struct point_ctx {
    const study_plan *plan;
    const study_sweep_opts *o;
    const char *model, *tokenizer;
    const char *log_dir;
} point_ctx;

static void make_config(const point_ctx *x, const study_point *pt, const study_deployment *d, bench_config *c) {
    bench_config_default(c);
    c->base_url = d->base_url;
    c->endpoint = "/v1/completions";
    c->backend = "openai";
    c->request_rate = pt->load.kind == STUDY_LOAD_BATCH ? INFINITY : pt->load.rate;
    c->burstiness = pt->load.burstiness > 0 ? pt->load.burstiness : 1.0;
    c->max_concurrency = pt->load.max_concurrency;
    /* warm-up requests go through the router like the others: a plan's count per
     * instance, so that round robin warms every one (on the H200s, co-2gpus's second
     * instance, left cold by a single warm-up, answered its first request 124 ms later
     * than its twin) */
    sweep_url urls[SWEEP_URLS_MAX];
    c->num_warmups = x->plan->warmup_requests * deployment_metrics_urls(d, urls, SWEEP_URLS_MAX);
    study_dataset ds;
    study_setup_dataset(x->plan, pt->setup, &ds);
    c->seed = ds.seed;
    c->ignore_eos = ds.ignore_eos;
    c->stream_usage = true;
    /* pdserve's own deployments say where each request's TTFT went (requests.
     * server_phases); an external server is not sent the extension */
    c->server_timing = strcmp(pt->setup->name, "external") != 0;
    c->temperature = 0;
    c->request_timeout_s = x->plan->request_timeout_s;
    c->goodput_ttft_ms = x->plan->goodput_ttft_ms;
    c->goodput_tpot_ms = x->plan->goodput_tpot_ms;
    c->goodput_e2el_ms = x->plan->goodput_e2el_ms;
    c->metrics_urls = d->metrics_urls[0] ? d->metrics_urls : NULL;
    c->progress = false;
}

/* Runs one point (deployment up to down). Returns its status; reason filled unless ok;
 * *res and *idle filled when the bench ran. */
static study_status run_point(const point_ctx *x, const study_point *pt, bench_config *bc, bench_result **res,
                              study_idle *idle, power_poll *pp, study_metric **mets, int *n_mets,
                              char *base_url, size_t url_cap, char *reason, size_t rcap) {
    const study_sweep_opts *o = x->o;
    char why[512];
    /* Clocks: the instances this sweep starts lock their own GPUs (`pdserve serve
     * --sm-clock MHZ --allow-clock-control`, restored when they exit); an external
     * endpoint's GPUs are locked by this process through set_clocks. */
    bool external = !strcmp(pt->setup->name, "external");
    if (pt->clock.prefill_mhz > 0) {
        if (!o->allow_clock_control) {
            snprintf(reason, rcap, "clock control not allowed (pass --allow-clock-control)");
            return STUDY_STATUS_SKIPPED;
        }
        if (external && !o->set_clocks) {
            snprintf(reason, rcap, "clock control not available in this build for an external endpoint (pass --clock-gpus)");
            return STUDY_STATUS_FAILED;
        }
    }
    if (!study_deploy_available(pt->setup->name, why, sizeof why)) {
        snprintf(reason, rcap, "%s", why);
        return STUDY_STATUS_FAILED;
    }
    /* Build the workload before starting anything: a bad dataset fails fast. */
    study_dataset sd;
    study_setup_dataset(x->plan, pt->setup, &sd);
    bench_dataset_opts dso;
    study_dataset_bench_opts(&sd, pt->load.num_prompts, &dso);
    bench_dataset ds = {0};
    if (bench_dataset_load(&dso, o->tok, &ds, why, sizeof why) != 0) {
        snprintf(reason, rcap, "dataset: %s", why);
        return STUDY_STATUS_FAILED;
    }
    int n_args = x->plan->n_serve_args + pt->setup->n_opts;
    study_kv *args = xcalloc((size_t)PD_MAX(n_args + 2, 1), sizeof *args);
    if (x->plan->n_serve_args)
        memcpy(args, x->plan->serve_args, sizeof *args * (size_t)x->plan->n_serve_args);
    if (pt->setup->n_opts)
        memcpy(args + x->plan->n_serve_args, pt->setup->opts, sizeof *args * (size_t)pt->setup->n_opts);
    char clk_a[96], clk_b[96];
    if (pt->clock.prefill_mhz > 0 && !external) {
        if (pt->clock.prefill_mhz == pt->clock.decode_mhz) { /* every instance at one clock */
            snprintf(clk_a, sizeof clk_a, "%d", pt->clock.prefill_mhz);
            args[n_args++] = (study_kv){.key = "sm-clock", .value = clk_a};
            args[n_args++] = (study_kv){.key = "allow-clock-control", .value = NULL};
        } else { /* per-stage clocks: `pdserve up` passes these to its prefill / decode instances */
            snprintf(clk_a, sizeof clk_a, "--sm-clock %d --allow-clock-control", pt->clock.prefill_mhz);
            snprintf(clk_b, sizeof clk_b, "--sm-clock %d --allow-clock-control", pt->clock.decode_mhz);
            args[n_args++] = (study_kv){.key = "prefill-args", .value = clk_a};
            args[n_args++] = (study_kv){.key = "decode-args", .value = clk_b};
        }
    }
    /* The deployment's log: point index, setup and load; never over an earlier log (a
     * database that several sweeps fill, e.g. one point per sweep, reuses indices). */
    char log_path[1024], load_label[64];
    study_load_label(&pt->load, load_label, sizeof load_label);
    for (char *c = load_label; *c; c++)
        if (*c == ' ' || *c == '/') *c = '_';
    snprintf(log_path, sizeof log_path, "%.900s/%03d-%.60s-%.40s.log", x->log_dir, pt->index, pt->setup->label,
             load_label);
    for (int k = 2; access(log_path, F_OK) == 0 && k < 1000; k++)
        snprintf(log_path, sizeof log_path, "%.900s/%03d-%.60s-%.40s-%d.log", x->log_dir, pt->index,
                 pt->setup->label, load_label, k);
    study_deploy_opts dop = {.model = x->model, .tokenizer = x->tokenizer, .pdserve_bin = o->pdserve_bin,
                             .base_url = o->base_url, .log_path = log_path, .args = args, .n_args = n_args,
                             .start_timeout_s = x->plan->start_timeout_s};
    study_deployment d;
    study_status status = STUDY_STATUS_FAILED;
    if (study_deploy_up(pt->setup, &dop, &d, why, sizeof why) != 0) {
        snprintf(reason, rcap, "deploy: %s", why);
        goto out;
    }
    snprintf(base_url, url_cap, "%s", d.base_url);
    if (x->plan->idle_s > 0) {
        read_counters(&d, &idle->e, false);
        sleep_s(x->plan->idle_s);
        read_counters(&d, &idle->e, true);
        idle->seconds = x->plan->idle_s;
    }
    bool clocks_set = false;
    if (pt->clock.prefill_mhz > 0 && external) {
        if (o->set_clocks(o->clocks_ctx, pt->clock.prefill_mhz, pt->clock.decode_mhz, why, sizeof why) != 0) {
            snprintf(reason, rcap, "clocks: %s", why);
            study_deploy_down(&d);
            goto out;
        }
        clocks_set = true;
    }
    make_config(x, pt, &d, bc);
    /* warm-ups of the dataset's shape with prompts of their own (bench.h) */
    bench_dataset wds = {0};
    if (bc->num_warmups > 0) {
        if (bench_dataset_load_warmups(&dso, o->tok, bc->num_warmups, &wds, why, sizeof why) == 0)
            bc->warmups = &wds;
        else
            log_warn("sweep: warm-ups from the dataset's first requests (%s)", why);
    }
    study_metric *before = xcalloc(SWEEP_METRICS_MAX, sizeof *before);
    int n_before = 0;
    read_reuse(&d, before, &n_before);
    power_poll_start(pp, &d);
    int rc = bench_run(bc, &ds, res, why, sizeof why);
    power_poll_stop(pp);
    bc->warmups = NULL;
    bench_dataset_free(&wds);
    if (n_before > 0) { /* prefix caching is on: its counters over the run */
        *mets = xcalloc(SWEEP_METRICS_MAX, sizeof **mets);
        read_reuse(&d, *mets, n_mets);
        study_metrics_delta(*mets, *n_mets, before, n_before);
    }
    free(before);
    if (rc == 0 && *res) /* sample times relative to the bench's timed start */
        for (int i = 0; i < pp->n; i++) pp->s[i].t_s -= (double)(*res)->start_ns * 1e-9;
    study_deploy_down(&d);
    if (clocks_set && o->set_clocks(o->clocks_ctx, 0, 0, why, sizeof why) != 0)
        log_warn("sweep: could not restore the GPU clocks: %s", why);
    if (rc != 0) {
        snprintf(reason, rcap, "bench: %s", why);
        goto out;
    }
    if ((*res)->sum.completed == 0) {
        const char *first = NULL;
        for (int i = 0; i < (*res)->n && !first; i++) first = (*res)->recs[i].error;
        snprintf(reason, rcap, "every request failed%s%.400s", first ? ": " : "", first ? first : "");
        goto out;
    }
    status = STUDY_STATUS_OK;
out:
    free(args);
    bench_dataset_free(&ds);
    return status;
}

static void mkdir_p(const char *dir) {
    char p[1024];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        mkdir(p, 0755);
        *s = '/';
    }
    mkdir(p, 0755);
}

static void dry_run_line(FILE *f, const study_point *pt, const char *what) {
    fprintf(f, "%4d  %-44s %s\n", pt->index, pt->label, what);
}

/* The deployments' internal secret: $PDSERVE_INTERNAL_SECRET when the caller set one,
 * else a random one put there, so that every instance this sweep starts (serve and up
 * read it from the environment) and this process's fetches of their power-sample
 * rings share it. */
static void ensure_secret(void) {
    const char *have = getenv("PDSERVE_INTERNAL_SECRET");
    if (have && *have) return;
    unsigned char raw[16];
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(raw, 1, sizeof raw, f) : 0;
    if (f) fclose(f);
    if (got != sizeof raw) {
        uint64_t x = hash_u64((uint64_t)time_now_ns() ^ (uint64_t)getpid());
        for (size_t i = 0; i < sizeof raw; i++, x = hash_u64(x)) raw[i] = (unsigned char)x;
    }
    char hex[2 * sizeof raw + 1];
    for (size_t i = 0; i < sizeof raw; i++) snprintf(hex + 2 * i, 3, "%02x", raw[i]);
    setenv("PDSERVE_INTERNAL_SECRET", hex, 1);
}

/* o->only_setups' labels all in plan: 0, or -1 with err naming the first that is not and
 * the plan's labels. */
static int check_only_setups(const study_plan *plan, const char *only, char *err, size_t errlen) {
    if (!only) return 0;
    const char **names = xcalloc((size_t)PD_MAX(plan->n_setups, 1), sizeof *names);
    char bad[128], known[512];
    for (int i = 0; i < plan->n_setups; i++) names[i] = plan->setups[i].label;
    int rc = util_list_unknown(only, names, plan->n_setups, bad, sizeof bad, known, sizeof known);
    free(names);
    if (rc != 0) pd_errorf(err, errlen, "--setups: no setup labelled \"%s\" in plan %s (its setups: %s)", bad,
                           plan->name, known);
    return rc;
}

int study_sweep_run(const study_plan *plan, const study_sweep_opts *o, study_sweep_stats *stats, char *err,
                    size_t errlen) {
    memset(stats, 0, sizeof *stats);
    if (check_only_setups(plan, o->only_setups, err, errlen) != 0) return -1;
    point_ctx x = {.plan = plan, .o = o, .model = o->model ? o->model : plan->model,
                   .tokenizer = o->tokenizer ? o->tokenizer : plan->tokenizer};
    study_point *pts = NULL;
    int n = study_plan_expand(plan, x.model, &pts);
    study_db *db = NULL;
    if (!o->dry_run || util_file_exists(o->db_path)) {
        if (study_db_open(o->db_path, &db, err, errlen) != 0) {
            free(pts);
            return -1;
        }
    }
    char meta_key[160];
    snprintf(meta_key, sizeof meta_key, "plan:%s", plan->name);
    if (!o->dry_run && study_db_set_meta(db, meta_key, plan->json, err, errlen) != 0) {
        study_db_close(db);
        free(pts);
        return -1;
    }
    char log_dir[1024];
    snprintf(log_dir, sizeof log_dir, "%s.logs", o->db_path);
    x.log_dir = log_dir;
    if (!o->dry_run) mkdir_p(log_dir);
    study_hw hw;
    study_hw_probe(&hw);

    /* Which points are left. */
    bool *todo = xcalloc((size_t)PD_MAX(n, 1), sizeof *todo);
    int n_todo = 0;
    for (int i = 0; i < n; i++) {
        if (!util_list_has(o->only_setups, pts[i].setup->label)) continue;
        stats->points++;
        study_status s;
        int found = db ? study_db_point_status(db, pts[i].key, &s) : 0;
        if (found < 0) {
            pd_errorf(err, errlen, "%s: cannot read the runs table", o->db_path);
            study_db_close(db);
            free(pts);
            free(todo);
            return -1;
        }
        if (found == 1 && s == STUDY_STATUS_OK) stats->done_before++;
        else todo[i] = true, n_todo++;
        if (o->dry_run && o->out) {
            char why[256];
            const char *what = !todo[i] ? "done (in the database)" : "run";
            if (todo[i] && pts[i].clock.prefill_mhz > 0 && !o->allow_clock_control)
                what = "skip: clock control not allowed";
            else if (todo[i] && !study_deploy_available(pts[i].setup->name, why, sizeof why)) what = why;
            dry_run_line(o->out, &pts[i], what);
        }
    }
    if (o->dry_run) {
        if (o->out)
            fprintf(o->out, "%d points: %d done already, %d to run (model %s)\n", stats->points, stats->done_before,
                    n_todo, x.model ? x.model : "(none)");
        study_db_close(db);
        free(pts);
        free(todo);
        return 0;
    }
    if (o->progress)
        fprintf(o->progress, "sweep %s: %d points, %d done already, %d to run; results in %s\n", plan->name,
                stats->points, stats->done_before, n_todo, o->db_path);

    ensure_secret();
    struct sigaction sa = {0}, old_int, old_term;
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    double t_sweep = time_now_s(), t_spent = 0;
    int ran = 0, rc = 0;
    for (int i = 0; i < n; i++) {
        if (!todo[i]) continue;
        const study_point *pt = &pts[i];
        double t0 = time_now_s(), w0 = time_wall_s();
        bench_config bc;
        bench_config_default(&bc);
        bench_result *res = NULL;
        study_idle idle;
        memset(&idle, 0, sizeof idle);
        char reason[1024] = "", base_url[256] = "";
        power_poll pp;
        memset(&pp, 0, sizeof pp);
        study_metric *mets = NULL;
        int n_mets = 0;
        study_status st = run_point(&x, pt, &bc, &res, &idle, &pp, &mets, &n_mets, base_url, sizeof base_url, reason,
                                    sizeof reason);
        bool deployed = res != NULL;
        study_dataset sd;
        study_setup_dataset(plan, pt->setup, &sd);
        study_run_info ri = {.plan_name = plan->name, .model = x.model, .base_url = base_url[0] ? base_url : NULL,
                             .hw = &hw, .started_unix = w0, .ended_unix = time_wall_s(), .status = st,
                             .reason = st == STUDY_STATUS_OK ? NULL : reason, .dataset = sd.name,
                             .input_len = sd.input_len, .output_len = sd.output_len,
                             .warmup_requests = plan->warmup_requests, .range_ratio = sd.range_ratio,
                             .cooldown_s = plan->cooldown_s, .seed = sd.seed, .power = pp.s,
                             .n_power = pp.n, .metrics = mets, .n_metrics = n_mets};
        char e2[512];
        long long id = study_db_record(db, pt, &ri, res ? &bc : NULL, res, &idle, e2, sizeof e2);
        free(pp.s);
        free(mets);
        if (id < 0) {
            pd_errorf(err, errlen, "%s", e2);
            bench_result_free(res);
            rc = -1;
            break;
        }
        if (st == STUDY_STATUS_OK) stats->ok++;
        else if (st == STUDY_STATUS_FAILED) stats->failed++;
        else stats->skipped++;
        ran++;
        if (o->progress) {
            char left[32], line[256] = "";
            if (res && st == STUDY_STATUS_OK)
                snprintf(line, sizeof line, " (TTFT p50 %.1f ms, TPOT p50 %.2f ms, %.1f tok/s)",
                         res->sum.ttft.median, res->sum.tpot.median, res->sum.total_token_throughput);
            fprintf(o->progress, "sweep [%d/%d] %s: %s in %.1f s%s%s%s\n", ran, n_todo, pt->label,
                    study_status_name(st), time_now_s() - t0, line, st == STUDY_STATUS_OK ? "" : ": ",
                    st == STUDY_STATUS_OK ? "" : reason);
            t_spent = time_now_s() - t_sweep;
            if (ran < n_todo) {
                fmt_duration(t_spent / ran * (n_todo - ran), left, sizeof left);
                fprintf(o->progress, "sweep: %d of %d points left, about %s to go\n", n_todo - ran, n_todo, left);
            }
            fflush(o->progress);
        }
        bench_result_free(res);
        if (deployed && plan->cooldown_s > 0 && ran < n_todo) sleep_s(plan->cooldown_s);
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (o->progress && rc == 0)
        fprintf(o->progress, "sweep %s: %d ok, %d failed, %d skipped, %d done before, in %.1f s\n", plan->name,
                stats->ok, stats->failed, stats->skipped, stats->done_before, time_now_s() - t_sweep);
    study_db_close(db);
    free(pts);
    free(todo);
    return rc;
}
