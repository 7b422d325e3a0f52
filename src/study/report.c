/* report.c: `pdserve report`: from a results database alone, a folder with
 *   index.html      tables per setup and load, energy by component, Pareto frontiers,
 *                   plots (report_plots.c), failed and skipped points with reasons;
 *   summaries.csv   every summary joined with its run's parameters;
 *   runs.csv        the runs table as it is;
 *   *.svg, *.png    the plots;
 * and a plain-text comparison table on the given stream. Repeats of a point are
 * averaged. A value that was not measured reads "not measured", never 0; simulated
 * points are marked as such everywhere. */
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "study/report_internal.h"
#include "study/study.h"
#include "util/util.h"

/* ---- loading ------------------------------------------------------------------------- */
/* %s: the cached-token fraction, or NULL in a database older than schema 3 (the
 * report opens it read-only, unmigrated). */
static const char LOAD_SQL[] =
    "SELECT r.run_id, r.setup, r.load_kind, r.load_label, coalesce(r.batch_size, 0), r.request_rate,"
    " coalesce(r.prefill_sm_mhz, 0), coalesce(r.decode_sm_mhz, 0), r.simulated, r.point_index,"
    " s.completed, s.failed, s.ttft_median_ms, s.ttft_p99_ms, s.tpot_median_ms, s.tpot_p99_ms,"
    " s.itl_median_ms, s.e2el_median_ms, s.request_throughput, s.input_throughput, s.output_throughput,"
    " s.total_token_throughput, s.goodput, s.energy_j, s.j_per_token, s.j_per_token_net,"
    " s.j_per_output_token, s.j_per_output_token_net, s.total_input_tokens + s.total_output_tokens, %s"
    " FROM runs r JOIN summaries s USING(run_id) WHERE r.status = 'ok'"
    " ORDER BY r.point_index, r.run_id";

static double col(sqlite3_stmt *st, int i) {
    return sqlite3_column_type(st, i) == SQLITE_NULL ? NAN : sqlite3_column_double(st, i);
}

/* Running mean that keeps NaN only when no repeat measured the value. */
static void acc(double *mean, int *cnt, double v) {
    if (isnan(v)) return;
    *mean = *cnt ? *mean + (v - *mean) / (*cnt + 1) : v;
    (*cnt)++;
}

typedef struct acc_counts {
    int c[16], cached, reuse[8], store[4];
    int comp[16], comp_net[16];
} acc_counts;

static void add_components(sqlite3 *h, long long run_id, double tokens, rep_point *p, acc_counts *ac) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h,
                           "SELECT component || coalesce(' ' || device, '') || coalesce(' (' || role || ')', ''),"
                           " sum(joules), sum(net_joules) FROM energy WHERE run_id = ? AND measured = 1"
                           " GROUP BY 1 ORDER BY 1",
                           -1, &st, NULL) != SQLITE_OK)
        return;
    sqlite3_bind_int64(st, 1, run_id);
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        int k;
        for (k = 0; k < p->n_comp; k++)
            if (!strcmp(p->comp[k], name)) break;
        if (k == p->n_comp) {
            if (k >= 16) continue;
            snprintf(p->comp[k], sizeof p->comp[k], "%s", name);
            p->comp_jpt[k] = p->comp_jpt_net[k] = NAN;
            p->n_comp++;
        }
        acc(&p->comp_jpt[k], &ac->comp[k], tokens > 0 ? col(st, 1) / tokens : NAN);
        acc(&p->comp_jpt_net[k], &ac->comp_net[k], tokens > 0 ? col(st, 2) / tokens : NAN);
    }
    sqlite3_finalize(st);
}

/* Reads ok runs, one rep_point per configuration. *out malloc'd. */
static bool has_column(sqlite3 *h, const char *table, const char *column) {
    char sql[128];
    snprintf(sql, sizeof sql, "PRAGMA table_info(%s)", table);
    sqlite3_stmt *st = NULL;
    bool found = false;
    if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) == SQLITE_OK)
        while (!found && sqlite3_step(st) == SQLITE_ROW) {
            const char *name = (const char *)sqlite3_column_text(st, 1);
            found = name && !strcmp(name, column);
        }
    sqlite3_finalize(st);
    return found;
}

/* The prefix cache / KV tier counters of one run and a disk store's ops (server_metrics,
 * summed over the deployment's instances; a store's seconds over their parts) into p's
 * running means; nothing of either when the run has none. */
static void add_server_counters(sqlite3 *h, long long run_id, rep_point *p, acc_counts *ac) {
    static const char SQL[] =
        "SELECT sum(CASE WHEN series LIKE '%pdserve_prefix_cache_queries_total%' THEN value END),"
        " coalesce(sum(CASE WHEN series LIKE '%pdserve_prefix_cache_tier_hits_total%tier=\"gpu\"%' THEN value END),"
        "  sum(CASE WHEN series LIKE '%pdserve_prefix_cache_hits_total%' THEN value END)),"
        " sum(CASE WHEN series LIKE '%pdserve_prefix_cache_tier_hits_total%tier=\"cpu\"%' THEN value END),"
        " sum(CASE WHEN series LIKE '%pdserve_prefix_cache_tier_hits_total%tier=\"disk\"%' THEN value END),"
        " sum(CASE WHEN series LIKE '%pdserve_kv_offload_decisions_total%decision=\"load\"%' THEN value END),"
        " sum(CASE WHEN series LIKE '%pdserve_kv_offload_decisions_total%decision=\"recompute\"%' THEN value END),"
        " sum(CASE WHEN series LIKE '%pdserve_kv_offload_loaded_blocks_total%' THEN value END),"
        " sum(CASE WHEN series LIKE '%pdserve_kv_offload_dropped_total%' THEN value END),"
        " sum(CASE WHEN series LIKE '%pdserve_kv_store_puts_total%' THEN value END),"
        " sum(CASE WHEN series LIKE '%pdserve_kv_store_put_seconds_total%' THEN value END),"
        " sum(CASE WHEN series LIKE '%pdserve_kv_store_gets_total%' THEN value END),"
        " sum(CASE WHEN series LIKE '%pdserve_kv_store_get_seconds_total%' THEN value END)"
        " FROM server_metrics WHERE run_id = ?";
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h, SQL, -1, &st, NULL) != SQLITE_OK) return;
    sqlite3_bind_int64(st, 1, run_id);
    if (sqlite3_step(st) == SQLITE_ROW) {
        if (sqlite3_column_type(st, 0) != SQLITE_NULL) {
            double q = sqlite3_column_double(st, 0);
            for (int k = 0; k < 3; k++)
                acc(&p->tier_hit[k], &ac->reuse[k], q > 0 ? col(st, 1 + k) / q : NAN);
            double *f[] = {&p->loads, &p->recomputes, &p->loaded_blocks, &p->dropped};
            for (int k = 0; k < 4; k++) acc(f[k], &ac->reuse[3 + k], col(st, 4 + k));
        }
        double puts = col(st, 8), put_s = col(st, 9), gets = col(st, 10), get_s = col(st, 11);
        if (puts > 0) {
            acc(&p->store_puts, &ac->store[0], puts);
            acc(&p->store_put_s, &ac->store[1], put_s / puts);
        }
        if (gets > 0) {
            acc(&p->store_gets, &ac->store[2], gets);
            acc(&p->store_get_s, &ac->store[3], get_s / gets);
        }
    }
    sqlite3_finalize(st);
}

