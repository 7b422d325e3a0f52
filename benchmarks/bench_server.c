/* bench_server.c: what the HTTP server costs per streamed token. The same 64
 * requests (random prompts, ignore_eos, fixed output length) run twice on one engine:
 *   bare:   engine_submit straight from this program, events counted and dropped;
 *   server: through `server_start` on a loopback port, 64 client threads each streaming
 *           one /v1/completions (SSE) over a raw socket and reading every byte.
 * Figures: engine step wall time in each (the server's threads share the CPU with
 * the engine, so any slowdown of the step is overhead a user sees), and the CPU the
 * HTTP worker threads spend per token (their on-CPU nanoseconds from
 * /proc/self/task/TID/schedstat; MHD names them "MHD-worker"), against the bare step
 * time. Target: HTTP CPU per step (one token for each of 64 streams) < 5% of the bare
 * step time. (The engine thread's share of the server's work, queueing the event and
 * resuming the connection, shows in the step wall time.)
 *
 * usage: bench_server [--model preset:small-llama] [--tokenizer DIR] [--streams 64]
 *                     [--max-tokens 128] [--prompt-len 32] [--threads N] [--reps 2] */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/engine.h"
#include "model/tokenizer.h"
#include "server/server.h"
#include "util/util.h"

typedef struct bench_cfg {
    const char *model, *tokenizer, *load_format;
    int streams, max_tokens, prompt_len, threads, reps;
} bench_cfg;

