/* metrics_text.c: energy in Prometheus text, both ways.
 *
 * power_live_prometheus: what one serving instance adds to its GET /metrics (a live
 * reading of its power session). power_metrics_aggregate: the reverse, for a router or
 * a sweep that reads several instances' /metrics and wants energy by GPU and by role.
 *
 * The contract with src/bench (bench_energy_parse) and src/study (db.c): every sample
 * named *_energy_joules is one physical meter's cumulative joules, labelled with host
 * (and gpu/domain), so that the difference of two scrapes is that meter's energy and a
 * meter read through two instances of one host is counted once. Derived sums (per
 * role, per component) carry other names. Nothing here is on the token path. */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "power/power.h"
#include "util/util.h"

typedef struct tbuf {
    char *p;
    size_t cap, len;
} tbuf;

__attribute__((format(printf, 2, 3))) static void tb(tbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    size_t room = b->len < b->cap ? b->cap - b->len : 0;
    int n = vsnprintf(room ? b->p + b->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0) b->len += (size_t)n;
}

static void family(tbuf *b, const char *name, const char *type, const char *help) {
    tb(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Label value: backslash, quote and newline escaped. */
static void esc(char *out, size_t cap, const char *s) {
    size_t k = 0;
    for (; *s && k + 3 < cap; s++) {
        if (*s == '\\' || *s == '"') out[k++] = '\\', out[k++] = *s;
        else if (*s == '\n') out[k++] = '\\', out[k++] = 'n';
        else out[k++] = *s;
    }
    out[k] = 0;
}

/* A meter label as a metric-name part: [a-z0-9_], "meter" when empty. */
static void name_part(char *out, size_t cap, const char *s) {
    size_t k = 0;
    for (; s && *s && k + 1 < cap; s++)
        out[k++] = isalnum((unsigned char)*s) ? (char)tolower((unsigned char)*s) : '_';
    out[k] = 0;
    if (!k) snprintf(out, cap, "meter");
}

size_t power_live_prometheus(const power_live *l, const char *host, char *buf, size_t cap) {
    tbuf b = {buf, cap, 0};
    if (cap) buf[0] = 0;
    char hn[64] = "", h[140];
    if (!host) {
        if (gethostname(hn, sizeof hn - 1) != 0) snprintf(hn, sizeof hn, "localhost");
        hn[sizeof hn - 1] = 0;
        host = hn;
    }
    esc(h, sizeof h, host);
    bool gpu_ok = l->n_gpus > 0, cpu_any = false, cpu_ok = true, dram_any = false, dram_ok = true;
    for (int i = 0; i < l->n_gpus; i++) gpu_ok &= l->gpu[i].energy_j.measured;
    for (int i = 0; i < l->n_rapl; i++) {
        bool *any = l->rapl[i].is_dram ? &dram_any : &cpu_any, *ok = l->rapl[i].is_dram ? &dram_ok : &cpu_ok;
        *any = true;
        *ok &= l->rapl[i].energy_j.measured;
    }
    char ml[32];
    name_part(ml, sizeof ml, l->meter_label);
    family(&b, "pdserve_energy_measured", "gauge",
           "1 when this instance measures the component's energy now, 0 when not (then its lines are absent)");
    tb(&b, "pdserve_energy_measured{component=\"gpu\"} %d\n", gpu_ok ? 1 : 0);
    tb(&b, "pdserve_energy_measured{component=\"cpu\"} %d\n", cpu_any && cpu_ok ? 1 : 0);
    tb(&b, "pdserve_energy_measured{component=\"dram\"} %d\n", dram_any && dram_ok ? 1 : 0);
    tb(&b, "pdserve_energy_measured{component=\"%s\"} %d\n", ml, l->meter_j.measured ? 1 : 0);
    family(&b, "pdserve_energy_uptime_seconds", "counter", "Seconds since this instance's energy meters started");
    tb(&b, "pdserve_energy_uptime_seconds{host=\"%s\"} %.3f\n", h, l->uptime_s);
    if (l->n_gpus > 0) {
        family(&b, "pdserve_gpu_energy_joules", "counter",
               "GPU energy since start-up (NVML energy counter), static energy included");
        for (int i = 0; i < l->n_gpus; i++) {
            const power_live_gpu *g = &l->gpu[i];
            if (g->energy_j.measured)
                tb(&b, "pdserve_gpu_energy_joules{host=\"%s\",gpu=\"%d\",role=\"%s\",source=\"%s\"} %.3f\n", h,
                   g->index, power_role_name(g->role), g->source == POWER_SOURCE_COUNTER ? "counter" : "samples",
                   g->energy_j.value);
        }
        family(&b, "pdserve_gpu_idle_power_watts", "gauge",
               "GPU idle power measured at start-up; idle-subtracted energy = delta - this x seconds");
        for (int i = 0; i < l->n_gpus; i++)
            if (l->gpu[i].idle_power_w.measured)
                tb(&b, "pdserve_gpu_idle_power_watts{host=\"%s\",gpu=\"%d\",role=\"%s\"} %.3f\n", h,
                   l->gpu[i].index, power_role_name(l->gpu[i].role), l->gpu[i].idle_power_w.value);
        family(&b, "pdserve_gpu_power_watts", "gauge", "GPU power now");
        for (int i = 0; i < l->n_gpus; i++)
            if (l->gpu[i].now.valid & POWER_SAMPLE_POWER)
                tb(&b, "pdserve_gpu_power_watts{host=\"%s\",gpu=\"%d\",role=\"%s\"} %.3f\n", h, l->gpu[i].index,
                   power_role_name(l->gpu[i].role), (double)l->gpu[i].now.power_w);
        family(&b, "pdserve_gpu_sm_clock_mhz", "gauge", "GPU SM clock now");
        for (int i = 0; i < l->n_gpus; i++)
            if (l->gpu[i].now.valid & POWER_SAMPLE_SM)
                tb(&b, "pdserve_gpu_sm_clock_mhz{host=\"%s\",gpu=\"%d\",role=\"%s\"} %u\n", h, l->gpu[i].index,
                   power_role_name(l->gpu[i].role), (unsigned)l->gpu[i].now.sm_mhz);
        family(&b, "pdserve_gpu_mem_clock_mhz", "gauge", "GPU memory clock now");
        for (int i = 0; i < l->n_gpus; i++)
            if (l->gpu[i].now.valid & POWER_SAMPLE_MEM)
                tb(&b, "pdserve_gpu_mem_clock_mhz{host=\"%s\",gpu=\"%d\",role=\"%s\"} %u\n", h, l->gpu[i].index,
                   power_role_name(l->gpu[i].role), (unsigned)l->gpu[i].now.mem_mhz);
    }
    for (int pass = 0; pass < 2; pass++) {
        bool any = pass ? dram_any : cpu_any;
        if (!any) continue;
        const char *fam = pass ? "pdserve_dram_energy_joules" : "pdserve_cpu_energy_joules";
        family(&b, fam, "counter", pass ? "DRAM energy since start-up (RAPL)" : "CPU package energy since start-up (RAPL)");
        for (int i = 0; i < l->n_rapl; i++)
            if (l->rapl[i].is_dram == (pass == 1) && l->rapl[i].energy_j.measured)
                tb(&b, "%s{host=\"%s\",domain=\"%s\"} %.3f\n", fam, h, l->rapl[i].name, l->rapl[i].energy_j.value);
    }
    if (l->meter_j.measured) {
        char fam[80];
        snprintf(fam, sizeof fam, "pdserve_%s_energy_joules", ml);
        family(&b, fam, "counter", "Energy from --energy-meter-cmd since start-up");
        tb(&b, "%s{host=\"%s\"} %.3f\n", fam, h, l->meter_j.value);
    }
    return b.len;
}

/* ---- parsing ------------------------------------------------------------------------ */

/* Value of label key in labels[0..n) ("{a=\"x\",b=\"y\"}") into out; "" when absent. */
static void label(const char *labels, size_t n, const char *key, char *out, size_t cap) {
    out[0] = 0;
    size_t kl = strlen(key);
    for (size_t i = 0; i + kl + 2 <= n; i++) {
        if ((i == 0 || labels[i - 1] == '{' || labels[i - 1] == ',' || labels[i - 1] == ' ') &&
            !memcmp(labels + i, key, kl) && labels[i + kl] == '=' && labels[i + kl + 1] == '"') {
            size_t k = 0;
            for (size_t j = i + kl + 2; j < n && labels[j] != '"' && k + 1 < cap; j++) {
                if (labels[j] == '\\' && j + 1 < n) j++;
                out[k++] = labels[j];
            }
            out[k] = 0;
            return;
        }
    }
}

static bool ends_with(const char *s, size_t n, const char *suf) {
    size_t k = strlen(suf);
    return n >= k && !memcmp(s + n - k, suf, k);
}

static power_agg_series *agg_find(power_agg *a, const char *host, const char *comp, const char *gpu,
                                  const char *domain, bool create) {
    for (int i = 0; i < a->n; i++) {
        power_agg_series *s = &a->s[i];
        if (!strcmp(s->host, host) && !strcmp(s->component, comp) && !strcmp(s->gpu, gpu) &&
            !strcmp(s->domain, domain))
            return s;
    }
    if (!create || a->n >= POWER_AGG_MAX) return NULL;
    power_agg_series *s = &a->s[a->n++];
    memset(s, 0, sizeof *s);
    snprintf(s->host, sizeof s->host, "%s", host);
    snprintf(s->component, sizeof s->component, "%s", comp);
    snprintf(s->gpu, sizeof s->gpu, "%s", gpu);
    snprintf(s->domain, sizeof s->domain, "%s", domain);
    s->joules = NAN;
    s->power_w = NAN;
    return s;
}

/* One text: its lines into a (duplicates across texts are one meter). */
static int agg_text(power_agg *a, const char *text) {
    int found = 0;
    const char *p = text;
    while (*p) {
        const char *nl = strchr(p, '\n');
        const char *le = nl ? nl : p + strlen(p);
        const char *q = p;
        p = nl ? nl + 1 : le;
        while (q < le && (*q == ' ' || *q == '\t')) q++;
        if (q >= le || *q == '#') continue;
        const char *name = q;
        while (q < le && (isalnum((unsigned char)*q) || *q == '_' || *q == ':')) q++;
        size_t nn = (size_t)(q - name);
        if (nn < 9 || memcmp(name, "pdserve_", 8) != 0) continue;
        const char *lb = q;
        q = util_prom_skip_labels(q, le);
        if (!q) continue;
        size_t ln = (size_t)(q - lb);
        char num[64];
        while (q < le && (*q == ' ' || *q == '\t')) q++;
        size_t vn = PD_MIN((size_t)(le - q), sizeof num - 1);
        memcpy(num, q, vn);
        num[vn] = 0;
        char *vend;
        double v = strtod(num, &vend);
        if (vend == num || !isfinite(v)) continue;
        char host[64], gpu[16], role[16], domain[48], comp[32];
        label(lb, ln, "host", host, sizeof host);
        label(lb, ln, "gpu", gpu, sizeof gpu);
        label(lb, ln, "role", role, sizeof role);
        label(lb, ln, "domain", domain, sizeof domain);
        const char *base = name + 8;
        size_t bn = nn - 8;
        if (bn == strlen("energy_measured") && !memcmp(base, "energy_measured", bn)) {
            label(lb, ln, "component", comp, sizeof comp);
            bool m = v != 0;
            if (!strcmp(comp, "gpu")) a->measured_gpu = (a->seen_gpu ? a->measured_gpu : true) && m, a->seen_gpu = true;
            else if (!strcmp(comp, "cpu")) a->measured_cpu = (a->seen_cpu ? a->measured_cpu : true) && m, a->seen_cpu = true;
            else if (!strcmp(comp, "dram")) a->measured_dram = (a->seen_dram ? a->measured_dram : true) && m, a->seen_dram = true;
            else a->measured_meter = (a->seen_meter ? a->measured_meter : true) && m, a->seen_meter = true;
            found++;
            continue;
        }
        if (ends_with(base, bn, "_energy_joules")) {
            size_t cn = bn - strlen("_energy_joules");
            snprintf(comp, sizeof comp, "%.*s", (int)PD_MIN(cn, sizeof comp - 1), base);
            /* derived sums of power_result_prometheus / power_agg_prometheus: not meters */
            if (!strcmp(comp, "role") || !strcmp(comp, "component") || !strcmp(comp, "gpu_active")) continue;
            if (strcmp(comp, "gpu") != 0) gpu[0] = 0;
            power_agg_series *s = agg_find(a, host, comp, gpu, domain, true);
            if (!s) continue;
            if (!s->role[0]) snprintf(s->role, sizeof s->role, "%s", role);
            s->joules = v; /* the same meter through two instances: one reading */
            found++;
        } else if (bn == strlen("gpu_idle_power_watts") && !memcmp(base, "gpu_idle_power_watts", bn)) {
            power_agg_series *s = agg_find(a, host, "gpu", gpu, "", true);
            if (!s) continue;
            if (!s->role[0]) snprintf(s->role, sizeof s->role, "%s", role);
            s->idle_w = v;
            s->has_idle = true;
        } else if (bn == strlen("gpu_power_watts") && !memcmp(base, "gpu_power_watts", bn)) {
            power_agg_series *s = agg_find(a, host, "gpu", gpu, "", true);
            if (s) s->power_w = v;
        }
    }
    return found;
}

int power_metrics_aggregate(const char *const *texts, int n, power_agg *out) {
    memset(out, 0, sizeof *out);
    int found = 0;
    for (int i = 0; i < n; i++) {
        if (!texts[i]) continue;
        out->n_texts++;
        found += agg_text(out, texts[i]);
    }
    for (int i = 0; i < out->n; i++) {
        const power_agg_series *s = &out->s[i];
        if (strcmp(s->component, "gpu") != 0 || isnan(s->joules)) continue;
        power_role r;
        if (power_role_parse(s->role, &r) != 0) r = POWER_ROLE_COLOCATED;
        out->role_j[r] += s->joules;
        out->role_has[r] = true;
        out->gpu_j += s->joules;
        out->gpu_has = true;
        if (s->has_idle) {
            out->role_idle_w[r] += s->idle_w;
            out->gpu_idle_w += s->idle_w;
        }
    }
    return found > 0 ? 0 : -1;
}

size_t power_agg_prometheus(const power_agg *a, char *buf, size_t cap) {
    tbuf b = {buf, cap, 0};
    if (cap) buf[0] = 0;
    family(&b, "pdserve_energy_measured", "gauge", "1 when every instance reporting the component measures it");
    tb(&b, "pdserve_energy_measured{component=\"gpu\"} %d\n", a->seen_gpu && a->measured_gpu && a->gpu_has ? 1 : 0);
    tb(&b, "pdserve_energy_measured{component=\"cpu\"} %d\n", a->seen_cpu && a->measured_cpu ? 1 : 0);
    tb(&b, "pdserve_energy_measured{component=\"dram\"} %d\n", a->seen_dram && a->measured_dram ? 1 : 0);
    char h[140], d[100];
    const char *last = "";
    for (int i = 0; i < a->n; i++) {
        const power_agg_series *s = &a->s[i];
        if (isnan(s->joules)) continue;
        char fam[80];
        snprintf(fam, sizeof fam, "pdserve_%s_energy_joules", s->component);
        if (strcmp(last, s->component) != 0) family(&b, fam, "counter", "Energy since the instance started (per meter)");
        last = s->component;
        esc(h, sizeof h, s->host);
        if (s->gpu[0]) tb(&b, "%s{host=\"%s\",gpu=\"%s\",role=\"%s\"} %.3f\n", fam, h, s->gpu, s->role, s->joules);
        else if (s->domain[0]) {
            esc(d, sizeof d, s->domain);
            tb(&b, "%s{host=\"%s\",domain=\"%s\"} %.3f\n", fam, h, d, s->joules);
        } else tb(&b, "%s{host=\"%s\"} %.3f\n", fam, h, s->joules);
    }
    family(&b, "pdserve_gpu_idle_power_watts", "gauge", "GPU idle power measured at each instance's start-up");
    for (int i = 0; i < a->n; i++)
        if (a->s[i].has_idle) {
            esc(h, sizeof h, a->s[i].host);
            tb(&b, "pdserve_gpu_idle_power_watts{host=\"%s\",gpu=\"%s\",role=\"%s\"} %.3f\n", h, a->s[i].gpu,
               a->s[i].role, a->s[i].idle_w);
        }
    family(&b, "pdserve_role_energy_joules", "counter", "GPU energy summed by role (a sum: not a meter)");
    for (int r = 0; r < POWER_ROLE_COUNT; r++)
        if (a->role_has[r])
            tb(&b, "pdserve_role_energy_joules{role=\"%s\"} %.3f\n", power_role_name((power_role)r), a->role_j[r]);
    family(&b, "pdserve_role_idle_power_watts", "gauge", "GPU idle power summed by role");
    for (int r = 0; r < POWER_ROLE_COUNT; r++)
        if (a->role_has[r])
            tb(&b, "pdserve_role_idle_power_watts{role=\"%s\"} %.3f\n", power_role_name((power_role)r),
               a->role_idle_w[r]);
    return b.len;
}
