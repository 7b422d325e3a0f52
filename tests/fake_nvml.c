/* fake_nvml.c: a stand-in libnvidia-ml for the power tests, built as a shared object
 * and loaded through PDSERVE_NVML_LIB. It exports the NVML entry points src/power uses,
 * with NVML's public signatures, and appends one line per call to a log so that tests
 * can check what was called (above all: that locked clocks were reset).
 *
 * Behaviour, from the environment (read at nvmlInit):
 *   FAKE_NVML_LOG=path            append "pid=P name args rc=R" per call
 *   FAKE_NVML_GPUS=n              device count (default 2)
 *   FAKE_NVML_POWER_W=w[,w...]    power per GPU (default 100 W each)
 *   FAKE_NVML_ENERGY_START_MJ=x   counter value at init (default 1000000; near 2^64
 *                                 to test the wrap)
 *   FAKE_NVML_ENERGY_STEP_MJ=x    counter advances x per read instead of power x time
 *   FAKE_NVML_SM_CLOCKS=a,b,...   supported graphics clocks (default 1980,1755,1410,
 *                                 1395,1200,810,360)
 *   FAKE_NVML_MEM_CLOCKS=a,...    supported memory clocks (default 2619)
 *   FAKE_NVML_NO_INSTANT=1        field 186 (instantaneous power) not supported
 *   FAKE_NVML_FAIL=f=CODE[@N][,...]  function f returns CODE (NO_PERMISSION,
 *                                 NOT_SUPPORTED, UNKNOWN, or a number): always, or only
 *                                 on its Nth call (@N), or from its Nth call on (@N+)
 *   FAKE_NVML_INIT_FAIL=1         nvmlInit_v2 fails (DRIVER_NOT_LOADED)
 *   FAKE_NVML_POWER_LIMIT_W=w     enforced power limit (default 700 W)
 *   FAKE_NVML_BUSY=t,w            from t seconds after nvmlInit on, every GPU draws w
 *                                 (power readings and the energy counter): a load starts
 *   FAKE_NVML_THROTTLE=t,mhz      from t seconds after nvmlInit on, the SM clock reads
 *                                 mhz and the clock event reasons SW_POWER_CAP (0x4);
 *                                 before, the top supported clock and reasons 0
 * Test code only: not part of pdserve. */
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FAKE_MAX 16
#define FAKE_EXPORT __attribute__((visibility("default")))

typedef struct fake_dev {
    int index;
    double power_w;
    unsigned locked_min, locked_max; /* 0: not locked */
    unsigned long long energy_mj;    /* used when stepping */
} fake_dev;

typedef struct fake_field {
    unsigned fieldId, scopeId;
    long long timestamp, latencyUsec;
    int valueType, nvmlReturn;
    union {
        double dVal;
        unsigned uiVal;
        unsigned long long ullVal;
    } value;
} fake_field;

typedef struct fake_util { unsigned gpu, memory; } fake_util;

