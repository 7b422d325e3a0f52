/* cmd_up.c: `pdserve up`, a whole deployment (router + instances) as child processes.
 *
 * Local setups (--setup): co-1gpu, co-2gpus, dis-gpu, dis-cpu, dis-disk, dis-tcp,
 * dis-nccl, and xPyD (--prefill N --decode M --medium X, or a name like "2p1d"). Every
 * instance is `pdserve serve --role ...` on a free loopback port (--port 0; the port is
 * read from its "listening on" line), the router listens on --host:--port. Decode
 * instances start first (stores are created by decode 0), then prefill, then the router;
 * each must answer /health before the next group starts.
 *
 * A deployment file (--deployment FILE --only-host H) starts the part of a multi-host
 * deployment that lives on host H, with the fixed ports the file gives (docs/
 * disaggregation.md).
 *
 * No orphans, nothing left behind: children live in their own process group (so a
 * terminal's Ctrl-C reaches only `up`, which stops them in order: router, prefill,
 * decode), die with `up` (PR_SET_PDEATHSIG), and are SIGKILLed after a grace period.
 * Then `up` removes every shm segment (/dev/shm/pdkv-<tag>*) and the disk store it made,
 * even when an instance was killed before it could; and at its start, the segments of an
 * earlier `up` that was itself killed (remove_stale_segments). Instance logs are copied to
 * standard error, each line prefixed with the instance's name. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "cli/cli.h"
#include "kv/kv.h"
#include "server/server.h"
#include "util/util.h"

#define UP_MAX_CHILDREN 66
#define UP_MAX_ARGS 128

static const char *USAGE =
    "usage: pdserve up --setup NAME --model DIR [--host H] [--port P] [options] [-- SERVE-ARGS]\n"
    "       pdserve up --deployment FILE --only-host H [-- SERVE-ARGS]\n\n"
    "Starts a whole deployment on this machine: instances (`pdserve serve --role ...`, each\n"
    "on a free loopback port) and the router, the one OpenAI endpoint, on --host:--port.\n"
    "Waits for every part to be healthy, then serves until Ctrl-C or SIGTERM, and tears it\n"
    "all down (no process, shared-memory segment or store file is left).\n\n"
    "setups: co-1gpu, co-2gpus (colocated, behind the router's load balancer), dis-gpu,\n"
    "dis-cpu, dis-disk, dis-tcp, dis-nccl (1 prefill + 1 decode, KV over that medium),\n"
    "xPyD (e.g. 2p1d, or --prefill N --decode M --medium X). Arguments after `--` go to\n"
    "every instance (e.g. -- --max-model-len 4096 --kv-cache-memory 2GiB).";

typedef struct child {
    char name[32];
    server_role role;
    pid_t pid;
    int fd;                     /* its stderr (read end), -1 once closed */
    char line[4096];
    size_t line_len;
    int port;                   /* from its "listening on" line; 0 before */
    char host[64];
    bool exited;
    int status;
} child;

typedef struct up_opts {
    const char *setup, *model, *host, *medium, *device_list, *deployment, *only_host;
    const char *cpu_list;       /* --cpu-list: each instance's CPUs (plan_cpus) */
    const char *policy, *kv_mode, *store_dir, *prefill_args, *decode_args, *secret;
    int port, n_prefill, n_decode;
    double kv_timeout, ready_timeout;
    size_t store_capacity;
    /* prefix caching and its lower tiers, forwarded to the instances (docs/reuse.md) */
    bool enable_prefix_caching, kv_offload_async;
    const char *kv_offload, *kv_offload_disk_dir;
    size_t kv_offload_cpu_bytes, kv_offload_disk_bytes;
} up_opts;

typedef struct up_state {
    child ch[UP_MAX_CHILDREN];
    int n;
    pid_t pgid;
    char tag[32];               /* "up<pid>-": every shm name and store of this deployment */
    char store_dir[512];        /* disk store made by us ("" when none) */
    bool made_store_dir;
    int sfd;                    /* signalfd: SIGINT, SIGTERM, SIGCHLD */
    bool stop;
    int stop_sig;
} up_state;

/* ---- children ------------------------------------------------------------------------ */
static void child_emit_line(child *c) {
    c->line[c->line_len] = 0;
    fprintf(stderr, "[%s] %s\n", c->name, c->line);
    if (!c->port) {
        const char *p = strstr(c->line, "listening on http://");
        if (p) {
            p += strlen("listening on http://");
            /* HOST:PORT ends at the first space: the rest of the line names the model,
             * whose preset:NAME form has a colon of its own */
            size_t n = strcspn(p, " ");
            const char *colon = NULL;
            for (const char *q = p; q < p + n; q++)
                if (*q == ':') colon = q;
            if (colon) c->port = atoi(colon + 1);
        }
    }
    c->line_len = 0;
}

/* Reads what a child wrote; closes the pipe at its end. */
static void child_read(child *c) {
    char buf[4096];
    ssize_t n = read(c->fd, buf, sizeof buf);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (c->line_len) child_emit_line(c);
        close(c->fd);
        c->fd = -1;
        return;
    }
    for (ssize_t i = 0; i < n; i++) {
        if (buf[i] == '\n' || c->line_len == sizeof c->line - 1) child_emit_line(c);
        if (buf[i] != '\n') c->line[c->line_len++] = buf[i];
    }
}

