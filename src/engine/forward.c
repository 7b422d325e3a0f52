/* forward.c: a Llama-family model on a backend: loading its weights, its paged KV
 * cache, and the batched forward pass of one engine step.
 *
 * The pass is written once over the backend table and reads top to bottom as
 * Hugging Face's LlamaForCausalLM / Qwen2 / Qwen3 / Mistral forward:
 *   embed -> per layer [rmsnorm -> qkv (+bias) -> (q/k norm) -> rope -> kv_store ->
 *   paged attention -> o_proj -> residual add + rmsnorm -> gate_up -> swiglu -> down]
 *   -> residual add + final norm -> logit rows -> lm_head -> f32 logits on the host.
 * Each residual add is fused with the rmsnorm that follows it (add_rmsnorm).
 *
 * Tuned for steps of up to max_tokens rows mixing prefill chunks and decode rows:
 * every buffer is allocated once (fwd_ctx_create, logged as a budget), and
 * model_forward allocates nothing. */
#include "engine/forward.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/util.h"

/* ---- weights ------------------------------------------------------------------------ */

typedef struct loader {
    backend *be;
    const model_files *files;
    const model_config *c;
    uint64_t seed;
    size_t bytes; /* weight bytes allocated so far */
    char *err;
    size_t errlen;
} loader;

static void *weight_alloc(loader *ld, size_t numel) {
    size_t bytes = numel * dtype_size(ld->be->ops->weight_type);
    ld->bytes += bytes;
    return ld->be->ops->alloc(ld->be, bytes);
}

static size_t role_numel(const model_config *c, weight_role r) {
    int64_t shape[2];
    int nd = weight_role_shape(c, r, shape);
    return (size_t)shape[0] * (nd == 2 ? (size_t)shape[1] : 1);
}

static bool role_is_norm(weight_role r) {
    return r == WEIGHT_ATTN_NORM || r == WEIGHT_MLP_NORM || r == WEIGHT_FINAL_NORM ||
           r == WEIGHT_Q_NORM || r == WEIGHT_K_NORM;
}

/* Puts the tensor of (role, layer) into dst at element dst_offset, converted to the
 * backend's weight type: from the checkpoint, or as dummy values (norms 1, others
 * normal(0, 0.02) from a seed of its own). Returns 0, or -1 with err naming the
 * tensor. */
static int load_into(loader *ld, weight_role r, int layer, void *dst, size_t dst_offset) {
    backend *be = ld->be;
    dtype wt = be->ops->weight_type;
    size_t numel = role_numel(ld->c, r);
    if (!ld->files->weights) {
        void *at = (uint8_t *)dst + dst_offset * dtype_size(wt);
        if (role_is_norm(r)) {
            be->ops->fill(be, at, wt, numel, 1.0f);
        } else {
            uint64_t key = ((uint64_t)r << 32) | (uint32_t)(layer + 1);
            be->ops->fill_random(be, at, wt, numel, hash_u64(ld->seed ^ hash_u64(key)), 0.02f);
        }
        return 0;
    }
    char name[160];
    weight_role_name(r, layer, name, sizeof name);
    const st_tensor *t = st_find(ld->files->weights, name);
    if (!t) {
        pd_errorf(ld->err, ld->errlen, "%s: tensor '%s' is missing", ld->files->dir, name);
        return -1;
    }
    size_t have = 1;
    for (int d = 0; d < t->ndim; d++) have *= (size_t)t->shape[d];
    if (have != numel || !t->data ||
        (t->dtype != DTYPE_F32 && t->dtype != DTYPE_BF16 && t->dtype != DTYPE_F16)) {
        pd_errorf(ld->err, ld->errlen, "%s: tensor '%s' has %zu elements of %s, expected %zu",
                  ld->files->dir, name, have, dtype_name(t->dtype), numel);
        return -1;
    }
    be->ops->upload(be, dst, wt, dst_offset, t->data, t->dtype, numel);
    return 0;
}

/* One tensor in a buffer of its own; NULL with err on failure. */
static void *load_one(loader *ld, weight_role r, int layer) {
    void *p = weight_alloc(ld, role_numel(ld->c, r));
    if (load_into(ld, r, layer, p, 0)) {
        ld->be->ops->free(ld->be, p);
        return NULL;
    }
    return p;
}

/* Several tensors stacked row-wise in one buffer (q|k|v, gate|up). */
static void *load_stacked(loader *ld, const weight_role *roles, int n, int layer) {
    size_t total = 0;
    for (int i = 0; i < n; i++) total += role_numel(ld->c, roles[i]);
    void *p = weight_alloc(ld, total);
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        if (load_into(ld, roles[i], layer, p, at)) {
            ld->be->ops->free(ld->be, p);
            return NULL;
        }
        at += role_numel(ld->c, roles[i]);
    }
    return p;
}

