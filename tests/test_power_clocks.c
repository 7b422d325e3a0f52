/* test_power_clocks.c: clock control against the stand-in NVML (tests/fake_nvml.c),
 * never a real GPU. Checks: nothing is set without allow; only supported values; a
 * clear refusal on NO_PERMISSION; all-or-nothing on a partial failure; and the locks
 * are reset when the process exits, dies through pd_die, aborts, or is killed with
 * SIGTERM / SIGINT in the middle of a run (forked children, checked in the fake's
 * call log). */
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "power/power.h"
#include "test.h"
#include "util/util.h"

static char g_log[256];

static void use_fake(const char *fail) {
    const char *lib = getenv("PDSERVE_FAKE_NVML");
    if (!lib || !util_file_exists(lib)) TEST_SKIP("PDSERVE_FAKE_NVML not set (run through ctest)");
    setenv("PDSERVE_NVML_LIB", lib, 1);
    setenv("FAKE_NVML_LOG", g_log, 1);
    unlink(g_log);
    if (fail) setenv("FAKE_NVML_FAIL", fail, 1);
    else unsetenv("FAKE_NVML_FAIL");
}

static char *read_log(void) {
    char err[256];
    char *s = util_read_file(g_log, NULL, err, sizeof err);
    return s ? s : xstrdup("");
}

static int count_in(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++) n++;
    return n;
}

