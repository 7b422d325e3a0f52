/* db.c: the results database: one SQLite file per sweep (schema below, documented in
 * docs/results-database.md).
 *
 * Tuned for: a few hundred points of up to some thousands of requests each; every point
 * is written in one transaction (WAL mode), so a sweep killed at any moment leaves
 * whole points only. A value that was not measured is NULL, never 0. */
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "study/study.h"
#include "util/util.h"

struct study_db {
    sqlite3 *h;
};

static const char SCHEMA[] =
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);\n"
    "CREATE TABLE IF NOT EXISTS runs(\n"
    "  run_id INTEGER PRIMARY KEY,\n"
    "  point_key TEXT NOT NULL UNIQUE,\n"
    "  point_index INTEGER, plan TEXT, label TEXT,\n"
    "  setup TEXT NOT NULL, setup_kind TEXT NOT NULL, setup_options TEXT,\n"
    "  load_kind TEXT NOT NULL CHECK(load_kind IN ('batch','rate')), load_label TEXT,\n"
    "  batch_size INTEGER, request_rate REAL, burstiness REAL, num_prompts INTEGER,\n"
    "  max_concurrency INTEGER,\n"
    "  dataset TEXT, input_len INTEGER, output_len INTEGER, range_ratio REAL, seed INTEGER,\n"
    "  warmup_requests INTEGER, cooldown_s REAL,\n"
    "  prefill_sm_mhz INTEGER, decode_sm_mhz INTEGER, repeat INTEGER NOT NULL DEFAULT 0,\n"
    "  goodput_ttft_ms REAL, goodput_tpot_ms REAL, goodput_e2el_ms REAL,\n"
    "  model TEXT, base_url TEXT,\n"
    "  hostname TEXT, cpu_model TEXT, cpu_cores INTEGER, gpus TEXT, gpu_driver TEXT,\n"
    "  pdserve_version TEXT,\n"
    "  started_at TEXT, ended_at TEXT, start_unix REAL, end_unix REAL,\n"
    "  status TEXT NOT NULL CHECK(status IN ('ok','failed','skipped')), reason TEXT,\n"
    "  simulated INTEGER NOT NULL DEFAULT 0);\n"
    "CREATE TABLE IF NOT EXISTS requests(\n"
    "  run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  idx INTEGER NOT NULL,\n"
    "  status TEXT NOT NULL CHECK(status IN ('ok','error')), error TEXT,\n"
    "  input_tokens INTEGER, output_tokens INTEGER, expected_output_tokens INTEGER,\n"
    "  arrival_s REAL, sent_s REAL, first_token_s REAL, finished_s REAL,\n"
    "  ttft_ms REAL, e2el_ms REAL, token_times_s TEXT,\n"
    "  cached_tokens INTEGER,\n"
    "  server_phases TEXT,\n"
    "  PRIMARY KEY(run_id, idx));\n"
    "CREATE TABLE IF NOT EXISTS power_samples(\n"
    "  run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  t_s REAL NOT NULL, component TEXT NOT NULL, device TEXT, role TEXT,\n"
    "  power_w REAL, sm_mhz INTEGER, mem_mhz INTEGER,\n"
    "  util_gpu INTEGER, util_mem INTEGER, temp_c INTEGER, source TEXT);\n"
    "CREATE INDEX IF NOT EXISTS power_samples_run ON power_samples(run_id, t_s);\n"
    "CREATE TABLE IF NOT EXISTS energy(\n"
    "  run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  component TEXT NOT NULL, device TEXT, role TEXT, source TEXT,\n"
    "  measured INTEGER NOT NULL, joules REAL, idle_w REAL, idle_joules REAL, net_joules REAL);\n"
    "CREATE INDEX IF NOT EXISTS energy_run ON energy(run_id);\n"
    "CREATE TABLE IF NOT EXISTS server_metrics(\n"
    "  run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  series TEXT NOT NULL, value REAL);\n"
    "CREATE INDEX IF NOT EXISTS server_metrics_run ON server_metrics(run_id);\n"
    "CREATE TABLE IF NOT EXISTS summaries(\n"
    "  run_id INTEGER PRIMARY KEY REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  completed INTEGER, failed INTEGER, duration_s REAL,\n"
    "  total_input_tokens INTEGER, total_output_tokens INTEGER,\n"
    "  request_throughput REAL, input_throughput REAL, output_throughput REAL,\n"
    "  total_token_throughput REAL, max_output_tokens_per_s REAL, max_concurrent INTEGER,\n"
    "  good_requests INTEGER, goodput REAL,\n"
    "  ttft_mean_ms REAL, ttft_median_ms REAL, ttft_p90_ms REAL, ttft_p99_ms REAL,\n"
    "  tpot_mean_ms REAL, tpot_median_ms REAL, tpot_p90_ms REAL, tpot_p99_ms REAL,\n"
    "  itl_mean_ms REAL, itl_median_ms REAL, itl_p90_ms REAL, itl_p99_ms REAL,\n"
    "  e2el_mean_ms REAL, e2el_median_ms REAL, e2el_p90_ms REAL, e2el_p99_ms REAL,\n"
    "  energy_j REAL, energy_net_j REAL, idle_w REAL,\n"
    "  j_per_token REAL, j_per_token_net REAL, j_per_output_token REAL, j_per_output_token_net REAL,\n"
    "  client_cpu_s REAL,\n"
    "  cached_tokens INTEGER, cached_token_fraction REAL);\n";

