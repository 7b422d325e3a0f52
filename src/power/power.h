/* power.h: energy measurement and per-stage GPU clock control, the one public header
 * of src/power/.
 *
 * What is measured, and how (docs/energy.md has the long form):
 *   - GPU energy: NVML's total-energy counter (mJ, u64) read at run start and end per
 *     GPU; a sampler thread (every 100 ms by default) records power, SM and memory
 *     clocks, utilisation and temperature into a preallocated ring, and integrates
 *     power as a cross-check and as a fallback where the counter is missing.
 *   - CPU package and DRAM energy: RAPL through /sys/class/powercap.
 *   - Anything else (node, disk, NIC): a user meter command run at start and end.
 *   - An idle baseline per GPU measured before the run, so that every figure is
 *     given whole and idle-subtracted (static energy stays visible).
 * Every figure is a power_fig: a value plus "measured or not". A figure that was not
 * measured is never 0; it is absent from Prometheus text and null in JSON.
 *
 * NVML is loaded with dlopen("libnvidia-ml.so.1") (env PDSERVE_NVML_LIB overrides the
 * path; the tests point it at tests/fake_nvml.c). Every NVML read costs milliseconds:
 * nothing here belongs on the token path. Start and stop a session around a run, and
 * let the sampler thread do the rest.
 *
 * Clock control changes hardware that others share. It is done only when the caller
 * passes allow=true (the CLI's --allow-clock-control), only to values the card lists,
 * and the clocks are restored at normal exit (atexit), on SIGINT/SIGTERM/SIGHUP/
 * SIGQUIT/SIGABRT (a handler that restores, then re-raises), and by
 * power_clocks_restore() on error paths. SIGKILL cannot be caught: after one, run
 * `nvidia-smi -rgc` (see docs/energy.md). */
#ifndef PD_POWER_H
#define PD_POWER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define POWER_MAX_GPUS 16
#define POWER_MAX_RAPL 16
#define POWER_NAME_LEN 96
#define POWER_REASON_LEN 192

/* One figure: value is meaningful only when measured is true. */
typedef struct power_fig {
    double value;
    bool measured;
} power_fig;

static inline power_fig power_fig_of(double v) { return (power_fig){v, true}; }
static inline power_fig power_fig_none(void) { return (power_fig){0.0, false}; }

/* The stage a GPU serves in a run; the caller gives one per measured GPU. */
typedef enum power_role {
    POWER_ROLE_COLOCATED = 0,
    POWER_ROLE_PREFILL,
    POWER_ROLE_DECODE,
    POWER_ROLE_IDLE, /* measured but serving nothing in this run */
    POWER_ROLE_COUNT
} power_role;
const char *power_role_name(power_role r); /* "colocated", "prefill", "decode", "idle" */
/* "colocated" | "prefill" | "decode" | "idle" -> 0 and *out; -1 otherwise. */
int power_role_parse(const char *s, power_role *out);

/* Wraparound-safe difference of a counter that counts up to range and restarts at 0
 * (range == 0 means the full u64 range: plain unsigned subtraction). Assumes at most
 * one wrap between the two reads; callers that may see more read more often. */
uint64_t power_counter_delta(uint64_t start, uint64_t end, uint64_t range);

/* ---- NVML (dlopen'd) ------------------------------------------------------------ */

typedef struct power_nvml power_nvml; /* opaque: the library, its functions, handles */

/* Loads NVML (PDSERVE_NVML_LIB or "libnvidia-ml.so.1"), initialises it and opens every
 * device. Returns NULL and a sentence in err when the library is absent, fails to
 * initialise or lists no GPU: the caller then reports GPU figures as not measured.
 * One process may hold one open power_nvml at a time. */
power_nvml *power_nvml_open(char *err, size_t errlen);
/* Restores any clocks this process locked, shuts NVML down, unloads it. NULL: no-op. */
void power_nvml_close(power_nvml *nv);
int power_nvml_count(const power_nvml *nv);
const char *power_nvml_name(const power_nvml *nv, int gpu); /* "NVIDIA H100 80GB HBM3" */
/* NVML's driver version string, or "unknown". */
const char *power_nvml_driver(const power_nvml *nv);
/* The total-energy counter of GPU gpu in millijoules. 0, or the NVML return code
 * (3 = NOT_SUPPORTED on cards before Volta) with *mj untouched. */
