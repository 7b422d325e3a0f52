/* cost.c: the simulator's cost model. Prices one planned step from the profile's grids
 * (interpolated), one KV transfer from a medium's curve, and the energy of both, at a
 * given SM clock through the clock model. Pure arithmetic: called once per simulated
 * step, so it stays O(1) per step (the caller accumulates the step's work). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "engine/forward.h"
#include "sim/sim.h"
#include "util/util.h"

/* Smallest time a non-empty part may cost: keeps virtual time moving when a grid is
 * extrapolated far below its measured points. */
#define SIM_MIN_PART_S 1e-7

static void mixed_grid_init(sim_cost *c);

void sim_cost_init(sim_cost *c, const sim_profile *p, double mhz) {
    memset(c, 0, sizeof *c);
    c->p = p;
    c->mhz = mhz;
    c->prefill_scale = c->decode_scale = 1.0;
    const sim_clock_model *cm = &p->clock;
    double f0 = cm->base_mhz;
    double fr = 1.0; /* f / f0 */
    if (mhz > 0 && f0 > 0 && fabs(mhz - f0) > 0.5) {
        const sim_clock_point *hit = NULL;
        for (int i = 0; i < cm->n_points; i++)
            if (fabs(cm->points[i].mhz - mhz) < 0.5) hit = &cm->points[i];
        fr = mhz / f0;
        if (hit) {
            c->prefill_scale = hit->prefill_scale;
            c->decode_scale = hit->decode_scale;
        } else {
            c->prefill_scale = cm->prefill_compute_frac / fr + 1.0 - cm->prefill_compute_frac;
            c->decode_scale = cm->decode_compute_frac / fr + 1.0 - cm->decode_compute_frac;
        }
    }
    if (p->power.measured) {
        c->has_power = true;
        double dyn = pow(fr, cm->dyn_exp);
        c->dyn = dyn;
        c->idle_w = p->power.idle_w;
        c->prefill_w = p->power.idle_w + PD_MAX(p->power.prefill_w - p->power.idle_w, 0) * dyn;
        c->decode_w = p->power.idle_w + PD_MAX(p->power.decode_w - p->power.idle_w, 0) * dyn;
    }
    mixed_grid_init(c);
}

static bool has_linear(const sim_profile *p) { return p->linear.nx > 0; }

static double linear_s(const sim_profile *p, double rows) {
    return rows > 0 ? PD_MAX(sim_grid_eval(&p->linear, rows, 1), SIM_MIN_PART_S) : 0;
}

void sim_work_begin(sim_work *w, const sim_profile *p) {
    memset(w, 0, sizeof *w);
    w->p = p;
}

void sim_work_add_chunk(sim_work *w, int n, int start) {
    w->prefill_tokens += n;
    w->prefill_chunks++;
    w->prefill_pairs += (double)n * ((double)start + (double)(n + 1) / 2.0);
    if (w->p && has_linear(w->p)) {
        double a = sim_grid_eval(&w->p->prefill, n, start) - linear_s(w->p, n);
        w->prefill_attn_s += PD_MAX(a, 0);
    }
}

/* Without a linear curve: the grid at (rows, equivalent cached prefix). */
static double prefill_part_eq(const sim_profile *p, const sim_work *w) {
    if (w->prefill_tokens <= 0) return 0;
    double T = w->prefill_tokens;
    double c_eq = w->prefill_pairs / T - (T + 1) / 2.0;
    double v = sim_grid_eval(&p->prefill, T, c_eq);
    double floor_ = 0.3 * sim_grid_eval(&p->prefill, T, 0);
    return PD_MAX(PD_MAX(v, floor_), SIM_MIN_PART_S);
}

/* A decode-only step on an engine with graph buckets runs as its bucket's padded batch
 * (the padding rows cost as real ones: measured on an H200, 5 to 7 sequences at 16k
 * context stepped in 10.6-10.7 ms, the 8-sequence time, not the 7.2 ms of 4 plus a
 * share), so it is priced at the padded size with the real rows' mean context. */
/* The decode part's shape as it runs: its rows (padded to the bucket in a decode-only
 * step on an engine with buckets) and their mean context. w has decode rows. */
