/* backend_cuda.cu: the CUDA backend's op table (backend.h) on one GPU: bf16 weights,
 * activations and KV cache, fp32 accumulation. This file holds the backend's life
 * cycle, memory, host<->device transfers and the matmul (cuBLAS); the kernels live
 * in kernels.cu and attention.cu.
 *
 * One stream per backend: every op is queued on it and returns at once; only
 * download_f32, copy_d2h and sync wait. Host->device copies go through a ring of
 * pinned staging slots (cuda_common.h), so the caller may reuse its host memory as
 * soon as an op returns. Tuned for a serving loop: nothing here allocates device
 * memory per token (scratch buffers grow on first use and then stay). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/backend_cuda.h"
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/kv_ipc.h"
#include "backend/cuda/layer_events.h"

[[noreturn]] void cuda_check_fail(const char *stmt, const char *what, const char *file, int line) {
    fprintf(stderr, "pdserve: CUDA error: %s: '%s' failed at %s:%d\n", what, stmt, file, line);
    fflush(stderr);
    abort();
}

/* ---- staging ring ---------------------------------------------------------------- */

/* Returns the next pinned slot, waiting until the copy that last used it is done. */
static uint8_t *stage_take(cuda_backend *cb, int *slot) {
    PD_ASSERT(!cb->capturing); /* a graph must not record a copy from a staging slot */
    int s = cb->stage_next;
    cb->stage_next = (s + 1) % CUDA_STAGE_SLOTS;
    CUDA_CHECK(cudaEventSynchronize(cb->stage_done[s]));
    *slot = s;
    return cb->stage[s];
}

static void stage_send(cuda_backend *cb, int slot, void *dst, size_t bytes) {
    CUDA_CHECK(cudaMemcpyAsync(dst, cb->stage[slot], bytes, cudaMemcpyHostToDevice, cb->stream));
    CUDA_CHECK(cudaEventRecord(cb->stage_done[slot], cb->stream));
}

void cuda_stage_h2d(cuda_backend *cb, void *dst, const void *src, size_t bytes) {
    for (size_t done = 0; done < bytes;) {
        size_t n = PD_MIN(bytes - done, CUDA_STAGE_SLOT_BYTES);
        int slot;
        uint8_t *p = stage_take(cb, &slot);
        memcpy(p, (const uint8_t *)src + done, n);
        stage_send(cb, slot, (uint8_t *)dst + done, n);
        done += n;
    }
}

void cuda_grow_i32(cuda_backend *cb, int32_t **buf, size_t *cap, size_t n) {
    if (n <= *cap) return;
    cuda_graph_buffers_moved(cb);
    size_t want = PD_MAX(n, *cap * 2);
    want = PD_MAX(want, (size_t)1024);
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    if (*buf) CUDA_CHECK(cudaFree(*buf));
    CUDA_CHECK(cudaMalloc((void **)buf, want * sizeof(int32_t)));
    *cap = want;
}

/* ---- memory ---------------------------------------------------------------------- */

static void *cu_alloc(backend *b, size_t bytes) {
    cuda_backend *cb = cuda_of(b);
    void *p = NULL;
    size_t n = bytes ? bytes : 16;
    PD_ASSERT(!cb->capturing);
    cudaError_t e = cudaMalloc(&p, n);
    if (e != cudaSuccess) {
        size_t fr = 0, total = 0;
        cudaMemGetInfo(&fr, &total);
        pd_die("CUDA device %d: cannot allocate %zu bytes (%zu free of %zu): %s", cb->device, n, fr,
               total, cudaGetErrorString(e));
    }
    CUDA_CHECK(cudaMemsetAsync(p, 0, n, cb->stream));
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    return p;
}

static void cu_free(backend *b, void *p) {
    if (!p) return;
    PD_ASSERT(!cuda_of(b)->capturing);
    /* queued work may still read p: let it finish first */
    CUDA_CHECK(cudaStreamSynchronize(cuda_of(b)->stream));
    CUDA_CHECK(cudaFree(p));
}

static size_t cu_mem_free(backend *b) {
    size_t fr = 0, total = 0;
    CUDA_CHECK(cudaMemGetInfo(&fr, &total));
    return fr;
}