int power_nvml_energy_mj(power_nvml *nv, int gpu, uint64_t *mj);
/* NVML's text for an NVML return code. */
const char *power_nvml_error(const power_nvml *nv, int rc);
/* The power limit the driver enforces on GPU gpu now, in watts
 * (nvmlDeviceGetEnforcedPowerLimit: the least of every limiter, the board's default, a
 * user's `nvidia-smi -pl`, an out-of-band limit). Read-only. 0, or the NVML return
 * code with *w untouched. */
int power_nvml_power_limit_w(power_nvml *nv, int gpu, double *w);
/* Why GPU gpu's clocks are below their maximum now: NVML's clock event reasons mask
 * (nvmlDeviceGetCurrentClocksEventReasons, ...ThrottleReasons on older drivers; the
 * POWER_CLOCK_* bits). Read-only. 0, or the NVML return code with *mask untouched. */
enum {
    POWER_CLOCK_GPU_IDLE = 0x1,
    POWER_CLOCK_APP_SETTING = 0x2,
    POWER_CLOCK_SW_POWER_CAP = 0x4,   /* the power controller holds the card at its limit */
    POWER_CLOCK_HW_SLOWDOWN = 0x8,
    POWER_CLOCK_SYNC_BOOST = 0x10,
    POWER_CLOCK_SW_THERMAL = 0x20,
    POWER_CLOCK_HW_THERMAL = 0x40,
    POWER_CLOCK_HW_POWER_BRAKE = 0x80,
    POWER_CLOCK_DISPLAY = 0x100,
};
int power_nvml_clock_reasons(power_nvml *nv, int gpu, uint64_t *mask);
/* The names of mask's bits, comma-separated ("sw_power_cap,sw_thermal"; "" for 0). */
void power_clock_reasons_str(uint64_t mask, char *buf, size_t cap);

/* One sampler reading of one GPU. Fields whose bit is clear in valid were not read. */
enum {
    POWER_SAMPLE_POWER = 1 << 0,
    POWER_SAMPLE_INSTANT = 1 << 1, /* power_w is the instantaneous field (186), not the
                                      ~1 s average of nvmlDeviceGetPowerUsage */
    POWER_SAMPLE_SM = 1 << 2,
    POWER_SAMPLE_MEM = 1 << 3,
    POWER_SAMPLE_UTIL = 1 << 4,
    POWER_SAMPLE_TEMP = 1 << 5,
};
typedef struct power_sample {
    double t_s;        /* monotonic seconds since the session's run start (< 0: idle window) */
    float power_w;
    uint16_t sm_mhz, mem_mhz;
    uint8_t util_gpu, util_mem; /* percent over NVML's last sample period */
    uint8_t temp_c;
    uint8_t valid;     /* POWER_SAMPLE_* bits */
} power_sample;
/* Reads the fields asked for (POWER_SAMPLE_POWER | _SM | _MEM | _UTIL | _TEMP; one
 * NVML call each, utilisation being one call for both) of GPU gpu into s (t_s left to
 * the caller). Returns the number of fields read; 0 when power was asked for and could
 * not be read: the sample is missing (a gap). */
#define POWER_SAMPLE_ALL (POWER_SAMPLE_POWER | POWER_SAMPLE_SM | POWER_SAMPLE_MEM | \
                          POWER_SAMPLE_UTIL | POWER_SAMPLE_TEMP)
int power_nvml_sample(power_nvml *nv, int gpu, unsigned fields, power_sample *s);

/* Trapezoid integral of the power of n samples (in time order) in joules. Samples
 * without POWER_SAMPLE_POWER are skipped and bridged linearly; an interval longer than
 * gap_s counts as a gap (*n_gaps, *gap_time_s; either may be NULL). */
double power_samples_integrate(const power_sample *s, size_t n, double gap_s, int *n_gaps,
                               double *gap_time_s);

/* ---- RAPL (/sys/class/powercap) -------------------------------------------------- */

typedef struct power_rapl_domain {
    char name[48];       /* "package-0", "dram-0" (dram numbered by its package) */
    bool is_dram;
    char path[512];      /* of energy_uj */
    uint64_t range_uj;   /* max_energy_range_uj: where the counter wraps */
    bool readable;
    char reason[POWER_REASON_LEN]; /* why not readable */
} power_rapl_domain;

typedef struct power_rapl {
    int n;
    power_rapl_domain d[POWER_MAX_RAPL];
    char reason[POWER_REASON_LEN]; /* set when n == 0: why RAPL is not measured */
} power_rapl;

