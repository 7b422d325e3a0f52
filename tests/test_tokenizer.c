/* test_tokenizer.c: the real Llama 3, Qwen3 and Llama 2 tokenizers against golden
 * fixtures made by Hugging Face `tokenizers` / `transformers`
 * (tests/fixtures/tokenizer/make_fixtures.py), plus properties that hold without
 * fixtures: byte-level round trip, streaming detokenisation equal to the full
 * decode, chat rendering, the encode speed of a 16k-token prompt, and the fast encode
 * path against the plain one (tokenizer.reference) on random text.
 *
 * Tokenizer files come from scripts/fetch-test-tokenizers.sh into
 * tests/.cache/tokenizers/NAME/; without them the test is skipped (exit 77). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "model/tokenizer.h"
#include "model/tokenizer_internal.h"
#include "test.h"
#include "util/util.h"

static const char *NAMES[3] = { "llama3", "qwen3", "llama2" };
static tokenizer *TOK[3];
static cJSON *CORPUS;
static int FIXTURES_SEEN;

static tokenizer *load_named(const char *name) {
    char dir[2048], err[512];
    snprintf(dir, sizeof(dir), "%s/tests/.cache/tokenizers/%s", test_source_dir(), name);
    if (!util_is_dir(dir)) return NULL;
    tokenizer *t = NULL;
    if (tokenizer_load(dir, &t, err, sizeof(err))) {
        fprintf(stderr, "loading %s: %s\n", name, err);
        return NULL;
    }
    return t;
}

static cJSON *load_json_file(const char *path) {
    char err[512];
    size_t len;
    char *s = util_read_file(path, &len, err, sizeof(err));
    if (!s) return NULL;
    cJSON *j = cJSON_ParseWithLength(s, len);
    free(s);
    return j;
}

static bool ids_equal(const int32_t *ids, int n, const cJSON *arr) {
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) != n) return false;
    int i = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, arr) if ((int32_t)x->valuedouble != ids[i++]) return false;
    return true;
}

static void print_ids(const char *what, const int32_t *ids, int n) {
    fprintf(stderr, "  %s:", what);
    for (int i = 0; i < n && i < 40; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, "%s\n", n > 40 ? " ..." : "");
}

/* ---- golden fixtures ----------------------------------------------------------------- */
static void check_case(const tokenizer *t, const cJSON *c) {
    const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
    size_t len = strlen(text);
    int32_t *ids, *ids_sp;
    int n, n_sp;
    char err[256];
    REQUIRE(tokenizer_encode(t, text, len, false, &ids, &n, err, sizeof(err)) == 0);
    REQUIRE(tokenizer_encode(t, text, len, true, &ids_sp, &n_sp, err, sizeof(err)) == 0);
    if (!ids_equal(ids, n, cJSON_GetObjectItem(c, "ids"))) {
        CHECKF(0, "ids differ for \"%s\"", text);
        print_ids("ours", ids, n);
    }
    CHECKF(ids_equal(ids_sp, n_sp, cJSON_GetObjectItem(c, "ids_special")), "ids with special tokens differ for \"%s\"", text);
    const cJSON *call = cJSON_GetObjectItem(c, "ids_call");
    if (call && !ids_equal(ids_sp, n_sp, call))
        fprintf(stderr, "NOTE: transformers tokenizer(text) differs from tokenizers' post-processor for \"%s\"\n", text);
    const char *want = cJSON_GetObjectItem(c, "decode")->valuestring;
    const char *want_skip = cJSON_GetObjectItem(c, "decode_skip")->valuestring;
    const cJSON *fid = cJSON_GetObjectItem(c, "ids");
    int fn = cJSON_GetArraySize(fid);
    int32_t *fids = xmalloc(sizeof(int32_t) * (size_t)(fn + 1));
    for (int i = 0; i < fn; i++) fids[i] = (int32_t)cJSON_GetArrayItem(fid, i)->valuedouble;
    char *d = tokenizer_decode(t, fids, fn, false, NULL), *ds = tokenizer_decode(t, fids, fn, true, NULL);
    CHECKF(strcmp(d, want) == 0, "decode \"%s\" != \"%s\"", d, want);
    CHECKF(strcmp(ds, want_skip) == 0, "decode(skip) \"%s\" != \"%s\"", ds, want_skip);
    free(d); free(ds); free(fids); free(ids); free(ids_sp);
}

