/* test_bench.c: unit tests of the bench library without a network: the SSE parser
 * (chunks split anywhere), the event scanner, metric math on hand-computed cases,
 * goodput, arrival statistics, energy parsing, and every dataset reader on its
 * sample file and on broken files. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "bench/bench_internal.h"
#include "model/tokenizer.h"
#include "test.h"
#include "util/util.h"

/* ---- a toy tokenizer --------------------------------------------------------------
 * ids 0..255 are bytes; 256..281 are the doubled letters "aa".."zz" (encode merges a
 * repeated lowercase letter greedily), so decode -> encode of random letter ids
 * shrinks and the exact-length loop must pad. Every id but the letters and their
 * doubles counts as "special", so random prompts draw only letters. */
static int toy_encode(void *ctx, const char *t, size_t n, int32_t **ids, int *count) {
    (void)ctx;
    int32_t *o = xmalloc(sizeof(int32_t) * (n + 1));
    int k = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)t[i];
        if (c >= 'a' && c <= 'z' && i + 1 < n && t[i + 1] == t[i]) {
            o[k++] = 256 + (c - 'a');
            i += 2;
        } else {
            o[k++] = c;
            i++;
        }
    }
    *ids = o;
    *count = k;
    return 0;
}

static char *toy_decode(void *ctx, const int32_t *ids, int n, size_t *len) {
    (void)ctx;
    char *o = xmalloc((size_t)n * 2 + 1);
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] >= 256) {
            o[k++] = (char)('a' + ids[i] - 256);
            o[k++] = (char)('a' + ids[i] - 256);
        } else {
            o[k++] = (char)ids[i];
        }
    }
    o[k] = 0;
    if (len) *len = k;
    return o;
}

static bool toy_special(void *ctx, int32_t id) {
    (void)ctx;
    return !(id >= 256 || (id >= 'a' && id <= 'z'));
}

static const bench_tokenizer TOY = {NULL, 282, toy_encode, toy_decode, toy_special};

static int toy_count(const char *s) {
    int32_t *ids;
    int n;
    toy_encode(NULL, s, strlen(s), &ids, &n);
    free(ids);
    return n;
}

static char *fixture(const char *name) {
    static char path[4][1024];
    static int k = 0;
    char *p = path[k++ % 4];
    snprintf(p, 1024, "%s/tests/fixtures/bench/%s", test_source_dir(), name);
    return p;
}

/* ---- SSE ------------------------------------------------------------------------ */

typedef struct ev_log {
    char buf[8192];
    size_t len;
    int n;
} ev_log;

static int log_event(void *ctx, const char *d, size_t n) {
    ev_log *l = ctx;
    memcpy(l->buf + l->len, d, n);
    l->len += n;
    l->buf[l->len++] = '|';
    l->buf[l->len] = 0;
    l->n++;
    return 0;
}

static const char SSE_STREAM[] =
    ": a comment\r\n"
    "event: message\r\n"
    "data: {\"a\":1}\r\n\r\n"
    "data:{\"b\":2}\n\n"
    "data: line1\ndata: line2\n\n"
    "id: 7\r"
    "data: cr-only\r\r"
    "retry: 10\n"
    "datafoo: ignored\n"
    "data\n\n"
    "data: [DONE]\n\n";
static const char SSE_EXPECT[] = "{\"a\":1}|{\"b\":2}|line1\nline2|cr-only||[DONE]|";

static void test_sse_whole_and_split(void) {
    ev_log whole = {0};
    bench_sse p;
    bench_sse_init(&p);
    CHECK_EQ_INT(bench_sse_feed(&p, SSE_STREAM, sizeof SSE_STREAM - 1, log_event, &whole), 0);
    CHECKF(!strcmp(whole.buf, SSE_EXPECT), "got %s", whole.buf);
    bench_sse_free(&p);
    size_t n = sizeof SSE_STREAM - 1;
    /* every single split point, and byte by byte */
    for (size_t cut = 0; cut <= n; cut++) {
        ev_log l = {0};
        bench_sse_init(&p);
        bench_sse_feed(&p, SSE_STREAM, cut, log_event, &l);
        bench_sse_feed(&p, SSE_STREAM + cut, n - cut, log_event, &l);
        CHECKF(!strcmp(l.buf, SSE_EXPECT), "cut %zu: got %s", cut, l.buf);
        bench_sse_free(&p);
    }
    ev_log l = {0};
    bench_sse_init(&p);
    for (size_t i = 0; i < n; i++) bench_sse_feed(&p, SSE_STREAM + i, 1, log_event, &l);
    CHECKF(!strcmp(l.buf, SSE_EXPECT), "byte by byte: got %s", l.buf);
    bench_sse_free(&p);
    /* random splits */
    pd_rng r;
    rng_seed(&r, 5);
    for (int t = 0; t < 500; t++) {
        ev_log q = {0};
        bench_sse_init(&p);
        size_t i = 0;
        while (i < n) {
            size_t k = 1 + rng_next(&r) % 9;
            k = PD_MIN(k, n - i);
            bench_sse_feed(&p, SSE_STREAM + i, k, log_event, &q);
            i += k;
        }
        CHECK(!strcmp(q.buf, SSE_EXPECT));
        bench_sse_free(&p);
    }
}

static int stop_cb(void *ctx, const char *d, size_t n) {
    (void)ctx;
    (void)d;
    (void)n;
    return 7;
}

static void test_sse_limits(void) {
    bench_sse p;
    bench_sse_init(&p);
    CHECK_EQ_INT(bench_sse_feed(&p, "data: x\n\n", 9, stop_cb, NULL), 7);
    bench_sse_free(&p);
    /* an event over the cap is an error, not unbounded growth */
    size_t big = BENCH_SSE_MAX_EVENT + 100;
    char *s = xmalloc(big);
    memcpy(s, "data: ", 6);
    memset(s + 6, 'x', big - 6);
    bench_sse_init(&p);
    ev_log l = {0};
    CHECK_EQ_INT(bench_sse_feed(&p, s, big, log_event, &l), -1);
    bench_sse_free(&p);
    free(s);
}

/* ---- event scan ------------------------------------------------------------------- */