const char *study_status_name(study_status s) {
    switch (s) {
    case STUDY_STATUS_OK: return "ok";
    case STUDY_STATUS_FAILED: return "failed";
    case STUDY_STATUS_SKIPPED: return "skipped";
    }
    return "?";
}

static int exec(sqlite3 *h, const char *sql, char *err, size_t errlen) {
    char *msg = NULL;
    if (sqlite3_exec(h, sql, NULL, NULL, &msg) != SQLITE_OK) {
        pd_errorf(err, errlen, "sqlite: %s", msg ? msg : sqlite3_errmsg(h));
        sqlite3_free(msg);
        return -1;
    }
    return 0;
}

/* Adds each column of cols[n] {name, type} that table lacks (a file written by an
 * older version); rows already there keep NULL in them. */
static int add_missing_columns(sqlite3 *h, const char *table, const char *const (*cols)[2], int n,
                               char *err, size_t errlen) {
    bool have[8] = {false};
    PD_ASSERT(n <= 8);
    char sql[200];
    snprintf(sql, sizeof sql, "PRAGMA table_info(%s)", table);
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) != SQLITE_OK) {
        pd_errorf(err, errlen, "sqlite: %s", sqlite3_errmsg(h));
        return -1;
    }
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 1);
        for (int i = 0; i < n; i++) have[i] |= name && !strcmp(name, cols[i][0]);
    }
    sqlite3_finalize(st);
    for (int i = 0; i < n; i++) {
        if (have[i]) continue;
        snprintf(sql, sizeof sql, "ALTER TABLE %s ADD COLUMN %s %s", table, cols[i][0], cols[i][1]);
        if (exec(h, sql, err, errlen)) return -1;
    }
    return 0;
}

/* Schema 1 -> 2: the power_samples columns of the sampler rings. Schema 2 -> 3: the
 * prompt tokens each request took from the server's prefix cache (requests), and
 * their sum and fraction per point (summaries; appended last, as ALTER TABLE puts
 * them, so that a migrated file and a new one have the same column order). 3 -> 4:
 * where each request's TTFT went (requests.server_phases). */
static int upgrade_old(sqlite3 *h, char *err, size_t errlen) {
    static const char *const power[][2] = {{"util_gpu", "INTEGER"}, {"util_mem", "INTEGER"},
                                           {"temp_c", "INTEGER"}, {"source", "TEXT"}};
    static const char *const reqs[][2] = {{"cached_tokens", "INTEGER"}, {"server_phases", "TEXT"}};
    static const char *const sums[][2] = {{"cached_tokens", "INTEGER"}, {"cached_token_fraction", "REAL"}};
    if (add_missing_columns(h, "power_samples", power, 4, err, errlen) ||
        add_missing_columns(h, "requests", reqs, 2, err, errlen) ||
        add_missing_columns(h, "summaries", sums, 2, err, errlen))
        return -1;
    return exec(h, "UPDATE meta SET value = '4' WHERE key = 'schema_version' AND value IN ('1', '2', '3')", err,
                errlen);
}

int study_db_open(const char *path, study_db **out, char *err, size_t errlen) {
    *out = NULL;
    sqlite3 *h = NULL;
    if (sqlite3_open_v2(path, &h, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK) {
        pd_errorf(err, errlen, "cannot open results database %s: %s", path, h ? sqlite3_errmsg(h) : "out of memory");
        sqlite3_close(h);
        return -1;
    }
    sqlite3_busy_timeout(h, 10000);
    char e2[512];
    if (exec(h, "PRAGMA journal_mode=WAL; PRAGMA foreign_keys=ON; PRAGMA synchronous=NORMAL;", e2, sizeof e2) ||
        exec(h, SCHEMA, e2, sizeof e2) || upgrade_old(h, e2, sizeof e2)) {
        pd_errorf(err, errlen, "%s: %s", path, e2);
        sqlite3_close(h);
        return -1;
    }
    /* Schema version: refuse a newer one, stamp a fresh one. */
    sqlite3_stmt *st = NULL;
    int version = 0;
    if (sqlite3_prepare_v2(h, "SELECT value FROM meta WHERE key='schema_version'", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        version = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    if (version > STUDY_SCHEMA_VERSION) {
        pd_errorf(err, errlen, "%s has results schema version %d; this pdserve reads up to %d", path, version,
                  STUDY_SCHEMA_VERSION);
        sqlite3_close(h);
        return -1;
    }
    study_db *db = xcalloc(1, sizeof *db);
    db->h = h;
    if (version == 0) {
        char v[16];
        snprintf(v, sizeof v, "%d", STUDY_SCHEMA_VERSION);
        if (study_db_set_meta(db, "schema_version", v, err, errlen) ||
            study_db_set_meta(db, "created_by", "pdserve " PDSERVE_VERSION, err, errlen)) {
            study_db_close(db);
            return -1;
        }
    }
    *out = db;
    return 0;
}

void study_db_close(study_db *db) {
    if (!db) return;
    sqlite3_close(db->h);
    free(db);
}

void *study_db_handle(study_db *db) { return db->h; }

int study_db_set_meta(study_db *db, const char *key, const char *value, char *err, size_t errlen) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db->h, "INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, key, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, value, -1, SQLITE_TRANSIENT);
        rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_OK) pd_errorf(err, errlen, "sqlite: %s", sqlite3_errmsg(db->h));
    return rc == SQLITE_OK ? 0 : -1;
}

int study_db_point_status(study_db *db, const char *key, study_status *status) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db->h, "SELECT status FROM runs WHERE point_key = ?", -1, &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st), found = 0;
    if (rc == SQLITE_ROW) {
        const char *s = (const char *)sqlite3_column_text(st, 0);
        found = 1;
        *status = !strcmp(s, "ok") ? STUDY_STATUS_OK : !strcmp(s, "skipped") ? STUDY_STATUS_SKIPPED
                                                                               : STUDY_STATUS_FAILED;
    } else if (rc != SQLITE_DONE) {
        found = -1;
    }
    sqlite3_finalize(st);
    return found;
}

