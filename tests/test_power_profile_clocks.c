/* test_power_profile_clocks.c: `pdserve profile --sm-clocks` against the stand-in NVML
 * (tests/fake_nvml.c), on the CPU backend: each listed clock is locked in turn (only
 * with allow, only supported values), two reference points are timed at each, every
 * lock is reset afterwards, and the profile gets one clock point per clock, fitted. */
#include <unistd.h>

#include "backend/backend.h"
#include "engine/forward.h"
#include "model/model.h"
#include "power/power.h"
#include "sim/sim.h"
#include "test.h"
#include "test_fake_nvml_rig.h"
#include "util/util.h"

static nvml_rig g_rig;

static char *read_log(void) { return nvml_rig_read_log(&g_rig); }

static int run(const unsigned *clocks, int n, bool allow, sim_profile *out, char *err, size_t errlen) {
    unlink(g_rig.log);
    sim_profile_opts o;
    nvml_rig_grid(&o, 2);
    o.clocks_mhz = clocks;
    o.n_clocks = n;
    o.allow_clock_control = allow;
    o.clock_gpu = 0;
    o.nvml = power_nvml_open(err, errlen);
    if (!o.nvml) return -2;
    int rc = sim_profile_measure(g_rig.m, &o, out, err, errlen);
    power_nvml_close(o.nvml);
    return rc;
}

static void test_clock_points(void) {
    static const unsigned clocks[] = {1410, 810};
    sim_profile p;
    char err[512];
    int rc = run(clocks, 2, true, &p, err, sizeof err);
    REQUIRE(rc == 0 || (fprintf(stderr, "%s\n", err), 0));
    CHECK_EQ_INT(p.clock.n_points, 2);
    for (int k = 0; k < p.clock.n_points && k < 2; k++) {
        CHECK(p.clock.points[k].mhz == clocks[k]);
        /* the CPU does not slow down: about 1 either way, and never nonsense (zero,
         * negative, NaN). Wide bounds: each scale is the ratio of two single timings of
         * a small step, and on a loaded 2-core machine one of them can be 5x the other
         * (seen once, with other builds running). */
        CHECKF(p.clock.points[k].prefill_scale > 0.02 && p.clock.points[k].prefill_scale < 50, "prefill x%g",
               p.clock.points[k].prefill_scale);
        CHECKF(p.clock.points[k].decode_scale > 0.02 && p.clock.points[k].decode_scale < 50, "decode x%g",
               p.clock.points[k].decode_scale);
    }
    CHECK(strstr(p.clock.source, "fitted to 2 profiled clocks") != NULL);
    CHECK_EQ_INT(power_clocks_locked_count(), 0);
    char *log = read_log();
    CHECK_STR_CONTAINS(log, "nvmlDeviceSetGpuLockedClocks gpu=0 min=1410 max=1410 rc=0");
    CHECK_STR_CONTAINS(log, "nvmlDeviceSetGpuLockedClocks gpu=0 min=810 max=810 rc=0");
    CHECK_STR_CONTAINS(log, "nvmlDeviceResetGpuLockedClocks gpu=0 rc=0");
    free(log);
    /* the profile file keeps them */
    char *json = sim_profile_to_json(&p);
    sim_profile q;
    REQUIRE(sim_profile_parse(json, strlen(json), "p.json", &q, err, sizeof err) == 0);
    CHECK_EQ_INT(q.clock.n_points, 2);
    CHECK(q.clock.base_mhz == 1980);
    free(json);
    sim_profile_free(&q);
    sim_profile_free(&p);
}

static void test_refusals(void) {
    static const unsigned ok[] = {1410}, bad[] = {999};
    sim_profile p;
    char err[512];
    CHECK(run(ok, 1, false, &p, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "--allow-clock-control");
    sim_profile_free(&p);
    char *log = read_log();
    CHECK(strstr(log, "SetGpuLockedClocks") == NULL);
    free(log);
    CHECK(run(bad, 1, true, &p, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "999");
    sim_profile_free(&p);
    log = read_log();
    CHECK(strstr(log, "SetGpuLockedClocks") == NULL);
    free(log);
    CHECK_EQ_INT(power_clocks_locked_count(), 0);
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    if (nvml_rig_open(&g_rig, "profile-clocks") != 0) return 1;
    TEST_RUN(test_clock_points);
    TEST_RUN(test_refusals);
    nvml_rig_close(&g_rig);
    return TEST_END();
}