static void decode_shape(const sim_profile *p, const sim_work *w, double *B, double *ctx) {
    *B = w->decode_seqs;
    *ctx = w->decode_ctx / *B;
    if (p->decode_buckets && w->prefill_tokens <= 0) *B = fwd_decode_bucket_rows(w->decode_seqs);
}

static double decode_part(const sim_profile *p, const sim_work *w) {
    if (w->decode_seqs <= 0) return 0;
    double B, ctx;
    decode_shape(p, w, &B, &ctx);
    return PD_MAX(sim_grid_eval(&p->decode, B, ctx), SIM_MIN_PART_S);
}

/* The decode part's power: the profile's decode_watts at the step's batch (padded as
 * decode_part prices it) and mean context where measured, scaled to the clock like
 * decode_w; else decode_w. A decode step's power grows with its context (its KV reads):
 * on an H200, Llama-3.2-3B, batch 16 at 16k context drew 650-660 W where the decode
 * grid as a whole averaged 487 W (docs/simulator.md, "Where the J/token bias comes
 * from"). */
static double decode_watts(const sim_cost *c, const sim_work *w) {
    const sim_profile *p = c->p;
    const sim_grid *g = &p->power.decode_grid;
    if (g->nx < 1 || w->decode_seqs <= 0) return c->decode_w;
    double B, ctx;
    decode_shape(p, w, &B, &ctx);
    /* within the measured range: power is not extrapolated past its points */
    B = PD_MIN(PD_MAX(B, g->x[0]), g->x[g->nx - 1]);
    ctx = PD_MIN(PD_MAX(ctx, g->y[0]), g->y[g->ny - 1]);
    double v = sim_grid_eval(g, B, ctx);
    return c->idle_w + PD_MAX(v - c->idle_w, 0) * c->dyn;
}

/* The forward's time split into its prefill and decode shares. */
static void forward_parts(const sim_profile *p, const sim_work *w, double *tp, double *td) {
    *tp = *td = 0;
    if (has_linear(p)) {
        double Tp = w->prefill_tokens, B = w->decode_seqs, lin = linear_s(p, Tp + B);
        if (Tp > 0) *tp = lin * Tp / (Tp + B) + w->prefill_attn_s;
        if (B > 0) *td = lin * B / (Tp + B) + PD_MAX(decode_part(p, w) - linear_s(p, B), 0);
        return;
    }
    *tp = prefill_part_eq(p, w);
    *td = decode_part(p, w);
    if (*tp > 0 && *td > 0) {
        /* one forward does both: its fixed part (weights pass, launches) is paid once */
        double shared = PD_MIN(p->mixed_overhead_s, 0.5 * PD_MIN(*tp, *td));
        double sum = *tp + *td;
        *tp -= shared * *tp / sum;
        *td -= shared * *td / sum;
    }
}

/* Index of v in the sorted set a[0..*n), inserted if absent (at most cap). -1: full. */
static int set_index(double *a, int *n, int cap, double v) {
    for (int i = 0; i < *n; i++)
        if (fabs(a[i] - v) < 0.5) return i;
    if (*n >= cap) return -1;
    int i = (*n)++;
    while (i > 0 && a[i - 1] > v) {
        a[i] = a[i - 1];
        i--;
    }
    a[i] = v;
    return i;
}

/* The profile's mixed points as a grid of excess seconds per step (chunk start x decode
 * rows). Each point's sum-of-parts price is the model without mixed points, so
 * the grid holds exactly what the sum of parts misses. Points that do not fill a grid
 * are dropped with the whole grid (n_mix_c = 0): a partial grid would be guessed. */
