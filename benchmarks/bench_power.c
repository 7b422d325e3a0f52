/* bench_power.c: checks the energy meters on a real GPU machine, reading only (it never
 * calls an NVML setter). Three measurements, one table:
 *   1. sampler cost: wall and CPU time of one full sample (power, SM and memory clocks,
 *      utilisation, temperature), of power alone and of one energy-counter read per GPU,
 *      against the sampling period (limit: a tick under 1% of it);
 *   2. idle: the idle baseline (counter over --idle s) and an idle session of --idle-run s;
 *   3. steady load: --load-cmd started in its own process group, --warmup s to reach
 *      steady state, then a session of --seconds s: the energy counter against the
 *      integral of the sampled power (limit: within 5%), whole and idle-subtracted.
 * Usage: bench_power [--seconds 30] [--warmup 10] [--idle 2] [--idle-run 3]
 *                    [--period-ms 100] [--load-cmd CMD] [--out results.json]
 *                    [--samples-csv samples.csv]
 * Exit status 0 when every check holds, 1 when one fails, 77 when NVML is absent. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "power/power.h"
#include "util/util.h"

typedef struct bench_args {
    double seconds, warmup, idle, idle_run, period_ms;
    const char *load_cmd, *out, *samples_csv;
} bench_args;

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - floor(s)) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static int parse_args(int argc, char **argv, bench_args *a) {
    *a = (bench_args){.seconds = 30, .warmup = 10, .idle = 2, .idle_run = 3, .period_ms = 100};
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return -1;
        if (!strcmp(k, "--seconds")) a->seconds = atof(v);
        else if (!strcmp(k, "--warmup")) a->warmup = atof(v);
        else if (!strcmp(k, "--idle")) a->idle = atof(v);
        else if (!strcmp(k, "--idle-run")) a->idle_run = atof(v);
        else if (!strcmp(k, "--period-ms")) a->period_ms = atof(v);
        else if (!strcmp(k, "--load-cmd")) a->load_cmd = v;
        else if (!strcmp(k, "--out")) a->out = v;
        else if (!strcmp(k, "--samples-csv")) a->samples_csv = v;
        else return -1;
        i++;
    }
    return 0;
}

/* ---- 1. sampler cost ---------------------------------------------------------------- */

typedef struct cost {
    /* per GPU, mean of reps: wall ms and this thread's CPU ms */
    double full_ms, full_cpu_ms, full_max_ms, power_ms, power_cpu_ms, energy_ms, energy_cpu_ms;
    int n_gpus;
    bool instant;
    char name[POWER_NAME_LEN], driver[80];
} cost;

static double cpu_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Times fn-like reads: which = 0 full sample, 1 power only, 2 energy counter. */
static void time_reads(power_nvml *nv, int which, int reps, int n_gpus, double *ms, double *cpu_ms,
                       double *max_ms, bool *instant) {
    *ms = *cpu_ms = 0;
    if (max_ms) *max_ms = 0;
    for (int r = 0; r < reps; r++) {
        for (int g = 0; g < n_gpus; g++) {
            power_sample s;
            uint64_t mj;
            double t = time_now_s(), c = cpu_now_s();
            if (which == 2) power_nvml_energy_mj(nv, g, &mj);
            else power_nvml_sample(nv, g, which == 0 ? POWER_SAMPLE_ALL : POWER_SAMPLE_POWER, &s);
            double w = (time_now_s() - t) * 1e3;
            *cpu_ms += (cpu_now_s() - c) * 1e3 / reps / n_gpus;
            *ms += w / reps / n_gpus;
            if (max_ms) *max_ms = PD_MAX(*max_ms, w);
            if (instant && which != 2) *instant = (s.valid & POWER_SAMPLE_INSTANT) != 0;
        }
    }
}

static int measure_cost(cost *c) {
    char err[256];
    power_nvml *nv = power_nvml_open(err, sizeof err);
    if (!nv) {
        printf("bench_power: %s\n", err);
        return -1;
    }
    memset(c, 0, sizeof *c);
    c->n_gpus = power_nvml_count(nv);
    snprintf(c->name, sizeof c->name, "%s", power_nvml_name(nv, 0));
    snprintf(c->driver, sizeof c->driver, "%s", power_nvml_driver(nv));
    const int reps = 50;
    time_reads(nv, 0, reps, c->n_gpus, &c->full_ms, &c->full_cpu_ms, &c->full_max_ms, &c->instant);
    time_reads(nv, 1, reps, c->n_gpus, &c->power_ms, &c->power_cpu_ms, NULL, NULL);
    time_reads(nv, 2, reps, c->n_gpus, &c->energy_ms, &c->energy_cpu_ms, NULL, NULL);
    power_nvml_close(nv);
    return 0;
}

/* ---- 2 and 3: sessions ------------------------------------------------------------------ */

