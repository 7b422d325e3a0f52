/* peer.c: a profiler's peer process: this binary again (/proc/self/exe with the
 * arguments given), driven by one command line and one answer line at a time over a
 * pipe. The disk store's overlap rounds run their decode side in one (profile_medium.c,
 * `--kv-peer`), and the shared-GPU pairs their second instance (profiler.c,
 * `--step-peer`): each, as in a deployment, a process of its own with its own CUDA
 * context, I/O and threads. SIGPIPE is ignored while a peer runs (a peer that died is
 * an error, not the profiler's death) and restored when it is stopped. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sim/sim.h"
#include "util/util.h"

int sim_peer_cmd(sim_peer *p, char *ans, size_t n, char *err, size_t errlen, const char *fmt, ...) {
    char cmd[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    fprintf(p->to, "%s\n", cmd);
    char line[512];
    /* a peer gone already may have left its reason ("err ...") in the pipe: read it */
    bool gone = fflush(p->to) != 0;
    /* the answer within the limit (the input is unbuffered, so that poll sees all of it) */
    struct pollfd pfd = {.fd = fileno(p->from), .events = POLLIN};
    int r;
    do r = poll(&pfd, 1, gone ? 1000 : SIM_PEER_ANSWER_S * 1000);
    while (r < 0 && errno == EINTR);
    if (r == 0 && gone) {
        pd_errorf(err, errlen, "the %s process stopped answering", p->what);
        return -1;
    }
    if (r == 0) {
        kill(p->pid, SIGKILL); /* a peer stuck in a step or a transfer: ended, reaped by stop */
        pd_errorf(err, errlen, "the %s process did not answer \"%s\" within %d s", p->what, cmd, SIM_PEER_ANSWER_S);
        return -1;
    }
    if (r < 0 || !fgets(line, sizeof line, p->from)) {
        pd_errorf(err, errlen, "the %s process stopped answering", p->what);
        return -1;
    }
    line[strcspn(line, "\n")] = 0;
    if (gone || strncmp(line, "ok", 2) != 0) {
        pd_errorf(err, errlen, "%s: %s", p->what, strncmp(line, "err ", 4) ? line : line + 4);
        return -1;
    }
    const char *rest = line[2] == ' ' ? line + 3 : "";
    size_t len = strlen(rest);
    if (len >= n) {
        pd_errorf(err, errlen, "%s: an answer longer than %zu bytes", p->what, n);
        return -1;
    }
    memcpy(ans, rest, len + 1);
    return 0;
}

void sim_peer_stop(sim_peer *p) {
    if (p->to) fclose(p->to);
    if (p->from) fclose(p->from);
    p->to = p->from = NULL;
    if (p->pid > 0) waitpid(p->pid, NULL, 0);
    p->pid = 0;
    if (p->pipe_saved) signal(SIGPIPE, p->old_pipe);
    p->pipe_saved = false;
}

static cpu_set_t peer_cpus, home_cpus;
static bool peer_pinned, home_set;

void sim_profile_set_home_cpus(const cpu_set_t *set) {
    home_set = set != NULL;
    if (set) home_cpus = *set;
}

void sim_profile_unpin_fork(void) {
    if (home_set) sched_setaffinity(0, sizeof home_cpus, &home_cpus);
}

void sim_peer_set_cpus(const cpu_set_t *set) {
    peer_pinned = set != NULL;
    if (set) peer_cpus = *set;
}

int sim_peer_start(sim_peer *p, const char *what, char *const argv[], char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    p->what = what;
    int in[2], out[2];
    if (pipe(in) != 0) return pd_errorf(err, errlen, "pipe: %s", strerror(errno)), -1;
    if (pipe(out) != 0) {
        close(in[0]), close(in[1]);
        return pd_errorf(err, errlen, "pipe: %s", strerror(errno)), -1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        close(in[0]), close(in[1]), close(out[0]), close(out[1]);
        return pd_errorf(err, errlen, "fork: %s", strerror(errno)), -1;
    }
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[0]), close(in[1]), close(out[0]), close(out[1]);
        /* kept across exec, and by every thread the peer starts */
        if (peer_pinned) sched_setaffinity(0, sizeof peer_cpus, &peer_cpus);
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    p->pid = pid;
    p->old_pipe = signal(SIGPIPE, SIG_IGN);
    p->pipe_saved = true;
    p->to = fdopen(in[1], "w");
    p->from = fdopen(out[0], "r");
    if (p->from) setvbuf(p->from, NULL, _IONBF, 0);
    char ans[64];
    if (!p->to || !p->from || sim_peer_cmd(p, ans, sizeof ans, err, errlen, "hello") != 0) {
        if (!p->to) close(in[1]);
        if (!p->from) close(out[0]);
        if (!p->to || !p->from) pd_errorf(err, errlen, "fdopen: %s", strerror(errno));
        sim_peer_stop(p);
        return -1;
    }
    return 0;
}
