/* kv_nccl_cuda.h: the few CUDA runtime calls the nccl KV medium (src/kv/kv_nccl.c)
 * needs around NCCL: the thread's current device, streams and events for NCCL's
 * sends and receives and for the gathers and scatters that feed them (ordered on the
 * device: the host never waits between chunks), device staging memory, and the
 * gather / scatter kernel. kv_nccl_cuda.cu defines them with
 * C linkage; this header includes no CUDA header so that C code can include it, and
 * callers use it only in CUDA builds (PDSERVE_HAVE_CUDA). Streams and events are
 * opaque pointers (cudaStream_t, cudaEvent_t). */
#ifndef PD_CUDA_KV_NCCL_CUDA_H
#define PD_CUDA_KV_NCCL_CUDA_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct backend;
/* Makes b's device current in the calling thread (NCCL binds a communicator to the
 * device current at its creation and wants it current at each call). Returns it. */
int cuda_kv_nccl_bind(struct backend *b);
/* A non-blocking stream of b's device (never the compute stream: NCCL's kernels wait
 * for the peer, and the forward pass must not wait behind them). */
void *cuda_kv_nccl_stream_create(struct backend *b);
/* Waits for the stream's work, then destroys it. NULL: no-op. */
void cuda_kv_nccl_stream_destroy(struct backend *b, void *stream);
void *cuda_kv_nccl_event_create(struct backend *b);
void cuda_kv_nccl_event_destroy(struct backend *b, void *event);
/* An event that keeps time (for PDSERVE_KV_NCCL_TRACE), waiting for one, and the ms
 * between two completed ones (-1: not both timed and done). */
void *cuda_kv_nccl_timer_create(struct backend *b);
void cuda_kv_nccl_event_sync(struct backend *b, void *event);
double cuda_kv_nccl_timer_ms(struct backend *b, void *from, void *to);
/* Event marks the work queued so far on stream. */
void cuda_kv_nccl_event_record(struct backend *b, void *event, void *stream);
/* 1 when the work before the event's last record is done, 0 when not yet. */
int cuda_kv_nccl_event_done(struct backend *b, void *event);
/* Device memory of `bytes`, or NULL when the device has not that much free (a value:
 * the KV cache may have taken the rest). */
void *cuda_kv_nccl_alloc(struct backend *b, size_t bytes);
void cuda_kv_nccl_free(struct backend *b, void *p);
/* Work queued on stream after this call waits (on the device) for the event's last
 * record; the host does not wait. */
void cuda_kv_nccl_stream_wait(struct backend *b, void *stream, void *event);
/* Queues on stream a copy of `bytes` from pinned host memory src to device memory dst. */
void cuda_kv_nccl_upload(struct backend *b, void *stream, void *dst, const void *src, size_t bytes);
/* Queues on stream the copies between one layer's blocks and a staging buffer, one
 * launch: payload unit u in [u0, u1) is block ids[u % nb] of part u / nb (0: k, whose
 * allocation is k; 1: v), block_bytes each, at stage + (u - u0) * block_bytes.
 * to_stage: blocks -> stage (the sender's gather), else stage -> blocks (the
 * receiver's scatter). ids: device memory [nb]. Returns at once. */
void cuda_kv_nccl_units(struct backend *b, void *stream, void *k, void *v, const int *ids, int nb,
                        size_t u0, size_t u1, void *stage, size_t block_bytes, int to_stage);

#ifdef __cplusplus
}
#endif

#endif
