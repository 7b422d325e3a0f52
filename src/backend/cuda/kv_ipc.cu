/* kv_ipc.cu: the CUDA backend's optional ops for moving KV cache blocks between
 * processes and to host memory (backend.h, "moving KV"; used by src/kv/): CUDA IPC
 * handles of device allocations, pinned host memory, and copy_batch, many small
 * copies at the cost of about one.
 *
 * copy_batch runs on a transfer stream of its own per device (never the compute
 * stream, so that a KV transfer neither waits behind nor blocks the forward pass, and
 * stays out of any graph being captured there). Items of at least `big` bytes (4 MiB)
 * go to the copy engines (cudaMemcpyAsync); the small ones, KV blocks of tens to
 * hundreds of KiB, all go to one launch of xfer_copy_kernel, a batched memcpy: the
 * items are cut into chunks (128 KiB) that the CTAs take grid-stride (or each a
 * contiguous range: `walk`), with 16-byte loads, `unroll` in flight per thread and no
 * bounds test but in a chunk's tail: device to device, into a peer GPU
 * over NVLink (the copying process pushes: remote writes, never remote reads; IPC
 * memory has peer access enabled when opened), or to and from pinned host memory over
 * PCIe (mapped, so the kernel reaches it directly). Per-item cudaMemcpyAsync calls
 * would cost ~5-10 us each, more than moving a 64 KiB block. Pageable host memory
 * cannot be reached by a kernel: such batches go item by item through
 * cudaMemcpyAsync.
 *
 * copy_runs (the gpu medium's) is copy_batch of a request's shape: n_runs block runs
 * repeated over n_parts (layer, k/v) bases, described by n_runs + n_parts descriptors
 * (a request of 8,192 tokens over 28 layers: 128 + 56, not 7,168), one launch of
 * xfer_runs_kernel, which finds a chunk's part by division and its run by a binary
 * search over the runs.
 *
 * copy_batch_sum is the same kernel adding kv_sum terms (src/kv/kv_sum.h) of what it
 * moves into per-object sums (a warp reduction and one atomic per warp and chunk), so
 * that the cpu store's checksums cost no host pass over the bytes.
 *
 * copy_layers_async (the end of this file) queues an eviction burst with the same
 * kernel, one launch per layer, on an offload stream of the backend's own, with an
 * event per layer that the compute stream waits for before it overwrites that layer
 * (--kv-offload-async).
 *
 * Knobs, read once per process from the environment (A/B runs and sweeps with
 * bench_kv_cuda; logged at the first transfer):
 *   PDSERVE_KV_COPY=auto|memcpy|kernel|batch  auto: as above; memcpy: copy engines
 *       only, one cudaMemcpyAsync per item; kernel: the kernel for every size; batch:
 *       copy engines through one cudaMemcpyBatchAsync of the whole batch
 *   PDSERVE_KV_XFER_CHUNK_KIB (128)   bytes per chunk, 16 KiB .. 16 MiB
 *   PDSERVE_KV_XFER_CTAS_PER_SM (8)   grid = SMs x this (at most one CTA per chunk)
 *   PDSERVE_KV_XFER_HOST_CTAS (32)    at most this many CTAs when either side of the
 *       batch is host memory (0: SMs x CTAS_PER_SM as any batch; below)
 *   PDSERVE_KV_XFER_THREADS (256)     threads per CTA, 64 .. 1024, a multiple of 32
 *   PDSERVE_KV_XFER_UNROLL (4)        16-byte loads in flight per thread: 1, 2, 4, 8
 *   PDSERVE_KV_XFER_STORES=cs|plain   cs (default): streaming stores (st.global.cs)
 *   PDSERVE_KV_XFER_WALK=stride|range|table|bytes  how CTAs find their work (the
 *       kernel's comment): stride (default), range, table, or bytes (chunks of the
 *       concatenated items: small items, e.g. single 32 KiB blocks of a fragmented
 *       pool, share a CTA step)
 *   PDSERVE_KV_XFER_BIG_KIB (4096)    auto: items this large go to the copy engines
 *   PDSERVE_KV_TIMING=1               copy_timing: host clocks and three events per
 *       copy_batch / copy_runs call (bench_kv_cuda's breakdown)
 *
 * Measured on 2x H200 (NV18), 896 MiB of KV to the peer GPU (bench_kv_cuda): this
 * kernel moves a request's 7,168 runs of 128 KiB at 352-359 GB/s when timed alone
 * (90% of one copy-engine copy, 394), into one allocation or 56; through the gpu
 * medium the same copy_batch takes 4-6 ms (150-195 GB/s; docs/kv-connectors.md,
 * "Not done"). In the medium, chunks of 128 KiB and streaming stores each gave ~+17%
 * in one sweep (now the defaults); CTAs/SM, threads, unroll and the walks moved it
 * within the noise (16 CTAs/SM: -45%); cudaMemcpyBatchAsync (batch): 31 GB/s.
 *
 * To and from pinned host memory the link, not the SMs, sets the rate: on an H200
 * (132 SMs, PCIe) 256 MiB batches of 8,192 items moved at 50-51 GB/s to the host and
 * 49-50 from it with 16 CTAs as with the full grid of 1,056. The full grid holds every
 * SM for the whole copy, and a forward pass of the same process beside it (a cpu
 * store's put beside its prefill instance's next chunk, a get beside its decode
 * instance's steps) all but stops. Each kind of step while another thread copies back
 * to back, over the step alone, and the copy beside it (pdserve profile's own_steps and
 * own_copies; scripts/gpu/check-host-ctas.sh, 2026-11-29, driver 580.159.04):
 *
 *   CTAs        prefill beside d2h / h2d   decode beside d2h / h2d   copies beside steps
 *   1,056 (all)        x17.1 / x12.4              x16.3 / x16.7          x1.00-1.01
 *   264                 x7.5 / x4.0                x8.5 / x6.9           x1.00-1.02
 *   132                 x6.0 / x2.0                x6.1 / x3.8           x1.02-1.05
 *   64                  x3.5 / x1.5                x4.0 / x1.8           x1.02-1.07
 *   32 (default)        x2.4 / x1.3                x2.5 / x1.3           x1.03-1.17
 *   16                  x1.5 / x1.2                x1.5 / x1.1           x1.08-1.76
 *
 * dis-cpu with both instances on that GPU (paper-batch-quick-1gpu), 32 against the
 * full grid: TPOT p50 5.75 -> 5.43 ms at batch 4, 9.29 -> 8.48 at batch 16, TTFT 1-2%
 * lower, output throughput 2% higher (one run each; docs/kv-connectors.md).
 *
 * Tuned for: batches of 1 to a few thousand items of 16 KiB to 4 MiB, one to a few
 * threads of one process copying at once (serialised per device). */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_common.h"
#include "backend/cuda/kv_ipc.h"
#include "kv/kv_sum.h"

#define XFER_MAX_DEVICES 64
#define XFER_HOST_CTAS 32 /* PDSERVE_KV_XFER_HOST_CTAS's default (the header's table) */

enum { XFER_AUTO, XFER_MEMCPY, XFER_KERNEL, XFER_BATCH };
static const char *const XFER_MODE_NAMES[] = {"auto", "memcpy", "kernel", "batch"};