static void reap(up_state *u) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        for (int i = 0; i < u->n; i++)
            if (u->ch[i].pid == pid) {
                u->ch[i].exited = true;
                u->ch[i].status = status;
                if (u->stop) {
                    if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
                        log_warn("up: %s (pid %d) exited with status %d", u->ch[i].name, (int)pid,
                                 WEXITSTATUS(status));
                } else {
                    if (WIFSIGNALED(status))
                        log_warn("up: %s (pid %d) was killed by signal %d", u->ch[i].name, (int)pid, WTERMSIG(status));
                    else
                        log_warn("up: %s (pid %d) exited with status %d", u->ch[i].name, (int)pid, WEXITSTATUS(status));
                }
            }
}

/* One round of waiting: child output, signals, up to timeout_ms. */
static void pump(up_state *u, int timeout_ms) {
    struct pollfd pf[UP_MAX_CHILDREN + 1];
    int idx[UP_MAX_CHILDREN + 1], n = 0;
    pf[n] = (struct pollfd){.fd = u->sfd, .events = POLLIN};
    idx[n++] = -1;
    for (int i = 0; i < u->n; i++)
        if (u->ch[i].fd >= 0) {
            pf[n] = (struct pollfd){.fd = u->ch[i].fd, .events = POLLIN};
            idx[n++] = i;
        }
    int rc = poll(pf, (nfds_t)n, timeout_ms);
    if (rc <= 0) return;
    for (int k = 0; k < n; k++) {
        if (!(pf[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        if (idx[k] >= 0) {
            child_read(&u->ch[idx[k]]);
            continue;
        }
        struct signalfd_siginfo si;
        while (read(u->sfd, &si, sizeof si) == (ssize_t)sizeof si) {
            if (si.ssi_signo == SIGCHLD) {
                reap(u);
            } else if (!u->stop) {
                u->stop = true;
                u->stop_sig = (int)si.ssi_signo;
            }
        }
    }
}

/* Starts argv[] as child `name` in the deployment's process group. */
static child *spawn(up_state *u, const char *name, server_role role, char *const argv[], char *err,
                    size_t errlen) {
    if (u->n == UP_MAX_CHILDREN) {
        pd_errorf(err, errlen, "too many instances (at most %d)", UP_MAX_CHILDREN - 1);
        return NULL;
    }
    int p[2];
    if (pipe2(p, O_CLOEXEC)) {
        pd_errorf(err, errlen, "pipe: %s", strerror(errno));
        return NULL;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        pd_errorf(err, errlen, "fork: %s", strerror(errno));
        close(p[0]);
        close(p[1]);
        return NULL;
    }
    if (pid == 0) {
        /* the child: its own group (the deployment's), dies with `up`, default signals */
        setpgid(0, u->pgid);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) _exit(1);
        sigset_t all;
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        dup2(p[1], 2);
        execv("/proc/self/exe", argv);
        fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    if (!u->pgid) u->pgid = pid;
    setpgid(pid, u->pgid); /* both sides, so that there is no race */
    close(p[1]);
    fcntl(p[0], F_SETFL, O_NONBLOCK);
    child *c = &u->ch[u->n++];
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    c->role = role;
    c->pid = pid;
    c->fd = p[0];
    return c;
}

static size_t sink(char *b, size_t s, size_t n, void *u) { return s * n; }

static bool http_ok(const char *host, int port, const char *path) {
    char url[256];
    snprintf(url, sizeof url, "http://%s:%d%s", host, port, path);
    CURL *e = curl_easy_init();
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 1000L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, sink);
    long code = 0;
    bool ok = curl_easy_perform(e) == CURLE_OK &&
              curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code) == CURLE_OK && code == 200;
    curl_easy_cleanup(e);
    return ok;
}

/* Waits until child c listens and answers /health 200. -1 with err when it exits, a
 * signal comes, or timeout_s passes. */
static int wait_healthy(up_state *u, child *c, double timeout_s, char *err, size_t errlen) {
    double end = time_now_s() + timeout_s;
    while (time_now_s() < end && !u->stop) {
        pump(u, 50);
        if (c->exited) {
            pd_errorf(err, errlen, "%s exited during start-up (see its log above)", c->name);
            return -1;
        }
        if (c->port && http_ok(c->host, c->port, "/health")) return 0;
    }
    pd_errorf(err, errlen, u->stop ? "interrupted while %s was starting" : "%s was not healthy within %.0f s",
              c->name, timeout_s);
    return -1;
}

/* Stops the children of `role` (SIGTERM), waiting up to grace_s; SIGKILL after. */
static void stop_role(up_state *u, server_role role, double grace_s) {
    bool any = false;
    for (int i = 0; i < u->n; i++)
        if (u->ch[i].role == role && !u->ch[i].exited) {
            kill(u->ch[i].pid, SIGTERM);
            any = true;
        }
    if (!any) return;
    double end = time_now_s() + grace_s;
    for (;;) {
        bool alive = false;
        for (int i = 0; i < u->n; i++) alive |= u->ch[i].role == role && !u->ch[i].exited;
        if (!alive) return;
        if (time_now_s() >= end) break;
        pump(u, 50);
        reap(u);
    }
    for (int i = 0; i < u->n; i++)
        if (u->ch[i].role == role && !u->ch[i].exited) {
            log_warn("up: %s did not stop within %.0f s: killing it", u->ch[i].name, grace_s);
            kill(u->ch[i].pid, SIGKILL);
        }
}

/* Removes what this deployment may have left: shm segments of its tag, its disk store. */
static void cleanup_files(up_state *u) {
    DIR *d = opendir("/dev/shm");
    if (d) {
        struct dirent *de;
        while ((de = readdir(d)))
            if (!strncmp(de->d_name, KV_SHM_PREFIX, strlen(KV_SHM_PREFIX)) && strstr(de->d_name, u->tag)) {
                char path[512];
                snprintf(path, sizeof path, "/dev/shm/%s", de->d_name);
                if (unlink(path) == 0) log_info("up: removed %s (left by an instance that died)", path);
            }
        closedir(d);
    }
    if (u->made_store_dir && u->store_dir[0]) {
        DIR *s = opendir(u->store_dir);
        if (s) {
            struct dirent *de;
            int n = 0;
            while ((de = readdir(s)))
                if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
                    char path[1024];
                    snprintf(path, sizeof path, "%s/%s", u->store_dir, de->d_name);
                    if (unlink(path) == 0) n++;
                }
            closedir(s);
            if (n) log_info("up: removed %d file(s) left in the disk store %s", n, u->store_dir);
        }
        rmdir(u->store_dir);
    }
}

