/* config.c: reads the config.json that a Hugging Face checkpoint of the Llama family
 * carries (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3) into a model_config.
 *
 * Both spellings that exist in the wild are accepted: transformers 4 writes
 * rope_theta + rope_scaling + torch_dtype, transformers 5 writes rope_parameters
 * (with rope_theta inside) + dtype. Runs once at start-up on untrusted text: every
 * field is type-checked and capped, every error names the file and the field, and
 * no input makes it crash (fuzzed by fuzz/fuzz_config.c). */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model/model.h"
#include "util/util.h"

/* Caps far above any published model, low enough that products of them fit in
 * 64 bits (param counts, KV sizes) and that nobody allocates terabytes by typo. */
#define CFG_MAX_DIM (1 << 20)     /* C, F, H*D, K*D */
#define CFG_MAX_LAYERS 1024       /* L */
#define CFG_MAX_VOCAB (1 << 22)   /* V */
#define CFG_MAX_HEAD_DIM 4096     /* D */
#define CFG_MAX_POSITIONS (1 << 24)

typedef struct cfg_ctx {
    const char *file; /* for messages */
    char *err;
    size_t errlen;
} cfg_ctx;

typedef struct family_entry {
    const char *architecture;
    const char *model_type;
    model_family family;
} family_entry;

static const family_entry FAMILIES[] = {
    {"LlamaForCausalLM", "llama", MODEL_FAMILY_LLAMA},
    {"MistralForCausalLM", "mistral", MODEL_FAMILY_MISTRAL},
    {"Qwen2ForCausalLM", "qwen2", MODEL_FAMILY_QWEN2},
    {"Qwen3ForCausalLM", "qwen3", MODEL_FAMILY_QWEN3},
};
#define SUPPORTED_ARCHS "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"

/* ---- typed field readers --------------------------------------------------------
 * Each takes the object, a prefix for messages ("" or "rope_scaling."), the key, and
 * whether it is required. An absent or null field gives the default. Return 0 or -1
 * with ctx->err set. */

static const char *json_kind(const cJSON *it) {
    if (cJSON_IsString(it)) return "a string";
    if (cJSON_IsBool(it)) return "a boolean";
    if (cJSON_IsArray(it)) return "an array";
    if (cJSON_IsObject(it)) return "an object";
    if (cJSON_IsNumber(it)) return "a number";
    return "something else";
}

static const cJSON *field(const cJSON *obj, const char *key) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    return (it && !cJSON_IsNull(it)) ? it : NULL;
}

static int missing(cfg_ctx *x, const char *prefix, const char *key) {
    pd_errorf(x->err, x->errlen, "%s: field '%s%s' is missing", x->file, prefix, key);
    return -1;
}

