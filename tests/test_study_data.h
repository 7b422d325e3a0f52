/* test_study_data.h: synthetic bench results and a synthetic results database for the
 * study tests (test_study.c, test_study_report.c, and through `test_study_report
 * --make-db PATH` the browser test). Header-only. */
#ifndef PD_TEST_STUDY_DATA_H
#define PD_TEST_STUDY_DATA_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "study/study.h"
#include "util/util.h"

/* n requests, all sent at t = 0: request i has its first token at ttft_s * (1 + i/n)
 * and out_len tokens itl_s apart. Energy counters: two GPUs (prefill, decode) using
 * j0 and j1 joules, unless j0 < 0 (energy not measured). */
/* Where each request's TTFT went (requests.server_phases), as a colocated server says
 * it (parse 1 ms, queue 30%, prefill the rest but 10%: other = 10% of the TTFT) or the
 * simulator (path 0, queue 30%, prefill 70%). */
static void tsd_phases(bench_result *r, bool sim) {
    for (int i = 0; i < r->n; i++) {
        bench_record *x = &r->recs[i];
        char b[160];
        double t = x->ttft_s;
        if (sim) snprintf(b, sizeof b, "{\"path\":0,\"queue\":%.9f,\"prefill\":%.9f}", 0.3 * t, 0.7 * t);
        else snprintf(b, sizeof b, "{\"parse\":0.001,\"queue\":%.9f,\"prefill\":%.9f}", 0.3 * t, 0.6 * t - 0.001);
        free(x->server_phases);
        x->server_phases = xstrdup(b);
    }
}

static bench_result *tsd_result(int n, int in_len, int out_len, double ttft_s, double itl_s, double j0, double j1) {
    bench_result *r = xcalloc(1, sizeof *r);
    snprintf(r->model, sizeof r->model, "synthetic");
    r->n = n;
    r->recs = xcalloc((size_t)n, sizeof *r->recs);
    double end = 0;
    for (int i = 0; i < n; i++) {
        bench_record *x = &r->recs[i];
        x->success = true;
        x->prompt_len = in_len;
        x->output_len = out_len;
        x->expected_output_len = out_len;
        x->start_s = 0;
        x->ttft_s = ttft_s * (1.0 + (double)i / n);
        x->n_tokens = x->cap_tokens = out_len;
        x->token_s = xmalloc(sizeof(double) * (size_t)out_len);
        for (int k = 0; k < out_len; k++) x->token_s[k] = x->ttft_s + k * itl_s;
        x->e2el_s = x->token_s[out_len - 1] + 0.0005;
        end = PD_MAX(end, x->e2el_s);
    }
    bench_config c;
    bench_config_default(&c);
    r->sum.energy_j = -1;
    bench_summarize(&c, r, end);
    if (j0 >= 0) {
        r->energy.n = 2;
        snprintf(r->energy.s[0].key, sizeof r->energy.s[0].key, "pdserve_gpu_energy_joules{gpu=\"0\",role=\"prefill\"}");
        snprintf(r->energy.s[0].role, sizeof r->energy.s[0].role, "prefill");
        snprintf(r->energy.s[1].key, sizeof r->energy.s[1].key, "pdserve_gpu_energy_joules{gpu=\"1\",role=\"decode\"}");
        snprintf(r->energy.s[1].role, sizeof r->energy.s[1].role, "decode");
        r->energy.s[0].before = 1000;
        r->energy.s[0].after = 1000 + j0;
        r->energy.s[1].before = 5000;
        r->energy.s[1].after = 5000 + j1;
        for (int k = 0; k < 2; k++) r->energy.s[k].has_before = r->energy.s[k].has_after = true;
    }
    return r;
}

/* Idle window: each GPU drew w watts for 10 s. */
static void tsd_idle(study_idle *idle, double w) {
    memset(idle, 0, sizeof *idle);
    idle->seconds = 10;
    idle->e.n = 2;
    snprintf(idle->e.s[0].key, sizeof idle->e.s[0].key, "pdserve_gpu_energy_joules{gpu=\"0\",role=\"prefill\"}");
    snprintf(idle->e.s[1].key, sizeof idle->e.s[1].key, "pdserve_gpu_energy_joules{gpu=\"1\",role=\"decode\"}");
    for (int k = 0; k < 2; k++) {
        idle->e.s[k].before = 0;
        idle->e.s[k].after = 10 * w;
        idle->e.s[k].has_before = idle->e.s[k].has_after = true;
    }
}

