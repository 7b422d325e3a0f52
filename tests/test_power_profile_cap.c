/* test_power_profile_cap.c: `pdserve profile`'s power-cap inputs against the stand-in
 * NVML (tests/fake_nvml.c), on the CPU backend: the enforced limit is read, each
 * serving shape runs back to back after an idle window, and its power, SM clock, the
 * clock's onset and the clock event reasons land in the profile; nothing sets a clock
 * or a limit. The stand-in draws 100 W until 0.3 s after each nvmlInit (the idle window
 * of 0.3 s), 800 W after; its clock reads 1755 MHz with SW_POWER_CAP from 0.4 s on,
 * i.e. 0.1 s into each run. */
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

/* the stand-in's draw and clock for this test (the header above) */
static int setup(void) {
    setenv("FAKE_NVML_GPUS", "1", 1);
    setenv("FAKE_NVML_POWER_W", "100", 1);
    setenv("FAKE_NVML_POWER_LIMIT_W", "700", 1);
    setenv("FAKE_NVML_BUSY", "0.3,800", 1);
    setenv("FAKE_NVML_THROTTLE", "0.4,1755", 1);
    return nvml_rig_open(&g_rig, "profile-cap");
}

static void test_power_cap_points(void) {
    unlink(g_rig.log);
    sim_profile_opts o;
    nvml_rig_grid(&o, 2);
    CHECK(!o.measure_power_cap); /* off by default on the CPU */
    o.measure_power_cap = true;
    o.power_cap_idle_s = 0.3;
    o.power_cap_run_s = 0.4;
    sim_profile p;
    char err[512];
    REQUIRE(sim_profile_measure(g_rig.m, &o, &p, err, sizeof err) == 0 || (fprintf(stderr, "%s\n", err), 0));
    const sim_power_cap_data *d = &p.power.cap;
    CHECK(d->limit_w == 700);
    CHECKF(d->idle_w > 95 && d->idle_w < 105, "idle %g W", d->idle_w);
    /* shapes: prefill 64 and 64 / 8 rows at no context; decode batches 2 (the largest; 16
     * is not below it) at context 64 */
    REQUIRE(d->n_points == 3);
    CHECK(!d->points[0].decode && d->points[0].rows == 64 && d->points[0].context == 0);
    CHECK(!d->points[1].decode && d->points[1].rows == 8);
    CHECK(d->points[2].decode && d->points[2].rows == 2 && d->points[2].context == 64);
    for (int i = 0; i < d->n_points; i++) {
        const sim_power_point *q = &d->points[i];
        CHECKF(q->watts > 790 && q->watts < 810, "point %d: %g W", i, q->watts);
        CHECK(q->mhz == 1755);
        CHECK(q->first_mhz == 1980);
        CHECKF(q->seconds > 0 && q->seconds < 0.4, "point %d: %g s a step", i, q->seconds);
        /* the drop 0.1 s into the run, seen at the 20 ms sampling (a loaded machine
         * delays samples: wide bounds) */
        CHECKF(q->onset_s >= 0.06 && q->onset_s < 0.3, "point %d: onset %g s", i, q->onset_s);
        CHECK_STR_CONTAINS(q->reasons, "sw_power_cap");
    }
    /* tau = onset / ln((800 - 100) / (800 - 700)) = onset / ln 7: about 0.05 s */
    CHECKF(d->window_s > 0.02 && d->window_s < 0.16, "window %g s", d->window_s);
    CHECK_STR_CONTAINS(d->source, "read-only");
    /* read-only: nothing locked, nothing set */
    char *log = util_read_file(g_rig.log, NULL, err, sizeof err);
    REQUIRE(log);
    CHECK_STR_CONTAINS(log, "nvmlDeviceGetEnforcedPowerLimit gpu=0 rc=0");
    CHECK(strstr(log, "SetGpuLockedClocks") == NULL && strstr(log, "ResetGpuLockedClocks") == NULL);
    free(log);
    /* in the file, and the simulator takes it */
    char *json = sim_profile_to_json(&p);
    sim_profile q;
    REQUIRE(sim_profile_parse(json, strlen(json), "p.json", &q, err, sizeof err) == 0);
    CHECK(q.power.cap.n_points == 3 && q.power.cap.limit_w == 700);
    sim_power_cap m;
    sim_power_cap_init(&m, &q, 0);
    CHECK(m.on && m.n_pre == 2 && m.n_dec == 1);
    free(json);
    sim_profile_free(&q);
    sim_profile_free(&p);
}

/* No limit readable (NOT_SUPPORTED): the points are still measured, the limit is 0 and
 * the source says why; the simulator's model stays off. */
static void test_no_limit(void) {
    setenv("FAKE_NVML_FAIL", "nvmlDeviceGetEnforcedPowerLimit=NOT_SUPPORTED", 1);
    sim_profile_opts o;
    nvml_rig_grid(&o, 1);
    o.measure_power_cap = true;
    o.power_cap_idle_s = 0.1;
    o.power_cap_run_s = 0.1;
    sim_profile p;
    char err[512];
    REQUIRE(sim_profile_measure(g_rig.m, &o, &p, err, sizeof err) == 0);
    CHECK(p.power.cap.limit_w == 0);
    CHECK(p.power.cap.n_points >= 1);
    CHECK_STR_CONTAINS(p.power.cap.source, "not read");
    sim_power_cap m;
    sim_power_cap_init(&m, &p, 0);
    CHECK(!m.on);
    sim_profile_free(&p);
    unsetenv("FAKE_NVML_FAIL");
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    if (setup() != 0) return 1;
    TEST_RUN(test_power_cap_points);
    TEST_RUN(test_no_limit);
    nvml_rig_close(&g_rig);
    return TEST_END();
}
