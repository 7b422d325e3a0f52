/* clocks.c: per-stage SM clock locking through NVML, and the promise that goes with
 * it: whatever this process locks is reset when it ends, whichever way it ends
 * (return from main, exit(), pd_die, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGABRT from a
 * failed assert). Clocks are shared hardware: nothing here runs unless the caller
 * passes allow=true, and only values the card lists are accepted.
 *
 * Restore state is preallocated (a fixed array of device handles + "locked" flags and
 * the reset function pointer) so the signal handler touches no allocator, no lock and
 * no stdio. The one call it makes that POSIX does not list as async-signal-safe is
 * nvmlDeviceResetGpuLockedClocks itself (an ioctl into the driver). We accept that:
 * the alternative (a flag polled by a thread) cannot run once the process is being
 * torn down, and a GPU left locked for every later user is the worse failure. After
 * the reset the handler passes the signal on: to the handler installed before ours if
 * there was one, else by restoring the default action and re-raising it, so the exit
 * status still says "killed by SIGTERM". SIGKILL cannot be caught: docs/energy.md
 * says how to reset by hand. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "power/nvml_abi.h"
#include "util/util.h"

typedef struct clock_slot {
    nvml_device dev;
    int index;                   /* NVML index */
    unsigned locked_mhz;
    unsigned prev_app_sm, prev_app_mem, prev_sm; /* state before the first lock (0: unknown) */
    volatile sig_atomic_t locked;
} clock_slot;

static clock_slot g_slots[POWER_MAX_GPUS];
static int (*volatile g_reset)(nvml_device); /* nvmlDeviceResetGpuLockedClocks */
static volatile sig_atomic_t g_restoring;
static bool g_handlers_installed;

static const int g_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGABRT};
static struct sigaction g_prev_action[PD_ARRAY_LEN(g_signals)];

/* Resets every locked slot; async-signal-safe apart from the NVML call itself. */
static int clocks_restore_raw(void) {
    int n = 0;
    if (g_restoring) return 0; /* a signal during a restore: the outer one finishes */
    g_restoring = 1;
    for (int i = 0; i < POWER_MAX_GPUS; i++) {
        if (!g_slots[i].locked) continue;
        if (g_reset) g_reset(g_slots[i].dev);
        g_slots[i].locked = 0;
        n++;
    }
    g_restoring = 0;
    return n;
}

int power_clocks_restore(void) {
    int n = clocks_restore_raw();
    if (n > 0) log_info("power: reset the locked SM clocks of %d GPU(s)", n);
    return n;
}

int power_clocks_locked_count(void) {
    int n = 0;
    for (int i = 0; i < POWER_MAX_GPUS; i++) n += g_slots[i].locked ? 1 : 0;
    return n;
}

static void clocks_at_exit(void) { power_clocks_restore(); }

static void clocks_on_signal(int sig, siginfo_t *info, void *ctx) {
    if (clocks_restore_raw() > 0) {
        static const char msg[] = "pdserve: signal received: GPU clocks reset\n";
        ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void)w;
    }
    for (size_t i = 0; i < PD_ARRAY_LEN(g_signals); i++) {
        if (g_signals[i] != sig) continue;
        struct sigaction *prev = &g_prev_action[i];
        if (prev->sa_flags & SA_SIGINFO) {
            if (prev->sa_sigaction) prev->sa_sigaction(sig, info, ctx);
            return;
        }
        if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
            prev->sa_handler(sig);
            return;
        }
    }
    /* Default action: re-raise with it; the signal is blocked while we run, so it is
     * delivered (and ends the process) as soon as this handler returns. */
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Installs atexit and the signal handlers once; a signal the process ignores (nohup's
 * SIGHUP) stays ignored. */
static void clocks_install_handlers(void) {
    if (g_handlers_installed) return;
    g_handlers_installed = true;
    atexit(clocks_at_exit);
    for (size_t i = 0; i < PD_ARRAY_LEN(g_signals); i++) {
        struct sigaction cur;
        if (sigaction(g_signals[i], NULL, &cur) != 0) continue;
        if (!(cur.sa_flags & SA_SIGINFO) && cur.sa_handler == SIG_IGN) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = clocks_on_signal;
        sa.sa_flags = SA_SIGINFO | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        sigaction(g_signals[i], &sa, &g_prev_action[i]);
    }
}

