/* deploy.c: bringing a sweep point's deployment up and down.
 *
 *   external   an endpoint the user runs (plan "base_url" or --base-url): checked for
 *              reachability, never started or stopped;
 *   co-1gpu    one `pdserve serve` child on a free loopback port (--port 0; the port is
 *              read back from its "listening on" log line), healthy when GET /health
 *              answers 200;
 *   the rest   (co-2gpus, dis-gpu, dis-cpu, dis-disk, dis-nccl, dis-tcp, xPyD) are one
 *              `pdserve up --setup NAME --port 0` child (router + instances, torn down
 *              with it), ready when it prints "pdserve up: ready: ... on http://H:P";
 *              options that `pdserve up` knows go to it, the rest to every instance.
 *
 * Children are started with posix_spawn and a fixed argv (no shell). Every live child
 * is registered so that study_deploy_kill_all() (called from the sweep's signal
 * handler) can stop them: a sweep interrupted with ^C leaves no server behind. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "study/study.h"
#include "util/util.h"

extern char **environ;

/* ---- registry of live children (read from a signal handler: plain ints only) ------- */
#define LIVE_MAX 64
static volatile sig_atomic_t live_pids[LIVE_MAX];

static void live_add(pid_t pid) {
    for (int i = 0; i < LIVE_MAX; i++)
        if (!live_pids[i]) {
            live_pids[i] = pid;
            return;
        }
}

static void live_del(pid_t pid) {
    for (int i = 0; i < LIVE_MAX; i++)
        if (live_pids[i] == pid) live_pids[i] = 0;
}

void study_deploy_kill_all(void) {
    for (int i = 0; i < LIVE_MAX; i++)
        if (live_pids[i] > 0) kill((pid_t)live_pids[i], SIGTERM);
}

/* ---- setups ------------------------------------------------------------------------ */
/* Setups brought up through `pdserve up` (router + instances as child processes). */
static const char *const VIA_UP[] = {"co-2gpus", "dis-gpu", "dis-cpu", "dis-disk", "dis-nccl", "dis-tcp", NULL};

/* xPyD names such as 2p1d. */
static bool is_xpyd(const char *name) {
    int p = 0, d = 0, n = 0;
    return sscanf(name, "%dp%dd%n", &p, &d, &n) == 2 && name[n] == 0 && p > 0 && d > 0;
}

static bool via_up(const char *name) {
    for (int i = 0; VIA_UP[i]; i++)
        if (!strcmp(name, VIA_UP[i])) return true;
    return is_xpyd(name);
}

bool study_deploy_available(const char *name, char *why, size_t cap) {
    if (!strcmp(name, "external") || !strcmp(name, "co-1gpu") || via_up(name)) return true;
    pd_errorf(why, cap, "unknown setup '%s' (known: external, co-1gpu, co-2gpus, dis-gpu, dis-cpu, dis-disk, "
                        "dis-nccl, dis-tcp, xPyD such as 2p1d)", name);
    return false;
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* GET url/health until it answers (any status when any_status, else 200) or timeout. */
static int wait_health(const char *base, double timeout_s, bool any_status, pid_t child, char *err, size_t errlen) {
    char url[512], e2[512] = "";
    snprintf(url, sizeof url, "%s/health", base);
    double t_end = time_now_s() + timeout_s;
    long status = 0;
    do {
        char *body = bench_http_get(url, NULL, 5, &status, e2, sizeof e2);
        free(body);
        if (body && (status == 200 || any_status)) return 0;
        if (child > 0 && waitpid(child, NULL, WNOHANG) == child) {
            pd_errorf(err, errlen, "the server exited before it was healthy");
            return -1;
        }
        sleep_s(0.2);
    } while (time_now_s() < t_end);
    if (status) pd_errorf(err, errlen, "GET %s gave HTTP %ld for %.0f s", url, status, timeout_s);
    else pd_errorf(err, errlen, "GET %s: %s (waited %.0f s)", url, e2, timeout_s);
    return -1;
}

/* The last line of a log file mentioning an error, else its last line. */
static void log_hint(const char *path, char *out, size_t cap) {
    out[0] = 0;
    if (!path) return;
    size_t len;
    char e[64];
    char *text = util_read_file(path, &len, e, sizeof e);
    if (!text) return;
    char *last = NULL, *lasterr = NULL;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        last = line;
        if (strstr(line, "error") || strstr(line, "rror:")) lasterr = line;
    }
    const char *pick = lasterr ? lasterr : last;
    if (pick) snprintf(out, cap, ": %.300s", pick);
    free(text);
}

