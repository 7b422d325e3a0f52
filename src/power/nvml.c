/* nvml.c: loading NVML with dlopen and the read-only queries the meters make (energy
 * counter, power, clocks, utilisation, temperature). Tuned for a sampler thread that
 * reads every GPU every 100 ms: one NVML call per figure, no allocation.
 *
 * Why dlopen: pdserve must run (and say "not measured") where no NVIDIA driver exists,
 * and tests substitute tests/fake_nvml.c through PDSERVE_NVML_LIB. */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "power/nvml_abi.h"
#include "util/util.h"

/* The one open power_nvml of this process (NVML is global state); kept here also so
 * that a process exiting with NVML open holds no unreachable memory. */
static power_nvml *g_open = NULL;

int power_nvml_check(const struct power_nvml *nv, int rc, const char *what, const char *file,
                     int line) {
    if (rc != NVML_OK && log_get_level() >= LOG_LEVEL_DEBUG)
        log_debug("NVML: %s failed at %s:%d: %s (%d)", what, file, line,
                  power_nvml_error(nv, rc), rc);
    return rc;
}

const char *power_nvml_error(const power_nvml *nv, int rc) {
    if (nv && nv->error_string) {
        const char *s = nv->error_string(rc);
        if (s) return s;
    }
    switch (rc) {
    case NVML_OK: return "success";
    case NVML_ERR_NOT_SUPPORTED: return "not supported";
    case NVML_ERR_NO_PERMISSION: return "insufficient permissions";
    default: return "NVML error";
    }
}

/* dlsym that accepts a versioned name first, then the plain one. */
static void *sym2(void *lib, const char *a, const char *b) {
    void *p = dlsym(lib, a);
    if (!p && b) p = dlsym(lib, b);
    return p;
}

static void nvml_bind(power_nvml *nv) {
    void *l = nv->lib;
    /* The casts go through void * as POSIX allows for dlsym results. */
#define BIND(field, a, b) *(void **)(&nv->field) = sym2(l, a, b)
    BIND(init, "nvmlInit_v2", "nvmlInit");
    BIND(shutdown, "nvmlShutdown", NULL);
    BIND(error_string, "nvmlErrorString", NULL);
    BIND(get_count, "nvmlDeviceGetCount_v2", "nvmlDeviceGetCount");
    BIND(get_handle, "nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetHandleByIndex");
    BIND(get_name, "nvmlDeviceGetName", NULL);
    BIND(driver_version, "nvmlSystemGetDriverVersion", NULL);
    BIND(total_energy, "nvmlDeviceGetTotalEnergyConsumption", NULL);
    BIND(power_usage, "nvmlDeviceGetPowerUsage", NULL);
    BIND(field_values, "nvmlDeviceGetFieldValues", NULL);
    BIND(clock_info, "nvmlDeviceGetClockInfo", NULL);
    BIND(utilization, "nvmlDeviceGetUtilizationRates", NULL);
    BIND(temperature, "nvmlDeviceGetTemperature", NULL);
    BIND(supported_mem_clocks, "nvmlDeviceGetSupportedMemoryClocks", NULL);
    BIND(supported_gr_clocks, "nvmlDeviceGetSupportedGraphicsClocks", NULL);
    BIND(set_locked_clocks, "nvmlDeviceSetGpuLockedClocks", NULL);
    BIND(reset_locked_clocks, "nvmlDeviceResetGpuLockedClocks", NULL);
    BIND(applications_clock, "nvmlDeviceGetApplicationsClock", NULL);
    BIND(enforced_power_limit, "nvmlDeviceGetEnforcedPowerLimit", NULL);
    /* renamed in R535; the old name stays exported */
    BIND(clock_reasons, "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons");
#undef BIND
}

