/* samples_json.c: the sampler's rings as JSON text, for GET /metrics/power-samples.
 *
 * Tuned for a sweep that fetches a whole point's samples at once: up to 6000 samples
 * (10 minutes at 100 ms) per GPU and for RAPL per request, written as arrays of numbers
 * (about 50 bytes a GPU sample) straight into one growing buffer, with no JSON tree in
 * between. The copy out of the rings happens under the sampler's lock
 * (power_session_samples_since); the formatting does not. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "power/power.h"
#include "util/util.h"

#define SAMPLES_DEFAULT_MAX 6000

typedef struct jbuf {
    char *p;
    size_t len, cap;
} jbuf;

static void jb_printf(jbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void jb_printf(jbuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        PD_ASSERT(n >= 0);
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        b->cap = PD_MAX(b->cap * 2, b->len + (size_t)n + 1);
        b->p = xrealloc(b->p, b->cap);
    }
}

/* A JSON string of plain text (names we made: hostnames, RAPL domain names). */
static void jb_str(jbuf *b, const char *s) {
    jb_printf(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') jb_printf(b, "\\%c", c);
        else if (c < 0x20) jb_printf(b, "\\u%04x", c);
        else jb_printf(b, "%c", c);
    }
    jb_printf(b, "\"");
}

static void jb_field(jbuf *b, bool valid, double v, const char *fmt) {
    if (!valid || !isfinite(v)) jb_printf(b, ",null");
    else {
        jb_printf(b, ",");
        jb_printf(b, fmt, v);
    }
}

static void gpu_series(jbuf *b, power_session *s, const power_ring_info *info, int i, double since_s,
                       power_sample *buf, size_t max) {
    bool lost, more;
    size_t n = power_session_samples_since(s, i, since_s, buf, max, &lost, &more);
    jb_printf(b, "%s{\"gpu\":%d,\"role\":\"%s\",\"lost\":%s,\"more\":%s,\"samples\":[", i ? "," : "",
              info->gpu[i], power_role_name(info->role[i]), lost ? "true" : "false", more ? "true" : "false");
    for (size_t k = 0; k < n; k++) {
        const power_sample *x = &buf[k];
        jb_printf(b, "%s[%.4f", k ? "," : "", x->t_s);
        jb_field(b, x->valid & POWER_SAMPLE_POWER, x->power_w, "%.3f");
        jb_field(b, x->valid & POWER_SAMPLE_SM, x->sm_mhz, "%.0f");
        jb_field(b, x->valid & POWER_SAMPLE_MEM, x->mem_mhz, "%.0f");
        jb_field(b, x->valid & POWER_SAMPLE_UTIL, x->util_gpu, "%.0f");
        jb_field(b, x->valid & POWER_SAMPLE_UTIL, x->util_mem, "%.0f");
        jb_field(b, x->valid & POWER_SAMPLE_TEMP, x->temp_c, "%.0f");
        jb_printf(b, "]");
    }
    jb_printf(b, "]}");
}

static void rapl_series(jbuf *b, const power_ring_info *info, const power_rapl_sample *buf, size_t n,
                        bool lost, bool more) {
    for (int d = 0; d < info->n_rapl; d++) {
        jb_printf(b, "%s{\"domain\":", d ? "," : "");
        jb_str(b, info->rapl[d]);
        jb_printf(b, ",\"lost\":%s,\"more\":%s,\"samples\":[", lost ? "true" : "false", more ? "true" : "false");
        for (size_t k = 0; k < n; k++) {
            jb_printf(b, "%s[%.4f", k ? "," : "", buf[k].t_s);
            jb_field(b, true, buf[k].power_w[d], "%.3f");
            jb_printf(b, "]");
        }
        jb_printf(b, "]}");
    }
}

char *power_samples_json(power_session *s, double since_s, size_t max_per_series, const char *role,
                         const char *host, size_t *len) {
    PD_ASSERT(len);
    *len = 0;
    power_ring_info info;
    if (!s || power_session_describe(s, &info) != 0) return NULL;
    size_t max = max_per_series ? max_per_series : SAMPLES_DEFAULT_MAX;
    char hn[256];
    if (!host) {
        if (gethostname(hn, sizeof hn - 1) != 0) snprintf(hn, sizeof hn, "localhost");
        hn[sizeof hn - 1] = 0;
        host = hn;
    }
    jbuf b = {.p = xmalloc(4096), .len = 0, .cap = 4096};
    jb_printf(&b, "{\"host\":");
    jb_str(&b, host);
    jb_printf(&b, ",\"role\":");
    jb_str(&b, role ? role : "");
    jb_printf(&b, ",\"period_s\":%.4f,\"uptime_s\":%.4f,\"since\":%.4f,\"capacity\":%zu", info.period_s,
              info.uptime_s, isfinite(since_s) ? since_s : -1e9, info.capacity);
    jb_printf(&b, ",\"gpu_fields\":[\"t_s\",\"power_w\",\"sm_mhz\",\"mem_mhz\",\"util_gpu\",\"util_mem\","
                  "\"temp_c\"],\"gpus\":[");
    power_sample *gbuf = xmalloc(sizeof *gbuf * max);
    for (int i = 0; i < info.n_gpus; i++) gpu_series(&b, s, &info, i, since_s, gbuf, max);
    free(gbuf);
    jb_printf(&b, "],\"rapl_fields\":[\"t_s\",\"power_w\"],\"rapl\":[");
    if (info.n_rapl > 0) {
        power_rapl_sample *rbuf = xmalloc(sizeof *rbuf * max);
        bool lost, more;
        size_t n = power_session_rapl_since(s, since_s, rbuf, max, &lost, &more);
        rapl_series(&b, &info, rbuf, n, lost, more);
        free(rbuf);
    }
    jb_printf(&b, "]}");
    *len = b.len;
    return b.p;
}