static void test_event_scan(void) {
    bench_event ev;
    const char *c1 = "{\"id\":\"x\",\"choices\":[{\"index\":0,\"text\":\"Hello \\\"w\\\"\",\"finish_reason\":null}]}";
    REQUIRE(bench_event_scan(c1, strlen(c1), &ev) == 0);
    CHECK(ev.valid && !ev.done && !ev.finished && !ev.is_error);
    CHECK_EQ_INT(ev.text_len, 11);
    char out[64];
    CHECK_EQ_INT(bench_json_unescape(ev.text, ev.text_len, out, sizeof out), 9);
    CHECK(!strcmp(out, "Hello \"w\""));
    /* key order, spaces, a prompt echo containing "text": must not confuse */
    const char *c2 = "{ \"model\" : \"m\", \"echo\": \"\\\"text\\\": \\\"evil\\\"\", \"choices\" : [ { \"finish_reason\" : \"length\","
                     " \"text\" : \"ok\" } , {\"text\":\"second\"} ] , \"usage\": {\"prompt_tokens\": 12, \"completion_tokens\": 34} }";
    REQUIRE(bench_event_scan(c2, strlen(c2), &ev) == 0);
    CHECK(ev.finished);
    CHECK(ev.text_len == 2 && !memcmp(ev.text, "ok", 2));
    CHECK_EQ_INT(ev.prompt_tokens, 12);
    CHECK_EQ_INT(ev.completion_tokens, 34);
    const char *c3 = "{\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\\u00e9\\ud83d\\ude00\"},\"finish_reason\":null}]}";
    REQUIRE(bench_event_scan(c3, strlen(c3), &ev) == 0);
    CHECK_EQ_INT(bench_json_unescape(ev.text, ev.text_len, out, sizeof out), 6);
    CHECK(!strcmp(out, "\xC3\xA9\xF0\x9F\x98\x80"));
    const char *c4 = "{\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}";
    REQUIRE(bench_event_scan(c4, strlen(c4), &ev) == 0);
    CHECK(ev.text_len == 0);
    const char *c5 = "{\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}";
    REQUIRE(bench_event_scan(c5, strlen(c5), &ev) == 0);
    CHECK(ev.completion_tokens == 7 && ev.text_len == 0);
    CHECK_EQ_INT(ev.cached_tokens, -1); /* no prompt_tokens_details */
    const char *c7 = "{\"choices\":[],\"usage\":{\"prompt_tokens\":512,\"prompt_tokens_details\":"
                     "{\"audio_tokens\":null,\"cached_tokens\":496},\"completion_tokens\":1}}";
    REQUIRE(bench_event_scan(c7, strlen(c7), &ev) == 0);
    CHECK(ev.prompt_tokens == 512 && ev.cached_tokens == 496 && ev.completion_tokens == 1);
    const char *c8 = "{\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"prompt_tokens_details\":null}}";
    REQUIRE(bench_event_scan(c8, strlen(c8), &ev) == 0);
    CHECK(ev.prompt_tokens == 9 && ev.cached_tokens == -1);
    CHECK(!ev.has_server_timing && ev.server_ttft_s == -1);
    const char *c6 = "{\"choices\":[],\"usage\":{\"completion_tokens\":3},\"pdserve_timing\":{\"ttft_s\":0.0125,"
                     "\"e2e_s\":1.5e-1,\"queue_s\":0.001,\"n_preemptions\":0}}";
    REQUIRE(bench_event_scan(c6, strlen(c6), &ev) == 0);
    CHECK(ev.has_server_timing && ev.completion_tokens == 3);
    CHECK(fabs(ev.server_ttft_s - 0.0125) < 1e-12 && fabs(ev.server_e2e_s - 0.15) < 1e-12);
    const char *e1 = "{\"error\":{\"message\":\"out of KV blocks\",\"type\":\"server_error\"}}";
    REQUIRE(bench_event_scan(e1, strlen(e1), &ev) == 0);
    CHECK(ev.is_error && ev.error_len == 16 && !memcmp(ev.error, "out of KV blocks", 16));
    const char *e2 = "{\"object\":\"error\",\"message\":\"bad request\",\"code\":400}";
    REQUIRE(bench_event_scan(e2, strlen(e2), &ev) == 0);
    CHECK(ev.is_error && ev.error_len == 11);
    const char *e3 = "{\"choices\":[{\"text\":\"a\"}],\"error\":null}";
    REQUIRE(bench_event_scan(e3, strlen(e3), &ev) == 0);
    CHECK(!ev.is_error && ev.text_len == 1);
    CHECK(bench_event_scan("[DONE]", 6, &ev) == 0 && ev.done);
    CHECK(bench_event_scan("{\"choices\":[{\"text\":\"a\"}", 24, &ev) == -1);
    CHECK(bench_event_scan("{\"a\":tru}", 9, &ev) == -1);
    CHECK(bench_event_scan("not json", 8, &ev) == -1);
    CHECK(bench_json_unescape("\\x", 2, out, sizeof out) == -1);
    /* deep nesting is refused, not a stack overflow */
    char deep[400];
    memset(deep, '[', 200);
    memset(deep + 200, ']', 200);
    CHECK(bench_json_skip(deep, deep + 400) == NULL);
}

/* ---- metrics ------------------------------------------------------------------------- */

static void set_rec(bench_record *r, bool ok, int in, int out, double start, const double *tok, int n, double e2el) {
    memset(r, 0, sizeof *r);
    r->success = ok;
    r->prompt_len = in;
    r->output_len = out;
    r->start_s = start;
    r->token_s = xmalloc(sizeof(double) * (size_t)(n + 1));
    memcpy(r->token_s, tok, sizeof(double) * (size_t)n);
    r->n_tokens = n;
    r->ttft_s = n ? tok[0] : 0;
    r->e2el_s = e2el;
    if (!ok) r->error = xstrdup("HTTP 500: x");
}

