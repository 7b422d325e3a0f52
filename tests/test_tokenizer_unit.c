/* test_tokenizer_unit.c: tokenizer tests that need no downloaded files: the trained
 * demo tokenizer (round trip, BOS, chat, determinism), a small SentencePiece-style
 * tokenizer written here (byte fallback, Metaspace, the Llama 2 decoder, streaming
 * through byte tokens), added-token flags, chat templates, and load errors. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer.h"
#include "test.h"
#include "util/util.h"

static tokenizer *load_text(const char *json, const char *cfg) {
    char err[512];
    tokenizer *t = NULL;
    if (tokenizer_load_text(json, strlen(json), cfg, cfg ? strlen(cfg) : 0, "test", &t, err, sizeof(err)))
        fprintf(stderr, "load: %s\n", err);
    return t;
}

static int encode(const tokenizer *t, const char *s, bool sp, int32_t *out, int cap) {
    int32_t *ids;
    int n;
    char err[256];
    if (tokenizer_encode(t, s, strlen(s), sp, &ids, &n, err, sizeof(err))) return -1;
    for (int i = 0; i < n && i < cap; i++) out[i] = ids[i];
    free(ids);
    return n;
}

static char *stream_all(const tokenizer *t, const int32_t *ids, int n, bool skip) {
    detok_stream s;
    detok_init(&s, t, skip);
    char *acc = xcalloc(1, 1);
    size_t an = 0;
    for (int i = 0; i <= n; i++) {
        char *o;
        size_t ol;
        if (i < n) detok_push(&s, ids[i], &o, &ol);
        else detok_finish(&s, &o, &ol);
        if (ol) {
            CHECK(utf8_valid(o, ol));
            acc = xrealloc(acc, an + ol + 1);
            memcpy(acc + an, o, ol);
            an += ol;
            acc[an] = 0;
        }
        free(o);
    }
    detok_free(&s);
    return acc;
}

/* ---- the trained demo tokenizer ------------------------------------------------------- */
static const char *SAMPLES[] = {
    "", "Serving a language model", "  spaces\tand\ttabs\n\n\nnewlines ",
    "unseen words: zyxwv qqq", "中文 😀 👨‍👩‍👧 e\xcc\x81", "<|begin_of_text|>x<|eot_id|>",
    "numbers 1234567 3.14159", "don't I'LL we've", "\x01\x7f\r\n",
};

