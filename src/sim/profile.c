/* profile.c: the simulator's cost profile as data: grids and their interpolation, the
 * JSON file format (docs/simulator.md), KV medium curves with their published
 * defaults, and a roofline profile for hardware that is not at hand. Nothing here
 * measures; profiler.c does. Tuned for: profiles of a few hundred points, read once. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sim/sim.h"
#include "util/util.h"

#define PROFILE_FORMAT "pdserve-profile/1"

/* ---- grids ----------------------------------------------------------------------------- */

void sim_grid_init(sim_grid *g, int nx, const double *x, int ny, const double *y) {
    PD_ASSERT(nx > 0 && ny > 0);
    g->nx = nx;
    g->ny = ny;
    g->x = xmalloc(sizeof(double) * (size_t)nx);
    g->y = xmalloc(sizeof(double) * (size_t)ny);
    g->v = xcalloc((size_t)nx * (size_t)ny, sizeof(double));
    memcpy(g->x, x, sizeof(double) * (size_t)nx);
    memcpy(g->y, y, sizeof(double) * (size_t)ny);
}

void sim_grid_free(sim_grid *g) {
    if (!g) return;
    free(g->x);
    free(g->y);
    free(g->v);
    memset(g, 0, sizeof *g);
}

/* The segment [a[i], a[i+1]] to interpolate x in (the edge segment beyond the ends)
 * and x's weight towards a[i+1] (< 0 or > 1 when extrapolating). */
static int axis_locate(const double *a, int n, double x, double *w) {
    if (n == 1) {
        *w = 0;
        return 0;
    }
    int lo = 0, hi = n - 2;
    while (lo < hi) { /* last i with a[i] <= x, within [0, n-2] */
        int mid = (lo + hi + 1) / 2;
        if (a[mid] <= x) lo = mid;
        else hi = mid - 1;
    }
    *w = (x - a[lo]) / (a[lo + 1] - a[lo]);
    return lo;
}

double sim_grid_eval(const sim_grid *g, double x, double y) {
    PD_ASSERT(g->nx > 0 && g->ny > 0);
    double wx, wy;
    int i = axis_locate(g->x, g->nx, x, &wx);
    int j = axis_locate(g->y, g->ny, y, &wy);
    int i1 = g->nx > 1 ? i + 1 : i, j1 = g->ny > 1 ? j + 1 : j;
    double v00 = g->v[i * g->ny + j], v01 = g->v[i * g->ny + j1];
    double v10 = g->v[i1 * g->ny + j], v11 = g->v[i1 * g->ny + j1];
    double a = v00 + wy * (v01 - v00), b = v10 + wy * (v11 - v10);
    return a + wx * (b - a);
}

/* ---- profile life cycle ------------------------------------------------------------------ */

void sim_profile_init(sim_profile *p) {
    memset(p, 0, sizeof *p);
    p->block_size = 16;
    p->repeats = 1;
    snprintf(p->power.source, sizeof p->power.source, "not measured");
    sim_clock_model *c = &p->clock;
    /* defaults: see docs/simulator.md, "Clock model", for where each comes from */
    c->prefill_compute_frac = 0.85;
    c->decode_compute_frac = 0.25;
    c->dyn_exp = 1.8;
    snprintf(c->source, sizeof c->source,
             "defaults (docs/simulator.md: compute-bound prefill ~1/f, memory-bound decode "
             "nearly flat; dynamic power ~f^1.8 with voltage)");
}

void sim_profile_free(sim_profile *p) {
    if (!p) return;
    sim_grid_free(&p->prefill);
    sim_grid_free(&p->decode);
    sim_grid_free(&p->linear);
    sim_grid_free(&p->power.decode_grid);
    sim_grid_free(&p->power.decode_grid_measured);
}

/* ---- mediums -------------------------------------------------------------------------- */

typedef struct medium_default {
    const char *name;
    double latency_s, bandwidth;
    const char *source;
    double layer_latency_s; /* 0: latency_s */
} medium_default;

/* Effective (not nominal) figures; where each comes from is in docs/simulator.md. */
static const medium_default MEDIUM_DEFAULTS[] = {
    {"gpu", 9e-6, 396e9, "peer copy over NVLink, 396 GB/s for 1 GiB, 9 us per copy (shared/GPU.md, H200 NV18)", 0},
    {"gpu-pcie3", 30e-6, 10e9, "peer copy over PCIe Gen3 x16, ~10 GB/s of 15.75 nominal (the paper's 2x A100 node)", 0},
    {"nvlink", 9e-6, 396e9, "as gpu: NVLink peer copy (shared/GPU.md)", 0},
    {"nccl", 0.6e-3, 340e9, "pdserve's nccl medium, two lanes, 2x H200 NV18: whole requests of 1 GiB and 1.75 GiB "
                             "right after a prefill pass in 3.8 and 6.1 ms (docs/results/kv-cuda.md, 2026-11-29; "
                             "NCCL's own send/recv: 362-371 GB/s); layer-wise, a group after the request's first "
                             "queues in 20-35 us (its trace)", 35e-6},
    {"cpu", 20e-6, 27e9, "through pinned host memory: device-to-host then host-to-device at 54-55 GB/s each, in series "
                         "(shared/GPU.md)", 0},
    {"disk", 100e-6, 0.6e9, "O_DIRECT write 1.3 GB/s then read 1.1 GB/s in series (shared/GPU.md)", 0},
    {"tcp", 100e-6, 1.1e9, "10 GbE TCP, ~1.1 GB/s of payload (assumed link; loopback on one host is faster)", 0},
    {"rdma", 20e-6, 142e9, "Mooncake's 142 GB/s peak KV transfer over RDMA (shared/PAPER.md)", 0},
};

int sim_medium_default(const char *name, sim_medium *out) {
    for (size_t i = 0; i < PD_ARRAY_LEN(MEDIUM_DEFAULTS); i++) {
        const medium_default *d = &MEDIUM_DEFAULTS[i];
        if (strcmp(d->name, name) != 0) continue;
        memset(out, 0, sizeof *out);
        snprintf(out->name, sizeof out->name, "%s", d->name);
        out->latency_s = d->latency_s;
        out->bandwidth = d->bandwidth;
        out->layer_latency_s = d->layer_latency_s;
        snprintf(out->source, sizeof out->source, "default: %s", d->source);
        return 0;
    }
    return -1;
}

const sim_medium *sim_medium_find(const sim_profile *p, const char *name, sim_medium *out) {
    for (int i = 0; p && i < p->n_mediums; i++)
        if (!strcmp(p->mediums[i].name, name)) return &p->mediums[i];
    return sim_medium_default(name, out) == 0 ? out : NULL;
}

/* The line seconds = latency + bytes / bandwidth through the measured points, by
 * least squares on relative errors (each point weighted 1 / seconds^2), so that a
 * request of the smallest sizes is priced within its own point's error, not within the
 * largest point's (an unweighted fit let one noisy large point set a latency of 14 ms
 * under a 2.5 ms smallest point); the latency kept within [0, the smallest point's
 * time]. */
void sim_medium_fit(sim_medium *m) {
    int n = m->n_points;
    if (n < 2) return;
    double sw = 0, sx = 0, sy = 0, sxx = 0, sxy = 0, ymin = 0;
    for (int i = 0; i < n; i++) {
        double x = m->bytes[i], y = m->seconds[i];
        if (!(y > 0) || !(x > 0)) return;
        double w = 1.0 / (y * y);
        sw += w, sx += w * x, sy += w * y, sxx += w * x * x, sxy += w * x * y;
        if (i == 0 || y < ymin) ymin = y;
    }
    double den = sw * sxx - sx * sx;
    if (den <= 0) return;
    double slope = (sw * sxy - sx * sy) / den, icpt = (sy - slope * sx) / sw;
    if (icpt < 0 || icpt > ymin) { /* the latency at its bound, the slope refitted through it */
        icpt = icpt < 0 ? 0 : ymin;
        slope = sxx > 0 ? (sxy - icpt * sx) / sxx : 0;
    }
    if (!(slope > 0)) return;
    m->bandwidth = 1.0 / slope;
    m->latency_s = icpt;
}

/* The fit, then a sustained train's record applied (profile_medium.c): the busy time at
 * the train's size scaled to its median, the put share its own. */
void sim_medium_refit(sim_medium *m) {
    sim_medium_fit(m);
    if (m->train_n <= 0 || !(m->train_s > 0) || m->n_points < 1) return;
    double big = m->bytes[m->n_points - 1], busy = big / m->bandwidth;
    m->train_scale = busy > 0 && m->train_s > m->latency_s ? (m->train_s - m->latency_s) / busy : 1;
    m->bandwidth /= m->train_scale;
    if (m->train_put_s > 0 && m->train_put_s < m->train_s) m->put_share = m->train_put_s / m->train_s;
}

static int cmp_dbl_asc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double sim_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_dbl_asc);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Theil-Sen: the median of the pairwise slopes, then the median of the intercepts at that
 * slope, both at least 0. One disturbed point of several (a request that met a burst of
 * load elsewhere: 16 ms among 0.1-0.3 ms points has happened) moves a least-squares line
 * by its full weight and this one hardly; exact on points on a line, and on two points
 * the line through them. */