static void test_refused_without_allow(void) {
    use_fake(NULL);
    char err[512];
    power_nvml *nv = power_nvml_open(err, sizeof err);
    REQUIRE(nv);
    int g = 0;
    unsigned mhz = 1410;
    CHECK(power_clocks_lock(nv, &g, &mhz, 1, false, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "--allow-clock-control");
    power_nvml_close(nv);
    char *log = read_log();
    CHECK(strstr(log, "SetGpuLockedClocks") == NULL);
    free(log);
}

static void test_only_supported_values(void) {
    use_fake(NULL);
    char err[512];
    power_nvml *nv = power_nvml_open(err, sizeof err);
    REQUIRE(nv);
    unsigned list[64];
    int n = power_clocks_supported(nv, 0, list, 64, err, sizeof err);
    CHECK_EQ_INT(n, 7);
    CHECK(list[0] == 1980 && list[n - 1] == 360);
    int g = 0;
    unsigned mhz = 1400;
    CHECK(power_clocks_lock(nv, &g, &mhz, 1, true, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "1400 MHz");
    CHECK_STR_CONTAINS(err, "1395");
    CHECK_STR_CONTAINS(err, "1410");
    g = 7; /* no such GPU */
    mhz = 1410;
    CHECK(power_clocks_lock(nv, &g, &mhz, 1, true, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "does not exist");
    power_nvml_close(nv);
    char *log = read_log();
    CHECK(strstr(log, "SetGpuLockedClocks") == NULL);
    free(log);
}

static void test_lock_and_restore(void) {
    use_fake(NULL);
    char err[512];
    power_nvml *nv = power_nvml_open(err, sizeof err);
    REQUIRE(nv);
    int gpus[2] = {0, 1};
    unsigned mhz[2] = {1410, 810}; /* prefill fast, decode slow */
    CHECK(power_clocks_lock(nv, gpus, mhz, 2, true, err, sizeof err) == 0);
    CHECK_EQ_INT(power_clocks_locked_count(), 2);
    CHECK_EQ_INT(power_clocks_restore(), 2);
    CHECK_EQ_INT(power_clocks_locked_count(), 0);
    CHECK_EQ_INT(power_clocks_restore(), 0); /* idempotent */
    /* Closing NVML with a lock held resets it first. */
    CHECK(power_clocks_lock(nv, gpus, mhz, 1, true, err, sizeof err) == 0);
    power_nvml_close(nv);
    CHECK_EQ_INT(power_clocks_locked_count(), 0);
    char *log = read_log();
    CHECK_STR_CONTAINS(log, "nvmlDeviceSetGpuLockedClocks gpu=0 min=1410 max=1410 rc=0");
    CHECK_STR_CONTAINS(log, "nvmlDeviceSetGpuLockedClocks gpu=1 min=810 max=810 rc=0");
    CHECK_EQ_INT(count_in(log, "nvmlDeviceResetGpuLockedClocks gpu=0 rc=0"), 2);
    CHECK_EQ_INT(count_in(log, "nvmlDeviceResetGpuLockedClocks gpu=1 rc=0"), 1);
    CHECK(strstr(log, "nvmlDeviceGetApplicationsClock") != NULL); /* previous state recorded */
    /* The reset comes before the library is shut down. */
    CHECK(strstr(log, "nvmlShutdown") > strstr(log, "nvmlDeviceResetGpuLockedClocks"));
    free(log);
}

static void test_no_permission(void) {
    use_fake("nvmlDeviceSetGpuLockedClocks=NO_PERMISSION");
    char err[512];
    power_nvml *nv = power_nvml_open(err, sizeof err);
    REQUIRE(nv);
    int g = 1;
    unsigned mhz = 1200;
    CHECK(power_clocks_lock(nv, &g, &mhz, 1, true, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "no permission");
    CHECK_STR_CONTAINS(err, "GPU 1");
    CHECK_EQ_INT(power_clocks_locked_count(), 0);
    power_nvml_close(nv);
}

static void test_partial_failure_rolls_back(void) {
    use_fake("nvmlDeviceSetGpuLockedClocks=UNKNOWN@2");
    char err[512];
    power_nvml *nv = power_nvml_open(err, sizeof err);
    REQUIRE(nv);
    int gpus[2] = {0, 1};
    unsigned mhz[2] = {1410, 810};
    CHECK(power_clocks_lock(nv, gpus, mhz, 2, true, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "GPU 1");
    CHECK_EQ_INT(power_clocks_locked_count(), 0);
    power_nvml_close(nv);
    char *log = read_log();
    CHECK_STR_CONTAINS(log, "nvmlDeviceResetGpuLockedClocks gpu=0 rc=0");
    free(log);
}

/* The ways a child ends after locking GPU 0 at 1410 and GPU 1 at 810. */
enum child_end { END_EXIT, END_DIE, END_ABORT, END_WAIT_SIGNAL, END_WAIT_SIGNAL_OWN_HANDLER };

static volatile sig_atomic_t g_child_stop;
static void child_own_handler(int sig) { g_child_stop = sig; }

static void child_main(enum child_end how, int ready_fd) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    if (how == END_WAIT_SIGNAL_OWN_HANDLER) {
        /* A server's graceful-shutdown handler, installed before the clocks are locked. */
        signal(SIGTERM, child_own_handler);
    }
    char err[512];
    power_nvml *nv = power_nvml_open(err, sizeof err);
    if (!nv) _exit(90);
    int gpus[2] = {0, 1};
    unsigned mhz[2] = {1410, 810};
    if (power_clocks_lock(nv, gpus, mhz, 2, true, err, sizeof err) != 0) _exit(91);
    if (write(ready_fd, "L", 1) != 1) _exit(92);
    switch (how) {
    case END_EXIT: exit(0);
    case END_DIE: pd_die("simulated fatal error in the middle of a run");
    case END_ABORT: PD_ASSERT(how != END_ABORT);
    /* fallthrough */
    case END_WAIT_SIGNAL:
        for (;;) pause(); /* "in the middle of a run" */
    case END_WAIT_SIGNAL_OWN_HANDLER:
        while (!g_child_stop) pause();
        _exit(g_child_stop == SIGTERM ? 42 : 43); /* no atexit: the reset came from the signal */
    }
    _exit(93);
}

/* Forks a child that locks clocks and ends as told (sig != 0: the parent sends sig once
 * the clocks are locked). Returns the wait status; *pid_out the child's pid. */
static int run_child(enum child_end how, int sig, pid_t *pid_out) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        child_main(how, fds[1]);
    }
    close(fds[1]);
    char c = 0;
    ssize_t n = read(fds[0], &c, 1);
    close(fds[0]);
    if (n == 1 && sig) {
        usleep(20000);
        kill(pid, sig);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    *pid_out = pid;
    return status;
}

static void check_child_reset(pid_t pid) {
    char *log = read_log();
    char want[128];
    snprintf(want, sizeof want, "pid=%d nvmlDeviceSetGpuLockedClocks gpu=1 min=810 max=810 rc=0", (int)pid);
    CHECK_STR_CONTAINS(log, want);
    for (int g = 0; g < 2; g++) {
        snprintf(want, sizeof want, "pid=%d nvmlDeviceResetGpuLockedClocks gpu=%d rc=0", (int)pid, g);
        CHECK_STR_CONTAINS(log, want);
    }
    free(log);
}

static void test_restored_at_exit(void) {
    use_fake(NULL);
    pid_t pid;
    int st = run_child(END_EXIT, 0, &pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    check_child_reset(pid);
}

static void test_restored_on_error_exit(void) {
    use_fake(NULL);
    pid_t pid;
    int st = run_child(END_DIE, 0, &pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 1);
    check_child_reset(pid);
    use_fake(NULL);
    st = run_child(END_ABORT, 0, &pid);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
    check_child_reset(pid);
}

static void test_restored_on_sigterm(void) {
    use_fake(NULL);
    pid_t pid;
    int st = run_child(END_WAIT_SIGNAL, SIGTERM, &pid);
    CHECKF(WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM, "status 0x%x", st); /* re-raised */
    check_child_reset(pid);
}

static void test_restored_on_sigint(void) {
    use_fake(NULL);
    pid_t pid;
    int st = run_child(END_WAIT_SIGNAL, SIGINT, &pid);
    CHECKF(WIFSIGNALED(st) && WTERMSIG(st) == SIGINT, "status 0x%x", st);
    check_child_reset(pid);
}

static void test_sigterm_chains_to_own_handler(void) {
    use_fake(NULL);
    pid_t pid;
    int st = run_child(END_WAIT_SIGNAL_OWN_HANDLER, SIGTERM, &pid);
    CHECKF(WIFEXITED(st) && WEXITSTATUS(st) == 42, "status 0x%x", st); /* their handler ran */
    check_child_reset(pid);
}

int main(void) {
    snprintf(g_log, sizeof g_log, "/tmp/pdserve-fake-nvml-%d.log", (int)getpid());
    /* Children first: they must start from a process that never locked anything
     * (handlers and atexit are inherited across fork). */
    TEST_RUN(test_restored_at_exit);
    TEST_RUN(test_restored_on_error_exit);
    TEST_RUN(test_restored_on_sigterm);
    TEST_RUN(test_restored_on_sigint);
    TEST_RUN(test_sigterm_chains_to_own_handler);
    TEST_RUN(test_refused_without_allow);
    TEST_RUN(test_only_supported_values);
    TEST_RUN(test_lock_and_restore);
    TEST_RUN(test_no_permission);
    TEST_RUN(test_partial_failure_rolls_back);
    unlink(g_log);
    return TEST_END();
}
