/* bench_engine_cpu.c: the serving engine on the CPU backend with a dummy model:
 * throughput and step time at 1, 8 and 64 concurrent requests, and the engine's own
 * overhead (planning + sampling + events) against the forward pass it drives, the
 * limit an engine can only approach. A program, not a test.
 *
 *   bench_engine_cpu [preset (small-llama)] [threads (0: all)] [prompt (128)] [output (64)] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "util/util.h"

typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
} waiter;

static void on_event(void *user, const engine_event *ev) {
    waiter *w = user;
    if (ev->kind != ENGINE_EVENT_FINISHED) return;
    pthread_mutex_lock(&w->mu);
    w->done++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static int run(model *m, int conc, int n_prompt, int n_out) {
    engine_config cfg;
    engine_config_default(&cfg);
    cfg.max_num_seqs = 64;
    cfg.max_num_batched_tokens = 2048;
    cfg.max_model_len = n_prompt + n_out;
    char err[512];
    engine *e = engine_create(m, &cfg, err, sizeof err);
    if (!e) {
        fprintf(stderr, "engine_create: %s\n", err);
        return -1;
    }
    engine_start(e);
    waiter w = {.done = 0};
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    int32_t *prompt = xmalloc((size_t)n_prompt * sizeof(int32_t));
    pd_rng r;
    rng_seed(&r, 7);
    double t0 = time_now_s();
    for (int i = 0; i < conc; i++) {
        for (int j = 0; j < n_prompt; j++) prompt[j] = 3 + (int32_t)(rng_next(&r) % (uint64_t)(m->cfg.vocab_size - 3));
        engine_request q = {.prompt = prompt, .n_prompt = n_prompt, .on_event = on_event, .user = &w};
        sampling_params_default(&q.sp);
        q.sp.temperature = 0;
        q.sp.max_tokens = n_out;
        q.sp.ignore_eos = true;
        if (!engine_submit(e, &q, err, sizeof err)) {
            fprintf(stderr, "submit: %s\n", err);
            return -1;
        }
    }
    pthread_mutex_lock(&w.mu);
    while (w.done < conc) pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    double wall = time_now_s() - t0;
    engine_stats st;
    engine_get_stats(e, &st);
    engine_free(e);
    free(prompt);
    double steps = (double)(st.steps ? st.steps : 1);
    double overhead = st.sched_seconds + st.sample_seconds;
    printf("| %4d | %6.2f | %9.1f | %9.1f | %5llu | %8.2f | %8.2f | %8.1f | %8.1f | %6.3f |\n", conc,
           wall, (double)st.generation_tokens / wall,
           (double)(st.generation_tokens + st.prompt_tokens) / wall, (unsigned long long)st.steps,
           1e3 * st.busy_seconds / steps, 1e3 * st.forward_seconds / steps,
           1e6 * st.sched_seconds / steps, 1e6 * st.sample_seconds / steps,
           overhead / (st.forward_seconds > 0 ? st.forward_seconds : 1));
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    const char *preset = argc > 1 ? argv[1] : "small-llama";
    int threads = argc > 2 ? atoi(argv[2]) : 0;
    int n_prompt = argc > 3 ? atoi(argv[3]) : 128;
    int n_out = argc > 4 ? atoi(argv[4]) : 64;
    log_set_level(LOG_LEVEL_WARN);
    char name[128], err[512];
    snprintf(name, sizeof name, "preset:%s", preset);
    model_files mf;
    if (model_files_open(name, "dummy", &mf, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    backend *be = backend_cpu_create(threads);
    model *m = model_load(be, &mf, 1, err, sizeof err);
    model_files_close(&mf);
    if (!m) {
        fprintf(stderr, "model_load: %s\n", err);
        return 1;
    }
    char desc[256];
    model_config_describe(&m->cfg, desc, sizeof desc);
    printf("engine on %s, %d threads: %s\n", be->ops->name, be->threads, desc);
    printf("prompt %d tokens, output %d tokens (greedy, ignore_eos), all requests at once\n\n",
           n_prompt, n_out);
    printf("| conc | wall s | out tok/s | all tok/s | steps | step ms  | fwd ms   | sched us | sample us| ovh/fwd|\n");
    printf("|------|--------|-----------|-----------|-------|----------|----------|----------|----------|--------|\n");
    int concs[] = {1, 8, 64};
    for (int i = 0; i < 3; i++)
        if (run(m, concs[i], n_prompt, n_out) != 0) return 1;
    printf("\nsched us: planning per step; sample us: sampling + token events per step;\n"
           "ovh/fwd: (sched + sample) / forward time, the engine's own cost against the\n"
           "forward pass it drives (0 is the limit).\n");
    model_free(m);
    backend_destroy(be);
    return 0;
}
