/* fuzz_tokenizer_json.c: libFuzzer target for tokenizer.json loading and encoding.
 *
 * Input byte 0 picks what the rest is:
 *   even: a tokenizer.json; when it loads, a few fixed texts are encoded, decoded
 *         and streamed through it;
 *   odd:  a text, encoded (with and without special tokens) by a small byte-level
 *         tokenizer trained once at start-up, decoded, and streamed; decode must
 *         give the text back (byte-level round trip on valid UTF-8).
 * Seeds: fuzz/corpus/tokenizer_json/. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer.h"
#include "util/util.h"

static tokenizer *TRAINED;

static void exercise(const tokenizer *t, const char *text, size_t len) {
    int32_t *ids;
    int n;
    char err[256];
    for (int sp = 0; sp < 2; sp++) {
        if (tokenizer_encode(t, text, len, sp, &ids, &n, err, sizeof(err))) continue;
        size_t dl;
        char *d = tokenizer_decode(t, ids, n, sp, &dl);
        detok_stream s;
        detok_init(&s, t, sp);
        size_t total = 0;
        for (int i = 0; i <= n; i++) {
            char *o;
            size_t ol;
            if (i < n) detok_push(&s, ids[i], &o, &ol);
            else detok_finish(&s, &o, &ol);
            if (ol) {
                if (!utf8_valid(o, ol) || total + ol > dl || memcmp(d + total, o, ol) != 0) abort();
                total += ol;
            }
            free(o);
        }
        if (total != dl) abort();
        if (t == TRAINED && !sp && utf8_valid(text, len) && !memchr(text, 0, len) &&
            (dl != len || memcmp(d, text, len) != 0))
            abort();
        detok_free(&s);
        free(d);
        free(ids);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    char *json, *cfg, err[256];
    if (tokenizer_train_bytelevel(TOKENIZER_CORPUS, strlen(TOKENIZER_CORPUS), 400, &json, &cfg, err, sizeof(err)) ||
        tokenizer_load_text(json, strlen(json), cfg, strlen(cfg), "trained", &TRAINED, err, sizeof(err)))
        abort();
    free(json);
    free(cfg);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > (1 << 16)) return 0;
    const char *p = (const char *)data + 1;
    size_t n = size - 1;
    if (data[0] & 1) {
        exercise(TRAINED, p, n);
        return 0;
    }
    tokenizer *t = NULL;
    char err[256];
    if (tokenizer_load_text(p, n, NULL, 0, "fuzz.json", &t, err, sizeof(err)) == 0) {
        static const char *texts[] = { "", "Hello world", "  a\tb\n\n c ", "<s>x</s>", "\xc3\xa9\xe4\xbd\xa0\xf0\x9f\x98\x80",
                                       "abcabcabc 123 don't" };
        for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) exercise(t, texts[i], strlen(texts[i]));
        tokenizer_vocab_size(t);
        tokenizer_free(t);
    }
    return 0;
}