/* Segments that an earlier `pdserve up` left when it was itself killed (SIGKILL: its
 * children die with it, PR_SET_PDEATHSIG, and nobody unlinks their /dev/shm segments,
 * a cpu store among them, whose memory stays taken): names of this folder's prefix
 * with an "up<pid>-" tag whose process is gone. Assumes the deployments that made them
 * ran in this pid namespace (a container shares /dev/shm with no other by default). */
static void remove_stale_segments(void) {
    DIR *d = opendir("/dev/shm");
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        /* the names `up` gives: pdkv-up<pid>-<instance>-..., pdkv-store-up<pid>-store */
        const char *t = de->d_name;
        if (strncmp(t, KV_SHM_PREFIX, strlen(KV_SHM_PREFIX))) continue;
        t += strlen(KV_SHM_PREFIX);
        if (!strncmp(t, "store-", 6)) t += 6;
        int pid = 0, n = 0;
        if (sscanf(t, "up%d-%n", &pid, &n) != 1 || n == 0 || pid <= 0 || pid == (int)getpid()) continue;
        if (kill(pid, 0) == 0 || errno != ESRCH) continue;
        char path[512];
        snprintf(path, sizeof path, "/dev/shm/%s", de->d_name);
        if (unlink(path) == 0) log_info("up: removed %s (left by pdserve up %d, which is gone)", path, pid);
    }
    closedir(d);
}

static void teardown(up_state *u) {
    u->stop = true;
    stop_role(u, SERVER_ROLE_ROUTER, 15.0);
    stop_role(u, SERVER_ROLE_COLOCATED, 15.0);
    stop_role(u, SERVER_ROLE_PREFILL, 15.0);
    stop_role(u, SERVER_ROLE_DECODE, 15.0);
    if (u->pgid) kill(-u->pgid, SIGKILL); /* anything they started */
    for (int i = 0; i < u->n; i++) {
        if (!u->ch[i].exited) waitpid(u->ch[i].pid, NULL, 0), u->ch[i].exited = true;
        while (u->ch[i].fd >= 0) child_read(&u->ch[i]);
    }
    cleanup_files(u);
}

/* ---- argv building ------------------------------------------------------------------------ */
typedef struct argv_b {
    char *v[UP_MAX_ARGS + 1];
    int n;
} argv_b;

static void arg(argv_b *a, const char *s) {
    PD_ASSERT(a->n < UP_MAX_ARGS);
    a->v[a->n++] = xstrdup(s);
    a->v[a->n] = NULL;
}