static void test_metrics_hand_computed(void) {
    double p[] = {2.0, 4.0, 1.0, 3.0};
    double s4[] = {1, 2, 3, 4};
    CHECK(fabs(bench_percentile(s4, 4, 50) - 2.5) < 1e-12);
    CHECK(fabs(bench_percentile(s4, 4, 90) - 3.7) < 1e-12);  /* numpy: 1 + 0.9*3 -> 3.7 */
    CHECK(fabs(bench_percentile(s4, 4, 0) - 1) < 1e-12 && fabs(bench_percentile(s4, 4, 100) - 4) < 1e-12);
    bench_stat st;
    double pc[] = {25, 75};
    bench_stat_compute(&st, p, 4, pc, 2);
    CHECK(fabs(st.mean - 2.5) < 1e-12 && fabs(st.median - 2.5) < 1e-12);
    CHECK(fabs(st.std - sqrt(1.25)) < 1e-12);  /* population std, as numpy */
    CHECK(fabs(st.pct[0] - 1.75) < 1e-12 && fabs(st.pct[1] - 3.25) < 1e-12);

    bench_config c;
    bench_config_default(&c);
    bench_result r = {0};
    r.n = 4;
    r.recs = xcalloc(4, sizeof *r.recs);
    double t0[] = {0.1, 0.2, 0.3, 0.4, 0.5};
    double t1[] = {0.2, 0.3};
    double t3[] = {0.05};
    set_rec(&r.recs[0], true, 10, 5, 0.0, t0, 5, 0.5);
    set_rec(&r.recs[1], true, 20, 2, 0.5, t1, 2, 0.3);
    set_rec(&r.recs[2], false, 30, 0, 0.6, t1, 0, 0.1);
    set_rec(&r.recs[3], true, 40, 1, 1.0, t3, 1, 0.05);
    r.sum.energy_j = -1;
    bench_summarize(&c, &r, 2.0);
    const bench_summary *s = &r.sum;
    CHECK_EQ_INT(s->completed, 3);
    CHECK_EQ_INT(s->failed, 1);
    CHECK_EQ_INT(s->total_input, 70);
    CHECK_EQ_INT(s->total_output, 8);
    CHECK(fabs(s->request_throughput - 1.5) < 1e-12);
    CHECK(fabs(s->output_throughput - 4.0) < 1e-12);
    CHECK(fabs(s->total_token_throughput - 39.0) < 1e-12);
    CHECK(fabs(s->ttft.mean - 350.0 / 3) < 1e-9);          /* 100, 200, 50 */
    CHECK(fabs(s->ttft.median - 100) < 1e-9);
    CHECK(fabs(s->ttft.std - sqrt((pow(100 - 350.0 / 3, 2) + pow(200 - 350.0 / 3, 2) + pow(50 - 350.0 / 3, 2)) / 3)) < 1e-9);
    CHECK(fabs(s->ttft.pct[1] - 180) < 1e-9);               /* p90 of 50,100,200 */
    CHECK_EQ_INT(s->tpot.n, 2);                              /* only outputs > 1 */
    CHECK(fabs(s->tpot.mean - 100) < 1e-9);                  /* (0.5-0.1)/4 and (0.3-0.2)/1 */
    CHECK_EQ_INT(s->itl.n, 5);                               /* 4 + 1 gaps */
    CHECK(fabs(s->itl.mean - 100) < 1e-6 && fabs(s->itl.std) < 1e-6);
    CHECK(fabs(s->e2el.mean - (500 + 300 + 50) / 3.0) < 1e-9);
    CHECK(s->goodput < 0);
    CHECK_EQ_INT(s->max_concurrent, 2);                      /* 0-0.5, then 0.5-0.8 overlaps 0.6-0.7 */
    CHECK_EQ_INT((int)s->max_output_tokens_per_s, 7);        /* second 0: 5 + 2 tokens */

    /* goodput: ttft <= 150 keeps requests 0 and 3; tpot <= 50 drops request 0 */
    char err[256];
    REQUIRE(bench_parse_goodput(&c, "ttft:150", err, sizeof err) == 0);
    bench_summarize(&c, &r, 2.0);
    CHECK_EQ_INT(r.sum.good, 2);
    CHECK(fabs(r.sum.goodput - 1.0) < 1e-12);
    REQUIRE(bench_parse_goodput(&c, "ttft:150,tpot:50", err, sizeof err) == 0);
    bench_summarize(&c, &r, 2.0);
    CHECK_EQ_INT(r.sum.good, 1);
    REQUIRE(bench_parse_goodput(&c, "e2el:100", err, sizeof err) == 0);
    c.goodput_ttft_ms = c.goodput_tpot_ms = 0;
    bench_summarize(&c, &r, 2.0);
    CHECK_EQ_INT(r.sum.good, 1);                             /* only the 50 ms request */
    CHECK(bench_parse_goodput(&c, "ttft=3", err, sizeof err) == -1);
    CHECK(bench_parse_goodput(&c, "foo:3", err, sizeof err) == -1);
    CHECK(bench_parse_goodput(&c, "ttft:-3", err, sizeof err) == -1);
    CHECK(bench_parse_percentiles(&c, "50,99.9", err, sizeof err) == 0 && c.n_percentiles == 2);
    CHECK(bench_parse_percentiles(&c, "101", err, sizeof err) == -1);
    CHECK(bench_parse_percentile_metrics(&c, "ttft,e2el", err, sizeof err) == 0 &&
          c.percentile_metrics == (BENCH_METRIC_TTFT | BENCH_METRIC_E2EL));
    CHECK(bench_parse_percentile_metrics(&c, "ttft,foo", err, sizeof err) == -1);

    /* the printed table uses vLLM's labels and widths */
    char *buf = NULL;
    size_t blen = 0;
    FILE *f = open_memstream(&buf, &blen);
    bench_print_summary(f, &c, &r);
    fclose(f);
    CHECK_STR_CONTAINS(buf, "============ Serving Benchmark Result ============\n");
    CHECK_STR_CONTAINS(buf, "Successful requests:                     3");
    CHECK_STR_CONTAINS(buf, "Benchmark duration (s):                  2.00");
    CHECK_STR_CONTAINS(buf, "Total input tokens:                      70");
    CHECK_STR_CONTAINS(buf, "Request throughput (req/s):              1.50");
    CHECK_STR_CONTAINS(buf, "Request goodput (req/s):                 0.50");
    CHECK_STR_CONTAINS(buf, "---------------Time to First Token----------------\n");
    CHECK_STR_CONTAINS(buf, "Mean TTFT (ms):                          116.67");
    CHECK_STR_CONTAINS(buf, "P99.9 TTFT (ms):");
    CHECK_STR_CONTAINS(buf, "Mean E2EL (ms):");
    CHECK_STR_CONTAINS(buf, "energy: not measured");
    CHECK_STR_CONTAINS(buf, "1 x HTTP 500: x");
    free(buf);
    for (int i = 0; i < 4; i++) {
        free(r.recs[i].token_s);
        free(r.recs[i].error);
    }
    free(r.recs);
}

/* ---- arrivals ---------------------------------------------------------------------- */

static void gap_moments(const double *t, int n, double *mean, double *cv2) {
    double s = 0, ss = 0;
    for (int i = 1; i < n; i++) s += t[i] - t[i - 1];
    *mean = s / (n - 1);
    for (int i = 1; i < n; i++) ss += pow(t[i] - t[i - 1] - *mean, 2);
    *cv2 = ss / (n - 1) / (*mean * *mean);
}

