/* test_safetensors.c: safetensors writing and reading (round trip, alignment, the
 * header layout Hugging Face uses), every kind of broken file giving an error that
 * names the file and the tensor, sharded checkpoints through
 * model.safetensors.index.json, model_check_tensors on a whole tiny model, and
 * exact bf16 / f16 conversions. Files go to a fresh folder under the build dir. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model.h"
#include "test.h"
#include "util/util.h"

static char tmpdir[1200];

static void make_tmpdir(void) {
    snprintf(tmpdir, sizeof tmpdir, "%s/test_safetensors.XXXXXX", test_build_dir());
    if (!mkdtemp(tmpdir)) {
        fprintf(stderr, "cannot create %s\n", tmpdir);
        exit(1);
    }
}

/* A fresh sub-folder of tmpdir. */
static void subdir(const char *name, char *out, size_t cap) {
    path_join(out, cap, tmpdir, name);
    mkdir(out, 0755);
}

/* Writes 8-byte length + header (as given, unpadded) + data_len bytes of 0x11. */
static void write_raw(const char *path, const char *header, size_t data_len) {
    size_t hl = strlen(header), total = 8 + hl + data_len;
    uint8_t *buf = malloc(total);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    memset(buf + 8 + hl, 0x11, data_len);
    char err[256];
    if (util_write_file(path, buf, total, err, sizeof err)) fprintf(stderr, "%s\n", err);
    free(buf);
}

/* Parses a header given as text + data length, in memory. */
static int parse_mem(const char *header, size_t data_len, char *err, size_t errlen, st_tensor **t, int *n) {
    size_t hl = strlen(header), total = 8 + hl + data_len;
    uint8_t *buf = calloc(1, total);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    int rc = st_parse_header(buf, total, total, "bad.safetensors", t, n, err, errlen);
    free(buf);
    return rc;
}

static void expect_bad_header(const char *header, size_t data_len, const char *needle1, const char *needle2) {
    char err[512] = "";
    st_tensor *t = NULL;
    int n = 0;
    int rc = parse_mem(header, data_len, err, sizeof err, &t, &n);
    CHECKF(rc == -1, "accepted: %s", header);
    CHECK(t == NULL && n == 0);
    CHECK_STR_CONTAINS(err, "bad.safetensors");
    CHECK_STR_CONTAINS(err, needle1);
    if (needle2) CHECK_STR_CONTAINS(err, needle2);
    if (rc == 0) st_tensors_free(t, n);
}

