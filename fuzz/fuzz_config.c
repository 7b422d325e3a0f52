/* fuzz_config.c: libFuzzer target for model_config_parse (config.json is outside
 * input). Any input must give 0 or -1 with a message, never a crash, a leak or
 * undefined behaviour; a parsed config must be safe to size (param count, KV bytes,
 * description, every weight shape) without overflow.
 * Run: ./build-fuzz/fuzz_config -max_total_time=60 fuzz/corpus/config */
#include <stdint.h>
#include <string.h>

#include "model/model.h"
#include "util/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    model_config c;
    char err[512], line[512];
    err[0] = 0;
    int rc = model_config_parse((const char *)data, size, "config.json", &c, err, sizeof err);
    if (rc != 0) {
        PD_ASSERT(rc == -1 && err[0] != 0);
        return 0;
    }
    PD_ASSERT(c.dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0);
    PD_ASSERT(c.n_heads % c.n_kv_heads == 0 && c.vocab_size > 0 && c.n_eos <= MODEL_MAX_EOS);
    (void)model_param_count(&c);
    (void)model_kv_bytes_per_token(&c, 4);
    model_config_describe(&c, line, sizeof line);
    for (int r = 0; r < WEIGHT_ROLE_COUNT; r++) {
        int64_t shape[2];
        int nd = weight_role_shape(&c, (weight_role)r, shape);
        PD_ASSERT(nd >= 1 && nd <= 2 && shape[0] > 0);
    }
    return 0;
}
