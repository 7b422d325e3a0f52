/* test_fake_nvml_rig.h: what the profiler's tests against the stand-in NVML
 * (tests/fake_nvml.c) share: the stand-in library in place of NVML, its call log in a
 * file of this process, and preset:tiny-llama (dummy weights) on a one-thread CPU
 * backend. A test without the stand-in (not run through ctest) is skipped. */
#ifndef PD_TEST_FAKE_NVML_RIG_H
#define PD_TEST_FAKE_NVML_RIG_H

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "backend/backend.h"
#include "engine/forward.h"
#include "model/model.h"
#include "sim/sim.h"
#include "test.h"
#include "util/util.h"

typedef struct nvml_rig {
    char log[256];          /* the stand-in's call log */
    model_files files;
    backend *be;
    model *m;
} nvml_rig;

/* Points NVML at the stand-in (its log named after `name` and the pid) and loads the
 * model. 0, or -1 with the reason on stderr. */
static inline int nvml_rig_open(nvml_rig *r, const char *name) {
    const char *lib = getenv("PDSERVE_FAKE_NVML");
    if (!lib || !util_file_exists(lib)) TEST_SKIP("PDSERVE_FAKE_NVML not set (run through ctest)");
    snprintf(r->log, sizeof r->log, "%s/pdserve-%s-%d.log", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", name,
             (int)getpid());
    setenv("PDSERVE_NVML_LIB", lib, 1);
    setenv("FAKE_NVML_LOG", r->log, 1);
    char err[512];
    if (model_files_open("preset:tiny-llama", "dummy", &r->files, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    r->be = backend_cpu_create(1);
    r->m = model_load(r->be, &r->files, 1, err, sizeof err);
    if (!r->m) fprintf(stderr, "%s\n", err);
    return r->m ? 0 : -1;
}

/* The stand-in's log so far (malloc'd; "" when there is none). */
static inline char *nvml_rig_read_log(const nvml_rig *r) {
    char err[256];
    char *s = util_read_file(r->log, NULL, err, sizeof err);
    return s ? s : xstrdup("");
}

/* The tests' tiny grid (n = 1: its first point of each axis, 2: prefill 16 and 64 rows,
 * decode batches 1 and 2), one round, no power phases, at the stand-in's top clock
 * (1980 MHz: the base the grid is taken at). */
static inline void nvml_rig_grid(sim_profile_opts *o, int n) {
    static const int PT[] = {16, 64}, PC[] = {0}, DB[] = {1, 2}, DC[] = {64};
    sim_profile_opts_default(o, true);
    o->prefill_tokens = PT, o->n_prefill_tokens = n;
    o->prefill_context = PC, o->n_prefill_context = 1;
    o->decode_batch = DB, o->n_decode_batch = n;
    o->decode_context = DC, o->n_decode_context = 1;
    o->repeats = 1;
    o->measure_power = false;
    o->clock_mhz = 1980;
}

static inline void nvml_rig_close(nvml_rig *r) {
    model_free(r->m);
    backend_destroy(r->be);
    model_files_close(&r->files);
    unlink(r->log);
}

#endif
