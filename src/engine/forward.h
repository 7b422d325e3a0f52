/* forward.h: a model's weights on a backend, its paged KV cache, and one batched
 * forward pass over a step that mixes prefill chunks and decode tokens.
 *
 * The forward pass is written once over the backend table (backend.h) and
 * allocates nothing: every buffer is sized at model_load / fwd_ctx_create for the
 * largest step (max_tokens rows) and logged. */
#ifndef PD_FORWARD_H
#define PD_FORWARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "model/model.h"

typedef struct layer_weights {
    void *attn_norm;   /* [C] */
    void *wqkv;        /* [(H+2K)*D, C]: q, k, v projections stacked (one matmul) */
    void *bqkv;        /* [(H+2K)*D] or NULL (attention_bias) */
    void *q_norm;      /* [D] or NULL (qk_norm) */
    void *k_norm;      /* [D] or NULL (qk_norm) */
    void *wo;          /* [C, H*D] */
    void *mlp_norm;    /* [C] */
    void *w_gate_up;   /* [2F, C]: gate rows then up rows (one matmul) */
    void *w_down;      /* [C, F] */
} layer_weights;

typedef struct model {
    model_config cfg;
    backend *be;         /* not owned */
    void *embed;         /* [V, C] */
    layer_weights *layers; /* [L] */
    void *final_norm;    /* [C] */
    void *lm_head;       /* [V, C]; == embed when tied (not freed twice) */
    size_t weight_bytes;
} model;

/* Loads weights onto the backend: from files->weights (converted to the backend's
 * weight type) or, when files->weights is NULL, random normal(0, 0.02) from `seed`
 * (norm weights 1). Returns NULL with err on failure (bad tensors). */
model *model_load(backend *be, const model_files *files, uint64_t seed, char *err, size_t errlen);
void model_free(model *m);

/* The paged KV cache: per layer, k and v of [num_blocks, block_size, K, D]. */
typedef struct kv_cache {
    int n_layers, num_blocks, block_size, n_kv_heads, head_dim;
    dtype type;
    void **k;            /* [L] */
    void **v;            /* [L] */
    size_t block_bytes;  /* bytes of one block of one layer of k (same for v) */
    size_t total_bytes;
    backend *be;         /* the backend holding k and v (not owned) */
    bool on_device;      /* k and v are device memory: reach them through be's copy ops */
    /* kv_cache_create_shared only (else NULL / 0 / ""): the one segment that holds
     * every k[l] and v[l], owned by the cache (unmapped and unlinked by kv_cache_free). */
    void *shm_base;
    size_t shm_bytes;
    char shm_name[64];
} kv_cache;

/* Sizes the cache to `bytes` (rounded down to whole blocks); NULL with err when not
 * even one block fits. */
kv_cache *kv_cache_create(backend *be, const model_config *c, int block_size, size_t bytes,
                          char *err, size_t errlen);
/* The same cache in one POSIX shared-memory segment `shm_name` (backend op
 * alloc_shared), so that a prefill process on this host can write blocks straight
 * into it (src/kv/ gpu medium on the CPU backend). Segment layout, every part
 * [num_blocks, block_size, K, D]: k[0], v[0], k[1], v[1], ..., i.e. k[l] at byte
 * 2*l*num_blocks*block_bytes and v[l] one part further. NULL with err when the
 * backend has no shared memory, the name exists, or not one block fits. */
kv_cache *kv_cache_create_shared(backend *be, const model_config *c, int block_size, size_t bytes,
                                 const char *shm_name, char *err, size_t errlen);
void kv_cache_free(backend *be, kv_cache *kv);

/* One step of work, made by the scheduler (engine.h), host memory. Rows are the
 * concatenation of each sequence's q_len tokens, in seqs order. */
typedef struct fwd_batch {
    int T;                 /* rows */
    int B;                 /* sequences */
    const int32_t *tokens;    /* [T] */
    const int32_t *positions; /* [T] */
    const int32_t *slots;     /* [T]: block * block_size + offset of each row's KV */
    const attn_seq *seqs;     /* [B] */
    const int32_t *logit_rows; /* [n_logits]: rows whose next-token logits are wanted */
    int n_logits;
} fwd_batch;

/* Scratch for forward passes of up to max_tokens rows and max_seqs sequences. */
typedef struct fwd_ctx fwd_ctx;
fwd_ctx *fwd_ctx_create(model *m, int max_tokens, int max_seqs);
void fwd_ctx_free(fwd_ctx *f);
size_t fwd_ctx_bytes(const fwd_ctx *f);

