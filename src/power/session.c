/* session.c: the meters around one run, and the sampler thread.
 *
 * Timeline of a session:
 *   open   load NVML, scan RAPL, allocate every sample ring (nothing later allocates)
 *   start  idle window: energy counters read at both ends, power sampled each period
 *          -> idle watts per GPU; then t0: counters, RAPL and meter command read,
 *          first sample taken, sampler thread started
 *   (run)  the thread wakes every period (absolute deadlines on CLOCK_MONOTONIC),
 *          samples every GPU into its ring, integrates power (trapezoid) and
 *          accumulates RAPL deltas (so several RAPL wraps in a long run are counted)
 *   stop   thread joined, a last sample at t_end, counters, RAPL and meter read again,
 *          the result filled and computed
 * Tuned for a 100 ms period with 1-8 GPUs: a tick is a handful of NVML reads per GPU
 * (about a millisecond each on H100), far below the period; its cost is measured and
 * reported (sampler_cost_*_ms). */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "power/power.h"
#include "util/util.h"

typedef struct gpu_track {
    int nv_index;           /* NVML index */
    power_role role;
    power_sample *ring;     /* owned; cap entries */
    size_t cap;
    uint64_t pushed;        /* samples ever pushed; ring holds the last min(pushed, cap) */
    /* running trapezoid over the run (survives ring overwrites) */
    bool have_prev;
    power_sample prev;
    double energy_j, gap_time_s;
    int n_samples, n_gaps;
    float peak_w;
    bool peak_ok;
    /* counters */
    bool counter_ok;
    uint64_t start_mj, end_mj;
    power_fig idle_w;
} gpu_track;

struct power_session {
    double period_s, idle_window_s, gap_s, meter_timeout_s;
    int slow_every;
    char *meter_cmd, *meter_label;   /* owned copies */
    power_nvml *nv;                  /* owned unless nv_borrowed; NULL: GPU energy not measured */
    bool nv_borrowed;                /* power_config.nvml: the caller's, never closed here */
    char gpu_reason[POWER_REASON_LEN];
    int n;
    gpu_track g[POWER_MAX_GPUS];
    power_rapl rapl;
    uint64_t rapl_last[POWER_MAX_RAPL], rapl_acc[POWER_MAX_RAPL];
    bool rapl_ok[POWER_MAX_RAPL];
    char rapl_err[POWER_MAX_RAPL][POWER_REASON_LEN];
    /* RAPL power per tick (a ring like the GPUs'): rapl_t[cap], rapl_w[cap][rapl.n]
     * (NAN: domain not read), from the accumulated energy between two ticks. */
    double *rapl_t;
    float *rapl_w;
    size_t rapl_cap;
    uint64_t rapl_pushed;
    uint64_t rapl_prev_acc[POWER_MAX_RAPL];
    double rapl_prev_t;
    bool meter_ok;
    double meter_start_j;
    char meter_reason[POWER_REASON_LEN];
    /* The meter command on scrapes (power_session_live): at most one run per
     * meter_interval_s, never two at once; other scrapes get the last reading.
     * meter_run_mu is held for the whole of a run; the cache has its own mutex so
     * that a scrape finding a run in progress never waits for it. */
    double meter_interval_s;
    pthread_mutex_t meter_run_mu, meter_cache_mu;
    double meter_last_t;             /* monotonic end of the last run (cache) */
    bool meter_last_ok;
    double meter_last_j;             /* its cumulative reading */
    char meter_last_reason[POWER_REASON_LEN];
    /* sampler thread */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t live_mu;         /* the running integrals and RAPL sums vs power_session_live */
    bool stop, running, started;
    double t0;
    double cost_sum_ms, cost_max_ms;
    int ticks;
};

/* ---- one tick ------------------------------------------------------------------------ */

static void track_push(gpu_track *g, const power_sample *s) {
    g->ring[g->pushed % g->cap] = *s;
    g->pushed++;
}