static void test_round_trip(void) {
    float a[6] = {1.0f, -2.0f, 0.5f, 3.25f, -0.125f, 100.0f};
    uint16_t b[5], h[3];
    for (int i = 0; i < 5; i++) b[i] = f32_to_bf16((float)i - 1.5f);
    for (int i = 0; i < 3; i++) h[i] = f32_to_f16((float)i * 0.25f);
    st_tensor t[4] = {
        {.name = "odd.f16", .dtype = DTYPE_F16, .ndim = 1, .shape = {3}, .data = h},
        {.name = "w.bf16", .dtype = DTYPE_BF16, .ndim = 2, .shape = {1, 5}, .data = b},
        {.name = "x \"quoted\\", .dtype = DTYPE_F32, .ndim = 2, .shape = {2, 3}, .data = a},
        {.name = "empty", .dtype = DTYPE_F32, .ndim = 2, .shape = {0, 4}, .data = NULL},
    };
    char path[1300], err[512] = "";
    path_join(path, sizeof path, tmpdir, "rt.safetensors");
    REQUIRE(st_write_file(path, t, 4, err, sizeof err) == 0 || (fprintf(stderr, "%s\n", err), 0));

    /* The layout Hugging Face writes: header length a multiple of 8, space padding. */
    size_t len;
    char *raw = util_read_file(path, &len, err, sizeof err);
    REQUIRE(raw);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | (uint8_t)raw[i];
    CHECK_EQ_INT(hl % 8, 0);
    CHECK_EQ_INT(len, 8 + hl + sizeof a + sizeof b + sizeof h);
    CHECK(raw[8] == '{');
    CHECK(raw[8 + hl - 1] == ' ' || raw[8 + hl - 1] == '}');
    free(raw);

    st_set *s;
    REQUIRE(st_open_file(path, &s, err, sizeof err) == 0 || (fprintf(stderr, "%s\n", err), 0));
    CHECK_EQ_INT(st_count(s), 4);
    CHECK(strcmp(st_file_name(s, 0), "rt.safetensors") == 0);
    const st_tensor *x = st_find(s, "x \"quoted\\");
    REQUIRE(x);
    CHECK_EQ_INT(x->dtype, DTYPE_F32);
    CHECK(x->ndim == 2 && x->shape[0] == 2 && x->shape[1] == 3);
    CHECK_EQ_INT(x->nbytes, sizeof a);
    CHECK(memcmp(x->data, a, sizeof a) == 0);
    CHECK((uintptr_t)x->data % 4 == 0); /* f32 first, header padded: aligned */
    const st_tensor *y = st_find(s, "w.bf16");
    REQUIRE(y);
    CHECK(y->dtype == DTYPE_BF16 && y->ndim == 2 && y->shape[1] == 5);
    CHECK(memcmp(y->data, b, sizeof b) == 0);
    const st_tensor *z = st_find(s, "odd.f16");
    REQUIRE(z);
    CHECK(memcmp(z->data, h, sizeof h) == 0);
    const st_tensor *e = st_find(s, "empty");
    REQUIRE(e);
    CHECK(e->nbytes == 0 && e->shape[0] == 0 && e->shape[1] == 4);
    CHECK(st_find(s, "nope") == NULL);
    /* st_get walks all, sorted by name. */
    for (int i = 1; i < st_count(s); i++) CHECK(strcmp(st_get(s, i - 1)->name, st_get(s, i)->name) < 0);
    float back[6];
    st_convert_f32(back, x->data, x->dtype, 6);
    CHECK(memcmp(back, a, sizeof a) == 0);
    st_close(s);
    st_close(NULL);

    /* Writing refuses what it cannot describe. */
    st_tensor bad = {.name = "i", .dtype = DTYPE_I32, .ndim = 1, .shape = {2}, .data = a};
    CHECK(st_write_file(path, &bad, 1, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "'i'");
}

static void test_header_ok_cases(void) {
    char err[512] = "";
    st_tensor *t;
    int n;
    /* __metadata__ ignored, key order free, scalar (0-dim) tensor, a hole between tensors. */
    const char *h = "{\"b\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[8,12]},"
                    "\"__metadata__\":{\"format\":\"pt\",\"x\":\"y\"},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}   ";
    REQUIRE(parse_mem(h, 12, err, sizeof err, &t, &n) == 0 || (fprintf(stderr, "%s\n", err), 0));
    CHECK_EQ_INT(n, 2);
    CHECK(strcmp(t[0].name, "a") == 0 && t[0].ndim == 0 && t[0].nbytes == 4 && t[0].data == NULL);
    CHECK(strcmp(t[1].name, "b") == 0 && t[1].offset == 8 && t[1].nbytes == 4);
    st_tensors_free(t, n);
    REQUIRE(parse_mem("{}", 0, err, sizeof err, &t, &n) == 0);
    CHECK_EQ_INT(n, 0);
    st_tensors_free(t, n);
}

static void test_header_errors(void) {
    char err[512];
    st_tensor *t;
    int n;
    /* Too short for the length field. */
    uint8_t tiny[5] = {1, 0, 0, 0, 0};
    CHECK(st_parse_header(tiny, 5, 5, "bad.safetensors", &t, &n, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "bad.safetensors: file truncated");
    /* Header length past the end of the file. */
    uint8_t past[16] = {200, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    CHECK(st_parse_header(past, 16, 16, "bad.safetensors", &t, &n, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "bad.safetensors: header length 200 runs past the end of the file");
    /* Header length absurd (2^63). */
    uint8_t huge[16] = {0, 0, 0, 0, 0, 0, 0, 0x80, '{', '}'};
    CHECK(st_parse_header(huge, 16, 16, "bad.safetensors", &t, &n, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "above the limit");

    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}", 16, "not valid JSON", NULL);
    expect_bad_header("not json at all", 0, "not valid JSON", NULL);
    expect_bad_header("[1,2]", 0, "must be a JSON object", NULL);
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}} x", 16, "not valid JSON", NULL);
    /* Offsets out of range of the data section. */
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,32]}}", 16, "tensor 'w'",
                      "past the end of the data");
    /* end - begin != numel * size. */
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,12]}}", 16, "tensor 'w'",
                      "need 16");
    expect_bad_header("{\"w\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,24]}}", 24, "tensor 'w'",
                      "need 12");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,0]}}", 16, "tensor 'w'",
                      "data_offsets");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0]}}", 16, "tensor 'w'",
                      "data_offsets");
    /* Overlapping tensors. */
    expect_bad_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                      16, "overlaps", "'a'");
    expect_bad_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                      8, "overlaps", NULL);
    /* Unsupported and unknown dtypes, named with the tensor. */
    expect_bad_header("{\"pos\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16, "tensor 'pos'", "I64");
    expect_bad_header("{\"q\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "tensor 'q'",
                      "F8_E4M3");
    expect_bad_header("{\"q\":{\"dtype\":\"F17\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "tensor 'q'", "unknown");
    expect_bad_header("{\"q\":{\"dtype\":7,\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "tensor 'q'", "dtype");
    /* Too many dims, bad dims, huge numbers. */
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "tensor 'w'",
                      "more than 4 dimensions");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "tensor 'w'", "shape");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "tensor 'w'", "shape");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", 4, "tensor 'w'", "shape");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}}",
                      4, "tensor 'w'", "too large");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[18446744073709551616,18446744073709551620]}}",
                      4, "tensor 'w'", "data_offsets");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":\"4\",\"data_offsets\":[0,4]}}", 4, "tensor 'w'", "shape");
    expect_bad_header("{\"w\":[1,2]}", 4, "tensor 'w'", "object");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                      "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                      8, "tensor 'w'", "twice");
}

