/* backend.h: the operations of one forward pass behind one table of function
 * pointers (ggml-backend's idea). The forward pass (engine/forward.c) is written
 * once over this table; cpu/ is the readable fp32 reference and the oracle for
 * cuda/ (bf16). Every pointer an op takes is backend memory (from ->alloc), except
 * where it says "host".
 *
 * Activations are in the backend's activation type (f32 on the CPU, bf16 on CUDA);
 * weights in its weight type; the KV cache in its kv type. Shapes use the letters of
 * model.h: T tokens in the step, C model dim, H/K query/kv heads, D head dim,
 * F MLP dim, V vocabulary, B sequences in the step.
 *
 * KV cache layout, one allocation per layer and per K/V:
 *   k[layer]: [num_blocks, block_size, K, D]   v[layer]: same
 * so one block of one layer is one contiguous run of block_size*K*D elements: the
 * unit that KV connectors move. */
#ifndef PD_BACKEND_H
#define PD_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

/* Per-sequence metadata of a step, as the attention ops need it (host copy; the
 * backend uploads what it needs in ->attention). */
typedef struct attn_seq {
    int q_start;              /* first row of this sequence in the step's T rows */
    int q_len;                /* rows computed this step (prefill chunk, or 1 for decode) */
    int ctx_len;              /* tokens in the cache once this step's are written */
    const int32_t *block_table; /* host: block ids covering [0, ctx_len) */
    int n_blocks;
} attn_seq;

typedef struct rope_params {
    rope_type type;
    float theta, factor, low_freq_factor, high_freq_factor;
    int original_max_position;
} rope_params;

typedef struct backend backend;