/* Finds the package and dram domains under root (NULL: env PDSERVE_POWERCAP_ROOT, else
 * "/sys/class/powercap"). Never fails: an absent tree gives n == 0 with a reason; a
 * domain whose energy_uj cannot be read is listed with readable == false and why. */
void power_rapl_scan(power_rapl *r, const char *root);
/* Reads domain i's counter in microjoules: 0, or -1 with a sentence in err. */
int power_rapl_read(const power_rapl *r, int i, uint64_t *uj, char *err, size_t errlen);

/* ---- user meter command ------------------------------------------------------------ */

/* Runs cmd through /bin/sh -c (the user wrote a command line on purpose: pipes and
 * quoting are theirs), with PDSERVE_ENERGY_PHASE=phase in its environment and nothing
 * else from pdserve (no request data, ever). Its stdout must be one number of joules
 * (a cumulative reading; the run's energy is end minus start). Waits at most
 * timeout_s, then kills its process group. 0 and *joules, or -1 and a sentence. */
int power_meter_cmd_read(const char *cmd, const char *phase, double timeout_s, double *joules,
                         char *err, size_t errlen);

/* ---- results and accounting (pure: no I/O) ------------------------------------------ */

typedef enum power_source {
    POWER_SOURCE_NONE = 0,  /* not measured */
    POWER_SOURCE_COUNTER,   /* NVML total-energy counter */
    POWER_SOURCE_SAMPLES,   /* integrated sampler power (counter missing) */
} power_source;

typedef struct power_gpu_result {
    int index;               /* NVML index (same as nvidia-smi; not CUDA_VISIBLE_DEVICES) */
    char name[POWER_NAME_LEN];
    power_role role;
    /* raw inputs, filled by the session (or by a test) */
    bool counter_ok;
    uint64_t counter_start_mj, counter_end_mj;
    power_fig sampled_j;     /* integral of sampler power over the run */
    power_fig idle_power_w;  /* mean power over the idle window before the run */
    power_fig peak_power_w;
    int n_samples, n_gaps;
    double gap_time_s;
    /* derived by power_result_compute */
    power_source source;
    power_fig energy_j;      /* whole: counter difference (or sampled) */
    power_fig idle_j;        /* static: idle_power_w * duration */
    power_fig active_j;      /* energy_j - idle_j */
    power_fig mean_power_w;  /* energy_j / duration */
    power_fig counter_vs_samples; /* sampled_j / energy_j - 1: the cross-check */
} power_gpu_result;

typedef struct power_rapl_result {
    char name[48];
    bool is_dram;
    power_fig energy_j;
    char reason[POWER_REASON_LEN];
} power_rapl_result;

/* Components of the breakdown. */
typedef enum power_component {
    POWER_COMP_GPU = 0,
    POWER_COMP_CPU,   /* RAPL package domains */
    POWER_COMP_DRAM,  /* RAPL dram domains */
    POWER_COMP_METER, /* the user meter command: whatever it measures (label meter_label) */
    POWER_COMP_DISK,  /* measured only when the meter is labelled "disk" */
    POWER_COMP_NIC,   /* measured only when the meter is labelled "nic" */
    POWER_COMP_COUNT
} power_component;
const char *power_component_name(power_component c);

/* Joules per unit of work for one energy total. */
typedef struct power_per_unit {
    power_fig per_request, per_token /* input + output: the study's J/token */,
        per_output_token;
} power_per_unit;

typedef struct power_result {
    double duration_s;               /* run start to run end, monotonic */
    double idle_window_s;            /* 0: no baseline measured */
    double sample_period_s;
    double sampler_cost_mean_ms, sampler_cost_max_ms; /* per tick, all GPUs */
    int64_t n_requests, n_input_tokens, n_output_tokens; /* set by the caller */

    int n_gpus;
    power_gpu_result gpu[POWER_MAX_GPUS];
    char gpu_reason[POWER_REASON_LEN]; /* why GPU energy is not measured (n_gpus == 0) */

    int n_rapl;
    power_rapl_result rapl[POWER_MAX_RAPL];
    char rapl_reason[POWER_REASON_LEN];

    char meter_label[32];            /* "meter" unless the caller named it */
    power_fig meter_j;
    char meter_reason[POWER_REASON_LEN];

    /* derived by power_result_compute */
    power_fig role_j[POWER_ROLE_COUNT], role_active_j[POWER_ROLE_COUNT];
    power_fig component_j[POWER_COMP_COUNT];
    power_fig gpu_j, gpu_idle_j, gpu_active_j; /* all GPUs */
    power_fig total_j;  /* sum of measured components (meter counted once, never twice) */
    power_per_unit per_gpu, per_gpu_active, per_total;
} power_result;

