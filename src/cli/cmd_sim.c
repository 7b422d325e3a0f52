/* cmd_sim.c: `pdserve sim PLAN.json --profile P [--db results.db] [--json out.json]`:
 * every point of a sim plan (setups x loads x clocks) through the simulator
 * (src/sim/): the engine's real scheduler in virtual time, priced by a measured
 * profile. Requests come from src/bench with the plan's seed, so a point simulates
 * exactly the requests `pdserve bench` / `pdserve sweep` would send. Results go to the
 * results database (runs marked simulated) and/or a JSON file of summaries. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "bench/bench.h"
#include "cli/cli.h"
#include "model/tokenizer.h"
#include "sim/sim.h"
#include "study/study.h"
#include "util/util.h"

static const char USAGE[] =
    "usage: pdserve sim PLAN.json [--profile PROFILE.json] [--db results.db] [--json out.json]\n"
    "       pdserve sim --price-traces DIR --profile PROFILE.json [--trace-prefix PREFIX]\n\n"
    "Simulates every point of a plan (setups x loads x clocks) with the engine's own scheduler\n"
    "in virtual time, each step priced by a profile from `pdserve profile`. Setups: co-1gpu,\n"
    "co-2gpus, co-N, dis-MEDIUM (1P1D), xPyD[-MEDIUM]; loads: batch (rate inf), Poisson rate,\n"
    "or a trace's timestamps. Plan format: docs/simulator.md. Points are recorded in the\n"
    "results database marked simulated, and/or as summaries in a JSON file. --price-traces\n"
    "prices every step of engine step traces (`pdserve serve --step-trace`) by the profile and\n"
    "prints the step factor they imply: how far the profile's grid is from what that engine\n"
    "did, by prompt rows, and for decode steps.";

typedef struct sim_point_out {
    char label[160];
    sim_stats st;
    bench_summary sum;
    double j_per_token;
} sim_point_out;

/* Energy as bench_energy series (one per stage), which the results database stores,
 * and the matching idle figures. */
static void fill_energy(bench_result *r, study_idle *idle, const sim_stats *st, const sim_config *cfg,
                        const sim_profile *p) {
    memset(&r->energy, 0, sizeof r->energy);
    memset(idle, 0, sizeof *idle);
    if (st->energy_j < 0) return;
    int n_p = cfg->n_colocated > 0 ? cfg->n_colocated : cfg->n_prefill;
    struct { const char *role; double j; int n, gpus; } parts[3] = {
        {cfg->n_colocated > 0 ? "colocated" : "prefill", st->energy_prefill_j, n_p, st->gpus_prefill},
        {"decode", st->energy_decode_j, cfg->n_decode, st->gpus_decode},
        {"transfer", st->energy_transfer_j, 0, 0},
    };
    for (int k = 0; k < 3; k++) {
        if (parts[k].j <= 0 && parts[k].n == 0) continue;
        bench_energy_series *s = &r->energy.s[r->energy.n];
        bench_energy_series *is = &idle->e.s[idle->e.n];
        snprintf(s->key, sizeof s->key, "pdserve_%s_energy_joules{device=\"sim-%s-x%d\",role=\"%s\"}",
                 k == 2 ? "kv" : "gpu", parts[k].role, parts[k].n, parts[k].role);
        snprintf(s->role, sizeof s->role, "%s", parts[k].role);
        s->before = 0;
        s->after = parts[k].j;
        s->has_before = s->has_after = true;
        *is = *s;
        is->after = p->power.idle_w * parts[k].gpus; /* over idle->seconds = 1; a shared device once */
        r->energy.n++;
        idle->e.n++;
    }
    idle->seconds = 1.0;
}

static void load_label(const sim_load *l, char *out, size_t cap) {
    if (l->batch) snprintf(out, cap, "b%d", l->num_prompts);
    else if (l->trace_times) snprintf(out, cap, "trace%s", l->num_prompts ? "" : "-all");
    else snprintf(out, cap, "r%g", l->rate);
}

/* With --tokenizer, each text prompt as the server encodes it for /v1/completions
 * (special tokens added: a Llama 3 BOS), so that its length and ids are what a real
 * deployment counts, blocks and prefix-matches (a 128-token random prompt is 129
 * there, 9 blocks of 16 and not 8). */
static int encode_as_server(bench_dataset *d, const tokenizer *tk, int *client, char *err, size_t errlen) {
    for (int i = 0; i < d->n; i++) {
        client[i] = 0;
        bench_request *q = &d->reqs[i];
        if (!q->prompt) continue; /* token ids: the server takes them as they are */
        int32_t *ids = NULL;
        int n = 0;
        if (tokenizer_encode(tk, q->prompt, strlen(q->prompt), true, &ids, &n, err, errlen) != 0) return -1;
        free(q->prompt_ids);
        q->prompt_ids = ids;
        client[i] = q->prompt_len; /* the client's count: what a real run's input_tokens holds */
        q->prompt_len = n;
    }
    return 0;
}

/* Builds the requests of one load: the setup's dataset (a study plan's "datasets" entry
 * or reuse ratio) or else the plan's, with the plan's seed, and the arrivals. With a
 * tokenizer (tk, bt its bench wrapper) the prompts are the sweep's client's, token-exact
 * text in the model's tokens, as the server encodes them; without, token ids. */
static int make_requests(const sim_plan *pl, const sim_plan_setup *su, const sim_load *l,
                         const tokenizer *tk, const bench_tokenizer *bt, bench_dataset *d,
                         sim_request **reqs, double *mean_rate, char *err, size_t errlen) {
    bench_dataset_opts o = su->has_dataset ? su->dataset : pl->dataset;
    if (su->has_dataset && pl->dataset.random_vocab_size < o.random_vocab_size)
        o.random_vocab_size = pl->dataset.random_vocab_size; /* --validate-model's cap */
    o.num_prompts = l->num_prompts;
    /* as the sweep builds it (study_dataset_bench_opts): at most one prefix a prompt */
    if (o.kind == BENCH_DATASET_PREFIX_REPETITION && l->num_prompts > 0)
        o.num_prefixes = PD_MIN(o.num_prefixes, l->num_prompts);
    o.path = pl->dataset_path[0] ? pl->dataset_path : NULL;
    o.trace_time_scale = l->trace_time_scale;
    if (bench_dataset_load(&o, tk ? bt : NULL, d, err, errlen) != 0) return -1;
    if (d->n == 0) {
        pd_errorf(err, errlen, "the dataset has no requests");
        return -1;
    }
    double *arr = xmalloc(sizeof(double) * (size_t)d->n);
    if (l->trace_times) {
        if (!d->has_timestamps) {
            free(arr);
            pd_errorf(err, errlen, "load \"trace\" needs a dataset with timestamps (azure, mooncake)");
            return -1;
        }
        for (int i = 0; i < d->n; i++) arr[i] = PD_MAX(d->reqs[i].arrival_s, 0);
        *mean_rate = arr[d->n - 1] > 0 ? (d->n - 1) / arr[d->n - 1] : INFINITY;
    } else {
        bench_arrivals(l->batch ? INFINITY : l->rate, l->burstiness, d->n, pl->seed, arr);
        *mean_rate = l->batch ? INFINITY : l->rate;
    }
    int *client = xcalloc((size_t)d->n, sizeof *client);
    if (tk && encode_as_server(d, tk, client, err, errlen) != 0) {
        free(client);
        free(arr);
        return -1;
    }
    *reqs = xmalloc(sizeof(sim_request) * (size_t)d->n);
    sim_requests_from_dataset(d, arr, *reqs);
    for (int i = 0; i < d->n; i++) (*reqs)[i].n_prompt_client = client[i];
    free(client);
    free(arr);
    return 0;
}

