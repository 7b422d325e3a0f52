/* metrics.c: from per-request records to the numbers a benchmark reports, with
 * vLLM's `bench serve` definitions so that results compare one to one:
 *   TTFT  first text-bearing event - send time          (successful requests)
 *   TPOT  (E2EL - TTFT) / (output tokens - 1)           (requests with > 1 token)
 *   ITL   gaps between consecutive text-bearing events  (all of them, pooled)
 *   E2EL  last byte - send time
 *   throughputs = totals / benchmark duration; goodput = requests meeting every SLO
 *   / duration. Percentiles interpolate linearly (numpy's default); std is the
 *   population standard deviation (numpy's default). All in milliseconds. */
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "util/util.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double bench_percentile(const double *sorted, int n, double p) {
    if (n <= 0) return 0;
    double rank = p / 100.0 * (n - 1);
    if (rank <= 0) return sorted[0];
    if (rank >= n - 1) return sorted[n - 1];
    int lo = (int)floor(rank);
    double f = rank - lo;
    return sorted[lo] + (sorted[lo + 1] - sorted[lo]) * f;
}

void bench_stat_compute(bench_stat *s, double *x, int n, const double *pcts, int n_pcts) {
    memset(s, 0, sizeof *s);
    s->n = n;
    if (n <= 0) return;
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += x[i];
    s->mean = sum / n;
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (x[i] - s->mean) * (x[i] - s->mean);
    s->std = sqrt(ss / n);
    s->median = bench_percentile(x, n, 50);
    for (int i = 0; i < n_pcts && i < BENCH_MAX_PERCENTILES; i++) s->pct[i] = bench_percentile(x, n, pcts[i]);
}

static double rec_tpot_ms(const bench_record *r) {
    return r->output_len > 1 ? (r->e2el_s - r->ttft_s) * 1e3 / (r->output_len - 1) : 0;
}

typedef struct bench_edge {
    double t;
    int d;
} bench_edge;

static int cmp_edge(const void *a, const void *b) {
    const bench_edge *x = a, *y = b;
    if (x->t != y->t) return x->t < y->t ? -1 : 1;
    return x->d - y->d;
}

/* Peak tokens in any 1-second window of the run, and peak requests in flight
 * (sampled at every request start). */
static void peaks(bench_result *r) {
    double end = r->sum.duration_s;
    int nb = (int)ceil(end) + 1;
    if (nb < 1 || nb > 10000000) nb = 1;
    int *bucket = xcalloc((size_t)nb, sizeof *bucket);
    int best = 0, conc = 0;

    for (int i = 0; i < r->n; i++) {
        const bench_record *q = &r->recs[i];
        for (int k = 0; k < q->n_tokens; k++) {
            int b = (int)(q->start_s + q->token_s[k]);
            if (b >= 0 && b < nb) bucket[b]++;
        }
    }
    for (int b = 0; b < nb; b++) best = PD_MAX(best, bucket[b]);
    free(bucket);
    r->sum.max_output_tokens_per_s = best;
    /* sweep over start (+1) and end (-1) edges; ends first at equal times */
    bench_edge *e = xmalloc(sizeof(bench_edge) * 2 * (size_t)(r->n + 1));
    int m = 0;
    for (int i = 0; i < r->n; i++) {
        const bench_record *q = &r->recs[i];
        if (q->start_s < 0) continue;
        e[m++] = (bench_edge){q->start_s, +1};
        e[m++] = (bench_edge){q->start_s + PD_MAX(q->e2el_s, 0), -1};
    }
    qsort(e, (size_t)m, sizeof *e, cmp_edge);
    int peak = 0;
    for (int i = 0; i < m; i++) {
        conc += e[i].d;
        peak = PD_MAX(peak, conc);
    }
    free(e);
    r->sum.max_concurrent = peak;
}

/* --server-timing: median |client - server| TTFT and E2E (ms) over successful requests
 * that carried the server's view; -1 when none did. */
