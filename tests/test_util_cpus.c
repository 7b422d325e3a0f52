/* test_util_cpus.c: CPU lists and pinning (src/util/cpus.c), which `pdserve serve
 * --cpus`, `pdserve up --cpu-list` and `pdserve profile --cpus` stand on:
 *   - lists parse and format as Linux writes them; bad ones are refused with the text;
 *   - auto groups are disjoint, of the size asked, on distinct physical cores, never on
 *     the first core; more than the host has is an error, not a silent overlap;
 *   - pinning reaches a thread started before it (as a BLAS library's are) and one
 *     started after, and a CPU the process may not use is refused;
 *   - pinning an instance's compute leaves its other threads where they were. */
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "test.h"
#include "util/util.h"

static void test_parse_format(void) {
    cpu_set_t s;
    char err[256], out[128];
    REQUIRE(util_cpulist_parse("0-3,6", &s, err, sizeof err) == 0);
    CHECK_EQ_INT(CPU_COUNT(&s), 5);
    CHECK(CPU_ISSET(0, &s) && CPU_ISSET(3, &s) && CPU_ISSET(6, &s) && !CPU_ISSET(4, &s));
    CHECK_EQ_INT(util_cpulist_format(&s, out, sizeof out), 5);
    CHECK(!strcmp(out, "0-3,6"));
    REQUIRE(util_cpulist_parse("7,5,6,1", &s, err, sizeof err) == 0);
    util_cpulist_format(&s, out, sizeof out);
    CHECKF(!strcmp(out, "1,5-7"), "%s", out);
    REQUIRE(util_cpulist_parse("12", &s, err, sizeof err) == 0);
    CHECK_EQ_INT(CPU_COUNT(&s), 1);
    const char *bad[] = {"", "a", "1,", "1-", "-1", "3-1", "1 2", "0-99999", "1,,2"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        CHECKF(util_cpulist_parse(bad[i], &s, err, sizeof err) == -1, "'%s' accepted", bad[i]);
        CHECKF(err[0] != 0, "'%s': no reason", bad[i]);
    }
    util_cpulist_parse("x", &s, err, sizeof err);
    CHECK_STR_CONTAINS(err, "'x'");
    util_cpulist_parse("5-2", &s, err, sizeof err);
    CHECK_STR_CONTAINS(err, "5-2");
}

/* this host's physical core of CPU c, as sysfs says (-1: unknown) */
static long core_of(int c) {
    char path[128];
    long core = -1, pkg = 0;
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/core_id", c);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    if (fscanf(f, "%ld", &core) != 1) core = -1;
    fclose(f);
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", c);
    f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%ld", &pkg) != 1) pkg = 0;
        fclose(f);
    }
    return core < 0 ? -1 : pkg * 1000000 + core;
}

static void test_auto(void) {
    cpu_set_t allowed;
    REQUIRE(sched_getaffinity(0, sizeof allowed, &allowed) == 0);
    int first = -1, cores = 0;
    long seen[CPU_SETSIZE];
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &allowed)) continue;
        if (first < 0) first = c;
        long k = core_of(c);
        bool dup = false;
        for (int i = 0; i < cores && !dup; i++) dup = k >= 0 && seen[i] == k;
        if (!dup) seen[cores++] = k < 0 ? -1 - c : k;
    }
    fprintf(stderr, "  this host: %d physical cores allowed, the first CPU %d\n", cores, first);
    char groups[64][64], err[256];
    /* one more core than there is besides the first: refused, with the counts */
    int over = cores;
    CHECK(util_cpus_auto(over, 1, groups, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "physical cores");
    CHECK(util_cpus_auto(0, 1, groups, err, sizeof err) == -1);
    if (cores < 2) {
        fprintf(stderr, "  one core only: no group to give\n");
        return;
    }
    int ng = cores - 1 < 4 ? cores - 1 : 4;
    REQUIRE(util_cpus_auto(ng, 1, groups, err, sizeof err) == 0);
    cpu_set_t all;
    CPU_ZERO(&all);
    long used_core[64];
    int nu = 0;
    for (int g = 0; g < ng; g++) {
        cpu_set_t s;
        fprintf(stderr, "  group %d: %s\n", g, groups[g]);
        REQUIRE(util_cpulist_parse(groups[g], &s, err, sizeof err) == 0);
        CHECK_EQ_INT(CPU_COUNT(&s), 1);
        for (int c = 0; c < CPU_SETSIZE; c++) {
            if (!CPU_ISSET(c, &s)) continue;
            CHECKF(!CPU_ISSET(c, &all), "CPU %d in two groups", c);
            CHECKF(c != first, "CPU %d is the first one, left for the rest", c);
            CHECK(CPU_ISSET(c, &allowed));
            CHECKF(core_of(c) < 0 || core_of(c) != core_of(first), "CPU %d shares the first core", c);
            long k = core_of(c);
            for (int i = 0; i < nu; i++) CHECKF(k < 0 || used_core[i] != k, "CPU %d: a core given twice", c);
            used_core[nu++] = k;
            CPU_SET(c, &all);
        }
    }
    /* the same call gives the same groups */
    char again[64][64];
    REQUIRE(util_cpus_auto(ng, 1, again, err, sizeof err) == 0);
    for (int g = 0; g < ng; g++) CHECK(!strcmp(groups[g], again[g]));
    if (cores >= 5) {
        REQUIRE(util_cpus_auto(2, 2, groups, err, sizeof err) == 0);
        cpu_set_t a, b;
        util_cpulist_parse(groups[0], &a, err, sizeof err);
        util_cpulist_parse(groups[1], &b, err, sizeof err);
        CHECK_EQ_INT(CPU_COUNT(&a), 2);
        CHECK_EQ_INT(CPU_COUNT(&b), 2);
        CPU_AND(&a, &a, &b);
        CHECK_EQ_INT(CPU_COUNT(&a), 0);
    }
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int phase;
static cpu_set_t early_seen;

/* started before the pin: waits, then reads its own mask */
static void *early(void *arg) {
    (void)arg;
    pthread_mutex_lock(&mu);
    while (phase == 0) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    sched_getaffinity(0, sizeof early_seen, &early_seen);
    return NULL;
}

/* the highest CPU in `set` (-1: none) */
static int last_cpu(const cpu_set_t *set) {
    int last = -1;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, set)) last = c;
    return last;
}