static void argf(argv_b *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void argf(argv_b *a, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    arg(a, buf);
}

static void args_split(argv_b *a, const char *s) {
    if (!s) return;
    char *copy = xstrdup(s), *save = NULL;
    for (char *t = strtok_r(copy, " \t", &save); t; t = strtok_r(NULL, " \t", &save)) arg(a, t);
    free(copy);
}

static void argv_free(argv_b *a) {
    for (int i = 0; i < a->n; i++) free(a->v[i]);
    a->n = 0;
}

/* ---- one instance ---------------------------------------------------------------------------- */
typedef struct inst_spec {
    char name[32];
    server_role role;
    char host[64];
    int port;                   /* 0: any free one */
    char device[32];            /* "" : cpu */
    char cpus[64];              /* its --cpus ("": not pinned) */
    int kv_port;
} inst_spec;

typedef struct plan {
    inst_spec inst[UP_MAX_CHILDREN];
    int n;
    kv_medium medium;
    bool disaggregated;
    const char *model;
    char router_host[64];
    int router_port;
    bool start_router;
    char secret[80];
    const char *extra_prefill, *extra_decode;
    char **extra;               /* after "--" */
    int n_extra;
} plan;

/* --enable-prefix-caching to every instance; --kv-offload and its sizes to those that
 * prefill (colocated, prefill): a decode instance gets its prompts' KV from the medium
 * and never looks its prefixes up, so lower tiers would only cost it copies. */
static void reuse_argv(const up_opts *o, server_role role, argv_b *a) {
    if (o->enable_prefix_caching) arg(a, "--enable-prefix-caching");
    if (!o->kv_offload || role == SERVER_ROLE_DECODE) return;
    arg(a, "--kv-offload");
    arg(a, o->kv_offload);
    if (o->kv_offload_cpu_bytes) {
        arg(a, "--kv-offload-cpu-bytes");
        argf(a, "%zu", o->kv_offload_cpu_bytes);
    }
    if (o->kv_offload_disk_dir) { /* each instance makes its own directory inside */
        arg(a, "--kv-offload-disk-dir");
        arg(a, o->kv_offload_disk_dir);
    }
    if (o->kv_offload_disk_bytes) {
        arg(a, "--kv-offload-disk-bytes");
        argf(a, "%zu", o->kv_offload_disk_bytes);
    }
    if (o->kv_offload_async) arg(a, "--kv-offload-async");
}

static void instance_argv(const up_opts *o, const plan *pl, up_state *u, const inst_spec *s, int decode_index,
                          argv_b *a) {
    arg(a, "pdserve");
    arg(a, "serve");
    arg(a, "--model");
    arg(a, pl->model);
    arg(a, "--host");
    arg(a, s->host);
    arg(a, "--port");
    argf(a, "%d", s->port);
    arg(a, "--role");
    arg(a, server_role_name(s->role));
    if (s->device[0]) {
        arg(a, "--device");
        arg(a, s->device);
    }
    if (s->cpus[0]) {
        arg(a, "--cpus");
        arg(a, s->cpus);
    }
    if (pl->disaggregated) {
        arg(a, "--kv-medium");
        arg(a, kv_medium_name(pl->medium));
        arg(a, "--kv-transfer-timeout");
        argf(a, "%g", o->kv_timeout);
        if (o->kv_mode) {
            arg(a, "--kv-transfer-mode");
            arg(a, o->kv_mode);
        }
        if (pl->medium == KV_MEDIUM_GPU && s->role == SERVER_ROLE_DECODE) {
            arg(a, "--kv-name");
            argf(a, "%s%s", u->tag, s->name);
        }
        if (pl->medium == KV_MEDIUM_CPU) {
            arg(a, "--kv-store");
            argf(a, "%sstore", u->tag);
        }
        if (pl->medium == KV_MEDIUM_DISK) {
            arg(a, "--kv-store");
            arg(a, u->store_dir);
        }
        if ((pl->medium == KV_MEDIUM_CPU || pl->medium == KV_MEDIUM_DISK) && s->role == SERVER_ROLE_DECODE &&
            decode_index == 0)
            arg(a, "--kv-create-store");
        if ((pl->medium == KV_MEDIUM_CPU || pl->medium == KV_MEDIUM_DISK) && o->store_capacity) {
            arg(a, "--kv-store-capacity");
            argf(a, "%zu", o->store_capacity);
        }
        if ((pl->medium == KV_MEDIUM_TCP || pl->medium == KV_MEDIUM_NCCL) && s->role == SERVER_ROLE_DECODE) {
            arg(a, "--kv-host");
            arg(a, s->host);
            arg(a, "--kv-port");
            argf(a, "%d", s->kv_port);
        }
        if (s->role == SERVER_ROLE_PREFILL) args_split(a, pl->extra_prefill);
        if (s->role == SERVER_ROLE_DECODE) args_split(a, pl->extra_decode);
    }
    reuse_argv(o, s->role, a);
    for (int i = 0; i < pl->n_extra; i++) arg(a, pl->extra[i]);
}

static void router_argv(const up_opts *o, const plan *pl, argv_b *a, const char *served) {
    arg(a, "pdserve");
    arg(a, "serve");
    arg(a, "--role");
    arg(a, "router");
    arg(a, "--host");
    arg(a, pl->router_host);
    arg(a, "--port");
    argf(a, "%d", pl->router_port);
    arg(a, "--served-model-name");
    arg(a, served);
    arg(a, "--policy");
    arg(a, o->policy);
    arg(a, "--kv-transfer-timeout");
    argf(a, "%g", o->kv_timeout);
    sbuf lists[3];
    for (int k = 0; k < 3; k++) sbuf_init(&lists[k]);
    for (int i = 0; i < pl->n; i++) {
        const inst_spec *s = &pl->inst[i];
        int k = s->role == SERVER_ROLE_PREFILL ? 0 : s->role == SERVER_ROLE_DECODE ? 1 : 2;
        sbuf_printf(&lists[k], "%shttp://%s:%d", lists[k].len ? "," : "", s->host, s->port);
    }
    static const char *const FLAGS[3] = {"--prefill", "--decode", "--instances"};
    for (int k = 0; k < 3; k++) {
        if (lists[k].len) {
            arg(a, FLAGS[k]);
            arg(a, lists[k].p);
        }
        sbuf_free(&lists[k]);
    }
}

/* ---- plans: named setups and deployment files ------------------------------------------------ */
static int plan_setup(const up_opts *o, plan *pl, char *err, size_t errlen) {
    const char *s = o->setup;
    int np = o->n_prefill, nd = o->n_decode, nc = 0;
    const char *medium = NULL;
    int a = 0, b = 0;
    char tail[8] = "";
    if (!s && !np && !nd) {
        pd_errorf(err, errlen, "give --setup NAME (co-1gpu, co-2gpus, dis-gpu, dis-cpu, dis-disk, dis-tcp, "
                               "dis-nccl, xPyD) or --deployment FILE");
        return -1;
    }
    if (!s) {
        s = "xpyd";
    }
    if (!strcmp(s, "co-1gpu")) nc = 1;
    else if (!strcmp(s, "co-2gpus")) nc = 2;
    else if (!strncmp(s, "dis-", 4)) {
        medium = s + 4;
        np = np ? np : 1;
        nd = nd ? nd : 1;
    } else if (sscanf(s, "%dp%d%7s", &a, &b, tail) == 3 && !strcmp(tail, "d") && a > 0 && b > 0) {
        np = a;
        nd = b;
    } else if (strcmp(s, "xpyd")) {
        pd_errorf(err, errlen, "unknown setup '%s' (co-1gpu, co-2gpus, dis-gpu, dis-cpu, dis-disk, dis-tcp, "
                               "dis-nccl, or xPyD like 2p1d)", s);
        return -1;
    }
    if (medium && o->medium && strcmp(medium, o->medium)) {
        pd_errorf(err, errlen, "setup %s moves KV over %s, not --medium %s", s, medium, o->medium);
        return -1;
    }
    if (!medium) medium = o->medium ? o->medium : "gpu";
    if (nc == 0 && (np <= 0 || nd <= 0)) {
        pd_errorf(err, errlen, "a disaggregated setup needs --prefill N and --decode M (at least 1 each)");
        return -1;
    }
    if (nc + np + nd >= UP_MAX_CHILDREN) {
        pd_errorf(err, errlen, "at most %d instances", UP_MAX_CHILDREN - 1);
        return -1;
    }
    pl->disaggregated = nc == 0;
    if (pl->disaggregated && kv_medium_parse(medium, &pl->medium)) {
        pd_errorf(err, errlen, "unknown KV medium '%s' (gpu, cpu, disk, tcp, nccl)", medium);
        return -1;
    }
    if (pl->disaggregated && pl->medium == KV_MEDIUM_NCCL && !kv_have_gpu_mediums()) {
        pd_errorf(err, errlen, "setup %s needs NCCL, and this pdserve was built without CUDA/NCCL: "
                               "use dis-gpu, dis-cpu, dis-disk or dis-tcp here", s);
        return -1;
    }
    /* devices: instance i gets device_list[i], decode first (they start first) */
    const char *devs[UP_MAX_CHILDREN];
    int n_devs = 0;
    char *dl = o->device_list ? xstrdup(o->device_list) : NULL, *save = NULL;
    for (char *t = dl ? strtok_r(dl, ",", &save) : NULL; t && n_devs < UP_MAX_CHILDREN; t = strtok_r(NULL, ",", &save))
        devs[n_devs++] = t;
    struct { server_role role; int n; const char *prefix; } groups[3] = {
        {SERVER_ROLE_DECODE, nd, "decode"}, {SERVER_ROLE_PREFILL, np, "prefill"},
        {SERVER_ROLE_COLOCATED, nc, "colocated"}};
    for (int g = 0; g < 3; g++)
        for (int i = 0; i < groups[g].n; i++) {
            inst_spec *is = &pl->inst[pl->n];
            snprintf(is->name, sizeof is->name, "%s%d", groups[g].prefix, i);
            is->role = groups[g].role;
            snprintf(is->host, sizeof is->host, "127.0.0.1");
            if (n_devs) snprintf(is->device, sizeof is->device, "%s", devs[pl->n % n_devs]);
            pl->n++;
        }
    free(dl);
    snprintf(pl->router_host, sizeof pl->router_host, "%s", o->host);
    pl->router_port = o->port;
    pl->start_router = true;
    return 0;
}

/* The deployment file (docs/disaggregation.md). */
static int plan_file(const up_opts *o, plan *pl, char **model_out, char *err, size_t errlen) {
    size_t len;
    char *text = util_read_file(o->deployment, &len, err, errlen);
    if (!text) return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    int rc = -1;
    if (!cJSON_IsObject(root)) {
        pd_errorf(err, errlen, "%s: not a JSON object", o->deployment);
        goto done;
    }
    cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    cJSON *medium = cJSON_GetObjectItemCaseSensitive(root, "medium");
    cJSON *router = cJSON_GetObjectItemCaseSensitive(root, "router");
    cJSON *insts = cJSON_GetObjectItemCaseSensitive(root, "instances");
    cJSON *secret = cJSON_GetObjectItemCaseSensitive(root, "internal_secret");
    if (!o->model && !cJSON_IsString(model)) {
        pd_errorf(err, errlen, "%s: \"model\" (a path on every host) is missing; or pass --model", o->deployment);
        goto done;
    }
    *model_out = xstrdup(o->model ? o->model : model->valuestring);
    if (cJSON_IsString(secret)) snprintf(pl->secret, sizeof pl->secret, "%s", secret->valuestring);
    if (!cJSON_IsArray(insts) || cJSON_GetArraySize(insts) == 0) {
        pd_errorf(err, errlen, "%s: \"instances\" must be a non-empty array", o->deployment);
        goto done;
    }
    int nc = 0, np = 0, nd = 0;
    cJSON *it;
    cJSON_ArrayForEach(it, insts) {
        cJSON *host = cJSON_GetObjectItemCaseSensitive(it, "host");
        cJSON *role = cJSON_GetObjectItemCaseSensitive(it, "role");
        cJSON *port = cJSON_GetObjectItemCaseSensitive(it, "port");
        cJSON *gpus = cJSON_GetObjectItemCaseSensitive(it, "gpus");
        cJSON *cpus = cJSON_GetObjectItemCaseSensitive(it, "cpus");
        cJSON *kvp = cJSON_GetObjectItemCaseSensitive(it, "kv_port");
        cJSON *name = cJSON_GetObjectItemCaseSensitive(it, "name");
        server_role r;
        if (!cJSON_IsString(host) || !cJSON_IsString(role) || !cJSON_IsNumber(port) ||
            server_role_parse(role->valuestring, &r) || r == SERVER_ROLE_ROUTER || port->valueint <= 0 ||
            port->valueint > 65535 || pl->n >= UP_MAX_CHILDREN - 1) {
            pd_errorf(err, errlen, "%s: instance %d needs \"host\", \"role\" (colocated, prefill or decode) "
                                   "and a fixed \"port\"", o->deployment, pl->n);
            goto done;
        }
        inst_spec *is = &pl->inst[pl->n++];
        is->role = r;
        int k = r == SERVER_ROLE_PREFILL ? np++ : r == SERVER_ROLE_DECODE ? nd++ : nc++;
        if (cJSON_IsString(name)) snprintf(is->name, sizeof is->name, "%s", name->valuestring);
        else snprintf(is->name, sizeof is->name, "%s%d", server_role_name(r), k);
        snprintf(is->host, sizeof is->host, "%s", host->valuestring);
        is->port = port->valueint;
        is->kv_port = cJSON_IsNumber(kvp) ? kvp->valueint : 0;
        if (cJSON_IsArray(gpus) && cJSON_GetArraySize(gpus) > 0 && cJSON_IsNumber(cJSON_GetArrayItem(gpus, 0)))
            snprintf(is->device, sizeof is->device, "%d", cJSON_GetArrayItem(gpus, 0)->valueint);
        if (cpus && !cJSON_IsNull(cpus)) {
            cpu_set_t set;
            char why[256];
            if (!cJSON_IsString(cpus) || util_cpulist_parse(cpus->valuestring, &set, why, sizeof why) ||
                strlen(cpus->valuestring) >= sizeof is->cpus) {
                pd_errorf(err, errlen, "%s: instance %d: \"cpus\" must be a CPU list like \"2-3\"%s%s",
                          o->deployment, pl->n - 1, cJSON_IsString(cpus) ? ": " : "",
                          cJSON_IsString(cpus) ? why : "");
                goto done;
            }
            snprintf(is->cpus, sizeof is->cpus, "%s", cpus->valuestring);
        }
    }
    if ((np || nd) && (nc || !np || !nd)) {
        pd_errorf(err, errlen, "%s: either colocated instances, or prefill and decode ones", o->deployment);
        goto done;
    }
    pl->disaggregated = np > 0;
    const char *m = o->medium ? o->medium : cJSON_IsString(medium) ? medium->valuestring : "tcp";
    if (pl->disaggregated && kv_medium_parse(m, &pl->medium)) {
        pd_errorf(err, errlen, "%s: unknown medium '%s'", o->deployment, m);
        goto done;
    }
    if (cJSON_IsObject(router)) {
        cJSON *host = cJSON_GetObjectItemCaseSensitive(router, "host");
        cJSON *port = cJSON_GetObjectItemCaseSensitive(router, "port");
        snprintf(pl->router_host, sizeof pl->router_host, "%s", cJSON_IsString(host) ? host->valuestring : o->host);
        pl->router_port = cJSON_IsNumber(port) ? port->valueint : o->port;
        pl->start_router = !o->only_host || !strcmp(pl->router_host, o->only_host);
    }
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

/* The instances' --threads among the arguments every instance gets (0: not given). */
static int extra_threads(const plan *pl) {
    int t = 0;
    for (int i = 0; i < pl->n_extra; i++) {
        if (!strcmp(pl->extra[i], "--threads") && i + 1 < pl->n_extra) t = atoi(pl->extra[i + 1]);
        else if (!strncmp(pl->extra[i], "--threads=", 10)) t = atoi(pl->extra[i] + 10);
    }
    return t;
}

/* --cpu-list: "auto" (each instance --threads physical cores of its own, util_cpus_auto)
 * or CPU lists separated by ':', one per instance in start order (decode, prefill,
 * colocated; reused in turn when fewer). */
static int plan_cpus(const up_opts *o, plan *pl, char *err, size_t errlen) {
    if (!o->cpu_list) return 0;
    char groups[UP_MAX_CHILDREN][64];
    int ng = 0;
    if (!strcmp(o->cpu_list, "auto")) {
        int t = extra_threads(pl);
        if (t <= 0) {
            pd_errorf(err, errlen, "--cpu-list auto needs the instances' --threads N (after --): the cores each gets");
            return -1;
        }
        char why[256];
        if (util_cpus_auto(pl->n, t, groups, why, sizeof why)) {
            pd_errorf(err, errlen, "--cpu-list auto: %s", why);
            return -1;
        }
        ng = pl->n;
    } else {
        cpu_set_t allowed;
        char have[256];
        if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) CPU_ZERO(&allowed);
        util_cpulist_format(&allowed, have, sizeof have);
        for (const char *t = o->cpu_list;; t++) {
            size_t len = strcspn(t, ":");
            cpu_set_t set;
            char why[256], g[64];
            snprintf(g, sizeof g, "%.*s", (int)PD_MIN(len, sizeof g - 1), t);
            if (ng == UP_MAX_CHILDREN) pd_errorf(why, sizeof why, "more than %d lists", UP_MAX_CHILDREN);
            else if (len >= sizeof g) pd_errorf(why, sizeof why, "a list longer than %zu characters", sizeof g - 1);
            else if (util_cpulist_parse(g, &set, why, sizeof why) == 0) {
                why[0] = 0;
                for (int c = 0; c < CPU_SETSIZE && !why[0]; c++)
                    if (CPU_ISSET(c, &set) && CPU_COUNT(&allowed) && !CPU_ISSET(c, &allowed))
                        pd_errorf(why, sizeof why, "CPU %d is not one this process may run on (%s)", c, have);
            }
            if (why[0]) {
                pd_errorf(err, errlen, "--cpu-list %s: %s", o->cpu_list, why);
                return -1;
            }
            snprintf(groups[ng++], sizeof groups[0], "%s", g);
            t += len;
            if (!*t) break;
        }
    }
    for (int i = 0; i < pl->n; i++) snprintf(pl->inst[i].cpus, sizeof pl->inst[i].cpus, "%s", groups[i % ng]);
    return 0;
}

static void random_secret(char *out, size_t cap) {
    unsigned char b[24];
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, b, sizeof b) : -1;
    if (fd >= 0) close(fd);
    if (n != (ssize_t)sizeof b)
        for (size_t i = 0; i < sizeof b; i++) b[i] = (unsigned char)(hash_u64(time_now_ns() + i) & 0xff);
    size_t k = 0;
    for (size_t i = 0; i < sizeof b && k + 2 < cap; i++) k += (size_t)snprintf(out + k, cap - k, "%02x", b[i]);
}