/* ---- binding helpers: NaN (not measured) binds NULL ------------------------------------ */
static void bind_real(sqlite3_stmt *st, int i, double v) {
    if (isnan(v) || isinf(v)) sqlite3_bind_null(st, i);
    else sqlite3_bind_double(st, i, v);
}
static void bind_text(sqlite3_stmt *st, int i, const char *s) {
    if (s) sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT);
    else sqlite3_bind_null(st, i);
}
static void bind_int_or_null(sqlite3_stmt *st, int i, long long v, bool null) {
    if (null) sqlite3_bind_null(st, i);
    else sqlite3_bind_int64(st, i, v);
}

static void iso_time(double unix_s, char *out, size_t cap) {
    time_t t = (time_t)unix_s;
    struct tm tmv;
    gmtime_r(&t, &tmv);
    strftime(out, cap, "%Y-%m-%dT%H:%M:%SZ", &tmv);
}

/* The setup's options (plan serve_args are in the plan JSON) as a JSON object. */
static char *options_json(const study_setup *s) {
    size_t cap = 3, n = 0;
    for (int i = 0; i < s->n_opts; i++)
        cap += 2 * (strlen(s->opts[i].key) + (s->opts[i].value ? strlen(s->opts[i].value) : 4)) + 8;
    char *out = xmalloc(cap);
    out[n++] = '{';
    for (int i = 0; i < s->n_opts; i++) {
        if (i) out[n++] = ',';
        for (int k = 0; k < 2; k++) {
            const char *v = k ? s->opts[i].value : s->opts[i].key;
            if (!v) {
                memcpy(out + n, "true", 4);
                n += 4;
            } else {
                out[n++] = '"';
                for (; *v; v++) {
                    if (*v == '"' || *v == '\\') out[n++] = '\\';
                    out[n++] = (unsigned char)*v < 0x20 ? ' ' : *v;
                }
                out[n++] = '"';
            }
            if (!k) out[n++] = ':';
        }
    }
    out[n++] = '}';
    out[n] = 0;
    return out;
}

static const char INSERT_RUN[] =
    "INSERT INTO runs(point_key, point_index, plan, label, setup, setup_kind, setup_options, load_kind,"
    " load_label, batch_size, request_rate, burstiness, num_prompts, max_concurrency, dataset, input_len,"
    " output_len, range_ratio, seed, warmup_requests, cooldown_s, prefill_sm_mhz, decode_sm_mhz, repeat,"
    " goodput_ttft_ms, goodput_tpot_ms, goodput_e2el_ms, model, base_url, hostname, cpu_model, cpu_cores,"
    " gpus, gpu_driver, pdserve_version, started_at, ended_at, start_unix, end_unix, status, reason, simulated)"
    " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)";