static void test_trained_roundtrip(void) {
    char *json, *cfg, err[256];
    REQUIRE(tokenizer_train_bytelevel(TOKENIZER_CORPUS, strlen(TOKENIZER_CORPUS), 512, &json, &cfg, err, sizeof(err)) == 0);
    tokenizer *t = load_text(json, cfg);
    REQUIRE(t);
    CHECK_EQ_INT(tokenizer_vocab_size(t), 512);
    CHECK_EQ_INT(tokenizer_bos_id(t), 507);
    CHECK_EQ_INT(tokenizer_eos_id(t), 511);
    CHECK(tokenizer_is_special(t, 507) && !tokenizer_is_special(t, 300));
    for (size_t i = 0; i < PD_ARRAY_LEN(SAMPLES); i++) {
        int32_t ids[4096];
        int n = encode(t, SAMPLES[i], false, ids, 4096);
        REQUIRE(n >= 0 && n < 4096);
        char *d = tokenizer_decode(t, ids, n, false, NULL);
        CHECKF(strcmp(d, SAMPLES[i]) == 0, "round trip \"%s\" -> \"%s\"", SAMPLES[i], d);
        char *st = stream_all(t, ids, n, false);
        CHECK(strcmp(st, d) == 0);
        free(st);
        free(d);
        int32_t ids2[4096];
        int n2 = encode(t, SAMPLES[i], true, ids2, 4096);
        CHECK_EQ_INT(n2, n + 1);
        CHECK_EQ_INT(ids2[0], 507);
    }
    /* the training text compresses: well under one token per 2 bytes */
    int32_t *ids;
    int n;
    REQUIRE(tokenizer_encode(t, TOKENIZER_CORPUS, strlen(TOKENIZER_CORPUS), false, &ids, &n, err, sizeof(err)) == 0);
    CHECKF((size_t)n * 2 < strlen(TOKENIZER_CORPUS), "%d tokens for %zu bytes", n, strlen(TOKENIZER_CORPUS));
    free(ids);
    /* special tokens written in text are single tokens */
    int32_t sp[8];
    CHECK_EQ_INT(encode(t, "<|eot_id|>", false, sp, 8), 1);
    CHECK_EQ_INT(sp[0], 511);
    CHECK_EQ_INT(tokenizer_chat_format(t), CHAT_FORMAT_LLAMA3);
    chat_message m[] = { { "user", " hi " } };
    char *c = chat_apply(t, m, 1, true, err, sizeof(err));
    REQUIRE(c);
    CHECK(strcmp(c, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n") == 0);
    free(c);
    c = chat_apply(t, m, 1, false, err, sizeof(err));
    REQUIRE(c);
    CHECK(strstr(c, "assistant") == NULL);
    free(c);
    /* deterministic: the same text gives the same files */
    char *json2, *cfg2;
    REQUIRE(tokenizer_train_bytelevel(TOKENIZER_CORPUS, strlen(TOKENIZER_CORPUS), 512, &json2, &cfg2, err, sizeof(err)) == 0);
    CHECK(strcmp(json, json2) == 0 && strcmp(cfg, cfg2) == 0);
    free(json2); free(cfg2);
    tokenizer_free(t);
    free(json); free(cfg);
    CHECK(tokenizer_train_bytelevel("x", 1, 100, &json, &cfg, err, sizeof(err)) == -1);
    CHECK_STR_CONTAINS(err, "vocab_size");
}

/* ---- a small SentencePiece-style tokenizer --------------------------------------------------- */
static char *sp_json(bool metaspace) {
    cJSON *root = cJSON_CreateObject(), *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddStringToObject(model, "unk_token", "<unk>");
    cJSON_AddBoolToObject(model, "byte_fallback", 1);
    cJSON_AddBoolToObject(model, "fuse_unk", 1);
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    const char *base[] = { "<unk>", "<s>", "</s>" };
    int id = 0;
    for (int i = 0; i < 3; i++) cJSON_AddNumberToObject(vocab, base[i], id++);
    for (int b = 0; b < 256; b++) {
        char s[8];
        snprintf(s, sizeof(s), "<0x%02X>", b);
        cJSON_AddNumberToObject(vocab, s, id++);
    }
    const char *pieces[] = { "\xe2\x96\x81", "h", "i", "e", "l", "o", "\xe2\x96\x81h", "\xe2\x96\x81hi", "ll", "\xe2\x96\x81he", "\xe2\x96\x81hell", "\xe2\x96\x81hello" };
    for (size_t i = 0; i < PD_ARRAY_LEN(pieces); i++) cJSON_AddNumberToObject(vocab, pieces[i], id++);
    const char *merges[] = { "\xe2\x96\x81 h", "\xe2\x96\x81h i", "l l", "\xe2\x96\x81h e", "\xe2\x96\x81he ll", "\xe2\x96\x81hell o" };
    cJSON *m = cJSON_AddArrayToObject(model, "merges");
    for (size_t i = 0; i < PD_ARRAY_LEN(merges); i++) cJSON_AddItemToArray(m, cJSON_CreateString(merges[i]));
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    for (int i = 0; i < 3; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddNumberToObject(a, "id", i);
        cJSON_AddStringToObject(a, "content", base[i]);
        cJSON_AddBoolToObject(a, "special", 1);
        cJSON_AddBoolToObject(a, "normalized", 0);
        cJSON_AddItemToArray(added, a);
    }
    const char *rest = metaspace
        ? "{\"pre_tokenizer\":{\"type\":\"Metaspace\",\"replacement\":\"\xe2\x96\x81\",\"prepend_scheme\":\"first\",\"split\":false},"
          "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Metaspace\",\"replacement\":\"\xe2\x96\x81\",\"prepend_scheme\":\"first\"},{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"}]}}"
        : "{\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":\"\xe2\x96\x81\"},"
          "{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":\"\xe2\x96\x81\"}]},"
          "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":{\"String\":\"\xe2\x96\x81\"},\"content\":\" \"},"
          "{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"},{\"type\":\"Strip\",\"content\":\" \",\"start\":1,\"stop\":0}]},"
          "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],"
          "\"special_tokens\":{\"<s>\":{\"id\":\"<s>\",\"ids\":[1],\"tokens\":[\"<s>\"]}}}}";
    cJSON *r = cJSON_Parse(rest), *x;
    cJSON_ArrayForEach(x, r) cJSON_AddItemToObject(root, x->string, cJSON_Duplicate(x, 1));
    cJSON_Delete(r);
    char *out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return out;
}

