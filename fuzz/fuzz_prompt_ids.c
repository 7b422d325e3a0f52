/* fuzz_prompt_ids.c: libFuzzer target for prompt_ids_text_parse, the parser of the
 * prompt ids that lead a prefill instance's body (X-PD-Prompt-Ids-Bytes, outside input
 * on /internal/prefill). The first byte sets the cap on ids; the rest is the text (not
 * NUL-terminated, so reads past it are caught). Accepted text must give between 1 and
 * cap ids, each in [0, INT32_MAX], and formatting them back must parse to the same ids;
 * rejected text gives NULL. Never a crash, a leak or undefined behaviour.
 * Build: CC=clang cmake -S . -B build-fuzz -G Ninja -DPDSERVE_FUZZ=ON -DPDSERVE_CUDA=OFF
 * Run:   ./build-fuzz/fuzz_prompt_ids -max_total_time=60 fuzz/corpus/prompt_ids */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/server.h"
#include "util/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int max = 1 + data[0] % 64;
    size_t len = size - 1;
    char *text = malloc(len ? len : 1); /* exact size: ASan sees any overread */
    if (len) memcpy(text, data + 1, len);
    int n = -1;
    int32_t *ids = prompt_ids_text_parse(text, len, max, &n);
    if (ids) {
        PD_ASSERT(n >= 1 && n <= max);
        for (int i = 0; i < n; i++) PD_ASSERT(ids[i] >= 0);
        sbuf b;
        sbuf_init(&b);
        prompt_ids_text_format(&b, ids, n);
        int n2 = -1;
        int32_t *again = prompt_ids_text_parse(b.p, b.len, max, &n2);
        PD_ASSERT(again && n2 == n && memcmp(again, ids, sizeof(int32_t) * (size_t)n) == 0);
        PD_ASSERT(b.len <= len); /* canonical text is never longer (no leading zeros) */
        free(again);
        sbuf_free(&b);
        free(ids);
    }
    free(text);
    return 0;
}