static void server_timing_diffs(bench_result *r) {
    bench_summary *s = &r->sum;
    double *dt = xmalloc(sizeof(double) * (size_t)(r->n + 1));
    double *de = xmalloc(sizeof(double) * (size_t)(r->n + 1));
    int n = 0;
    for (int i = 0; i < r->n; i++) {
        const bench_record *q = &r->recs[i];
        if (!q->success || !q->has_server_timing || q->server_ttft_s < 0 || q->server_e2e_s < 0) continue;
        dt[n] = fabs(q->ttft_s - q->server_ttft_s) * 1e3;
        de[n] = fabs(q->e2el_s - q->server_e2e_s) * 1e3;
        n++;
    }
    s->n_server_timing = n;
    s->server_ttft_diff_ms_median = s->server_e2e_diff_ms_median = -1;
    if (n) {
        qsort(dt, (size_t)n, sizeof *dt, cmp_double);
        qsort(de, (size_t)n, sizeof *de, cmp_double);
        s->server_ttft_diff_ms_median = bench_percentile(dt, n, 50);
        s->server_e2e_diff_ms_median = bench_percentile(de, n, 50);
    }
    free(dt);
    free(de);
}

void bench_summarize(const bench_config *c, bench_result *r, double duration_s) {
    bench_summary *s = &r->sum;
    double energy = s->energy_j;
    memset(s, 0, sizeof *s);
    s->energy_j = energy;
    s->duration_s = duration_s;
    size_t n_itl = 0;
    for (int i = 0; i < r->n; i++)
        if (r->recs[i].success && r->recs[i].n_tokens > 1) n_itl += (size_t)r->recs[i].n_tokens - 1;
    double *ttft = xmalloc(sizeof(double) * (size_t)(r->n + 1));
    double *tpot = xmalloc(sizeof(double) * (size_t)(r->n + 1));
    double *e2el = xmalloc(sizeof(double) * (size_t)(r->n + 1));
    double *itl = xmalloc(sizeof(double) * (n_itl + 1));
    int nt = 0, np = 0;
    size_t ni = 0;
    bool slo = c->goodput_ttft_ms > 0 || c->goodput_tpot_ms > 0 || c->goodput_e2el_ms > 0;
    for (int i = 0; i < r->n; i++) {
        const bench_record *q = &r->recs[i];
        if (!q->success) {
            s->failed++;
            continue;
        }
        s->completed++;
        s->total_input += q->prompt_len > 0 ? q->prompt_len : 0;
        s->total_output += q->output_len;
        if (q->has_cached) {
            s->total_cached += q->cached_tokens;
            s->n_cached_known++;
        }
        ttft[nt] = q->ttft_s * 1e3;
        e2el[nt] = q->e2el_s * 1e3;
        nt++;
        double tp = rec_tpot_ms(q);
        if (q->output_len > 1) tpot[np++] = tp;
        for (int k = 1; k < q->n_tokens; k++) itl[ni++] = ((double)q->token_s[k] - q->token_s[k - 1]) * 1e3;
        if (slo) {
            bool good = true;
            if (c->goodput_ttft_ms > 0 && q->ttft_s * 1e3 > c->goodput_ttft_ms) good = false;
            if (c->goodput_tpot_ms > 0 && tp > c->goodput_tpot_ms) good = false;
            if (c->goodput_e2el_ms > 0 && q->e2el_s * 1e3 > c->goodput_e2el_ms) good = false;
            s->good += good;
        }
    }
    double d = duration_s > 0 ? duration_s : 1e-9;
    s->request_throughput = s->completed / d;
    s->output_throughput = (double)s->total_output / d;
    s->total_token_throughput = (double)(s->total_input + s->total_output) / d;
    s->goodput = slo ? s->good / d : -1;
    bench_stat_compute(&s->ttft, ttft, nt, c->percentiles, c->n_percentiles);
    bench_stat_compute(&s->tpot, tpot, np, c->percentiles, c->n_percentiles);
    bench_stat_compute(&s->e2el, e2el, nt, c->percentiles, c->n_percentiles);
    bench_stat_compute(&s->itl, itl, (int)ni, c->percentiles, c->n_percentiles);
    free(ttft);
    free(tpot);
    free(e2el);
    free(itl);
    server_timing_diffs(r);
    peaks(r);
}

/* ---- option parsing ------------------------------------------------------------- */