static int load_layer(loader *ld, int l, layer_weights *w) {
    const model_config *c = ld->c;
    static const weight_role QKV[] = {WEIGHT_Q, WEIGHT_K, WEIGHT_V};
    static const weight_role QKV_BIAS[] = {WEIGHT_Q_BIAS, WEIGHT_K_BIAS, WEIGHT_V_BIAS};
    static const weight_role GATE_UP[] = {WEIGHT_GATE, WEIGHT_UP};
    if (!(w->attn_norm = load_one(ld, WEIGHT_ATTN_NORM, l))) return -1;
    if (!(w->wqkv = load_stacked(ld, QKV, 3, l))) return -1;
    if (c->attention_bias && !(w->bqkv = load_stacked(ld, QKV_BIAS, 3, l))) return -1;
    if (c->qk_norm) {
        if (!(w->q_norm = load_one(ld, WEIGHT_Q_NORM, l))) return -1;
        if (!(w->k_norm = load_one(ld, WEIGHT_K_NORM, l))) return -1;
    }
    if (!(w->wo = load_one(ld, WEIGHT_O, l))) return -1;
    if (!(w->mlp_norm = load_one(ld, WEIGHT_MLP_NORM, l))) return -1;
    if (!(w->w_gate_up = load_stacked(ld, GATE_UP, 2, l))) return -1;
    if (!(w->w_down = load_one(ld, WEIGHT_DOWN, l))) return -1;
    return 0;
}

model *model_load(backend *be, const model_files *files, uint64_t seed, char *err, size_t errlen) {
    const model_config *c = &files->config;
    PD_ASSERT(c->n_layers > 0 && c->dim > 0 && c->n_heads > 0 && c->n_kv_heads > 0);
    PD_ASSERT(c->n_heads % c->n_kv_heads == 0 && c->head_dim > 0 && c->vocab_size > 0);
    model *m = xcalloc(1, sizeof *m);
    m->cfg = *c;
    m->be = be;
    m->layers = xcalloc((size_t)c->n_layers, sizeof *m->layers);
    loader ld = {be, files, c, seed, 0, err, errlen};
    double t0 = time_now_s();
    int rc = 0;
    if (!(m->embed = load_one(&ld, WEIGHT_EMBED, -1))) rc = -1;
    for (int l = 0; l < c->n_layers && !rc; l++) rc = load_layer(&ld, l, &m->layers[l]);
    if (!rc && !(m->final_norm = load_one(&ld, WEIGHT_FINAL_NORM, -1))) rc = -1;
    if (!rc) {
        m->lm_head = c->tie_word_embeddings ? m->embed : load_one(&ld, WEIGHT_LM_HEAD, -1);
        if (!m->lm_head) rc = -1;
    }
    m->weight_bytes = ld.bytes;
    if (rc) {
        model_free(m);
        return NULL;
    }
    be->ops->sync(be);
    log_info("model: %.1f MiB of %s weights on %s in %.2f s (%s)", (double)ld.bytes / (1 << 20),
             dtype_name(be->ops->weight_type), be->ops->name, time_now_s() - t0,
             files->weights ? "checkpoint" : "dummy");
    return m;
}

void model_free(model *m) {
    if (!m) return;
    backend *be = m->be;
    void (*fr)(backend *, void *) = be->ops->free;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        layer_weights *w = &m->layers[l];
        void *ps[] = {w->attn_norm, w->wqkv, w->bqkv, w->q_norm, w->k_norm,
                      w->wo, w->mlp_norm, w->w_gate_up, w->w_down};
        for (size_t i = 0; i < PD_ARRAY_LEN(ps); i++) fr(be, ps[i]);
    }
    if (m->lm_head != m->embed) fr(be, m->lm_head);
    fr(be, m->embed);
    fr(be, m->final_norm);
    free(m->layers);
    free(m);
}

/* ---- KV cache ----------------------------------------------------------------------- */

/* The cache's geometry for `bytes`, without its memory; NULL with err when not one
 * block fits. */