static fake_dev g_dev[FAKE_MAX];
static int g_n = 2;
static unsigned g_sm[64], g_mem[16];
static unsigned g_nsm, g_nmem;
static unsigned long long g_start_mj = 1000000ULL, g_step_mj = 0;
static double g_t0;
static int g_no_instant;
static char g_fail[1024];
static int g_inited;
static double g_limit_w = 700, g_busy_t = -1, g_busy_w, g_throttle_t = -1;
static unsigned g_throttle_mhz;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void flog(const char *fmt, ...) {
    const char *path = getenv("FAKE_NVML_LOG");
    if (!path || !*path) return;
    char line[512];
    int n = snprintf(line, sizeof line, "pid=%d ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) return;
    ssize_t w = write(fd, line, (size_t)n); /* one write: lines of forked children never interleave */
    (void)w;
    close(fd);
}

static unsigned parse_list(const char *s, unsigned *out, unsigned cap) {
    unsigned n = 0;
    while (s && *s && n < cap) {
        char *end;
        unsigned long v = strtoul(s, &end, 10);
        if (end == s) break;
        out[n++] = (unsigned)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

static int code_of(const char *s) {
    if (strncmp(s, "NO_PERMISSION", 13) == 0) return 4;
    if (strncmp(s, "NOT_SUPPORTED", 13) == 0) return 3;
    if (strncmp(s, "UNKNOWN", 7) == 0) return 999;
    return atoi(s);
}

/* The injected failure of function fn on its call number `call` (1-based), or 0. */
static int injected(const char *fn, int call) {
    size_t fl = strlen(fn);
    for (const char *p = g_fail; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len > fl && strncmp(p, fn, fl) == 0 && p[fl] == '=') {
            char item[128];
            snprintf(item, sizeof item, "%.*s", (int)(len - fl - 1), p + fl + 1);
            int code = code_of(item);
            char *at = strchr(item, '@');
            if (!at) return code;
            int nth = atoi(at + 1);
            int from = strchr(at, '+') != NULL;
            if (call == nth || (from && call >= nth)) return code;
        }
        p += len + (end ? 1 : 0);
    }
    return 0;
}

static int g_generation; /* bumped by every nvmlInit: call counts restart with it */

/* Counts the call of fn and yields its injected failure (0: none). */
#define FAIL_POINT(fn)                                                                    \
    static int calls_, gen_;                                                              \
    if (gen_ != g_generation) {                                                           \
        gen_ = g_generation;                                                              \
        calls_ = 0;                                                                       \
    }                                                                                     \
    int rc_ = injected(fn, ++calls_)

/* Power now, and the energy counter's joules since init (FAKE_NVML_BUSY: a step up). */
static double power_now(const fake_dev *d) {
    return g_busy_t >= 0 && now_s() - g_t0 >= g_busy_t ? g_busy_w : d->power_w;
}
static double joules_since_init(const fake_dev *d) {
    double t = now_s() - g_t0;
    if (g_busy_t < 0 || t < g_busy_t) return d->power_w * t;
    return d->power_w * g_busy_t + g_busy_w * (t - g_busy_t);
}
static int throttled(void) { return g_throttle_t >= 0 && now_s() - g_t0 >= g_throttle_t; }

static fake_dev *dev_of(void *h) {
    fake_dev *d = h;
    if (d < g_dev || d >= g_dev + g_n) return NULL;
    return d;
}

FAKE_EXPORT int nvmlInit_v2(void) {
    g_generation++;
    FAIL_POINT("nvmlInit_v2");
    if (!rc_ && getenv("FAKE_NVML_INIT_FAIL")) rc_ = 9;
    flog("nvmlInit_v2 rc=%d", rc_);
    if (rc_) return rc_;
    const char *s = getenv("FAKE_NVML_GPUS");
    g_n = s ? atoi(s) : 2;
    if (g_n < 0) g_n = 0;
    if (g_n > FAKE_MAX) g_n = FAKE_MAX;
    unsigned pw[FAKE_MAX];
    unsigned npw = parse_list(getenv("FAKE_NVML_POWER_W"), pw, FAKE_MAX);
    s = getenv("FAKE_NVML_ENERGY_START_MJ");
    g_start_mj = s ? strtoull(s, NULL, 10) : 1000000ULL;
    s = getenv("FAKE_NVML_ENERGY_STEP_MJ");
    g_step_mj = s ? strtoull(s, NULL, 10) : 0;
    g_nsm = parse_list(getenv("FAKE_NVML_SM_CLOCKS"), g_sm, 64);
    if (!g_nsm) g_nsm = parse_list("1980,1755,1410,1395,1200,810,360", g_sm, 64);
    g_nmem = parse_list(getenv("FAKE_NVML_MEM_CLOCKS"), g_mem, 16);
    if (!g_nmem) g_nmem = parse_list("2619", g_mem, 16);
    g_no_instant = getenv("FAKE_NVML_NO_INSTANT") != NULL;
    s = getenv("FAKE_NVML_POWER_LIMIT_W");
    g_limit_w = s ? atof(s) : 700;
    g_busy_t = g_throttle_t = -1;
    s = getenv("FAKE_NVML_BUSY");
    if (s && sscanf(s, "%lf,%lf", &g_busy_t, &g_busy_w) != 2) g_busy_t = -1;
    s = getenv("FAKE_NVML_THROTTLE");
    if (s && sscanf(s, "%lf,%u", &g_throttle_t, &g_throttle_mhz) != 2) g_throttle_t = -1;
    s = getenv("FAKE_NVML_FAIL");
    snprintf(g_fail, sizeof g_fail, "%s", s ? s : "");
    for (int i = 0; i < g_n; i++) {
        g_dev[i].index = i;
        g_dev[i].power_w = npw ? pw[i < (int)npw ? i : (int)npw - 1] : 100.0;
        g_dev[i].energy_mj = g_start_mj;
    }
    g_t0 = now_s();
    g_inited = 1;
    return 0;
}

FAKE_EXPORT int nvmlShutdown(void) {
    flog("nvmlShutdown rc=0");
    g_inited = 0;
    return 0;
}

FAKE_EXPORT const char *nvmlErrorString(int rc) {
    switch (rc) {
    case 0: return "Success";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 9: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

FAKE_EXPORT int nvmlDeviceGetCount_v2(unsigned *count) {
    FAIL_POINT("nvmlDeviceGetCount_v2");
    if (!rc_) *count = (unsigned)g_n;
    flog("nvmlDeviceGetCount_v2 rc=%d", rc_);
    return rc_;
}

FAKE_EXPORT int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **h) {
    int rc = (int)i < g_n ? 0 : 2;
    if (!rc) *h = &g_dev[i];
    flog("nvmlDeviceGetHandleByIndex_v2 gpu=%u rc=%d", i, rc);
    return rc;
}

FAKE_EXPORT int nvmlDeviceGetName(void *h, char *name, unsigned len) {
    fake_dev *d = dev_of(h);
    if (!d) return 2;
    snprintf(name, len, "Fake GPU %d", d->index);
    return 0;
}

FAKE_EXPORT int nvmlSystemGetDriverVersion(char *v, unsigned len) {
    snprintf(v, len, "0.0-fake");
    return 0;
}

FAKE_EXPORT int nvmlDeviceGetTotalEnergyConsumption(void *h, unsigned long long *mj) {
    FAIL_POINT("nvmlDeviceGetTotalEnergyConsumption");
    fake_dev *d = dev_of(h);
    if (!d) return 2;
    if (!rc_) {
        if (g_step_mj) {
            *mj = d->energy_mj;
            d->energy_mj += g_step_mj; /* wraps through 2^64 like the real u64 would */
        } else {
            *mj = g_start_mj + (unsigned long long)(1000.0 * joules_since_init(d));
        }
    }
    flog("nvmlDeviceGetTotalEnergyConsumption gpu=%d rc=%d", d->index, rc_);
    return rc_;
}

FAKE_EXPORT int nvmlDeviceGetPowerUsage(void *h, unsigned *mw) {
    FAIL_POINT("nvmlDeviceGetPowerUsage");
    fake_dev *d = dev_of(h);
    if (!d) return 2;
    if (!rc_) *mw = (unsigned)(power_now(d) * 1000.0);
    flog("nvmlDeviceGetPowerUsage gpu=%d rc=%d", d->index, rc_);
    return rc_;
}

FAKE_EXPORT int nvmlDeviceGetFieldValues(void *h, int n, fake_field *f) {
    FAIL_POINT("nvmlDeviceGetFieldValues");
    fake_dev *d = dev_of(h);
    if (!d) return 2;
    for (int i = 0; !rc_ && i < n; i++) {
        if (f[i].fieldId == 186 && !g_no_instant) {
            f[i].nvmlReturn = 0;
            f[i].valueType = 1; /* unsigned int, mW */
            f[i].value.uiVal = (unsigned)(power_now(d) * 1000.0);
        } else {
            f[i].nvmlReturn = 3;
        }
    }
    flog("nvmlDeviceGetFieldValues gpu=%d n=%d rc=%d", d->index, n, rc_);
    return rc_;
}

FAKE_EXPORT int nvmlDeviceGetClockInfo(void *h, int type, unsigned *mhz) {
    fake_dev *d = dev_of(h);
    if (!d) return 2;
    if (type == 2) *mhz = g_mem[0];
    else *mhz = d->locked_max ? d->locked_max : throttled() ? g_throttle_mhz : g_sm[0];
    return 0;
}

FAKE_EXPORT int nvmlDeviceGetEnforcedPowerLimit(void *h, unsigned *mw) {
    FAIL_POINT("nvmlDeviceGetEnforcedPowerLimit");
    fake_dev *d = dev_of(h);
    if (!d) return 2;
    if (!rc_) *mw = (unsigned)(g_limit_w * 1000.0);
    flog("nvmlDeviceGetEnforcedPowerLimit gpu=%d rc=%d", d->index, rc_);
    return rc_;
}

FAKE_EXPORT int nvmlDeviceGetCurrentClocksEventReasons(void *h, unsigned long long *mask) {
    if (!dev_of(h)) return 2;
    *mask = throttled() ? 0x4ULL : 0;
    return 0;
}

FAKE_EXPORT int nvmlDeviceGetApplicationsClock(void *h, int type, unsigned *mhz) {
    fake_dev *d = dev_of(h);
    if (!d) return 2;
    *mhz = type == 2 ? g_mem[0] : g_sm[g_nsm > 1 ? 1 : 0];
    flog("nvmlDeviceGetApplicationsClock gpu=%d type=%d rc=0", d->index, type);
    return 0;
}

FAKE_EXPORT int nvmlDeviceGetUtilizationRates(void *h, fake_util *u) {
    if (!dev_of(h)) return 2;
    u->gpu = 50;
    u->memory = 20;
    return 0;
}

FAKE_EXPORT int nvmlDeviceGetTemperature(void *h, int sensor, unsigned *t) {
    if (!dev_of(h)) return 2;
    *t = 40;
    return 0;
}

FAKE_EXPORT int nvmlDeviceGetSupportedMemoryClocks(void *h, unsigned *count, unsigned *mhz) {
    if (!dev_of(h)) return 2;
    if (*count < g_nmem) {
        *count = g_nmem;
        return 7;
    }
    memcpy(mhz, g_mem, g_nmem * sizeof *mhz);
    *count = g_nmem;
    return 0;
}

FAKE_EXPORT int nvmlDeviceGetSupportedGraphicsClocks(void *h, unsigned mem, unsigned *count,
                                                     unsigned *mhz) {
    if (!dev_of(h)) return 2;
    if (*count < g_nsm) {
        *count = g_nsm;
        return 7;
    }
    memcpy(mhz, g_sm, g_nsm * sizeof *mhz);
    *count = g_nsm;
    return 0;
}

FAKE_EXPORT int nvmlDeviceSetGpuLockedClocks(void *h, unsigned lo, unsigned hi) {
    FAIL_POINT("nvmlDeviceSetGpuLockedClocks");
    fake_dev *d = dev_of(h);
    if (!d) return 2;
    if (!rc_) {
        d->locked_min = lo;
        d->locked_max = hi;
    }
    flog("nvmlDeviceSetGpuLockedClocks gpu=%d min=%u max=%u rc=%d", d->index, lo, hi, rc_);
    return rc_;
}

FAKE_EXPORT int nvmlDeviceResetGpuLockedClocks(void *h) {
    FAIL_POINT("nvmlDeviceResetGpuLockedClocks");
    fake_dev *d = dev_of(h);
    if (!d) return 2;
    if (!rc_) d->locked_min = d->locked_max = 0;
    flog("nvmlDeviceResetGpuLockedClocks gpu=%d rc=%d", d->index, rc_);
    return rc_;
}