/* ---- host <-> device with conversion ------------------------------------------------ */

static bool is_float_type(dtype t) { return t == DTYPE_F32 || t == DTYPE_F16 || t == DTYPE_BF16; }

static float host_to_f32(const void *src, dtype t, size_t i) {
    switch (t) {
    case DTYPE_F32: return ((const float *)src)[i];
    case DTYPE_F16: return f16_to_f32(((const uint16_t *)src)[i]);
    case DTYPE_BF16: return bf16_to_f32(((const uint16_t *)src)[i]);
    case DTYPE_I32: return (float)((const int32_t *)src)[i];
    default: PD_ASSERT(!"bad dtype");
    }
    return 0;
}

/* Converts n elements src[i0..] (src_type) to dst (dst_type), host side. */
static void host_convert(void *dst, dtype dst_type, const void *src, dtype src_type, size_t i0,
                         size_t n) {
    if (dst_type == src_type) {
        size_t es = dtype_size(src_type);
        memcpy(dst, (const uint8_t *)src + i0 * es, n * es);
        return;
    }
    PD_ASSERT(is_float_type(dst_type) && (is_float_type(src_type) || src_type == DTYPE_I32));
    for (size_t i = 0; i < n; i++) {
        float v = host_to_f32(src, src_type, i0 + i);
        switch (dst_type) {
        case DTYPE_F32: ((float *)dst)[i] = v; break;
        case DTYPE_F16: ((uint16_t *)dst)[i] = f32_to_f16(v); break;
        default: ((uint16_t *)dst)[i] = f32_to_bf16(v); break;
        }
    }
}

/* host src (src_type) -> device dst (dst_type) at dst_offset elements. Converts on
 * the host into pinned slots; each slot's copy overlaps the next slot's conversion. */
static void cu_upload(backend *b, void *dst, dtype dst_type, size_t dst_offset, const void *src,
                      dtype src_type, size_t n) {
    cuda_backend *cb = cuda_of(b);
    size_t des = dtype_size(dst_type);
    PD_ASSERT(des > 0 && dtype_size(src_type) > 0);
    PD_ASSERT(dst_type != DTYPE_I32 || src_type == DTYPE_I32);
    uint8_t *d = (uint8_t *)dst + dst_offset * des;
    size_t per = CUDA_STAGE_SLOT_BYTES / PD_MAX(des, dtype_size(src_type));
    for (size_t i = 0; i < n;) {
        size_t m = PD_MIN(n - i, per);
        int slot;
        uint8_t *p = stage_take(cb, &slot);
        host_convert(p, dst_type, src, src_type, i, m);
        stage_send(cb, slot, d + i * des, m * des);
        i += m;
    }
}

/* device src (src_type) -> host f32. Waits for all queued work. */
static void cu_download_f32(backend *b, float *dst, const void *src, dtype src_type, size_t n) {
    cuda_backend *cb = cuda_of(b);
    size_t es = dtype_size(src_type);
    PD_ASSERT(es > 0);
    size_t per = CUDA_STAGE_SLOT_BYTES / es;
    for (size_t i = 0; i < n;) {
        size_t m = PD_MIN(n - i, per);
        int slot;
        uint8_t *p = stage_take(cb, &slot);
        CUDA_CHECK(cudaMemcpyAsync(p, (const uint8_t *)src + i * es, m * es, cudaMemcpyDeviceToHost,
                                   cb->stream));
        CUDA_CHECK(cudaEventRecord(cb->stage_done[slot], cb->stream));
        CUDA_CHECK(cudaEventSynchronize(cb->stage_done[slot]));
        host_convert(dst + i, DTYPE_F32, p, src_type, 0, m);
        i += m;
    }
}

static void cu_copy_h2d(backend *b, void *dst, const void *src, size_t bytes) {
    cuda_stage_h2d(cuda_of(b), dst, src, bytes);
}

static void cu_copy_d2h(backend *b, void *dst, const void *src, size_t bytes) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(!cb->capturing);
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cb->stream));
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
}

static void cu_copy_d2d(backend *b, void *dst, const void *src, size_t bytes) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda_of(b)->stream));
}

static void cu_sync(backend *b) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(!cb->capturing);
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
}