static kv_cache *kv_cache_shape(backend *be, const model_config *c, int block_size, size_t bytes,
                                char *err, size_t errlen) {
    PD_ASSERT(block_size > 0);
    dtype t = be->ops->kv_type;
    size_t block_bytes = (size_t)block_size * c->n_kv_heads * c->head_dim * dtype_size(t);
    size_t per_block = 2 * (size_t)c->n_layers * block_bytes; /* k and v of every layer */
    size_t n = bytes / per_block;
    if (n < 1) {
        pd_errorf(err, errlen,
                  "kv cache: %zu bytes hold no block of %d tokens (one needs %zu bytes)", bytes,
                  block_size, per_block);
        return NULL;
    }
    if (n > INT32_MAX / (size_t)block_size) n = INT32_MAX / (size_t)block_size; /* slots are int32 */
    kv_cache *kv = xcalloc(1, sizeof *kv);
    kv->n_layers = c->n_layers;
    kv->num_blocks = (int)n;
    kv->block_size = block_size;
    kv->n_kv_heads = c->n_kv_heads;
    kv->head_dim = c->head_dim;
    kv->type = t;
    kv->be = be;
    kv->on_device = !be->ops->host_memory;
    kv->block_bytes = block_bytes;
    kv->total_bytes = n * per_block;
    kv->k = xcalloc((size_t)c->n_layers, sizeof(void *));
    kv->v = xcalloc((size_t)c->n_layers, sizeof(void *));
    return kv;
}

static void kv_cache_log(const kv_cache *kv) {
    log_info("kv cache: %d blocks of %d tokens, %.1f MiB (%s, %zu bytes per token)%s%s",
             kv->num_blocks, kv->block_size, (double)kv->total_bytes / (1 << 20),
             dtype_name(kv->type), kv->total_bytes / (size_t)kv->num_blocks / (size_t)kv->block_size,
             kv->shm_base ? " in shared memory " : "", kv->shm_name);
}

kv_cache *kv_cache_create(backend *be, const model_config *c, int block_size, size_t bytes,
                          char *err, size_t errlen) {
    kv_cache *kv = kv_cache_shape(be, c, block_size, bytes, err, errlen);
    if (!kv) return NULL;
    size_t part = (size_t)kv->num_blocks * kv->block_bytes;
    for (int l = 0; l < c->n_layers; l++) {
        kv->k[l] = be->ops->alloc(be, part);
        kv->v[l] = be->ops->alloc(be, part);
    }
    kv_cache_log(kv);
    return kv;
}

kv_cache *kv_cache_create_shared(backend *be, const model_config *c, int block_size, size_t bytes,
                                 const char *shm_name, char *err, size_t errlen) {
    if (!be->ops->alloc_shared || !be->ops->free_shared) {
        pd_errorf(err, errlen, "kv cache: the %s backend has no shared KV memory", be->ops->name);
        return NULL;
    }
    if (strlen(shm_name) >= sizeof ((kv_cache *)0)->shm_name) {
        pd_errorf(err, errlen, "kv cache: shared memory name %s is too long", shm_name);
        return NULL;
    }
    kv_cache *kv = kv_cache_shape(be, c, block_size, bytes, err, errlen);
    if (!kv) return NULL;
    uint8_t *base = be->ops->alloc_shared(be, kv->total_bytes, shm_name, err, errlen);
    if (!base) {
        free(kv->k);
        free(kv->v);
        free(kv);
        return NULL;
    }
    size_t part = (size_t)kv->num_blocks * kv->block_bytes;
    for (int l = 0; l < c->n_layers; l++) {
        kv->k[l] = base + (size_t)(2 * l) * part;
        kv->v[l] = base + (size_t)(2 * l + 1) * part;
    }
    kv->shm_base = base;
    kv->shm_bytes = kv->total_bytes;
    snprintf(kv->shm_name, sizeof kv->shm_name, "%s", shm_name);
    kv_cache_log(kv);
    return kv;
}

void kv_cache_free(backend *be, kv_cache *kv) {
    if (!kv) return;
    if (kv->shm_base) {
        be->ops->free_shared(be, kv->shm_base, kv->shm_bytes, kv->shm_name);
        free(kv->k);
        free(kv->v);
        free(kv);
        return;
    }
    for (int l = 0; l < kv->n_layers; l++) {
        be->ops->free(be, kv->k[l]);
        be->ops->free(be, kv->v[l]);
    }
    free(kv->k);
    free(kv->v);
    free(kv);
}

/* ---- scratch ------------------------------------------------------------------------ */