/* Adds sample s to the run's running integral; gaps are bridged linearly and counted. */
static void track_integrate(gpu_track *g, const power_sample *s, double gap_s) {
    if (!(s->valid & POWER_SAMPLE_POWER)) return;
    g->n_samples++;
    if (!g->peak_ok || s->power_w > g->peak_w) g->peak_w = s->power_w;
    g->peak_ok = true;
    if (g->have_prev) {
        double dt = s->t_s - g->prev.t_s;
        if (dt > 0) {
            g->energy_j += 0.5 * (g->prev.power_w + s->power_w) * dt;
            if (dt > gap_s) {
                g->n_gaps++;
                g->gap_time_s += dt;
            }
        }
    }
    g->prev = *s;
    g->have_prev = true;
}

static void session_sample_all(power_session *s, bool integrate) {
    unsigned want = s->ticks % s->slow_every == 0 ? POWER_SAMPLE_ALL : POWER_SAMPLE_POWER;
    for (int i = 0; i < s->n; i++) {
        power_sample smp;
        memset(&smp, 0, sizeof smp);
        power_nvml_sample(s->nv, s->g[i].nv_index, want, &smp);
        smp.t_s = time_now_s() - s->t0;
        track_push(&s->g[i], &smp);
        if (integrate) track_integrate(&s->g[i], &smp, s->gap_s);
    }
}

/* One RAPL ring entry at t: each domain's mean power since the previous tick. */
static void rapl_push(power_session *s, double t) {
    if (!s->rapl_cap || s->rapl.n == 0) return;
    size_t k = (size_t)(s->rapl_pushed % s->rapl_cap);
    double dt = t - s->rapl_prev_t;
    s->rapl_t[k] = t;
    for (int i = 0; i < s->rapl.n; i++) {
        float w = NAN;
        if (s->rapl_ok[i] && dt > 0) w = (float)((double)(s->rapl_acc[i] - s->rapl_prev_acc[i]) / 1e6 / dt);
        s->rapl_w[k * (size_t)s->rapl.n + (size_t)i] = w;
        s->rapl_prev_acc[i] = s->rapl_acc[i];
    }
    s->rapl_prev_t = t;
    s->rapl_pushed++;
}

static void session_rapl_tick(power_session *s) {
    for (int i = 0; i < s->rapl.n; i++) {
        if (!s->rapl_ok[i]) continue;
        uint64_t v;
        char err[POWER_REASON_LEN];
        if (power_rapl_read(&s->rapl, i, &v, err, sizeof err) != 0) {
            s->rapl_ok[i] = false; /* a domain that fails mid-run is not measured */
            snprintf(s->rapl_err[i], sizeof s->rapl_err[i], "%s", err);
            continue;
        }
        s->rapl_acc[i] += power_counter_delta(s->rapl_last[i], v, s->rapl.d[i].range_uj);
        s->rapl_last[i] = v;
    }
    rapl_push(s, time_now_s() - s->t0);
}

static void session_tick(power_session *s) {
    double a = time_now_s();
    pthread_mutex_lock(&s->live_mu);
    session_sample_all(s, true);
    session_rapl_tick(s);
    pthread_mutex_unlock(&s->live_mu);
    double ms = (time_now_s() - a) * 1e3;
    s->cost_sum_ms += ms;
    if (ms > s->cost_max_ms) s->cost_max_ms = ms;
    s->ticks++;
}

