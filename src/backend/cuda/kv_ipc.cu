/* kv_ipc.cu: the CUDA backend's optional ops for moving KV cache blocks between
 * processes and to host memory (backend.h, "moving KV"; used by src/kv/): CUDA IPC
 * handles of device allocations, pinned host memory, and copy_batch, many small
 * copies at the cost of about one.
 *
 * copy_batch runs on a transfer stream of its own per device (never the compute
 * stream, so that a KV transfer neither waits behind nor blocks the forward pass, and
 * stays out of any graph being captured there). Items of at least XFER_BIG bytes go
 * to the copy engines (cudaMemcpyAsync); the small ones, KV blocks of tens to
 * hundreds of KiB, all go to one launch of xfer_copy_kernel, a batched memcpy whose
 * CTAs each copy a 64 KiB chunk of one item with 16-byte loads: device to device, to
 * a peer GPU over NVLink (IPC-opened memory, peer access enabled when opened), or to
 * and from pinned host memory over PCIe (mapped, so the kernel reaches it directly).
 * Per-item cudaMemcpyAsync calls would cost ~5-10 us each, more than moving a 64 KiB
 * block. Pageable host memory cannot be reached by a kernel: such batches go item by
 * item through cudaMemcpyAsync. PDSERVE_KV_COPY=memcpy (copy engines only) or
 * =kernel (the kernel for every size) pins one path, for A/B runs (bench_kv_cuda).
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

#define XFER_MAX_DEVICES 64
#define XFER_CHUNK ((uint64_t)64 << 10) /* bytes per CTA step */
#define XFER_BIG ((size_t)4 << 20)      /* items this large go to the copy engines */
#define XFER_THREADS 256
#define XFER_UNROLL 4

enum { XFER_AUTO, XFER_MEMCPY, XFER_KERNEL };

/* One item as the kernel sees it: first_chunk is the prefix sum of earlier items'
 * chunks, so CTA chunk c belongs to the last item whose first_chunk <= c. */
typedef struct xfer_desc {
    uint8_t *dst;
    const uint8_t *src;
    uint64_t bytes;
    uint64_t first_chunk;
} xfer_desc;

/* Per device, for the process's life (created on first use; the primary context
 * outlives backends). Owns every pointer here. */
typedef struct xfer_state {
    pthread_mutex_t mu;        /* one batch at a time per device */
    bool ready;
    int mode;                  /* XFER_AUTO | MEMCPY | KERNEL */
    bool host_mapped;          /* registered host memory has the same address on the device */
    cudaStream_t stream;
    xfer_desc *host_desc;      /* pinned, [cap] */
    xfer_desc *dev_desc;       /* device, [cap] */
    size_t cap;
} xfer_state;

static xfer_state g_xfer[XFER_MAX_DEVICES];
static pthread_mutex_t g_xfer_init = PTHREAD_MUTEX_INITIALIZER;

/* ---- the kernel ---------------------------------------------------------------------- */

/* Copies every chunk of d[0..n): grid-stride over total chunks. vec16: every dst, src
 * and size of the batch is a multiple of 16 bytes (else byte copies). */
__global__ void xfer_copy_kernel(const xfer_desc *d, int n, uint64_t total_chunks, bool vec16) {
    for (uint64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
        int lo = 0, hi = n - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (d[mid].first_chunk <= c) lo = mid;
            else hi = mid - 1;
        }
        const uint8_t *src = d[lo].src;
        uint8_t *dst = d[lo].dst;
        uint64_t off = (c - d[lo].first_chunk) * XFER_CHUNK;
        uint64_t len = d[lo].bytes - off < XFER_CHUNK ? d[lo].bytes - off : XFER_CHUNK;
        if (vec16) {
            const uint4 *s = (const uint4 *)(src + off);
            uint4 *t = (uint4 *)(dst + off);
            uint64_t n16 = len / 16;
            /* XFER_UNROLL loads in flight per thread before the stores: latency of
             * NVLink and PCIe reads is hidden by numbers, not by caches */
            for (uint64_t i = threadIdx.x; i < n16; i += XFER_UNROLL * blockDim.x) {
                uint4 r[XFER_UNROLL];
#pragma unroll
                for (int k = 0; k < XFER_UNROLL; k++)
                    if (i + k * blockDim.x < n16) r[k] = s[i + k * blockDim.x];
#pragma unroll
                for (int k = 0; k < XFER_UNROLL; k++)
                    if (i + k * blockDim.x < n16) t[i + k * blockDim.x] = r[k];
            }
        } else {
            for (uint64_t i = threadIdx.x; i < len; i += blockDim.x) dst[off + i] = src[off + i];
        }
    }
}