void sim_serving_fit(sim_serving_path *s) {
    int n = s->n_points;
    if (n < 1) return;
    double slopes[SIM_MAX_POINTS * (SIM_MAX_POINTS - 1) / 2], icpt[SIM_MAX_POINTS];
    int k = 0;
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (s->tokens[j] != s->tokens[i])
                slopes[k++] = (s->seconds[j] - s->seconds[i]) / (s->tokens[j] - s->tokens[i]);
    s->s_per_token = k > 0 ? PD_MAX(sim_median(slopes, k), 0) : 0;
    for (int i = 0; i < n; i++) icpt[i] = s->seconds[i] - s->s_per_token * s->tokens[i];
    s->fixed_s = PD_MAX(sim_median(icpt, n), 0);
    s->measured = true;
}

/* Least squares of cpu = x . (requests, tokens, steps) over the points with the
 * coefficients restricted to subset `mask` (the others 0); the residual sum of squares,
 * or -1 when the system is singular or a coefficient comes out negative. */
static double cpu_fit_subset(const sim_serving_cpu *c, unsigned mask, double x[3]) {
    int idx[3], k = 0;
    for (int j = 0; j < 3; j++)
        if (mask & (1u << j)) idx[k++] = j;
    double A[3][4] = {{0}};
    for (int i = 0; i < c->n_points; i++) /* normal equations, augmented */
        for (int a = 0; a < k; a++) {
            for (int b = 0; b < k; b++) A[a][b] += c->points[i][idx[a]] * c->points[i][idx[b]];
            A[a][k] += c->points[i][idx[a]] * c->points[i][3];
        }
    for (int col = 0; col < k; col++) { /* Gauss-Jordan with partial pivoting */
        int piv = col;
        for (int r = col + 1; r < k; r++)
            if (fabs(A[r][col]) > fabs(A[piv][col])) piv = r;
        if (fabs(A[piv][col]) < 1e-12) return -1;
        for (int j = 0; j <= k; j++) {
            double t = A[col][j];
            A[col][j] = A[piv][j];
            A[piv][j] = t;
        }
        for (int r = 0; r < k; r++) {
            if (r == col) continue;
            double f = A[r][col] / A[col][col];
            for (int j = col; j <= k; j++) A[r][j] -= f * A[col][j];
        }
    }
    x[0] = x[1] = x[2] = 0;
    for (int a = 0; a < k; a++) {
        x[idx[a]] = A[a][k] / A[a][a];
        if (x[idx[a]] < 0) return -1;
    }
    double rss = 0;
    for (int i = 0; i < c->n_points; i++) {
        double e = c->points[i][3] - (x[0] * c->points[i][0] + x[1] * c->points[i][1] + x[2] * c->points[i][2]);
        rss += e * e;
    }
    return rss;
}

void sim_serving_cpu_fit(sim_serving_cpu *c) {
    /* non-negative least squares by trying every subset of the three terms (there are
     * only seven): the feasible fit of least residual */
    double best = -1, bx[3] = {0, 0, 0};
    for (unsigned mask = 1; mask < 8; mask++) {
        double x[3], r = cpu_fit_subset(c, mask, x);
        if (r >= 0 && (best < 0 || r < best * (1 - 1e-9))) {
            best = r;
            memcpy(bx, x, sizeof bx);
        }
    }
    c->request_s = bx[0];
    c->token_s = bx[1];
    c->step_s = bx[2];
    c->measured = c->n_points > 0;
}

double sim_serving_s(const sim_serving_path *s, int n_prompt) {
    if (!s->measured) return 0;
    return PD_MAX(s->fixed_s + s->s_per_token * (double)n_prompt, 0);
}

/* ---- roofline profile ------------------------------------------------------------------- */

void sim_roofline_h100(sim_roofline *r) {
    /* NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3, 700 W TDP,
     * 1980 MHz max SM clock. mfu/mbu: typical of vLLM-class kernels (ML.ENERGY and
     * vendor reports put large-GEMM efficiency at 50-70%, decode HBM use at 60-80%).
     * Idle ~75 W (NVML reading of an idle SXM card; varies 60-120 W with the board). */
    memset(r, 0, sizeof *r);
    r->name = "H100-SXM (roofline)";
    r->peak_flops = 989e12;
    r->mem_bw = 3.35e12;
    r->mfu = 0.6;
    r->mbu = 0.7;
    r->step_overhead_s = 4e-3;
    r->idle_w = 75;
    r->prefill_w = 650;
    r->decode_w = 420;
    r->base_mhz = 1980;
    r->max_mhz = 1980;
    r->min_mhz = 345;
    r->kv_cache_tokens = 0;
}

/* Roofline seconds of one forward over T rows with `pairs` attention pairs and n_logits
 * logits rows, for config c with 2-byte weights and KV. */
static double roofline_step(const model_config *c, const sim_roofline *r, double T, double pairs,
                            double ctx_read, double n_logits) {
    double L = c->n_layers, C = c->dim, F = c->ffn_dim;
    double H = c->n_heads, K = c->n_kv_heads, D = c->head_dim, V = c->vocab_size;
    double layer_params = C * (H + 2 * K) * D + H * D * C + 3.0 * C * F;
    double flops = 2.0 * T * L * layer_params + 4.0 * pairs * L * H * D + 2.0 * n_logits * C * V;
    double bytes = 2.0 * (L * layer_params + V * C) + 2.0 * ctx_read * L * 2.0 * K * D +
                   2.0 * T * L * 2.0 * K * D;
    double t = fmax(flops / (r->peak_flops * r->mfu), bytes / (r->mem_bw * r->mbu));
    return t + r->step_overhead_s;
}

void sim_profile_roofline(const model_config *c, const sim_roofline *r, sim_profile *out) {
    sim_profile_init(out);
    snprintf(out->model, sizeof out->model, "%s-like (L%d C%d)", c->model_type, c->n_layers, c->dim);
    snprintf(out->device, sizeof out->device, "%s", r->name);
    snprintf(out->backend, sizeof out->backend, "roofline");
    snprintf(out->host, sizeof out->host, "none");
    snprintf(out->date, sizeof out->date, "computed");
    out->kv_bytes_per_token = model_kv_bytes_per_token(c, 2);
    out->n_layers = c->n_layers;
    out->kv_cache_tokens = r->kv_cache_tokens;
    static const double pt[] = {16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384};
    static const double pc[] = {0, 1024, 4096, 16384, 65536};
    static const double db[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
    static const double dc[] = {128, 512, 2048, 8192, 32768};
    sim_grid_init(&out->prefill, PD_ARRAY_LEN(pt), pt, PD_ARRAY_LEN(pc), pc);
    sim_grid_init(&out->decode, PD_ARRAY_LEN(db), db, PD_ARRAY_LEN(dc), dc);
    for (int i = 0; i < out->prefill.nx; i++)
        for (int j = 0; j < out->prefill.ny; j++) {
            double T = pt[i], C0 = pc[j];
            out->prefill.v[i * out->prefill.ny + j] =
                roofline_step(c, r, T, T * (C0 + (T + 1) / 2), C0 + T, 1);
        }
    for (int i = 0; i < out->decode.nx; i++)
        for (int j = 0; j < out->decode.ny; j++) {
            double B = db[i], L = dc[j];
            out->decode.v[i * out->decode.ny + j] = roofline_step(c, r, B, B * L, B * L, B);
        }
    static const double one = 1;
    double lx[32];
    int nl = 0;
    for (double t = 1; t <= 16384 * 2; t *= 2) lx[nl++] = t;
    sim_grid_init(&out->linear, nl, lx, 1, &one);
    for (int i = 0; i < nl; i++) out->linear.v[i] = roofline_step(c, r, lx[i], lx[i], lx[i], 1);
    out->mixed_overhead_s = r->step_overhead_s;
    out->power.measured = true;
    out->power.idle_w = r->idle_w;
    out->power.prefill_w = r->prefill_w;
    out->power.decode_w = r->decode_w;
    snprintf(out->power.source, sizeof out->power.source,
             "roofline defaults for %s (docs/simulator.md)", r->name);
    out->clock.base_mhz = r->base_mhz;
    out->clock.max_mhz = r->max_mhz;
    out->clock.min_mhz = r->min_mhz;
    snprintf(out->mediums_note, sizeof out->mediums_note, "roofline profile: mediums use defaults");
}

/* ---- JSON -------------------------------------------------------------------------------- */

static cJSON *nums(const double *v, int n) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}

/* [[x0, y0], [x1, y1], ...] of n points, added to o as `name`. */
static void add_pairs(cJSON *o, const char *name, const double *x, const double *y, int n) {
    cJSON *a = cJSON_AddArrayToObject(o, name);
    for (int i = 0; i < n; i++) {
        double pair[2] = {x[i], y[i]};
        cJSON_AddItemToArray(a, nums(pair, 2));
    }
}

static cJSON *grid_json(const sim_grid *g, const char *xname, const char *yname) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, xname, nums(g->x, g->nx));
    cJSON_AddItemToObject(o, yname, nums(g->y, g->ny));
    cJSON *rows = cJSON_CreateArray();
    for (int i = 0; i < g->nx; i++) cJSON_AddItemToArray(rows, nums(g->v + (size_t)i * g->ny, g->ny));
    cJSON_AddItemToObject(o, "seconds", rows);
    return o;
}

/* "power": {..., "cap": {limit_w, idle_w, window_s, window_source, source, points:
 * [{kind, rows, context, watts, mhz, first_mhz, seconds, onset_s, reasons}...]}}: the
 * power-cap model's inputs (docs/simulator.md, "Clock under a power cap"). */