static int load_points(sqlite3 *h, rep_point **out, int *n_out, char *err, size_t errlen) {
    bool has_metrics = has_column(h, "server_metrics", "series");
    sqlite3_stmt *st = NULL;
    char sql[sizeof LOAD_SQL + 64];
    snprintf(sql, sizeof sql, LOAD_SQL,
             has_column(h, "summaries", "cached_token_fraction") ? "s.cached_token_fraction" : "NULL");
    if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) != SQLITE_OK) {
        pd_errorf(err, errlen, "not a pdserve results database (%s)", sqlite3_errmsg(h));
        return -1;
    }
    rep_point *pts = NULL;
    acc_counts *acs = NULL;
    long long *run_ids = NULL;
    int *of_point = NULL, n_runs = 0;
    int n = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *setup = (const char *)sqlite3_column_text(st, 1);
        const char *kind = (const char *)sqlite3_column_text(st, 2);
        const char *ll = (const char *)sqlite3_column_text(st, 3);
        int pm = sqlite3_column_int(st, 6), dm = sqlite3_column_int(st, 7);
        bool sim = sqlite3_column_int(st, 8) != 0;
        int k;
        for (k = 0; k < n; k++)
            if (!strcmp(pts[k].setup, setup ? setup : "") && !strcmp(pts[k].load_label, ll ? ll : "") &&
                pts[k].prefill_mhz == pm && pts[k].decode_mhz == dm && pts[k].simulated == sim)
                break;
        if (k == n) {
            pts = xrealloc(pts, sizeof *pts * (size_t)(n + 1));
            acs = xrealloc(acs, sizeof *acs * (size_t)(n + 1));
            rep_point *p = &pts[n];
            memset(p, 0, sizeof *p);
            memset(&acs[n], 0, sizeof acs[n]);
            snprintf(p->setup, sizeof p->setup, "%s", setup ? setup : "");
            snprintf(p->load_kind, sizeof p->load_kind, "%s", kind ? kind : "");
            snprintf(p->load_label, sizeof p->load_label, "%s", ll ? ll : "");
            p->batch_size = sqlite3_column_int(st, 4);
            p->rate = sqlite3_column_type(st, 5) == SQLITE_NULL ? INFINITY : sqlite3_column_double(st, 5);
            p->prefill_mhz = pm;
            p->decode_mhz = dm;
            p->simulated = sim;
            p->order = sqlite3_column_int(st, 9);
            char clk[32] = "";
            if (pm) snprintf(clk, sizeof clk, " @%d/%d", pm, dm);
            snprintf(p->label, sizeof p->label, "%.63s %.40s%s%s", p->setup, p->load_label, clk, sim ? " (sim)" : "");
            double *f[] = {&p->ttft_med, &p->ttft_p99, &p->tpot_med, &p->tpot_p99, &p->itl_med, &p->e2el_med,
                           &p->req_thr, &p->in_thr, &p->out_thr, &p->tok_thr, &p->goodput, &p->energy_j,
                           &p->jpt, &p->jpt_net, &p->jpot, &p->jpot_net};
            for (size_t i = 0; i < PD_ARRAY_LEN(f); i++) *f[i] = NAN;
            p->cached_frac = NAN;
            double *g[] = {&p->tier_hit[0], &p->tier_hit[1], &p->tier_hit[2], &p->loads, &p->recomputes,
                           &p->loaded_blocks, &p->dropped, &p->store_puts, &p->store_put_s, &p->store_gets,
                           &p->store_get_s};
            for (size_t i = 0; i < PD_ARRAY_LEN(g); i++) *g[i] = NAN;
            n++;
        }
        rep_point *p = &pts[k];
        acc_counts *ac = &acs[k];
        run_ids = xrealloc(run_ids, sizeof *run_ids * (size_t)(n_runs + 1));
        of_point = xrealloc(of_point, sizeof *of_point * (size_t)(n_runs + 1));
        run_ids[n_runs] = sqlite3_column_int64(st, 0);
        of_point[n_runs++] = k;
        p->n_ok++;
        p->completed += sqlite3_column_int(st, 10);
        p->failed += sqlite3_column_int(st, 11);
        double *f[] = {&p->ttft_med, &p->ttft_p99, &p->tpot_med, &p->tpot_p99, &p->itl_med, &p->e2el_med,
                       &p->req_thr, &p->in_thr, &p->out_thr, &p->tok_thr, &p->goodput, &p->energy_j,
                       &p->jpt, &p->jpt_net, &p->jpot, &p->jpot_net};
        for (size_t i = 0; i < PD_ARRAY_LEN(f); i++) acc(f[i], &ac->c[i], col(st, 12 + (int)i));
        acc(&p->cached_frac, &ac->cached, col(st, 29));
        if (has_metrics) add_server_counters(h, sqlite3_column_int64(st, 0), p, ac);
        add_components(h, sqlite3_column_int64(st, 0), col(st, 28), p, ac);
    }
    sqlite3_finalize(st);
    free(acs);
    rep_load_phases(h, pts, n, run_ids, of_point, n_runs);
    rep_load_median_cis(h, pts, n, run_ids, of_point, n_runs);
    free(run_ids);
    free(of_point);
    /* Setup order: by first appearance in the plan. */
    for (int i = 0; i < n; i++) {
        pts[i].setup_order = pts[i].order;
        for (int j = 0; j < n; j++)
            if (!strcmp(pts[j].setup, pts[i].setup) && pts[j].order < pts[i].setup_order) pts[i].setup_order = pts[j].order;
    }
    *out = pts;
    *n_out = n;
    return 0;
}

