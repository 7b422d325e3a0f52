/* cuda_common.h: what the CUDA backend's .cu files share (C++ only, never included
 * by the C side): the one checking macro for every CUDA and cuBLAS call, the
 * backend's private state, the pinned staging ring and the launchers each .cu file
 * provides to backend_cuda.cu's op table.
 *
 * Tuned for: one process per GPU, one stream per backend, every op asynchronous on
 * that stream; only download_f32, copy_d2h and sync wait for the GPU. */
#ifndef PD_CUDA_COMMON_H
#define PD_CUDA_COMMON_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

/* util.h spells its no-return functions with C11's _Noreturn, which C++ lacks. */
#define _Noreturn [[noreturn]]
extern "C" {
#include "backend/backend.h"
#include "util/util.h"
}
#undef _Noreturn

/* ---- checking: every CUDA runtime and cuBLAS call goes through CUDA_CHECK ---------
 * A failing call is a broken invariant here (bad pointer, launch error, device
 * lost): print the statement, the error, file and line, then abort. The overloads
 * pick the error-string function by the call's return type. */
[[noreturn]] void cuda_check_fail(const char *stmt, const char *what, const char *file, int line);
static inline void cuda_check(cudaError_t e, const char *stmt, const char *file, int line) {
    if (e != cudaSuccess) cuda_check_fail(stmt, cudaGetErrorString(e), file, line);
}
static inline void cuda_check(cublasStatus_t e, const char *stmt, const char *file, int line) {
    if (e != CUBLAS_STATUS_SUCCESS) cuda_check_fail(stmt, cublasGetStatusString(e), file, line);
}
#define CUDA_CHECK(stmt) cuda_check((stmt), #stmt, __FILE__, __LINE__)
/* After each kernel launch: launch-configuration errors show up here. */
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

/* ---- pinned staging ring ------------------------------------------------------------
 * Host->device copies go through CUDA_STAGE_SLOTS pinned slots: the host writes (or
 * converts) into a slot, queues an async copy on the stream and records the slot's
 * event; the slot is reused once that event has passed. So the caller's host memory
 * is free again when the op returns, and the host never waits for the GPU unless it
 * runs more than CUDA_STAGE_SLOTS copies ahead. */
#define CUDA_STAGE_SLOTS 4
#define CUDA_STAGE_SLOT_BYTES ((size_t)8 << 20)

typedef struct cuda_gemm cuda_gemm;   /* gemm_lt.cu */
typedef struct gemm_entry gemm_entry;

