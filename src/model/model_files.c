/* model_files.c: opens what `--model` names (a checkpoint directory or
 * "preset:NAME") into a config and, unless the load format is dummy, the mapped and
 * checked weights; and the sizes derived from a config (KV bytes per token,
 * parameter count, a one-line description for logs). Runs once at start-up. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "util/util.h"

size_t model_kv_bytes_per_token(const model_config *c, size_t elem_size) {
    return 2 * (size_t)c->n_layers * (size_t)c->n_kv_heads * (size_t)c->head_dim * elem_size;
}

uint64_t model_param_count(const model_config *c) {
    uint64_t total = 0;
    for (int r = 0; r < WEIGHT_ROLE_COUNT; r++) {
        if (!weight_role_present(c, (weight_role)r)) continue;
        int64_t shape[2];
        int nd = weight_role_shape(c, (weight_role)r, shape);
        uint64_t numel = (uint64_t)shape[0] * (nd == 2 ? (uint64_t)shape[1] : 1);
        total += numel * (weight_role_per_layer((weight_role)r) ? (uint64_t)c->n_layers : 1);
    }
    return total;
}

void model_config_describe(const model_config *c, char *buf, size_t cap) {
    char rope[96];
    if (c->rope_type == ROPE_TYPE_LLAMA3)
        snprintf(rope, sizeof rope, "llama3(theta=%g factor=%g low=%g high=%g orig=%d)", c->rope_theta,
                 c->rope_factor, c->rope_low_freq_factor, c->rope_high_freq_factor,
                 c->rope_original_max_position);
    else if (c->rope_type == ROPE_TYPE_LINEAR)
        snprintf(rope, sizeof rope, "linear(theta=%g factor=%g)", c->rope_theta, c->rope_factor);
    else
        snprintf(rope, sizeof rope, "default(theta=%g)", c->rope_theta);
    snprintf(buf, cap,
             "%s L=%d C=%d F=%d H=%d K=%d D=%d V=%d max_pos=%d rope=%s eps=%g%s%s%s %s params=%.3fB",
             c->architecture, c->n_layers, c->dim, c->ffn_dim, c->n_heads, c->n_kv_heads, c->head_dim,
             c->vocab_size, c->max_position_embeddings, rope, c->norm_eps,
             c->tie_word_embeddings ? " tied" : "", c->attention_bias ? " qkv_bias" : "",
             c->qk_norm ? " qk_norm" : "", dtype_name(c->torch_dtype),
             (double)model_param_count(c) / 1e9);
}

/* config.json of a directory into out->config. */
static int open_config(const char *dir, model_files *out, char *err, size_t errlen) {
    char path[sizeof out->dir + 16];
    path_join(path, sizeof path, dir, "config.json");
    size_t len;
    char *text = util_read_file(path, &len, err, errlen);
    if (!text) return -1;
    int rc = model_config_parse(text, len, path, &out->config, err, errlen);
    free(text);
    return rc;
}

int model_files_open(const char *model_arg, const char *load_format, model_files *out, char *err,
                     size_t errlen) {
    memset(out, 0, sizeof *out);
    const char *fmt = load_format ? load_format : "auto";
    bool dummy = strcmp(fmt, "dummy") == 0;
    if (!dummy && strcmp(fmt, "auto") != 0 && strcmp(fmt, "safetensors") != 0) {
        pd_errorf(err, errlen, "--load-format '%s' is not supported (auto, safetensors, dummy)", fmt);
        return -1;
    }
    if (!model_arg || !model_arg[0]) {
        pd_errorf(err, errlen, "--model: no model given (a checkpoint directory or preset:NAME)");
        return -1;
    }
    if (strncmp(model_arg, "preset:", 7) == 0) {
        if (strcmp(fmt, "safetensors") == 0) {
            pd_errorf(err, errlen, "--model %s: a preset has no weights to load (use --load-format dummy)",
                      model_arg);
            return -1;
        }
        return model_preset(model_arg + 7, &out->config, err, errlen);
    }
    if (strlen(model_arg) >= sizeof out->dir) {
        pd_errorf(err, errlen, "--model: path longer than %zu bytes", sizeof out->dir - 1);
        return -1;
    }
    if (!util_is_dir(model_arg)) {
        pd_errorf(err, errlen, "--model %s: not a directory (expected a checkpoint directory with config.json, or preset:NAME)",
                  model_arg);
        return -1;
    }
    snprintf(out->dir, sizeof out->dir, "%s", model_arg);
    if (open_config(model_arg, out, err, errlen)) return -1;
    if (dummy) return 0;
    if (st_open_dir(model_arg, &out->weights, err, errlen)) return -1;
    if (model_check_tensors(&out->config, out->weights, err, errlen)) {
        model_files_close(out);
        return -1;
    }
    return 0;
}

void model_files_close(model_files *m) {
    if (!m) return;
    st_close(m->weights);
    m->weights = NULL;
}
