/* test_study_report.c: `pdserve report` on a synthetic results database: index.html,
 * summaries.csv and runs.csv, and an SVG + PNG per plot with data in them (the SVG
 * parsed for path and point elements, the frontier labels found). With --make-db PATH
 * it only writes the synthetic database (tests/test_report_browser.sh uses it). */
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test.h"
#include "test_study_data.h"
#include "study/report_internal.h"

static char tmpdir[256];

static char *slurp(const char *dir, const char *name, size_t *len) {
    char path[1024], err[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    size_t l = 0;
    char *s = util_read_file(path, &l, err, sizeof err);
    if (len) *len = l;
    return s;
}

static int count_of(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; p && (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

static int csv_lines(const char *s) { return count_of(s, "\n"); }

/* An SVG drawn by gnuplot with data: well-formed enough (svg root closed), with path
 * elements for axes and lines, and point markers (gnuplot draws points as <use
 * xlink:href='#gpPt..'>). */
static void check_svg(const char *dir, const char *name, int min_points) {
    char file[128];
    snprintf(file, sizeof file, "%s.svg", name);
    char *s = slurp(dir, file, NULL);
    CHECKF(s != NULL, "%s missing", file);
    if (!s) return;
    CHECKF(strstr(s, "<svg") && strstr(s, "</svg>"), "%s: not an SVG document", file);
    int paths = count_of(s, "<path"), pts = count_of(s, "#gpPt");
    CHECKF(paths >= 5, "%s: %d path elements", file, paths);
    CHECKF(pts >= min_points, "%s: %d point markers, want >= %d", file, pts, min_points);
    free(s);
    snprintf(file, sizeof file, "%s.png", name);
    size_t len;
    char *p = slurp(dir, file, &len);
    CHECKF(p && len > 2000 && !memcmp(p, "\x89PNG\r\n\x1a\n", 8), "%s: not a PNG with content", file);
    free(p);
}

static void test_report(void) {
    char db[512], out[512], err[512];
    snprintf(db, sizeof db, "%s/synthetic.db", tmpdir);
    snprintf(out, sizeof out, "%s/report", tmpdir);
    REQUIRE(tsd_make_db(db) == 0);
    char table_path[512];
    snprintf(table_path, sizeof table_path, "%s/table.txt", tmpdir);
    FILE *tf = fopen(table_path, "w");
    REQUIRE(tf);
    study_report_opts o = {.db_path = db, .out_dir = out, .table = tf};
    int rc = study_report(&o, err, sizeof err);
    fclose(tf);
    REQUIRE(rc == 0 || (fprintf(stderr, "%s\n", err), 0));

    char *table = slurp(tmpdir, "table.txt", NULL);
    CHECK_STR_CONTAINS(table, "TTFT p50");
    CHECK_STR_CONTAINS(table, "co-2gpus");
    CHECK_STR_CONTAINS(table, "n/m = not measured");
    CHECK_STR_CONTAINS(table, "* = simulated");
    CHECK_STR_CONTAINS(table, "failed or skipped");
    /* co-1gpu's batch points exist measured and simulated: compared side by side, TTFT
     * 5% off at b2..b8 and 30% at b16, the rest equal (J/token: same joules) */
    CHECK_STR_CONTAINS(table, "simulated against measured");
    CHECK_STR_CONTAINS(table, "+30%");
    CHECK_STR_CONTAINS(table, "of 16 compared figures within 10%");
    /* b16's +30% (and its throughput's -17%, which has no interval) is outside the
     * measured median's own interval (its 16 requests spread evenly over [t, 2t):
     * interval [x4, x13], -19% to +19% of the median) */
    CHECK_STR_CONTAINS(table, "of the 2 outside, 0 inside the measured median's 95% confidence interval");
    CHECK(table && !strstr(table, "%~"));
    /* where the TTFT went: the measured co-1gpu batch points' phases (parse 1 ms,
     * other 10% of the TTFT) beside the simulated ones' (path 0, nothing other) */
    CHECK_STR_CONTAINS(table, "where the TTFT went");
    const char *wt = table ? strstr(table, "where the TTFT went") : NULL;
    CHECK(wt && strstr(wt, " parse ") && strstr(wt, " path ") && strstr(wt, " prefill "));
    const char *row = wt ? strstr(wt, "\nco-1gpu b2 ") : NULL, *srow = row ? strstr(row + 1, "\nco-1gpu b2 ") : NULL;
    CHECKF(row && srow && strstr(srow, " sim "), "%s", wt ? wt : "(none)");
    if (row && srow) {
        char real[256], sim[256];
        snprintf(real, sizeof real, "%.*s", (int)strcspn(row + 1, "\n"), row + 1);
        snprintf(sim, sizeof sim, "%.*s", (int)strcspn(srow + 1, "\n"), srow + 1);
        CHECKF(strstr(real, " 1.00 ") && !strstr(real, " sim "), "%s", real); /* parse */
        CHECKF(strstr(sim, " 0.00 ") && strstr(sim, " - "), "%s", sim);          /* path; no parse */
    }
    free(table);

    char *html = slurp(out, "index.html", NULL);
    REQUIRE(html);
    CHECK_STR_CONTAINS(html, "<!DOCTYPE html>");
    CHECK_STR_CONTAINS(html, "</html>");
    CHECK_STR_CONTAINS(html, "not measured");               /* co-2gpus has no energy */
    CHECK_STR_CONTAINS(html, "<span class=sim>sim</span>"); /* dis-disk rate points */
    CHECK_STR_CONTAINS(html, "setup 'dis-disk' not available in this build");
    CHECK_STR_CONTAINS(html, "clock control not allowed");
    CHECK_STR_CONTAINS(html, "Energy by component");
    CHECK_STR_CONTAINS(html, "gpu 0 (prefill)");
    CHECK_STR_CONTAINS(html, "on the frontier");
    CHECK_STR_CONTAINS(html, "<h2>Simulated against measured</h2>");
    CHECK_STR_CONTAINS(html, "<b>+30%</b>");
    CHECK_STR_CONTAINS(html, "<h2>Where the TTFT went</h2>");
    CHECK_STR_CONTAINS(html, "src=\"pareto-ttft.svg\"");
    CHECK_STR_CONTAINS(html, "src=\"latency-co-1gpu-batch.svg\"");
    CHECK_STR_CONTAINS(html, "src=\"energy-vs-batch.svg\"");
    free(html);

    /* CSV: one line per summary / run, plus the header. */
    sqlite3 *h;
    REQUIRE(sqlite3_open_v2(db, &h, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK);
    sqlite3_stmt *st;
    int n_runs = 0, n_sum = 0;
    if (sqlite3_prepare_v2(h, "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM summaries)", -1, &st, NULL) ==
            SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW) {
        n_runs = sqlite3_column_int(st, 0);
        n_sum = sqlite3_column_int(st, 1);
    }
    sqlite3_finalize(st);
    sqlite3_close(h);
    CHECK(n_runs > 30 && n_sum > 20 && n_sum < n_runs);
    char *csv = slurp(out, "summaries.csv", NULL);
    CHECK(csv && csv_lines(csv) == n_sum + 1);
    CHECK(csv && !strncmp(csv, "point_key,label,setup,", 22));
    free(csv);
    csv = slurp(out, "runs.csv", NULL);
    CHECK(csv && csv_lines(csv) == n_runs + 1);
    CHECK_STR_CONTAINS(csv, ",failed,setup 'dis-disk' not available in this build");
    free(csv);

    /* Plots: the three frontiers, energy vs load, latency vs load per setup. */
    check_svg(out, "pareto-ttft", 10);
    check_svg(out, "pareto-tpot", 10);
    check_svg(out, "pareto-throughput", 10);
    check_svg(out, "energy-vs-batch", 8);
    check_svg(out, "energy-vs-rate", 2);
    check_svg(out, "latency-co-1gpu-batch", 4);
    check_svg(out, "latency-dis-gpu-batch", 4);
    check_svg(out, "latency-co-2gpus-rate", 2);
    /* The frontier is labelled with setup and load: co-2gpus has no energy, so it is
     * on no frontier; co-1gpu b2 (cheapest, fast) is on the TTFT frontier. */
    char *svg = slurp(out, "pareto-ttft.svg", NULL);
    CHECK_STR_CONTAINS(svg, "Pareto frontier");
    CHECK_STR_CONTAINS(svg, "co-1gpu b2");
    CHECK(svg && !strstr(svg, "co-2gpus b"));
    free(svg);
    struct stat sb;
    char p[1024];
    snprintf(p, sizeof p, "%s/energy-vs-batch.png", out);
    CHECK(stat(p, &sb) == 0 && sb.st_size > 2000);
}

/* The median's confidence interval from order statistics: the bounds against the
 * binomial tables (n = 6: the extremes, 96.9%; n = 16: x4..x13; n = 32: x10..x23,
 * cdf(9) = 0.0100, cdf(10) = 0.0251; n = 64: x24..x41), none below 6 values, any order
 * of input. */
static void test_median_ci(void) {
    double x[64], lo, hi;
    for (int i = 0; i < 5; i++) x[i] = i;
    CHECK(!rep_median_ci(x, 5, &lo, &hi) && isnan(lo) && isnan(hi));
    const int ns[] = {6, 16, 32, 64}, k[] = {1, 4, 10, 24};
    for (int c = 0; c < 4; c++) {
        int n = ns[c];
        for (int i = 0; i < n; i++) x[i] = n - i; /* n .. 1, reversed */
        CHECKF(rep_median_ci(x, n, &lo, &hi) && lo == k[c] && hi == n + 1 - k[c], "n %d: [%g, %g]", n, lo, hi);
    }
}

/* A simulated median outside 10% of the measured one but inside the measured median's
 * interval is marked (~) and counted apart, in the text and the HTML. */
static void test_report_noise(void) {
    char db[512], out[512], err[512], table_path[512];
    snprintf(db, sizeof db, "%s/noise.db", tmpdir);
    snprintf(out, sizeof out, "%s/noise-report", tmpdir);
    snprintf(table_path, sizeof table_path, "%s/noise-table.txt", tmpdir);
    REQUIRE(tsd_make_db(db) == 0);
    sqlite3 *h;
    REQUIRE(sqlite3_open(db, &h) == SQLITE_OK);
    /* the simulated b16 at +15% of the measured median: inside [x4, x13] = +19% */
    CHECK(sqlite3_exec(h,
                       "UPDATE summaries SET ttft_median_ms = 1.15 * (SELECT s.ttft_median_ms FROM summaries s"
                       " JOIN runs r USING(run_id) WHERE r.simulated = 0 AND r.setup = 'co-1gpu' AND r.batch_size = 16"
                       " AND r.prefill_sm_mhz = 1260) WHERE run_id IN (SELECT run_id FROM runs WHERE simulated = 1"
                       " AND batch_size = 16)",
                       NULL, NULL, NULL) == SQLITE_OK);
    CHECK(sqlite3_changes(h) == 1);
    sqlite3_close(h);
    FILE *tf = fopen(table_path, "w");
    REQUIRE(tf);
    study_report_opts o = {.db_path = db, .out_dir = out, .table = tf, .no_plots = true};
    int rc = study_report(&o, err, sizeof err);
    fclose(tf);
    CHECKF(rc == 0, "%s", err);
    char *table = slurp(tmpdir, "noise-table.txt", NULL);
    CHECK_STR_CONTAINS(table, "+15%~");
    CHECK_STR_CONTAINS(table, "14 of 16 compared figures within 10%; of the 2 outside, 1 inside");
    free(table);
    char *html = slurp(out, "index.html", NULL);
    CHECK_STR_CONTAINS(html, "<b>+15%</b>~</td>");
    CHECK_STR_CONTAINS(html, "measured median's 95% interval");
    free(html);
}

/* A database with nothing measured: the report still comes out, saying so. */
/* A reuse sweep's report: cached tokens per point (requests) and the servers' prefix
 * cache / tier counters (server_metrics, parsed from /metrics text as the sweep does:
 * counters as increases over the run) give the KV reuse table, its HTML section and
 * the TTFT-vs-cached plot. */
static void test_report_reuse(void) {
    char db_path[512], out[512], err[512];
    snprintf(db_path, sizeof db_path, "%s/reuse.db", tmpdir);
    snprintf(out, sizeof out, "%s/reuse-report", tmpdir);
    study_plan plan;
    REQUIRE(study_plan_parse(TSD_PLAN, strlen(TSD_PLAN), "reuse", &plan, err, sizeof err) == 0);
    study_point *pts;
    study_plan_expand(&plan, plan.model, &pts);
    study_db *db;
    REQUIRE(study_db_open(db_path, &db, err, sizeof err) == 0);
    const char *before =
        "# HELP pdserve_prefix_cache_queries_total x\n"
        "pdserve_prefix_cache_queries_total{model_name=\"m\"} 1000\n"
        "pdserve_prefix_cache_tier_hits_total{model_name=\"m\",tier=\"gpu\"} 100\n"
        "pdserve_prefix_cache_tier_hits_total{model_name=\"m\",tier=\"cpu\"} 0\n"
        "pdserve_kv_offload_decisions_total{model_name=\"m\",decision=\"load\"} 1\n"
        "pdserve_num_requests_running{model_name=\"m\"} 3\n"
        "pdserve_engine_steps_total{model_name=\"m\"} 10\n"
        "pdserve_kv_store_put_seconds_total{model_name=\"m\",part=\"write\"} 1\n"
        "pdserve_kv_store_puts_total{model_name=\"m\"} 2\n";
    const char *after =
        "pdserve_prefix_cache_queries_total{model_name=\"m\"} 3048\n"
        "pdserve_prefix_cache_tier_hits_total{model_name=\"m\",tier=\"gpu\"} 612\n"
        "pdserve_prefix_cache_tier_hits_total{model_name=\"m\",tier=\"cpu\"} 1024\n"
        "pdserve_kv_offload_decisions_total{model_name=\"m\",decision=\"load\"} 5\n"
        "pdserve_kv_offload_decisions_total{model_name=\"m\",decision=\"recompute\"} 2\n"
        "pdserve_kv_offload_loaded_blocks_total{model_name=\"m\",tier=\"cpu\"} 64\n"
        "pdserve_kv_offload_entries{model_name=\"m\",tier=\"cpu\"} 80\n"
        "pdserve_engine_steps_total{model_name=\"m\"} 110\n"
        "pdserve_engine_forward_seconds_total{model_name=\"m\"} 1.5\n"
        "pdserve_kv_store_put_seconds_total{model_name=\"m\",part=\"write\"} 2.5\n"
        "pdserve_kv_store_puts_total{model_name=\"m\"} 5\n";
    study_metric mb[16], ma[16];
    int nb = 0, na = 0;
    study_metrics_parse(before, "", mb, 16, &nb);
    study_metrics_parse(after, "", ma, 16, &na);
    CHECK_EQ_INT(nb, 7); /* the running gauge and comments are not recorded */
    CHECK_EQ_INT(na, 11);
    study_metrics_delta(ma, na, mb, nb);
    CHECK(ma[0].value == 2048 && ma[1].value == 512 && ma[4].value == 2 && ma[6].value == 80);
    CHECK(ma[7].value == 100 && ma[8].value == 1.5); /* engine counters: steps and forward s */
    /* a store's put seconds by part (disk): recorded, as the increase over the run */
    CHECK(strstr(ma[9].series, "part=\"write\"") && ma[9].value == 1.5);
    for (int i = 0; i < 2; i++) { /* point 0 without tiers' counters, point 1 with */
        bench_result *r = tsd_result(4, 512, 32, 0.05 * (2 - i), 0.005, -1, 0);
        for (int k = 0; k < 4; k++) {
            r->recs[k].has_cached = true;
            r->recs[k].cached_tokens = i ? 256 : 0;
        }
        study_run_info ri = {.plan_name = "reuse", .model = "m", .status = STUDY_STATUS_OK, .dataset = "prefix-repetition",
                             .started_unix = 1.7e9 + i, .ended_unix = 1.7e9 + i + 1, .metrics = i ? ma : NULL,
                             .n_metrics = i ? na : 0};
        bench_config bc;
        bench_config_default(&bc);
        CHECKF(study_db_record(db, &pts[i], &ri, &bc, r, NULL, err, sizeof err) > 0, "%s", err);
        bench_result_free(r);
    }
    { /* point 1 simulated too, its 3 puts 0.25 s each (pdserve sim's series) */
        study_metric sm[2] = {{.value = 3}, {.value = 0.75}};
        snprintf(sm[0].series, sizeof sm[0].series, "pdserve_kv_store_puts_total{sim=\"1\"}");
        snprintf(sm[1].series, sizeof sm[1].series, "pdserve_kv_store_put_seconds_total{sim=\"1\"}");
        study_point sp = pts[1];
        snprintf(sp.key, sizeof sp.key, "sim|%.200s", pts[1].key);
        bench_result *r = tsd_result(4, 512, 32, 0.05, 0.005, -1, 0);
        study_run_info ri = {.plan_name = "reuse", .model = "m", .status = STUDY_STATUS_OK, .dataset = "prefix-repetition",
                             .started_unix = 1.7e9 + 2, .ended_unix = 1.7e9 + 3, .metrics = sm, .n_metrics = 2,
                             .simulated = true};
        bench_config bc;
        bench_config_default(&bc);
        CHECKF(study_db_record(db, &sp, &ri, &bc, r, NULL, err, sizeof err) > 0, "%s", err);
        bench_result_free(r);
    }
    study_db_close(db);
    char table_path[512];
    snprintf(table_path, sizeof table_path, "%s/reuse-table.txt", tmpdir);
    FILE *tf = fopen(table_path, "w");
    REQUIRE(tf);
    study_report_opts o = {.db_path = db_path, .out_dir = out, .table = tf};
    int rc = study_report(&o, err, sizeof err);
    fclose(tf);
    CHECKF(rc == 0, "%s", err);
    char *table = slurp(tmpdir, "reuse-table.txt", NULL);
    REQUIRE(table);
    const char *sec = strstr(table, "KV reuse\n");
    CHECKF(sec != NULL, "no reuse table in:\n%s", table);
    /* point 1: 50% cached; gpu 512/2048 = 25%, cpu 1024/2048 = 50%; 4 loads, 2 recomputes */
    if (sec) {
        CHECKF(strstr(sec, "50.0") && strstr(sec, "25.0") && strstr(sec, "   4 ") && strstr(sec, "   2 "), "%s", sec);
        CHECKF(strstr(sec, "0.0") && strstr(sec, "n/m"), "%s", sec); /* point 0: nothing cached, no counters */
    }
    /* the store's ops: 3 puts over the run in 1.5 s of their parts, 0.5 s each; no gets;
     * its simulated twin's 0.25 s each: real/sim 2.00 on the simulated row only */
    const char *ops = strstr(table, "KV store ops (disk)\n");
    CHECKF(ops && strstr(ops, "     3     0.500    n/m       n/m"), "%s", ops ? ops : table);
    const char *srow = ops ? strstr(ops, "*") : NULL;
    CHECKF(srow && strstr(srow, "     3     0.250    n/m       n/m") && strstr(srow, "      2.00\n"), "%s",
           ops ? ops : table);
    free(table);
    char *html = slurp(out, "index.html", NULL);
    CHECK(html && strstr(html, "<h2>KV reuse</h2>") && strstr(html, "prompt tokens cached"));
    CHECK(html && strstr(html, "<h2>KV store ops (disk)</h2>") && strstr(html, "<td>0.500</td>"));
    free(html);
    check_svg(out, "ttft-vs-cached", 2);
    free(pts);
    study_plan_free(&plan);
}

static void test_report_empty(void) {
    char db[512], out[512], err[512];
    snprintf(db, sizeof db, "%s/empty.db", tmpdir);
    snprintf(out, sizeof out, "%s/empty-report", tmpdir);
    study_db *d;
    REQUIRE(study_db_open(db, &d, err, sizeof err) == 0);
    study_db_close(d);
    study_report_opts o = {.db_path = db, .out_dir = out};
    REQUIRE(study_report(&o, err, sizeof err) == 0);
    char *html = slurp(out, "index.html", NULL);
    CHECK_STR_CONTAINS(html, "No energy was measured");
    free(html);
    check_svg(out, "pareto-ttft", 0);
    /* Not a database: an error, not a crash. */
    o.db_path = "/nonexistent/x.db";
    CHECK(study_report(&o, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "no results database");
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--make-db")) return tsd_make_db(argv[2]) == 0 ? 0 : 1;
    if (system("gnuplot --version >/dev/null 2>&1") != 0) TEST_SKIP("gnuplot is not installed (scripts/deps.sh)");
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_study_report_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    TEST_RUN(test_median_ci);
    TEST_RUN(test_report);
    TEST_RUN(test_report_noise);
    TEST_RUN(test_report_empty);
    TEST_RUN(test_report_reuse);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (!test_failures_ && system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    else if (test_failures_) fprintf(stderr, "kept %s\n", tmpdir);
    return TEST_END();
}
