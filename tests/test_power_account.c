/* test_power_account.c: the arithmetic of src/power/account.c on hand-made inputs:
 * attribution by role, idle subtraction, per-token figures, counter wrap, the sampled
 * integral with a missing sample, "not measured" propagation, Prometheus and JSON. */
#include <stdint.h>

#include <cjson/cJSON.h>

#include "power/power.h"
#include "test.h"

static void add_gpu(power_result *r, int idx, power_role role, uint64_t start_mj, uint64_t end_mj,
                    double idle_w) {
    power_gpu_result *g = &r->gpu[r->n_gpus++];
    memset(g, 0, sizeof *g);
    g->index = idx;
    g->role = role;
    g->counter_ok = true;
    g->counter_start_mj = start_mj;
    g->counter_end_mj = end_mj;
    g->idle_power_w = power_fig_of(idle_w);
}

/* Prefill GPU 100 J, decode GPUs 200 J and 300 J, 50 W idle each over 2 s. */
static void make_run(power_result *r) {
    memset(r, 0, sizeof *r);
    r->duration_s = 2.0;
    add_gpu(r, 0, POWER_ROLE_PREFILL, 1000, 101000, 50);
    add_gpu(r, 1, POWER_ROLE_DECODE, 5000, 205000, 50);
    add_gpu(r, 2, POWER_ROLE_DECODE, 0, 300000, 50);
    r->n_requests = 4;
    r->n_input_tokens = 1000;
    r->n_output_tokens = 200;
}

static void test_role_attribution(void) {
    power_result r;
    make_run(&r);
    power_result_compute(&r);
    CHECK(r.gpu[0].source == POWER_SOURCE_COUNTER);
    CHECK(fabs(r.gpu[0].energy_j.value - 100) < 1e-9);
    CHECK(r.role_j[POWER_ROLE_PREFILL].measured && fabs(r.role_j[POWER_ROLE_PREFILL].value - 100) < 1e-9);
    CHECK(r.role_j[POWER_ROLE_DECODE].measured && fabs(r.role_j[POWER_ROLE_DECODE].value - 500) < 1e-9);
    CHECK(!r.role_j[POWER_ROLE_COLOCATED].measured); /* no GPU of that role: absent, not 0 */
    CHECK(fabs(r.gpu_j.value - 600) < 1e-9);
    CHECK(fabs(r.gpu[1].mean_power_w.value - 100) < 1e-9);
}

static void test_idle_subtraction(void) {
    power_result r;
    make_run(&r);
    power_result_compute(&r);
    CHECK(fabs(r.gpu[0].idle_j.value - 100) < 1e-9); /* 50 W x 2 s */
    CHECK(fabs(r.gpu[0].active_j.value - 0) < 1e-9);
    CHECK(fabs(r.gpu[2].active_j.value - 200) < 1e-9);
    CHECK(fabs(r.gpu_idle_j.value - 300) < 1e-9);
    CHECK(fabs(r.gpu_active_j.value - 300) < 1e-9);
    CHECK(fabs(r.role_active_j[POWER_ROLE_DECODE].value - 300) < 1e-9);
    /* Without a baseline the active figures are not measured, the whole ones still are. */
    r.gpu[1].idle_power_w = power_fig_none();
    power_result_compute(&r);
    CHECK(!r.gpu[1].active_j.measured && !r.gpu_active_j.measured);
    CHECK(r.gpu_j.measured && !r.per_gpu_active.per_token.measured && r.per_gpu.per_token.measured);
}

static void test_per_token(void) {
    power_result r;
    make_run(&r);
    power_result_compute(&r);
    CHECK(fabs(r.per_gpu.per_token.value - 0.5) < 1e-12);        /* 600 J / 1200 tokens */
    CHECK(fabs(r.per_gpu.per_output_token.value - 3.0) < 1e-12); /* 600 J / 200 */
    CHECK(fabs(r.per_gpu.per_request.value - 150) < 1e-12);
    CHECK(fabs(r.per_gpu_active.per_token.value - 0.25) < 1e-12);
    CHECK(fabs(r.per_total.per_token.value - 0.5) < 1e-12); /* GPU is the only component */
    r.n_output_tokens = 0;
    r.n_input_tokens = 0;
    r.n_requests = 0;
    power_result_compute(&r);
    CHECK(!r.per_gpu.per_token.measured && !r.per_gpu.per_output_token.measured &&
          !r.per_gpu.per_request.measured);
}

