/* test_model_config.c: config.json parsing against the published configs in
 * tests/fixtures/configs (both transformers 4 and 5 spellings), the error for each
 * kind of bad field, the presets (shapes and parameter counts of the published
 * models), and model_files_open on presets and dummy directories. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/model.h"
#include "test.h"
#include "util/util.h"

static int parse_fixture(const char *name, model_config *c, char *err, size_t errlen) {
    char dir[1024], path[1200];
    snprintf(dir, sizeof dir, "%s/tests/fixtures/configs", test_source_dir());
    path_join(path, sizeof path, dir, name);
    size_t len;
    char *text = util_read_file(path, &len, err, errlen);
    if (!text) return -1;
    int rc = model_config_parse(text, len, name, c, err, errlen);
    free(text);
    return rc;
}

static int parse_str(const char *json, model_config *c, char *err, size_t errlen) {
    return model_config_parse(json, strlen(json), "config.json", c, err, errlen);
}

static void test_llama2(void) {
    model_config c;
    char err[512] = "";
    REQUIRE(parse_fixture("llama-2-7b.json", &c, err, sizeof err) == 0 || (fprintf(stderr, "%s\n", err), 0));
    CHECK(strcmp(c.architecture, "LlamaForCausalLM") == 0);
    CHECK(strcmp(c.model_type, "llama") == 0);
    CHECK_EQ_INT(c.family, MODEL_FAMILY_LLAMA);
    CHECK_EQ_INT(c.n_layers, 32);
    CHECK_EQ_INT(c.dim, 4096);
    CHECK_EQ_INT(c.ffn_dim, 11008);
    CHECK_EQ_INT(c.n_heads, 32);
    CHECK_EQ_INT(c.n_kv_heads, 32);
    CHECK_EQ_INT(c.head_dim, 128);
    CHECK_EQ_INT(c.vocab_size, 32000);
    CHECK_EQ_INT(c.max_position_embeddings, 4096);
    CHECK(c.norm_eps == 1e-5f);
    CHECK(c.rope_theta == 10000.0f);
    CHECK_EQ_INT(c.rope_type, ROPE_TYPE_DEFAULT);
    CHECK(!c.tie_word_embeddings && !c.attention_bias && !c.qk_norm);
    CHECK_EQ_INT(c.bos_token_id, 1);
    CHECK_EQ_INT(c.n_eos, 1);
    CHECK_EQ_INT(c.eos_token_ids[0], 2);
    CHECK_EQ_INT(c.torch_dtype, DTYPE_F16);
    CHECK_EQ_INT(c.sliding_window, 0);
    CHECK_EQ_INT(model_param_count(&c), 6738415616ull); /* Llama-2-7b: 6.74B */
}

static void check_llama31_8b(const model_config *c) {
    CHECK_EQ_INT(c->n_layers, 32);
    CHECK_EQ_INT(c->dim, 4096);
    CHECK_EQ_INT(c->ffn_dim, 14336);
    CHECK_EQ_INT(c->n_heads, 32);
    CHECK_EQ_INT(c->n_kv_heads, 8);
    CHECK_EQ_INT(c->head_dim, 128);
    CHECK_EQ_INT(c->vocab_size, 128256);
    CHECK_EQ_INT(c->max_position_embeddings, 131072);
    CHECK(c->rope_theta == 500000.0f);
    CHECK_EQ_INT(c->rope_type, ROPE_TYPE_LLAMA3);
    CHECK(c->rope_factor == 8.0f);
    CHECK(c->rope_low_freq_factor == 1.0f);
    CHECK(c->rope_high_freq_factor == 4.0f);
    CHECK_EQ_INT(c->rope_original_max_position, 8192);
    CHECK(!c->tie_word_embeddings && !c->attention_bias && !c->qk_norm);
    CHECK_EQ_INT(c->bos_token_id, 128000);
    CHECK_EQ_INT(c->torch_dtype, DTYPE_BF16);
    CHECK_EQ_INT(model_param_count(c), 8030261248ull);
}

static void test_llama31(void) {
    model_config c;
    char err[512] = "";
    REQUIRE(parse_fixture("llama-3.1-8b.json", &c, err, sizeof err) == 0);
    check_llama31_8b(&c);
    CHECK_EQ_INT(c.n_eos, 1);
    CHECK_EQ_INT(c.eos_token_ids[0], 128001);
    REQUIRE(parse_fixture("llama-3.1-8b-instruct.json", &c, err, sizeof err) == 0);
    check_llama31_8b(&c);
    CHECK_EQ_INT(c.n_eos, 3);
    CHECK_EQ_INT(c.eos_token_ids[0], 128001);
    CHECK_EQ_INT(c.eos_token_ids[1], 128008);
    CHECK_EQ_INT(c.eos_token_ids[2], 128009);
}