static void check_chat(const tokenizer *t, const cJSON *chat) {
    const cJSON *msgs = cJSON_GetObjectItem(chat, "messages"), *m;
    chat_message cm[16];
    int n = 0;
    cJSON_ArrayForEach(m, msgs) {
        if (n == 16) break;
        cm[n].role = cJSON_GetObjectItem(m, "role")->valuestring;
        cm[n].content = cJSON_GetObjectItem(m, "content")->valuestring;
        n++;
    }
    char err[256];
    char *text = chat_apply(t, cm, n, cJSON_IsTrue(cJSON_GetObjectItem(chat, "add_generation_prompt")), err, sizeof(err));
    const cJSON *want = cJSON_GetObjectItem(chat, "text");
    if (!cJSON_IsString(want)) { CHECKF(text == NULL, "template refused this chat in HF, not here"); free(text); return; }
    REQUIRE(text);
    CHECKF(strcmp(text, want->valuestring) == 0, "chat text\n%s\n!=\n%s", text, want->valuestring);
    int32_t *ids;
    int nid;
    REQUIRE(tokenizer_encode(t, text, strlen(text), false, &ids, &nid, err, sizeof(err)) == 0);
    CHECKF(ids_equal(ids, nid, cJSON_GetObjectItem(chat, "ids")), "chat ids differ");
    free(ids);
    free(text);
}

static void test_fixtures(void) {
    for (int k = 0; k < 3; k++) {
        if (!TOK[k]) continue;
        char path[2048];
        snprintf(path, sizeof(path), "%s/tests/fixtures/tokenizer/%s.json", test_source_dir(), NAMES[k]);
        cJSON *fx = load_json_file(path);
        if (!fx) { fprintf(stderr, "fixture %s absent: ids not compared (run make_fixtures.py)\n", path); continue; }
        FIXTURES_SEEN++;
        char *v = cJSON_PrintUnformatted(cJSON_GetObjectItem(fx, "versions"));
        fprintf(stderr, "%s: fixture from %s\n", NAMES[k], v ? v : "?");
        free(v);
        const cJSON *c;
        cJSON_ArrayForEach(c, cJSON_GetObjectItem(fx, "cases")) check_case(TOK[k], c);
        cJSON_ArrayForEach(c, cJSON_GetObjectItem(fx, "chats")) check_chat(TOK[k], c);
        cJSON_Delete(fx);
    }
}

/* ---- properties ------------------------------------------------------------------------ */
static void test_roundtrip(void) {
    for (int k = 0; k < 3; k++) {
        if (!TOK[k]) continue;
        const cJSON *s;
        cJSON_ArrayForEach(s, CORPUS) {
            const char *text = s->valuestring;
            if (k == 2 && strchr(text, '<')) continue;   /* SentencePiece: spaces around added tokens move */
            int32_t *ids;
            int n;
            char err[256];
            REQUIRE(tokenizer_encode(TOK[k], text, strlen(text), false, &ids, &n, err, sizeof(err)) == 0);
            char *d = tokenizer_decode(TOK[k], ids, n, false, NULL);
            char *want = k == 1 ? (char *)utf8proc_NFC((const utf8proc_uint8_t *)text) : xstrdup(text);
            CHECKF(strcmp(d, want) == 0, "%s: decode(encode(\"%s\")) = \"%s\"", NAMES[k], want, d);
            free(want); free(d); free(ids);
        }
    }
}

