/* fuzz_sim_profile.c: libFuzzer target for sim_profile_parse (a profile file is outside
 * input: `pdserve sim --profile`, the study's RESUME_DIR). Any input must give 0 or -1
 * with a message, never a crash, a leak or undefined behaviour; a parsed profile must be
 * safe to price a prefill, a decode and a mixed step with, at its base clock and at
 * another, and to write back out.
 * Run: ./build-fuzz/fuzz_sim_profile -max_total_time=60 fuzz/corpus/sim_profile */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sim/sim.h"
#include "util/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    sim_profile p;
    char err[512];
    err[0] = 0;
    int rc = sim_profile_parse((const char *)data, size, "profile.json", &p, err, sizeof err);
    if (rc != 0) {
        PD_ASSERT(rc == -1 && err[0] != 0);
        return 0;
    }
    PD_ASSERT(p.prefill.nx > 0 && p.decode.nx > 0);
    for (int k = 0; k < 2; k++) {
        sim_cost c;
        sim_cost_init(&c, &p, k ? 900 : 0);
        sim_step_cost sc;
        sim_work w;
        sim_work_begin(&w, &p);
        sim_work_add_chunk(&w, 128, 64);
        w.n_logits = 1;
        sim_cost_step(&c, &w, &sc);
        sim_work_begin(&w, &p);
        for (int i = 0; i < 5; i++) sim_work_add_decode(&w, 100 + 1000 * i);
        w.n_logits = 5;
        sim_cost_step(&c, &w, &sc);
        sim_work_add_chunk(&w, 32, 0);
        sim_cost_step(&c, &w, &sc);
    }
    for (int i = 0; i < p.n_mediums; i++) (void)sim_cost_transfer(&p.mediums[i], 1e6);
    char *js = sim_profile_to_json(&p);
    PD_ASSERT(js);
    free(js);
    sim_profile_free(&p);
    return 0;
}