/* Private state of one CUDA backend (backend.impl). Owns every pointer here. */
typedef struct cuda_backend {
    int device;
    cudaStream_t stream;
    cublasHandle_t cublas;
    void *cublas_ws;            /* device: cuBLAS workspace (fixed: graph-capture safe) */
    size_t cublas_ws_bytes;
    cuda_gemm *gemm;            /* cuBLASLt algorithms per row bucket (gemm_lt.cu); NULL:
                                 * every matmul on cublasGemmEx (PDSERVE_CUDA_GEMM=ex) */
    int sm_count;
    double mem_peak_gbs;        /* DRAM peak from the memory clock and bus width (GB/s) */

    uint8_t *stage[CUDA_STAGE_SLOTS];   /* pinned host */
    cudaEvent_t stage_done[CUDA_STAGE_SLOTS];
    int stage_next;

    /* attention metadata: device scratch, grown on demand (never in steady state),
     * and the host copy of what it holds now, so that the 2nd..Lth layer of a step
     * skip the upload. */
    int32_t *attn_meta;         /* device */
    size_t attn_meta_cap;       /* int32 elements */
    int32_t *attn_meta_host;    /* host (malloc): last uploaded content */
    int32_t *attn_meta_tmp;     /* host (malloc): the call's content, being built */
    size_t attn_meta_host_cap;  /* int32 elements of each host buffer */
    size_t attn_meta_len;       /* int32 elements valid in attn_meta and attn_meta_host */

    int32_t *rows;              /* device: gather_rows indices, grown on demand */
    size_t rows_cap;

    /* rope: inverse frequencies [D/2] f32 of the last rope_params seen */
    float *inv_freq;            /* device, capacity ROPE_MAX_HALF */
    rope_params inv_freq_rp;
    int inv_freq_D;             /* 0: nothing cached */

    /* split-K decode attention: partial (acc [D], m, l) per (row, q head, split), fp32;
     * device scratch grown on demand (floats) */
    float *attn_ws;
    float *fa_ws;               /* v3 prefill's split partials (attention_prefill_sm90a.cu) */
    size_t fa_ws_cap;           /* floats */
    size_t attn_ws_cap;
    bool attn_basic;            /* PDSERVE_CUDA_ATTN=basic: first kernel only (A/B runs) */
    /* decode attention kernel choice (attention.cu), read from the environment at the
     * backend's first attention call (the struct starts zeroed: 0 = not read yet):
     * PDSERVE_CUDA_ATTN=v1 or basic -> 1 (the first decode kernel), v2 -> 2 (pipelined,
     * CUDA cores), else 3 (pipelined, tensor cores); PDSERVE_CUDA_ATTN_STAGES (2 or 3)
     * and PDSERVE_CUDA_ATTN_SPLIT (0: automatic, else a fixed split-K count) tune 2, 3. */
    int attn_variant;
    int attn_stages;
    int attn_split;
    int gemv;                   /* PDSERVE_CUDA_GEMV: BACKEND_CUDA_GEMV_* (backend_cuda.h) */

    cudaEvent_t timer_start, timer_stop; /* backend_cuda_timer_* */

    /* ---- decode graphs (graphs.cu) ------------------------------------------------
     * A captured graph holds the device addresses its kernels were given. graph_gen
     * counts the moves of the buffers a decode graph reads (the decode buffer, the
     * split-K scratch, any scratch that grows); a graph captured under another
     * generation is stale and is never launched. */
    bool graphs_on;             /* PDSERVE_CUDA_GRAPHS != "0" at creation */
    bool capturing;             /* between graph_begin and graph_end: no upload, growth
                                 * or wait may happen (asserted) */
    uint64_t graph_gen;
    int32_t *dec;               /* device: the decode buffer (decode_upload's layout) */
    size_t dec_cap;             /* int32 elements */
    int32_t *dec_host;          /* host (malloc): the same layout, being built */
    size_t dec_host_cap;
    int dec_Bp;                 /* rows of the last decode_upload (0: none yet) */
    int dec_keys;               /* the context its graph variant's attention is sized for
                                 * (the class bound; 0: none yet) */

    /* ---- KV copies that overlap the forward pass (kv_ipc.cu, backend.h
     * copy_layers_async): made at the first such batch; NULL until then ---------------- */
    struct cuda_async *async;

    /* ---- sampling on the device (sampling.cu) ---------------------------------------- */
    void *samp_params;          /* device: sample_row [samp_params_cap] */
    size_t samp_params_cap;
    void *samp_lists;           /* device: two candidate lists of V u64 per row, grown on demand */
    size_t samp_lists_cap;      /* bytes */
} cuda_backend;

#define ROPE_MAX_HALF 512

/* The backend's state, with its device made current (cheap when it already is;
 * needed when one process drives several GPUs from one thread). */
static inline cuda_backend *cuda_of(backend *b) {
    cuda_backend *cb = (cuda_backend *)b->impl;
    CUDA_CHECK(cudaSetDevice(cb->device));
    return cb;
}

/* gemm_lt.cu: cuBLASLt matmuls with one algorithm per row bucket. cuda_gemm_lt queues
 * out[T,N] = x[T,Kd] @ w[N,Kd]^T + beta * out (bf16, fp32 accumulation) and returns
 * true, or false when the caller must run it on cublasGemmEx (PDSERVE_CUDA_GEMM=ex, or
 * no algorithm for that bucket). */
void cuda_gemm_init(cuda_backend *cb, bool from_env); /* from_env: PDSERVE_CUDA_GEMM=ex wins */
void cuda_gemm_destroy(cuda_backend *cb);
bool cuda_gemm_lt(cuda_backend *cb, void *out, const void *x, const void *w, int T, int Kd, int N,
                  float beta);
void cuda_gemm_counts(cuda_backend *cb, long *n_lt, long *n_ex, int *n_entries, int *n_tuned);
/* Times the heuristic's candidates for the bucket of t_lo..t_hi (one bucket) at both
 * ends on out, x and w (room for t_hi rows; overwritten) and keeps the fastest at each
 * end, for that end's half of the bucket; once per entry. Start-up (matmul_warm), never in a capture. */