/* a thread started after the pin: reads its own mask into arg */
static void *late(void *arg) {
    sched_getaffinity(0, sizeof(cpu_set_t), (cpu_set_t *)arg);
    return NULL;
}

static void test_pin(void) {
    cpu_set_t before, one, got;
    char err[256];
    REQUIRE(sched_getaffinity(0, sizeof before, &before) == 0);
    int last = last_cpu(&before);
    REQUIRE(last >= 0);
    pthread_t t1, t2;
    REQUIRE(pthread_create(&t1, NULL, early, NULL) == 0);
    CPU_ZERO(&one);
    CPU_SET(last, &one);
    CHECK(util_pin_process(&one, err, sizeof err) == 0);
    pthread_mutex_lock(&mu);
    phase = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    pthread_join(t1, NULL);
    CHECKF(CPU_EQUAL(&early_seen, &one), "a thread started before the pin has %d CPUs", CPU_COUNT(&early_seen));
    REQUIRE(pthread_create(&t2, NULL, late, &got) == 0);
    pthread_join(t2, NULL);
    CHECK(CPU_EQUAL(&got, &one));
    REQUIRE(sched_getaffinity(0, sizeof got, &got) == 0);
    CHECK(CPU_EQUAL(&got, &one));
    /* a CPU outside the allowed set: refused, nothing changed */
    int outside = -1;
    for (int c = 0; c < 1024 && outside < 0; c++)
        if (!CPU_ISSET(c, &before)) outside = c;
    if (outside >= 0) {
        cpu_set_t bad;
        CPU_ZERO(&bad);
        CPU_SET(outside, &bad);
        CHECK(util_pin_process(&bad, err, sizeof err) == -1);
        CHECK_STR_CONTAINS(err, "may run on");
        sched_getaffinity(0, sizeof got, &got);
        CHECK(CPU_EQUAL(&got, &one));
        /* one allowed, one not: refused too (the kernel would drop the other) */
        CPU_SET(last, &bad);
        CHECK(util_pin_process(&bad, err, sizeof err) == -1);
        char want[32];
        snprintf(want, sizeof want, "CPU %d of", outside);
        CHECK_STR_CONTAINS(err, want);
        sched_getaffinity(0, sizeof got, &got);
        CHECK(CPU_EQUAL(&got, &one));
    }
    cpu_set_t none;
    CPU_ZERO(&none);
    CHECK(util_pin_process(&none, err, sizeof err) == -1);
    CHECK(util_pin_process(&before, err, sizeof err) == 0);
}

static void *compute(void *arg) {
    util_compute_thread();
    sched_getaffinity(0, sizeof(cpu_set_t), (cpu_set_t *)arg);
    return NULL;
}

/* util_pin_compute: threads running at the pin and those that call util_compute_thread
 * on the set; the caller, and the threads it starts (HTTP, transfers), where they were */
static void test_pin_compute(void) {
    cpu_set_t home, one, got;
    char err[256];
    REQUIRE(sched_getaffinity(0, sizeof home, &home) == 0);
    int last = last_cpu(&home);
    REQUIRE(last >= 0);
    CPU_ZERO(&one);
    CPU_SET(last, &one);
    phase = 0;
    pthread_t t1, t2, t3;
    REQUIRE(pthread_create(&t1, NULL, early, NULL) == 0);
    REQUIRE(util_pin_compute(&one, err, sizeof err) == 0);
    pthread_mutex_lock(&mu);
    phase = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    pthread_join(t1, NULL);
    CHECK(CPU_EQUAL(&early_seen, &one));
    sched_getaffinity(0, sizeof got, &got);
    CHECK(CPU_EQUAL(&got, &home));
    REQUIRE(pthread_create(&t2, NULL, late, &got) == 0);
    pthread_join(t2, NULL);
    CHECK(CPU_EQUAL(&got, &home));
    REQUIRE(pthread_create(&t3, NULL, compute, &got) == 0);
    pthread_join(t3, NULL);
    CHECK(CPU_EQUAL(&got, &one));
}

int main(void) {
    TEST_RUN(test_parse_format);
    TEST_RUN(test_auto);
    TEST_RUN(test_pin);
    TEST_RUN(test_pin_compute);
    return TEST_END();
}
