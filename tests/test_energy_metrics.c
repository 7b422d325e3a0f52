/* test_energy_metrics.c: the energy lines of an instance's /metrics and everything that
 * reads them: power_live_prometheus (format, not-measured components absent, never 0),
 * the bench's parser on that format (deltas, idle-subtracted GPU energy, a meter seen
 * through two instances counted once, derived sums skipped, measured flags), the
 * router-side aggregate power_metrics_aggregate (by GPU and role, CPU deduplicated),
 * and study_power_samples_parse. Pure: no NVML, no server (tests/test_energy_serve.sh
 * runs the real thing against the stand-in NVML). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "power/power.h"
#include "study/study.h"
#include "test.h"

static void live_gpu(power_live *l, int i, int index, power_role role, double j, double idle_w, float w) {
    power_live_gpu *g = &l->gpu[i];
    g->index = index;
    g->role = role;
    g->source = POWER_SOURCE_COUNTER;
    g->energy_j = power_fig_of(j);
    g->idle_power_w = power_fig_of(idle_w);
    g->now.power_w = w;
    g->now.sm_mhz = 1410;
    g->now.mem_mhz = 2619;
    g->now.valid = POWER_SAMPLE_POWER | POWER_SAMPLE_SM | POWER_SAMPLE_MEM;
}

/* An instance on host "h1" with GPU gpu (role) at energy j, plus a CPU package at cpu_j. */
static char *instance_text(const char *host, int gpu, power_role role, double j, double cpu_j) {
    power_live l;
    memset(&l, 0, sizeof l);
    l.uptime_s = 10;
    l.n_gpus = 1;
    live_gpu(&l, 0, gpu, role, j, 80, 300);
    l.n_rapl = 1;
    snprintf(l.rapl[0].name, sizeof l.rapl[0].name, "package-0");
    l.rapl[0].energy_j = power_fig_of(cpu_j);
    snprintf(l.meter_label, sizeof l.meter_label, "meter");
    size_t n = power_live_prometheus(&l, host, NULL, 0);
    char *buf = malloc(n + 1);
    CHECK_EQ_INT(power_live_prometheus(&l, host, buf, n + 1), n);
    return buf;
}

static void test_live_format(void) {
    char *t = instance_text("h1", 3, POWER_ROLE_DECODE, 1234.5, 50);
    CHECK_STR_CONTAINS(t, "pdserve_energy_measured{component=\"gpu\"} 1\n");
    CHECK_STR_CONTAINS(t, "pdserve_energy_measured{component=\"cpu\"} 1\n");
    CHECK_STR_CONTAINS(t, "pdserve_energy_measured{component=\"dram\"} 0\n");
    CHECK_STR_CONTAINS(t, "pdserve_energy_measured{component=\"meter\"} 0\n");
    CHECK_STR_CONTAINS(t, "pdserve_gpu_energy_joules{host=\"h1\",gpu=\"3\",role=\"decode\",source=\"counter\"} 1234.500\n");
    CHECK_STR_CONTAINS(t, "pdserve_gpu_idle_power_watts{host=\"h1\",gpu=\"3\",role=\"decode\"} 80.000\n");
    CHECK_STR_CONTAINS(t, "pdserve_gpu_power_watts{host=\"h1\",gpu=\"3\",role=\"decode\"} 300.000\n");
    CHECK_STR_CONTAINS(t, "pdserve_gpu_sm_clock_mhz{host=\"h1\",gpu=\"3\",role=\"decode\"} 1410\n");
    CHECK_STR_CONTAINS(t, "pdserve_cpu_energy_joules{host=\"h1\",domain=\"package-0\"} 50.000\n");
    CHECK(!strstr(t, "dram_energy"));
    free(t);
    /* Nothing measured: the flags say 0 and no energy line exists (no fake zeros). */
    power_live none;
    memset(&none, 0, sizeof none);
    char buf[4096];
    size_t n = power_live_prometheus(&none, "h", buf, sizeof buf);
    CHECK(n < sizeof buf);
    CHECK_STR_CONTAINS(buf, "pdserve_energy_measured{component=\"gpu\"} 0\n");
    CHECK(!strstr(buf, "_energy_joules{"));
    CHECK(!strstr(buf, "power_watts{"));
    /* Too small a buffer: the length needed, like snprintf. */
    char tiny[16];
    CHECK_EQ_INT(power_live_prometheus(&none, "h", tiny, sizeof tiny), n);
    CHECK_EQ_INT(strlen(tiny), sizeof tiny - 1);
    /* A meter command labelled node: its own family. */
    none.meter_j = power_fig_of(5000);
    snprintf(none.meter_label, sizeof none.meter_label, "Node");
    power_live_prometheus(&none, "h", buf, sizeof buf);
    CHECK_STR_CONTAINS(buf, "pdserve_energy_measured{component=\"node\"} 1\n");
    CHECK_STR_CONTAINS(buf, "pdserve_node_energy_joules{host=\"h\"} 5000.000\n");
}

