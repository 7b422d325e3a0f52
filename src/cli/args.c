/* args.c: the long-option parser every subcommand uses, and the options several share
 * (--device, sizes, --cpus). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "util/util.h"

long long cli_parse_size(const char *s) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0) return -1;
    double mul = 1;
    if (!strcasecmp(end, "") || !strcasecmp(end, "b")) mul = 1;
    else if (!strcasecmp(end, "k") || !strcasecmp(end, "kib")) mul = 1024.0;
    else if (!strcasecmp(end, "kb")) mul = 1e3;
    else if (!strcasecmp(end, "m") || !strcasecmp(end, "mib")) mul = 1024.0 * 1024;
    else if (!strcasecmp(end, "mb")) mul = 1e6;
    else if (!strcasecmp(end, "g") || !strcasecmp(end, "gib")) mul = 1024.0 * 1024 * 1024;
    else if (!strcasecmp(end, "gb")) mul = 1e9;
    else return -1;
    double b = v * mul;
    if (!(b >= -9.2e18 && b <= 9.2e18)) return -1; /* past long long: refused, as a bad size */
    return (long long)b;
}

void cli_print_help(const char *usage, const cli_opt *opts, int n_opts) {
    printf("%s\n\noptions:\n", usage);
    for (int i = 0; i < n_opts; i++) {
        char left[96];
        const char *mv = opts[i].metavar ? opts[i].metavar
                         : opts[i].kind == OPT_INT    ? "N"
                         : opts[i].kind == OPT_DOUBLE ? "X"
                         : opts[i].kind == OPT_SIZE   ? "BYTES"
                                                      : "VALUE";
        if (opts[i].kind == OPT_FLAG) snprintf(left, sizeof left, "--%s", opts[i].name);
        else snprintf(left, sizeof left, "--%s %s", opts[i].name, mv);
        printf("  %-34s %s\n", left, opts[i].help);
    }
    printf("  %-34s %s\n", "--help", "show this help");
}

static int set_opt(const cli_opt *o, const char *val) {
    char *end;
    switch (o->kind) {
    case OPT_STRING: *(const char **)o->dst = val; return 0;
    case OPT_INT: {
        errno = 0;
        long v = strtol(val, &end, 10);
        if (errno || *end || end == val || v < -2147483647L || v > 2147483647L) return -1;
        *(int *)o->dst = (int)v;
        return 0;
    }
    case OPT_DOUBLE: {
        errno = 0;
        double v = strtod(val, &end);
        if (errno || *end || end == val) return -1;
        *(double *)o->dst = v;
        return 0;
    }
    case OPT_SIZE: {
        long long v = cli_parse_size(val);
        if (v < 0) return -1;
        *(size_t *)o->dst = (size_t)v;
        return 0;
    }
    case OPT_FLAG: *(bool *)o->dst = true; return 0;
    }
    return -1;
}

int cli_parse(int argc, char **argv, const cli_opt *opts, int n_opts, const char *usage,
              const char **pos, int max_pos, int *n_pos, bool *help) {
    *n_pos = 0;
    *help = false;
    bool only_pos = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (only_pos || a[0] != '-' || !strcmp(a, "-")) {
            if (*n_pos >= max_pos) {
                fprintf(stderr, "pdserve %s: unexpected argument '%s'\n", argv[0], a);
                return -1;
            }
            pos[(*n_pos)++] = a;
            continue;
        }
        if (!strcmp(a, "--")) {
            only_pos = true;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            cli_print_help(usage, opts, n_opts);
            *help = true;
            return 0;
        }
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "pdserve %s: unknown option '%s' (see --help)\n", argv[0], a);
            return -1;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const cli_opt *o = NULL;
        for (int k = 0; k < n_opts; k++)
            if (strlen(opts[k].name) == nlen && !strncmp(opts[k].name, name, nlen)) o = &opts[k];
        if (!o) {
            fprintf(stderr, "pdserve %s: unknown option '--%.*s' (see --help)\n", argv[0], (int)nlen, name);
            return -1;
        }
        const char *val = NULL;
        if (o->kind == OPT_FLAG) {
            if (eq) {
                fprintf(stderr, "pdserve %s: option '--%s' takes no value\n", argv[0], o->name);
                return -1;
            }
        } else if (eq) {
            val = eq + 1;
        } else if (i + 1 < argc) {
            val = argv[++i];
        } else {
            fprintf(stderr, "pdserve %s: option '--%s' needs a value\n", argv[0], o->name);
            return -1;
        }
        if (set_opt(o, val) != 0) {
            fprintf(stderr, "pdserve %s: bad value '%s' for option '--%s'\n", argv[0], val, o->name);
            return -1;
        }
    }
    return 0;
}

int cli_pin_cpus(const char *spec, int threads, bool compute_only, const char *who, char *err, size_t errlen) {
    char list[64];
    const char *use = spec;
    if (!strcmp(spec, "auto")) {
        if (threads <= 0) {
            pd_errorf(err, errlen, "auto needs --threads N (the cores to pin to)");
            return -1;
        }
        char g[1][64];
        if (util_cpus_auto(1, threads, g, err, errlen)) return -1;
        snprintf(list, sizeof list, "%s", g[0]);
        use = list;
    }
    cpu_set_t set;
    cpu_set_t home;
    sched_getaffinity(0, sizeof home, &home);
    if (util_cpulist_parse(use, &set, err, errlen) ||
        (compute_only ? util_pin_compute(&set, err, errlen) : util_pin_process(&set, err, errlen)))
        return -1;
    char shown[256], rest[256];
    int n = util_cpulist_format(&set, shown, sizeof shown);
    util_cpulist_format(&home, rest, sizeof rest);
    if (compute_only)
        log_info("%s: compute pinned to CPU%s %s (the engine's and the backend's threads; the others on %s)", who,
                 n == 1 ? "" : "s", shown, rest);
    else
        log_info("%s: pinned to CPU%s %s", who, n == 1 ? "" : "s", shown);
    return 0;
}

int cli_parse_device(const char *s, int *gpu) {
    char *end = NULL;
    long v;
    if (!strcmp(s, "cpu") || !strcmp(s, "-1")) {
        *gpu = -1;
        return 0;
    }
    if (!strcmp(s, "cuda")) {
        *gpu = 0;
        return 0;
    }
    if (!strncmp(s, "cuda:", 5)) s += 5;
    if (*s < '0' || *s > '9') return -1;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v > 1024) return -1;
    *gpu = (int)v;
    return 0;
}
