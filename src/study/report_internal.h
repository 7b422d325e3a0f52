/* report_internal.h: what report.c (database, tables, HTML, CSV) and report_plots.c
 * (gnuplot scripts) share: the points of a results database, repeats averaged. */
#ifndef PD_STUDY_REPORT_INTERNAL_H
#define PD_STUDY_REPORT_INTERNAL_H

#include <sqlite3.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

/* The phases of requests.server_phases, in the order they happen (a colocated server
 * reports parse, queue, prefill; a disaggregated one reserve .. decode; the simulator
 * path, queue, prefill and, disaggregated, kv and decode). */
#define REP_PHASES 10
extern const char *const REP_PHASE_NAMES[REP_PHASES];

/* One configuration (setup x load x clocks x simulated), its ok repeats averaged.
 * Every double is NAN when not measured. */
typedef struct rep_point {
    char setup[64];
    char load_kind[8];          /* "batch" or "rate" */
    char load_label[48];        /* "b16", "r2.5" */
    char label[160];            /* "co-1gpu b16 @810/810" (+ " (sim)") */
    int order;                  /* first point_index: plan order of the setup */
    int setup_order;
    int batch_size;
    double rate;                /* INFINITY for batch loads */
    int prefill_mhz, decode_mhz;/* 0 = default clocks */
    bool simulated;
    int n_ok;                   /* repeats averaged */
    int completed, failed;      /* requests, summed over repeats */
    double ttft_med, ttft_p99, tpot_med, tpot_p99, itl_med, e2el_med;
    double req_thr, in_thr, out_thr, tok_thr, goodput;
    double energy_j, jpt, jpt_net, jpot, jpot_net;
    double cached_frac;         /* prompt tokens the server took from its prefix cache (any
                                 * KV tier) / prompt tokens, for reuse sweeps; NAN: not reported */
    /* the servers' own counters over the run (server_metrics; NAN without prefix caching):
     * prompt tokens found per tier (gpu, cpu, disk) / prompt tokens looked up; admissions
     * that found lower-tier blocks and loaded / recomputed them; blocks loaded; evicted
     * blocks not offloaded */
    double tier_hit[3], loads, recomputes, loaded_blocks, dropped;
    /* a disk store's ops over the run (server_metrics: the instances' pdserve_kv_store_*
     * counters, warm-up included; simulated: the simulated ops): puts and gets done and
     * their mean seconds each, start to end (NAN: not reported) */
    double store_puts, store_put_s, store_gets, store_get_s;
    /* where the TTFT went (requests.server_phases, pooled over repeats): the median ms
     * of each of REP_PHASE_NAMES (NAN: not reported), and of the TTFT less the sum of a
     * request's phases (the client's side and hops no server timed) */
    int phase_n;                /* requests that reported phases */
    double phase_ms[REP_PHASES], phase_other_ms;
    /* the medians' own sampling noise: a distribution-free 95% confidence interval of the
     * median TTFT and TPOT (ms) over the point's completed requests, pooled over repeats
     * (rep_median_ci); NAN where too few requests to have one */
    double ttft_ci[2], tpot_ci[2];
    /* energy by component: J/token (whole, idle-subtracted), averaged */
    int n_comp;
    char comp[16][64];
    double comp_jpt[16], comp_jpt_net[16];
} rep_point;

/* Fills pts[k].phase_* from the requests of the runs whose point is k: run_ids[i] belongs
 * to point of_point[i] (i < n_runs). A database without the column leaves them unset. */
void rep_load_phases(sqlite3 *h, rep_point *pts, int n, const long long *run_ids, const int *of_point,
                     int n_runs);
/* The distribution-free confidence interval of a median at confidence >= 95%: for the n
 * values (sorted in place), [x_(k), x_(n+1-k)] with the largest k such that a
 * Binomial(n, 1/2) count falls below k with probability <= 2.5% (order statistics; no
 * assumption about the distribution's shape, so a bimodal one, whose median can jump
 * between its modes with one request, gets the wide interval it deserves). false (and
 * NAN bounds) when n < 6: fewer values cannot give 95%. */
bool rep_median_ci(double *x, int n, double *lo, double *hi);
/* Fills pts[k].ttft_ci and tpot_ci from the requests of the runs whose point is k (as
 * rep_load_phases; TPOT of a request: (e2el - ttft) / (output tokens - 1)). */
void rep_load_median_cis(sqlite3 *h, rep_point *pts, int n, const long long *run_ids, const int *of_point,
                         int n_runs);

/* "Where the TTFT went": one row per point that reported phases (text, HTML). */
void rep_print_phases(FILE *f, const rep_point *pts, int n);
void rep_html_phases(FILE *f, const rep_point *pts, int n);

/* ASCII letters, digits, '-', '_', '.' only (file names). */
void rep_sanitize(char *out, size_t cap, const char *s);

/* The plots: writes NAME.svg and NAME.png under dir for every plot, appending each
 * plot's base name and caption to names/captions (caller frees each entry).
 * 0, or -1 with err. */
typedef struct rep_plot_list {
    char name[32][96];
    char caption[32][256];
    int n;
} rep_plot_list;

int rep_plots(const char *gnuplot, const char *dir, const rep_point *pts, int n, rep_plot_list *out, char *err,
              size_t errlen);

/* Pareto membership used by both the plots and the HTML tables.
 * which: 0 TTFT vs J/token, 1 TPOT vs J/token, 2 throughput vs J/token. */
double rep_pareto_y(const rep_point *p, int which);
void rep_pareto(const rep_point *pts, int n, int which, bool *on_front);

#endif
