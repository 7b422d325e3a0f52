/* run.c: one benchmark, start to end (bench_run): find the model, build every request
 * body before the clock starts, run the warmups, read the energy counters, send the
 * timed requests at their arrival times, read the counters again, summarize.
 * The timed part does nothing but send, receive and timestamp. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "bench/bench_client.h"

void bench_config_default(bench_config *c) {
    memset(c, 0, sizeof *c);
    c->base_url = "http://127.0.0.1:8000";
    c->endpoint = "/v1/completions";
    c->backend = "openai";
    c->request_rate = INFINITY;
    c->burstiness = 1.0;
    c->stream_usage = true;
    c->temperature = 0.0;
    c->request_timeout_s = 6 * 3600.0;  /* vLLM's client timeout */
    static const double pcts[] = {50, 90, 95, 99};
    memcpy(c->percentiles, pcts, sizeof pcts);
    c->n_percentiles = 4;
    c->percentile_metrics = BENCH_METRIC_TTFT | BENCH_METRIC_TPOT | BENCH_METRIC_ITL;
}

void bench_result_free(bench_result *r) {
    if (!r) return;
    for (int i = 0; i < r->n; i++) {
        free(r->recs[i].error);
        free(r->recs[i].token_s);
        free(r->recs[i].text);
        free(r->recs[i].server_phases);
    }
    free(r->recs);
    free(r);
}

/* ---- request bodies ------------------------------------------------------------------ */

typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = PD_MAX(b->cap * 2, b->n + n + 64);
        b->p = xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_fmt(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_fmt(sbuf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    sb_put(b, tmp, (size_t)PD_MIN(k, (int)sizeof tmp - 1));
}

/* JSON string with quotes; invalid UTF-8 becomes U+FFFD so that servers accept it. */
static void sb_json_str(sbuf *b, const char *s, size_t n) {
    sb_put(b, "\"", 1);
    size_t i = 0, run = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            i++;
            run++;
            continue;
        }
        sb_put(b, s + i - run, run);
        run = 0;
        if (c >= 0x80) {
            size_t k = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
            if (k > 1 && i + k <= n && utf8_valid(s + i, k)) sb_put(b, s + i, k);
            else {
                sb_str(b, "\xEF\xBF\xBD");
                k = 1;
            }
            i += k;
            continue;
        }
        char esc[8];
        switch (c) {
        case '"': sb_str(b, "\\\""); break;
        case '\\': sb_str(b, "\\\\"); break;
        case '\n': sb_str(b, "\\n"); break;
        case '\r': sb_str(b, "\\r"); break;
        case '\t': sb_str(b, "\\t"); break;
        default: snprintf(esc, sizeof esc, "\\u%04x", c); sb_str(b, esc);
        }
        i++;
    }
    sb_put(b, s + i - run, run);
    sb_put(b, "\"", 1);
}

static bool is_chat(const bench_config *c) { return strstr(c->endpoint, "chat") != NULL; }

static char *build_body(const bench_config *c, const char *model, const bench_request *q, size_t *len) {
    sbuf b = {0};
    sb_str(&b, "{\"model\":");
    sb_json_str(&b, model, strlen(model));
    if (is_chat(c)) {
        sb_str(&b, ",\"messages\":[{\"role\":\"user\",\"content\":");
        sb_json_str(&b, q->prompt ? q->prompt : "", q->prompt ? strlen(q->prompt) : 0);
        sb_str(&b, "}]");
        if (q->output_len > 0) sb_fmt(&b, ",\"max_completion_tokens\":%d,\"max_tokens\":%d", q->output_len, q->output_len);
    } else {
        sb_str(&b, ",\"prompt\":");
        if (q->prompt) sb_json_str(&b, q->prompt, strlen(q->prompt));
        else {
            sb_str(&b, "[");
            for (int i = 0; i < q->prompt_len; i++) sb_fmt(&b, i ? ",%d" : "%d", q->prompt_ids[i]);
            sb_str(&b, "]");
        }
        if (q->output_len > 0) sb_fmt(&b, ",\"max_tokens\":%d", q->output_len);
    }
    sb_fmt(&b, ",\"temperature\":%g,\"stream\":true", c->temperature);
    if (c->stream_usage) sb_str(&b, ",\"stream_options\":{\"include_usage\":true}");
    if (c->ignore_eos) sb_str(&b, ",\"ignore_eos\":true");
    if (c->server_timing) sb_str(&b, ",\"pdserve_timing\":true");
    sb_str(&b, "}");
    *len = b.n;
    return b.p;
}

