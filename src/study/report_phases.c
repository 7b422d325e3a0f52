/* report_phases.c: "Where the TTFT went". Each request of a pdserve deployment (and of
 * the simulator) carries the phases its servers timed (requests.server_phases, a JSON
 * object of seconds; docs/results-database.md); per point, the median of each phase over
 * every request of its repeats, and of what no server timed (the TTFT the client saw
 * less the sum of the request's phases: its own side, the hops between processes, the
 * router's relay). Medians of parts do not add up to the median TTFT; each is shown for
 * what it is. Real and simulated points sit side by side, so a simulator miss can be
 * put on one phase.
 * Also from the same requests: the confidence intervals of each point's median TTFT and
 * TPOT, which the "simulated against measured" table sets beside a difference. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "bench/bench.h"
#include "study/report_internal.h"
#include "util/util.h"

const char *const REP_PHASE_NAMES[REP_PHASES] = {"parse",   "path",     "reserve", "prefill_hop", "queue",
                                                 "prefill", "kv_queue", "kv",      "decode_wait", "decode"};

typedef struct dvec {
    double *v;
    int n, cap;
} dvec;

static void dvec_push(dvec *d, double x) {
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 64;
        d->v = xrealloc(d->v, sizeof(double) * (size_t)d->cap);
    }
    d->v[d->n++] = x;
}

static double median(dvec *d) {
    if (d->n == 0) return NAN;
    bench_stat st;
    bench_stat_compute(&st, d->v, d->n, NULL, 0);
    return st.median;
}

/* The rows of a statement over requests (its ?1 a run_id) for every run of point k, run
 * after run: `req_iter it = {st, run_ids, of_point, n_runs, k, -1, false};` then
 * `while (req_next(&it))` reads sqlite3_column_* of it.st. */
typedef struct req_iter {
    sqlite3_stmt *st;
    const long long *run_ids;
    const int *of_point;
    int n_runs, k, r;
    bool open;
} req_iter;

static bool req_next(req_iter *it) {
    for (;;) {
        if (it->open && sqlite3_step(it->st) == SQLITE_ROW) return true;
        it->open = false;
        while (++it->r < it->n_runs && it->of_point[it->r] != it->k) {
        }
        if (it->r >= it->n_runs) return false;
        sqlite3_reset(it->st);
        sqlite3_bind_int64(it->st, 1, it->run_ids[it->r]);
        it->open = true;
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

bool rep_median_ci(double *x, int n, double *lo, double *hi) {
    *lo = *hi = NAN;
    if (n < 6) return false; /* P(all on one side) = 2 / 2^n > 5% below 6 */
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    /* cdf(j) = P(Binomial(n, 1/2) <= j); k = the largest with cdf(k - 1) <= 0.025 */
    double ln2n = n * log(2.0), lgn = lgamma(n + 1.0), cdf = 0;
    int k = 0;
    for (int j = 0; j < n / 2; j++) {
        cdf += exp(lgn - lgamma(j + 1.0) - lgamma(n - j + 1.0) - ln2n);
        if (cdf > 0.025) break;
        k = j + 1;
    }
    if (k < 1) return false;
    *lo = x[k - 1];
    *hi = x[n - k];
    return true;
}

void rep_load_median_cis(sqlite3 *h, rep_point *pts, int n, const long long *run_ids, const int *of_point,
                         int n_runs) {
    for (int k = 0; k < n; k++) pts[k].ttft_ci[0] = pts[k].ttft_ci[1] = pts[k].tpot_ci[0] = pts[k].tpot_ci[1] = NAN;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h,
                           "SELECT ttft_ms, e2el_ms, output_tokens FROM requests WHERE run_id = ? AND status = 'ok'"
                           " AND ttft_ms IS NOT NULL",
                           -1, &st, NULL) != SQLITE_OK)
        return;
    dvec tt = {0}, tp = {0};
    for (int k = 0; k < n; k++) {
        tt.n = tp.n = 0;
        req_iter it = {st, run_ids, of_point, n_runs, k, -1, false};
        while (req_next(&it)) {
            double ttft = sqlite3_column_double(st, 0);
            dvec_push(&tt, ttft);
            int out = sqlite3_column_int(st, 2);
            if (out > 1 && sqlite3_column_type(st, 1) != SQLITE_NULL)
                dvec_push(&tp, (sqlite3_column_double(st, 1) - ttft) / (out - 1));
        }
        rep_median_ci(tt.v, tt.n, &pts[k].ttft_ci[0], &pts[k].ttft_ci[1]);
        rep_median_ci(tp.v, tp.n, &pts[k].tpot_ci[0], &pts[k].tpot_ci[1]);
    }
    free(tt.v);
    free(tp.v);
    sqlite3_finalize(st);
}

static bool has_phases_column(sqlite3 *h) {
    sqlite3_stmt *st = NULL;
    bool found = false;
    if (sqlite3_prepare_v2(h, "SELECT name FROM pragma_table_info('requests')", -1, &st, NULL) != SQLITE_OK)
        return false;
    while (!found && sqlite3_step(st) == SQLITE_ROW) {
        const char *c = (const char *)sqlite3_column_text(st, 0);
        found = c && !strcmp(c, "server_phases");
    }
    sqlite3_finalize(st);
    return found;
}