/* Waits for `marker` followed by "http://HOST:PORT" in the child's log ("listening on "
 * from `pdserve serve`, "ready: ... on " from `pdserve up`); fills url. */
static int wait_listening(const char *log_path, const char *marker, pid_t child, double timeout_s, char *url,
                          size_t cap, char *err, size_t errlen) {
    double t_end = time_now_s() + timeout_s;
    while (time_now_s() < t_end) {
        size_t len;
        char e[64];
        char *text = util_read_file(log_path, &len, e, sizeof e);
        const char *at = text ? strstr(text, marker) : NULL;
        if (at) at = strstr(at, "http://");
        if (at) {
            size_t n = strcspn(at, " \n)");
            snprintf(url, cap, "%.*s", (int)PD_MIN(n, cap - 1), at);
            free(text);
            return 0;
        }
        free(text);
        int st;
        if (waitpid(child, &st, WNOHANG) == child) {
            live_del(child);
            char hint[400];
            log_hint(log_path, hint, sizeof hint);
            pd_errorf(err, errlen, "the deployment exited at start-up (status %d)%s",
                      WIFEXITED(st) ? WEXITSTATUS(st) : -1, hint);
            return -1;
        }
        sleep_s(0.1);
    }
    pd_errorf(err, errlen, "the deployment did not come up within %.0f s", timeout_s);
    return -1;
}

static void argv_push(char ***argv, int *n, const char *s) {
    *argv = xrealloc(*argv, sizeof **argv * (size_t)(*n + 2));
    (*argv)[(*n)++] = (char *)s;
    (*argv)[*n] = NULL;
}

/* The instances of a `pdserve up` deployment, from its log lines
 * "[NAME] pdserve serve: listening on http://H:P ..." (every NAME but the router's):
 * their /metrics carry the energy meters, which the bench reads one by one. */
static void instance_metrics_urls(const char *log_path, char *out, size_t cap) {
    size_t len;
    char e[64];
    char *text = util_read_file(log_path, &len, e, sizeof e);
    out[0] = 0;
    if (!text) return;
    size_t k = 0;
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        const char *at = strstr(line, "listening on http://");
        if (line[0] == '[' && strncmp(line, "[router]", 8) != 0 && at) {
            at += strlen("listening on ");
            int n = (int)strcspn(at, " )");
            int w = snprintf(out + k, cap - k, "%s%.*s/metrics", k ? "," : "", n, at);
            if (w < 0 || (size_t)w >= cap - k) {
                out[k] = 0;
                break;
            }
            k += (size_t)w;
        }
        line = nl ? nl + 1 : NULL;
    }
    free(text);
}

/* Options of `pdserve up` itself; every other option goes to the instances (after --). */
static bool is_up_flag(const char *k) {
    static const char *const UP_FLAGS[] = {"medium", "prefill", "decode", "device-list", "cpu-list", "policy",
                                           "kv-transfer-timeout", "kv-transfer-mode", "kv-store-dir",
                                           "kv-store-capacity", "prefill-args", "decode-args", NULL};
    for (int i = 0; UP_FLAGS[i]; i++)
        if (!strcmp(k, UP_FLAGS[i])) return true;
    return false;
}