/* ---- model and energy ------------------------------------------------------------------ */

static void join_url(char *out, size_t cap, const char *base, const char *path) {
    size_t bl = strlen(base);
    while (bl > 0 && base[bl - 1] == '/') bl--;
    snprintf(out, cap, "%.*s%s", (int)bl, base, path);
}

static int find_model(const bench_config *c, char *out, size_t cap, char *err, size_t errlen) {
    char url[1024], e2[512];
    join_url(url, sizeof url, c->base_url, "/v1/models");
    long status;
    char *body = bench_http_get(url, c->api_key, 30, &status, e2, sizeof e2);
    if (!body) {
        pd_errorf(err, errlen, "cannot list the server's models (%s); is the server up? or pass --model", e2);
        return -1;
    }
    cJSON *j = cJSON_Parse(body);
    const cJSON *data = j ? cJSON_GetObjectItemCaseSensitive(j, "data") : NULL;
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(data, 0), "id");
    int rc = 0;
    if (status != 200 || !cJSON_IsString(id)) {
        pd_errorf(err, errlen, "GET %s gave HTTP %ld without a model id; pass --model", url, status);
        rc = -1;
    } else {
        snprintf(out, cap, "%s", id->valuestring);
    }
    cJSON_Delete(j);
    free(body);
    return rc;
}

static void read_energy(const bench_config *c, bench_energy *e, bool after) {
    char def[1024];
    const char *list = c->metrics_urls;
    if (!list) {
        join_url(def, sizeof def, c->base_url, "/metrics");
        list = def;
    }
    bool several = strchr(list, ',') != NULL;
    const char *p = list;
    if (after) e->t_after = time_now_s();
    else e->t_before = time_now_s();
    while (*p) {
        size_t n = strcspn(p, ",");
        char url[1024], err[512];
        snprintf(url, sizeof url, "%.*s", (int)PD_MIN(n, sizeof url - 1), p);
        p += n + (p[n] == ',');
        if (!url[0]) continue;
        long status;
        char *body = bench_http_get(url, c->api_key, 10, &status, err, sizeof err);
        if (body && status == 200) bench_energy_parse(e, body, strlen(body), several ? url : "", after);
        else if (!body) log_debug("bench: %s", err);
        free(body);
    }
}

static double thread_cpu_s(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) != 0) return 0;
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

/* ---- the run ------------------------------------------------------------------------- */