static int cmp_desc(const void *a, const void *b) {
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

int power_clocks_supported(power_nvml *nv, int gpu, unsigned *mhz, int cap, char *err,
                           size_t errlen) {
    PD_ASSERT(nv && mhz && cap > 0);
    if (gpu < 0 || gpu >= nv->n) {
        pd_errorf(err, errlen, "GPU %d does not exist (NVML lists %d)", gpu, nv->n);
        return -1;
    }
    if (!nv->supported_mem_clocks || !nv->supported_gr_clocks) {
        pd_errorf(err, errlen, "this NVML cannot list supported clocks");
        return -1;
    }
    unsigned mem[64], gr[512], nmem = PD_ARRAY_LEN(mem);
    int rc = NVML_CALL(nv, nv->supported_mem_clocks(nv->dev[gpu], &nmem, mem));
    if (rc != NVML_OK) {
        pd_errorf(err, errlen, "GPU %d: cannot list supported memory clocks: %s", gpu,
                  power_nvml_error(nv, rc));
        return -1;
    }
    int n = 0;
    for (unsigned m = 0; m < nmem; m++) {
        unsigned ngr = PD_ARRAY_LEN(gr);
        rc = NVML_CALL(nv, nv->supported_gr_clocks(nv->dev[gpu], mem[m], &ngr, gr));
        if (rc != NVML_OK) continue;
        for (unsigned g = 0; g < ngr; g++) {
            bool seen = false;
            for (int k = 0; k < n && !seen; k++) seen = mhz[k] == gr[g];
            if (!seen && n < cap) mhz[n++] = gr[g];
        }
    }
    if (n == 0) {
        pd_errorf(err, errlen, "GPU %d lists no supported SM clock", gpu);
        return -1;
    }
    qsort(mhz, (size_t)n, sizeof *mhz, cmp_desc);
    return n;
}

/* Checks want against the card's list; on a miss writes the nearest values to err. */
static int clocks_validate(power_nvml *nv, int gpu, unsigned want, char *err, size_t errlen) {
    unsigned list[512];
    int n = power_clocks_supported(nv, gpu, list, (int)PD_ARRAY_LEN(list), err, errlen);
    if (n < 0) return -1;
    int best = 0;
    for (int i = 0; i < n; i++) {
        if (list[i] == want) return 0;
        long d = labs((long)list[i] - (long)want), bd = labs((long)list[best] - (long)want);
        if (d < bd) best = i;
    }
    /* list is sorted highest first: the neighbours of best are the next values. */
    char near[128] = "";
    size_t off = 0;
    for (int i = PD_MAX(best - 2, 0); i <= PD_MIN(best + 2, n - 1); i++)
        off += (size_t)snprintf(near + off, sizeof near - off, "%s%u", off ? ", " : "", list[i]);
    pd_errorf(err, errlen,
              "GPU %d does not support an SM clock of %u MHz; nearest supported: %s MHz "
              "(the card lists %d values from %u to %u)",
              gpu, want, near, n, list[n - 1], list[0]);
    return -1;
}

/* Records the state before the first lock, for the log and the results. NVML has no
 * query for an existing lock: the state restored is "unlocked" (the driver default). */
static void clocks_record_prev(power_nvml *nv, int gpu, clock_slot *slot) {
    slot->prev_app_sm = slot->prev_app_mem = slot->prev_sm = 0;
    if (nv->applications_clock) {
        NVML_CALL(nv, nv->applications_clock(nv->dev[gpu], NVML_CLK_SM, &slot->prev_app_sm));
        NVML_CALL(nv, nv->applications_clock(nv->dev[gpu], NVML_CLK_MEM, &slot->prev_app_mem));
    }
    if (nv->clock_info) NVML_CALL(nv, nv->clock_info(nv->dev[gpu], NVML_CLK_SM, &slot->prev_sm));
    log_info("power: GPU %d before locking: SM %u MHz now, application clocks SM %u / "
             "memory %u MHz; restored to unlocked at exit",
             gpu, slot->prev_sm, slot->prev_app_sm, slot->prev_app_mem);
}

int power_clocks_lock(power_nvml *nv, const int *gpus, const unsigned *sm_mhz, int n, bool allow,
                      char *err, size_t errlen) {
    PD_ASSERT(n >= 0 && (n == 0 || (gpus && sm_mhz)));
    if (!allow) {
        pd_errorf(err, errlen, "refusing to change GPU clocks: they are shared with every "
                               "other user of this machine; pass --allow-clock-control to permit it");
        return -1;
    }
    if (!nv) {
        pd_errorf(err, errlen, "cannot control GPU clocks: NVML is not loaded");
        return -1;
    }
    if (!nv->set_locked_clocks || !nv->reset_locked_clocks) {
        pd_errorf(err, errlen, "cannot control GPU clocks: this NVML lacks "
                               "nvmlDeviceSetGpuLockedClocks/nvmlDeviceResetGpuLockedClocks");
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (clocks_validate(nv, gpus[i], sm_mhz[i], err, errlen) != 0) return -1;
    g_reset = nv->reset_locked_clocks;
    clocks_install_handlers();
    bool touched[POWER_MAX_GPUS] = {false};
    for (int i = 0; i < n; i++) {
        int g = gpus[i];
        clock_slot *slot = &g_slots[g];
        if (!slot->locked) clocks_record_prev(nv, g, slot);
        slot->dev = nv->dev[g];
        slot->index = g;
        slot->locked = 1; /* before the call: a signal during it still resets */
        touched[g] = true;
        int rc = NVML_CALL(nv, nv->set_locked_clocks(nv->dev[g], sm_mhz[i], sm_mhz[i]));
        if (rc == NVML_OK) {
            slot->locked_mhz = sm_mhz[i];
            log_info("power: GPU %d SM clock locked at %u MHz", g, sm_mhz[i]);
            continue;
        }
        if (rc == NVML_ERR_NO_PERMISSION)
            pd_errorf(err, errlen, "NVML refused to lock the SM clock of GPU %d: no permission "
                      "(locking clocks needs root, or an administrator's nvidia-smi setting); "
                      "no GPU clock was left changed", g);
        else
            pd_errorf(err, errlen, "cannot lock the SM clock of GPU %d at %u MHz: %s (%d); "
                      "no GPU clock was left changed", g, sm_mhz[i], power_nvml_error(nv, rc), rc);
        /* All or nothing: reset every GPU this call touched (including g: harmless). */
        for (int k = 0; k < POWER_MAX_GPUS; k++) {
            if (!touched[k] || !g_slots[k].locked) continue;
            if (k != g || rc != NVML_ERR_NO_PERMISSION)
                NVML_CALL(nv, nv->reset_locked_clocks(g_slots[k].dev));
            g_slots[k].locked = 0;
        }
        return -1;
    }
    return 0;
}