/* co-1gpu: `pdserve serve` alone; other setups: `pdserve up --setup NAME -- serve args`. */
static int up_child(const study_setup *s, const study_deploy_opts *o, study_deployment *d, char *err,
                    size_t errlen) {
    bool up = via_up(s->name);
    char self[1024];
    const char *bin = o->pdserve_bin;
    if (!bin) {
        ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
        if (n <= 0) {
            pd_errorf(err, errlen, "cannot find this program's path (/proc/self/exe)");
            return -1;
        }
        self[n] = 0;
        bin = self;
    }
    if (!o->model) {
        pd_errorf(err, errlen, "setup '%s' needs a model (plan \"model\" or --model)", s->label);
        return -1;
    }
    if (!o->log_path) {
        pd_errorf(err, errlen, "setup '%s' needs a log file", s->label);
        return -1;
    }
    char **argv = NULL;
    int n = 0;
    argv_push(&argv, &n, bin);
    argv_push(&argv, &n, up ? "up" : "serve");
    if (up) {
        argv_push(&argv, &n, "--setup");
        argv_push(&argv, &n, s->name);
    }
    argv_push(&argv, &n, "--model");
    argv_push(&argv, &n, o->model);
    argv_push(&argv, &n, "--host");
    argv_push(&argv, &n, "127.0.0.1");
    argv_push(&argv, &n, "--port");
    argv_push(&argv, &n, "0");
    char flags[64][96], cpus[96];
    int nf = 0;
    /* up's own options first, then (after --) what every instance gets */
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1 && up) argv_push(&argv, &n, "--");
        if (pass == 1 && o->tokenizer) {
            argv_push(&argv, &n, "--tokenizer");
            argv_push(&argv, &n, o->tokenizer);
        }
        for (int i = 0; i < o->n_args && nf < 64; i++) {
            if ((up && is_up_flag(o->args[i].key)) != (pass == 0)) continue;
            const char *key = o->args[i].key, *value = o->args[i].value;
            if (!up && !strcmp(key, "cpu-list") && value) {
                /* one instance: `pdserve serve --cpus` with the first list (auto: the
                 * cores `pdserve up` would give its first instance) */
                snprintf(cpus, sizeof cpus, "%.*s", (int)strcspn(value, ":"), value);
                key = "cpus";
                value = cpus;
            }
            snprintf(flags[nf], sizeof flags[nf], "--%s", key);
            argv_push(&argv, &n, flags[nf++]);
            if (value) argv_push(&argv, &n, value);
        }
    }
    int fd = open(o->log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        pd_errorf(err, errlen, "cannot write %s: %s", o->log_path, strerror(errno));
        free(argv);
        return -1;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fd, 1);
    posix_spawn_file_actions_adddup2(&fa, fd, 2);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    pid_t pid;
    int rc = posix_spawn(&pid, bin, &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fd);
    free(argv);
    if (rc != 0) {
        pd_errorf(err, errlen, "cannot start %s %s: %s", bin, up ? "up" : "serve", strerror(rc));
        return -1;
    }
    live_add(pid);
    d->pids[d->n_pids++] = pid;
    if (wait_listening(o->log_path, up ? "pdserve up: ready:" : "listening on ", pid, o->start_timeout_s,
                       d->base_url, sizeof d->base_url, err, errlen) != 0) {
        study_deploy_down(d);
        return -1;
    }
    if (up) instance_metrics_urls(o->log_path, d->metrics_urls, sizeof d->metrics_urls);
    char e2[512];
    if (wait_health(d->base_url, o->start_timeout_s, false, pid, e2, sizeof e2) != 0) {
        char hint[400];
        log_hint(o->log_path, hint, sizeof hint);
        pd_errorf(err, errlen, "%s%s", e2, hint);
        study_deploy_down(d);
        return -1;
    }
    return 0;
}

int study_deploy_up(const study_setup *s, const study_deploy_opts *o, study_deployment *d, char *err,
                    size_t errlen) {
    memset(d, 0, sizeof *d);
    snprintf(d->setup, sizeof d->setup, "%s", s->label);
    if (!study_deploy_available(s->name, err, errlen)) return -1;
    if (!strcmp(s->name, "external")) {
        const char *url = o->base_url ? o->base_url : s->base_url;
        if (!url) {
            pd_errorf(err, errlen, "setup '%s' (external) needs a base URL: \"base_url\" in the plan or --base-url",
                      s->label);
            return -1;
        }
        snprintf(d->base_url, sizeof d->base_url, "%s", url);
        size_t n = strlen(d->base_url);
        while (n && d->base_url[n - 1] == '/') d->base_url[--n] = 0;
        return wait_health(d->base_url, PD_MIN(o->start_timeout_s, 30.0), true, 0, err, errlen);
    }
    return up_child(s, o, d, err, errlen);
}

void study_deploy_down(study_deployment *d) {
    for (int i = 0; i < d->n_pids; i++) kill(d->pids[i], SIGTERM);
    for (int i = 0; i < d->n_pids; i++) {
        pid_t pid = d->pids[i];
        double t_end = time_now_s() + 30;
        int st;
        while (waitpid(pid, &st, WNOHANG) == 0) {
            if (time_now_s() > t_end) {
                log_warn("sweep: pid %d ignored SIGTERM for 30 s: SIGKILL", (int)pid);
                kill(pid, SIGKILL);
                waitpid(pid, &st, 0);
                break;
            }
            sleep_s(0.05);
        }
        live_del(pid);
    }
    d->n_pids = 0;
}