/* ---- a whole tiny model ---------------------------------------------------------------- */

static const char *TINY_LLAMA_CONFIG =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":64,"
    "\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
    "\"num_key_value_heads\":2,\"head_dim\":16,\"vocab_size\":512,\"max_position_embeddings\":2048,"
    "\"rms_norm_eps\":1e-05,\"rope_theta\":500000.0,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,"
    "\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192},"
    "\"tie_word_embeddings\":%s,\"torch_dtype\":\"bfloat16\",\"bos_token_id\":1,\"eos_token_id\":2}";

typedef struct tensor_list {
    st_tensor t[64];
    char names[64][96];
    int n;
} tensor_list;

/* Every tensor a config needs, in bf16, filled with a pattern; `skip` (a name or
 * NULL) is left out, and `reshape` (a name or NULL) gets its dims swapped. */
static void model_tensors(const model_config *c, tensor_list *L, const char *skip, const char *reshape,
                          uint16_t *pool) {
    L->n = 0;
    for (int r = 0; r < WEIGHT_ROLE_COUNT; r++) {
        if (!weight_role_present(c, (weight_role)r)) continue;
        int layers = weight_role_per_layer((weight_role)r) ? c->n_layers : 1;
        for (int l = 0; l < layers; l++) {
            st_tensor *t = &L->t[L->n];
            weight_role_name((weight_role)r, l, L->names[L->n], sizeof L->names[0]);
            if (skip && strcmp(skip, L->names[L->n]) == 0) continue;
            memset(t, 0, sizeof *t);
            t->name = L->names[L->n];
            t->dtype = DTYPE_BF16;
            t->ndim = weight_role_shape(c, (weight_role)r, t->shape);
            if (reshape && strcmp(reshape, t->name) == 0 && t->ndim == 2) {
                int64_t s0 = t->shape[0];
                t->shape[0] = t->shape[1];
                t->shape[1] = s0;
            }
            t->data = pool;
            L->n++;
        }
    }
}

/* A checkpoint folder `name` of tiny-llama with the given damage. */
static void write_model(const char *name, bool tied, const char *skip, const char *reshape, bool extra_head,
                        char *dir, size_t cap) {
    static uint16_t pool[512 * 64];
    for (size_t i = 0; i < PD_ARRAY_LEN(pool); i++) pool[i] = f32_to_bf16((float)(i % 17) * 0.125f - 1.0f);
    subdir(name, dir, cap);
    char path[1400], cfg[2048], err[512];
    snprintf(cfg, sizeof cfg, TINY_LLAMA_CONFIG, tied ? "true" : "false");
    path_join(path, sizeof path, dir, "config.json");
    util_write_file(path, cfg, strlen(cfg), err, sizeof err);
    model_config c;
    if (model_config_parse(cfg, strlen(cfg), "config.json", &c, err, sizeof err)) fprintf(stderr, "%s\n", err);
    tensor_list L;
    model_tensors(&c, &L, skip, reshape, pool);
    if (extra_head) {
        st_tensor *t = &L.t[L.n++];
        memset(t, 0, sizeof *t);
        t->name = "lm_head.weight";
        t->dtype = DTYPE_BF16;
        t->ndim = 2;
        t->shape[0] = 3; /* a wrong shape: must not matter when tied */
        t->shape[1] = 5;
        t->data = pool;
    }
    path_join(path, sizeof path, dir, "model.safetensors");
    if (st_write_file(path, L.t, L.n, err, sizeof err)) fprintf(stderr, "%s\n", err);
}