static void write_power_cap(cJSON *pw, const sim_power_cap_data *d) {
    cJSON *o = cJSON_AddObjectToObject(pw, "cap");
    cJSON_AddNumberToObject(o, "limit_w", d->limit_w);
    cJSON_AddNumberToObject(o, "idle_w", d->idle_w);
    if (d->window_s > 0) cJSON_AddNumberToObject(o, "window_s", d->window_s);
    if (d->window_source[0]) cJSON_AddStringToObject(o, "window_source", d->window_source);
    cJSON_AddStringToObject(o, "source", d->source);
    cJSON *a = cJSON_AddArrayToObject(o, "points");
    for (int i = 0; i < d->n_points; i++) {
        const sim_power_point *q = &d->points[i];
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "kind", q->decode ? "decode" : "prefill");
        cJSON_AddNumberToObject(e, "rows", q->rows);
        cJSON_AddNumberToObject(e, "context", q->context);
        cJSON_AddNumberToObject(e, "watts", q->watts);
        cJSON_AddNumberToObject(e, "mhz", q->mhz);
        cJSON_AddNumberToObject(e, "first_mhz", q->first_mhz);
        cJSON_AddNumberToObject(e, "seconds", q->seconds);
        if (q->onset_s >= 0) cJSON_AddNumberToObject(e, "onset_s", q->onset_s);
        else cJSON_AddNullToObject(e, "onset_s");
        cJSON_AddStringToObject(e, "reasons", q->reasons);
        cJSON_AddItemToArray(a, e);
    }
}

char *sim_profile_to_json(const sim_profile *p) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "format", PROFILE_FORMAT);
    cJSON_AddStringToObject(o, "model", p->model);
    cJSON_AddStringToObject(o, "device", p->device);
    cJSON_AddStringToObject(o, "backend", p->backend);
    cJSON_AddStringToObject(o, "host", p->host);
    cJSON_AddStringToObject(o, "date", p->date);
    cJSON_AddNumberToObject(o, "block_size", p->block_size);
    cJSON_AddNumberToObject(o, "kv_bytes_per_token", (double)p->kv_bytes_per_token);
    if (p->n_layers > 0) cJSON_AddNumberToObject(o, "n_layers", p->n_layers);
    cJSON_AddNumberToObject(o, "kv_cache_tokens", (double)p->kv_cache_tokens);
    cJSON_AddNumberToObject(o, "repeats", p->repeats);
    cJSON_AddItemToObject(o, "prefill", grid_json(&p->prefill, "tokens", "context"));
    cJSON_AddItemToObject(o, "decode", grid_json(&p->decode, "batch", "context"));
    if (p->linear.nx > 0) {
        cJSON *lo = cJSON_AddObjectToObject(o, "linear");
        cJSON_AddItemToObject(lo, "tokens", nums(p->linear.x, p->linear.nx));
        cJSON_AddItemToObject(lo, "seconds", nums(p->linear.v, p->linear.nx));
    }
    cJSON_AddNumberToObject(o, "mixed_overhead_s", p->mixed_overhead_s);
    cJSON *e = cJSON_AddObjectToObject(o, "engine");
    cJSON_AddNumberToObject(e, "sample_s_per_row", p->sample_s_per_row);
    cJSON_AddNumberToObject(e, "step_overhead_s", p->step_overhead_s);
    cJSON_AddBoolToObject(e, "decode_buckets", p->decode_buckets);
    cJSON *ms = cJSON_AddArrayToObject(o, "mediums");
    for (int i = 0; i < p->n_mediums; i++) {
        const sim_medium *m = &p->mediums[i];
        cJSON *mo = cJSON_CreateObject();
        cJSON_AddStringToObject(mo, "name", m->name);
        cJSON_AddNumberToObject(mo, "latency_s", m->latency_s);
        if (m->layer_latency_s > 0) cJSON_AddNumberToObject(mo, "layer_latency_s", m->layer_latency_s);
        cJSON_AddNumberToObject(mo, "bandwidth_bytes_per_s", m->bandwidth);
        cJSON_AddNumberToObject(mo, "power_w", m->power_w);
        if (m->control_s > 0) cJSON_AddNumberToObject(mo, "control_s", m->control_s);
        if (m->put_share > 0) cJSON_AddNumberToObject(mo, "put_share", m->put_share);
        if (m->put_overlap > 0) cJSON_AddNumberToObject(mo, "put_overlap", m->put_overlap);
        if (m->get_overlap > 0) cJSON_AddNumberToObject(mo, "get_overlap", m->get_overlap);
        if (m->get_pair > 0) cJSON_AddNumberToObject(mo, "get_pair", m->get_pair);
        if (m->overlap_by[0]) cJSON_AddStringToObject(mo, "overlap_by", m->overlap_by);
        if (m->between[0]) cJSON_AddStringToObject(mo, "between", m->between);
        if (m->pipe_n > 0) {
            cJSON_AddNumberToObject(mo, "put_overlap_pipelined", m->put_overlap_pipe);
            cJSON_AddNumberToObject(mo, "get_overlap_pipelined", m->get_overlap_pipe);
            cJSON_AddNumberToObject(mo, "pipelined_transfers", m->pipe_n);
        }
        if (m->train_n > 0) {
            cJSON *t = cJSON_AddObjectToObject(mo, "sustained");
            cJSON_AddNumberToObject(t, "transfers", m->train_n);
            cJSON_AddNumberToObject(t, "tokens", m->train_tokens);
            cJSON_AddNumberToObject(t, "median_s", m->train_s);
            cJSON_AddNumberToObject(t, "median_put_s", m->train_put_s);
            cJSON_AddNumberToObject(t, "first_s", m->train_first_s);
            cJSON_AddNumberToObject(t, "last_s", m->train_last_s);
            cJSON_AddNumberToObject(t, "busy_scale", m->train_scale);
        }
        add_pairs(mo, "points", m->bytes, m->seconds, m->n_points);
        cJSON_AddStringToObject(mo, "source", m->source);
        cJSON_AddItemToArray(ms, mo);
    }
    cJSON_AddStringToObject(o, "mediums_note", p->mediums_note);
    cJSON *pw = cJSON_AddObjectToObject(o, "power");
    cJSON_AddBoolToObject(pw, "measured", p->power.measured);
    if (p->power.measured) {
        cJSON_AddNumberToObject(pw, "idle_w", p->power.idle_w);
        cJSON_AddNumberToObject(pw, "prefill_w", p->power.prefill_w);
        cJSON_AddNumberToObject(pw, "decode_w", p->power.decode_w);
        const sim_grid *g = &p->power.decode_grid, *gm = &p->power.decode_grid_measured;
        if (g->nx > 0) {
            cJSON *rows = cJSON_AddArrayToObject(pw, "decode_watts");
            for (int i = 0; i < g->nx; i++) cJSON_AddItemToArray(rows, nums(g->v + (size_t)i * g->ny, g->ny));
        }
        if (g->nx > 0 && gm->nx == g->nx && gm->ny == g->ny) {
            cJSON *rows = cJSON_AddArrayToObject(pw, "decode_watts_measured");
            for (int i = 0; i < gm->nx; i++) cJSON_AddItemToArray(rows, nums(gm->v + (size_t)i * gm->ny, gm->ny));
            cJSON *fo = cJSON_AddObjectToObject(pw, "decode_watts_fit");
            cJSON_AddNumberToObject(fo, "base_w", p->power.fit_base_w);
            cJSON_AddNumberToObject(fo, "w_per_tb_s", p->power.fit_w_per_tbps);
            cJSON_AddNumberToObject(fo, "rms_w", p->power.fit_rms_w);
            cJSON_AddNumberToObject(fo, "weight_bytes", p->power.fit_weight_bytes);
        }
    }
    cJSON_AddStringToObject(pw, "source", p->power.source);
    if (p->power.cap.limit_w > 0 || p->power.cap.n_points > 0 || p->power.cap.source[0]) write_power_cap(pw, &p->power.cap);
    const sim_clock_model *c = &p->clock;
    cJSON *co = cJSON_AddObjectToObject(o, "clock");
    cJSON_AddNumberToObject(co, "base_mhz", c->base_mhz);
    cJSON_AddNumberToObject(co, "min_mhz", c->min_mhz);
    cJSON_AddNumberToObject(co, "max_mhz", c->max_mhz);
    cJSON_AddNumberToObject(co, "prefill_compute_fraction", c->prefill_compute_frac);
    cJSON_AddNumberToObject(co, "decode_compute_fraction", c->decode_compute_frac);
    cJSON_AddNumberToObject(co, "dynamic_power_exponent", c->dyn_exp);
    cJSON_AddBoolToObject(co, "fitted", c->fitted);
    cJSON_AddStringToObject(co, "source", c->source);
    cJSON *cp = cJSON_AddArrayToObject(co, "points");
    for (int i = 0; i < c->n_points; i++) {
        cJSON *q = cJSON_CreateObject();
        cJSON_AddNumberToObject(q, "mhz", c->points[i].mhz);
        cJSON_AddNumberToObject(q, "prefill_scale", c->points[i].prefill_scale);
        cJSON_AddNumberToObject(q, "decode_scale", c->points[i].decode_scale);
        cJSON_AddNumberToObject(q, "busy_w", c->points[i].busy_w);
        cJSON_AddItemToArray(cp, q);
    }
    const sim_contention *ct = &p->contention;
    if (ct->cores > 0) {
        cJSON *cto = cJSON_AddObjectToObject(o, "contention");
        cJSON_AddNumberToObject(cto, "cores", ct->cores);
        cJSON_AddNumberToObject(cto, "threads", ct->threads);
        add_pairs(cto, "points", ct->procs, ct->slowdown, ct->n_points);
        if (ct->kinds_measured) {
            cJSON *ko = cJSON_AddArrayToObject(cto, "kinds");
            for (int x = 0; x < 2; x++) cJSON_AddItemToArray(ko, nums(ct->kinds[x], 2));
        }
        cJSON_AddStringToObject(cto, "source", ct->source);
    }
    const sim_gpu_share *gs = &p->gpu_share;
    if (gs->measured) {
        cJSON *go = cJSON_AddObjectToObject(o, "gpu_share");
        cJSON *ko = cJSON_AddArrayToObject(go, "kinds");
        for (int x = 0; x < 2; x++) cJSON_AddItemToArray(ko, nums(gs->kinds[x], 2));
        cJSON_AddItemToObject(go, "shape", cJSON_CreateIntArray(gs->shape, 4));
        if (gs->copies_measured) {
            cJSON *co = cJSON_AddArrayToObject(go, "copies");
            for (int d = 0; d < 2; d++) cJSON_AddItemToArray(co, nums(gs->copies[d], 2));
            cJSON *bo = cJSON_AddArrayToObject(go, "beside_copy");
            for (int x = 0; x < 2; x++) cJSON_AddItemToArray(bo, nums(gs->beside_copy[x], 2));
            cJSON_AddNumberToObject(go, "copy_bytes", gs->copy_bytes);
        }
        if (gs->own_measured) {
            cJSON *so = cJSON_AddArrayToObject(go, "own_steps"), *oc = cJSON_AddArrayToObject(go, "own_copies");
            for (int x = 0; x < 2; x++) {
                cJSON_AddItemToArray(so, nums(gs->own_steps[x], 2));
                cJSON_AddItemToArray(oc, nums(gs->own_copies[x], 2));
            }
            if (gs->own_host_ctas >= 0) cJSON_AddNumberToObject(go, "own_host_ctas", gs->own_host_ctas);
        }
        if (gs->power_measured) {
            cJSON *po = cJSON_AddArrayToObject(go, "power_w"), *qo = cJSON_AddArrayToObject(go, "priced_w");
            for (int x = 0; x < 2; x++) {
                cJSON_AddItemToArray(po, nums(gs->power_w[x], 2));
                cJSON_AddItemToArray(qo, nums(gs->priced_w[x], 2));
            }
        }
        if (gs->n_lighter > 0) {
            cJSON *lo = cJSON_AddArrayToObject(go, "lighter");
            for (int i = 0; i < gs->n_lighter; i++) {
                cJSON *e = cJSON_CreateObject();
                cJSON_AddItemToObject(e, "shape", cJSON_CreateIntArray(gs->lighter_shape[i], 4));
                cJSON *ke = cJSON_AddArrayToObject(e, "kinds");
                for (int x = 0; x < 2; x++) cJSON_AddItemToArray(ke, nums(gs->lighter_kinds[i][x], 2));
                cJSON_AddItemToArray(lo, e);
            }
        }
        cJSON_AddStringToObject(go, "source", gs->source);
    }
    const sim_serving *sv = &p->serving;
    if (sv->colocated.measured || sv->router.measured || sv->disaggregated.measured ||
        sv->colocated.steps.measured || sv->disaggregated.steps.measured) {
        cJSON *so = cJSON_AddObjectToObject(o, "serving");
        const struct { const char *name; const sim_serving_path *s; } paths[] = {
            {"colocated", &sv->colocated}, {"router", &sv->router}, {"disaggregated", &sv->disaggregated}};
        for (size_t i = 0; i < PD_ARRAY_LEN(paths); i++) {
            const sim_serving_path *sp = paths[i].s;
            if (!sp->measured && !sp->steps.measured) continue;
            cJSON *po = cJSON_AddObjectToObject(so, paths[i].name);
            if (sp->measured) { /* else steps alone (calibrated from traces, sim --write-profile) */
                cJSON_AddNumberToObject(po, "fixed_s", sp->fixed_s);
                cJSON_AddNumberToObject(po, "s_per_token", sp->s_per_token);
                add_pairs(po, "points", sp->tokens, sp->seconds, sp->n_points);
            }
            const sim_serving_cpu *cu = &sp->cpu;
            if (cu->measured) {
                cJSON *co = cJSON_AddObjectToObject(po, "cpu");
                cJSON_AddNumberToObject(co, "request_s", cu->request_s);
                cJSON_AddNumberToObject(co, "token_s", cu->token_s);
                cJSON_AddNumberToObject(co, "step_s", cu->step_s);
                cJSON *cp = cJSON_AddArrayToObject(co, "points");
                for (int k = 0; k < cu->n_points; k++) cJSON_AddItemToArray(cp, nums(cu->points[k], 4));
            }
            const sim_step_factor *sf = &sp->steps;
            if (sf->measured) {
                cJSON *fo = cJSON_AddObjectToObject(po, "steps");
                add_pairs(fo, "prefill", sf->prefill_tokens, sf->prefill, sf->n_prefill);
                if (sf->n_after > 0) add_pairs(fo, "prefill_after", sf->after_tokens, sf->after, sf->n_after);
                if (sf->n_first > 0) add_pairs(fo, "prefill_first", sf->first_tokens, sf->first, sf->n_first);
                cJSON_AddNumberToObject(fo, "decode", sf->decode);
            }
        }
        cJSON_AddStringToObject(so, "source", sv->source);
    }
    if (p->n_mixed > 0) {
        cJSON *mo = cJSON_AddObjectToObject(o, "mixed");
        cJSON *pts = cJSON_AddArrayToObject(mo, "points");
        for (int k = 0; k < p->n_mixed; k++) {
            const sim_mixed_point *q = &p->mixed[k];
            double v[5] = {q->T, q->C, q->B, q->L, q->seconds};
            cJSON_AddItemToArray(pts, nums(v, 5));
        }
        cJSON_AddStringToObject(mo, "source", p->mixed_source);
    }
    if (p->tiers.measured) {
        const sim_tier_costs *t = &p->tiers;
        cJSON *to = cJSON_AddObjectToObject(o, "tiers");
        double st[2] = {t->stage_fixed_s, t->stage_s_per_block};
        cJSON_AddItemToObject(to, "stage_s", nums(st, 2));
        cJSON_AddItemToObject(to, "write_s_per_block", nums(t->write_s_per_block, 2));
        cJSON_AddItemToObject(to, "get_s_per_block", nums(t->get_s_per_block, 2));
        double ld[2] = {t->load_fixed_s[0], t->load_s_per_block[0]}, lh[2] = {t->load_fixed_s[1], t->load_s_per_block[1]};
        cJSON_AddItemToObject(to, "load_direct_s", nums(ld, 2));
        cJSON_AddItemToObject(to, "load_host_s", nums(lh, 2));
        cJSON_AddStringToObject(to, "source", t->source);
    }
    char *s = cJSON_Print(o);
    cJSON_Delete(o);
    char *out = xstrdup(s);
    cJSON_free(s);
    return out;
}