static void stream_one(const tokenizer *t, const int32_t *ids, int n, bool skip, const char *name) {
    detok_stream s;
    detok_init(&s, t, skip);
    char *acc = xcalloc(1, 1);
    size_t acc_n = 0;
    for (int i = 0; i <= n; i++) {
        char *out;
        size_t out_len;
        if (i < n) detok_push(&s, ids[i], &out, &out_len);
        else detok_finish(&s, &out, &out_len);
        if (out_len) {
            CHECKF(utf8_valid(out, out_len), "%s: streamed piece is not valid UTF-8", name);
            acc = xrealloc(acc, acc_n + out_len + 1);
            memcpy(acc + acc_n, out, out_len);
            acc_n += out_len;
            acc[acc_n] = 0;
        }
        free(out);
    }
    char *full = tokenizer_decode(t, ids, n, skip, NULL);
    CHECKF(strcmp(acc, full) == 0, "%s: streamed \"%s\" != decoded \"%s\"", name, acc, full);
    free(full);
    free(acc);
    detok_free(&s);
}

static void test_detok_stream(void) {
    for (int k = 0; k < 3; k++) {
        if (!TOK[k]) continue;
        const cJSON *s;
        cJSON_ArrayForEach(s, CORPUS) {
            int32_t *ids;
            int n;
            char err[256];
            REQUIRE(tokenizer_encode(TOK[k], s->valuestring, strlen(s->valuestring), true, &ids, &n, err, sizeof(err)) == 0);
            stream_one(TOK[k], ids, n, false, NAMES[k]);
            stream_one(TOK[k], ids, n, true, NAMES[k]);
            /* broken byte sequences: every prefix of a multi-byte stream */
            free(ids);
        }
    }
}

