/* test_power_meters.c: RAPL parsing from a fake powercap tree in a temporary folder
 * (package and dram domains, skipped domains, an unreadable domain, a counter wrap
 * during a run) and the user meter command (number parsing, phases, failure, timeout). */
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "power/power.h"
#include "test.h"
#include "test_powercap_tree.h"
#include "util/util.h"

static char g_root[256];

static void put(const char *rel, const char *text) { powercap_put(g_root, rel, text); }

static void mkd(const char *rel) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", g_root, rel);
    mkdir(path, 0755);
}

/* package-0 with core (skipped) and dram, package-1 whose energy_uj is unreadable,
 * and an mmio duplicate (skipped). */
static void make_tree(void) {
    mkd("intel-rapl:0");
    put("intel-rapl:0/name", "package-0\n");
    put("intel-rapl:0/energy_uj", "999000\n");
    put("intel-rapl:0/max_energy_range_uj", "1000000\n");
    mkd("intel-rapl:0:0");
    put("intel-rapl:0:0/name", "core\n");
    put("intel-rapl:0:0/energy_uj", "5\n");
    mkd("intel-rapl:0:1");
    put("intel-rapl:0:1/name", "dram\n");
    put("intel-rapl:0:1/energy_uj", "2000000\n");
    put("intel-rapl:0:1/max_energy_range_uj", "65532610987\n");
    mkd("intel-rapl:1");
    put("intel-rapl:1/name", "package-1\n");
    mkd("intel-rapl:1/energy_uj"); /* a folder: reading it fails (stands in for EACCES) */
    mkd("intel-rapl-mmio:0");
    put("intel-rapl-mmio:0/name", "package-0\n");
    put("intel-rapl-mmio:0/energy_uj", "1\n");
}

static void test_rapl_scan(void) {
    make_tree();
    power_rapl r;
    power_rapl_scan(&r, g_root);
    REQUIRE(r.n == 3);
    CHECK(strcmp(r.d[0].name, "package-0") == 0 && !r.d[0].is_dram && r.d[0].readable);
    CHECK(r.d[0].range_uj == 1000000);
    CHECK(strcmp(r.d[1].name, "package-1") == 0 && !r.d[1].readable);
    CHECK_STR_CONTAINS(r.d[1].reason, "package-1");
    CHECK(strcmp(r.d[2].name, "dram-0") == 0 && r.d[2].is_dram && r.d[2].readable);
    uint64_t v = 0;
    char err[256];
    CHECK(power_rapl_read(&r, 2, &v, err, sizeof err) == 0 && v == 2000000);
    CHECK(power_rapl_read(&r, 1, &v, err, sizeof err) == -1);
    /* An absent tree: not measured, with the reason. */
    power_rapl_scan(&r, "/nonexistent/powercap");
    CHECK(r.n == 0);
    CHECK_STR_CONTAINS(r.reason, "not measured");
    /* The root may come from the environment. */
    setenv("PDSERVE_POWERCAP_ROOT", g_root, 1);
    power_rapl_scan(&r, NULL);
    CHECK(r.n == 3);
    unsetenv("PDSERVE_POWERCAP_ROOT");
}

static void test_rapl_permission(void) {
    if (geteuid() == 0) {
        fprintf(stderr, "(root reads mode-000 files: permission case checked by reason text only)\n");
        return;
    }
    make_tree();
    char path[512];
    snprintf(path, sizeof path, "%s/intel-rapl:0/energy_uj", g_root);
    chmod(path, 0);
    power_rapl r;
    power_rapl_scan(&r, g_root);
    CHECK(!r.d[0].readable);
    CHECK_STR_CONTAINS(r.d[0].reason, "permission denied");
    chmod(path, 0644);
}

static void test_rapl_session_wrap(void) {
    make_tree();
    power_config c;
    memset(&c, 0, sizeof c);
    c.no_nvml = true;
    c.powercap_root = g_root;
    c.sample_period_s = 0.02;
    char err[256];
    power_session *s = power_session_open(&c, err, sizeof err);
    REQUIRE(s);
    REQUIRE(power_session_start(s, err, sizeof err) == 0);
    struct timespec ts = {0, 60 * 1000000L};
    nanosleep(&ts, NULL);
    put("intel-rapl:0/energy_uj", "500\n");      /* wrapped: 1000 + 500 uJ */
    put("intel-rapl:0:1/energy_uj", "5000000\n"); /* +3 J */
    nanosleep(&ts, NULL);
    put("intel-rapl:0/energy_uj", "2500\n");     /* +2000 uJ */
    nanosleep(&ts, NULL);
    power_result r;
    power_session_stop(s, 1, 10, 10, &r);
    power_session_free(s);
    REQUIRE(r.n_rapl == 3);
    CHECKF(r.rapl[0].energy_j.measured && fabs(r.rapl[0].energy_j.value - 0.0035) < 1e-12, "%g",
           r.rapl[0].energy_j.value);
    CHECK(!r.rapl[1].energy_j.measured && r.rapl[1].reason[0]);
    CHECK(fabs(r.rapl[2].energy_j.value - 3.0) < 1e-12);
    CHECK(!r.component_j[POWER_COMP_CPU].measured); /* package-1 missing: no partial sum */
    CHECK(r.component_j[POWER_COMP_DRAM].measured && fabs(r.component_j[POWER_COMP_DRAM].value - 3) < 1e-12);
    CHECK(!r.component_j[POWER_COMP_GPU].measured);
    char buf[8192];
    power_result_prometheus(&r, buf, sizeof buf);
    CHECK_STR_CONTAINS(buf, "pdserve_cpu_energy_joules{domain=\"package-0\"} 0.0035\n");
    CHECK_STR_CONTAINS(buf, "pdserve_cpu_energy_joules{domain=\"dram-0\"} 3\n");
    CHECK(strstr(buf, "domain=\"package-1\"") == NULL);
    CHECK_STR_CONTAINS(buf, "pdserve_energy_measured{component=\"cpu\"} 0\n");
    CHECK_STR_CONTAINS(buf, "pdserve_energy_measured{component=\"dram\"} 1\n");
}