int sim_profile_save(const sim_profile *p, const char *path, char *err, size_t errlen) {
    char *s = sim_profile_to_json(p);
    size_t n = strlen(s);
    s = xrealloc(s, n + 2);
    s[n] = '\n';
    s[n + 1] = 0;
    int rc = util_write_file(path, s, n + 1, err, errlen);
    free(s);
    return rc;
}

/* ---- parsing ---------------------------------------------------------------------------- */

static void get_str(const cJSON *o, const char *key, char *dst, size_t cap) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsString(v)) snprintf(dst, cap, "%s", v->valuestring);
}

static double get_num(const cJSON *o, const char *key, double dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

/* A whole number from lo to hi at key (absent: dflt) into *out; -1 with the field named. */
static int get_whole(const cJSON *o, const char *key, double dflt, double lo, double hi, double *out,
                     const char *name, char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    double x = v ? (cJSON_IsNumber(v) ? v->valuedouble : NAN) : dflt;
    if (!(x >= lo && x <= hi) || x != floor(x)) {
        pd_errorf(err, errlen, "%s: %s must be a whole number from %.0f to %.0f", name, key, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

/* Reads a strictly increasing number array of 1..4096 entries into *out (malloc'd). */
static int read_axis(const cJSON *a, double **out, int *n, const char *what, const char *name, char *err,
                     size_t errlen) {
    int k = cJSON_IsArray(a) ? cJSON_GetArraySize(a) : 0;
    if (k < 1 || k > 4096) {
        pd_errorf(err, errlen, "%s: %s must be an array of 1 to 4096 numbers", name, what);
        return -1;
    }
    double *v = xmalloc(sizeof(double) * (size_t)k);
    for (int i = 0; i < k; i++) {
        const cJSON *x = cJSON_GetArrayItem(a, i);
        if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble) || (i && x->valuedouble <= v[i - 1])) {
            pd_errorf(err, errlen, "%s: %s[%d] must be a number larger than the one before", name, what, i);
            free(v);
            return -1;
        }
        v[i] = x->valuedouble;
    }
    *out = v;
    *n = k;
    return 0;
}

static int read_grid(const cJSON *o, const char *key, const char *xname, const char *yname, sim_grid *g,
                     const char *name, char *err, size_t errlen) {
    const cJSON *go = cJSON_GetObjectItemCaseSensitive(o, key);
    char what[96];
    if (!cJSON_IsObject(go)) {
        pd_errorf(err, errlen, "%s: missing object '%s'", name, key);
        return -1;
    }
    double *x = NULL, *y = NULL;
    int nx, ny;
    snprintf(what, sizeof what, "%s.%s", key, xname);
    if (read_axis(cJSON_GetObjectItemCaseSensitive(go, xname), &x, &nx, what, name, err, errlen)) return -1;
    snprintf(what, sizeof what, "%s.%s", key, yname);
    if (read_axis(cJSON_GetObjectItemCaseSensitive(go, yname), &y, &ny, what, name, err, errlen)) {
        free(x);
        return -1;
    }
    sim_grid_init(g, nx, x, ny, y);
    free(x);
    free(y);
    const cJSON *rows = cJSON_GetObjectItemCaseSensitive(go, "seconds");
    if (!cJSON_IsArray(rows) || cJSON_GetArraySize(rows) != nx) {
        pd_errorf(err, errlen, "%s: %s.seconds must have one row per %s (%d)", name, key, xname, nx);
        return -1;
    }
    for (int i = 0; i < nx; i++) {
        const cJSON *r = cJSON_GetArrayItem(rows, i);
        if (!cJSON_IsArray(r) || cJSON_GetArraySize(r) != ny) {
            pd_errorf(err, errlen, "%s: %s.seconds[%d] must have %d numbers (one per %s)", name, key, i, ny, yname);
            return -1;
        }
        for (int j = 0; j < ny; j++) {
            const cJSON *v = cJSON_GetArrayItem(r, j);
            if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || !isfinite(v->valuedouble)) {
                pd_errorf(err, errlen, "%s: %s.seconds[%d][%d] must be a non-negative number", name, key, i, j);
                return -1;
            }
            g->v[i * ny + j] = v->valuedouble;
        }
    }
    return 0;
}

/* A GPU's decode step is bound by HBM traffic, and its power follows that traffic: fits
 * watts = base + slope x (weight_bytes + batch x context x KV bytes per token) / step
 * time (TB/s) over the measured grid by least squares and replaces each point by the
 * line's value (at least the idle power), keeping the readings in decode_grid_measured.
 * One reading of 0.3 s scatters by about 45 W around the line (2x H200, 2026-11-28 15:10:
 * 28 points, rms 45 W; batch 4 at 4,096 tokens read 404 W between 484 and 538 W at its
 * neighbours, and 414 W in another profile that day, while a deployment's decode
 * instance at that shape drew 490-510 W). Returns 1 when fitted; 0, the grid kept as
 * measured, when the fit is not physical (slope <= 0) or there are fewer than 4 points. */
int sim_profile_fit_decode_watts(sim_profile *p, double weight_bytes) {
    sim_grid *g = &p->power.decode_grid;
    const sim_grid *d = &p->decode;
    int n = g->nx * g->ny;
    if (n < 4 || d->nx != g->nx || d->ny != g->ny || !(weight_bytes >= 0)) return 0;
    double kvb = (double)p->kv_bytes_per_token, sx = 0, sy = 0, sxx = 0, sxy = 0;
    double *r = xmalloc(sizeof(double) * (size_t)n);
    for (int i = 0; i < g->nx; i++)
        for (int j = 0; j < g->ny; j++) {
            int k = i * g->ny + j;
            double t = d->v[k];
            r[k] = t > 0 ? (weight_bytes + g->x[i] * g->y[j] * kvb) / t / 1e12 : 0;
            sx += r[k], sy += g->v[k], sxx += r[k] * r[k], sxy += r[k] * g->v[k];
        }
    double den = n * sxx - sx * sx, slope = den > 0 ? (n * sxy - sx * sy) / den : 0, base = (sy - slope * sx) / n;
    if (!(slope > 0) || !isfinite(slope) || !isfinite(base)) {
        free(r);
        return 0;
    }
    sim_grid *m = &p->power.decode_grid_measured;
    sim_grid_free(m);
    sim_grid_init(m, g->nx, g->x, g->ny, g->y);
    double ss = 0, floor_w = p->power.idle_w > 0 ? p->power.idle_w : 1;
    for (int k = 0; k < n; k++) {
        m->v[k] = g->v[k];
        double f = base + slope * r[k];
        ss += (f - g->v[k]) * (f - g->v[k]);
        g->v[k] = PD_MAX(f, floor_w);
    }
    free(r);
    p->power.fit_base_w = base;
    p->power.fit_w_per_tbps = slope;
    p->power.fit_rms_w = sqrt(ss / n);
    p->power.fit_weight_bytes = weight_bytes;
    return 1;
}

/* The optional "power"."decode_watts" (and its "decode_watts_measured", key): one row
 * per decode batch, one number (watts) per decode context, on the decode grid's axes,
 * into g. */
static int read_watts_grid(const cJSON *pw, const char *key, sim_grid *g, sim_profile *p, const char *name,
                           char *err, size_t errlen) {
    const cJSON *rows = cJSON_GetObjectItemCaseSensitive(pw, key);
    if (!rows) return 0;
    const sim_grid *d = &p->decode;
    if (!cJSON_IsArray(rows) || cJSON_GetArraySize(rows) != d->nx) {
        pd_errorf(err, errlen, "%s: power.%s must have one row per decode batch (%d)", name, key, d->nx);
        return -1;
    }
    sim_grid_init(g, d->nx, d->x, d->ny, d->y);
    for (int i = 0; i < d->nx; i++) {
        const cJSON *r = cJSON_GetArrayItem(rows, i);
        if (!cJSON_IsArray(r) || cJSON_GetArraySize(r) != d->ny) {
            pd_errorf(err, errlen, "%s: power.%s[%d] must have %d numbers (one per decode context)", name, key, i,
                      d->ny);
            return -1;
        }
        for (int j = 0; j < d->ny; j++) {
            const cJSON *v = cJSON_GetArrayItem(r, j);
            if (!cJSON_IsNumber(v) || !(v->valuedouble > 0) || !isfinite(v->valuedouble)) {
                pd_errorf(err, errlen, "%s: power.%s[%d][%d] must be a positive number of watts", name, key, i, j);
                return -1;
            }
            g->v[i * d->ny + j] = v->valuedouble;
        }
    }
    return 0;
}

static int read_decode_watts(const cJSON *pw, sim_profile *p, const char *name, char *err, size_t errlen) {
    if (read_watts_grid(pw, "decode_watts", &p->power.decode_grid, p, name, err, errlen)) return -1;
    if (p->power.decode_grid.nx == 0) return 0;
    if (read_watts_grid(pw, "decode_watts_measured", &p->power.decode_grid_measured, p, name, err, errlen)) return -1;
    const cJSON *fo = cJSON_GetObjectItemCaseSensitive(pw, "decode_watts_fit");
    if (cJSON_IsObject(fo)) { /* a record of how decode_watts was made; the sim reads decode_watts */
        p->power.fit_base_w = get_num(fo, "base_w", 0);
        p->power.fit_w_per_tbps = get_num(fo, "w_per_tb_s", 0);
        p->power.fit_rms_w = get_num(fo, "rms_w", 0);
        p->power.fit_weight_bytes = get_num(fo, "weight_bytes", 0);
    }
    return 0;
}

/* The optional 1-D curve "linear": {"tokens": [...], "seconds": [...]}. */
static int read_linear(const cJSON *o, sim_profile *p, const char *name, char *err, size_t errlen) {
    const cJSON *lo = cJSON_GetObjectItemCaseSensitive(o, "linear");
    if (!lo) return 0;
    double *x = NULL;
    int nx;
    if (read_axis(cJSON_GetObjectItemCaseSensitive(lo, "tokens"), &x, &nx, "linear.tokens", name, err, errlen))
        return -1;
    static const double one = 1;
    sim_grid_init(&p->linear, nx, x, 1, &one);
    free(x);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(lo, "seconds");
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != nx) {
        pd_errorf(err, errlen, "%s: linear.seconds must have one number per token count (%d)", name, nx);
        return -1;
    }
    for (int i = 0; i < nx; i++) {
        const cJSON *x1 = cJSON_GetArrayItem(v, i);
        if (!cJSON_IsNumber(x1) || !(x1->valuedouble >= 0) || !isfinite(x1->valuedouble)) {
            pd_errorf(err, errlen, "%s: linear.seconds[%d] must be a non-negative number", name, i);
            return -1;
        }
        p->linear.v[i] = x1->valuedouble;
    }
    return 0;
}