int bench_parse_goodput(bench_config *c, const char *spec, char *err, size_t errlen) {
    const char *p = spec;
    int n = 0;
    while (*p) {
        while (*p == ' ' || *p == ',' || *p == '\t') p++;
        if (!*p) break;
        const char *colon = strchr(p, ':');
        if (!colon) {
            pd_errorf(err, errlen, "--goodput: '%s' is not NAME:MS (ttft, tpot or e2el)", p);
            return -1;
        }
        size_t kn = (size_t)(colon - p);
        char *end;
        double v = strtod(colon + 1, &end);
        if (end == colon + 1 || !(v > 0) || (*end && *end != ' ' && *end != ',' && *end != '\t')) {
            pd_errorf(err, errlen, "--goodput: bad milliseconds in '%s' (a positive number)", p);
            return -1;
        }
        if (kn == 4 && !strncmp(p, "ttft", 4)) c->goodput_ttft_ms = v;
        else if (kn == 4 && !strncmp(p, "tpot", 4)) c->goodput_tpot_ms = v;
        else if (kn == 4 && !strncmp(p, "e2el", 4)) c->goodput_e2el_ms = v;
        else {
            pd_errorf(err, errlen, "--goodput: unknown metric '%.*s' (ttft, tpot or e2el)", (int)kn, p);
            return -1;
        }
        n++;
        p = end;
    }
    if (!n) {
        pd_errorf(err, errlen, "--goodput: no SLO given (e.g. ttft:300 tpot:50)");
        return -1;
    }
    return 0;
}

int bench_parse_percentiles(bench_config *c, const char *spec, char *err, size_t errlen) {
    const char *p = spec;
    int n = 0;
    while (*p) {
        while (*p == ' ' || *p == ',') p++;
        if (!*p) break;
        char *end;
        double v = strtod(p, &end);
        if (end == p || !(v >= 0 && v <= 100) || (*end && *end != ',' && *end != ' ')) {
            pd_errorf(err, errlen, "--metric-percentiles: bad percentile in '%s' (0 to 100)", p);
            return -1;
        }
        if (n >= BENCH_MAX_PERCENTILES) {
            pd_errorf(err, errlen, "--metric-percentiles: at most %d values", BENCH_MAX_PERCENTILES);
            return -1;
        }
        c->percentiles[n++] = v;
        p = end;
    }
    c->n_percentiles = n;
    return 0;
}

int bench_parse_percentile_metrics(bench_config *c, const char *spec, char *err, size_t errlen) {
    unsigned bits = 0;
    const char *p = spec;
    while (*p) {
        while (*p == ' ' || *p == ',') p++;
        if (!*p) break;
        size_t n = strcspn(p, ", ");
        if (n == 4 && !strncmp(p, "ttft", 4)) bits |= BENCH_METRIC_TTFT;
        else if (n == 4 && !strncmp(p, "tpot", 4)) bits |= BENCH_METRIC_TPOT;
        else if (n == 3 && !strncmp(p, "itl", 3)) bits |= BENCH_METRIC_ITL;
        else if (n == 4 && !strncmp(p, "e2el", 4)) bits |= BENCH_METRIC_E2EL;
        else {
            pd_errorf(err, errlen, "--percentile-metrics: unknown metric '%.*s' (ttft, tpot, itl, e2el)",
                      (int)n, p);
            return -1;
        }
        p += n;
    }
    c->percentile_metrics = bits;
    return 0;
}

/* ---- energy --------------------------------------------------------------------- */

static bool name_is_energy(const char *name, size_t n) {
    static const char suffix[] = "_energy_joules";
    size_t sl = sizeof suffix - 1;
    return n > sl && !memcmp(name + n - sl, suffix, sl);
}

/* label value for key in "{a=\"x\",role=\"y\"}" into out. */
static void label_value(const char *labels, size_t n, const char *key, char *out, size_t cap) {
    out[0] = 0;
    size_t kl = strlen(key);
    for (size_t i = 0; i + kl + 2 <= n; i++) {
        if ((i == 0 || labels[i - 1] == '{' || labels[i - 1] == ',' || labels[i - 1] == ' ') &&
            !memcmp(labels + i, key, kl) && labels[i + kl] == '=' && labels[i + kl + 1] == '"') {
            size_t b = i + kl + 2, e = b;
            while (e < n && labels[e] != '"') {
                if (labels[e] == '\\') e++;
                e++;
            }
            size_t len = PD_MIN(e > n ? n - b : e - b, cap - 1);
            memcpy(out, labels + b, len);
            out[len] = 0;
            return;
        }
    }
}