struct fwd_ctx {
    model *m;             /* not owned */
    int max_tokens, max_seqs;
    int logit_chunk;      /* rows of lm_head per matmul (the logits buffer's rows) */
    rope_params rope;
    float attn_scale;     /* 1 / sqrt(D) */
    /* backend memory, activation type unless noted */
    void *x;              /* [T, C] the residual stream */
    void *xn;             /* [T, C] normed input of the next block */
    void *qkv;            /* [T, (H+2K)*D] */
    void *attn;           /* [T, H*D] */
    void *gu;             /* [T, 2F] gate | up */
    void *act;            /* [T, F] swiglu output */
    void *proj;           /* [T, C] o_proj / down output, added to x */
    void *xl;             /* [logit_chunk, C] rows whose logits are wanted */
    void *lg;             /* [logit_chunk, V] */
    int32_t *ids, *pos, *slots; /* [T] int32 */
    int32_t *amax;        /* [2 * logit_chunk]: int32 tokens (model_forward_greedy /
                           * _sample), then f32 logprobs (model_forward_sample) */
    /* the step's device inputs [T]: ids, pos, slots above, or the backend's decode
     * buffer on a graphed decode step */
    const int32_t *in_ids, *in_pos, *in_slots;
    /* decode graphs (backend.h decode_upload, graph_*), one per batch bucket
     * (graph_bucket) and graph variant: n_graphs x BACKEND_GRAPH_VARIANTS of each,
     * host memory, index bucket * BACKEND_GRAPH_VARIANTS + variant */
    bool graphs;          /* use them where the backend has them (fwd_ctx_use_graphs) */
    int n_graphs;
    void **graph;
    bool *graph_warm;     /* ran op by op once since the last capture */
    long n_captured, n_replayed; /* fwd_ctx_graph_counts */
    const kv_cache *graph_kv; /* the cache the graphs write into */
    fwd_layer_fn layer_fn;  /* fwd_ctx_set_layer_hook; NULL: off */
    fwd_wait_fn wait_fn;    /* fwd_ctx_set_wait_hook; NULL: off (one-shot) */
    bool capturing;         /* a decode graph is being captured: the wait hook waits */
    void *wait_user;
    void *layer_user;
    float *host_lg;       /* host [logit_chunk, V]: greedy without argmax_rows; lazily */
    size_t bytes;
};

static void *ctx_alloc(fwd_ctx *f, size_t bytes) {
    f->bytes += bytes;
    return f->m->be->ops->alloc(f->m->be, bytes);
}

/* The backend's matmul_warm over every matmul shape of a step (one layer's four and
 * lm_head's), up to the rows this context takes: on the CUDA backend the first matmul
 * of a row count would otherwise choose and load its kernel in the middle of a
 * request (6-19 ms on an H200; gemm_lt.cu). */