/* Derives every figure above the "derived" lines from the raw fields and the counts.
 * A derived figure is measured only when all it depends on was. */
void power_result_compute(power_result *r);

/* Appends Prometheus text exposition lines (with # HELP / # TYPE) to buf, NUL-
 * terminated. Metric families: pdserve_gpu_energy_joules{gpu,role},
 * pdserve_gpu_active_energy_joules{gpu,role}, pdserve_gpu_idle_power_watts{gpu},
 * pdserve_gpu_power_watts{gpu,role} (mean over the run), pdserve_role_energy_joules
 * {role}, pdserve_cpu_energy_joules{domain}, pdserve_component_energy_joules
 * {component}, pdserve_energy_measured{component} 0|1, pdserve_energy_joules_per_token
 * {scope}. Not-measured figures are left out (their component shows 0 in
 * pdserve_energy_measured). Returns the length written, or the length needed
 * (> cap - 1) when buf is too small, like snprintf. */
size_t power_result_prometheus(const power_result *r, char *buf, size_t cap);

struct cJSON;
/* The result as a cJSON object (not-measured figures are null, with the reasons);
 * the caller owns it (cJSON_Delete). */
struct cJSON *power_result_json(const power_result *r);

/* ---- the session: meters + sampler around one run ---------------------------------- */

typedef struct power_config {
    double sample_period_s;     /* 0: 0.1 */
    int slow_every;             /* clocks, utilisation, temperature every Nth tick (0: 1);
                                   power is read every tick */
    size_t sample_capacity;     /* per GPU ring (0: 36000, one hour at 100 ms); older
                                   samples are overwritten, never the energy figures */
    double idle_window_s;       /* 0: the default 2.0; < 0: no idle baseline */
    int n_gpus;                 /* 0: every GPU NVML lists */
    int gpus[POWER_MAX_GPUS];   /* NVML indices when n_gpus > 0 */
    power_role roles[POWER_MAX_GPUS]; /* role of gpus[i] (or of GPU i when n_gpus == 0) */
    const char *meter_cmd;      /* --energy-meter-cmd; NULL: none */
    const char *meter_label;    /* what it measures: "node", "disk", "nic" ... ("meter") */
    double meter_timeout_s;     /* 0: 10 */
    double meter_min_interval_s; /* scrapes (power_session_live) run the meter command at
                                   most once per this many seconds and never twice at
                                   once; others get the last reading (0: 1 s; < 0: no
                                   interval, still one run at a time) */
    const char *powercap_root;  /* NULL: env PDSERVE_POWERCAP_ROOT or /sys/class/powercap */
    bool no_nvml;               /* do not load NVML at all */
    power_nvml *nvml;           /* an NVML this process already opened, used and left open
                                   (one process may hold one open at a time); NULL: the
                                   session opens its own */
    bool no_rapl;
} power_config;

typedef struct power_session power_session;

/* Opens the meters (never fails on a missing meter: that meter is not measured, with
 * its reason). Allocates every sample ring now. Fails (NULL + err) only on a bad
 * config: an unknown GPU index, more GPUs than POWER_MAX_GPUS. */
power_session *power_session_open(const power_config *cfg, char *err, size_t errlen);
/* Measures the idle baseline (blocks idle_window_s; nothing else should run on the
 * GPUs), then reads every meter and starts the sampler. 0, or -1 with err. */
int power_session_start(power_session *s, char *err, size_t errlen);
/* Stops the sampler, reads every meter, fills *out (raw + derived, with the counts
 * given here) and returns 0. */
int power_session_stop(power_session *s, int64_t n_requests, int64_t n_input_tokens,
                       int64_t n_output_tokens, power_result *out);
/* After stop: the samples of measured GPU i (oldest first; *n of them, the ring's
 * content). NULL when the GPU was not sampled. Valid until power_session_free. */
const power_sample *power_session_samples(const power_session *s, int i, size_t *n);
/* The NVML handle the session opened (NULL when none): for clock control. */
power_nvml *power_session_nvml(power_session *s);
void power_session_free(power_session *s);

/* ---- live readings of a running session (a server's GET /metrics) ----------------- *
 * A serving instance keeps one session running from start-up to exit; a scrape reads
 * its meters at that moment (each NVML energy-counter read costs ~4 ms: fine for a
 * scrape, never on the token path). Energies are cumulative since power_session_start
 * (Prometheus counters); differences between two scrapes give a run's energy. */