/* One item as the kernel sees it: first_chunk is the prefix sum of earlier items'
 * chunks, so chunk c belongs to the last item whose first_chunk <= c (the bytes walk:
 * chunks of the concatenated items, found by first_byte). */
typedef struct xfer_desc {
    uint8_t *dst;
    const uint8_t *src;
    uint64_t bytes;
    uint64_t first_chunk;
    uint64_t first_byte;       /* prefix sum of earlier items' bytes (the bytes walk) */
    uint64_t at;               /* sums: byte of its object where the item starts */
    int32_t slot;              /* sums: index into the sums, -1: not summed */
    int32_t pad;
} xfer_desc;

/* The copy's knobs (environment, see the header). */
typedef struct xfer_params {
    int mode;                  /* XFER_AUTO | MEMCPY | KERNEL | BATCH */
    uint64_t chunk;            /* bytes, a multiple of 16 */
    int ctas_per_sm, threads, unroll;
    int host_ctas;             /* most CTAs of a batch to or from host memory (0: no cap) */
    bool stream_stores;
    int walk;                  /* XFER_WALK_* */
    size_t big;
    bool timing;               /* PDSERVE_KV_TIMING: clocks and events per call (copy_timing) */
} xfer_params;

/* One call's host clocks (copy_timing): entry, descriptors built, launched. */
typedef struct xfer_clock {
    double t0, built, launched;
    int items;
    bool split;                /* ev[1] recorded (before the kernel) */
} xfer_clock;

/* Per device, for the process's life (created on first use; the primary context
 * outlives backends). Owns every pointer here. */
typedef struct xfer_state {
    pthread_mutex_t mu;        /* one batch at a time per device */
    bool ready;
    xfer_params p;
    bool host_mapped;          /* registered host memory has the same address on the device */
    cudaStream_t stream;
    xfer_desc *host_desc;      /* pinned, [cap] */
    xfer_desc *dev_desc;       /* device, [cap] */
    size_t cap;
    void **batch_dst;          /* batch mode: [batch_cap] host arrays for cudaMemcpyBatchAsync */
    const void **batch_src;
    size_t *batch_bytes, batch_cap;
    unsigned long long *dev_sums, *host_sums; /* [sums_cap] device, pinned */
    size_t sums_cap;
    uint32_t *dev_map, *host_map; /* table walk: [map_cap] item of each chunk */
    size_t map_cap;
    cudaEvent_t ev[3];         /* timing: call's start, kernel's start, end */
    backend_copy_timing acc;   /* timing: sums since the last copy_timing */
} xfer_state;

static xfer_state g_xfer[XFER_MAX_DEVICES];
static pthread_mutex_t g_xfer_init = PTHREAD_MUTEX_INITIALIZER;

/* ---- the kernel ---------------------------------------------------------------------- */

/* kv_sum terms of the 16 bytes r at word index j (kv_sum.h: little-endian words). */
__device__ __forceinline__ uint64_t xfer_terms(uint4 r, uint64_t j) {
    uint64_t w0 = (uint64_t)r.y << 32 | r.x, w1 = (uint64_t)r.w << 32 | r.z;
    return kv_sum_word(w0, j) + kv_sum_word(w1, j + 1);
}

template <bool CS> __device__ __forceinline__ void xfer_store(uint4 *p, uint4 v) {
    if (CS) __stcs(p, v);
    else *p = v;
}

/* Copies bytes [off, off + len) of item e (multiples of 16) with the whole CTA; SUM:
 * adds their kv_sum terms into sums[e->slot] (one atomic per warp). */
template <int UNROLL, bool SUM, bool CS>
__device__ __forceinline__ void xfer_piece(const xfer_desc *e, uint64_t off, uint64_t len,
                                           unsigned long long *sums) {
    const uint4 *s = (const uint4 *)(e->src + off);
    uint4 *t = (uint4 *)(e->dst + off);
    const uint64_t bd = blockDim.x;
    uint64_t n16 = len / 16, j0 = (e->at + off) / 8, acc = 0;
    uint64_t i = threadIdx.x;
    /* UNROLL loads in flight per thread before the stores: the latency of NVLink and
     * PCIe is hidden by numbers of requests, not by caches */
    for (; i + (UNROLL - 1) * bd < n16; i += UNROLL * bd) {
        uint4 r[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; k++) r[k] = s[i + k * bd];
#pragma unroll
        for (int k = 0; k < UNROLL; k++) {
            xfer_store<CS>(t + i + k * bd, r[k]);
            if (SUM) acc += xfer_terms(r[k], j0 + 2 * (i + k * bd));
        }
    }
    for (; i < n16; i += bd) {
        uint4 r = s[i];
        xfer_store<CS>(t + i, r);
        if (SUM) acc += xfer_terms(r, j0 + 2 * i);
    }
    if (SUM && e->slot >= 0) { /* uniform over the CTA: every lane takes part */
        for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if ((threadIdx.x & 31) == 0) atomicAdd(&sums[e->slot], (unsigned long long)acc);
    }
}

/* The last item at or after `it` whose key (first_chunk, or first_byte) is <= v. */
__device__ __forceinline__ int xfer_find(const xfer_desc *d, int n, int it, uint64_t v, bool bytes) {
    for (int hi = n - 1; it < hi;) {
        int mid = (it + hi + 1) / 2;
        if ((bytes ? d[mid].first_byte : d[mid].first_chunk) <= v) it = mid;
        else hi = mid - 1;
    }
    return it;
}

enum { XFER_WALK_STRIDE, XFER_WALK_RANGE, XFER_WALK_TABLE, XFER_WALK_BYTES };
static const char *const XFER_WALK_NAMES[] = {"stride", "range", "table", "bytes"};

/* Copies the chunks of the items d[0..n) that fall to CTA b. The walks (`walk`):
 *   stride  chunks b, b + grid, ... (the CTAs sweep the batch together), each chunk's
 *           item by a binary search from the last one found;
 *   range   chunks [total * b / grid, total * (b + 1) / grid), one search, then a
 *           forward walk;
 *   table   as stride, each chunk's item from map[] (built on the host);
 *   bytes   as stride over chunks of the items' concatenated bytes (total_chunks of
 *           chunk_bytes), each chunk copying the pieces of the items it covers: small
 *           items share a CTA step (one search per step, not per item).
 * Every dst, src, size (and at) is a multiple of 16 bytes. SUM: adds the kv_sum terms
 * of each item with slot >= 0 into sums[slot]. */
