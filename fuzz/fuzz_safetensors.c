/* fuzz_safetensors.c: libFuzzer target for the safetensors readers. An input that
 * starts with '{' is fed to st_index_parse (model.safetensors.index.json); any other
 * is a whole .safetensors file for st_parse_header. Then every accepted tensor's
 * bytes are read through st_convert_f32, so an offset that escapes the file shows
 * up as an ASan report, not as silence.
 * Run: ./build-fuzz/fuzz_safetensors -max_total_time=60 fuzz/corpus/safetensors */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "util/util.h"

static void fuzz_index(const uint8_t *data, size_t size) {
    st_index ix;
    char err[512] = "";
    if (st_index_parse((const char *)data, size, "model.safetensors.index.json", &ix, err, sizeof err)) {
        PD_ASSERT(err[0] != 0);
        return;
    }
    for (int i = 0; i < ix.n_tensors; i++) PD_ASSERT(ix.shard_of[i] >= 0 && ix.shard_of[i] < ix.n_shards);
    st_index_free(&ix);
}

static void fuzz_file(const uint8_t *data, size_t size) {
    st_tensor *t;
    int n;
    char err[512] = "";
    if (st_parse_header(data, size, size, "fuzz.safetensors", &t, &n, err, sizeof err)) {
        PD_ASSERT(err[0] != 0);
        return;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | data[i];
    const uint8_t *base = data + 8 + hlen;
    float buf[64];
    for (int i = 0; i < n; i++) {
        size_t es = dtype_size(t[i].dtype);
        PD_ASSERT(es > 0 && t[i].nbytes % es == 0);
        PD_ASSERT(8 + hlen + t[i].offset + t[i].nbytes <= size);
        size_t m = (size_t)(t[i].nbytes / es);
        for (size_t at = 0; at < m; at += 64) /* every byte of the tensor is touched */
            st_convert_f32(buf, base + t[i].offset + at * es, t[i].dtype, PD_MIN((size_t)64, m - at));
    }
    st_tensors_free(t, n);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 0 && data[0] == '{') fuzz_index(data, size);
    else fuzz_file(data, size);
    return 0;
}