static struct timespec ts_of(double t) {
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

static void *sampler_main(void *arg) {
    power_session *s = arg;
    double next = s->t0 + s->period_s;
    pthread_mutex_lock(&s->mu);
    while (!s->stop) {
        struct timespec ts = ts_of(next);
        int rc = pthread_cond_timedwait(&s->cv, &s->mu, &ts);
        if (s->stop) break;
        if (rc != ETIMEDOUT && time_now_s() < next) continue; /* spurious wake-up */
        pthread_mutex_unlock(&s->mu);
        session_tick(s);
        pthread_mutex_lock(&s->mu);
        next += s->period_s;
        double now = time_now_s();
        if (next < now) next = now + s->period_s; /* fell behind: skip, never burst */
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- open / free ------------------------------------------------------------------------ */

static int session_pick_gpus(power_session *s, const power_config *cfg, char *err, size_t errlen) {
    int avail = power_nvml_count(s->nv);
    int n = cfg->n_gpus > 0 ? cfg->n_gpus : avail;
    if (n > POWER_MAX_GPUS) {
        pd_errorf(err, errlen, "power: %d GPUs requested, at most %d", n, POWER_MAX_GPUS);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        int idx = cfg->n_gpus > 0 ? cfg->gpus[i] : i;
        if (idx < 0 || idx >= avail) {
            pd_errorf(err, errlen, "power: GPU %d does not exist (NVML lists %d)", idx, avail);
            return -1;
        }
        if (cfg->roles[i] < 0 || cfg->roles[i] >= POWER_ROLE_COUNT) {
            pd_errorf(err, errlen, "power: bad role for GPU %d", idx);
            return -1;
        }
        s->g[i].nv_index = idx;
        s->g[i].role = cfg->roles[i];
    }
    s->n = n;
    return 0;
}

power_session *power_session_open(const power_config *cfg, char *err, size_t errlen) {
    power_config def;
    memset(&def, 0, sizeof def);
    if (!cfg) cfg = &def;
    power_session *s = xcalloc(1, sizeof *s);
    s->period_s = cfg->sample_period_s > 0 ? cfg->sample_period_s : 0.1;
    s->idle_window_s = cfg->idle_window_s == 0 ? 2.0 : cfg->idle_window_s < 0 ? 0 : cfg->idle_window_s;
    s->gap_s = 2.5 * s->period_s;
    s->slow_every = cfg->slow_every > 0 ? cfg->slow_every : 1;
    s->meter_timeout_s = cfg->meter_timeout_s > 0 ? cfg->meter_timeout_s : 10.0;
    s->meter_cmd = cfg->meter_cmd && *cfg->meter_cmd ? xstrdup(cfg->meter_cmd) : NULL;
    s->meter_label = xstrdup(cfg->meter_label && *cfg->meter_label ? cfg->meter_label : "meter");
    s->meter_interval_s = cfg->meter_min_interval_s > 0 ? cfg->meter_min_interval_s
                          : cfg->meter_min_interval_s < 0 ? 0 : 1.0;
    pthread_mutex_init(&s->meter_run_mu, NULL);
    pthread_mutex_init(&s->meter_cache_mu, NULL);
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->live_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* time_now_s() is CLOCK_MONOTONIC */
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);

    if (cfg->no_nvml) {
        snprintf(s->gpu_reason, sizeof s->gpu_reason, "GPU energy not measured: NVML disabled");
    } else if (cfg->nvml) {
        s->nv = cfg->nvml;
        s->nv_borrowed = true;
    } else {
        s->nv = power_nvml_open(s->gpu_reason, sizeof s->gpu_reason);
        if (!s->nv && cfg->n_gpus > 0)
            log_warn("power: %s", s->gpu_reason);
    }
    if (s->nv && session_pick_gpus(s, cfg, err, errlen) != 0) {
        power_session_free(s);
        return NULL;
    }
    size_t cap = cfg->sample_capacity ? cfg->sample_capacity : 36000;
    for (int i = 0; i < s->n; i++) {
        s->g[i].cap = cap;
        s->g[i].ring = xcalloc(cap, sizeof(power_sample));
    }
    if (s->n)
        log_info("power: sampling %d GPU(s) every %.0f ms, %zu samples (%.1f MiB) per GPU", s->n,
                 s->period_s * 1e3, cap, (double)(cap * sizeof(power_sample)) / (1 << 20));
    if (cfg->no_rapl) {
        memset(&s->rapl, 0, sizeof s->rapl);
        snprintf(s->rapl.reason, sizeof s->rapl.reason, "CPU/DRAM energy not measured: RAPL disabled");
    } else {
        power_rapl_scan(&s->rapl, cfg->powercap_root);
    }
    if (s->rapl.n > 0) {
        s->rapl_cap = cap;
        s->rapl_t = xcalloc(cap, sizeof *s->rapl_t);
        s->rapl_w = xcalloc(cap * (size_t)s->rapl.n, sizeof *s->rapl_w);
    }
    return s;
}

void power_session_free(power_session *s) {
    if (!s) return;
    if (s->running) {
        power_result tmp;
        power_session_stop(s, 0, 0, 0, &tmp);
    }
    for (int i = 0; i < s->n; i++) free(s->g[i].ring);
    free(s->rapl_t);
    free(s->rapl_w);
    if (!s->nv_borrowed) power_nvml_close(s->nv);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->live_mu);
    pthread_mutex_destroy(&s->meter_run_mu);
    pthread_mutex_destroy(&s->meter_cache_mu);
    free(s->meter_cmd);
    free(s->meter_label);
    free(s);
}

power_nvml *power_session_nvml(power_session *s) { return s ? s->nv : NULL; }

/* ---- start / stop ------------------------------------------------------------------------ */

/* Idle baseline: counters at both ends of the window (the counter ticks about every
 * 100 ms, so 2 s gives about 5% resolution), sampled mean power where a counter is
 * missing. The GPUs should be idle: call before loading work onto them. */
static void session_idle(power_session *s) {
    uint64_t a[POWER_MAX_GPUS];
    bool ok[POWER_MAX_GPUS];
    double sum[POWER_MAX_GPUS] = {0};
    int cnt[POWER_MAX_GPUS] = {0};
    double t_a = time_now_s();
    s->t0 = t_a + s->idle_window_s; /* idle samples get t_s < 0 */
    for (int i = 0; i < s->n; i++) ok[i] = power_nvml_energy_mj(s->nv, s->g[i].nv_index, &a[i]) == 0;
    double end = t_a + s->idle_window_s;
    for (double next = t_a; next < end; next += s->period_s) {
        double now = time_now_s();
        if (next > now) {
            struct timespec ts = ts_of(next - now);
            nanosleep(&ts, NULL);
        }
        for (int i = 0; i < s->n; i++) {
            power_sample smp;
            memset(&smp, 0, sizeof smp);
            if (power_nvml_sample(s->nv, s->g[i].nv_index, POWER_SAMPLE_ALL, &smp) > 0) {
                sum[i] += smp.power_w;
                cnt[i]++;
            }
            smp.t_s = time_now_s() - s->t0;
            track_push(&s->g[i], &smp);
        }
    }
    double now = time_now_s();
    if (now < end) {
        struct timespec ts = ts_of(end - now);
        nanosleep(&ts, NULL);
    }
    double window = time_now_s() - t_a;
    for (int i = 0; i < s->n; i++) {
        uint64_t b;
        gpu_track *g = &s->g[i];
        if (ok[i] && power_nvml_energy_mj(s->nv, g->nv_index, &b) == 0 && window > 0)
            g->idle_w = power_fig_of((double)power_counter_delta(a[i], b, 0) / 1000.0 / window);
        else if (cnt[i] > 0)
            g->idle_w = power_fig_of(sum[i] / cnt[i]);
        else
            g->idle_w = power_fig_none();
        if (g->idle_w.measured)
            log_info("power: GPU %d idle %.1f W over %.1f s", g->nv_index, g->idle_w.value, window);
    }
}

int power_session_start(power_session *s, char *err, size_t errlen) {
    PD_ASSERT(s && !s->running);
    for (int i = 0; i < s->n; i++) s->g[i].pushed = 0;
    if (s->n > 0 && s->idle_window_s > 0) session_idle(s);
    for (int i = 0; i < s->n; i++) {
        gpu_track *g = &s->g[i];
        g->counter_ok = power_nvml_energy_mj(s->nv, g->nv_index, &g->start_mj) == 0;
        g->have_prev = false;
        g->energy_j = g->gap_time_s = 0;
        g->n_samples = g->n_gaps = 0;
        g->peak_ok = false;
    }
    for (int i = 0; i < s->rapl.n; i++) {
        s->rapl_ok[i] = s->rapl.d[i].readable &&
                        power_rapl_read(&s->rapl, i, &s->rapl_last[i], s->rapl_err[i],
                                        sizeof s->rapl_err[i]) == 0;
        if (!s->rapl.d[i].readable) memcpy(s->rapl_err[i], s->rapl.d[i].reason, POWER_REASON_LEN);
        s->rapl_acc[i] = 0;
        s->rapl_prev_acc[i] = 0;
    }
    s->rapl_pushed = 0;
    s->rapl_prev_t = 0;
    s->meter_ok = false;
    s->meter_reason[0] = 0;
    if (s->meter_cmd) {
        pthread_mutex_lock(&s->meter_run_mu);
        s->meter_ok = power_meter_cmd_read(s->meter_cmd, "start", s->meter_timeout_s, &s->meter_start_j,
                                           s->meter_reason, sizeof s->meter_reason) == 0;
        pthread_mutex_unlock(&s->meter_run_mu);
        pthread_mutex_lock(&s->meter_cache_mu);
        s->meter_last_t = time_now_s();
        s->meter_last_ok = s->meter_ok;
        s->meter_last_j = s->meter_start_j;
        snprintf(s->meter_last_reason, sizeof s->meter_last_reason, "%s", s->meter_reason);
        pthread_mutex_unlock(&s->meter_cache_mu);
    } else
        snprintf(s->meter_reason, sizeof s->meter_reason,
                 "not measured: no --energy-meter-cmd given");
    /* Idle samples were stamped against the idle window's end; restamp them against
     * the real t0 so that every stored t_s is "seconds since run start" (< 0 idle). */
    double t0_idle = s->t0;
    s->t0 = time_now_s();
    for (int i = 0; i < s->n && s->idle_window_s > 0; i++) {
        size_t held = (size_t)PD_MIN(s->g[i].pushed, (uint64_t)s->g[i].cap);
        for (size_t k = 0; k < held; k++) s->g[i].ring[k].t_s -= s->t0 - t0_idle;
    }
    s->cost_sum_ms = s->cost_max_ms = 0;
    s->ticks = 0;
    s->stop = false;
    s->started = true;
    pthread_mutex_lock(&s->live_mu);
    s->rapl_prev_t = 0;
    if (s->n > 0) session_sample_all(s, true);
    s->running = true; /* readers of the rings (power_session_*_since) may start now */
    pthread_mutex_unlock(&s->live_mu);
    if (pthread_create(&s->thread, NULL, sampler_main, s) != 0) {
        pthread_mutex_lock(&s->live_mu);
        s->running = false;
        pthread_mutex_unlock(&s->live_mu);
        pd_errorf(err, errlen, "power: cannot start the sampler thread");
        return -1;
    }
    return 0;
}

/* Reverses a[lo..hi). */
static void ring_reverse(power_sample *a, size_t lo, size_t hi) {
    while (lo + 1 < hi) {
        power_sample t = a[lo];
        a[lo++] = a[--hi];
        a[hi] = t;
    }
}

/* Puts the ring's content oldest first at index 0 (in place: three reversals). */
static void ring_unroll(gpu_track *g) {
    if (g->pushed <= g->cap) return;
    size_t k = g->pushed % g->cap; /* the oldest sample */
    ring_reverse(g->ring, 0, k);
    ring_reverse(g->ring, k, g->cap);
    ring_reverse(g->ring, 0, g->cap);
    g->pushed = g->cap; /* from now on: a plain array of cap samples */
}

int power_session_stop(power_session *s, int64_t n_requests, int64_t n_input_tokens,
                       int64_t n_output_tokens, power_result *out) {
    PD_ASSERT(s && s->running && out);
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    pthread_mutex_lock(&s->live_mu); /* against ring readers until running is false */
    if (s->n > 0) session_sample_all(s, true);
    double t_end = time_now_s();
    session_rapl_tick(s);
    s->running = false;
    pthread_mutex_unlock(&s->live_mu);
    memset(out, 0, sizeof *out);
    out->duration_s = t_end - s->t0;
    out->idle_window_s = s->n > 0 ? s->idle_window_s : 0;
    out->sample_period_s = s->period_s;
    out->sampler_cost_mean_ms = s->ticks ? s->cost_sum_ms / s->ticks : 0;
    out->sampler_cost_max_ms = s->cost_max_ms;
    out->n_requests = n_requests;
    out->n_input_tokens = n_input_tokens;
    out->n_output_tokens = n_output_tokens;
    out->n_gpus = s->n;
    snprintf(out->gpu_reason, sizeof out->gpu_reason, "%s", s->nv ? "" : s->gpu_reason);
    for (int i = 0; i < s->n; i++) {
        gpu_track *g = &s->g[i];
        power_gpu_result *r = &out->gpu[i];
        r->index = g->nv_index;
        snprintf(r->name, sizeof r->name, "%s", power_nvml_name(s->nv, g->nv_index));
        r->role = g->role;
        r->counter_ok = g->counter_ok &&
                        power_nvml_energy_mj(s->nv, g->nv_index, &g->end_mj) == 0;
        r->counter_start_mj = g->start_mj;
        r->counter_end_mj = g->end_mj;
        r->sampled_j = g->n_samples >= 2 ? power_fig_of(g->energy_j) : power_fig_none();
        r->idle_power_w = g->idle_w;
        r->peak_power_w = g->peak_ok ? power_fig_of(g->peak_w) : power_fig_none();
        r->n_samples = g->n_samples;
        r->n_gaps = g->n_gaps;
        r->gap_time_s = g->gap_time_s;
        ring_unroll(g);
    }
    out->n_rapl = s->rapl.n;
    snprintf(out->rapl_reason, sizeof out->rapl_reason, "%s", s->rapl.reason);
    for (int i = 0; i < s->rapl.n; i++) {
        power_rapl_result *r = &out->rapl[i];
        snprintf(r->name, sizeof r->name, "%s", s->rapl.d[i].name);
        r->is_dram = s->rapl.d[i].is_dram;
        r->energy_j = s->rapl_ok[i] ? power_fig_of((double)s->rapl_acc[i] / 1e6) : power_fig_none();
        if (!s->rapl_ok[i]) snprintf(r->reason, sizeof r->reason, "%s", s->rapl_err[i]);
    }
    snprintf(out->meter_label, sizeof out->meter_label, "%s", s->meter_label);
    out->meter_j = power_fig_none();
    if (s->meter_ok) {
        double end_j;
        pthread_mutex_lock(&s->meter_run_mu); /* waits for a scrape's run to end */
        if (power_meter_cmd_read(s->meter_cmd, "end", s->meter_timeout_s, &end_j, s->meter_reason,
                                 sizeof s->meter_reason) == 0)
            out->meter_j = power_fig_of(end_j - s->meter_start_j);
        pthread_mutex_unlock(&s->meter_run_mu);
    }
    snprintf(out->meter_reason, sizeof out->meter_reason, "%s", out->meter_j.measured ? "" : s->meter_reason);
    power_result_compute(out);
    return 0;
}

const power_sample *power_session_samples(const power_session *s, int i, size_t *n) {
    PD_ASSERT(s && n);
    *n = 0;
    if (i < 0 || i >= s->n || s->running) return NULL;
    const gpu_track *g = &s->g[i];
    *n = (size_t)PD_MIN(g->pushed, (uint64_t)g->cap);
    return g->ring;
}

/* ---- live readings ------------------------------------------------------------------------ */

/* Copies the cached meter reading; under meter_cache_mu. */
static void meter_cached_locked(const power_session *s, bool *ok, double *j, char *why, size_t cap) {
    *ok = s->meter_last_ok;
    *j = s->meter_last_j;
    snprintf(why, cap, "%s", s->meter_last_reason);
}

/* The meter command's reading for a scrape: runs the command when the last run ended
 * at least meter_interval_s ago and no run is in progress, else returns the last
 * reading at once. A scrape of /metrics may come from anyone; this bounds the forks
 * an anonymous client can cause to one per interval. Returns whether *j is a reading
 * (else why says what failed). */
static bool meter_scrape(power_session *s, double *j, char *why, size_t cap) {
    bool ok;
    pthread_mutex_lock(&s->meter_cache_mu);
    bool fresh = time_now_s() - s->meter_last_t < s->meter_interval_s;
    meter_cached_locked(s, &ok, j, why, cap);
    pthread_mutex_unlock(&s->meter_cache_mu);
    if (fresh || pthread_mutex_trylock(&s->meter_run_mu) != 0) return ok;
    pthread_mutex_lock(&s->meter_cache_mu); /* a run may have ended between the two locks */
    fresh = time_now_s() - s->meter_last_t < s->meter_interval_s;
    meter_cached_locked(s, &ok, j, why, cap);
    pthread_mutex_unlock(&s->meter_cache_mu);
    if (!fresh) {
        double v = 0;
        char e[POWER_REASON_LEN] = "";
        bool good = power_meter_cmd_read(s->meter_cmd, "scrape", s->meter_timeout_s, &v, e, sizeof e) == 0;
        pthread_mutex_lock(&s->meter_cache_mu);
        s->meter_last_t = time_now_s();
        s->meter_last_ok = good;
        if (good) s->meter_last_j = v;
        snprintf(s->meter_last_reason, sizeof s->meter_last_reason, "%s", good ? "" : e);
        meter_cached_locked(s, &ok, j, why, cap);
        pthread_mutex_unlock(&s->meter_cache_mu);
    }
    pthread_mutex_unlock(&s->meter_run_mu);
    return ok;
}

int power_session_live(power_session *s, bool read_meter, power_live *out) {
    PD_ASSERT(s && out);
    memset(out, 0, sizeof *out);
    if (!s->running) return -1;
    out->uptime_s = time_now_s() - s->t0;
    out->idle_window_s = s->n > 0 ? s->idle_window_s : 0;
    out->n_gpus = s->n;
    snprintf(out->gpu_reason, sizeof out->gpu_reason, "%s", s->nv ? "" : s->gpu_reason);
    /* NVML reads outside the lock (the counter read costs milliseconds). */
    uint64_t mj[POWER_MAX_GPUS];
    bool mj_ok[POWER_MAX_GPUS];
    for (int i = 0; i < s->n; i++) {
        gpu_track *g = &s->g[i];
        power_live_gpu *o = &out->gpu[i];
        o->index = g->nv_index;
        snprintf(o->name, sizeof o->name, "%s", power_nvml_name(s->nv, g->nv_index));
        o->role = g->role;
        o->idle_power_w = g->idle_w;
        mj_ok[i] = g->counter_ok && power_nvml_energy_mj(s->nv, g->nv_index, &mj[i]) == 0;
        power_nvml_sample(s->nv, g->nv_index, POWER_SAMPLE_POWER | POWER_SAMPLE_SM | POWER_SAMPLE_MEM,
                          &o->now);
        o->now.t_s = out->uptime_s;
    }
    uint64_t rnow[POWER_MAX_RAPL];
    bool rnow_ok[POWER_MAX_RAPL];
    for (int i = 0; i < s->rapl.n; i++) {
        char err[POWER_REASON_LEN];
        rnow_ok[i] = s->rapl_ok[i] && power_rapl_read(&s->rapl, i, &rnow[i], err, sizeof err) == 0;
    }
    pthread_mutex_lock(&s->live_mu);
    for (int i = 0; i < s->n; i++) {
        gpu_track *g = &s->g[i];
        power_live_gpu *o = &out->gpu[i];
        if (g->counter_ok) {
            o->source = POWER_SOURCE_COUNTER;
            o->energy_j = mj_ok[i] ? power_fig_of((double)power_counter_delta(g->start_mj, mj[i], 0) / 1000.0)
                                   : power_fig_none();
        } else if (g->n_samples >= 2) {
            o->source = POWER_SOURCE_SAMPLES;
            o->energy_j = power_fig_of(g->energy_j);
        } else {
            o->source = g->n_samples > 0 ? POWER_SOURCE_SAMPLES : POWER_SOURCE_NONE;
            o->energy_j = g->n_samples > 0 ? power_fig_of(0.0) : power_fig_none();
        }
    }
    out->n_rapl = s->rapl.n;
    snprintf(out->rapl_reason, sizeof out->rapl_reason, "%s", s->rapl.reason);
    for (int i = 0; i < s->rapl.n; i++) {
        power_rapl_result *r = &out->rapl[i];
        snprintf(r->name, sizeof r->name, "%s", s->rapl.d[i].name);
        r->is_dram = s->rapl.d[i].is_dram;
        if (s->rapl_ok[i] && rnow_ok[i]) {
            uint64_t acc = s->rapl_acc[i] + power_counter_delta(s->rapl_last[i], rnow[i], s->rapl.d[i].range_uj);
            r->energy_j = power_fig_of((double)acc / 1e6);
        } else {
            r->energy_j = power_fig_none();
            snprintf(r->reason, sizeof r->reason, "%s", s->rapl_ok[i] ? "read failed" : s->rapl_err[i]);
        }
    }
    pthread_mutex_unlock(&s->live_mu);
    snprintf(out->meter_label, sizeof out->meter_label, "%s", s->meter_label);
    out->meter_j = power_fig_none();
    if (s->meter_ok && read_meter) {
        double now_j;
        char why[POWER_REASON_LEN];
        if (meter_scrape(s, &now_j, why, sizeof why))
            out->meter_j = power_fig_of(now_j - s->meter_start_j);
        else
            snprintf(out->meter_reason, sizeof out->meter_reason, "%s", why);
    } else {
        snprintf(out->meter_reason, sizeof out->meter_reason, "%s",
                 s->meter_ok ? "not read" : s->meter_reason);
    }
    return 0;
}

/* ---- the rings, live (GET /metrics/power-samples) ------------------------------------------ */

/* Index range of a ring of cap entries with pushed pushes whose times t(k) are newer
 * than since: the first such index (as a push number) and how many; *lost when
 * samples newer than since were overwritten already. t_at(k) reads push number k. */
typedef double (*ring_time_fn)(const void *ring, size_t slot);

static size_t ring_since(const void *ring, ring_time_fn t_at, size_t cap, uint64_t pushed, double since_s,
                         uint64_t *first, bool *lost) {
    uint64_t held = PD_MIN(pushed, (uint64_t)cap), oldest = pushed - held, k = pushed;
    while (k > oldest && t_at(ring, (size_t)((k - 1) % cap)) > since_s) k--;
    *first = k;
    *lost = k == oldest && oldest > 0; /* even the oldest held sample is newer: some were dropped */
    return (size_t)(pushed - k);
}

static double gpu_t_at(const void *ring, size_t slot) { return ((const power_sample *)ring)[slot].t_s; }
static double rapl_t_at(const void *ring, size_t slot) { return ((const double *)ring)[slot]; }

size_t power_session_samples_since(power_session *s, int i, double since_s, power_sample *out, size_t cap,
                                   bool *lost, bool *more) {
    PD_ASSERT(s && out && lost && more);
    *lost = *more = false;
    pthread_mutex_lock(&s->live_mu);
    size_t n = 0;
    if (s->running && i >= 0 && i < s->n) {
        gpu_track *g = &s->g[i];
        uint64_t first;
        n = ring_since(g->ring, gpu_t_at, g->cap, g->pushed, since_s, &first, lost);
        if (n > cap) n = cap, *more = true;
        for (size_t k = 0; k < n; k++) out[k] = g->ring[(first + k) % g->cap];
    }
    pthread_mutex_unlock(&s->live_mu);
    return n;
}

size_t power_session_rapl_since(power_session *s, double since_s, power_rapl_sample *out, size_t cap,
                                bool *lost, bool *more) {
    PD_ASSERT(s && out && lost && more);
    *lost = *more = false;
    pthread_mutex_lock(&s->live_mu);
    size_t n = 0;
    if (s->running && s->rapl_cap) {
        uint64_t first;
        n = ring_since(s->rapl_t, rapl_t_at, s->rapl_cap, s->rapl_pushed, since_s, &first, lost);
        if (n > cap) n = cap, *more = true;
        for (size_t k = 0; k < n; k++) {
            size_t slot = (size_t)((first + k) % s->rapl_cap);
            out[k].t_s = s->rapl_t[slot];
            for (int d = 0; d < POWER_MAX_RAPL; d++)
                out[k].power_w[d] = d < s->rapl.n ? s->rapl_w[slot * (size_t)s->rapl.n + (size_t)d] : NAN;
        }
    }
    pthread_mutex_unlock(&s->live_mu);
    return n;
}

int power_session_describe(power_session *s, power_ring_info *out) {
    PD_ASSERT(s && out);
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&s->live_mu);
    bool running = s->running;
    out->uptime_s = running ? time_now_s() - s->t0 : 0;
    out->period_s = s->period_s;
    out->n_gpus = s->n;
    for (int i = 0; i < s->n; i++) {
        out->gpu[i] = s->g[i].nv_index;
        out->role[i] = s->g[i].role;
    }
    out->n_rapl = s->rapl.n;
    for (int i = 0; i < s->rapl.n; i++) snprintf(out->rapl[i], sizeof out->rapl[i], "%s", s->rapl.d[i].name);
    out->capacity = s->n ? s->g[0].cap : s->rapl_cap;
    pthread_mutex_unlock(&s->live_mu);
    return running ? 0 : -1;
}
