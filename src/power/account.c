/* account.c: turning raw meter readings into the figures a run reports: energy per
 * GPU, per role and per component, whole and idle-subtracted, and joules per request,
 * per token and per output token; formatted as Prometheus text and as JSON. Pure: no
 * I/O, so the tests check the arithmetic on hand-made inputs.
 *
 * The rule throughout: a derived figure is measured only when everything it depends on
 * was measured. A sum over GPUs with one unmeasured GPU is not measured; it is never a
 * smaller number that looks measured. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "power/power.h"
#include "util/util.h"

const char *power_role_name(power_role r) {
    switch (r) {
    case POWER_ROLE_COLOCATED: return "colocated";
    case POWER_ROLE_PREFILL: return "prefill";
    case POWER_ROLE_DECODE: return "decode";
    case POWER_ROLE_IDLE: return "idle";
    default: return "unknown";
    }
}

int power_role_parse(const char *s, power_role *out) {
    for (int r = 0; r < POWER_ROLE_COUNT; r++) {
        if (s && strcmp(s, power_role_name((power_role)r)) == 0) {
            *out = (power_role)r;
            return 0;
        }
    }
    return -1;
}

const char *power_component_name(power_component c) {
    static const char *names[POWER_COMP_COUNT] = {"gpu", "cpu", "dram", "meter", "disk", "nic"};
    return c >= 0 && c < POWER_COMP_COUNT ? names[c] : "unknown";
}

/* ---- arithmetic on figures ---------------------------------------------------------- */

/* Sum accumulator: measured when at least one term was added and none was missing. */
typedef struct fig_sum {
    double v;
    int terms, missing;
} fig_sum;

static void sum_add(fig_sum *s, power_fig f) {
    if (f.measured) s->v += f.value;
    else s->missing++;
    s->terms++;
}

static power_fig sum_fig(const fig_sum *s) {
    return s->terms > 0 && s->missing == 0 ? power_fig_of(s->v) : power_fig_none();
}

static power_fig fig_div(power_fig a, double d) {
    return a.measured && d > 0 ? power_fig_of(a.value / d) : power_fig_none();
}

static void gpu_compute(power_gpu_result *g, double duration) {
    g->source = POWER_SOURCE_NONE;
    g->energy_j = power_fig_none();
    if (g->counter_ok) {
        uint64_t mj = power_counter_delta(g->counter_start_mj, g->counter_end_mj, 0);
        g->energy_j = power_fig_of((double)mj / 1000.0);
        g->source = POWER_SOURCE_COUNTER;
    } else if (g->sampled_j.measured) {
        g->energy_j = g->sampled_j;
        g->source = POWER_SOURCE_SAMPLES;
    }
    g->idle_j = g->idle_power_w.measured && duration >= 0
                    ? power_fig_of(g->idle_power_w.value * duration)
                    : power_fig_none();
    g->active_j = g->energy_j.measured && g->idle_j.measured
                      ? power_fig_of(g->energy_j.value - g->idle_j.value)
                      : power_fig_none();
    g->mean_power_w = fig_div(g->energy_j, duration);
    g->counter_vs_samples = power_fig_none();
    if (g->source == POWER_SOURCE_COUNTER && g->sampled_j.measured && g->energy_j.value > 0)
        g->counter_vs_samples = power_fig_of(g->sampled_j.value / g->energy_j.value - 1.0);
}

static power_per_unit per_unit(power_fig j, const power_result *r) {
    power_per_unit u;
    u.per_request = fig_div(j, (double)r->n_requests);
    u.per_token = fig_div(j, (double)(r->n_input_tokens + r->n_output_tokens));
    u.per_output_token = fig_div(j, (double)r->n_output_tokens);
    return u;
}