static void test_bench_reads_live(void) {
    /* One instance: delta of the counters, idle-subtracted over the given window. */
    char *b = instance_text("h1", 0, POWER_ROLE_COLOCATED, 1000, 100);
    char *a = instance_text("h1", 0, POWER_ROLE_COLOCATED, 1300, 120);
    bench_energy e;
    memset(&e, 0, sizeof e);
    CHECK_EQ_INT(bench_energy_parse(&e, b, strlen(b), "", false), 2);
    CHECK_EQ_INT(bench_energy_parse(&e, a, strlen(a), "", true), 2);
    CHECK(fabs(bench_energy_joules(&e, NULL) - 320) < 1e-9);           /* GPU 300 + CPU 20 */
    CHECK(fabs(bench_energy_gpu_joules(&e, NULL, false, 0) - 300) < 1e-9);
    CHECK(fabs(bench_energy_gpu_joules(&e, NULL, true, 2.0) - (300 - 80 * 2)) < 1e-9);
    CHECK(fabs(bench_energy_gpu_idle_w(&e, NULL) - 80) < 1e-9);
    CHECK(fabs(bench_energy_joules(&e, "colocated") - 300) < 1e-9);
    CHECK_EQ_INT(bench_energy_component_measured(&e, "gpu"), 1);
    CHECK_EQ_INT(bench_energy_component_measured(&e, "dram"), 0);
    CHECK_EQ_INT(bench_energy_component_measured(&e, "disk"), -1);
    /* The window between the readings when no seconds are given. */
    e.t_before = 100;
    e.t_after = 101;
    CHECK(fabs(bench_energy_gpu_joules(&e, NULL, true, 0) - 220) < 1e-9);
    free(a);
    free(b);

    /* Two instances of one host (prefill GPU 0, decode GPU 1): both report the host's
     * CPU, which must be counted once. */
    char *pb = instance_text("h1", 0, POWER_ROLE_PREFILL, 100, 10);
    char *db = instance_text("h1", 1, POWER_ROLE_DECODE, 200, 10);
    char *pa = instance_text("h1", 0, POWER_ROLE_PREFILL, 150, 40);
    char *da = instance_text("h1", 1, POWER_ROLE_DECODE, 270, 40);
    memset(&e, 0, sizeof e);
    bench_energy_parse(&e, pb, strlen(pb), "http://p/metrics", false);
    bench_energy_parse(&e, db, strlen(db), "http://d/metrics", false);
    bench_energy_parse(&e, pa, strlen(pa), "http://p/metrics", true);
    bench_energy_parse(&e, da, strlen(da), "http://d/metrics", true);
    CHECK(fabs(bench_energy_joules(&e, NULL) - (50 + 70 + 30)) < 1e-9);
    CHECK(fabs(bench_energy_joules(&e, "prefill") - 50) < 1e-9);
    CHECK(fabs(bench_energy_joules(&e, "decode") - 70) < 1e-9);
    CHECK(fabs(bench_energy_gpu_joules(&e, NULL, true, 1.0) - (120 - 160)) < 1e-9);
    int dups = 0;
    for (int k = 0; k < e.n; k++) dups += e.s[k].dup;
    CHECK_EQ_INT(dups, 1);

    /* Two instances on one GPU (`pdserve up --device-list 0,0`): the GPU's counter, read
     * by both with their own role labels, and the host's CPU each count once. */
    free(pb), free(db), free(pa), free(da);
    pb = instance_text("h1", 0, POWER_ROLE_PREFILL, 100, 10);
    db = instance_text("h1", 0, POWER_ROLE_DECODE, 100, 10);
    pa = instance_text("h1", 0, POWER_ROLE_PREFILL, 160, 40);
    da = instance_text("h1", 0, POWER_ROLE_DECODE, 160, 40);
    memset(&e, 0, sizeof e);
    bench_energy_parse(&e, db, strlen(db), "http://d/metrics", false);
    bench_energy_parse(&e, pb, strlen(pb), "http://p/metrics", false);
    bench_energy_parse(&e, da, strlen(da), "http://d/metrics", true);
    bench_energy_parse(&e, pa, strlen(pa), "http://p/metrics", true);
    CHECK(fabs(bench_energy_joules(&e, NULL) - (60 + 30)) < 1e-9);
    CHECK(fabs(bench_energy_gpu_joules(&e, NULL, false, 0) - 60) < 1e-9);
    CHECK(fabs(bench_energy_gpu_joules(&e, NULL, true, 1.0) - (60 - 80)) < 1e-9); /* one idle baseline */
    CHECK(fabs(bench_energy_joules(&e, "decode") - 60) < 1e-9); /* the first read's role */
    dups = 0;
    for (int k = 0; k < e.n; k++) dups += e.s[k].dup;
    CHECK_EQ_INT(dups, 2);

    /* Derived sums are not meters; a GPU without a baseline makes net "not measured". */
    const char *t0 = "pdserve_gpu_energy_joules{gpu=\"0\"} 10\npdserve_role_energy_joules{role=\"x\"} 10\n"
                     "pdserve_component_energy_joules{component=\"gpu\"} 10\n"
                     "pdserve_gpu_active_energy_joules{gpu=\"0\"} 5\n";
    const char *t1 = "pdserve_gpu_energy_joules{gpu=\"0\"} 20\npdserve_role_energy_joules{role=\"x\"} 20\n"
                     "pdserve_component_energy_joules{component=\"gpu\"} 20\n"
                     "pdserve_gpu_active_energy_joules{gpu=\"0\"} 9\n";
    memset(&e, 0, sizeof e);
    CHECK_EQ_INT(bench_energy_parse(&e, t0, strlen(t0), "", false), 1);
    CHECK_EQ_INT(bench_energy_parse(&e, t1, strlen(t1), "", true), 1);
    CHECK(fabs(bench_energy_joules(&e, NULL) - 10) < 1e-9);
    CHECK(isnan(bench_energy_gpu_joules(&e, NULL, true, 1.0)));
    CHECK(fabs(bench_energy_gpu_joules(&e, NULL, false, 0) - 10) < 1e-9);

    /* Not measured: flags 0, no energy lines: -1 and NAN, never 0. */
    power_live none;
    memset(&none, 0, sizeof none);
    char buf[4096];
    power_live_prometheus(&none, "h", buf, sizeof buf);
    memset(&e, 0, sizeof e);
    bench_energy_parse(&e, buf, strlen(buf), "", false);
    bench_energy_parse(&e, buf, strlen(buf), "", true);
    CHECK(bench_energy_joules(&e, NULL) == -1);
    CHECK(isnan(bench_energy_gpu_joules(&e, NULL, false, 0)));
    CHECK_EQ_INT(bench_energy_component_measured(&e, "gpu"), 0);
    free(pb);
    free(db);
    free(pa);
    free(da);
}