/* Probes the instantaneous power field once, so the sampler knows which call to use. */
static bool nvml_probe_instant(power_nvml *nv, int i) {
    if (!nv->field_values) return false;
    nvml_field_value f;
    memset(&f, 0, sizeof f);
    f.fieldId = NVML_FIELD_POWER_INSTANT;
    int rc = NVML_CALL(nv, nv->field_values(nv->dev[i], 1, &f));
    return rc == NVML_OK && f.nvmlReturn == NVML_OK;
}

power_nvml *power_nvml_open(char *err, size_t errlen) {
    if (g_open) {
        pd_errorf(err, errlen, "NVML is already open in this process");
        return NULL;
    }
    const char *path = getenv("PDSERVE_NVML_LIB");
    if (!path || !*path) path = "libnvidia-ml.so.1";
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char *why = dlerror();
        pd_errorf(err, errlen, "GPU energy not measured: cannot load NVML (%s): %s", path,
                  why ? why : "unknown error");
        return NULL;
    }
    power_nvml *nv = xcalloc(1, sizeof *nv);
    nv->lib = lib;
    nvml_bind(nv);
    if (!nv->init || !nv->shutdown || !nv->get_count || !nv->get_handle) {
        pd_errorf(err, errlen, "GPU energy not measured: %s lacks nvmlInit/nvmlDeviceGetCount",
                  path);
        dlclose(lib);
        free(nv);
        return NULL;
    }
    int rc = NVML_CALL(nv, nv->init());
    if (rc != NVML_OK) {
        pd_errorf(err, errlen, "GPU energy not measured: nvmlInit failed: %s (%d)",
                  power_nvml_error(nv, rc), rc);
        dlclose(lib);
        free(nv);
        return NULL;
    }
    unsigned count = 0;
    rc = NVML_CALL(nv, nv->get_count(&count));
    if (rc != NVML_OK || count == 0) {
        pd_errorf(err, errlen, "GPU energy not measured: NVML lists no GPU (%s)",
                  rc ? power_nvml_error(nv, rc) : "count 0");
        NVML_CALL(nv, nv->shutdown());
        dlclose(lib);
        free(nv);
        return NULL;
    }
    if (count > POWER_MAX_GPUS) count = POWER_MAX_GPUS;
    for (unsigned i = 0; i < count; i++) {
        rc = NVML_CALL(nv, nv->get_handle(i, &nv->dev[nv->n]));
        if (rc != NVML_OK) {
            log_warn("power: GPU %u skipped: %s", i, power_nvml_error(nv, rc));
            break; /* indices must stay NVML indices: stop at the first hole */
        }
        snprintf(nv->name[nv->n], POWER_NAME_LEN, "GPU %u", i);
        if (nv->get_name) NVML_CALL(nv, nv->get_name(nv->dev[nv->n], nv->name[nv->n], POWER_NAME_LEN));
        nv->instant_ok[nv->n] = nvml_probe_instant(nv, nv->n);
        nv->n++;
    }
    snprintf(nv->driver, sizeof nv->driver, "unknown");
    if (nv->driver_version) NVML_CALL(nv, nv->driver_version(nv->driver, sizeof nv->driver));
    g_open = nv;
    return nv;
}

void power_nvml_close(power_nvml *nv) {
    if (!nv) return;
    power_clocks_restore(); /* never leave a lock behind the library we unload */
    NVML_CALL(nv, nv->shutdown());
    dlclose(nv->lib);
    free(nv);
    g_open = NULL;
}

int power_nvml_count(const power_nvml *nv) { return nv ? nv->n : 0; }

const char *power_nvml_name(const power_nvml *nv, int gpu) {
    PD_ASSERT(nv && gpu >= 0 && gpu < nv->n);
    return nv->name[gpu];
}

const char *power_nvml_driver(const power_nvml *nv) { return nv ? nv->driver : "unknown"; }

