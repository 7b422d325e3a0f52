/* test_bench_client.c: the bench client against the in-process fake server
 * (test_bench_server.h) on 127.0.0.1: timing accuracy at 500 concurrent streams
 * (every client timestamp compared with the server's own send time), failure
 * counting (HTTP 500, dropped connections, timeouts, refused connections), arrival
 * times honoured, max concurrency, energy from /metrics, chat, and the result JSON. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include "bench/bench.h"
#include "test.h"
#include "test_bench_server.h"
#include "util/util.h"

/* The default bench config aimed at the test server s (url: its base URL, the
 * caller's buffer, which the config points to). */
static void config_for(bench_config *c, const tsrv *s, char *url, size_t cap) {
    tsrv_url(s, url, cap);
    bench_config_default(c);
    c->base_url = url;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median_of(double *x, int n) {
    qsort(x, (size_t)n, sizeof *x, cmp_d);
    return n ? bench_percentile(x, n, 50) : 0;
}

static void random_dataset(bench_dataset *d, int n, int in, int out) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.num_prompts = n;
    o.random_input_len = in;
    o.random_output_len = out;
    o.random_vocab_size = 1000;
    char err[256];
    PD_ASSERT(bench_dataset_load(&o, NULL, d, err, sizeof err) == 0);
}

static int count_errors(const bench_result *r, const char *needle) {
    int k = 0;
    for (int i = 0; i < r->n; i++) k += !r->recs[i].success && r->recs[i].error && strstr(r->recs[i].error, needle);
    return k;
}

typedef struct timing {
    double ttft_med, itl_med, tpot_med;   /* ms, as the bench reports them */
    double ttft_err_med;                  /* |TTFT - first_ms| */
    double itl_err_med, itl_err_max;      /* |ITL - itl_ms| */
    double lag_med, lag_min, lag_p99, lag_max;  /* client timestamp - server send time, every token */
    double send_med;                      /* server read time - client start: request delivery */
    double sum_med;                       /* request delivery + server + first token's lag, per
                                             request: the TTFT rebuilt from the server's stamps */
    double server_first_med;              /* server: first token sent - request read */
    int completed, failed, max_concurrent, bad;
    double busy;                          /* share of the run the client and server threads
                                             spent waiting for a CPU (other processes) */
} timing;

/* n streams of tok tokens on the schedule first_ms, itl_ms, sent at rate (inf: all at
 * once) after n warmups that open the connections (as a real run does). */