/* Sort: setup (plan order), batch loads then rate loads by size, clocks, simulated. */
static int cmp_points(const void *a, const void *b) {
    const rep_point *x = a, *y = b;
    if (x->setup_order != y->setup_order) return x->setup_order < y->setup_order ? -1 : 1;
    int c = strcmp(x->setup, y->setup);
    if (c) return c;
    if ((c = strcmp(x->load_kind, y->load_kind))) return c;
    double lx = x->batch_size ? x->batch_size : x->rate, ly = y->batch_size ? y->batch_size : y->rate;
    if (lx != ly) return lx < ly ? -1 : 1;
    if (x->prefill_mhz != y->prefill_mhz) return x->prefill_mhz < y->prefill_mhz ? -1 : 1;
    if (x->decode_mhz != y->decode_mhz) return x->decode_mhz < y->decode_mhz ? -1 : 1;
    return (int)x->simulated - (int)y->simulated;
}

/* ---- formatting ---------------------------------------------------------------------- */
static const char *fmt(char *buf, size_t cap, double v, int prec) {
    if (isnan(v)) snprintf(buf, cap, "not measured");
    else snprintf(buf, cap, "%.*f", prec, v);
    return buf;
}

/* Plain text cells are narrow: "n/m" stands for not measured there, with a legend. */
static const char *tfmt(char *buf, size_t cap, double v, int prec) {
    if (isnan(v)) snprintf(buf, cap, "n/m");
    else snprintf(buf, cap, "%.*f", prec, v);
    return buf;
}

static void clock_text(const rep_point *p, char *out, size_t cap) {
    if (p->prefill_mhz) snprintf(out, cap, "%d/%d", p->prefill_mhz, p->decode_mhz);
    else snprintf(out, cap, "default");
}

/* a is at least as good as b in every measured figure and better in one: TTFT p50,
 * TPOT p50 (lower), output throughput (higher), J/token (lower, when both have it). */
static bool dominates(const rep_point *a, const rep_point *b) {
    double av[4] = {a->ttft_med, a->tpot_med, -a->out_thr, a->jpt};
    double bv[4] = {b->ttft_med, b->tpot_med, -b->out_thr, b->jpt};
    bool strict = false;
    for (int k = 0; k < 4; k++) {
        if (isnan(av[k]) || isnan(bv[k])) {
            if (k < 3) return false;
            continue;
        }
        if (av[k] > bv[k]) return false;
        if (av[k] < bv[k]) strict = true;
    }
    return strict;
}

/* On the frontier at its load: no point of the same load (and clocks) dominates it. */
static bool front_at_load(const rep_point *pts, int n, int i) {
    for (int j = 0; j < n; j++)
        if (j != i && !strcmp(pts[j].load_label, pts[i].load_label) &&
            pts[j].prefill_mhz == pts[i].prefill_mhz && pts[j].decode_mhz == pts[i].decode_mhz &&
            dominates(&pts[j], &pts[i]))
            return false;
    return true;
}

/* A reuse sweep: some point had prompt tokens served from the prefix cache, or ran with
 * prefix caching on (its servers' counters). Servers report cached_tokens (0) even
 * without prefix caching; such sweeps get no reuse columns. */
static bool any_cached(const rep_point *pts, int n) {
    for (int i = 0; i < n; i++)
        if (pts[i].cached_frac > 0 || !isnan(pts[i].tier_hit[0])) return true;
    return false;
}

/* Reuse sweeps: TTFT beside the share of prompt tokens served from the prefix cache
 * (any tier), per point; nothing when no point reported cached tokens. */
static void print_reuse(FILE *f, const rep_point *pts, int n) {
    if (!any_cached(pts, n)) return;
    fprintf(f, "\nKV reuse\n  %-22s %-10s %8s %7s %7s %7s %7s %7s %8s %9s %9s\n", "setup", "load", "cached %",
            "gpu %", "cpu %", "disk %", "loads", "recomp", "blk load", "TTFT p50", "TTFT p99");
    char b[10][32];
    for (int i = 0; i < n; i++) {
        const rep_point *p = &pts[i];
        if (isnan(p->cached_frac)) continue;
        char load[64];
        snprintf(load, sizeof load, "%s%s", p->load_label, p->simulated ? "*" : "");
        fprintf(f, "  %-22.22s %-10.10s %8s %7s %7s %7s %7s %7s %8s %9s %9s\n", p->setup, load,
                tfmt(b[0], 32, 100 * p->cached_frac, 1), tfmt(b[1], 32, 100 * p->tier_hit[0], 1),
                tfmt(b[2], 32, 100 * p->tier_hit[1], 1), tfmt(b[3], 32, 100 * p->tier_hit[2], 1),
                tfmt(b[4], 32, p->loads, 0), tfmt(b[5], 32, p->recomputes, 0), tfmt(b[6], 32, p->loaded_blocks, 0),
                tfmt(b[7], 32, p->ttft_med, 1), tfmt(b[8], 32, p->ttft_p99, 1));
    }
    fprintf(f, "cached %% = prompt tokens the server reported as cached (usage.prompt_tokens_details.cached_tokens:\n"
               "  GPU prefix cache hits + blocks loaded from the cpu/disk tiers) / prompt tokens; gpu/cpu/disk %% =\n"
               "  prompt tokens found in that tier / prompt tokens looked up (the servers' counters, warm-up\n"
               "  included; lower tiers: found, loaded or not); loads / recomp = admissions that found lower-tier\n"
               "  blocks and loaded / recomputed them; blk load = blocks loaded\n");
}

/* Disaggregated over a disk store: its puts and gets as the instances counted them, and
 * as simulated, side by side (nothing when no point has them). */
static bool any_store(const rep_point *pts, int n) {
    for (int i = 0; i < n; i++)
        if (!isnan(pts[i].store_puts) || !isnan(pts[i].store_gets)) return true;
    return false;
}

/* A simulated point's measured twin's store ops over its own: (put + get) per op where
 * both have gets, else per put; NAN without a twin or ops. The factor `pdserve sim
 * --medium-scale disk=K` takes to price the disk as this deployment's ran. */
