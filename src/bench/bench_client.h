/* bench_client.h: the transport under bench_run (client.c): sends prepared request
 * bodies at their times and fills one bench_record per request. One thread. */
#ifndef PD_BENCH_CLIENT_H
#define PD_BENCH_CLIENT_H

#include "bench/bench_internal.h"

typedef struct bench_client bench_client;

/* One request to send: its JSON body (not owned) and when, after the run's start. */
typedef struct bench_job {
    const char *body;
    size_t body_len;
    uint64_t send_ns;          /* non-decreasing across jobs */
} bench_job;

/* A client with n_slots concurrent requests at most (raises RLIMIT_NOFILE to fit).
 * NULL with err when epoll/curl cannot be set up. */
bench_client *bench_client_new(const bench_config *c, int n_slots, char *err, size_t errlen);
void bench_client_free(bench_client *cl);

/* Runs jobs[0..n) in order; recs[i] must be zeroed except prompt_len (dataset's, or
 * -1) and expected_output_len; the client fills the rest (recs own what it
 * allocates). Returns seconds from the start (*t0_ns, CLOCK_MONOTONIC, if not NULL) to
 * the last completion. */
double bench_client_run(bench_client *cl, const bench_job *jobs, int n, bench_record *recs, bool show,
                        const char *label, uint64_t *t0_ns);
/* SSE events handled so far. */
long long bench_client_events(const bench_client *cl);

#endif
