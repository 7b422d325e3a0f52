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
/* backend.h copy_layers_async, copy_async_order, copy_async_wait */
uint64_t cuda_kv_copy_layers_async(backend *b, const backend_copy *items, int n, const int *group_end,
                                   int n_groups);
void cuda_kv_copy_async_order(backend *b, int g);
void cuda_kv_copy_async_wait(backend *b, uint64_t ticket);
/* backend.h copy_runs and copy_timing */
void cuda_kv_copy_runs(backend *b, const backend_run *runs, int n_runs, void *const *dst,
                       const void *const *src, int n_parts);
int cuda_kv_copy_timing(backend *b, backend_copy_timing *out);
int cuda_kv_copy_host_ctas(backend *b); /* backend.h copy_host_ctas */
/* Frees what copy_layers_async made (cu_destroy; waits for its copies first). */
void cuda_kv_async_release(backend *b);
}

#endif