static void test_arrivals(void) {
    enum { N = 200000 };
    double *t = xmalloc(sizeof(double) * N);
    bench_arrivals(INFINITY, 1.0, N, 1, t);
    CHECK(t[0] == 0 && t[N - 1] == 0);
    double ks[] = {1.0, 0.5, 4.0};
    for (int k = 0; k < 3; k++) {
        bench_arrivals(10.0, ks[k], N, 42, t);
        double mean, cv2;
        gap_moments(t, N, &mean, &cv2);
        CHECKF(fabs(mean - 0.1) / 0.1 < 0.02, "burstiness %g: mean gap %g", ks[k], mean);
        CHECKF(fabs(cv2 - 1.0 / ks[k]) * ks[k] < 0.05, "burstiness %g: CV^2 %g, want %g", ks[k], cv2, 1 / ks[k]);
        CHECK(t[0] == 0);
        for (int i = 1; i < N; i++)
            if (t[i] < t[i - 1]) {
                CHECK(!"arrivals go backwards");
                break;
            }
    }
    /* Poisson: counts per unit window have variance == mean (rate 10 -> 10) */
    bench_arrivals(10.0, 1.0, N, 7, t);
    int W = (int)t[N - 1], *cnt = xcalloc((size_t)W + 1, sizeof(int));
    for (int i = 0; i < N; i++)
        if ((int)t[i] < W) cnt[(int)t[i]]++;
    double m = 0, v = 0;
    for (int i = 0; i < W; i++) m += cnt[i];
    m /= W;
    for (int i = 0; i < W; i++) v += (cnt[i] - m) * (cnt[i] - m);
    v /= W;
    CHECKF(fabs(m - 10) < 0.2 && fabs(v / m - 1) < 0.06, "window counts mean %g var %g", m, v);
    free(cnt);
    /* same seed, same arrivals */
    double a[100], b[100];
    bench_arrivals(3.0, 1.0, 100, 9, a);
    bench_arrivals(3.0, 1.0, 100, 9, b);
    CHECK(!memcmp(a, b, sizeof a));
    free(t);
}

/* ---- energy ------------------------------------------------------------------------- */

static void test_energy_parse(void) {
    const char *before = "# HELP pdserve_gpu_energy_joules energy\n"
                         "# TYPE pdserve_gpu_energy_joules counter\n"
                         "pdserve_gpu_energy_joules{gpu=\"0\",role=\"prefill\"} 1000.5\n"
                         "pdserve_gpu_energy_joules{gpu=\"1\",role=\"decode\"} 2000\n"
                         "pdserve_requests_total 5\n"
                         "pdserve_cpu_energy_joules 10 1700000000000\n";
    const char *after = "pdserve_gpu_energy_joules{gpu=\"0\",role=\"prefill\"} 1100.5\n"
                        "pdserve_gpu_energy_joules{role=\"decode\",gpu=\"1\"} 2300\n"
                        "pdserve_gpu_energy_joules{gpu=\"1\",role=\"decode\"} 2250\n"
                        "pdserve_cpu_energy_joules 15\n";
    bench_energy e = {0};
    CHECK_EQ_INT(bench_energy_parse(&e, before, strlen(before), "", false), 3);
    CHECK_EQ_INT(bench_energy_parse(&e, after, strlen(after), "", true), 4);
    /* the series with reordered labels was never read before: not counted */
    CHECK(fabs(bench_energy_joules(&e, NULL) - (100 + 250 + 5)) < 1e-9);
    CHECK(fabs(bench_energy_joules(&e, "prefill") - 100) < 1e-9);
    CHECK(fabs(bench_energy_joules(&e, "decode") - 250) < 1e-9);
    CHECK(bench_energy_joules(&e, "router") == -1);
    bench_energy none = {0};
    const char *plain = "pdserve_requests_total 5\n";
    CHECK_EQ_INT(bench_energy_parse(&none, plain, strlen(plain), "", false), 0);
    CHECK(bench_energy_joules(&none, NULL) == -1);  /* "not measured", never 0 */
}

/* ---- datasets --------------------------------------------------------------------------- */

static void test_dataset_random(void) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.num_prompts = 50;
    o.random_input_len = 100;
    o.random_output_len = 20;
    o.random_range_ratio = 0.5;
    o.random_vocab_size = 1000;
    bench_dataset d;
    char err[512];
    REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
    CHECK_EQ_INT(d.n, 50);
    bool varied = false;
    for (int i = 0; i < d.n; i++) {
        const bench_request *q = &d.reqs[i];
        CHECK(q->prompt == NULL && q->prompt_ids != NULL);
        CHECK(q->prompt_len >= 50 && q->prompt_len <= 150);
        CHECK(q->output_len >= 10 && q->output_len <= 30);
        for (int k = 0; k < q->prompt_len; k++) CHECK(q->prompt_ids[k] >= 0 && q->prompt_ids[k] < 1000);
        varied |= q->prompt_len != d.reqs[0].prompt_len;
    }
    CHECK(varied);
    bench_dataset_free(&d);
    /* token-exact text through a tokenizer whose re-encoding merges tokens */
    o.random_range_ratio = 0;
    o.num_prompts = 20;
    o.random_input_len = 300;
    REQUIRE(bench_dataset_load(&o, &TOY, &d, err, sizeof err) == 0);
    for (int i = 0; i < d.n; i++) {
        CHECK(d.reqs[i].prompt != NULL);
        CHECK_EQ_INT(d.reqs[i].prompt_len, 300);
        CHECK_EQ_INT(toy_count(d.reqs[i].prompt), 300);
    }
    bench_dataset_free(&d);
    int merged = 0;
    for (int target = 1; target <= 200; target += 7) {
        int32_t ids[200];
        for (int k = 0; k < target; k++) ids[k] = 'a' + (k / 2) % 3;  /* "aabbcc..." merges a lot */
        int got;
        char *t = bench_prompt_from_ids(&TOY, ids, target, target, 1, &got);
        CHECK_EQ_INT(got, target);
        CHECK_EQ_INT(toy_count(t), target);
        merged += strlen(t) > (size_t)target;
        free(t);
    }
    CHECK(merged > 0);
    o.random_input_len = 0;
    CHECK(bench_dataset_load(&o, NULL, &d, err, sizeof err) == -1);
}