static void timing_run(int n, int tok, double first_ms, double itl_ms, double rate, double burstiness, timing *t) {
    memset(t, 0, sizeof *t);
    tsrv s;
    tsrv_conf sc = {.first_ms = first_ms, .itl_ms = itl_ms, .tokens = tok};
    PD_ASSERT(tsrv_start(&s, &sc) == 0);
    char url[64];
    bench_config c;
    config_for(&c, &s, url, sizeof url);
    c.model = "test-model";
    c.num_warmups = n;
    c.ignore_eos = true;
    c.metrics_urls = "";
    c.request_rate = rate;
    c.burstiness = burstiness;
    bench_dataset d;
    random_dataset(&d, n, 16, tok);
    bench_result *r = NULL;
    char err[512];
    double w0 = tsrv_run_delay_ns(0) + tsrv_run_delay_ns(s.tid), t0 = time_now_s();
    PD_ASSERT(bench_run(&c, &d, &r, err, sizeof err) == 0);
    t->busy = (tsrv_run_delay_ns(0) + tsrv_run_delay_ns(s.tid) - w0) * 1e-9 / (time_now_s() - t0);
    t->completed = r->sum.completed;
    t->failed = r->sum.failed;
    t->max_concurrent = r->sum.max_concurrent;
    t->ttft_med = r->sum.ttft.median;
    t->itl_med = r->sum.itl.median;
    t->tpot_med = r->sum.tpot.median;
    double *lag = xmalloc(sizeof(double) * (size_t)(n * tok)), *itl_err = xmalloc(sizeof(double) * (size_t)(n * tok));
    double *ttft_err = xmalloc(sizeof(double) * (size_t)n), *send = xmalloc(sizeof(double) * (size_t)n);
    double *srv = xmalloc(sizeof(double) * (size_t)n), *sum = xmalloc(sizeof(double) * (size_t)n);
    int nl = 0, ni = 0, nr = 0;
    for (int i = 0; i < n; i++) {
        const bench_record *q = &r->recs[i];
        if (q->n_tokens != tok || !q->text) {
            t->bad++;
            continue;
        }
        double start = (double)r->start_ns * 1e-9 + q->start_s;  /* client clock, s */
        const char *p = q->text;
        for (int k = 0; k < tok; k++) {
            char *end;
            double sent = (double)strtoull(p, &end, 10) * 1e-9;
            if (end == p) {
                t->bad++;
                break;
            }
            if (k == 0) {
                double recv = (double)strtoull(end + 1, &end, 10) * 1e-9;
                send[nr] = (recv - start) * 1e3;
                srv[nr] = (sent - recv) * 1e3;
                sum[nr] = send[nr] + srv[nr] + (start + q->token_s[0] - sent) * 1e3;
                ttft_err[nr] = fabs(q->ttft_s * 1e3 - first_ms);
                nr++;
            }
            p = end + 1;
            lag[nl++] = (start + q->token_s[k] - sent) * 1e3;
            if (k) itl_err[ni++] = fabs((q->token_s[k] - q->token_s[k - 1]) * 1e3 - itl_ms);
        }
    }
    t->lag_med = median_of(lag, nl);
    t->lag_min = nl ? lag[0] : 0;
    t->lag_max = nl ? lag[nl - 1] : 0;
    t->lag_p99 = bench_percentile(lag, nl, 99);
    t->itl_err_med = median_of(itl_err, ni);
    t->itl_err_max = ni ? itl_err[ni - 1] : 0;
    t->ttft_err_med = median_of(ttft_err, nr);
    t->send_med = median_of(send, nr);
    t->server_first_med = median_of(srv, nr);
    t->sum_med = median_of(sum, nr);
    fprintf(stderr,
            "  %d streams, rate %g: TTFT median %.3f ms (schedule %.0f; request delivery %.3f, server %.3f); "
            "ITL median %.3f ms (schedule %.0f), |ITL - schedule| median %.3f max %.3f; token delivery lag "
            "median %.3f p99 %.3f max %.3f ms; peak concurrency %d; client CPU %.3f s for %lld events; "
            "waiting for a CPU %.1f%% of the run\n",
            n, rate, t->ttft_med, first_ms, t->send_med, t->server_first_med, t->itl_med, itl_ms, t->itl_err_med,
            t->itl_err_max, t->lag_med, t->lag_p99, t->lag_max, t->max_concurrent, r->client_cpu_s, r->events, t->busy * 100);
    free(lag);
    free(itl_err);
    free(ttft_err);
    free(send);
    free(srv);
    free(sum);
    bench_result_free(r);
    bench_dataset_free(&d);
    tsrv_stop(&s);
}

/* The timing bounds hold on a machine that gives the client and the fake server a
 * CPU when they want one. Other processes on a small shared machine can starve them
 * (seen as run-queue delay in /proc schedstat): then a run is retried, up to three
 * times, and if every try was starved the timing bounds are reported, not asserted
 * (the counts are always asserted). */
#define TIMING_TRIES 3
#define TIMING_BUSY 0.02  /* starved: waited for a CPU > 2% of the run */

/* Under AddressSanitizer every send and read costs a few times more CPU, so the
 * burst's queueing tails (not the per-token schedule) get that much more room. */
#if defined(__SANITIZE_ADDRESS__)
#define TIMING_TAIL_SCALE 4.0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TIMING_TAIL_SCALE 4.0
#endif
#endif
#ifndef TIMING_TAIL_SCALE
#define TIMING_TAIL_SCALE 1.0
#endif

static bool staggered_ok(const timing *t) {
    return fabs(t->ttft_med - 50) < 1.0 && t->ttft_err_med < 1.0 && fabs(t->itl_med - 10) < 1.0 &&
           fabs(t->tpot_med - 10) < 1.0 && t->itl_err_med < 1.0 && t->lag_min >= 0 && t->lag_med < 1.0 &&
           t->lag_p99 < 20.0 && t->lag_max < 250.0;
}