int power_nvml_energy_mj(power_nvml *nv, int gpu, uint64_t *mj) {
    PD_ASSERT(nv && gpu >= 0 && gpu < nv->n);
    if (!nv->total_energy) return NVML_ERR_NOT_SUPPORTED;
    unsigned long long v = 0;
    int rc = NVML_CALL(nv, nv->total_energy(nv->dev[gpu], &v));
    if (rc == NVML_OK) *mj = v;
    return rc;
}

/* Power in watts: the instantaneous field where the card offers it, else the averaged
 * nvmlDeviceGetPowerUsage (about a 1 s window on A100/H100: it lags load changes). */
static bool nvml_read_power(power_nvml *nv, int gpu, float *w, bool *instant) {
    if (nv->instant_ok[gpu]) {
        nvml_field_value f;
        memset(&f, 0, sizeof f);
        f.fieldId = NVML_FIELD_POWER_INSTANT;
        if (NVML_CALL(nv, nv->field_values(nv->dev[gpu], 1, &f)) == NVML_OK &&
            f.nvmlReturn == NVML_OK) {
            double mw;
            switch (f.valueType) {
            case NVML_VT_DOUBLE: mw = f.value.dVal; break;
            case NVML_VT_ULONG: mw = (double)f.value.ulVal; break;
            case NVML_VT_ULLONG: mw = (double)f.value.ullVal; break;
            case NVML_VT_SLLONG: mw = (double)f.value.sllVal; break;
            case NVML_VT_SINT: mw = (double)f.value.siVal; break;
            case NVML_VT_USHORT: mw = (double)f.value.usVal; break;
            default: mw = (double)f.value.uiVal; break;
            }
            *w = (float)(mw / 1000.0);
            *instant = true;
            return true;
        }
    }
    unsigned mw = 0;
    if (nv->power_usage && NVML_CALL(nv, nv->power_usage(nv->dev[gpu], &mw)) == NVML_OK) {
        *w = (float)mw / 1000.0f;
        *instant = false;
        return true;
    }
    return false;
}

int power_nvml_sample(power_nvml *nv, int gpu, unsigned want, power_sample *s) {
    PD_ASSERT(nv && gpu >= 0 && gpu < nv->n && s);
    nvml_device d = nv->dev[gpu];
    int fields = 0;
    s->valid = 0;
    bool instant = false;
    if ((want & POWER_SAMPLE_POWER) && nvml_read_power(nv, gpu, &s->power_w, &instant)) {
        s->valid |= POWER_SAMPLE_POWER | (instant ? POWER_SAMPLE_INSTANT : 0);
        fields++;
    }
    unsigned v = 0;
    if ((want & POWER_SAMPLE_SM) && nv->clock_info &&
        NVML_CALL(nv, nv->clock_info(d, NVML_CLK_SM, &v)) == NVML_OK) {
        s->sm_mhz = (uint16_t)PD_MIN(v, 65535u);
        s->valid |= POWER_SAMPLE_SM;
        fields++;
    }
    if ((want & POWER_SAMPLE_MEM) && nv->clock_info &&
        NVML_CALL(nv, nv->clock_info(d, NVML_CLK_MEM, &v)) == NVML_OK) {
        s->mem_mhz = (uint16_t)PD_MIN(v, 65535u);
        s->valid |= POWER_SAMPLE_MEM;
        fields++;
    }
    nvml_utilization u;
    if ((want & POWER_SAMPLE_UTIL) && nv->utilization &&
        NVML_CALL(nv, nv->utilization(d, &u)) == NVML_OK) {
        s->util_gpu = (uint8_t)PD_MIN(u.gpu, 100u);
        s->util_mem = (uint8_t)PD_MIN(u.memory, 100u);
        s->valid |= POWER_SAMPLE_UTIL;
        fields++;
    }
    if ((want & POWER_SAMPLE_TEMP) && nv->temperature &&
        NVML_CALL(nv, nv->temperature(d, NVML_TEMP_GPU, &v)) == NVML_OK) {
        s->temp_c = (uint8_t)PD_MIN(v, 255u);
        s->valid |= POWER_SAMPLE_TEMP;
        fields++;
    }
    return !(want & POWER_SAMPLE_POWER) || (s->valid & POWER_SAMPLE_POWER) ? fields : 0;
}