static void fwd_warm_matmuls(fwd_ctx *f) {
    const backend_ops *o = f->m->be->ops;
    backend *be = f->m->be;
    const model_config *c = &f->m->cfg;
    if (!o->matmul_warm || c->n_layers < 1) return;
    double t0 = time_now_s();
    const layer_weights *w = &f->m->layers[0];
    int T = f->max_tokens, C = c->dim, QKV = (c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
    int ran = o->matmul_warm(be, f->qkv, f->xn, w->wqkv, T, C, QKV);
    ran += o->matmul_warm(be, f->proj, f->attn, w->wo, T, c->n_heads * c->head_dim, C);
    ran += o->matmul_warm(be, f->gu, f->xn, w->w_gate_up, T, C, 2 * c->ffn_dim);
    ran += o->matmul_warm(be, f->proj, f->act, w->w_down, T, c->ffn_dim, C);
    ran += o->matmul_warm(be, f->lg, f->xl, f->m->lm_head, f->logit_chunk, C, c->vocab_size);
    if (!ran) return; /* nothing to warm on this route (PDSERVE_CUDA_GEMM=ex) */
    o->sync(be);
    log_info("forward: matmuls warmed for 1-%d rows (%d row counts over 5 shapes) in %.2f s", T, ran,
             time_now_s() - t0);
}

fwd_ctx *fwd_ctx_create(model *m, int max_tokens, int max_seqs) {
    PD_ASSERT(max_tokens > 0 && max_seqs > 0);
    const model_config *c = &m->cfg;
    size_t a = dtype_size(m->be->ops->act_type), T = (size_t)max_tokens;
    size_t C = c->dim, F = c->ffn_dim, V = c->vocab_size, D = c->head_dim;
    size_t H = c->n_heads, K = c->n_kv_heads;
    fwd_ctx *f = xcalloc(1, sizeof *f);
    f->m = m;
    f->max_tokens = max_tokens;
    f->max_seqs = max_seqs;
    f->logit_chunk = PD_MIN(max_tokens, max_seqs);
    f->rope = rope_params_from_config(c);
    f->attn_scale = (float)(1.0 / sqrt((double)c->head_dim));
    f->x = ctx_alloc(f, T * C * a);
    f->xn = ctx_alloc(f, T * C * a);
    f->qkv = ctx_alloc(f, T * (H + 2 * K) * D * a);
    f->attn = ctx_alloc(f, T * H * D * a);
    f->gu = ctx_alloc(f, T * 2 * F * a);
    f->act = ctx_alloc(f, T * F * a);
    f->proj = ctx_alloc(f, T * C * a);
    f->xl = ctx_alloc(f, (size_t)f->logit_chunk * C * a);
    f->lg = ctx_alloc(f, (size_t)f->logit_chunk * V * a);
    f->ids = ctx_alloc(f, T * sizeof(int32_t));
    f->pos = ctx_alloc(f, T * sizeof(int32_t));
    f->slots = ctx_alloc(f, T * sizeof(int32_t));
    f->amax = ctx_alloc(f, 2 * (size_t)f->logit_chunk * sizeof(int32_t));
    f->graphs = true;
    f->n_graphs = (3 + (f->logit_chunk + 7) / 8) * BACKEND_GRAPH_VARIANTS;
    f->graph = xcalloc((size_t)f->n_graphs, sizeof *f->graph);
    f->graph_warm = xcalloc((size_t)f->n_graphs, sizeof *f->graph_warm);
    /* one event per layer for fwd_ctx_set_layer_hook (device backends; start-up) */
    if (m->be->ops->layer_events_reserve) m->be->ops->layer_events_reserve(m->be, c->n_layers);
    fwd_warm_matmuls(f);
    log_info("forward scratch: %.1f MiB for %d rows, %d sequences (qkv %.1f, mlp %.1f, "
             "logits %.1f MiB)",
             (double)f->bytes / (1 << 20), max_tokens, max_seqs,
             (double)(T * (H + 2 * K) * D * a) / (1 << 20), (double)(T * 3 * F * a) / (1 << 20),
             (double)(f->logit_chunk * V * a) / (1 << 20));
    return f;
}

void fwd_ctx_free(fwd_ctx *f) {
    if (!f) return;
    backend *be = f->m->be;
    void *ps[] = {f->x, f->xn, f->qkv, f->attn, f->gu, f->act, f->proj,
                  f->xl, f->lg, f->ids, f->pos, f->slots, f->amax};
    fwd_ctx_use_graphs(f, false);
    free(f->graph);
    free(f->graph_warm);
    for (size_t i = 0; i < PD_ARRAY_LEN(ps); i++) be->ops->free(be, ps[i]);
    free(f->host_lg);
    free(f);
}

size_t fwd_ctx_bytes(const fwd_ctx *f) { return f->bytes; }

void fwd_ctx_set_layer_hook(fwd_ctx *f, fwd_layer_fn fn, void *user) {
    f->layer_fn = fn;
    f->layer_user = user;
}

void fwd_ctx_set_wait_hook(fwd_ctx *f, fwd_wait_fn fn, void *user) {
    f->wait_fn = fn;
    f->wait_user = user;
}

/* Before the step's first wait for its results: the wait hook, once. Never while a
 * decode graph is being captured: nothing is running then, and whatever the hook
 * queues on the device (a KV put's copies, a staged upload) would be recorded into the
 * graph and replayed by every later step. The hook then runs once the graph has been
 * launched (every caller of decode_graphed calls fwd_before_wait after it). */
static void fwd_before_wait(fwd_ctx *f) {
    fwd_wait_fn fn = f->wait_fn;
    if (!fn || f->capturing) return;
    f->wait_fn = NULL;
    fn(f->wait_user);
}

/* ---- the forward pass ----------------------------------------------------------------- */

/* Attention block of layer l on xn: writes this step's K/V into the cache and the
 * block's output (before the residual add) into f->proj. */
static void attention_block(fwd_ctx *f, kv_cache *kv, const fwd_batch *bt, int l) {
    const model_config *c = &f->m->cfg;
    const backend_ops *o = f->m->be->ops;
    backend *be = f->m->be;
    const layer_weights *w = &f->m->layers[l];
    int T = bt->T, C = c->dim, H = c->n_heads, K = c->n_kv_heads, D = c->head_dim;
    int QKV = (H + 2 * K) * D;

    o->matmul(be, f->qkv, f->xn, w->wqkv, w->bqkv, T, C, QKV);
    if (w->q_norm) {
        o->head_rmsnorm(be, f->qkv, w->q_norm, T, QKV, 0, H, D, c->norm_eps);
        o->head_rmsnorm(be, f->qkv, w->k_norm, T, QKV, H * D, K, D, c->norm_eps);
    }
    /* the old K/V of this layer's blocks that an eviction burst copies out (kv tiers,
     * --kv-offload-async) is read before this store overwrites it: a device-side wait,
     * a no-op when no copy is pending (backend.h copy_async_order) */
    if (o->copy_async_order) o->copy_async_order(be, l);
    if (o->rope_kv_store) { /* one launch instead of two */
        o->rope_kv_store(be, f->qkv, kv->k[l], kv->v[l], f->in_pos, f->in_slots, &f->rope, T, H,
                         K, D);
    } else {
        o->rope(be, f->qkv, f->in_pos, &f->rope, T, H, K, D);
        o->kv_store(be, kv->k[l], kv->v[l], f->qkv, f->in_slots, T, H, K, D);
    }
    if (f->layer_fn) { /* layer l's K/V is final: a KV stream may ship it now */
        if (o->layer_event_record) o->layer_event_record(be, l);
        f->layer_fn(f->layer_user, l);
    }
    o->attention(be, f->attn, f->qkv, kv->k[l], kv->v[l], bt->seqs, bt->B, T, H, K, D,
                 kv->block_size, f->attn_scale);
    o->matmul(be, f->proj, f->attn, w->wo, NULL, T, H * D, C);
}

/* MLP block of layer l on xn, output into f->proj. */
static void mlp_block(fwd_ctx *f, int T, int l) {
    const model_config *c = &f->m->cfg;
    const backend_ops *o = f->m->be->ops;
    backend *be = f->m->be;
    const layer_weights *w = &f->m->layers[l];
    if (o->matmul_swiglu) { /* small T: swiglu in the gate_up GEMV's epilogue */
        o->matmul_swiglu(be, f->act, f->gu, f->xn, w->w_gate_up, T, c->dim, c->ffn_dim);
    } else {
        o->matmul(be, f->gu, f->xn, w->w_gate_up, NULL, T, c->dim, 2 * c->ffn_dim);
        o->swiglu(be, f->act, f->gu, T, c->ffn_dim);
    }
    o->matmul(be, f->proj, f->act, w->w_down, NULL, T, c->ffn_dim, c->dim);
}

/* Asserts that bt fits f and kv; false for an empty step. */
static bool step_check(const fwd_ctx *f, const kv_cache *kv, const fwd_batch *bt) {
    const model_config *c = &f->m->cfg;
    int T = bt->T, V = c->vocab_size;
    PD_ASSERT(T >= 0 && T <= f->max_tokens && bt->B >= 0 && bt->B <= f->max_seqs);
    PD_ASSERT(bt->n_logits >= 0 && bt->n_logits <= T);
    PD_ASSERT(kv->n_layers == c->n_layers && kv->n_kv_heads == c->n_kv_heads &&
              kv->head_dim == c->head_dim);
    if (T == 0) return false;
    for (int t = 0; t < T; t++)
        PD_ASSERT(bt->tokens[t] >= 0 && bt->tokens[t] < V && bt->slots[t] >= 0 &&
                  bt->slots[t] < kv->num_blocks * kv->block_size);
    return true;
}

static void run_layers(fwd_ctx *f, kv_cache *kv, const fwd_batch *bt);

/* Every layer of the step: afterwards f->xn holds the final-normed hidden states of
 * every row. Returns false (nothing done) for an empty step. */
static bool forward_layers(fwd_ctx *f, kv_cache *kv, const fwd_batch *bt) {
    backend *be = f->m->be;
    const backend_ops *o = be->ops;
    int T = bt->T;
    if (!step_check(f, kv, bt)) return false;
    o->copy_h2d(be, f->ids, bt->tokens, (size_t)T * sizeof(int32_t));
    o->copy_h2d(be, f->pos, bt->positions, (size_t)T * sizeof(int32_t));
    o->copy_h2d(be, f->slots, bt->slots, (size_t)T * sizeof(int32_t));
    f->in_ids = f->ids;
    f->in_pos = f->pos;
    f->in_slots = f->slots;
    run_layers(f, kv, bt);
    return true;
}

/* The layers on the step's device inputs (f->in_*); bt->seqs NULL on a graphed
 * decode step (the backend holds the attention metadata). */
static void run_layers(fwd_ctx *f, kv_cache *kv, const fwd_batch *bt) {
    model *m = f->m;
    const model_config *c = &m->cfg;
    backend *be = m->be;
    const backend_ops *o = be->ops;
    int T = bt->T, C = c->dim, L = c->n_layers;
    o->embedding(be, f->x, m->embed, f->in_ids, T, C);
    o->rmsnorm(be, f->xn, f->x, m->layers[0].attn_norm, T, C, c->norm_eps);
    for (int l = 0; l < L; l++) {
        attention_block(f, kv, bt, l);
        o->add_rmsnorm(be, f->x, f->xn, f->proj, m->layers[l].mlp_norm, T, C, c->norm_eps);
        mlp_block(f, T, l);
        const void *next_norm = l + 1 < L ? m->layers[l + 1].attn_norm : m->final_norm;
        o->add_rmsnorm(be, f->x, f->xn, f->proj, next_norm, T, C, c->norm_eps);
        /* the device has a layer of work queued: the wait hook's host work overlaps it
         * without waiting for every launch of a long op-by-op step */
        if (l == 0) fwd_before_wait(f);
    }
}

/* ---- decode steps as graphs ----------------------------------------------------------------
 * A decode-only step (one row per sequence, every row's logits wanted, in order) runs
 * padded to its bucket's Bp rows from the backend's decode buffer: the first time a
 * bucket and graph variant (backend.h decode_upload) are seen op by op (which sizes
 * every scratch buffer), the second time under capture, and from then on as one
 * replay of that graph. Padding rows compute garbage nobody reads (their K/V is never
 * stored: slot -1). */

void fwd_ctx_use_graphs(fwd_ctx *f, bool on) {
    backend *be = f->m->be;
    for (int i = 0; i < f->n_graphs; i++) {
        if (f->graph[i]) be->ops->graph_free(be, f->graph[i]);
        f->graph[i] = NULL;
        f->graph_warm[i] = false;
    }
    f->graphs = on;
}

/* The bucket of a decode step of B rows: padded to 1, 2, 4, 8, then a multiple of 8
 * (vLLM's capture sizes: padding costs at most 7 rows), never past logit_chunk; the
 * padded size into *Bp. */
static int graph_bucket(const fwd_ctx *f, int B, int *Bp) {
    *Bp = PD_MIN(fwd_decode_bucket_rows(B), f->logit_chunk);
    int i = *Bp <= 4 ? (*Bp == 4 ? 2 : *Bp - 1) : 2 + (*Bp + 7) / 8;
    PD_ASSERT(i >= 0 && i * BACKEND_GRAPH_VARIANTS < f->n_graphs);
    return i;
}

void fwd_ctx_graph_counts(const fwd_ctx *f, long *captured, long *replayed) {
    *captured = f->n_captured;
    *replayed = f->n_replayed;
}

static bool is_decode_step(const fwd_ctx *f, const fwd_batch *bt) {
    if (bt->T < 1 || bt->T != bt->B || bt->n_logits != bt->B || bt->B > f->logit_chunk) return false;
    for (int i = 0; i < bt->B; i++)
        if (bt->seqs[i].q_start != i || bt->seqs[i].q_len != 1 || bt->logit_rows[i] != i)
            return false;
    return true;
}

/* Runs bt as a graphed decode step when it is one and the backend can: afterwards
 * f->lg holds the logits of rows 0..B-1. Returns false, having done nothing, when
 * the step goes op by op instead. */
static bool decode_graphed(fwd_ctx *f, kv_cache *kv, const fwd_batch *bt) {
    model *m = f->m;
    backend *be = m->be;
    const backend_ops *o = be->ops;
    if (!f->graphs || !o->decode_upload || f->layer_fn || !is_decode_step(f, bt)) return false;
    if (!step_check(f, kv, bt)) return false;
    int B = bt->B, Bp, variant = 0;
    int bucket = graph_bucket(f, B, &Bp);
    int32_t *in = o->decode_upload(be, bt->tokens, bt->positions, bt->slots, bt->seqs, B, Bp,
                                   kv->block_size, &variant);
    if (!in) return false; /* graphs turned off in the backend */
    PD_ASSERT(variant >= 0 && variant < BACKEND_GRAPH_VARIANTS);
    bucket = bucket * BACKEND_GRAPH_VARIANTS + variant; /* the graph's index from here on */
    if (f->graph_kv != kv) { /* the graphs write another cache's blocks */
        fwd_ctx_use_graphs(f, true);
        f->graph_kv = kv;
    }
    /* A decode step can evict too (a row entering a new block): the graph holds no
     * per-layer waits, so the step waits for every pending copy of the burst once, on
     * the device, before its graph (or the ops it captures) (backend.h copy_async_order). */
    if (o->copy_async_order) o->copy_async_order(be, -1);
    if (f->graph[bucket] && o->graph_launch(be, f->graph[bucket])) {
        f->n_replayed++;
        return true;
    }
    if (f->graph[bucket]) { /* stale: a buffer it reads has moved */
        o->graph_free(be, f->graph[bucket]);
        f->graph[bucket] = NULL;
        f->graph_warm[bucket] = false;
    }
    fwd_batch padded = {Bp, Bp, NULL, NULL, NULL, NULL, NULL, Bp};
    f->in_ids = in;
    f->in_pos = in + Bp;
    f->in_slots = in + 2 * Bp;
    bool capture = f->graph_warm[bucket];
    if (capture) {
        o->graph_begin(be);
        f->capturing = true;
    }
    run_layers(f, kv, &padded);
    o->matmul(be, f->lg, f->xn, m->lm_head, NULL, Bp, m->cfg.dim, m->cfg.vocab_size);
    if (capture) {
        f->capturing = false;
        f->graph[bucket] = o->graph_end(be);
        bool ok = o->graph_launch(be, f->graph[bucket]);
        PD_ASSERT(ok);
        f->n_captured++;
        f->n_replayed++;
    }
    f->graph_warm[bucket] = true;
    return true;
}

void model_forward(fwd_ctx *f, kv_cache *kv, const fwd_batch *bt, float *logits) {
    model *m = f->m;
    backend *be = m->be;
    const backend_ops *o = be->ops;
    int C = m->cfg.dim, V = m->cfg.vocab_size;
    if (decode_graphed(f, kv, bt)) {
        fwd_before_wait(f);
        o->download_f32(be, logits, f->lg, o->act_type, (size_t)bt->B * V);
        return;
    }
    if (!forward_layers(f, kv, bt)) return;
    /* xn now holds the final-normed hidden states of every row. */
    for (int i = 0; i < bt->n_logits; i += f->logit_chunk) {
        int n = PD_MIN(f->logit_chunk, bt->n_logits - i);
        o->gather_rows(be, f->xl, f->xn, bt->logit_rows + i, n, C);
        o->matmul(be, f->lg, f->xl, m->lm_head, NULL, n, C, V);
        fwd_before_wait(f);
        o->download_f32(be, logits + (size_t)i * V, f->lg, o->act_type, (size_t)n * V);
    }
    o->sync(be);
}

/* Host argmax, lowest index on ties (the sampler's greedy rule). */
static int32_t host_argmax(const float *x, int V) {
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

void model_forward_greedy(fwd_ctx *f, kv_cache *kv, const fwd_batch *bt, int32_t *tokens) {
    model *m = f->m;
    backend *be = m->be;
    const backend_ops *o = be->ops;
    int C = m->cfg.dim, V = m->cfg.vocab_size;
    if (!o->argmax_rows && !f->host_lg)
        f->host_lg = xmalloc((size_t)f->logit_chunk * V * sizeof(float));
    if (decode_graphed(f, kv, bt)) {
        int n = bt->B;
        if (o->argmax_rows) {
            o->argmax_rows(be, f->amax, f->lg, n, V);
            fwd_before_wait(f);
            o->copy_d2h(be, tokens, f->amax, (size_t)n * sizeof(int32_t));
        } else {
            fwd_before_wait(f);
            o->download_f32(be, f->host_lg, f->lg, o->act_type, (size_t)n * V);
            for (int r = 0; r < n; r++) tokens[r] = host_argmax(f->host_lg + (size_t)r * V, V);
        }
        return;
    }
    if (!forward_layers(f, kv, bt)) return;
    for (int i = 0; i < bt->n_logits; i += f->logit_chunk) {
        int n = PD_MIN(f->logit_chunk, bt->n_logits - i);
        o->gather_rows(be, f->xl, f->xn, bt->logit_rows + i, n, C);
        o->matmul(be, f->lg, f->xl, m->lm_head, NULL, n, C, V);
        if (o->argmax_rows) {
            o->argmax_rows(be, f->amax, f->lg, n, V);
            fwd_before_wait(f);
            o->copy_d2h(be, tokens + i, f->amax, (size_t)n * sizeof(int32_t));
        } else {
            fwd_before_wait(f);
            o->download_f32(be, f->host_lg, f->lg, o->act_type, (size_t)n * V);
            for (int r = 0; r < n; r++) tokens[i + r] = host_argmax(f->host_lg + (size_t)r * V, V);
        }
    }
    o->sync(be);
}

void model_forward_sample(fwd_ctx *f, kv_cache *kv, const fwd_batch *bt, const sample_row *rows,
                          int32_t *tokens, float *logprobs) {
    model *m = f->m;
    backend *be = m->be;
    const backend_ops *o = be->ops;
    int C = m->cfg.dim, V = m->cfg.vocab_size;
    PD_ASSERT(o->sample_rows);
    int32_t *tok_dev = f->amax;
    float *lp_dev = (float *)(f->amax + f->logit_chunk);
    if (decode_graphed(f, kv, bt)) {
        int n = bt->B;
        o->sample_rows(be, tok_dev, logprobs ? lp_dev : NULL, f->lg, rows, n, V);
        fwd_before_wait(f);
        o->copy_d2h(be, tokens, tok_dev, (size_t)n * sizeof(int32_t));
        if (logprobs) o->copy_d2h(be, logprobs, lp_dev, (size_t)n * sizeof(float));
        return;
    }
    if (!forward_layers(f, kv, bt)) return;
    for (int i = 0; i < bt->n_logits; i += f->logit_chunk) {
        int n = PD_MIN(f->logit_chunk, bt->n_logits - i);
        o->gather_rows(be, f->xl, f->xn, bt->logit_rows + i, n, C);
        o->matmul(be, f->lg, f->xl, m->lm_head, NULL, n, C, V);
        o->sample_rows(be, tok_dev, logprobs ? lp_dev : NULL, f->lg, rows + i, n, V);
        fwd_before_wait(f);
        o->copy_d2h(be, tokens + i, tok_dev, (size_t)n * sizeof(int32_t));
        if (logprobs) o->copy_d2h(be, logprobs + i, lp_dev, (size_t)n * sizeof(float));
    }
    o->sync(be);
}