static int read_mediums(const cJSON *o, sim_profile *p, const char *name, char *err, size_t errlen) {
    const cJSON *ms = cJSON_GetObjectItemCaseSensitive(o, "mediums");
    if (!ms) return 0;
    if (!cJSON_IsArray(ms) || cJSON_GetArraySize(ms) > SIM_MAX_MEDIUMS) {
        pd_errorf(err, errlen, "%s: mediums must be an array of at most %d objects", name, SIM_MAX_MEDIUMS);
        return -1;
    }
    const cJSON *mo;
    cJSON_ArrayForEach(mo, ms) {
        sim_medium *m = &p->mediums[p->n_mediums];
        memset(m, 0, sizeof *m);
        get_str(mo, "name", m->name, sizeof m->name);
        get_str(mo, "source", m->source, sizeof m->source);
        m->latency_s = get_num(mo, "latency_s", 0);
        m->layer_latency_s = get_num(mo, "layer_latency_s", 0);
        m->bandwidth = get_num(mo, "bandwidth_bytes_per_s", 0);
        m->power_w = get_num(mo, "power_w", 0);
        m->control_s = PD_MAX(get_num(mo, "control_s", 0), 0);
        m->put_share = get_num(mo, "put_share", 0);
        if (!(m->put_share > 0 && m->put_share < 1)) m->put_share = 0; /* absent or out of range: half */
        m->put_overlap = get_num(mo, "put_overlap", 0);
        if (!(m->put_overlap >= 1 && m->put_overlap <= 100)) m->put_overlap = 0; /* absent or out of range */
        m->get_overlap = get_num(mo, "get_overlap", 0);
        if (!(m->get_overlap >= 1 && m->get_overlap <= 100)) m->get_overlap = 0;
        m->get_pair = get_num(mo, "get_pair", 0);
        if (!(m->get_pair >= 1 && m->get_pair <= 100)) m->get_pair = 0;
        get_str(mo, "overlap_by", m->overlap_by, sizeof m->overlap_by);
        get_str(mo, "between", m->between, sizeof m->between);
        if (strcmp(m->between, "one device") && strcmp(m->between, "two devices")) m->between[0] = 0;
        m->put_overlap_pipe = get_num(mo, "put_overlap_pipelined", 0);
        m->get_overlap_pipe = get_num(mo, "get_overlap_pipelined", 0);
        m->pipe_n = (int)get_num(mo, "pipelined_transfers", 0);
        if (!(m->put_overlap_pipe >= 1 && m->put_overlap_pipe <= 100 && m->get_overlap_pipe >= 1 &&
              m->get_overlap_pipe <= 100 && m->pipe_n >= 2 && m->pipe_n <= 1000)) /* absent or out of range */
            m->put_overlap_pipe = m->get_overlap_pipe = 0, m->pipe_n = 0;
        const cJSON *tr = cJSON_GetObjectItemCaseSensitive(mo, "sustained");
        if (cJSON_IsObject(tr)) { /* a record: the bandwidth and put_share already carry it */
            m->train_n = (int)PD_MIN(PD_MAX(get_num(tr, "transfers", 0), 0), 64);
            m->train_tokens = (int)PD_MIN(PD_MAX(get_num(tr, "tokens", 0), 0), 1 << 24);
            m->train_s = get_num(tr, "median_s", 0);
            m->train_put_s = get_num(tr, "median_put_s", 0);
            m->train_first_s = get_num(tr, "first_s", 0);
            m->train_last_s = get_num(tr, "last_s", 0);
            m->train_scale = get_num(tr, "busy_scale", 0);
        }
        const cJSON *pts = cJSON_GetObjectItemCaseSensitive(mo, "points"), *pt;
        cJSON_ArrayForEach(pt, pts) {
            if (m->n_points >= SIM_MAX_POINTS || !cJSON_IsArray(pt) || cJSON_GetArraySize(pt) != 2) break;
            m->bytes[m->n_points] = cJSON_GetArrayItem(pt, 0)->valuedouble;
            m->seconds[m->n_points++] = cJSON_GetArrayItem(pt, 1)->valuedouble;
        }
        if (!(m->bandwidth > 0)) sim_medium_refit(m);
        if (!m->name[0] || !(m->bandwidth > 0) || m->latency_s < 0) {
            pd_errorf(err, errlen, "%s: mediums[%d] needs a name and a positive bandwidth_bytes_per_s (or points)",
                      name, p->n_mediums);
            return -1;
        }
        p->n_mediums++;
    }
    return 0;
}