static void test_sentencepiece(void) {
    for (int ms = 0; ms < 2; ms++) {
        char *json = sp_json(ms);
        tokenizer *t = load_text(json, NULL);
        free(json);
        REQUIRE(t);
        int hello = tokenizer_token_to_id(t, "\xe2\x96\x81hello"), hi = tokenizer_token_to_id(t, "\xe2\x96\x81hi");
        int32_t ids[64];
        int n = encode(t, "hello hi", !ms, ids, 64);
        int k = ms ? 0 : 1;
        REQUIRE(n == 2 + k);
        if (!ms) CHECK_EQ_INT(ids[0], 1);
        CHECK_EQ_INT(ids[k], hello);
        CHECK_EQ_INT(ids[k + 1], hi);
        /* "é" is not in the vocabulary: bytes C3 A9 */
        n = encode(t, "h\xc3\xa9", false, ids, 64);
        REQUIRE(n == 3);
        CHECK_EQ_INT(ids[1], 3 + 0xc3);
        CHECK_EQ_INT(ids[2], 3 + 0xa9);
        char *d = tokenizer_decode(t, ids, n, false, NULL);
        CHECK(strcmp(d, "h\xc3\xa9") == 0);   /* the leading space is stripped */
        char *s = stream_all(t, ids, n, false);
        CHECK(strcmp(s, d) == 0);
        free(s); free(d);
        /* a lone continuation byte decodes to U+FFFD, the same streamed */
        int32_t bad[3] = { hello, 3 + 0xa9, hi };
        d = tokenizer_decode(t, bad, 3, false, NULL);
        CHECK(strcmp(d, "hello\xef\xbf\xbd hi") == 0);
        s = stream_all(t, bad, 3, false);
        CHECK(strcmp(s, d) == 0);
        free(s); free(d);
        /* an ASCII byte followed by a broken one: both become U+FFFD (whole run invalid) */
        int32_t run[3] = { hello, 3 + 'A', 3 + 0x80 };
        d = tokenizer_decode(t, run, 3, false, NULL);
        CHECK(strcmp(d, "hello\xef\xbf\xbd\xef\xbf\xbd") == 0);
        s = stream_all(t, run, 3, false);
        CHECK(strcmp(s, d) == 0);
        free(s); free(d);
        /* special tokens in text, and skipped in decode */
        n = encode(t, "<s>hi", false, ids, 64);
        CHECK(n >= 2 && ids[0] == 1);
        d = tokenizer_decode(t, ids, n, true, NULL);
        CHECK(strcmp(d, ms ? "hi" : "hi") == 0);
        free(d);
        tokenizer_free(t);
    }
}

/* ---- added-token flags ------------------------------------------------------------------------ */
static void test_added_flags(void) {
    char *json, *cfg, err[256];
    REQUIRE(tokenizer_train_bytelevel(TOKENIZER_CORPUS, strlen(TOKENIZER_CORPUS), 300, &json, &cfg, err, sizeof(err)) == 0);
    cJSON *root = cJSON_Parse(json), *added = cJSON_GetObjectItem(root, "added_tokens");
    struct { const char *c; bool l, r, w; } x[] = { { "<L>", true, false, false }, { "<R>", false, true, false },
                                                    { "WORD", false, false, true } };
    for (int i = 0; i < 3; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddNumberToObject(a, "id", 300 + i);
        cJSON_AddStringToObject(a, "content", x[i].c);
        cJSON_AddBoolToObject(a, "lstrip", x[i].l);
        cJSON_AddBoolToObject(a, "rstrip", x[i].r);
        cJSON_AddBoolToObject(a, "single_word", x[i].w);
        cJSON_AddBoolToObject(a, "normalized", 0);
        cJSON_AddBoolToObject(a, "special", 0);
        cJSON_AddItemToArray(added, a);
    }
    char *j2 = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    tokenizer *t = load_text(j2, cfg);
    free(j2); free(json); free(cfg);
    REQUIRE(t);
    int32_t ids[64];
    int n = encode(t, "a  <L>b", false, ids, 64);   /* lstrip eats the spaces before */
    REQUIRE(n == 3);
    CHECK_EQ_INT(ids[1], 300);
    char *d = tokenizer_decode(t, ids, n, false, NULL);
    CHECK(strcmp(d, "a<L>b") == 0);
    free(d);
    n = encode(t, "a<R>  b", false, ids, 64);       /* rstrip eats the spaces after */
    REQUIRE(n == 3);
    CHECK_EQ_INT(ids[1], 301);
    n = encode(t, "xWORDy", false, ids, 64);        /* single_word: not inside a word */
    for (int i = 0; i < n; i++) CHECK(ids[i] != 302);
    n = encode(t, "x WORD y", false, ids, 64);
    bool found = false;
    for (int i = 0; i < n; i++) found |= ids[i] == 302;
    CHECK(found);
    tokenizer_free(t);
}