static void mixed_grid_init(sim_cost *c) {
    const sim_profile *p = c->p;
    c->n_mix_c = c->n_mix_b = 0;
    if (p->n_mixed < 1) return;
    for (int k = 0; k < p->n_mixed; k++) {
        if (set_index(c->mix_c, &c->n_mix_c, 4, p->mixed[k].C) < 0 ||
            set_index(c->mix_b, &c->n_mix_b, SIM_MAX_MIXED, p->mixed[k].B) < 0) {
            c->n_mix_c = c->n_mix_b = 0;
            return;
        }
    }
    bool seen[4][SIM_MAX_MIXED] = {{false}};
    for (int k = 0; k < p->n_mixed; k++) {
        const sim_mixed_point *q = &p->mixed[k];
        sim_work w;
        sim_work_begin(&w, p);
        sim_work_add_chunk(&w, (int)q->T, (int)q->C);
        for (int b = 0; b < (int)q->B; b++) sim_work_add_decode(&w, (int)q->L);
        w.n_logits = 1 + (int)q->B;
        double tp, td;
        forward_parts(p, &w, &tp, &td);
        double modelled = tp + td + p->sample_s_per_row * w.n_logits + p->step_overhead_s;
        int i = set_index(c->mix_c, &c->n_mix_c, 4, q->C), j = set_index(c->mix_b, &c->n_mix_b, SIM_MAX_MIXED, q->B);
        c->mix_r[i][j] = q->seconds - modelled;
        seen[i][j] = true;
    }
    for (int i = 0; i < c->n_mix_c; i++)
        for (int j = 0; j < c->n_mix_b; j++)
            if (!seen[i][j]) {
                c->n_mix_c = c->n_mix_b = 0;
                return;
            }
}

/* Piecewise linear through (x[i], y[i]), flat beyond the ends. */
static double interp_flat(const double *x, const double *y, int n, double v) {
    if (n == 1 || v <= x[0]) return y[0];
    if (v >= x[n - 1]) return y[n - 1];
    int i = 1;
    while (x[i] < v) i++;
    double f = (v - x[i - 1]) / (x[i] - x[i - 1]);
    return y[i - 1] + f * (y[i] - y[i - 1]);
}

double sim_cost_mixed_excess(const sim_cost *c, double Tp, double cstart, double B) {
    if (c->n_mix_c < 1 || Tp <= 0 || B <= 0) return 0;
    double per_c[4];
    for (int i = 0; i < c->n_mix_c; i++) per_c[i] = interp_flat(c->mix_b, c->mix_r[i], c->n_mix_b, B);
    return interp_flat(c->mix_c, per_c, c->n_mix_c, cstart);
}

bool sim_step_factor_default(const sim_profile *p) { return strcmp(p->backend, "cuda") != 0; }

double sim_step_factor_prefill(const sim_step_factor *f, double tokens) {
    if (!f->measured || f->n_prefill < 1) return 1;
    return interp_flat(f->prefill_tokens, f->prefill, f->n_prefill, tokens);
}

double sim_step_factor_prefill_at(const sim_step_factor *f, double tokens, double start) {
    if (f->measured && f->n_after > 0 && start >= SIM_STEP_AFTER_START)
        return interp_flat(f->after_tokens, f->after, f->n_after, tokens);
    /* a step that starts its prompts, where the continuing ones are priced apart: its
     * own bins (the main ones mix both kinds) */
    if (f->measured && f->n_after > 0 && f->n_first > 0)
        return interp_flat(f->first_tokens, f->first, f->n_first, tokens);
    return sim_step_factor_prefill(f, tokens);
}

void sim_cost_step(const sim_cost *c, const sim_work *w, sim_step_cost *out) {
    const sim_profile *p = c->p;
    double tp, td;
    forward_parts(p, w, &tp, &td);
    if (c->n_mix_c > 0 && w->prefill_tokens > 0 && w->decode_seqs > 0) {
        /* what a mixed step costs beyond its parts: counted with the prefill part (the
         * chunk's rows carry it), never below a tenth of the parts' price */
        double T = w->prefill_tokens, cstart = w->prefill_pairs / T - (T + 1) / 2.0;
        double ex = sim_cost_mixed_excess(c, T, cstart, w->decode_seqs);
        tp = PD_MAX(tp + ex, 0.1 * tp);
    }
    tp *= c->prefill_scale;
    td *= c->decode_scale;
    if (c->steps && c->steps->measured) {
        const sim_step_factor *f = c->steps;
        if (tp > 0) {
            /* the rows-weighted mean chunk start: pairs = sum over rows of (start + i + 1) */
            double T = w->prefill_tokens, start = T > 0 ? w->prefill_pairs / T - (T + 1) / 2.0 : 0;
            tp *= sim_step_factor_prefill_at(f, T, start);
        }
        td *= f->decode;
    }
    double host = p->sample_s_per_row * w->n_logits + p->step_overhead_s;
    out->prefill_s = tp;
    out->decode_s = td;
    out->seconds = tp + td + host;
    out->energy_j = c->has_power ? tp * c->prefill_w + td * decode_watts(c, w) + host * c->idle_w : 0;
}