/* 500 concurrent streams (arrivals spread over ~250 ms, each stream 440 ms long, so
 * all 500 overlap): TTFT and ITL within 1 ms of the schedule, per request and token. */
static void test_timing_500_streams(void) {
    timing t;
    bool ok = false;
    for (int i = 0; i < TIMING_TRIES && !ok; i++) {
        timing_run(500, 40, 50, 10, 2000, 50, &t);
        ok = staggered_ok(&t);
        CHECK_EQ_INT(t.completed, 500);
        CHECK_EQ_INT(t.failed, 0);
        CHECK_EQ_INT(t.bad, 0);
        CHECK_EQ_INT(t.max_concurrent, 500);
        if (!ok && t.busy <= TIMING_BUSY) break;  /* not starved: a real failure */
    }
    if (!ok && t.busy > TIMING_BUSY) {
        fprintf(stderr, "  NOTE: timing bounds not asserted: the machine was oversubscribed in all %d tries "
                        "(waited for a CPU %.1f%% of the last run)\n", TIMING_TRIES, t.busy * 100);
        return;
    }
    CHECK(fabs(t.ttft_med - 50) < 1.0);
    CHECK(t.ttft_err_med < 1.0);
    CHECK(fabs(t.itl_med - 10) < 1.0);
    CHECK(fabs(t.tpot_med - 10) < 1.0);
    CHECK(t.itl_err_med < 1.0);
    CHECK(t.lag_min >= 0);                   /* no token is stamped before it was sent */
    CHECK(t.lag_med < 1.0);
    /* the tail depends on scheduling (the max is under 1 ms on an idle machine); a
     * missed wake-up would show as >= 1 s */
    CHECKF(t.lag_p99 < 20.0, "p99 delivery lag %.3f ms", t.lag_p99);
    CHECKF(t.lag_max < 250.0, "max delivery lag %.3f ms", t.lag_max);
}

/* The burst: the reported TTFT median is the median of each request's delivery +
 * server time + first token's lag (the sum of the parts' medians is not, when the
 * burst spreads them); the delivery lag's tail is bounded by the time it takes the
 * client to send the burst while tokens already come back. */
static bool burst_ok(const timing *t) {
    return fabs(t->server_first_med - 50) < 1.0 && fabs(t->ttft_med - t->sum_med) < 0.5 &&
           fabs(t->itl_med - 10) < 1.0 && t->itl_err_med < 1.0 && t->lag_min >= 0 && t->lag_med < 1.0 &&
           t->lag_p99 < 20.0 * TIMING_TAIL_SCALE;
}

/* 500 requests at the same instant: the burst itself takes the client and the server
 * a few ms to send and read (that is real TTFT, and is reported); once a stream is
 * running, every token is still stamped within 1 ms of its send. */
static void test_timing_500_burst(void) {
    timing t;
    bool ok = false;
    for (int i = 0; i < TIMING_TRIES && !ok; i++) {
        timing_run(500, 20, 50, 10, INFINITY, 1, &t);
        ok = burst_ok(&t);
        CHECK_EQ_INT(t.completed, 500);
        CHECK_EQ_INT(t.bad, 0);
        CHECK_EQ_INT(t.max_concurrent, 500);
        if (!ok && t.busy <= TIMING_BUSY) break;
    }
    if (!ok && t.busy > TIMING_BUSY) {
        fprintf(stderr, "  NOTE: timing bounds not asserted: the machine was oversubscribed in all %d tries "
                        "(waited for a CPU %.1f%% of the last run)\n", TIMING_TRIES, t.busy * 100);
        return;
    }
    CHECK(fabs(t.server_first_med - 50) < 1.0);
    CHECKF(fabs(t.ttft_med - t.sum_med) < 0.5, "TTFT median %.3f, rebuilt %.3f", t.ttft_med, t.sum_med);
    CHECK(fabs(t.itl_med - 10) < 1.0);
    CHECK(t.itl_err_med < 1.0);
    CHECK(t.lag_min >= 0 && t.lag_med < 1.0);
    CHECKF(t.lag_p99 < 20.0 * TIMING_TAIL_SCALE, "p99 delivery lag %.3f ms", t.lag_p99);
}