template <int UNROLL, bool SUM, bool CS>
__global__ void __launch_bounds__(1024)
xfer_copy_kernel(const xfer_desc *d, int n, uint64_t total_chunks, uint64_t chunk_bytes,
                 unsigned long long *sums, int walk, const uint32_t *map) {
    uint64_t c = blockIdx.x, end = total_chunks, step = gridDim.x;
    if (walk == XFER_WALK_RANGE) {
        c = total_chunks * blockIdx.x / gridDim.x;
        end = total_chunks * (blockIdx.x + 1) / gridDim.x;
        step = 1;
    }
    int it = 0;
    for (bool first = true; c < end; c += step, first = false) {
        if (walk == XFER_WALK_BYTES) {
            uint64_t w0 = c * chunk_bytes, w1 = w0 + chunk_bytes;
            for (it = xfer_find(d, n, it, w0, true); it < n && d[it].first_byte < w1; it++) {
                const xfer_desc *e = &d[it];
                uint64_t a = w0 > e->first_byte ? w0 - e->first_byte : 0;
                uint64_t z = w1 - e->first_byte < e->bytes ? w1 - e->first_byte : e->bytes;
                xfer_piece<UNROLL, SUM, CS>(e, a, z - a, sums);
            }
            it = it > 0 ? it - 1 : 0; /* the next window starts at or after this item */
            continue;
        }
        if (map) it = (int)map[c];
        else if (first || walk != XFER_WALK_RANGE) it = xfer_find(d, n, it, c, false);
        else
            while (it + 1 < n && d[it + 1].first_chunk <= c) it++;
        const xfer_desc *e = &d[it];
        uint64_t off = (c - e->first_chunk) * chunk_bytes;
        uint64_t len = e->bytes - off < chunk_bytes ? e->bytes - off : chunk_bytes;
        xfer_piece<UNROLL, SUM, CS>(e, off, len, sums);
    }
}

/* Items with an end or a size not a multiple of 16: bytes, grid-stride over items. */
__global__ void xfer_copy_bytes_kernel(const xfer_desc *d, int n) {
    for (int k = blockIdx.x; k < n; k += gridDim.x)
        for (uint64_t i = threadIdx.x; i < d[k].bytes; i += blockDim.x) d[k].dst[i] = d[k].src[i];
}

/* copy_runs: n_parts x n_runs copies from n_runs + n_parts descriptors. runs[r] holds run
 * r's offsets in its dst and src fields (not addresses), its bytes and first_chunk (the
 * prefix sum of earlier runs' chunks: part_chunks in all); parts[p] holds part p's
 * bases. Chunk c is chunk c % part_chunks of part c / part_chunks, its run found by a
 * binary search (a request has tens to hundreds of runs); CTAs take chunks grid-stride,
 * as the stride walk. Every base, offset and size is a multiple of 16 bytes. */
template <int UNROLL, bool CS>
__global__ void __launch_bounds__(1024)
xfer_runs_kernel(const xfer_desc *runs, int n_runs, const xfer_desc *parts, uint64_t part_chunks,
                 uint64_t total_chunks, uint64_t chunk_bytes) {
    for (uint64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
        uint64_t p = c / part_chunks, rc = c - p * part_chunks;
        const xfer_desc *r = &runs[xfer_find(runs, n_runs, 0, rc, false)];
        xfer_desc e;
        e.dst = parts[p].dst + (uintptr_t)r->dst;
        e.src = parts[p].src + (uintptr_t)r->src;
        e.bytes = r->bytes;
        e.at = 0;
        e.slot = -1;
        uint64_t off = (rc - r->first_chunk) * chunk_bytes;
        uint64_t len = e.bytes - off < chunk_bytes ? e.bytes - off : chunk_bytes;
        xfer_piece<UNROLL, false, CS>(&e, off, len, NULL);
    }
}

typedef void (*xfer_runs_fn)(const xfer_desc *, int, const xfer_desc *, uint64_t, uint64_t,
                             uint64_t);
template <bool CS> static xfer_runs_fn xfer_runs_pick2(int unroll) {
    switch (unroll) {
    case 1: return xfer_runs_kernel<1, CS>;
    case 2: return xfer_runs_kernel<2, CS>;
    case 8: return xfer_runs_kernel<8, CS>;
    default: return xfer_runs_kernel<4, CS>;
    }
}

typedef void (*xfer_kernel_fn)(const xfer_desc *, int, uint64_t, uint64_t, unsigned long long *,
                               int, const uint32_t *);

template <bool SUM, bool CS> static xfer_kernel_fn xfer_pick2(int unroll) {
    switch (unroll) {
    case 1: return xfer_copy_kernel<1, SUM, CS>;
    case 2: return xfer_copy_kernel<2, SUM, CS>;
    case 8: return xfer_copy_kernel<8, SUM, CS>;
    default: return xfer_copy_kernel<4, SUM, CS>;
    }
}
static xfer_kernel_fn xfer_pick(int unroll, bool sum, bool cs) {
    if (sum) return cs ? xfer_pick2<true, true>(unroll) : xfer_pick2<true, false>(unroll);
    return cs ? xfer_pick2<false, true>(unroll) : xfer_pick2<false, false>(unroll);
}

/* ---- state --------------------------------------------------------------------------- */

static long env_long(const char *name, long def, long lo, long hi) {
    const char *v = getenv(name);
    if (!v || !*v) return def;
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x < lo || x > hi) {
        log_warn("cuda kv transfers: %s=%s is not in [%ld, %ld]: using %ld", name, v, lo, hi, def);
        return def;
    }
    return x;
}

static xfer_params xfer_params_from_env(void) {
    xfer_params p;
    const char *m = getenv("PDSERVE_KV_COPY");
    p.mode = XFER_AUTO;
    for (int i = 0; m && i < 4; i++)
        if (!strcmp(m, XFER_MODE_NAMES[i])) p.mode = i;
    p.chunk = (uint64_t)env_long("PDSERVE_KV_XFER_CHUNK_KIB", 128, 16, 16384) << 10;
    p.ctas_per_sm = (int)env_long("PDSERVE_KV_XFER_CTAS_PER_SM", 8, 1, 64);
    p.threads = (int)env_long("PDSERVE_KV_XFER_THREADS", 256, 64, 1024) / 32 * 32;
    p.unroll = (int)env_long("PDSERVE_KV_XFER_UNROLL", 4, 1, 8);
    p.host_ctas = (int)env_long("PDSERVE_KV_XFER_HOST_CTAS", XFER_HOST_CTAS, 0, 1 << 20);
    if (p.unroll != 1 && p.unroll != 2 && p.unroll != 8) p.unroll = 4;
    const char *st = getenv("PDSERVE_KV_XFER_STORES");
    p.stream_stores = !(st && !strcmp(st, "plain"));
    const char *walk = getenv("PDSERVE_KV_XFER_WALK");
    p.walk = XFER_WALK_STRIDE;
    for (int i = 0; walk && i < 4; i++)
        if (!strcmp(walk, XFER_WALK_NAMES[i])) p.walk = i;
    p.big = (size_t)env_long("PDSERVE_KV_XFER_BIG_KIB", 4096, 0, 1L << 30) << 10;
    const char *t = getenv("PDSERVE_KV_TIMING");
    p.timing = t && *t && strcmp(t, "0") != 0;
    return p;
}