static void read_power_cap(const cJSON *pw, sim_power_cap_data *d) {
    const cJSON *o = cJSON_GetObjectItemCaseSensitive(pw, "cap"), *q;
    if (!cJSON_IsObject(o)) return;
    d->limit_w = get_num(o, "limit_w", 0);
    d->idle_w = get_num(o, "idle_w", 0);
    d->window_s = get_num(o, "window_s", 0);
    get_str(o, "window_source", d->window_source, sizeof d->window_source);
    get_str(o, "source", d->source, sizeof d->source);
    cJSON_ArrayForEach(q, cJSON_GetObjectItemCaseSensitive(o, "points")) {
        if (d->n_points >= SIM_MAX_POWER_POINTS) break;
        sim_power_point *e = &d->points[d->n_points++];
        const cJSON *k = cJSON_GetObjectItemCaseSensitive(q, "kind");
        e->decode = cJSON_IsString(k) && !strcmp(k->valuestring, "decode");
        e->rows = get_num(q, "rows", 0);
        e->context = get_num(q, "context", 0);
        e->watts = get_num(q, "watts", 0);
        e->mhz = get_num(q, "mhz", 0);
        e->first_mhz = get_num(q, "first_mhz", 0);
        e->seconds = get_num(q, "seconds", 0);
        e->onset_s = get_num(q, "onset_s", -1);
        get_str(q, "reasons", e->reasons, sizeof e->reasons);
    }
}

static void read_clock(const cJSON *o, sim_profile *p) {
    const cJSON *co = cJSON_GetObjectItemCaseSensitive(o, "clock");
    if (!cJSON_IsObject(co)) return;
    sim_clock_model *c = &p->clock;
    c->base_mhz = get_num(co, "base_mhz", 0);
    c->min_mhz = get_num(co, "min_mhz", 0);
    c->max_mhz = get_num(co, "max_mhz", 0);
    c->prefill_compute_frac = get_num(co, "prefill_compute_fraction", c->prefill_compute_frac);
    c->decode_compute_frac = get_num(co, "decode_compute_fraction", c->decode_compute_frac);
    c->dyn_exp = get_num(co, "dynamic_power_exponent", c->dyn_exp);
    get_str(co, "source", c->source, sizeof c->source);
    const cJSON *pts = cJSON_GetObjectItemCaseSensitive(co, "points"), *q;
    cJSON_ArrayForEach(q, pts) {
        if (c->n_points >= SIM_MAX_CLOCKS) break;
        sim_clock_point *cp = &c->points[c->n_points++];
        cp->mhz = get_num(q, "mhz", 0);
        cp->prefill_scale = get_num(q, "prefill_scale", 1);
        cp->decode_scale = get_num(q, "decode_scale", 1);
        cp->busy_w = get_num(q, "busy_w", 0);
    }
    if (c->n_points >= 2 && c->base_mhz > 0) sim_clock_fit(c, p->power.measured ? p->power.idle_w : 0);
}

/* [[a, b], [c, d]] of finite numbers, each at least lo (above it where open), into k;
 * false when not so */
static bool read_2x2(const cJSON *ko, double k[2][2], double lo, bool open) {
    bool ok = cJSON_IsArray(ko) && cJSON_GetArraySize(ko) == 2;
    for (int x = 0; ok && x < 2; x++) {
        const cJSON *row = cJSON_GetArrayItem(ko, x);
        ok = cJSON_IsArray(row) && cJSON_GetArraySize(row) == 2;
        for (int y = 0; ok && y < 2; y++) {
            const cJSON *v = cJSON_GetArrayItem(row, y);
            ok = cJSON_IsNumber(v) && isfinite(v->valuedouble) && (open ? v->valuedouble > lo : v->valuedouble >= lo);
            if (ok) k[x][y] = v->valuedouble;
        }
    }
    return ok;
}

/* slowdown factors, >= 1 */
static bool read_kinds(const cJSON *ko, double k[2][2]) { return read_2x2(ko, k, 1, false); }

/* watts, > 0 */
static bool read_watts(const cJSON *ko, double w[2][2]) { return read_2x2(ko, w, 0, true); }

/* "contention": {cores, threads, points: [[procs, slowdown]...], kinds: [[prefill beside
 * prefill, prefill beside decode], [decode beside prefill, decode beside decode]],
 * source}; absent in older files and on GPU profiles (then cores 0: not modelled).
 * Points must start at one process and increase; kinds (optional) are >= 1. */
static int read_contention(const cJSON *o, sim_profile *p, const char *name, char *err, size_t errlen) {
    const cJSON *co = cJSON_GetObjectItemCaseSensitive(o, "contention");
    if (!cJSON_IsObject(co)) return 0;
    sim_contention *c = &p->contention;
    c->cores = (int)get_num(co, "cores", 0);
    c->threads = (int)get_num(co, "threads", 1);
    get_str(co, "source", c->source, sizeof c->source);
    const cJSON *pts = cJSON_GetObjectItemCaseSensitive(co, "points"), *pt;
    cJSON_ArrayForEach(pt, pts) {
        if (c->n_points >= SIM_MAX_CONTENTION || !cJSON_IsArray(pt) || cJSON_GetArraySize(pt) != 2) break;
        double k = cJSON_GetArrayItem(pt, 0)->valuedouble, v = cJSON_GetArrayItem(pt, 1)->valuedouble;
        if (c->n_points ? k <= c->procs[c->n_points - 1] : k != 1) {
            pd_errorf(err, errlen, "%s: contention.points must start at 1 process and increase", name);
            return -1;
        }
        c->procs[c->n_points] = k;
        c->slowdown[c->n_points++] = v;
    }
    if (c->cores < 0 || c->threads < 1) {
        pd_errorf(err, errlen, "%s: contention needs cores >= 0 and threads >= 1", name);
        return -1;
    }
    const cJSON *ko = cJSON_GetObjectItemCaseSensitive(co, "kinds");
    if (ko) {
        if (!read_kinds(ko, c->kinds)) {
            pd_errorf(err, errlen, "%s: contention.kinds must be [[pp, pd], [dp, dd]], each >= 1", name);
            return -1;
        }
        c->kinds_measured = true;
    }
    return 0;
}

/* "gpu_share": {kinds: [[prefill beside prefill, beside decode], [decode beside prefill,
 * beside decode]], shape: [T, C, B, L], source, and where timed copies: [[device to host
 * beside prefill, beside decode], [host to device ...]], beside_copy: [[prefill beside
 * device to host, beside host to device], [decode ...]], copy_bytes, and where timed in
 * this process too own_steps (as beside_copy) and own_copies (as copies); where metered
 * power_w and priced_w, of the same shape as kinds; where timed with lighter decodes
 * lighter: [{shape, kinds}...]}; absent: not measured (equal turns). */
