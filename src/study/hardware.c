/* hardware.c: what machine a point ran on, for the runs table: host name, CPU model
 * and cores, NVIDIA GPU names and driver version. Read from /proc only (no nvidia-smi
 * process, no NVML): a results row must say which hardware made it even on a machine
 * where the GPU stack is broken. */
#include <stdio.h>
#include <string.h>
#include <dirent.h>
#include <unistd.h>

#include "study/study.h"
#include "util/util.h"

static void trim(char *s) {
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == ' ' || s[n - 1] == '\t')) s[--n] = 0;
    size_t k = strspn(s, " \t");
    if (k) memmove(s, s + k, strlen(s + k) + 1);
}

/* The value after "key:" on the first line starting with key in file, or "". */
static void proc_field(const char *path, const char *key, char *out, size_t cap) {
    out[0] = 0;
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[512];
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, kl) != 0) continue;
        char *c = strchr(line, ':');
        if (!c) continue;
        snprintf(out, cap, "%s", c + 1);
        trim(out);
        break;
    }
    fclose(f);
}

/* Appends s to a JSON array being built in out (escaping quotes and backslashes). */
static void json_append(char *out, size_t cap, const char *s) {
    size_t n = strlen(out);
    if (n + 4 >= cap) return;
    if (n > 1) out[n++] = ',';
    out[n++] = '"';
    for (; *s && n + 3 < cap; s++) {
        if (*s == '"' || *s == '\\') out[n++] = '\\';
        if ((unsigned char)*s >= 0x20) out[n++] = *s;
    }
    out[n++] = '"';
    out[n] = 0;
}

void study_driver_version(const char *nvrm, char *out, size_t cap) {
    /* the first word of digits and dots with a dot in it: the proprietary module's
     * "NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar ..." and the open one's
     * "NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build ..." */
    out[0] = 0;
    for (const char *p = nvrm; *p;) {
        p += strspn(p, " \t");
        size_t l = strcspn(p, " \t");
        if (l > 0 && strspn(p, "0123456789.") == l && memchr(p, '.', l) && p[0] != '.') {
            snprintf(out, cap, "%.*s", (int)PD_MIN(l, cap - 1), p);
            return;
        }
        p += l;
    }
}

void study_hw_probe(study_hw *hw) {
    memset(hw, 0, sizeof *hw);
    if (gethostname(hw->hostname, sizeof hw->hostname - 1) != 0) hw->hostname[0] = 0;
    proc_field("/proc/cpuinfo", "model name", hw->cpu_model, sizeof hw->cpu_model);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    hw->cpu_cores = n > 0 ? (int)n : 0;
    snprintf(hw->gpus, sizeof hw->gpus, "[");
    DIR *d = opendir("/proc/driver/nvidia/gpus");
    if (d) {
        struct dirent *e;
        char names[16][128];
        char bus[16][64];
        int k = 0;
        while ((e = readdir(d)) && k < 16) {
            if (e->d_name[0] == '.') continue;
            char path[512];
            snprintf(path, sizeof path, "/proc/driver/nvidia/gpus/%s/information", e->d_name);
            proc_field(path, "Model", names[k], sizeof names[k]);
            snprintf(bus[k], sizeof bus[k], "%.63s", e->d_name);
            if (names[k][0]) k++;
        }
        closedir(d);
        /* PCI bus order, as CUDA_DEVICE_ORDER=PCI_BUS_ID numbers them. */
        for (int i = 1; i < k; i++)
            for (int j = i; j > 0 && strcmp(bus[j - 1], bus[j]) > 0; j--) {
                char t[128];
                memcpy(t, names[j], sizeof t);
                memcpy(names[j], names[j - 1], sizeof t);
                memcpy(names[j - 1], t, sizeof t);
                memcpy(t, bus[j], sizeof bus[j]);
                memcpy(bus[j], bus[j - 1], sizeof bus[j]);
                memcpy(bus[j - 1], t, sizeof bus[j]);
            }
        for (int i = 0; i < k; i++) json_append(hw->gpus, sizeof hw->gpus, names[i]);
    }
    size_t gl = strlen(hw->gpus);
    snprintf(hw->gpus + gl, sizeof hw->gpus - gl, "]");
    char v[256];
    proc_field("/proc/driver/nvidia/version", "NVRM version", v, sizeof v);
    study_driver_version(v, hw->driver, sizeof hw->driver);
}
