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
struct backend_copy;
struct backend_run;
struct backend_copy_timing;
struct sample_row; /* ->sample_rows, below */

/* Graph variants per decode bucket (backend_ops.decode_upload). */
#define BACKEND_GRAPH_VARIANTS 5

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
     * [0, ctx_len): row i of a sequence sits at position ctx_len - q_len + i.
     * seqs NULL: a padded decode step whose metadata decode_upload put in place. */
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

    /* ---- optional: moving KV between processes and to host memory (src/kv/) --------
     * NULL on backends whose memory is host memory. Kept last, like alloc_shared.
     *
     * ipc_export: a handle (BACKEND_IPC_HANDLE_BYTES, opaque) that another process of
     * this host opens with ipc_open to reach the device allocation holding `ptr`, and
     * ptr's byte offset in that allocation (the handle names the allocation's base).
     * 0, or -1 with err. ipc_open maps such a handle (exported by another process, any
     * GPU of this host) and returns the allocation's base in this process, reachable
     * by copy_batch; NULL with err. ipc_close unmaps what ipc_open returned. */
    int (*ipc_export)(backend *b, const void *ptr, uint8_t *handle, uint64_t *offset, char *err,
                      size_t errlen);
    void *(*ipc_open)(backend *b, const uint8_t *handle, char *err, size_t errlen);
    void (*ipc_close)(backend *b, void *base);
    /* copy_batch: the n copies items[i] (dst <- src, bytes), each end being this
     * backend's memory, memory of a peer GPU opened with ipc_open, or host memory
     * (pinned by host_alloc / host_register: fast; any other host memory: correct but
     * slow). All dsts of one batch are one kind of memory, and so are all srcs; items
     * never overlap. Runs on a transfer stream of its own, batched (many small copies
     * cost about one launch), and returns when every byte has landed. It does not wait
     * for ops still queued on the backend: the caller makes sure that what it reads is
     * computed (->sync, or layer_event_wait) and that nothing queued reads what it
     * writes. Thread-safe. */
    void (*copy_batch)(backend *b, const struct backend_copy *items, int n);
    /* Pinned host memory (page-aligned) for staging; NULL when none can be had. */
    void *(*host_alloc)(backend *b, size_t bytes);
    void (*host_free)(backend *b, void *p);
    /* Pins host memory [p, p + bytes) that the caller owns (a shm mapping, an aligned
     * buffer) for fast copy_batch; 0, or -1 (it stays pageable: still correct).
     * host_unregister undoes it before the memory goes away. */
    int (*host_register)(backend *b, void *p, size_t bytes);
    void (*host_unregister)(backend *b, void *p);

    /* ---- optional: decode graphs and sampling on the device (CUDA: graphs.cu,
     * sampling.cu). NULL: the forward pass runs every step op by op and the engine
     * samples on the host. Kept at the end, like the groups above. --------------------
     *
     * decode_upload: the inputs of a decode step in fixed device memory, so that a
     * captured graph can be replayed on later steps with new data. Copies, in one
     * stream-ordered upload, into the backend's decode buffer: ids [Bp], positions
     * [Bp], slots [Bp] (rows B..Bp-1 are padding: id 0, position 0, slot -1, which
     * kv_store skips), then the attention metadata of the B one-row sequences seqs[B]
     * (seqs[i].q_start == i, q_len == 1). ->attention called with seqs == NULL and
     * B == T == Bp reads that metadata (padding rows get zeros). Returns the device
     * address of the ids (positions at +Bp, slots at +2*Bp). The buffer moves only
     * when it grows, which makes the graphs captured before stale (graph_launch
     * says so). Returns NULL, doing nothing, when graphs are turned off (CUDA:
     * PDSERVE_CUDA_GRAPHS=0 in the environment at backend creation). *variant gets the
     * step's graph variant, 0 .. BACKEND_GRAPH_VARIANTS-1: a captured graph serves only
     * later steps of its own bucket and variant (CUDA: the class of the longest context,
     * which sets the decode attention's captured split count). */
    int32_t *(*decode_upload)(backend *b, const int32_t *tokens, const int32_t *positions,
                              const int32_t *slots, const attn_seq *seqs, int B, int Bp,
                              int block_size, int *variant);
    /* graph_begin / graph_end: the ops queued in between are recorded, not run; they
     * must neither allocate nor wait for the device (asserted). graph_end returns the
     * instantiated graph, owned by the caller (graph_free; NULL is a no-op). */
    void (*graph_begin)(backend *b);
    void *(*graph_end)(backend *b);
    /* Queues one replay of g and returns true; returns false, queuing nothing, when a
     * buffer that g's kernels read has moved since its capture: the caller frees g,
     * runs the step op by op and captures again. */
    bool (*graph_launch)(backend *b, void *g);
    void (*graph_free)(backend *b, void *g);
    /* sample_rows: out[n] (backend memory, int32) = one token drawn from each row of
     * x[n, V] (act_type) under the host parameters p[n], by the CPU sampler's rules
     * (engine/sampler.c): temperature below 1e-5 is greedy (lowest id on ties); else
     * logits / temperature, min-p, top-k, then top-p over the candidates ordered by
     * probability descending and id ascending, and the first candidate in that order
     * where the running mass exceeds p->u times the kept mass. u is a uniform draw
     * from the request's own generator on the host (one per token, as the CPU
     * sampler draws), so a seeded request draws the same numbers on either path.
     * logprob (backend memory f32 [n], or NULL): the chosen token's log-softmax under
     * the raw logits. */
    void (*sample_rows)(backend *b, int32_t *out, float *logprob, const void *x,
                        const struct sample_row *p, int n, int V);

    /* ---- optional: layer events for layer-wise KV streaming (CUDA: layer_events.cu).
     * NULL on backends whose ops are finished when they return (the CPU's): a layer's
     * K/V is in memory as soon as its kv_store returns. Kept at the end, like the
     * groups above. --------------------------------------------------------------------
     *
     * On a backend that only queues work, the forward pass records event `layer`
     * right after that layer's kv_store in a step that streams KV out
     * (engine/forward.h: fwd_ctx_set_layer_hook; never in a decode-only step, so never
     * during graph capture), and a transfer thread waits on it before reading the
     * layer's blocks while the GPU goes on with the next layers.
     * layer_events_reserve: makes events 0..n-1 (start-up; may grow, never while a
     *   step runs). layer_event_record: event i marks the work queued so far on the
     *   compute stream. layer_event_wait: blocks the calling thread (any thread) until
     *   the latest record of event i has passed; a record made after the wait began
     *   may extend it, which only ever waits for later work. */
    void (*layer_events_reserve)(backend *b, int n);
    void (*layer_event_record)(backend *b, int i);
    void (*layer_event_wait)(backend *b, int i);

    /* ---- optional: copies that checksum what they move (CUDA: kv_ipc.cu; owner:
     * src/kv/). NULL: the caller sums host bytes itself. Kept at the end. ------------
     *
     * copy_batch_sum: copy_batch of items[n] that also adds, for each item i, the
     * terms of kv_sum (src/kv/kv_sum.h) of the bytes it moves, as read from its src,
     * counted from byte sum_at[i] of the object they belong to, into sums[sum_slot[i]]
     * (0 <= slot < n_sums; host memory, added to, not zeroed). 0 when done (every byte
     * landed, sums updated); -1 having done nothing when the batch cannot be summed on
     * the device (an end not 16-byte aligned, a size or sum_at not a multiple of 16,
     * memory the device cannot reach): the caller copies and sums on the host. */
    int (*copy_batch_sum)(backend *b, const struct backend_copy *items, int n,
                          const int32_t *sum_slot, const uint64_t *sum_at, uint64_t *sums,
                          int n_sums);

    /* ---- optional: fused decode ops (CUDA: kernels.cu; CPU: cpu_fused.c, the twins:
     * the separate ops in sequence). NULL: the forward pass runs the separate ops.
     * Each saves launches on the small-batch decode step. Kept at the end. ----------
     *
     * rope_kv_store: rope (in place on qkv) then kv_store, with the arguments of the
     * two; the same values as the two ops give. */
    void (*rope_kv_store)(backend *b, void *qkv, void *kcache, void *vcache, const int32_t *pos,
                          const int32_t *slots, const rope_params *rp, int T, int H, int K,
                          int D);
    /* matmul_swiglu: out[T,F] = swiglu(x[T,Kd] @ w[2F,Kd]^T), i.e. matmul into gu then
     * swiglu into out; gu [T,2F] is scratch the op may write (its content afterwards
     * is unspecified). */
    void (*matmul_swiglu)(backend *b, void *out, void *gu, const void *x, const void *w, int T,
                          int Kd, int F);

    /* ---- optional: KV copies that overlap the forward pass (CUDA: kv_ipc.cu; owner:
     * src/kv/kv_tiers.c, `serve --kv-offload-async`). NULL on backends whose ops are
     * finished when they return (the CPU's): the caller copies with copy_batch, which
     * returns when every byte has landed. Kept at the end. ----------------------------
     *
     * The eviction burst of a step (the old KV of blocks the step's forward pass is
     * about to overwrite, copied out to pinned host staging) need not finish before
     * that pass starts: layer l's parts of the blocks must only be read before the
     * pass writes layer l's new K/V into them. So:
     *
     * copy_layers_async: queues the copies items[n] (copy_batch's kinds of memory: all
     *   dsts one kind, all srcs one kind, no overlaps), grouped by the cache layer whose
     *   blocks they read: group g is items[g ? group_end[g-1] : 0 .. group_end[g]),
     *   0 <= g < n_groups (one group per layer; empty groups allowed). They run after
     *   every op queued so far on the compute stream (so they read what it computed)
     *   and are ordered with nothing queued later: neither with later compute ops nor
     *   with copy_batch (the caller's or anyone's). Returns at once, without waiting for
     *   the device, the batch's ticket (> 0). items and group_end are copied: the caller
     *   may reuse them on return. Until the batch is ordered or waited for, the caller
     *   writes none of its srcs and reads none of its dsts. A batch queued while groups
     *   of the previous one are pending orders them all first (copy_async_order(b, -1)).
     *   Called by the thread that queues the compute ops (the engine thread), never
     *   during a graph capture.
     * copy_async_order: the compute ops queued after this call wait, on the device, for
     *   group g of the latest batch and the groups before it (g == -1: every group); the
     *   host never waits. A group already ordered, or no batch at all: a no-op, so the
     *   forward pass calls it before every layer's K/V store (engine/forward.c) on every
     *   step. Same thread as copy_layers_async; inside a graph capture only as a no-op
     *   (asserted: the pass orders every group before it launches or captures a decode
     *   graph).
     * copy_async_wait: blocks the calling thread (any thread) until every byte of batch
     *   `ticket` has landed (then its dsts may be read on the host and its srcs
     *   written); at once when it has. */
    uint64_t (*copy_layers_async)(backend *b, const struct backend_copy *items, int n,
                                  const int *group_end, int n_groups);
    void (*copy_async_order)(backend *b, int g);
    void (*copy_async_wait)(backend *b, uint64_t ticket);

    /* ---- optional: one request's block runs over many parts (CUDA: kv_ipc.cu; owner:
     * src/kv/kv_gpu.c). NULL: the caller expands them into copy_batch items. ---------
     *
     * copy_runs: for every part p < n_parts and run r < n_runs,
     *   dst[p] + runs[r].dst_off <- src[p] + runs[r].src_off, runs[r].bytes:
     * the copy_batch of those n_parts x n_runs items (copy_batch's kinds of memory, its
     * stream and ordering; returns when every byte has landed), described by n_runs +
     * n_parts entries instead of their product. A request's KV is that shape: the same
     * block runs in every layer's k and v, only the parts' bases differ. */
    void (*copy_runs)(backend *b, const struct backend_run *runs, int n_runs, void *const *dst,
                      const void *const *src, int n_parts);
    /* copy_timing: where this process's copy_batch and copy_runs calls on b's device
     * spent their time since the previous copy_timing call (which it resets), measured
     * only when the environment has PDSERVE_KV_TIMING (benchmarks: three events and
     * four clock reads per call); 0, or -1 when nothing was measured. */
    int (*copy_timing)(backend *b, struct backend_copy_timing *out);
    /* copy_host_ctas: the most CTAs a copy_batch to or from host memory takes on b's
     * device (PDSERVE_KV_XFER_HOST_CTAS; 0: no cap), what the profiler records beside the
     * copies it times beside its own steps (their slowdown depends on it). NULL: no
     * such cap (the CPU backend). */
    int (*copy_host_ctas)(backend *b);

    /* ---- optional: matmuls made ready before the first request (CUDA: gemm_lt.cu;
     * owner: engine/forward.c) ---------------------------------------------------------
     * matmul_warm: runs matmul(out, x, w, NULL, T, Kd, N) once for each row count T up
     * to t_max at which the backend would otherwise choose or load a kernel on first
     * use (CUDA: one T per row bucket), so that no step pays for that later. out and x
     * have room for t_max rows; what they hold is overwritten. Returns how many row
     * counts it ran (0: nothing to warm on this backend's route). NULL: nothing to warm
     * (the CPU backend). */
    int (*matmul_warm)(backend *b, void *out, const void *x, const void *w, int t_max, int Kd,
                       int N);
} backend_ops;