static double store_ratio(const rep_point *pts, int n, const rep_point *m) {
    if (!m->simulated) return NAN;
    for (int j = 0; j < n; j++) {
        const rep_point *r = &pts[j];
        if (r->simulated || strcmp(r->setup, m->setup) || strcmp(r->load_label, m->load_label) ||
            r->prefill_mhz != m->prefill_mhz || r->decode_mhz != m->decode_mhz)
            continue;
        if (!isnan(r->store_get_s) && !isnan(m->store_get_s) && !isnan(r->store_put_s) && !isnan(m->store_put_s))
            return (r->store_put_s + r->store_get_s) / (m->store_put_s + m->store_get_s);
        return r->store_put_s / m->store_put_s; /* NAN where either has no puts */
    }
    return NAN;
}

static void print_store(FILE *f, const rep_point *pts, int n) {
    if (!any_store(pts, n)) return;
    fprintf(f, "\nKV store ops (disk)\n  %-22s %-10s %6s %9s %6s %9s %9s %9s\n", "setup", "load", "puts", "s / put",
            "gets", "s / get", "TTFT p50", "real/sim");
    char b[6][32];
    for (int i = 0; i < n; i++) {
        const rep_point *p = &pts[i];
        if (isnan(p->store_puts) && isnan(p->store_gets)) continue;
        char load[64];
        snprintf(load, sizeof load, "%s%s", p->load_label, p->simulated ? "*" : "");
        double k = store_ratio(pts, n, p);
        fprintf(f, "  %-22.22s %-10.10s %6s %9s %6s %9s %9s %9s\n", p->setup, load, tfmt(b[0], 32, p->store_puts, 0),
                tfmt(b[1], 32, p->store_put_s, 3), tfmt(b[2], 32, p->store_gets, 0), tfmt(b[3], 32, p->store_get_s, 3),
                tfmt(b[4], 32, p->ttft_med, 1), isnan(k) ? "" : tfmt(b[5], 32, k, 2));
    }
    fprintf(f, "s / put, s / get = each op's time from its start to its end, beside others included (measured:\n"
               "  the instances' pdserve_kv_store_* counters over the run, warm-up included; * simulated);\n"
               "  real/sim = the measured twin's time per op over the simulated one's (`pdserve sim\n"
               "  --medium-scale disk=K` prices the disk as that deployment's ran)\n");
}

static void print_table(FILE *f, const rep_point *pts, int n, int n_bad) {
    fprintf(f, "%-14s %-10s %-9s %9s %9s %8s %8s %8s %10s %10s %9s %10s %s\n", "setup", "load", "clock", "TTFT p50",
            "TTFT p99", "TPOT p50", "TPOT p99", "req/s", "out tok/s", "goodput", "J/token", "J/tok net", "front");
    fprintf(f, "%-14s %-10s %-9s %9s %9s %8s %8s %8s %10s %10s %9s %10s\n", "", "", "SM MHz", "ms", "ms", "ms", "ms",
            "", "", "req/s", "", "(idle-sub)");
    char b[12][32], clk[32];
    bool any_nm = false;
    for (int i = 0; i < n; i++) {
        const rep_point *p = &pts[i];
        clock_text(p, clk, sizeof clk);
        char load[64];
        snprintf(load, sizeof load, "%s%s", p->load_label, p->simulated ? "*" : "");
        fprintf(f, "%-14.14s %-10.10s %-9s %9s %9s %8s %8s %8s %10s %10s %9s %10s %s\n", p->setup, load, clk,
                tfmt(b[0], 32, p->ttft_med, 1), tfmt(b[1], 32, p->ttft_p99, 1), tfmt(b[2], 32, p->tpot_med, 2),
                tfmt(b[3], 32, p->tpot_p99, 2), tfmt(b[4], 32, p->req_thr, 2), tfmt(b[5], 32, p->out_thr, 1),
                isnan(p->goodput) ? "-" : tfmt(b[6], 32, p->goodput, 2), tfmt(b[7], 32, p->jpt, 4),
                tfmt(b[8], 32, p->jpt_net, 4), front_at_load(pts, n, i) ? "  *" : "");
        any_nm |= isnan(p->jpt) || isnan(p->jpt_net);
    }
    if (n == 0) fprintf(f, "(no successful points)\n");
    if (n) fprintf(f, "front * = on the Pareto frontier at its load: no other setup at the same load is as good in\n"
                      "          TTFT p50, TPOT p50, output throughput and J/token (where measured) and better in one\n");
    /* The latency-energy frontiers across every point, where energy was measured. */
    static const char *const fname[] = {"TTFT p50 vs J/token", "TPOT p50 vs J/token", "throughput vs J/token"};
    bool *front = xcalloc((size_t)PD_MAX(n, 1), sizeof *front);
    for (int w = 0; w < 3; w++) {
        rep_pareto(pts, n, w, front);
        int shown = 0;
        for (int i = 0; i < n; i++) {
            if (!front[i] || isnan(pts[i].jpt)) continue;
            if (!shown++) fprintf(f, "frontier %s: ", fname[w]);
            else fputs(", ", f);
            fputs(pts[i].label, f);
        }
        if (shown) fputc('\n', f);
    }
    free(front);
    if (any_nm) fprintf(f, "n/m = not measured (no energy meter for this run, or no idle window)\n");
    for (int i = 0; i < n; i++)
        if (pts[i].simulated) {
            fprintf(f, "* = simulated (pdserve sim), not measured on hardware\n");
            break;
        }
    if (n_bad) fprintf(f, "%d point(s) failed or skipped: see index.html or runs.csv for the reasons\n", n_bad);
    print_reuse(f, pts, n);
    print_store(f, pts, n);
}

static void html_esc(FILE *f, const char *s) {
    for (; s && *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        case '"': fputs("&quot;", f); break;
        default: fputc(*s, f);
        }
    }
}

static void td(FILE *f, double v, int prec) {
    char b[32];
    if (isnan(v)) fputs("<td class=nm>not measured</td>", f);
    else fprintf(f, "<td>%s</td>", fmt(b, sizeof b, v, prec));
}