static void check_llama32_1b(const model_config *c) {
    CHECK_EQ_INT(c->n_layers, 16);
    CHECK_EQ_INT(c->dim, 2048);
    CHECK_EQ_INT(c->ffn_dim, 8192);
    CHECK_EQ_INT(c->n_heads, 32);
    CHECK_EQ_INT(c->n_kv_heads, 8);
    CHECK_EQ_INT(c->head_dim, 64);
    CHECK_EQ_INT(c->vocab_size, 128256);
    CHECK(c->tie_word_embeddings);
    CHECK_EQ_INT(c->rope_type, ROPE_TYPE_LLAMA3);
    CHECK(c->rope_theta == 500000.0f);
    CHECK(c->rope_factor == 32.0f);
    CHECK(c->rope_low_freq_factor == 1.0f);
    CHECK(c->rope_high_freq_factor == 4.0f);
    CHECK_EQ_INT(c->rope_original_max_position, 8192);
    CHECK_EQ_INT(c->torch_dtype, DTYPE_BF16);
    CHECK_EQ_INT(model_param_count(c), 1235814400ull); /* embedding counted once */
    CHECK_EQ_INT(model_kv_bytes_per_token(c, 2), 2 * 16 * 8 * 64 * 2);
}

/* transformers 4 and 5 spellings of the same checkpoint give the same config. */
static void test_llama32_both_spellings(void) {
    model_config a, b;
    char err[512] = "";
    REQUIRE(parse_fixture("llama-3.2-1b.json", &a, err, sizeof err) == 0);
    check_llama32_1b(&a);
    REQUIRE(parse_fixture("llama-3.2-1b-tf5.json", &b, err, sizeof err) == 0 ||
            (fprintf(stderr, "%s\n", err), 0));
    check_llama32_1b(&b);
    CHECK(memcmp(&a, &b, sizeof a) == 0);
}

static void test_mistral(void) {
    model_config a, b;
    char err[512] = "";
    REQUIRE(parse_fixture("mistral-7b-v0.1.json", &a, err, sizeof err) == 0);
    CHECK_EQ_INT(a.family, MODEL_FAMILY_MISTRAL);
    CHECK(strcmp(a.architecture, "MistralForCausalLM") == 0);
    CHECK_EQ_INT(a.n_layers, 32);
    CHECK_EQ_INT(a.n_kv_heads, 8);
    CHECK_EQ_INT(a.head_dim, 128);
    CHECK_EQ_INT(a.ffn_dim, 14336);
    CHECK_EQ_INT(a.vocab_size, 32000);
    CHECK_EQ_INT(a.max_position_embeddings, 32768);
    CHECK_EQ_INT(a.sliding_window, 4096);
    CHECK(!a.attention_bias && !a.qk_norm);
    CHECK_EQ_INT(model_param_count(&a), 7241732096ull); /* Mistral 7B: 7.24B */
    REQUIRE(parse_fixture("mistral-7b-v0.1-tf5.json", &b, err, sizeof err) == 0 ||
            (fprintf(stderr, "%s\n", err), 0));
    CHECK(memcmp(&a, &b, sizeof a) == 0); /* "head_dim": null means C / H */
}

static void test_qwen25(void) {
    model_config c, p;
    char err[512] = "";
    REQUIRE(parse_fixture("qwen2.5-7b.json", &c, err, sizeof err) == 0);
    CHECK_EQ_INT(c.family, MODEL_FAMILY_QWEN2);
    CHECK(c.attention_bias); /* Qwen2 always has q/k/v bias, no key says so */
    CHECK(!c.qk_norm);
    CHECK_EQ_INT(c.n_layers, 28);
    CHECK_EQ_INT(c.dim, 3584);
    CHECK_EQ_INT(c.ffn_dim, 18944);
    CHECK_EQ_INT(c.n_heads, 28);
    CHECK_EQ_INT(c.n_kv_heads, 4);
    CHECK_EQ_INT(c.head_dim, 128);
    CHECK_EQ_INT(c.vocab_size, 152064);
    CHECK(c.rope_theta == 1000000.0f);
    CHECK(c.norm_eps == 1e-6f);
    CHECK_EQ_INT(c.sliding_window, 0); /* use_sliding_window: false */
    CHECK_EQ_INT(model_param_count(&c), 7615616512ull); /* Qwen2.5-7B: 7.62B */
    REQUIRE(model_preset("qwen2.5-7b", &p, err, sizeof err) == 0);
    CHECK(memcmp(&c, &p, sizeof c) == 0);
}