/* One row's parameters for ->sample_rows (host memory). */
typedef struct sample_row {
    float temperature; /* < 1e-5: greedy */
    float top_p;       /* in (0, 1) to use; otherwise off */
    float min_p;       /* 0: off */
    int top_k;         /* 0 or >= V: off */
    double u;          /* uniform [0, 1) from the request's generator */
} sample_row;

#define BACKEND_IPC_HANDLE_BYTES 64
/* One copy of a copy_batch: dst <- src, `bytes` bytes. */
typedef struct backend_copy {
    void *dst;
    const void *src;
    size_t bytes;
} backend_copy;

/* One run of a copy_runs: dst[p] + dst_off <- src[p] + src_off, `bytes` bytes, per part p. */
typedef struct backend_run {
    uint64_t dst_off, src_off, bytes;
} backend_run;

/* What copy_timing reports: sums over `calls` copy_batch / copy_runs calls. Host times
 * from the call's clock, device times from events on the transfer stream. */
typedef struct backend_copy_timing {
    int calls;
    int items;            /* descriptors built and uploaded (runs + parts for copy_runs) */
    double prep_s;        /* host: call entry (lock, pointer checks) to descriptors built */
    double enqueue_s;     /* host: the upload and launch calls */
    double wait_s;        /* host: launched to the stream's synchronize returning */
    double upload_s;      /* device: start of the call's stream work to the kernel's start
                             (descriptor upload; copy-engine items when there are any) */
    double kernel_s;      /* device: the copy kernel */
} backend_copy_timing;

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
