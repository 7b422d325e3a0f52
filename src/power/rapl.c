/* rapl.c: CPU package and DRAM energy from Linux's powercap tree (RAPL). Read once at
 * start and end and by the sampler every period (a package counter at 200 W wraps in
 * about 20 minutes, so start/end alone could miss a wrap).
 *
 * Layout read: ROOT/intel-rapl:P/{name,energy_uj,max_energy_range_uj} for package P
 * ("package-P"), and ROOT/intel-rapl:P:S/ with name "dram" for its DRAM domain
 * ("dram-P"). Core, uncore and psys domains are skipped: they overlap the package.
 * energy_uj is root-only on kernels since 5.10 (a side-channel fix): a domain that
 * cannot be read is reported as not measured, with the reason. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "power/power.h"
#include "util/util.h"

/* Reads a small file's first line into buf (newline stripped): 0, or errno. */
static int read_line(const char *path, char *buf, size_t cap) {
    FILE *f = fopen(path, "r");
    if (!f) return errno ? errno : EIO;
    if (!fgets(buf, (int)cap, f)) {
        int e = ferror(f) ? (errno ? errno : EIO) : ENODATA;
        fclose(f);
        return e;
    }
    fclose(f);
    buf[strcspn(buf, "\r\n")] = 0;
    return 0;
}

static int read_u64(const char *path, uint64_t *v) {
    char buf[64];
    int e = read_line(path, buf, sizeof buf);
    if (e) return e;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(buf, &end, 10);
    if (end == buf || errno) return EINVAL;
    *v = x;
    return 0;
}

static int cmp_domain(const void *a, const void *b) {
    const power_rapl_domain *x = a, *y = b;
    if (x->is_dram != y->is_dram) return x->is_dram ? 1 : -1;
    return strcmp(x->name, y->name);
}

/* Adds the domain in folder dir (a child of root named entry) when it is a package
 * or a dram domain. */
static void rapl_add(power_rapl *r, const char *root, const char *entry) {
    unsigned pkg = 0, sub = 0;
    char tail;
    int parts = sscanf(entry, "intel-rapl:%u:%u%c", &pkg, &sub, &tail);
    if (parts != 1 && parts != 2) return;
    if (parts == 1 && sscanf(entry, "intel-rapl:%u%c", &pkg, &tail) != 1) return;
    char dir[400], path[512], name[64];
    snprintf(dir, sizeof dir, "%s/%s", root, entry);
    snprintf(path, sizeof path, "%s/name", dir);
    if (read_line(path, name, sizeof name) != 0) return;
    bool is_pkg = parts == 1 && strncmp(name, "package", 7) == 0;
    bool is_dram = parts == 2 && strcmp(name, "dram") == 0;
    if ((!is_pkg && !is_dram) || r->n >= POWER_MAX_RAPL) return;
    power_rapl_domain *d = &r->d[r->n++];
    memset(d, 0, sizeof *d);
    d->is_dram = is_dram;
    if (is_pkg) snprintf(d->name, sizeof d->name, "%.47s", name);
    else snprintf(d->name, sizeof d->name, "dram-%u", pkg);
    snprintf(d->path, sizeof d->path, "%s/energy_uj", dir);
    snprintf(path, sizeof path, "%s/max_energy_range_uj", dir);
    if (read_u64(path, &d->range_uj) != 0) d->range_uj = 0;
    uint64_t v;
    int e = read_u64(d->path, &v);
    d->readable = e == 0;
    char label[48];
    memcpy(label, d->name, sizeof label);
    if (e == EACCES || e == EPERM)
        snprintf(d->reason, sizeof d->reason,
                 "%s: permission denied (energy_uj is root-only since Linux 5.10)", label);
    else if (e)
        snprintf(d->reason, sizeof d->reason, "%s: cannot read energy_uj: %s", label, strerror(e));
}

void power_rapl_scan(power_rapl *r, const char *root) {
    memset(r, 0, sizeof *r);
    if (!root) root = getenv("PDSERVE_POWERCAP_ROOT");
    if (!root || !*root) root = "/sys/class/powercap";
    DIR *dir = opendir(root);
    if (!dir) {
        snprintf(r->reason, sizeof r->reason, "CPU/DRAM energy not measured: no RAPL (%s: %s)",
                 root, strerror(errno));
        return;
    }
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        if (strncmp(e->d_name, "intel-rapl:", 11) == 0) rapl_add(r, root, e->d_name);
    }
    closedir(dir);
    if (r->n == 0)
        snprintf(r->reason, sizeof r->reason,
                 "CPU/DRAM energy not measured: no RAPL package domain under %s", root);
    qsort(r->d, (size_t)r->n, sizeof r->d[0], cmp_domain);
}

int power_rapl_read(const power_rapl *r, int i, uint64_t *uj, char *err, size_t errlen) {
    PD_ASSERT(r && i >= 0 && i < r->n && uj);
    int e = read_u64(r->d[i].path, uj);
    if (e) {
        pd_errorf(err, errlen, "%s: cannot read %s: %s", r->d[i].name, r->d[i].path, strerror(e));
        return -1;
    }
    return 0;
}
