/* cmd_demo.c: `pdserve demo`, the main job end to end on this machine: makes a small
 * model (random weights, a tokenizer trained here), runs the demo plan (every setup of
 * the study side by side, processes in place of GPUs) into a results database, prints
 * the comparison table with the frontier points, and writes the HTML report.
 *
 * The plan is plans/demo.json, built into the program (demo_plan.c is generated from
 * it by CMake), so the demo runs from any directory. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench/bench.h"
#include "cli/cli.h"
#include "model/tokenizer.h"
#include "study/study.h"
#include "util/util.h"

extern const char PDSERVE_DEMO_PLAN[];

static const char USAGE[] =
    "usage: pdserve demo [--out DIR] [--plan PLAN.json] [--fresh]\n\n"
    "Runs the study on this machine with a small model on the CPU: makes the model\n"
    "(pdserve make-model), runs every setup of the demo plan side by side (colocated and\n"
    "disaggregated; processes in place of GPUs) through a short sweep, prints the\n"
    "comparison table with the Pareto frontier points, and writes an HTML report.\n"
    "Everything goes under --out (default pdserve-demo/): model/, results.db, report/.\n"
    "A second run resumes: points already in results.db are not run again (--fresh\n"
    "starts over).";

int cmd_demo(int argc, char **argv) {
    const char *out = "pdserve-demo", *plan_path = NULL, *preset = "small-llama";
    bool fresh = false;
    const cli_opt opts[] = {
        {"out", OPT_STRING, &out, "folder for the model, the database and the report", "DIR"},
        {"plan", OPT_STRING, &plan_path, "a plan instead of the built-in demo plan", "FILE"},
        {"preset", OPT_STRING, &preset, "shape of the model made for the demo (default small-llama)", "NAME"},
        {"fresh", OPT_FLAG, &fresh, "discard earlier results in --out and run every point", NULL},
    };
    const char *pos[1];
    int n_pos;
    bool help;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), USAGE, pos, 0, &n_pos, &help) != 0) return 2;
    if (help) return 0;
    if (mkdir(out, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "pdserve demo: cannot create %s: %s\n", out, strerror(errno));
        return 1;
    }
    char model_dir[1024], db[1024], report_dir[1024], err[1024];
    path_join(model_dir, sizeof model_dir, out, "model");
    path_join(db, sizeof db, out, "results.db");
    path_join(report_dir, sizeof report_dir, out, "report");
    if (fresh) {
        unlink(db);
        char side[1100];
        snprintf(side, sizeof side, "%s-wal", db);
        unlink(side);
        snprintf(side, sizeof side, "%s-shm", db);
        unlink(side);
    }
    double t0 = time_now_s();

    /* 1. the model */
    char *mm_argv[] = {"make-model", "--out", model_dir, "--preset", (char *)preset, NULL};
    if (cmd_make_model(5, mm_argv) != 0) return 1;

    /* 2. the sweep */
    study_plan plan;
    int rc = plan_path ? study_plan_load(plan_path, &plan, err, sizeof err)
                       : study_plan_parse(PDSERVE_DEMO_PLAN, strlen(PDSERVE_DEMO_PLAN), "demo plan (built in)",
                                          &plan, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "pdserve demo: %s\n", err);
        return 1;
    }
    tokenizer *tk = cli_load_tokenizer(model_dir, NULL, err, sizeof err);
    if (!tk) {
        fprintf(stderr, "pdserve demo: %s\n", err);
        study_plan_free(&plan);
        return 1;
    }
    bench_tokenizer bt = {0};
    bench_tokenizer_wrap(&bt, tk);
    study_sweep_opts so = {.db_path = db, .model = model_dir, .tok = &bt, .progress = stderr, .out = stdout};
    study_sweep_stats stats;
    rc = study_sweep_run(&plan, &so, &stats, err, sizeof err);
    tokenizer_free(tk);
    study_plan_free(&plan);
    if (rc != 0) {
        fprintf(stderr, "pdserve demo: %s\n", err);
        return 1;
    }

    /* 3. the report */
    printf("\n");
    study_report_opts ro = {.db_path = db, .out_dir = report_dir, .table = stdout};
    if (study_report(&ro, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve demo: report: %s\n", err);
        return 1;
    }
    printf("\n%d points: %d run now, %d from an earlier run, %d failed, %d skipped (%.0f s).\n",
           stats.points, stats.ok, stats.done_before, stats.failed, stats.skipped, time_now_s() - t0);
    if (stats.failed) printf("Failed points and their reasons are listed in the report.\n");
    printf("Report: %s/index.html   Database: %s (sqlite3 %s 'select * from summaries')\n", report_dir, db,
           db);
    return stats.ok + stats.done_before > 0 ? 0 : 1;
}
