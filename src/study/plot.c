/* plot.c: runs gnuplot. The script goes to gnuplot's standard input through a pipe;
 * gnuplot is started with posix_spawnp and a fixed argv, so no shell ever sees a
 * string built from results data. Its standard error is kept in a temporary file and
 * quoted in the error message when it fails. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "study/study.h"
#include "util/util.h"

extern char **environ;

void study_gnuplot_quote(char *out, size_t cap, const char *s) {
    size_t n = strlen(out);
    for (; *s && n + 2 < cap; s++) {
        if (*s == '\'') out[n++] = '\'';
        out[n++] = (unsigned char)*s < 0x20 ? ' ' : *s;
    }
    out[n] = 0;
}

/* The last few lines of f (gnuplot's stderr) into out. */
static void tail_of(FILE *f, char *out, size_t cap) {
    out[0] = 0;
    if (!f) return;
    long end = (fseek(f, 0, SEEK_END), ftell(f));
    long start = end > (long)cap - 1 ? end - (long)cap + 1 : 0;
    fseek(f, start, SEEK_SET);
    size_t n = fread(out, 1, cap - 1, f);
    out[n] = 0;
    for (char *c = out; *c; c++)
        if (*c == '\n') *c = ' ';
}

int study_gnuplot(const char *program, const char *script, size_t len, char *err, size_t errlen) {
    if (!program) program = "gnuplot";
    int fds[2];
    if (pipe(fds) != 0) {
        pd_errorf(err, errlen, "pipe: %s", strerror(errno));
        return -1;
    }
    FILE *errf = tmpfile();
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[0], 0);
    posix_spawn_file_actions_addclose(&fa, fds[1]);
    if (errf) posix_spawn_file_actions_adddup2(&fa, fileno(errf), 2);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    char *argv[] = {(char *)program, NULL};
    pid_t pid;
    int rc = posix_spawnp(&pid, program, &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fds[0]);
    if (rc != 0) {
        close(fds[1]);
        if (errf) fclose(errf);
        pd_errorf(err, errlen, "cannot run %s: %s (install gnuplot, or pass --no-plots)", program, strerror(rc));
        return -1;
    }
    /* gnuplot may die early; a broken pipe must be an error value, not a signal. */
    void (*old)(int) = signal(SIGPIPE, SIG_IGN);
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fds[1], script + off, len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        off += (size_t)w;
    }
    close(fds[1]);
    signal(SIGPIPE, old);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || off < len) {
        char tail[400];
        tail_of(errf, tail, sizeof tail);
        pd_errorf(err, errlen, "%s failed (status %d): %s", program, WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                  tail);
        if (errf) fclose(errf);
        return -1;
    }
    if (errf) fclose(errf);
    return 0;
}