typedef struct power_live_gpu {
    int index;                  /* NVML index */
    char name[POWER_NAME_LEN];
    power_role role;
    power_source source;        /* COUNTER, SAMPLES (no counter: sampled integral), NONE */
    power_fig energy_j;         /* since the session started (idle window excluded) */
    power_fig idle_power_w;     /* the baseline measured at start-up */
    power_sample now;           /* power, SM and memory clock read now (valid bits) */
} power_live_gpu;

typedef struct power_live {
    double uptime_s;            /* since the session started */
    double idle_window_s;       /* 0: no idle baseline */
    int n_gpus;
    power_live_gpu gpu[POWER_MAX_GPUS];
    char gpu_reason[POWER_REASON_LEN];  /* why no GPU is measured (n_gpus == 0) */
    int n_rapl;
    power_rapl_result rapl[POWER_MAX_RAPL]; /* energy since start, wrap-safe */
    char rapl_reason[POWER_REASON_LEN];
    char meter_label[32];
    power_fig meter_j;          /* the meter command run now, minus its start reading */
    char meter_reason[POWER_REASON_LEN];
} power_live;

/* Reads every meter of a started session now (thread-safe against the sampler and
 * against other callers). read_meter: also read the meter command: it runs (up to its
 * timeout) only when its last run ended meter_min_interval_s ago or more and no other
 * caller is running it; otherwise the last reading is returned at once.
 * 0, or -1 when the session is not running. */
int power_session_live(power_session *s, bool read_meter, power_live *out);

/* ---- the sample rings of a running session (GET /metrics/power-samples) ----------- *
 * The sampler keeps every tick in bounded rings (sample_capacity entries per GPU, and
 * one for RAPL): a caller copies out what is newer than a time, oldest first, and
 * comes back later for the rest. Times are the session's (seconds since run start,
 * < 0: the idle window). The copies are taken under the sampler's lock: a few
 * hundred microseconds for a full ring, never on the token path. */

/* One RAPL tick: each domain's mean power since the previous tick (NAN: not read). */
typedef struct power_rapl_sample {
    double t_s;
    float power_w[POWER_MAX_RAPL]; /* by domain index, as in power_session_describe */
} power_rapl_sample;

typedef struct power_ring_info {
    double uptime_s;            /* now, in the samples' time */
    double period_s;
    size_t capacity;            /* samples per ring */
    int n_gpus;
    int gpu[POWER_MAX_GPUS];    /* NVML index of measured GPU i */
    power_role role[POWER_MAX_GPUS];
    int n_rapl;
    char rapl[POWER_MAX_RAPL][48]; /* domain names */
} power_ring_info;

/* What the rings hold and the session's clock now. 0, or -1 when not running. */
int power_session_describe(power_session *s, power_ring_info *out);
/* Copies the samples of measured GPU i newer than since_s (t_s > since_s) into out,
 * oldest first, at most cap of them (*more: there are newer ones still; ask again
 * from the last one's t_s). *lost: some samples newer than since_s were overwritten
 * already (the ring wrapped: ask more often). Returns the count; 0 when not running
 * or i is out of range. */
size_t power_session_samples_since(power_session *s, int i, double since_s, power_sample *out, size_t cap,
                                   bool *lost, bool *more);
/* The same for the RAPL ring (every domain in one sample). */
size_t power_session_rapl_since(power_session *s, double since_s, power_rapl_sample *out, size_t cap,
                                bool *lost, bool *more);
/* The rings as JSON text (malloc'd, *len bytes, NUL-terminated; the caller frees):
 *   {"host":H,"role":R,"period_s":P,"uptime_s":U,"since":S,"capacity":C,
 *    "gpu_fields":["t_s","power_w","sm_mhz","mem_mhz","util_gpu","util_mem","temp_c"],
 *    "gpus":[{"gpu":0,"role":"decode","lost":false,"more":false,"samples":[[t,w,...],...]}],
 *    "rapl_fields":["t_s","power_w"],
 *    "rapl":[{"domain":"package-0","lost":false,"more":false,"samples":[[t,w],...]}]}
 * with null for a field not read; at most max_per_series samples per series (0: 6000).
 * role: the instance's role (RAPL measures the host, not a GPU); host NULL:
 * gethostname. NULL when the session is not running. */