/* Every 5th request gets HTTP 500, every 7th (not also 5th) is dropped after 3 tokens. */
static void test_failures_counted(void) {
    enum { N = 70 };
    tsrv s;
    tsrv_conf sc = {.first_ms = 2, .itl_ms = 1, .tokens = 8, .fail_500_every = 5, .drop_every = 7, .drop_after = 3};
    REQUIRE(tsrv_start(&s, &sc) == 0);
    char url[64];
    bench_config c;
    config_for(&c, &s, url, sizeof url);
    c.max_concurrency = 8;
    c.metrics_urls = "";
    bench_dataset d;
    random_dataset(&d, N, 8, 8);
    bench_result *r = NULL;
    char err[512];
    REQUIRE(bench_run(&c, &d, &r, err, sizeof err) == 0);
    CHECK(!strcmp(r->model, "test-model"));  /* found through GET /v1/models */
    CHECK_EQ_INT(r->sum.failed, 14 + 8);
    CHECK_EQ_INT(r->sum.completed, N - 22);
    CHECK_EQ_INT(count_errors(r, "HTTP 500: injected failure"), 14);
    CHECK_EQ_INT(count_errors(r, "connection dropped mid-stream after 3 tokens"), 8);
    CHECK(r->sum.max_concurrent <= 8);
    CHECK_EQ_INT(s.requests, N);
    char *buf = NULL;
    size_t blen = 0;
    FILE *f = open_memstream(&buf, &blen);
    bench_print_summary(f, &c, r);
    fclose(f);
    CHECK_STR_CONTAINS(buf, "Failed requests:                         22");
    CHECK_STR_CONTAINS(buf, "14 x HTTP 500: injected failure");
    CHECK_STR_CONTAINS(buf, "8 x connection dropped mid-stream after 3 tokens");
    free(buf);
    bench_result_free(r);
    bench_dataset_free(&d);
    tsrv_stop(&s);
}