static void test_model_check(void) {
    char dir[1300], err[512] = "";
    model_files m;
    write_model("good", false, NULL, NULL, false, dir, sizeof dir);
    REQUIRE(model_files_open(dir, "auto", &m, err, sizeof err) == 0 || (fprintf(stderr, "%s\n", err), 0));
    REQUIRE(m.weights);
    CHECK_EQ_INT(st_count(m.weights), 1 + 2 * 9 + 1 + 1);
    const st_tensor *emb = st_find(m.weights, "model.embed_tokens.weight");
    REQUIRE(emb);
    CHECK(emb->shape[0] == 512 && emb->shape[1] == 64 && emb->dtype == DTYPE_BF16);
    float v[3];
    st_convert_f32(v, emb->data, emb->dtype, 3);
    CHECK(v[0] == -1.0f && v[1] == -0.875f && v[2] == -0.75f);
    model_files_close(&m);
    CHECK(m.weights == NULL);
    REQUIRE(model_files_open(dir, "dummy", &m, err, sizeof err) == 0);
    CHECK(m.weights == NULL);
    model_files_close(&m);

    write_model("missing", false, "model.layers.1.mlp.up_proj.weight", NULL, false, dir, sizeof dir);
    CHECK(model_files_open(dir, "safetensors", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' is missing");

    write_model("shape", false, NULL, "model.layers.0.mlp.up_proj.weight", false, dir, sizeof dir);
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has shape [64, 128], expected [128, 64]");

    write_model("nohead", false, "lm_head.weight", NULL, false, dir, sizeof dir);
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "'lm_head.weight' is missing");

    /* Tied: no lm_head needed, and a stray one (even of a wrong shape) is ignored. */
    write_model("tied", true, NULL, NULL, true, dir, sizeof dir);
    REQUIRE(model_files_open(dir, "auto", &m, err, sizeof err) == 0 || (fprintf(stderr, "%s\n", err), 0));
    CHECK(m.config.tie_word_embeddings);
    model_files_close(&m);

    /* A wrong dtype in an otherwise fine model is named with its tensor. */
    char path[1400];
    path_join(path, sizeof path, dir, "model.safetensors");
    write_raw(path, "{\"model.embed_tokens.weight\":{\"dtype\":\"I64\",\"shape\":[512,64],\"data_offsets\":[0,262144]}}",
              262144);
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors: tensor 'model.embed_tokens.weight'");
    CHECK_STR_CONTAINS(err, "I64");
}

static void test_truncated_file(void) {
    char dir[1300], path[1400], err[512] = "";
    model_files m;
    write_model("trunc", false, NULL, NULL, false, dir, sizeof dir);
    path_join(path, sizeof path, dir, "model.safetensors");
    struct stat st;
    REQUIRE(stat(path, &st) == 0);
    REQUIRE(truncate(path, st.st_size - 100) == 0);
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors: tensor '");
    CHECK_STR_CONTAINS(err, "past the end");
    /* Cut inside the header. */
    REQUIRE(truncate(path, 20) == 0);
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors: header length");
    REQUIRE(truncate(path, 3) == 0);
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors: file truncated");
}

/* ---- sharded checkpoints ------------------------------------------------------------- */

static void write_index(const char *dir, const char *text) {
    char path[1400], err[256];
    path_join(path, sizeof path, dir, "model.safetensors.index.json");
    util_write_file(path, text, strlen(text), err, sizeof err);
}

/* tiny-llama split in two shards: embeddings + layer 0 in the first, the rest in the second. */
static void write_sharded(const char *name, char *dir, size_t cap) {
    static uint16_t pool[512 * 64];
    for (size_t i = 0; i < PD_ARRAY_LEN(pool); i++) pool[i] = (uint16_t)(0x3f80 + i % 7);
    subdir(name, dir, cap);
    char path[1400], cfg[2048], err[512];
    snprintf(cfg, sizeof cfg, TINY_LLAMA_CONFIG, "false");
    path_join(path, sizeof path, dir, "config.json");
    util_write_file(path, cfg, strlen(cfg), err, sizeof err);
    model_config c;
    model_config_parse(cfg, strlen(cfg), "config.json", &c, err, sizeof err);
    tensor_list L;
    model_tensors(&c, &L, NULL, NULL, pool);
    st_tensor a[64], b[64];
    int na = 0, nb = 0;
    char *index = malloc(65536);
    size_t at = (size_t)snprintf(index, 65536, "{\"metadata\":{\"total_size\":0},\"weight_map\":{");
    for (int i = 0; i < L.n; i++) {
        bool first = strncmp(L.t[i].name, "model.embed", 11) == 0 || strncmp(L.t[i].name, "model.layers.0.", 15) == 0;
        if (first) a[na++] = L.t[i];
        else b[nb++] = L.t[i];
        at += (size_t)snprintf(index + at, 65536 - at, "%s\"%s\":\"model-0000%d-of-00002.safetensors\"", i ? "," : "",
                               L.t[i].name, first ? 1 : 2);
    }
    snprintf(index + at, 65536 - at, "}}");
    path_join(path, sizeof path, dir, "model-00001-of-00002.safetensors");
    st_write_file(path, a, na, err, sizeof err);
    path_join(path, sizeof path, dir, "model-00002-of-00002.safetensors");
    st_write_file(path, b, nb, err, sizeof err);
    write_index(dir, index);
    free(index);
}

static void test_sharded(void) {
    char dir[1300], err[512] = "";
    model_files m;
    write_sharded("sharded", dir, sizeof dir);
    REQUIRE(model_files_open(dir, "auto", &m, err, sizeof err) == 0 || (fprintf(stderr, "%s\n", err), 0));
    CHECK_EQ_INT(st_file_count(m.weights), 2);
    CHECK_EQ_INT(st_count(m.weights), 21);
    const st_tensor *e = st_find(m.weights, "model.embed_tokens.weight");
    const st_tensor *h = st_find(m.weights, "lm_head.weight");
    const st_tensor *q1 = st_find(m.weights, "model.layers.1.self_attn.q_proj.weight");
    REQUIRE(e && h && q1);
    CHECK(strcmp(st_file_name(m.weights, e->file_index), "model-00001-of-00002.safetensors") == 0);
    CHECK(strcmp(st_file_name(m.weights, h->file_index), "model-00002-of-00002.safetensors") == 0);
    CHECK(strcmp(st_file_name(m.weights, q1->file_index), "model-00002-of-00002.safetensors") == 0);
    uint16_t v;
    memcpy(&v, (const uint8_t *)q1->data + 2, 2);
    CHECK_EQ_INT(v, 0x3f81);
    model_files_close(&m);

    /* The index names a shard that does not exist. */
    write_index(dir, "{\"weight_map\":{\"model.embed_tokens.weight\":\"model-00003-of-00003.safetensors\"}}");
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model-00003-of-00003.safetensors");
    /* The index puts a tensor in the wrong shard. */
    write_index(dir, "{\"weight_map\":{\"model.embed_tokens.weight\":\"model-00002-of-00002.safetensors\","
                     "\"lm_head.weight\":\"model-00001-of-00002.safetensors\"}}");
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors.index.json: tensor 'model.embed_tokens.weight'");
    /* Only one shard listed: the tensors of the other are missing for the model. */
    write_index(dir, "{\"weight_map\":{\"model.embed_tokens.weight\":\"model-00001-of-00002.safetensors\"}}");
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors.index.json: tensor 'model.layers.1.");
    CHECK_STR_CONTAINS(err, "is missing");
    /* Paths outside the folder and malformed indexes. */
    write_index(dir, "{\"weight_map\":{\"model.embed_tokens.weight\":\"../model-00001-of-00002.safetensors\"}}");
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors.index.json: field 'weight_map'");
    write_index(dir, "{\"weight_map\":{}}");
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors.index.json: field 'weight_map'");
    write_index(dir, "{\"weight_map\":");
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors.index.json: not valid JSON");

    /* st_index_parse: each shard once, in first-seen order. */
    st_index ix;
    const char *j = "{\"weight_map\":{\"a\":\"s1\",\"b\":\"s2\",\"c\":\"s1\"}}";
    REQUIRE(st_index_parse(j, strlen(j), "i.json", &ix, err, sizeof err) == 0);
    CHECK_EQ_INT(ix.n_shards, 2);
    CHECK_EQ_INT(ix.n_tensors, 3);
    CHECK(strcmp(ix.shards[0], "s1") == 0 && strcmp(ix.shards[1], "s2") == 0);
    CHECK(ix.shard_of[0] == 0 && ix.shard_of[1] == 1 && ix.shard_of[2] == 0);
    st_index_free(&ix);
}

/* ---- conversions ------------------------------------------------------------------------ */

static void test_conversions(void) {
    /* Values exact in bf16: f32 -> bf16 -> f32 gives them back bit for bit. */
    const float bf_exact[] = {0.0f, -0.0f, 1.0f, -2.5f, 0.15625f, 3.0f, 0x1p-133f /* smallest subnormal */,
                              65280.0f, 0x1.fep127f, -0x1.8p-126f, INFINITY, -INFINITY};
    for (size_t i = 0; i < PD_ARRAY_LEN(bf_exact); i++) {
        float x = bf_exact[i];
        uint16_t b;
        float y;
        st_convert_bf16(&b, &x, DTYPE_F32, 1);
        st_convert_f32(&y, &b, DTYPE_BF16, 1);
        CHECKF(memcmp(&x, &y, 4) == 0, "bf16 round trip of %g gave %g", x, y);
    }
    /* Values exact in f16, including the largest, the smallest normal and a subnormal. */
    const float f16_exact[] = {1.0f, -0.5f, 65504.0f, 0x1p-14f, 0x1p-24f, 0x1.ffcp-1f, -1024.0f, 0.0f};
    uint16_t h[PD_ARRAY_LEN(f16_exact)];
    for (size_t i = 0; i < PD_ARRAY_LEN(f16_exact); i++) h[i] = f32_to_f16(f16_exact[i]);
    float back[PD_ARRAY_LEN(f16_exact)];
    st_convert_f32(back, h, DTYPE_F16, PD_ARRAY_LEN(h));
    for (size_t i = 0; i < PD_ARRAY_LEN(h); i++)
        CHECKF(back[i] == f16_exact[i], "f16 of %g gave %g", f16_exact[i], back[i]);
    CHECK_EQ_INT(h[2], 0x7bff);
    CHECK_EQ_INT(h[4], 0x0001);
    /* f16 -> bf16 for values exact in both. */
    uint16_t hb[3] = {f32_to_f16(1.5f), f32_to_f16(-0.25f), f32_to_f16(96.0f)}, bb[3];
    st_convert_bf16(bb, hb, DTYPE_F16, 3);
    CHECK(bb[0] == f32_to_bf16(1.5f) && bb[1] == f32_to_bf16(-0.25f) && bb[2] == f32_to_bf16(96.0f));
    CHECK_EQ_INT(bb[0], 0x3fc0);
    /* bf16 -> bf16 is a copy; f32 -> bf16 rounds to nearest even. */
    uint16_t same[2] = {0x1234, 0xabcd}, out[2];
    st_convert_bf16(out, same, DTYPE_BF16, 2);
    CHECK(out[0] == 0x1234 && out[1] == 0xabcd);
    float ties[2] = {1.00390625f /* 1 + 2^-8: tie, to even 1.0 */, 1.01171875f /* 1 + 3*2^-8: to 1.015625 */};
    st_convert_bf16(out, ties, DTYPE_F32, 2);
    CHECK_EQ_INT(out[0], 0x3f80);
    CHECK_EQ_INT(out[1], 0x3f82);
    /* Long and unaligned sources (more than one internal block of 256). */
    enum { N = 1000 };
    uint8_t *raw = malloc(N * 4 + 1);
    float *ref = malloc(N * 4), *got = malloc(N * 4);
    uint16_t *bf = malloc(N * 2);
    for (int i = 0; i < N; i++) {
        ref[i] = (float)(i % 256 - 128) * 0.25f; /* exact in bf16: at most 8 significant bits */
        memcpy(raw + 1 + 4 * i, &ref[i], 4);
    }
    st_convert_f32(got, raw + 1, DTYPE_F32, N);
    CHECK(memcmp(got, ref, N * 4) == 0);
    st_convert_bf16(bf, raw + 1, DTYPE_F32, N);
    st_convert_f32(got, bf, DTYPE_BF16, N);
    CHECK(memcmp(got, ref, N * 4) == 0);
    free(raw);
    free(ref);
    free(got);
    free(bf);
}

int main(void) {
    make_tmpdir();
    TEST_RUN(test_round_trip);
    TEST_RUN(test_header_ok_cases);
    TEST_RUN(test_header_errors);
    TEST_RUN(test_model_check);
    TEST_RUN(test_truncated_file);
    TEST_RUN(test_sharded);
    TEST_RUN(test_conversions);
    int rc = TEST_END();
    if (rc == 0) {
        char cmd[1400];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    }
    return rc;
}
