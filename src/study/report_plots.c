/* report_plots.c: the report's plots as gnuplot scripts (data inline as datablocks),
 * each drawn once to SVG and once to PNG:
 *   pareto-ttft, pareto-tpot   median latency vs J/token, frontier marked and labelled
 *   pareto-throughput          total token throughput vs J/token
 *   latency-SETUP-batch|rate   median and p99 TTFT and TPOT vs load, one per setup
 *   energy-vs-batch|rate       J/token (whole and idle-subtracted) vs load, all setups
 * Labels come from the database: they are stripped to printable characters without
 * quotes before they enter a script, and file names are sanitised. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "study/report_internal.h"
#include "study/study.h"
#include "util/util.h"

void rep_sanitize(char *out, size_t cap, const char *s) {
    size_t n = 0;
    for (; *s && n + 1 < cap; s++) {
        char c = *s;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
                  c == '.';
        out[n++] = ok ? c : '_';
    }
    out[n] = 0;
}

double rep_pareto_y(const rep_point *p, int which) {
    return which == 0 ? p->ttft_med : which == 1 ? p->tpot_med : p->tok_thr;
}

void rep_pareto(const rep_point *pts, int n, int which, bool *on_front) {
    double *x = xmalloc(sizeof(double) * (size_t)PD_MAX(n, 1)), *y = xmalloc(sizeof(double) * (size_t)PD_MAX(n, 1));
    for (int i = 0; i < n; i++) {
        x[i] = pts[i].jpt;
        y[i] = rep_pareto_y(&pts[i], which);
    }
    study_pareto(x, y, n, which == 2, on_front);
    free(x);
    free(y);
}

/* ---- a growing script buffer ------------------------------------------------------------ */
typedef struct sbuf {
    char *s;
    size_t n, cap;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->s ? b->s + b->n : NULL, b->s ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (k >= 0 && b->s && b->n + (size_t)k < b->cap) {
            b->n += (size_t)k;
            return;
        }
        b->cap = (b->cap + (size_t)k + 1) * 2;
        b->s = xrealloc(b->s, b->cap);
    }
}

/* Printable, quote-free text for titles and data labels. */
static void clean(char *out, size_t cap, const char *s) {
    size_t n = 0;
    for (; *s && n + 1 < cap; s++) out[n++] = ((unsigned char)*s < 0x20 || *s == '"' || *s == '\'' || *s == '\\') ? ' ' : *s;
    out[n] = 0;
}

static void num(sbuf *b, double v) {
    if (isnan(v) || isinf(v)) sb_printf(b, " ?");
    else sb_printf(b, " %.9g", v);
}

