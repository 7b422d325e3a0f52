/* model.h: what a Llama-family model is, read from the files a Hugging Face
 * checkpoint directory holds (config.json, *.safetensors, the sharded index), or
 * from a built-in preset of a published shape. Knows nothing of backends: it
 * describes tensors and hands out read-only views of their bytes (mmap).
 *
 * Dimension letters used everywhere in pdserve:
 *   L layers, C model dim, F MLP hidden dim, H query heads, K kv heads, D head dim,
 *   V vocabulary, T tokens in a step, B sequences in a step. */
#ifndef PD_MODEL_H
#define PD_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum dtype { DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I32, DTYPE_COUNT } dtype;
size_t dtype_size(dtype t);   /* bytes per element; 0 for an out-of-range value */
const char *dtype_name(dtype t); /* safetensors spelling: "F32", "F16", "BF16", "I32" */

typedef enum model_family {
    MODEL_FAMILY_LLAMA,   /* Llama 2, 3, 3.1, 3.2 (LlamaForCausalLM) */
    MODEL_FAMILY_MISTRAL, /* MistralForCausalLM */
    MODEL_FAMILY_QWEN2,   /* Qwen2ForCausalLM: q/k/v bias */
    MODEL_FAMILY_QWEN3,   /* Qwen3ForCausalLM: per-head RMSNorm of q and k */
} model_family;

typedef enum rope_type { ROPE_TYPE_DEFAULT, ROPE_TYPE_LINEAR, ROPE_TYPE_LLAMA3 } rope_type;

const char *model_family_name(model_family f); /* "llama", "mistral", "qwen2", "qwen3" */
const char *rope_type_name(rope_type t);       /* "default", "linear", "llama3" */

#define MODEL_MAX_EOS 8

typedef struct model_config {
    char architecture[64];    /* e.g. "LlamaForCausalLM" */
    char model_type[32];      /* e.g. "llama" */
    model_family family;
    int n_layers;             /* L */
    int dim;                  /* C: hidden_size */
    int ffn_dim;              /* F: intermediate_size */
    int n_heads;              /* H: num_attention_heads */
    int n_kv_heads;           /* K: num_key_value_heads (defaults to H) */
    int head_dim;             /* D: head_dim (defaults to C / H) */
    int vocab_size;           /* V */
    int max_position_embeddings;
    float norm_eps;           /* rms_norm_eps */
    float rope_theta;         /* rope_theta or rope_parameters.rope_theta */
    rope_type rope_type;
    float rope_factor;                 /* linear and llama3 */
    float rope_low_freq_factor;        /* llama3 */
    float rope_high_freq_factor;       /* llama3 */
    int rope_original_max_position;    /* llama3: original_max_position_embeddings */
    bool tie_word_embeddings;
    bool attention_bias;      /* q/k/v projections carry a bias (Qwen2, or attention_bias: true) */
    bool qk_norm;             /* RMSNorm over each head of q and k before RoPE (Qwen3) */
    int sliding_window;       /* 0 when none; recorded, not applied (see docs) */
    int bos_token_id;         /* -1 when none */
    int eos_token_ids[MODEL_MAX_EOS];
    int n_eos;
    dtype torch_dtype;        /* checkpoint dtype: torch_dtype or dtype */
} model_config;

/* Parses the text of a config.json. `filename` is only used in messages.
 * Returns 0, or -1 with one sentence in err naming the file and the field
 * ("config.json: field 'num_hidden_layers' must be a positive integer").
 * Never crashes on any input (fuzzed: fuzz/fuzz_config.c). */
int model_config_parse(const char *json, size_t len, const char *filename, model_config *out,
                       char *err, size_t errlen);

/* Built-in shapes of published models (dummy weights only):
 * llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, qwen2.5-7b, llama-3.1-70b, and a few
 * tiny ones for tests and the demo. Returns 0 or -1 (unknown name, with the list). */
int model_preset(const char *name, model_config *out, char *err, size_t errlen);
/* Names of the presets, NULL-terminated. */
const char *const *model_preset_names(void);

/* Bytes of KV cache per token: 2 * L * K * D * elem_size. */
size_t model_kv_bytes_per_token(const model_config *c, size_t elem_size);
/* Parameter count of the whole model (embedding counted once when tied). */
uint64_t model_param_count(const model_config *c);
/* One line describing the shape, for logs. */
void model_config_describe(const model_config *c, char *buf, size_t cap);

/* ---- safetensors ----------------------------------------------------------------- */

#define ST_MAX_DIMS 4

typedef struct st_tensor {
    char *name;
    dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    uint64_t offset;        /* byte offset within the file's data section */
    uint64_t nbytes;
    const void *data;       /* points into the mapping (NULL while only parsed). Aligned to
                             * the element size in files that Hugging Face or st_write_file
                             * wrote (header padded to 8, data sorted by element size);
                             * other writers may leave it unaligned, so read it through
                             * st_convert_* (byte-wise loads) unless you checked. */
    int file_index;         /* which shard */
} st_tensor;

/* Parses a safetensors header from the first `len` bytes of a file whose total size
 * is `file_size`. Validates: header length within the file, JSON well formed, every
 * dtype known (F32, F16, BF16; others rejected with their name), shapes and
 * offsets consistent with dtype, offsets inside the data section, no two tensors
 * overlapping. On success *out is an array of *n tensors (data left NULL) that the
 * caller frees with st_tensors_free. Returns 0 or -1 with err naming the file and
 * tensor. Never allocates more than the header size allows (fuzzed). */