static void test_dataset_prefix_repetition(void) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.kind = BENCH_DATASET_PREFIX_REPETITION;
    o.num_prompts = 40;
    o.prefix_len = 64;
    o.suffix_len = 16;
    o.num_prefixes = 4;
    o.prefix_output_len = 9;
    bench_dataset d;
    char err[512];
    REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
    CHECK_EQ_INT(d.n, 40);
    int groups = 0, size[40] = {0}, rep[40];
    for (int i = 0; i < d.n; i++) {
        CHECK_EQ_INT(d.reqs[i].prompt_len, 80);
        CHECK_EQ_INT(d.reqs[i].output_len, 9);
        int g;
        for (g = 0; g < groups; g++)
            if (!memcmp(d.reqs[rep[g]].prompt_ids, d.reqs[i].prompt_ids, 64 * sizeof(int32_t))) break;
        if (g == groups) rep[groups++] = i;
        size[g]++;
        /* suffixes differ within a group */
        if (g < groups && rep[g] != i)
            CHECK(memcmp(d.reqs[rep[g]].prompt_ids + 64, d.reqs[i].prompt_ids + 64, 16 * sizeof(int32_t)) != 0);
    }
    CHECK_EQ_INT(groups, 4);
    for (int g = 0; g < groups; g++) CHECK_EQ_INT(size[g], 10);
    bool shuffled = false;
    for (int i = 1; i < d.n; i++)
        shuffled |= memcmp(d.reqs[i].prompt_ids, d.reqs[i - 1].prompt_ids, 64 * sizeof(int32_t)) != 0;
    CHECK(shuffled);
    bench_dataset_free(&d);
    /* with a tokenizer: byte-identical prefix text */
    REQUIRE(bench_dataset_load(&o, &TOY, &d, err, sizeof err) == 0);
    int same = 0;
    for (int i = 1; i < d.n; i++) {
        size_t k = 0;
        while (d.reqs[0].prompt[k] && d.reqs[0].prompt[k] == d.reqs[i].prompt[k]) k++;
        same += k >= 64;  /* at least the 64-token prefix (>= 64 bytes) is shared */
    }
    CHECK_EQ_INT(same, 9);
    bench_dataset_free(&d);
}

static void test_dataset_sharegpt(void) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.kind = BENCH_DATASET_SHAREGPT;
    o.path = fixture("sharegpt_sample.json");
    bench_dataset d;
    char err[512];
    REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
    CHECK_EQ_INT(d.n, 5);
    CHECK(d.lengths_estimated);
    bool found_a4 = false, found_quote = false;
    for (int i = 0; i < d.n; i++) {
        CHECK(d.reqs[i].prompt_len == -1 && d.reqs[i].output_len >= 4);
        found_a4 |= !strcmp(d.reqs[i].prompt, "List three prime numbers larger than one hundred.");
        found_quote |= strstr(d.reqs[i].prompt, "\"good morning\"") != NULL;
        if (!strcmp(d.reqs[i].prompt, "List three prime numbers larger than one hundred."))
            CHECK_EQ_INT(d.reqs[i].output_len, (63 + 3) / 4);
    }
    CHECK(found_a4 && found_quote);
    bench_dataset_free(&d);
    o.num_prompts = 2;
    o.sharegpt_output_len = 33;
    REQUIRE(bench_dataset_load(&o, &TOY, &d, err, sizeof err) == 0);
    CHECK_EQ_INT(d.n, 2);
    for (int i = 0; i < d.n; i++) {
        CHECK_EQ_INT(d.reqs[i].output_len, 33);
        CHECK_EQ_INT(d.reqs[i].prompt_len, toy_count(d.reqs[i].prompt));
    }
    bench_dataset_free(&d);
}

/* Warm-up requests: the measured requests' shape, prompts of their own (synthetic: another
 * seed; a file: the rows after the measured ones), so no cache answers a measured request
 * from the warm-up's work. */
static void test_dataset_warmups(void) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.num_prompts = 4;
    o.random_input_len = 300;
    o.random_output_len = 20;
    o.random_range_ratio = 0;
    bench_dataset d, w;
    char err[512];
    REQUIRE(bench_dataset_load(&o, &TOY, &d, err, sizeof err) == 0);
    REQUIRE(bench_dataset_load_warmups(&o, &TOY, 2, &w, err, sizeof err) == 0);
    CHECK_EQ_INT(w.n, 2);
    for (int i = 0; i < w.n; i++) {
        CHECK_EQ_INT(w.reqs[i].prompt_len, 300); /* the same shape: a context limit holds for both */
        CHECK_EQ_INT(toy_count(w.reqs[i].prompt), 300);
        CHECK_EQ_INT(w.reqs[i].output_len, 20);
        for (int k = 0; k < d.n; k++) /* differing from the first characters on */
            CHECKF(strncmp(w.reqs[i].prompt, d.reqs[k].prompt, 16) != 0, "warm-up %d starts as request %d", i, k);
    }
    bench_dataset_free(&w);
    bench_dataset_free(&d);
    /* a file: the rows after the measured ones, or none */
    o.kind = BENCH_DATASET_SHAREGPT;
    o.path = fixture("sharegpt_sample.json");
    o.num_prompts = 3;
    REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
    REQUIRE(bench_dataset_load_warmups(&o, NULL, 2, &w, err, sizeof err) == 0);
    CHECK_EQ_INT(d.n, 3);
    CHECK_EQ_INT(w.n, 2); /* the fixture's rows 4 and 5 */
    for (int i = 0; i < w.n; i++)
        for (int k = 0; k < d.n; k++) CHECK(strcmp(w.reqs[i].prompt, d.reqs[k].prompt) != 0);
    bench_dataset_free(&w);
    bench_dataset_free(&d);
    o.num_prompts = 5;
    CHECK(bench_dataset_load_warmups(&o, NULL, 2, &w, err, sizeof err) == -1);
    CHECK(strstr(err, "no rows beyond") != NULL);
}

static void test_dataset_azure(void) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.kind = BENCH_DATASET_AZURE;
    o.path = fixture("azure_sample.csv");
    o.trace_time_scale = 0.5;
    bench_dataset d;
    char err[512];
    REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
    CHECK_EQ_INT(d.n, 10);
    CHECK(d.has_timestamps);
    static const int in[] = {374, 396, 879, 91, 1411, 212, 2005, 48, 650, 128};
    static const int out[] = {44, 109, 52, 35, 4, 1, 170, 27, 12, 64};
    for (int i = 0; i < 10; i++) {
        CHECK_EQ_INT(d.reqs[i].prompt_len, in[i]);
        CHECK_EQ_INT(d.reqs[i].output_len, out[i]);
    }
    CHECK(d.reqs[0].arrival_s == 0);
    CHECKF(fabs(d.reqs[1].arrival_s - (50.9951690 - 46.6805900) * 0.5) < 1e-6, "%g", d.reqs[1].arrival_s);
    CHECKF(fabs(d.reqs[9].arrival_s - 5.0) < 1e-6, "%g", d.reqs[9].arrival_s);
    bench_dataset_free(&d);
    o.num_prompts = 3;
    REQUIRE(bench_dataset_load(&o, &TOY, &d, err, sizeof err) == 0);
    CHECK_EQ_INT(d.n, 3);
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(toy_count(d.reqs[i].prompt), in[i]);
    bench_dataset_free(&d);
}