static long long insert_run(sqlite3 *h, const study_point *pt, const study_run_info *ri, const bench_config *bc) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h, INSERT_RUN, -1, &st, NULL) != SQLITE_OK) return -1;
    const study_load *l = &pt->load;
    char ll[48], t0[32], t1[32];
    study_load_label(l, ll, sizeof ll);
    iso_time(ri->started_unix, t0, sizeof t0);
    iso_time(ri->ended_unix, t1, sizeof t1);
    char *opts = options_json(pt->setup);
    int i = 1;
    sqlite3_bind_text(st, i++, pt->key, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, i++, pt->index);
    bind_text(st, i++, ri->plan_name);
    bind_text(st, i++, pt->label);
    bind_text(st, i++, pt->setup->label);
    bind_text(st, i++, pt->setup->name);
    bind_text(st, i++, opts);
    bind_text(st, i++, l->kind == STUDY_LOAD_BATCH ? "batch" : "rate");
    bind_text(st, i++, ll);
    bind_int_or_null(st, i++, l->batch_size, l->kind != STUDY_LOAD_BATCH);
    bind_real(st, i++, l->rate);  /* infinite: NULL */
    bind_real(st, i++, l->burstiness);
    sqlite3_bind_int(st, i++, l->num_prompts);
    bind_int_or_null(st, i++, l->max_concurrency, l->max_concurrency <= 0);
    bind_text(st, i++, ri->dataset);
    sqlite3_bind_int(st, i++, ri->input_len);
    sqlite3_bind_int(st, i++, ri->output_len);
    bind_real(st, i++, ri->range_ratio);
    sqlite3_bind_int64(st, i++, (long long)ri->seed);
    sqlite3_bind_int(st, i++, ri->warmup_requests);
    bind_real(st, i++, ri->cooldown_s);
    bind_int_or_null(st, i++, pt->clock.prefill_mhz, pt->clock.prefill_mhz <= 0);
    bind_int_or_null(st, i++, pt->clock.decode_mhz, pt->clock.decode_mhz <= 0);
    sqlite3_bind_int(st, i++, pt->repeat);
    bind_real(st, i++, bc && bc->goodput_ttft_ms > 0 ? bc->goodput_ttft_ms : NAN);
    bind_real(st, i++, bc && bc->goodput_tpot_ms > 0 ? bc->goodput_tpot_ms : NAN);
    bind_real(st, i++, bc && bc->goodput_e2el_ms > 0 ? bc->goodput_e2el_ms : NAN);
    bind_text(st, i++, ri->model);
    bind_text(st, i++, ri->base_url);
    bind_text(st, i++, ri->hw ? ri->hw->hostname : NULL);
    bind_text(st, i++, ri->hw ? ri->hw->cpu_model : NULL);
    bind_int_or_null(st, i++, ri->hw ? ri->hw->cpu_cores : 0, !ri->hw);
    bind_text(st, i++, ri->hw ? ri->hw->gpus : NULL);
    bind_text(st, i++, ri->hw && ri->hw->driver[0] ? ri->hw->driver : NULL);
    bind_text(st, i++, PDSERVE_VERSION);
    bind_text(st, i++, t0);
    bind_text(st, i++, t1);
    sqlite3_bind_double(st, i++, ri->started_unix);
    sqlite3_bind_double(st, i++, ri->ended_unix);
    bind_text(st, i++, study_status_name(ri->status));
    bind_text(st, i++, ri->reason);
    sqlite3_bind_int(st, i++, ri->simulated);
    PD_ASSERT(i - 1 == sqlite3_bind_parameter_count(st));
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    free(opts);
    return rc == SQLITE_DONE ? sqlite3_last_insert_rowid(h) : -1;
}

/* Token times as a JSON array of seconds since the run's start. */
static char *token_times_json(const bench_record *rec) {
    size_t cap = 3 + (size_t)rec->n_tokens * 16, n = 0;
    char *s = xmalloc(cap);
    s[n++] = '[';
    for (int k = 0; k < rec->n_tokens; k++)
        n += (size_t)snprintf(s + n, cap - n, "%s%.6f", k ? "," : "", rec->start_s + rec->token_s[k]);
    s[n++] = ']';
    s[n] = 0;
    return s;
}

static int insert_requests(sqlite3 *h, long long run_id, const bench_config *bc, const bench_result *r) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h,
                           "INSERT INTO requests(run_id, idx, status, error, input_tokens, output_tokens,"
                           " expected_output_tokens, arrival_s, sent_s, first_token_s, finished_s, ttft_ms,"
                           " e2el_ms, token_times_s, cached_tokens, server_phases)"
                           " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    double *arr = xmalloc(sizeof(double) * (size_t)PD_MAX(r->n, 1));
    bench_arrivals(bc ? bc->request_rate : INFINITY, bc ? bc->burstiness : 1.0, r->n, bc ? bc->seed : 0, arr);
    int rc = 0;
    for (int i = 0; i < r->n && rc == 0; i++) {
        const bench_record *rec = &r->recs[i];
        bool has_first = rec->success || rec->n_tokens > 0;
        char *tt = token_times_json(rec);
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, run_id);
        sqlite3_bind_int(st, 2, i);
        bind_text(st, 3, rec->success ? "ok" : "error");
        bind_text(st, 4, rec->error);
        bind_int_or_null(st, 5, rec->prompt_len, rec->prompt_len < 0);
        sqlite3_bind_int(st, 6, rec->output_len);
        bind_int_or_null(st, 7, rec->expected_output_len, rec->expected_output_len < 0);
        sqlite3_bind_double(st, 8, arr[i]);
        sqlite3_bind_double(st, 9, rec->start_s);
        bind_real(st, 10, has_first && rec->ttft_s > 0 ? rec->start_s + rec->ttft_s : NAN);
        bind_real(st, 11, rec->e2el_s > 0 ? rec->start_s + rec->e2el_s : NAN);
        bind_real(st, 12, has_first && rec->ttft_s > 0 ? rec->ttft_s * 1e3 : NAN);
        bind_real(st, 13, rec->e2el_s > 0 ? rec->e2el_s * 1e3 : NAN);
        sqlite3_bind_text(st, 14, tt, -1, SQLITE_TRANSIENT);
        bind_int_or_null(st, 15, rec->cached_tokens, !rec->has_cached);
        bind_text(st, 16, rec->server_phases);
        if (sqlite3_step(st) != SQLITE_DONE) rc = -1;
        free(tt);
    }
    free(arr);
    sqlite3_finalize(st);
    return rc;
}