static xfer_state *xfer_get(cuda_backend *cb) {
    PD_ASSERT(cb->device >= 0 && cb->device < XFER_MAX_DEVICES);
    xfer_state *x = &g_xfer[cb->device];
    pthread_mutex_lock(&g_xfer_init);
    if (!x->ready) {
        pthread_mutex_init(&x->mu, NULL);
        CUDA_CHECK(cudaStreamCreateWithFlags(&x->stream, cudaStreamNonBlocking));
        x->p = xfer_params_from_env();
        int v = 0;
        CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrCanUseHostPointerForRegisteredMem,
                                          cb->device));
        x->host_mapped = v != 0;
        for (int i = 0; i < 3 && x->p.timing; i++) CUDA_CHECK(cudaEventCreate(&x->ev[i]));
        x->ready = true;
        char host_cap[48] = "no cap";
        if (x->p.host_ctas > 0) snprintf(host_cap, sizeof host_cap, "at most %d", x->p.host_ctas);
        log_info("cuda kv transfers: device %d, copies %s, chunk %llu KiB, %d CTAs/SM of %d "
                 "threads (to or from host memory: %s CTAs), unroll %d, %s stores, %s walk, copy "
                 "engines from %zu KiB; pinned host memory %s by kernels", cb->device,
                 XFER_MODE_NAMES[x->p.mode], (unsigned long long)(x->p.chunk >> 10),
                 x->p.ctas_per_sm, x->p.threads, host_cap,
                 x->p.unroll, x->p.stream_stores ? "streaming" : "plain",
                 XFER_WALK_NAMES[x->p.walk], x->p.big >> 10,
                 x->host_mapped ? "reachable" : "not reachable");
    }
    pthread_mutex_unlock(&g_xfer_init);
    return x;
}

/* Room for n descriptors (under x->mu). */
static void xfer_reserve(xfer_state *x, size_t n) {
    if (n <= x->cap) return;
    size_t want = n < 1024 ? 1024 : n * 2;
    CUDA_CHECK(cudaStreamSynchronize(x->stream));
    if (x->host_desc) CUDA_CHECK(cudaFreeHost(x->host_desc));
    if (x->dev_desc) CUDA_CHECK(cudaFree(x->dev_desc));
    CUDA_CHECK(cudaHostAlloc((void **)&x->host_desc, want * sizeof(xfer_desc), cudaHostAllocDefault));
    CUDA_CHECK(cudaMalloc((void **)&x->dev_desc, want * sizeof(xfer_desc)));
    x->cap = want;
}

/* Room for n sums (under x->mu). */
static void xfer_reserve_sums(xfer_state *x, size_t n) {
    if (n <= x->sums_cap) return;
    size_t want = n < 1024 ? 1024 : n * 2;
    CUDA_CHECK(cudaStreamSynchronize(x->stream));
    if (x->host_sums) CUDA_CHECK(cudaFreeHost(x->host_sums));
    if (x->dev_sums) CUDA_CHECK(cudaFree(x->dev_sums));
    CUDA_CHECK(cudaHostAlloc((void **)&x->host_sums, want * sizeof(unsigned long long),
                             cudaHostAllocDefault));
    CUDA_CHECK(cudaMalloc((void **)&x->dev_sums, want * sizeof(unsigned long long)));
    x->sums_cap = want;
}

/* Room for n chunk -> item entries (under x->mu). */
static void xfer_reserve_map(xfer_state *x, size_t n) {
    if (n <= x->map_cap) return;
    size_t want = n < 4096 ? 4096 : n * 2;
    CUDA_CHECK(cudaStreamSynchronize(x->stream));
    if (x->host_map) CUDA_CHECK(cudaFreeHost(x->host_map));
    if (x->dev_map) CUDA_CHECK(cudaFree(x->dev_map));
    CUDA_CHECK(cudaHostAlloc((void **)&x->host_map, want * sizeof(uint32_t), cudaHostAllocDefault));
    CUDA_CHECK(cudaMalloc((void **)&x->dev_map, want * sizeof(uint32_t)));
    x->map_cap = want;
}

/* Whether a kernel on `device` can read and write memory at p (the batch's kind of
 * memory is that of its first item: backend.h's contract); *host (when given) is set
 * where p is pinned host memory that it reaches. */
static bool kernel_reaches(const xfer_state *x, int device, const void *p, bool *host = NULL) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    if (a.type == cudaMemoryTypeHost) {
        bool ok = x->host_mapped && a.devicePointer == p;
        if (host && ok) *host = true;
        return ok;
    }
    if (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) {
        if (a.device == device) return true;
        int ok = 0;
        return cudaDeviceCanAccessPeer(&ok, device, a.device) == cudaSuccess && ok;
    }
    return false; /* pageable host memory */
}

/* ---- timing (PDSERVE_KV_TIMING; copy_timing) -------------------------------------------
 * Per call: host clocks at entry (before the lock), descriptors built, launched, and
 * synchronized; events on the transfer stream at the call's first op, just before the
 * kernel, and after the last op. Off: no clock, no event. */
static void clock_start(xfer_state *x, xfer_clock *c, double entry) {
    memset(c, 0, sizeof *c);
    if (!x->p.timing) return;
    c->t0 = entry;
    CUDA_CHECK(cudaEventRecord(x->ev[0], x->stream));
}
static void clock_built(xfer_state *x, xfer_clock *c, int items) {
    if (!c || !x->p.timing) return;
    c->built = time_now_s();
    c->items += items;
}
static void clock_kernel(xfer_state *x, xfer_clock *c) {
    if (!c || !x->p.timing) return;
    CUDA_CHECK(cudaEventRecord(x->ev[1], x->stream));
    c->split = true;
}
static void clock_launched(xfer_state *x, xfer_clock *c) {
    if (!x->p.timing) return;
    c->launched = time_now_s();
    if (!c->built) c->built = c->launched;
    if (!c->split) CUDA_CHECK(cudaEventRecord(x->ev[1], x->stream)); /* no kernel: all "upload" */
    CUDA_CHECK(cudaEventRecord(x->ev[2], x->stream));
}
/* After the stream's synchronize (under x->mu): adds the call into x->acc. */
static void clock_end(xfer_state *x, const xfer_clock *c) {
    if (!x->p.timing) return;
    double now = time_now_s();
    float up = 0, k = 0;
    CUDA_CHECK(cudaEventElapsedTime(&up, x->ev[0], x->ev[1]));
    CUDA_CHECK(cudaEventElapsedTime(&k, x->ev[1], x->ev[2]));
    backend_copy_timing *a = &x->acc;
    a->calls++;
    a->items += c->items;
    a->prep_s += c->built - c->t0;
    a->enqueue_s += c->launched - c->built;
    a->wait_s += now - c->launched;
    a->upload_s += up / 1e3;
    a->kernel_s += k / 1e3;
}

/* Copy engines for the whole batch through one cudaMemcpyBatchAsync (under x->mu);
 * false when the runtime refuses it (then nothing was queued). */
static bool xfer_batch_engines(xfer_state *x, const backend_copy *items, int n) {
    if ((size_t)n > x->batch_cap) {
        size_t want = n < 1024 ? 1024 : (size_t)n * 2;
        x->batch_dst = (void **)xrealloc(x->batch_dst, want * sizeof(void *));
        x->batch_src = (const void **)xrealloc(x->batch_src, want * sizeof(void *));
        x->batch_bytes = (size_t *)xrealloc(x->batch_bytes, want * sizeof(size_t));
        x->batch_cap = want;
    }
    size_t m = 0;
    for (int i = 0; i < n; i++) {
        if (!items[i].bytes) continue;
        x->batch_dst[m] = items[i].dst;
        x->batch_src[m] = items[i].src;
        x->batch_bytes[m++] = items[i].bytes;
    }
    if (!m) return true;
    cudaMemcpyAttributes attr;
    memset(&attr, 0, sizeof attr);
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attr_idx = 0;
    cudaError_t e = cudaMemcpyBatchAsync(x->batch_dst, x->batch_src, x->batch_bytes, m, &attr,
                                         &attr_idx, 1, x->stream);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return true;
}

