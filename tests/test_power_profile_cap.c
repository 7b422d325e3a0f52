/* test_power_profile_cap.c: `pdserve profile`'s power-cap inputs against the stand-in
 * NVML (tests/fake_nvml.c), on the CPU backend: the enforced limit is read, each
 * serving shape runs back to back after an idle window, and its power, SM clock, the
 * clock's onset and the clock event reasons land in the profile; nothing sets a clock
 * or a limit. The stand-in draws 100 W until 0.3 s after each nvmlInit (the idle window
 * of 0.3 s), 800 W after; its clock reads 1755 MHz with SW_POWER_CAP from 0.4 s on,
 * i.e. 0.1 s into each run. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/forward.h"
#include "model/model.h"
#include "power/power.h"
#include "sim/sim.h"
#include "test.h"
#include "test_fake_nvml_rig.h"
#include "test_powercap_tree.h"
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

/* ---- decode_watts: each decode point's own power, through a stand-in RAPL tree ---------
 * A thread advances package-0's energy counter at 50 W of wall time (every 0.2 ms), so
 * that every phase of the profile (idle, prefill, decode, each decode point) reads 50 W:
 * what is checked is that each decode point got a phase of its own and the profile keeps
 * the grid. */
static char g_pc[256];
static atomic_bool g_pc_stop;

static void pc_put(const char *rel, const char *text) { powercap_put(g_pc, rel, text); }

static void *pc_main(void *arg) {
    (void)arg;
    double t0 = time_now_s();
    while (!atomic_load(&g_pc_stop)) {
        char v[32];
        snprintf(v, sizeof v, "%.0f\n", (time_now_s() - t0) * 50e6 + 1000);
        pc_put("intel-rapl:0/energy_uj", v);
        usleep(200);
    }
    return NULL;
}

static void test_decode_watts(void) {
    snprintf(g_pc, sizeof g_pc, "%s/pc-%d", test_build_dir(), (int)getpid());
    char path[512];
    mkdir(g_pc, 0755);
    snprintf(path, sizeof path, "%s/intel-rapl:0", g_pc);
    mkdir(path, 0755);
    pc_put("intel-rapl:0/name", "package-0\n");
    pc_put("intel-rapl:0/max_energy_range_uj", "262143328850\n");
    pc_put("intel-rapl:0/energy_uj", "1000\n");
    atomic_store(&g_pc_stop, false);
    pthread_t th;
    REQUIRE(pthread_create(&th, NULL, pc_main, NULL) == 0);
    setenv("PDSERVE_POWERCAP_ROOT", g_pc, 1);
    sim_profile_opts o;
    nvml_rig_grid(&o, 2);
    o.measure_power = true;
    o.measure_power_cap = false;
    o.repeats = 20; /* the prefill and decode phases long enough for the counter to move */
    sim_profile p;
    char err[512];
    int rc = sim_profile_measure(g_rig.m, &o, &p, err, sizeof err);
    atomic_store(&g_pc_stop, true);
    pthread_join(th, NULL);
    unsetenv("PDSERVE_POWERCAP_ROOT");
    REQUIRE(rc == 0 || (fprintf(stderr, "%s\n", err), 0));
    CHECKF(p.power.measured, "power: %s", p.power.source);
    /* (the decode phase of this tiny grid lasts milliseconds: its mean is coarse) */
    CHECKF(p.power.idle_w > 45 && p.power.idle_w < 55, "idle_w %g", p.power.idle_w);
    const sim_grid *g = &p.power.decode_grid;
    REQUIRE(g->nx == p.decode.nx && g->ny == p.decode.ny && g->nx == 2 && g->ny == 1);
    for (int i = 0; i < 2; i++) CHECKF(g->v[i] > 45 && g->v[i] < 55, "decode point %d: %g W", i, g->v[i]);
    CHECK_STR_CONTAINS(p.power.source, "decode_watts");
    char *js = sim_profile_to_json(&p);
    CHECK_STR_CONTAINS(js, "\"decode_watts\"");
    free(js);
    sim_profile_free(&p);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_pc);
    CHECK(system(cmd) == 0);
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    if (setup() != 0) return 1;
    TEST_RUN(test_power_cap_points);
    TEST_RUN(test_no_limit);
    TEST_RUN(test_decode_watts);
    nvml_rig_close(&g_rig);
    return TEST_END();
}
