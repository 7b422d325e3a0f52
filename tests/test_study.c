/* test_study.c: the study layer without real deployments: plan parsing and expansion
 * (stable keys), the results database round trip from a synthetic bench_result,
 * Pareto frontiers on hand-made points, and sweeps against an in-process fake
 * OpenAI server (setup "external"): resumability, failed and skipped points recorded
 * with their reasons. */
#include <sqlite3.h>
#include <unistd.h>

#include "test.h"
#include "test_bench_server.h"
#include "test_study_data.h"

static char tmpdir[256];

static sqlite3 *open_ro(const char *path) {
    sqlite3 *h = NULL;
    if (sqlite3_open_v2(path, &h, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) return NULL;
    return h;
}

/* First column of the first row of sql as a double (NAN for NULL / no row). */
static double q_num(sqlite3 *h, const char *sql) {
    sqlite3_stmt *st = NULL;
    double v = NAN;
    if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW &&
        sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_double(st, 0);
    else if (!st) fprintf(stderr, "sql error: %s: %s\n", sql, sqlite3_errmsg(h));
    sqlite3_finalize(st);
    return v;
}

static char *q_text(sqlite3 *h, const char *sql) {
    sqlite3_stmt *st = NULL;
    char *v = NULL;
    if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW &&
        sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = xstrdup((const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    return v;
}

static void test_plan_expand(void) {
    char err[512];
    study_plan p;
    REQUIRE(study_plan_parse(TSD_PLAN, strlen(TSD_PLAN), "t", &p, err, sizeof err) == 0);
    CHECK_EQ_INT(p.n_setups, 4);
    CHECK_EQ_INT(p.n_loads, 6);
    CHECK_EQ_INT(p.n_clocks, 2);
    CHECK_EQ_INT(p.input_len, 512);
    CHECK(isinf(p.loads[0].rate) && p.loads[0].num_prompts == 2);
    CHECK(p.loads[4].kind == STUDY_LOAD_RATE && p.loads[4].rate == 1 && p.loads[4].num_prompts == 16);
    study_point *a, *b;
    int n = study_plan_expand(&p, p.model, &a);
    CHECK_EQ_INT(n, 2 * 6 * 1 + 2 * 6 * 2);  /* colocated setups: no mixed clock pair */
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++) CHECKF(strcmp(a[i].key, a[j].key) != 0, "%s twice", a[i].key);
    CHECK_STR_CONTAINS(a[0].key, "co-1gpu/b2@1260-1260/r0/");
    CHECK_STR_CONTAINS(a[1].label, "co-1gpu b4 @1260/1260");
    CHECK_STR_CONTAINS(a[13].label, "dis-gpu b2 @810/1260");
    /* Same plan, same keys; another model or input length, other keys. */
    study_plan q;
    REQUIRE(study_plan_parse(TSD_PLAN, strlen(TSD_PLAN), "t", &q, err, sizeof err) == 0);
    CHECK_EQ_INT(study_plan_expand(&q, q.model, &b), n);
    for (int i = 0; i < n; i++) CHECK(!strcmp(a[i].key, b[i].key));
    free(b);
    CHECK_EQ_INT(study_plan_expand(&q, "other-model", &b), n);
    CHECK(strcmp(a[0].key, b[0].key) != 0);
    free(b);
    q.input_len = 1024;
    study_plan_expand(&q, q.model, &b);
    CHECK(strcmp(a[0].key, b[0].key) != 0);
    free(b);
    free(a);
    study_plan_free(&q);
    study_plan_free(&p);
    /* No clocks: one default clock point. Repeats multiply. */
    const char *plain = "{\"setups\": [{\"name\": \"external\", \"base_url\": \"http://x\"}], \"repeats\": 3,"
                        " \"loads\": {\"batch_sizes\": [1, 8]}}";
    REQUIRE(study_plan_parse(plain, strlen(plain), "t", &p, err, sizeof err) == 0);
    CHECK_EQ_INT(study_plan_expand(&p, NULL, &a), 6);
    CHECK(a[0].clock.prefill_mhz == 0 && a[2].repeat == 2 && a[3].load.batch_size == 8);
    CHECK_STR_CONTAINS(a[2].label, "#2");
    free(a);
    study_plan_free(&p);
}

static void test_plan_errors(void) {
    char err[512];
    study_plan p;
    static const struct {
        const char *json, *msg;
    } cases[] = {
        {"{\"setups\": [\"co-1gpu\"], \"loads\": {\"batch_sizes\": [1]}, \"repeat\": 2}", "unknown key 'repeat'"},
        {"{\"setups\": [], \"loads\": {\"batch_sizes\": [1]}}", "'setups' must be a non-empty list"},
        {"{\"setups\": [\"a\"], \"loads\": {\"request_rates\": [1]}}", "need 'num_prompts'"},
        {"{\"setups\": [\"a\"], \"loads\": {\"batch_sizes\": [0]}}", "batch sizes must be integers"},
        {"{\"setups\": [\"a\", \"a\"], \"loads\": {\"batch_sizes\": [1]}}", "appears twice"},
        {"{\"setups\": [\"a b\"], \"loads\": {\"batch_sizes\": [1]}}", "may hold only"},
        {"{\"setups\": [\"a\"], \"loads\": {\"batch_sizes\": [1]}, \"clocks\": {\"pairs_mhz\": [[1]]}}", "clocks"},
        {"{\"setups\": [\"a\"],\n \"loads\": {\"batch_sizes\": [1]},,}", "not valid JSON (near line 2)"},
        {"{\"setups\": [\"a\"]}", "gives no load"},
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(cases); i++) {
        int rc = study_plan_parse(cases[i].json, strlen(cases[i].json), "plan.json", &p, err, sizeof err);
        CHECKF(rc == -1, "case %zu parsed", i);
        if (rc == 0) study_plan_free(&p);
        else CHECK_STR_CONTAINS(err, cases[i].msg);
    }
}

static void test_shipped_plans(void) {
    static const char *const names[] = {"paper-batch", "paper-batch-quick", "paper-clocks", "steady", "demo"};
    for (size_t i = 0; i < PD_ARRAY_LEN(names); i++) {
        char path[1024], err[512];
        snprintf(path, sizeof path, "%s/plans/%s.json", test_source_dir(), names[i]);
        study_plan p;
        int rc = study_plan_load(path, &p, err, sizeof err);
        CHECKF(rc == 0, "%s", err);
        if (rc) continue;
        study_point *pts;
        int n = study_plan_expand(&p, p.model, &pts);
        CHECKF(n > 0, "%s expands to nothing", names[i]);
        free(pts);
        if (!strcmp(names[i], "paper-batch")) {
            CHECK_EQ_INT(p.input_len, 16384);
            CHECK_EQ_INT(p.output_len, 256);
            CHECK_EQ_INT(p.n_setups, 5);
            CHECK(p.loads[0].batch_size == 2 && isinf(p.loads[0].rate));
        }
        if (!strcmp(names[i], "paper-clocks")) CHECK(p.n_clocks > 10);
        study_plan_free(&p);
    }
}

static void test_db_round_trip(void) {
    char path[512], err[512];
    snprintf(path, sizeof path, "%s/rt.db", tmpdir);
    study_plan p;
    REQUIRE(study_plan_parse(TSD_PLAN, strlen(TSD_PLAN), "t", &p, err, sizeof err) == 0);
    study_point *pts;
    study_plan_expand(&p, p.model, &pts);
    study_db *db;
    REQUIRE(study_db_open(path, &db, err, sizeof err) == 0);
    study_hw hw;
    study_hw_probe(&hw);
    CHECK(hw.cpu_cores > 0);
    bench_result *r = tsd_result(4, 512, 8, 0.100, 0.010, 50, 30);
    for (int i = 0; i < 3; i++) { /* the server said so for 3 of 4: 0, 128, 256 cached */
        r->recs[i].has_cached = true;
        r->recs[i].cached_tokens = 128 * i;
    }
    study_idle idle;
    tsd_idle(&idle, 2.0);  /* 2 W per GPU */
    bench_config bc;
    bench_config_default(&bc);
    bc.goodput_ttft_ms = 140;  /* requests 0 and 1 meet it: ttft 100, 125, 150, 175 ms */
    study_run_info ri = {.plan_name = "t", .model = "m", .base_url = "http://127.0.0.1:9", .hw = &hw,
                         .started_unix = 1.7e9, .ended_unix = 1.7e9 + 5, .status = STUDY_STATUS_OK,
                         .dataset = "random", .input_len = 512, .output_len = 8};
    long long id = study_db_record(db, &pts[0], &ri, &bc, r, &idle, err, sizeof err);
    CHECKF(id > 0, "%s", err);
    /* The same point again replaces the row (no duplicate key). */
    long long id2 = study_db_record(db, &pts[0], &ri, &bc, r, &idle, err, sizeof err);
    CHECK(id2 > 0);
    study_status st;
    CHECK_EQ_INT(study_db_point_status(db, pts[0].key, &st), 1);
    CHECK(st == STUDY_STATUS_OK);
    CHECK_EQ_INT(study_db_point_status(db, pts[1].key, &st), 0);
    /* A point without energy. */
    bench_result *r2 = tsd_result(2, 512, 8, 0.1, 0.01, -1, 0);
    CHECK(study_db_record(db, &pts[2], &ri, &bc, r2, NULL, err, sizeof err) > 0);
    study_db_close(db);

    sqlite3 *h = open_ro(path);
    REQUIRE(h);
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM runs"), 2);
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM requests"), 6);
    char *mode = q_text(h, "PRAGMA journal_mode");
    CHECK(mode && !strcmp(mode, "wal"));
    free(mode);
    char sql[512];
    snprintf(sql, sizeof sql, "SELECT run_id FROM runs WHERE point_key = '%s'", pts[0].key);
    long long rid = (long long)q_num(h, sql);
    CHECK_EQ_INT(rid, id2);
#define RUNQ(expr, cond)                                                                  \
    do {                                                                                  \
        snprintf(sql, sizeof sql, "SELECT %s FROM runs WHERE run_id = %lld", expr, rid); \
        char *t_ = q_text(h, sql);                                                        \
        CHECKF(t_ && (cond), "%s = %s", expr, t_ ? t_ : "NULL");                          \
        free(t_);                                                                         \
    } while (0)
    RUNQ("setup", !strcmp(t_, "co-1gpu"));
    RUNQ("setup_kind", !strcmp(t_, "co-1gpu"));
    RUNQ("load_kind", !strcmp(t_, "batch"));
    RUNQ("batch_size", !strcmp(t_, "2"));
    RUNQ("coalesce(request_rate, 'inf')", !strcmp(t_, "inf"));
    RUNQ("prefill_sm_mhz || '/' || decode_sm_mhz", !strcmp(t_, "1260/1260"));
    RUNQ("status", !strcmp(t_, "ok"));
    RUNQ("simulated", !strcmp(t_, "0"));
    RUNQ("pdserve_version", !strcmp(t_, PDSERVE_VERSION));
    RUNQ("gpus", t_[0] == '[');
    RUNQ("started_at", !strncmp(t_, "2023-11-14T", 11));
    RUNQ("input_len", !strcmp(t_, "512"));
    RUNQ("goodput_ttft_ms", atof(t_) == 140);
    /* Requests: every timestamp. */
    snprintf(sql, sizeof sql, "SELECT token_times_s FROM requests WHERE run_id = %lld AND idx = 1", rid);
    char *tt = q_text(h, sql);
    cJSON *arr = tt ? cJSON_Parse(tt) : NULL;
    CHECK(cJSON_IsArray(arr) && cJSON_GetArraySize(arr) == 8);
    if (cJSON_IsArray(arr)) {
        CHECK(fabs(cJSON_GetArrayItem(arr, 0)->valuedouble - 0.125) < 1e-6);
        CHECK(fabs(cJSON_GetArrayItem(arr, 7)->valuedouble - 0.195) < 1e-6);
    }
    cJSON_Delete(arr);
    free(tt);
    snprintf(sql, sizeof sql, "SELECT first_token_s FROM requests WHERE run_id = %lld AND idx = 1", rid);
    CHECK(fabs(q_num(h, sql) - 0.125) < 1e-9);
    snprintf(sql, sizeof sql, "SELECT ttft_ms FROM requests WHERE run_id = %lld AND idx = 3", rid);
    CHECK(fabs(q_num(h, sql) - 175) < 1e-6);
    snprintf(sql, sizeof sql, "SELECT arrival_s + sent_s + input_tokens + output_tokens FROM requests WHERE run_id = %lld AND idx = 0", rid);
    CHECK(fabs(q_num(h, sql) - 520) < 1e-9);
    /* Energy rows: per GPU, idle-subtracted with 2 W over the run's duration. */
    snprintf(sql, sizeof sql, "SELECT joules FROM energy WHERE run_id = %lld AND component = 'gpu' AND device = '0' AND role = 'prefill'", rid);
    CHECK(fabs(q_num(h, sql) - 50) < 1e-9);
    snprintf(sql, sizeof sql, "SELECT duration_s FROM summaries WHERE run_id = %lld", rid);
    double dur = q_num(h, sql);
    CHECK(dur > 0.24 && dur < 0.25);
    snprintf(sql, sizeof sql, "SELECT net_joules FROM energy WHERE run_id = %lld AND device = '1'", rid);
    CHECK(fabs(q_num(h, sql) - (30 - 2 * dur)) < 1e-9);
    /* Summary: medians, throughput, goodput, J/token. */
    snprintf(sql, sizeof sql, "SELECT ttft_median_ms FROM summaries WHERE run_id = %lld", rid);
    CHECK(fabs(q_num(h, sql) - 137.5) < 1e-6);
    snprintf(sql, sizeof sql, "SELECT tpot_median_ms FROM summaries WHERE run_id = %lld", rid);
    CHECK(fabs(q_num(h, sql) - (0.07 + 0.0005) / 7 * 1e3) < 1e-6);
    snprintf(sql, sizeof sql, "SELECT good_requests FROM summaries WHERE run_id = %lld", rid);
    CHECK_EQ_INT(q_num(h, sql), 2);
    snprintf(sql, sizeof sql, "SELECT j_per_token FROM summaries WHERE run_id = %lld", rid);
    CHECK(fabs(q_num(h, sql) - 80.0 / (4 * 520)) < 1e-9);
    snprintf(sql, sizeof sql, "SELECT j_per_output_token_net FROM summaries WHERE run_id = %lld", rid);
    CHECK(fabs(q_num(h, sql) - (80.0 - 4 * dur) / 32) < 1e-9);
    snprintf(sql, sizeof sql, "SELECT input_throughput FROM summaries WHERE run_id = %lld", rid);
    CHECK(fabs(q_num(h, sql) - 2048 / dur) < 1e-6);
    /* Cached tokens: per request (NULL where the server did not say), summed and as a
     * fraction of the prompt tokens of the requests that reported them. */
    snprintf(sql, sizeof sql, "SELECT cached_tokens FROM requests WHERE run_id = %lld AND idx = 2", rid);
    CHECK_EQ_INT(q_num(h, sql), 256);
    snprintf(sql, sizeof sql, "SELECT cached_tokens FROM requests WHERE run_id = %lld AND idx = 3", rid);
    CHECK(isnan(q_num(h, sql)));
    snprintf(sql, sizeof sql, "SELECT cached_tokens FROM summaries WHERE run_id = %lld", rid);
    CHECK_EQ_INT(q_num(h, sql), 384);
    snprintf(sql, sizeof sql, "SELECT cached_token_fraction FROM summaries WHERE run_id = %lld", rid);
    CHECK(fabs(q_num(h, sql) - 384.0 / 1536) < 1e-9);
    CHECK(isnan(q_num(h, "SELECT cached_token_fraction FROM summaries s JOIN runs r USING(run_id) WHERE r.point_index = 2")));
    CHECK_EQ_INT(q_num(h, "SELECT value FROM meta WHERE key = 'schema_version'"), STUDY_SCHEMA_VERSION);
    /* Not measured stays NULL, never 0, and says so in the energy table. */
    CHECK(isnan(q_num(h, "SELECT j_per_token FROM summaries s JOIN runs r USING(run_id) WHERE r.point_index = 2")));
    CHECK(isnan(q_num(h, "SELECT energy_j FROM summaries s JOIN runs r USING(run_id) WHERE r.point_index = 2")));
    CHECK_EQ_INT(q_num(h, "SELECT measured FROM energy e JOIN runs r USING(run_id) WHERE r.point_index = 2"), 0);
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM energy e JOIN runs r USING(run_id) WHERE r.point_index = 2"), 1);
#undef RUNQ
    sqlite3_close(h);
    bench_result_free(r);
    bench_result_free(r2);
    free(pts);
    study_plan_free(&p);
}

/* A file of schema 2 (requests and summaries without the cached-token columns) is
 * migrated on open: the columns are added, old rows keep NULL, the version becomes 4,
 * and a new point can be recorded into it. */
static void test_db_migrate_v2(void) {
    char path[512], err[512];
    snprintf(path, sizeof path, "%s/v2.db", tmpdir);
    sqlite3 *h = NULL;
    REQUIRE(sqlite3_open(path, &h) == SQLITE_OK);
    const char *v2 =
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);"
        "INSERT INTO meta VALUES('schema_version', '2');"
        "CREATE TABLE requests(run_id INTEGER NOT NULL, idx INTEGER NOT NULL,"
        " status TEXT NOT NULL CHECK(status IN ('ok','error')), error TEXT,"
        " input_tokens INTEGER, output_tokens INTEGER, expected_output_tokens INTEGER,"
        " arrival_s REAL, sent_s REAL, first_token_s REAL, finished_s REAL,"
        " ttft_ms REAL, e2el_ms REAL, token_times_s TEXT, PRIMARY KEY(run_id, idx));"
        "INSERT INTO requests(run_id, idx, status) VALUES(99, 0, 'ok');"
        "CREATE TABLE summaries(run_id INTEGER PRIMARY KEY, completed INTEGER, failed INTEGER,"
        " duration_s REAL, total_input_tokens INTEGER, total_output_tokens INTEGER,"
        " request_throughput REAL, input_throughput REAL, output_throughput REAL,"
        " total_token_throughput REAL, max_output_tokens_per_s REAL, max_concurrent INTEGER,"
        " good_requests INTEGER, goodput REAL,"
        " ttft_mean_ms REAL, ttft_median_ms REAL, ttft_p90_ms REAL, ttft_p99_ms REAL,"
        " tpot_mean_ms REAL, tpot_median_ms REAL, tpot_p90_ms REAL, tpot_p99_ms REAL,"
        " itl_mean_ms REAL, itl_median_ms REAL, itl_p90_ms REAL, itl_p99_ms REAL,"
        " e2el_mean_ms REAL, e2el_median_ms REAL, e2el_p90_ms REAL, e2el_p99_ms REAL,"
        " energy_j REAL, energy_net_j REAL, idle_w REAL,"
        " j_per_token REAL, j_per_token_net REAL, j_per_output_token REAL, j_per_output_token_net REAL,"
        " client_cpu_s REAL);";
    REQUIRE(sqlite3_exec(h, v2, NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(h);
    study_db *db;
    REQUIRE(study_db_open(path, &db, err, sizeof err) == 0);
    study_plan p;
    REQUIRE(study_plan_parse(TSD_PLAN, strlen(TSD_PLAN), "t", &p, err, sizeof err) == 0);
    study_point *pts;
    study_plan_expand(&p, p.model, &pts);
    bench_result *r = tsd_result(2, 100, 4, 0.1, 0.01, -1, 0);
    r->recs[0].has_cached = r->recs[1].has_cached = true;
    r->recs[1].cached_tokens = 50;
    study_run_info ri = {.plan_name = "t", .model = "m", .status = STUDY_STATUS_OK, .dataset = "random",
                         .started_unix = 1.7e9, .ended_unix = 1.7e9 + 1};
    bench_config bc;
    bench_config_default(&bc);
    long long id = study_db_record(db, &pts[0], &ri, &bc, r, NULL, err, sizeof err);
    CHECKF(id > 0, "%s", err);
    study_db_close(db);
    h = open_ro(path);
    REQUIRE(h);
    CHECK_EQ_INT(q_num(h, "SELECT value FROM meta WHERE key = 'schema_version'"), 4);
    CHECK(isnan(q_num(h, "SELECT cached_tokens FROM requests WHERE run_id = 99")));
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM requests WHERE run_id = 99 AND server_phases IS NULL"), 1);
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT sum(cached_tokens) FROM requests WHERE run_id = %lld", id);
    CHECK_EQ_INT(q_num(h, sql), 50);
    snprintf(sql, sizeof sql, "SELECT cached_token_fraction FROM summaries WHERE run_id = %lld", id);
    CHECK(fabs(q_num(h, sql) - 0.25) < 1e-9);
    snprintf(sql, sizeof sql, "SELECT client_cpu_s IS NOT NULL OR client_cpu_s IS NULL FROM summaries WHERE run_id = %lld", id);
    CHECK_EQ_INT(q_num(h, sql), 1);
    sqlite3_close(h);
    bench_result_free(r);
    free(pts);
    study_plan_free(&p);
}

static void test_pareto(void) {
    /* x = J/token, y = latency (minimise both). */
    double x[] = {1, 2, 3, 2, 1, 4, NAN, 0.5, 2};
    double y[] = {5, 3, 1, 4, 5, 0.5, 0.1, 9, 3};
    bool f[9];
    int n = study_pareto(x, y, 9, false, f);
    /* 0 and 4 tie (equal): both on. 1 and 8 tie: both on. 3 dominated by 1. 2, 5, 7 on.
     * 6 has NaN: never on. */
    bool want[] = {true, true, true, false, true, true, false, true, true};
    for (int i = 0; i < 9; i++) CHECKF(f[i] == want[i], "point %d", i);
    CHECK_EQ_INT(n, 7);
    /* Maximise y (throughput): (1, 10) dominates (2, 9) and (1, 5); (3, 20) stays. */
    double tx[] = {1, 2, 1, 3, 3};
    double ty[] = {10, 9, 5, 20, 19};
    bool g[5];
    CHECK_EQ_INT(study_pareto(tx, ty, 5, true, g), 2);
    CHECK(g[0] && !g[1] && !g[2] && g[3] && !g[4]);
    /* Same x, different y; same y, different x. */
    double ax[] = {1, 1, 2}, ay[] = {2, 1, 1};
    bool h[3];
    CHECK_EQ_INT(study_pareto(ax, ay, 3, false, h), 1);
    CHECK(h[1]);
    CHECK_EQ_INT(study_pareto(ax, ay, 0, false, h), 0);
}

/* A sweep against the fake server: "external" points run, "dis-gpu" (no model given) fails with the
 * reason, a clock point is skipped; a second run skips what is done. */
static void test_sweep_resume(void) {
    tsrv s;
    tsrv_conf conf = {.first_ms = 5, .itl_ms = 1, .tokens = 4, .joules_per_token = 0.5};
    REQUIRE(tsrv_start(&s, &conf) == 0);
    char url[128], plan_json[1024], dbp[512], err[512];
    tsrv_url(&s, url, sizeof url);
    snprintf(plan_json, sizeof plan_json,
             "{\"name\": \"resume\", \"setups\": [{\"name\": \"external\", \"label\": \"fake\", \"base_url\": \"%s\"},"
             " \"dis-gpu\"], \"dataset\": {\"input_len\": 16, \"output_len\": 4, \"vocab_size\": 500},"
             " \"loads\": {\"batch_sizes\": [1, 3]}, \"warmup_requests\": 1, \"idle_s\": 0.2}", url);
    snprintf(dbp, sizeof dbp, "%s/resume.db", tmpdir);
    study_plan p;
    REQUIRE(study_plan_parse(plan_json, strlen(plan_json), "resume", &p, err, sizeof err) == 0);
    study_sweep_opts o = {.db_path = dbp, .progress = stderr};
    study_sweep_stats st;
    REQUIRE(study_sweep_run(&p, &o, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(st.points, 4);
    CHECK_EQ_INT(st.ok, 2);
    CHECK_EQ_INT(st.failed, 2);
    CHECK_EQ_INT(st.done_before, 0);
    sqlite3 *h = open_ro(dbp);
    REQUIRE(h);
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM runs"), 4);
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM requests"), 4);
    CHECK_EQ_INT(q_num(h, "SELECT sum(completed) FROM summaries"), 4);
    char *reason = q_text(h, "SELECT reason FROM runs WHERE setup = 'dis-gpu' AND batch_size = 3");
    CHECK_STR_CONTAINS(reason, "setup 'dis-gpu' needs a model");
    free(reason);
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM summaries s JOIN runs r USING(run_id) WHERE r.setup = 'dis-gpu'"), 0);
    /* Energy from the fake server's counters: measured, per GPU and role. */
    CHECK_EQ_INT(q_num(h, "SELECT count(DISTINCT role) FROM energy WHERE measured = 1"), 2);
    CHECK(q_num(h, "SELECT min(j_per_output_token) FROM summaries") > 0);
    char *base = q_text(h, "SELECT base_url FROM runs WHERE setup = 'fake' LIMIT 1");
    CHECK(base && !strcmp(base, url));
    free(base);
    char *plan_meta = q_text(h, "SELECT value FROM meta WHERE key = 'plan:resume'");
    CHECK_STR_CONTAINS(plan_meta, "\"batch_sizes\"");
    free(plan_meta);
    sqlite3_close(h);

    /* Second run: the two ok points are skipped; the failed ones are tried again. */
    REQUIRE(study_sweep_run(&p, &o, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(st.done_before, 2);
    CHECK_EQ_INT(st.ok, 0);
    CHECK_EQ_INT(st.failed, 2);
    h = open_ro(dbp);
    REQUIRE(h);
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM runs"), 4);
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM requests"), 4);
    sqlite3_close(h);

    /* --setups filter and dry run. */
    study_sweep_opts o2 = {.db_path = dbp, .dry_run = true, .out = stderr, .only_setups = "fake"};
    REQUIRE(study_sweep_run(&p, &o2, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(st.points, 2);
    CHECK_EQ_INT(st.done_before, 2);
    /* a label the plan does not have: refused, naming it and the plan's (a typo ran
     * nothing and said nothing before) */
    o2.only_setups = "fake,fak";
    CHECK(study_sweep_run(&p, &o2, &st, err, sizeof err) != 0);
    CHECKF(strstr(err, "\"fak\"") && strstr(err, "its setups: fake"), "%s", err);
    study_plan_free(&p);
    tsrv_stop(&s);
}

/* Clock points: skipped without consent, failed without a clock API, run with one. */
static int fake_clocks_calls;
static int fake_set_clocks(void *ctx, int p, int d, char *err, size_t errlen) {
    (void)ctx;
    (void)err;
    (void)errlen;
    fake_clocks_calls++;
    return p >= 0 && d >= 0 ? 0 : -1;
}

static void test_sweep_clocks(void) {
    tsrv s;
    tsrv_conf conf = {.first_ms = 2, .itl_ms = 1, .tokens = 2};
    REQUIRE(tsrv_start(&s, &conf) == 0);
    char url[128], plan_json[1024], dbp[512], err[512];
    tsrv_url(&s, url, sizeof url);
    snprintf(plan_json, sizeof plan_json,
             "{\"name\": \"clk\", \"setups\": [\"external\"], \"dataset\": {\"input_len\": 8, \"output_len\": 2,"
             " \"vocab_size\": 500}, \"loads\": {\"batch_sizes\": [2]}, \"clocks\": {\"same_mhz\": [810],"
             " \"pairs_mhz\": [[1260, 600]]}}");
    snprintf(dbp, sizeof dbp, "%s/clk.db", tmpdir);
    study_plan p;
    REQUIRE(study_plan_parse(plan_json, strlen(plan_json), "clk", &p, err, sizeof err) == 0);
    study_sweep_opts o = {.db_path = dbp, .base_url = url, .progress = stderr};
    study_sweep_stats st;
    REQUIRE(study_sweep_run(&p, &o, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(st.skipped, 2);
    sqlite3 *h = open_ro(dbp);
    REQUIRE(h);
    char *reason = q_text(h, "SELECT reason FROM runs WHERE status = 'skipped' LIMIT 1");
    CHECK_STR_CONTAINS(reason, "clock control not allowed");
    free(reason);
    sqlite3_close(h);
    o.allow_clock_control = true;
    REQUIRE(study_sweep_run(&p, &o, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(st.failed, 2);
    h = open_ro(dbp);
    reason = q_text(h, "SELECT reason FROM runs WHERE status = 'failed' LIMIT 1");
    CHECK_STR_CONTAINS(reason, "clock control not available in this build");
    free(reason);
    sqlite3_close(h);
    o.set_clocks = fake_set_clocks;
    REQUIRE(study_sweep_run(&p, &o, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(st.ok, 2);
    CHECK_EQ_INT(fake_clocks_calls, 4);  /* set + restore per point */
    h = open_ro(dbp);
    CHECK_EQ_INT(q_num(h, "SELECT count(*) FROM runs WHERE status = 'ok' AND prefill_sm_mhz = 1260 AND decode_sm_mhz = 600"), 1);
    sqlite3_close(h);
    study_plan_free(&p);
    tsrv_stop(&s);
}

/* A setup that cannot come up (unreachable external endpoint) fails with the reason;
 * the sweep still records every point. */
static void test_sweep_unreachable(void) {
    char dbp[512], err[512];
    snprintf(dbp, sizeof dbp, "%s/down.db", tmpdir);
    const char *j = "{\"setups\": [{\"name\": \"external\", \"base_url\": \"http://127.0.0.1:1\"}, \"nonsense\"],"
                    " \"loads\": {\"batch_sizes\": [1]}, \"start_timeout_s\": 1}";
    study_plan p;
    REQUIRE(study_plan_parse(j, strlen(j), "down", &p, err, sizeof err) == 0);
    study_sweep_opts o = {.db_path = dbp};
    study_sweep_stats st;
    REQUIRE(study_sweep_run(&p, &o, &st, err, sizeof err) == 0);
    CHECK_EQ_INT(st.failed, 2);
    sqlite3 *h = open_ro(dbp);
    REQUIRE(h);
    char *r1 = q_text(h, "SELECT reason FROM runs WHERE setup = 'external'");
    char *r2 = q_text(h, "SELECT reason FROM runs WHERE setup = 'nonsense'");
    CHECK_STR_CONTAINS(r1, "deploy: GET http://127.0.0.1:1/health");
    CHECK_STR_CONTAINS(r2, "unknown setup 'nonsense'");
    free(r1);
    free(r2);
    sqlite3_close(h);
    study_plan_free(&p);
}

/* The runs' gpu_driver: the version in either NVIDIA kernel module's wording (the open
 * module's "... Kernel Module for x86_64  580.159.04 ..." once gave "for"). */
static void test_driver_version(void) {
    char v[64];
    study_driver_version("NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024", v, sizeof v);
    CHECKF(!strcmp(v, "550.54.15"), "proprietary module: \"%s\"", v);
    study_driver_version("NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U22)  Thu "
                         "Oct  2 2025", v, sizeof v);
    CHECKF(!strcmp(v, "580.159.04"), "open module: \"%s\"", v);
    study_driver_version("", v, sizeof v);
    CHECK(v[0] == 0);
    study_driver_version("NVIDIA UNIX Kernel Module for x86_64 .. 12 x", v, sizeof v);
    CHECKF(v[0] == 0, "no version: \"%s\"", v);
    char small[4];
    study_driver_version("Module 580.159.04", small, sizeof small);
    CHECK(!strcmp(small, "580"));
}

/* The --setups lists: membership, and the first item a list of names lacks. */
static void test_list_helpers(void) {
    CHECK(util_list_has(NULL, "x") && util_list_has("a,bb,c", "bb") && util_list_has("a,bb,c", "c"));
    CHECK(!util_list_has("a,bb,c", "b") && !util_list_has("a,bb,c", "") && !util_list_has("", "a"));
    const char *names[] = {"co-1gpu", "dis-gpu"};
    char bad[16];
    char known[32];
    CHECK(util_list_unknown("co-1gpu,dis-gpu", names, 2, bad, sizeof bad, known, sizeof known) == 0 && bad[0] == 0);
    CHECKF(!strcmp(known, "co-1gpu, dis-gpu"), "known: '%s'", known);
    CHECK(util_list_unknown("x", names, 2, bad, sizeof bad, known, 10) == -1 && !strcmp(known, "co-1gpu, ")); /* cut */
    CHECK(util_list_unknown("co-1gpu,dis-cpu", names, 2, bad, sizeof bad, NULL, 0) == -1 && !strcmp(bad, "dis-cpu"));
    CHECK(util_list_unknown("co-1gpu,,dis-gpu", names, 2, bad, sizeof bad, NULL, 0) == -1 && bad[0] == 0); /* empty item */
    CHECK(util_list_unknown("", names, 2, bad, sizeof bad, NULL, 0) == -1);
    CHECK(util_list_unknown("dis-gpu-and-a-long-name", names, 2, bad, 8, NULL, 0) == -1 && !strcmp(bad, "dis-gpu"));
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_study_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    TEST_RUN(test_plan_expand);
    TEST_RUN(test_driver_version);
    TEST_RUN(test_list_helpers);
    TEST_RUN(test_db_migrate_v2);
    TEST_RUN(test_plan_errors);
    TEST_RUN(test_shipped_plans);
    TEST_RUN(test_db_round_trip);
    TEST_RUN(test_pareto);
    TEST_RUN(test_sweep_resume);
    TEST_RUN(test_sweep_clocks);
    TEST_RUN(test_sweep_unreachable);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (!test_failures_ && system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    return TEST_END();
}