char *power_samples_json(power_session *s, double since_s, size_t max_per_series, const char *role,
                         const char *host, size_t *len);

/* Prometheus text of a live reading, in the lines that src/bench and src/study read:
 *   pdserve_energy_measured{component="gpu"|"cpu"|"dram"|"meter"} 0|1
 *   pdserve_gpu_energy_joules{host,gpu,role}  counter since start (whole, static incl.)
 *   pdserve_gpu_idle_power_watts{host,gpu,role}   baseline; idle-subtracted energy over
 *                                                 [a,b] = delta - idle_w * (b - a)
 *   pdserve_gpu_power_watts{host,gpu,role}, pdserve_gpu_sm_clock_mhz{...},
 *   pdserve_gpu_mem_clock_mhz{...}               read at scrape time
 *   pdserve_cpu_energy_joules{host,domain}, pdserve_dram_energy_joules{host,domain}
 *   pdserve_<label>_energy_joules{host}           the meter command ("node", "disk" ...)
 *   pdserve_energy_uptime_seconds{host}
 * Every *_energy_joules series is one physical meter (never a sum of others), labelled
 * with host so that a series read from several instances of one host is counted
 * once. Not-measured figures are left out (their component's measured is 0). host
 * NULL: gethostname. Returns the length written or needed, like snprintf. */
size_t power_live_prometheus(const power_live *l, const char *host, char *buf, size_t cap);

/* ---- aggregating instances' /metrics (a router's or a sweep's view) --------------- */
#define POWER_AGG_MAX 64
typedef struct power_agg_series {
    char host[64], gpu[16], role[16]; /* gpu "" for non-GPU meters */
    char component[32];         /* "gpu", "cpu", "dram", or the meter's label */
    char domain[48];
    double joules;
    bool has_idle;
    double idle_w;              /* gpu: idle baseline */
    double power_w;             /* gpu: power at scrape, NAN when absent */
} power_agg_series;

typedef struct power_agg {
    int n;                      /* distinct physical meters (host + component + gpu/domain) */
    power_agg_series s[POWER_AGG_MAX];
    int n_texts;
    /* measured flags per component, ANDed over the texts that report the component */
    bool measured_gpu, measured_cpu, measured_dram, measured_meter;
    bool seen_gpu, seen_cpu, seen_dram, seen_meter;
    double role_j[POWER_ROLE_COUNT]; bool role_has[POWER_ROLE_COUNT];
    double role_idle_w[POWER_ROLE_COUNT];
    double gpu_j, gpu_idle_w;   /* all GPUs */
    bool gpu_has;
} power_agg;

/* Parses the energy lines of n /metrics texts (any of them may be NULL: an instance
 * that did not answer) and sums them by GPU and by role; a meter seen in several texts
 * (same host, component, gpu/domain: two instances of one host report the same CPU) is
 * counted once. 0, or -1 when no text had an energy line. */
int power_metrics_aggregate(const char *const *texts, int n, power_agg *out);
/* Prometheus text of an aggregate (a router's /metrics): the same families as
 * power_live_prometheus for each meter, plus pdserve_role_energy_joules{role} and
 * pdserve_role_idle_power_watts{role}. Length written or needed, like snprintf. */
size_t power_agg_prometheus(const power_agg *a, char *buf, size_t cap);

/* ---- clock control (changes shared hardware: read the file comment) ---------------- */

/* Supported SM (graphics) clocks of GPU gpu, highest first, union over the card's
 * memory clocks. Returns the count (<= cap), or -1 with err. */
int power_clocks_supported(power_nvml *nv, int gpu, unsigned *mhz, int cap, char *err,
                           size_t errlen);
/* Locks the SM clock of each gpus[i] to sm_mhz[i] (min = max). Refuses unless allow is
 * true; refuses any value the card does not list (err names the nearest supported
 * values); refuses on NVML NO_PERMISSION (err says how to get it). Before the first
 * lock, records each GPU's previous state and installs the restore-at-exit and signal
 * handlers. All or nothing: on any failure every GPU locked by this call is reset.
 * 0, or -1 with err. */
int power_clocks_lock(power_nvml *nv, const int *gpus, const unsigned *sm_mhz, int n, bool allow,
                      char *err, size_t errlen);
/* Resets every GPU this process locked (NVML ResetGpuLockedClocks). Idempotent; safe
 * to call when nothing was locked. Returns the number of GPUs reset. */
int power_clocks_restore(void);
/* GPUs this process currently holds locked. */
int power_clocks_locked_count(void);

#endif
