/* kv_ipc.h: the CUDA backend's ops for moving KV between processes and to host memory
 * (kv_ipc.cu; backend.h "moving KV"), which backend_cuda.cu puts in its op table. C
 * linkage, C++ side only. */
#ifndef PD_CUDA_KV_IPC_H
#define PD_CUDA_KV_IPC_H

extern "C" {
int cuda_kv_ipc_export(backend *b, const void *ptr, uint8_t *handle, uint64_t *offset, char *err,
                       size_t errlen);
void *cuda_kv_ipc_open(backend *b, const uint8_t *handle, char *err, size_t errlen);
void cuda_kv_ipc_close(backend *b, void *base);
void cuda_kv_copy_batch(backend *b, const backend_copy *items, int n);
int cuda_kv_copy_batch_sum(backend *b, const backend_copy *items, int n, const int32_t *sum_slot,
                           const uint64_t *sum_at, uint64_t *sums, int n_sums);
void *cuda_kv_host_alloc(backend *b, size_t bytes);
void cuda_kv_host_free(backend *b, void *p);
int cuda_kv_host_register(backend *b, void *p, size_t bytes);
void cuda_kv_host_unregister(backend *b, void *p);
}

#endif