static void test_meter_cmd(void) {
    double j = 0;
    char err[256];
    CHECK(power_meter_cmd_read("echo 12.5", "start", 5, &j, err, sizeof err) == 0 && j == 12.5);
    CHECK(power_meter_cmd_read("printf '  7e3\\n\\n'", "start", 5, &j, err, sizeof err) == 0 && j == 7000);
    CHECK(power_meter_cmd_read("echo $PDSERVE_ENERGY_PHASE | grep -q end && echo 2 || echo 1", "end",
                               5, &j, err, sizeof err) == 0 && j == 2);
    CHECK(power_meter_cmd_read("exit 3", "start", 5, &j, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "exit status 3");
    CHECK(power_meter_cmd_read("echo hello", "start", 5, &j, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "not one number");
    CHECK(power_meter_cmd_read("echo 1 2", "start", 5, &j, err, sizeof err) == -1);
    CHECK(power_meter_cmd_read("true", "start", 5, &j, err, sizeof err) == -1);
    double t = time_now_s();
    CHECK(power_meter_cmd_read("sleep 5; echo 1", "start", 0.3, &j, err, sizeof err) == -1);
    CHECK(time_now_s() - t < 2.0);
    CHECK_STR_CONTAINS(err, "timed out");
}

static void test_meter_in_session(void) {
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "if [ \"$PDSERVE_ENERGY_PHASE\" = start ]; then echo 100; else echo 160.5; fi");
    power_config c;
    memset(&c, 0, sizeof c);
    c.no_nvml = true;
    c.no_rapl = true;
    c.meter_cmd = cmd;
    c.meter_label = "disk";
    char err[256];
    power_session *s = power_session_open(&c, err, sizeof err);
    REQUIRE(s);
    REQUIRE(power_session_start(s, err, sizeof err) == 0);
    power_result r;
    power_session_stop(s, 2, 100, 20, &r);
    power_session_free(s);
    CHECK(r.meter_j.measured && fabs(r.meter_j.value - 60.5) < 1e-9);
    CHECK(r.component_j[POWER_COMP_DISK].measured && !r.component_j[POWER_COMP_NIC].measured);
    CHECK(fabs(r.total_j.value - 60.5) < 1e-9);
    CHECK(fabs(r.per_total.per_output_token.value - 60.5 / 20) < 1e-9);
    /* No command: not measured, and the reason says how to measure it. */
    c.meter_cmd = NULL;
    s = power_session_open(&c, err, sizeof err);
    REQUIRE(s && power_session_start(s, err, sizeof err) == 0);
    power_session_stop(s, 2, 100, 20, &r);
    power_session_free(s);
    CHECK(!r.meter_j.measured && !r.component_j[POWER_COMP_DISK].measured);
    CHECK_STR_CONTAINS(r.meter_reason, "--energy-meter-cmd");
    /* A failing command: not measured, with its error. */
    c.meter_cmd = "exit 4";
    s = power_session_open(&c, err, sizeof err);
    REQUIRE(s && power_session_start(s, err, sizeof err) == 0);
    power_session_stop(s, 2, 100, 20, &r);
    power_session_free(s);
    CHECK(!r.meter_j.measured);
    CHECK_STR_CONTAINS(r.meter_reason, "exit status 4");
}

int main(void) {
    snprintf(g_root, sizeof g_root, "/tmp/pdserve-powercap-XXXXXX");
    if (!mkdtemp(g_root)) {
        perror("mkdtemp");
        return 1;
    }
    TEST_RUN(test_rapl_scan);
    TEST_RUN(test_rapl_permission);
    TEST_RUN(test_rapl_session_wrap);
    TEST_RUN(test_meter_cmd);
    TEST_RUN(test_meter_in_session);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_root);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_root);
    return TEST_END();
}
