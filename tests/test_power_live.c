/* test_power_live.c: what a running session gives a serving instance's endpoints:
 *   - the meter command on /metrics scrapes (power_session_live): at most one run per
 *     meter_min_interval_s, the cached reading otherwise, never two runs at once, even
 *     with many threads scraping (a meter command that counts its runs in a file, and
 *     one that detects an overlap with a lock directory);
 *   - the live sample ring (power_session_samples_since / power_samples_json): samples
 *     of every GPU and RAPL domain newer than a time, oldest first, bounded, and a
 *     ring that wrapped says how much was lost. GPU samples come from the stand-in NVML
 *     (PDSERVE_FAKE_NVML, set by ctest); without it those cases are skipped. */
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "power/power.h"
#include "test.h"
#include "util/util.h"

static char g_dir[256];

static int count_lines(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    int n = 0, ch;
    while ((ch = fgetc(f)) != EOF) n += ch == '\n';
    fclose(f);
    return n;
}

typedef struct scraper {
    power_session *s;
    double until;
    int n_reads, n_measured;
    double last_j;
} scraper;

static void *scrape_main(void *arg) {
    scraper *x = arg;
    power_live *l = xcalloc(1, sizeof *l);
    while (time_now_s() < x->until) {
        if (power_session_live(x->s, true, l) == 0) {
            x->n_reads++;
            if (l->meter_j.measured) x->n_measured++, x->last_j = l->meter_j.value;
        }
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    free(l);
    return NULL;
}

/* Runs 8 scraping threads for secs against a session with meter command cmd. */
static void scrape_hard(power_session *s, double secs, scraper *x, int n) {
    pthread_t th[8];
    double until = time_now_s() + secs;
    for (int i = 0; i < n; i++) {
        x[i] = (scraper){.s = s, .until = until};
        PD_ASSERT(pthread_create(&th[i], NULL, scrape_main, &x[i]) == 0);
    }
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
}

static power_session *meter_session(const char *cmd, double interval, char *err, size_t errlen) {
    power_config c;
    memset(&c, 0, sizeof c);
    c.no_nvml = true;
    c.no_rapl = true;
    c.meter_cmd = cmd;
    c.meter_label = "node";
    c.meter_min_interval_s = interval;
    power_session *s = power_session_open(&c, err, errlen);
    if (s && power_session_start(s, err, errlen) != 0) {
        power_session_free(s);
        return NULL;
    }
    return s;
}

/* 8 threads scraping as fast as they can for 1.6 s, interval 0.5 s: the command runs at
 * start, then at most once per 0.5 s (4 scrape runs at most: at 0.5, 1.0, 1.5 s and one
 * of slack for a run ending late), and every scrape gets a reading. */
static void test_meter_rate_limited(void) {
    char log[320], cmd[1600], err[256];
    snprintf(log, sizeof log, "%s/runs", g_dir);
    snprintf(cmd, sizeof cmd, "echo \"$PDSERVE_ENERGY_PHASE\" >> '%s'; wc -l < '%s'", log, log);
    power_session *s = meter_session(cmd, 0.5, err, sizeof err);
    REQUIRE(s);
    CHECK_EQ_INT(count_lines(log), 1); /* the start reading */
    scraper x[8];
    double t0 = time_now_s();
    scrape_hard(s, 1.6, x, 8);
    double secs = time_now_s() - t0;
    int runs = count_lines(log) - 1, reads = 0, measured = 0;
    for (int i = 0; i < 8; i++) reads += x[i].n_reads, measured += x[i].n_measured;
    fprintf(stderr, "  %d scrapes in %.2f s ran the meter command %d time(s)\n", reads, secs, runs);
    CHECK(reads > 100);
    CHECK_EQ_INT(measured, reads);
    CHECKF(runs >= 2 && runs <= (int)(secs / 0.5) + 1, "%d runs in %.2f s at one per 0.5 s", runs, secs);
    /* the readings are the command's: cumulative "joules" = its run count, minus start */
    for (int i = 0; i < 8; i++) CHECK(x[i].last_j >= 0 && x[i].last_j <= runs);
    power_result r;
    power_session_stop(s, 0, 0, 0, &r);
    power_session_free(s);
    CHECK_EQ_INT(count_lines(log), runs + 2); /* + the end reading */
    CHECK(r.meter_j.measured && fabs(r.meter_j.value - (runs + 1)) < 1e-9);
    unlink(log);
}

/* No interval at all (< 0): runs back to back, but never two at once. The command takes
 * a lock directory for 50 ms and records an overlap when it finds it taken. */
static void test_meter_never_twice(void) {
    char lock[320], log[320], over[320], cmd[2000], err[256];
    snprintf(lock, sizeof lock, "%s/lock", g_dir);
    snprintf(log, sizeof log, "%s/runs2", g_dir);
    snprintf(over, sizeof over, "%s/overlaps", g_dir);
    snprintf(cmd, sizeof cmd,
             "if mkdir '%s' 2>/dev/null; then sleep 0.05; rmdir '%s'; else echo x >> '%s'; fi; "
             "echo r >> '%s'; echo 1",
             lock, lock, over, log);
    power_session *s = meter_session(cmd, -1, err, sizeof err);
    REQUIRE(s);
    scraper x[8];
    scrape_hard(s, 1.0, x, 8);
    int runs = count_lines(log) - 1;
    fprintf(stderr, "  no interval: %d runs in 1 s, %d overlap(s)\n", runs, count_lines(over));
    CHECK(runs >= 3);
    CHECK_EQ_INT(count_lines(over), 0);
    power_result r;
    power_session_stop(s, 0, 0, 0, &r);
    power_session_free(s);
    CHECK_EQ_INT(count_lines(over), 0);
    unlink(log);
    unlink(over);
}

/* A command that fails on scrapes: not measured with its reason, and still rate limited. */
static void test_meter_failure_cached(void) {
    char log[320], cmd[1600], err[256];
    snprintf(log, sizeof log, "%s/runs3", g_dir);
    snprintf(cmd, sizeof cmd,
             "echo r >> '%s'; [ \"$PDSERVE_ENERGY_PHASE\" = start ] && echo 5 || exit 9", log);
    power_session *s = meter_session(cmd, 10, err, sizeof err);
    REQUIRE(s);
    power_live *l = xcalloc(1, sizeof *l);
    /* within the interval of the start reading: cached (0 J since start) */
    REQUIRE(power_session_live(s, true, l) == 0);
    CHECK(l->meter_j.measured && l->meter_j.value == 0);
    CHECK_EQ_INT(count_lines(log), 1);
    free(l);
    power_result r;
    power_session_stop(s, 0, 0, 0, &r);
    power_session_free(s);
    CHECK(!r.meter_j.measured);
    CHECK_STR_CONTAINS(r.meter_reason, "exit status 9");
    /* interval 0.05: the failing scrape run is reported, then cached */
    s = meter_session(cmd, 0.05, err, sizeof err);
    REQUIRE(s);
    unlink(log);
    struct timespec ts = {0, 80 * 1000 * 1000};
    nanosleep(&ts, NULL);
    l = xcalloc(1, sizeof *l);
    REQUIRE(power_session_live(s, true, l) == 0);
    CHECK(!l->meter_j.measured);
    CHECK_STR_CONTAINS(l->meter_reason, "exit status 9");
    REQUIRE(power_session_live(s, true, l) == 0);
    CHECK(!l->meter_j.measured);
    CHECK_EQ_INT(count_lines(log), 1);
    free(l);
    power_session_stop(s, 0, 0, 0, &r);
    power_session_free(s);
    unlink(log);
}

/* ---- the rings ------------------------------------------------------------------------- */

static bool use_fake_nvml(void) {
    const char *lib = getenv("PDSERVE_FAKE_NVML");
    if (!lib || !util_file_exists(lib)) return false;
    setenv("PDSERVE_NVML_LIB", lib, 1);
    unsetenv("FAKE_NVML_LOG");
    unsetenv("FAKE_NVML_FAIL");
    setenv("FAKE_NVML_GPUS", "2", 1);
    setenv("FAKE_NVML_POWER_W", "150,90", 1);
    return true;
}

/* A powercap tree with one package domain whose counter the test advances. */
static void rapl_tree(char *root, size_t cap) {
    snprintf(root, cap, "%s/powercap", g_dir);
    char path[600];
    mkdir(root, 0755);
    snprintf(path, sizeof path, "%s/intel-rapl:0", root);
    mkdir(path, 0755);
    const char *files[][2] = {{"name", "package-0\n"}, {"energy_uj", "1000000\n"},
                              {"max_energy_range_uj", "262143328850\n"}};
    for (size_t i = 0; i < PD_ARRAY_LEN(files); i++) {
        snprintf(path, sizeof path, "%s/intel-rapl:0/%s", root, files[i][0]);
        FILE *f = fopen(path, "w");
        if (f) fputs(files[i][1], f), fclose(f);
    }
}

static void rapl_set(const char *root, unsigned long long uj) {
    char path[600], tmp[610];
    snprintf(path, sizeof path, "%s/intel-rapl:0/energy_uj", root);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "%llu\n", uj);
    fclose(f);
    rename(tmp, path);
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Two GPUs (150 W and 90 W) and one RAPL domain drawing 50 W, 20 ms period: samples
 * newer than a time, oldest first, every field; paging with max; RAPL power from the
 * counter; the JSON text parses and says the same. */
static void test_ring_since(void) {
    if (!use_fake_nvml()) {
        fprintf(stderr, "  skipped: PDSERVE_FAKE_NVML not set (run through ctest)\n");
        return;
    }
    char root[400], err[256];
    rapl_tree(root, sizeof root);
    power_config c;
    memset(&c, 0, sizeof c);
    c.sample_period_s = 0.02;
    c.idle_window_s = -1;
    c.n_gpus = 2;
    c.gpus[0] = 0, c.gpus[1] = 1;
    c.roles[0] = POWER_ROLE_PREFILL, c.roles[1] = POWER_ROLE_DECODE;
    c.powercap_root = root;
    power_session *s = power_session_open(&c, err, sizeof err);
    REQUIRE(s);
    size_t len;
    CHECK(power_samples_json(s, -1e9, 0, "prefill", NULL, &len) == NULL); /* not started */
    REQUIRE(power_session_start(s, err, sizeof err) == 0);
    unsigned long long uj = 1000000;
    for (int k = 0; k < 15; k++) { /* 50 W: 1 J every 20 ms */
        sleep_ms(20);
        uj += 1000000;
        rapl_set(root, uj);
    }
    power_ring_info info;
    REQUIRE(power_session_describe(s, &info) == 0);
    CHECK(info.n_gpus == 2 && info.gpu[1] == 1 && info.role[1] == POWER_ROLE_DECODE);
    CHECK(info.n_rapl == 1 && !strcmp(info.rapl[0], "package-0"));
    power_sample buf[64];
    bool lost, more;
    size_t n = power_session_samples_since(s, 1, -1e9, buf, 64, &lost, &more);
    CHECKF(n >= 8 && n < 64, "%zu samples", n);
    CHECK(!lost && !more);
    for (size_t k = 0; k < n; k++) {
        CHECK(buf[k].valid & POWER_SAMPLE_POWER && fabs(buf[k].power_w - 90) < 1e-3);
        CHECK(buf[k].valid & POWER_SAMPLE_SM && buf[k].sm_mhz > 0);
        if (k) CHECK(buf[k].t_s > buf[k - 1].t_s);
    }
    /* newer than the fifth: the rest, in order; a page of 2 */
    double t5 = buf[4].t_s;
    power_sample rest[64];
    size_t m = power_session_samples_since(s, 1, t5, rest, 64, &lost, &more);
    CHECK(m >= n - 5 && rest[0].t_s > t5 && rest[0].t_s == buf[5].t_s);
    m = power_session_samples_since(s, 0, t5, rest, 2, &lost, &more);
    CHECK(m == 2 && more && !lost && rest[0].t_s > t5 && fabs(rest[0].power_w - 150) < 1e-3); /* GPU 0 */
    /* RAPL: ~50 W between ticks (the counter moves every 20 ms, so a tick sees 0 or 2 J
     * now and then; the mean over the ticks is what holds) */
    power_rapl_sample r[64];
    size_t nr = power_session_rapl_since(s, -1e9, r, 64, &lost, &more);
    REQUIRE(nr >= 5);
    double joules = 0;
    for (size_t k = 1; k < nr; k++) joules += r[k].power_w[0] * (r[k].t_s - r[k - 1].t_s);
    double mean = joules / (r[nr - 1].t_s - r[0].t_s);
    CHECKF(mean > 25 && mean < 100, "RAPL mean %.1f W over %zu ticks", mean, nr);
    /* the JSON text */
    char *text = power_samples_json(s, t5, 3, "prefill", "hostA", &len);
    REQUIRE(text && len == strlen(text));
    cJSON *root_j = cJSON_Parse(text);
    REQUIRE(root_j);
    CHECK(!strcmp(cJSON_GetObjectItem(root_j, "host")->valuestring, "hostA"));
    CHECK(!strcmp(cJSON_GetObjectItem(root_j, "role")->valuestring, "prefill"));
    cJSON *gpus = cJSON_GetObjectItem(root_j, "gpus");
    CHECK(cJSON_GetArraySize(gpus) == 2);
    cJSON *g1 = cJSON_GetArrayItem(gpus, 1);
    CHECK(cJSON_GetObjectItem(g1, "gpu")->valueint == 1);
    CHECK(!strcmp(cJSON_GetObjectItem(g1, "role")->valuestring, "decode"));
    CHECK(cJSON_IsTrue(cJSON_GetObjectItem(g1, "more")));
    cJSON *smp = cJSON_GetObjectItem(g1, "samples");
    CHECK(cJSON_GetArraySize(smp) == 3);
    cJSON *first = cJSON_GetArrayItem(smp, 0);
    CHECK(cJSON_GetArraySize(first) == 7 && fabs(cJSON_GetArrayItem(first, 1)->valuedouble - 90) < 1e-3);
    CHECK(fabs(cJSON_GetArrayItem(first, 0)->valuedouble - buf[5].t_s) < 1e-3);
    cJSON *rapl = cJSON_GetObjectItem(root_j, "rapl");
    CHECK(cJSON_GetArraySize(rapl) == 1 &&
          !strcmp(cJSON_GetObjectItem(cJSON_GetArrayItem(rapl, 0), "domain")->valuestring, "package-0"));
    cJSON_Delete(root_j);
    free(text);
    power_result res;
    power_session_stop(s, 0, 0, 0, &res);
    CHECK(power_session_samples_since(s, 0, -1e9, buf, 64, &lost, &more) == 0); /* stopped */
    power_session_free(s);
}

/* A ring of 8 samples: after it wrapped, asking from the start says lost, asking from
 * a recent time does not; what it returns is the newest 8, in order. */
static void test_ring_wrap(void) {
    if (!use_fake_nvml()) {
        fprintf(stderr, "  skipped: PDSERVE_FAKE_NVML not set (run through ctest)\n");
        return;
    }
    char err[256];
    power_config c;
    memset(&c, 0, sizeof c);
    c.sample_period_s = 0.01;
    c.sample_capacity = 8;
    c.idle_window_s = -1;
    c.n_gpus = 1;
    c.no_rapl = true;
    power_session *s = power_session_open(&c, err, sizeof err);
    REQUIRE(s && power_session_start(s, err, sizeof err) == 0);
    sleep_ms(200);
    power_sample buf[16];
    bool lost, more;
    size_t n = power_session_samples_since(s, 0, -1e9, buf, 16, &lost, &more);
    CHECK(n == 8 && lost && !more);
    for (size_t k = 1; k < n; k++) CHECK(buf[k].t_s > buf[k - 1].t_s);
    size_t m = power_session_samples_since(s, 0, buf[5].t_s, buf, 16, &lost, &more);
    CHECK(m >= 2 && m <= 8 && !lost);
    power_result res;
    power_session_stop(s, 0, 0, 0, &res);
    power_session_free(s);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/pdserve-live-XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    TEST_RUN(test_meter_rate_limited);
    TEST_RUN(test_meter_never_twice);
    TEST_RUN(test_meter_failure_cached);
    TEST_RUN(test_ring_since);
    TEST_RUN(test_ring_wrap);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return TEST_END();
}