void rep_load_phases(sqlite3 *h, rep_point *pts, int n, const long long *run_ids, const int *of_point,
                     int n_runs) {
    for (int k = 0; k < n; k++) {
        pts[k].phase_n = 0;
        pts[k].phase_other_ms = NAN;
        for (int i = 0; i < REP_PHASES; i++) pts[k].phase_ms[i] = NAN;
    }
    if (!has_phases_column(h)) return;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(h,
                           "SELECT ttft_ms, server_phases FROM requests WHERE run_id = ? AND status = 'ok'"
                           " AND server_phases IS NOT NULL AND ttft_ms IS NOT NULL",
                           -1, &st, NULL) != SQLITE_OK)
        return;
    dvec *ph = xcalloc(REP_PHASES + 1, sizeof *ph);
    for (int k = 0; k < n; k++) {
        for (int i = 0; i <= REP_PHASES; i++) ph[i].n = 0;
        int reported = 0;
        req_iter it = {st, run_ids, of_point, n_runs, k, -1, false};
        while (req_next(&it)) {
            double ttft = sqlite3_column_double(st, 0);
            const char *text = (const char *)sqlite3_column_text(st, 1);
            cJSON *o = text ? cJSON_Parse(text) : NULL;
            if (!cJSON_IsObject(o)) {
                cJSON_Delete(o);
                continue;
            }
            double sum = 0;
            int seen = 0;
            for (int i = 0; i < REP_PHASES; i++) {
                const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, REP_PHASE_NAMES[i]);
                if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) continue;
                dvec_push(&ph[i], v->valuedouble * 1e3);
                sum += v->valuedouble * 1e3;
                seen++;
            }
            cJSON_Delete(o);
            if (seen == 0) continue;
            dvec_push(&ph[REP_PHASES], ttft - sum);
            reported++;
        }
        pts[k].phase_n = reported;
        if (reported == 0) continue;
        for (int i = 0; i < REP_PHASES; i++) pts[k].phase_ms[i] = median(&ph[i]);
        pts[k].phase_other_ms = median(&ph[REP_PHASES]);
    }
    for (int i = 0; i <= REP_PHASES; i++) free(ph[i].v);
    free(ph);
    sqlite3_finalize(st);
}

/* Which phase columns any point has (so a colocated-only report shows three). */
static int used_phases(const rep_point *pts, int n, bool used[REP_PHASES]) {
    int any = 0;
    for (int i = 0; i < REP_PHASES; i++) {
        used[i] = false;
        for (int k = 0; k < n && !used[i]; k++) used[i] = pts[k].phase_n > 0 && !isnan(pts[k].phase_ms[i]);
    }
    for (int k = 0; k < n; k++) any += pts[k].phase_n > 0;
    return any;
}

static void cell(char *buf, size_t cap, double v) {
    if (isnan(v)) snprintf(buf, cap, "-");
    else snprintf(buf, cap, "%.2f", v);
}

void rep_print_phases(FILE *f, const rep_point *pts, int n) {
    bool used[REP_PHASES];
    if (!used_phases(pts, n, used)) return;
    fprintf(f, "\nwhere the TTFT went: median ms per phase as the servers timed it (sim: as simulated); "
               "other = TTFT less the phases (client, hops, relay)\n");
    fprintf(f, "%-22s %-9s %5s %9s", "point", "requests", "", "TTFT p50");
    for (int i = 0; i < REP_PHASES; i++)
        if (used[i]) fprintf(f, " %11.11s", REP_PHASE_NAMES[i]);
    fprintf(f, " %9s\n", "other");
    for (int k = 0; k < n; k++) {
        const rep_point *p = &pts[k];
        if (p->phase_n == 0) continue;
        char b[32], name[64];
        snprintf(name, sizeof name, "%.12s %.8s", p->setup, p->load_label);
        cell(b, sizeof b, p->ttft_med);
        fprintf(f, "%-22s %-9d %5s %9s", name, p->phase_n, p->simulated ? "sim" : "", b);
        for (int i = 0; i < REP_PHASES; i++) {
            if (!used[i]) continue;
            cell(b, sizeof b, p->phase_ms[i]);
            fprintf(f, " %11s", b);
        }
        cell(b, sizeof b, p->phase_other_ms);
        fprintf(f, " %9s\n", b);
    }
}

static void esc(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else fputc(*s, f);
    }
}

void rep_html_phases(FILE *f, const rep_point *pts, int n) {
    bool used[REP_PHASES];
    if (!used_phases(pts, n, used)) return;
    fputs("<h2>Where the TTFT went</h2>\n<p>The median of each phase, in ms, over every request of the "
          "point, as the servers timed it (pdserve_timing; simulated points: as simulated). <i>other</i> "
          "is the TTFT the client saw less the sum of the request's phases: the client's side, the hops "
          "between processes, the router's relay. Medians of parts need not add up to the median "
          "TTFT.</p>\n<table><tr><th>setup</th><th>load</th><th></th><th>requests</th><th>TTFT p50</th>",
          f);
    for (int i = 0; i < REP_PHASES; i++)
        if (used[i]) fprintf(f, "<th>%s</th>", REP_PHASE_NAMES[i]);
    fputs("<th>other</th></tr>\n", f);
    for (int k = 0; k < n; k++) {
        const rep_point *p = &pts[k];
        if (p->phase_n == 0) continue;
        char b[32];
        fputs("<tr><td>", f);
        esc(f, p->setup);
        fputs("</td><td>", f);
        esc(f, p->load_label);
        fprintf(f, "</td><td>%s</td><td>%d</td>", p->simulated ? "sim" : "", p->phase_n);
        cell(b, sizeof b, p->ttft_med);
        fprintf(f, "<td>%s</td>", b);
        for (int i = 0; i < REP_PHASES; i++) {
            if (!used[i]) continue;
            cell(b, sizeof b, p->phase_ms[i]);
            fprintf(f, "<td>%s</td>", b);
        }
        cell(b, sizeof b, p->phase_other_ms);
        fprintf(f, "<td>%s</td></tr>\n", b);
    }
    fputs("</table>\n", f);
}