static void test_counter_wrap(void) {
    CHECK(power_counter_delta(10, 30, 0) == 20);
    CHECK(power_counter_delta(UINT64_MAX - 499, 500, 0) == 1000);
    CHECK(power_counter_delta(900, 100, 1000) == 200);  /* RAPL: range 1000 */
    CHECK(power_counter_delta(100, 900, 1000) == 800);
    power_result r;
    memset(&r, 0, sizeof r);
    r.duration_s = 1;
    add_gpu(&r, 0, POWER_ROLE_COLOCATED, UINT64_MAX - 499, 500, 0.5);
    power_result_compute(&r);
    CHECK(fabs(r.gpu[0].energy_j.value - 1.0) < 1e-12);
}

static void test_sample_gap(void) {
    /* 100 W at 100 ms over 0.4 s, with the 0.3 s sample missing (read failed). */
    power_sample s[5];
    memset(s, 0, sizeof s);
    for (int i = 0; i < 5; i++) {
        s[i].t_s = 0.1 * i;
        s[i].power_w = 100;
        s[i].valid = POWER_SAMPLE_POWER;
    }
    s[3].valid = 0;
    int gaps = -1;
    double gap_t = -1;
    double j = power_samples_integrate(s, 5, 0.15, &gaps, &gap_t);
    CHECK(fabs(j - 40.0) < 1e-9);
    CHECK_EQ_INT(gaps, 1);
    CHECK(fabs(gap_t - 0.2) < 1e-9);
    /* A ramp 0 -> 100 W over 1 s is 50 J (trapezoid is exact on a line). */
    s[0] = (power_sample){.t_s = 0, .power_w = 0, .valid = POWER_SAMPLE_POWER};
    s[1] = (power_sample){.t_s = 1, .power_w = 100, .valid = POWER_SAMPLE_POWER};
    CHECK(fabs(power_samples_integrate(s, 2, 0, NULL, NULL) - 50) < 1e-9);
    CHECK(power_samples_integrate(s, 1, 0, NULL, NULL) == 0);
}

static void test_not_measured(void) {
    power_result r;
    make_run(&r);
    r.gpu[1].counter_ok = false; /* no counter and no samples: not measured */
    power_result_compute(&r);
    CHECK(r.gpu[1].source == POWER_SOURCE_NONE && !r.gpu[1].energy_j.measured);
    CHECK(!r.role_j[POWER_ROLE_DECODE].measured); /* never a partial sum posing as whole */
    CHECK(r.role_j[POWER_ROLE_PREFILL].measured);
    CHECK(!r.gpu_j.measured && !r.component_j[POWER_COMP_GPU].measured);
    CHECK(!r.total_j.measured && !r.per_total.per_token.measured);
    /* The sampled integral stands in for a missing counter. */
    r.gpu[1].sampled_j = power_fig_of(190);
    power_result_compute(&r);
    CHECK(r.gpu[1].source == POWER_SOURCE_SAMPLES && fabs(r.gpu[1].energy_j.value - 190) < 1e-9);
    CHECK(!r.gpu[1].counter_vs_samples.measured);
    /* An empty result measures nothing at all. */
    memset(&r, 0, sizeof r);
    power_result_compute(&r);
    for (int c = 0; c < POWER_COMP_COUNT; c++) CHECK(!r.component_j[c].measured);
    CHECK(!r.total_j.measured);
}

static void test_components_and_meter(void) {
    power_result r;
    make_run(&r);
    r.n_rapl = 2;
    snprintf(r.rapl[0].name, sizeof r.rapl[0].name, "package-0");
    r.rapl[0].energy_j = power_fig_of(80);
    snprintf(r.rapl[1].name, sizeof r.rapl[1].name, "dram-0");
    r.rapl[1].is_dram = true;
    r.rapl[1].energy_j = power_fig_of(20);
    snprintf(r.meter_label, sizeof r.meter_label, "disk");
    r.meter_j = power_fig_of(10);
    power_result_compute(&r);
    CHECK(fabs(r.component_j[POWER_COMP_CPU].value - 80) < 1e-9);
    CHECK(fabs(r.component_j[POWER_COMP_DRAM].value - 20) < 1e-9);
    CHECK(r.component_j[POWER_COMP_DISK].measured && !r.component_j[POWER_COMP_NIC].measured);
    CHECK(!r.component_j[POWER_COMP_METER].measured);
    CHECK(fabs(r.total_j.value - 710) < 1e-9);
    CHECK(fabs(r.per_total.per_token.value - 710.0 / 1200) < 1e-12);
    /* A whole-node meter is the total by itself: never added to what it contains. */
    snprintf(r.meter_label, sizeof r.meter_label, "node");
    r.meter_j = power_fig_of(1500);
    power_result_compute(&r);
    CHECK(fabs(r.total_j.value - 1500) < 1e-9);
}