/* Derived sums (power_result_prometheus, power_agg_prometheus): never meters. */
static bool name_is_derived(const char *name, size_t n) {
    static const char *const d[] = {"pdserve_role_energy_joules", "pdserve_component_energy_joules",
                                     "pdserve_gpu_active_energy_joules"};
    for (size_t i = 0; i < PD_ARRAY_LEN(d); i++)
        if (n == strlen(d[i]) && !memcmp(name, d[i], n)) return true;
    return false;
}

static bool name_is(const char *name, size_t n, const char *want) {
    return n == strlen(want) && !memcmp(name, want, n);
}

/* The key without its server prefix ("URL " before the metric name). */
static const char *unprefixed(const char *key) {
    const char *sp = strchr(key, ' '), *brace = strchr(key, '{');
    return sp && (!brace || sp < brace) ? sp + 1 : key;
}

/* A series' meter: the key without its server prefix and without the labels that say
 * who read it (role, source), so that one GPU read by two instances (a prefill and a
 * decode instance on one device) is one meter. */
static void meter_of(const char *key, char *out, size_t cap) {
    const char *t = unprefixed(key);
    size_t o = 0, i = 0;
    while (t[i] && o + 1 < cap) {
        bool label_start = i > 0 && (t[i - 1] == '{' || t[i - 1] == ',');
        if (!label_start || (strncmp(t + i, "role=\"", 6) && strncmp(t + i, "source=\"", 8))) {
            out[o++] = t[i++];
            continue;
        }
        i += strcspn(t + i, "\"") + 1; /* past the opening quote */
        while (t[i] && t[i] != '"') i += t[i] == '\\' && t[i + 1] ? 2 : 1;
        if (t[i]) i++;
        if (t[i] == ',') i++;
        else if (o > 0 && out[o - 1] == ',') o--; /* the last label: its comma goes too */
    }
    out[o] = 0;
}

/* The same prefix (server) as key, and the same host and gpu labels as those given. */
static bool same_gpu(const char *key, const char *prefix, const char *host, const char *gpu) {
    size_t pl = prefix ? strlen(prefix) : 0;
    if (pl ? strncmp(key, prefix, pl) != 0 || key[pl] != ' ' : unprefixed(key) != key) return false;
    const char *name = unprefixed(key);
    if (strncmp(name, "pdserve_gpu_energy_joules{", 26) != 0) return false;
    const char *lb = name + 25;
    char h[64], g[16];
    label_value(lb, strlen(lb), "host", h, sizeof h);
    label_value(lb, strlen(lb), "gpu", g, sizeof g);
    return !strcmp(h, host) && !strcmp(g, gpu);
}

