/* kv_nccl_cuda.cu: the CUDA runtime calls of the nccl KV medium (kv_nccl_cuda.h), so
 * that src/kv/kv_nccl.c stays C without CUDA headers. Every call goes through
 * CUDA_CHECK; the only failures returned as values are "not done yet" (event query)
 * and "out of device memory" (staging buffers, sized after the KV cache took its share).
 *
 * Tuned for: a handful of streams and buffers per peer, made once per communicator. */
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