/* ---- the command ---------------------------------------------------------------------------- */
int cmd_up(int argc, char **argv) {
    up_opts o = {.host = "127.0.0.1", .port = 8000, .policy = "least-loaded", .kv_timeout = 30.0,
                 .ready_timeout = 300.0};
    const cli_opt opts[] = {
        {"setup", OPT_STRING, &o.setup, "co-1gpu, co-2gpus, dis-gpu, dis-cpu, dis-disk, dis-tcp, dis-nccl, xPyD", "NAME"},
        {"model", OPT_STRING, &o.model, "model directory (or preset:NAME with --tokenizer in the serve args)", "DIR"},
        {"host", OPT_STRING, &o.host, "address of the router, the public endpoint (default 127.0.0.1)", "ADDR"},
        {"port", OPT_INT, &o.port, "port of the router (default 8000; 0: any free port)", NULL},
        {"medium", OPT_STRING, &o.medium, "KV medium of an xPyD setup: gpu, cpu, disk, tcp, nccl", "M"},
        {"prefill", OPT_INT, &o.n_prefill, "xPyD: prefill instances", "N"},
        {"decode", OPT_INT, &o.n_decode, "xPyD: decode instances", "M"},
        {"device-list", OPT_STRING, &o.device_list, "GPUs for the instances in start order (decode, prefill, colocated), e.g. 0,1", "LIST"},
        {"cpu-list", OPT_STRING, &o.cpu_list, "CPU backend: pin the instances, in start order, to these CPU lists "
         "separated by ':' (e.g. 1:2), or auto: --threads physical cores each, the first core left for the router "
         "and the rest", "LISTS"},
        {"policy", OPT_STRING, &o.policy, "router: least-loaded (default), round-robin or prefix-affinity", "P"},
        {"kv-transfer-timeout", OPT_DOUBLE, &o.kv_timeout, "deadline of a disaggregated request's KV, s (default 30)", NULL},
        {"kv-transfer-mode", OPT_STRING, &o.kv_mode, "whole (default) or layerwise", "MODE"},
        {"kv-store-dir", OPT_STRING, &o.store_dir, "dis-disk: store directory (default: a new one under $TMPDIR)", "DIR"},
        {"kv-store-capacity", OPT_SIZE, &o.store_capacity, "dis-cpu / dis-disk: store capacity (default 1GiB)", NULL},
        {"enable-prefix-caching", OPT_FLAG, &o.enable_prefix_caching, "instances: reuse the KV of shared prompt prefixes", NULL},
        {"kv-offload", OPT_STRING, &o.kv_offload, "colocated / prefill instances: lower prefix cache tiers cpu, disk or cpu,disk", "LIST"},
        {"kv-offload-cpu-bytes", OPT_SIZE, &o.kv_offload_cpu_bytes, "per instance: cpu tier capacity (default 1GiB)", NULL},
        {"kv-offload-disk-dir", OPT_STRING, &o.kv_offload_disk_dir, "per instance: parent of its disk tier directory (default $TMPDIR)", "DIR"},
        {"kv-offload-disk-bytes", OPT_SIZE, &o.kv_offload_disk_bytes, "per instance: disk tier capacity (default 4GiB)", NULL},
        {"kv-offload-async", OPT_FLAG, &o.kv_offload_async, "per instance: staging copies overlap the forward pass (GPU)", NULL},
        {"prefill-args", OPT_STRING, &o.prefill_args, "more `pdserve serve` arguments for prefill instances", "\"ARGS\""},
        {"decode-args", OPT_STRING, &o.decode_args, "more `pdserve serve` arguments for decode instances", "\"ARGS\""},
        {"internal-secret", OPT_STRING, &o.secret, "secret of the internal endpoints (default: a random one)", "S"},
        {"ready-timeout", OPT_DOUBLE, &o.ready_timeout, "seconds each part may take to become healthy (default 300)", NULL},
        {"deployment", OPT_STRING, &o.deployment, "deployment file (JSON): start the part of --only-host", "FILE"},
        {"only-host", OPT_STRING, &o.only_host, "with --deployment: this host's address as the file names it", "H"},
    };
    /* arguments after "--" go to every instance */
    int dd = argc;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--")) {
            dd = i;
            break;
        }
    const char *pos[1];
    int n_pos;
    bool help;
    if (cli_parse(dd, argv, opts, (int)PD_ARRAY_LEN(opts), USAGE, pos, 0, &n_pos, &help)) return 2;
    if (help) return 0;

    plan *pl = xcalloc(1, sizeof *pl);
    pl->extra = argv + dd + (dd < argc);
    pl->n_extra = argc - dd - (dd < argc);
    pl->extra_prefill = o.prefill_args;
    pl->extra_decode = o.decode_args;
    char err[512] = "";
    char *model = NULL;
    router_policy pol;
    int status = 0;
    if (router_policy_parse(o.policy, &pol)) {
        fprintf(stderr, "pdserve up: --policy must be round-robin, least-loaded or prefix-affinity\n");
        free(pl);
        return 2;
    }
    if ((o.deployment ? plan_file(&o, pl, &model, err, sizeof err) : plan_setup(&o, pl, err, sizeof err)) ||
        plan_cpus(&o, pl, err, sizeof err)) {
        fprintf(stderr, "pdserve up: %s\n", err);
        free(model);
        free(pl);
        return 2;
    }
    if (!o.deployment) {
        if (!o.model) {
            fprintf(stderr, "pdserve up: --model is required (see --help)\n");
            free(pl);
            return 2;
        }
        model = xstrdup(o.model);
    }
    pl->model = model;
    if (o.secret) snprintf(pl->secret, sizeof pl->secret, "%s", o.secret);
    else if (!pl->secret[0] && getenv("PDSERVE_INTERNAL_SECRET"))
        snprintf(pl->secret, sizeof pl->secret, "%s", getenv("PDSERVE_INTERNAL_SECRET"));
    if (!pl->secret[0]) {
        if (o.deployment) log_warn("up: no internal secret in the deployment file or $PDSERVE_INTERNAL_SECRET: "
                                   "internal endpoints are open to anyone who reaches the instances");
        else random_secret(pl->secret, sizeof pl->secret);
    }
    /* the secret goes to the children through the environment, not their command line */
    if (pl->secret[0]) setenv("PDSERVE_INTERNAL_SECRET", pl->secret, 1);

    up_state *u = xcalloc(1, sizeof *u);
    u->sfd = -1;
    snprintf(u->tag, sizeof u->tag, "up%d-", (int)getpid());
    remove_stale_segments();
    if (pl->disaggregated && pl->medium == KV_MEDIUM_DISK) {
        if (o.store_dir) {
            snprintf(u->store_dir, sizeof u->store_dir, "%s", o.store_dir);
        } else {
            const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
            snprintf(u->store_dir, sizeof u->store_dir, "%s/pdserve-kv-%sXXXXXX", tmp, u->tag);
            if (!mkdtemp(u->store_dir)) {
                fprintf(stderr, "pdserve up: cannot make a store directory under %s: %s\n", tmp, strerror(errno));
                free(u);
                free(model);
                free(pl);
                return 1;
            }
            u->made_store_dir = true;
        }
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGCHLD);
    sigprocmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    u->sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);

    /* instances of this host, decode first, each group healthy before the next */
    int decode_index = 0;
    for (int g = 0; g < 3 && !status; g++) {
        server_role want = g == 0 ? SERVER_ROLE_DECODE : g == 1 ? SERVER_ROLE_PREFILL : SERVER_ROLE_COLOCATED;
        int first = u->n;
        for (int i = 0; i < pl->n && !status; i++) {
            inst_spec *s = &pl->inst[i];
            if (s->role != want) continue;
            int di = s->role == SERVER_ROLE_DECODE ? decode_index++ : -1;
            if (o.only_host && strcmp(s->host, o.only_host)) continue;
            argv_b a = {0};
            instance_argv(&o, pl, u, s, di, &a);
            child *c = spawn(u, s->name, s->role, a.v, err, sizeof err);
            argv_free(&a);
            if (!c) {
                status = 1;
                break;
            }
            snprintf(c->host, sizeof c->host, "%s", s->host);
            log_info("up: started %s (pid %d)", c->name, (int)c->pid);
            /* the first decode instance creates the store: the others open it */
            if (di == 0 && (pl->medium == KV_MEDIUM_CPU || pl->medium == KV_MEDIUM_DISK) &&
                wait_healthy(u, c, o.ready_timeout, err, sizeof err))
                status = 1;
        }
        for (int i = first; i < u->n && !status; i++)
            if (wait_healthy(u, &u->ch[i], o.ready_timeout, err, sizeof err)) status = 1;
        /* the ports they took, for the router */
        for (int i = first; i < u->n && !status; i++)
            for (int k = 0; k < pl->n; k++)
                if (!strcmp(pl->inst[k].name, u->ch[i].name)) pl->inst[k].port = u->ch[i].port;
    }
    if (!status && pl->start_router) {
        argv_b a = {0};
        router_argv(&o, pl, &a, "model");
        /* the served name: what the instances call the model */
        for (int i = 0; i < a.n; i++)
            if (!strcmp(a.v[i], "--served-model-name")) {
                free(a.v[i + 1]);
                a.v[i + 1] = xstrdup(model);
            }
        child *c = spawn(u, "router", SERVER_ROLE_ROUTER, a.v, err, sizeof err);
        argv_free(&a);
        if (!c) status = 1;
        if (c) snprintf(c->host, sizeof c->host, "%s", !strcmp(pl->router_host, "0.0.0.0") ? "127.0.0.1" : pl->router_host);
        if (c && wait_healthy(u, c, o.ready_timeout, err, sizeof err)) status = 1;
        if (!status)
            fprintf(stderr, "pdserve up: ready: %s on http://%s:%d (%d instance(s); Ctrl-C stops it all)\n",
                    o.deployment ? o.deployment : o.setup ? o.setup : "xPyD", pl->router_host, c->port,
                    u->n - 1);
    } else if (!status) {
        fprintf(stderr, "pdserve up: ready: %d instance(s) of %s on %s\n", u->n, o.deployment, o.only_host);
    }
    fflush(stderr);
    if (status) fprintf(stderr, "pdserve up: %s\n", err);

    /* serve until a signal, or the router dies */
    while (!status && !u->stop) {
        pump(u, 500);
        for (int i = 0; i < u->n; i++)
            if (u->ch[i].role == SERVER_ROLE_ROUTER && u->ch[i].exited && !u->stop) {
                fprintf(stderr, "pdserve up: the router exited: stopping the deployment\n");
                status = 1;
            }
    }
    if (u->stop && u->stop_sig)
        fprintf(stderr, "pdserve up: %s: stopping the deployment\n", u->stop_sig == SIGINT ? "SIGINT" : "SIGTERM");
    teardown(u);
    fprintf(stderr, "pdserve up: stopped\n");
    if (u->sfd >= 0) close(u->sfd);
    free(u);
    free(model);
    free(pl);
    curl_global_cleanup();
    return status;
}
