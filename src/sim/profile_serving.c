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
 * `repeats` requests each, a least-squares line through them.
 *
 * Tuned for: a few dozen requests, well under a minute on two CPU cores; nothing here
 * is on a hot path. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kv/kv.h"
#include "model/tokenizer.h"
#include "server/server.h"
#include "sim/sim.h"
#include "util/util.h"

#define SERVE_MAX_LENGTHS 4
#define SERVE_MAX_REPEATS 16

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median_of(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_dbl);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

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

/* A prompt of about n tokens of tok: words, as many as n tokens need at the rate a
 * 256-word sample tokenizes to (a small vocabulary splits words). */
static char *prompt_text(const tokenizer *tok, int n) {
    char *sample = words_text(256), e[128];
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

/* One deployment under measurement: requests go to `port`; the prefilling engine is
 * `pe`; `medium` (disaggregated) prices the transfer that is not serving path. */
typedef struct serve_target {
    int port;
    engine *pe;
    const sim_medium *medium;
    size_t kv_bytes_per_token;
    int max_tokens;
    const tokenizer *tok;
} serve_target;

/* Fills path's points: per length, the median over repeats of TTFT - the engine's busy
 * seconds - the transfer; then the fitted line. One untimed request first (the
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
    for (int li = 0; li < n_lens; li++) {
        char *text = prompt_text(t->tok, lens[li]);
        double v[SERVE_MAX_REPEATS];
        int n_tok = lens[li];
        for (int r = 0; r < repeats; r++) {
            double b0 = busy_s(t->pe);
            if (stream_once(t->port, text, t->max_tokens, &ttft, &pt, err, errlen)) {
                free(text);
                return -1;
            }
            double engine_s = busy_s(t->pe) - b0;
            if (pt > 0) n_tok = pt;
            double transfer = t->medium ? sim_cost_transfer(t->medium, (double)n_tok * (double)t->kv_bytes_per_token) : 0;
            v[r] = ttft - engine_s - transfer;
            log_debug("profile: serving, port %d, %d tokens: ttft %.3f ms, engine busy %.3f ms, transfer %.3f ms",
                      t->port, n_tok, ttft * 1e3, engine_s * 1e3, transfer * 1e3);
        }
        free(text);
        path->tokens[path->n_points] = n_tok;
        path->seconds[path->n_points++] = PD_MAX(median_of(v, repeats), 0);
    }
    sim_serving_fit(path);
    return 0;
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

/* colocated and router: one instance, first directly, then behind a router */
static int measure_colocated(model *m, const tokenizer *tok, const int *lens, int n_lens, int repeats, int bs,
                             sim_serving *out, char *err, size_t errlen) {
    engine_config ec;
    instance_config(m, lens[n_lens - 1], bs, &ec);
    engine *e = engine_create(m, &ec, err, errlen);
    if (!e) return -1;
    engine_start(e);
    server *s = start_server(e, tok, SERVER_ROLE_COLOCATED, NULL, err, errlen);
    int rc = -1;
    router *rt = NULL;
    if (!s) goto out;
    serve_target t = {.port = server_port(s), .pe = e, .max_tokens = 1, .tok = tok};
    if (measure_path(&t, lens, n_lens, repeats, &out->colocated, err, errlen)) goto out;
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
    /* the router's hop: what the same requests took beyond the direct path */
    sim_serving_path *hop = &out->router;
    memset(hop, 0, sizeof *hop);
    for (int i = 0; i < through.n_points; i++) {
        hop->tokens[i] = through.tokens[i];
        hop->seconds[i] = PD_MAX(through.seconds[i] - out->colocated.seconds[i], 0);
    }
    hop->n_points = through.n_points;
    sim_serving_fit(hop);
    rc = 0;
out:
    if (rt) router_shutdown(rt, 5);
    router_free(rt);
    stop_server(s, e);
    engine_free(e);
    return rc;
}

/* disaggregated: a prefill and a decode instance over the cpu medium, behind a router */
static int measure_disaggregated(model *m, const tokenizer *tok, const int *lens, int n_lens, int repeats, int bs,
                                 const sim_medium *cpu, sim_serving *out, char *err, size_t errlen) {
    engine_config ec;
    instance_config(m, lens[n_lens - 1], bs, &ec);
    engine *pe = engine_create(m, &ec, err, errlen), *de = pe ? engine_create(m, &ec, err, errlen) : NULL;
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
    serve_target t = {.port = router_port(rt), .pe = pe, .medium = cpu,
                      .kv_bytes_per_token = model_kv_bytes_per_token(&m->cfg, dtype_size(m->be->ops->kv_type)),
                      .max_tokens = 2, .tok = tok};
    if (measure_path(&t, lens, n_lens, repeats, &out->disaggregated, err, errlen)) goto out;
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
    return rc;
}

int sim_profile_serving(model *m, const tokenizer *tok, int max_len, int repeats, sim_profile *out, char *err,
                        size_t errlen) {
    static const int all[SERVE_MAX_LENGTHS] = {64, 512, 2048, 4096};
    int lens[SERVE_MAX_LENGTHS], n_lens = 0;
    for (int i = 0; i < SERVE_MAX_LENGTHS; i++)
        if (all[i] <= max_len || i == 0) lens[n_lens++] = all[i];
    repeats = PD_MIN(PD_MAX(repeats, 3), SERVE_MAX_REPEATS);
    int bs = out->block_size > 0 ? out->block_size : 16;
    /* the transfer inside a disaggregated request's time: the profile's cpu medium, else
     * its documented default (then said in the source) */
    sim_medium mstore;
    const sim_medium *cpu = sim_medium_find(out, "cpu", &mstore);
    bool cpu_measured = cpu && !strncmp(cpu->source, "measured", 8);
    double t0 = time_now_s();
    sim_serving sv;
    memset(&sv, 0, sizeof sv);
    if (measure_colocated(m, tok, lens, n_lens, repeats, bs, &sv, err, errlen) ||
        measure_disaggregated(m, tok, lens, n_lens, repeats, bs, cpu, &sv, err, errlen))
        return -1;
    snprintf(sv.source, sizeof sv.source,
             "measured: pdserve profile --serving, in-process server, router and cpu-medium connector on %s, "
             "%d prompt lengths up to %d tokens, median of %d requests each, one at a time; transfer priced by "
             "the %s cpu medium", m->be->ops->name, n_lens, lens[n_lens - 1], repeats,
             cpu_measured ? "measured" : "default");
    out->serving = sv;
    const struct { const char *name; const sim_serving_path *p; } paths[] = {
        {"colocated", &sv.colocated}, {"router hop", &sv.router}, {"disaggregated", &sv.disaggregated}};
    for (size_t i = 0; i < PD_ARRAY_LEN(paths); i++) {
        const sim_serving_path *p = paths[i].p;
        char pts[256] = "";
        size_t n = 0;
        for (int k = 0; k < p->n_points && n < sizeof pts; k++)
            n += (size_t)snprintf(pts + n, sizeof pts - n, "%s%.0f tok %.3f ms", k ? ", " : "", p->tokens[k],
                                  p->seconds[k] * 1e3);
        log_info("profile: serving path, %s: %.3f ms + %.3f us/token (%s)", paths[i].name, p->fixed_s * 1e3,
                 p->s_per_token * 1e6, pts);
    }
    log_info("profile: serving path measured in %.1f s", time_now_s() - t0);
    return 0;
}