void cuda_gemm_tune(cuda_backend *cb, void *out, const void *x, const void *w, int t_lo, int t_hi,
                    int Kd, int N);

/* Copies `bytes` host bytes to device `dst` through the staging ring, in stream order. */
void cuda_stage_h2d(cuda_backend *cb, void *dst, const void *src, size_t bytes);
/* Grows a device int32 scratch buffer to at least n elements (synchronizes first,
 * so pending work never reads a freed buffer). Start-up or rare. */
void cuda_grow_i32(cuda_backend *cb, int32_t **buf, size_t *cap, size_t n);

static inline unsigned cuda_blocks(size_t n, unsigned threads) {
    size_t g = (n + threads - 1) / threads;
    return (unsigned)(g < 1 ? 1 : g);
}

/* ---- programmatic dependent launch (sm_90+) -----------------------------------------
 * A decode step at batch 1 is ~300 short kernels (5-30 us each); between two of them
 * the SMs idle while the next grid is launched and its blocks are placed. pd_launch
 * starts a kernel with cudaLaunchAttributeProgrammaticStreamSerialization: the GPU may
 * launch it once every block of the kernel before it has called pd_launch_dependents
 * (or exited), so its launch overlaps its predecessor's tail.
 * The rule that keeps this correct: every kernel started by pd_launch calls pd_wait()
 * before it reads anything an earlier operation wrote and before it writes anything
 * (pd_wait returns once the preceding grid has completed and its memory is visible;
 * without a programmatic dependency it returns at once). Only data no operation of a
 * step writes (weights) could be touched before it; an L2 prefetch of the GEMV's first
 * weights there measured no gain (H200, 2026-11-27) and was dropped. Kernels call
 * pd_launch_dependents right after pd_wait: by
 * then all their blocks have started, so a successor's waiting blocks cannot keep any
 * of them from running. Captured into a decode graph, the attribute becomes a
 * programmatic edge. Measured on an H200 (8B decode): inside decode graphs it changes
 * nothing (graphs already launch back to back); op by op (prefill and mixed steps,
 * PDSERVE_CUDA_GRAPHS=0) it saves about 0.2 ms a step, 4% at batch 1 and 2-3% at 64.
 * PDSERVE_CUDA_PDL=0 (read at backend creation) launches every kernel plainly, for A/B
 * runs; devices before sm_90 never use it. */
extern bool cuda_pdl_on;

template <class T> struct pd_same {
    typedef T type;
};

/* kernel<<<grid, block, smem, stream>>>(args...), with the attribute when cuda_pdl_on;
 * the arguments convert to the kernel's parameter types as in a plain call */
template <typename... P>
static inline void pd_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, typename pd_same<P>::type... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = cuda_pdl_on ? 1 : 0;
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

__device__ __forceinline__ void pd_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pd_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* both, first thing in a kernel that touches nothing before its predecessor is done */
__device__ __forceinline__ void pd_enter() {
    pd_wait();
    pd_launch_dependents();
}

/* ---- launchers (kernels.cu, attention.cu): assert shapes, launch, check ---------- */
void cuda_embedding(backend *b, void *out, const void *table, const int32_t *ids, int T, int C);
void cuda_rmsnorm(backend *b, void *out, const void *x, const void *w, int T, int C, float eps);
void cuda_add_rmsnorm(backend *b, void *residual, void *out, const void *x, const void *w, int T,
                      int C, float eps);
void cuda_head_rmsnorm(backend *b, void *x, const void *w, int T, int row_stride, int head_offset,
                       int n_heads, int D, float eps);
void cuda_rope(backend *b, void *qkv, const int32_t *pos, const rope_params *rp, int T, int H, int K,
               int D);
void cuda_kv_store(backend *b, void *kcache, void *vcache, const void *qkv, const int32_t *slots,
                   int T, int H, int K, int D);
void cuda_swiglu(backend *b, void *out, const void *gu, int T, int F);
void cuda_gather_rows(backend *b, void *out, const void *x, const int32_t *rows, int n, int C);
/* out[T,N] = bias[N] on every row (the matmul then adds x @ w^T with beta = 1) */
void cuda_bias_rows(cuda_backend *cb, __nv_bfloat16 *out, const __nv_bfloat16 *bias, int T, int N);
void cuda_fill_random(backend *b, void *dst, dtype t, size_t n, uint64_t seed, float scale);
void cuda_fill(backend *b, void *dst, dtype t, size_t n, float value);
void cuda_argmax_rows(backend *b, int32_t *out, const void *x, int n, int V);
/* small-batch matmul (T <= 8, Kd % 8 == 0, 16-byte aligned x and w): a weight stream */
bool cuda_gemv_supports(int T, int Kd, const void *x, const void *w);
void cuda_gemv(cuda_backend *cb, __nv_bfloat16 *out, const __nv_bfloat16 *x,
               const __nv_bfloat16 *w, const __nv_bfloat16 *bias, int T, int Kd, int N);