/* ---- matmul ------------------------------------------------------------------------ */

/* ---- small-T routing: the GEMV (kernels.cu) or cuBLAS ---------------------------------
 * Kernel by kernel (bench_kernels_cuda's "GEMV vs cuBLAS" table, H200, 2026-11-27;
 * cuBLAS time / GEMV time; the GEMV costs the same from T = 1 to 8):
 *   o        4096 x 4096    1.42-1.44x  (GEMV 70% of the copy rate, cuBLAS 50%)
 *   qkv      6144 x 4096    1.14x at T = 1, 1.07x at T = 8  (75%; cuBLAS 65-71%)
 *   down     4096 x 14336   0.95x at T = 1, 0.99x at T = 8  (84-86%; cuBLAS 86-88%)
 *   gate_up  28672 x 4096   0.87x;   lm_head 128256 x 4096  0.93x  (cuBLAS 98-104%)
 * which gave the "small" rule: the GEMV up to 32M weights, cuBLAS above. In a decode step
 * the GEMV also starts streaming its weights during the kernel before it (gemv_kernel
 * `early`, programmatic launch), fuses swiglu into gate_up and leaves no gap behind
 * cuBLAS, and then the card decides (whole 8B steps, 2026-11-28,
 * docs/results/cuda-model.md):
 *   H100 (3.35 TB/s peak)  the GEMV everywhere: B=1 5.62 ms (1.12x the floor) against
 *                          5.88 with "small" (1.18x); B=8 6.57 against 6.84
 *   H200 (4.9 TB/s peak)   "small": B=1 ctx=128 4.27-4.29 ms (1.20x) against 4.39-4.40
 *                          with the GEMV everywhere (1.23-1.24x); at ctx=2048 the GEMV
 *                          everywhere wins (4.83-4.84 against 4.93), at B=8 a draw
 * (the faster card needs more bytes in flight than the GEMV keeps on a long stream). So
 * auto is the GEMV for every T <= 8 on a card under 4 TB/s of peak DRAM bandwidth, and
 * "small" above; PDSERVE_CUDA_GEMV=1 / small force either (A/B). */
static bool gemv_small_picks(int T, int Kd, int N) {
    return T >= 1 && T <= 8 && Kd % 8 == 0 && (size_t)N * (size_t)Kd <= ((size_t)32 << 20);
}

#define GEMV_ALL_BELOW_GBS 4000.0 /* peak DRAM GB/s under which auto streams every T <= 8 */

/* auto's pick on a card of the given peak DRAM bandwidth (GB/s; 0: unknown -> small) */
extern "C" bool backend_cuda_gemv_auto_picks_on(double mem_peak_gbs, int T, int Kd, int N) {
    if (mem_peak_gbs > 0 && mem_peak_gbs < GEMV_ALL_BELOW_GBS) return T >= 1 && T <= 8 && Kd % 8 == 0;
    return gemv_small_picks(T, Kd, N);
}

/* auto's pick on an H200-class card (what the kernel tables above were measured on) */
extern "C" bool backend_cuda_gemv_auto_picks(int T, int Kd, int N) {
    return backend_cuda_gemv_auto_picks_on(0, T, Kd, N);
}

static bool gemv_route(const cuda_backend *cb, int T, int Kd, int N, const void *x, const void *w) {
    if (cb->gemv == BACKEND_CUDA_GEMV_OFF || !cuda_gemv_supports(T, Kd, x, w)) return false;
    if (cb->gemv == BACKEND_CUDA_GEMV_SMALL) return gemv_small_picks(T, Kd, N);
    return cb->gemv == BACKEND_CUDA_GEMV_ON ||
           backend_cuda_gemv_auto_picks_on(cb->mem_peak_gbs, T, Kd, N);
}

/* out[T,N] = x[T,Kd] @ w[N,Kd]^T (+ bias[N]); bf16 in and out, fp32 accumulation.
 * cuBLAS is column-major: a row-major [R,C] matrix is a column-major [C,R] one. So
 * out^T [N,T] = (w as col-major [Kd,N])^T * (x as col-major [Kd,T]): op(A) = T on
 * w with lda = Kd, op(B) = N on x with ldb = Kd, ldc = N. The bias is broadcast into
 * out first and added by the GEMM with beta = 1 (one rounding, in fp32). */