double sim_cost_transfer(const sim_medium *m, double bytes) {
    if (!m || bytes <= 0) return 0;
    return m->latency_s + bytes / m->bandwidth;
}

void sim_clock_fit(sim_clock_model *cm, double idle_w) {
    double f0 = cm->base_mhz;
    if (!(f0 > 0) || cm->n_points < 1) return;
    /* scale - 1 = a (f0/f - 1): least squares through the origin, a clamped to [0, 1] */
    double sp = 0, sd = 0, sr = 0;
    for (int i = 0; i < cm->n_points; i++) {
        const sim_clock_point *q = &cm->points[i];
        if (!(q->mhz > 0)) continue;
        double r = f0 / q->mhz - 1.0;
        sp += (q->prefill_scale - 1.0) * r;
        sd += (q->decode_scale - 1.0) * r;
        sr += r * r;
    }
    if (sr <= 0) return;
    cm->prefill_compute_frac = PD_MIN(PD_MAX(sp / sr, 0.0), 1.0);
    cm->decode_compute_frac = PD_MIN(PD_MAX(sd / sr, 0.0), 1.0);
    /* dynamic power ~ (f/f0)^g: log-log least squares against the base point's */
    double d0 = -1;
    for (int i = 0; i < cm->n_points; i++)
        if (fabs(cm->points[i].mhz - f0) < 0.5 && cm->points[i].busy_w > idle_w) d0 = cm->points[i].busy_w - idle_w;
    if (d0 > 0) {
        double sxy = 0, sxx = 0;
        for (int i = 0; i < cm->n_points; i++) {
            const sim_clock_point *q = &cm->points[i];
            if (!(q->busy_w > idle_w) || fabs(q->mhz - f0) < 0.5) continue;
            double x = log(q->mhz / f0), y = log((q->busy_w - idle_w) / d0);
            sxy += x * y;
            sxx += x * x;
        }
        if (sxx > 0) cm->dyn_exp = sxy / sxx;
    }
    cm->fitted = true;
    snprintf(cm->source, sizeof cm->source, "fitted to %d profiled clock points", cm->n_points);
}

/* Processor sharing: k instances of `threads` threads each want k x threads cores; with
 * fewer cores each thread runs cores / (k x threads) of the time, so each step takes
 * k x threads / cores as long (never less than alone). A measured curve replaces that
 * ideal where it has points (it also sees what the ideal does not: shared caches and
 * memory bandwidth, the hypervisor); past its last point K the excess demand is shared
 * the same way, slowdown(K) x k / K. */
double sim_contention_slowdown(const sim_contention *c, int k) {
    if (c->cores <= 0 || k <= 1) return 1.0;
    double ideal = PD_MAX(1.0, (double)k * PD_MAX(c->threads, 1) / c->cores);
    if (c->n_points < 1) return ideal;
    const double *x = c->procs, *y = c->slowdown;
    int n = c->n_points;
    if (k >= x[n - 1]) return PD_MAX(y[n - 1] * k / x[n - 1], 1.0);
    double s = y[0];
    for (int i = 1; i < n; i++) {
        if (k > x[i]) continue;
        double f = (k - x[i - 1]) / (x[i] - x[i - 1]);
        s = y[i - 1] + f * (y[i] - y[i - 1]);
        break;
    }
    return PD_MAX(s, 1.0);
}

/* A shared GPU's pairs' power (sim.h): what the device drew beyond the pricing with
 * steps of both kinds, or two of one kind, in flight. More than two instances: the pair
 * of the kinds present (measured for two; a device draws no more than its limit). */
const char *sim_host_ctas_text(int host_ctas, char *buf, size_t n) {
    if (host_ctas > 0) snprintf(buf, n, "at most %d", host_ctas);
    else snprintf(buf, n, host_ctas == 0 ? "the whole grid" : "not recorded");
    return buf;
}

double sim_gpu_share_extra_w(const sim_gpu_share *g, const int n[2]) {
    if (!g->power_measured || n[0] + n[1] < 2) return 0;
    if (n[0] > 0 && n[1] > 0)
        return (g->power_w[0][1] - g->priced_w[0][1] + g->power_w[1][0] - g->priced_w[1][0]) / 2;
    int x = n[0] > 0 ? 0 : 1;
    return g->power_w[x][x] - g->priced_w[x][x];
}