/* Per-layer hook, for layer-wise KV streaming (disaggregated prefill): when set, the
 * forward pass calls fn(user, l) on its own thread right after layer l's kv_store of
 * the step, for l = 0..L-1 in order, once per layer per step, while layers l+1.. are
 * still to come. On the CPU backend layer l's K/V of every row is then in the cache;
 * on a backend with layer events (backend.h) the pass records event l just before
 * the call and the K/V is only queued: a reader on another thread calls
 * ops->layer_event_wait(be, l) first. fn must not block and must not touch the step's
 * rows; it may hand the layer to another thread. NULL (the default) turns it off: the
 * pass then does nothing more per layer than one test of a pointer, so a driver sets
 * it only around the steps that stream KV out (never a decode-only step, which may be
 * captured as a graph) and clears it after. */
typedef void (*fwd_layer_fn)(void *user, int layer);
void fwd_ctx_set_layer_hook(fwd_ctx *f, fwd_layer_fn fn, void *user);

/* One-shot hook for host work that overlaps the step on the device: the next
 * model_forward* calls fn(user) once, on its own thread, once the step's first layer
 * has been queued (an op-by-op step) or its graph launched, and in any case before its
 * first wait for the results (the download of the tokens or logits), then clears the
 * hook. On an asynchronous backend (CUDA) fn runs while the device computes; on the
 * CPU backend the operations queued so far have already run. A
 * pass that returns without results (no rows) does not call it: the driver clears the
 * hook after the pass (NULL) and does the work itself. fn must not touch the step's
 * rows, the cache or the backend. */
typedef void (*fwd_wait_fn)(void *user);
void fwd_ctx_set_wait_hook(fwd_ctx *f, fwd_wait_fn fn, void *user);

/* Runs the step: writes each row's K and V into kv at its slot and, for each of
 * n_logits rows, V logits as f32 into logits (host, [n_logits, V]). On a backend with
 * asynchronous KV copies (backend.h copy_layers_async: an eviction burst's staging
 * copies, --kv-offload-async), every pass (the two below too) orders layer l's pending
 * copies before it stores layer l (copy_async_order, a device-side wait), and all of
 * them once before a decode graph; so once it has returned, they have landed. */
void model_forward(fwd_ctx *f, kv_cache *kv, const fwd_batch *batch, float *logits);
/* The same step, but for each of the n_logits rows only the greedy next token (argmax
 * of its logits, lowest id on ties) into tokens (host, [n_logits]). On a backend
 * with argmax_rows the logits never leave the device (4 bytes per row come back
 * instead of V * 2); elsewhere the rows are downloaded into a host buffer that the
 * first such call allocates. */
void model_forward_greedy(fwd_ctx *f, kv_cache *kv, const fwd_batch *batch, int32_t *tokens);

/* ---- decode graphs and sampling on the device ------------------------------------------
 * On a backend with decode graphs (backend.h: decode_upload, graph_*), the three calls
 * above and below run a decode-only step (one row per sequence, q_start == row, every
 * row's logits wanted in order, no layer hook set) as a replay of a graph captured
 * for its batch bucket (padded to 1, 2, 4, 8, 16, 24, ... rows): op by op the first time a bucket
 * is seen, captured the second time, replayed after. Prefill and mixed steps always
 * run op by op. fwd_ctx_use_graphs(f, false) frees f's graphs and runs every step op
 * by op (A/B runs, tests); true (the default) allows them again. */
void fwd_ctx_use_graphs(fwd_ctx *f, bool on);
/* The rows a graphed decode step of B sequences runs as (its bucket): 1, 2, 4, 8, then
 * the next multiple of 8 (vLLM's capture sizes: padding costs at most 7 rows); a
 * forward context further caps it at its logits chunk. */
int fwd_decode_bucket_rows(int B);
/* Graphs captured and replays run (the capturing step's included) since f was made. */
void fwd_ctx_graph_counts(const fwd_ctx *f, long *captured, long *replayed);
/* The step, then one token per logits row drawn on the device (backend op
 * sample_rows, which the backend must have) under rows[n_logits] (host): tokens
 * (host, [n_logits]) and, when logprobs is not NULL, each chosen token's raw
 * log-softmax (host, [n_logits]). Only those come back from the device. */
void model_forward_sample(fwd_ctx *f, kv_cache *kv, const fwd_batch *batch,
                          const sample_row *rows, int32_t *tokens, float *logprobs);

#endif