static void cu_matmul(backend *b, void *out, const void *x, const void *w, const void *bias, int T,
                      int Kd, int N) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T > 0 && Kd > 0 && N > 0);
    if (gemv_route(cb, T, Kd, N, x, w)) { /* decode: a weight stream */
        cuda_gemv(cb, (__nv_bfloat16 *)out, (const __nv_bfloat16 *)x, (const __nv_bfloat16 *)w,
                  (const __nv_bfloat16 *)bias, T, Kd, N);
        return;
    }
    float alpha = 1.0f, beta = 0.0f;
    if (bias) {
        cuda_bias_rows(cb, (__nv_bfloat16 *)out, (const __nv_bfloat16 *)bias, T, N);
        beta = 1.0f;
    }
    if (cuda_gemm_lt(cb, out, x, w, T, Kd, N, beta)) return;
    CUDA_CHECK(cublasGemmEx(cb->cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, Kd, &alpha, w, CUDA_R_16BF,
                            Kd, x, CUDA_R_16BF, Kd, &beta, out, CUDA_R_16BF, N,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* backend.h matmul_warm: for each row bucket up to t_max (gemm_lt.cu), the algorithms
 * chosen by timing the heuristic's candidates at the bucket's two ends (up to
 * GEMM_TUNE_MAX_ROWS; above, the heuristic's pick for the top), then one matmul at its
 * top, so that no request pays for choosing or loading a kernel. */
#define GEMM_TUNE_MAX_ROWS 4096 /* above, a candidate's matmul runs milliseconds and 64
                                 * of them per bucket would add seconds to start-up, for
                                 * compute-bound shapes the heuristic picks well */
static int cu_matmul_warm(backend *b, void *out, const void *x, const void *w, int t_max, int Kd,
                          int N) {
    cuda_backend *cb = cuda_of(b);
    if (!cb->gemm) return 0;
    int ran = 0;
    for (int T = 1; T <= t_max;) {
        int top = cuda_gemm_bucket(T);
        int hi = PD_MIN(top, t_max);
        if (!gemv_route(cb, hi, Kd, N, x, w)) {
            if (hi <= GEMM_TUNE_MAX_ROWS) cuda_gemm_tune(cb, out, x, w, T, hi, Kd, N);
            cu_matmul(b, out, x, w, NULL, hi, Kd, N);
            ran++;
        }
        T = top + 1;
    }
    return ran;
}

/* backend.h matmul_swiglu: the GEMV with swiglu in its epilogue where the gate_up
 * shape is routed to the GEMV (gu untouched); else cuBLAS into gu, then swiglu. */
static void cu_matmul_swiglu(backend *b, void *out, void *gu, const void *x, const void *w, int T,
                             int Kd, int F) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(T > 0 && Kd > 0 && F > 0);
    if (gemv_route(cb, T, Kd, 2 * F, x, w)) {
        cuda_gemv_swiglu(cb, (__nv_bfloat16 *)out, (const __nv_bfloat16 *)x,
                         (const __nv_bfloat16 *)w, T, Kd, F);
        return;
    }
    cu_matmul(b, gu, x, w, NULL, T, Kd, 2 * F);
    cuda_swiglu(b, out, gu, T, F);
}

/* ---- life cycle -------------------------------------------------------------------- */

static void cu_destroy(backend *b);

static const backend_ops cuda_ops = {
    "cuda",
    DTYPE_BF16,
    DTYPE_BF16,
    DTYPE_BF16,
    cu_alloc,
    cu_free,
    cu_mem_free,
    cu_upload,
    cu_download_f32,
    cu_copy_h2d,
    cu_copy_d2h,
    cu_copy_d2d,
    cuda_fill_random,
    cuda_fill,
    cu_sync,
    cuda_embedding,
    cuda_rmsnorm,
    cuda_add_rmsnorm,
    cu_matmul,
    cuda_head_rmsnorm,
    cuda_rope,
    cuda_kv_store,
    cuda_attention,
    cuda_swiglu,
    cuda_gather_rows,
    cu_destroy,
    cuda_argmax_rows,
    NULL, /* alloc_shared: device KV is shared through IPC handles instead */
    NULL, /* free_shared */
    false, /* host_memory */
    /* moving KV between processes (kv_ipc.cu) */
    cuda_kv_ipc_export,
    cuda_kv_ipc_open,
    cuda_kv_ipc_close,
    cuda_kv_copy_batch,
    cuda_kv_host_alloc,
    cuda_kv_host_free,
    cuda_kv_host_register,
    cuda_kv_host_unregister,
    /* decode graphs and sampling on the device: set by name in cuda_ops_with_graphs below */
    NULL, /* decode_upload */
    NULL, /* graph_begin */
    NULL, /* graph_end */
    NULL, /* graph_launch */
    NULL, /* graph_free */
    NULL, /* sample_rows */
    /* layer events for layer-wise KV streaming (layer_events.cu) */
    cuda_layer_events_reserve,
    cuda_layer_event_record,
    cuda_layer_event_wait,
    /* copies that checksum what they move (kv_ipc.cu; the cpu store's entries) */
    cuda_kv_copy_batch_sum,
};

/* ---- decode graphs, device sampling and fused decode ops: their part of the table ----
 * Set by name on a copy of the table above, so that this group stays apart from the
 * positional list (graphs.cu, sampling.cu, kernels.cu). */
static const backend_ops *cuda_ops_with_graphs(void) {
    static const backend_ops table = [] {
        backend_ops o = cuda_ops;
        o.decode_upload = cuda_decode_upload;
        o.graph_begin = cuda_graph_begin;
        o.graph_end = cuda_graph_end;
        o.graph_launch = cuda_graph_launch;
        o.graph_free = cuda_graph_free;
        o.sample_rows = cuda_sample_rows;
        o.rope_kv_store = cuda_rope_kv_store;
        o.matmul_swiglu = cu_matmul_swiglu;
        o.copy_layers_async = cuda_kv_copy_layers_async; /* kv_ipc.cu */
        o.copy_async_order = cuda_kv_copy_async_order;
        o.copy_async_wait = cuda_kv_copy_async_wait;
        o.copy_runs = cuda_kv_copy_runs;
        o.copy_timing = cuda_kv_copy_timing;
        o.copy_host_ctas = cuda_kv_copy_host_ctas;
        o.matmul_warm = cu_matmul_warm;
        return o;
    }();
    return &table;
}

/* The same without the fused decode ops (PDSERVE_CUDA_FUSED=0: A/B runs; the forward
 * pass then runs rope, kv_store, matmul and swiglu one by one). */
static const backend_ops *cuda_ops_unfused(void) {
    static const backend_ops table = [] {
        backend_ops o = *cuda_ops_with_graphs();
        o.rope_kv_store = NULL;
        o.matmul_swiglu = NULL;
        return o;
    }();
    return &table;
}

static void cu_destroy(backend *b) {
    if (!b) return;
    cuda_backend *cb = cuda_of(b);
    CUDA_CHECK(cudaSetDevice(cb->device));
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    cuda_kv_async_release(b);
    cuda_layer_events_release(b);
    for (int i = 0; i < CUDA_STAGE_SLOTS; i++) {
        CUDA_CHECK(cudaFreeHost(cb->stage[i]));
        CUDA_CHECK(cudaEventDestroy(cb->stage_done[i]));
    }
    CUDA_CHECK(cudaEventDestroy(cb->timer_start));
    CUDA_CHECK(cudaEventDestroy(cb->timer_stop));
    cuda_gemm_destroy(cb);
    CUDA_CHECK(cublasDestroy(cb->cublas));
    CUDA_CHECK(cudaFree(cb->cublas_ws));
    if (cb->attn_meta) CUDA_CHECK(cudaFree(cb->attn_meta));
    if (cb->rows) CUDA_CHECK(cudaFree(cb->rows));
    if (cb->attn_ws) CUDA_CHECK(cudaFree(cb->attn_ws));
    if (cb->fa_ws) CUDA_CHECK(cudaFree(cb->fa_ws));
    CUDA_CHECK(cudaFree(cb->inv_freq));
    CUDA_CHECK(cudaStreamDestroy(cb->stream));
    free(cb->attn_meta_host);
    free(cb->attn_meta_tmp);
    cuda_graphs_destroy(cb);
    free(cb);
    free(b);
}

/* Returns NULL with a sentence in err when there is no usable GPU `device` (the only
 * failure that comes from outside); every later CUDA failure aborts. */
extern "C" backend *backend_cuda_create(int device, char *err, size_t errlen) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        pd_errorf(err, errlen, "no CUDA GPU available (%s)",
                  e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return NULL;
    }
    if (device < 0 || device >= n) {
        pd_errorf(err, errlen, "CUDA device %d does not exist (%d present)", device, n);
        return NULL;
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    if (prop.major < 8) {
        pd_errorf(err, errlen, "CUDA device %d (%s) has compute capability %d.%d; bf16 needs 8.0+",
                  device, prop.name, prop.major, prop.minor);
        return NULL;
    }
    CUDA_CHECK(cudaSetDevice(device));
    cuda_backend *cb = (cuda_backend *)xcalloc(1, sizeof *cb);
    cb->device = device;
    cb->sm_count = prop.multiProcessorCount;
    int mem_khz = 0, bus_bits = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device));
    cb->mem_peak_gbs = 2.0 * mem_khz * 1e3 * bus_bits / 8 / 1e9; /* double data rate */
    CUDA_CHECK(cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking));
    CUDA_CHECK(cublasCreate(&cb->cublas));
    CUDA_CHECK(cublasSetStream(cb->cublas, cb->stream));
    cb->cublas_ws_bytes = (size_t)32 << 20;
    CUDA_CHECK(cudaMalloc(&cb->cublas_ws, cb->cublas_ws_bytes));
    CUDA_CHECK(cublasSetWorkspace(cb->cublas, cb->cublas_ws, cb->cublas_ws_bytes));
    CUDA_CHECK(cublasSetMathMode(cb->cublas, CUBLAS_DEFAULT_MATH));
    cuda_gemm_init(cb, true);
    for (int i = 0; i < CUDA_STAGE_SLOTS; i++) {
        CUDA_CHECK(cudaHostAlloc((void **)&cb->stage[i], CUDA_STAGE_SLOT_BYTES, cudaHostAllocDefault));
        CUDA_CHECK(cudaEventCreateWithFlags(&cb->stage_done[i], cudaEventDisableTiming));
        CUDA_CHECK(cudaEventRecord(cb->stage_done[i], cb->stream));
    }
    CUDA_CHECK(cudaEventCreate(&cb->timer_start));
    CUDA_CHECK(cudaEventCreate(&cb->timer_stop));
    CUDA_CHECK(cudaMalloc((void **)&cb->inv_freq, ROPE_MAX_HALF * sizeof(float)));
    cuda_gemv_init();
    /* programmatic dependent launch (cuda_common.h): sm_90 and later, unless
     * PDSERVE_CUDA_PDL=0; one process-wide switch, off once any device lacks it */
    static bool pdl_read;
    const char *pdl = getenv("PDSERVE_CUDA_PDL");
    if (!pdl_read) cuda_pdl_on = !(pdl && strcmp(pdl, "0") == 0);
    pdl_read = true;
    if (prop.major < 9) cuda_pdl_on = false;
    const char *attn = getenv("PDSERVE_CUDA_ATTN");
    cb->attn_basic = attn && strcmp(attn, "basic") == 0;
    backend *b = (backend *)xcalloc(1, sizeof *b);
    const char *graphs = getenv("PDSERVE_CUDA_GRAPHS");
    cb->graphs_on = !(graphs && strcmp(graphs, "0") == 0);
    const char *gemv = getenv("PDSERVE_CUDA_GEMV");
    cb->gemv = !gemv                   ? BACKEND_CUDA_GEMV_AUTO
               : strcmp(gemv, "0") == 0 ? BACKEND_CUDA_GEMV_OFF
               : strcmp(gemv, "1") == 0 ? BACKEND_CUDA_GEMV_ON
               : strcmp(gemv, "small") == 0 ? BACKEND_CUDA_GEMV_SMALL
                                        : BACKEND_CUDA_GEMV_AUTO;
    const char *fused = getenv("PDSERVE_CUDA_FUSED");
    b->ops = fused && strcmp(fused, "0") == 0 ? cuda_ops_unfused() : cuda_ops_with_graphs();
    b->impl = cb;
    b->threads = 0;
    bool all = cb->gemv == BACKEND_CUDA_GEMV_ON ||
               (cb->gemv == BACKEND_CUDA_GEMV_AUTO && backend_cuda_gemv_auto_picks_on(cb->mem_peak_gbs, 1, 8, 1 << 30));
    log_info("cuda backend: device %d %s, %d SMs, %.1f GiB (%.0f GB/s peak DRAM), programmatic "
             "launch %s; matmuls: %s; of 1-8 rows: %s", device, prop.name, prop.multiProcessorCount,
             (double)prop.totalGlobalMem / (1 << 30), cb->mem_peak_gbs, cuda_pdl_on ? "on" : "off",
             cb->gemm ? "cuBLASLt, one algorithm per row bucket" : "cublasGemmEx (PDSERVE_CUDA_GEMM=ex)",
             cb->gemv == BACKEND_CUDA_GEMV_OFF ? "cuBLAS"
             : all ? "the GEMV" : "the GEMV up to 32M weights, cuBLAS above");
    return b;
}

