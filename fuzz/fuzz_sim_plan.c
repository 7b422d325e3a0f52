/* fuzz_sim_plan.c: libFuzzer target for sim_plan_parse (a plan file is outside input:
 * `pdserve sim PLAN.json`). Any input must give 0 or -1 with a message, never a crash,
 * a leak or undefined behaviour.
 * Run: ./build-fuzz/fuzz_sim_plan -max_total_time=60 fuzz/corpus/sim_plan */
#include <stdint.h>
#include <string.h>

#include "sim/sim.h"
#include "util/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    sim_plan p;
    char err[512];
    err[0] = 0;
    int rc = sim_plan_parse((const char *)data, size, "plan.json", &p, err, sizeof err);
    if (rc != 0) {
        PD_ASSERT(rc == -1 && err[0] != 0);
        return 0;
    }
    sim_plan_free(&p);
    return 0;
}