static void test_aggregate(void) {
    char *p = instance_text("h1", 0, POWER_ROLE_PREFILL, 100, 10);
    char *d = instance_text("h1", 1, POWER_ROLE_DECODE, 200, 10);
    char *d2 = instance_text("h2", 0, POWER_ROLE_DECODE, 300, 7);
    const char *texts[4] = {p, d, NULL, d2};
    power_agg a;
    REQUIRE(power_metrics_aggregate(texts, 4, &a) == 0);
    CHECK_EQ_INT(a.n_texts, 3);
    CHECK(fabs(a.role_j[POWER_ROLE_PREFILL] - 100) < 1e-9);
    CHECK(fabs(a.role_j[POWER_ROLE_DECODE] - 500) < 1e-9);
    CHECK(fabs(a.gpu_j - 600) < 1e-9);
    CHECK(fabs(a.gpu_idle_w - 240) < 1e-9);
    CHECK(fabs(a.role_idle_w[POWER_ROLE_DECODE] - 160) < 1e-9);
    CHECK(a.measured_gpu && a.measured_cpu && !a.measured_dram);
    int cpus = 0;
    double cpu_j = 0;
    for (int i = 0; i < a.n; i++)
        if (!strcmp(a.s[i].component, "cpu")) cpus++, cpu_j += a.s[i].joules;
    CHECK_EQ_INT(cpus, 2); /* h1's package once, h2's once */
    CHECK(fabs(cpu_j - 17) < 1e-9);
    char buf[8192];
    size_t n = power_agg_prometheus(&a, buf, sizeof buf);
    CHECK(n < sizeof buf);
    CHECK_STR_CONTAINS(buf, "pdserve_role_energy_joules{role=\"decode\"} 500.000\n");
    CHECK_STR_CONTAINS(buf, "pdserve_gpu_energy_joules{host=\"h2\",gpu=\"0\",role=\"decode\"} 300.000\n");
    /* The bench reading a router's aggregate counts meters only (not the role sums). */
    bench_energy e;
    memset(&e, 0, sizeof e);
    bench_energy_parse(&e, buf, strlen(buf), "", false);
    bench_energy_parse(&e, buf, strlen(buf), "", true);
    int series = 0;
    for (int k = 0; k < e.n; k++) series += !e.s[k].dup;
    CHECK_EQ_INT(series, 5); /* 3 GPUs + 2 CPU packages */
    const char *nothing[2] = {"pdserve_num_requests_running 0\n", NULL};
    CHECK(power_metrics_aggregate(nothing, 2, &a) == -1);
    free(p);
    free(d);
    free(d2);
}

static void test_power_samples_parse(void) {
    char *t = instance_text("h1", 2, POWER_ROLE_DECODE, 1, 1);
    study_power_sample s[4];
    CHECK_EQ_INT(study_power_samples_parse(t, 5.5, s, 4), 1);
    CHECK(!strcmp(s[0].device, "2") && !strcmp(s[0].role, "decode") && !strcmp(s[0].host, "h1"));
    CHECK(fabs(s[0].power_w - 300) < 1e-9 && s[0].sm_mhz == 1410 && s[0].mem_mhz == 2619 && s[0].t_s == 5.5);
    CHECK_EQ_INT(study_power_samples_parse("pdserve_num_requests_running 0\n", 0, s, 4), 0);
    free(t);
}

int main(void) {
    TEST_RUN(test_live_format);
    TEST_RUN(test_bench_reads_live);
    TEST_RUN(test_aggregate);
    TEST_RUN(test_power_samples_parse);
    return TEST_END();
}