/* Queues the kernel over the items that take it (under x->mu): every item when
 * `all`, else those under `big`. sum_slot != NULL: sums accumulate in x->dev_sums
 * (reserved and zeroed by the caller). host: either side is pinned host memory (as
 * kernel_reaches found it), which caps the grid at host_ctas. */
static void xfer_kernel_launch(cuda_backend *cb, xfer_state *x, const backend_copy *items, int n,
                               bool all, const int32_t *sum_slot, const uint64_t *sum_at,
                               xfer_clock *clk, bool host) {
    xfer_reserve(x, (size_t)n);
    uint64_t chunks = 0, chunk = x->p.chunk, total = 0;
    bool vec16 = true;
    int m = 0;
    for (int i = 0; i < n; i++) {
        const backend_copy *it = &items[i];
        if (!it->bytes || (!all && it->bytes >= x->p.big)) continue;
        x->host_desc[m] = xfer_desc{(uint8_t *)it->dst, (const uint8_t *)it->src, it->bytes, chunks,
                                    total, sum_at ? sum_at[i] : 0, sum_slot ? sum_slot[i] : -1, 0};
        chunks += (it->bytes + chunk - 1) / chunk;
        total += it->bytes;
        vec16 = vec16 && ((uintptr_t)it->dst | (uintptr_t)it->src | it->bytes) % 16 == 0;
        m++;
    }
    clock_built(x, clk, m);
    if (!m) return;
    CUDA_CHECK(cudaMemcpyAsync(x->dev_desc, x->host_desc, (size_t)m * sizeof(xfer_desc),
                               cudaMemcpyHostToDevice, x->stream));
    if (!vec16) { /* never with sums: the caller checked */
        unsigned grid = (unsigned)PD_MIN((uint64_t)m, (uint64_t)cb->sm_count * 4);
        xfer_copy_bytes_kernel<<<grid, 256, 0, x->stream>>>(x->dev_desc, m);
        CUDA_CHECK_LAUNCH();
        return;
    }
    if (x->p.walk == XFER_WALK_BYTES) chunks = (total + chunk - 1) / chunk; /* of the stream */
    const uint32_t *map = NULL;
    if (x->p.walk == XFER_WALK_TABLE) {
        xfer_reserve_map(x, (size_t)chunks);
        for (int i = 0; i < m; i++) {
            uint64_t end = i + 1 < m ? x->host_desc[i + 1].first_chunk : chunks;
            for (uint64_t c = x->host_desc[i].first_chunk; c < end; c++) x->host_map[c] = (uint32_t)i;
        }
        CUDA_CHECK(cudaMemcpyAsync(x->dev_map, x->host_map, (size_t)chunks * sizeof(uint32_t),
                                   cudaMemcpyHostToDevice, x->stream));
        map = x->dev_map;
    }
    clock_kernel(x, clk);
    uint64_t most = (uint64_t)cb->sm_count * (uint64_t)x->p.ctas_per_sm;
    /* over PCIe a few CTAs fill the link; a full grid would hold every SM for the whole
     * copy and stall the process's own forward pass beside it (the header) */
    if (x->p.host_ctas > 0 && host)
        most = PD_MIN(most, (uint64_t)x->p.host_ctas);
    unsigned grid = (unsigned)(chunks < most ? chunks : most);
    xfer_kernel_fn k = xfer_pick(x->p.unroll, sum_slot != NULL, x->p.stream_stores);
    k<<<grid, x->p.threads, 0, x->stream>>>(x->dev_desc, m, chunks, chunk, x->dev_sums, x->p.walk,
                                             map);
    CUDA_CHECK_LAUNCH();
}

/* ---- ops ----------------------------------------------------------------------------- */

extern "C" void cuda_kv_copy_batch(backend *b, const backend_copy *items, int n) {
    if (n <= 0) return;
    cuda_backend *cb = cuda_of(b);
    xfer_state *x = xfer_get(cb);
    double entry = x->p.timing ? time_now_s() : 0;
    pthread_mutex_lock(&x->mu);
    xfer_clock clk;
    clock_start(x, &clk, entry);
    int mode = x->p.mode;
    if (mode == XFER_BATCH && !xfer_batch_engines(x, items, n)) mode = XFER_MEMCPY;
    if (mode != XFER_BATCH) {
        bool host = false;
        bool kernel = mode != XFER_MEMCPY && kernel_reaches(x, cb->device, items[0].dst, &host) &&
                      kernel_reaches(x, cb->device, items[0].src, &host);
        bool all = mode == XFER_KERNEL;
        for (int i = 0; i < n; i++) {
            const backend_copy *it = &items[i];
            if (!it->bytes || (kernel && (all || it->bytes < x->p.big))) continue;
            CUDA_CHECK(cudaMemcpyAsync(it->dst, it->src, it->bytes, cudaMemcpyDefault, x->stream));
        }
        if (kernel) xfer_kernel_launch(cb, x, items, n, all, NULL, NULL, &clk, host);
    }
    clock_launched(x, &clk);
    /* every byte landed, and host_desc may be rewritten by the next batch */
    CUDA_CHECK(cudaStreamSynchronize(x->stream));
    clock_end(x, &clk);
    pthread_mutex_unlock(&x->mu);
}

extern "C" int cuda_kv_copy_batch_sum(backend *b, const backend_copy *items, int n,
                                      const int32_t *sum_slot, const uint64_t *sum_at,
                                      uint64_t *sums, int n_sums) {
    if (n <= 0) return 0;
    if (n_sums <= 0) return -1;
    for (int i = 0; i < n; i++) {
        const backend_copy *it = &items[i];
        if (((uintptr_t)it->dst | (uintptr_t)it->src | it->bytes | sum_at[i]) % 16 != 0 ||
            sum_slot[i] < 0 || sum_slot[i] >= n_sums)
            return -1;
    }
    cuda_backend *cb = cuda_of(b);
    xfer_state *x = xfer_get(cb);
    bool host = false;
    if (!kernel_reaches(x, cb->device, items[0].dst, &host) || !kernel_reaches(x, cb->device, items[0].src, &host))
        return -1;
    pthread_mutex_lock(&x->mu);
    xfer_reserve_sums(x, (size_t)n_sums);
    CUDA_CHECK(cudaMemsetAsync(x->dev_sums, 0, (size_t)n_sums * sizeof(unsigned long long),
                               x->stream));
    xfer_kernel_launch(cb, x, items, n, true, sum_slot, sum_at, NULL, host);
    CUDA_CHECK(cudaMemcpyAsync(x->host_sums, x->dev_sums, (size_t)n_sums * sizeof(unsigned long long),
                               cudaMemcpyDeviceToHost, x->stream));
    CUDA_CHECK(cudaStreamSynchronize(x->stream));
    for (int k = 0; k < n_sums; k++) sums[k] += (uint64_t)x->host_sums[k];
    pthread_mutex_unlock(&x->mu);
    return 0;
}