static void print_header(void) {
    printf("| %-22s | %-8s | %-11s | %9s | %9s | %8s | %8s | %8s | %10s | %9s | %7s | %6s |\n", "setup", "load",
           "clocks", "TTFT med", "TTFT p99", "TPOT med", "TPOT p99", "ITL med", "out tok/s", "J/token",
           "preempt", "sim s");
    printf("|%.24s|%.10s|%.13s|%.11s|%.11s|%.10s|%.10s|%.10s|%.12s|%.11s|%.9s|%.8s|\n",
           "-------------------------", "-----------", "--------------", "------------", "------------",
           "-----------", "-----------", "-----------", "-------------", "------------", "----------",
           "---------");
}

static double pct(const bench_stat *s, const bench_config *bc, double p) {
    for (int i = 0; i < bc->n_percentiles; i++)
        if (bc->percentiles[i] == p) return s->pct[i];
    return NAN;
}

static cJSON *point_json(const char *setup, const char *load, const double clk[2], const bench_config *bc,
                         const bench_summary *s, const sim_stats *st) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "setup", setup);
    cJSON_AddStringToObject(o, "load", load);
    cJSON_AddNumberToObject(o, "prefill_mhz", clk[0]);
    cJSON_AddNumberToObject(o, "decode_mhz", clk[1]);
    cJSON_AddBoolToObject(o, "simulated", true);
    cJSON_AddNumberToObject(o, "completed", s->completed);
    cJSON_AddNumberToObject(o, "duration_s", s->duration_s);
    cJSON_AddNumberToObject(o, "total_input_tokens", (double)s->total_input);
    cJSON_AddNumberToObject(o, "total_output_tokens", (double)s->total_output);
    cJSON_AddNumberToObject(o, "request_throughput", s->request_throughput);
    cJSON_AddNumberToObject(o, "output_throughput", s->output_throughput);
    cJSON_AddNumberToObject(o, "total_token_throughput", s->total_token_throughput);
    const struct { const char *n; const bench_stat *s; } m[] = {
        {"ttft", &s->ttft}, {"tpot", &s->tpot}, {"itl", &s->itl}, {"e2el", &s->e2el}};
    for (size_t k = 0; k < PD_ARRAY_LEN(m); k++) {
        char key[48];
        snprintf(key, sizeof key, "mean_%s_ms", m[k].n);
        cJSON_AddNumberToObject(o, key, m[k].s->mean);
        snprintf(key, sizeof key, "median_%s_ms", m[k].n);
        cJSON_AddNumberToObject(o, key, m[k].s->median);
        snprintf(key, sizeof key, "p99_%s_ms", m[k].n);
        double v = pct(m[k].s, bc, 99);
        if (isfinite(v)) cJSON_AddNumberToObject(o, key, v);
        else cJSON_AddNullToObject(o, key);
    }
    if (st->energy_j >= 0) {
        cJSON_AddNumberToObject(o, "energy_j", st->energy_j);
        cJSON_AddNumberToObject(o, "energy_prefill_j", st->energy_prefill_j);
        cJSON_AddNumberToObject(o, "energy_decode_j", st->energy_decode_j);
        cJSON_AddNumberToObject(o, "energy_transfer_j", st->energy_transfer_j);
        cJSON_AddNumberToObject(o, "energy_share_j", st->energy_share_j);
        double tok = (double)(s->total_input + s->total_output);
        cJSON_AddNumberToObject(o, "j_per_token", tok > 0 ? st->energy_j / tok : 0);
    } else {
        cJSON_AddNullToObject(o, "energy_j");
        cJSON_AddNullToObject(o, "j_per_token");
    }
    cJSON_AddNumberToObject(o, "steps", (double)st->steps);
    cJSON_AddNumberToObject(o, "preemptions", (double)st->preemptions);
    cJSON_AddNumberToObject(o, "timed_out", st->timed_out); /* 504 at the router's deadline */
    cJSON_AddNumberToObject(o, "kv_full", st->kv_full);     /* 503 at the decode side's reservation */
    cJSON_AddNumberToObject(o, "contention_s", st->contention_s);
    cJSON_AddNumberToObject(o, "serving_s", st->serving_s);
    cJSON_AddNumberToObject(o, "serving_cpu_s", st->serving_cpu_s);
    cJSON_AddNumberToObject(o, "kv_bytes", st->kv_bytes);
    cJSON_AddNumberToObject(o, "sim_wall_s", st->wall_s);
    if (st->prefix_queries > 0) {
        cJSON *pc = cJSON_AddObjectToObject(o, "prefix_cache");
        cJSON_AddNumberToObject(pc, "queried_tokens", (double)st->prefix_queries);
        cJSON_AddNumberToObject(pc, "gpu_hit_tokens", (double)st->prefix_hits);
        const prefix_tier_stats *t = &st->tiers;
        for (int k = 0; k < t->n_tiers; k++) {
            cJSON *tj = cJSON_AddObjectToObject(pc, t->tier[k].name);
            cJSON_AddNumberToObject(tj, "hit_tokens", (double)t->tier[k].hit_tokens);
            cJSON_AddNumberToObject(tj, "offloaded_blocks", (double)t->tier[k].offloaded_blocks);
            cJSON_AddNumberToObject(tj, "loaded_blocks", (double)t->tier[k].loaded_blocks);
            cJSON_AddNumberToObject(tj, "evictions", (double)t->tier[k].evictions);
        }
        if (t->n_tiers > 0) {
            cJSON_AddNumberToObject(pc, "loads", (double)t->decisions_load);
            cJSON_AddNumberToObject(pc, "recomputes", (double)t->decisions_recompute);
            cJSON_AddNumberToObject(pc, "loaded_tokens", (double)t->loaded_tokens);
            cJSON_AddNumberToObject(pc, "staged_loaded_blocks", (double)t->staged_loaded_blocks);
            cJSON_AddNumberToObject(pc, "offload_dropped", (double)t->offload_dropped);
            cJSON_AddNumberToObject(pc, "hook_s", st->tier_hook_s);
        }
    }
    if (st->power_capped) {
        cJSON *pc = cJSON_AddObjectToObject(o, "power_cap");
        cJSON_AddNumberToObject(pc, "prefill_mhz", st->mhz_prefill);
        cJSON_AddNumberToObject(pc, "decode_mhz", st->mhz_decode);
        cJSON_AddNumberToObject(pc, "capped_s", st->capped_s);
    }
    return o;
}