void power_result_compute(power_result *r) {
    PD_ASSERT(r && r->n_gpus >= 0 && r->n_gpus <= POWER_MAX_GPUS);
    PD_ASSERT(r->n_rapl >= 0 && r->n_rapl <= POWER_MAX_RAPL);
    fig_sum role[POWER_ROLE_COUNT] = {{0}}, role_act[POWER_ROLE_COUNT] = {{0}};
    fig_sum all = {0}, idle = {0}, act = {0};
    for (int i = 0; i < r->n_gpus; i++) {
        power_gpu_result *g = &r->gpu[i];
        PD_ASSERT(g->role >= 0 && g->role < POWER_ROLE_COUNT);
        gpu_compute(g, r->duration_s);
        sum_add(&role[g->role], g->energy_j);
        sum_add(&role_act[g->role], g->active_j);
        sum_add(&all, g->energy_j);
        sum_add(&idle, g->idle_j);
        sum_add(&act, g->active_j);
    }
    for (int k = 0; k < POWER_ROLE_COUNT; k++) {
        r->role_j[k] = sum_fig(&role[k]);
        r->role_active_j[k] = sum_fig(&role_act[k]);
    }
    r->gpu_j = sum_fig(&all);
    r->gpu_idle_j = sum_fig(&idle);
    r->gpu_active_j = sum_fig(&act);

    fig_sum cpu = {0}, dram = {0};
    for (int i = 0; i < r->n_rapl; i++) sum_add(r->rapl[i].is_dram ? &dram : &cpu, r->rapl[i].energy_j);
    for (int c = 0; c < POWER_COMP_COUNT; c++) r->component_j[c] = power_fig_none();
    r->component_j[POWER_COMP_GPU] = r->gpu_j;
    r->component_j[POWER_COMP_CPU] = sum_fig(&cpu);
    r->component_j[POWER_COMP_DRAM] = sum_fig(&dram);
    if (!r->meter_label[0]) snprintf(r->meter_label, sizeof r->meter_label, "meter");
    bool node = strcmp(r->meter_label, "node") == 0;
    power_component mc = strcmp(r->meter_label, "disk") == 0  ? POWER_COMP_DISK
                         : strcmp(r->meter_label, "nic") == 0 ? POWER_COMP_NIC
                                                              : POWER_COMP_METER;
    r->component_j[mc] = r->meter_j;

    /* Total: a "node" meter already contains every other component, so it is the
     * total by itself; any other meter adds a component of its own. */
    if (node && r->meter_j.measured) {
        r->total_j = r->meter_j;
    } else {
        double t = 0;
        int n = 0;
        for (int c = 0; c < POWER_COMP_COUNT; c++) {
            if (!r->component_j[c].measured) continue;
            t += r->component_j[c].value;
            n++;
        }
        r->total_j = n ? power_fig_of(t) : power_fig_none();
    }
    r->per_gpu = per_unit(r->gpu_j, r);
    r->per_gpu_active = per_unit(r->gpu_active_j, r);
    r->per_total = per_unit(r->total_j, r);
}

/* ---- Prometheus text ------------------------------------------------------------------ */

typedef struct text_buf {
    char *p;
    size_t cap, len; /* len counts what would have been written */
} text_buf;