/* copy_runs' items as a copy_batch (the kernel cannot take them as runs). */
static void copy_runs_expanded(backend *b, const backend_run *runs, int n_runs, void *const *dst,
                               const void *const *src, int n_parts) {
    size_t n = (size_t)n_runs * (size_t)n_parts;
    PD_ASSERT(n <= (size_t)INT32_MAX);
    backend_copy *items = (backend_copy *)xmalloc(n * sizeof *items);
    for (int p = 0, i = 0; p < n_parts; p++)
        for (int r = 0; r < n_runs; r++, i++)
            items[i] = backend_copy{(uint8_t *)dst[p] + runs[r].dst_off,
                                    (const uint8_t *)src[p] + runs[r].src_off, runs[r].bytes};
    cuda_kv_copy_batch(b, items, (int)n);
    free(items);
}

extern "C" void cuda_kv_copy_runs(backend *b, const backend_run *runs, int n_runs, void *const *dst,
                                  const void *const *src, int n_parts) {
    if (n_runs <= 0 || n_parts <= 0) return;
    cuda_backend *cb = cuda_of(b);
    xfer_state *x = xfer_get(cb);
    double entry = x->p.timing ? time_now_s() : 0;
    /* the kernel's conditions (copy_batch's in auto and kernel modes): 16-byte multiples,
     * no item for the copy engines, memory the kernel reaches; else the items as a batch */
    bool ok = x->p.mode == XFER_AUTO || x->p.mode == XFER_KERNEL;
    uint64_t chunk = x->p.chunk, part_chunks = 0;
    for (int r = 0; r < n_runs && ok; r++) {
        const backend_run *u = &runs[r];
        ok = (u->dst_off | u->src_off | u->bytes) % 16 == 0 && u->bytes > 0 &&
             (x->p.mode == XFER_KERNEL || u->bytes < x->p.big);
        part_chunks += (u->bytes + chunk - 1) / chunk;
    }
    for (int p = 0; p < n_parts && ok; p++) ok = ((uintptr_t)dst[p] | (uintptr_t)src[p]) % 16 == 0;
    pthread_mutex_lock(&x->mu);
    xfer_clock clk;
    clock_start(x, &clk, entry);
    ok = ok && kernel_reaches(x, cb->device, (const uint8_t *)dst[0] + runs[0].dst_off) &&
         kernel_reaches(x, cb->device, (const uint8_t *)src[0] + runs[0].src_off);
    if (!ok) {
        pthread_mutex_unlock(&x->mu);
        copy_runs_expanded(b, runs, n_runs, dst, src, n_parts);
        return;
    }
    int m = n_runs + n_parts;
    xfer_reserve(x, (size_t)m);
    uint64_t first = 0;
    for (int r = 0; r < n_runs; r++) {
        const backend_run *u = &runs[r];
        x->host_desc[r] = xfer_desc{(uint8_t *)(uintptr_t)u->dst_off,
                                    (const uint8_t *)(uintptr_t)u->src_off, u->bytes, first, 0, 0,
                                    -1, 0};
        first += (u->bytes + chunk - 1) / chunk;
    }
    for (int p = 0; p < n_parts; p++)
        x->host_desc[n_runs + p] = xfer_desc{(uint8_t *)dst[p], (const uint8_t *)src[p], 0, 0, 0, 0, -1, 0};
    clock_built(x, &clk, m);
    CUDA_CHECK(cudaMemcpyAsync(x->dev_desc, x->host_desc, (size_t)m * sizeof(xfer_desc),
                               cudaMemcpyHostToDevice, x->stream));
    clock_kernel(x, &clk);
    uint64_t total = part_chunks * (uint64_t)n_parts;
    uint64_t most = (uint64_t)cb->sm_count * (uint64_t)x->p.ctas_per_sm;
    unsigned grid = (unsigned)(total < most ? total : most);
    xfer_runs_fn k = x->p.stream_stores ? xfer_runs_pick2<true>(x->p.unroll)
                                        : xfer_runs_pick2<false>(x->p.unroll);
    k<<<grid, x->p.threads, 0, x->stream>>>(x->dev_desc, n_runs, x->dev_desc + n_runs, part_chunks,
                                             total, chunk);
    CUDA_CHECK_LAUNCH();
    clock_launched(x, &clk);
    CUDA_CHECK(cudaStreamSynchronize(x->stream)); /* landed; host_desc free again */
    clock_end(x, &clk);
    pthread_mutex_unlock(&x->mu);
}

extern "C" int cuda_kv_copy_host_ctas(backend *b) { return xfer_get(cuda_of(b))->p.host_ctas; }

extern "C" int cuda_kv_copy_timing(backend *b, backend_copy_timing *out) {
    cuda_backend *cb = cuda_of(b);
    xfer_state *x = xfer_get(cb);
    pthread_mutex_lock(&x->mu);
    *out = x->acc;
    memset(&x->acc, 0, sizeof x->acc);
    pthread_mutex_unlock(&x->mu);
    return out->calls > 0 ? 0 : -1;
}

/* The base of the allocation holding p, through the driver's cuMemGetAddressRange
 * (looked up in the already loaded libcuda: no link-time dependency); p itself when
 * the driver cannot say (then p must be a cudaMalloc base). */
static uintptr_t alloc_base(const void *p) {
    typedef int (*range_fn)(unsigned long long *, size_t *, unsigned long long);
    static range_fn fn;
    static bool looked;
    if (!looked) {
        void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        if (h) fn = (range_fn)dlsym(h, "cuMemGetAddressRange_v2");
        looked = true;
    }
    unsigned long long base = 0;
    size_t size = 0;
    if (fn && fn(&base, &size, (unsigned long long)(uintptr_t)p) == 0 && base) return (uintptr_t)base;
    return (uintptr_t)p;
}

extern "C" int cuda_kv_ipc_export(backend *b, const void *ptr, uint8_t *handle, uint64_t *offset,
                                  char *err, size_t errlen) {
    (void)cuda_of(b);
    uintptr_t base = alloc_base(ptr);
    cudaIpcMemHandle_t h;
    cudaError_t e = cudaIpcGetMemHandle(&h, (void *)base);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        pd_errorf(err, errlen, "cuda: cannot export device memory %p for IPC: %s", ptr,
                  cudaGetErrorString(e));
        return -1;
    }
    static_assert(sizeof h == BACKEND_IPC_HANDLE_BYTES, "IPC handle size");
    memcpy(handle, &h, sizeof h);
    *offset = (uint64_t)((uintptr_t)ptr - base);
    return 0;
}