typedef struct sim_cli {
    const sim_plan *pl;
    const sim_profile *prof;
    study_db *db;
    study_hw hw;
    cJSON *points;
    int index;
    bool quiet;
    model *vmodel;          /* --validate-model: replay co-1gpu points through the real engine */
    int vrepeats;           /* real runs per point; the median of each metric is compared */
    bool contention;        /* CPU profiles: instances share the host's cores (--no-cpu-contention) */
    bool control_path;      /* xPyD: the medium's measured control path (--no-control-path) */
    bool serving_path;      /* the profile's serving path per request (--no-serving-path) */
    bool serving_cpu;       /* CPU profiles: the serving path's CPU on the cores (--no-serving-cpu) */
    bool step_factor;       /* the profile's measured steps inside a deployment (--no-step-factor) */
    bool contention_kinds;  /* CPU profiles: contention by the kinds of steps (--no-contention-kinds) */
    bool tier_cpu;          /* CPU profiles: the lower KV tiers' workers on the cores (--no-tier-cpu) */
    bool gpu_share;         /* GPU profiles: instances on one GPU share it (--no-gpu-share) */
    bool gpu_share_equal;   /* ... in equal turns, not as the profile's pairs (--gpu-share-equal) */
    bool gpu_share_lighter; /* ... the pairs by the decode step's weight (--gpu-share-lighter) */
    bool gpu_share_sum;     /* ... another instance's step and copy summed (--gpu-share-sum) */
    bool own_copies;        /* GPU profiles: a cpu store's copies beside their own instance's steps (--no-own-copies) */
    bool power_cap;         /* GPU instances' clocks under the enforced power limit (--power-cap) */
    int store_overlap;      /* stores: 0 the rounds' overlap factors, 1 the pipelined train's, 2 equal
                               shares of the device (--store-overlap) */
    char scale_medium[32];  /* --medium-scale NAME=K: that medium's transfers take K times the */
    double scale_k;         /* profile's time (scale_medium "": none) */
    bool scale_used;        /* some setup's medium was scale_medium */
    const tokenizer *tok;   /* --tokenizer: prompts as the sweep's client and the server make them */
    bench_tokenizer btok;   /* tok behind the bench's callbacks */
} sim_cli;

static double rel(double sim, double real) { return real != 0 ? 100.0 * (sim / real - 1.0) : NAN; }

/* Replays the point's requests through the real engine (same scheduler config and KV
 * pool) and prints simulated against real medians. Adds "real" to the point's JSON. */
static int validate_point(sim_cli *c, const sim_plan_setup *su, const char *ll, const sim_config *cfg,
                          const sim_request *reqs, int n, const bench_config *bc, const bench_result *sr,
                          const sim_stats *st, cJSON *pj, char *err, size_t errlen) {
    model *m = c->vmodel;
    engine_config ec;
    engine_config_default(&ec);
    ec.block_size = cfg->sched.block_size;
    ec.max_num_seqs = cfg->sched.max_num_seqs;
    ec.max_num_batched_tokens = cfg->sched.max_num_batched_tokens;
    ec.enable_chunked_prefill = cfg->sched.enable_chunked_prefill;
    ec.kv_cache_memory = (size_t)cfg->sched.num_blocks * (size_t)cfg->sched.block_size *
                         model_kv_bytes_per_token(&m->cfg, dtype_size(m->be->ops->kv_type));
    /* the median over vrepeats real runs of each metric: one run on a shared machine can be off by 2x */
    enum { TTFT, TPOT, ITL, E2EL, OUT, DUR, NM };
    double v[NM][16];
    int nr = PD_MIN(PD_MAX(c->vrepeats, 1), 16);
    for (int k = 0; k < nr; k++) {
        bench_result *rr = NULL;
        if (sim_replay_engine(m, &ec, reqs, n, bc, &rr, err, errlen) != 0) return -1;
        v[TTFT][k] = rr->sum.ttft.median;
        v[TPOT][k] = rr->sum.tpot.median;
        v[ITL][k] = rr->sum.itl.median;
        v[E2EL][k] = rr->sum.e2el.median;
        v[OUT][k] = rr->sum.output_throughput;
        v[DUR][k] = rr->sum.duration_s;
        bench_result_free(rr);
    }
    log_info("sim: %llu steps, %.3f ms/step", (unsigned long long)st->steps,
             1e3 * (st->busy_prefill_s + st->busy_decode_s) / (double)PD_MAX(st->steps, 1));
    double real[NM];
    for (int i = 0; i < NM; i++) real[i] = sim_median(v[i], nr);
    const bench_summary *a = &sr->sum;
    printf("  validation %s %s (sim vs real engine, median of %d runs): TTFT med %.2f vs %.2f ms (%+.1f%%), "
           "TPOT med %.3f vs %.3f ms (%+.1f%%), E2EL med %.1f vs %.1f ms (%+.1f%%), output %.1f vs %.1f tok/s "
           "(%+.1f%%)\n",
           su->label, ll, nr, a->ttft.median, real[TTFT], rel(a->ttft.median, real[TTFT]), a->tpot.median,
           real[TPOT], rel(a->tpot.median, real[TPOT]), a->e2el.median, real[E2EL], rel(a->e2el.median, real[E2EL]),
           a->output_throughput, real[OUT], rel(a->output_throughput, real[OUT]));
    fflush(stdout);
    cJSON *r = cJSON_AddObjectToObject(pj, "real");
    cJSON_AddNumberToObject(r, "runs", nr);
    cJSON_AddNumberToObject(r, "median_ttft_ms", real[TTFT]);
    cJSON_AddNumberToObject(r, "median_tpot_ms", real[TPOT]);
    cJSON_AddNumberToObject(r, "median_itl_ms", real[ITL]);
    cJSON_AddNumberToObject(r, "median_e2el_ms", real[E2EL]);
    cJSON_AddNumberToObject(r, "output_throughput", real[OUT]);
    cJSON_AddNumberToObject(r, "duration_s", real[DUR]);
    return 0;
}

/* The series a real deployment's /metrics gives for prefix caching and its lower tiers,
 * and for a disk store's puts and gets (server/metrics.c names), from the simulated
 * counters, so that `pdserve report`'s tables read simulated points as they read real
 * ones. disk: the setup's medium is the disk (the only store whose instances count
 * their ops). */