/* ---- chat templates ------------------------------------------------------------------------------ */
static tokenizer *with_template(const char *tpl) {
    char *json, *cfg, err[256];
    if (tokenizer_train_bytelevel("abc", 3, 261, &json, &cfg, err, sizeof(err))) return NULL;
    cJSON *c = cJSON_Parse(cfg);
    cJSON_ReplaceItemInObject(c, "chat_template", cJSON_CreateString(tpl));
    cJSON_ReplaceItemInObject(c, "eos_token", cJSON_CreateString("<|end_of_text|>"));
    char *cfg2 = cJSON_PrintUnformatted(c);
    cJSON_Delete(c);
    tokenizer *t = load_text(json, cfg2);
    free(json); free(cfg); free(cfg2);
    return t;
}

static void test_chat_templates(void) {
    char err[256];
    tokenizer *t = with_template("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n'}}{% endfor %}");
    REQUIRE(t);
    CHECK_EQ_INT(tokenizer_chat_format(t), CHAT_FORMAT_CHATML);
    chat_message m[] = { { "system", "sys" }, { "user", "u1" }, { "assistant", " a1 " }, { "user", "u2" } };
    char *s = chat_apply(t, m + 1, 1, true, err, sizeof(err));
    REQUIRE(s);
    CHECK(strcmp(s, "<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n") == 0);
    free(s);
    tokenizer_free(t);

    t = with_template("{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }} <<SYS>>");
    REQUIRE(t);
    CHECK_EQ_INT(tokenizer_chat_format(t), CHAT_FORMAT_LLAMA2);
    s = chat_apply(t, m, 4, true, err, sizeof(err));
    REQUIRE(s);
    CHECK(strcmp(s, "<|begin_of_text|>[INST] <<SYS>>\nsys\n<</SYS>>\n\nu1 [/INST] a1 <|end_of_text|>"
                    "<|begin_of_text|>[INST] u2 [/INST]") == 0);
    free(s);
    chat_message twice[] = { { "user", "a" }, { "user", "b" } };
    CHECK(chat_apply(t, twice, 2, true, err, sizeof(err)) == NULL);
    CHECK_STR_CONTAINS(err, "alternate");
    tokenizer_free(t);

    /* Llama 3.1: a default system message with the template's dates */
    t = with_template("<|start_header_id|> {%- set date_string = \"26 Jul 2024\" %} add_generation_prompt "
                      "{{- \"Cutting Knowledge Date: December 2023\\n\" }}");
    REQUIRE(t);
    s = chat_apply(t, m + 1, 1, true, err, sizeof(err));
    REQUIRE(s);
    CHECK(strcmp(s, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nu1<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n") == 0);
    free(s);
    tokenizer_free(t);

    t = with_template("{{ messages }}");
    REQUIRE(t);
    CHECK_EQ_INT(tokenizer_chat_format(t), CHAT_FORMAT_NONE);
    CHECK(chat_apply(t, m, 1, true, err, sizeof(err)) == NULL);
    CHECK_STR_CONTAINS(err, "no chat template pdserve knows");
    tokenizer_free(t);
}

/* ---- load errors ---------------------------------------------------------------------------------- */
static void test_load_errors(void) {
    const char *bad[] = {
        "", "[]", "{\"model\":1}", "{\"model\":{\"type\":\"Unigram\",\"vocab\":[]}}",
        "{\"model\":{\"vocab\":{\"a\":0},\"merges\":[\"a b\"]}}",
        "{\"model\":{\"vocab\":{\"a\":-4}}}",
        "{\"model\":{\"vocab\":{\"a\":0}},\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(\"}}}",
        "{\"model\":{\"vocab\":{\"a\":0}},\"decoder\":{\"type\":\"WordPiece\"}}",
    };
    for (size_t i = 0; i < PD_ARRAY_LEN(bad); i++) {
        char err[256] = "";
        tokenizer *t = NULL;
        CHECKF(tokenizer_load_text(bad[i], strlen(bad[i]), NULL, 0, "bad.json", &t, err, sizeof(err)) == -1,
               "accepted %s", bad[i]);
        CHECK(t == NULL);
        CHECK_STR_CONTAINS(err, "bad.json");
    }
    char err[256];
    tokenizer *t;
    CHECK(tokenizer_load("/nonexistent-dir", &t, err, sizeof(err)) == -1);
    tokenizer_free(NULL);
}

int main(void) {
    TEST_RUN(test_trained_roundtrip);
    TEST_RUN(test_sentencepiece);
    TEST_RUN(test_added_flags);
    TEST_RUN(test_chat_templates);
    TEST_RUN(test_load_errors);
    return TEST_END();
}