uint64_t power_counter_delta(uint64_t start, uint64_t end, uint64_t range) {
    if (range == 0 || end >= start) return end - start; /* u64 arithmetic wraps by itself */
    if (start > range) return end;                      /* a counter outside its range: restart */
    return (range - start) + end;
}

double power_samples_integrate(const power_sample *s, size_t n, double gap_s, int *n_gaps,
                               double *gap_time_s) {
    double j = 0.0, gt = 0.0;
    int gaps = 0;
    const power_sample *prev = NULL;
    for (size_t i = 0; i < n; i++) {
        if (!(s[i].valid & POWER_SAMPLE_POWER)) continue;
        if (prev) {
            double dt = s[i].t_s - prev->t_s;
            if (dt > 0) {
                j += 0.5 * (prev->power_w + s[i].power_w) * dt;
                if (gap_s > 0 && dt > gap_s) {
                    gaps++;
                    gt += dt;
                }
            }
        }
        prev = &s[i];
    }
    if (n_gaps) *n_gaps = gaps;
    if (gap_time_s) *gap_time_s = gt;
    return j;
}

int power_nvml_power_limit_w(power_nvml *nv, int gpu, double *w) {
    PD_ASSERT(nv && gpu >= 0 && gpu < nv->n);
    if (!nv->enforced_power_limit) return NVML_ERR_NOT_SUPPORTED;
    unsigned mw = 0;
    int rc = NVML_CALL(nv, nv->enforced_power_limit(nv->dev[gpu], &mw));
    if (rc == NVML_OK) *w = mw / 1000.0;
    return rc;
}

int power_nvml_clock_reasons(power_nvml *nv, int gpu, uint64_t *mask) {
    PD_ASSERT(nv && gpu >= 0 && gpu < nv->n);
    if (!nv->clock_reasons) return NVML_ERR_NOT_SUPPORTED;
    unsigned long long m = 0;
    int rc = NVML_CALL(nv, nv->clock_reasons(nv->dev[gpu], &m));
    if (rc == NVML_OK) *mask = m;
    return rc;
}

void power_clock_reasons_str(uint64_t mask, char *buf, size_t cap) {
    static const struct { uint64_t bit; const char *name; } names[] = {
        {POWER_CLOCK_GPU_IDLE, "gpu_idle"},           {POWER_CLOCK_APP_SETTING, "applications_clocks"},
        {POWER_CLOCK_SW_POWER_CAP, "sw_power_cap"},   {POWER_CLOCK_HW_SLOWDOWN, "hw_slowdown"},
        {POWER_CLOCK_SYNC_BOOST, "sync_boost"},       {POWER_CLOCK_SW_THERMAL, "sw_thermal"},
        {POWER_CLOCK_HW_THERMAL, "hw_thermal"},       {POWER_CLOCK_HW_POWER_BRAKE, "hw_power_brake"},
        {POWER_CLOCK_DISPLAY, "display_clock"},
    };
    size_t n = 0;
    if (cap) buf[0] = 0;
    for (size_t i = 0; i < PD_ARRAY_LEN(names) && cap; i++) {
        if (!(mask & names[i].bit)) continue;
        int k = snprintf(buf + n, cap - n, "%s%s", n ? "," : "", names[i].name);
        if (k < 0 || (size_t)k >= cap - n) break;
        n += (size_t)k;
    }
    uint64_t known = 0;
    for (size_t i = 0; i < PD_ARRAY_LEN(names); i++) known |= names[i].bit;
    if (mask & ~known && n < cap) snprintf(buf + n, cap - n, "%sother(0x%llx)", n ? "," : "",
                                             (unsigned long long)(mask & ~known));
}