static int sim_metrics(const sim_stats *st, bool disk, study_metric *m, int cap) {
    int n = 0;
#define MET(v, ...) \
    do { \
        if (n < cap) { \
            snprintf(m[n].series, sizeof m[n].series, __VA_ARGS__); \
            m[n++].value = (double)(v); \
        } \
    } while (0)
    if (disk && st->store_puts > 0) { /* the store's ops, as a disk deployment's instances count them */
        MET(st->store_puts, "pdserve_kv_store_puts_total{sim=\"1\"}");
        MET(st->store_put_s, "pdserve_kv_store_put_seconds_total{sim=\"1\"}");
    }
    if (disk && st->store_gets > 0) {
        MET(st->store_gets, "pdserve_kv_store_gets_total{sim=\"1\"}");
        MET(st->store_get_s, "pdserve_kv_store_get_seconds_total{sim=\"1\"}");
    }
    if (st->prefix_queries == 0) return n;
    MET(st->prefix_queries, "pdserve_prefix_cache_queries_total{sim=\"1\"}");
    MET(st->prefix_hits, "pdserve_prefix_cache_hits_total{sim=\"1\"}");
    const prefix_tier_stats *t = &st->tiers;
    if (t->n_tiers == 0) return n;
    MET(st->prefix_hits, "pdserve_prefix_cache_tier_hits_total{sim=\"1\",tier=\"gpu\"}");
    for (int k = 0; k < t->n_tiers; k++) {
        MET(t->tier[k].hit_tokens, "pdserve_prefix_cache_tier_hits_total{sim=\"1\",tier=\"%s\"}", t->tier[k].name);
        MET(t->tier[k].offloaded_blocks, "pdserve_kv_offload_blocks_total{sim=\"1\",tier=\"%s\"}", t->tier[k].name);
        MET(t->tier[k].loaded_blocks, "pdserve_kv_offload_loaded_blocks_total{sim=\"1\",tier=\"%s\"}",
            t->tier[k].name);
    }
    MET(t->decisions_load, "pdserve_kv_offload_decisions_total{sim=\"1\",decision=\"load\"}");
    MET(t->decisions_recompute, "pdserve_kv_offload_decisions_total{sim=\"1\",decision=\"recompute\"}");
    MET(t->loaded_tokens, "pdserve_kv_offload_loaded_tokens_total{sim=\"1\"}");
    MET(t->offload_dropped, "pdserve_kv_offload_dropped_total{sim=\"1\"}");
    MET(st->tier_hook_s, "pdserve_kv_offload_hook_seconds_total{sim=\"1\"}");
#undef MET
    return n;
}

static int record_point(sim_cli *c, const sim_plan_setup *su, const sim_load *l, const double clk[2],
                        const sim_config *cfg, double mean_rate, bench_config *bc, bench_result *r,
                        const sim_stats *st, double t_start, char *err, size_t errlen) {
    char ll[48];
    load_label(l, ll, sizeof ll);
    study_kv opts[2] = {{"medium", (char *)(su->medium[0] && cfg->n_colocated == 0 ? su->medium : "none")},
                        {"router", (char *)(cfg->router == SIM_ROUTER_LEAST_LOADED     ? "least-loaded"
                                            : cfg->router == SIM_ROUTER_PREFIX_AFFINITY ? "prefix-affinity"
                                                                                         : "round-robin")}};
    study_setup ss = {.label = (char *)su->label, .name = (char *)su->label, .opts = opts, .n_opts = 2};
    study_point pt;
    memset(&pt, 0, sizeof pt);
    pt.index = c->index;
    pt.setup = &ss;
    pt.load.kind = l->batch ? STUDY_LOAD_BATCH : STUDY_LOAD_RATE;
    pt.load.batch_size = l->batch ? l->num_prompts : 0;
    pt.load.rate = mean_rate;
    pt.load.burstiness = l->burstiness;
    pt.load.num_prompts = r->n;
    pt.clock.prefill_mhz = (int)clk[0];
    pt.clock.decode_mhz = (int)clk[1];
    char key[1024];
    snprintf(key, sizeof key, "sim|%s|%s|%s|%g/%g|seed%llu|%s", c->pl->name, su->label, ll, clk[0], clk[1],
             (unsigned long long)c->pl->seed, c->prof->device);
    size_t kl = PD_MIN(strlen(key), sizeof pt.key - 1);
    memcpy(pt.key, key, kl);
    pt.key[kl] = 0;
    snprintf(pt.label, sizeof pt.label, "sim %s %s", su->label, ll);
    bc->request_rate = mean_rate;
    study_idle idle;
    fill_energy(r, &idle, st, cfg, c->prof);
    const bench_dataset_opts *ds = su->has_dataset ? &su->dataset : &c->pl->dataset;
    study_run_info ri = {.plan_name = c->pl->name, .model = c->prof->model, .base_url = "sim", .hw = &c->hw,
                         .started_unix = t_start, .ended_unix = time_wall_s(), .status = STUDY_STATUS_OK,
                         .simulated = true,
                         .dataset = su->has_dataset ? su->dataset_name : bench_dataset_kind_name(ds->kind),
                         .input_len = ds->kind == BENCH_DATASET_MOONCAKE_SYNTHETIC ? ds->mooncake_input_len
                                      : ds->kind == BENCH_DATASET_PREFIX_REPETITION ? ds->prefix_len + ds->suffix_len
                                                                                      : ds->random_input_len,
                         .output_len = ds->kind == BENCH_DATASET_MOONCAKE_SYNTHETIC ? ds->mooncake_output_len
                                       : ds->kind == BENCH_DATASET_PREFIX_REPETITION ? ds->prefix_output_len
                                                                                       : ds->random_output_len,
                         .range_ratio = ds->random_range_ratio, .seed = c->pl->seed};
    study_metric met[32];
    ri.n_metrics = sim_metrics(st, cfg->medium && !strcmp(cfg->medium->name, "disk"), met, (int)PD_ARRAY_LEN(met));
    ri.metrics = met;
    return study_db_record(c->db, &pt, &ri, bc, r, idle.seconds > 0 ? &idle : NULL, err, errlen) < 0 ? -1 : 0;
}