static void test_timeout_and_refused(void) {
    tsrv s;
    tsrv_conf sc = {.first_ms = 5000, .itl_ms = 10, .tokens = 4};
    REQUIRE(tsrv_start(&s, &sc) == 0);
    char url[64];
    bench_config c;
    config_for(&c, &s, url, sizeof url);
    c.model = "test-model";
    c.request_timeout_s = 0.3;
    c.metrics_urls = "";
    bench_dataset d;
    random_dataset(&d, 5, 8, 4);
    bench_result *r = NULL;
    char err[512];
    double t = time_now_s();
    REQUIRE(bench_run(&c, &d, &r, err, sizeof err) == 0);
    CHECK(time_now_s() - t < 3);
    CHECK_EQ_INT(count_errors(r, "timeout after"), 5);
    bench_result_free(r);
    tsrv_stop(&s);
    /* the server is gone: refused connections are failures, not a hang */
    REQUIRE(bench_run(&c, &d, &r, err, sizeof err) == 0);
    CHECK_EQ_INT(count_errors(r, "could not connect"), 5);
    bench_result_free(r);
    /* and no model to find is an error of the run */
    c.model = NULL;
    CHECK(bench_run(&c, &d, &r, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "pass --model");
    bench_dataset_free(&d);
}

/* Arrival times are honoured: each request leaves within 1 ms of its schedule. */
static void test_arrivals_honoured_and_concurrency(void) {
    enum { N = 120 };
    tsrv s;
    tsrv_conf sc = {.first_ms = 5, .itl_ms = 2, .tokens = 4};
    REQUIRE(tsrv_start(&s, &sc) == 0);
    char url[64];
    bench_config c;
    config_for(&c, &s, url, sizeof url);
    c.model = "test-model";
    c.request_rate = 400;
    c.burstiness = 1;
    c.seed = 3;
    c.metrics_urls = "";
    bench_dataset d;
    random_dataset(&d, N, 8, 4);
    double arr[N], late[N];
    bench_arrivals(c.request_rate, c.burstiness, N, c.seed, arr);
    bench_result *r = NULL;
    char err[512];
    REQUIRE(bench_run(&c, &d, &r, err, sizeof err) == 0);
    CHECK_EQ_INT(r->sum.completed, N);
    double max_late = 0;
    for (int i = 0; i < N; i++) {
        late[i] = (r->recs[i].start_s - arr[i]) * 1e3;
        max_late = PD_MAX(max_late, late[i]);
        CHECK(late[i] >= 0);
    }
    double med = median_of(late, N);
    fprintf(stderr, "  Poisson 400 req/s: send time late by median %.3f ms, max %.3f ms\n", med, max_late);
    CHECK(med < 1.0);
    bench_result_free(r);
    /* at most 4 in flight, though all arrive at once */
    c.request_rate = INFINITY;
    c.max_concurrency = 4;
    REQUIRE(bench_run(&c, &d, &r, err, sizeof err) == 0);
    CHECK_EQ_INT(r->sum.completed, N);
    CHECK_EQ_INT(r->sum.max_concurrent, 4);
    bench_result_free(r);
    bench_dataset_free(&d);
    tsrv_stop(&s);
}

/* usage.prompt_tokens_details.cached_tokens lands in each record and the summary. */
static void test_cached_tokens(void) {
    enum { N = 8 };
    tsrv s;
    tsrv_conf sc = {.first_ms = 1, .itl_ms = 0, .tokens = 3, .cached_tokens = 5};
    REQUIRE(tsrv_start(&s, &sc) == 0);
    char url[64];
    bench_config c;
    config_for(&c, &s, url, sizeof url);
    c.model = "test-model";
    c.metrics_urls = "";
    bench_dataset d;
    random_dataset(&d, N, 8, 3);
    bench_result *r = NULL;
    char err[512];
    REQUIRE(bench_run(&c, &d, &r, err, sizeof err) == 0);
    CHECK_EQ_INT(r->sum.completed, N);
    for (int i = 0; i < N; i++) CHECK(r->recs[i].has_cached && r->recs[i].cached_tokens == 5);
    CHECK_EQ_INT(r->sum.n_cached_known, N);
    CHECK_EQ_INT(r->sum.total_cached, 5 * N);
    char *buf = NULL;
    size_t blen = 0;
    FILE *f = open_memstream(&buf, &blen);
    bench_print_summary(f, &c, r);
    fclose(f);
    CHECK_STR_CONTAINS(buf, "Cached prompt tokens:");
    free(buf);
    bench_result_free(r);
    bench_dataset_free(&d);
    tsrv_stop(&s);
}

/* Energy from /metrics, usage-less servers, chat, and the saved JSON. */
static void test_energy_chat_json(void) {
    enum { N = 20, TOK = 10 };
    tsrv s;
    tsrv_conf sc = {.first_ms = 2, .itl_ms = 1, .tokens = TOK, .joules_per_token = 0.5, .no_usage = true,
                    .no_done = true};
    REQUIRE(tsrv_start(&s, &sc) == 0);
    char url[64];
    bench_config c;
    config_for(&c, &s, url, sizeof url);
    c.num_warmups = 3;   /* their tokens burn energy before the "before" reading */
    c.endpoint = "/v1/chat/completions";
    c.backend = "openai-chat";
    bench_dataset d = {0};
    /* chat needs text prompts: token ids are refused before anything is sent */
    random_dataset(&d, N, 8, TOK);
    bench_result *r = NULL;
    char err[512];
    CHECK(bench_run(&c, &d, &r, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "needs text prompts");
    for (int i = 0; i < N; i++) {
        free(d.reqs[i].prompt_ids);
        d.reqs[i].prompt_ids = NULL;
        d.reqs[i].prompt = xstrdup(i % 2 ? "Say \"hi\"\n\ttwice" : "caf\xC3\xA9 \xFF bad byte");
        d.reqs[i].prompt_len = 4;
    }
    REQUIRE(bench_run(&c, &d, &r, err, sizeof err) == 0);
    CHECK_EQ_INT(r->sum.completed, N);
    CHECK_EQ_INT(r->sum.total_output, N * TOK);  /* no usage: counted from chunks */
    CHECK(!r->recs[0].has_cached && r->sum.n_cached_known == 0); /* nor cached tokens */
    CHECK(r->recs[0].n_tokens == TOK && r->recs[0].text_len > 0);
    CHECKF(fabs(r->sum.energy_j - N * TOK * 0.5 * 4) < 1e-6, "energy %g J", r->sum.energy_j);
    CHECK(fabs(bench_energy_joules(&r->energy, "prefill") - N * TOK * 0.5) < 1e-6);
    CHECK(fabs(bench_energy_joules(&r->energy, "decode") - N * TOK * 1.5) < 1e-6);
    char *buf = NULL;
    size_t blen = 0;
    FILE *f = open_memstream(&buf, &blen);
    bench_print_summary(f, &c, r);
    fclose(f);
    CHECK_STR_CONTAINS(buf, "Energy (J):                              400.00");
    CHECK_STR_CONTAINS(buf, "Energy per output token (J/tok):         2.0000");
    CHECK_STR_CONTAINS(buf, "Energy [decode] (J):                     300.00");
    free(buf);

    char path[512], name[256];
    bench_result_default_filename(&c, r, name, sizeof name);
    CHECK(!strncmp(name, "openai-chat-infqps-test-model-", 30));
    snprintf(path, sizeof path, "%s/test_bench_result.json", test_build_dir());
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    REQUIRE(bench_result_save_json(&c, &o, r, path, err, sizeof err) == 0);
    size_t len;
    char *text = util_read_file(path, &len, err, sizeof err);
    REQUIRE(text != NULL);
    cJSON *j = cJSON_Parse(text);
    REQUIRE(j != NULL);
    static const char *keys[] = {"date", "backend", "model_id", "num_prompts", "request_rate", "burstiness",
                                 "max_concurrency", "duration", "completed", "total_input_tokens",
                                 "total_output_tokens", "request_throughput", "output_throughput",
                                 "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls",
                                 "generated_texts", "errors", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms",
                                 "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "mean_itl_ms", "p95_itl_ms",
                                 "mean_e2el_ms", "p90_e2el_ms", "token_times", "start_times", "energy"};
    for (size_t k = 0; k < PD_ARRAY_LEN(keys); k++)
        CHECKF(cJSON_GetObjectItemCaseSensitive(j, keys[k]) != NULL, "missing key %s", keys[k]);
    CHECK(!strcmp(cJSON_GetObjectItem(j, "request_rate")->valuestring, "inf"));
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(j, "max_concurrency")));
    CHECK_EQ_INT(cJSON_GetArraySize(cJSON_GetObjectItem(j, "ttfts")), N);
    CHECK_EQ_INT(cJSON_GetArraySize(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "itls"), 0)), TOK - 1);
    CHECK_EQ_INT(cJSON_GetArraySize(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "token_times"), 0)), TOK);
    const cJSON *e = cJSON_GetObjectItem(j, "energy");
    CHECK(cJSON_IsTrue(cJSON_GetObjectItem(e, "measured")));
    CHECK(fabs(cJSON_GetObjectItem(e, "total_j")->valuedouble - 400) < 1e-6);
    CHECK(fabs(cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(e, "per_role"), "decode"), "total_j")
                   ->valuedouble - 300) < 1e-6);
    cJSON_Delete(j);
    free(text);
    remove(path);
    bench_result_free(r);
    bench_dataset_free(&d);
    tsrv_stop(&s);
}