/* ---- CSV ---------------------------------------------------------------------------- */
static void csv_field(FILE *f, const char *s) {
    if (!s) return;
    if (!strpbrk(s, ",\"\n\r")) {
        fputs(s, f);
        return;
    }
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"') fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

static int write_csv(sqlite3 *h, const char *sql, const char *path, char *err, size_t errlen) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) != SQLITE_OK) {
        pd_errorf(err, errlen, "sqlite: %s", sqlite3_errmsg(h));
        return -1;
    }
    FILE *f = fopen(path, "w");
    if (!f) {
        sqlite3_finalize(st);
        pd_errorf(err, errlen, "cannot write %s", path);
        return -1;
    }
    int nc = sqlite3_column_count(st);
    for (int i = 0; i < nc; i++) {
        if (i) fputc(',', f);
        csv_field(f, sqlite3_column_name(st, i));
    }
    fputc('\n', f);
    while (sqlite3_step(st) == SQLITE_ROW) {
        for (int i = 0; i < nc; i++) {
            if (i) fputc(',', f);
            if (sqlite3_column_type(st, i) == SQLITE_FLOAT) fprintf(f, "%.9g", sqlite3_column_double(st, i));
            else csv_field(f, (const char *)sqlite3_column_text(st, i));
        }
        fputc('\n', f);
    }
    sqlite3_finalize(st);
    if (fclose(f) != 0) {
        pd_errorf(err, errlen, "cannot write %s", path);
        return -1;
    }
    return 0;
}

/* ---- HTML --------------------------------------------------------------------------- */
static const char CSS[] =
    "body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}"
    "h1{font-size:26px}h2{font-size:21px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:36px}"
    "table{border-collapse:collapse;margin:10px 0 18px;font-size:14px}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f0f3f7}"
    "td.l,th.l{text-align:left}td.nm{color:#999;font-style:italic}tr.front td{background:#fff6d6}"
    ".sim{color:#8a5a00;font-weight:bold}figure{margin:18px 0}figcaption{font-size:14px;color:#555}"
    "img{max-width:100%;border:1px solid #eee}.meta td{text-align:left}.bad td{text-align:left}";