static int run_point(sim_cli *c, const sim_plan_setup *su, const sim_load *l, const double clk[2], char *err,
                     size_t errlen) {
    const sim_plan *pl = c->pl;
    const sim_profile *prof = c->prof;
    bench_dataset d = {0};
    sim_request *reqs = NULL;
    double mean_rate;
    double t_start = time_wall_s();
    if (make_requests(pl, su, l, c->tok, &c->btok, &d, &reqs, &mean_rate, err, errlen) != 0) {
        bench_dataset_free(&d);
        return -1;
    }
    sim_medium mstore, mpipe;
    sim_config cfg = {.n_colocated = su->n_colocated, .n_prefill = su->n_prefill, .n_decode = su->n_decode,
                      .router = su->has_router ? su->router : pl->router, .prefill_mhz = clk[0], .decode_mhz = clk[1],
                      .record_tokens = pl->record_tokens, .layerwise = su->layerwise,
                      .prefix_caching = su->prefix_caching >= 0 ? su->prefix_caching > 0 : pl->enable_prefix_caching,
                      .kv_timeout_s = su->kv_timeout_s > 0 ? su->kv_timeout_s : pl->kv_timeout_s,
                      .cpu_contention = c->contention, .control_path = c->control_path,
                      .serving_path = c->serving_path, .serving_cpu = c->serving_cpu,
                      .step_factor = c->step_factor, .contention_kinds = c->contention_kinds, .tier_cpu = c->tier_cpu,
                      .power_cap = c->power_cap, .gpu_share = c->gpu_share,
                      .gpu_share_equal = c->gpu_share_equal, .gpu_share_lighter = c->gpu_share_lighter,
                      .gpu_share_sum = c->gpu_share_sum, .own_copies = c->own_copies, .devices = su->n_devices ? su->devices : NULL,
                      .n_devices = su->n_devices};
    if (cfg.prefix_caching) cfg.tiers = su->tiers;
    if (su->n_prefill > 0) {
        cfg.medium = sim_medium_find(prof, su->medium, &mstore);
        if (!cfg.medium) {
            pd_errorf(err, errlen, "setup %s: unknown medium '%s' (not in the profile and no default)", su->label,
                      su->medium);
            free(reqs);
            bench_dataset_free(&d);
            return -1;
        }
        bool store = sim_medium_is_store(cfg.medium);
        if (c->store_overlap == 1 && cfg.medium->pipe_n > 0) { /* the pipelined train's factors */
            mpipe = *cfg.medium;
            mpipe.put_overlap = mpipe.put_overlap_pipe;
            mpipe.get_overlap = mpipe.get_overlap_pipe;
            cfg.medium = &mpipe;
        } else if (c->store_overlap == 2 && store) { /* a put and a get share the device equally */
            mpipe = *cfg.medium;
            mpipe.put_overlap = mpipe.get_overlap = 2;
            cfg.medium = &mpipe;
        }
        if (c->scale_medium[0] && !strcmp(c->scale_medium, cfg.medium->name)) { /* --medium-scale */
            if (cfg.medium != &mpipe) mpipe = *cfg.medium;
            mpipe.latency_s *= c->scale_k;
            mpipe.bandwidth /= c->scale_k;
            cfg.medium = &mpipe;
            c->scale_used = true;
        }
    }
    /* the setup's kv-cache-memory, else the plan's, else the profile's pool */
    double kv_bytes = su->kv_cache_bytes > 0 ? su->kv_cache_bytes : pl->kv_cache_bytes;
    long long kv_tokens = kv_bytes > 0 && prof->kv_bytes_per_token > 0 ? (long long)(kv_bytes / (double)prof->kv_bytes_per_token)
                          : pl->kv_cache_tokens ? pl->kv_cache_tokens
                          : prof->kv_cache_tokens ? prof->kv_cache_tokens : 1000000;
    cfg.sched = (sched_config){.num_blocks = (int)PD_MAX(kv_tokens / pl->block_size, 1), .block_size = pl->block_size,
                               .max_num_seqs = pl->max_num_seqs, .max_num_batched_tokens = pl->max_num_batched_tokens,
                               .enable_chunked_prefill = pl->enable_chunked_prefill};
    bench_config bc;
    bench_config_default(&bc);
    bc.seed = pl->seed;
    bc.goodput_ttft_ms = pl->goodput_ttft_ms;
    bc.goodput_tpot_ms = pl->goodput_tpot_ms;
    bc.goodput_e2el_ms = pl->goodput_e2el_ms;
    bc.burstiness = l->burstiness;
    bc.request_rate = mean_rate;
    bench_result *r = NULL;
    sim_stats st;
    int rc = sim_run(&cfg, prof, reqs, d.n, &bc, &r, &st, err, errlen);
    char ll[48], ck[48];
    load_label(l, ll, sizeof ll);
    if (clk[0] > 0 || clk[1] > 0) snprintf(ck, sizeof ck, "%g/%g", clk[0], clk[1]);
    else snprintf(ck, sizeof ck, "profiled");
    if (rc == 0) {
        const bench_summary *s = &r->sum;
        double tok = (double)(s->total_input + s->total_output);
        char jt[32];
        if (st.energy_j >= 0) snprintf(jt, sizeof jt, "%.4g", st.energy_j / PD_MAX(tok, 1));
        else snprintf(jt, sizeof jt, "n/m");
        printf("| %-22s | %-8s | %-11s | %9.2f | %9.2f | %8.3f | %8.3f | %8.3f | %10.1f | %9s | %7llu | %6.2f |\n",
               su->label, ll, ck, s->ttft.median, pct(&s->ttft, &bc, 99), s->tpot.median, pct(&s->tpot, &bc, 99),
               s->itl.median, s->output_throughput, jt, (unsigned long long)st.preemptions, st.wall_s);
        if (st.timed_out > 0 || st.kv_full > 0)
            log_warn("sim: %s %s: %d of %d requests failed: %d at the router's deadline (HTTP 504), %d at the decode "
                     "instance's reservation, its KV pool full (HTTP 503 kv_cache_full)", su->label, ll,
                     st.timed_out + st.kv_full, d.n, st.timed_out, st.kv_full);
        if (st.power_capped && !c->quiet)
            log_info("sim: %s %s: power cap: busy-weighted SM clock %.0f MHz (%s), %.0f MHz (decode); %.2f "
                     "instance-s of steps below the nominal clock", su->label, ll, st.mhz_prefill,
                     cfg.n_colocated > 0 ? "colocated" : "prefill", st.mhz_decode, st.capped_s);
        fflush(stdout);
        cJSON *pj = point_json(su->label, ll, clk, &bc, s, &st);
        cJSON_AddItemToArray(c->points, pj);
        if (c->vmodel && su->n_colocated == 1)
            rc = validate_point(c, su, ll, &cfg, reqs, d.n, &bc, r, &st, pj, err, errlen);
        if (rc == 0 && c->db) rc = record_point(c, su, l, clk, &cfg, mean_rate, &bc, r, &st, t_start, err, errlen);
    }
    c->index++;
    bench_result_free(r);
    free(reqs);
    bench_dataset_free(&d);
    return rc;
}

/* --price-traces: the step factor that a deployment's step traces imply against a
 * profile (sim_step_factor_from_traces, the traces left in place), on stdout. */
static int price_traces(const char *dir, const char *prefix, const char *profile_path, int n_pos, const char *write_to,
                        const char *deployment) {
    bool dis = deployment && !strcmp(deployment, "disaggregated");
    if (deployment && !dis && strcmp(deployment, "colocated") != 0) {
        fprintf(stderr, "pdserve sim: --deployment must be colocated or disaggregated, got '%s'\n", deployment);
        return 2;
    }
    if (n_pos != 0 || !profile_path) {
        fprintf(stderr, "pdserve sim: --price-traces takes --profile and no plan (see --help)\n");
        return 2;
    }
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "pdserve sim: --price-traces %s: %s\n", dir, strerror(errno));
        return 1;
    }
    closedir(d);
    char err[1024];
    sim_profile prof;
    if (sim_profile_load(profile_path, &prof, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve sim: %s\n", err);
        return 1;
    }
    sim_step_factor sf = {.decode = 1};
    char what[600];
    snprintf(what, sizeof what, "traces in %s", dir);
    sim_step_factor_from_traces(dir, prefix, &prof, &sf, what, false);
    int rc = 0;
    if (!sf.measured) {
        fprintf(stderr, "pdserve sim: %s%s%s: too few steps that price as prefill or decode (or no step "
                        "trace there; the profile must have prefill and decode grids)\n", dir,
                prefix[0] ? "/" : "", prefix);
        rc = 1;
    } else {
        printf("step factor of %s%s%s against %s (%s, %s): measured / priced\n", dir, prefix[0] ? "/" : "", prefix,
               profile_path, prof.model, prof.device);
        for (int k = 0; k < sf.n_prefill; k++)
            printf("  prefill %6.0f rows  x%.3f\n", sf.prefill_tokens[k], sf.prefill[k]);
        for (int k = 0; k < sf.n_after; k++)
            printf("  prefill %6.0f rows  x%.3f  (continuing a prompt)\n", sf.after_tokens[k], sf.after[k]);
        for (int k = 0; k < sf.n_first; k++)
            printf("  prefill %6.0f rows  x%.3f  (starting a prompt)\n", sf.first_tokens[k], sf.first[k]);
        printf("  decode            x%.3f\n", sf.decode);
        if (write_to) {
            /* the profile with this deployment's steps calibrated on the traces */
            sim_serving_path *sp = dis ? &prof.serving.disaggregated : &prof.serving.colocated;
            sp->steps = sf;
            char src[sizeof prof.serving.source];
            snprintf(src, sizeof src, "%.200s; %s steps from the step traces in %.120s", prof.serving.source,
                     dis ? "disaggregated" : "colocated", dir);
            memcpy(prof.serving.source, src, sizeof src);
            if (sim_profile_save(&prof, write_to, err, sizeof err) != 0) {
                fprintf(stderr, "pdserve sim: %s\n", err);
                rc = 1;
            } else {
                printf("written: %s (serving.%s.steps)\n", write_to, dis ? "disaggregated" : "colocated");
            }
        }
    }
    sim_profile_free(&prof);
    return rc;
}