typedef struct backend_ops {
    const char *name;
    dtype act_type;    /* activations */
    dtype weight_type; /* weights */
    dtype kv_type;     /* KV cache */

    /* memory */
    void *(*alloc)(backend *b, size_t bytes);          /* zero-filled; aborts when out */
    void (*free)(backend *b, void *p);                 /* NULL is a no-op */
    size_t (*mem_free)(backend *b);                    /* bytes still allocatable */
    /* host -> backend, converting n elements of src_type to dst_type at dst+offset elems */
    void (*upload)(backend *b, void *dst, dtype dst_type, size_t dst_offset, const void *src,
                   dtype src_type, size_t n);
    /* backend -> host as f32 (n elements of type src_type) */
    void (*download_f32)(backend *b, float *dst, const void *src, dtype src_type, size_t n);
    /* raw bytes both ways (ids, positions, KV blocks) */
    void (*copy_h2d)(backend *b, void *dst, const void *src, size_t bytes);
    void (*copy_d2h)(backend *b, void *dst, const void *src, size_t bytes);
    void (*copy_d2d)(backend *b, void *dst, const void *src, size_t bytes);
    /* n elements of type t, normal(0, scale) from a seed (dummy weights), or a constant */
    void (*fill_random)(backend *b, void *dst, dtype t, size_t n, uint64_t seed, float scale);
    void (*fill)(backend *b, void *dst, dtype t, size_t n, float value);
    void (*sync)(backend *b);

    /* ops: out and in never alias unless the op says so */
    /* out[T,C] = table[ids[t], :]; ids is backend memory [T] int32 */
    void (*embedding)(backend *b, void *out, const void *table, const int32_t *ids, int T, int C);
    /* out[T,C] = x / rms(x) * w */
    void (*rmsnorm)(backend *b, void *out, const void *x, const void *w, int T, int C, float eps);
    /* residual[T,C] += x; out = rmsnorm(residual) * w (fused) */
    void (*add_rmsnorm)(backend *b, void *residual, void *out, const void *x, const void *w, int T,
                        int C, float eps);
    /* out[T,N] = x[T,Kd] @ w[N,Kd]^T (+ bias[N] when not NULL) */
    void (*matmul)(backend *b, void *out, const void *x, const void *w, const void *bias, int T,
                   int Kd, int N);
    /* in place: RMSNorm over each D-long head of x, rows of stride `row_stride` elems,
     * n_heads heads starting at elem offset `head_offset` (Qwen3 q/k norm) */
    void (*head_rmsnorm)(backend *b, void *x, const void *w, int T, int row_stride,
                         int head_offset, int n_heads, int D, float eps);
    /* in place on qkv[T, (H+2K)*D]: rotate the q and k heads at positions pos[T]
     * (backend memory, int32) with rotate-half (Llama/HF) convention */
    void (*rope)(backend *b, void *qkv, const int32_t *pos, const rope_params *rp, int T, int H,
                 int K, int D);
    /* writes the k and v parts of qkv[T,(H+2K)*D] into the caches at slots[T]
     * (slot = block * block_size + offset; backend memory int32) */
    void (*kv_store)(backend *b, void *kcache, void *vcache, const void *qkv,
                     const int32_t *slots, int T, int H, int K, int D);
    /* out[T, H*D]: causal attention of each sequence's q rows over its cache
     * [0, ctx_len): row i of a sequence sits at position ctx_len - q_len + i. */
    void (*attention)(backend *b, void *out, const void *qkv, const void *kcache,
                      const void *vcache, const attn_seq *seqs, int B, int T, int H, int K,
                      int D, int block_size, float scale);
    /* out[T,F] = silu(gu[:, :F]) * gu[:, F:]  with gu [T, 2F] */
    void (*swiglu)(backend *b, void *out, const void *gu, int T, int F);
    /* out[n, C] = x[rows[i], :], rows is host memory */
    void (*gather_rows)(backend *b, void *out, const void *x, const int32_t *rows, int n, int C);

    void (*destroy)(backend *b);

    /* optional (NULL: the caller downloads the rows and takes the argmax on the host):
     * out[n] (backend memory, int32) = the index of the largest of each row of
     * x[n, V] (act_type), the lowest index on ties, as the CPU sampler's greedy. */
    void (*argmax_rows)(backend *b, int32_t *out, const void *x, int n, int V);

    /* optional (NULL: this backend has no shared KV memory): KV memory that another
     * process on this host can map, for disaggregated serving's peer copy (src/kv/).
     * alloc_shared creates the POSIX shared-memory segment `name` ("/pdkv-...";
     * exclusively: an existing name is an error) of `bytes`, zero-filled, and maps
     * it; NULL with err on failure. free_shared unmaps it and removes the name (peers
     * keep their own mappings until they unmap). Kept last so that tables written
     * positionally before them leave them NULL. */
    void *(*alloc_shared)(backend *b, size_t bytes, const char *name, char *err, size_t errlen);
    void (*free_shared)(backend *b, void *p, size_t bytes, const char *name);

    /* true when alloc'd memory is ordinary host memory that the CPU may read and write
     * directly (the CPU backend); false for device memory, which other code reaches
     * only through the copy ops (KV connectors stage it: src/kv/kv_internal.h). */
    bool host_memory;
} backend_ops;

struct backend {
    const backend_ops *ops;
    void *impl;
    int threads;
};

/* The CPU backend: fp32, OpenBLAS matmul, `threads` worker threads (0: all cores). */
backend *backend_cpu_create(int threads);
/* The CUDA backend on GPU `device`; NULL with err when no GPU or no CUDA build. */
backend *backend_cuda_create(int device, char *err, size_t errlen);
void backend_destroy(backend *b);

/* The RoPE parameters of a config (theta, scaling type and its factors). */
rope_params rope_params_from_config(const model_config *c);
/* inv_freq[D/2] of the rotary embedding, computed in float64 as transformers'
 * _compute_*_parameters do (default, linear, llama3) and cast to float; shared by
 * every backend so that all of them rotate by the same angles. */
void rope_inv_freq(const rope_params *rp, int D, float *inv_freq);

#endif