extern "C" void *cuda_kv_ipc_open(backend *b, const uint8_t *handle, char *err, size_t errlen) {
    (void)cuda_of(b);
    cudaIpcMemHandle_t h;
    memcpy(&h, handle, sizeof h);
    void *p = NULL;
    cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        pd_errorf(err, errlen, "cuda: cannot open another process's device memory (IPC): %s",
                  cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

extern "C" void cuda_kv_ipc_close(backend *b, void *base) {
    if (!base) return;
    (void)cuda_of(b);
    CUDA_CHECK(cudaIpcCloseMemHandle(base));
}

extern "C" void *cuda_kv_host_alloc(backend *b, size_t bytes) {
    (void)cuda_of(b);
    void *p = NULL;
    if (cudaHostAlloc(&p, bytes ? bytes : 16, cudaHostAllocPortable | cudaHostAllocMapped) !=
        cudaSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return p;
}

extern "C" void cuda_kv_host_free(backend *b, void *p) {
    if (!p) return;
    (void)cuda_of(b);
    CUDA_CHECK(cudaFreeHost(p));
}

extern "C" int cuda_kv_host_register(backend *b, void *p, size_t bytes) {
    (void)cuda_of(b);
    cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        log_warn("cuda: cannot pin %zu bytes of host memory (%s): copies stay pageable", bytes,
                 cudaGetErrorString(e));
        return -1;
    }
    return 0;
}

extern "C" void cuda_kv_host_unregister(backend *b, void *p) {
    if (!p) return;
    (void)cuda_of(b);
    cudaError_t e = cudaHostUnregister(p);
    if (e == cudaErrorHostMemoryNotRegistered) (void)cudaGetLastError(); /* its pinning failed */
    else CUDA_CHECK(e);
}

/* ---- copies that overlap the forward pass (backend.h copy_layers_async) -------------
 * An eviction burst's staging copy (src/kv/kv_tiers.c, --kv-offload-async): the old KV
 * of the blocks the step is about to overwrite, device -> pinned host, queued per layer
 * on an offload stream of the backend's own (never the transfer stream of copy_batch:
 * a layer-wise KV stream's copies, which go there, do not queue behind a burst of
 * hundreds of MiB, and the burst's PCIe writes do not wait for their NVLink ones):
 *
 *   compute stream:  ...previous ops | rec(before) | ... | wait(group 0) kv_store 0 | ...
 *   offload stream:  upload descriptors | wait(before) | copy layer 0 | rec(group 0) |
 *                    copy layer 1 | rec(group 1) | ... | rec(done[ticket % RING])
 *
 * The compute stream's wait for group l (copy_async_order, from the forward pass just
 * before layer l's K/V store) is an event wait on the device: the host never blocks.
 * The tiers' worker thread waits for done[ticket] on the host (cudaEventSynchronize,
 * blocking-sync events: it sleeps) before it reads a staging slot.
 *
 * Each group is one launch of the batched copy kernel above (descriptors uploaded once
 * per batch, before the wait, so that the upload never waits for the compute stream)
 * of at most PDSERVE_KV_OFFLOAD_CTAS CTAs (default 32, read once per process): the
 * copy shares the SMs with the forward pass, and writes over PCIe (~55 GB/s) need far
 * fewer CTAs in flight than NVLink (an expectation: 32 CTAs x 16 KiB of 16-byte
 * stores in flight each; not measured yet). The offload stream has the device's
 * highest priority, so that those few CTAs are placed ahead of the pass's next wave,
 * which waits for them (also an expectation). PDSERVE_KV_COPY=memcpy and items of the
 * copy engines' size (PDSERVE_KV_XFER_BIG_KIB) go to cudaMemcpyAsync on the same
 * stream, as in copy_batch. Memory a kernel cannot reach (pageable host memory) goes
 * through cudaMemcpyAsync too, which then is synchronous for the host: correct, not
 * overlapped. */
#define ASYNC_RING 16

typedef struct cuda_async {
    pthread_mutex_t mu;         /* ticket (waits come from any thread) */
    cudaStream_t stream;        /* the offload stream */
    cudaEvent_t before;         /* the compute stream's work at the latest batch's start */
    cudaEvent_t *group;         /* [cap] end of group g of the latest batch */
    bool *pending;              /* [cap] group g not yet ordered before compute ops */
    int *first;                 /* [cap + 1] a batch's descriptors of group g: first[g] .. first[g+1] */
    uint64_t *chunks;           /* [cap] chunks of group g's descriptors */
    int cap, n_groups, n_pending;
    cudaEvent_t done[ASYNC_RING]; /* end of batch t: done[t % ASYNC_RING] (blocking sync) */
    uint64_t ticket;            /* of the latest batch (0: none yet) */
    xfer_desc *host_desc;       /* pinned [desc_cap]: the latest batch's descriptors */
    xfer_desc *dev_desc;        /* device [desc_cap] */
    size_t desc_cap;
    cudaEvent_t desc_free;      /* the latest upload of host_desc has run */
    int ctas;                   /* most CTAs per group's launch */
} cuda_async;

static cuda_async *async_get(cuda_backend *cb) {
    if (cb->async) return cb->async;
    cuda_async *a = (cuda_async *)xcalloc(1, sizeof *a);
    pthread_mutex_init(&a->mu, NULL);
    /* the device's highest priority: the copy's few CTAs are placed before the next wave
     * of the pass's kernels, which would otherwise delay the copy the pass waits for */
    int lo = 0, hi = 0;
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    CUDA_CHECK(cudaStreamCreateWithPriority(&a->stream, cudaStreamNonBlocking, hi));
    CUDA_CHECK(cudaEventCreateWithFlags(&a->before, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&a->desc_free, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventRecord(a->desc_free, a->stream));
    for (int i = 0; i < ASYNC_RING; i++) {
        CUDA_CHECK(cudaEventCreateWithFlags(&a->done[i], cudaEventDisableTiming | cudaEventBlockingSync));
        CUDA_CHECK(cudaEventRecord(a->done[i], a->stream));
    }
    a->ctas = (int)env_long("PDSERVE_KV_OFFLOAD_CTAS", 32, 1, 4096);
    cb->async = a;
    log_info("cuda kv offload: staging copies overlap the forward pass (device %d, offload stream, "
             "at most %d CTAs a layer)", cb->device, a->ctas);
    return a;
}

/* Room for n groups' events (engine thread, never in a capture). */
static void async_reserve_groups(cuda_async *a, int n) {
    if (n <= a->cap) return;
    a->group = (cudaEvent_t *)xrealloc(a->group, (size_t)n * sizeof *a->group);
    a->pending = (bool *)xrealloc(a->pending, (size_t)n * sizeof *a->pending);
    a->first = (int *)xrealloc(a->first, (size_t)(n + 1) * sizeof *a->first);
    a->chunks = (uint64_t *)xrealloc(a->chunks, (size_t)n * sizeof *a->chunks);
    for (int i = a->cap; i < n; i++) {
        CUDA_CHECK(cudaEventCreateWithFlags(&a->group[i], cudaEventDisableTiming));
        a->pending[i] = false;
    }
    a->cap = n;
}

/* Room for n descriptors; the previous batch's upload of host_desc has run. Growing
 * waits for the offload stream (a kernel may still read dev_desc): the first bursts
 * only. */
static void async_reserve_desc(cuda_async *a, size_t n) {
    CUDA_CHECK(cudaEventSynchronize(a->desc_free)); /* at once: it ran before the last pass */
    if (n <= a->desc_cap) return;
    size_t want = n < 1024 ? 1024 : n * 2;
    CUDA_CHECK(cudaStreamSynchronize(a->stream));
    if (a->host_desc) CUDA_CHECK(cudaFreeHost(a->host_desc));
    if (a->dev_desc) CUDA_CHECK(cudaFree(a->dev_desc));
    CUDA_CHECK(cudaHostAlloc((void **)&a->host_desc, want * sizeof(xfer_desc), cudaHostAllocDefault));
    CUDA_CHECK(cudaMalloc((void **)&a->dev_desc, want * sizeof(xfer_desc)));
    a->desc_cap = want;
}

/* The compute stream waits for groups 0..g (the offload stream is in order: group g's
 * event implies the earlier ones). */
static void async_order_through(cuda_backend *cb, cuda_async *a, int g) {
    PD_ASSERT(!cb->capturing); /* the pass orders every group before a capture */
    CUDA_CHECK(cudaStreamWaitEvent(cb->stream, a->group[g], 0));
    for (int i = 0; i <= g; i++) {
        a->n_pending -= a->pending[i];
        a->pending[i] = false;
    }
}

extern "C" uint64_t cuda_kv_copy_layers_async(backend *b, const backend_copy *items, int n,
                                              const int *group_end, int n_groups) {
    PD_ASSERT(n >= 0 && n_groups >= 1 && group_end[n_groups - 1] == n);
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(!cb->capturing);
    xfer_state *x = xfer_get(cb);
    cuda_async *a = async_get(cb);
    if (a->n_pending) async_order_through(cb, a, a->n_groups - 1); /* the previous batch's rest */
    async_reserve_groups(a, n_groups);
    async_reserve_desc(a, (size_t)(n > 0 ? n : 1));
    /* descriptors of the kernel's items, per group: first_chunk counts from the group's start */
    bool kernel = n > 0 && x->p.mode != XFER_MEMCPY && kernel_reaches(x, cb->device, items[0].dst) &&
                  kernel_reaches(x, cb->device, items[0].src);
    int m = 0;
    int *g_first = a->first;
    uint64_t *g_chunks = a->chunks;
    bool vec16 = true;
    for (int g = 0, i = 0; g < n_groups; g++) {
        g_first[g] = m;
        g_chunks[g] = 0;
        PD_ASSERT(group_end[g] >= i && group_end[g] <= n);
        for (; i < group_end[g]; i++) {
            const backend_copy *it = &items[i];
            if (!it->bytes || !kernel || it->bytes >= x->p.big) continue;
            a->host_desc[m++] = xfer_desc{(uint8_t *)it->dst, (const uint8_t *)it->src, it->bytes,
                                          g_chunks[g], 0, 0, -1, 0};
            g_chunks[g] += (it->bytes + x->p.chunk - 1) / x->p.chunk;
            vec16 = vec16 && ((uintptr_t)it->dst | (uintptr_t)it->src | it->bytes) % 16 == 0;
        }
    }
    g_first[n_groups] = m;
    if (m > 0)
        CUDA_CHECK(cudaMemcpyAsync(a->dev_desc, a->host_desc, (size_t)m * sizeof(xfer_desc),
                                   cudaMemcpyHostToDevice, a->stream));
    CUDA_CHECK(cudaEventRecord(a->desc_free, a->stream));
    /* after every op queued so far on the compute stream: the copies read what it wrote */
    CUDA_CHECK(cudaEventRecord(a->before, cb->stream));
    CUDA_CHECK(cudaStreamWaitEvent(a->stream, a->before, 0));
    xfer_kernel_fn k = xfer_pick(x->p.unroll, false, x->p.stream_stores);
    for (int g = 0, i = 0; g < n_groups; g++) {
        for (; i < group_end[g]; i++) { /* what the kernel does not take: the copy engines */
            const backend_copy *it = &items[i];
            if (it->bytes && !(kernel && it->bytes < x->p.big))
                CUDA_CHECK(cudaMemcpyAsync(it->dst, it->src, it->bytes, cudaMemcpyDefault, a->stream));
        }
        int gm = g_first[g + 1] - g_first[g];
        if (gm > 0 && vec16) {
            unsigned grid = (unsigned)PD_MIN(g_chunks[g], (uint64_t)a->ctas);
            k<<<grid, x->p.threads, 0, a->stream>>>(a->dev_desc + g_first[g], gm, g_chunks[g], x->p.chunk,
                                                    NULL, XFER_WALK_STRIDE, NULL);
            CUDA_CHECK_LAUNCH();
        } else if (gm > 0) {
            unsigned grid = (unsigned)PD_MIN(gm, a->ctas);
            xfer_copy_bytes_kernel<<<grid, 256, 0, a->stream>>>(a->dev_desc + g_first[g], gm);
            CUDA_CHECK_LAUNCH();
        }
        CUDA_CHECK(cudaEventRecord(a->group[g], a->stream));
        a->pending[g] = true;
    }
    a->n_groups = n_groups;
    a->n_pending = n_groups;
    pthread_mutex_lock(&a->mu);
    uint64_t t = ++a->ticket;
    CUDA_CHECK(cudaEventRecord(a->done[t % ASYNC_RING], a->stream));
    pthread_mutex_unlock(&a->mu);
    return t;
}

extern "C" void cuda_kv_copy_async_order(backend *b, int g) {
    cuda_backend *cb = (cuda_backend *)b->impl; /* cuda_of below: only when there is work */
    cuda_async *a = cb->async;
    if (!a || a->n_pending == 0) return; /* the common case: one test per layer */
    if (g < 0 || g >= a->n_groups) g = a->n_groups - 1;
    else if (!a->pending[g]) return;
    cuda_of(b);
    async_order_through(cb, a, g);
}

extern "C" void cuda_kv_copy_async_wait(backend *b, uint64_t ticket) {
    cuda_backend *cb = cuda_of(b); /* this thread's current device */
    cuda_async *a = cb->async;
    PD_ASSERT(a && ticket > 0);
    pthread_mutex_lock(&a->mu);
    PD_ASSERT(ticket <= a->ticket);
    /* the ring's event of this ticket, or of a later batch that re-recorded it (which
     * ends after this one: the offload stream is in order) */
    cudaEvent_t e = a->done[ticket % ASYNC_RING];
    pthread_mutex_unlock(&a->mu);
    CUDA_CHECK(cudaEventSynchronize(e));
}

extern "C" void cuda_kv_async_release(backend *b) {
    cuda_backend *cb = (cuda_backend *)b->impl;
    cuda_async *a = cb->async;
    if (!a) return;
    CUDA_CHECK(cudaStreamSynchronize(a->stream));
    for (int i = 0; i < a->cap; i++) CUDA_CHECK(cudaEventDestroy(a->group[i]));
    for (int i = 0; i < ASYNC_RING; i++) CUDA_CHECK(cudaEventDestroy(a->done[i]));
    CUDA_CHECK(cudaEventDestroy(a->before));
    CUDA_CHECK(cudaEventDestroy(a->desc_free));
    if (a->host_desc) CUDA_CHECK(cudaFreeHost(a->host_desc));
    if (a->dev_desc) CUDA_CHECK(cudaFree(a->dev_desc));
    CUDA_CHECK(cudaStreamDestroy(a->stream));
    pthread_mutex_destroy(&a->mu);
    free(a->group);
    free(a->pending);
    free(a->first);
    free(a->chunks);
    free(a);
    cb->async = NULL;
}
