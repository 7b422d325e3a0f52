/* bench_client_overhead.c: what the measuring instrument costs. The bench client
 * (src/bench/) runs against the in-process fake server (tests/test_bench_server.h)
 * streaming tokens as fast as the sockets take them; the client thread's CPU time
 * (getrusage RUSAGE_THREAD) divided by the tokens it received is its cost per
 * streamed token, and its inverse the token rate one core of client sustains.
 * The client and the server are pinned to different cores when there are two.
 *
 * Goal: over 100,000 tokens/s on one core, so that at the token rates of one GPU
 * server (thousands to tens of thousands per second) the client stays a few percent
 * of a core and its queueing cannot show up in TTFT or ITL.
 *
 * usage: bench_client_overhead [total_tokens_per_row (default 400000)] */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>

#include "../tests/test_bench_server.h"
#include "bench/bench.h"
#include "util/util.h"

static void pin(pthread_t th, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(th, sizeof set, &set);
}

typedef struct row {
    int streams, tokens_per_req, n_req;
    double itl_ms;             /* 0: as fast as possible; > 0: paced, one token per read */
    bool usage;
    double wall_s, cpu_s;
    long long tokens, events;
    int failed;
} row;

static void run_row(row *w) {
    tsrv s;
    tsrv_conf sc = {.first_ms = w->itl_ms, .itl_ms = w->itl_ms, .tokens = w->tokens_per_req};
    if (tsrv_start(&s, &sc) != 0) pd_die("cannot start the fake server");
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu >= 2) {
        pin(s.th, 1);
        pin(pthread_self(), 0);
    }
    char url[64];
    tsrv_url(&s, url, sizeof url);
    bench_config c;
    bench_config_default(&c);
    c.base_url = url;
    c.model = "test-model";
    c.max_concurrency = w->streams;
    c.num_warmups = w->streams;
    c.metrics_urls = "";
    c.stream_usage = w->usage;
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.num_prompts = w->n_req;
    o.random_input_len = 8;
    o.random_output_len = w->tokens_per_req;
    bench_dataset d;
    char err[512];
    if (bench_dataset_load(&o, NULL, &d, err, sizeof err) != 0) pd_die("%s", err);
    bench_result *r;
    if (bench_run(&c, &d, &r, err, sizeof err) != 0) pd_die("%s", err);
    w->wall_s = r->sum.duration_s;
    w->cpu_s = r->client_cpu_s;
    w->tokens = r->sum.total_output;
    w->events = r->events;
    w->failed = r->sum.failed;
    bench_result_free(r);
    bench_dataset_free(&d);
    tsrv_stop(&s);
}

int main(int argc, char **argv) {
    struct rlimit rl;  /* client and fake server share this process's file limit */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    long total = argc > 1 ? atol(argv[1]) : 400000;
    const double GOAL = 100000;
    row rows[] = {
        {.streams = 1, .tokens_per_req = 4000, .usage = true},
        {.streams = 16, .tokens_per_req = 2000, .usage = true},
        {.streams = 256, .tokens_per_req = 500, .usage = true},
        {.streams = 1000, .tokens_per_req = 200, .usage = true},
        {.streams = 256, .tokens_per_req = 500, .usage = false},
        /* paced: every token arrives alone, so each costs a wake-up and a read */
        {.streams = 100, .tokens_per_req = 200, .usage = true, .itl_ms = 2},
        {.streams = 500, .tokens_per_req = 100, .usage = true, .itl_ms = 5},
        {.streams = 1000, .tokens_per_req = 50, .usage = true, .itl_ms = 10},
    };
    printf("bench client overhead: fake server streaming as fast as it can, client on one core\n");
    printf("(one token = one SSE event with text; CPU = client thread's user+system time)\n\n");
    printf("%8s %8s %7s %6s %9s %9s %9s %10s %12s %10s %7s\n", "streams", "tok/req", "ITL ms", "usage", "tokens", "wall s",
           "wall tok/s", "CPU us/tok", "tok/s/core", "goal", "ratio");
    double worst = INFINITY;
    for (size_t i = 0; i < PD_ARRAY_LEN(rows); i++) {
        row *w = &rows[i];
        long want = w->itl_ms > 0 ? total / 4 : total;  /* paced rows take wall time */
        w->n_req = (int)PD_MAX(want / w->tokens_per_req, w->streams);
        run_row(w);
        double per_core = w->cpu_s > 0 ? (double)w->tokens / w->cpu_s : 0;
        worst = PD_MIN(worst, per_core);
        char itl[16];
        if (w->itl_ms > 0) snprintf(itl, sizeof itl, "%g", w->itl_ms);
        else snprintf(itl, sizeof itl, "fast");
        printf("%8d %8d %7s %6s %9lld %9.3f %9.0f %10.3f %12.0f %10.0f %6.2fx%s\n", w->streams, w->tokens_per_req,
               itl, w->usage ? "yes" : "no", w->tokens, w->wall_s, w->tokens / w->wall_s, w->cpu_s * 1e6 / (double)w->tokens,
               per_core, GOAL, per_core / GOAL, w->failed ? "  (failures!)" : "");
    }
    printf("\nworst row: %.0f tokens/s per client core = %.2fx the goal of %.0f\n", worst, worst / GOAL, GOAL);
    printf("wall tok/s is bounded by the fake server sharing the machine; tok/s/core is the client's own limit\n");
    return 0;
}