static void test_dataset_mooncake(void) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.kind = BENCH_DATASET_MOONCAKE;
    o.path = fixture("mooncake_sample.jsonl");
    bench_dataset d;
    char err[512];
    REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
    CHECK_EQ_INT(d.n, 6);
    static const int in[] = {1200, 1100, 700, 1536, 300, 600};
    static const double ts[] = {0, 0.5, 1.2, 2.0, 2.5, 4.0};
    for (int i = 0; i < 6; i++) {
        CHECK_EQ_INT(d.reqs[i].prompt_len, in[i]);
        CHECK(fabs(d.reqs[i].arrival_s - ts[i]) < 1e-9);
    }
    const size_t B = BENCH_MOONCAKE_BLOCK * sizeof(int32_t);
    int32_t **p = (int32_t **)xmalloc(sizeof(int32_t *) * 6);
    for (int i = 0; i < 6; i++) p[i] = d.reqs[i].prompt_ids;
    /* rows 0, 1, 3 share hash ids 0 and 1: the first 1024 tokens are equal */
    CHECK(!memcmp(p[0], p[1], 2 * B) && !memcmp(p[0], p[3], 2 * B));
    CHECK(memcmp(p[0] + 1024, p[1] + 1024, 50 * sizeof(int32_t)) != 0);  /* blocks 2 vs 3 differ */
    CHECK(!memcmp(p[4], p[2], 300 * sizeof(int32_t)));                   /* partial block 4 */
    CHECK(memcmp(p[0], p[2], 64 * sizeof(int32_t)) != 0);
    CHECK(memcmp(p[5], p[0], 64 * sizeof(int32_t)) != 0);
    free(p);
    bench_dataset_free(&d);
    /* with a tokenizer: exact lengths, and the shared blocks are shared text */
    REQUIRE(bench_dataset_load(&o, &TOY, &d, err, sizeof err) == 0);
    for (int i = 0; i < 6; i++) CHECK(abs(d.reqs[i].prompt_len - in[i]) <= 2);
    size_t k = 0;
    while (d.reqs[0].prompt[k] && d.reqs[0].prompt[k] == d.reqs[1].prompt[k]) k++;
    CHECKF(toy_count(d.reqs[0].prompt) > 0 && k >= 1024, "shared text prefix %zu bytes", k);
    bench_dataset_free(&d);
    o.trace_time_scale = 2;
    o.num_prompts = 2;
    REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
    CHECK(d.n == 2 && fabs(d.reqs[1].arrival_s - 1.0) < 1e-9);
    bench_dataset_free(&d);
}

static void test_dataset_custom(void) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.kind = BENCH_DATASET_CUSTOM;
    o.path = fixture("custom_sample.jsonl");
    o.custom_output_len = 77;
    bench_dataset d;
    char err[512];
    REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
    CHECK_EQ_INT(d.n, 5);
    static const int out[] = {64, 77, 100, 77, 32};
    for (int i = 0; i < 5; i++) {
        CHECK_EQ_INT(d.reqs[i].output_len, out[i]);
        CHECK_EQ_INT(d.reqs[i].prompt_len, -1);
    }
    CHECK(!strcmp(d.reqs[1].prompt, "What is 2+2?"));
    bench_dataset_free(&d);
    REQUIRE(bench_dataset_load(&o, &TOY, &d, err, sizeof err) == 0);
    CHECK_EQ_INT(d.reqs[1].prompt_len, toy_count("What is 2+2?"));
    bench_dataset_free(&d);
}

static void expect_reject(bench_dataset_kind kind, const char *file, int line) {
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.kind = kind;
    o.path = fixture(file);
    bench_dataset d;
    char err[512] = "", want[1100];
    CHECKF(bench_dataset_load(&o, NULL, &d, err, sizeof err) == -1, "%s was accepted", file);
    snprintf(want, sizeof want, "%s:%d: ", o.path, line);
    CHECK_STR_CONTAINS(err, want);
}

