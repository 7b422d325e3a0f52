/* test_power_session.c: whole sessions (idle baseline, counters, sampler thread)
 * against the stand-in NVML, and without any NVML: every GPU figure must then be
 * "not measured", never 0. Runs of a fraction of a second with a 20 ms period. */
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "power/power.h"
#include "test.h"
#include "util/util.h"

static void use_fake(const char *power_w, const char *fail, const char *start_mj) {
    const char *lib = getenv("PDSERVE_FAKE_NVML");
    if (!lib || !util_file_exists(lib)) TEST_SKIP("PDSERVE_FAKE_NVML not set (run through ctest)");
    setenv("PDSERVE_NVML_LIB", lib, 1);
    unsetenv("FAKE_NVML_LOG");
    setenv("FAKE_NVML_POWER_W", power_w, 1);
    if (fail) setenv("FAKE_NVML_FAIL", fail, 1);
    else unsetenv("FAKE_NVML_FAIL");
    if (start_mj) setenv("FAKE_NVML_ENERGY_START_MJ", start_mj, 1);
    else unsetenv("FAKE_NVML_ENERGY_START_MJ");
    unsetenv("FAKE_NVML_NO_INSTANT");
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static power_config fast_config(void) {
    power_config c;
    memset(&c, 0, sizeof c);
    c.sample_period_s = 0.02;
    c.idle_window_s = 0.2;
    c.no_rapl = true;
    return c;
}

/* Opens, runs for run_s, stops. */
static int run_session(const power_config *c, double run_s, power_result *r, power_session **keep) {
    char err[256];
    power_session *s = power_session_open(c, err, sizeof err);
    if (!s) {
        fprintf(stderr, "open: %s\n", err);
        return -1;
    }
    if (power_session_start(s, err, sizeof err) != 0) {
        fprintf(stderr, "start: %s\n", err);
        power_session_free(s);
        return -1;
    }
    sleep_s(run_s);
    power_session_stop(s, 10, 900, 100, r);
    if (keep) *keep = s;
    else power_session_free(s);
    return 0;
}

static void test_no_nvml_is_not_measured(void) {
    setenv("PDSERVE_NVML_LIB", "/nonexistent/libnvidia-ml.so.1", 1);
    char err[256];
    CHECK(power_nvml_open(err, sizeof err) == NULL);
    CHECK_STR_CONTAINS(err, "not measured");
    power_config c = fast_config();
    power_result r;
    REQUIRE(run_session(&c, 0.05, &r, NULL) == 0);
    CHECK_EQ_INT(r.n_gpus, 0);
    CHECK_STR_CONTAINS(r.gpu_reason, "cannot load NVML");
    CHECK(!r.gpu_j.measured && !r.component_j[POWER_COMP_GPU].measured);
    CHECK(!r.total_j.measured && !r.per_total.per_token.measured);
    char buf[8192];
    power_result_prometheus(&r, buf, sizeof buf);
    CHECK_STR_CONTAINS(buf, "pdserve_energy_measured{component=\"gpu\"} 0\n");
    CHECK(strstr(buf, "pdserve_gpu_energy_joules{") == NULL);
    CHECK(strstr(buf, "pdserve_component_energy_joules{") == NULL);
    /* And a library that is there but fails to initialise. */
    use_fake("100", NULL, NULL);
    setenv("FAKE_NVML_INIT_FAIL", "1", 1);
    CHECK(power_nvml_open(err, sizeof err) == NULL);
    CHECK_STR_CONTAINS(err, "nvmlInit failed");
    unsetenv("FAKE_NVML_INIT_FAIL");
}

static void test_fake_session(void) {
    use_fake("100,200", NULL, NULL);
    power_config c = fast_config();
    c.roles[0] = POWER_ROLE_PREFILL;
    c.roles[1] = POWER_ROLE_DECODE;
    power_result r;
    power_session *s = NULL;
    REQUIRE(run_session(&c, 0.5, &r, &s) == 0);
    REQUIRE(r.n_gpus == 2);
    double d = r.duration_s;
    CHECK(d > 0.45 && d < 1.5);
    for (int i = 0; i < 2; i++) {
        double w = i ? 200 : 100;
        power_gpu_result *g = &r.gpu[i];
        CHECK(g->source == POWER_SOURCE_COUNTER);
        CHECKF(test_rel_err(g->energy_j.value, w * d, 1e-9) < 0.03, "gpu %d: %.3f J vs %.3f", i,
               g->energy_j.value, w * d);
        CHECKF(test_rel_err(g->idle_power_w.value, w, 1e-9) < 0.03, "idle %.2f W", g->idle_power_w.value);
        CHECK(fabs(g->active_j.value) < 0.05 * g->energy_j.value); /* constant power: all static */
        CHECKF(fabs(g->counter_vs_samples.value) < 0.05, "counter vs samples %.4f",
               g->counter_vs_samples.value);
        CHECK(g->n_samples >= 10); /* gaps not asserted: a loaded CI machine may delay ticks */
        CHECK(fabs(g->peak_power_w.value - w) < 1e-3);
    }
    CHECK(fabs(r.role_j[POWER_ROLE_DECODE].value - r.gpu[1].energy_j.value) < 1e-9);
    CHECK(fabs(r.per_gpu.per_token.value - r.gpu_j.value / 1000) < 1e-9);
    size_t n = 0;
    const power_sample *smp = power_session_samples(s, 1, &n);
    REQUIRE(smp && n >= 15);
    CHECK(smp[0].t_s < 0);            /* idle window samples first */
    CHECK(smp[n - 1].t_s > 0.4);
    CHECK(smp[n - 1].valid & POWER_SAMPLE_INSTANT);
    CHECK((smp[n - 1].valid & (POWER_SAMPLE_SM | POWER_SAMPLE_MEM | POWER_SAMPLE_UTIL | POWER_SAMPLE_TEMP)) ==
          (POWER_SAMPLE_SM | POWER_SAMPLE_MEM | POWER_SAMPLE_UTIL | POWER_SAMPLE_TEMP));
    CHECK(smp[n - 1].sm_mhz == 1980 && smp[n - 1].util_gpu == 50 && smp[n - 1].temp_c == 40);
    for (size_t i = 1; i < n; i++) CHECK(smp[i].t_s > smp[i - 1].t_s);
    CHECK(r.sampler_cost_mean_ms >= 0 && r.sampler_cost_mean_ms < 20);
    power_session_free(s);
}

static void test_counter_wraps_in_run(void) {
    /* The counter starts 20 J below 2^64: a 0.3 s run at 100 W crosses the wrap. */
    use_fake("100", NULL, "18446744073709531615");
    power_config c = fast_config();
    c.idle_window_s = -1; /* no baseline */
    power_result r;
    REQUIRE(run_session(&c, 0.3, &r, NULL) == 0);
    REQUIRE(r.n_gpus == 2);
    CHECK(r.gpu[0].counter_end_mj < r.gpu[0].counter_start_mj); /* it did wrap */
    CHECKF(test_rel_err(r.gpu[0].energy_j.value, 100 * r.duration_s, 1e-9) < 0.03, "%.3f J",
           r.gpu[0].energy_j.value);
    CHECK(!r.gpu[0].idle_power_w.measured && !r.gpu[0].active_j.measured);
    CHECK(r.idle_window_s == 0);
}

static void test_missing_samples(void) {
    /* Power reads 6..12 fail on both paths: a gap in the middle of the run. The counter
     * figure is untouched, the sampled one bridges the gap and says so. */
    use_fake("100", "nvmlDeviceGetFieldValues=UNKNOWN@6+,nvmlDeviceGetPowerUsage=UNKNOWN@1+",
             NULL);
    setenv("FAKE_NVML_GPUS", "1", 1);
    power_config c = fast_config();
    c.idle_window_s = -1;
    power_result r;
    power_session *s = NULL;
    REQUIRE(run_session(&c, 0.1, &r, &s) == 0);
    /* the failures never end in this fake: stop early, after 4 good samples */
    unsetenv("FAKE_NVML_GPUS");
    REQUIRE(r.n_gpus == 1);
    CHECK(r.gpu[0].source == POWER_SOURCE_COUNTER);
    size_t n = 0;
    const power_sample *smp = power_session_samples(s, 0, &n);
    int missing = 0;
    for (size_t i = 0; i < n; i++) missing += (smp[i].valid & POWER_SAMPLE_POWER) ? 0 : 1;
    CHECK(missing >= 1);
    CHECK(smp[n - 1].valid & POWER_SAMPLE_SM); /* other fields still read */
    power_session_free(s);

    /* Failures for 5 calls in the middle only: both ends present, gap bridged. */
    use_fake("100", "nvmlDeviceGetFieldValues=UNKNOWN@4,nvmlDeviceGetFieldValues=UNKNOWN@5,"
                    "nvmlDeviceGetFieldValues=UNKNOWN@6,nvmlDeviceGetFieldValues=UNKNOWN@7,"
                    "nvmlDeviceGetPowerUsage=UNKNOWN@1+",
             NULL);
    setenv("FAKE_NVML_GPUS", "1", 1);
    REQUIRE(run_session(&c, 0.4, &r, NULL) == 0);
    unsetenv("FAKE_NVML_GPUS");
    CHECKF(r.gpu[0].n_gaps >= 1, "gaps %d", r.gpu[0].n_gaps);
    CHECK(r.gpu[0].gap_time_s > 0.05);
    CHECKF(fabs(r.gpu[0].counter_vs_samples.value) < 0.05, "%.4f", r.gpu[0].counter_vs_samples.value);
}

static void test_averaged_power_and_no_counter(void) {
    /* No instantaneous field, no energy counter: power from nvmlDeviceGetPowerUsage,
     * energy from the integrated samples, idle from the sampled mean. */
    use_fake("150", "nvmlDeviceGetTotalEnergyConsumption=NOT_SUPPORTED", NULL);
    setenv("FAKE_NVML_NO_INSTANT", "1", 1);
    power_config c = fast_config();
    c.n_gpus = 1;
    c.gpus[0] = 1;
    c.roles[0] = POWER_ROLE_DECODE;
    power_result r;
    power_session *s = NULL;
    REQUIRE(run_session(&c, 0.3, &r, &s) == 0);
    unsetenv("FAKE_NVML_NO_INSTANT");
    REQUIRE(r.n_gpus == 1);
    CHECK(r.gpu[0].index == 1 && r.gpu[0].role == POWER_ROLE_DECODE);
    CHECK(r.gpu[0].source == POWER_SOURCE_SAMPLES);
    CHECKF(test_rel_err(r.gpu[0].energy_j.value, 150 * r.duration_s, 1e-9) < 0.03, "%.3f J",
           r.gpu[0].energy_j.value);
    CHECK(fabs(r.gpu[0].idle_power_w.value - 150) < 1e-3);
    size_t n = 0;
    const power_sample *smp = power_session_samples(s, 0, &n);
    REQUIRE(n > 0);
    CHECK((smp[n - 1].valid & POWER_SAMPLE_POWER) && !(smp[n - 1].valid & POWER_SAMPLE_INSTANT));
    power_session_free(s);
}

static void test_ring_overwrites(void) {
    use_fake("100", NULL, NULL);
    power_config c = fast_config();
    c.idle_window_s = -1;
    c.sample_capacity = 8;
    c.sample_period_s = 0.01;
    power_result r;
    power_session *s = NULL;
    REQUIRE(run_session(&c, 0.3, &r, &s) == 0);
    size_t n = 0;
    const power_sample *smp = power_session_samples(s, 0, &n);
    CHECK_EQ_INT(n, 8);
    for (size_t i = 1; i < n; i++) CHECK(smp[i].t_s > smp[i - 1].t_s); /* oldest first */
    CHECK(r.gpu[0].n_samples > 8);                                     /* integral kept all */
    CHECKF(fabs(r.gpu[0].counter_vs_samples.value) < 0.05, "%.4f", r.gpu[0].counter_vs_samples.value);
    power_session_free(s);
}

static void test_bad_config(void) {
    use_fake("100", NULL, NULL);
    power_config c = fast_config();
    c.n_gpus = 1;
    c.gpus[0] = 5;
    char err[256];
    CHECK(power_session_open(&c, err, sizeof err) == NULL);
    CHECK_STR_CONTAINS(err, "GPU 5 does not exist");
}

int main(void) {
    TEST_RUN(test_no_nvml_is_not_measured);
    TEST_RUN(test_fake_session);
    TEST_RUN(test_counter_wraps_in_run);
    TEST_RUN(test_missing_samples);
    TEST_RUN(test_averaged_power_and_no_counter);
    TEST_RUN(test_ring_overwrites);
    TEST_RUN(test_bad_config);
    return TEST_END();
}