/* ---- state --------------------------------------------------------------------------- */

static xfer_state *xfer_get(cuda_backend *cb) {
    PD_ASSERT(cb->device >= 0 && cb->device < XFER_MAX_DEVICES);
    xfer_state *x = &g_xfer[cb->device];
    pthread_mutex_lock(&g_xfer_init);
    if (!x->ready) {
        pthread_mutex_init(&x->mu, NULL);
        CUDA_CHECK(cudaStreamCreateWithFlags(&x->stream, cudaStreamNonBlocking));
        const char *m = getenv("PDSERVE_KV_COPY");
        x->mode = m && !strcmp(m, "memcpy") ? XFER_MEMCPY : m && !strcmp(m, "kernel") ? XFER_KERNEL
                                                                                      : XFER_AUTO;
        int v = 0;
        CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrCanUseHostPointerForRegisteredMem,
                                          cb->device));
        x->host_mapped = v != 0;
        x->ready = true;
        log_info("cuda kv transfers: device %d, copies %s, pinned host memory %s by kernels",
                 cb->device, x->mode == XFER_MEMCPY ? "by copy engines only"
                             : x->mode == XFER_KERNEL ? "by kernel only" : "batched (auto)",
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

/* Whether a kernel on `device` can read and write memory at p (the batch's kind of
 * memory is that of its first item: backend.h's contract). */
static bool kernel_reaches(const xfer_state *x, int device, const void *p) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    if (a.type == cudaMemoryTypeHost) return x->host_mapped && a.devicePointer == p;
    if (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) {
        if (a.device == device) return true;
        int ok = 0;
        return cudaDeviceCanAccessPeer(&ok, device, a.device) == cudaSuccess && ok;
    }
    return false; /* pageable host memory */
}

/* ---- ops ----------------------------------------------------------------------------- */

extern "C" void cuda_kv_copy_batch(backend *b, const backend_copy *items, int n) {
    if (n <= 0) return;
    cuda_backend *cb = cuda_of(b);
    xfer_state *x = xfer_get(cb);
    pthread_mutex_lock(&x->mu);
    bool kernel = x->mode != XFER_MEMCPY && kernel_reaches(x, cb->device, items[0].dst) &&
                  kernel_reaches(x, cb->device, items[0].src);
    size_t small = 0;
    for (int i = 0; i < n; i++) {
        const backend_copy *it = &items[i];
        if (!it->bytes) continue;
        if (kernel && (it->bytes < XFER_BIG || x->mode == XFER_KERNEL)) {
            small++;
            continue;
        }
        CUDA_CHECK(cudaMemcpyAsync(it->dst, it->src, it->bytes, cudaMemcpyDefault, x->stream));
    }
    if (small) {
        xfer_reserve(x, small);
        uint64_t chunks = 0;
        bool vec16 = true;
        size_t m = 0;
        for (int i = 0; i < n; i++) {
            const backend_copy *it = &items[i];
            if (!it->bytes || (it->bytes >= XFER_BIG && x->mode != XFER_KERNEL)) continue;
            x->host_desc[m] = xfer_desc{(uint8_t *)it->dst, (const uint8_t *)it->src, it->bytes, chunks};
            chunks += (it->bytes + XFER_CHUNK - 1) / XFER_CHUNK;
            vec16 = vec16 && ((uintptr_t)it->dst | (uintptr_t)it->src | it->bytes) % 16 == 0;
            m++;
        }
        CUDA_CHECK(cudaMemcpyAsync(x->dev_desc, x->host_desc, m * sizeof(xfer_desc),
                                   cudaMemcpyHostToDevice, x->stream));
        unsigned grid = (unsigned)(chunks < (uint64_t)cb->sm_count * 8 ? chunks : (uint64_t)cb->sm_count * 8);
        xfer_copy_kernel<<<grid, XFER_THREADS, 0, x->stream>>>(x->dev_desc, (int)m, chunks, vec16);
        CUDA_CHECK_LAUNCH();
    }
    /* every byte landed, and host_desc may be rewritten by the next batch */
    CUDA_CHECK(cudaStreamSynchronize(x->stream));
    pthread_mutex_unlock(&x->mu);
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