/* Two 2x2 tables of gpu_share that come together (a and b): both or neither; factors
 * >= 1, or watts > 0. *present: both were there. 0, or -1 with err naming them. */
static int read_share_tables(const cJSON *go, const char *a, const char *b, double x[2][2], double y[2][2], bool watts,
                             bool *present, const char *name, char *err, size_t errlen) {
    const cJSON *xa = cJSON_GetObjectItemCaseSensitive(go, a), *yb = cJSON_GetObjectItemCaseSensitive(go, b);
    if (!xa && !yb) return 0;
    bool ok = watts ? read_watts(xa, x) && read_watts(yb, y) : read_kinds(xa, x) && read_kinds(yb, y);
    if (!ok) {
        pd_errorf(err, errlen, "%s: gpu_share.%s and %s must be %s", name, a, b,
                  watts ? "[[pp, pd], [dp, dd]] in W, each > 0" : "[[a, b], [c, d]], each >= 1");
        return -1;
    }
    *present = true;
    return 0;
}

static int read_gpu_share(const cJSON *o, sim_profile *p, const char *name, char *err, size_t errlen) {
    const cJSON *go = cJSON_GetObjectItemCaseSensitive(o, "gpu_share");
    if (!go) return 0;
    sim_gpu_share *g = &p->gpu_share;
    if (!cJSON_IsObject(go) || !read_kinds(cJSON_GetObjectItemCaseSensitive(go, "kinds"), g->kinds)) {
        pd_errorf(err, errlen, "%s: gpu_share.kinds must be [[pp, pd], [dp, dd]], each >= 1", name);
        return -1;
    }
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(go, "shape"), *v;
    int i = 0;
    cJSON_ArrayForEach(v, sh) {
        if (i < 4 && cJSON_IsNumber(v)) g->shape[i] = (int)v->valuedouble;
        i++;
    }
    get_str(go, "source", g->source, sizeof g->source);
    g->measured = true;
    if (read_share_tables(go, "copies", "beside_copy", g->copies, g->beside_copy, false, &g->copies_measured, name,
                          err, errlen) != 0 ||
        read_share_tables(go, "own_steps", "own_copies", g->own_steps, g->own_copies, false, &g->own_measured, name,
                          err, errlen) != 0 ||
        read_share_tables(go, "power_w", "priced_w", g->power_w, g->priced_w, true, &g->power_measured, name, err,
                          errlen) != 0)
        return -1;
    if (g->copies_measured) g->copy_bytes = get_num(go, "copy_bytes", 0);
    g->own_host_ctas = -1;
    const cJSON *hc = cJSON_GetObjectItemCaseSensitive(go, "own_host_ctas");
    if (hc && (!g->own_measured || !cJSON_IsNumber(hc) || hc->valuedouble < 0 || hc->valuedouble > 1e6 ||
               hc->valuedouble != (int)hc->valuedouble)) {
        pd_errorf(err, errlen, "%s: gpu_share.own_host_ctas must be a whole number >= 0, beside own_steps", name);
        return -1;
    }
    if (hc) g->own_host_ctas = (int)hc->valuedouble;
    const cJSON *lo = cJSON_GetObjectItemCaseSensitive(go, "lighter"), *e;
    if (lo && !cJSON_IsArray(lo)) {
        pd_errorf(err, errlen, "%s: gpu_share.lighter must be a list of {shape, kinds}", name);
        return -1;
    }
    cJSON_ArrayForEach(e, lo) {
        int i = g->n_lighter;
        const cJSON *es = cJSON_GetObjectItemCaseSensitive(e, "shape");
        bool ok = i < SIM_SHARE_LIGHTER && cJSON_IsArray(es) && cJSON_GetArraySize(es) == 4 &&
                  read_kinds(cJSON_GetObjectItemCaseSensitive(e, "kinds"), g->lighter_kinds[i]);
        for (int j = 0; ok && j < 4; j++) {
            const cJSON *v = cJSON_GetArrayItem(es, j);
            ok = cJSON_IsNumber(v) && v->valuedouble >= (j == 1 ? 0 : 1) && v->valuedouble <= 1e7;
            if (ok) g->lighter_shape[i][j] = (int)v->valuedouble;
        }
        if (!ok) {
            pd_errorf(err, errlen,
                      "%s: gpu_share.lighter[%d] must be {shape: [T, C, B, L], kinds: [[pp, pd], [dp, dd]] each >= 1}"
                      " (at most %d)", name, i, SIM_SHARE_LIGHTER);
            return -1;
        }
        g->n_lighter++;
    }
    return 0;
}

/* A serving path's "cpu": {request_s, token_s, step_s, points: [[requests, tokens,
 * steps, cpu seconds]...]}; points alone are fitted. Absent: not measured. 0 or -1. */
static int read_serving_cpu(const cJSON *po, sim_serving_cpu *c) {
    const cJSON *co = cJSON_GetObjectItemCaseSensitive(po, "cpu");
    memset(c, 0, sizeof *c);
    if (!cJSON_IsObject(co)) return 0;
    const cJSON *pts = cJSON_GetObjectItemCaseSensitive(co, "points"), *pt;
    cJSON_ArrayForEach(pt, pts) {
        if (c->n_points >= SIM_MAX_CPU_POINTS || !cJSON_IsArray(pt) || cJSON_GetArraySize(pt) != 4) break;
        for (int j = 0; j < 4; j++) c->points[c->n_points][j] = cJSON_GetArrayItem(pt, j)->valuedouble;
        c->n_points++;
    }
    if (cJSON_GetObjectItemCaseSensitive(co, "token_s")) {
        c->request_s = get_num(co, "request_s", 0);
        c->token_s = get_num(co, "token_s", 0);
        c->step_s = get_num(co, "step_s", 0);
        c->measured = true;
    } else {
        sim_serving_cpu_fit(c);
    }
    if (!c->measured) return 0;
    double v[3] = {c->request_s, c->token_s, c->step_s};
    for (int j = 0; j < 3; j++)
        if (!(v[j] >= 0) || !isfinite(v[j])) return -1;
    return 0;
}

/* [[tokens, factor]...], tokens increasing, both > 0; absent: none. 0 or -1. */
static int read_factor_points(const cJSON *pts, double *tok, double *fac, int *n) {
    const cJSON *pt;
    *n = 0;
    if (pts && !cJSON_IsArray(pts)) return -1;
    cJSON_ArrayForEach(pt, pts) {
        if (*n >= SIM_MAX_POINTS || !cJSON_IsArray(pt) || cJSON_GetArraySize(pt) != 2) return -1;
        double t = cJSON_GetArrayItem(pt, 0)->valuedouble, v = cJSON_GetArrayItem(pt, 1)->valuedouble;
        if (!(t > 0) || !(v > 0) || !isfinite(t) || !isfinite(v) || (*n > 0 && !(t > tok[*n - 1]))) return -1;
        tok[*n] = t;
        fac[(*n)++] = v;
    }
    return 0;
}

/* A serving path's "steps": {prefill: [[tokens, factor]...] (tokens increasing),
 * prefill_after (the same for steps continuing a prompt; optional), prefill_first (for
 * the others; optional), decode: factor}, every factor > 0; absent: not measured (1).
 * 0 or -1. */
static int read_step_factor(const cJSON *po, sim_step_factor *f) {
    const cJSON *fo = cJSON_GetObjectItemCaseSensitive(po, "steps");
    memset(f, 0, sizeof *f);
    if (!fo) return 0;
    if (!cJSON_IsObject(fo)) return -1;
    if (read_factor_points(cJSON_GetObjectItemCaseSensitive(fo, "prefill"), f->prefill_tokens, f->prefill,
                           &f->n_prefill) != 0 ||
        read_factor_points(cJSON_GetObjectItemCaseSensitive(fo, "prefill_after"), f->after_tokens, f->after,
                           &f->n_after) != 0 ||
        read_factor_points(cJSON_GetObjectItemCaseSensitive(fo, "prefill_first"), f->first_tokens, f->first,
                           &f->n_first) != 0)
        return -1;
    f->decode = get_num(fo, "decode", 1);
    if (!(f->decode > 0) || !isfinite(f->decode)) return -1;
    f->measured = true;
    return 0;
}

/* "serving": {colocated|router|disaggregated: {fixed_s, s_per_token, points: [[tokens,
 * seconds]...], cpu, steps}, source}; absent in older files (nothing modelled). A path
 * with points and no fixed_s / s_per_token is fitted on load. */