static void tb_printf(text_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(text_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    size_t room = b->len < b->cap ? b->cap - b->len : 0;
    int n = vsnprintf(room ? b->p + b->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0) b->len += (size_t)n;
}

static void tb_family(text_buf *b, const char *name, const char *help) {
    tb_printf(b, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name);
}

static void tb_per_unit(text_buf *b, const char *metric, const char *help, const power_result *r,
                        size_t off) {
    const char *scopes[3] = {"gpu", "gpu_active", "total"};
    const power_per_unit *u[3] = {&r->per_gpu, &r->per_gpu_active, &r->per_total};
    tb_family(b, metric, help);
    for (int i = 0; i < 3; i++) {
        const power_fig *f = (const power_fig *)((const char *)u[i] + off);
        if (f->measured) tb_printf(b, "%s{scope=\"%s\"} %.6g\n", metric, scopes[i], f->value);
    }
}

size_t power_result_prometheus(const power_result *r, char *buf, size_t cap) {
    text_buf b = {buf, cap, 0};
    if (cap) buf[0] = 0;
    tb_family(&b, "pdserve_energy_measured", "1 when the component's energy was measured in the last run, 0 when not");
    for (int c = 0; c < POWER_COMP_COUNT; c++)
        tb_printf(&b, "pdserve_energy_measured{component=\"%s\"} %d\n",
                  power_component_name((power_component)c), r->component_j[c].measured ? 1 : 0);
    tb_family(&b, "pdserve_energy_run_seconds", "Duration of the last measured run");
    tb_printf(&b, "pdserve_energy_run_seconds %.6g\n", r->duration_s);
    tb_family(&b, "pdserve_gpu_energy_joules", "GPU energy over the last run (NVML energy counter), idle included");
    for (int i = 0; i < r->n_gpus; i++)
        if (r->gpu[i].energy_j.measured)
            tb_printf(&b, "pdserve_gpu_energy_joules{gpu=\"%d\",role=\"%s\"} %.6g\n", r->gpu[i].index,
                      power_role_name(r->gpu[i].role), r->gpu[i].energy_j.value);
    tb_family(&b, "pdserve_gpu_active_energy_joules", "GPU energy over the last run minus idle power times duration");
    for (int i = 0; i < r->n_gpus; i++)
        if (r->gpu[i].active_j.measured)
            tb_printf(&b, "pdserve_gpu_active_energy_joules{gpu=\"%d\",role=\"%s\"} %.6g\n",
                      r->gpu[i].index, power_role_name(r->gpu[i].role), r->gpu[i].active_j.value);
    tb_family(&b, "pdserve_gpu_power_watts", "Mean GPU power over the last run");
    for (int i = 0; i < r->n_gpus; i++)
        if (r->gpu[i].mean_power_w.measured)
            tb_printf(&b, "pdserve_gpu_power_watts{gpu=\"%d\",role=\"%s\"} %.6g\n", r->gpu[i].index,
                      power_role_name(r->gpu[i].role), r->gpu[i].mean_power_w.value);
    tb_family(&b, "pdserve_gpu_idle_power_watts", "GPU idle power measured before the last run");
    for (int i = 0; i < r->n_gpus; i++)
        if (r->gpu[i].idle_power_w.measured)
            tb_printf(&b, "pdserve_gpu_idle_power_watts{gpu=\"%d\"} %.6g\n", r->gpu[i].index,
                      r->gpu[i].idle_power_w.value);
    tb_family(&b, "pdserve_role_energy_joules", "GPU energy of the last run summed by role");
    for (int k = 0; k < POWER_ROLE_COUNT; k++)
        if (r->role_j[k].measured)
            tb_printf(&b, "pdserve_role_energy_joules{role=\"%s\"} %.6g\n",
                      power_role_name((power_role)k), r->role_j[k].value);
    tb_family(&b, "pdserve_cpu_energy_joules", "RAPL energy over the last run per domain");
    for (int i = 0; i < r->n_rapl; i++)
        if (r->rapl[i].energy_j.measured)
            tb_printf(&b, "pdserve_cpu_energy_joules{domain=\"%s\"} %.6g\n", r->rapl[i].name,
                      r->rapl[i].energy_j.value);
    tb_family(&b, "pdserve_component_energy_joules", "Energy of the last run per component");
    for (int c = 0; c < POWER_COMP_COUNT; c++)
        if (r->component_j[c].measured)
            tb_printf(&b, "pdserve_component_energy_joules{component=\"%s\"} %.6g\n",
                      power_component_name((power_component)c), r->component_j[c].value);
    tb_per_unit(&b, "pdserve_energy_joules_per_token", "Energy per input+output token of the last run",
                r, offsetof(power_per_unit, per_token));
    tb_per_unit(&b, "pdserve_energy_joules_per_output_token", "Energy per output token of the last run",
                r, offsetof(power_per_unit, per_output_token));
    tb_per_unit(&b, "pdserve_energy_joules_per_request", "Energy per request of the last run", r,
                offsetof(power_per_unit, per_request));
    return b.len;
}

/* ---- JSON ------------------------------------------------------------------------------ */

static void json_fig(cJSON *o, const char *key, power_fig f) {
    if (f.measured) cJSON_AddNumberToObject(o, key, f.value);
    else cJSON_AddNullToObject(o, key);
}

static cJSON *json_per_unit(const power_per_unit *u) {
    cJSON *o = cJSON_CreateObject();
    json_fig(o, "per_request", u->per_request);
    json_fig(o, "per_token", u->per_token);
    json_fig(o, "per_output_token", u->per_output_token);
    return o;
}

static cJSON *json_gpu(const power_gpu_result *g) {
    static const char *src[] = {"not measured", "energy counter", "power samples"};
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "index", g->index);
    cJSON_AddStringToObject(o, "name", g->name);
    cJSON_AddStringToObject(o, "role", power_role_name(g->role));
    cJSON_AddStringToObject(o, "source", src[g->source]);
    json_fig(o, "energy_j", g->energy_j);
    json_fig(o, "idle_power_w", g->idle_power_w);
    json_fig(o, "idle_j", g->idle_j);
    json_fig(o, "active_j", g->active_j);
    json_fig(o, "mean_power_w", g->mean_power_w);
    json_fig(o, "peak_power_w", g->peak_power_w);
    json_fig(o, "sampled_j", g->sampled_j);
    json_fig(o, "counter_vs_samples", g->counter_vs_samples);
    cJSON_AddNumberToObject(o, "samples", g->n_samples);
    cJSON_AddNumberToObject(o, "gaps", g->n_gaps);
    cJSON_AddNumberToObject(o, "gap_time_s", g->gap_time_s);
    return o;
}