int st_parse_header(const uint8_t *buf, size_t len, uint64_t file_size, const char *filename,
                    st_tensor **out, int *n, char *err, size_t errlen);
void st_tensors_free(st_tensor *t, int n);

/* A set of safetensors files mapped read-only: one model.safetensors, or the shards
 * named by model.safetensors.index.json. */
typedef struct st_set st_set;
int st_open_dir(const char *dir, st_set **out, char *err, size_t errlen);
/* One safetensors file at `path`, as a set of one. */
int st_open_file(const char *path, st_set **out, char *err, size_t errlen);
/* File name (no directory) of shard i of the set, for messages. */
const char *st_file_name(const st_set *s, int file_index);
int st_file_count(const st_set *s);
/* What to name in messages about the set as a whole: "model.safetensors.index.json"
 * for a sharded checkpoint, else the one file's name. */
const char *st_source_name(const st_set *s);

/* model.safetensors.index.json, parsed: which shard holds each tensor. */
typedef struct st_index {
    char **shards;      /* unique shard file names, in first-seen order (owned) */
    int n_shards;
    char **tensors;     /* tensor names (owned) */
    int *shard_of;      /* [n_tensors] index into shards */
    int n_tensors;
} st_index;
/* Parses the text of an index file. Shard names must be plain file names (no '/',
 * not "." or ".."). Returns 0 or -1 with err naming the file and the field; on
 * failure *out holds nothing to free. Never crashes on any input (fuzzed). */
int st_index_parse(const char *json, size_t len, const char *filename, st_index *out, char *err,
                   size_t errlen);
void st_index_free(st_index *ix);
const st_tensor *st_find(const st_set *s, const char *name);
int st_count(const st_set *s);
const st_tensor *st_get(const st_set *s, int i);
void st_close(st_set *s);

/* Converts n elements of a tensor's bytes to f32 / bf16 (any supported source type). */
void st_convert_f32(float *dst, const void *src, dtype src_type, size_t n);
void st_convert_bf16(uint16_t *dst, const void *src, dtype src_type, size_t n);

/* Writes tensors as one safetensors file (used by `pdserve make-model` and tests).
 * Each tensor's data points at its bytes in t->dtype. Returns 0 or -1 with err. */
int st_write_file(const char *path, const st_tensor *t, int n, char *err, size_t errlen);

/* ---- the tensors of one transformer ------------------------------------------------ */

typedef enum weight_role {
    WEIGHT_EMBED,       /* model.embed_tokens.weight          [V, C] */
    WEIGHT_ATTN_NORM,   /* layers.i.input_layernorm.weight    [C] */
    WEIGHT_Q,           /* layers.i.self_attn.q_proj.weight   [H*D, C] */
    WEIGHT_K,           /* layers.i.self_attn.k_proj.weight   [K*D, C] */
    WEIGHT_V,           /* layers.i.self_attn.v_proj.weight   [K*D, C] */
    WEIGHT_Q_BIAS,      /* q_proj.bias [H*D]   (attention_bias) */
    WEIGHT_K_BIAS,      /* k_proj.bias [K*D]   (attention_bias) */
    WEIGHT_V_BIAS,      /* v_proj.bias [K*D]   (attention_bias) */
    WEIGHT_Q_NORM,      /* self_attn.q_norm.weight [D] (qk_norm) */
    WEIGHT_K_NORM,      /* self_attn.k_norm.weight [D] (qk_norm) */
    WEIGHT_O,           /* self_attn.o_proj.weight [C, H*D] */
    WEIGHT_MLP_NORM,    /* post_attention_layernorm.weight [C] */
    WEIGHT_GATE,        /* mlp.gate_proj.weight [F, C] */
    WEIGHT_UP,          /* mlp.up_proj.weight   [F, C] */
    WEIGHT_DOWN,        /* mlp.down_proj.weight [C, F] */
    WEIGHT_FINAL_NORM,  /* model.norm.weight [C] */
    WEIGHT_LM_HEAD,     /* lm_head.weight [V, C] (absent when tied) */
    WEIGHT_ROLE_COUNT
} weight_role;

bool weight_role_per_layer(weight_role r);
/* Whether this model has the tensor at all (biases, q/k norms, untied head). */
bool weight_role_present(const model_config *c, weight_role r);
/* Expected shape; returns ndim (1 or 2). */
int weight_role_shape(const model_config *c, weight_role r, int64_t shape[2]);
/* Hugging Face tensor name, e.g. "model.layers.3.self_attn.q_proj.weight". */
void weight_role_name(weight_role r, int layer, char *buf, size_t cap);

/* Checks that every tensor this config needs is in the set, with the right shape and a
 * supported dtype. Returns 0 or -1 with err naming the file, the tensor and what is
 * wrong ("model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has shape
 * [64, 32], expected [128, 32]"). */
int model_check_tensors(const model_config *c, const st_set *s, char *err, size_t errlen);

/* ---- a model directory, opened ------------------------------------------------------ */

typedef struct model_files {
    char dir[1024];           /* directory path, or "" for presets */
    model_config config;
    st_set *weights;          /* NULL for --load-format dummy */
} model_files;

/* Opens --model ARG: a directory (config.json + safetensors unless dummy) or
 * "preset:NAME" (always dummy). load_format is "auto", "safetensors" or "dummy".
 * Returns 0 or -1 with err. */
int model_files_open(const char *model_arg, const char *load_format, model_files *out, char *err,
                     size_t errlen);
void model_files_close(model_files *m);

#endif