static void html_header(FILE *f, sqlite3 *h, const char *db_path) {
    fprintf(f, "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>pdserve report</title>\n"
               "<style>%s</style></head><body>\n<h1>pdserve report</h1>\n<table class=meta>\n", CSS);
    fputs("<tr><th class=l>results</th><td>", f);
    const char *base = strrchr(db_path, '/');
    html_esc(f, base ? base + 1 : db_path);
    fputs("</td></tr>\n", f);
    static const char *const q[][2] = {
        {"plans", "SELECT group_concat(DISTINCT plan) FROM runs"},
        {"model", "SELECT group_concat(DISTINCT model) FROM runs"},
        {"CPU", "SELECT group_concat(DISTINCT cpu_model || ' (' || cpu_cores || ' cores)') FROM runs"},
        {"GPUs", "SELECT group_concat(DISTINCT gpus) FROM runs"},
        {"driver", "SELECT group_concat(DISTINCT gpu_driver) FROM runs"},
        {"pdserve", "SELECT group_concat(DISTINCT pdserve_version) FROM runs"},
        {"points", "SELECT count(*) || ' (' || sum(status='ok') || ' ok, ' || sum(status='failed') || ' failed, ' ||"
                   " sum(status='skipped') || ' skipped)' FROM runs"},
        {"from", "SELECT min(started_at) || ' to ' || max(ended_at) FROM runs"},
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(q); i++) {
        sqlite3_stmt *st = NULL;
        if (sqlite3_prepare_v2(h, q[i][1], -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW &&
            sqlite3_column_type(st, 0) != SQLITE_NULL) {
            fprintf(f, "<tr><th class=l>%s</th><td>", q[i][0]);
            html_esc(f, (const char *)sqlite3_column_text(st, 0));
            fputs("</td></tr>\n", f);
        }
        sqlite3_finalize(st);
    }
    fputs("</table>\n<p>Latencies in ms (medians and 99th percentiles over requests; repeats averaged). J/token counts "
          "input + output tokens; <em>idle-subtracted</em> removes the idle power measured before the run. "
          "<span class=sim>sim</span> marks simulated points. Downloads: <a href=summaries.csv>summaries.csv</a>, "
          "<a href=runs.csv>runs.csv</a>.</p>\n", f);
}

static void html_tables(FILE *f, const rep_point *pts, int n) {
    bool cached = any_cached(pts, n);
    fputs("<h2>Results by setup and load</h2>\n", f);
    for (int i = 0; i < n;) {
        int j = i;
        while (j < n && !strcmp(pts[j].setup, pts[i].setup)) j++;
        fputs("<h3>", f);
        html_esc(f, pts[i].setup);
        fprintf(f, "</h3>\n<table><tr><th class=l>load</th><th class=l>SM MHz<br>prefill/decode</th><th>runs</th>"
              "%s<th>TTFT p50</th><th>TTFT p99</th><th>TPOT p50</th><th>TPOT p99</th><th>ITL p50</th>"
              "<th>req/s</th><th>input tok/s</th><th>output tok/s</th><th>goodput req/s</th>"
              "<th>J/token</th><th>J/token idle-subtracted</th><th>J/output token</th><th>failed requests</th></tr>\n",
                cached ? "<th>prompt tokens cached</th>" : "");
        for (int k = i; k < j; k++) {
            const rep_point *p = &pts[k];
            char clk[32];
            clock_text(p, clk, sizeof clk);
            fputs("<tr><td class=l>", f);
            html_esc(f, p->load_label);
            if (p->simulated) fputs(" <span class=sim>sim</span>", f);
            fprintf(f, "</td><td class=l>%s</td><td>%d</td>", clk, p->n_ok);
            if (cached && isnan(p->cached_frac)) fputs("<td class=nm>n/r</td>", f);
            else if (cached) fprintf(f, "<td>%.1f%%</td>", 100 * p->cached_frac);
            td(f, p->ttft_med, 1);
            td(f, p->ttft_p99, 1);
            td(f, p->tpot_med, 2);
            td(f, p->tpot_p99, 2);
            td(f, p->itl_med, 2);
            td(f, p->req_thr, 3);
            td(f, p->in_thr, 1);
            td(f, p->out_thr, 1);
            if (isnan(p->goodput)) fputs("<td class=nm>no SLO</td>", f);
            else td(f, p->goodput, 3);
            td(f, p->jpt, 4);
            td(f, p->jpt_net, 4);
            td(f, p->jpot, 4);
            fprintf(f, "<td>%d</td></tr>\n", p->failed);
        }
        fputs("</table>\n", f);
        i = j;
    }
}

/* A table row's first two cells: the point's setup and load, marked when simulated. */
static void html_point_row(FILE *f, const rep_point *p) {
    fputs("<tr><td class=l>", f);
    html_esc(f, p->setup);
    fputs("</td><td class=l>", f);
    html_esc(f, p->load_label);
    if (p->simulated) fputs(" <span class=sim>sim</span>", f);
    fputs("</td>", f);
}

/* Reuse sweeps: hit rates per tier and loads beside TTFT (nothing when no point
 * reported cached tokens). */
static void html_reuse(FILE *f, const rep_point *pts, int n) {
    if (!any_cached(pts, n)) return;
    fputs("<h2>KV reuse</h2>\n<p><em>cached</em>: prompt tokens the server reported as cached "
          "(usage.prompt_tokens_details.cached_tokens: GPU prefix cache hits and blocks loaded from the cpu / "
          "disk tiers) over prompt tokens. <em>gpu, cpu, disk</em>: prompt tokens found in that tier over prompt "
          "tokens looked up, from the servers' counters over the run (warm-up included; lower tiers: found, "
          "loaded or not). <em>loads / recomputes</em>: admissions that found lower-tier blocks and loaded or "
          "recomputed them (docs/reuse.md).</p>\n<table><tr><th class=l>setup</th><th class=l>load</th>"
          "<th>cached</th><th>gpu</th><th>cpu</th><th>disk</th><th>loads</th><th>recomputes</th>"
          "<th>blocks loaded</th><th>offloads dropped</th><th>TTFT p50</th><th>TTFT p99</th><th>TPOT p50</th></tr>\n",
          f);
    for (int i = 0; i < n; i++) {
        const rep_point *p = &pts[i];
        if (isnan(p->cached_frac)) continue;
        html_point_row(f, p);
        td(f, 100 * p->cached_frac, 1);
        for (int k = 0; k < 3; k++) td(f, 100 * p->tier_hit[k], 1);
        td(f, p->loads, 0);
        td(f, p->recomputes, 0);
        td(f, p->loaded_blocks, 0);
        td(f, p->dropped, 0);
        td(f, p->ttft_med, 1);
        td(f, p->ttft_p99, 1);
        td(f, p->tpot_med, 2);
        fputs("</tr>\n", f);
    }
    fputs("</table>\n<p>Percentages; TTFT and TPOT in ms.</p>\n", f);
}

static void html_store(FILE *f, const rep_point *pts, int n) {
    if (!any_store(pts, n)) return;
    fputs("<h2>KV store ops (disk)</h2>\n<p>A disk store's puts (the prefill side) and gets (the decode side): how "
          "many, and each one's time from its start to its end, beside the others included. Measured: the "
          "instances' <code>pdserve_kv_store_*</code> counters over the run, warm-up included; simulated: the "
          "simulated ops. <em>real / sim</em>: the measured twin's time per op over the simulated one's, the "
          "factor <code>pdserve sim --medium-scale disk=K</code> takes to price the disk as that deployment's "
          "ran.</p>\n<table><tr><th class=l>setup</th><th class=l>load</th><th>puts</th><th>s / put</th>"
          "<th>gets</th><th>s / get</th><th>TTFT p50</th><th>real / sim</th></tr>\n",
          f);
    for (int i = 0; i < n; i++) {
        const rep_point *p = &pts[i];
        if (isnan(p->store_puts) && isnan(p->store_gets)) continue;
        html_point_row(f, p);
        td(f, p->store_puts, 0);
        td(f, p->store_put_s, 3);
        td(f, p->store_gets, 0);
        td(f, p->store_get_s, 3);
        td(f, p->ttft_med, 1);
        double k = store_ratio(pts, n, p);
        if (isnan(k)) fputs("<td></td>", f);
        else td(f, k, 2);
        fputs("</tr>\n", f);
    }
    fputs("</table>\n", f);
}

static void html_components(FILE *f, const rep_point *pts, int n) {
    char names[32][64];
    int nn = 0;
    for (int i = 0; i < n; i++)
        for (int k = 0; k < pts[i].n_comp; k++) {
            int m;
            for (m = 0; m < nn; m++)
                if (!strcmp(names[m], pts[i].comp[k])) break;
            if (m == nn && nn < 32) snprintf(names[nn++], sizeof names[0], "%s", pts[i].comp[k]);
        }
    fputs("<h2>Energy by component</h2>\n<p>J/token per meter (whole / idle-subtracted).", f);
    if (nn == 0) {
        fputs(" No energy was measured in any run: every value is <em>not measured</em>.</p>\n", f);
        return;
    }
    fputs("</p>\n<table><tr><th class=l>point</th>", f);
    for (int m = 0; m < nn; m++) {
        fputs("<th>", f);
        html_esc(f, names[m]);
        fputs("</th>", f);
    }
    fputs("<th>total</th></tr>\n", f);
    for (int i = 0; i < n; i++) {
        fputs("<tr><td class=l>", f);
        html_esc(f, pts[i].label);
        fputs("</td>", f);
        for (int m = 0; m < nn; m++) {
            int k;
            for (k = 0; k < pts[i].n_comp; k++)
                if (!strcmp(pts[i].comp[k], names[m])) break;
            if (k == pts[i].n_comp) {
                fputs("<td class=nm>not measured</td>", f);
                continue;
            }
            char a[32], b[32];
            fprintf(f, "<td>%s / %s</td>", fmt(a, sizeof a, pts[i].comp_jpt[k], 4),
                    fmt(b, sizeof b, pts[i].comp_jpt_net[k], 4));
        }
        td(f, pts[i].jpt, 4);
        fputs("</tr>\n", f);
    }
    fputs("</table>\n", f);
}

static void html_frontier(FILE *f, const rep_point *pts, int n, int which) {
    static const char *const yname[] = {"TTFT p50 (ms)", "TPOT p50 (ms)", "tokens/s"};
    bool *front = xcalloc((size_t)PD_MAX(n, 1), sizeof *front);
    rep_pareto(pts, n, which, front);
    int nf = 0;
    for (int i = 0; i < n; i++) nf += front[i];
    if (nf) {
        fprintf(f, "<table><tr><th class=l>on the frontier</th><th>J/token</th><th>%s</th></tr>\n", yname[which]);
        for (int i = 0; i < n; i++) {
            if (!front[i]) continue;
            fputs("<tr class=front><td class=l>", f);
            html_esc(f, pts[i].label);
            fputs("</td>", f);
            td(f, pts[i].jpt, 4);
            td(f, rep_pareto_y(&pts[i], which), which == 1 ? 2 : 1);
            fputs("</tr>\n", f);
        }
        fputs("</table>\n", f);
    }
    free(front);
}

static void html_plots(FILE *f, const rep_plot_list *pl, const rep_point *pts, int n) {
    fputs("<h2>Pareto frontiers and plots</h2>\n", f);
    for (int i = 0; i < pl->n; i++) {
        fprintf(f, "<figure><a href=\"%s.svg\"><img src=\"%s.svg\" width=900 height=600 alt=\"", pl->name[i],
                pl->name[i]);
        html_esc(f, pl->caption[i]);
        fprintf(f, "\"></a><figcaption>");
        html_esc(f, pl->caption[i]);
        fprintf(f, " (<a href=\"%s.png\">PNG</a>)</figcaption></figure>\n", pl->name[i]);
        int which = !strcmp(pl->name[i], "pareto-ttft") ? 0 : !strcmp(pl->name[i], "pareto-tpot") ? 1
                    : !strcmp(pl->name[i], "pareto-throughput")                                 ? 2
                                                                                                : -1;
        if (which >= 0) html_frontier(f, pts, n, which);
    }
}

static void html_bad(FILE *f, sqlite3 *h) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h, "SELECT label, status, reason FROM runs WHERE status != 'ok' ORDER BY point_index", -1,
                           &st, NULL) != SQLITE_OK)
        return;
    bool any = false;
    while (sqlite3_step(st) == SQLITE_ROW) {
        if (!any) fputs("<h2>Points not measured</h2>\n<table class=bad><tr><th class=l>point</th>"
                        "<th class=l>status</th><th class=l>reason</th></tr>\n", f);
        any = true;
        for (int i = 0; i < 3; i++) {
            fputs(i ? "<td>" : "<tr><td>", f);
            html_esc(f, (const char *)sqlite3_column_text(st, i));
            fputs("</td>", f);
        }
        fputs("</tr>\n", f);
    }
    sqlite3_finalize(st);
}