static void test_chat_llama3(void) {
    if (!TOK[0]) return;
    CHECK_EQ_INT(tokenizer_chat_format(TOK[0]), CHAT_FORMAT_LLAMA3);
    chat_message m[] = { { "system", " Be brief. " }, { "user", "Hi\n" } };
    char err[256];
    char *s = chat_apply(TOK[0], m, 2, true, err, sizeof(err));
    REQUIRE(s);
    CHECK(strcmp(s, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n") == 0);
    free(s);
    chat_message bad[] = { { "wizard", "x" } };
    CHECK(chat_apply(TOK[0], bad, 1, true, err, sizeof(err)) == NULL);
    CHECK_STR_CONTAINS(err, "wizard");
    CHECK_EQ_INT(tokenizer_bos_id(TOK[0]), 128000);
    CHECK_EQ_INT(tokenizer_eos_id(TOK[0]), 128001);
}

static void test_chat_qwen3(void) {
    if (!TOK[1]) return;
    CHECK_EQ_INT(tokenizer_chat_format(TOK[1]), CHAT_FORMAT_CHATML);
    chat_message m[] = { { "system", "S" }, { "user", "Q1" }, { "assistant", "A1" }, { "user", "Q2" } };
    char err[256];
    char *s = chat_apply(TOK[1], m, 4, true, err, sizeof(err));
    REQUIRE(s);
    CHECK(strcmp(s, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                    "<|im_start|>assistant\n") == 0);
    free(s);
    /* Qwen3 writes an empty think block before the final assistant answer */
    chat_message m2[] = { { "user", "Q" }, { "assistant", "A" } };
    s = chat_apply(TOK[1], m2, 2, false, err, sizeof(err));
    REQUIRE(s);
    CHECK(strcmp(s, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n") == 0);
    free(s);
    CHECK_EQ_INT(tokenizer_eos_id(TOK[1]), 151645);
    CHECK_EQ_INT(tokenizer_bos_id(TOK[1]), -1);
}

static void test_llama2_basics(void) {
    if (!TOK[2]) return;
    char err[256];
    /* no chat template in this tokenizer_config.json: a clear refusal */
    chat_message m[] = { { "user", "hi" } };
    CHECK(chat_apply(TOK[2], m, 1, true, err, sizeof(err)) == NULL);
    CHECK_STR_CONTAINS(err, "no chat template");
    int32_t *ids;
    int n;
    REQUIRE(tokenizer_encode(TOK[2], "Hello world", 11, true, &ids, &n, err, sizeof(err)) == 0);
    REQUIRE(n == 3);
    CHECK(ids[0] == 1);   /* the post-processor's <s> */
    CHECK(strcmp(tokenizer_id_to_token(TOK[2], ids[1]), "\xe2\x96\x81Hello") == 0);
    CHECK(strcmp(tokenizer_id_to_token(TOK[2], ids[2]), "\xe2\x96\x81world") == 0);
    free(ids);
}

static void test_speed_16k(void) {
    if (!TOK[0]) return;
    size_t cap = 1 << 20, len = 0;
    char *text = xmalloc(cap);
    int total = 0;
    char err[256];
    /* a long prompt: the corpus strings and the training essay, repeated */
    while (total < 16384) {
        const cJSON *s;
        cJSON_ArrayForEach(s, CORPUS) {
            size_t l = strlen(s->valuestring);
            if (len + l + 2 >= cap) break;
            memcpy(text + len, s->valuestring, l);
            len += l;
            text[len++] = '\n';
        }
        size_t l = strlen(TOKENIZER_CORPUS);
        if (len + l >= cap) break;
        memcpy(text + len, TOKENIZER_CORPUS, l);
        len += l;
        int32_t *ids;
        REQUIRE(tokenizer_encode(TOK[0], text, len, false, &ids, &total, err, sizeof(err)) == 0);
        free(ids);
    }
    double best = 1e9;
    int n = 0;
    for (int rep = 0; rep < 3; rep++) {
        int32_t *ids;
        double t0 = time_now_s();
        REQUIRE(tokenizer_encode(TOK[0], text, len, false, &ids, &n, err, sizeof(err)) == 0);
        double dt = time_now_s() - t0;
        if (dt < best) best = dt;
        free(ids);
    }
    fprintf(stderr, "llama3: encoded %d tokens (%zu bytes) in %.2f ms\n", n, len, best * 1e3);
    CHECK(n >= 16384);
    CHECKF(best < 0.100 || getenv("PDSERVE_SLOW_TESTS"), "16k-token encode took %.1f ms", best * 1e3);
    free(text);
}

/* ---- the shortcuts change no id ------------------------------------------------------- */
static void put_utf8(char *s, size_t *n, uint32_t cp) {
    if (cp < 0x80) s[(*n)++] = (char)cp;
    else if (cp < 0x800) { s[(*n)++] = (char)(0xc0 | (cp >> 6)); s[(*n)++] = (char)(0x80 | (cp & 0x3f)); }
    else if (cp < 0x10000) {
        s[(*n)++] = (char)(0xe0 | (cp >> 12)); s[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
        s[(*n)++] = (char)(0x80 | (cp & 0x3f));
    } else {
        s[(*n)++] = (char)(0xf0 | (cp >> 18)); s[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3f));
        s[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3f)); s[(*n)++] = (char)(0x80 | (cp & 0x3f));
    }
}

/* Random text of about `bytes` bytes: runs of one character class (letters, digits,
 * punctuation, whitespace, Latin-1, combining marks, Greek, Cyrillic, Hebrew/Arabic,
 * Devanagari, Thai, Hangul jamo, CJK, Hangul, private use, emoji, astral planes),
 * mostly short, now and then hundreds long; sometimes a stray continuation byte. */
static char *random_text(pd_rng *r, size_t bytes) {
    static const uint32_t CLS[][2] = {
        {0x61, 0x7a}, {0x41, 0x5a}, {0x30, 0x39}, {0x20, 0x2f}, {0x3a, 0x40}, {0x7b, 0x7e}, {0x09, 0x0d},
        {0xa0, 0x17f}, {0x300, 0x36f}, {0x370, 0x3ff}, {0x400, 0x4ff}, {0x590, 0x6ff}, {0x900, 0x97f},
        {0xe00, 0xe7f}, {0x1100, 0x11ff}, {0x2000, 0x206f}, {0x4e00, 0x9fff}, {0xac00, 0xd7a3},
        {0xe000, 0xe0ff}, {0xff00, 0xffef}, {0x1f300, 0x1faff}, {0x20000, 0x2a6df}};
    char *s = xmalloc(bytes + 2048);
    size_t n = 0;
    while (n < bytes) {
        uint64_t k = rng_next(r) % 100;
        if (k < 2) { s[n++] = (char)(0x80 + rng_next(r) % 0x40); continue; }
        int c = k < 50 ? (int)(rng_next(r) % 3) : (int)(rng_next(r) % PD_ARRAY_LEN(CLS));
        int len = rng_next(r) % 25 == 0 ? 1 + (int)(rng_next(r) % 300) : 1 + (int)(rng_next(r) % 8);
        for (int i = 0; i < len; i++)
            put_utf8(s, &n, CLS[c][0] + (uint32_t)(rng_next(r) % (CLS[c][1] - CLS[c][0] + 1)));
        if (rng_next(r) % 3 == 0) s[n++] = ' ';
    }
    s[n] = 0;
    return s;
}

static void test_shortcuts_exact(void) {
    pd_rng r;
    rng_seed(&r, 7);
    char err[256];
    for (int k = 0; k < 3; k++) {
        if (!TOK[k]) continue;
        tokenizer plain = *TOK[k];   /* a shallow copy, never freed */
        plain.reference = true;
        int diffs = 0;
        for (int i = 0; i < 40; i++) {
            char *s = random_text(&r, i < 10 ? 200 : 20000);
            size_t len = strlen(s);
            int32_t *a, *b;
            int na, nb;
            REQUIRE(tokenizer_encode(TOK[k], s, len, false, &a, &na, err, sizeof(err)) == 0);
            REQUIRE(tokenizer_encode(&plain, s, len, false, &b, &nb, err, sizeof(err)) == 0);
            if (na != nb || memcmp(a, b, sizeof(int32_t) * (size_t)na) != 0) {
                if (diffs++ == 0) {
                    fprintf(stderr, "%s: text %d encodes differently with and without the shortcuts\n", NAMES[k], i);
                    print_ids("fast", a, na);
                    print_ids("plain", b, nb);
                }
            }
            free(a); free(b); free(s);
        }
        CHECKF(diffs == 0, "%s: %d of 40 random texts differ", NAMES[k], diffs);
    }
}

int main(void) {
    int have = 0;
    for (int k = 0; k < 3; k++) have += (TOK[k] = load_named(NAMES[k])) != NULL;
    if (!have) TEST_SKIP("tokenizer files absent: run scripts/fetch-test-tokenizers.sh");
    char path[2048];
    snprintf(path, sizeof(path), "%s/tests/fixtures/tokenizer/corpus.json", test_source_dir());
    CORPUS = load_json_file(path);
    if (!CORPUS) TEST_SKIP("tests/fixtures/tokenizer/corpus.json absent");
    TEST_RUN(test_fixtures);
    TEST_RUN(test_roundtrip);
    TEST_RUN(test_detok_stream);
    TEST_RUN(test_chat_llama3);
    TEST_RUN(test_chat_qwen3);
    TEST_RUN(test_llama2_basics);
    TEST_RUN(test_speed_16k);
    TEST_RUN(test_shortcuts_exact);
    for (int k = 0; k < 3; k++) tokenizer_free(TOK[k]);
    cJSON_Delete(CORPUS);
    int rc = TEST_END();
    if (rc == 0 && FIXTURES_SEEN == 0)
        TEST_SKIP("properties passed, but no golden fixture (tests/fixtures/tokenizer/NAME.json): "
                  "run make_fixtures.py where Hugging Face tokenizers is installed");
    return rc;
}