static void test_qwen3(void) {
    model_config a, b;
    char err[512] = "";
    REQUIRE(parse_fixture("qwen3-8b.json", &a, err, sizeof err) == 0);
    CHECK_EQ_INT(a.family, MODEL_FAMILY_QWEN3);
    CHECK(a.qk_norm);
    CHECK(!a.attention_bias);
    CHECK_EQ_INT(a.n_layers, 36);
    CHECK_EQ_INT(a.dim, 4096);
    CHECK_EQ_INT(a.head_dim, 128);
    CHECK_EQ_INT(a.n_heads, 32);
    CHECK_EQ_INT(a.n_kv_heads, 8);
    CHECK_EQ_INT(a.vocab_size, 151936);
    CHECK_EQ_INT(a.max_position_embeddings, 40960);
    CHECK(a.rope_theta == 1000000.0f);
    CHECK_EQ_INT(a.bos_token_id, 151643);
    CHECK_EQ_INT(a.eos_token_ids[0], 151645);
    CHECK_EQ_INT(model_param_count(&a), 8190735360ull); /* Qwen3-8B: 8.19B */
    REQUIRE(parse_fixture("qwen3-8b-tf5.json", &b, err, sizeof err) == 0 ||
            (fprintf(stderr, "%s\n", err), 0));
    CHECK(memcmp(&a, &b, sizeof a) == 0);
}

static void test_linear_rope(void) {
    model_config c;
    char err[512] = "";
    REQUIRE(parse_fixture("vicuna-7b-v1.5-16k.json", &c, err, sizeof err) == 0);
    CHECK_EQ_INT(c.rope_type, ROPE_TYPE_LINEAR);
    CHECK(c.rope_factor == 4.0f);
    CHECK(c.rope_theta == 10000.0f);
    const char *def = "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                      "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100,"
                      "\"max_position_embeddings\":64,\"rope_scaling\":{\"rope_type\":\"default\"}}";
    REQUIRE(parse_str(def, &c, err, sizeof err) == 0);
    CHECK_EQ_INT(c.rope_type, ROPE_TYPE_DEFAULT);
}

/* Absent optional keys take Hugging Face's defaults. */
static void test_defaults(void) {
    model_config c;
    char err[512] = "";
    const char *j = "{\"model_type\":\"llama\",\"hidden_size\":256,\"intermediate_size\":512,"
                    "\"num_hidden_layers\":3,\"num_attention_heads\":8,\"vocab_size\":1000,"
                    "\"max_position_embeddings\":512}";
    REQUIRE(parse_str(j, &c, err, sizeof err) == 0 || (fprintf(stderr, "%s\n", err), 0));
    CHECK(strcmp(c.architecture, "LlamaForCausalLM") == 0); /* from model_type */
    CHECK_EQ_INT(c.n_kv_heads, 8);
    CHECK_EQ_INT(c.head_dim, 32);
    CHECK(c.rope_theta == 10000.0f);
    CHECK_EQ_INT(c.bos_token_id, -1);
    CHECK_EQ_INT(c.n_eos, 0);
    CHECK_EQ_INT(c.torch_dtype, DTYPE_BF16);
    CHECK(!c.tie_word_embeddings);
    const char *bias = "{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":true,\"hidden_size\":64,"
                       "\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                       "\"num_key_value_heads\":2,\"vocab_size\":100,\"max_position_embeddings\":64}";
    REQUIRE(parse_str(bias, &c, err, sizeof err) == 0);
    CHECK(c.attention_bias);
    CHECK(weight_role_present(&c, WEIGHT_K_BIAS));
}

/* A config that is valid, with one field replaced. */
static const char *BASE =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"vocab_size\":512,"
    "\"max_position_embeddings\":2048,\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,"
    "\"torch_dtype\":\"bfloat16\",\"bos_token_id\":1,\"eos_token_id\":2,\"tie_word_embeddings\":false%s}";