static int read_serving(const cJSON *o, sim_profile *p, const char *name, char *err, size_t errlen) {
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(o, "serving");
    if (!cJSON_IsObject(so)) return 0;
    sim_serving *sv = &p->serving;
    get_str(so, "source", sv->source, sizeof sv->source);
    const struct { const char *name; sim_serving_path *s; } paths[] = {
        {"colocated", &sv->colocated}, {"router", &sv->router}, {"disaggregated", &sv->disaggregated}};
    for (size_t i = 0; i < PD_ARRAY_LEN(paths); i++) {
        const cJSON *po = cJSON_GetObjectItemCaseSensitive(so, paths[i].name);
        if (!cJSON_IsObject(po)) continue;
        sim_serving_path *sp = paths[i].s;
        const cJSON *pts = cJSON_GetObjectItemCaseSensitive(po, "points"), *pt;
        cJSON_ArrayForEach(pt, pts) {
            if (sp->n_points >= SIM_MAX_POINTS || !cJSON_IsArray(pt) || cJSON_GetArraySize(pt) != 2) break;
            sp->tokens[sp->n_points] = cJSON_GetArrayItem(pt, 0)->valuedouble;
            sp->seconds[sp->n_points++] = cJSON_GetArrayItem(pt, 1)->valuedouble;
        }
        if (read_serving_cpu(po, &sp->cpu)) {
            pd_errorf(err, errlen, "%s: serving.%s.cpu needs request_s, token_s and step_s >= 0 (or points of "
                                   "[requests, tokens, steps, cpu seconds])", name, paths[i].name);
            return -1;
        }
        if (read_step_factor(po, &sp->steps)) {
            pd_errorf(err, errlen, "%s: serving.%s.steps needs prefill: [[tokens, factor]...] with tokens increasing "
                                   "and every factor > 0, and decode > 0", name, paths[i].name);
            return -1;
        }
        bool given = cJSON_GetObjectItemCaseSensitive(po, "fixed_s") || cJSON_GetObjectItemCaseSensitive(po, "s_per_token");
        if (!given && sp->n_points == 0 && sp->steps.measured) continue; /* steps alone: no path priced */
        if (given) {
            sp->fixed_s = get_num(po, "fixed_s", 0);
            sp->s_per_token = get_num(po, "s_per_token", 0);
            sp->measured = true;
        } else {
            sim_serving_fit(sp);
        }
        if (!sp->measured || !(sp->fixed_s >= 0) || !(sp->s_per_token >= 0) || !isfinite(sp->fixed_s) ||
            !isfinite(sp->s_per_token)) {
            pd_errorf(err, errlen, "%s: serving.%s needs fixed_s and s_per_token >= 0 (or points)", name,
                      paths[i].name);
            return -1;
        }
    }
    return 0;
}

/* "tiers": {stage_s: [fixed, per block], write_s_per_block: [cpu, disk], get_s_per_block:
 * [cpu, disk], load_direct_s / load_host_s: [fixed, per block], source}; absent: derived. */
static int read_tiers(const cJSON *o, sim_profile *p, const char *name, char *err, size_t errlen) {
    const cJSON *to = cJSON_GetObjectItemCaseSensitive(o, "tiers");
    if (!to) return 0;
    static const char *const keys[] = {"stage_s", "write_s_per_block", "get_s_per_block", "load_direct_s",
                                       "load_host_s"};
    sim_tier_costs *t = &p->tiers;
    double *dst[5][2] = {{&t->stage_fixed_s, &t->stage_s_per_block},
                         {&t->write_s_per_block[0], &t->write_s_per_block[1]},
                         {&t->get_s_per_block[0], &t->get_s_per_block[1]},
                         {&t->load_fixed_s[0], &t->load_s_per_block[0]},
                         {&t->load_fixed_s[1], &t->load_s_per_block[1]}};
    for (int k = 0; k < 5; k++) {
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(to, keys[k]);
        if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != 2 || !cJSON_IsNumber(cJSON_GetArrayItem(a, 0)) ||
            !cJSON_IsNumber(cJSON_GetArrayItem(a, 1)) || !(cJSON_GetArrayItem(a, 0)->valuedouble >= 0) ||
            !(cJSON_GetArrayItem(a, 1)->valuedouble >= 0)) {
            pd_errorf(err, errlen, "%s: tiers.%s must be two non-negative numbers", name, keys[k]);
            return -1;
        }
        *dst[k][0] = cJSON_GetArrayItem(a, 0)->valuedouble;
        *dst[k][1] = cJSON_GetArrayItem(a, 1)->valuedouble;
    }
    get_str(to, "source", t->source, sizeof t->source);
    t->measured = true;
    return 0;
}

/* "mixed": {points: [[T, C, B, L, seconds]...], source}; absent in older files. */
static int read_mixed(const cJSON *o, sim_profile *p, const char *name, char *err, size_t errlen) {
    const cJSON *mo = cJSON_GetObjectItemCaseSensitive(o, "mixed");
    if (!cJSON_IsObject(mo)) return 0;
    get_str(mo, "source", p->mixed_source, sizeof p->mixed_source);
    const cJSON *pts = cJSON_GetObjectItemCaseSensitive(mo, "points"), *pt;
    cJSON_ArrayForEach(pt, pts) {
        if (p->n_mixed >= SIM_MAX_MIXED || !cJSON_IsArray(pt) || cJSON_GetArraySize(pt) != 5) {
            pd_errorf(err, errlen, "%s: mixed.points: at most %d entries of [T, C, B, L, seconds]", name, SIM_MAX_MIXED);
            return -1;
        }
        double v[5];
        for (int k = 0; k < 5; k++) v[k] = cJSON_GetArrayItem(pt, k)->valuedouble;
        if (!(v[0] >= 1 && v[0] <= 1e8) || !(v[1] >= 0 && v[1] <= 1e8) || !(v[2] >= 1 && v[2] <= 65536) ||
            !(v[3] >= 1 && v[3] <= 1e8) || !(v[4] > 0 && isfinite(v[4]))) {
            pd_errorf(err, errlen, "%s: mixed.points[%d]: T, L from 1 to 1e8, B from 1 to 65536, C from 0 to 1e8, "
                      "seconds > 0", name, p->n_mixed);
            return -1;
        }
        p->mixed[p->n_mixed++] = (sim_mixed_point){v[0], v[1], v[2], v[3], v[4]};
    }
    return 0;
}

int sim_profile_parse(const char *text, size_t len, const char *name, sim_profile *p, char *err,
                      size_t errlen) {
    sim_profile_init(p);
    cJSON *o = cJSON_ParseWithLength(text, len);
    if (!o || !cJSON_IsObject(o)) {
        pd_errorf(err, errlen, "%s: not a JSON object", name);
        cJSON_Delete(o);
        return -1;
    }
    int rc = -1;
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, "format");
    if (!cJSON_IsString(f) || strcmp(f->valuestring, PROFILE_FORMAT) != 0) {
        pd_errorf(err, errlen, "%s: \"format\" must be \"%s\" (a file written by pdserve profile)", name,
                  PROFILE_FORMAT);
        goto out;
    }
    get_str(o, "model", p->model, sizeof p->model);
    get_str(o, "device", p->device, sizeof p->device);
    get_str(o, "backend", p->backend, sizeof p->backend);
    get_str(o, "host", p->host, sizeof p->host);
    get_str(o, "date", p->date, sizeof p->date);
    double bs, kvb, nl, kvt, rp;
    if (get_whole(o, "block_size", 16, 1, 1 << 20, &bs, name, err, errlen) ||
        get_whole(o, "kv_bytes_per_token", 0, 0, 1e12, &kvb, name, err, errlen) ||
        get_whole(o, "n_layers", 0, 0, 1e5, &nl, name, err, errlen) ||
        get_whole(o, "kv_cache_tokens", 0, 0, 1e15, &kvt, name, err, errlen) ||
        get_whole(o, "repeats", 1, 0, 1e6, &rp, name, err, errlen))
        goto out;
    p->block_size = (int)bs;
    p->kv_bytes_per_token = (size_t)kvb;
    p->n_layers = (int)nl;
    p->kv_cache_tokens = (long long)kvt;
    p->repeats = (int)rp;
    if (read_grid(o, "prefill", "tokens", "context", &p->prefill, name, err, errlen)) goto out;
    if (read_grid(o, "decode", "batch", "context", &p->decode, name, err, errlen)) goto out;
    if (read_linear(o, p, name, err, errlen)) goto out;
    p->mixed_overhead_s = get_num(o, "mixed_overhead_s", 0);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(o, "engine");
    p->sample_s_per_row = get_num(e, "sample_s_per_row", 0);
    p->step_overhead_s = get_num(e, "step_overhead_s", 0);
    const cJSON *db = e ? cJSON_GetObjectItemCaseSensitive(e, "decode_buckets") : NULL;
    p->decode_buckets = db ? cJSON_IsTrue(db) : strcmp(p->backend, "cuda") == 0;
    if (read_mediums(o, p, name, err, errlen)) goto out;
    get_str(o, "mediums_note", p->mediums_note, sizeof p->mediums_note);
    const cJSON *pw = cJSON_GetObjectItemCaseSensitive(o, "power");
    if (cJSON_IsObject(pw)) {
        p->power.measured = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pw, "measured"));
        p->power.idle_w = get_num(pw, "idle_w", 0);
        p->power.prefill_w = get_num(pw, "prefill_w", 0);
        p->power.decode_w = get_num(pw, "decode_w", 0);
        if (read_decode_watts(pw, p, name, err, errlen)) goto out;
        get_str(pw, "source", p->power.source, sizeof p->power.source);
        read_power_cap(pw, &p->power.cap);
    }
    read_clock(o, p);
    if (read_contention(o, p, name, err, errlen) || read_gpu_share(o, p, name, err, errlen)) goto out;
    if (read_serving(o, p, name, err, errlen) || read_mixed(o, p, name, err, errlen) ||
        read_tiers(o, p, name, err, errlen))
        goto out;
    rc = 0;
out:
    cJSON_Delete(o);
    if (rc) sim_profile_free(p);
    return rc;
}

int sim_profile_load(const char *path, sim_profile *p, char *err, size_t errlen) {
    size_t len;
    char *text = util_read_file(path, &len, err, errlen);
    if (!text) return -1;
    int rc = sim_profile_parse(text, len, path, p, err, errlen);
    free(text);
    return rc;
}