int bench_energy_parse(bench_energy *e, const char *text, size_t len, const char *prefix, bool after) {
    int found = 0;
    /* pass 0: energy counters and measured flags; pass 1: idle baselines (they refer
     * to counters, which may come later in the text) */
    for (int pass = 0; pass < 2; pass++) {
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *q = p;
        p = nl ? nl + 1 : end;
        while (q < le && (*q == ' ' || *q == '\t')) q++;
        if (q >= le || *q == '#') continue;
        const char *name = q;
        while (q < le && (isalnum((unsigned char)*q) || *q == '_' || *q == ':')) q++;
        size_t name_len = (size_t)(q - name);
        bool is_energy = name_is_energy(name, name_len) && !name_is_derived(name, name_len);
        bool is_measured = name_is(name, name_len, "pdserve_energy_measured");
        bool is_idle = name_is(name, name_len, "pdserve_gpu_idle_power_watts");
        if (pass == 0 ? !is_energy && !is_measured : !is_idle) continue;
        const char *labels = q;
        q = util_prom_skip_labels(q, le);
        if (!q) continue;
        size_t key_len = (size_t)(q - name);
        char *vend;
        char num[64];
        const char *v = q;
        while (v < le && (*v == ' ' || *v == '\t')) v++;
        size_t vn = PD_MIN((size_t)(le - v), sizeof num - 1);
        memcpy(num, v, vn);
        num[vn] = 0;
        double val = strtod(num, &vend);
        if (vend == num || !isfinite(val)) continue;
        size_t ln = (size_t)(q - labels);
        if (is_measured) {
            char comp[32];
            label_value(labels, ln, "component", comp, sizeof comp);
            if (!comp[0]) continue;
            int k;
            for (k = 0; k < e->n_comp; k++)
                if (!strcmp(e->comp[k].name, comp)) break;
            if (k == e->n_comp) {
                if (k >= BENCH_ENERGY_MAX_COMPONENTS) continue;
                snprintf(e->comp[k].name, sizeof e->comp[k].name, "%s", comp);
                e->comp[k].measured = true;
                e->n_comp++;
            }
            e->comp[k].measured &= val != 0;
            continue;
        }
        if (is_idle) {
            char host[64], gpu[16];
            label_value(labels, ln, "host", host, sizeof host);
            label_value(labels, ln, "gpu", gpu, sizeof gpu);
            for (int k = 0; k < e->n; k++)
                if (same_gpu(e->s[k].key, prefix, host, gpu)) {
                    e->s[k].idle_w = val;
                    e->s[k].has_idle = true;
                }
            continue;
        }
        char key[192];
        snprintf(key, sizeof key, "%s%s%.*s", prefix ? prefix : "", prefix && *prefix ? " " : "",
                 (int)key_len, name);
        int k;
        for (k = 0; k < e->n; k++)
            if (!strcmp(e->s[k].key, key)) break;
        if (k == e->n) {
            if (e->n >= BENCH_ENERGY_MAX_SERIES) continue;
            memset(&e->s[k], 0, sizeof e->s[k]);
            snprintf(e->s[k].key, sizeof e->s[k].key, "%s", key);
            label_value(labels, ln, "role", e->s[k].role, sizeof e->s[k].role);
            char mk[192], mj[192];
            meter_of(key, mk, sizeof mk);
            for (int j = 0; j < k && !e->s[k].dup; j++) {
                meter_of(e->s[j].key, mj, sizeof mj);
                e->s[k].dup = !strcmp(mj, mk);
            }
            e->n++;
        }
        if (after) {
            e->s[k].after = val;
            e->s[k].has_after = true;
        } else {
            e->s[k].before = val;
            e->s[k].has_before = true;
        }
        found++;
    }
    }
    return found;
}

static bool counted(const bench_energy_series *s, const char *role) {
    return s->has_before && s->has_after && !s->dup && (!role || !strcmp(role, s->role));
}

double bench_energy_joules(const bench_energy *e, const char *role) {
    double j = 0;
    int used = 0;
    for (int k = 0; k < e->n; k++) {
        const bench_energy_series *s = &e->s[k];
        if (!counted(s, role)) continue;
        j += s->after - s->before;
        used++;
    }
    return used ? j : -1;
}

static bool is_gpu_series(const bench_energy_series *s) {
    return !strncmp(unprefixed(s->key), "pdserve_gpu_energy_joules", 25);
}

double bench_energy_gpu_joules(const bench_energy *e, const char *role, bool net, double seconds) {
    if (seconds <= 0) seconds = e->t_after > e->t_before && e->t_before > 0 ? e->t_after - e->t_before : 0;
    double j = 0, w = 0;
    int used = 0;
    for (int k = 0; k < e->n; k++) {
        const bench_energy_series *s = &e->s[k];
        if (!counted(s, role) || !is_gpu_series(s)) continue;
        if (net && !s->has_idle) return NAN;
        j += s->after - s->before;
        w += s->idle_w;
        used++;
    }
    if (!used || (net && seconds <= 0)) return NAN;
    return net ? j - w * seconds : j;
}

double bench_energy_gpu_idle_w(const bench_energy *e, const char *role) {
    double w = 0;
    int used = 0;
    for (int k = 0; k < e->n; k++) {
        const bench_energy_series *s = &e->s[k];
        if (!counted(s, role) || !is_gpu_series(s)) continue;
        if (!s->has_idle) return NAN;
        w += s->idle_w;
        used++;
    }
    return used ? w : NAN;
}

int bench_energy_component_measured(const bench_energy *e, const char *component) {
    for (int k = 0; k < e->n_comp; k++)
        if (!strcmp(e->comp[k].name, component)) return e->comp[k].measured ? 1 : 0;
    return -1;
}