static int get_int(cfg_ctx *x, const cJSON *obj, const char *prefix, const char *key, bool required,
                   int def, int min, int max, int *out) {
    const cJSON *it = field(obj, key);
    if (!it) {
        if (required) return missing(x, prefix, key);
        *out = def;
        return 0;
    }
    double v = cJSON_IsNumber(it) ? it->valuedouble : NAN;
    if (!isfinite(v) || v != floor(v) || v < min) {
        const char *what = min >= 1 ? "a positive integer" : "a non-negative integer";
        if (cJSON_IsNumber(it))
            pd_errorf(x->err, x->errlen, "%s: field '%s%s' must be %s (got %g)", x->file, prefix, key,
                      what, v);
        else
            pd_errorf(x->err, x->errlen, "%s: field '%s%s' must be %s (got %s)", x->file, prefix, key,
                      what, json_kind(it));
        return -1;
    }
    if (v > max) {
        pd_errorf(x->err, x->errlen, "%s: field '%s%s' is %g, above the limit %d", x->file, prefix,
                  key, v, max);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* A finite number in (0, max]. */
static int get_pos_float(cfg_ctx *x, const cJSON *obj, const char *prefix, const char *key,
                         bool required, double def, double max, float *out) {
    const cJSON *it = field(obj, key);
    if (!it) {
        if (required) return missing(x, prefix, key);
        *out = (float)def;
        return 0;
    }
    double v = cJSON_IsNumber(it) ? it->valuedouble : NAN;
    if (!isfinite(v) || v <= 0 || v > max) {
        if (cJSON_IsNumber(it))
            pd_errorf(x->err, x->errlen, "%s: field '%s%s' must be a positive number up to %g (got %g)",
                      x->file, prefix, key, max, v);
        else
            pd_errorf(x->err, x->errlen, "%s: field '%s%s' must be a positive number (got %s)",
                      x->file, prefix, key, json_kind(it));
        return -1;
    }
    *out = (float)v;
    return 0;
}

static int get_bool(cfg_ctx *x, const cJSON *obj, const char *key, bool def, bool *out) {
    const cJSON *it = field(obj, key);
    if (!it) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(it)) {
        pd_errorf(x->err, x->errlen, "%s: field '%s' must be true or false (got %s)", x->file, key,
                  json_kind(it));
        return -1;
    }
    *out = cJSON_IsTrue(it);
    return 0;
}

/* *out is NULL when absent or null. */
static int get_string(cfg_ctx *x, const cJSON *obj, const char *prefix, const char *key,
                      const char **out) {
    const cJSON *it = field(obj, key);
    *out = NULL;
    if (!it) return 0;
    if (!cJSON_IsString(it) || !it->valuestring) {
        pd_errorf(x->err, x->errlen, "%s: field '%s%s' must be a string (got %s)", x->file, prefix,
                  key, json_kind(it));
        return -1;
    }
    *out = it->valuestring;
    return 0;
}

/* ---- sections ------------------------------------------------------------------------ */

/* architectures[0] (or model_type when architectures is absent) -> family. */
static int parse_architecture(cfg_ctx *x, const cJSON *root, model_config *c) {
    const char *model_type = NULL, *arch = NULL;
    if (get_string(x, root, "", "model_type", &model_type)) return -1;
    const cJSON *archs = field(root, "architectures");
    if (archs) {
        const cJSON *first = cJSON_IsArray(archs) ? archs->child : NULL;
        if (!first || !cJSON_IsString(first) || !first->valuestring) {
            pd_errorf(x->err, x->errlen, "%s: field 'architectures' must be a non-empty list of strings",
                      x->file);
            return -1;
        }
        arch = first->valuestring;
    }
    if (!arch && !model_type) return missing(x, "", "architectures");
    for (size_t i = 0; i < PD_ARRAY_LEN(FAMILIES); i++) {
        const family_entry *f = &FAMILIES[i];
        if (arch ? strcmp(arch, f->architecture) == 0 : strcmp(model_type, f->model_type) == 0) {
            c->family = f->family;
            snprintf(c->architecture, sizeof c->architecture, "%s", f->architecture);
            snprintf(c->model_type, sizeof c->model_type, "%s", f->model_type);
            return 0;
        }
    }
    if (arch)
        pd_errorf(x->err, x->errlen, "%s: field 'architectures': architecture '%.64s' is not supported (supported: %s)",
                  x->file, arch, SUPPORTED_ARCHS);
    else
        pd_errorf(x->err, x->errlen, "%s: field 'model_type': model type '%.64s' is not supported (supported: llama, mistral, qwen2, qwen3)",
                  x->file, model_type);
    return -1;
}

/* Sizes and their consistency: C, F, L, H, K, D, V, max positions, eps. */
static int parse_shape(cfg_ctx *x, const cJSON *root, model_config *c) {
    if (get_int(x, root, "", "hidden_size", true, 0, 1, CFG_MAX_DIM, &c->dim) ||
        get_int(x, root, "", "intermediate_size", true, 0, 1, CFG_MAX_DIM, &c->ffn_dim) ||
        get_int(x, root, "", "num_hidden_layers", true, 0, 1, CFG_MAX_LAYERS, &c->n_layers) ||
        get_int(x, root, "", "num_attention_heads", true, 0, 1, CFG_MAX_DIM, &c->n_heads) ||
        get_int(x, root, "", "num_key_value_heads", false, c->n_heads, 1, CFG_MAX_DIM, &c->n_kv_heads) ||
        get_int(x, root, "", "vocab_size", true, 0, 1, CFG_MAX_VOCAB, &c->vocab_size) ||
        get_int(x, root, "", "max_position_embeddings", true, 0, 1, CFG_MAX_POSITIONS,
                &c->max_position_embeddings) ||
        get_pos_float(x, root, "", "rms_norm_eps", false, 1e-6, 0.5, &c->norm_eps))
        return -1;
    if (field(root, "head_dim")) {
        if (get_int(x, root, "", "head_dim", true, 0, 1, CFG_MAX_HEAD_DIM, &c->head_dim)) return -1;
    } else {
        if (c->dim % c->n_heads != 0) {
            pd_errorf(x->err, x->errlen, "%s: field 'hidden_size' (%d) is not divisible by 'num_attention_heads' (%d) and no 'head_dim' is given",
                      x->file, c->dim, c->n_heads);
            return -1;
        }
        c->head_dim = c->dim / c->n_heads;
    }
    if (c->head_dim % 2 != 0 || c->head_dim > CFG_MAX_HEAD_DIM) {
        pd_errorf(x->err, x->errlen, "%s: field 'head_dim' (%d) must be even and at most %d (rotary embedding works on pairs)",
                  x->file, c->head_dim, CFG_MAX_HEAD_DIM);
        return -1;
    }
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0) {
        pd_errorf(x->err, x->errlen, "%s: field 'num_attention_heads' (%d) must be a multiple of 'num_key_value_heads' (%d)",
                  x->file, c->n_heads, c->n_kv_heads);
        return -1;
    }
    if ((int64_t)c->n_heads * c->head_dim > CFG_MAX_DIM) {
        pd_errorf(x->err, x->errlen, "%s: field 'num_attention_heads' (%d) times 'head_dim' (%d) is above the limit %d",
                  x->file, c->n_heads, c->head_dim, CFG_MAX_DIM);
        return -1;
    }
    return 0;
}

