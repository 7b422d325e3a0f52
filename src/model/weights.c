/* weights.c: the tensors one Llama-family transformer needs, by role: their Hugging
 * Face names, their shapes from the config, which ones a model has (biases, q/k
 * norms, an untied head), and the check that a checkpoint holds all of them.
 * Runs at load time: a bad checkpoint is refused with the tensor's name before any
 * byte of it reaches a backend. */
#include <stdio.h>
#include <string.h>

#include "model/model.h"
#include "util/util.h"

bool weight_role_per_layer(weight_role r) {
    return r != WEIGHT_EMBED && r != WEIGHT_FINAL_NORM && r != WEIGHT_LM_HEAD;
}

bool weight_role_present(const model_config *c, weight_role r) {
    switch (r) {
    case WEIGHT_Q_BIAS:
    case WEIGHT_K_BIAS:
    case WEIGHT_V_BIAS: return c->attention_bias;
    case WEIGHT_Q_NORM:
    case WEIGHT_K_NORM: return c->qk_norm;
    case WEIGHT_LM_HEAD: return !c->tie_word_embeddings;
    default: return r >= 0 && r < WEIGHT_ROLE_COUNT;
    }
}

int weight_role_shape(const model_config *c, weight_role r, int64_t shape[2]) {
    int64_t C = c->dim, F = c->ffn_dim, V = c->vocab_size, D = c->head_dim;
    int64_t HD = (int64_t)c->n_heads * D, KD = (int64_t)c->n_kv_heads * D;
    shape[1] = 0;
#define SHAPE2(a, b) (shape[0] = (a), shape[1] = (b), 2)
#define SHAPE1(a) (shape[0] = (a), 1)
    switch (r) {
    case WEIGHT_EMBED: return SHAPE2(V, C);
    case WEIGHT_ATTN_NORM: return SHAPE1(C);
    case WEIGHT_Q: return SHAPE2(HD, C);
    case WEIGHT_K: return SHAPE2(KD, C);
    case WEIGHT_V: return SHAPE2(KD, C);
    case WEIGHT_Q_BIAS: return SHAPE1(HD);
    case WEIGHT_K_BIAS: return SHAPE1(KD);
    case WEIGHT_V_BIAS: return SHAPE1(KD);
    case WEIGHT_Q_NORM: return SHAPE1(D);
    case WEIGHT_K_NORM: return SHAPE1(D);
    case WEIGHT_O: return SHAPE2(C, HD);
    case WEIGHT_MLP_NORM: return SHAPE1(C);
    case WEIGHT_GATE: return SHAPE2(F, C);
    case WEIGHT_UP: return SHAPE2(F, C);
    case WEIGHT_DOWN: return SHAPE2(C, F);
    case WEIGHT_FINAL_NORM: return SHAPE1(C);
    case WEIGHT_LM_HEAD: return SHAPE2(V, C);
    default: PD_ASSERT(!"weight_role_shape: bad role"); return 0;
    }
#undef SHAPE1
#undef SHAPE2
}

void weight_role_name(weight_role r, int layer, char *buf, size_t cap) {
    static const char *const LAYER_SUFFIX[WEIGHT_ROLE_COUNT] = {
        [WEIGHT_ATTN_NORM] = "input_layernorm.weight",
        [WEIGHT_Q] = "self_attn.q_proj.weight",
        [WEIGHT_K] = "self_attn.k_proj.weight",
        [WEIGHT_V] = "self_attn.v_proj.weight",
        [WEIGHT_Q_BIAS] = "self_attn.q_proj.bias",
        [WEIGHT_K_BIAS] = "self_attn.k_proj.bias",
        [WEIGHT_V_BIAS] = "self_attn.v_proj.bias",
        [WEIGHT_Q_NORM] = "self_attn.q_norm.weight",
        [WEIGHT_K_NORM] = "self_attn.k_norm.weight",
        [WEIGHT_O] = "self_attn.o_proj.weight",
        [WEIGHT_MLP_NORM] = "post_attention_layernorm.weight",
        [WEIGHT_GATE] = "mlp.gate_proj.weight",
        [WEIGHT_UP] = "mlp.up_proj.weight",
        [WEIGHT_DOWN] = "mlp.down_proj.weight",
    };
    PD_ASSERT(r >= 0 && r < WEIGHT_ROLE_COUNT);
    switch (r) {
    case WEIGHT_EMBED: snprintf(buf, cap, "model.embed_tokens.weight"); break;
    case WEIGHT_FINAL_NORM: snprintf(buf, cap, "model.norm.weight"); break;
    case WEIGHT_LM_HEAD: snprintf(buf, cap, "lm_head.weight"); break;
    default: snprintf(buf, cap, "model.layers.%d.%s", layer, LAYER_SUFFIX[r]); break;
    }
}

/* "[64, 32]" */
static void shape_str(const int64_t *shape, int ndim, char *buf, size_t cap) {
    size_t at = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && at < cap; d++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (at < cap) snprintf(buf + at, cap - at, "]");
}

/* Checks one tensor of the set against its role. */
static int check_one(const model_config *c, const st_set *s, weight_role r, int layer, char *err,
                     size_t errlen) {
    char name[128];
    weight_role_name(r, layer, name, sizeof name);
    const st_tensor *t = st_find(s, name);
    if (!t) {
        pd_errorf(err, errlen, "%s: tensor '%s' is missing (a %s model with L=%d needs it)",
                  st_source_name(s), name,
                  c->architecture, c->n_layers);
        return -1;
    }
    const char *file = st_file_name(s, t->file_index);
    if (t->dtype != DTYPE_F32 && t->dtype != DTYPE_F16 && t->dtype != DTYPE_BF16) {
        pd_errorf(err, errlen, "%s: tensor '%s' has dtype %s, expected F32, F16 or BF16", file, name,
                  dtype_name(t->dtype));
        return -1;
    }
    int64_t want[2];
    int nd = weight_role_shape(c, r, want);
    if (t->ndim != nd || t->shape[0] != want[0] || (nd == 2 && t->shape[1] != want[1])) {
        char got_s[96], want_s[96];
        shape_str(t->shape, t->ndim, got_s, sizeof got_s);
        shape_str(want, nd, want_s, sizeof want_s);
        pd_errorf(err, errlen, "%s: tensor '%s' has shape %s, expected %s", file, name, got_s, want_s);
        return -1;
    }
    return 0;
}

int model_check_tensors(const model_config *c, const st_set *s, char *err, size_t errlen) {
    for (int r = 0; r < WEIGHT_ROLE_COUNT; r++) {
        if (!weight_role_present(c, (weight_role)r)) continue; /* a tied model's lm_head is ignored */
        int layers = weight_role_per_layer((weight_role)r) ? c->n_layers : 1;
        for (int l = 0; l < layers; l++)
            if (check_one(c, s, (weight_role)r, l, err, errlen)) return -1;
    }
    return 0;
}