/* Runs a shell command; returns its exit status and its stdout+stderr (malloc'd). */
static int run_cmd(const char *cmd, char **out) {
    char path[512], full[4096];
    snprintf(path, sizeof path, "%s/test_bench_cli.out", test_build_dir());
    snprintf(full, sizeof full, "%s > '%s' 2>&1", cmd, path);
    int st = system(full);
    size_t len;
    char err[256];
    *out = util_read_file(path, &len, err, sizeof err);
    if (!*out) *out = xstrdup("");
    remove(path);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* `pdserve bench` itself, end to end, against the fake server. */
static void test_cli_end_to_end(void) {
    const char *bin = getenv("PDSERVE_BIN");
    if (!bin || !util_file_exists(bin)) {
        fprintf(stderr, "  note: PDSERVE_BIN not set; the CLI case needs ctest\n");
        return;
    }
    tsrv s;
    tsrv_conf sc = {.first_ms = 3, .itl_ms = 1, .tokens = 8, .joules_per_token = 0.25};
    REQUIRE(tsrv_start(&s, &sc) == 0);
    char url[64], cmd[3000], dir[512], *out;
    tsrv_url(&s, url, sizeof url);
    snprintf(dir, sizeof dir, "%s/test_bench_results", test_build_dir());
    snprintf(cmd, sizeof cmd,
             "'%s' bench --base-url %s --dataset-name random --random-input-len 16 --random-output-len 8 "
             "--num-prompts 30 --max-concurrency 6 --request-rate 500 --seed 1 --ignore-eos --num-warmups 2 "
             "--goodput ttft:1000 tpot:100 --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 "
             "--save-result --result-dir '%s' --result-filename run1.json",
             bin, url, dir);
    CHECK_EQ_INT(run_cmd(cmd, &out), 0);
    CHECK_STR_CONTAINS(out, "============ Serving Benchmark Result ============");
    CHECK_STR_CONTAINS(out, "Successful requests:                     30");
    CHECK_STR_CONTAINS(out, "Maximum request concurrency:             6");
    CHECK_STR_CONTAINS(out, "Request rate configured (RPS):           500.00");
    CHECK_STR_CONTAINS(out, "Total generated tokens:                  240");
    CHECK_STR_CONTAINS(out, "Request goodput (req/s):");
    CHECK_STR_CONTAINS(out, "P99 E2EL (ms):");
    CHECK_STR_CONTAINS(out, "Energy (J):                              240.00");  /* 240 tokens x 0.25 J x (1 + 3) */
    free(out);
    char path[700], err[256];
    snprintf(path, sizeof path, "%s/run1.json", dir);
    size_t len;
    char *text = util_read_file(path, &len, err, sizeof err);
    REQUIRE(text != NULL);
    cJSON *j = cJSON_Parse(text);
    REQUIRE(j != NULL);
    CHECK_EQ_INT(cJSON_GetObjectItem(j, "completed")->valueint, 30);
    CHECK(!strcmp(cJSON_GetObjectItem(j, "model_id")->valuestring, "test-model"));
    CHECK(cJSON_GetObjectItem(j, "p99_e2el_ms") != NULL);
    CHECK(cJSON_GetObjectItem(j, "request_goodput")->valuedouble > 0);
    cJSON_Delete(j);
    free(text);
    remove(path);
    rmdir(dir);
    /* a trace replayed 100x faster: its 10 s become 0.1 s */
    snprintf(cmd, sizeof cmd,
             "'%s' bench --base-url %s --dataset-name azure --dataset-path '%s/tests/fixtures/bench/azure_sample.csv' "
             "--trace-time-scale 0.01 --random-vocab-size 1000 --metrics-url ''",
             bin, url, test_source_dir());
    CHECK_EQ_INT(run_cmd(cmd, &out), 0);
    CHECK_STR_CONTAINS(out, "Traffic request rate: trace timestamps");
    CHECK_STR_CONTAINS(out, "Successful requests:                     10");
    CHECK_STR_CONTAINS(out, "Total input tokens:                      6194");
    CHECK_STR_CONTAINS(out, "energy: not measured");
    free(out);
    /* broken input is refused before anything is sent */
    snprintf(cmd, sizeof cmd, "'%s' bench --base-url %s --dataset-name azure --dataset-path '%s/tests/fixtures/bench/azure_negative.csv'",
             bin, url, test_source_dir());
    CHECK(run_cmd(cmd, &out) != 0);
    CHECK_STR_CONTAINS(out, "azure_negative.csv:4: ");
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' bench --no-such-flag", bin);
    CHECK_EQ_INT(run_cmd(cmd, &out), 2);
    CHECK_STR_CONTAINS(out, "unknown option '--no-such-flag'");
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' bench --base-url %s --goodput ttft:10 bogus:3 --num-prompts 1", bin, url);
    CHECK_EQ_INT(run_cmd(cmd, &out), 2);
    CHECK_STR_CONTAINS(out, "unknown metric 'bogus'");
    free(out);
    tsrv_stop(&s);
}

int main(void) {
    struct rlimit rl;  /* client and fake server share this process's file limit */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    TEST_RUN(test_timing_500_streams);
    TEST_RUN(test_timing_500_burst);
    TEST_RUN(test_failures_counted);
    TEST_RUN(test_timeout_and_refused);
    TEST_RUN(test_arrivals_honoured_and_concurrency);
    TEST_RUN(test_cached_tokens);
    TEST_RUN(test_energy_chat_json);
    TEST_RUN(test_cli_end_to_end);
    return TEST_END();
}
