/* cmd_make_model.c: `pdserve make-model`, which writes a small model directory the
 * way a Hugging Face checkpoint looks (config.json, model.safetensors,
 * tokenizer.json, tokenizer_config.json) with random weights and a byte-level BPE
 * tokenizer trained here on a built-in text. It is the project's own stand-in for
 * a downloaded model: every code path that reads real checkpoints reads it. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "cli/cli.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "util/util.h"

extern const char TOKENIZER_CORPUS[];

/* Writes config.json in the keys transformers writes for a Llama model. */
static char *config_to_json(const model_config *c, const char *dtype_str, int bos, int eos) {
    cJSON *o = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(o, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString(c->architecture));
    cJSON_AddStringToObject(o, "model_type", c->model_type);
    cJSON_AddNumberToObject(o, "hidden_size", c->dim);
    cJSON_AddNumberToObject(o, "intermediate_size", c->ffn_dim);
    cJSON_AddNumberToObject(o, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(o, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(o, "num_key_value_heads", c->n_kv_heads);
    cJSON_AddNumberToObject(o, "head_dim", c->head_dim);
    cJSON_AddNumberToObject(o, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(o, "max_position_embeddings", c->max_position_embeddings);
    cJSON_AddNumberToObject(o, "rms_norm_eps", c->norm_eps);
    cJSON_AddNumberToObject(o, "rope_theta", c->rope_theta);
    if (c->rope_type == ROPE_TYPE_LLAMA3) {
        cJSON *rs = cJSON_AddObjectToObject(o, "rope_scaling");
        cJSON_AddStringToObject(rs, "rope_type", "llama3");
        cJSON_AddNumberToObject(rs, "factor", c->rope_factor);
        cJSON_AddNumberToObject(rs, "low_freq_factor", c->rope_low_freq_factor);
        cJSON_AddNumberToObject(rs, "high_freq_factor", c->rope_high_freq_factor);
        cJSON_AddNumberToObject(rs, "original_max_position_embeddings", c->rope_original_max_position);
    }
    cJSON_AddBoolToObject(o, "tie_word_embeddings", c->tie_word_embeddings);
    cJSON_AddBoolToObject(o, "attention_bias", c->attention_bias);
    cJSON_AddNumberToObject(o, "bos_token_id", bos);
    cJSON_AddNumberToObject(o, "eos_token_id", eos);
    cJSON_AddStringToObject(o, "hidden_act", "silu");
    cJSON_AddStringToObject(o, "torch_dtype", dtype_str);
    char *s = cJSON_Print(o);
    cJSON_Delete(o);
    return s;
}

/* Random weights for every tensor the config needs, normal(0, 0.02), norms 1. */
static int write_weights(const char *path, const model_config *c, dtype dt, uint64_t seed, char *err,
                         size_t errlen) {
    int cap = 4 + WEIGHT_ROLE_COUNT * c->n_layers, n = 0;
    st_tensor *ts = xcalloc((size_t)cap, sizeof *ts);
    pd_rng rng;
    rng_seed(&rng, seed);
    for (int r = 0; r < WEIGHT_ROLE_COUNT; r++) {
        if (!weight_role_present(c, (weight_role)r)) continue;
        int layers = weight_role_per_layer((weight_role)r) ? c->n_layers : 1;
        for (int l = 0; l < layers; l++) {
            st_tensor *t = &ts[n++];
            char name[256];
            weight_role_name((weight_role)r, l, name, sizeof name);
            t->name = xstrdup(name);
            t->dtype = dt;
            t->ndim = weight_role_shape(c, (weight_role)r, t->shape);
            size_t count = 1;
            for (int d = 0; d < t->ndim; d++) count *= (size_t)t->shape[d];
            t->nbytes = count * dtype_size(dt);
            void *data = xmalloc(t->nbytes);
            bool is_norm = r == WEIGHT_ATTN_NORM || r == WEIGHT_MLP_NORM || r == WEIGHT_FINAL_NORM ||
                           r == WEIGHT_Q_NORM || r == WEIGHT_K_NORM;
            bool is_bias = r == WEIGHT_Q_BIAS || r == WEIGHT_K_BIAS || r == WEIGHT_V_BIAS;
            for (size_t i = 0; i < count; i++) {
                float v = is_norm ? 1.0f : is_bias ? 0.0f : 0.02f * rng_normal(&rng);
                if (dt == DTYPE_BF16) ((uint16_t *)data)[i] = f32_to_bf16(v);
                else if (dt == DTYPE_F16) ((uint16_t *)data)[i] = f32_to_f16(v);
                else ((float *)data)[i] = v;
            }
            t->data = data;
        }
    }
    int rc = st_write_file(path, ts, n, err, errlen);
    for (int i = 0; i < n; i++) {
        free(ts[i].name);
        free((void *)ts[i].data);
    }
    free(ts);
    return rc;
}

int cmd_make_model(int argc, char **argv) {
    const char *out = NULL, *preset = "small-llama", *dtype_s = "bf16";
    int seed = 0;
    bool force = false;
    cli_opt opts[] = {
        {"out", OPT_STRING, &out, "directory to write (created)", "DIR"},
        {"preset", OPT_STRING, &preset, "shape to use (default small-llama; see below)", "NAME"},
        {"dtype", OPT_STRING, &dtype_s, "weight dtype: bf16 (default), f16, f32", "T"},
        {"seed", OPT_INT, &seed, "seed of the random weights (default 0)", "S"},
        {"force", OPT_FLAG, &force, "overwrite an existing model directory", NULL},
    };
    const char *usage =
        "usage: pdserve make-model --out DIR [--preset NAME] [--dtype bf16|f16|f32] [--seed S]\n\n"
        "Writes a model directory like a Hugging Face checkpoint: config.json, model.safetensors\n"
        "(random weights, normal(0, 0.02)), and a byte-level BPE tokenizer trained on a built-in\n"
        "English text with the preset's vocabulary size, with a Llama 3 chat template. The\n"
        "weights are random: the text it generates is meaningless, the work it does is real.";
    const char *pos[1];
    int n_pos;
    bool help;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), usage, pos, 0, &n_pos, &help) != 0) return 2;
    if (help) {
        printf("\npresets:");
        for (const char *const *p = model_preset_names(); *p; p++) printf(" %s", *p);
        printf("\n");
        return 0;
    }
    if (!out) {
        fprintf(stderr, "pdserve make-model: --out DIR is required\n");
        return 2;
    }
    dtype dt = !strcmp(dtype_s, "bf16") ? DTYPE_BF16 : !strcmp(dtype_s, "f16") ? DTYPE_F16
             : !strcmp(dtype_s, "f32") ? DTYPE_F32 : DTYPE_COUNT;
    if (dt == DTYPE_COUNT) {
        fprintf(stderr, "pdserve make-model: --dtype must be bf16, f16 or f32, not '%s'\n", dtype_s);
        return 2;
    }
    char err[512];
    model_config c;
    if (model_preset(preset, &c, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve make-model: %s\n", err);
        return 2;
    }
    char path[2048];
    path_join(path, sizeof path, out, "config.json");
    if (util_file_exists(path) && !force) {
        log_info("make-model: %s already holds a model (use --force to overwrite)", out);
        return 0;
    }
    if (mkdir(out, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "pdserve make-model: cannot create %s: %s\n", out, strerror(errno));
        return 1;
    }
    /* The tokenizer first: the config takes its vocabulary size and special ids. */
    char *tok_json = NULL, *tok_cfg = NULL;
    if (tokenizer_train_bytelevel(TOKENIZER_CORPUS, strlen(TOKENIZER_CORPUS), c.vocab_size, &tok_json,
                                  &tok_cfg, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve make-model: training the tokenizer: %s\n", err);
        return 1;
    }
    tokenizer *tok = NULL;
    if (tokenizer_load_text(tok_json, strlen(tok_json), tok_cfg, strlen(tok_cfg), "tokenizer.json", &tok,
                            err, sizeof err) != 0) {
        fprintf(stderr, "pdserve make-model: the trained tokenizer does not load: %s\n", err);
        return 1;
    }
    c.vocab_size = tokenizer_vocab_size(tok);
    int bos = tokenizer_bos_id(tok), eos = tokenizer_eos_id(tok);
    tokenizer_free(tok);
    int rc = 1;
    char *cfg_json = config_to_json(&c, dt == DTYPE_BF16 ? "bfloat16" : dt == DTYPE_F16 ? "float16" : "float32",
                                    bos, eos);
    if (util_write_file(path_join(path, sizeof path, out, "tokenizer.json"), tok_json, strlen(tok_json), err,
                        sizeof err) ||
        util_write_file(path_join(path, sizeof path, out, "tokenizer_config.json"), tok_cfg, strlen(tok_cfg),
                        err, sizeof err) ||
        write_weights(path_join(path, sizeof path, out, "model.safetensors"), &c, dt, (uint64_t)seed, err,
                      sizeof err) ||
        util_write_file(path_join(path, sizeof path, out, "config.json"), cfg_json, strlen(cfg_json), err,
                        sizeof err)) {
        fprintf(stderr, "pdserve make-model: %s\n", err);
    } else {
        char desc[256];
        model_config_describe(&c, desc, sizeof desc);
        log_info("make-model: wrote %s (%s, %.1fM parameters, %s)", out, desc,
                 (double)model_param_count(&c) / 1e6, dtype_s);
        rc = 0;
    }
    free(cfg_json);
    free(tok_json);
    free(tok_cfg);
    return rc;
}