/* rope_type / type of a rope_scaling or rope_parameters object; `prefix` names it. */
static int parse_rope_kind(cfg_ctx *x, const cJSON *obj, const char *prefix, bool type_required,
                           model_config *c) {
    const char *type = NULL, *key = "rope_type";
    if (get_string(x, obj, prefix, "rope_type", &type)) return -1;
    if (!type) {
        key = "type";
        if (get_string(x, obj, prefix, "type", &type)) return -1;
    }
    if (!type) {
        if (type_required) return missing(x, prefix, "rope_type");
        type = "default";
    }
    if (strcmp(type, "default") == 0) {
        c->rope_type = ROPE_TYPE_DEFAULT;
        return 0;
    }
    if (strcmp(type, "linear") == 0) {
        c->rope_type = ROPE_TYPE_LINEAR;
        return get_pos_float(x, obj, prefix, "factor", true, 0, 1e6, &c->rope_factor);
    }
    if (strcmp(type, "llama3") == 0) {
        c->rope_type = ROPE_TYPE_LLAMA3;
        if (get_pos_float(x, obj, prefix, "factor", true, 0, 1e6, &c->rope_factor) ||
            get_pos_float(x, obj, prefix, "low_freq_factor", true, 0, 1e6, &c->rope_low_freq_factor) ||
            get_pos_float(x, obj, prefix, "high_freq_factor", true, 0, 1e6, &c->rope_high_freq_factor) ||
            get_int(x, obj, prefix, "original_max_position_embeddings", true, 0, 1, CFG_MAX_POSITIONS,
                    &c->rope_original_max_position))
            return -1;
        if (c->rope_high_freq_factor <= c->rope_low_freq_factor) {
            pd_errorf(x->err, x->errlen, "%s: field '%shigh_freq_factor' (%g) must be larger than '%slow_freq_factor' (%g)",
                      x->file, prefix, c->rope_high_freq_factor, prefix, c->rope_low_freq_factor);
            return -1;
        }
        return 0;
    }
    pd_errorf(x->err, x->errlen, "%s: field '%s%s' value '%.32s' is not supported (default, linear, llama3)",
              x->file, prefix, key, type);
    return -1;
}

/* rope_theta and scaling, from either spelling. */
static int parse_rope(cfg_ctx *x, const cJSON *root, model_config *c) {
    c->rope_type = ROPE_TYPE_DEFAULT;
    c->rope_factor = 1.0f;
    if (get_pos_float(x, root, "", "rope_theta", false, 10000.0, 1e12, &c->rope_theta)) return -1;
    const cJSON *params = field(root, "rope_parameters");
    if (params) { /* transformers 5 */
        if (!cJSON_IsObject(params)) {
            pd_errorf(x->err, x->errlen, "%s: field 'rope_parameters' must be an object (got %s)",
                      x->file, json_kind(params));
            return -1;
        }
        if (get_pos_float(x, params, "rope_parameters.", "rope_theta", false, c->rope_theta, 1e12,
                          &c->rope_theta))
            return -1;
        return parse_rope_kind(x, params, "rope_parameters.", false, c);
    }
    const cJSON *scaling = field(root, "rope_scaling");
    if (!scaling) return 0;
    if (!cJSON_IsObject(scaling)) {
        pd_errorf(x->err, x->errlen, "%s: field 'rope_scaling' must be an object or null (got %s)",
                  x->file, json_kind(scaling));
        return -1;
    }
    return parse_rope_kind(x, scaling, "rope_scaling.", true, c);
}

static int parse_dtype(cfg_ctx *x, const cJSON *root, model_config *c) {
    const char *key = "dtype", *s = NULL;
    if (get_string(x, root, "", "dtype", &s)) return -1;
    if (!s) {
        key = "torch_dtype";
        if (get_string(x, root, "", "torch_dtype", &s)) return -1;
    }
    if (!s || strcmp(s, "bfloat16") == 0) c->torch_dtype = DTYPE_BF16;
    else if (strcmp(s, "float16") == 0 || strcmp(s, "half") == 0) c->torch_dtype = DTYPE_F16;
    else if (strcmp(s, "float32") == 0 || strcmp(s, "float") == 0) c->torch_dtype = DTYPE_F32;
    else {
        pd_errorf(x->err, x->errlen, "%s: field '%s' value '%.32s' is not supported (bfloat16, float16, float32)",
                  x->file, key, s);
        return -1;
    }
    return 0;
}

