/* replay.c: the simulator's reference: the same requests through the real engine,
 * in-process (no HTTP), each submitted at its arrival time from this thread while the
 * engine thread serves them. The engine's own timestamps (request_times, monotonic
 * clock) become a bench_result summarised exactly as sim_run's, so that a simulated
 * and a real run compare metric for metric. Tuned for validation runs of a few hundred
 * requests on the CPU; greedy decoding with ignore_eos, so lengths are the dataset's. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sim/sim.h"
#include "util/util.h"

typedef struct replay_req {
    double arrival, first_token, finished;
    double *token_times;    /* [max_tokens] (owned until moved into the result) */
    int n_out;
    bool done, failed;
    char error[160];
} replay_req;

typedef struct replay {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    replay_req *rq;         /* [n], plus one slot for the warm-up at index n */
} replay;

typedef struct replay_ctx {
    replay *rp;
    int index;
} replay_ctx;

static void on_event(void *user, const engine_event *ev) {
    replay_ctx *c = user;
    if (ev->kind != ENGINE_EVENT_FINISHED) return;
    replay *rp = c->rp;
    replay_req *r = &rp->rq[c->index];
    const request_times *t = ev->times;
    pthread_mutex_lock(&rp->mu);
    r->arrival = t->arrival;
    r->first_token = t->first_token;
    r->finished = t->finished;
    r->n_out = ev->n_output;
    memcpy(r->token_times, t->token_times, sizeof(double) * (size_t)ev->n_output);
    if (ev->finish == FINISH_ERROR || ev->finish == FINISH_ABORT) {
        r->failed = true;
        snprintf(r->error, sizeof r->error, "%s", ev->error ? ev->error : finish_reason_name(ev->finish));
    }
    r->done = true;
    rp->done++;
    pthread_cond_broadcast(&rp->cv);
    pthread_mutex_unlock(&rp->mu);
}

static void sleep_until(double t) {
    for (;;) {
        double d = t - time_now_s();
        if (d <= 0) return;
        struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

static int submit(engine *e, replay_ctx *ctx, const int32_t *prompt, int n_prompt, int max_tokens, char *err,
                  size_t errlen) {
    engine_request q = {.prompt = prompt, .n_prompt = n_prompt, .on_event = on_event, .user = ctx};
    sampling_params_default(&q.sp);
    q.sp.temperature = 0;
    q.sp.max_tokens = max_tokens;
    q.sp.ignore_eos = true;
    return engine_submit(e, &q, err, errlen) ? 0 : -1;
}

static void wait_done(replay *rp, int count) {
    pthread_mutex_lock(&rp->mu);
    while (rp->done < count) pthread_cond_wait(&rp->cv, &rp->mu);
    pthread_mutex_unlock(&rp->mu);
}

int sim_replay_engine(model *m, const engine_config *ec, const sim_request *reqs, int n,
                      const bench_config *bc, bench_result **out, char *err, size_t errlen) {
    *out = NULL;
    for (int i = 0; i < n; i++)
        if (!reqs[i].prompt) {
            pd_errorf(err, errlen, "replay: request %d has no prompt ids", i);
            return -1;
        }
    engine *e = engine_create(m, ec, err, errlen);
    if (!e) return -1;
    engine_start(e);
    replay rp = {.done = 0};
    pthread_mutex_init(&rp.mu, NULL);
    pthread_cond_init(&rp.cv, NULL);
    rp.rq = xcalloc((size_t)n + 1, sizeof(replay_req));
    replay_ctx *ctx = xcalloc((size_t)n + 1, sizeof(replay_ctx));
    for (int i = 0; i <= n; i++) {
        ctx[i] = (replay_ctx){&rp, i};
        rp.rq[i].token_times = xmalloc(sizeof(double) * (size_t)(i < n ? reqs[i].max_tokens : 4));
    }
    int rc = -1;
    /* warm-up (threads, caches, first-touch of the KV pool), excluded */
    if (n > 0 && submit(e, &ctx[n], reqs[0].prompt, PD_MIN(reqs[0].n_prompt, 16), 4, err, errlen) != 0) goto out;
    wait_done(&rp, 1);
    double t0 = time_now_s();
    for (int i = 0; i < n; i++) {
        sleep_until(t0 + reqs[i].arrival);
        if (submit(e, &ctx[i], reqs[i].prompt, reqs[i].n_prompt, reqs[i].max_tokens, err, errlen) != 0) {
            char tmp[256];
            snprintf(tmp, sizeof tmp, "%s", err);
            pd_errorf(err, errlen, "replay: request %d: %s", i, tmp);
            wait_done(&rp, 1 + i);
            goto out;
        }
    }
    wait_done(&rp, n + 1);
    bench_result *res = xcalloc(1, sizeof *res);
    snprintf(res->model, sizeof res->model, "engine");
    res->n = n;
    res->recs = xcalloc((size_t)(n ? n : 1), sizeof(bench_record));
    double end = t0;
    for (int i = 0; i < n; i++) {
        replay_req *r = &rp.rq[i];
        bench_record *b = &res->recs[i];
        b->success = !r->failed;
        if (r->failed) b->error = xstrdup(r->error);
        b->prompt_len = reqs[i].n_prompt;
        b->output_len = r->n_out;
        b->expected_output_len = reqs[i].max_tokens;
        b->start_s = r->arrival - t0;
        b->ttft_s = r->first_token - r->arrival;
        b->e2el_s = r->finished - r->arrival;
        for (int k = 0; k < r->n_out; k++) r->token_times[k] -= r->arrival;
        b->token_s = r->token_times;
        b->n_tokens = b->cap_tokens = r->n_out;
        r->token_times = NULL;
        end = PD_MAX(end, r->finished);
    }
    res->sum.energy_j = -1;
    bench_summarize(bc, res, end - t0);
    engine_stats st;
    engine_get_stats(e, &st);
    double steps = st.steps ? (double)st.steps : 1;
    log_info("replay: %llu engine steps (warm-up included): busy %.3f ms/step = forward %.3f + planning %.1f us + "
             "sampling and events %.1f us", (unsigned long long)st.steps, 1e3 * st.busy_seconds / steps,
             1e3 * st.forward_seconds / steps, 1e6 * st.sched_seconds / steps, 1e6 * st.sample_seconds / steps);
    *out = res;
    rc = 0;
out:
    engine_free(e);
    for (int i = 0; i <= n; i++) free(rp.rq[i].token_times);
    free(rp.rq);
    free(ctx);
    pthread_mutex_destroy(&rp.mu);
    pthread_cond_destroy(&rp.cv);
    return rc;
}