double sim_gpu_share_kind(const sim_gpu_share *g, const sim_profile *p, int x, int y, double dec_s) {
    double k = g->kinds[x][y];
    if ((x == 0 && y == 0) || g->n_lighter <= 0 || !(dec_s > 0) || p->decode.nx < 1) return k;
    /* the measured shapes by their decode step's time alone, sorted */
    double ts[1 + SIM_SHARE_LIGHTER], ks[1 + SIM_SHARE_LIGHTER];
    int n = 0;
    for (int i = -1; i < g->n_lighter && i < SIM_SHARE_LIGHTER; i++) {
        const int *sh = i < 0 ? g->shape : g->lighter_shape[i];
        double t = sim_grid_eval(&p->decode, sh[2], sh[3]);
        if (!(t > 0) || sh[2] <= 0 || sh[3] <= 0) continue;
        double v = i < 0 ? g->kinds[x][y] : g->lighter_kinds[i][x][y];
        int j = n++;
        while (j > 0 && ts[j - 1] > t) ts[j] = ts[j - 1], ks[j] = ks[j - 1], j--;
        ts[j] = t, ks[j] = v;
    }
    if (n < 2) return k;
    if (dec_s <= ts[0]) return ks[0];
    if (dec_s >= ts[n - 1]) return ks[n - 1];
    int i = 1;
    while (ts[i] < dec_s) i++;
    if (!(ts[i] > ts[i - 1])) return ks[i];
    double a = log(dec_s / ts[i - 1]) / log(ts[i] / ts[i - 1]);
    return PD_MAX(ks[i - 1] + a * (ks[i] - ks[i - 1]), 1.0);
}

/* ---- the power cap (docs/simulator.md, "Clock under a power cap") ------------------- */

/* Inserts (x, y) into the sorted arrays of n points; a point at the same x is averaged
 * with the one there (several measurements of one shape). */
static void cap_insert(double *xs, double *ys, int *n, double x, double y) {
    for (int i = 0; i < *n; i++)
        if (fabs(xs[i] - x) < 0.5) {
            ys[i] = 0.5 * (ys[i] + y);
            return;
        }
    int i = (*n)++;
    while (i > 0 && xs[i - 1] > x) {
        xs[i] = xs[i - 1];
        ys[i] = ys[i - 1];
        i--;
    }
    xs[i] = x;
    ys[i] = y;
}

void sim_power_cap_init(sim_power_cap *m, const sim_profile *p, double mhz) {
    memset(m, 0, sizeof *m);
    const sim_power_cap_data *d = &p->power.cap;
    const sim_clock_model *cm = &p->clock;
    if (!(d->limit_w > 0) || d->n_points < 1 || !(cm->base_mhz > 0)) return;
    m->limit_w = d->limit_w;
    m->idle_w = d->idle_w > 0 ? d->idle_w : p->power.measured ? p->power.idle_w : 0;
    m->window_s = d->window_s > 0 ? d->window_s : SIM_POWER_CAP_WINDOW_S;
    m->f0 = cm->base_mhz;
    m->f_nom = mhz > 0 ? mhz : m->f0;
    /* no profiled floor: a fifth of the base clock (H100 / H200 list clocks down to about 350 MHz) */
    m->f_min = PD_MIN(cm->min_mhz > 0 ? cm->min_mhz : 0.2 * m->f0, m->f_nom);
    m->g = cm->dyn_exp;
    m->a_pre = cm->prefill_compute_frac;
    m->a_dec = cm->decode_compute_frac;
    for (int i = 0; i < d->n_points; i++) {
        const sim_power_point *q = &d->points[i];
        if (!(q->rows > 0) || !(q->watts > 0)) continue;
        /* a point that ran below the base clock (the cap already held it) is taken back
         * to the base clock through the power law */
        double f = q->mhz > 0 ? q->mhz : m->f0;
        double dyn = PD_MAX(q->watts - m->idle_w, 0) * pow(m->f0 / f, m->g);
        if (q->decode) cap_insert(m->dec_rows, m->dec_dyn, &m->n_dec, q->rows, dyn);
        else cap_insert(m->pre_rows, m->pre_dyn, &m->n_pre, q->rows, dyn);
    }
    m->on = m->n_pre + m->n_dec > 0 && m->limit_w > m->idle_w;
}