/* "pdserve_gpu_energy_joules{gpu=\"0\",role=\"prefill\"}" (maybe after "URL ") ->
 * component "gpu", device "0". */
static void series_parts(const char *key, char *comp, size_t ccap, char *dev, size_t dcap) {
    const char *sp = strchr(key, ' '), *brace = strchr(key, '{');
    const char *name = sp && (!brace || sp < brace) ? sp + 1 : key;
    size_t nl = strcspn(name, "{");
    char n[192];
    snprintf(n, sizeof n, "%.*s", (int)PD_MIN(nl, sizeof n - 1), name);
    char *suffix = strstr(n, "_energy_joules");
    if (suffix) *suffix = 0;
    const char *c = n;
    if (!strncmp(c, "pdserve_", 8)) c += 8;
    snprintf(comp, ccap, "%.*s", (int)ccap - 1, c[0] ? c : "energy");
    dev[0] = 0;
    static const char *const labels[] = {"gpu=\"", "device=\"", "socket=\"", "package=\"", NULL};
    for (int i = 0; labels[i] && !dev[0]; i++) {
        const char *l = strstr(name, labels[i]);
        if (!l) continue;
        l += strlen(labels[i]);
        size_t m = strcspn(l, "\"");
        snprintf(dev, dcap, "%.*s", (int)PD_MIN(m, dcap - 1), l);
    }
}

typedef struct energy_tot {
    double j, net_j, idle_w;
    bool any, net_ok;
} energy_tot;

/* One energy row per series read before and after; fills the totals (a "node"
 * meter, when present, is the whole; otherwise the sum of the components). */
static int insert_energy(sqlite3 *h, long long run_id, const bench_result *r, const study_idle *idle,
                         energy_tot *tot) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h,
                           "INSERT INTO energy(run_id, component, device, role, source, measured, joules, idle_w,"
                           " idle_joules, net_joules) VALUES(?,?,?,?,?,?,?,?,?,?)",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    bool has_node = false;
    for (int i = 0; i < r->energy.n; i++) {
        char comp[64], dev[64];
        series_parts(r->energy.s[i].key, comp, sizeof comp, dev, sizeof dev);
        if (!strcmp(comp, "node") && r->energy.s[i].has_before && r->energy.s[i].has_after) has_node = true;
    }
    energy_tot node = {0, 0, 0, false, true}, parts = {0, 0, 0, false, true};
    int rc = 0, rows = 0;
    /* idle energy over the window between the two readings (the bench's timed part) */
    double dur = r->energy.t_after > r->energy.t_before && r->energy.t_before > 0
                     ? r->energy.t_after - r->energy.t_before : r->sum.duration_s;
    for (int i = 0; i < r->energy.n && rc == 0; i++) {
        const bench_energy_series *s = &r->energy.s[i];
        if (!s->has_before || !s->has_after || s->dup) continue; /* a meter seen twice counts once */
        char comp[64], dev[64];
        series_parts(s->key, comp, sizeof comp, dev, sizeof dev);
        double j = s->after - s->before, idle_w = s->has_idle ? s->idle_w : NAN; /* the instance's baseline */
        if (isnan(idle_w) && idle && idle->seconds > 0)
            for (int k = 0; k < idle->e.n; k++)
                if (!strcmp(idle->e.s[k].key, s->key) && idle->e.s[k].has_before && idle->e.s[k].has_after)
                    idle_w = (idle->e.s[k].after - idle->e.s[k].before) / idle->seconds;
        double idle_j = idle_w * dur, net = j - idle_j;
        energy_tot *t = !strcmp(comp, "node") ? &node : &parts;
        t->any = true;
        t->j += j;
        if (isnan(idle_w)) t->net_ok = false;
        else {
            t->net_j += net;
            t->idle_w += idle_w;
        }
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, run_id);
        bind_text(st, 2, comp);
        bind_text(st, 3, dev[0] ? dev : NULL);
        bind_text(st, 4, s->role[0] ? s->role : NULL);
        bind_text(st, 5, s->key);
        sqlite3_bind_int(st, 6, 1);
        sqlite3_bind_double(st, 7, j);
        bind_real(st, 8, idle_w);
        bind_real(st, 9, idle_j);
        bind_real(st, 10, net);
        if (sqlite3_step(st) != SQLITE_DONE) rc = -1;
        rows++;
    }
    /* Components the servers say they do not measure, and no series of: a row each. */
    for (int k = 0; k < r->energy.n_comp && rc == 0; k++) {
        if (r->energy.comp[k].measured) continue;
        bool has = false;
        for (int i = 0; i < r->energy.n && !has; i++) {
            char comp[64], dev[64];
            series_parts(r->energy.s[i].key, comp, sizeof comp, dev, sizeof dev);
            has = !strcmp(comp, r->energy.comp[k].name) && r->energy.s[i].has_before && r->energy.s[i].has_after;
        }
        if (has) continue;
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, run_id);
        bind_text(st, 2, r->energy.comp[k].name);
        for (int c = 3; c <= 5; c++) sqlite3_bind_null(st, c);
        sqlite3_bind_int(st, 6, 0);
        for (int c = 7; c <= 10; c++) sqlite3_bind_null(st, c);
        if (sqlite3_step(st) != SQLITE_DONE) rc = -1;
    }
    if (rc == 0 && rows == 0) {  /* say so explicitly: energy was not measured */
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, run_id);
        bind_text(st, 2, "all");
        for (int k = 3; k <= 5; k++) sqlite3_bind_null(st, k);
        sqlite3_bind_int(st, 6, 0);
        for (int k = 7; k <= 10; k++) sqlite3_bind_null(st, k);
        if (sqlite3_step(st) != SQLITE_DONE) rc = -1;
    }
    sqlite3_finalize(st);
    *tot = has_node ? node : parts;
    return rc;
}