static const char TSD_PLAN[] =
    "{\"name\": \"synthetic\", \"model\": \"preset:tiny-llama\","
    " \"setups\": [\"co-1gpu\", \"co-2gpus\", \"dis-gpu\", \"dis-disk\"],"
    " \"dataset\": {\"input_len\": 512, \"output_len\": 32},"
    " \"loads\": [{\"batch_sizes\": [2, 4, 8, 16]}, {\"request_rates\": [1, 4], \"num_prompts\": 16}],"
    " \"clocks\": {\"pairs_mhz\": [[1260, 1260], [810, 1260]]}}";

/* Writes a results database with every kind of point: colocated and disaggregated
 * setups with made-up but plausible numbers, a setup without energy, clock pairs,
 * simulated points, a failed point and a skipped one. Returns 0 or -1 (message on
 * stderr). */
static inline int tsd_make_db(const char *path) {
    char err[512];
    study_plan plan;
    if (study_plan_parse(TSD_PLAN, strlen(TSD_PLAN), "synthetic", &plan, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    study_db *db;
    if (study_db_open(path, &db, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        study_plan_free(&plan);
        return -1;
    }
    study_point *pts;
    int n = study_plan_expand(&plan, plan.model, &pts);
    study_hw hw;
    study_hw_probe(&hw);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        study_point *pt = &pts[i];
        const char *s = pt->setup->label;
        int si = !strcmp(s, "co-1gpu") ? 0 : !strcmp(s, "co-2gpus") ? 1 : !strcmp(s, "dis-gpu") ? 2 : 3;
        double b = pt->load.kind == STUDY_LOAD_BATCH ? pt->load.batch_size : pt->load.rate * 2;
        double clk = pt->clock.prefill_mhz == 810 ? 1.35 : 1.0;
        study_run_info ri = {.plan_name = "synthetic", .model = "preset:tiny-llama", .base_url = "http://127.0.0.1:1",
                             .hw = &hw, .started_unix = 1.7e9 + i * 60, .ended_unix = 1.7e9 + i * 60 + 30,
                             .status = STUDY_STATUS_OK, .dataset = "random", .input_len = 512, .output_len = 32,
                             .simulated = si == 3 && pt->load.kind == STUDY_LOAD_RATE};
        bench_config bc;
        bench_config_default(&bc);
        bc.request_rate = pt->load.kind == STUDY_LOAD_BATCH ? INFINITY : pt->load.rate;
        bench_result *r = NULL;
        study_idle idle;
        tsd_idle(&idle, 40);
        if (si == 3 && pt->load.kind == STUDY_LOAD_BATCH && pt->load.batch_size == 16) {
            ri.status = STUDY_STATUS_FAILED;
            ri.reason = "setup 'dis-disk' not available in this build (it comes with `pdserve up`)";
        } else if (pt->clock.prefill_mhz == 810 && si == 3 && pt->load.batch_size == 2) {
            ri.status = STUDY_STATUS_SKIPPED;
            ri.reason = "clock control not allowed (pass --allow-clock-control)";
        } else {
            double ttft = (0.05 + 0.02 * b) * (si == 1 ? 0.6 : 1.0 + 0.3 * (si >= 2)) * clk;
            double itl = (0.004 + 0.0004 * b) * (si == 2 ? 0.8 : 1.0) * clk;
            double j = si == 1 ? -1 : (60 + 25 * b) * (si >= 2 ? 1.5 : 1.0) / clk;
            r = tsd_result(pt->load.num_prompts, 512, 32, ttft, itl, j, j >= 0 ? j * 0.6 : 0);
            if (si == 0 && pt->load.kind == STUDY_LOAD_BATCH && pt->clock.prefill_mhz == 1260) tsd_phases(r, false);
        }
        if (study_db_record(db, pt, &ri, &bc, r, r ? &idle : NULL, err, sizeof err) < 0) {
            fprintf(stderr, "%s\n", err);
            rc = -1;
        }
        bench_result_free(r);
        /* co-1gpu batch points at default clocks also simulated: TTFT 5% slow, b16 30% */
        if (si == 0 && pt->load.kind == STUDY_LOAD_BATCH && pt->clock.prefill_mhz == 1260 && rc == 0) {
            study_point sp = *pt;
            snprintf(sp.key, sizeof sp.key, "sim|%.200s", pt->key);
            double f = pt->load.batch_size == 16 ? 1.3 : 1.05;
            ri.simulated = true;
            r = tsd_result(pt->load.num_prompts, 512, 32, (0.05 + 0.02 * b) * f, 0.004 + 0.0004 * b,
                           60 + 25 * b, (60 + 25 * b) * 0.6);
            tsd_phases(r, true);
            if (study_db_record(db, &sp, &ri, &bc, r, &idle, err, sizeof err) < 0) {
                fprintf(stderr, "%s\n", err);
                rc = -1;
            }
            bench_result_free(r);
        }
    }
    free(pts);
    study_db_close(db);
    study_plan_free(&plan);
    return rc;
}

#endif
