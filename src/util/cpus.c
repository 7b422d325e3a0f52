/* cpus.c: CPU lists ("0-3,6") and pinning a process, or its compute threads, to them.
 *
 * On the CPU backend an instance stands in for a GPU, and a GPU is its own device: two
 * instances never share one, nor with the router or the load generator. Pinning each
 * instance to cores of its own gives a CPU deployment the same property, and makes its
 * runs repeatable where the scheduler would otherwise move threads between cores and
 * onto the two hyperthreads of one core (docs/simulator.md, "Validation on the CPU"). */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "util/util.h"

int util_cpulist_parse(const char *s, cpu_set_t *set, char *err, size_t errlen) {
    CPU_ZERO(set);
    if (!s || !*s) {
        pd_errorf(err, errlen, "empty CPU list");
        return -1;
    }
    const char *p = s;
    for (;;) {
        char *end;
        if (!isdigit((unsigned char)*p)) goto bad;
        long a = strtol(p, &end, 10), b = a;
        p = end;
        if (*p == '-') {
            p++;
            if (!isdigit((unsigned char)*p)) goto bad;
            b = strtol(p, &end, 10);
            p = end;
        }
        if (a < 0 || b < a || b >= CPU_SETSIZE) {
            pd_errorf(err, errlen, "CPU list '%s': range %ld-%ld out of order or past CPU %d", s, a, b,
                      CPU_SETSIZE - 1);
            return -1;
        }
        for (long c = a; c <= b; c++) CPU_SET((int)c, set);
        if (!*p) return 0;
        if (*p != ',') goto bad;
        p++;
    }
bad:
    pd_errorf(err, errlen, "CPU list '%s': expected numbers and ranges like 0-3,6 (at '%s')", s, p);
    return -1;
}

int util_cpulist_format(const cpu_set_t *set, char *out, size_t cap) {
    size_t n = 0;
    int count = 0;
    if (cap) out[0] = 0;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, set)) continue;
        int e = c;
        while (e + 1 < CPU_SETSIZE && CPU_ISSET(e + 1, set)) e++;
        int w = e > c ? snprintf(out + n, cap > n ? cap - n : 0, "%s%d-%d", count ? "," : "", c, e)
                      : snprintf(out + n, cap > n ? cap - n : 0, "%s%d", count ? "," : "", c);
        if (w > 0) n += (size_t)w;
        count += e - c + 1;
        c = e;
    }
    return count;
}

/* The physical core of logical CPU c ("package:core"), or c itself where sysfs does not
 * say. */
static long core_key(int c) {
    char path[128];
    long pkg = 0, core = -1;
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/core_id", c);
    FILE *f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%ld", &core) != 1) core = -1;
        fclose(f);
    }
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", c);
    f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%ld", &pkg) != 1) pkg = 0;
        fclose(f);
    }
    if (core < 0) return -1 - c;
    return pkg * 1000000 + core;
}

int util_cpus_auto(int n_groups, int per_group, char groups[][64], char *err, size_t errlen) {
    cpu_set_t allowed;
    if (n_groups < 1 || per_group < 1) {
        pd_errorf(err, errlen, "CPU groups: %d groups of %d CPUs", n_groups, per_group);
        return -1;
    }
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) {
        pd_errorf(err, errlen, "sched_getaffinity: %s", strerror(errno));
        return -1;
    }
    /* one logical CPU per physical core (the lowest numbered), in order */
    int picks[CPU_SETSIZE], n = 0;
    long keys[CPU_SETSIZE];
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &allowed)) continue;
        long k = core_key(c);
        bool seen = false;
        for (int i = 0; i < n && !seen; i++) seen = keys[i] == k;
        if (seen) continue;
        keys[n] = k;
        picks[n++] = c;
    }
    /* the first core stays for everything else (router, load generator, the kernel) */
    int need = n_groups * per_group;
    if (n - 1 < need) {
        pd_errorf(err, errlen, "%d groups of %d CPUs need %d physical cores besides one for the rest; %d allowed here",
                  n_groups, per_group, need, n);
        return -1;
    }
    for (int g = 0; g < n_groups; g++) {
        cpu_set_t s;
        CPU_ZERO(&s);
        for (int i = 0; i < per_group; i++) CPU_SET(picks[1 + g * per_group + i], &s);
        util_cpulist_format(&s, groups[g], 64);
    }
    return 0;
}

int util_pin_process(const cpu_set_t *set, char *err, size_t errlen) {
    if (CPU_COUNT(set) == 0) {
        pd_errorf(err, errlen, "no CPU to pin to");
        return -1;
    }
    cpu_set_t old, got;
    if (sched_getaffinity(0, sizeof old, &old) != 0) {
        pd_errorf(err, errlen, "sched_getaffinity: %s", strerror(errno));
        return -1;
    }
    /* this thread first: the kernel refuses a set with no CPU the process may use
     * (its cgroup's, the online ones) and drops those it may not from the rest */
    char want[256];
    util_cpulist_format(set, want, sizeof want);
    if (sched_setaffinity(0, sizeof *set, set) != 0) {
        pd_errorf(err, errlen, "CPUs %s: %s%s", want, strerror(errno),
                  errno == EINVAL ? " (none is one this process may run on)" : "");
        return -1;
    }
    if (sched_getaffinity(0, sizeof got, &got) != 0 || !CPU_EQUAL(&got, set)) {
        sched_setaffinity(0, sizeof old, &old);
        for (int c = 0; c < CPU_SETSIZE; c++)
            if (CPU_ISSET(c, set) && !CPU_ISSET(c, &got)) {
                pd_errorf(err, errlen, "CPU %d of %s is not one this process may run on", c, want);
                return -1;
            }
        pd_errorf(err, errlen, "CPUs %s: the kernel gave another set", want);
        return -1;
    }
    /* then every other thread already running (a BLAS library may start its own
     * before main); threads started later inherit this one's mask */
    DIR *d = opendir("/proc/self/task");
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!isdigit((unsigned char)e->d_name[0])) continue;
            pid_t tid = (pid_t)atol(e->d_name);
            if (sched_setaffinity(tid, sizeof *set, set) != 0 && errno != ESRCH) {
                int er = errno;
                closedir(d);
                pd_errorf(err, errlen, "sched_setaffinity (thread %d): %s", (int)tid, strerror(er));
                return -1;
            }
        }
        closedir(d);
    }
    return 0;
}

static cpu_set_t compute_cpus;
static bool compute_pinned;

int util_pin_compute(const cpu_set_t *set, char *err, size_t errlen) {
    cpu_set_t home;
    if (sched_getaffinity(0, sizeof home, &home) != 0) {
        pd_errorf(err, errlen, "sched_getaffinity: %s", strerror(errno));
        return -1;
    }
    if (util_pin_process(set, err, errlen)) return -1;
    compute_cpus = *set;
    compute_pinned = true;
    sched_setaffinity(0, sizeof home, &home);
    return 0;
}

void util_compute_thread(void) {
    if (compute_pinned) sched_setaffinity(0, sizeof compute_cpus, &compute_cpus);
}