/* ---- power samples ------------------------------------------------------------------ */

int study_power_samples_parse(const char *text, double t_s, study_power_sample *out, int cap) {
    static const char *const names[] = {"pdserve_gpu_power_watts{", "pdserve_gpu_sm_clock_mhz{",
                                        "pdserve_gpu_mem_clock_mhz{"};
    int n = 0;
    for (const char *p = text; p && *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        char line[512];
        snprintf(line, sizeof line, "%.*s", (int)PD_MIN(len, sizeof line - 1), p);
        p = nl ? nl + 1 : NULL;
        int which = -1;
        for (int k = 0; k < 3; k++)
            if (!strncmp(line, names[k], strlen(names[k]))) which = k;
        char *close = strchr(line, '}');
        if (which < 0 || !close) continue;
        char *vend;
        double v = strtod(close + 1, &vend);
        if (vend == close + 1 || !isfinite(v)) continue;
        *close = 0;
        char host[64] = "", gpu[16] = "", role[16] = "";
        struct { const char *k; char *out; size_t cap; } lbl[3] = {
            {"host=\"", host, sizeof host}, {"gpu=\"", gpu, sizeof gpu}, {"role=\"", role, sizeof role}};
        for (int k = 0; k < 3; k++) {
            const char *l = strstr(line, lbl[k].k);
            if (!l) continue;
            l += strlen(lbl[k].k);
            size_t m = strcspn(l, "\"");
            snprintf(lbl[k].out, lbl[k].cap, "%.*s", (int)PD_MIN(m, lbl[k].cap - 1), l);
        }
        int i;
        for (i = 0; i < n; i++)
            if (!strcmp(out[i].host, host) && !strcmp(out[i].device, gpu)) break;
        if (i == n) {
            if (n >= cap) continue;
            memset(&out[n], 0, sizeof out[n]);
            out[n].t_s = t_s;
            snprintf(out[n].component, sizeof out[n].component, "gpu");
            snprintf(out[n].source, sizeof out[n].source, "scrape");
            out[n].util_gpu = out[n].util_mem = out[n].temp_c = -1;
            snprintf(out[n].host, sizeof out[n].host, "%s", host);
            snprintf(out[n].device, sizeof out[n].device, "%s", gpu);
            snprintf(out[n].role, sizeof out[n].role, "%s", role);
            out[n].power_w = NAN;
            out[n].sm_mhz = out[n].mem_mhz = -1;
            n++;
        }
        if (which == 0) out[i].power_w = v;
        else if (which == 1) out[i].sm_mhz = (int)v;
        else out[i].mem_mhz = (int)v;
    }
    return n;
}

static int insert_power(sqlite3 *h, long long run_id, const study_run_info *ri) {
    if (!ri->power || ri->n_power <= 0) return 0;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h,
                           "INSERT INTO power_samples(run_id, t_s, component, device, role, power_w, sm_mhz, mem_mhz,"
                           " util_gpu, util_mem, temp_c, source) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    int rc = 0;
    /* device "0" / "package-0", or "HOST:0" when instances of several hosts report */
    bool many_hosts = false;
    for (int k = 1; k < ri->n_power && !many_hosts; k++) many_hosts = strcmp(ri->power[k].host, ri->power[0].host) != 0;
    for (int i = 0; i < ri->n_power && rc == 0; i++) {
        const study_power_sample *p = &ri->power[i];
        char dev[128];
        if (many_hosts) snprintf(dev, sizeof dev, "%s:%s", p->host, p->device);
        else snprintf(dev, sizeof dev, "%s", p->device);
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, run_id);
        sqlite3_bind_double(st, 2, p->t_s);
        bind_text(st, 3, p->component[0] ? p->component : "gpu");
        bind_text(st, 4, dev);
        bind_text(st, 5, p->role[0] ? p->role : NULL);
        bind_real(st, 6, p->power_w);
        bind_int_or_null(st, 7, p->sm_mhz, p->sm_mhz < 0);
        bind_int_or_null(st, 8, p->mem_mhz, p->mem_mhz < 0);
        bind_int_or_null(st, 9, p->util_gpu, p->util_gpu < 0);
        bind_int_or_null(st, 10, p->util_mem, p->util_mem < 0);
        bind_int_or_null(st, 11, p->temp_c, p->temp_c < 0);
        bind_text(st, 12, p->source[0] ? p->source : NULL);
        if (sqlite3_step(st) != SQLITE_DONE) rc = -1;
    }
    sqlite3_finalize(st);
    return rc;
}

/* ---- server metrics (prefix cache, KV tiers) -------------------------------------------- */