static void test_prometheus(void) {
    power_result r;
    make_run(&r);
    r.n_rapl = 1;
    snprintf(r.rapl[0].name, sizeof r.rapl[0].name, "package-0");
    r.rapl[0].energy_j = power_fig_of(80);
    r.gpu[2].idle_power_w = power_fig_none();
    power_result_compute(&r);
    char buf[16384];
    size_t n = power_result_prometheus(&r, buf, sizeof buf);
    CHECK(n < sizeof buf && n == strlen(buf));
    CHECK_STR_CONTAINS(buf, "pdserve_gpu_energy_joules{gpu=\"0\",role=\"prefill\"} 100\n");
    CHECK_STR_CONTAINS(buf, "pdserve_gpu_energy_joules{gpu=\"2\",role=\"decode\"} 300\n");
    CHECK_STR_CONTAINS(buf, "pdserve_gpu_power_watts{gpu=\"1\",role=\"decode\"} 100\n");
    CHECK_STR_CONTAINS(buf, "pdserve_cpu_energy_joules{domain=\"package-0\"} 80\n");
    CHECK_STR_CONTAINS(buf, "pdserve_energy_measured{component=\"gpu\"} 1\n");
    CHECK_STR_CONTAINS(buf, "pdserve_energy_measured{component=\"dram\"} 0\n");
    CHECK_STR_CONTAINS(buf, "pdserve_energy_joules_per_token{scope=\"gpu\"} 0.5\n");
    CHECK_STR_CONTAINS(buf, "# TYPE pdserve_gpu_energy_joules gauge\n");
    CHECK(strstr(buf, "pdserve_gpu_active_energy_joules{gpu=\"2\"") == NULL); /* not measured */
    /* Every non-comment line is "name{labels} value" or "name value". */
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#') continue;
        char *sp = strrchr(line, ' ');
        CHECKF(sp && strncmp(line, "pdserve_", 8) == 0, "bad line: %s", line);
    }
    char small[32];
    size_t need = power_result_prometheus(&r, small, sizeof small);
    CHECK(need == n && strlen(small) == sizeof small - 1);
}

static void test_json(void) {
    power_result r;
    make_run(&r);
    r.gpu[2].idle_power_w = power_fig_none();
    snprintf(r.gpu_reason, sizeof r.gpu_reason, "%s", "");
    snprintf(r.rapl_reason, sizeof r.rapl_reason, "no RAPL");
    power_result_compute(&r);
    cJSON *j = power_result_json(&r);
    REQUIRE(j);
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    cJSON *p = cJSON_Parse(txt);
    free(txt);
    REQUIRE(p);
    cJSON *gpus = cJSON_GetObjectItem(p, "gpus");
    CHECK_EQ_INT(cJSON_GetArraySize(gpus), 3);
    cJSON *g2 = cJSON_GetArrayItem(gpus, 2);
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(g2, "active_j")));
    CHECK(cJSON_GetObjectItem(g2, "energy_j")->valuedouble == 300);
    CHECK_STR_CONTAINS(cJSON_GetObjectItem(g2, "role")->valuestring, "decode");
    cJSON *meas = cJSON_GetObjectItem(p, "measured");
    CHECK(cJSON_IsTrue(cJSON_GetObjectItem(meas, "gpu")));
    CHECK(cJSON_IsFalse(cJSON_GetObjectItem(meas, "cpu")));
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetObjectItem(p, "components"), "cpu")));
    cJSON *pu = cJSON_GetObjectItem(cJSON_GetObjectItem(p, "per_unit"), "gpu");
    CHECK(fabs(cJSON_GetObjectItem(pu, "per_token")->valuedouble - 0.5) < 1e-12);
    CHECK_STR_CONTAINS(cJSON_GetObjectItem(p, "rapl_reason")->valuestring, "no RAPL");
    cJSON_Delete(p);
}

static void test_roles_parse(void) {
    power_role r;
    CHECK(power_role_parse("decode", &r) == 0 && r == POWER_ROLE_DECODE);
    CHECK(power_role_parse("prefill", &r) == 0 && r == POWER_ROLE_PREFILL);
    CHECK(power_role_parse("router", &r) == -1);
    CHECK(power_role_parse(NULL, &r) == -1);
}

int main(void) {
    TEST_RUN(test_role_attribution);
    TEST_RUN(test_idle_subtraction);
    TEST_RUN(test_per_token);
    TEST_RUN(test_counter_wrap);
    TEST_RUN(test_sample_gap);
    TEST_RUN(test_not_measured);
    TEST_RUN(test_components_and_meter);
    TEST_RUN(test_prometheus);
    TEST_RUN(test_json);
    TEST_RUN(test_roles_parse);
    return TEST_END();
}