bool cuda_pdl_on = false;

/* ---- extras (backend_cuda.h) -------------------------------------------------------- */

extern "C" void backend_cuda_info_get(backend *b, backend_cuda_info *info) {
    cuda_backend *cb = cuda_of(b);
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, cb->device));
    memset(info, 0, sizeof *info);
    snprintf(info->name, sizeof info->name, "%s", prop.name);
    CUDA_CHECK(cudaDriverGetVersion(&info->driver_version));
    CUDA_CHECK(cudaRuntimeGetVersion(&info->runtime_version));
    info->cc_major = prop.major;
    info->cc_minor = prop.minor;
    info->sm_count = prop.multiProcessorCount;
    info->mem_total = prop.totalGlobalMem;
    info->l2_bytes = (size_t)prop.l2CacheSize;
    CUDA_CHECK(cudaDeviceGetAttribute(&info->clock_khz, cudaDevAttrClockRate, cb->device));
    CUDA_CHECK(cudaDeviceGetAttribute(&info->mem_clock_khz, cudaDevAttrMemoryClockRate, cb->device));
    CUDA_CHECK(cudaDeviceGetAttribute(&info->mem_bus_bits, cudaDevAttrGlobalMemoryBusWidth,
                                      cb->device));
}

extern "C" int backend_cuda_gemv_mode(backend *b, int mode) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(mode == BACKEND_CUDA_GEMV_OFF || mode == BACKEND_CUDA_GEMV_ON ||
              mode == BACKEND_CUDA_GEMV_AUTO || mode == BACKEND_CUDA_GEMV_SMALL);
    int old = cb->gemv;
    cb->gemv = mode;
    return old;
}

extern "C" bool backend_cuda_gemm_lt(backend *b, bool on) {
    cuda_backend *cb = cuda_of(b);
    bool old = cb->gemm != NULL;
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    if (on) cuda_gemm_init(cb, false);
    else cuda_gemm_destroy(cb);
    return old;
}

extern "C" void backend_cuda_gemm_counts(backend *b, long *n_lt, long *n_ex, int *n_entries,
                                         int *n_tuned) {
    cuda_gemm_counts(cuda_of(b), n_lt, n_ex, n_entries, n_tuned);
}

extern "C" void backend_cuda_timer_start(backend *b) {
    cuda_backend *cb = cuda_of(b);
    CUDA_CHECK(cudaEventRecord(cb->timer_start, cb->stream));
}

extern "C" float backend_cuda_timer_stop_ms(backend *b) {
    cuda_backend *cb = cuda_of(b);
    float ms = 0;
    CUDA_CHECK(cudaEventRecord(cb->timer_stop, cb->stream));
    CUDA_CHECK(cudaEventSynchronize(cb->timer_stop));
    CUDA_CHECK(cudaEventElapsedTime(&ms, cb->timer_start, cb->timer_stop));
    return ms;
}