static const char *const COLORS[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                     "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};

/* Header, then body; the body is drawn to SVG then again (replot) to PNG. */
static void begin(sbuf *b, const char *dir, const char *name) {
    char path[1200] = "";
    sb_printf(b, "set encoding utf8\nset datafile missing '?'\n");
    study_gnuplot_quote(path, sizeof path, dir);
    sb_printf(b, "set terminal svg size 900,600 dynamic noenhanced font 'Helvetica,14' background rgb 'white'\n");
    sb_printf(b, "set output '%s/%s.svg'\n", path, name);
    sb_printf(b, "set grid lc rgb '#dddddd'\nset key outside right top\nset border lc rgb '#444444'\n");
}

static void finish(sbuf *b, const char *dir, const char *name) {
    char path[1200] = "";
    study_gnuplot_quote(path, sizeof path, dir);
    sb_printf(b, "set terminal pngcairo size 900,600 noenhanced font 'Helvetica,11' background rgb 'white'\n");
    sb_printf(b, "set output '%s/%s.png'\nreplot\nset output\n", path, name);
}

static int draw(const char *gp, const char *dir, const char *name, const char *caption, sbuf *b,
                rep_plot_list *out, char *err, size_t errlen) {
    finish(b, dir, name);
    int rc = study_gnuplot(gp, b->s, b->n, err, errlen);
    free(b->s);
    memset(b, 0, sizeof *b);
    if (rc == 0 && out->n < 32) {
        snprintf(out->name[out->n], sizeof out->name[0], "%s", name);
        snprintf(out->caption[out->n], sizeof out->caption[0], "%s", caption);
        out->n++;
    }
    return rc;
}

/* Distinct setups in plan order; returns how many (indices into pts of a first point). */
static int setups_of(const rep_point *pts, int n, int *first) {
    int k = 0;
    for (int i = 0; i < n; i++) {
        bool seen = false;
        for (int j = 0; j < k; j++)
            if (!strcmp(pts[first[j]].setup, pts[i].setup)) seen = true;
        if (!seen) first[k++] = i;
    }
    return k;
}

static int plot_pareto(const char *gp, const char *dir, const rep_point *pts, int n, int which, rep_plot_list *out,
                       char *err, size_t errlen) {
    static const char *const names[] = {"pareto-ttft", "pareto-tpot", "pareto-throughput"};
    static const char *const ylab[] = {"median TTFT (ms)", "median TPOT (ms)", "total token throughput (tokens/s)"};
    static const char *const titles[] = {"TTFT vs energy per token (better: down and left)",
                                         "TPOT vs energy per token (better: down and left)",
                                         "Throughput vs energy per token (better: up and left)"};
    sbuf b = {0};
    begin(&b, dir, names[which]);
    sb_printf(&b, "set title '%s'\nset xlabel 'energy per token, J/token (input + output, idle included)'\n",
              titles[which]);
    sb_printf(&b, "set ylabel '%s'\n", ylab[which]);
    bool *front = xcalloc((size_t)PD_MAX(n, 1), sizeof *front);
    rep_pareto(pts, n, which, front);
    int usable = 0;
    for (int i = 0; i < n; i++) usable += !isnan(pts[i].jpt) && !isnan(rep_pareto_y(&pts[i], which));
    if (usable == 0) {
        sb_printf(&b, "set label 1 'energy not measured: no point can be placed' at graph 0.5,0.5 center\n"
                      "set xrange [0:1]\nset yrange [0:1]\nplot 2 notitle\n");
    } else {
        int first[64], ns = setups_of(pts, n, first);
        ns = PD_MIN(ns, 64);
        char plot[8192] = "plot";
        size_t pl = strlen(plot);
        int series = 0;
        for (int s = 0; s < ns; s++)
            for (int sim = 0; sim < 2; sim++) {
                int cnt = 0;
                for (int i = 0; i < n; i++)
                    if (!strcmp(pts[i].setup, pts[first[s]].setup) && pts[i].simulated == sim && !isnan(pts[i].jpt) &&
                        !isnan(rep_pareto_y(&pts[i], which)))
                        cnt++;
                if (!cnt) continue;
                sb_printf(&b, "$s%d_%d << EOD\n", s, sim);
                for (int i = 0; i < n; i++)
                    if (!strcmp(pts[i].setup, pts[first[s]].setup) && pts[i].simulated == sim && !isnan(pts[i].jpt) &&
                        !isnan(rep_pareto_y(&pts[i], which))) {
                        num(&b, pts[i].jpt);
                        num(&b, rep_pareto_y(&pts[i], which));
                        sb_printf(&b, "\n");
                    }
                sb_printf(&b, "EOD\n");
                char t[80];
                clean(t, sizeof t, pts[first[s]].setup);
                pl += (size_t)snprintf(plot + pl, sizeof plot - pl,
                                       "%s $s%d_%d using 1:2 with points pt %d ps 1.6 lc rgb '%s' title '%s%s'",
                                       series++ ? "," : "", s, sim, sim ? 6 : 7, COLORS[s % 10], t,
                                       sim ? " (simulated)" : "");
            }
        /* The frontier, sorted by x, drawn as a step line through its points. */
        sb_printf(&b, "$front << EOD\n");
        int *idx = xmalloc(sizeof(int) * (size_t)PD_MAX(n, 1)), nf = 0;
        for (int i = 0; i < n; i++)
            if (front[i]) idx[nf++] = i;
        for (int a = 1; a < nf; a++)
            for (int c = a; c > 0 && pts[idx[c - 1]].jpt > pts[idx[c]].jpt; c--) {
                int t = idx[c];
                idx[c] = idx[c - 1];
                idx[c - 1] = t;
            }
        for (int k = 0; k < nf; k++) {
            char l[200];
            clean(l, sizeof l, pts[idx[k]].label);
            num(&b, pts[idx[k]].jpt);
            num(&b, rep_pareto_y(&pts[idx[k]], which));
            sb_printf(&b, " \"%s\"\n", l);
        }
        sb_printf(&b, "EOD\n");
        free(idx);
        sb_printf(&b, "set offsets graph 0.08, graph 0.25, graph 0.1, graph 0.1\n");
        snprintf(plot + pl, sizeof plot - pl,
                 ", $front using 1:2 with lines lw 2 dt 2 lc rgb '#000000' title 'Pareto frontier'"
                 ", $front using 1:2 with points pt 6 ps 2.6 lw 2 lc rgb '#000000' notitle"
                 ", $front using 1:2:3 with labels offset char 1.2,0.9 left font ',10' tc rgb '#000000' notitle\n");
        sb_printf(&b, "%s", plot);
    }
    free(front);
    char cap[256];
    snprintf(cap, sizeof cap, "%s; circled points, joined by the dashed line, form the Pareto frontier", titles[which]);
    return draw(gp, dir, names[which], cap, &b, out, err, errlen);
}

/* The clock pair a setup's load curve is drawn at: the one with the most measured
 * points of that load kind (ties: default clocks, then the highest). A clock sweep's
 * other pairs show up in the Pareto plots instead. */
static void ref_clock(const rep_point *pts, int n, const char *setup, const char *kind, int *pm, int *dm) {
    int best = 0;
    *pm = *dm = 0;
    for (int i = 0; i < n; i++) {
        const rep_point *p = &pts[i];
        if (strcmp(p->setup, setup) || strcmp(p->load_kind, kind) || p->simulated) continue;
        int c = 0;
        for (int j = 0; j < n; j++)
            c += !strcmp(pts[j].setup, setup) && !strcmp(pts[j].load_kind, kind) && !pts[j].simulated &&
                 pts[j].prefill_mhz == p->prefill_mhz && pts[j].decode_mhz == p->decode_mhz;
        bool better = c > best || (c == best && *pm != 0 && (p->prefill_mhz == 0 || p->prefill_mhz > *pm ||
                                                             (p->prefill_mhz == *pm && p->decode_mhz > *dm)));
        if (better) {
            best = c;
            *pm = p->prefill_mhz;
            *dm = p->decode_mhz;
        }
    }
}

static bool is_kind(const rep_point *pts, int n, const rep_point *p, const char *kind) {
    if (strcmp(p->load_kind, kind) || p->simulated) return false;
    int pm, dm;
    ref_clock(pts, n, p->setup, kind, &pm, &dm);
    return p->prefill_mhz == pm && p->decode_mhz == dm;
}

static double load_x(const rep_point *p) { return !strcmp(p->load_kind, "batch") ? p->batch_size : p->rate; }

/* Points of one setup (or all when setup NULL) of one load kind, sorted by load. */
static int select_sorted(const rep_point *pts, int n, const char *setup, const char *kind, int *idx) {
    int k = 0;
    for (int i = 0; i < n; i++)
        if (is_kind(pts, n, &pts[i], kind) && (!setup || !strcmp(pts[i].setup, setup)) && !isinf(load_x(&pts[i])))
            idx[k++] = i;
    for (int a = 1; a < k; a++)
        for (int c = a; c > 0 && load_x(&pts[idx[c - 1]]) > load_x(&pts[idx[c]]); c--) {
            int t = idx[c];
            idx[c] = idx[c - 1];
            idx[c - 1] = t;
        }
    return k;
}

static void x_axis(sbuf *b, const char *kind) {
    if (!strcmp(kind, "batch"))
        sb_printf(b, "set xlabel 'batch size (requests sent at once)'\nset logscale x 2\n");
    else
        sb_printf(b, "set xlabel 'request rate (requests/s, Poisson)'\n");
}

static int plot_latency(const char *gp, const char *dir, const rep_point *pts, int n, const char *setup,
                        const char *kind, rep_plot_list *out, char *err, size_t errlen) {
    int *idx = xmalloc(sizeof(int) * (size_t)PD_MAX(n, 1));
    int k = select_sorted(pts, n, setup, kind, idx);
    if (k == 0) {
        free(idx);
        return 0;
    }
    char name[96], safe[64], t[64];
    rep_sanitize(safe, sizeof safe, setup);
    clean(t, sizeof t, setup);
    snprintf(name, sizeof name, "latency-%s-%s", safe, kind);
    sbuf b = {0};
    begin(&b, dir, name);
    sb_printf(&b, "set title '%s: latency vs %s'\n", t, !strcmp(kind, "batch") ? "batch size" : "request rate");
    x_axis(&b, kind);
    sb_printf(&b, "set ylabel 'TTFT (ms)'\nset y2label 'TPOT (ms)'\nset ytics nomirror\nset y2tics\n"
                  "set yrange [0:*]\nset y2range [0:*]\nset key below\n$d << EOD\n");
    for (int i = 0; i < k; i++) {
        const rep_point *p = &pts[idx[i]];
        num(&b, load_x(p));
        num(&b, p->ttft_med);
        num(&b, p->ttft_p99);
        num(&b, p->tpot_med);
        num(&b, p->tpot_p99);
        sb_printf(&b, "\n");
    }
    sb_printf(&b, "EOD\nplot $d using 1:2 with linespoints lw 2 pt 7 lc rgb '#1f77b4' title 'TTFT median',"
                  " $d using 1:3 with linespoints lw 1 dt 2 pt 6 lc rgb '#1f77b4' title 'TTFT p99',"
                  " $d using 1:4 axes x1y2 with linespoints lw 2 pt 5 lc rgb '#d62728' title 'TPOT median (right axis)',"
                  " $d using 1:5 axes x1y2 with linespoints lw 1 dt 2 pt 4 lc rgb '#d62728' title 'TPOT p99 (right axis)'\n");
    free(idx);
    char cap[256];
    snprintf(cap, sizeof cap, "%s: median and p99 TTFT (left axis) and TPOT (right axis) vs %s", t,
             !strcmp(kind, "batch") ? "batch size" : "request rate");
    return draw(gp, dir, name, cap, &b, out, err, errlen);
}

static int plot_energy(const char *gp, const char *dir, const rep_point *pts, int n, const char *kind,
                       rep_plot_list *out, char *err, size_t errlen) {
    int *idx = xmalloc(sizeof(int) * (size_t)PD_MAX(n, 1));
    int k = select_sorted(pts, n, NULL, kind, idx);
    int measured = 0;
    for (int i = 0; i < k; i++) measured += !isnan(pts[idx[i]].jpt);
    if (k == 0 || measured == 0) {
        free(idx);
        return 0;
    }
    char name[64];
    snprintf(name, sizeof name, "energy-vs-%s", kind);
    sbuf b = {0};
    begin(&b, dir, name);
    sb_printf(&b, "set title 'Energy per token vs %s'\n", !strcmp(kind, "batch") ? "batch size" : "request rate");
    x_axis(&b, kind);
    sb_printf(&b, "set ylabel 'J/token (input + output)'\nset yrange [0:*]\nset key below\n");
    int first[64], ns = PD_MIN(setups_of(pts, n, first), 64);
    char plot[8192] = "plot";
    size_t pl = strlen(plot);
    int series = 0;
    for (int s = 0; s < ns; s++) {
        int m = 0;
        for (int i = 0; i < k; i++) m += !strcmp(pts[idx[i]].setup, pts[first[s]].setup);
        if (!m) continue;
        sb_printf(&b, "$e%d << EOD\n", s);
        for (int i = 0; i < k; i++) {
            const rep_point *p = &pts[idx[i]];
            if (strcmp(p->setup, pts[first[s]].setup) != 0) continue;
            num(&b, load_x(p));
            num(&b, p->jpt);
            num(&b, p->jpt_net);
            sb_printf(&b, "\n");
        }
        sb_printf(&b, "EOD\n");
        char t[64];
        clean(t, sizeof t, pts[first[s]].setup);
        pl += (size_t)snprintf(plot + pl, sizeof plot - pl,
                               "%s $e%d using 1:2 with linespoints lw 2 pt 7 lc rgb '%s' title '%s',"
                               " $e%d using 1:3 with linespoints lw 1 dt 2 pt 6 lc rgb '%s' title '%s idle-subtracted'",
                               series++ ? "," : "", s, COLORS[s % 10], t, s, COLORS[s % 10], t);
    }
    sb_printf(&b, "%s\n", plot);
    free(idx);
    char cap[256];
    snprintf(cap, sizeof cap, "J/token vs %s per setup: solid whole energy, dashed with idle power subtracted",
             !strcmp(kind, "batch") ? "batch size" : "request rate");
    return draw(gp, dir, name, cap, &b, out, err, errlen);
}

/* Reuse sweeps: TTFT p50 against the share of prompt tokens served from the prefix
 * cache, one point per configuration, labelled by setup (nothing when none reported). */
static int plot_reuse(const char *gp, const char *dir, const rep_point *pts, int n, rep_plot_list *out, char *err,
                      size_t errlen) {
    int m = 0, reuse = 0;
    for (int i = 0; i < n; i++) {
        m += !isnan(pts[i].cached_frac) && !isnan(pts[i].ttft_med);
        reuse += pts[i].cached_frac > 0 || !isnan(pts[i].tier_hit[0]); /* as report.c's any_cached */
    }
    if (m == 0 || reuse == 0) return 0;
    const char *name = "ttft-vs-cached";
    sbuf b = {0};
    begin(&b, dir, name);
    sb_printf(&b, "set title 'TTFT vs prompt tokens served from the prefix cache'\n");
    sb_printf(&b, "set xlabel 'prompt tokens cached (%%)'\nset xrange [-5:105]\n");
    sb_printf(&b, "set ylabel 'TTFT p50 (ms)'\nset yrange [0:*]\nset key below\n");
    int first[64], ns = PD_MIN(setups_of(pts, n, first), 64);
    char plot[8192] = "plot";
    size_t pl = strlen(plot);
    int series = 0;
    for (int s = 0; s < ns; s++) {
        int k = 0;
        for (int i = 0; i < n; i++)
            if (!strcmp(pts[i].setup, pts[first[s]].setup) && !isnan(pts[i].cached_frac) && !isnan(pts[i].ttft_med)) {
                if (!k++) sb_printf(&b, "$c%d << EOD\n", s);
                num(&b, 100 * pts[i].cached_frac);
                num(&b, pts[i].ttft_med);
                sb_printf(&b, "\n");
            }
        if (!k) continue;
        sb_printf(&b, "EOD\n");
        char t[64];
        clean(t, sizeof t, pts[first[s]].setup);
        pl += (size_t)snprintf(plot + pl, sizeof plot - pl, "%s $c%d using 1:2 with points pt 7 ps 1.5 lc rgb '%s' title '%s'",
                               series++ ? "," : "", s, COLORS[s % 10], t);
    }
    sb_printf(&b, "%s\n", plot);
    return draw(gp, dir, name, "TTFT p50 per point against the share of its prompt tokens the server reported "
                               "as cached (GPU prefix cache hits + blocks loaded from lower KV tiers)",
                &b, out, err, errlen);
}

int rep_plots(const char *gp, const char *dir, const rep_point *pts, int n, rep_plot_list *out, char *err,
              size_t errlen) {
    out->n = 0;
    for (int w = 0; w < 3; w++)
        if (plot_pareto(gp, dir, pts, n, w, out, err, errlen)) return -1;
    static const char *const kinds[] = {"batch", "rate"};
    for (int kk = 0; kk < 2; kk++)
        if (plot_energy(gp, dir, pts, n, kinds[kk], out, err, errlen)) return -1;
    int first[64], ns = PD_MIN(setups_of(pts, n, first), 64);
    for (int s = 0; s < ns; s++)
        for (int kk = 0; kk < 2; kk++)
            if (plot_latency(gp, dir, pts, n, pts[first[s]].setup, kinds[kk], out, err, errlen)) return -1;
    if (plot_reuse(gp, dir, pts, n, out, err, errlen)) return -1;
    return 0;
}
