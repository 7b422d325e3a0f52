/* kv_nccl_cuda.cu: the CUDA runtime calls of the nccl KV medium (kv_nccl_cuda.h), so
 * that src/kv/kv_nccl.c stays C without CUDA headers, and its gather / scatter kernel.
 * Every call goes through CUDA_CHECK; the only failures returned as values are "not
 * done yet" (event query) and "out of device memory" (staging buffers, sized after the
 * KV cache took its share).
 *
 * Tuned for: a handful of streams and buffers per peer, made once per communicator;
 * chunks of tens of MiB of KV blocks of 16 to 64 KiB, gathered and scattered in device
 * memory (HBM, several TB/s) while NCCL moves the previous chunk over NVLink. */
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/kv_nccl_cuda.h"

extern "C" int cuda_kv_nccl_bind(backend *b) { return cuda_of(b)->device; }

extern "C" void *cuda_kv_nccl_stream_create(backend *b) {
    (void)cuda_of(b);
    cudaStream_t s;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return (void *)s;
}

extern "C" void cuda_kv_nccl_stream_destroy(backend *b, void *stream) {
    if (!stream) return;
    (void)cuda_of(b);
    CUDA_CHECK(cudaStreamSynchronize((cudaStream_t)stream));
    CUDA_CHECK(cudaStreamDestroy((cudaStream_t)stream));
}

extern "C" void *cuda_kv_nccl_event_create(backend *b) {
    (void)cuda_of(b);
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return (void *)e;
}

extern "C" void *cuda_kv_nccl_timer_create(backend *b) {
    (void)cuda_of(b);
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreate(&e));
    return (void *)e;
}

extern "C" void cuda_kv_nccl_event_sync(backend *b, void *event) {
    (void)cuda_of(b);
    CUDA_CHECK(cudaEventSynchronize((cudaEvent_t)event));
}

extern "C" double cuda_kv_nccl_timer_ms(backend *b, void *from, void *to) {
    (void)cuda_of(b);
    float ms = 0;
    if (cudaEventElapsedTime(&ms, (cudaEvent_t)from, (cudaEvent_t)to) != cudaSuccess) {
        (void)cudaGetLastError();
        return -1;
    }
    return ms;
}

extern "C" void cuda_kv_nccl_event_destroy(backend *b, void *event) {
    if (!event) return;
    (void)cuda_of(b);
    CUDA_CHECK(cudaEventDestroy((cudaEvent_t)event));
}

extern "C" void cuda_kv_nccl_event_record(backend *b, void *event, void *stream) {
    (void)cuda_of(b);
    CUDA_CHECK(cudaEventRecord((cudaEvent_t)event, (cudaStream_t)stream));
}

extern "C" int cuda_kv_nccl_event_done(backend *b, void *event) {
    (void)cuda_of(b);
    cudaError_t e = cudaEventQuery((cudaEvent_t)event);
    if (e == cudaErrorNotReady) {
        (void)cudaGetLastError(); /* not an error: clear it */
        return 0;
    }
    CUDA_CHECK(e);
    return 1;
}

extern "C" void *cuda_kv_nccl_alloc(backend *b, size_t bytes) {
    (void)cuda_of(b);
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        return NULL;
    }
    CUDA_CHECK(e);
    return p;
}

extern "C" void cuda_kv_nccl_free(backend *b, void *p) {
    if (!p) return;
    (void)cuda_of(b);
    CUDA_CHECK(cudaFree(p));
}

extern "C" void cuda_kv_nccl_stream_wait(backend *b, void *stream, void *event) {
    (void)cuda_of(b);
    CUDA_CHECK(cudaStreamWaitEvent((cudaStream_t)stream, (cudaEvent_t)event, 0));
}

extern "C" void cuda_kv_nccl_upload(backend *b, void *stream, void *dst, const void *src,
                                    size_t bytes) {
    (void)cuda_of(b);
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream));
}

/* One CTA per payload unit (a KV block) at a time, grid-stride over units; VEC: 16-byte
 * words, 4 loads in flight per thread before the stores; else bytes (a block size or
 * base not a multiple of 16: never seen, kept correct). */
template <bool VEC>
__global__ void nccl_units_kernel(uint8_t *k, uint8_t *v, const int *ids, int nb, uint64_t u0,
                                  uint64_t n_units, uint8_t *stage, uint64_t bb, int to_stage) {
    for (uint64_t w = blockIdx.x; w < n_units; w += gridDim.x) {
        uint64_t u = u0 + w;
        uint8_t *blk = (u / (uint64_t)nb ? v : k) + (uint64_t)ids[u % (uint64_t)nb] * bb;
        uint8_t *st = stage + w * bb;
        const uint8_t *from = to_stage ? blk : st;
        uint8_t *to = to_stage ? st : blk;
        if (VEC) {
            const uint4 *s = (const uint4 *)from;
            uint4 *d = (uint4 *)to;
            uint64_t n16 = bb / 16, i = threadIdx.x, bd = blockDim.x;
            for (; i + 3 * bd < n16; i += 4 * bd) {
                uint4 r0 = s[i], r1 = s[i + bd], r2 = s[i + 2 * bd], r3 = s[i + 3 * bd];
                d[i] = r0, d[i + bd] = r1, d[i + 2 * bd] = r2, d[i + 3 * bd] = r3;
            }
            for (; i < n16; i += bd) d[i] = s[i];
        } else {
            for (uint64_t i = threadIdx.x; i < bb; i += blockDim.x) to[i] = from[i];
        }
    }
}

extern "C" void cuda_kv_nccl_units(backend *b, void *stream, void *k, void *v, const int *ids,
                                   int nb, size_t u0, size_t u1, void *stage, size_t block_bytes,
                                   int to_stage) {
    cuda_backend *cb = cuda_of(b);
    PD_ASSERT(nb > 0 && u0 <= u1 && u1 <= 2 * (size_t)nb);
    if (u1 == u0) return;
    uint64_t n = u1 - u0, most = (uint64_t)cb->sm_count * 4;
    unsigned grid = (unsigned)(n < most ? n : most);
    bool vec = ((uintptr_t)k | (uintptr_t)v | (uintptr_t)stage | block_bytes) % 16 == 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (vec)
        nccl_units_kernel<true><<<grid, 256, 0, s>>>((uint8_t *)k, (uint8_t *)v, ids, nb, u0, n,
                                                     (uint8_t *)stage, block_bytes, to_stage);
    else
        nccl_units_kernel<false><<<grid, 256, 0, s>>>((uint8_t *)k, (uint8_t *)v, ids, nb, u0, n,
                                                      (uint8_t *)stage, block_bytes, to_stage);
    CUDA_CHECK_LAUNCH();
}
