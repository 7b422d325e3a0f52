/* bench_sim_scale.c: how fast the simulator runs a datacentre-sized point: 64 prefill +
 * 64 decode instances, 100,000 requests shaped like the Azure LLM inference trace
 * (conversation: median input ~1k tokens, output ~250), Poisson arrivals at a rate that
 * loads the cluster, each instance the engine's real scheduler. The trace is generated
 * here as CSV text and read through src/bench's azure reader, as a real trace would be.
 * A program, not a test: it prints the figure, the limit (one minute on one core), and
 * the ratio.
 *
 *   bench_sim_scale [requests (100000)] [P (64)] [D (64)] [load (0.8)] [profile.json]
 * Without a profile: the roofline profile of Llama-3.1-8B on an H100 SXM. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "sim/sim.h"
#include "util/util.h"

/* Log-normal lengths with the given median, clamped. */
static int lognormal_len(pd_rng *r, double median, double sigma, int lo, int hi) {
    double v = median * exp(sigma * (double)rng_normal(r));
    return (int)PD_MIN(PD_MAX(v, lo), hi);
}

/* An Azure-format trace (TIMESTAMP,ContextTokens,GeneratedTokens) of n rows at `rate`. */
static char *make_trace(int n, double rate, uint64_t seed, size_t *len) {
    size_t cap = 64 + (size_t)n * 48, at = 0;
    char *s = xmalloc(cap);
    at += (size_t)snprintf(s, cap, "TIMESTAMP,ContextTokens,GeneratedTokens\n");
    double *arr = xmalloc(sizeof(double) * (size_t)n);
    bench_arrivals(rate, 1.0, n, seed, arr);
    pd_rng r;
    rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        int in = lognormal_len(&r, 1020, 0.9, 8, 8000), out = lognormal_len(&r, 250, 0.8, 4, 2000);
        at += (size_t)snprintf(s + at, cap - at, "%.6f,%d,%d\n", arr[i], in, out);
    }
    free(arr);
    *len = at;
    return s;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100000;
    int P = argc > 2 ? atoi(argv[2]) : 64, D = argc > 3 ? atoi(argv[3]) : 64;
    double load = argc > 4 ? atof(argv[4]) : 0.8;
    char err[512];
    sim_profile prof;
    if (argc > 5) {
        if (sim_profile_load(argv[5], &prof, err, sizeof err) != 0) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
    } else {
        model_config mc;
        PD_ASSERT(model_preset("llama-3.1-8b", &mc, err, sizeof err) == 0);
        sim_roofline rf;
        sim_roofline_h100(&rf);
        sim_profile_roofline(&mc, &rf, &prof);
    }
    /* the load: the smaller of the prefill and decode capacities, times `load` */
    double in_med = 1020 * exp(0.9 * 0.9 / 2), out_med = 250 * exp(0.8 * 0.8 / 2); /* log-normal means */
    double pre_tok_s = 2048 / sim_grid_eval(&prof.prefill, 2048, in_med / 2);
    double dec_B = 128, dec_ctx = in_med + out_med / 2;
    double dec_tok_s = dec_B / sim_grid_eval(&prof.decode, dec_B, dec_ctx);
    double rate_p = P * pre_tok_s / in_med, rate_d = D * dec_tok_s / out_med;
    double rate = load * PD_MIN(rate_p, rate_d);

    double t0 = time_now_s();
    size_t len;
    char *csv = make_trace(n, rate, 42, &len);
    bench_dataset_opts o;
    bench_dataset_opts_default(&o);
    o.kind = BENCH_DATASET_AZURE;
    o.num_prompts = n;
    o.seed = 42;
    o.trace_time_scale = 1.0;
    bench_dataset d = {0};
    if (bench_dataset_parse(&o, csv, len, "synthetic-azure.csv", NULL, &d, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    free(csv);
    sim_request *reqs = xmalloc(sizeof(sim_request) * (size_t)d.n);
    sim_requests_from_dataset(&d, NULL, reqs);
    double t_load = time_now_s() - t0;

    sim_medium m;
    sim_medium_default("rdma", &m);
    sim_config c = {.n_prefill = P, .n_decode = D, .medium = &m, .router = SIM_ROUTER_LEAST_LOADED,
                    .record_tokens = true};
    /* an H100 80 GB running Llama-3.1-8B in bf16 keeps ~55 GB for KV: ~450k tokens */
    long long kv_tokens = prof.kv_cache_tokens ? prof.kv_cache_tokens : 450000;
    c.sched = (sched_config){.num_blocks = (int)(kv_tokens / 16), .block_size = 16, .max_num_seqs = 256,
                             .max_num_batched_tokens = 8192, .enable_chunked_prefill = true};
    bench_config bc;
    bench_config_default(&bc);
    bench_result *res;
    sim_stats st;
    if (sim_run(&c, &prof, reqs, d.n, &bc, &res, &st, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    const bench_summary *s = &res->sum;
    printf("simulator scale: %dP%dD, %d requests (synthetic Azure conversation trace: mean input %.0f, "
           "mean output %.0f tokens), Poisson %.1f req/s (%.0f%% of the %s capacity %.1f req/s), profile: %s\n\n",
           P, D, d.n, (double)s->total_input / s->completed, (double)s->total_output / s->completed, rate,
           100 * load, rate_p < rate_d ? "prefill" : "decode", PD_MIN(rate_p, rate_d), prof.device);
    printf("| %-34s | %12s | %12s | %7s |\n", "figure", "measured", "limit", "ratio");
    printf("|------------------------------------|--------------|--------------|---------|\n");
    printf("| %-34s | %10.2f s | %10.2f s | %7.3f |\n", "simulation wall time (one core)", st.wall_s, 60.0,
           st.wall_s / 60.0);
    printf("| %-34s | %10.2f s | %12s | %7s |\n", "trace generation + azure reader", t_load, "-", "-");
    printf("| %-34s | %12.0f | %12s | %7s |\n", "events per second", st.events / st.wall_s, "-", "-");
    printf("| %-34s | %12llu | %12s | %7s |\n", "scheduler steps", (unsigned long long)st.steps, "-", "-");
    printf("| %-34s | %12.0f | %12s | %7s |\n", "steps per second", st.steps / st.wall_s, "-", "-");
    printf("| %-34s | %10.1f s | %12s | %7s |\n", "simulated time (makespan)", st.makespan_s, "-", "-");
    printf("| %-34s | %12.0f | %12s | %7s |\n", "simulated / wall time", st.makespan_s / st.wall_s, "-", "-");
    printf("\nTTFT med %.1f ms p99 %.1f ms | TPOT med %.2f ms p99 %.2f ms | ITL med %.2f ms | E2EL med %.0f ms | "
           "%.0f output tok/s | %llu preemptions | %.1f TB of KV moved | %.3f J/token\n",
           s->ttft.median, s->ttft.pct[3], s->tpot.median, s->tpot.pct[3], s->itl.median, s->e2el.median,
           s->output_throughput, (unsigned long long)st.preemptions, st.kv_bytes / 1e12,
           st.energy_j >= 0 ? st.energy_j / (double)(s->total_input + s->total_output) : NAN);
    bench_result_free(res);
    free(reqs);
    bench_dataset_free(&d);
    sim_profile_free(&prof);
    return 0;
}
