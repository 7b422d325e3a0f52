/* cmd_sweep.c: `pdserve sweep PLAN.json --db results.db`: runs a study plan (setups x
 * loads x clocks x repeats) point by point into one results database; resumable. The
 * work is in src/study/sweep.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "cli/cli.h"
#include "model/tokenizer.h"
#include "power/power.h"
#include "study/study.h"
#include "util/util.h"

static const char USAGE[] =
    "usage: pdserve sweep PLAN.json --db results.db [options]\n\n"
    "Runs every point of a plan (setups x loads x clocks x repeats): brings the setup up,\n"
    "warms it up, benchmarks it, reads its energy, brings it down, cools down, and records\n"
    "the point in the results database (SQLite, one transaction per point). Points already\n"
    "in the database with status ok are skipped, so an interrupted sweep resumes; a point\n"
    "that fails is recorded with its reason and the sweep goes on. Progress and the time\n"
    "left go to standard error. Then: pdserve report results.db -o report/\n\n"
    "  pdserve sweep plans/demo.json --db demo.db --model MODEL_DIR\n"
    "  pdserve sweep plans/paper-batch.json --db batch.db --model DIR --dry-run\n\n"
    "Setups: external (any endpoint: --base-url), co-1gpu (one `pdserve serve` child on a\n"
    "free loopback port), and co-2gpus, dis-gpu, dis-cpu, dis-disk, dis-nccl, dis-tcp, xPyD\n"
    "(one `pdserve up` child: router + instances).\n"
    "Clock points are skipped unless --allow-clock-control is given (it changes GPU clocks\n"
    "for everyone on the machine): the instances a point starts lock their own GPUs\n"
    "(`pdserve serve --sm-clock`, prefill and decode clocks to their roles) and restore\n"
    "them when they exit; for setup 'external', this process locks --clock-gpus.\n"
    "Energy and power come from the instances' /metrics (docs/energy.md). Plan format:\n"
    "docs/results-database.md.";

/* set_clocks for setup 'external': locks the GPUs of --clock-gpus from this process
 * (NVML opened on first use; restored by (0, 0), at exit and on signals). */
typedef struct sweep_clocks {
    const char *gpus;
    power_nvml *nv;
} sweep_clocks;

static int sweep_set_clocks(void *ctx, int prefill_mhz, int decode_mhz, char *err, size_t errlen) {
    sweep_clocks *c = ctx;
    if (prefill_mhz <= 0 && decode_mhz <= 0) {
        power_clocks_restore();
        return 0;
    }
    if (prefill_mhz != decode_mhz) {
        pd_errorf(err, errlen, "an external endpoint gets one clock for all of --clock-gpus (%d/%d asked)",
                  prefill_mhz, decode_mhz);
        return -1;
    }
    if (!c->nv && !(c->nv = power_nvml_open(err, errlen))) return -1;
    int gpus[POWER_MAX_GPUS], n = 0;
    unsigned mhz[POWER_MAX_GPUS];
    for (const char *p = c->gpus; *p && n < POWER_MAX_GPUS;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0) {
            pd_errorf(err, errlen, "--clock-gpus wants NVML indices like 0,1; got '%s'", c->gpus);
            return -1;
        }
        gpus[n] = (int)v;
        mhz[n++] = (unsigned)prefill_mhz;
        p = *end == ',' ? end + 1 : end;
    }
    return power_clocks_lock(c->nv, gpus, mhz, n, true, err, errlen);
}

int cmd_sweep(int argc, char **argv) {
    const char *db = NULL, *model = NULL, *tok_dir = NULL, *base_url = NULL, *setups = NULL, *clock_gpus = NULL;
    bool dry_run = false, allow_clocks = false;
    const cli_opt opts[] = {
        {"db", OPT_STRING, &db, "results database to write (created; resumed when it exists)", "FILE"},
        {"model", OPT_STRING, &model, "model of the deployments, overriding the plan's (DIR or preset:NAME)", "M"},
        {"tokenizer", OPT_STRING, &tok_dir, "tokenizer dir (default: the model dir) for token-exact prompts", "DIR"},
        {"base-url", OPT_STRING, &base_url, "endpoint benchmarked by setup 'external'", "URL"},
        {"setups", OPT_STRING, &setups, "run only these setup labels (comma-separated)", "LIST"},
        {"allow-clock-control", OPT_FLAG, &allow_clocks, "let the sweep lock GPU clocks for clock points", NULL},
        {"clock-gpus", OPT_STRING, &clock_gpus, "setup external: NVML indices of its GPUs, for clock points", "LIST"},
        {"dry-run", OPT_FLAG, &dry_run, "list the points and what would happen; run nothing", NULL},
    };
    const char *pos[1];
    int n_pos;
    bool help;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), USAGE, pos, 1, &n_pos, &help) != 0) return 2;
    if (help) return 0;
    if (n_pos != 1 || !db) {
        fprintf(stderr, "pdserve sweep: give a plan and --db FILE (see --help)\n");
        return 2;
    }
    char err[1024];
    study_plan plan;
    if (study_plan_load(pos[0], &plan, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve sweep: %s\n", err);
        return 1;
    }
    /* Token-exact text prompts when a tokenizer is at hand; token-id prompts otherwise. */
    const char *m = model ? model : plan.model;
    const char *td = tok_dir ? tok_dir : plan.tokenizer;
    tokenizer *tk = NULL;
    bench_tokenizer bt = {0};
    if (td || (m && strncmp(m, "preset:", 7) != 0 && util_is_dir(m))) {
        tk = cli_load_tokenizer(m, td, err, sizeof err);
        if (!tk) {
            fprintf(stderr, "pdserve sweep: %s\n", err);
            study_plan_free(&plan);
            return 1;
        }
        bench_tokenizer_wrap(&bt, tk);
    }
    study_sweep_opts so = {.db_path = db, .model = model, .tokenizer = tok_dir, .tok = tk ? &bt : NULL,
                           .base_url = base_url, .only_setups = setups, .allow_clock_control = allow_clocks,
                           .set_clocks = NULL, .dry_run = dry_run, .progress = stderr, .out = stdout};
    sweep_clocks sc = {.gpus = clock_gpus, .nv = NULL};
    if (clock_gpus && *clock_gpus) {
        so.set_clocks = sweep_set_clocks;
        so.clocks_ctx = &sc;
    }
    study_sweep_stats stats;
    int rc = study_sweep_run(&plan, &so, &stats, err, sizeof err);
    if (rc != 0) fprintf(stderr, "pdserve sweep: %s\n", err);
    if (tk) tokenizer_free(tk);
    power_nvml_close(sc.nv); /* restores what it locked */
    study_plan_free(&plan);
    if (rc != 0) return 1;
    return stats.failed > 0 && stats.ok == 0 && stats.done_before == 0 ? 1 : 0;
}