struct cJSON *power_result_json(const power_result *r) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "duration_s", r->duration_s);
    cJSON_AddNumberToObject(o, "idle_window_s", r->idle_window_s);
    cJSON_AddNumberToObject(o, "sample_period_s", r->sample_period_s);
    cJSON_AddNumberToObject(o, "sampler_cost_mean_ms", r->sampler_cost_mean_ms);
    cJSON_AddNumberToObject(o, "sampler_cost_max_ms", r->sampler_cost_max_ms);
    cJSON_AddNumberToObject(o, "requests", (double)r->n_requests);
    cJSON_AddNumberToObject(o, "input_tokens", (double)r->n_input_tokens);
    cJSON_AddNumberToObject(o, "output_tokens", (double)r->n_output_tokens);
    cJSON *gpus = cJSON_AddArrayToObject(o, "gpus");
    for (int i = 0; i < r->n_gpus; i++) cJSON_AddItemToArray(gpus, json_gpu(&r->gpu[i]));
    if (r->gpu_reason[0]) cJSON_AddStringToObject(o, "gpu_reason", r->gpu_reason);
    cJSON *cpu = cJSON_AddArrayToObject(o, "rapl");
    for (int i = 0; i < r->n_rapl; i++) {
        cJSON *d = cJSON_CreateObject();
        cJSON_AddStringToObject(d, "domain", r->rapl[i].name);
        json_fig(d, "energy_j", r->rapl[i].energy_j);
        if (r->rapl[i].reason[0]) cJSON_AddStringToObject(d, "reason", r->rapl[i].reason);
        cJSON_AddItemToArray(cpu, d);
    }
    if (r->rapl_reason[0]) cJSON_AddStringToObject(o, "rapl_reason", r->rapl_reason);
    cJSON *m = cJSON_AddObjectToObject(o, "meter");
    cJSON_AddStringToObject(m, "label", r->meter_label);
    json_fig(m, "energy_j", r->meter_j);
    if (r->meter_reason[0]) cJSON_AddStringToObject(m, "reason", r->meter_reason);
    cJSON *roles = cJSON_AddObjectToObject(o, "roles");
    for (int k = 0; k < POWER_ROLE_COUNT; k++) {
        if (!r->role_j[k].measured && !r->role_active_j[k].measured) continue;
        cJSON *ro = cJSON_AddObjectToObject(roles, power_role_name((power_role)k));
        json_fig(ro, "energy_j", r->role_j[k]);
        json_fig(ro, "active_j", r->role_active_j[k]);
    }
    cJSON *comp = cJSON_AddObjectToObject(o, "components");
    cJSON *meas = cJSON_AddObjectToObject(o, "measured");
    for (int c = 0; c < POWER_COMP_COUNT; c++) {
        json_fig(comp, power_component_name((power_component)c), r->component_j[c]);
        cJSON_AddBoolToObject(meas, power_component_name((power_component)c), r->component_j[c].measured);
    }
    json_fig(o, "gpu_j", r->gpu_j);
    json_fig(o, "gpu_idle_j", r->gpu_idle_j);
    json_fig(o, "gpu_active_j", r->gpu_active_j);
    json_fig(o, "total_j", r->total_j);
    cJSON *pu = cJSON_AddObjectToObject(o, "per_unit");
    cJSON_AddItemToObject(pu, "gpu", json_per_unit(&r->per_gpu));
    cJSON_AddItemToObject(pu, "gpu_active", json_per_unit(&r->per_gpu_active));
    cJSON_AddItemToObject(pu, "total", json_per_unit(&r->per_total));
    return o;
}