void study_metrics_parse(const char *text, const char *prefix, study_metric *out, int cap, int *n) {
    static const char *const wanted[] = {"pdserve_prefix_cache_", "pdserve_kv_offload_", "pdserve_engine_",
                                         "pdserve_num_preemptions_total", "pdserve_prompt_tokens_total",
                                         "pdserve_generation_tokens_total", "pdserve_kv_transfer",
                                         "pdserve_kv_store_put", "pdserve_kv_store_get"};
    for (const char *p = text; p && *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        const char *line = p;
        p = nl ? nl + 1 : NULL;
        bool want = false;
        for (size_t w = 0; w < PD_ARRAY_LEN(wanted) && !want; w++)
            want = strncmp(line, wanted[w], strlen(wanted[w])) == 0;
        if (!want) continue;
        const char *sp = NULL; /* the last space of the line: the value follows */
        for (size_t i = 0; i < len; i++)
            if (line[i] == ' ') sp = line + i;
        if (!sp || *n >= cap) continue;
        char num[64];
        snprintf(num, sizeof num, "%.*s", (int)PD_MIN((size_t)(line + len - sp - 1), sizeof num - 1), sp + 1);
        char *end;
        double v = strtod(num, &end);
        if (end == num || !isfinite(v)) continue;
        study_metric *m = &out[(*n)++];
        snprintf(m->series, sizeof m->series, "%s%s%.*s", prefix, prefix[0] ? " " : "", (int)(sp - line), line);
        m->value = v;
    }
}

static bool is_counter(const char *series) {
    const char *brace = strchr(series, '{');
    size_t n = brace ? (size_t)(brace - series) : strlen(series);
    return n >= 6 && !strncmp(series + n - 6, "_total", 6);
}

void study_metrics_delta(study_metric *after, int n_after, const study_metric *before, int n_before) {
    for (int i = 0; i < n_after; i++) {
        if (!is_counter(after[i].series)) continue;
        for (int k = 0; k < n_before; k++)
            if (!strcmp(before[k].series, after[i].series)) {
                after[i].value -= before[k].value;
                break;
            }
    }
}

static int insert_metrics(sqlite3 *h, long long run_id, const study_run_info *ri) {
    if (!ri->metrics || ri->n_metrics <= 0) return 0;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h, "INSERT INTO server_metrics(run_id, series, value) VALUES(?,?,?)", -1, &st, NULL) !=
        SQLITE_OK)
        return -1;
    int rc = 0;
    for (int i = 0; i < ri->n_metrics && rc == 0; i++) {
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, run_id);
        bind_text(st, 2, ri->metrics[i].series);
        bind_real(st, 3, ri->metrics[i].value);
        if (sqlite3_step(st) != SQLITE_DONE) rc = -1;
    }
    sqlite3_finalize(st);
    return rc;
}

/* Latency statistics from the records (vLLM definitions), independent of which
 * percentiles the bench config asked for. */
static void latency_stats(const bench_result *r, bench_stat *ttft, bench_stat *tpot, bench_stat *itl,
                          bench_stat *e2el) {
    static const double pcts[] = {50, 90, 99};
    int n_itl = 0;
    for (int i = 0; i < r->n; i++)
        if (r->recs[i].success && r->recs[i].n_tokens > 1) n_itl += r->recs[i].n_tokens - 1;
    double *a = xmalloc(sizeof(double) * (size_t)PD_MAX(r->n, 1)), *b = xmalloc(sizeof(double) * (size_t)PD_MAX(r->n, 1));
    double *c = xmalloc(sizeof(double) * (size_t)PD_MAX(n_itl, 1)), *d = xmalloc(sizeof(double) * (size_t)PD_MAX(r->n, 1));
    int na = 0, nb = 0, nc = 0, nd = 0;
    for (int i = 0; i < r->n; i++) {
        const bench_record *x = &r->recs[i];
        if (!x->success) continue;
        a[na++] = x->ttft_s * 1e3;
        d[nd++] = x->e2el_s * 1e3;
        if (x->output_len > 1) b[nb++] = (x->e2el_s - x->ttft_s) / (x->output_len - 1) * 1e3;
        for (int k = 1; k < x->n_tokens; k++) c[nc++] = (x->token_s[k] - x->token_s[k - 1]) * 1e3;
    }
    bench_stat_compute(ttft, a, na, pcts, 3);
    bench_stat_compute(tpot, b, nb, pcts, 3);
    bench_stat_compute(itl, c, nc, pcts, 3);
    bench_stat_compute(e2el, d, nd, pcts, 3);
    free(a);
    free(b);
    free(c);
    free(d);
}

/* Requests meeting every SLO of bc (vLLM's goodput definition: TTFT, TPOT = (e2el -
 * ttft) / (out - 1), E2EL, each in ms, each only when given). */
static int count_good(const bench_config *bc, const bench_result *r) {
    int good = 0;
    for (int i = 0; i < r->n; i++) {
        const bench_record *x = &r->recs[i];
        if (!x->success) continue;
        double tpot = x->output_len > 1 ? (x->e2el_s - x->ttft_s) / (x->output_len - 1) * 1e3 : 0;
        if (bc->goodput_ttft_ms > 0 && x->ttft_s * 1e3 > bc->goodput_ttft_ms) continue;
        if (bc->goodput_tpot_ms > 0 && tpot > bc->goodput_tpot_ms) continue;
        if (bc->goodput_e2el_ms > 0 && x->e2el_s * 1e3 > bc->goodput_e2el_ms) continue;
        good++;
    }
    return good;
}

