/* tokenizer_adapter.c: the model's tokenizer (model/tokenizer.h) behind the bench's
 * callback table, so that datasets get token-exact prompts in the model's own
 * tokens: raw encoding (no BOS added: the server adds its own), decoding without
 * special tokens, and special ids kept out of random prompts. */
#include "bench/bench.h"
#include "model/tokenizer.h"

static int adapter_encode(void *ctx, const char *text, size_t len, int32_t **ids, int *n) {
    char err[256];
    return tokenizer_encode(ctx, text, len, false, ids, n, err, sizeof err);
}

static char *adapter_decode(void *ctx, const int32_t *ids, int n, size_t *len) {
    return tokenizer_decode(ctx, ids, n, true, len);
}

static bool adapter_special(void *ctx, int32_t id) { return tokenizer_is_special(ctx, id); }

void bench_tokenizer_wrap(bench_tokenizer *out, const struct tokenizer *t) {
    out->ctx = (void *)t;
    out->vocab_size = tokenizer_vocab_size(t);
    out->encode = adapter_encode;
    out->decode = adapter_decode;
    out->is_special = adapter_special;
}