int bench_run(const bench_config *c, const bench_dataset *d, bench_result **out, char *err, size_t errlen) {
    *out = NULL;
    if (d->n < 1) {
        pd_errorf(err, errlen, "bench: the dataset has no requests");
        return -1;
    }
    if (is_chat(c))
        for (int i = 0; i < d->n; i++)
            if (!d->reqs[i].prompt) {
                pd_errorf(err, errlen, "%s needs text prompts; pass --tokenizer so that synthetic prompts "
                                       "are text", c->endpoint);
                return -1;
            }
    bench_result *r = xcalloc(1, sizeof *r);
    if (c->model) snprintf(r->model, sizeof r->model, "%s", c->model);
    else if (find_model(c, r->model, sizeof r->model, err, errlen) != 0) {
        free(r);
        return -1;
    }
    time_t now = time(NULL);
    struct tm tmv;
    localtime_r(&now, &tmv);
    strftime(r->date, sizeof r->date, "%Y%m%d-%H%M%S", &tmv);

    char **bodies = xmalloc(sizeof(char *) * (size_t)d->n);
    bench_job *jobs = xmalloc(sizeof(bench_job) * (size_t)d->n);
    double *arr = xmalloc(sizeof(double) * (size_t)d->n);
    if (c->use_trace_times && d->has_timestamps)
        for (int i = 0; i < d->n; i++) arr[i] = d->reqs[i].arrival_s;
    else
        bench_arrivals(c->request_rate, c->burstiness, d->n, c->seed, arr);
    for (int i = 0; i < d->n; i++) {
        bodies[i] = build_body(c, r->model, &d->reqs[i], &jobs[i].body_len);
        jobs[i].body = bodies[i];
        jobs[i].send_ns = (uint64_t)(PD_MAX(arr[i], 0) * 1e9);
        if (i > 0 && jobs[i].send_ns < jobs[i - 1].send_ns) jobs[i].send_ns = jobs[i - 1].send_ns;
    }
    int slots = c->max_concurrency > 0 ? PD_MIN(c->max_concurrency, PD_MAX(d->n, c->num_warmups)) : PD_MAX(d->n, c->num_warmups);
    bench_client *cl = bench_client_new(c, slots, err, errlen);
    int rc = -1;
    if (!cl) goto done;

    if (c->num_warmups > 0) {
        bench_job *wj = xmalloc(sizeof(bench_job) * (size_t)c->num_warmups);
        bench_record *wr = xcalloc((size_t)c->num_warmups, sizeof *wr);
        /* their own prompts where the caller made them (bench_dataset_load_warmups), else
         * the dataset's first requests */
        const bench_dataset *wd = c->warmups && c->warmups->n > 0 ? c->warmups : d;
        char **wbodies = xmalloc(sizeof(char *) * (size_t)c->num_warmups);
        for (int i = 0; i < c->num_warmups; i++) {
            wbodies[i] = build_body(c, r->model, &wd->reqs[i % wd->n], &wj[i].body_len);
            wj[i].body = wbodies[i];
            wj[i].send_ns = 0;
            wr[i].prompt_len = -1;
            wr[i].expected_output_len = wd->reqs[i % wd->n].output_len;
        }
        bench_client_run(cl, wj, c->num_warmups, wr, c->progress, "warmup ", NULL);
        int failed = 0;
        for (int i = 0; i < c->num_warmups; i++) {
            if (!wr[i].success && failed++ == 0) log_warn("bench: warmup request failed: %s", wr[i].error);
            free(wr[i].error);
            free(wr[i].token_s);
            free(wr[i].text);
            free(wr[i].server_phases);
        }
        for (int i = 0; i < c->num_warmups; i++) free(wbodies[i]);
        free(wbodies);
        free(wr);
        free(wj);
    }

    r->n = d->n;
    r->recs = xcalloc((size_t)d->n, sizeof *r->recs);
    for (int i = 0; i < d->n; i++) {
        r->recs[i].prompt_len = d->reqs[i].prompt_len;
        r->recs[i].expected_output_len = d->reqs[i].output_len;
        r->recs[i].start_s = -1;
    }
    read_energy(c, &r->energy, false);
    long long ev0 = bench_client_events(cl);
    double cpu0 = thread_cpu_s();
    double duration = bench_client_run(cl, jobs, d->n, r->recs, c->progress, "bench  ", &r->start_ns);
    r->client_cpu_s = thread_cpu_s() - cpu0;
    r->events = bench_client_events(cl) - ev0;
    read_energy(c, &r->energy, true);
    r->sum.energy_j = bench_energy_joules(&r->energy, NULL);
    bench_summarize(c, r, duration);
    rc = 0;
done:
    bench_client_free(cl);
    for (int i = 0; i < d->n; i++) free(bodies[i]);
    free(bodies);
    free(jobs);
    free(arr);
    if (rc == 0) *out = r;
    else bench_result_free(r);
    return rc;
}