static void expect_error(const char *extra_or_json, bool whole, const char *needle1, const char *needle2) {
    char json[4096], err[512] = "";
    if (whole) snprintf(json, sizeof json, "%s", extra_or_json);
    else snprintf(json, sizeof json, BASE, extra_or_json);
    model_config c;
    int rc = model_config_parse(json, strlen(json), "config.json", &c, err, sizeof err);
    CHECKF(rc == -1, "accepted: %s", json);
    CHECK_STR_CONTAINS(err, "config.json");
    CHECK_STR_CONTAINS(err, needle1);
    if (needle2) CHECK_STR_CONTAINS(err, needle2);
}

static void test_errors(void) {
    char json[4096], err[512];
    model_config c;
    snprintf(json, sizeof json, BASE, "");
    REQUIRE(model_config_parse(json, strlen(json), "config.json", &c, err, sizeof err) == 0);
    /* later duplicate keys: cJSON finds the first, so override by appending is not
     * possible; the bad field comes as an extra key instead where needed. */
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":0}", true,
                 "config.json: field 'hidden_size' must be a positive integer", NULL);
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":\"4096\"}", true,
                 "field 'hidden_size' must be a positive integer", "string");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64.5}", true,
                 "field 'hidden_size' must be a positive integer", NULL);
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":4}", true,
                 "field 'vocab_size' is missing", NULL);
    expect_error("{\"architectures\":[\"GPT2LMHeadModel\"],\"hidden_size\":64}", true, "GPT2LMHeadModel",
                 "not supported");
    expect_error("{\"model_type\":\"gemma\"}", true, "model_type", "gemma");
    expect_error("{}", true, "field 'architectures' is missing", NULL);
    expect_error("{\"architectures\":[]}", true, "field 'architectures'", NULL);
    expect_error("{\"hidden_size\": 64,", true, "not valid JSON", NULL);
    expect_error("", true, "not valid JSON", NULL);
    expect_error("[1, 2]", true, "top level", NULL);
    snprintf(json, sizeof json, BASE, "} trailing");
    expect_error(json, true, "not valid JSON", NULL);
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                 "\"num_hidden_layers\":2000,\"num_attention_heads\":4,\"vocab_size\":512,"
                 "\"max_position_embeddings\":2048}", true, "field 'num_hidden_layers'", "limit 1024");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":1e30,"
                 "\"max_position_embeddings\":2048}", true, "field 'vocab_size'", "limit");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":3,"
                 "\"vocab_size\":512,\"max_position_embeddings\":2048}", true, "'num_key_value_heads' (3)",
                 "multiple");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":60,\"intermediate_size\":128,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":8,\"vocab_size\":512,"
                 "\"max_position_embeddings\":2048}", true, "field 'hidden_size'", "head_dim");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"head_dim\":15,\"vocab_size\":512,"
                 "\"max_position_embeddings\":2048}", true, "field 'head_dim'", "even");
    expect_error(",\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4.0}", false,
                 "field 'rope_scaling.rope_type'", "yarn");
    expect_error(",\"rope_scaling\":{\"type\":\"dynamic\",\"factor\":4.0}", false,
                 "field 'rope_scaling.type'", "dynamic");
    expect_error(",\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\"high_freq_factor\":4.0,"
                 "\"original_max_position_embeddings\":8192}", false,
                 "field 'rope_scaling.low_freq_factor' is missing", NULL);
    expect_error(",\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":-2}", false,
                 "field 'rope_scaling.factor'", NULL);
    expect_error(",\"rope_scaling\":{\"factor\":2.0}", false, "field 'rope_scaling.rope_type' is missing", NULL);
    expect_error(",\"rope_scaling\":\"llama3\"", false, "field 'rope_scaling'", NULL);
    expect_error(",\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":500000.0,\"factor\":8}", false,
                 "field 'rope_parameters.low_freq_factor' is missing", NULL);
    expect_error(",\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":-1}", false,
                 "field 'rope_parameters.rope_theta'", NULL);
    expect_error(",\"dtype\":\"int8\"", false, "field 'dtype'", "int8");
    expect_error(",\"hidden_act\":\"gelu\"", false, "field 'hidden_act'", "gelu");
    expect_error(",\"mlp_bias\":true", false, "field 'mlp_bias'", NULL);
    expect_error(",\"attention_bias\":\"yes\"", false, "field 'attention_bias'", NULL);
    expect_error(",\"sliding_window\":-5", false, "field 'sliding_window'", NULL);
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":512,"
                 "\"max_position_embeddings\":2048,\"eos_token_id\":[1,2,3,4,5,6,7,8,9]}", true,
                 "field 'eos_token_id'", "more than 8");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":512,"
                 "\"max_position_embeddings\":2048,\"eos_token_id\":[1,600]}", true,
                 "field 'eos_token_id'", "[0, 512)");
    expect_error("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                 "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":512,"
                 "\"max_position_embeddings\":2048,\"bos_token_id\":\"<s>\"}", true,
                 "field 'bos_token_id'", NULL);
    /* The name passed in is the one in the message. */
    CHECK(model_config_parse("{}", 2, "models/x/config.json", &c, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "models/x/config.json: field 'architectures'");
    /* Length is honoured: the text after len is never read. */
    const char *cut = "{\"architectures\":[\"LlamaForCausalLM\"]} garbage";
    CHECK(model_config_parse(cut, 38, "config.json", &c, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "field 'hidden_size' is missing");
}

static void test_presets(void) {
    char err[512] = "", line[512];
    model_config c, f;
    const char *const *names = model_preset_names();
    int n = 0;
    for (; names[n]; n++) {
        REQUIRE(model_preset(names[n], &c, err, sizeof err) == 0);
        CHECKF(c.dim > 0 && c.n_layers > 0 && c.n_heads % c.n_kv_heads == 0 && c.n_eos >= 1 &&
                   c.head_dim % 2 == 0 && c.eos_token_ids[0] < c.vocab_size,
               "preset %s", names[n]);
        model_config_describe(&c, line, sizeof line);
        CHECK_STR_CONTAINS(line, c.architecture);
    }
    CHECK_EQ_INT(n, 9);
    REQUIRE(model_preset("llama-3.1-8b", &c, err, sizeof err) == 0);
    REQUIRE(parse_fixture("llama-3.1-8b.json", &f, err, sizeof err) == 0);
    CHECK(memcmp(&c, &f, sizeof c) == 0);
    REQUIRE(model_preset("llama-3.2-1b", &c, err, sizeof err) == 0);
    REQUIRE(parse_fixture("llama-3.2-1b.json", &f, err, sizeof err) == 0);
    CHECK(memcmp(&c, &f, sizeof c) == 0);
    REQUIRE(model_preset("llama-3.2-3b", &c, err, sizeof err) == 0);
    CHECK(c.tie_word_embeddings);
    CHECK_EQ_INT(c.head_dim, 128);
    CHECK_EQ_INT(model_param_count(&c), 3212749824ull);
    REQUIRE(model_preset("llama-3.1-70b", &c, err, sizeof err) == 0);
    CHECK_EQ_INT(model_param_count(&c), 70553706496ull);
    CHECK_EQ_INT(model_kv_bytes_per_token(&c, 2), 327680); /* 2*80*8*128*2 */
    model_config_describe(&c, line, sizeof line);
    CHECK_STR_CONTAINS(line, "L=80 C=8192 F=28672 H=64 K=8 D=128 V=128256");
    CHECK_STR_CONTAINS(line, "llama3");

    REQUIRE(model_preset("tiny-llama", &c, err, sizeof err) == 0);
    CHECK(c.n_layers == 2 && c.dim == 64 && c.ffn_dim == 128 && c.n_heads == 4 && c.n_kv_heads == 2 &&
          c.head_dim == 16 && c.vocab_size == 512 && c.max_position_embeddings == 2048);
    CHECK_EQ_INT(c.rope_type, ROPE_TYPE_LLAMA3);
    REQUIRE(model_preset("tiny-qwen3", &c, err, sizeof err) == 0);
    CHECK(c.qk_norm && c.head_dim == 32 && c.dim == 64 && c.n_heads == 4 && c.n_kv_heads == 2);
    CHECK_EQ_INT(c.family, MODEL_FAMILY_QWEN3);
    REQUIRE(model_preset("tiny-qwen2", &c, err, sizeof err) == 0);
    CHECK(c.attention_bias && !c.qk_norm);
    REQUIRE(model_preset("small-llama", &c, err, sizeof err) == 0);
    CHECK(c.n_layers == 4 && c.dim == 256 && c.ffn_dim == 768 && c.n_heads == 8 && c.n_kv_heads == 4 &&
          c.head_dim == 32 && c.vocab_size == 2048 && c.max_position_embeddings == 4096);

    CHECK(model_preset("llama-9", &c, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "llama-9");
    CHECK_STR_CONTAINS(err, "tiny-llama");
}

static void test_weight_roles(void) {
    model_config c;
    char err[256], name[128];
    int64_t s[2];
    REQUIRE(model_preset("tiny-qwen3", &c, err, sizeof err) == 0);
    weight_role_name(WEIGHT_Q, 1, name, sizeof name);
    CHECK(strcmp(name, "model.layers.1.self_attn.q_proj.weight") == 0);
    weight_role_name(WEIGHT_K_NORM, 0, name, sizeof name);
    CHECK(strcmp(name, "model.layers.0.self_attn.k_norm.weight") == 0);
    weight_role_name(WEIGHT_EMBED, 0, name, sizeof name);
    CHECK(strcmp(name, "model.embed_tokens.weight") == 0);
    CHECK_EQ_INT(weight_role_shape(&c, WEIGHT_Q, s), 2);
    CHECK(s[0] == 128 && s[1] == 64); /* H*D = 4*32 != C */
    CHECK_EQ_INT(weight_role_shape(&c, WEIGHT_O, s), 2);
    CHECK(s[0] == 64 && s[1] == 128);
    CHECK_EQ_INT(weight_role_shape(&c, WEIGHT_Q_NORM, s), 1);
    CHECK(s[0] == 32);
    CHECK(weight_role_present(&c, WEIGHT_Q_NORM));
    CHECK(!weight_role_present(&c, WEIGHT_LM_HEAD)); /* tied */
    CHECK(!weight_role_present(&c, WEIGHT_Q_BIAS));
    CHECK(weight_role_per_layer(WEIGHT_DOWN) && !weight_role_per_layer(WEIGHT_FINAL_NORM));
}

static void test_files_open(void) {
    model_files m;
    char err[512] = "";
    REQUIRE(model_files_open("preset:tiny-llama", "dummy", &m, err, sizeof err) == 0);
    CHECK(m.weights == NULL);
    CHECK(m.dir[0] == 0);
    CHECK_EQ_INT(m.config.dim, 64);
    model_files_close(&m);
    REQUIRE(model_files_open("preset:llama-3.1-8b", "auto", &m, err, sizeof err) == 0);
    CHECK(m.weights == NULL);
    model_files_close(&m);
    CHECK(model_files_open("preset:nope", "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "nope");
    CHECK(model_files_open("preset:tiny-llama", "gguf", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "gguf");

    /* A directory with only config.json: dummy works, auto says where weights are missing. */
    char dir[1200], path[1300];
    snprintf(dir, sizeof dir, "%s/test_model_config.XXXXXX", test_build_dir());
    REQUIRE(mkdtemp(dir) != NULL);
    char fixture[1200], *text;
    size_t len;
    snprintf(fixture, sizeof fixture, "%s/tests/fixtures/configs/qwen3-8b.json", test_source_dir());
    REQUIRE((text = util_read_file(fixture, &len, err, sizeof err)) != NULL);
    path_join(path, sizeof path, dir, "config.json");
    REQUIRE(util_write_file(path, text, len, err, sizeof err) == 0);
    free(text);
    REQUIRE(model_files_open(dir, "dummy", &m, err, sizeof err) == 0);
    CHECK(m.weights == NULL);
    CHECK(strcmp(m.dir, dir) == 0);
    CHECK_EQ_INT(m.config.family, MODEL_FAMILY_QWEN3);
    model_files_close(&m);
    CHECK(model_files_open(dir, "auto", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "model.safetensors");
    /* A broken config.json is named with its path. */
    const char *bert = "{\"architectures\":[\"BertModel\"]}";
    REQUIRE(util_write_file(path, bert, strlen(bert), err, sizeof err) == 0);
    CHECK(model_files_open(dir, "dummy", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "config.json");
    CHECK_STR_CONTAINS(err, "BertModel");
    unlink(path);
    rmdir(dir);
    CHECK(model_files_open(dir, "dummy", &m, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, "not a directory");
}

int main(void) {
    TEST_RUN(test_llama2);
    TEST_RUN(test_llama31);
    TEST_RUN(test_llama32_both_spellings);
    TEST_RUN(test_mistral);
    TEST_RUN(test_qwen25);
    TEST_RUN(test_qwen3);
    TEST_RUN(test_linear_rope);
    TEST_RUN(test_defaults);
    TEST_RUN(test_errors);
    TEST_RUN(test_presets);
    TEST_RUN(test_weight_roles);
    TEST_RUN(test_files_open);
    return TEST_END();
}