/* Dynamic power (above idle, at the base clock) of a part of `rows` rows: its kind's
 * points, piecewise linear in rows, flat beyond them; a kind without points takes the
 * grid's mean power of that phase when measured (else none). */
static double cap_part_dyn(const sim_power_cap *m, const sim_profile *p, bool decode, double rows) {
    if (rows <= 0) return 0;
    int n = decode ? m->n_dec : m->n_pre;
    if (n > 0) return interp_flat(decode ? m->dec_rows : m->pre_rows, decode ? m->dec_dyn : m->pre_dyn, n, rows);
    if (!p->power.measured) return 0;
    return PD_MAX((decode ? p->power.decode_w : p->power.prefill_w) - p->power.idle_w, 0);
}

static double cap_time_scale(double a, double f0, double f) { return a * f0 / f + 1.0 - a; }

/* The step at clock f: its parts' times (from the nominal price), its mean power and
 * the average at its end. */
typedef struct cap_eval {
    double tp, td, t, watts, avg_end;
} cap_eval;

static cap_eval cap_at(const sim_power_cap *m, const sim_step_cost *nom, double dp, double dd, double avg, double f) {
    cap_eval e;
    double host = PD_MAX(nom->seconds - nom->prefill_s - nom->decode_s, 0);
    e.tp = nom->prefill_s * cap_time_scale(m->a_pre, m->f0, f) / cap_time_scale(m->a_pre, m->f0, m->f_nom);
    e.td = nom->decode_s * cap_time_scale(m->a_dec, m->f0, f) / cap_time_scale(m->a_dec, m->f0, m->f_nom);
    e.t = e.tp + e.td + host;
    double r = pow(f / m->f0, m->g);
    e.watts = e.t > 0 ? m->idle_w + r * (e.tp * dp + e.td * dd) / e.t : m->idle_w;
    e.avg_end = sim_power_cap_decay(m, avg, e.watts, e.t);
    return e;
}

double sim_power_cap_step(const sim_power_cap *m, const sim_cost *c, const sim_work *w,
                          const sim_step_cost *nominal, double avg_w, sim_step_cost *out, double *watts) {
    *out = *nominal;
    double dp = cap_part_dyn(m, c->p, false, w->prefill_tokens), dd = cap_part_dyn(m, c->p, true, w->decode_seqs);
    cap_eval e = cap_at(m, nominal, dp, dd, avg_w, m->f_nom);
    *watts = e.watts;
    if (e.avg_end <= m->limit_w) return m->f_nom;
    /* the highest clock whose step ends with the average at the limit: the average at the
     * step's end grows with the clock (more power, barely less time), so bisect */
    double lo = m->f_min, hi = m->f_nom;
    cap_eval el = cap_at(m, nominal, dp, dd, avg_w, lo);
    if (el.avg_end <= m->limit_w) {
        for (int k = 0; k < 40 && hi - lo > 0.01; k++) {
            double mid = 0.5 * (lo + hi);
            if (cap_at(m, nominal, dp, dd, avg_w, mid).avg_end <= m->limit_w) lo = mid;
            else hi = mid;
        }
        el = cap_at(m, nominal, dp, dd, avg_w, lo);
    }
    double f = lo;
    out->prefill_s = el.tp;
    out->decode_s = el.td;
    out->seconds = el.t;
    /* held at the limit, the card draws what keeps its average there: the power the cap
     * model found for this clock (its back-to-back shapes), not the grid's mean powers
     * scaled down to it, which are short bursts' and sit below the limit (on 2x H200,
     * steady-quick at 16 req/s: J/token -9 to -13% against the runs that way, -5 to -6%
     * this way; docs/simulator.md, "Clock under a power cap") */
    if (c->has_power) out->energy_j = el.watts * el.t;
    *watts = el.watts;
    return f;
}

double sim_power_cap_decay(const sim_power_cap *m, double avg_w, double watts, double dt) {
    if (!(dt > 0)) return avg_w;
    return watts + (avg_w - watts) * exp(-dt / m->window_s);
}
