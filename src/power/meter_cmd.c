/* meter_cmd.c: the user's own energy meter (--energy-meter-cmd CMD): a command run at
 * run start and run end whose stdout is a cumulative number of joules (an IPMI DCMI
 * reading turned into energy, a smart PDU, a disk's own counter ...).
 *
 * Why /bin/sh -c: the user hands a command line on purpose (pipes, quoting, ipmitool
 * arguments are theirs), and it comes from the command line of the process that runs
 * it, never from a request. Nothing from pdserve reaches it but PDSERVE_ENERGY_PHASE
 * (start | end). Runs twice per run: never on a hot path. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "power/power.h"
#include "util/util.h"

/* Child side: own process group (so a timeout kills the whole pipeline), stdout to the
 * pipe, stdin from /dev/null. Never returns. */
static void meter_child(const char *cmd, const char *phase, int wfd) {
    setpgid(0, 0);
    if (dup2(wfd, STDOUT_FILENO) < 0) _exit(127);
    close(wfd);
    int devnull = open("/dev/null", 0);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    setenv("PDSERVE_ENERGY_PHASE", phase, 1);
    execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
    _exit(127);
}

/* Reads the child's stdout until EOF or the deadline. Returns bytes read, -1 on timeout. */
static ssize_t meter_collect(int fd, char *buf, size_t cap, double deadline) {
    size_t len = 0;
    for (;;) {
        double left = deadline - time_now_s();
        if (left <= 0) return -1;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int pr = poll(&p, 1, (int)(left * 1000.0) + 1);
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) return pr == 0 ? -1 : (ssize_t)len;
        char tmp[512];
        ssize_t n = read(fd, tmp, sizeof tmp);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return (ssize_t)len;
        size_t take = PD_MIN((size_t)n, cap - 1 - len); /* keep only the first cap-1 bytes */
        memcpy(buf + len, tmp, take);
        len += take;
    }
}

int power_meter_cmd_read(const char *cmd, const char *phase, double timeout_s, double *joules,
                         char *err, size_t errlen) {
    PD_ASSERT(cmd && phase && joules);
    if (timeout_s <= 0) timeout_s = 10.0;
    int fds[2];
    if (pipe(fds) != 0) {
        pd_errorf(err, errlen, "energy meter command: pipe: %s", strerror(errno));
        return -1;
    }
    fflush(NULL); /* no duplicated stdio buffers in the child */
    pid_t pid = fork();
    if (pid < 0) {
        pd_errorf(err, errlen, "energy meter command: fork: %s", strerror(errno));
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        close(fds[0]);
        meter_child(cmd, phase, fds[1]);
    }
    setpgid(pid, pid); /* also here: no race with the kill below */
    close(fds[1]);
    char out[4096];
    ssize_t len = meter_collect(fds[0], out, sizeof out, time_now_s() + timeout_s);
    close(fds[0]);
    if (len < 0) kill(-pid, SIGKILL);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (len < 0) {
        pd_errorf(err, errlen, "energy meter command timed out after %.1f s (killed): %s",
                  timeout_s, cmd);
        return -1;
    }
    out[len] = 0;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        pd_errorf(err, errlen, "energy meter command failed (%s %d): %s",
                  WIFEXITED(status) ? "exit status" : "signal",
                  WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), cmd);
        return -1;
    }
    char *end;
    errno = 0;
    double v = strtod(out, &end);
    while (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r') end++;
    if (end == out || *end != 0 || errno || !isfinite(v)) {
        pd_errorf(err, errlen, "energy meter command printed \"%.60s\", not one number of joules",
                  out);
        return -1;
    }
    *joules = v;
    return 0;
}