static double cpu_seconds(int who) {
    struct rusage ru;
    getrusage(who, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

/* ---- bare engine ---------------------------------------------------------------- */
typedef struct bare_state {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    atomic_long tokens;
} bare_state;

static void bare_event(void *user, const engine_event *ev) {
    bare_state *b = user;
    if (ev->kind == ENGINE_EVENT_TOKEN) {
        atomic_fetch_add(&b->tokens, 1);
        return;
    }
    pthread_mutex_lock(&b->mu);
    b->done++;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

typedef struct run_result {
    double wall, cpu, client_cpu, http_cpu;
    uint64_t steps, tokens;
    double busy;
} run_result;

static run_result run_bare(engine *e, int32_t **prompts, const bench_cfg *c) {
    bare_state b = {.done = 0};
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    atomic_init(&b.tokens, 0);
    engine_stats s0, s1;
    engine_get_stats(e, &s0);
    double t0 = time_now_s(), c0 = cpu_seconds(RUSAGE_SELF);
    for (int i = 0; i < c->streams; i++) {
        engine_request r = {.prompt = prompts[i], .n_prompt = c->prompt_len, .on_event = bare_event, .user = &b};
        sampling_params_default(&r.sp);
        r.sp.temperature = 0;
        r.sp.max_tokens = c->max_tokens;
        r.sp.ignore_eos = true;
        char err[256];
        if (!engine_submit(e, &r, err, sizeof err)) pd_die("engine_submit: %s", err);
    }
    pthread_mutex_lock(&b.mu);
    while (b.done < c->streams) pthread_cond_wait(&b.cv, &b.mu);
    pthread_mutex_unlock(&b.mu);
    run_result r = {.wall = time_now_s() - t0, .cpu = cpu_seconds(RUSAGE_SELF) - c0};
    engine_get_stats(e, &s1);
    r.steps = s1.steps - s0.steps;
    r.busy = s1.busy_seconds - s0.busy_seconds;
    r.tokens = (uint64_t)atomic_load(&b.tokens);
    return r;
}

/* ---- through the server ------------------------------------------------------------ */
typedef struct client_arg {
    int port;
    const int32_t *prompt;
    const bench_cfg *cfg;
    long tokens;            /* SSE data events with text (all but the final ones) */
    double cpu;
    bool ok;
} client_arg;

static void *client_main(void *p) {
    client_arg *a = p;
    char body[8192];
    int n = snprintf(body, sizeof body, "{\"prompt\":[");
    for (int i = 0; i < a->cfg->prompt_len; i++) n += snprintf(body + n, sizeof body - (size_t)n, i ? ",%d" : "%d", a->prompt[i]);
    n += snprintf(body + n, sizeof body - (size_t)n,
                  "],\"max_tokens\":%d,\"temperature\":0,\"ignore_eos\":true,\"stream\":true}",
                  a->cfg->max_tokens);
    char req[9000];
    int rn = snprintf(req, sizeof req,
                      "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "Content-Length: %d\r\nConnection: close\r\n\r\n%s", n, body);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)a->port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) pd_die("connect failed");
    if (write(fd, req, (size_t)rn) != rn) pd_die("short write");
    /* Count "data: {" events; keep a small tail so a pattern split by reads is found. */
    char buf[65536 + 8];
    size_t keep = 0;
    long events = 0;
    bool done = false;
    for (;;) {
        ssize_t k = read(fd, buf + keep, 65536);
        if (k <= 0) break;
        size_t len = keep + (size_t)k;
        for (size_t i = 0; i + 7 <= len; i++) {
            if (buf[i] == 'd' && !memcmp(buf + i, "data: {", 7)) events++;
            if (buf[i] == 'd' && i + 12 <= len && !memcmp(buf + i, "data: [DONE]", 12)) done = true;
        }
        keep = len < 12 ? len : 11;
        memmove(buf, buf + len - keep, keep);
    }
    close(fd);
    a->tokens = events;
    a->ok = done;
    a->cpu = cpu_seconds(RUSAGE_THREAD);
    return NULL;
}

static run_result run_server(engine *e, int port, int32_t **prompts, const bench_cfg *c) {
    client_arg *args = xcalloc((size_t)c->streams, sizeof *args);
    pthread_t *th = xcalloc((size_t)c->streams, sizeof *th);
    engine_stats s0, s1;
    engine_get_stats(e, &s0);
    double t0 = time_now_s(), c0 = cpu_seconds(RUSAGE_SELF), h0 = time_threads_cpu_s("MHD-worker", false);
    for (int i = 0; i < c->streams; i++) {
        args[i] = (client_arg){.port = port, .prompt = prompts[i], .cfg = c};
        pthread_create(&th[i], NULL, client_main, &args[i]);
    }
    run_result r = {0};
    for (int i = 0; i < c->streams; i++) {
        pthread_join(th[i], NULL);
        if (!args[i].ok) pd_die("stream %d did not end with [DONE]", i);
        r.client_cpu += args[i].cpu;
        r.tokens += (uint64_t)args[i].tokens;
    }
    r.wall = time_now_s() - t0;
    r.cpu = cpu_seconds(RUSAGE_SELF) - c0;
    r.http_cpu = time_threads_cpu_s("MHD-worker", false) - h0;
    engine_get_stats(e, &s1);
    r.steps = s1.steps - s0.steps;
    r.busy = s1.busy_seconds - s0.busy_seconds;
    free(args);
    free(th);
    return r;
}

static void parse_args(int argc, char **argv, bench_cfg *c) {
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--model")) c->model = v;
        else if (!strcmp(k, "--tokenizer")) c->tokenizer = v;
        else if (!strcmp(k, "--load-format")) c->load_format = v;
        else if (!strcmp(k, "--streams")) c->streams = atoi(v);
        else if (!strcmp(k, "--max-tokens")) c->max_tokens = atoi(v);
        else if (!strcmp(k, "--prompt-len")) c->prompt_len = atoi(v);
        else if (!strcmp(k, "--threads")) c->threads = atoi(v);
        else if (!strcmp(k, "--reps")) c->reps = atoi(v);
        else pd_die("bench_server: unknown option %s", k);
    }
    if (!c->tokenizer) {
        const char *cands[] = {"tests/.cache/tokenizers/llama3",
                               "tests/.cache/npm-tokenizers/llama3/package/models"};
        for (size_t i = 0; i < PD_ARRAY_LEN(cands) && !c->tokenizer; i++) {
            char p[512];
            if (util_file_exists(path_join(p, sizeof p, cands[i], "tokenizer.json"))) c->tokenizer = cands[i];
        }
        if (!c->tokenizer && util_is_dir(c->model)) c->tokenizer = c->model;
        if (!c->tokenizer) pd_die("bench_server: pass --tokenizer DIR (run scripts/fetch-test-tokenizers.sh)");
    }
}

int main(int argc, char **argv) {
    bench_cfg c = {.model = "preset:small-llama", .load_format = "auto", .streams = 64,
                   .max_tokens = 128, .prompt_len = 32, .threads = 1, .reps = 2};
    parse_args(argc, argv, &c);
    if (getenv("PDSERVE_LOG") == NULL) log_set_level(LOG_LEVEL_WARN);
    char err[512];
    tokenizer *tok;
    model_files mf;
    if (tokenizer_load(c.tokenizer, &tok, err, sizeof err)) pd_die("%s", err);
    if (model_files_open(c.model, strncmp(c.model, "preset:", 7) ? c.load_format : "dummy", &mf, err, sizeof err))
        pd_die("%s", err);
    backend *be = backend_cpu_create(c.threads);
    model *m = model_load(be, &mf, 0, err, sizeof err);
    if (!m) pd_die("%s", err);
    engine_config ec;
    engine_config_default(&ec);
    ec.max_num_seqs = c.streams;
    ec.max_model_len = c.prompt_len + c.max_tokens + 16;
    ec.kv_cache_memory = model_kv_bytes_per_token(&m->cfg, 4) * (size_t)(c.streams + 1) *
                         (size_t)(ec.max_model_len + 32);
    engine *e = engine_create(m, &ec, err, sizeof err);
    if (!e) pd_die("%s", err);
    engine_start(e);
    server_config sc = {.host = "127.0.0.1", .port = 0, .served_model_name = "bench"};
    server *srv = server_start(&sc, e, tok, err, sizeof err);
    if (!srv) pd_die("%s", err);

    int V = PD_MIN(m->cfg.vocab_size, tokenizer_vocab_size(tok));
    pd_rng rng;
    rng_seed(&rng, 7);
    int32_t **prompts = xcalloc((size_t)c.streams, sizeof *prompts);
    for (int i = 0; i < c.streams; i++) {
        prompts[i] = xmalloc(sizeof(int32_t) * (size_t)c.prompt_len);
        for (int k = 0; k < c.prompt_len; k++) prompts[i][k] = (int32_t)(rng_next(&rng) % (uint64_t)V);
    }
    char desc[256];
    model_config_describe(&m->cfg, desc, sizeof desc);
    printf("bench_server: %s\n  %d streams x %d tokens (prompt %d), CPU backend %d thread(s), %ld cores\n",
           desc, c.streams, c.max_tokens, c.prompt_len, c.threads, sysconf(_SC_NPROCESSORS_ONLN));

    run_result warm = run_bare(e, prompts, &c);
    (void)warm;
    run_result best_b = {0}, best_s = {0};
    for (int rep = 0; rep < c.reps; rep++) {
        run_result b = run_bare(e, prompts, &c);
        run_result s = run_server(e, server_port(srv), prompts, &c);
        if (rep == 0 || b.wall < best_b.wall) best_b = b;
        if (rep == 0 || s.wall < best_s.wall) best_s = s;
        printf("  rep %d: bare %.3f s (%llu steps), server %.3f s (%llu steps, %llu chunks)\n", rep,
               b.wall, (unsigned long long)b.steps, s.wall, (unsigned long long)s.steps,
               (unsigned long long)s.tokens);
    }
    double step_b = best_b.wall / (double)best_b.steps, step_s = best_s.wall / (double)best_s.steps;
    uint64_t toks = best_b.tokens;
    double http_tok = best_s.http_cpu / (double)toks;
    double per_step = http_tok * c.streams;
    printf("\n%-44s %12s %14s %8s\n", "figure", "measured", "against", "ratio");
    printf("%-44s %9.3f ms %11.3f ms %7.1f%%\n", "engine step, bare (wall)", step_b * 1e3, step_b * 1e3, 100.0);
    printf("%-44s %9.3f ms %11.3f ms %7.1f%%\n", "engine step, behind the server (wall)", step_s * 1e3,
           step_b * 1e3, 100.0 * step_s / step_b);
    printf("%-44s %9.3f us %11.3f ms %7.2f%%\n", "HTTP threads' CPU per token", http_tok * 1e6,
           step_b * 1e3, 100.0 * http_tok / step_b);
    printf("%-44s %9.3f ms %11.3f ms %7.2f%%  (target < 5%%)\n", "HTTP threads' CPU per step (x streams)",
           per_step * 1e3, step_b * 1e3, 100.0 * per_step / step_b);
    printf("%-44s %9.3f s\n", "client threads' CPU (not counted)", best_s.client_cpu);

    server_shutdown(srv, 5);
    engine_stop(e);
    server_free(srv);
    engine_free(e);
    model_free(m);
    backend_destroy(be);
    model_files_close(&mf);
    tokenizer_free(tok);
    for (int i = 0; i < c.streams; i++) free(prompts[i]);
    free(prompts);
    return 0;
}