/* Feature flags: bias, q/k norm, tying, activation, sliding window. */
static int parse_features(cfg_ctx *x, const cJSON *root, model_config *c) {
    const char *act = NULL;
    bool mlp_bias = false, use_sw = true;
    if (get_string(x, root, "", "hidden_act", &act)) return -1;
    if (act && strcmp(act, "silu") != 0) {
        pd_errorf(x->err, x->errlen, "%s: field 'hidden_act' value '%.32s' is not supported (silu)",
                  x->file, act);
        return -1;
    }
    if (get_bool(x, root, "mlp_bias", false, &mlp_bias)) return -1;
    if (mlp_bias) {
        pd_errorf(x->err, x->errlen, "%s: field 'mlp_bias': MLP biases are not supported", x->file);
        return -1;
    }
    if (get_bool(x, root, "attention_bias", false, &c->attention_bias) ||
        get_bool(x, root, "tie_word_embeddings", false, &c->tie_word_embeddings) ||
        get_bool(x, root, "use_sliding_window", true, &use_sw) ||
        get_int(x, root, "", "sliding_window", false, 0, 0, CFG_MAX_POSITIONS, &c->sliding_window))
        return -1;
    if (!use_sw) c->sliding_window = 0;
    if (c->family == MODEL_FAMILY_QWEN2) c->attention_bias = true; /* Qwen2 always has q/k/v bias */
    c->qk_norm = c->family == MODEL_FAMILY_QWEN3;
    return 0;
}

static int token_id(cfg_ctx *x, const cJSON *it, const char *key, int vocab, int *out) {
    double v = cJSON_IsNumber(it) ? it->valuedouble : NAN;
    if (!isfinite(v) || v != floor(v) || v < 0 || v >= vocab) {
        pd_errorf(x->err, x->errlen, "%s: field '%s' must be a token id in [0, %d)", x->file, key, vocab);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* bos_token_id (int or null), eos_token_id (int, list of ints, or null). */
static int parse_special_tokens(cfg_ctx *x, const cJSON *root, model_config *c) {
    const cJSON *bos = field(root, "bos_token_id"), *eos = field(root, "eos_token_id");
    c->bos_token_id = -1;
    c->n_eos = 0;
    if (bos && token_id(x, bos, "bos_token_id", c->vocab_size, &c->bos_token_id)) return -1;
    if (!eos) return 0;
    if (!cJSON_IsArray(eos)) return token_id(x, eos, "eos_token_id", c->vocab_size, &c->eos_token_ids[c->n_eos++]);
    for (const cJSON *it = eos->child; it; it = it->next) {
        if (c->n_eos == MODEL_MAX_EOS) {
            pd_errorf(x->err, x->errlen, "%s: field 'eos_token_id' lists more than %d ids", x->file,
                      MODEL_MAX_EOS);
            return -1;
        }
        if (token_id(x, it, "eos_token_id", c->vocab_size, &c->eos_token_ids[c->n_eos++])) return -1;
    }
    return 0;
}

/* Only whitespace may follow the JSON value. */
static bool only_space(const char *p, const char *end) {
    for (; p < end; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') return false;
    return true;
}

int model_config_parse(const char *json, size_t len, const char *filename, model_config *out,
                       char *err, size_t errlen) {
    cfg_ctx x = {filename ? filename : "config.json", err, errlen};
    memset(out, 0, sizeof *out);
    const char *end = NULL;
    cJSON *root = json ? cJSON_ParseWithLengthOpts(json, len, &end, 0) : NULL;
    if (!root || (end && !only_space(end, json + len))) {
        long at = (end && end >= json && end <= json + len) ? (long)(end - json) : 0;
        pd_errorf(err, errlen, "%s: not valid JSON (at byte %ld)", x.file, at);
        cJSON_Delete(root);
        return -1;
    }
    int rc = -1;
    if (!cJSON_IsObject(root)) {
        pd_errorf(err, errlen, "%s: the top level must be a JSON object", x.file);
        goto done;
    }
    if (parse_architecture(&x, root, out) || parse_shape(&x, root, out) || parse_rope(&x, root, out) ||
        parse_dtype(&x, root, out) || parse_features(&x, root, out) ||
        parse_special_tokens(&x, root, out))
        goto done;
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}