static power_session *open_session(const bench_args *a, double idle_window) {
    power_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.sample_period_s = a->period_ms / 1e3;
    cfg.idle_window_s = idle_window;
    char err[256];
    power_session *s = power_session_open(&cfg, err, sizeof err);
    if (!s) printf("bench_power: %s\n", err);
    return s;
}

static pid_t start_load(const char *cmd) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        setpgid(0, 0);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    if (pid > 0) setpgid(pid, pid);
    return pid;
}

static void stop_load(pid_t pid) {
    if (pid <= 0) return;
    kill(-pid, SIGTERM);
    for (int i = 0; i < 50; i++) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) return;
        sleep_s(0.1);
    }
    kill(-pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

static void write_csv(const char *path, power_session *s, int n_gpus, const char *phase, bool append) {
    FILE *f = fopen(path, append ? "a" : "w");
    if (!f) return;
    if (!append) fprintf(f, "phase,gpu,t_s,power_w,instant,sm_mhz,mem_mhz,util_gpu,util_mem,temp_c\n");
    for (int g = 0; g < n_gpus; g++) {
        size_t n = 0;
        const power_sample *smp = power_session_samples(s, g, &n);
        for (size_t i = 0; smp && i < n; i++) {
            const power_sample *x = &smp[i];
            if (x->valid & POWER_SAMPLE_POWER)
                fprintf(f, "%s,%d,%.4f,%.2f,%d,%u,%u,%u,%u,%u\n", phase, g, x->t_s, x->power_w,
                        (x->valid & POWER_SAMPLE_INSTANT) ? 1 : 0, x->sm_mhz, x->mem_mhz, x->util_gpu,
                        x->util_mem, x->temp_c);
            else
                fprintf(f, "%s,%d,%.4f,,,,,,,\n", phase, g, x->t_s);
        }
    }
    fclose(f);
}

int main(int argc, char **argv) {
    bench_args a;
    if (parse_args(argc, argv, &a) != 0) {
        fprintf(stderr, "usage: bench_power [--seconds S] [--warmup S] [--idle S] [--idle-run S] "
                        "[--period-ms MS] [--load-cmd CMD] [--out FILE] [--samples-csv FILE]\n");
        return 2;
    }
    if (!getenv("PDSERVE_LOG")) log_set_level(LOG_LEVEL_WARN);
    cost c;
    if (measure_cost(&c) != 0) return 77;

    /* Idle: baseline + an idle run, so the idle counter-vs-samples check has data. */
    power_session *s = open_session(&a, a.idle);
    if (!s) return 1;
    char err[256];
    if (power_session_start(s, err, sizeof err) != 0) return 1;
    sleep_s(a.idle_run);
    power_result idle;
    power_session_stop(s, 0, 0, 0, &idle);
    if (a.samples_csv) write_csv(a.samples_csv, s, idle.n_gpus, "idle", false);
    power_session_free(s);

    /* Steady load. */
    pid_t load = a.load_cmd ? start_load(a.load_cmd) : -1;
    if (a.load_cmd) sleep_s(a.warmup);
    s = open_session(&a, -1);
    if (!s || power_session_start(s, err, sizeof err) != 0) {
        stop_load(load);
        return 1;
    }
    sleep_s(a.seconds);
    power_result run;
    power_session_stop(s, 0, 0, 0, &run);
    stop_load(load);
    if (a.samples_csv) write_csv(a.samples_csv, s, run.n_gpus, "load", true);
    power_session_free(s);
    for (int g = 0; g < run.n_gpus && g < idle.n_gpus; g++) run.gpu[g].idle_power_w = idle.gpu[g].idle_power_w;
    power_result_compute(&run); /* idle-subtracted figures from the idle phase's baseline */

    int fails = 0;
    double period_ms = a.period_ms;
    double tick_ms = c.full_ms * c.n_gpus;
    printf("\nbench_power: %d x %s, driver %s, power field: %s\n", c.n_gpus, c.name, c.driver,
           c.instant ? "instantaneous (NVML field 186)" : "averaged (nvmlDeviceGetPowerUsage)");
    printf("%-44s %12s %12s %8s %s\n", "figure", "measured", "limit", "ratio", "check");
    bool cost_ok = tick_ms < 0.01 * period_ms;
    fails += !cost_ok;
    printf("%-44s %9.3f ms %9.3f ms %8.3f %s\n", "sampler tick, all GPUs, wall (mean of 50)", tick_ms,
           0.01 * period_ms, tick_ms / (0.01 * period_ms), cost_ok ? "ok" : "OVER");
    printf("%-44s %9.3f ms %9.3f ms %8.3f\n", "sampler tick, all GPUs, CPU time", c.full_cpu_ms * c.n_gpus,
           0.01 * period_ms, c.full_cpu_ms * c.n_gpus / (0.01 * period_ms));
    printf("%-44s %9.3f ms   (CPU %.3f ms, slowest %.3f ms)\n", "  one GPU, full sample (6 NVML reads)",
           c.full_ms, c.full_cpu_ms, c.full_max_ms);
    printf("%-44s %9.3f ms   (CPU %.3f ms)\n", "  one GPU, power only", c.power_ms, c.power_cpu_ms);
    printf("%-44s %9.3f ms   (CPU %.3f ms)\n", "  one GPU, energy-counter read", c.energy_ms, c.energy_cpu_ms);
    printf("%-44s %9.3f ms %12s %8s\n", "sampler tick in the load session (mean)", run.sampler_cost_mean_ms, "", "");
    for (int g = 0; g < run.n_gpus; g++) {
        const power_gpu_result *gi = &idle.gpu[g], *gr = &run.gpu[g];
        char label[64];
        snprintf(label, sizeof label, "GPU %d idle power (counter, %.1f s)", g, a.idle);
        printf("%-44s %10.1f W\n", label, gi->idle_power_w.measured ? gi->idle_power_w.value : NAN);
        snprintf(label, sizeof label, "GPU %d load mean power (counter)", g);
        printf("%-44s %10.1f W   (peak %.0f W, %d samples, %d gaps)\n", label,
               gr->mean_power_w.measured ? gr->mean_power_w.value : NAN,
               gr->peak_power_w.measured ? gr->peak_power_w.value : NAN, gr->n_samples, gr->n_gaps);
        snprintf(label, sizeof label, "GPU %d load energy: counter", g);
        printf("%-44s %10.1f J\n", label, gr->energy_j.measured ? gr->energy_j.value : NAN);
        snprintf(label, sizeof label, "GPU %d load energy: integrated samples", g);
        printf("%-44s %10.1f J\n", label, gr->sampled_j.measured ? gr->sampled_j.value : NAN);
        bool agree = gr->counter_vs_samples.measured && fabs(gr->counter_vs_samples.value) <= 0.05;
        fails += !agree;
        snprintf(label, sizeof label, "GPU %d load: samples vs counter", g);
        printf("%-44s %+10.2f %% %10.1f %% %8.2f %s\n", label,
               gr->counter_vs_samples.measured ? 100 * gr->counter_vs_samples.value : NAN, 5.0,
               gr->counter_vs_samples.measured ? fabs(gr->counter_vs_samples.value) / 0.05 : NAN,
               agree ? "ok" : "FAIL");
        snprintf(label, sizeof label, "GPU %d idle: samples vs counter", g);
        printf("%-44s %+10.2f %%\n", label,
               gi->counter_vs_samples.measured ? 100 * gi->counter_vs_samples.value : NAN);
        snprintf(label, sizeof label, "GPU %d load energy, idle-subtracted", g);
        printf("%-44s %10.1f J   (static %.1f J)\n", label, gr->active_j.measured ? gr->active_j.value : NAN,
               gr->idle_j.measured ? gr->idle_j.value : NAN);
    }
    for (int k = POWER_COMP_CPU; k <= POWER_COMP_DRAM; k++) {
        char label[64];
        snprintf(label, sizeof label, "%s energy under load (RAPL)", power_component_name((power_component)k));
        if (run.component_j[k].measured) printf("%-44s %10.1f J\n", label, run.component_j[k].value);
        else printf("%-44s not measured: %s\n", label, run.n_rapl ? "a domain is unreadable" : run.rapl_reason);
    }
    if (a.out) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "card", c.name);
        cJSON_AddStringToObject(o, "driver", c.driver);
        cJSON_AddNumberToObject(o, "gpus", c.n_gpus);
        cJSON_AddBoolToObject(o, "instant_power_field", c.instant);
        cJSON_AddNumberToObject(o, "full_sample_ms", c.full_ms);
        cJSON_AddNumberToObject(o, "full_sample_cpu_ms", c.full_cpu_ms);
        cJSON_AddNumberToObject(o, "full_sample_max_ms", c.full_max_ms);
        cJSON_AddNumberToObject(o, "power_sample_ms", c.power_ms);
        cJSON_AddNumberToObject(o, "energy_read_ms", c.energy_ms);
        cJSON_AddNumberToObject(o, "period_ms", period_ms);
        cJSON_AddItemToObject(o, "idle", power_result_json(&idle));
        cJSON_AddItemToObject(o, "load", power_result_json(&run));
        char *txt = cJSON_Print(o);
        if (util_write_file(a.out, txt, strlen(txt), err, sizeof err) != 0) printf("%s\n", err);
        free(txt);
        cJSON_Delete(o);
    }
    printf("bench_power: %s\n", fails ? "a check FAILED" : "all checks hold");
    return fails ? 1 : 0;
}