static double per(double j, long long tokens, bool ok) { return ok && tokens > 0 ? j / (double)tokens : NAN; }

static int insert_summary(sqlite3 *h, long long run_id, const bench_config *bc, const bench_result *r,
                          const energy_tot *e) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h,
                           "INSERT INTO summaries VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,"
                           "?,?,?,?,?,?,?,?,?,?)",
                           -1, &st, NULL) != SQLITE_OK)
        return -1;
    const bench_summary *s = &r->sum;
    bench_stat lat[4];
    latency_stats(r, &lat[0], &lat[1], &lat[2], &lat[3]);
    double dur = s->duration_s > 0 ? s->duration_s : NAN;
    bool slo = bc && (bc->goodput_ttft_ms > 0 || bc->goodput_tpot_ms > 0 || bc->goodput_e2el_ms > 0);
    long long tokens = s->total_input + s->total_output;
    bool net_ok = e->any && e->net_ok;
    int i = 1;
    sqlite3_bind_int64(st, i++, run_id);
    sqlite3_bind_int(st, i++, s->completed);
    sqlite3_bind_int(st, i++, s->failed);
    bind_real(st, i++, dur);
    sqlite3_bind_int64(st, i++, s->total_input);
    sqlite3_bind_int64(st, i++, s->total_output);
    bind_real(st, i++, s->completed / dur);
    bind_real(st, i++, (double)s->total_input / dur);
    bind_real(st, i++, (double)s->total_output / dur);
    bind_real(st, i++, (double)tokens / dur);
    bind_real(st, i++, s->max_output_tokens_per_s);
    sqlite3_bind_int(st, i++, s->max_concurrent);
    int good = slo ? count_good(bc, r) : 0;
    bind_int_or_null(st, i++, good, !slo);
    bind_real(st, i++, slo ? good / dur : NAN);
    for (int k = 0; k < 4; k++) {
        bool any = lat[k].n > 0;
        bind_real(st, i++, any ? lat[k].mean : NAN);
        bind_real(st, i++, any ? lat[k].median : NAN);
        bind_real(st, i++, any ? lat[k].pct[1] : NAN);
        bind_real(st, i++, any ? lat[k].pct[2] : NAN);
    }
    bind_real(st, i++, e->any ? e->j : NAN);
    bind_real(st, i++, net_ok ? e->net_j : NAN);
    bind_real(st, i++, net_ok ? e->idle_w : NAN);
    bind_real(st, i++, per(e->j, tokens, e->any));
    bind_real(st, i++, per(e->net_j, tokens, net_ok));
    bind_real(st, i++, per(e->j, s->total_output, e->any));
    bind_real(st, i++, per(e->net_j, s->total_output, net_ok));
    bind_real(st, i++, r->client_cpu_s);
    /* cached tokens over the prompt tokens of the completed requests that reported them */
    long long cached = 0, input = 0;
    int known = 0;
    for (int k = 0; k < r->n; k++) {
        const bench_record *x = &r->recs[k];
        if (!x->success || !x->has_cached) continue;
        known++;
        cached += x->cached_tokens;
        input += x->prompt_len > 0 ? x->prompt_len : 0;
    }
    bind_int_or_null(st, i++, cached, known == 0);
    bind_real(st, i++, known > 0 && input > 0 ? (double)cached / (double)input : NAN);
    PD_ASSERT(i - 1 == sqlite3_bind_parameter_count(st));
    int rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
    sqlite3_finalize(st);
    return rc;
}

long long study_db_record(study_db *db, const study_point *pt, const study_run_info *ri, const bench_config *bc,
                          const bench_result *r, const study_idle *idle, char *err, size_t errlen) {
    sqlite3 *h = db->h;
    char e2[512];
    if (exec(h, "BEGIN IMMEDIATE", e2, sizeof e2)) {
        pd_errorf(err, errlen, "%s", e2);
        return -1;
    }
    long long id = -1;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h, "DELETE FROM runs WHERE point_key = ?", -1, &st, NULL) != SQLITE_OK) goto fail;
    sqlite3_bind_text(st, 1, pt->key, -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) goto fail;
    id = insert_run(h, pt, ri, bc);
    if (id < 0) goto fail;
    if (r) {
        energy_tot tot;
        if (insert_requests(h, id, bc, r) || insert_energy(h, id, r, idle, &tot) ||
            insert_summary(h, id, bc, r, &tot) || insert_power(h, id, ri) || insert_metrics(h, id, ri))
            goto fail;
    }
    if (exec(h, "COMMIT", e2, sizeof e2)) {
        pd_errorf(err, errlen, "%s", e2);
        exec(h, "ROLLBACK", e2, sizeof e2);
        return -1;
    }
    return id;
fail:
    pd_errorf(err, errlen, "recording point %s: sqlite: %s", pt->key, sqlite3_errmsg(h));
    exec(h, "ROLLBACK", e2, sizeof e2);
    return -1;
}