/* once per process before the first cuda_gemv* (sets kernel attributes; not in a capture) */
void cuda_gemv_init(void);
/* out[T,F] = swiglu(x @ w[2F,Kd]^T) by the GEMV, same conditions */
void cuda_gemv_swiglu(cuda_backend *cb, __nv_bfloat16 *out, const __nv_bfloat16 *x,
                      const __nv_bfloat16 *w, int T, int Kd, int F);
/* rope then kv_store in one kernel (backend.h rope_kv_store) */
void cuda_rope_kv_store(backend *b, void *qkv, void *kcache, void *vcache, const int32_t *pos,
                        const int32_t *slots, const rope_params *rp, int T, int H, int K, int D);
/* attention_prefill.cu: tensor-core causal attention for prefill chunks (D 64, 128).
 * T: rows of the step (qkv's rows); n_slots: cache slots the step's block tables reach
 * (largest block id + 1, times bs): the extent of v3's tensor maps; max_keys: the longest
 * context among the tiles' sequences (v3 splits its key tiles over blocks by it). */
bool cuda_attention_prefill_supports(int D);
void cuda_attention_prefill(cuda_backend *cb, __nv_bfloat16 *out, const __nv_bfloat16 *qkv,
                            const __nv_bfloat16 *kc, const __nv_bfloat16 *vc, const int32_t *tiles,
                            int n_tiles, const int32_t *seqs, const int32_t *tables, int T, int H,
                            int K, int D, int bs, int64_t n_slots, int max_keys, float scale);
/* attention_prefill_sm90a.cu: v3 (wgmma + TMA). _fits: whether the shape allows it
 * (D 64 or 128, bs a power of two >= 8 or a multiple of 128, scale > 0). The launcher
 * returns false, having launched nothing, where v3 cannot run (shape, or a device
 * other than sm_90: logged once); the caller then runs v2. */
bool cuda_attention_prefill_v3_fits(int D, int bs, float scale);
bool cuda_attention_prefill_v3(cuda_backend *cb, __nv_bfloat16 *out, const __nv_bfloat16 *qkv,
                               const __nv_bfloat16 *kc, const __nv_bfloat16 *vc,
                               const int32_t *tiles, int n_tiles, const int32_t *seqs,
                               const int32_t *tables, int T, int H, int K, int D, int bs,
                               int64_t n_slots, int max_keys, float scale);
void cuda_attention(backend *b, void *out, const void *qkv, const void *kcache, const void *vcache,
                    const attn_seq *seqs, int B, int T, int H, int K, int D, int block_size,
                    float scale);

/* ---- decode graphs (graphs.cu) and device sampling (sampling.cu) ------------------- */
/* The attention metadata of B one-row sequences padded to Bp rows, in attention.cu's
 * layout with T = B = Bp, written at m (host); returns its int32 length. With m NULL,
 * returns the length only. */
size_t cuda_attention_decode_meta(int32_t *m, const attn_seq *seqs, int B, int Bp, int block_size);
/* Called by every function that frees or moves a device buffer a graph may read:
 * asserts no capture is under way and makes the graphs captured so far stale. */
void cuda_graph_buffers_moved(cuda_backend *cb);
int32_t *cuda_decode_upload(backend *b, const int32_t *tokens, const int32_t *positions,
                            const int32_t *slots, const attn_seq *seqs, int B, int Bp,
                            int block_size, int *variant);
void cuda_graph_begin(backend *b);
void *cuda_graph_end(backend *b);
bool cuda_graph_launch(backend *b, void *g);
void cuda_graph_free(backend *b, void *g);
void cuda_sample_rows(backend *b, int32_t *out, float *logprob, const void *x,
                      const struct sample_row *p, int n, int V);
/* Frees what graphs.cu and sampling.cu hold (backend destruction). */
void cuda_graphs_destroy(cuda_backend *cb);

#endif