static void test_dataset_broken(void) {
    expect_reject(BENCH_DATASET_AZURE, "azure_wrong_columns.csv", 1);
    expect_reject(BENCH_DATASET_AZURE, "azure_negative.csv", 4);
    expect_reject(BENCH_DATASET_AZURE, "azure_missing_column.csv", 3);
    expect_reject(BENCH_DATASET_AZURE, "azure_bad_timestamp.csv", 3);
    expect_reject(BENCH_DATASET_MOONCAKE, "mooncake_bad_json.jsonl", 3);
    expect_reject(BENCH_DATASET_MOONCAKE, "mooncake_negative.jsonl", 2);
    expect_reject(BENCH_DATASET_MOONCAKE, "mooncake_missing_field.jsonl", 3);
    expect_reject(BENCH_DATASET_SHAREGPT, "sharegpt_bad_json.json", 7);
    expect_reject(BENCH_DATASET_SHAREGPT, "sharegpt_no_conversations.json", 5);
    expect_reject(BENCH_DATASET_CUSTOM, "custom_bad_json.jsonl", 2);
    expect_reject(BENCH_DATASET_CUSTOM, "custom_negative.jsonl", 3);
    /* a file that is not there, and one of another format */
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.kind = BENCH_DATASET_AZURE;
    o.path = fixture("no_such_file.csv");
    bench_dataset d;
    char err[512];
    CHECK(bench_dataset_load(&o, NULL, &d, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "no_such_file.csv");
    o.path = fixture("mooncake_sample.jsonl");
    CHECK(bench_dataset_load(&o, NULL, &d, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, ":1: expected the columns");
    o.kind = BENCH_DATASET_SHAREGPT;
    CHECK(bench_dataset_load(&o, NULL, &d, err, sizeof err) == -1);
    o.kind = BENCH_DATASET_CUSTOM;
    o.path = fixture("azure_sample.csv");
    CHECK(bench_dataset_load(&o, NULL, &d, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, ":1: bad JSON");
    CHECK(bench_dataset_kind_parse("mooncake") == BENCH_DATASET_MOONCAKE);
    CHECK(bench_dataset_kind_parse("nope") == -1);
}

/* Token-exact prompts through real Hugging Face tokenizers (byte-level BPE and
 * SentencePiece BPE), when scripts/fetch-test-tokenizers.sh has put them in
 * tests/.cache; the case passes with a note when they are absent. */
static void test_real_tokenizers_exact(void) {
    static const char *const NAMES[] = {"llama3", "llama2", "qwen3"};
    int tried = 0;
    for (size_t k = 0; k < PD_ARRAY_LEN(NAMES); k++) {
        char dir[1024], json[1100], err[512];
        snprintf(dir, sizeof dir, "%s/tests/.cache/tokenizers/%s", test_source_dir(), NAMES[k]);
        snprintf(json, sizeof json, "%s/tokenizer.json", dir);
        if (!util_file_exists(json)) continue;
        tokenizer *t = NULL;
        if (tokenizer_load(dir, &t, err, sizeof err) != 0) {
            CHECKF(0, "%s: %s", NAMES[k], err);
            continue;
        }
        tried++;
        bench_tokenizer bt;
        bench_tokenizer_wrap(&bt, t);
        bench_dataset_opts o;
        bench_dataset_opts_default(&o);
        o.num_prompts = 8;
        o.random_input_len = 256;
        o.random_range_ratio = 0.5;
        bench_dataset d;
        REQUIRE(bench_dataset_load(&o, &bt, &d, err, sizeof err) == 0);
        int exact = 0;
        for (int i = 0; i < d.n; i++) {
            int32_t *ids;
            int n;
            REQUIRE(tokenizer_encode(t, d.reqs[i].prompt, strlen(d.reqs[i].prompt), false, &ids, &n, err, sizeof err) == 0);
            CHECKF(n == d.reqs[i].prompt_len, "%s: prompt %d encodes to %d, recorded %d", NAMES[k], i, n,
                   d.reqs[i].prompt_len);
            CHECK(d.reqs[i].prompt_len >= 128 && d.reqs[i].prompt_len <= 384);
            exact += n == d.reqs[i].prompt_len;
            free(ids);
        }
        fprintf(stderr, "  %s: %d/%d random prompts token-exact\n", NAMES[k], exact, d.n);
        bench_dataset_free(&d);
        tokenizer_free(t);
    }
    if (!tried) fprintf(stderr, "  note: no tokenizers in tests/.cache (scripts/fetch-test-tokenizers.sh)\n");
}

/* ---- mooncake-synthetic ---------------------------------------------------------------- */

static void mooncake_synth_opts(bench_dataset_opts *o, int n, double r) {
    bench_dataset_opts_default(o);
    o->kind = BENCH_DATASET_MOONCAKE_SYNTHETIC;
    o->num_prompts = n;
    o->mooncake_block_size = 16;
    o->mooncake_input_len = 256;
    o->mooncake_output_len = 32;
    o->mooncake_max_input_len = 1024;
    o->mooncake_len_sigma = 0.5;
    o->mooncake_reuse_ratio = r;
    o->seed = 7;
}

/* Leading hash ids two requests share. */
static int shared_blocks(const bench_request *a, const bench_request *b) {
    int k = 0;
    while (k < a->n_hash_ids && k < b->n_hash_ids && a->hash_ids[k] == b->hash_ids[k]) k++;
    return k;
}

/* The measured reuse ratio is the target within 0.03 (2,000 requests), for 0, 0.5 and
 * 0.9; the dataset's own figure agrees with one recomputed from its hash ids. */
static void test_mooncake_synthetic_ratio(void) {
    static const double R[] = {0, 0.5, 0.9};
    char err[512];
    for (size_t k = 0; k < PD_ARRAY_LEN(R); k++) {
        bench_dataset_opts o;
        mooncake_synth_opts(&o, 2000, R[k]);
        bench_dataset d;
        REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
        CHECK_EQ_INT(d.n, 2000);
        CHECKF(fabs(d.reuse_ratio - R[k]) <= 0.03, "target %.2f, measured %.4f", R[k], d.reuse_ratio);
        CHECKF(fabs(bench_dataset_reuse_ratio(&d, 16) - d.reuse_ratio) < 1e-12, "recomputed %.4f",
               bench_dataset_reuse_ratio(&d, 16));
        fprintf(stderr, "  reuse ratio target %.2f: measured %.4f\n", R[k], d.reuse_ratio);
        long long in = 0, out = 0;
        int continued = 0;
        for (int i = 0; i < d.n; i++) {
            const bench_request *q = &d.reqs[i];
            CHECK(q->prompt_len >= 1 && q->prompt_len <= 1024 && q->output_len >= 1 && q->output_len <= 256);
            CHECK_EQ_INT(q->n_hash_ids, (q->prompt_len + 15) / 16);
            in += q->prompt_len;
            out += q->output_len;
            for (int j = i - 1; j >= 0 && j >= i - 50; j--)
                if (shared_blocks(q, &d.reqs[j]) > 0) {
                    continued++;
                    break;
                }
        }
        CHECKF(fabs((double)in / d.n - 256) < 20 && fabs((double)out / d.n - 32) < 4, "means %.1f %.1f",
               (double)in / d.n, (double)out / d.n);
        if (R[k] == 0) CHECK_EQ_INT(continued, 0);
        else CHECK(continued > d.n / 2);  /* most continue one of their 50 predecessors */
        bench_dataset_free(&d);
    }
    bench_dataset_opts o;
    mooncake_synth_opts(&o, 10, 1.0);
    bench_dataset d;
    CHECK(bench_dataset_load(&o, NULL, &d, err, sizeof err) == -1);
    mooncake_synth_opts(&o, 10, 0.5);
    o.mooncake_block_size = 0;
    CHECK(bench_dataset_load(&o, NULL, &d, err, sizeof err) == -1);
    CHECK(bench_dataset_kind_parse("mooncake-synthetic") == BENCH_DATASET_MOONCAKE_SYNTHETIC);
}

/* Equal leading hash ids give equal leading token ids, different ids different ones;
 * the same seed gives the same dataset, another seed another. */
static void test_mooncake_synthetic_blocks(void) {
    bench_dataset_opts o;
    mooncake_synth_opts(&o, 300, 0.7);
    bench_dataset d, e;
    char err[512];
    REQUIRE(bench_dataset_load(&o, NULL, &d, err, sizeof err) == 0);
    int pairs = 0;
    for (int i = 1; i < d.n; i++)
        for (int j = PD_MAX(0, i - 20); j < i; j++) {
            const bench_request *a = &d.reqs[i], *b = &d.reqs[j];
            int k = shared_blocks(a, b), full = PD_MIN(a->prompt_len, b->prompt_len) / 16;
            if (k > full) k = full;
            pairs += k > 0;
            CHECK(!memcmp(a->prompt_ids, b->prompt_ids, sizeof(int32_t) * 16 * (size_t)k));
            if (k < full) CHECK(memcmp(a->prompt_ids + 16 * k, b->prompt_ids + 16 * k, sizeof(int32_t) * 16) != 0);
        }
    CHECK(pairs > 100);
    REQUIRE(bench_dataset_load(&o, NULL, &e, err, sizeof err) == 0);
    REQUIRE(e.n == d.n);
    bool same = true;
    for (int i = 0; i < d.n && same; i++)
        same = d.reqs[i].prompt_len == e.reqs[i].prompt_len && d.reqs[i].output_len == e.reqs[i].output_len &&
               d.reqs[i].n_hash_ids == e.reqs[i].n_hash_ids &&
               !memcmp(d.reqs[i].hash_ids, e.reqs[i].hash_ids, sizeof(long long) * (size_t)d.reqs[i].n_hash_ids) &&
               !memcmp(d.reqs[i].prompt_ids, e.reqs[i].prompt_ids, sizeof(int32_t) * (size_t)d.reqs[i].prompt_len);
    CHECK(same);
    bench_dataset_free(&e);
    o.seed = 8;
    REQUIRE(bench_dataset_load(&o, NULL, &e, err, sizeof err) == 0);
    int differ = 0;
    for (int i = 0; i < PD_MIN(d.n, e.n); i++) differ += d.reqs[i].prompt_len != e.reqs[i].prompt_len;
    CHECK(differ > d.n / 2);
    bench_dataset_free(&e);
    bench_dataset_free(&d);
}

/* Common leading tokens of two texts through tokenizer t (-1: t failed). */
static int common_tokens(const tokenizer *t, const char *a, const char *b) {
    int32_t *x = NULL, *y = NULL;
    int nx = 0, ny = 0, k = 0;
    char err[256];
    if (tokenizer_encode(t, a, strlen(a), false, &x, &nx, err, sizeof err) != 0 ||
        tokenizer_encode(t, b, strlen(b), false, &y, &ny, err, sizeof err) != 0)
        k = -1;
    while (k >= 0 && k < nx && k < ny && x[k] == y[k]) k++;
    free(x);
    free(y);
    return k;
}

/* Through the real tokenizers: prompts that share k leading hash ids share the tokens
 * of those k blocks' text (the blocks alone, encoded), block boundaries included. */
static void test_mooncake_synthetic_real_tokens(void) {
    static const char *const NAMES[] = {"llama3", "llama2", "qwen3"};
    int tried = 0;
    for (size_t m = 0; m < PD_ARRAY_LEN(NAMES); m++) {
        char dir[1024], json[1100], err[512];
        snprintf(dir, sizeof dir, "%s/tests/.cache/tokenizers/%s", test_source_dir(), NAMES[m]);
        snprintf(json, sizeof json, "%s/tokenizer.json", dir);
        if (!util_file_exists(json)) continue;
        tokenizer *t = NULL;
        REQUIRE(tokenizer_load(dir, &t, err, sizeof err) == 0);
        tried++;
        bench_tokenizer bt;
        bench_tokenizer_wrap(&bt, t);
        bench_dataset_opts o;
        mooncake_synth_opts(&o, 40, 0.8);
        o.mooncake_block_size = 32;
        o.mooncake_input_len = 192;
        bench_dataset d;
        REQUIRE(bench_dataset_load(&o, &bt, &d, err, sizeof err) == 0);
        bench_vocab v;
        bench_vocab_init(&v, &bt, 1);
        bench_block_map map = {0};
        pd_rng r;
        rng_seed(&r, 1);
        int pairs = 0, exact = 0, worst = 0, drift = 0;
        for (int i = 1; i < d.n; i++)
            for (int j = 0; j < i; j++) {
                int k = shared_blocks(&d.reqs[i], &d.reqs[j]);
                int full = PD_MIN(d.reqs[i].prompt_len, d.reqs[j].prompt_len) / 32;
                if (k == 0 || k > full) continue;
                bench_request q = {0};  /* the k shared blocks alone */
                bench_blocks_prompt(&o, &bt, &v, &map, &r, d.reqs[i].hash_ids, k, 32, 32 * k, &q);
                int c = common_tokens(t, d.reqs[i].prompt, d.reqs[j].prompt);
                int in_i = common_tokens(t, d.reqs[i].prompt, q.prompt);
                pairs++;
                exact += c >= q.prompt_len && in_i == q.prompt_len;
                worst = PD_MAX(worst, q.prompt_len - PD_MIN(c, in_i));
                drift = PD_MAX(drift, abs(q.prompt_len - 32 * k));
                free(q.prompt);
            }
        fprintf(stderr, "  %s: %d/%d pairs share all their common blocks' tokens (worst short by %d, "
                        "blocks off by %d tokens in context)\n", NAMES[m], exact, pairs, worst, drift);
        CHECK(pairs > 10);
        CHECKF(exact == pairs, "%s: %d of %d pairs", NAMES[m], exact, pairs);
        CHECKF(drift <= 1, "%s: blocks %d tokens off", NAMES[m], drift);  /* 1: a prompt's start (Llama 2) */
        bench_block_map_free(&map);
        bench_vocab_free(&v);
        bench_dataset_free(&d);
        tokenizer_free(t);
    }
    if (!tried) fprintf(stderr, "  note: no tokenizers in tests/.cache (scripts/fetch-test-tokenizers.sh)\n");
}

int main(void) {
    TEST_RUN(test_sse_whole_and_split);
    TEST_RUN(test_sse_limits);
    TEST_RUN(test_event_scan);
    TEST_RUN(test_metrics_hand_computed);
    TEST_RUN(test_arrivals);
    TEST_RUN(test_energy_parse);
    TEST_RUN(test_dataset_random);
    TEST_RUN(test_dataset_prefix_repetition);
    TEST_RUN(test_dataset_sharegpt);
    TEST_RUN(test_dataset_warmups);
    TEST_RUN(test_dataset_azure);
    TEST_RUN(test_dataset_mooncake);
    TEST_RUN(test_dataset_custom);
    TEST_RUN(test_dataset_broken);
    TEST_RUN(test_real_tokenizers_exact);
    TEST_RUN(test_mooncake_synthetic_ratio);
    TEST_RUN(test_mooncake_synthetic_blocks);
    TEST_RUN(test_mooncake_synthetic_real_tokens);
    return TEST_END();
}