static int count_bad(sqlite3 *h) {
    sqlite3_stmt *st = NULL;
    int n = 0;
    if (sqlite3_prepare_v2(h, "SELECT count(*) FROM runs WHERE status != 'ok'", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        n = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return n;
}

static void mkdir_p(const char *dir) {
    char p[1024];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        mkdir(p, 0755);
        *s = '/';
    }
    mkdir(p, 0755);
}

/* ---- simulated against measured --------------------------------------------------------- */
/* Pairs each simulated point with the measured point of the same setup, load and clocks
 * (a plan run by `pdserve sweep` and `pdserve sim` into one database). */
typedef struct rep_pair { int real, sim; } rep_pair;

static int find_pairs(const rep_point *pts, int n, rep_pair *out) {
    int k = 0;
    for (int i = 0; i < n; i++) {
        if (!pts[i].simulated) continue;
        for (int j = 0; j < n; j++)
            if (!pts[j].simulated && !strcmp(pts[j].setup, pts[i].setup) &&
                !strcmp(pts[j].load_label, pts[i].load_label) && pts[j].prefill_mhz == pts[i].prefill_mhz &&
                pts[j].decode_mhz == pts[i].decode_mhz) {
                out[k++] = (rep_pair){j, i};
                break;
            }
    }
    return k;
}

/* The figures compared: TTFT p50, TPOT p50, output throughput, J/token. */
static double vfig(const rep_point *p, int f) {
    return f == 0 ? p->ttft_med : f == 1 ? p->tpot_med : f == 2 ? p->out_thr : p->jpt;
}
static const char *const VFIG_NAME[] = {"TTFT p50 ms", "TPOT p50 ms", "out tok/s", "J/token"};

/* Relative difference of sim to real, NAN where either is missing. */
static double vdiff(double real, double sim) {
    if (isnan(real) || isnan(sim) || !(fabs(real) > 0)) return NAN;
    return (sim - real) / real;
}

/* A simulated median outside 10% of the measured one but inside the measured median's
 * own 95% confidence interval (rep_median_ci): the measured figure could have landed
 * there with other requests of the same distribution (a bimodal TTFT whose median sits
 * in the gap between its modes, a handful of requests). Only for the medians (k 0, 1);
 * the run-wide figures have no per-request spread. */
static bool in_noise(const rep_point *r, int k, double sim, double d) {
    if (isnan(d) || fabs(d) <= 0.10 || k > 1) return false;
    const double *ci = k == 0 ? r->ttft_ci : r->tpot_ci;
    return !isnan(ci[0]) && sim >= ci[0] && sim <= ci[1];
}

static void validation_tail(char *buf, size_t cap, int within, int compared, int noise) {
    int len = snprintf(buf, cap, "%d of %d compared figures within 10%%", within, compared);
    if (compared > within && len > 0 && (size_t)len < cap)
        snprintf(buf + len, cap - (size_t)len,
                 "; of the %d outside, %d inside the measured median's 95%% confidence interval (~)",
                 compared - within, noise);
}

static void print_validation(FILE *f, const rep_point *pts, int n) {
    rep_pair *pr = xmalloc(sizeof *pr * (size_t)PD_MAX(n, 1));
    int np = find_pairs(pts, n, pr), within = 0, compared = 0, noise = 0;
    if (np > 0) {
        fprintf(f, "\nsimulated against measured (same setup, load and clocks): real / sim / difference; "
                   "~ outside 10%% but inside the measured median's 95%% confidence interval (its requests' "
                   "order statistics)\n");
        fprintf(f, "%-14s %-8s %-9s", "setup", "load", "clock");
        for (int k = 0; k < 4; k++) fprintf(f, " | %-27s", VFIG_NAME[k]);
        fputc('\n', f);
    }
    for (int i = 0; i < np; i++) {
        const rep_point *r = &pts[pr[i].real], *m = &pts[pr[i].sim];
        char clk[32], b[2][32];
        clock_text(r, clk, sizeof clk);
        fprintf(f, "%-14.14s %-8.8s %-9s", r->setup, r->load_label, clk);
        for (int k = 0; k < 4; k++) {
            double a = vfig(r, k), s = vfig(m, k), d = vdiff(a, s);
            int prec = k == 3 ? 4 : k == 2 ? 1 : 2;
            bool nz = in_noise(r, k, s, d);
            if (isnan(d)) fprintf(f, " | %9s %9s %6s ", tfmt(b[0], 32, a, prec), tfmt(b[1], 32, s, prec), "-");
            else fprintf(f, " | %9s %9s %+5.0f%%%c", tfmt(b[0], 32, a, prec), tfmt(b[1], 32, s, prec), 100 * d,
                         nz ? '~' : ' ');
            if (!isnan(d)) {
                compared++;
                within += fabs(d) <= 0.10;
                noise += nz;
            }
        }
        fputc('\n', f);
    }
    if (np > 0) {
        char tail[256];
        validation_tail(tail, sizeof tail, within, compared, noise);
        fprintf(f, "%s\n", tail);
    }
    free(pr);
}

static void html_validation(FILE *f, const rep_point *pts, int n) {
    rep_pair *pr = xmalloc(sizeof *pr * (size_t)PD_MAX(n, 1));
    int np = find_pairs(pts, n, pr), within = 0, compared = 0, noise = 0;
    if (np > 0) {
        fputs("<h2>Simulated against measured</h2>\n<p>Each simulated point beside the measured point of the "
              "same setup, load and clocks: measured, simulated, and the difference relative to the measured "
              "figure (bold beyond 10%; <i>~</i>: beyond 10% but inside the measured median's own 95% "
              "confidence interval, from its requests' order statistics, so within what another sample of "
              "the same requests could have measured).</p>\n<table><tr><th>setup</th><th>load</th><th>clock</th>",
              f);
        for (int k = 0; k < 4; k++) fprintf(f, "<th colspan=3>%s</th>", VFIG_NAME[k]);
        fputs("</tr>\n", f);
    }
    for (int i = 0; i < np; i++) {
        const rep_point *r = &pts[pr[i].real], *m = &pts[pr[i].sim];
        char clk[32];
        clock_text(r, clk, sizeof clk);
        fputs("<tr><td>", f);
        html_esc(f, r->setup);
        fputs("</td><td>", f);
        html_esc(f, r->load_label);
        fprintf(f, "</td><td>%s</td>", clk);
        for (int k = 0; k < 4; k++) {
            double a = vfig(r, k), s = vfig(m, k), d = vdiff(a, s);
            int prec = k == 3 ? 4 : k == 2 ? 1 : 2;
            bool nz = in_noise(r, k, s, d);
            td(f, a, prec);
            td(f, s, prec);
            if (isnan(d)) fputs("<td>-</td>", f);
            else if (nz) {
                const double *ci = k == 0 ? r->ttft_ci : r->tpot_ci;
                fprintf(f, "<td title=\"measured median's 95%% interval %.2f-%.2f\"><b>%+.0f%%</b>~</td>", ci[0],
                        ci[1], 100 * d);
            } else fprintf(f, fabs(d) > 0.10 ? "<td><b>%+.0f%%</b></td>" : "<td>%+.0f%%</td>", 100 * d);
            if (!isnan(d)) {
                compared++;
                within += fabs(d) <= 0.10;
                noise += nz;
            }
        }
        fputs("</tr>\n", f);
    }
    if (np > 0) {
        char tail[256];
        validation_tail(tail, sizeof tail, within, compared, noise);
        fprintf(f, "</table>\n<p>%s.</p>\n", tail);
    }
    free(pr);
}

int study_report(const study_report_opts *o, char *err, size_t errlen) {
    if (!util_file_exists(o->db_path)) {
        pd_errorf(err, errlen, "no results database at %s", o->db_path);
        return -1;
    }
    sqlite3 *h = NULL;
    if (sqlite3_open_v2(o->db_path, &h, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        pd_errorf(err, errlen, "cannot open %s: %s", o->db_path, h ? sqlite3_errmsg(h) : "out of memory");
        sqlite3_close(h);
        return -1;
    }
    sqlite3_busy_timeout(h, 10000);
    rep_point *pts = NULL;
    int n = 0, rc = -1;
    char path[1200];
    FILE *f = NULL;
    rep_plot_list *pl = xcalloc(1, sizeof *pl);
    if (load_points(h, &pts, &n, err, errlen) != 0) goto out;
    if (n > 1) qsort(pts, (size_t)n, sizeof *pts, cmp_points);
    mkdir_p(o->out_dir);
    if (!util_is_dir(o->out_dir)) {
        pd_errorf(err, errlen, "cannot create the folder %s", o->out_dir);
        goto out;
    }
    if (o->table) {
        print_table(o->table, pts, n, count_bad(h));
        print_validation(o->table, pts, n);
        rep_print_phases(o->table, pts, n);
    }
    snprintf(path, sizeof path, "%s/summaries.csv", o->out_dir);
    if (write_csv(h,
                  "SELECT r.point_key, r.label, r.setup, r.setup_kind, r.load_kind, r.batch_size, r.request_rate,"
                  " r.num_prompts, r.input_len, r.output_len, r.prefill_sm_mhz, r.decode_sm_mhz, r.repeat,"
                  " r.simulated, r.model, s.* FROM runs r JOIN summaries s USING(run_id) ORDER BY r.point_index",
                  path, err, errlen))
        goto out;
    snprintf(path, sizeof path, "%s/runs.csv", o->out_dir);
    if (write_csv(h, "SELECT * FROM runs ORDER BY point_index", path, err, errlen)) goto out;
    if (!o->no_plots && rep_plots(o->gnuplot, o->out_dir, pts, n, pl, err, errlen) != 0) goto out;
    snprintf(path, sizeof path, "%s/index.html", o->out_dir);
    f = fopen(path, "w");
    if (!f) {
        pd_errorf(err, errlen, "cannot write %s", path);
        goto out;
    }
    html_header(f, h, o->db_path);
    html_tables(f, pts, n);
    html_reuse(f, pts, n);
    html_store(f, pts, n);
    html_components(f, pts, n);
    html_validation(f, pts, n);
    rep_html_phases(f, pts, n);
    html_plots(f, pl, pts, n);
    html_bad(f, h);
    fputs("</body></html>\n", f);
    if (fclose(f) != 0) {
        f = NULL;
        pd_errorf(err, errlen, "cannot write %s", path);
        goto out;
    }
    f = NULL;
    rc = 0;
out:
    if (f) fclose(f);
    free(pl);
    free(pts);
    sqlite3_close(h);
    return rc;
}