int cmd_sim(int argc, char **argv) {
    const char *profile_path = NULL, *db_path = NULL, *json_path = NULL, *router = NULL;
    const char *vmodel = NULL, *price_dir = NULL, *trace_prefix = NULL, *write_profile = NULL, *deployment = NULL,
               *store_overlap = "rounds", *only_setups = NULL, *tok_dir = NULL, *medium_scale = NULL;
    int seed = -1, threads = 0, vrepeats = 3;
    bool quiet = false, no_contention = false, no_control = false, no_serving = false, no_serving_cpu = false,
         no_step_factor = false, step_factor = false, no_kinds = false, no_tier_cpu = false, no_power_cap = false,
         power_cap = false, no_gpu_share = false, gpu_share_equal = false,
         gpu_share_lighter = false, gpu_share_sum = false, no_own_copies = false;
    cli_opt opts[] = {
        {"profile", OPT_STRING, &profile_path, "cost profile from `pdserve profile` (default: the plan's)", "FILE"},
        {"db", OPT_STRING, &db_path, "results database to record the points in (marked simulated)", "FILE"},
        {"json", OPT_STRING, &json_path, "write the points' summaries as a JSON array", "FILE"},
        {"router", OPT_STRING, &router, "round-robin, least-loaded or prefix-affinity (default: the plan's)", "POLICY"},
        {"setups", OPT_STRING, &only_setups, "simulate only these setup labels (comma-separated), as sweep --setups",
         "LIST"},
        {"seed", OPT_INT, &seed, "override the plan's seed", "S"},
        {"tokenizer", OPT_STRING, &tok_dir,
         "the prompts as `pdserve sweep --tokenizer DIR` sends them and the server encodes them (text in the "
         "model's tokens, special tokens added): their real lengths, blocks and ids (default: token ids)", "DIR"},
        {"quiet", OPT_FLAG, &quiet, "no log lines", NULL},
        {"no-cpu-contention", OPT_FLAG, &no_contention,
         "CPU profiles: price each instance's steps as if it had the host to itself", NULL},
        {"no-control-path", OPT_FLAG, &no_control,
         "disaggregated: leave out the medium's measured control path (reserve, ticket, take)", NULL},
        {"no-serving-path", OPT_FLAG, &no_serving,
         "leave out the profile's serving path (HTTP, tokenization, router hops) of each request", NULL},
        {"no-serving-cpu", OPT_FLAG, &no_serving_cpu,
         "CPU profiles: leave the serving path's measured CPU (HTTP threads, router, client) out of the "
         "contention for the host's cores", NULL},
        {"no-contention-kinds", OPT_FLAG, &no_kinds,
         "CPU profiles: every step beside others slows by the reference pair's curve, whatever the steps' kinds "
         "(contention.kinds)", NULL},
        {"no-tier-cpu", OPT_FLAG, &no_tier_cpu,
         "CPU profiles: leave the lower KV tiers' writer threads out of the contention for the host's cores", NULL},
        {"no-gpu-share", OPT_FLAG, &no_gpu_share,
         "GPU profiles: price the steps of instances that a setup's device-list puts on one GPU as if each had "
         "it alone (default: time-sliced, as the profile's shared-device pairs measured each kind of step and the cpu "
         "store's copies beside the others, or each at 1/k of its speed while k of them are in a step)", NULL},
        {"gpu-share-equal", OPT_FLAG, &gpu_share_equal,
         "GPU profiles: instances on one GPU in equal turns (1/k each), not as the profile's shared-device pairs "
         "measured each kind beside the other, nor their copies and power (gpu_share)", NULL},
        {"gpu-share-lighter", OPT_FLAG, &gpu_share_lighter,
         "GPU profiles: a shared GPU's pairs with a decode in them by the decode step's weight, interpolated between "
         "the profile's pairs and its lighter decode's (gpu_share.lighter; docs/simulator.md, \"A shared GPU\"); "
         "default: the pairs as measured at the profile's shape", NULL},
        {"gpu-share-sum", OPT_FLAG, &gpu_share_sum,
         "GPU profiles: on a shared GPU, another instance's step and its cpu store copy each slow a step, summed "
         "(default: that instance's heavier one alone, as the GPU time-slices processes and one process's step and "
         "copy share its turn; docs/simulator.md, \"A shared GPU\")", NULL},
        {"no-own-copies", OPT_FLAG, &no_own_copies,
         "GPU profiles: a cpu store's puts and gets (whole transfers) do not slow their own instance's steps, nor "
         "the steps them (default: as the profile's gpu_share.own_steps and own_copies measured a copy on another "
         "thread beside the process's own steps, where it has them)", NULL},
        {"no-step-factor", OPT_FLAG, &no_step_factor,
         "price every step as the profile's grid does, not by the factor its serving deployment measured "
         "(serving.*.steps; the default for GPU profiles)", NULL},
        {"step-factor", OPT_FLAG, &step_factor,
         "price steps by that factor on a GPU profile too (off there by default: its lone serving requests ran "
         "at boost clocks, its grid at the clocks of back-to-back steps; docs/simulator.md)", NULL},
        {"store-overlap", OPT_STRING, &store_overlap,
         "stores (cpu, disk): a put beside a get, and the get beside it, slowed as the profile's rounds measured "
         "them (rounds, the default: one overlap at a time) or its pipelined train (pipelined: each put beside the "
         "previous request's get, back to back; where the profile has none, the rounds), or each at half its speed "
         "alone (fair: equal shares of the device, whatever the profile measured; two gets at once still as "
         "measured; docs/simulator.md, \"The store's ops\")", "rounds|pipelined|fair"},
        {"medium-scale", OPT_STRING, &medium_scale,
         "that medium's transfers (its latency and bandwidth; its overlap factors are relative) take K times "
         "the profile's time, e.g. disk=1.4 where a deployment's disk ran 1.4x slower than the profiler's: "
         "`pdserve report`'s KV store ops table gives the ratio of a real point (docs/simulator.md, \"The "
         "store's ops\")", "NAME=K"},
        {"power-cap", OPT_FLAG, &power_cap,
         "run each GPU step at the clock the profile's enforced power limit allows (power.cap; off by default: "
         "on an H200 it overstated the throttled steps' time, docs/simulator.md)", NULL},
        {"no-power-cap", OPT_FLAG, &no_power_cap, "every step at its nominal clock (the default; overrides "
         "--power-cap)", NULL},
        {"price-traces", OPT_STRING, &price_dir,
         "price the steps of the step traces in DIR (serve --step-trace, one file per instance of one "
         "deployment) by --profile, print the step factor they imply and exit; no plan", "DIR"},
        {"write-profile", OPT_STRING, &write_profile, "with --price-traces: write the profile with that factor as "
         "its --deployment's steps (calibration from a real run's traces)", "FILE"},
        {"deployment", OPT_STRING, &deployment, "with --write-profile: colocated (default) or disaggregated", "D"},
        {"trace-prefix", OPT_STRING, &trace_prefix, "with --price-traces: only the files whose names start "
         "so (default: every file in DIR)", "PREFIX"},
        {"validate-model", OPT_STRING, &vmodel,
         "also run each co-1gpu point through the real engine on the CPU with this model (dummy "
         "weights) and print simulated against real", "DIR|preset:NAME"},
        {"validate-repeats", OPT_INT, &vrepeats, "real runs per validated point, medians compared (default 3)", "N"},
        {"threads", OPT_INT, &threads, "CPU threads of --validate-model (default: all, as the profile)", "N"},
    };
    const char *pos[1];
    int n_pos;
    bool help;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), USAGE, pos, 1, &n_pos, &help) != 0) return 2;
    if (help) return 0;
    if (price_dir)
        return price_traces(price_dir, trace_prefix ? trace_prefix : "", profile_path, n_pos, write_profile, deployment);
    if (n_pos != 1) {
        fprintf(stderr, "pdserve sim: needs a plan file (see --help)\n");
        return 2;
    }
    int overlap_mode = !strcmp(store_overlap, "rounds") ? 0 : !strcmp(store_overlap, "pipelined") ? 1
                       : !strcmp(store_overlap, "fair")    ? 2
                                                           : -1;
    if (overlap_mode < 0) {
        fprintf(stderr, "pdserve sim: --store-overlap must be rounds, pipelined or fair, not '%s'\n", store_overlap);
        return 2;
    }
    char scale_name[32] = "";
    double scale_k = 1;
    if (medium_scale) {
        const char *eq = strchr(medium_scale, '=');
        char *end = NULL;
        if (eq) scale_k = strtod(eq + 1, &end);
        if (!eq || eq == medium_scale || (size_t)(eq - medium_scale) >= sizeof scale_name || !end || *end ||
            end == eq + 1 || !(scale_k > 0) || !isfinite(scale_k)) {
            fprintf(stderr, "pdserve sim: --medium-scale must be NAME=K with K > 0 (e.g. disk=1.4), not '%s'\n",
                    medium_scale);
            return 2;
        }
        snprintf(scale_name, sizeof scale_name, "%.*s", (int)(eq - medium_scale), medium_scale);
    }
    char err[1024];
    sim_plan pl;
    if (sim_plan_load(pos[0], &pl, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve sim: %s\n", err);
        return 1;
    }
    if (only_setups) { /* as the sweep's: every label the plan's */
        const char **names = xcalloc((size_t)PD_MAX(pl.n_setups, 1), sizeof *names);
        char bad[128], known[512];
        for (int i = 0; i < pl.n_setups; i++) names[i] = pl.setups[i].label;
        int bad_rc = util_list_unknown(only_setups, names, pl.n_setups, bad, sizeof bad, known, sizeof known);
        free(names);
        if (bad_rc != 0) {
            fprintf(stderr, "pdserve sim: --setups: no setup labelled \"%s\" in plan %s (its setups: %s)\n", bad,
                    pl.name, known);
            sim_plan_free(&pl);
            return 2;
        }
    }
    if (seed >= 0) pl.seed = pl.dataset.seed = (uint64_t)seed;
    if (router && sim_router_parse(router, &pl.router) != 0) {
        fprintf(stderr, "pdserve sim: --router must be round-robin, least-loaded or prefix-affinity\n");
        sim_plan_free(&pl);
        return 2;
    }
    const char *pp = profile_path ? profile_path : pl.profile[0] ? pl.profile : NULL;
    if (!pp) {
        fprintf(stderr, "pdserve sim: no profile: pass --profile or set \"profile\" in the plan\n");
        sim_plan_free(&pl);
        return 2;
    }
    sim_profile prof;
    if (sim_profile_load(pp, &prof, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve sim: %s\n", err);
        sim_plan_free(&pl);
        return 1;
    }
    if (!quiet)
        log_info("sim: plan %s: %d setups x %d loads x %d clocks; profile %s on %s (%s)", pl.name, pl.n_setups,
                 pl.n_loads, pl.n_clocks, prof.model, prof.device, prof.date);
    if (!quiet) {
        const sim_serving *sv = &prof.serving;
        if (sv->colocated.measured || sv->disaggregated.measured)
            log_info("sim: serving path per request: colocated %.3f ms + %.3f us/token, router hop %.3f ms + %.3f "
                     "us/token, disaggregated %.3f ms + %.3f us/token%s", sv->colocated.fixed_s * 1e3,
                     sv->colocated.s_per_token * 1e6, sv->router.fixed_s * 1e3, sv->router.s_per_token * 1e6,
                     sv->disaggregated.fixed_s * 1e3, sv->disaggregated.s_per_token * 1e6,
                     no_serving ? " (left out: --no-serving-path)" : "");
        if (prof.n_mixed > 0) log_info("sim: %d measured mixed steps price what a mixed step costs beyond its parts",
                                       prof.n_mixed);
        const sim_power_cap_data *cap = &prof.power.cap;
        if (cap->limit_w > 0 && cap->n_points > 0 && prof.clock.base_mhz > 0)
            log_info("sim: power cap: enforced limit %.0f W, %d measured shape(s), window %.3g s (%s)%s", cap->limit_w,
                     cap->n_points, cap->window_s > 0 ? cap->window_s : SIM_POWER_CAP_WINDOW_S,
                     cap->window_s > 0 ? "estimated by the profile" : "default",
                     power_cap && !no_power_cap ? "" : " (left out: pass --power-cap to model it)");
    }
    /* a measured disk without its sustained train is priced at its best-of curve: a
     * serving run's disk is slower on most hosts (docs/simulator.md, "The disk's
     * sustained speed") */
    for (int i = 0; i < pl.n_setups; i++) {
        if (strcmp(pl.setups[i].medium, "disk") || pl.setups[i].skip[0] ||
            !util_list_has(only_setups, pl.setups[i].label))
            continue;
        for (int j = 0; j < prof.n_mediums; j++) {
            const sim_medium *m = &prof.mediums[j];
            if (!strcmp(m->name, "disk") && m->n_points >= 2 && m->train_n <= 0 && !strncmp(m->source, "measured", 8))
                log_warn("sim: the profile's disk was timed without its sustained train (the profile's note: "
                         "\"%s\"): its transfers are priced at the curve's best, faster than a serving run's disk "
                         "on most hosts",
                         prof.mediums_note[0] ? prof.mediums_note : "none");
        }
        break;
    }
    /* a gpu medium timed within one GPU prices a link between two as that copy, and the
     * other way round */
    for (int i = 0; i < pl.n_setups; i++) {
        const sim_plan_setup *su = &pl.setups[i];
        if (strcmp(su->medium, "gpu") || su->skip[0] || su->n_devices < 2 || !util_list_has(only_setups, su->label))
            continue;
        const char *want = strcmp(su->devices[0], su->devices[1]) ? "two devices" : "one device";
        for (int j = 0; j < prof.n_mediums; j++)
            if (!strcmp(prof.mediums[j].name, "gpu") && prof.mediums[j].between[0] &&
                strcmp(prof.mediums[j].between, want))
                log_warn("sim: %s's instances are on %s, the profile's gpu medium was timed with its two sides "
                         "on %s: its transfers are priced as that (pdserve profile --medium-peer-device)",
                         su->label, want, prof.mediums[j].between);
    }
    for (int k = 0; k < pl.n_clocks; k++)
        if ((pl.clocks[k][0] > 0 || pl.clocks[k][1] > 0) && !(prof.clock.base_mhz > 0))
            log_warn("sim: the profile has no base clock (clock.base_mhz): clocks %g/%g are simulated as profiled",
                     pl.clocks[k][0], pl.clocks[k][1]);
    if (prof.gpu_share.own_measured && !no_own_copies) {
        char cap[48];
        log_info("sim: a cpu store's copies slow their own instance's steps as the profile measured them (host "
                 "copies' CTAs: %s): they hold for deployments copying the same way (PDSERVE_KV_XFER_HOST_CTAS)",
                 sim_host_ctas_text(prof.gpu_share.own_host_ctas, cap, sizeof cap));
    }
    /* the step factor: on by default for CPU profiles only (sim_step_factor_default) */
    bool by_default = sim_step_factor_default(&prof);
    bool use_step_factor = !no_step_factor && (step_factor || by_default);
    if (!by_default && !no_step_factor && !step_factor && (prof.serving.colocated.steps.measured ||
                                                           prof.serving.disaggregated.steps.measured))
        log_info("sim: a GPU profile: steps priced as its grid measured them, not by its serving deployment's "
                 "step factor (--step-factor to use it)");
    sim_cli c = {.pl = &pl, .prof = &prof, .points = cJSON_CreateArray(), .quiet = quiet,
                 .vrepeats = vrepeats, .contention = !no_contention, .control_path = !no_control,
                 .serving_path = !no_serving, .serving_cpu = !no_serving_cpu, .step_factor = use_step_factor,
                 .contention_kinds = !no_kinds, .tier_cpu = !no_tier_cpu, .gpu_share = !no_gpu_share,
                 .gpu_share_equal = gpu_share_equal, .gpu_share_lighter = gpu_share_lighter,
                 .gpu_share_sum = gpu_share_sum, .own_copies = !no_own_copies, .power_cap = power_cap && !no_power_cap,
                 .store_overlap = overlap_mode, .scale_k = scale_k};
    snprintf(c.scale_medium, sizeof c.scale_medium, "%s", scale_name);
    int rc = 0;
    model_files vfiles;
    backend *vbe = NULL;
    bool vopen = false;
    tokenizer *tk = NULL;
    if (tok_dir) {
        if (!(tk = cli_load_tokenizer(NULL, tok_dir, err, sizeof err))) {
            fprintf(stderr, "pdserve sim: --tokenizer: %s\n", err);
            rc = 1;
            goto out;
        }
        c.tok = tk;
        bench_tokenizer_wrap(&c.btok, tk);
    }
    if (vmodel) {
        if (model_files_open(vmodel, "dummy", &vfiles, err, sizeof err) != 0) {
            fprintf(stderr, "pdserve sim: --validate-model: %s\n", err);
            rc = 1;
            goto out;
        }
        vopen = true;
        vbe = backend_cpu_create(threads);
        c.vmodel = model_load(vbe, &vfiles, 0, err, sizeof err);
        if (!c.vmodel) {
            fprintf(stderr, "pdserve sim: --validate-model: %s\n", err);
            rc = 1;
            goto out;
        }
        /* prompts must be ids of this model's vocabulary */
        if (pl.dataset.random_vocab_size > c.vmodel->cfg.vocab_size) pl.dataset.random_vocab_size = c.vmodel->cfg.vocab_size;
    }
    if (db_path) {
        study_hw_probe(&c.hw);
        if (study_db_open(db_path, &c.db, err, sizeof err) != 0) {
            fprintf(stderr, "pdserve sim: %s\n", err);
            rc = 1;
            goto out;
        }
        study_db_set_meta(c.db, "sim_plan", pl.json, err, sizeof err);
    }
    print_header();
    for (int s = 0; s < pl.n_setups && rc == 0; s++) {
        if (!util_list_has(only_setups, pl.setups[s].label)) continue;
        if (pl.setups[s].skip[0]) {
            printf("| %-22s | not simulated: %s\n", pl.setups[s].label, pl.setups[s].skip);
            continue;
        }
        for (int l = 0; l < pl.n_loads && rc == 0; l++)
            for (int k = 0; k < pl.n_clocks && rc == 0; k++) {
                /* a colocated instance runs both stages at one clock: a mixed pair is
                 * a disaggregated point only (as the sweep skips it) */
                if (pl.setups[s].n_colocated > 0 && pl.clocks[k][0] != pl.clocks[k][1]) continue;
                if (run_point(&c, &pl.setups[s], &pl.loads[l], pl.clocks[k], err, sizeof err) != 0) {
                    fprintf(stderr, "pdserve sim: %s\n", err);
                    rc = 1;
                }
            }
    }
    if (rc == 0 && c.scale_medium[0] && !c.scale_used)
        log_warn("sim: --medium-scale %s=%g: no simulated setup transfers over medium '%s'", c.scale_medium, c.scale_k,
                 c.scale_medium);
    if (rc == 0 && json_path) {
        char *txt = cJSON_Print(c.points);
        if (util_write_file(json_path, txt, strlen(txt), err, sizeof err) != 0) {
            fprintf(stderr, "pdserve sim: %s\n", err);
            rc = 1;
        }
        cJSON_free(txt);
    }
out:
    if (tk) tokenizer_free(tk);
    model_free(c.vmodel);
    if (vbe) backend_destroy(vbe);
    if (vopen) model_files_close(&vfiles);
    study_db_close(c.db);
    cJSON_Delete(c.points);
    sim_profile_free(&prof);
    sim_plan_free(&pl);
    return rc;
}
